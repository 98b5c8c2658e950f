"""Exact arithmetic in Z_q and Z_q[X]/(X^N + 1) on uint64 arrays, for primes q < 2**62.

numpy has no 128-bit products, so the numpy functions here split operands into digits small
enough that each partial product (or each float64 partial sum) is exact, and recombine the
digits modulo q. The per-request loops (digit splits around the FFTs, their recombination,
exact dot products) run in `_kernels`, compiled, with 128-bit integers. The identities each
function implements are checked against SEAL's evaluator in `tests/test_rlwe_ring.py`.
"""

from __future__ import annotations

import math

import numpy as np

from heinfer.rlwe import _kernels

__all__ = [
    "NegacyclicProduct",
    "SmallProduct",
    "linear_combination",
    "mulmod_arrays",
    "mulmod_const",
    "mulmod_small",
    "negacyclic_at",
    "reduce_estimated",
]

# Digit width for float64 FFT products with a ternary secret: a 36-bit digit's product
# (|value| < N * 2**36) came out within 0.0044 of an integer in 13M measured coefficients at
# N=4096 (28 bits: 2e-5); every product is checked against 1/8 and refused beyond it.
_FFT_DIGIT_BITS = 36
# `SmallProduct` keeps every digit product below 2**48 in absolute value, the size at which the
# ternary products above were measured within 0.0044 of an integer.
_EXACT_PRODUCT_BITS = 48
_FFT_ROWS = 64  # polynomials per FFT block (cache-sized)
_MATMUL_COLUMNS = 1024  # columns per BLAS block in `linear_combination`
_EXACT_FLOAT = 1 << 53


def reduce_estimated(total: np.ndarray, estimate: np.ndarray, q: int) -> np.ndarray:
    """V mod q, as uint64, from V mod 2**64 (int64, wrapping) and a float64 estimate of V/q
    that is off by less than 1.

    Identity: with k = floor(estimate), V - k*q lies in [-q, 2q), so two conditional
    corrections by q finish the reduction; the wrap-around of int64 does not matter because
    the true remainder fits.
    """
    quotient = np.floor(estimate).astype(np.int64)
    r = total - quotient * np.int64(q)
    qq = np.int64(q)
    r += (r >> np.int64(63)) & qq
    r -= qq
    r += (r >> np.int64(63)) & qq
    return r.view(np.uint64)


def mulmod_small(x: np.ndarray, k: int, q: int) -> np.ndarray:
    """x * k mod q for uint64 x < 2**32 and k < q < 2**62 (Barrett-style, float quotient).

    The float64 estimate x * (k/q) is within 2**-19 of the true quotient for these sizes, so
    `reduce_estimated` finishes exactly from the wrapping 64-bit product.
    """
    x = np.asarray(x, dtype=np.uint64)
    estimate = x.view(np.int64).astype(np.float64) * (k / q)
    total = x.view(np.int64) * np.int64(k)
    return reduce_estimated(total, estimate, q)


def mulmod_const(x: np.ndarray, k: int, q: int) -> np.ndarray:
    """x * k mod q elementwise, exactly, for uint64 x < q < 2**62 and a Python int k.

    Identity: x*k = low*k + high*(k * 2**31) with x = low + high * 2**31, low < 2**31 and
    high < 2**31, each half through `mulmod_small`.
    """
    if q >= 1 << 62:
        raise ValueError("mulmod_const needs q < 2**62")
    x = np.asarray(x, dtype=np.uint64)
    low = mulmod_small(x & np.uint64(0x7FFFFFFF), k % q, q)
    high = mulmod_small(x >> np.uint64(31), (k << 31) % q, q)
    total = low + high  # < 2q < 2**63
    return np.where(total >= np.uint64(q), total - np.uint64(q), total)


