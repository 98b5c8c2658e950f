"""The "coeff-batch" layout: one ciphertext per feature for up to N samples.

Feature-major as in CryptoNets, but coefficient-encoded so it shares the rowpack layout's
parameters, SEAL context and public key. For B <= N samples the client sends n ciphertexts;
ciphertext i holds sum_b x_int[b, i] X^b. Output j is sum_i W_int[j, i] * ct_i + b_j: scalar
multiply-accumulates only, which the server computes as one exact integer matrix product per
prime (float64 BLAS on digit-split operands), so one batch costs about as much as a few dozen
per-sample requests. Coefficient b of output j decrypts to sample b's score j.

The same privacy treatment applies per output ciphertext: a fresh encryption of zero
(c1 = sum_i w_ji c1_i would otherwise give W from one response by linear algebra), flooding of
every used coefficient 2**40 above a tail bound of sum_i w_ji (e_i + rounding_i) (the client
knows its errors), uniform masks on coefficients >= B, and compact responses (c1 plus c0 at
coefficients < B, one small prime).

Frames: a request (HEB1) holds the sample count and one record of n compact ciphertexts; its
response (HRB1) the sample count and one record. A batch is one unit of work: never split.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import numpy as np

from heinfer.errors import MalformedPayloadError, ShapeError
from heinfer.he.backend import EvaluationKey, SecretKey, pack_bits, unpack_bits
from heinfer.plans.base import ClientLayout, Request, ServerLayout
from heinfer.plans.linear.codec import LinearCodec
from heinfer.plans.linear.plan import LinearPlan
from heinfer.plans.manifest import Manifest
from heinfer.plans.wire import (
    BATCH_REQUEST_MAGIC,
    BATCH_RESPONSE_MAGIC,
    BatchRequest,
    BatchResponse,
    decode_batch_response,
    decode_request,
    encode_request,
    encode_response,
)

__all__ = ["BATCH_LAYOUT_KIND", "BatchClient", "BatchServer", "offers_batch"]

BATCH_LAYOUT_KIND = "coeff-batch"
_PUBLIC = frozenset({"public"})


def offers_batch(manifest: Manifest) -> bool:
    """Whether a linear model was compiled with this layout (every model since it existed)."""
    batch = manifest.layout.get("batch")
    return isinstance(batch, dict) and batch.get("kind") == BATCH_LAYOUT_KIND


class BatchServer(ServerLayout):
    kind: ClassVar[str] = BATCH_LAYOUT_KIND
    request_magic: ClassVar[bytes] = BATCH_REQUEST_MAGIC
    key_parts: frozenset[str] = _PUBLIC

    def __init__(self, plan: LinearPlan) -> None:
        self.plan = plan
        self.layout = plan.manifest.layout["batch"]
        self.max_samples = int(self.layout["max_samples"])

    def request(self, body: bytes | memoryview) -> BatchRequest:
        """The request's sample count and record, checked for tag, count and exact size."""
        decoded = decode_request(
            body, max_records=self.max_samples, max_record_bytes=len(body)
        )
        assert isinstance(decoded, BatchRequest)  # the magic is HEB1: the plan dispatched on it
        self.plan.check_tag(decoded.record, "batch request")
        expected = self.plan.context.batch_request_bytes(self.plan.manifest.n_features)
        if len(decoded.record) != expected:
            raise MalformedPayloadError(
                f"a {self.kind} request record must be {expected} bytes for these parameters, "
                f"got {len(decoded.record)}"
            )
        return decoded

    def check(self, body: bytes | memoryview) -> Request:
        return Request(self.kind, self.request(body).samples, body)

    def evaluate(self, body: bytes | memoryview, keys: Any) -> bytes:
        assert isinstance(keys, EvaluationKey)
        request = self.request(body)
        record = self.evaluate_record(request.record, request.samples, keys)
        return encode_response(BatchResponse(request.samples, record))

    def evaluate_record(
        self, record: bytes | memoryview, samples: int, key: EvaluationKey
    ) -> bytes:
        """A batch record in, one compact record out: per output, c1 then c0[:samples]."""
        if not 1 <= samples <= self.max_samples:
            raise MalformedPayloadError(
                f"a {self.kind} request holds 1..{self.max_samples} samples, not {samples}"
            )
        plan = self.plan
        bits = int(self.layout["result_prime_bits"])
        parts = []
        for ciphertext in plan.evaluate_batch_full(record, samples, key):
            arrays = plan.context.last_level_arrays(ciphertext)
            parts.append(pack_bits(arrays[1], bits) + pack_bits(arrays[0][:samples], bits))
        return b"".join(parts)


