"""The "coeff-packed" layout: rowpack's products, packed into one ciphertext per N outputs.

Why: in coeff-rowpack every group of N // n rows costs one result polynomial (c1 is N
coefficients whatever the number of outputs in it), so the response grows with outputs x
features: 3.69 MB for 768 x 1,000. Here the group products are folded into ceil(outputs / N)
ciphertexts with a packing tree (Chen-Dai-Kim-Song's PackLWEs, on coefficient-encoded BFV), so
the response is about one polynomial plus the outputs: ~60 KB for 768 x 1,000.

768 x 1,000 (see docs/performance.md for the measured numbers): N = 8192, stride s = 1024,
8 rows a group, 125 groups, a tree of depth 7. With every level on the server: 7 Galois keys
(2.27 MB with the public key) and 124 key switches, which are ~75% of the server time. With
two levels on the client (below): 4 ciphertexts per request (389 KB), 5 Galois keys
(1.67 MB), 31 key switches; response c1 + 1,000 coefficients, 49 KB either way. BFV batching
with a BSGS diagonal layout (~64 rotation keys, ~6 MB, ~64 key switches, t prime = 1 mod 2N)
is not built.

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

Client levels. The first r levels (`client_levels`) need no key switch when the client also
sends fresh encryptions of tau_b(x) = x(X^(e_b)), e_b the product of the level elements whose
bit is set in b (2^r images, x first): sigma(tau_b(x) * v) = sigma tau_b(x) * sigma(v), so a
level applied to A = sum_b tau_b(x) a_b is again such a sum with weights a_b + X^h b_b and
sigma(a_b - X^h b_b) (`node_weights`, precomputed per plan). The server sums 2^r NTT-form
products per node (one inverse NTT per node, not per group) and runs the tree's last
levels - r levels with one Galois key each. The cost model picks r (request bytes against key
switches and key bytes).

Noise the client could know (`leak_bound`, in ciphertext units, at one output coefficient).
The tree is a linear map; for any input polynomials its root holds, at group g's output
position, 2^(levels - k) times the level-k node's value at the matching position, and nothing
from other nodes (they cancel there exactly, as the garbage does). So with m = 2^(levels - r):
  m * [sum_b (e_b * u_b)(P) + sum_b (rho_b * u_b)(P)] + sum_k 2^(levels - 1 - k) * ks_k(P),
with e_b the client's encryption error of image b (centered binomial, sub-Gaussian with
proxy sigma^2), rho_b its scaling rounding (|rho| <= 1/2 on the image's n support positions),
and ks_k the noise of the one key switch at level k on P's path (k = r .. levels - 1):
round(sum_i d_i e'_i / P_special) + rho0 + rho1 * s, with digits d_i in [0, q_i) below the
special prime (`compile._choose_parameters` makes P_special exceed every q_i), key errors e'_i
(one Galois key per level: independent across levels; digits depend on c1, which carries the
keys' uniform halves, not their errors) and |rho0 + rho1 * s| <= (1 + ||s||_1) / 2 <= (N + 1)/2.
Conditioned on the digits, the Gaussian parts are ONE sub-Gaussian sum of independent errors,
proxy sigma^2 (m^2 sum_b ||u_b||^2 + D N sum_k 4^(levels - 1 - k)) with D <= 4 digits, so one
tail factor z (a union bound over the outputs only, not over levels and outputs) bounds it
with probability 1 - 2^-41; the rest is deterministic: m * 0.5 * max over outputs of the
image-support windows of |u_b|, and (m - 1)(N + 1)/2. (Before this review each level's key
switch had its own z-bound and they were added: a union over levels that the single sum
replaces, and a heuristic sqrt(N/18) rounding term replaced by the worst case.) The server
recomputes the bound from its weights and refuses a manifest whose flood is below 2^40 times
it (`check_flood`).

Privacy: the same treatment as rowpack, applied once to the packed ciphertext: a fresh
public-key encryption of zero, uniform masks at every non-output coefficient, and flooding at
each output coefficient 2^40 above a tail bound of everything the client could know about its
noise (above; `leak_bound`); only c1 and the output
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
    "automorphism",
    "check_flood",
    "leak_bound",
    "monomial_shift",
    "node_weights",
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
    client_levels: int = 0  # the first tree levels, done by the client's automorphic images

    @property
    def rows_per_group(self) -> int:
        return self.degree // self.stride

    @property
    def groups(self) -> int:
        return sum(len(block) for block in self.blocks)

    @property
    def nodes(self) -> int:
        """Ciphertexts the server's tree starts from: one per 2^client_levels groups."""
        return sum(-(-len(block) // self.images) for block in self.blocks)

    @property
    def key_switches(self) -> int:
        return self.nodes - len(self.blocks)

    def offset(self, group: int) -> int:
        """Where group g's outputs land in the packed ciphertext, relative to row p * stride:
        level k shifts the odd side (bit k of g set) by stride / 2^(k+1)."""
        return sum(((group >> k) & 1) * (self.stride >> (k + 1)) for k in range(self.levels))

    def position(self, group: int, row: int) -> int:
        return row * self.stride + self.offset(group)

    @property
    def level_elements(self) -> list[int]:
        """Galois element of each tree level, coarsest first: 2N / S + 1 at stride S."""
        return [2 * self.degree // (self.stride >> k) + 1 for k in range(self.levels)]

    @property
    def elements(self) -> list[int]:
        """The Galois keys the server needs: those of the levels it does itself."""
        return self.level_elements[self.client_levels :]

    @property
    def images(self) -> int:
        return 1 << self.client_levels

    @property
    def image_elements(self) -> list[int]:
        """The automorphism of image b: the product of the client levels' elements whose bit
        is set in b (automorphisms compose by multiplying elements mod 2N); image 0 is x."""
        result = []
        for b in range(self.images):
            element = 1
            for k in range(self.client_levels):
                if (b >> k) & 1:
                    element = element * self.level_elements[k] % (2 * self.degree)
            result.append(element)
        return result

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


def packing(n_rows: int, n_features: int, degree: int, client_levels: int = 0) -> Packing | None:
    """The packing of n_rows x n_features at ring degree `degree`, or None if it cannot.
    `client_levels` is capped at the tree's depth."""
    stride = 1 << max(0, math.ceil(math.log2(n_features)))
    if stride > degree:
        return None
    per = degree // stride
    groups = [list(range(i, min(n_rows, i + per))) for i in range(0, n_rows, per)]
    levels = min(int(math.log2(stride)), max(0, math.ceil(math.log2(len(groups)))))
    size = 1 << levels
    blocks = [groups[i : i + size] for i in range(0, len(groups), size)]
    return Packing(degree, stride, levels, blocks, min(client_levels, levels))


def packing_from_layout(layout: dict[str, Any], degree: int) -> Packing:
    packed = layout["packed"]
    return Packing(
        degree,
        int(packed["stride"]),
        int(packed["levels"]),
        packed["blocks"],
        int(packed.get("client_levels", 0)),
    )


def automorphism(poly: np.ndarray, element: int) -> np.ndarray:
    """p(X) -> p(X^element) in Z[X]/(X^N + 1), element odd: coefficient i moves to i * element
    mod 2N, negated when that lands at or above N (what SEAL's apply_galois does to the
    plaintext; tests check it against SEAL)."""
    n = poly.shape[-1]
    target = np.arange(n) * element % (2 * n)
    out = np.zeros_like(poly)
    out[..., target % n] = np.where(target >= n, -poly, poly)
    return out


def monomial_shift(poly: np.ndarray, shift: int) -> np.ndarray:
    """X^shift * p(X) in Z[X]/(X^N + 1), 0 <= shift < N: a negacyclic rotation."""
    out = np.roll(poly, shift)
    out[..., :shift] *= -1
    return out


def node_weights(polys: list[np.ndarray], pack: Packing) -> list[np.ndarray]:
    """The client levels of the tree, moved into the weights: the node over up to 2^r
    consecutive groups (weight polynomials `polys`) is sum_b tau_b(x) * u_b, tau_b the image
    automorphisms (`Packing.image_elements`). One level maps A = sum_b tau_b(x) a_b and B (zero
    when the groups run out) to A + X^h B + sigma(A - X^h B), i.e. u_b gains a_b + X^h b_b and
    u_(b + 2^k) gains sigma(a_b - X^h b_b), since sigma(tau_b(x) v) = sigma tau_b(x) sigma(v)."""
    zero = np.zeros(pack.degree, dtype=np.int64)
    nodes = [[p] + [zero] * (pack.images - 1) for p in polys]
    for k in range(pack.client_levels):
        element, shift = pack.level_elements[k], pack.shifts[k]
        merged = []
        for m in range(0, len(nodes), 2):
            a = nodes[m]
            b = nodes[m + 1] if m + 1 < len(nodes) else [zero] * pack.images
            u = [zero] * pack.images
            for image in range(1 << k):
                moved = monomial_shift(b[image], shift)
                u[image] = a[image] + moved
                u[image | 1 << k] = automorphism(a[image] - moved, element)
            merged.append(u)
        nodes = merged
    (node,) = nodes
    return node


def _output_positions(pack: Packing, groups: list[list[int]]) -> list[int]:
    """Where a node's outputs sit before the server's levels: row p of its j-th group at
    p * stride plus the client levels' offsets of j."""
    return [
        p * pack.stride
        + sum(((j >> k) & 1) * (pack.stride >> (k + 1)) for k in range(pack.client_levels))
        for j, rows in enumerate(groups)
        for p in range(len(rows))
    ]


def leak_bound(w_int: np.ndarray, pack: Packing, z: float, sigma: float, digits: int) -> float:
    """Tail bound (ciphertext units) of the W-dependent noise at any output coefficient of the
    packed result, before flooding; the derivation is in the module docstring."""
    n, degree = w_int.shape[1], pack.degree
    supports = []
    for element in pack.image_elements:
        support = np.zeros(degree)
        support[np.arange(n) * element % (2 * degree) % degree] = 1.0
        supports.append(np.fft.rfft(support))
    node_square, node_rounding = 0.0, 0.0
    for block in pack.blocks:
        polys = [_weight_polynomial(w_int, pack, rows) for rows in block]
        for start in range(0, len(block), pack.images):
            node = node_weights(polys[start : start + pack.images], pack)
            node_square = max(
                node_square, sum(float((u.astype(np.float64) ** 2).sum()) for u in node)
            )
            spectrum = sum(
                np.fft.rfft(np.abs(u).astype(np.float64)) * support
                for u, support in zip(node, supports, strict=True)
            )
            window = np.fft.irfft(spectrum, degree)
            positions = _output_positions(pack, block[start : start + pack.images])
            # FFT rounding is far below one unit: a 1e-6 relative margin covers it
            node_rounding = max(node_rounding, 0.5 * float(window[positions].max()) * (1 + 1e-6))
    m = 1 << (pack.levels - pack.client_levels)
    switch_terms = (m * m - 1) // 3  # sum over server levels k of 4^(levels - 1 - k)
    gaussian = z * sigma * math.sqrt(m * m * node_square + digits * degree * switch_terms)
    return gaussian + m * node_rounding + (m - 1) * (degree + 1) / 2


def check_flood(flood_bound: int, leak: float, statistical_bits: int) -> None:
    """Refuse a flood below 2^statistical_bits times the leak bound: each output would then be
    further than 2^-(statistical_bits + 1) from a W-independent distribution."""
    if flood_bound < leak * 2.0**statistical_bits:
        raise ParameterMismatchError(
            f"flood bound 2^{math.log2(flood_bound):.1f} is below 2^{statistical_bits} x the "
            f"leak bound 2^{math.log2(leak):.1f} of these weights: recompile the model"
        )


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
        self.check_flood()

    def _prepare(self) -> list[list[list[Any]]]:
        """Per block, per node of the server's tree: one NTT-form weight plaintext per client
        image (None where that image's weights are zero); bias plaintexts (times 2^levels)."""
        if self._weights is None:
            context, pack = self.plan.context, self.pack
            w_int, b_int = self.plan.arrays["w_int"], self.plan.arrays["b_int"]
            weights = []
            for index, block in enumerate(pack.blocks):
                polys = [_weight_polynomial(w_int, pack, rows) for rows in block]
                nodes = [
                    node_weights(polys[i : i + pack.images], pack)
                    for i in range(0, len(polys), pack.images)
                ]
                weights.append(
                    [[context.ntt_plaintext(u) if u.any() else None for u in us] for us in nodes]
                )
                bias = np.zeros(context.n, dtype=np.int64)
                bias[pack.coefficients(index)] = b_int[pack.outputs(index)] << pack.levels
                self._biases.append(context.plaintext_from_coefficients(bias))
            for shift in pack.shifts[pack.client_levels :]:
                monomial = np.zeros(context.n, dtype=np.int64)
                monomial[shift] = 1
                self._shifts.append(context.plaintext_from_coefficients(monomial))
            self._weights = weights
        return self._weights

    def check_flood(self) -> None:
        """Recompute the leak bound from the weights (`leak_bound`) and check the manifest's
        flood against it when the layout is built: a model whose flood is too small is refused
        when it is loaded, before `heinfer serve` answers anything."""
        from heinfer.plans.linear.compile import FLOODING_BITS, packed_tail_bound

        leak = packed_tail_bound(self.plan.arrays["w_int"], self.pack)
        check_flood(int(self._spec["flood_bound"]), leak, FLOODING_BITS)

    def check(self, body: bytes | memoryview) -> Request:
        records = self.records(body)
        return Request(self.kind, len(records), body)

    def records(self, body: bytes | memoryview) -> list[bytes]:
        """One record per sample: its 2^client_levels image ciphertexts, each tag-checked."""
        plan = self.plan
        size = plan.context.request_bytes
        if len(body) >= _FRAME.size + 8 and bytes(body[:4]) == REQUEST_MAGIC:
            # other parameters first: their records have another size too
            plan.check_tag(bytes(body[_FRAME.size : _FRAME.size + 8]), "ciphertext 0")
        records = _records(body, REQUEST_MAGIC, size * self.pack.images, plan.manifest.max_batch)
        for index, record in enumerate(records):
            for image in range(self.pack.images):
                plan.check_tag(record[image * size :], f"ciphertext {index}, image {image}")
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
        context, pack = self.plan.context, self.pack
        weights = self._prepare()
        size = context.request_bytes
        ev = context.evaluator
        images = []
        for image in range(pack.images):
            request = context.load_request(record[image * size : (image + 1) * size])
            ntt = seal.Ciphertext()
            ev.transform_to_ntt(request.ciphertext, ntt)
            images.append(ntt)
        elements = pack.elements
        results = []
        for index, block in enumerate(weights):
            level = [self._node(images, node) for node in block]
            for element, shift in zip(elements, self._shifts, strict=True):
                level = [
                    self._combine(level[m : m + 2], element, shift, key)
                    for m in range(0, len(level), 2)
                ]
            (packed,) = level
            ev.add_plain_inplace(packed, self._biases[index])
            self._treat(packed, index, key)
            results.append(packed)
        return results

    def _node(self, images: list[Any], plains: list[Any]) -> Any:
        """sum_b tau_b(x) * u_b, accumulated in NTT form: one inverse NTT per node."""
        ev = self.plan.context.evaluator
        node = None
        for image, plain in zip(images, plains, strict=True):
            if plain is None:
                continue
            if node is None:
                node = seal.Ciphertext()
                ev.multiply_plain(image, plain, node)
            else:
                product = seal.Ciphertext()
                ev.multiply_plain(image, plain, product)
                ev.add_inplace(node, product)
        assert node is not None  # image 0 carries the node's first group
        ev.transform_from_ntt_inplace(node)
        return node

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
        self._image_elements = packing_from_layout(
            layout, codec.params.poly_modulus_degree
        ).image_elements

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
        request = self.codec.context.request_bytes * len(self._image_elements)
        return 2 * _FRAME.size + samples * (request + self.record_bytes)

    def encrypt(self, secret: Any, X: np.ndarray) -> bytes:
        assert isinstance(secret, SecretKey)
        rows = self.codec.quantize(X)
        return _frame(REQUEST_MAGIC, [self.encrypt_record(secret, row) for row in rows])

    def encrypt_record(self, secret: SecretKey, x_int: np.ndarray) -> bytes:
        """One sample: fresh encryptions of x(X^e) for every image element e (x itself first)."""
        poly = np.zeros(self.codec.params.poly_modulus_degree, dtype=np.int64)
        poly[: x_int.size] = x_int
        return b"".join(secret.encrypt(automorphism(poly, e)) for e in self._image_elements)

    def decrypt(self, secret: Any, body: bytes) -> np.ndarray:
        records = _records(body, RESPONSE_MAGIC, self.record_bytes, self.codec.manifest.max_batch)
        return np.stack([self.decrypt_record(secret, r) for r in records])

    def decrypt_record(self, secret: SecretKey, record: bytes) -> np.ndarray:
        codec = self.codec
        return decrypt_compact(
            secret,
            record,
            codec.params,
            self._spec["results"],
            self._bits,
            codec.manifest.n_outputs,
            self._divisor,
        )
