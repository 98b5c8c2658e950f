"""The "coeff-rowpack" layout: one ciphertext per sample (after Cheetah, USENIX Security 2022).

The client puts its quantized input x (n features) in the first n coefficients of one BFV
plaintext. The server holds, per group of r = N // n rows, one plaintext whose row j (at
position p in the group) is stored reversed at offset p*n. In the negacyclic product,
coefficient p*n + n - 1 is exactly W_j . x; the product's other coefficients hold partial sums.
With r*n <= N no wrap-around reaches an output coefficient.

The server's work per request is numpy, with no SEAL call and no file
(`LinearPlan.evaluate_record_full`): c1_x is expanded from the request's SHAKE-256 seed as SEAL
would; c1_x * W_g is an exact FFT product (the spectra of W_g precomputed per plan); c0_x * W_g
is computed at the output coefficients only, as dot products with W_g read backwards.

Privacy of the model (the result must reveal W x + b and nothing else):
- the result is re-randomized with a fresh public-key encryption of zero under the client's
  key, computed at the data primes (fresh ternary u, fresh errors; pk1's spectra kept per
  key), so c1 is no longer c1_x * W (which a client could divide by its own c1_x);
- the noise at each output coefficient, which contains e_x * W for the client's own error e_x,
  is flooded with uniform noise 2**40 times larger than a tail bound of that term
  (statistical distance <= 2**-40 per output, see `compile.NoiseBudget`);
- the result is then switched down to one small prime (SEAL's exact rounding) and only c1
  plus the output coefficients of c0 are sent; the other coefficients of c0, which would hold
  partial sums, are never computed.

Frames: a request (HEQ1) holds length-prefixed records, one per sample; its response (HER1)
fixed-size result records. A request of many records splits into independent requests.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from heinfer.errors import MalformedPayloadError
from heinfer.he.backend import EvaluationKey, SecretKey, pack_bits
from heinfer.plans.base import ClientLayout, Request, ServerLayout, split_evenly
from heinfer.plans.linear.codec import LinearCodec, decrypt_compact
from heinfer.plans.linear.plan import LinearPlan
from heinfer.plans.wire import (
    REQUEST_MAGIC,
    RESPONSE_MAGIC,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)

__all__ = ["LAYOUT_KIND", "RowpackClient", "RowpackServer"]

LAYOUT_KIND = "coeff-rowpack"
_PUBLIC = frozenset({"public"})


class RowpackServer(ServerLayout):
    kind: ClassVar[str] = LAYOUT_KIND
    request_magic: ClassVar[bytes] = REQUEST_MAGIC
    key_parts: frozenset[str] = _PUBLIC

    def __init__(self, plan: LinearPlan) -> None:
        self.plan = plan

    def records(self, body: bytes | memoryview) -> list[bytes]:
        """The request's records, each checked for its parameter tag and exact size."""
        plan = self.plan
        records = decode_request(
            bytes(body),
            max_records=plan.manifest.max_batch,
            max_record_bytes=plan.context.request_bytes,
        )
        assert isinstance(records, list)  # the magic is HEQ1: the plan dispatched on it
        expected = plan.context.request_bytes
        for index, record in enumerate(records):
            plan.check_tag(record, f"ciphertext {index}")
            if len(record) != expected:
                raise MalformedPayloadError(
                    f"ciphertext {index} must be {expected} bytes for these parameters, "
                    f"got {len(record)}"
                )
        return records

    def check(self, body: bytes | memoryview) -> Request:
        return Request(self.kind, len(self.records(body)), body)

    def split(self, request: Request, ways: int) -> list[bytes | memoryview]:
        parts = split_evenly(self.records(request.body), ways)
        if len(parts) == 1:
            return [request.body]
        return [encode_request(list(part)) for part in parts]

    def join(self, responses: Sequence[bytes]) -> bytes:
        if len(responses) == 1:
            return responses[0]
        size = self.record_bytes
        return encode_response([r for body in responses for r in decode_response(body, size)])

    @property
    def record_bytes(self) -> int:
        return _record_bytes(self.plan.manifest.layout, self.plan.params.poly_modulus_degree)

    def evaluate(self, body: bytes | memoryview, keys: Any) -> bytes:
        assert isinstance(keys, EvaluationKey)
        return encode_response([self.evaluate_record(r, keys) for r in self.records(body)])

    def evaluate_record(self, record: bytes, key: EvaluationKey) -> bytes:
        """One request ciphertext in, one compact result record out."""
        plan = self.plan
        bits = int(plan.manifest.layout["result_prime_bits"])
        parts = []
        for c1, c0 in plan.evaluate_record_compact(record, key):
            parts.append(pack_bits(c1, bits) + pack_bits(c0, bits))
        return b"".join(parts)


class RowpackClient(ClientLayout):
    kind: ClassVar[str] = LAYOUT_KIND
    response_magic: ClassVar[bytes] = RESPONSE_MAGIC

    def __init__(self, codec: LinearCodec) -> None:
        self.codec = codec
        layout = codec.manifest.layout
        self._results = layout["results"]
        self._bits = int(layout["result_prime_bits"])
        self._scale = float(layout["output_scale"])
        self.record_bytes = _record_bytes(layout, codec.params.poly_modulus_degree)

    @property
    def capacity(self) -> int:
        return self.codec.manifest.max_batch

    @property
    def key_parts(self) -> frozenset[str]:
        return _PUBLIC

    @property
    def request_bytes(self) -> int:
        """One sample's ciphertext on the wire (frames excluded)."""
        return self.codec.context.request_bytes

    def wire_bytes(self, samples: int) -> int:
        return samples * (self.request_bytes + 4 + self.record_bytes)

    def encrypt(self, secret: Any, X: np.ndarray) -> bytes:
        return encode_request(self.encrypt_records(secret, X))

    def encrypt_records(self, secret: SecretKey, X: np.ndarray) -> list[bytes]:
        return [secret.encrypt(row) for row in self.codec.quantize(X)]

    def decrypt(self, secret: Any, body: bytes) -> np.ndarray:
        records = decode_response(body, self.record_bytes)
        return np.stack([self.decrypt_record(secret, r) for r in records])

    def decrypt_record(self, secret: SecretKey, record: bytes) -> np.ndarray:
        if len(record) != self.record_bytes:
            raise MalformedPayloadError(
                f"result record is {len(record)} bytes, {self.record_bytes} expected"
            )
        codec = self.codec
        return decrypt_compact(
            secret, record, codec.params, self._results, self._bits,
            codec.manifest.n_outputs, self._scale,
        )


def _record_bytes(layout: dict[str, Any], degree: int) -> int:
    bits = int(layout["result_prime_bits"])
    return sum(
        (degree * bits + 7) // 8 + (len(r["coefficients"]) * bits + 7) // 8
        for r in layout["results"]
    )
