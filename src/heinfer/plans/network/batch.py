"""Layout `ckks-network-batch` (HNB1 -> HNS1, CryptoNets packing): slot i holds input i, one
ciphertext per input feature (unused slots zero), one ciphertext per score in the response.

Every affine block is a matrix of scalars, so the server needs no rotations and the client no
Galois keys (public + relin keys, ~1.3 MB seeded). One batch costs the server about the same for
1 or 4,096 inputs, so the client picks it from `preferred_from` inputs on. Scores end at the
single-image layout's level and scale and get the same final treatment per ciphertext, the mask
covering slots >= n (they hold the network applied to zeros: model values).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from heinfer.errors import BadInputError
from heinfer.plans.base import ClientLayout, Request, ServerLayout
from heinfer.plans.network.frames import (
    BATCH_REQUEST_MAGIC,
    BATCH_RESPONSE_MAGIC,
    check_ciphertext_tags,
    ciphertext_bytes_estimate,
    decode_batch_frames,
    encode_batch_frames,
    max_ciphertext_bytes,
)
from heinfer.plans.network.manifest import BATCH_LAYOUT
from heinfer.plans.network.schedule import run_batch
from heinfer.plans.network.spec import as_batch

if TYPE_CHECKING:
    from heinfer.plans.network.codec import NetworkCodec
    from heinfer.plans.network.plan import NetworkPlan

__all__ = ["BATCH_THRESHOLD", "BatchClient", "BatchServer"]

# Fewest inputs for which one batch beats single-image requests on the server (a batch costs
# about as much as this many single images; measured in docs/performance.md).
BATCH_THRESHOLD = 300


def _key_parts(batch: dict[str, Any]) -> frozenset[str]:
    keys = batch["keys"]
    parts = {"public"} | ({"relin"} if keys["relin"] else set())
    return frozenset(parts | ({"galois"} if keys["galois_steps"] else set()))


class BatchServer(ServerLayout):
    kind = BATCH_LAYOUT
    request_magic = BATCH_REQUEST_MAGIC

    def __init__(self, plan: NetworkPlan) -> None:
        self.plan = plan
        self.batch: dict[str, Any] = plan.network["batch"]
        self._max_bytes = max_ciphertext_bytes(plan.network["params"])
        self._slots = int(plan.network["params"]["poly_modulus_degree"]) // 2
        self._tag = plan.ctx_fingerprint
        self.key_parts = _key_parts(self.batch)

    def _records(self, body: bytes | memoryview) -> tuple[int, list[memoryview]]:
        images, blobs = decode_batch_frames(
            BATCH_REQUEST_MAGIC,
            body,
            count=self.plan.n_features,
            max_images=self._slots,
            max_record_bytes=self._max_bytes,
        )
        check_ciphertext_tags(blobs, self._tag)
        return images, blobs

    def check(self, body: bytes | memoryview) -> Request:
        return Request(self.kind, self._records(body)[0], body)

    def evaluate(self, body: bytes | memoryview, keys: Any) -> bytes:
        """Every ciphertext is validated before any evaluation."""
        images, blobs = self._records(body)
        plan, ctx = self.plan, self.plan.ctx
        scale = 2.0 ** float(self.batch["input"]["scale_log2"])
        xs = [
            ctx.load_ciphertext(
                b, prime_count=ctx.top_count, scale=scale, max_bytes=self._max_bytes
            )
            for b in blobs
        ]
        del blobs
        outs = run_batch(plan.batch_schedule(), xs, plan.seal_ops(keys))
        del xs
        bias = plan.final_bias
        saved = [
            ctx.save_ciphertext(self._finalize(ct, images, float(bias[i]), keys))
            for i, ct in enumerate(outs)
        ]
        return encode_batch_frames(BATCH_RESPONSE_MAGIC, images, saved)

    def _finalize(self, ct: Any, images: int, bias: float, keys: Any) -> Any:
        """Bias in the input slots, masks in the slots no input occupies, flooding, fresh
        re-randomization."""
        return self.plan.mask_and_flood(
            ct, np.full(images, bias), images, keys, self.plan.flood_std(BATCH_LAYOUT)
        )


class BatchClient(ClientLayout):
    kind = BATCH_LAYOUT
    response_magic = BATCH_RESPONSE_MAGIC

    def __init__(self, codec: NetworkCodec) -> None:
        self.codec = codec
        self.batch: dict[str, Any] = codec.network["batch"]
        self._scale = 2.0 ** float(self.batch["input"]["scale_log2"])

    @property
    def capacity(self) -> int:
        return int(self.batch["max_images"])

    @property
    def preferred_from(self) -> int | None:
        return BATCH_THRESHOLD

    @property
    def request_bytes_hint(self) -> int:
        """One seeded ciphertext (one polynomial at the top level) per feature."""
        params = self.codec.network["params"]
        top = len(params["coeff_modulus"]) - 1
        per_ciphertext = ciphertext_bytes_estimate(params, top, 1)
        return 12 + int(self.batch["ciphertexts"]) * (4 + per_ciphertext)

    def wire_bytes(self, samples: int) -> int:
        """About the same for 1 or `capacity` samples: one ciphertext per feature and per
        output."""
        params = self.codec.network["params"]
        primes = int(self.batch["output"]["level_primes"])
        response = ciphertext_bytes_estimate(params, primes, 2)
        return (
            self.request_bytes_hint + 12 + int(self.batch["output"]["ciphertexts"]) * (4 + response)
        )

    @property
    def key_parts(self) -> frozenset[str]:
        return _key_parts(self.batch)

    def encrypt(self, secret: Any, X: np.ndarray) -> bytes:
        """Feature j of input i in slot i of ciphertext j."""
        X = as_batch(X, self.codec.n_features)
        if not np.all(np.isfinite(X)):
            raise BadInputError("input contains NaN or infinity")
        keys = self.codec.client_keys(secret)
        columns = np.zeros((X.shape[1], self.codec.ctx.slots))
        columns[:, : X.shape[0]] = X.T
        blobs = [keys.encrypt(column, self._scale) for column in columns]
        return encode_batch_frames(BATCH_REQUEST_MAGIC, X.shape[0], blobs)

    def decrypt_slots(self, secret: Any, body: bytes) -> tuple[int, np.ndarray]:
        """(images, every slot of every score ciphertext (outputs, slots))."""
        keys = self.codec.client_keys(secret)
        images, blobs = decode_batch_frames(
            BATCH_RESPONSE_MAGIC,
            body,
            count=int(self.batch["output"]["ciphertexts"]),
            max_images=self.capacity,
            max_record_bytes=max_ciphertext_bytes(self.codec.network["params"]),
        )
        primes = int(self.batch["output"]["level_primes"])
        return images, np.stack([keys.decrypt(b, prime_count=primes) for b in blobs])

    def decrypt(self, secret: Any, body: bytes) -> np.ndarray:
        images, slots = self.decrypt_slots(secret, body)
        return np.ascontiguousarray(slots[:, :images].T)
