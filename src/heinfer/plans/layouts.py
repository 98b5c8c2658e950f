"""The built-in layouts. This module is the registry's table of contents: each line names a
family (one key format, one `Plan`/`Codec` pair) or one of its request formats."""

from __future__ import annotations

from heinfer.plans.base import register_family, register_layout

__all__: list[str] = []
