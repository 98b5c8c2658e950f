"""heinfer.rlwe.encrypt against SEAL: our plaintext scaling is SEAL's `add_plain`, our
symmetric encryptions decrypt with SEAL's decryptor with SEAL's noise budget and SEAL's error
distribution, and an RLWE pair rewritten for a new uniform half is a public key that SEAL loads
and encrypts with as well as with its own (and one that was not corrected is not)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tenseal.sealapi as seal

from heinfer.he.backend import Context, SecretKey
from heinfer.he.scratch import SCRATCH
from heinfer.he.serialization import ciphertext_arrays, compose_ciphertext, plaintext_arrays
from heinfer.rlwe.encrypt import replace_uniform_half, scale_plain, symmetric_c0
from heinfer.rlwe.ring import NegacyclicProduct
from heinfer.rlwe.sampling import (
    CBD_VARIANCE,
    PUBLIC_A_TAG,
    SEED_BYTES,
    centered_binomial,
    expand_uniform,
)
from rlwe_helpers import bfv_context, seal_error


@pytest.mark.parametrize("plain_modulus", [1 << 34, 65537])
def test_scale_plain_is_seals_add_plain(plain_modulus: int) -> None:
    """SEAL's add_plain on a ciphertext with c0 = 0 leaves c0 = round(q*m/t): every value of m we
    try, an even and an odd t (the rounding constant differs between them)."""
    context = bfv_context(plain_modulus)
    t = plain_modulus
    rng = np.random.default_rng(3)
    m = rng.integers(0, t, size=context.n)
    m[:6] = [0, 1, t // 2, (t + 1) // 2, t - 1, t - 2]
    # the m whose q*m/t lies just below a half: SEAL's (t + 1) // 2 rounds it up (odd t)
    q = int(np.prod([int(p) for p in context.params.data_primes], dtype=object))
    m[6] = ((t - 1) // 2 * pow(q % t, -1, t)) % t
    arrays = np.zeros((2, len(context.params.data_primes), context.n), dtype=np.uint64)
    arrays[1] = 1  # (0, 1): SEAL refuses to add to a transparent (0, 0)
    ciphertext = context.ciphertext_from_arrays(arrays, last_level=False)
    context.evaluator.add_plain_inplace(ciphertext, context.plaintext_from_coefficients(m))
    expected = ciphertext_arrays(ciphertext)[0]
    got = scale_plain(m, context.params.data_primes, t)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(context.scale_plain(m - t), expected)  # taken mod t


def _our_encryptions(
    context: Context, secret: SecretKey, columns: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(c0, c1), each (L, n, N), of `SecretKey.encrypt_columns` (symmetric_c0 per block)."""
    return context.load_batch_request(secret.encrypt_columns(columns), columns.shape[0])


def test_symmetric_encryptions_decrypt_with_seal_and_keep_seals_noise_budget() -> None:
    context = bfv_context()
    secret = SecretKey.generate(context)
    columns = np.random.default_rng(1).integers(0, 256, size=(8, context.n))
    c0, c1 = _our_encryptions(context, secret, columns)
    decryptor = seal.Decryptor(context.seal_context, secret._secret)
    encryptor = seal.Encryptor(context.seal_context, secret._secret)
    ours, theirs = [], []
    for i in range(columns.shape[0]):
        arrays = np.stack([c0[:, i], c1[:, i]])
        ciphertext = context.ciphertext_from_arrays(arrays, last_level=False)
        np.testing.assert_array_equal(secret.decrypt_full(ciphertext), columns[i])
        ours.append(decryptor.invariant_noise_budget(ciphertext))
        seals = seal.Ciphertext()
        encryptor.encrypt_symmetric(context.plaintext_from_coefficients(columns[i]), seals)
        theirs.append(decryptor.invariant_noise_budget(seals))
    assert min(ours) >= min(theirs) - 1 and max(ours) <= max(theirs) + 1


def test_symmetric_encryption_error_is_seals_centered_binomial() -> None:
    """round(q*m/t) - (c0 + c1*s), with c1*s computed by SEAL, is the error we drew: SEAL's
    distribution (bounded by 21, variance 21/2), not zero and not anything wider."""
    context = bfv_context()
    secret = SecretKey.generate(context)
    columns = np.random.default_rng(2).integers(0, 256, size=(30, 100))
    c0, c1 = _our_encryptions(context, secret, columns)
    scaled = np.zeros_like(c0)
    scaled[:, :, :100] = context.scale_plain(columns)
    error = seal_error(context, secret, c0, c1, scaled).astype(np.int64).reshape(-1)
    assert np.abs(error).max() <= 21
    assert abs(error.mean()) < 0.05
    assert error.var() == pytest.approx(CBD_VARIANCE, abs=0.3)


def test_symmetric_c0_is_seals_encryption_equation() -> None:
    """For chosen a, e and m, c0 + c1*s (SEAL's product) is exactly round(q*m/t) - e."""
    context = bfv_context()
    secret = SecretKey.generate(context)
    primes = context.params.data_primes
    a = expand_uniform(os.urandom(SEED_BYTES), primes, 2, context.n)
    error = centered_binomial((2, context.n))
    error[0, :3] = [21, -21, 0]
    m = np.random.default_rng(5).integers(0, context.params.plain_modulus, size=(2, 50))
    scaled_m = context.scale_plain(m)
    product = NegacyclicProduct(secret.ternary())
    c0 = np.stack([symmetric_c0(product.multiply(a[j], q), scaled_m[j], error, q)
                   for j, q in enumerate(primes)])
    assert all((c0[j] < np.uint64(q)).all() for j, q in enumerate(primes))
    scaled = np.zeros_like(c0)
    scaled[:, :, :50] = scaled_m
    np.testing.assert_array_equal(seal_error(context, secret, c0, a, scaled), error)


# -- replace_uniform_half: SEAL's public key under a new uniform half --------------------------


def _public_key_budgets(context: Context, secret: SecretKey, arrays: np.ndarray) -> list[int]:
    """Noise budgets of encryptions of zero made by SEAL under the public key `arrays`."""
    serialized = compose_ciphertext(context._pk_prefix, arrays)
    key = SCRATCH.load(seal.PublicKey(), context.seal_context, serialized)
    encryptor = seal.Encryptor(context.seal_context, key)
    decryptor = seal.Decryptor(context.seal_context, secret._secret)
    budgets = []
    for _ in range(6):
        zero = seal.Ciphertext()
        encryptor.encrypt_zero(zero)
        budgets.append(decryptor.invariant_noise_budget(zero))
    return budgets


def test_replace_uniform_half_gives_a_public_key_seal_uses_as_its_own() -> None:
    context = bfv_context()
    secret = SecretKey.generate(context)
    public = seal.PublicKey()
    seal.KeyGenerator(context.seal_context, secret._secret).create_public_key(public)
    k0, a = ciphertext_arrays(public)
    s = plaintext_arrays(secret._secret, context.n)
    primes = context.params.coeff_modulus
    a_new = expand_uniform(os.urandom(SEED_BYTES), primes, 1, context.n, tag=PUBLIC_A_TAG)[:, 0]
    corrected = replace_uniform_half(k0, a, a_new, s, primes)
    theirs = _public_key_budgets(context, secret, np.stack([k0, a]))
    ours = _public_key_budgets(context, secret, np.stack([corrected, a_new]))
    assert min(theirs) > 30
    assert min(ours) >= min(theirs) - 1 and max(ours) <= max(theirs) + 1
    # negative control: the new half without the correction is no key at all
    assert max(_public_key_budgets(context, secret, np.stack([k0, a_new]))) == 0
