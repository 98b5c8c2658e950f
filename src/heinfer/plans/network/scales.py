"""The numbers every part of a compiled network agrees on: the modulus chain, the scale of
each stage, the noise of each CKKS operation, the flooding width, and the rotations.

Scales / levels (one activation; the chain is [q0 39, q1 39, qc 20, qa 56 | P 60] bits, 214 of
the 218 bits that the HE standard allows at N=8192 for 128-bit security, see he/ckks.py):
input at 2^38, first-layer weights at 2^19, product 2^57, square 2^114 (of the top level's 154
bits), rescale by qa -> 2^58; last-layer weights at about 2^29 so that product/qc = 2^67 after
the last rescale. The response sits at the lowest level that can hold 2^67 * scores plus
flooding noise: the two 39-bit primes. Both layouts use these scales, so their scores end at the
same level and scale.

Why the input sits this high: every key switch and rescale adds an error of fixed size (about
2^14 in SEAL's integer domain for the worst slot of an honestly drawn key, `noise_model`), so its
share of a value is 2^14 / scale, and it is weight-dependent (`bound.py`). Raising the product
scale from 2^47 (earlier releases, still used for two activations, whose second square would not
fit) to 2^57 moves the activation's rescale and every later rotation from 2^38 to 2^58: 2^20
less weight-dependent error in the batched layout. The single-image layout's first layer
multiplies before it rotates (`schedule.MatVec.rotate_products`), so no rotation touches the
2^38 input. The schedule a model was compiled with is stored with it (`schedule` array,
`schedule_options`); models without one use the earlier schedule (`LEGACY_SCHEDULE`).

Flooding: `flood_sigma` is the default width, kept from earlier releases: it covers only the
rounding noise of the last rescale (by Hoeffding, every coefficient below sqrt(N*61*ln2/2)
except with probability N*2^-60; l2 norm at most B = sqrt(N)*(sqrt(N*61*ln2/2) + 1/2); sigma =
2^40 * B / sqrt(2*pi)). It is *not* a statement about the whole evaluation error: that is
bounded in `bound.py`, and the manifest states the security the flood actually reaches against
it (`manifest._privacy`); the compiler sizes the flood to a target when asked
(`compile_network(statistical_security_bits=...)`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from heinfer.errors import ModelFormatError

__all__ = [
    "ACT_PRIME_BITS",
    "CLEAN_PRIME_BITS",
    "FINAL_PRIME_BITS",
    "LEGACY_SCHEDULE",
    "LOG_FINAL_SCALE",
    "LOG_INPUT_SCALE",
    "MASK_RANGE",
    "OUTPUT_PRIMES",
    "SPECIAL_PRIME_BITS",
    "flood_sigma",
    "fold_steps",
    "galois_steps",
    "noise_model",
    "plan_scales",
    "scale_plan",
    "schedule_options",
    "secret_embedding_bound",
]

LOG_INPUT_SCALE = 38
LOG_FIRST_PRODUCT = 57
# (input scale, first product scale, rotate products, relinearize groups): models stored
# without a `schedule` array, and the scales networks with two activations keep
LEGACY_SCHEDULE = (28.0, 47.0, 0.0, 0.0)
# Rotating after the products costs one rotation per first-layer diagonal instead of about two
# square roots of their number (25 vs 8 for a 5x5 convolution); beyond this many it is not done.
MAX_ROTATED_PRODUCTS = 64
LOG_MID_WEIGHT = 19
LOG_FINAL_SCALE = 68
FINAL_PRIME_BITS = [39, 39]
OUTPUT_PRIMES = len(FINAL_PRIME_BITS)
CLEAN_PRIME_BITS = 20
ACT_PRIME_BITS = [56, 60]
SPECIAL_PRIME_BITS = 60
MASK_RANGE = 256.0
FOLD_RADIX = 4
_LAST_RESCALE_BITS = 40  # what the default width is 2^x above (the last rescale only)


def schedule_options(n_act: int, first_diagonals: int) -> np.ndarray:
    """The `schedule` array a compiled model stores: (log2 input scale, log2 first product
    scale, 1 if the single-image first layer rotates its products, 1 if the batched layout
    relinearizes every group before its rescale)."""
    log_input, log_first = (
        (LOG_INPUT_SCALE, LOG_FIRST_PRODUCT) if n_act == 1 else LEGACY_SCHEDULE[:2]
    )
    rotate = 1.0 if first_diagonals <= MAX_ROTATED_PRODUCTS else 0.0
    return np.array([float(log_input), float(log_first), rotate, 1.0])


def scale_plan(
    primes: list[int],
    n_act: int,
    log_df: float,
    schedule: tuple[float, ...] | np.ndarray = LEGACY_SCHEDULE,
) -> dict[str, Any]:
    """Exact scales per stage for both layouts (SEAL divides by the exact primes), and the
    schedule's two options (`schedule_options`)."""
    log_input, log_first, rotate, relin = (float(v) for v in schedule)
    data = primes[:-1]
    top = len(data)
    d0 = 2.0**log_input
    w0 = 2.0**log_first / d0
    prod = d0 * w0
    stage_in = []  # scale of each later block's input ciphertext
    for k in range(n_act):
        q = float(data[top - 1 - k])
        scale_in = prod * prod / q
        stage_in.append(scale_in)
        if k + 1 < n_act:
            prod = scale_in * 2.0**LOG_MID_WEIGHT
    df = 2.0**log_df
    q_clean = float(data[2])
    wf = df * q_clean / stage_in[-1]
    wscales = [2.0**LOG_MID_WEIGHT] * (n_act - 1) + [wf]
    return {
        "d0": d0,
        "w0": w0,
        "stage_in": stage_in,
        "w": wscales,
        "df": df,
        "top": top,
        "rotate_products": rotate == 1.0,
        "relinearize_groups": relin == 1.0,
    }


