"""Coefficient-encoded linear layers: y = W x + b with one plaintext multiplication, no keys.

Layout ("coeff-rowpack", after Cheetah, USENIX Security 2022). The client puts its quantized
input x (n features) in the first n coefficients of one BFV plaintext. The server holds, per
group of r = N // n rows, one plaintext whose row j (at position p in the group) is stored
reversed at offset p*n. In the negacyclic product, coefficient p*n + n - 1 is exactly W_j . x;
the product's other coefficients hold partial sums. With r*n <= N no wrap-around reaches an
output coefficient. The weight plaintexts are precomputed in NTT form, so the server's work per
request is one forward NTT, one pointwise product and one inverse NTT per group.

Privacy of the model (the result must reveal W x + b and nothing else):
- non-output coefficients of c0 receive uniform values (mask), so they decrypt to noise;
- the result is re-randomized with a fresh encryption of zero under the client's public key,
  so c1 is no longer c1_x * W (which a client could divide by its own c1_x);
- the noise at each output coefficient, which contains e_x * W for the client's own error e_x,
  is flooded with uniform noise 2**40 times larger than a tail bound of that term (statistical
  distance <= 2**-40 per output, see `NoiseBudget`);
- the result is then switched down to one small prime and only c1 plus the output
  coefficients of c0 are sent.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Any

import numpy as np

from heinfer.errors import MalformedPayloadError, ParameterMismatchError, ShapeError
from heinfer.he.backend import (
    Context,
    EvaluationKey,
    SecretKey,
    find_ntt_primes,
    pack_bits,
    unpack_bits,
)
from heinfer.he.params import BFVParameters, max_log_q
from heinfer.plans.manifest import (
    InputSpec,
    KeysSpec,
    Manifest,
    OutputSpec,
    PrecisionSpec,
    PrivacySpec,
)

__all__ = [
    "LAYOUT_KIND",
    "LinearCodec",
    "LinearPlan",
    "NoiseBudget",
    "compile_linear",
]

LAYOUT_KIND = "coeff-rowpack"
FLOODING_BITS = 40
SEAL_NOISE_SIGMA = 3.2
_RING_DEGREES = (4096, 8192, 16384, 32768)
_SPECIAL_PRIME_BITS = 20
_MIN_SPECIAL_PRIME_BITS = 17
_MAX_PRIME_BITS = 60
_MAX_WEIGHT_BITS = 26


def _tail_factor(statistical_bits: int, outputs: int) -> float:
    """z with P(|N(0,1)| > z) <= 2**-(bits+1) / outputs (sub-Gaussian tail, union bound)."""
    return math.sqrt(2.0 * math.log(2.0 * outputs * 2.0 ** (statistical_bits + 1)))


@dataclass(frozen=True)
class NoiseBudget:
    """Every bound that fixes the moduli, in plaintext-integer or ciphertext units."""

    value_bound: float  # max |W_int x_int + b_int| over the input box
    leak_bound: float  # tail bound of |e_x * W + rounding * W| at an output coefficient
    flood_bound: int  # flooding noise is uniform in [-flood_bound, flood_bound]
    eta_target: float  # allowed decryption error from noise, plaintext units
    plain_bits: int
    result_prime_bits: int
    data_bits: int


@dataclass(frozen=True)
class _Groups:
    rows_per_group: int
    groups: list[list[int]]  # row indices per result ciphertext

    def output_coefficients(self, n: int, group: int) -> list[int]:
        return [p * n + n - 1 for p in range(len(self.groups[group]))]


def _group_rows(n_rows: int, n_features: int, degree: int) -> _Groups:
    per = degree // n_features
    rows = list(range(n_rows))
    return _Groups(per, [rows[i : i + per] for i in range(0, n_rows, per)])


def _weight_polynomial(w_int: np.ndarray, rows: list[int], degree: int) -> np.ndarray:
    n = w_int.shape[1]
    poly = np.zeros(degree, dtype=np.int64)
    for position, row in enumerate(rows):
        poly[position * n : position * n + n] = w_int[row, ::-1]
    return poly


def _budget(
    w_int: np.ndarray,
    b_int: np.ndarray,
    x_max_int: int,
    groups: _Groups,
    degree: int,
    eta_target: float,
) -> NoiseBudget | None:
    """Smallest moduli that decrypt within eta_target after 40-bit flooding, or None."""
    value_bound = float(np.max(np.abs(w_int).sum(axis=1) * x_max_int + np.abs(b_int)))
    z = _tail_factor(FLOODING_BITS, max(len(g) for g in groups.groups))
    leak = 0.0
    for rows in groups.groups:
        block = w_int[rows].astype(np.float64)
        gaussian = z * SEAL_NOISE_SIGMA * float(np.sqrt((block**2).sum()))
        rounding = 0.5 * float(np.abs(block).sum(axis=1).max())
        leak = max(leak, gaussian + rounding)
    flood = math.ceil(leak * 2.0**FLOODING_BITS)
    plain_bits = math.ceil(math.log2(2.0 * (value_bound + eta_target) + 1))
    # Mod-switch rounding adds rho0 + rho1*s, std sqrt((1 + 2N/3)/12); keep its share < 1/8.
    switch_noise = z * math.sqrt((1 + 2 * degree / 3) / 12)
    result_prime_bits = max(
        plain_bits + 2, plain_bits + math.ceil(math.log2(8 * switch_noise / eta_target + 1))
    )
    # Decryption error from flooding: t * (flood + leak + fresh) / q <= eta_target / 2.
    data_bits = math.ceil(math.log2(2 ** (plain_bits + 1) * (flood + 2 * leak) / eta_target))
    data_bits = max(data_bits, result_prime_bits + 20)
    if result_prime_bits > _MAX_PRIME_BITS:
        return None
    return NoiseBudget(
        value_bound, leak, flood, eta_target, plain_bits, result_prime_bits, data_bits
    )


def _choose_parameters(
    w_int: np.ndarray, b_int: np.ndarray, x_max_int: int, eta_target: float
) -> tuple[BFVParameters, _Groups, NoiseBudget]:
    n = w_int.shape[1]
    for degree in _RING_DEGREES:
        if degree < n:
            continue
        groups = _group_rows(w_int.shape[0], n, degree)
        budget = _budget(w_int, b_int, x_max_int, groups, degree, eta_target)
        if budget is None:
            continue
        rest = budget.data_bits - budget.result_prime_bits
        n_rest = max(1, math.ceil(rest / _MAX_PRIME_BITS))
        rest_bits = [rest // n_rest + (1 if i < rest % n_rest else 0) for i in range(n_rest)]
        special = min(_SPECIAL_PRIME_BITS, max_log_q(degree) - budget.data_bits)
        if special < _MIN_SPECIAL_PRIME_BITS or min(rest_bits) < 20:
            continue
        primes = find_ntt_primes(degree, [budget.result_prime_bits, *rest_bits, special])
        params = BFVParameters(degree, primes, 1 << budget.plain_bits)
        return params, groups, budget
    raise ParameterMismatchError(
        f"no 128-bit BFV parameters up to N=32768 fit a linear layer with {n} features; "
        "reduce input_bits or weight_bits"
    )


class LinearPlan:
    """Server side of a compiled linear model: quantized weights in NTT form. Private."""

    def __init__(self, manifest: Manifest, arrays: dict[str, np.ndarray]) -> None:
        self.manifest = manifest
        self.arrays = arrays
        self.params = BFVParameters.from_dict(manifest.scheme)
        self._layout = manifest.layout
        self._context: Context | None = None
        self._weights: list[Any] = []
        self._biases: list[Any] = []
        self.rerandomize = True
        self.flood = True
        self.mask = True

    @property
    def context(self) -> Context:
        if self._context is None:
            self._prepare()
        assert self._context is not None
        return self._context

    def _prepare(self) -> None:
        """Build SEAL objects: precomputed NTT weight plaintexts and bias plaintexts."""
        context = Context(self.params)
        w_int = self.arrays["w_int"]
        b_int = self.arrays["b_int"]
        n = w_int.shape[1]
        weights, biases = [], []
        for result in self._layout["results"]:
            rows = result["outputs"]
            weights.append(context.ntt_plaintext(_weight_polynomial(w_int, rows, context.n)))
            bias = np.zeros(context.n, dtype=np.int64)
            for position, row in enumerate(rows):
                bias[position * n + n - 1] = b_int[row]
            biases.append(context.plaintext_from_coefficients(bias))
        self._context, self._weights, self._biases = context, weights, biases

    def predict_plain(self, X: np.ndarray) -> np.ndarray:
        """Reference scores in float64: what decrypted results are compared to."""
        return np.asarray(X, dtype=np.float64) @ self.arrays["coef"].T + self.arrays["intercept"]

    def load_key(self, data: bytes) -> EvaluationKey:
        return self.context.load_evaluation_key(data)

    def evaluate_full(self, record: bytes, key: EvaluationKey) -> list[Any]:
        """Homomorphic W x + b with privacy treatment, before compaction (tests inspect it)."""
        context = self.context
        request = context.load_request(record)
        results = request.multiply_ntt(self._weights)
        for index, (ciphertext, bias) in enumerate(zip(results, self._biases, strict=True)):
            context.evaluator.add_plain_inplace(ciphertext, bias)
            if self.rerandomize:
                context.add(ciphertext, key.encrypt_zero())
            noise = context.uniform_c0() if self.mask else np.zeros(
                (len(context.data_primes), context.n), dtype=np.uint64
            )
            outputs = self._layout["results"][index]["coefficients"]
            noise[:, outputs] = self._flooding(len(outputs))
            context.add_to_c0(ciphertext, noise)
        return results

    def _flooding(self, count: int) -> np.ndarray:
        """Uniform integers in [-F, F] reduced modulo each data prime, from `secrets`."""
        bound = int(self._layout["flood_bound"]) if self.flood else 0
        draws = [secrets.randbelow(2 * bound + 1) - bound for _ in range(count)]
        primes = self.context.data_primes.tolist()
        return np.array([[d % q for d in draws] for q in primes], dtype=np.uint64)

    def evaluate(self, record: bytes, key: EvaluationKey) -> bytes:
        """One request ciphertext in, one compact result record out."""
        bits = int(self._layout["result_prime_bits"])
        parts = []
        for index, ciphertext in enumerate(self.evaluate_full(record, key)):
            arrays = self.context.last_level_arrays(ciphertext)
            outputs = self._layout["results"][index]["coefficients"]
            parts.append(pack_bits(arrays[1], bits) + pack_bits(arrays[0][outputs], bits))
        return b"".join(parts)


def _quantize(
    coef: np.ndarray, intercept: np.ndarray, low: float, step: float, bits: int
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Integer weights on `bits` signed bits; the bias absorbs the input offset `low`."""
    max_weight = float(np.max(np.abs(coef))) or 1.0
    weight_scale = ((1 << (bits - 1)) - 1) / max_weight
    w_int = np.rint(coef * weight_scale).astype(np.int64)
    scale = weight_scale / step  # decrypted integers / scale = scores
    b_int = np.rint((intercept + low * coef.sum(axis=1)) * scale).astype(np.int64)
    return w_int, b_int, weight_scale, scale


