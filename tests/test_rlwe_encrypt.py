"""heinfer.rlwe.encrypt against SEAL: our plaintext scaling is SEAL's `add_plain`, our
symmetric encryptions decrypt with SEAL's decryptor with SEAL's noise budget and SEAL's error
distribution, and an RLWE pair rewritten for a new uniform half is a public key that SEAL loads
and encrypts with as well as with its own (and one that was not corrected is not)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tenseal.sealapi as seal

from heinfer.he.backend import Context, SecretKey, find_ntt_primes
from heinfer.he.params import BFVParameters
from heinfer.he.scratch import SCRATCH
from heinfer.he.serialization import ciphertext_arrays, compose_ciphertext, plaintext_arrays
from heinfer.rlwe.encrypt import (
    bfv_decode,
    divide_and_round_q_last,
    replace_uniform_half,
    scale_plain,
    symmetric_c0,
)
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


@pytest.mark.parametrize(
    "bit_sizes",
    [
        None,  # the MNIST model's (36, 55 | 18): the last data prime is the larger
        [60, 30, 50],  # the last data prime smaller than the first
        [40, 60, 58, 50],  # three data primes, the widest SEAL allows last
    ],
)
def test_divide_and_round_q_last_is_seals_mod_switch(bit_sizes: list[int] | None) -> None:
    """SEAL's mod_switch_to_next of a first-level ciphertext, both polynomials, with values
    at the rounding edges (0, q - 1, q_last/2 +- 1) included; negative control: flooring
    (no + q_last/2) differs."""
    if bit_sizes is None:
        context = bfv_context()
    else:
        degree = 8192
        context = Context(BFVParameters(degree, find_ntt_primes(degree, bit_sizes), 1 << 20))
    primes = context.params.data_primes
    arrays = np.stack(
        [expand_uniform(bytes([k]) * SEED_BYTES, primes, 1, context.n)[:, 0] for k in (1, 2)]
    )
    half = primes[-1] // 2
    arrays[:, -1, :6] = [0, primes[-1] - 1, half - 1, half, half + 1, 1]
    arrays[:, 0, :2] = [0, primes[0] - 1]
    ciphertext = context.ciphertext_from_arrays(arrays, last_level=False)
    switched = seal.Ciphertext()
    context.evaluator.mod_switch_to_next(ciphertext, switched)
    expected = ciphertext_arrays(switched)
    for poly in range(2):
        ours = divide_and_round_q_last(arrays[poly], primes)
        np.testing.assert_array_equal(ours, expected[poly])
    floored = (arrays[0, 0].astype(object) - arrays[0, -1].astype(object)) * pow(
        primes[-1], -1, primes[0]
    ) % primes[0]
    assert floored.astype(np.uint64).tolist() != expected[0, 0].tolist()


def test_decrypting_a_few_coefficients_is_seals_decryptor() -> None:
    """`SecretKey.decrypt_coefficients` (dot products with the secret, `bfv_decode`) equals
    SEAL's decryption of the whole last-level ciphertext at those coefficients; negative
    control: decoding with floor instead of rounding is off for some of them."""
    context = bfv_context()
    secret = SecretKey.generate(context)
    t = context.params.plain_modulus
    rng = np.random.default_rng(5)
    message = rng.integers(-(t // 2), t // 2, context.n)
    coefficients = [0, 1, 783, 2047, 3919, 4095]
    encryptor = seal.Encryptor(context.seal_context, secret._secret)
    for _ in range(4):
        fresh = seal.Ciphertext()
        encryptor.encrypt_symmetric(context.plaintext_from_coefficients(message), fresh)
        last = seal.Ciphertext()
        context.evaluator.mod_switch_to(fresh, list(context.last_parms_id), last)
        c0, c1 = ciphertext_arrays(last)[:, 0]
        expected = secret.decrypt_full(last)[coefficients]  # within a few units of message
        assert np.abs(expected - message[coefficients]).max() < 64
        got = secret.decrypt_coefficients(c0[coefficients], c1, coefficients)
        assert got.tolist() == expected.tolist()
    q = context.last_prime
    v = np.array([q // 2, q // 2 + 1, q - 1], dtype=np.uint64)
    assert bfv_decode(v, q, t).tolist() != [(t * int(x) // q) % t for x in v.tolist()]


def test_numpy_request_encryption_is_loaded_and_decrypted_by_seal() -> None:
    """`SecretKey.encrypt` (numpy, SHAKE-256 seed): SEAL's loader expands the same c1, SEAL's
    decryptor gives the message back, and the error is SEAL's centered binomial (|e| <= 21);
    negative control: a flipped seed bit makes SEAL expand another c1, which decrypts to noise."""
    context = bfv_context()
    secret = SecretKey.generate(context)
    message = np.arange(784) % 256
    record = secret.encrypt(message)
    loaded = context.load_request(record).ciphertext
    assert secret.decrypt_full(loaded)[:784].tolist() == message.tolist()
    c0, c1 = context.ciphertext_arrays(loaded)
    scaled = context.scale_plain(np.pad(message, (0, context.n - 784)))
    error = seal_error(context, secret, c0[:, None], c1[:, None], scaled[:, None])
    assert np.abs(error).max() <= 21 and np.abs(error).max() > 0
    flipped = record[:-1] + bytes([record[-1] ^ 1])
    garbled = secret.decrypt_full(context.load_request(flipped).ciphertext)[:784]
    assert garbled.tolist() != message.tolist()


def test_public_key_at_the_data_primes_re_randomizes_as_seals_encrypt_zero() -> None:
    """(pk0*u + e0, pk1*u + e1) with the public key in coefficient form at the data primes
    (`EvaluationKey.coefficients`) decrypts to zero with SEAL's decryptor, with noise
    -e_pk*u + e0 + e1*s of a few hundred (not SEAL's /P, which the noise budget allows for);
    negative control: the key's NTT-form values taken as coefficients do not decrypt to zero."""
    from heinfer.rlwe.ring import SmallProduct
    from heinfer.rlwe.sampling import ternary

    context = bfv_context()
    secret = SecretKey.generate(context)
    key = context.load_evaluation_key(secret.public_key_bytes())
    primes = context.params.data_primes
    pk = key.coefficients()
    product = SmallProduct(context.n, context.n, primes)

    def zero(pk0: np.ndarray, pk1: np.ndarray) -> np.ndarray:
        u = ternary((context.n,))
        errors = centered_binomial((2, context.n)).astype(np.int64)
        c = [product.reduce(product.digit_spectra(p) * product.spectrum(u)) for p in (pk0, pk1)]
        for j, q in enumerate(primes):
            for i in range(2):
                c[i][j] = (c[i][j].astype(object) + errors[i]) % q
        return np.stack(c).astype(np.uint64)

    for _ in range(3):
        ciphertext = context.ciphertext_from_arrays(zero(pk[0], pk[1]), last_level=False)
        assert not secret.decrypt_full(ciphertext).any()
        # log2(q / 2t) = 57 bits of room; noise of ~2**10 leaves ~46 (SEAL's own: ~56)
        assert secret.noise_budget(ciphertext) >= 44
    ntt = context.ciphertext_arrays(key._public_key)[:, : len(primes)]
    wrong = context.ciphertext_from_arrays(zero(ntt[0], ntt[1]), last_level=False)
    assert secret.decrypt_full(wrong).any()