def mulmod_arrays(x: np.ndarray, y: np.ndarray, q: int) -> np.ndarray:
    """x * y mod q elementwise, exactly, for uint64 arrays x, y < q < 2**62.

    Identity: x*y = sum_k (x_low + x_high * 2**32) * y_k * 2**(16k) with y's 16-bit digits
    y_k, so every partial product fits 64 bits; this is the pointwise product SEAL computes on
    NTT-form polynomials.
    """
    x = np.asarray(x, dtype=np.uint64)
    y = np.asarray(y, dtype=np.uint64)
    qq = np.uint64(q)
    low, high = x & np.uint64(0xFFFFFFFF), x >> np.uint64(32)
    total = np.zeros(np.broadcast(x, y).shape, dtype=np.uint64)
    for k in range(4):
        digit = (y >> np.uint64(16 * k)) & np.uint64(0xFFFF)
        term = (low * digit) % qq + mulmod_const((high * digit) % qq, 1 << 32, q)
        total += mulmod_const(term % qq, 1 << (16 * k), q)
        total %= qq
    return total


def linear_combination(weights: np.ndarray, polys: np.ndarray, q: int) -> np.ndarray:
    """sum_i weights[r, i] * polys[i] mod q for every row r: (rows, n) int64 @ (n, cols)
    uint64 < q, exactly.

    Float64 BLAS is exact on integers below 2**53: polys are split into unsigned digits of D
    bits with max_row(sum |w|) * (2**D - 1) <= 2**53, so every partial sum of every product is
    an exactly representable integer whatever order BLAS adds in; the digit products are then
    recombined modulo q with exact integer arithmetic.
    """
    weights = np.asarray(weights, dtype=np.int64)
    l1 = int(np.abs(weights).sum(axis=1).max()) if weights.size else 0
    bits = q.bit_length()
    digit = bits if l1 == 0 else min(bits, (_EXACT_FLOAT // l1 + 1).bit_length() - 1)
    if digit < 1:
        raise ValueError("weights too large for exact float64 accumulation")
    digits = -(-bits // digit)
    mask = np.uint64((1 << digit) - 1)
    factors = [pow(2, k * digit, q) for k in range(digits)]
    wf = weights.astype(np.float64)
    rows, cols = weights.shape[0], polys.shape[1]
    out = np.empty((rows, cols), dtype=np.uint64)
    qq = np.uint64(q)
    for start in range(0, cols, _MATMUL_COLUMNS):
        block = polys[:, start : start + _MATMUL_COLUMNS]
        acc = np.zeros((rows, block.shape[1]), dtype=np.uint64)
        for k in range(digits):
            part = block >> np.uint64(k * digit) if k else block
            if k < digits - 1:
                part = part & mask
            exact = wf @ part.view(np.int64).astype(np.float64)
            residue = np.remainder(exact.astype(np.int64), q).astype(np.uint64)
            if factors[k] != 1:
                residue = mulmod_const(residue, factors[k], q)
            acc += residue
            acc = np.where(acc >= qq, acc - qq, acc)
        out[:, start : start + block.shape[1]] = acc
    return out


class NegacyclicProduct:
    """Exact products a * s in Z_q[X]/(X^N + 1) for one fixed ternary s, with float64 FFTs.

    Identity: the negacyclic product of real length-N polynomials is a cyclic product of
    length N/2 after folding (x_k + i x_{k+N/2}) and twisting by exp(i*pi*k/N). a is split into
    digits of at most 36 bits so each digit product comes out of the FFT within a small
    fraction of an integer (checked on every call: more than 1/8 raises) and rounds exactly.
    The digits are recombined modulo q with one float-estimated quotient (`reduce_estimated`).
    """

    def __init__(self, secret: np.ndarray) -> None:
        s = np.asarray(secret, dtype=np.float64)
        self.degree = s.size
        half = self.degree // 2
        self._twist = np.exp(1j * np.pi * np.arange(half) / self.degree)
        self._untwist = self._twist.conj()
        self._secret_hat = np.fft.fft((s[:half] + 1j * s[half:]) * self._twist)

    def _exact(self, digits: np.ndarray) -> np.ndarray:
        """(rows, N) float64 integer digits -> their products with s, as exact float64 integers."""
        half = self.degree // 2
        folded = np.empty((digits.shape[0], half), dtype=np.complex128)
        folded.real = digits[:, :half]
        folded.imag = digits[:, half:]
        folded *= self._twist
        spectrum = np.fft.fft(folded, axis=1)
        spectrum *= self._secret_hat
        product = np.fft.ifft(spectrum, axis=1)
        product *= self._untwist
        values = np.empty(digits.shape, dtype=np.float64)
        values[:, :half] = product.real
        values[:, half:] = product.imag
        rounded = np.rint(values)
        values -= rounded
        np.abs(values, out=values)
        if values.max(initial=0.0) > 0.125:
            raise RuntimeError("FFT product lost exactness; refusing to encrypt")
        return rounded

    def multiply(self, a: np.ndarray, q: int) -> np.ndarray:
        """(count, N) uint64 a < q < 2**62 -> (a * s) mod q, uint64."""
        bits = q.bit_length()
        digits = -(-bits // _FFT_DIGIT_BITS)
        width = -(-bits // digits)
        mask = np.uint64((1 << width) - 1)
        scales = [float(1 << (k * width)) / q for k in range(digits)]
        out = np.empty(a.shape, dtype=np.uint64)
        for start in range(0, a.shape[0], _FFT_ROWS):
            block = a[start : start + _FFT_ROWS]
            estimate = np.zeros(block.shape, dtype=np.float64)
            total = np.zeros(block.shape, dtype=np.int64)
            for k in range(digits):
                part = (block >> np.uint64(k * width)) & mask
                exact = self._exact(part.view(np.int64).astype(np.float64))
                estimate += exact * scales[k]  # V/q to within 2**-38 (|V/q| <= N)
                total += exact.astype(np.int64) << np.int64(k * width)  # V mod 2**64
            out[start : start + block.shape[0]] = reduce_estimated(total, estimate, q)
        return out


def negacyclic_at(
    small: np.ndarray,
    values: np.ndarray,
    coefficients: np.ndarray,
    polys: np.ndarray | int,
    primes: tuple[int, ...],
) -> np.ndarray:
    """(values_j * small[polys[m]])[coefficients[m]] mod q_j in Z_q[X]/(X^N + 1): a product at a
    few coefficients only, one exact dot product each, instead of all N; (L, M) uint64.

    small: (G, N) integers with |value| < 2**31 (int8/int16/int32 need no check); values: (L, N)
    uint64, row j < q_j < 2**62; coefficients: (M,) indices; polys: (M,) indices or one.
    Identity: (a * p)[k] = sum_{i <= k} a_i p_{k-i} - sum_{i > k} a_i p_{N+k-i}, summed in
    128-bit integers (compiled).
    """
    small = np.asarray(small)
    if small.dtype != np.int32:
        if small.dtype.itemsize >= 4 and small.size and np.abs(small).max() >= 1 << 31:
            raise ValueError("negacyclic_at needs |small| < 2**31")
        small = small.astype(np.int32)
    small = np.ascontiguousarray(small)
    values = np.ascontiguousarray(values, dtype=np.uint64)
    degree = small.shape[-1]
    if values.shape != (len(primes), degree):
        raise ValueError(f"values must be (L, N) = ({len(primes)}, {degree})")
    at = np.ascontiguousarray(coefficients, dtype=np.int64)
    which = np.ascontiguousarray(np.broadcast_to(polys, at.shape), dtype=np.int64)
    out = np.empty((len(primes), at.size), dtype=np.uint64)
    _kernels.negacyclic_at(small, values, at, which, tuple(primes), degree, out)
    return out


class SmallProduct:
    """Exact negacyclic products c * w mod q_j, for c uint64 < q_j (one row per prime) and
    small integer polynomials w, with float64 FFTs: fixed factors are transformed once, and
    a sum of products (c * w + p * u) costs one inverse FFT per digit of c.

    Identity: as in `NegacyclicProduct` (fold, twist, length-N/2 cyclic FFT). Each c_j is
    split into digits of `widths[j]` bits, chosen so that every digit product's coefficients
    stay below 2**48 in absolute value when the small factors summed into one product have
    l1 norms (sums of |coefficients|) adding up to at most `l1_bound`: a coefficient of
    d * w is at most max|d| * ||w||_1. Every inverse is checked within 1/8 of an integer
    (refused otherwise) and the digits are recombined modulo q_j (`reduce_estimated`).
    """

    def __init__(self, degree: int, l1_bound: int, primes: list[int] | tuple[int, ...]) -> None:
        self.degree = degree
        self.primes = tuple(int(q) for q in primes)
        half = degree // 2
        self._twist = np.exp(1j * np.pi * np.arange(half) / degree)
        self._untwist = self._twist.conj()
        limit = _EXACT_PRODUCT_BITS - (max(1, l1_bound) - 1).bit_length()
        if limit < 1:
            raise ValueError("small factors too large for exact float64 FFT products")
        self.digits = tuple(-(-q.bit_length() // limit) for q in self.primes)
        self.widths = tuple(
            -(-q.bit_length() // d) for q, d in zip(self.primes, self.digits, strict=True)
        )
        self._starts = np.cumsum([0, *self.digits]).tolist()

    def spectrum(self, small: np.ndarray) -> np.ndarray:
        """(..., N) integer polynomials -> (..., N/2) spectra."""
        values = np.asarray(small)
        half = self.degree // 2
        folded = np.empty((*values.shape[:-1], half), dtype=np.complex128)
        folded.real = values[..., :half]  # converted in place: no float or complex temporaries
        folded.imag = values[..., half:]
        folded *= self._twist
        return np.fft.fft(folded, axis=-1)

    def digit_spectra(self, values: np.ndarray) -> np.ndarray:
        """(L, N) uint64, row j < q_j -> (sum_j D_j, N/2) spectra of every row's digits.

        Each digit is written straight into the folded, twisted complex rows (real:
        coefficients below N/2, imaginary: the rest) in one compiled pass."""
        values = np.ascontiguousarray(values, dtype=np.uint64)
        if values.shape != (len(self.primes), self.degree):
            raise ValueError(f"values must be (L, N) = ({len(self.primes)}, {self.degree})")
        folded = np.empty((self._starts[-1], self.degree // 2), dtype=np.complex128)
        _kernels.fold_digits(values, self.widths, self.digits, self._twist, folded)
        return np.fft.fft(folded, axis=-1)

    def reduce(self, spectra: np.ndarray, small: np.ndarray | None = None) -> np.ndarray:
        """(sum_j D_j, ..., N/2) spectra of digit products -> (L, ..., N) uint64 mod q_j, plus
        `small` ((..., N) integers, |small| < 2**31) at every prime when given.

        Adding `small` to the exact digit total before the one modular reduction gives the same
        residues as adding it after, without a pass per prime (its |small|/q shift of the
        quotient estimate stays far inside `reduce_estimated`'s margin of 1)."""
        product = np.fft.ifft(spectra, axis=-1)
        product *= self._untwist
        # (real, imag) pairs: pair k holds coefficients k and k + N/2
        values = product.view(np.float64)
        rounded = np.rint(values)
        values -= rounded
        np.abs(values, out=values)
        if values.max(initial=0.0) > 0.125:
            raise RuntimeError("FFT product lost exactness; refusing the result")
        shape = rounded.shape[1:-1]
        if small is not None:
            small = np.ascontiguousarray(
                np.broadcast_to(small, (*shape, self.degree)), dtype=np.int64
            )
        out = np.empty((len(self.primes), *shape, self.degree), dtype=np.uint64)
        _kernels.recombine_digits(
            rounded, self.widths, self.digits, self.primes, math.prod(shape), small, out
        )
        return out