def plan_scales(primes: list[int], n_act: int, arrays: Any) -> dict[str, Any]:
    """`scale_plan` of a compiled model's arrays (its `schedule`, or the earlier one); a
    schedule this release does not write is refused."""
    schedule = np.asarray(arrays.get("schedule", LEGACY_SCHEDULE), dtype=np.float64)
    known = {(LOG_INPUT_SCALE, LOG_FIRST_PRODUCT), LEGACY_SCHEDULE[:2]}
    if (
        schedule.shape != (4,)
        or (float(schedule[0]), float(schedule[1])) not in known
        or not set(schedule[2:].tolist()) <= {0.0, 1.0}
    ):
        raise ModelFormatError("the network's schedule array is not one this heinfer writes")
    return scale_plan(primes, n_act, float(arrays["scales"][0]), schedule)


def secret_embedding_bound(n: int, tail_bits: float) -> float:
    """A bound on max_j |s(zeta_j)|^2 over every slot j, for a secret s drawn as SEAL draws it
    (coefficients uniform in {-1, 0, 1}), failing with probability at most 2^-tail_bits.

    Why: in the slot domain a rescale's rounding is r0 + r1 s (+ r2 s^2 for an unrelinearized
    product), i.e. r1(zeta_j) * s(zeta_j) at slot j. For one client's key s(zeta_j) is a fixed
    per-slot factor, not fresh noise: averaged over keys |s(zeta)|^2 is 2n/3, but the worst
    slot of a given key sits far above that (|s(zeta)|^2 is roughly exponential across slots),
    so a per-slot bound must take the largest. Derivation: a uniform ternary variable is
    sub-Gaussian with variance proxy 2/3 ((1 + 2 cosh l)/3 <= exp(l^2/3), term by term), and
    Re s(zeta_j) = sum_i s_i cos(theta_ij) with sum_i cos^2 = n/2 (likewise Im with sin), so
    P(|Re s(zeta_j)| >= t) <= 2 exp(-3 t^2 / (2n)). A union over the n/2 slots and both parts
    (2n events) gives t^2 = (2n/3) (ln(2n) + tail_bits ln 2), and |s|^2 <= 2 t^2."""
    return 4.0 * n / 3.0 * (math.log(2.0 * n) + tail_bits * math.log(2.0))


