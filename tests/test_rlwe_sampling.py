"""heinfer.rlwe.sampling: each distribution against its documented construction, against
SEAL's own samples of the same distribution, and with statistical tests. The p-value bounds
(1e-6) keep false failures rare; a one-bit or off-by-one change of a sampler gives p ~ 0."""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import numpy as np
import pytest
from scipy.stats import chi2_contingency, chisquare, kstest

from heinfer.errors import MalformedPayloadError
from heinfer.he.backend import SecretKey
from heinfer.rlwe.sampling import (
    BATCH_A_TAG,
    CBD_VARIANCE,
    NOISE_TAG,
    PUBLIC_A_TAG,
    SEED_BYTES,
    centered_binomial,
    expand_uniform,
    os_random_normal,
    os_random_uniform,
    seal_shake256_stream,
    seal_uniform,
    ternary,
    uniform_flood,
    uniform_mod,
)
from rlwe_helpers import bfv_context, centered, seal_error, seal_symmetric

# A 41-bit prime far below 2**41: a third of the masked words are rejected.
WIDE_PRIME = 3 * (1 << 40) + 1


def _reference_row(tag: bytes, seed: bytes, index: int, prime_index: int, q: int, n: int) -> list:
    """The documented construction, word by word in Python integers."""
    key = tag + seed + struct.pack("<IB", index, prime_index)
    stream = hashlib.shake_128(key).digest(8 * 8 * n)
    mask = (1 << q.bit_length()) - 1
    words = (int.from_bytes(stream[i : i + 8], "little") & mask for i in range(0, len(stream), 8))
    return [w for w in words if w < q][:n]


