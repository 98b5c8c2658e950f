"""The RLWE equations we evaluate ourselves: BFV plaintext scaling, symmetric encryption, and
rewriting an RLWE pair for a new uniform half (seeded public and key-switching keys).

Each is SEAL's own equation, so SEAL decrypts (or loads and uses) what these produce; the
tests in `tests/test_rlwe_encrypt.py` check that with SEAL's decryptor, evaluator and loaders.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from heinfer.rlwe import _kernels
from heinfer.rlwe.ring import mulmod_arrays

__all__ = [
    "bfv_decode",
    "divide_and_round_q_last",
    "replace_uniform_half",
    "scale_plain",
    "symmetric_c0",
]


def scale_plain(values: np.ndarray, primes: Sequence[int], t: int) -> np.ndarray:
    """SEAL's BFV plaintext scaling round(q*m/t) (ties up) modulo each prime, q = prod(primes).

    Identity: round(q*m/t) = floor(q/t)*m + floor(((q mod t)*m + floor((t+1)/2)) / t), the
    form SEAL's `add_plain` and encryptor use. values are integers taken mod t; returns
    (L, *values.shape) uint64. The rounding error (|.| <= 1/2 per coefficient) is what the
    linear plan's noise budget calls `rounding`.
    """
    q = math.prod(primes)
    floor_q_t, q_mod_t, half = q // t, q % t, (t + 1) // 2
    flat = np.mod(np.asarray(values, dtype=np.int64).reshape(-1), t)
    if flat.size and int(flat.max()) < 1 << 17:  # client inputs: a small lookup table
        unique, inverse = np.arange(int(flat.max()) + 1), flat
    else:
        unique, inverse = np.unique(flat, return_inverse=True)
    scaled = [floor_q_t * m + (q_mod_t * m + half) // t for m in unique.tolist()]
    table = np.array([[v % p for v in scaled] for p in primes], dtype=np.uint64)
    return table[:, inverse].reshape((len(primes), *np.shape(values)))


def symmetric_c0(
    a_times_s: np.ndarray, scaled: np.ndarray, error: np.ndarray, q: int
) -> np.ndarray:
    """c0 = -(a*s) + round(q*m/t) - e mod q, SEAL's symmetric BFV encryption (c1 = a).

    a_times_s: (rows, N) uint64 < q; scaled: (rows, width <= N) uint64 < q, the scaled message
    in the first `width` coefficients (zero beyond); error: (rows, N) small signed integers
    (|e| < 2**20). Returns (rows, N) uint64 < q.
    """
    qq = np.int64(q)
    value = -a_times_s.view(np.int64)  # in (-q, 0]
    value[:, : scaled.shape[1]] += scaled.view(np.int64)
    value -= error.astype(np.int64)  # now in (-q - |e|, q + |e|)
    value += (value >> np.int64(63)) & qq
    value += (value >> np.int64(63)) & qq
    value -= qq
    value += (value >> np.int64(63)) & qq
    return value.view(np.uint64)


def replace_uniform_half(
    k0: np.ndarray, a: np.ndarray, a_new: np.ndarray, secret: np.ndarray, primes: Sequence[int]
) -> np.ndarray:
    """k0 + (a - a_new)*s per prime, all (L, N) in NTT form (pointwise products).

    Identity: for an RLWE pair (k0, a) = (-(a*s + e) + m, a), the result k0' satisfies
    k0' = -(a_new*s + e) + m, so (k0', a_new) carries the same error e and payload m under a
    new uniform half; with a_new expanded from a seed, only k0' and the seed need to travel.
    """
    out = np.empty_like(k0)
    for j, q in enumerate(primes):
        qq = np.uint64(q)
        difference = (a[j] + (qq - a_new[j])) % qq
        out[j] = (k0[j] + mulmod_arrays(difference, secret[j], q)) % qq
    return out


def divide_and_round_q_last(values: np.ndarray, primes: Sequence[int]) -> np.ndarray:
    """SEAL's BFV modulus switch: round(x / q_last) modulo the other primes, exactly as SEAL's
    `divide_and_round_q_last_inplace` computes it (what `mod_switch_to_next` does).

    values: (L, ...) uint64, residues of x modulo primes[0..L-1] (each < 2**62); returns
    (L-1, ...). Identity: with h = floor(q_L / 2) and r = ((x + h) mod q_L) - h, x - r is
    divisible by q_L and (x - r) / q_L = round(x / q_L); per remaining prime q_i that is
    (x_i - (r mod q_i)) * q_L^-1 mod q_i (compiled, one pass per prime: `_kernels`).
    """
    moduli = tuple(int(q) for q in primes)
    *rest, last = moduli
    values = np.asarray(values, dtype=np.uint64)
    if values.shape[0] != len(moduli):
        raise ValueError(f"values must have one row per prime ({len(moduli)})")
    flat = np.ascontiguousarray(values.reshape(len(moduli), -1))
    out = np.empty((len(rest), flat.shape[1]), dtype=np.uint64)
    inverses = tuple(pow(last, -1, q) for q in rest)
    _kernels.divide_and_round_q_last(flat, moduli, inverses, flat.shape[1], out)
    return out.reshape(len(rest), *values.shape[1:])


def bfv_decode(values: np.ndarray, q: int, t: int) -> np.ndarray:
    """BFV decoding at one prime: round(t * v / q) mod t (ties up), centered in [-t/2, t/2)
    as `SecretKey` centres values, for v = c0 + c1*s mod q (uint64 < q); int64. SEAL's
    decryptor gives the same for every ciphertext whose noise leaves a decryption margin."""
    out = []
    for v in np.asarray(values, dtype=np.uint64).tolist():
        m = ((t * v + q // 2) // q) % t
        out.append(m - t if m >= (t + 1) // 2 else m)
    return np.array(out, dtype=np.int64)
