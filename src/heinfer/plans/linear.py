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

Second layout ("coeff-batch", feature-major as in CryptoNets, but coefficient-encoded so it
shares these parameters, this Context and the uploaded public key). For B <= N samples the
client sends n ciphertexts; ciphertext i holds sum_b x_int[b, i] X^b. Output j is
sum_i W_int[j, i] * ct_i + b_j: scalar multiply-accumulates only, which the server computes as
one exact integer matrix product per prime (float64 BLAS on digit-split operands), so a batch
of up to N samples costs about as much as 50 single-sample requests. Coefficient b of
output j decrypts to sample b's score j. The same privacy treatment applies per output
ciphertext: a fresh encryption of zero (c1 = sum_i w_ji c1_i would otherwise give W from one
response by linear algebra), flooding of every used coefficient 2**40 above a tail bound of
sum_i w_ji (e_i + rounding_i) (the client knows its errors), uniform masks on coefficients
>= B, and compact responses (c1 plus c0 at coefficients < B, one small prime).
"""

from __future__ import annotations

import functools
import math
import secrets
from dataclasses import dataclass
from typing import Any

import numpy as np

from heinfer.errors import MalformedPayloadError, ParameterMismatchError, ShapeError
from heinfer.he.backend import (
    CBD_VARIANCE,
    Context,
    EvaluationKey,
    SecretKey,
    find_ntt_primes,
    linear_combination,
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
    "BATCH_LAYOUT_KIND",
    "LAYOUT_KIND",
    "LinearCodec",
    "LinearPlan",
    "NoiseBudget",
    "compile_linear",
]

LAYOUT_KIND = "coeff-rowpack"
BATCH_LAYOUT_KIND = "coeff-batch"
FLOODING_BITS = 40
# The client's encryption error, in both layouts: SEAL 4.1's default centered binomial (21 + 21
# bits; the batch layout samples the same in numpy), sub-Gaussian with variance proxy 21/2
# (Hoeffding), so sigma = 3.24 in the tail bounds, not the 3.2 of SEAL's Gaussian option.
SEAL_NOISE_SIGMA = math.sqrt(CBD_VARIANCE)
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

    def summary(self, data_bits: int) -> dict[str, Any]:
        """The bounds as published in a manifest, with the parameters' actual data bits."""
        return {
            "value_bound": self.value_bound,
            "leak_bound": self.leak_bound,
            "eta_target": self.eta_target,
            "plain_bits": self.plain_bits,
            "data_bits": data_bits,
        }


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
    return _moduli(value_bound, leak, flood, z, degree, eta_target)


def _moduli(
    value_bound: float, leak: float, flood: int, z: float, degree: int, eta_target: float
) -> NoiseBudget | None:
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


def _batch_budget(
    w_int: np.ndarray, b_int: np.ndarray, x_max_int: int, degree: int, eta_target: float
) -> NoiseBudget | None:
    """The same bounds for the coeff-batch layout (one ciphertext per feature).

    Coefficient b of output j carries sum_i w_ji (e_i[b] + rho_i[b]), which the client can
    compute (it knows its errors e_i and the scaling roundings |rho| <= 1/2). Tail bound per
    row: z * sigma * ||w_j||_2 + ||w_j||_1 / 2, with z from a union bound over all
    N * n_outputs coefficients of a response. One flood bound serves every row (the largest,
    rounded up to a power of two so exact uniform sampling only takes random bits); each used
    coefficient is then within statistical distance leak / (2 * flood) <= 2**-41 of a
    W-independent distribution.
    """
    value_bound = float(np.max(np.abs(w_int).sum(axis=1) * x_max_int + np.abs(b_int)))
    z = _tail_factor(FLOODING_BITS, degree * w_int.shape[0])
    w = w_int.astype(np.float64)
    per_row = z * SEAL_NOISE_SIGMA * np.sqrt((w**2).sum(axis=1)) + 0.5 * np.abs(w).sum(axis=1)
    leak = float(per_row.max())
    flood = 1 << max(1, math.ceil(math.log2(leak * 2.0**FLOODING_BITS)))
    return _moduli(value_bound, leak, flood, z, degree, eta_target)