def noise_model(params: Any, secret_sq: float | None = None) -> dict[str, float]:
    """Slot-part noise standard deviations (before dividing by the scale) of each operation:
    plaintext rounding, fresh encryption, key switching, rescaling (rs3: rescaling a product
    that is not relinearized yet, whose rounding error also meets s^2), and the server's
    public-key encryption (pk: e0 + u*e + e1*s, u and s ternary, e of variance 10.5).

    A rounding polynomial r (coefficients uniform in [-1/2, 1/2]) has slot-part variance n/24;
    the terms that meet the secret are multiplied per slot by |s(zeta)|^2 (r1 s) or |s(zeta)|^4
    (r2 s^2). `secret_sq` is the value taken for |s(zeta)|^2: None is its mean over keys, 2n/3
    (with E|s|^4 = 2 (2n/3)^2, a complex Gaussian's), what a typical slot sees (the simulator's
    and the precision claims' model); the privacy bound passes `secret_embedding_bound`, the
    worst slot of any honestly drawn key, and takes |s|^4 <= its square. Key switching (SEAL's
    special prime P): the key error times the decomposed c2 over P (2^15 q_max / P covers
    sqrt(L * n^2 * 10.24 / 24) q_max / P for L <= 4 primes) plus the mod-down rounding r0 + r1 s.
    """
    n = params.poly_modulus_degree
    q_max = max(params.data_primes)
    P = params.primes[-1]
    r = n / 24.0
    if secret_sq is None:
        s2 = 2.0 * n / 3.0
        s4 = 2.0 * s2 * s2
    else:
        s2 = float(secret_sq)
        s4 = s2 * s2
    return {
        "enc": math.sqrt(n / 24),
        "fresh": 3.2 * math.sqrt(n / 2),
        "ks": 2.0**15 * q_max / P + math.sqrt(r * (1.0 + s2)),
        "rs": math.sqrt(r * (1.0 + s2)),
        "rs3": math.sqrt(r * (1.0 + s2 + s4)),
        "pk": math.sqrt(n / 2 * 10.5 * (1 + 2 * n / 3 + s2)),
    }


def flood_sigma(n: int) -> tuple[float, float]:
    """(last-rescale noise l2 bound B, coefficient sigma 2^40 above it): the default flooding
    width (module docstring)."""
    bound = math.sqrt(n) * (math.sqrt(n * 61 * math.log(2) / 2) + 0.5)
    sigma = 2.0**_LAST_RESCALE_BITS * bound / math.sqrt(2 * math.pi)
    return bound, sigma


def fold_steps(rows: int, slots: int) -> list[tuple[int, int]]:
    """(key step, rotations) chunks of a rotate-and-sum over slots/rows blocks, radix 4."""
    steps, span = [], rows
    while span < slots:
        radix = min(FOLD_RADIX, slots // span)
        steps.append((span, radix - 1))
        span *= radix
    return steps


def galois_steps(arrays: dict[str, np.ndarray], n_act: int, S: int) -> list[int]:
    """The rotation steps the single-image schedule takes (what the Galois keys must hold)."""
    steps: set[int] = set()
    T = arrays["first_shifts"]
    B = int(arrays["first_meta"][0])
    if T.size and int((T % B).max()) > 0:
        steps.add(1)
    if T.size and int((T // B).max()) > 0:
        steps.add(B)
    for k in range(n_act):
        R, _m, Bh = (int(v) for v in arrays[f"h{k}_meta"])
        used = arrays[f"h{k}_used"]
        if used.size and int((used % Bh).max()) > 0:
            steps.add(1)
        if used.size and int((used // Bh).max()) > 0:
            steps.add(Bh)
        for step, count in fold_steps(R, S):
            if count:
                steps.add(step)
    return sorted(s % S for s in steps if s % S)
