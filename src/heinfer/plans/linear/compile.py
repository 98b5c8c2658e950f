"""Compiling a linear model: quantize, size the noise budget, pick 128-bit BFV parameters.

One parameter set (one client key) serves both linear layouts (`rowpack`, `batch`), so the
moduli satisfy the larger of their two budgets. Every bound that fixes a modulus is computed
here and published in the manifest (`layout.noise`, `layout.batch.noise`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from heinfer.errors import ParameterMismatchError, ShapeError
from heinfer.he.backend import find_ntt_primes
from heinfer.he.params import BFVParameters, max_log_q
from heinfer.plans.linear.batch import BATCH_LAYOUT_KIND
from heinfer.plans.linear.costs import BYTES_PER_MS, REQUESTS, estimate, pick, score
from heinfer.plans.linear.packed import PACKED_LAYOUT_KIND, Packing, leak_bound, packing
from heinfer.plans.linear.plan import LinearPlan
from heinfer.plans.linear.precision import input_error
from heinfer.plans.linear.rowpack import LAYOUT_KIND
from heinfer.plans.manifest import (
    InputSpec,
    KeysSpec,
    Manifest,
    OutputSpec,
    PrecisionSpec,
    PrivacySpec,
    extraction_spec,
)
from heinfer.rlwe.sampling import CBD_VARIANCE

__all__ = [
    "FLOODING_BITS",
    "NoiseBudget",
    "compile_linear",
    "packed_budget",
    "packed_tail_bound",
]
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


def _budget(
    w_int: np.ndarray,
    b_int: np.ndarray,
    x_max_int: int,
    groups: _Groups,
    degree: int,
    eta_target: float,
    plain_bits: int = 0,
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
    return _moduli(value_bound, leak, flood, z, degree, eta_target, plain_bits)


def _moduli(
    value_bound: float,
    leak: float,
    flood: int,
    z: float,
    degree: int,
    eta_target: float,
    plain_bits: int = 0,
) -> NoiseBudget | None:
    """`plain_bits`: at least this plaintext modulus (one t serves every layout of a model)."""
    plain_bits = max(plain_bits, math.ceil(math.log2(2.0 * (value_bound + eta_target) + 1)))
    # Mod-switch rounding adds rho0 + rho1*s, std sqrt((1 + 2N/3)/12); keep its share < 1/8.
    switch_noise = z * math.sqrt((1 + 2 * degree / 3) / 12)
    result_prime_bits = max(
        plain_bits + 2, plain_bits + math.ceil(math.log2(8 * switch_noise / eta_target + 1))
    )
    # The single-image re-randomizer is a public-key encryption of zero at the data primes
    # (no division by the special prime): noise -e_pk*u + e0 + e1*s, variance
    # sigma^2 * (1 + 4N/3) for ternary u and s.
    rerandomizer = z * SEAL_NOISE_SIGMA * math.sqrt(1 + 4 * degree / 3)
    # Decryption error from flooding: t * (flood + leak + fresh) / q <= eta_target / 2.
    noise = flood + 2 * leak + rerandomizer
    data_bits = math.ceil(math.log2(2 ** (plain_bits + 1) * noise / eta_target))
    data_bits = max(data_bits, result_prime_bits + 20)
    if result_prime_bits > _MAX_PRIME_BITS:
        return None
    return NoiseBudget(
        value_bound, leak, flood, eta_target, plain_bits, result_prime_bits, data_bits
    )


def _batch_budget(
    w_int: np.ndarray,
    b_int: np.ndarray,
    x_max_int: int,
    degree: int,
    eta_target: float,
    plain_bits: int = 0,
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
    return _moduli(value_bound, leak, flood, z, degree, eta_target, plain_bits)


# Key switching's decomposition: at most this many data primes (digits); see packed.leak_bound.
_MAX_DIGITS = 4
# Client levels of the packing tree the compiler tries (2^r ciphertexts per request).
_CLIENT_LEVELS = (0, 1, 2, 3)


def packed_tail_bound(w_int: np.ndarray, pack: Packing) -> float:
    """`packed.leak_bound` with this compiler's error model and statistical target."""
    z = _tail_factor(FLOODING_BITS, w_int.shape[0])
    return leak_bound(w_int, pack, z, SEAL_NOISE_SIGMA, _MAX_DIGITS)


def packed_budget(
    w_int: np.ndarray,
    b_int: np.ndarray,
    x_max_int: int,
    pack: Packing,
    eta_target: float,
) -> NoiseBudget | None:
    """The bounds for coeff-packed (see plans/linear/packed.py).

    Every output is multiplied by m = 2^levels by the tree, so the plaintext modulus needs
    levels more bits and the client may lose eta_target * m in those units. The leak (what
    the client could know about an output's noise, a function of W) is `packed.leak_bound`;
    flooding is 2^40 above it (rounded up to a power of two: exact uniform sampling).
    """
    degree = pack.degree
    m = 1 << pack.levels
    value_bound = m * float(np.max(np.abs(w_int).sum(axis=1) * x_max_int + np.abs(b_int)))
    z = _tail_factor(FLOODING_BITS, w_int.shape[0])
    leak = packed_tail_bound(w_int, pack)
    flood = 1 << max(1, math.ceil(math.log2(leak * 2.0**FLOODING_BITS)))
    return _moduli(value_bound, leak, flood, z, degree, eta_target * m)