def compile_linear(
    coef: np.ndarray,
    intercept: np.ndarray,
    *,
    name: str,
    task: str,
    estimator: str,
    classes: list[int | str] | None,
    input_range: tuple[float, float],
    input_bits: int = 8,
    weight_bits: int | None = None,
    max_batch: int = 4096,
) -> LinearPlan:
    """Quantize, choose 128-bit parameters for the noise budget, lay out rows, build the plan."""
    coef = np.asarray(coef, dtype=np.float64)
    intercept = np.asarray(intercept, dtype=np.float64)
    low, high = float(input_range[0]), float(input_range[1])
    if not high > low:
        raise ShapeError(f"input_range must satisfy low < high, got {input_range}")
    levels = (1 << input_bits) - 1
    step = (high - low) / levels
    n_rows, n_features = coef.shape
    # HE noise may cost at most a small fraction of the rounding error already made.
    eta_target = max(4.0, levels * math.sqrt(n_features) / 4.0)
    candidates = [weight_bits] if weight_bits else list(range(_MAX_WEIGHT_BITS, 11, -1))
    best: tuple[int, int] | None = None
    for bits in candidates:
        quantized = _quantize(coef, intercept, low, step, bits)
        try:
            params, groups, budget = _choose_parameters(
                quantized[0], quantized[1], levels, eta_target
            )
        except ParameterMismatchError:
            continue
        # Smallest ring first (it sets request size and speed), then the most weight bits.
        if best is None or params.poly_modulus_degree < best[0]:
            best = (params.poly_modulus_degree, bits)
            chosen = (quantized, params, groups, budget)
    if best is None:
        raise ParameterMismatchError(
            f"no 128-bit BFV parameters up to N=32768 fit a linear layer with {n_features} "
            "features; reduce input_bits or weight_bits"
        )
    (w_int, b_int, weight_scale, scale), params, groups, budget = chosen

    weight_error = np.abs(coef - w_int / weight_scale)
    max_error = float(
        (weight_error.sum(axis=1) * max(abs(low), abs(high))).max()
        + 0.5 * step * np.abs(coef).sum(axis=1).max()
        + (eta_target + 1.0) / scale
    )
    typical = float(
        6 * math.sqrt(n_features / 12.0) * max(abs(low), abs(high)) / weight_scale
        + (eta_target + 1.0) / scale
    )
    results = [
        {"outputs": rows, "coefficients": groups.output_coefficients(n_features, i)}
        for i, rows in enumerate(groups.groups)
    ]
    manifest = Manifest(
        name=name,
        task=task,  # type: ignore[arg-type]
        estimator=estimator,
        input=InputSpec(
            shape=[n_features],
            low=low,
            high=high,
            bits=input_bits,
            encoding=(
                "x_int[i] = round((x[i] - low) / (high - low) * (2**bits - 1)) at plaintext "
                "coefficient i; one seeded symmetric BFV ciphertext per sample"
            ),
        ),
        output=OutputSpec(shape=[n_rows], classes=classes),
        scheme=params.to_dict(),
        layout={
            "kind": LAYOUT_KIND,
            "results": results,
            "result_prime_bits": budget.result_prime_bits,
            "output_scale": scale,
            "flood_bound": str(budget.flood_bound),
            "noise": {
                "value_bound": budget.value_bound,
                "leak_bound": budget.leak_bound,
                "eta_target": budget.eta_target,
                "plain_bits": budget.plain_bits,
                "data_bits": sum(q.bit_length() for q in params.data_primes),
            },
        },
        keys=KeysSpec(public=True, relin=False, galois_steps=[]),
        precision=PrecisionSpec(
            max_abs_error=max_error,
            expected_abs_error=typical,
            noise_abs_error=(eta_target + 1.0) / scale,
        ),
        privacy=PrivacySpec(
            rerandomized=True,
            masked=True,
            flooding_statistical_bits=FLOODING_BITS,
            notes=(
                "results are re-randomized with a fresh public-key encryption of zero; output "
                "noise is flooded 2^40 above a tail bound of e_x*W (honest-but-curious client, "
                "SEAL's sigma=3.2 error); non-output coefficients are masked and not sent"
            ),
        ),
        max_batch=max_batch,
    )
    arrays = {
        "coef": coef,
        "intercept": intercept,
        "w_int": w_int,
        "b_int": b_int,
    }
    return LinearPlan(manifest, arrays)