def _uniform_pvalue(values: np.ndarray, q: int, bins: int = 64) -> float:
    scaled = (values.reshape(-1).astype(object) * bins // q).astype(int)
    counts = np.bincount(scaled, minlength=bins)
    return float(chisquare(counts).pvalue)


def _same_distribution_pvalue(
    ours: np.ndarray, theirs: np.ndarray, q: int, bins: int = 64
) -> float:
    """Two-sample chi-square: do our samples and SEAL's fall into q/bins-wide bins alike?"""
    table = [
        np.bincount((v.reshape(-1).astype(object) * bins // q).astype(int), minlength=bins)
        for v in (ours, theirs)
    ]
    return float(chi2_contingency(np.array(table)).pvalue)


# -- expand_uniform ---------------------------------------------------------------------------


def test_expand_uniform_is_its_documented_construction() -> None:
    """Catches any change of tag, seed, index packing, mask or rejection rule."""
    primes = bfv_context().params.data_primes
    seed = bytes(range(SEED_BYTES))
    a = expand_uniform(seed, primes, 3, 1024, first=5)
    for j, q in enumerate(primes):
        for i in range(3):
            assert a[j, i].tolist() == _reference_row(BATCH_A_TAG, seed, 5 + i, j, q, 1024)
    wide = expand_uniform(seed, (WIDE_PRIME,), 2, 1024, tag=PUBLIC_A_TAG)
    assert wide[0, 1].tolist() == _reference_row(PUBLIC_A_TAG, seed, 1, 0, WIDE_PRIME, 1024)
    with pytest.raises(MalformedPayloadError):
        expand_uniform(seed[:-1], primes, 1, 1024)


def test_expand_uniform_is_distributed_as_seals_uniform_half() -> None:
    """SEAL's c1 = a of its own encryptions and ours are both uniform mod each prime."""
    context = bfv_context()
    secret = SecretKey.generate(context)
    _c0, theirs = seal_symmetric(context, secret, 16)
    ours = expand_uniform(bytes(SEED_BYTES), context.params.data_primes, 16, context.n)
    for j, q in enumerate(context.params.data_primes):
        assert (ours[j] < np.uint64(q)).all()
        assert _uniform_pvalue(ours[j], q) > 1e-6
        assert _same_distribution_pvalue(ours[j], theirs[j], q) > 1e-6
    wide = expand_uniform(bytes(SEED_BYTES), (WIDE_PRIME,), 16, context.n)
    assert (wide < np.uint64(WIDE_PRIME)).all() and _uniform_pvalue(wide, WIDE_PRIME) > 1e-6


# -- centered_binomial -------------------------------------------------------------------------


def _reference_cbd(key: bytes, count: int) -> list[int]:
    stream = hashlib.shake_128(NOISE_TAG + key).digest(16 * -(-count // 3))
    out = []
    for at in range(0, len(stream), 16):
        w0 = int.from_bytes(stream[at : at + 8], "little")
        w1 = int.from_bytes(stream[at + 8 : at + 16], "little")

        def hw(word: int, shift: int) -> int:
            return bin((word >> shift) & ((1 << 21) - 1)).count("1")

        out += [hw(w0, 0) - hw(w0, 21), hw(w1, 0) - hw(w1, 21), hw(w0, 42) - hw(w1, 42)]
    return out[:count]


def test_centered_binomial_is_its_documented_construction() -> None:
    key = bytes(range(1, SEED_BYTES + 1))
    assert centered_binomial((7, 100), key=key).reshape(-1).tolist() == _reference_cbd(key, 700)


def test_centered_binomial_is_distributed_as_seals_error() -> None:
    """The error of SEAL's own symmetric encryptions (measured with SEAL's c1*s) and our
    samples: the same values, the same histogram, variance 21/2, no correlation between
    neighbours (three values share two words: an overlap of bits would correlate them)."""
    context = bfv_context()
    secret = SecretKey.generate(context)
    c0, c1 = seal_symmetric(context, secret, 24)
    theirs = seal_error(context, secret, c0, c1, np.zeros_like(c0)).reshape(-1)
    ours = centered_binomial((600, 4096)).astype(np.int64).reshape(-1)
    assert np.abs(theirs).max() <= 21 and np.abs(ours).max() <= 21
    assert theirs.var() == pytest.approx(CBD_VARIANCE, abs=0.25)
    assert ours.var() == pytest.approx(CBD_VARIANCE, abs=0.05)
    assert abs(ours.mean()) < 0.02
    clip = 11  # pool the tails so every cell is well populated
    table = [
        np.bincount(np.clip(v, -clip, clip) + clip, minlength=2 * clip + 1) for v in (ours, theirs)
    ]
    assert chi2_contingency(np.array(table)).pvalue > 1e-6
    for lag in (1, 2):
        assert abs(np.corrcoef(ours[:-lag], ours[lag:])[0, 1]) < 0.008


# -- uniform_mod -------------------------------------------------------------------------------


def test_uniform_mod_is_distributed_as_seals_uniform_half() -> None:
    context = bfv_context()
    secret = SecretKey.generate(context)
    _c0, theirs = seal_symmetric(context, secret, 16)
    primes = (*context.params.data_primes, WIDE_PRIME)
    ours = np.stack([uniform_mod(primes, context.n) for _ in range(16)], axis=1)
    for j, q in enumerate(primes):
        assert (ours[j] < np.uint64(q)).all()
        assert _uniform_pvalue(ours[j], q) > 1e-6
        if j < len(context.params.data_primes):
            assert _same_distribution_pvalue(ours[j], theirs[j], q) > 1e-6


# -- uniform_flood -----------------------------------------------------------------------------


def test_uniform_flood_is_one_integer_per_coefficient_and_seal_decrypts_it() -> None:
    """The residues modulo both data primes are one integer v in [-2**k, 2**k), uniform there;
    SEAL decrypts the ciphertext (v, 0) to round(t*v/q), so SEAL reads the same integer."""
    context = bfv_context()
    secret = SecretKey.generate(context)
    q1, q2 = context.params.data_primes
    q, t, k = q1 * q2, context.params.plain_modulus, 66
    flood = uniform_flood(context.params.data_primes, (context.n,), k)
    inverse = pow(q1, -1, q2)
    values = []
    for r1, r2 in zip(flood[0].tolist(), flood[1].tolist(), strict=True):
        v = r1 + q1 * (((r2 - r1) * inverse) % q2)
        values.append(v - q if v > q // 2 else v)
    assert min(values) >= -(2**k) and max(values) < 2**k
    assert min(values) < -(2 ** (k - 1)) and max(values) > 2 ** (k - 1)  # both halves reached
    bins = np.bincount([(v + 2**k) * 16 // 2 ** (k + 1) for v in values], minlength=16)
    assert chisquare(bins).pvalue > 1e-6
    arrays = np.zeros((2, 2, context.n), dtype=np.uint64)
    arrays[0] = flood
    decrypted = secret.decrypt_full(context.ciphertext_from_arrays(arrays, last_level=False))
    expected = np.array([(2 * t * v + q) // (2 * q) for v in values])  # round(t*v/q)
    assert np.abs(decrypted - expected).max() <= 1  # a tie may round either way
    assert (decrypted == expected).mean() > 0.999


# -- OS floats ---------------------------------------------------------------------------------


def test_os_random_uniform_is_uniform_on_the_53_bit_grid() -> None:
    u = os_random_uniform(200_000)
    assert u.min() >= 0.0 and u.max() < 1.0
    grid = u * 2.0**53
    assert (grid == np.floor(grid)).all()
    assert (np.floor(u * 2.0**52) != u * 2.0**52).any()  # the 53rd bit is random too
    assert chisquare(np.bincount((u * 64).astype(int), minlength=64)).pvalue > 1e-6
    assert kstest(u, "uniform").pvalue > 1e-6


def test_os_random_normal_is_standard_normal() -> None:
    """SEAL exposes no normal sampler to compare with; the exact CDF stands in for it."""
    z = os_random_normal(200_001)
    assert z.shape == (200_001,)
    assert kstest(z, "norm").pvalue > 1e-6
    assert z.var() == pytest.approx(1.0, abs=0.02)
    half = z[: 100_000], z[100_000:200_000]
    assert abs(np.corrcoef(*half)[0, 1]) < 0.015


def test_centered_helper_is_centered() -> None:
    assert centered(np.array([0, 1, 6, 7]), 7).tolist() == [0, 1, -1, 0]


# -- seal_uniform, ternary ----------------------------------------------------------------------


# An NTT prime (1 mod 2N) near 0.75 * 2**60: SEAL's rejection rule drops 1.6% of words.
REJECTING_PRIME = 864691128455159809


def _seal_expansion(context: Any, seed: bytes) -> np.ndarray:
    """c1 as SEAL's loader expands it from a seeded ciphertext whose PRNG type is SHAKE-256."""
    import tenseal.sealapi as seal

    from heinfer.he import serialization as fmt
    from heinfer.he.scratch import SCRATCH

    c0 = np.zeros((len(context.params.data_primes), context.n), dtype=np.uint64)
    tail = fmt.seed_object(fmt.PRNG_SHAKE256, seed)
    data = fmt.seeded_ciphertext(context._seeded_prefix, c0, tail)
    return fmt.ciphertext_arrays(SCRATCH.load(seal.Ciphertext(), context.seal_context, data))[1]


@pytest.mark.parametrize("rejecting", [False, True], ids=["mnist-primes", "rejecting-prime"])
def test_seal_uniform_is_seals_own_expansion_bit_for_bit(rejecting: bool) -> None:
    """Every coefficient of SEAL's c1 for four SHAKE-256 seeds. The MNIST primes sit just
    below powers of two, so SEAL's rejection rule almost never fires there; a prime near
    0.75 * 2**60 exercises it (dozens of redraws per polynomial). Negative control: without
    the rejection rule the expansion differs from SEAL's."""
    from heinfer.he.backend import Context, find_ntt_primes
    from heinfer.he.params import BFVParameters

    context = bfv_context()
    if rejecting:
        primes = (REJECTING_PRIME, *find_ntt_primes(context.n, [30]))
        context = Context(BFVParameters(context.n, primes, 65537))
    primes = context.params.data_primes
    limits = np.array([(1 << 64) - 2 - ((1 << 64) - 1) % q for q in primes], dtype=np.uint64)
    for index in range(4):
        seed = hashlib.sha512(b"seal-uniform" + bytes([index])).digest()
        expected = _seal_expansion(context, seed)
        np.testing.assert_array_equal(seal_uniform(seed, primes, context.n), expected)
        words = np.frombuffer(seal_shake256_stream(seed, 0, 8 * len(primes)), dtype="<u8")
        words = words.reshape(len(primes), context.n)
        rejected = int((words >= limits[:, None]).sum())
        assert (rejected > 0) == rejecting
        if rejecting:
            naive = words % np.array(primes, dtype=np.uint64)[:, None]
            assert not np.array_equal(naive, expected)


def test_seal_shake256_stream_is_shake256_of_seed_and_counter() -> None:
    seed = bytes(range(64))
    stream = seal_shake256_stream(seed, 1, 2)
    assert stream[:4096] == hashlib.shake_256(seed + struct.pack("<Q", 1)).digest(4096)
    assert stream[4096:] == hashlib.shake_256(seed + struct.pack("<Q", 2)).digest(4096)


def test_ternary_is_distributed_as_seals_secret() -> None:
    """SEAL samples secrets (and encryption's u) uniform on {-1, 0, 1}; ours matches both the
    uniform law and the coefficients of SEAL's own secret keys."""
    ours = ternary((8, 4096)).reshape(-1)
    assert ours.dtype == np.int8 and set(np.unique(ours).tolist()) == {-1, 0, 1}
    counts = np.bincount(ours + 1, minlength=3)
    assert chisquare(counts).pvalue > 1e-6
    context = bfv_context()
    theirs = np.concatenate([SecretKey.generate(context).ternary() for _ in range(8)])
    table = np.stack([counts, np.bincount(theirs.astype(np.int64) + 1, minlength=3)])
    assert chi2_contingency(table).pvalue > 1e-6
