"""heinfer.rlwe.ring against SEAL's evaluator: pointwise NTT products (`mulmod_arrays`),
products with a constant (`mulmod_const`), negacyclic products with the secret
(`NegacyclicProduct`) and sums of weighted polynomials (`linear_combination`) must equal what
SEAL computes on the same residues; the internal reductions are also checked against exact
integers at their edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import tenseal.sealapi as seal

from heinfer.he.backend import SecretKey
from heinfer.he.serialization import ciphertext_arrays, plaintext_arrays
from heinfer.rlwe.ring import (
    NegacyclicProduct,
    SmallProduct,
    linear_combination,
    mulmod_arrays,
    mulmod_const,
    mulmod_small,
    negacyclic_at,
    reduce_estimated,
)
from heinfer.rlwe.sampling import expand_uniform, ternary
from rlwe_helpers import bfv_context, seal_times_secret, seal_times_small

EDGE_PRIMES = (65537, 1099511922689, (1 << 55) - 55, (1 << 61) - 1)


def _random_polys(count: int, seed: int = 0) -> np.ndarray:
    context = bfv_context()
    return expand_uniform(bytes([seed]) * 32, context.params.data_primes, count, context.n)


def _seal_scalar_products(polys: np.ndarray, k: int) -> np.ndarray:
    """(L, N) -> SEAL's multiply_plain by the constant plaintext k (0 <= k < t/2)."""
    context = bfv_context()
    plain = context.plaintext_from_coefficients(np.array([k]))
    product = seal.Ciphertext()
    ciphertext = context.ciphertext_from_arrays(np.stack([polys, polys]), last_level=False)
    context.evaluator.multiply_plain(ciphertext, plain, product)
    return ciphertext_arrays(product)[0]


def test_mulmod_arrays_is_seals_pointwise_ntt_product() -> None:
    """SEAL's multiply_plain of an NTT-form ciphertext by an NTT-form plaintext multiplies the
    residues pointwise modulo each prime: ours must give the same residues."""
    context = bfv_context()
    ev = context.evaluator
    polys = _random_polys(1)[:, 0]
    ciphertext = context.to_ntt(
        context.ciphertext_from_arrays(np.stack([polys, polys]), last_level=False)
    )
    rng = np.random.default_rng(11)
    values = rng.integers(0, context.params.plain_modulus, size=context.n)
    plain = context.plaintext_from_coefficients(values)
    ev.transform_to_ntt_inplace(plain, list(context.first_parms_id))
    product = seal.Ciphertext()
    ev.multiply_plain(ciphertext, plain, product)
    x = ciphertext_arrays(ciphertext)[0]
    y = plaintext_arrays(plain, context.n)
    expected = ciphertext_arrays(product)[0]
    for j, q in enumerate(context.params.data_primes):
        np.testing.assert_array_equal(mulmod_arrays(x[j], y[j], q), expected[j])


def test_mulmod_arrays_is_exact_at_the_edges() -> None:
    rng = np.random.default_rng(7)
    for q in EDGE_PRIMES:
        x = rng.integers(0, q, size=5000, dtype=np.uint64)
        y = rng.integers(0, q, size=5000, dtype=np.uint64)
        x[:3], y[:3] = [0, q - 1, q - 1], [q - 1, q - 1, 1]
        expected = (x.astype(object) * y.astype(object) % q).astype(np.uint64)
        np.testing.assert_array_equal(mulmod_arrays(x, y, q), expected)