def _choose_parameters(
    w_int: np.ndarray, b_int: np.ndarray, x_max_int: int, eta_target: float
) -> tuple[BFVParameters, _Groups, NoiseBudget, NoiseBudget]:
    """One parameter set (one key) whose moduli satisfy both layouts' budgets."""
    n = w_int.shape[1]
    for degree in _RING_DEGREES:
        if degree < n:
            continue
        groups = _group_rows(w_int.shape[0], n, degree)
        budget = _budget(w_int, b_int, x_max_int, groups, degree, eta_target)
        batch = _batch_budget(w_int, b_int, x_max_int, degree, eta_target)
        if budget is None or batch is None:
            continue
        data_bits = max(budget.data_bits, batch.data_bits)
        result_prime_bits = max(budget.result_prime_bits, batch.result_prime_bits)
        rest = data_bits - result_prime_bits
        n_rest = max(1, math.ceil(rest / _MAX_PRIME_BITS))
        rest_bits = [rest // n_rest + (1 if i < rest % n_rest else 0) for i in range(n_rest)]
        special = min(_SPECIAL_PRIME_BITS, max_log_q(degree) - data_bits)
        if special < _MIN_SPECIAL_PRIME_BITS or min(rest_bits) < 20:
            continue
        primes = find_ntt_primes(degree, [result_prime_bits, *rest_bits, special])
        params = BFVParameters(degree, primes, 1 << budget.plain_bits)
        return params, groups, budget, batch
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

    # -- coeff-batch: one request of n ciphertexts for up to N samples --------------------------
    @property
    def batch_layout(self) -> dict[str, Any]:
        batch = self._layout.get("batch")
        if not isinstance(batch, dict) or batch.get("kind") != BATCH_LAYOUT_KIND:
            raise ParameterMismatchError(
                f"model {self.manifest.name!r} was compiled without the {BATCH_LAYOUT_KIND} "
                "layout; send per-sample requests or recompile it with this heinfer"
            )
        return batch

    def check_batch_samples(self, samples: int) -> None:
        limit = int(self.batch_layout["max_samples"])
        if not 1 <= samples <= limit:
            raise MalformedPayloadError(
                f"a {BATCH_LAYOUT_KIND} request holds 1..{limit} samples, not {samples}"
            )

    def evaluate_batch_full(self, record: bytes, samples: int, key: EvaluationKey) -> list[Any]:
        """W X + b for a batch request, with privacy treatment, before compaction (tests)."""
        self.check_batch_samples(samples)
        context = self.context
        n = context.n
        w_int = self.arrays["w_int"]
        primes = context.params.data_primes
        rows = w_int.shape[0]
        # sum_i w_ji * ct_i, block of ciphertexts by block, accumulated modulo each prime
        out = np.zeros((rows, 2, len(primes), n), dtype=np.uint64)
        for first, c0, c1 in context.iter_batch_request(record, w_int.shape[1]):
            weights = w_int[:, first : first + c0.shape[1]]
            for j, q in enumerate(primes):
                _add_mod(out[:, 0, j], linear_combination(weights, c0[j], q), q)
                _add_mod(out[:, 1, j], linear_combination(weights, c1[j], q), q)
        # Bias at the used coefficients, flooding there, uniform masks everywhere else.
        extra = np.zeros((len(primes), rows, n), dtype=np.uint64)
        extra[:, :, :samples] = context.scale_plain(self.arrays["b_int"])[:, :, None]
        if self.flood:
            log2_bound = int(self.batch_layout["flood_bound"]).bit_length() - 1
            flood = context.uniform_flood((rows, samples), log2_bound)
            for j, q in enumerate(primes):
                _add_mod(extra[j, :, :samples], flood[j], q)
        if self.mask:
            for r in range(rows):
                extra[:, r, samples:] = context.uniform_c0()[:, samples:]
        for j, q in enumerate(primes):
            _add_mod(out[:, 0, j], extra[j], q)
        results = []
        for r in range(rows):
            ciphertext = context.ciphertext_from_arrays(out[r], last_level=False)
            if self.rerandomize:
                context.add(ciphertext, key.encrypt_zero())
            results.append(ciphertext)
        return results

    def evaluate_batch(self, record: bytes, samples: int, key: EvaluationKey) -> bytes:
        """A batch request in, one compact record out: per output, c1 then c0[:samples]."""
        bits = int(self.batch_layout["result_prime_bits"])
        parts = []
        for ciphertext in self.evaluate_batch_full(record, samples, key):
            arrays = self.context.last_level_arrays(ciphertext)
            parts.append(pack_bits(arrays[1], bits) + pack_bits(arrays[0][:samples], bits))
        return b"".join(parts)


def _add_mod(target: np.ndarray, values: np.ndarray, q: int) -> None:
    """target = (target + values) mod q in place; both already reduced mod q < 2**63."""
    target += values
    target -= np.uint64(q) * (target >= np.uint64(q))


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


def _batch_layout(
    params: BFVParameters,
    n_features: int,
    max_batch: int,
    scale: float,
    budget: NoiseBudget,
    data_bits: int,
) -> dict[str, Any]:
    return {
        "kind": BATCH_LAYOUT_KIND,
        "max_samples": min(params.poly_modulus_degree, max_batch),
        "ciphertexts": n_features,
        "result_prime_bits": params.coeff_modulus[0].bit_length(),
        "output_scale": scale,
        "flood_bound": str(budget.flood_bound),
        "noise": {**budget.summary(data_bits), "error_variance": CBD_VARIANCE},
        "encoding": (
            "B samples per request, B <= max_samples; ciphertext i (0 <= i < n_features) "
            "encrypts sum_b x_int[b, i] X^b; request = 8-byte parameter tag, 32-byte seed, then "
            "c0 of all ciphertexts bit-packed at each data prime's width, prime by prime; c1 of "
            "ciphertext i modulo prime j = SHAKE-128(b'heinfer/coeff-batch/a/v1' || seed || "
            "u32le(i) || u8(j)) as uint64 words masked to the prime's width, first N below it; "
            "c0 = -(c1*s + e) + round(q*m/t), e centered binomial (21 + 21 bits)"
        ),
        "response": (
            "for each output j: c1 (N coefficients), then c0 at coefficients 0..B-1, all "
            "bit-packed at result_prime_bits; coefficient b of output j is sample b's score"
        ),
        "privacy": (
            "each output ciphertext is re-randomized with a fresh public-key encryption of "
            "zero; every used coefficient gets uniform noise in [-flood_bound, flood_bound) "
            ">= 2^40 x leak_bound (z*sigma*||w_j||_2 + ||w_j||_1/2, union bound over N x "
            "n_outputs coefficients; statistical distance <= 2^-41 per coefficient, i.e. the "
            "same per sample as coeff-rowpack); coefficients >= B are masked and not sent"
        ),
    }


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
            params, groups, budget, batch = _choose_parameters(
                quantized[0], quantized[1], levels, eta_target
            )
        except ParameterMismatchError:
            continue
        # Smallest ring first (it sets request size and speed), then the most weight bits.
        if best is None or params.poly_modulus_degree < best[0]:
            best = (params.poly_modulus_degree, bits)
            chosen = (quantized, params, groups, budget, batch)
    if best is None:
        raise ParameterMismatchError(
            f"no 128-bit BFV parameters up to N=32768 fit a linear layer with {n_features} "
            "features; reduce input_bits or weight_bits"
        )
    (w_int, b_int, weight_scale, scale), params, groups, budget, batch = chosen
    result_prime_bits = params.coeff_modulus[0].bit_length()  # max over both layouts
    data_bits = sum(q.bit_length() for q in params.data_primes)

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
            "result_prime_bits": result_prime_bits,
            "output_scale": scale,
            "flood_bound": str(budget.flood_bound),
            "noise": budget.summary(data_bits),
            "batch": _batch_layout(params, n_features, max_batch, scale, batch, data_bits),
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
                "SEAL's centered binomial error, sigma 3.24); non-output coefficients are "
                "masked and not sent"
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
        batch = layout.get("batch")
        self.batch: dict[str, Any] | None = (
            batch if isinstance(batch, dict) and batch.get("kind") == BATCH_LAYOUT_KIND else None
        )

    def quantize(self, X: np.ndarray) -> np.ndarray:
        spec = self.manifest.input
        if spec.bits is None:
            raise ParameterMismatchError("this manifest has no BFV input quantization")
        levels = (1 << spec.bits) - 1
        scaled = np.asarray(X, dtype=np.float64) - spec.low
        scaled /= spec.high - spec.low
        scaled *= levels
        np.rint(scaled, out=scaled)
        np.maximum(scaled, 0, out=scaled)
        np.minimum(scaled, levels, out=scaled)
        return scaled.astype(np.int64)

    def encrypt(self, secret: SecretKey, X: np.ndarray) -> list[bytes]:
        return [secret.encrypt(row) for row in self.quantize(X)]

    # -- coeff-batch ----------------------------------------------------------------------------
    @property
    def batch_capacity(self) -> int:
        """Most samples one coeff-batch request holds (0 when the model has no batch layout)."""
        return int(self.batch["max_samples"]) if self.batch else 0

    @property
    def batch_request_bytes(self) -> int:
        return self.context.batch_request_bytes(self.manifest.n_features)

    def batch_record_bytes(self, samples: int) -> int:
        """Size of the result record for a batch of `samples`."""
        bits = int(self.batch["result_prime_bits"]) if self.batch else self._bits
        n = self.params.poly_modulus_degree
        return self.manifest.n_outputs * ((n * bits + 7) // 8 + (samples * bits + 7) // 8)

    @functools.cached_property
    def batch_crossover(self) -> int | None:
        """Fewest samples for which one coeff-batch request is smaller on the wire (request +
        response, frames included) than per-sample requests; None if it never is.

        Server time crosses over far earlier (a batch costs about as much as 40-80 per-sample
        evaluations; see bench/linear.py), so bytes decide.
        """
        if not self.batch:
            return None
        per_sample = self.context.request_bytes + 4 + self.record_bytes
        for samples in range(1, self.batch_capacity + 1):
            batch = 16 + self.batch_request_bytes + self.batch_record_bytes(samples)
            if batch <= samples * per_sample:
                return samples
        return None

    def encrypt_batch(self, secret: SecretKey, X: np.ndarray) -> bytes:
        """One coeff-batch request record for up to `batch_capacity` samples."""
        x_int = self.quantize(X)
        if x_int.ndim != 2 or not 1 <= len(x_int) <= self.batch_capacity:
            raise ShapeError(
                f"a {BATCH_LAYOUT_KIND} request holds 1..{self.batch_capacity} samples, "
                f"got {len(x_int)}"
            )
        return secret.encrypt_columns(np.ascontiguousarray(x_int.T))

    def decrypt_batch(self, secret: SecretKey, record: bytes, samples: int) -> np.ndarray:
        """Scores of shape (samples, n_outputs) from a coeff-batch result record."""
        if not self.batch:
            raise ParameterMismatchError(f"this model has no {BATCH_LAYOUT_KIND} layout")
        if not 1 <= samples <= self.batch_capacity:
            raise MalformedPayloadError(f"batch result for {samples} samples")
        expected = self.batch_record_bytes(samples)
        if len(record) != expected:
            raise MalformedPayloadError(
                f"batch result record is {len(record)} bytes, {expected} expected"
            )
        n = self.params.poly_modulus_degree
        bits = int(self.batch["result_prime_bits"])
        scale = float(self.batch["output_scale"])
        q1 = np.uint64(self.params.coeff_modulus[0])
        c1_size, c0_size = (n * bits + 7) // 8, (samples * bits + 7) // 8
        scores = np.empty((samples, self.manifest.n_outputs), dtype=np.float64)
        offset = 0
        for j in range(self.manifest.n_outputs):
            c1 = unpack_bits(record[offset : offset + c1_size], n, bits)
            c0 = np.zeros(n, dtype=np.uint64)
            c0[:samples] = unpack_bits(
                record[offset + c1_size : offset + c1_size + c0_size], samples, bits
            )
            offset += c1_size + c0_size
            if np.any(c1 >= q1) or np.any(c0 >= q1):
                raise MalformedPayloadError("result coefficient out of range")
            scores[:, j] = secret.decrypt_last_level(c0, c1)[:samples] / scale
        return scores

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
