"""The built-in layouts. This module is the registry's table of contents: each line names a
family (one key format, one `Plan`/`Codec` pair) or one of its request formats, default first."""

from __future__ import annotations

from heinfer.plans import linear, network
from heinfer.plans.base import register_family, register_layout
from heinfer.plans.linear.batch import offers_batch
from heinfer.plans.linear.packed import PackedClient, PackedServer, offers_packed
from heinfer.plans.linear.plan import FAMILY as LINEAR
from heinfer.plans.network import batch as network_batch
from heinfer.plans.network import single as network_single
from heinfer.plans.network.manifest import FAMILY as NETWORK
from heinfer.plans.network.manifest import has_batch

__all__: list[str] = []

# BFV linear models: heinfer.plans.linear
register_family(LINEAR, linear.LinearPlan, linear.LinearCodec)
register_layout(LINEAR, linear.RowpackServer, linear.RowpackClient)
register_layout(LINEAR, linear.BatchServer, linear.BatchClient, offered=offers_batch)
register_layout(LINEAR, PackedServer, PackedClient, offered=offers_packed)

# CKKS networks: heinfer.plans.network
register_family(NETWORK, network.NetworkPlan, network.NetworkCodec)
register_layout(NETWORK, network_single.SingleServer, network_single.SingleClient)
register_layout(NETWORK, network_batch.BatchServer, network_batch.BatchClient, offered=has_batch)
