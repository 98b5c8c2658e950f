"""The "coeff-packed" layout: rowpack's products, packed into one ciphertext per N outputs.

Why: in coeff-rowpack every group of N // n rows costs one result polynomial (c1 is N
coefficients whatever the number of outputs in it), so the response grows with outputs x
features: 3.69 MB for 768 x 1,000. Here the group products are folded into ceil(outputs / N)
ciphertexts with a packing tree (Chen-Dai-Kim-Song's PackLWEs, on coefficient-encoded BFV), so
the response is about one polynomial plus the outputs: ~60 KB for 768 x 1,000.

On paper (768 x 1,000; see docs/performance.md for the measured numbers):
- this layout: N = 8192, stride s = 1024, 8 rows a group, 125 groups, a tree of depth 7:
  7 Galois keys (~1.7 MB, uploaded once), 124 automorphisms (one key switch each, ~12 NTTs
  of N), response c1 + 1,000 coefficients ~ 60 KB;
- BFV batching with a BSGS diagonal layout: ~2*sqrt(1,024) = 64 rotation keys (~6 MB at
  N = 4096 with the special prime the 2^40 flooding needs) and ~64 key switches: more key bytes
  for a similar server time, and t must be a prime = 1 mod 2N (another parameter family). Not
  built.

Geometry. Rows are laid out as in rowpack, but at a power-of-two stride s >= n: group g's row p
is stored reversed so that product coefficient p*s is W_row . x. Level k of the tree (coarsest
first, stride S = s / 2^k) pairs neighbours A, B, whose values sit at multiples of S, and
forms C + sigma(D) with C = A + X^(S/2) B, D = A - X^(S/2) B; the automorphism
sigma: X -> X^(2N/S + 1) fixes every X^i with S | i, negates those with i = S/2 mod S and
permutes the rest among themselves, so the result holds 2A at multiples of S and 2B at S/2 mod S
(one Galois key per level, `levels` keys; the monomial shift is a negacyclic rotation in SEAL).
Group g's outputs end at p*s + sum_k bit_k(g) * s / 2^(k+1) (Chen-Dai-Kim-Song, Algorithm 2).
Every value ends multiplied by 2^levels: the plaintext modulus has `levels` more bits and the
client divides. Garbage (partial sums) stays at the other positions, which are masked.

Privacy: the same treatment as rowpack, applied once to the packed ciphertext: a fresh
public-key encryption of zero, uniform masks at every non-output coefficient, and flooding at
each output coefficient 2^40 above a tail bound of everything the client could know about its
noise (2^levels times e_x*W and the scaling rounding, plus every key switch's noise, which
depends on W through the digits of c1; `compile.packed_budget`); only c1 and the output
coefficients of c0, switched down to one prime, are sent.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import tenseal.sealapi as seal

from heinfer.errors import MalformedPayloadError, ParameterMismatchError
from heinfer.he.backend import SecretKey, pack_bits
from heinfer.he.galois import GaloisEvaluationKey
from heinfer.plans.base import ClientLayout, Request, ServerLayout, split_evenly
from heinfer.plans.linear.codec import LinearCodec, decrypt_compact
from heinfer.plans.linear.plan import LinearPlan
from heinfer.plans.manifest import Manifest

__all__ = [
    "PACKED_LAYOUT_KIND",
    "PackedClient",
    "PackedServer",
    "Packing",
    "offers_packed",
    "packing",
    "packing_from_layout",
]

PACKED_LAYOUT_KIND = "coeff-packed"
REQUEST_MAGIC = b"HEP1"
RESPONSE_MAGIC = b"HRP1"
_FRAME = struct.Struct("<4sI")  # magic, record count; then fixed-size records
_KEYS = frozenset({"public", "galois"})


def offers_packed(manifest: Manifest) -> bool:
    return "packed" in manifest.layout


@dataclass(frozen=True)
class Packing:
    """Rows -> groups -> result ciphertexts, and where each output lands."""

    degree: int
    stride: int  # s: power of two >= n_features
    levels: int  # tree depth; 2^levels groups per result ciphertext at most
    blocks: list[list[list[int]]]  # result ciphertext -> group -> rows

    @property
    def rows_per_group(self) -> int:
        return self.degree // self.stride

    @property
    def groups(self) -> int:
        return sum(len(block) for block in self.blocks)

    def offset(self, group: int) -> int:
        """Where group g's outputs land in the packed ciphertext, relative to row p * stride:
        level k shifts the odd side (bit k of g set) by stride / 2^(k+1)."""
        return sum(((group >> k) & 1) * (self.stride >> (k + 1)) for k in range(self.levels))

    def position(self, group: int, row: int) -> int:
        return row * self.stride + self.offset(group)

    @property
    def elements(self) -> list[int]:
        """Galois element of each tree level, coarsest first: 2N / S + 1 at stride S."""
        return [2 * self.degree // (self.stride >> k) + 1 for k in range(self.levels)]

    @property
    def shifts(self) -> list[int]:
        """The monomial X^(S/2) that moves the odd side at each level."""
        return [self.stride >> (k + 1) for k in range(self.levels)]

    def coefficients(self, block: int) -> list[int]:
        return [
            self.position(g, p)
            for g, rows in enumerate(self.blocks[block])
            for p in range(len(rows))
        ]

    def outputs(self, block: int) -> list[int]:
        return [row for rows in self.blocks[block] for row in rows]


def packing(n_rows: int, n_features: int, degree: int) -> Packing | None:
    """The packing of n_rows x n_features at ring degree `degree`, or None if it cannot."""
    stride = 1 << max(0, math.ceil(math.log2(n_features)))
    if stride > degree:
        return None
    per = degree // stride
    groups = [list(range(i, min(n_rows, i + per))) for i in range(0, n_rows, per)]
    levels = min(int(math.log2(stride)), max(0, math.ceil(math.log2(len(groups)))))
    size = 1 << levels
    blocks = [groups[i : i + size] for i in range(0, len(groups), size)]
    return Packing(degree, stride, levels, blocks)


def packing_from_layout(layout: dict[str, Any], degree: int) -> Packing:
    packed = layout["packed"]
    return Packing(degree, int(packed["stride"]), int(packed["levels"]), packed["blocks"])


def _weight_polynomial(w_int: np.ndarray, pack: Packing, rows: list[int]) -> np.ndarray:
    """Row p's weights w[i] at coefficient P - i (negated where it wraps below 0), so that
    coefficient P = p * stride of x * poly is W_row . x (negacyclic X^N = -1)."""
    n = w_int.shape[1]
    poly = np.zeros(pack.degree, dtype=np.int64)
    for p, row in enumerate(rows):
        at = p * pack.stride - np.arange(n)
        sign = np.where(at < 0, -1, 1)
        poly[at % pack.degree] = sign * w_int[row]
    return poly


def _records(body: bytes | memoryview, magic: bytes, size: int, limit: int) -> list[bytes]:
    data = bytes(body)
    if len(data) < _FRAME.size:
        raise MalformedPayloadError("body too short for its frame")
    found, count = _FRAME.unpack_from(data)
    if found != magic:
        raise MalformedPayloadError(f"body does not start with {magic.decode()}")
    if not 1 <= count <= limit:
        raise MalformedPayloadError(f"a {PACKED_LAYOUT_KIND} body holds 1..{limit} records")
    if len(data) != _FRAME.size + count * size:
        raise MalformedPayloadError(
            f"{count} records of {size} bytes expected, body is {len(data)} bytes"
        )
    return [data[_FRAME.size + i * size : _FRAME.size + (i + 1) * size] for i in range(count)]


def _frame(magic: bytes, records: Sequence[bytes]) -> bytes:
    return _FRAME.pack(magic, len(records)) + b"".join(records)


def _record_bytes(layout: dict[str, Any], degree: int) -> int:
    bits = int(layout["packed"]["result_prime_bits"])
    packed = layout["packed"]
    return sum(
        (degree * bits + 7) // 8 + (len(block["coefficients"]) * bits + 7) // 8
        for block in packed["results"]
    )


class PackedServer(ServerLayout):
    kind: ClassVar[str] = PACKED_LAYOUT_KIND
    request_magic: ClassVar[bytes] = REQUEST_MAGIC
    key_parts: frozenset[str] = _KEYS

    def __init__(self, plan: LinearPlan) -> None:
        self.plan = plan
        self.pack = packing_from_layout(plan.manifest.layout, plan.params.poly_modulus_degree)
        self._spec = plan.manifest.layout["packed"]
        self._weights: list[list[Any]] | None = None
        self._biases: list[Any] = []
        self._shifts: list[Any] = []

    def _prepare(self) -> list[list[Any]]:
        """NTT-form weight plaintexts per group, bias plaintexts (times 2^levels) per block."""
        if self._weights is None:
            context, pack = self.plan.context, self.pack
            w_int, b_int = self.plan.arrays["w_int"], self.plan.arrays["b_int"]
            weights = []
            for index, block in enumerate(pack.blocks):
                weights.append(
                    [context.ntt_plaintext(_weight_polynomial(w_int, pack, rows)) for rows in block]
                )
                bias = np.zeros(context.n, dtype=np.int64)
                bias[pack.coefficients(index)] = b_int[pack.outputs(index)] << pack.levels
                self._biases.append(context.plaintext_from_coefficients(bias))
            for shift in pack.shifts:
                monomial = np.zeros(context.n, dtype=np.int64)
                monomial[shift] = 1
                self._shifts.append(context.plaintext_from_coefficients(monomial))
            self._weights = weights
        return self._weights

    def check(self, body: bytes | memoryview) -> Request:
        records = self.records(body)
        return Request(self.kind, len(records), body)

    def records(self, body: bytes | memoryview) -> list[bytes]:
        plan = self.plan
        size = plan.context.request_bytes
        if len(body) >= _FRAME.size + 8 and bytes(body[:4]) == REQUEST_MAGIC:
            # other parameters first: their records have another size too
            plan.check_tag(bytes(body[_FRAME.size : _FRAME.size + 8]), "ciphertext 0")
        records = _records(body, REQUEST_MAGIC, size, plan.manifest.max_batch)
        for index, record in enumerate(records):
            plan.check_tag(record, f"ciphertext {index}")
        return records

    def split(self, request: Request, ways: int) -> list[bytes | memoryview]:
        parts = split_evenly(self.records(request.body), ways)
        if len(parts) == 1:
            return [request.body]
        return [_frame(REQUEST_MAGIC, list(part)) for part in parts]

    def join(self, responses: Sequence[bytes]) -> bytes:
        if len(responses) == 1:
            return responses[0]
        size = _record_bytes(self.plan.manifest.layout, self.plan.params.poly_modulus_degree)
        limit = self.plan.manifest.max_batch
        return _frame(
            RESPONSE_MAGIC,
            [r for body in responses for r in _records(body, RESPONSE_MAGIC, size, limit)],
        )

    def evaluate(self, body: bytes | memoryview, keys: Any) -> bytes:
        if not isinstance(keys, GaloisEvaluationKey) or keys.galois is None:
            raise ParameterMismatchError(
                f"the {self.kind} layout needs the Galois keys: upload keys for it"
            )
        return _frame(RESPONSE_MAGIC, [self.evaluate_record(r, keys) for r in self.records(body)])

    def evaluate_record(self, record: bytes, key: GaloisEvaluationKey) -> bytes:
        bits = int(self._spec["result_prime_bits"])
        parts = []
        for index, ciphertext in enumerate(self.evaluate_full(record, key)):
            arrays = self.plan.context.last_level_arrays(ciphertext)
            coefficients = self._spec["results"][index]["coefficients"]
            parts.append(pack_bits(arrays[1], bits) + pack_bits(arrays[0][coefficients], bits))
        return b"".join(parts)

    def evaluate_full(self, record: bytes, key: GaloisEvaluationKey) -> list[Any]:
        """Products, packing tree, bias and the privacy treatment, before compaction (tests
        inspect the ciphertexts)."""
        context = self.plan.context
        weights = self._prepare()
        request = context.load_request(record)
        products = request.multiply_ntt([w for block in weights for w in block])
        ev = context.evaluator
        results, start = [], 0
        for index, block in enumerate(weights):
            level: list[Any] = products[start : start + len(block)]
            start += len(block)
            for element, shift in zip(self.pack.elements, self._shifts, strict=True):
                level = [
                    self._combine(level[m : m + 2], element, shift, key)
                    for m in range(0, len(level), 2)
                ]
            (packed,) = level
            ev.add_plain_inplace(packed, self._biases[index])
            self._treat(packed, index, key)
            results.append(packed)
        return results

    def _combine(self, pair: list[Any], element: int, shift: Any, key: GaloisEvaluationKey) -> Any:
        """(A, B) -> A + X^(S/2) B + sigma(A - X^(S/2) B): 2A at A's positions (multiples of
        S), 2B at B's moved by S/2 (module docstring). SEAL multiplies by a monomial plaintext
        with a negacyclic shift, no NTT."""
        ev = self.plan.context.evaluator
        a = pair[0]
        if len(pair) == 1:  # no B (groups run out): 2A where it counts, garbage elsewhere
            ev.add_inplace(a, a)
            return a
        b = pair[1]
        ev.multiply_plain_inplace(b, shift)
        difference = seal.Ciphertext()
        ev.sub(a, b, difference)
        ev.apply_galois_inplace(difference, element, key.galois)
        ev.add_inplace(a, b)
        ev.add_inplace(a, difference)
        return a

    def _treat(self, ciphertext: Any, index: int, key: GaloisEvaluationKey) -> None:
        plan, context = self.plan, self.plan.context
        treatment = plan._treatment
        if treatment.rerandomize:
            context.add(ciphertext, key.encrypt_zero())
        noise = (
            context.uniform_c0()
            if treatment.mask
            else np.zeros((len(context.data_primes), context.n), dtype=np.uint64)
        )
        coefficients = self._spec["results"][index]["coefficients"]
        if treatment.flood:
            log2_bound = int(self._spec["flood_bound"]).bit_length() - 1
            noise[:, coefficients] = context.uniform_flood((len(coefficients),), log2_bound)
        else:
            noise[:, coefficients] = 0
        context.add_to_c0(ciphertext, noise)


class PackedClient(ClientLayout):
    kind: ClassVar[str] = PACKED_LAYOUT_KIND
    response_magic: ClassVar[bytes] = RESPONSE_MAGIC

    def __init__(self, codec: LinearCodec) -> None:
        self.codec = codec
        layout = codec.manifest.layout
        self._spec = layout["packed"]
        self._bits = int(self._spec["result_prime_bits"])
        self._divisor = float(self._spec["output_scale"]) * (1 << int(self._spec["levels"]))
        self.record_bytes = _record_bytes(layout, codec.params.poly_modulus_degree)

    @property
    def capacity(self) -> int:
        return self.codec.manifest.max_batch

    @property
    def preferred_from(self) -> int | None:
        return 1  # offered only when the compiler's cost model picked it over rowpack

    @property
    def key_parts(self) -> frozenset[str]:
        return _KEYS

    def wire_bytes(self, samples: int) -> int:
        return 2 * _FRAME.size + samples * (self.codec.context.request_bytes + self.record_bytes)

    def encrypt(self, secret: Any, X: np.ndarray) -> bytes:
        assert isinstance(secret, SecretKey)
        return _frame(REQUEST_MAGIC, [secret.encrypt(row) for row in self.codec.quantize(X)])

    def decrypt(self, secret: Any, body: bytes) -> np.ndarray:
        records = _records(body, RESPONSE_MAGIC, self.record_bytes, self.codec.manifest.max_batch)
        return np.stack([self.decrypt_record(secret, r) for r in records])

    def decrypt_record(self, secret: SecretKey, record: bytes) -> np.ndarray:
        codec = self.codec
        return decrypt_compact(
            secret, record, codec.params, self._spec["results"], self._bits,
            codec.manifest.n_outputs, self._divisor,
        )