class BatchClient(ClientLayout):
    kind: ClassVar[str] = BATCH_LAYOUT_KIND
    response_magic: ClassVar[bytes] = BATCH_RESPONSE_MAGIC

    def __init__(self, codec: LinearCodec) -> None:
        self.codec = codec
        self.layout: dict[str, Any] = codec.manifest.layout["batch"]
        self._bits = int(self.layout["result_prime_bits"])
        self._scale = float(self.layout["output_scale"])

    @property
    def capacity(self) -> int:
        return int(self.layout["max_samples"])

    @property
    def key_parts(self) -> frozenset[str]:
        return _PUBLIC

    @property
    def record_request_bytes(self) -> int:
        """The request record (n feature ciphertexts), whatever the number of samples."""
        return self.codec.context.batch_request_bytes(self.codec.manifest.n_features)

    @property
    def request_bytes_hint(self) -> int:
        return self.record_request_bytes + 8

    def record_bytes(self, samples: int) -> int:
        """Size of the result record for a batch of `samples`."""
        n = self.codec.params.poly_modulus_degree
        bits = self._bits
        return self.codec.manifest.n_outputs * ((n * bits + 7) // 8 + (samples * bits + 7) // 8)

    @functools.cached_property
    def crossover(self) -> int | None:
        """Fewest samples for which one batch request is smaller on the wire (request +
        response, frames included) than per-sample requests; None if it never is. Server time
        crosses over far earlier, so bytes decide."""
        per_sample = self.codec.layouts[self.codec.default_layout].wire_bytes(1)
        for samples in range(1, self.capacity + 1):
            if self.wire_bytes(samples) <= samples * per_sample:
                return samples
        return None

    def wire_bytes(self, samples: int) -> int:
        return 16 + self.record_request_bytes + self.record_bytes(samples)

    @property
    def preferred_from(self) -> int | None:
        return self.crossover

    def encrypt(self, secret: Any, X: np.ndarray) -> bytes:
        return encode_request(BatchRequest(len(X), self.encrypt_record(secret, X)))

    def encrypt_record(self, secret: SecretKey, X: np.ndarray) -> bytes:
        """The request record for up to `capacity` samples."""
        x_int = self.codec.quantize(X)
        if x_int.ndim != 2 or not 1 <= len(x_int) <= self.capacity:
            raise ShapeError(
                f"a {self.kind} request holds 1..{self.capacity} samples, got {len(x_int)}"
            )
        return secret.encrypt_columns(np.ascontiguousarray(x_int.T))

    def decrypt(self, secret: Any, body: bytes) -> np.ndarray:
        response = decode_batch_response(body, self.capacity)
        return self.decrypt_record(secret, response.record, response.samples)

    def decrypt_record(self, secret: SecretKey, record: bytes, samples: int) -> np.ndarray:
        """Scores of shape (samples, n_outputs) from a batch result record."""
        if not 1 <= samples <= self.capacity:
            raise MalformedPayloadError(f"batch result for {samples} samples")
        expected = self.record_bytes(samples)
        if len(record) != expected:
            raise MalformedPayloadError(
                f"batch result record is {len(record)} bytes, {expected} expected"
            )
        params = self.codec.params
        n = params.poly_modulus_degree
        bits = self._bits
        q1 = np.uint64(params.coeff_modulus[0])
        c1_size, c0_size = (n * bits + 7) // 8, (samples * bits + 7) // 8
        scores = np.empty((samples, self.codec.manifest.n_outputs), dtype=np.float64)
        offset = 0
        for j in range(self.codec.manifest.n_outputs):
            c1 = unpack_bits(record[offset : offset + c1_size], n, bits)
            c0 = np.zeros(n, dtype=np.uint64)
            c0[:samples] = unpack_bits(
                record[offset + c1_size : offset + c1_size + c0_size], samples, bits
            )
            offset += c1_size + c0_size
            if np.any(c1 >= q1) or np.any(c0 >= q1):
                raise MalformedPayloadError("result coefficient out of range")
            scores[:, j] = secret.decrypt_last_level(c0, c1)[:samples] / self._scale
        return scores


