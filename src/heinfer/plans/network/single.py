"""Layout `ckks-network` (HNQ1 -> HNR1): one ciphertext per input, `copies` copies of its
features in the slots (manifest `input.layout`), the scores in the first output slots.

It needs Galois keys for the schedule's rotations (manifest `keys.galois_steps`); a key upload
made for the batched layout only has none, and requests of this layout then get a clear 422.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from heinfer.errors import BadInputError, ParameterMismatchError
from heinfer.plans.base import ClientLayout, Request, ServerLayout, split_evenly
from heinfer.plans.network.frames import (
    BATCH_REQUEST_MAGIC,
    MAX_IMAGES_PER_REQUEST,
    REQUEST_MAGIC,
    RESPONSE_MAGIC,
    check_ciphertext_tags,
    ciphertext_bytes_estimate,
    decode_frames,
    encode_frames,
    max_ciphertext_bytes,
)
from heinfer.plans.network.manifest import SINGLE_LAYOUT
from heinfer.plans.network.schedule import run_single
from heinfer.plans.network.spec import as_batch

if TYPE_CHECKING:
    from heinfer.plans.network.codec import NetworkCodec
    from heinfer.plans.network.plan import NetworkPlan

__all__ = ["SingleClient", "SingleServer"]


def _key_parts(network: dict[str, Any]) -> frozenset[str]:
    keys = network["keys"]
    parts = {"public"} | ({"relin"} if keys["relin"] else set())
    return frozenset(parts | ({"galois"} if keys["galois_steps"] else set()))


class SingleServer(ServerLayout):
    kind = SINGLE_LAYOUT
    request_magic = REQUEST_MAGIC

    def __init__(self, plan: NetworkPlan) -> None:
        self.plan = plan
        self._max_bytes = max_ciphertext_bytes(plan.network["params"])
        self._tag = plan.ctx_fingerprint
        self.key_parts = _key_parts(plan.network)

    def _records(self, body: bytes | memoryview) -> list[memoryview]:
        blobs = decode_frames(REQUEST_MAGIC, body, MAX_IMAGES_PER_REQUEST, self._max_bytes)
        check_ciphertext_tags(blobs, self._tag)
        return blobs

    def check(self, body: bytes | memoryview) -> Request:
        return Request(self.kind, len(self._records(body)), body)

    def split(self, request: Request, ways: int) -> list[bytes | memoryview]:
        """Images are independent: up to `ways` bodies of consecutive images."""
        parts = split_evenly(self._records(request.body), ways)
        if len(parts) == 1:
            return [request.body]
        return [encode_frames(REQUEST_MAGIC, list(part)) for part in parts]

    def join(self, responses: Sequence[bytes]) -> bytes:
        blobs: list[memoryview] = []
        for body in responses:
            blobs += decode_frames(RESPONSE_MAGIC, body, MAX_IMAGES_PER_REQUEST, self._max_bytes)
        return encode_frames(RESPONSE_MAGIC, blobs)

    def evaluate(self, body: bytes | memoryview, keys: Any) -> bytes:
        blobs = self._records(body)
        if keys.galois is None and self.plan.network["keys"]["galois_steps"]:
            raise ParameterMismatchError(
                "this key upload has no Galois keys (the batch-only set): single-image requests "
                "need the full key set of the manifest's `keys`; upload it, or send batched "
                f"({BATCH_REQUEST_MAGIC.decode()}) requests"
            )
        plan, ctx = self.plan, self.plan.ctx
        schedule, plains = plan.single_schedule()
        top = ctx.top_count
        cts = [
            ctx.load_ciphertext(
                b, prime_count=top, scale=schedule.input_scale, max_bytes=self._max_bytes
            )
            for b in blobs
        ]
        ops = plan.seal_ops(keys, plains)
        out = [
            ctx.save_ciphertext(self._finalize(run_single(schedule, ct, ops), keys)) for ct in cts
        ]
        return encode_frames(RESPONSE_MAGIC, out)

    def _finalize(self, ct: Any, keys: Any) -> Any:
        """The final bias in the output slots, masks in all others, flooding, re-randomization."""
        bias = self.plan.final_bias
        return self.plan.mask_and_flood(
            ct, bias, len(bias), keys, self.plan.flood_std(SINGLE_LAYOUT)
        )


class SingleClient(ClientLayout):
    kind = SINGLE_LAYOUT
    response_magic = RESPONSE_MAGIC

    def __init__(self, codec: NetworkCodec) -> None:
        self.codec = codec
        network = codec.network
        layout = network["input"]["layout"]
        self._copies = int(layout["copies"])
        self._stride = int(layout["stride"])
        self._scale = 2.0 ** float(network["input"]["scale_log2"])
        self._out_slots = np.asarray(network["output"]["slots"], dtype=np.int64)
        self._capacity = int(network["input"]["max_images_per_request"])

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def key_parts(self) -> frozenset[str]:
        return _key_parts(self.codec.network)

    def wire_bytes(self, samples: int) -> int:
        """Seeded request ciphertexts (one polynomial at the top level), full response
        ciphertexts (two polynomials at the output level)."""
        params = self.codec.network["params"]
        top = len(params["coeff_modulus"]) - 1
        primes = int(self.codec.network["output"]["level_primes"])
        request = ciphertext_bytes_estimate(params, top, 1)
        response = ciphertext_bytes_estimate(params, primes, 2)
        return 16 + samples * (8 + request + response)

    def slots(self, x: np.ndarray) -> np.ndarray:
        """The slot vector of one input: its features repeated `copies` times."""
        v = np.zeros(self.codec.ctx.slots)
        for c in range(self._copies):
            v[c * self._stride : c * self._stride + len(x)] = x
        return v

    def encrypt(self, secret: Any, X: np.ndarray) -> bytes:
        X = as_batch(X, self.codec.n_features)
        if not np.all(np.isfinite(X)):
            raise BadInputError("input contains NaN or infinity")
        keys = self.codec.client_keys(secret)
        return encode_frames(REQUEST_MAGIC, [keys.encrypt(self.slots(x), self._scale) for x in X])

    def decrypt_slots(self, secret: Any, body: bytes) -> np.ndarray:
        """All slots of every result ciphertext, shape (n, slots) (diagnostics and tests)."""
        keys = self.codec.client_keys(secret)
        max_bytes = max_ciphertext_bytes(self.codec.network["params"])
        blobs = decode_frames(RESPONSE_MAGIC, body, self._capacity, max_bytes)
        primes = int(self.codec.network["output"]["level_primes"])
        return np.stack([keys.decrypt(b, prime_count=primes) for b in blobs])

    def decrypt(self, secret: Any, body: bytes) -> np.ndarray:
        return self.decrypt_slots(secret, body)[:, self._out_slots]
