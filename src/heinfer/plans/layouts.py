"""The built-in layouts. This module is the registry's table of contents: each line names a
family (one key format, one `Plan`/`Codec` pair) or one of its request formats, default first."""

from __future__ import annotations

from heinfer.plans.base import register_family, register_layout
from heinfer.plans.linear import (
    BatchClient,
    BatchServer,
    LinearCodec,
    LinearPlan,
    RowpackClient,
    RowpackServer,
)
from heinfer.plans.linear.batch import offers_batch
from heinfer.plans.linear.plan import FAMILY as LINEAR

__all__: list[str] = []

register_family(LINEAR, LinearPlan, LinearCodec)
register_layout(LINEAR, RowpackServer, RowpackClient)
register_layout(LINEAR, BatchServer, BatchClient, offered=offers_batch)

# -- networks (CKKS): heinfer.plans.network --------------------------------------------------------
def _networks() -> None:
    from heinfer.plans.network.batch import BatchClient, BatchServer
    from heinfer.plans.network.codec import NetworkCodec
    from heinfer.plans.network.manifest import FAMILY, has_batch
    from heinfer.plans.network.plan import NetworkPlan
    from heinfer.plans.network.single import SingleClient, SingleServer

    register_family(FAMILY, NetworkPlan, NetworkCodec)
    register_layout(FAMILY, SingleServer, SingleClient)
    register_layout(FAMILY, BatchServer, BatchClient, offered=has_batch)


_networks()