def _choose_parameters(
    w_int: np.ndarray,
    b_int: np.ndarray,
    x_max_int: int,
    eta_target: float,
    packed: bool = False,
    client_levels: int = 0,
) -> tuple[BFVParameters, _Groups, NoiseBudget, NoiseBudget, tuple[Packing, NoiseBudget] | None]:
    """One parameter set (one key) whose moduli satisfy every offered layout's budget."""
    n = w_int.shape[1]
    for degree in _RING_DEGREES:
        if degree < n:
            continue
        pack = packing(w_int.shape[0], n, degree, client_levels) if packed else None
        extra = None
        plain_bits = 0
        if pack is not None:
            extra = packed_budget(w_int, b_int, x_max_int, pack, eta_target)
            if extra is None:
                continue
            plain_bits = extra.plain_bits
        elif packed:
            continue
        groups = _group_rows(w_int.shape[0], n, degree)
        budget = _budget(w_int, b_int, x_max_int, groups, degree, eta_target, plain_bits)
        batch = _batch_budget(w_int, b_int, x_max_int, degree, eta_target, plain_bits)
        if budget is None or batch is None:
            continue
        budgets = [budget, batch] + ([extra] if extra is not None else [])
        data_bits = max(b.data_bits for b in budgets)
        result_prime_bits = max(b.result_prime_bits for b in budgets)
        rest = data_bits - result_prime_bits
        n_rest = max(1, math.ceil(rest / _MAX_PRIME_BITS))
        rest_bits = [rest // n_rest + (1 if i < rest % n_rest else 0) for i in range(n_rest)]
        special = min(_SPECIAL_PRIME_BITS, max_log_q(degree) - data_bits)
        if pack is not None:  # key switching noise stays small only with P above every q_i
            special = max(result_prime_bits, *rest_bits) + 1
            if special > _MAX_PRIME_BITS or data_bits + special > max_log_q(degree):
                continue
        if special < _MIN_SPECIAL_PRIME_BITS or min(rest_bits) < 20:
            continue
        primes = find_ntt_primes(degree, [result_prime_bits, *rest_bits, special])
        params = BFVParameters(degree, primes, 1 << budget.plain_bits)
        packed_part = None if extra is None or pack is None else (pack, extra)
        return params, groups, budget, batch, packed_part
    raise ParameterMismatchError(
        f"no 128-bit BFV parameters up to N=32768 fit a linear layer with {n} features; "
        "reduce input_bits or weight_bits"
    )


def _packed_weight_bits(coef: np.ndarray, low: float, high: float, step: float) -> int:
    """Fewest weight bits (>= 12) whose rounding moves a score by at most a quarter of what
    the input's rounding moves it (3-sigma of each): more bits only cost modulus, and in
    coeff-packed modulus is key bytes."""
    x_norm = max(abs(low), abs(high)) * math.sqrt(coef.shape[1])
    w_norm = float(np.sqrt((coef**2).sum(axis=1)).max()) or 1.0
    max_weight = float(np.max(np.abs(coef))) or 1.0
    for bits in range(12, _MAX_WEIGHT_BITS + 1):
        weight_step = max_weight / ((1 << (bits - 1)) - 1)
        if weight_step * x_norm <= step * w_norm / 4:
            return bits
    return _MAX_WEIGHT_BITS


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


def _packed_layout(
    pack: Packing, scale: float, budget: NoiseBudget, data_bits: int, result_prime_bits: int
) -> dict[str, Any]:
    return {
        "kind": PACKED_LAYOUT_KIND,
        "stride": pack.stride,
        "levels": pack.levels,
        "client_levels": pack.client_levels,
        "images": pack.image_elements,
        "galois_elements": pack.elements,
        "blocks": pack.blocks,
        "results": [
            {"outputs": pack.outputs(i), "coefficients": pack.coefficients(i)}
            for i in range(len(pack.blocks))
        ],
        "result_prime_bits": result_prime_bits,  # the last prime's: max over the layouts
        "output_scale": scale,
        "flood_bound": str(budget.flood_bound),
        "noise": budget.summary(data_bits),
        "encoding": (
            "request: frame HEP1 + u32 count + one record per sample: for each element e of "
            "`images`, a coeff-rowpack ciphertext of x(X^e) mod X^N + 1 (x itself first); "
            "keys: public + Galois keys for galois_elements (seed + k0 of every component "
            "bit-packed per key-level prime, uniform halves = SHAKE-128("
            "b'heinfer/galois-key/a/v1' || seed || u32le(i) || u8(j)))"
        ),
        "response": (
            "HRP1 + u32 count; per sample, per result: c1 (N coefficients) then c0 at "
            "`coefficients`, bit-packed at result_prime_bits; decrypted value / 2^levels / "
            "output_scale is the score of `outputs`"
        ),
        "privacy": (
            "one fresh public-key encryption of zero per result ciphertext; uniform masks at "
            "every non-output coefficient; uniform flooding in [-flood_bound, flood_bound) >= "
            "2^40 x leak_bound at each output (the client's errors and roundings times the "
            "weights, doubled by every server level, plus the key switches on the output's "
            "path: heinfer.plans.linear.packed.leak_bound); only c1 and the output "
            "coefficients are sent"
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
    input_choice: str | None = None,
    client_side: list[str] | None = None,
    layout: str | None = None,
) -> LinearPlan:
    """Quantize, choose 128-bit parameters for the noise budget, lay out rows, build the plan.

    `layout`: None lets the cost model (`costs.pick`) choose between rowpack alone and rowpack
    plus coeff-packed (which changes the parameters: one key serves every offered layout);
    `coeff-rowpack` or `coeff-packed` forces one.
    """
    if layout not in (None, LAYOUT_KIND, PACKED_LAYOUT_KIND):
        raise ShapeError(f"unknown linear layout {layout!r}: {LAYOUT_KIND} or {PACKED_LAYOUT_KIND}")
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

    def search(packed: bool, client_levels: int = 0) -> tuple[Any, ...] | None:
        candidates = [weight_bits] if weight_bits else list(range(_MAX_WEIGHT_BITS, 11, -1))
        if packed and not weight_bits:
            first = _packed_weight_bits(coef, low, high, step)
            candidates = list(range(first, 7, -1))
        best: tuple[int, int] | None = None
        found = None
        for bits in candidates:
            quantized = _quantize(coef, intercept, low, step, bits)
            try:
                params, groups, budget, batch, extra = _choose_parameters(
                    quantized[0], quantized[1], levels, eta_target, packed, client_levels
                )
            except ParameterMismatchError:
                continue
            # Smallest ring first (it sets request size and speed), then the most weight bits;
            # coeff-packed: the fewest bits that do not add to the input's rounding error.
            if best is None or params.poly_modulus_degree < best[0]:
                best = (params.poly_modulus_degree, bits)
                found = (quantized, params, groups, budget, batch, extra)
                if packed:
                    break
        return found

    options: dict[str, dict[str, Any]] = {}
    found: dict[str, tuple[Any, ...]] = {}
    for kind in (LAYOUT_KIND, PACKED_LAYOUT_KIND):
        if layout not in (None, kind):
            continue
        if kind == PACKED_LAYOUT_KIND and layout is None and n_rows * n_features <= 4096:
            continue  # one group at N = 4096: nothing to pack
        # coeff-packed: as many tree levels on the client as the cost model likes best
        tried: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = {}
        for client_levels in _CLIENT_LEVELS if kind == PACKED_LAYOUT_KIND else (0,):
            result = search(kind == PACKED_LAYOUT_KIND, client_levels)
            if result is None:
                continue
            params_k, groups_k, extra_k = result[1], result[2], result[5]
            if extra_k is not None and extra_k[0].client_levels != client_levels:
                continue  # capped at the tree's depth: the same as a smaller r already tried
            bits_k = params_k.coeff_modulus[0].bit_length()
            tried[client_levels] = (
                result,
                estimate(
                    params_k,
                    len(groups_k.groups),
                    bits_k,
                    None if extra_k is None else extra_k[0],
                    n_rows,
                ),
            )
        if not tried:
            continue
        best = min(tried, key=lambda r: score(tried[r][1]))
        found[kind], options[kind] = tried[best]
        if kind == PACKED_LAYOUT_KIND:
            options[kind]["client_levels_scores"] = {
                str(r): round(score(cost)) for r, (_, cost) in tried.items()
            }
    if not options:
        raise ParameterMismatchError(
            f"no 128-bit BFV parameters up to N=32768 fit a linear layer with {n_features} "
            "features; reduce input_bits or weight_bits"
        )
    picked = layout or pick(options)
    choice = {
        "picked": picked,
        "forced": layout is not None,
        "rule": (
            f"least key bytes + {REQUESTS} x (request + response bytes + server ms x "
            f"{BYTES_PER_MS} B/ms); estimates per single-sample request"
        ),
        "options": options,
    }
    (w_int, b_int, weight_scale, scale), params, groups, budget, batch, extra = found[picked]
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
            client_side=client_side or [],
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
            **(
                {}
                if extra is None
                else {
                    "packed": _packed_layout(
                        extra[0], scale, extra[1], data_bits, result_prime_bits
                    )
                }
            ),
            "choice": choice,
        },
        keys=KeysSpec(
            public=True,
            relin=False,
            galois_steps=[],
            galois_elements=[] if extra is None else extra[0].elements,
        ),
        precision=PrecisionSpec(
            max_abs_error=max_error,
            expected_abs_error=typical,
            noise_abs_error=(eta_target + 1.0) / scale,
            input_abs_error=input_error(coef, low, high, input_bits),
            input_choice=input_choice,
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
            extraction=extraction_spec(n_rows * (n_features + 1), n_rows, linear=True),
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
