"""The cost model that picks a model's linear layouts, and explains the pick.

Per layout and per single-sample request: key bytes (uploaded once per client), request and
response bytes, and an estimate of server time. Times are in units of one SEAL NTT of degree
N over one prime, times a per-operation count, calibrated on this repository's CI machine
(bench/sizes.py prints the measured numbers next to these; docs/performance.md):
- coeff-rowpack, per group: one product and its inverse NTTs, a fresh encryption of zero,
  a mask and a switch to the last prime, plus the glue between SEAL and numpy: ~60 NTTs;
- coeff-packed: per client image one forward NTT (2L); per group one NTT-form product (~L);
  per node of the server's tree one inverse NTT (2L plus glue, ~2L + 2) and, but for one node
  a block, one key switch (L(L+1) + 2(L+1) NTTs plus glue, ~L(L+1) + 2(L+1) + 10); once per
  result ciphertext the rowpack treatment (~60 L). The request is 2^client_levels
  ciphertexts: moving tree levels to the client trades request bytes for key switches and
  Galois keys, and the pick weighs that too.

The pick minimizes one number, "bytes a client pays over its first 100 requests":
key bytes + 100 x (request + response) + 100 x server ms x 12,500 (100 Mbit/s: a millisecond
of server time is worth 12.5 KB on the wire). A small model (one group) never gains from
packing: no tree, the same response, extra keys, so rowpack wins; a wide one with many classes
saves megabytes per request for a few MB of keys uploaded once.
"""

from __future__ import annotations

import math
from typing import Any

from heinfer.he.backend import Context
from heinfer.he.galois import galois_key_bytes
from heinfer.he.params import BFVParameters
from heinfer.plans.linear.packed import Packing

__all__ = ["BYTES_PER_MS", "REQUESTS", "estimate", "pick", "score"]

REQUESTS = 100  # requests a key upload is amortized over
BYTES_PER_MS = 12_500  # 100 Mbit/s
_NTT_NS_PER_BUTTERFLY = 1.2  # one NTT of degree N over one prime ~ 1.2 ns x N log2 N / 2


def _ntt_ms(degree: int) -> float:
    return _NTT_NS_PER_BUTTERFLY * degree * math.log2(degree) / 2 / 1e6


def estimate(
    params: BFVParameters,
    groups: int,
    result_bits: int,
    pack: Packing | None = None,
    n_outputs: int = 0,
) -> dict[str, Any]:
    """Key, request and response bytes and server ms of one single-sample request."""
    context = Context(params)
    n = params.poly_modulus_degree
    levels = len(params.data_primes)
    ntt = _ntt_ms(n)
    polynomial = (n * result_bits + 7) // 8
    if pack is None:
        return {
            "key_bytes": context.public_key_bytes,
            "request_bytes": context.request_bytes,
            "response_bytes": groups * polynomial + (n_outputs * result_bits + 7) // 8,
            "server_ms": round(groups * 60 * levels * ntt, 2),
        }
    switch = levels * (levels + 1) + 2 * (levels + 1) + 10
    blocks = len(pack.blocks)
    units = (
        pack.images * 2 * levels
        + pack.groups * levels
        + pack.nodes * (2 * levels + 2)
        + pack.key_switches * switch
        + blocks * 60 * levels
    )
    return {
        "key_bytes": context.public_key_bytes + galois_key_bytes(context, pack.elements),
        "request_bytes": pack.images * context.request_bytes,
        "response_bytes": blocks * polynomial + (n_outputs * result_bits + 7) // 8,
        "server_ms": round(units * ntt, 2),
        "galois_keys": len(pack.elements),
        "client_levels": pack.client_levels,
        "key_switches": pack.key_switches,
    }


def score(cost: dict[str, Any]) -> float:
    per_request = cost["request_bytes"] + cost["response_bytes"] + cost["server_ms"] * BYTES_PER_MS
    return float(cost["key_bytes"] + REQUESTS * per_request)


def pick(options: dict[str, dict[str, Any]]) -> str:
    return min(options, key=lambda kind: score(options[kind]))
