"""A random linear head on the coeff-packed layout, shared by the packed-layout and the
allowed-layouts tests (a plain module, not conftest)."""

from __future__ import annotations

import numpy as np

from heinfer.plans.linear import compile_linear
from heinfer.plans.linear.plan import LinearPlan


def random_packed_head(rng: np.random.Generator, name: str) -> LinearPlan:
    """A random 20 x 700 classification head forced onto coeff-packed: stride 1024, 8 rows a
    group, so 3 groups (the last one alone) and a two-level tree. It also serves coeff-rowpack
    and coeff-batch."""
    return compile_linear(
        rng.normal(0, 1, (20, 700)),
        rng.normal(0, 1, 20),
        name=name,
        task="classification",
        estimator="t",
        classes=None,
        input_range=(0.0, 1.0),
        layout="coeff-packed",
    )