def test_mulmod_const_is_seals_product_with_a_constant() -> None:
    context = bfv_context()
    polys = _random_polys(1, seed=2)[:, 0]
    polys[:, :2] = np.array(context.params.data_primes, dtype=np.uint64)[:, None] - 1
    t = context.params.plain_modulus
    for k in (1, 2, 12345, (1 << 31) + 1, t // 2 - 1):
        expected = _seal_scalar_products(polys, k)
        for j, q in enumerate(context.params.data_primes):
            np.testing.assert_array_equal(mulmod_const(polys[j], k, q), expected[j], err_msg=k)


def test_mulmod_const_and_small_are_exact_for_every_factor_below_q() -> None:
    rng = np.random.default_rng(4)
    for q in EDGE_PRIMES:
        x = rng.integers(0, q, size=3000, dtype=np.uint64)
        x[:2] = [0, q - 1]
        for k in (0, 1, q - 1, int(rng.integers(1, q)), q + 5):
            expected = np.array([(int(v) * k) % q for v in x], dtype=np.uint64)
            np.testing.assert_array_equal(mulmod_const(x, k, q), expected)
        small = x & np.uint64(0xFFFFFFFF)
        k = int(rng.integers(1, q))
        expected = np.array([(int(v) * k) % q for v in small], dtype=np.uint64)
        np.testing.assert_array_equal(mulmod_small(small, k, q), expected)
    with pytest.raises(ValueError):
        mulmod_const(np.zeros(1, dtype=np.uint64), 3, 1 << 62)


def test_reduce_estimated_needs_both_corrections() -> None:
    """V in [-q, 2q) after the estimated quotient: each end of the range exercises one of the
    conditional corrections."""
    q = (1 << 55) - 55
    true = np.array([5 * q - 1, 5 * q, 7 * q + 3, 3 * q - 1, 9 * q + q - 1], dtype=object)
    estimate = np.array([5.0, 4.9999, 7.0 + 1e-9, 3.0, 10.99], dtype=np.float64)  # off by < 1
    total = np.array([int(v) % (1 << 64) for v in true], dtype=np.uint64).view(np.int64)
    got = reduce_estimated(total, estimate, q)
    assert got.tolist() == [int(v) % q for v in true]


def test_negacyclic_product_is_seals_product_with_the_secret() -> None:
    """SEAL's multiply_plain by the ternary secret (as a plaintext) is the exact negacyclic
    product mod each prime; ours with the same s must agree coefficient for coefficient."""
    context = bfv_context()
    secret = SecretKey.generate(context)
    polys = _random_polys(3, seed=5)
    polys[:, 2] = np.array(context.params.data_primes, dtype=np.uint64)[:, None] - 1
    expected = seal_times_secret(context, secret, polys)
    product = NegacyclicProduct(secret.ternary())
    for j, q in enumerate(context.params.data_primes):
        np.testing.assert_array_equal(product.multiply(polys[j], q), expected[j])


def test_negacyclic_product_refuses_a_product_that_lost_exactness() -> None:
    product = NegacyclicProduct(np.ones(4096, dtype=np.int8))
    with pytest.raises(RuntimeError, match="exactness"):
        product._exact(np.full((1, 4096), 2.0**50))


def test_linear_combination_is_seals_weighted_sum() -> None:
    """sum_i w_ri * poly_i computed by SEAL (multiply_plain by the constant |w|, negated for
    a negative w, then add) equals ours; the weights are large enough that several float64
    digits are needed. (SEAL multiplies a one-coefficient plaintext t - |w| as that value,
    not as -|w|, so negative constants go through `negate`.)"""
    context = bfv_context()
    rng = np.random.default_rng(9)
    polys = _random_polys(6, seed=7)  # (L, 6, N)
    weights = rng.integers(-(1 << 20), 1 << 20, size=(3, 6))
    weights[0, 0] = (1 << 20) - 1
    weights[1] = -(1 << 19)
    ev = context.evaluator
    cts = [
        context.ciphertext_from_arrays(np.stack([polys[:, i], polys[:, i]]), last_level=False)
        for i in range(6)
    ]
    for r in range(3):
        total = None
        for i in range(6):
            plain = context.plaintext_from_coefficients(np.array([abs(weights[r, i])]))
            term = seal.Ciphertext()
            ev.multiply_plain(cts[i], plain, term)
            if weights[r, i] < 0:
                ev.negate_inplace(term)
            if total is None:
                total = term
            else:
                ev.add_inplace(total, term)
        expected = ciphertext_arrays(total)[0]
        for j, q in enumerate(context.params.data_primes):
            got = linear_combination(weights, polys[j], q)[r]
            np.testing.assert_array_equal(got, expected[j], err_msg=f"row {r} prime {j}")


def test_linear_combination_is_exact_with_large_weights() -> None:
    rng = np.random.default_rng(4)
    q = (1 << 61) - 1
    weights = rng.integers(-(1 << 40), 1 << 40, size=(4, 300))
    weights[0] = (1 << 40) - 1  # all at the bound: the float sums reach 2**53 exactly
    polys = rng.integers(0, q, size=(300, 1500), dtype=np.uint64)
    polys[:, 0] = q - 1
    polys[:, 1] = (1 << 60) - 1  # all digits all ones
    expected = (weights.astype(object) @ polys.astype(object)) % q
    np.testing.assert_array_equal(linear_combination(weights, polys, q), expected.astype(np.uint64))
    with pytest.raises(ValueError, match="too large"):
        linear_combination(np.array([[1 << 54]]), polys[:1], q)


def _rowpack_like_weights(seed: int = 7) -> np.ndarray:
    """A weight polynomial shaped like the MNIST model's: 5 rows of 784 weights up to 2**18."""
    rng = np.random.default_rng(seed)
    poly = np.zeros(4096, dtype=np.int64)
    poly[: 5 * 784] = rng.integers(-(1 << 18), 1 << 18, 5 * 784)
    poly[0] = (1 << 18) - 1
    return poly


def test_small_product_sums_are_seals_products() -> None:
    """c * W + p * u through one inverse FFT equals SEAL's multiply_plain(c, W) +
    multiply_plain(p, u) modulo each prime, with c, p uniform (q - 1 included)."""
    context = bfv_context()
    primes = context.params.data_primes
    weights = _rowpack_like_weights()
    u = ternary((context.n,))
    c, p = _random_polys(2, seed=9).transpose(1, 0, 2)
    c[:, 1] = np.array(primes, dtype=np.uint64) - 1
    product = SmallProduct(context.n, int(np.abs(weights).sum()) + context.n, primes)
    spectra = product.digit_spectra(c) * product.spectrum(weights)
    spectra += product.digit_spectra(p) * product.spectrum(u)
    ours = product.reduce(spectra)
    expected = seal_times_small(context, weights, c) + seal_times_small(context, u, p)
    for j, q in enumerate(primes):
        np.testing.assert_array_equal(ours[j], expected[j] % np.uint64(q))
    # a small term (an error polynomial) added inside the reduction, extremes included
    error = np.random.default_rng(2).integers(-21, 22, context.n)
    error[:2] = [-(2**31) + 1, 2**31 - 1]
    with_error = product.reduce(spectra, error)
    for j, q in enumerate(primes):
        exact = (expected[j].astype(object) % q + error.astype(object)) % q
        np.testing.assert_array_equal(with_error[j], exact.astype(np.uint64))


def test_small_product_refuses_factors_beyond_its_bound() -> None:
    """Negative control: a product told a too-small l1 bound uses digits too wide for exact
    float64 FFTs, and its exactness check refuses the result instead of returning it."""
    context = bfv_context()
    weights = _rowpack_like_weights()
    product = SmallProduct(context.n, 1, context.params.data_primes)
    c = _random_polys(1, seed=3)[:, 0]
    with pytest.raises(RuntimeError, match="exactness"):
        product.reduce(product.digit_spectra(c) * product.spectrum(weights))


def test_negacyclic_at_is_seals_product_at_a_few_coefficients() -> None:
    """(c * W_g)[k] at a few coefficients of two polynomials (one with the largest allowed
    weights, +-(2**31 - 1)), against c = q - 1 at some positions, equals SEAL's full product
    there; a cyclic reading (no sign flip at the wrap-around) does not (negative control)."""
    context = bfv_context()
    primes = context.params.data_primes
    big = np.random.default_rng(5).choice([-(2**31 - 1), 2**31 - 1], context.n)
    polys = np.stack([_rowpack_like_weights(11), big])
    coefficients = np.array([0, 783, 1567, 3135, 3919, 4095, 0, 2048, 4095])
    which = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1])
    c = _random_polys(1, seed=4)[:, 0]
    c[:, 5:40] = np.array(primes, dtype=np.uint64)[:, None] - 1
    expected = np.concatenate(
        [seal_times_small(context, polys[g], c)[:, coefficients[which == g]] for g in (0, 1)],
        axis=1,
    )
    ours = negacyclic_at(polys, c, coefficients, which, primes)
    np.testing.assert_array_equal(ours, expected)
    np.testing.assert_array_equal(
        negacyclic_at(polys.astype(np.int32), c, coefficients, which, primes), expected
    )
    cyclic = [
        [
            sum(int(c[j, i]) * int(polys[g, (k - i) % context.n]) for i in range(context.n)) % q
            for k, g in zip(coefficients, which, strict=True)
        ]
        for j, q in enumerate(primes)
    ]
    assert not np.array_equal(np.array(cyclic, dtype=np.uint64), expected)


def test_negacyclic_at_refuses_what_it_cannot_sum_exactly() -> None:
    context = bfv_context()
    primes = context.params.data_primes
    c = _random_polys(1, seed=4)[:, 0]
    too_big = np.zeros((1, context.n), dtype=np.int64)
    too_big[0, 7] = 1 << 31
    with pytest.raises(ValueError, match="2\\*\\*31"):
        negacyclic_at(too_big, c, np.array([0]), 0, primes)
    with pytest.raises(ValueError, match="out of range"):
        negacyclic_at(too_big[:, :] * 0, c, np.array([context.n]), 0, primes)
    with pytest.raises(ValueError, match="out of range"):
        negacyclic_at(too_big * 0, c, np.array([0]), 1, primes)