class LinearCodec:
    """Client side of the coefficient layout, built from the public manifest alone."""

    def __init__(self, manifest: Manifest) -> None:
        if manifest.layout.get("kind") != LAYOUT_KIND:
            raise ParameterMismatchError(f"not a {LAYOUT_KIND} manifest")
        self.manifest = manifest
        self.params = BFVParameters.from_dict(manifest.scheme)
        self.context = Context(self.params)
        layout = manifest.layout
        self._results = layout["results"]
        self._bits = int(layout["result_prime_bits"])
        self._scale = float(layout["output_scale"])
        n = self.params.poly_modulus_degree
        self.record_bytes = sum(
            (n * self._bits + 7) // 8 + (len(r["coefficients"]) * self._bits + 7) // 8
            for r in self._results
        )

    def quantize(self, X: np.ndarray) -> np.ndarray:
        spec = self.manifest.input
        levels = (1 << spec.bits) - 1
        scaled = (np.asarray(X, dtype=np.float64) - spec.low) / (spec.high - spec.low) * levels
        return np.clip(np.rint(scaled), 0, levels).astype(np.int64)

    def encrypt(self, secret: SecretKey, X: np.ndarray) -> list[bytes]:
        return [secret.encrypt(row) for row in self.quantize(X)]

    def decrypt(self, secret: SecretKey, record: bytes) -> np.ndarray:
        if len(record) != self.record_bytes:
            raise MalformedPayloadError(
                f"result record is {len(record)} bytes, {self.record_bytes} expected"
            )
        n = self.params.poly_modulus_degree
        q1 = self.params.coeff_modulus[0]
        scores = np.zeros(self.manifest.n_outputs, dtype=np.float64)
        offset = 0
        for result in self._results:
            outputs, coefficients = result["outputs"], result["coefficients"]
            c1_size = (n * self._bits + 7) // 8
            c0_size = (len(coefficients) * self._bits + 7) // 8
            c1 = unpack_bits(record[offset : offset + c1_size], n, self._bits)
            c0_out = unpack_bits(
                record[offset + c1_size : offset + c1_size + c0_size], len(coefficients), self._bits
            )
            offset += c1_size + c0_size
            if np.any(c1 >= np.uint64(q1)) or np.any(c0_out >= np.uint64(q1)):
                raise MalformedPayloadError("result coefficient out of range")
            c0 = np.zeros(n, dtype=np.uint64)
            c0[coefficients] = c0_out
            plain = secret.decrypt_last_level(c0, c1)
            scores[outputs] = plain[coefficients] / self._scale
        return scores
