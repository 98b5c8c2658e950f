"""The distributions heinfer samples itself, each from a named source of randomness.

Three sources only: SHAKE-128 (public seeds, expanded deterministically, and secret 32-byte keys
from the OS), SEAL's own SHAKE-256 generator (public 64-byte seeds of requests, expanded as SEAL
expands them) and the OS CSPRNG (`os.urandom`). numpy's generators are never used for anything
secret. Each function's docstring names the distribution it draws; `tests/test_rlwe_sampling.py`
checks each against the documented construction, against SEAL's own samples where SEAL has the
same distribution, and with statistical tests.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct

import numpy as np

from heinfer.errors import MalformedPayloadError
from heinfer.rlwe import _kernels
from heinfer.rlwe.ring import mulmod_small

__all__ = [
    "BATCH_A_TAG",
    "CBD_HALF_BITS",
    "CBD_VARIANCE",
    "NOISE_TAG",
    "PUBLIC_A_TAG",
    "SEED_BYTES",
    "centered_binomial",
    "expand_uniform",
    "os_random_normal",
    "os_random_uniform",
    "seal_shake256_stream",
    "seal_uniform",
    "ternary",
    "uniform_flood",
    "uniform_mod",
]

BATCH_A_TAG = b"heinfer/coeff-batch/a/v1"  # the uniform halves of a coeff-batch request
PUBLIC_A_TAG = b"heinfer/public-key/a/v1"  # the uniform half of a seeded public key
NOISE_TAG = b"heinfer/coeff-batch/e/v1"  # the error of a coeff-batch request (secret key)
SEED_BYTES = 32
CBD_HALF_BITS = 21  # SEAL 4.1's default error: hw(21 bits) - hw(21 bits), variance 21/2
CBD_VARIANCE = CBD_HALF_BITS / 2


def expand_uniform(
    seed: bytes,
    primes: tuple[int, ...],
    count: int,
    degree: int,
    first: int = 0,
    tag: bytes = BATCH_A_TAG,
) -> np.ndarray:
    """(L, count, N) polynomials first..first+count-1, uniform modulo each prime, from a seed.

    Distribution: exactly uniform on [0, q_j) per coefficient (rejection sampling).
    Construction: polynomial i modulo prime j is SHAKE-128(tag || seed || u32le(i) || u8(j))
    read as little-endian uint64 words masked to the prime's bit length, keeping the first N
    words below the prime. Anyone holding the seed (the server) expands the same polynomials,
    which is why a seed can travel instead of the polynomial.
    """
    if len(seed) != SEED_BYTES:
        raise MalformedPayloadError(f"seed must be {SEED_BYTES} bytes")
    out = np.empty((len(primes), count, degree), dtype=np.uint64)
    prefix = tag + seed
    for j, q in enumerate(primes):
        mask = np.uint64((1 << q.bit_length()) - 1)
        qq = np.uint64(q)
        # Draw exactly N words first: a rejection is rare for primes just below a power of two
        # (the common case) and a row that has one is redrawn with headroom by `_uniform_row`.
        for i in range(count):
            key = prefix + struct.pack("<IB", first + i, j)
            words = np.frombuffer(hashlib.shake_128(key).digest(8 * degree), dtype="<u8")
            row = out[j, i]
            np.bitwise_and(words, mask, out=row)
            if (row >= qq).any():
                row[:] = _uniform_row(key, q, degree)
    return out


def _uniform_row(key: bytes, q: int, degree: int) -> np.ndarray:
    """The first N masked words below q of SHAKE-128(key), however long the stream must be."""
    mask = np.uint64((1 << q.bit_length()) - 1)
    words = 2 * degree
    while True:
        raw = np.frombuffer(hashlib.shake_128(key).digest(8 * words), dtype="<u8") & mask
        kept = raw[raw < np.uint64(q)]
        if kept.size >= degree:
            return kept[:degree]
        words *= 2


def centered_binomial(shape: tuple[int, ...], key: bytes | None = None) -> np.ndarray:
    """SEAL's default error distribution, int8 in [-21, 21].

    Distribution: popcount(21 bits) - popcount(21 other bits), a centered binomial of
    variance 21/2 (SEAL 4.1's `noise_standard_deviation` 3.2 rounds up to this CBD).
    Construction: SHAKE-128(NOISE_TAG || key) with a 32-byte key, fresh from the OS CSPRNG
    unless given (tests give one to check the construction); two 64-bit words w0, w1 give three
    values from bits [0, 21) - [21, 42) of w0, the same of w1, and [42, 63) of w0 - [42, 63)
    of w1.
    """
    count = math.prod(shape)
    triples = -(-count // 3)
    if key is None:
        key = os.urandom(SEED_BYTES)
    stream = hashlib.shake_128(NOISE_TAG + key).digest(16 * triples)
    out = np.empty(count, dtype=np.int8)
    _kernels.centered_binomial_21(stream, out)  # the construction above, compiled
    return out.reshape(shape)


def uniform_mod(primes: tuple[int, ...], degree: int) -> np.ndarray:
    """(L, N) values uniform modulo each prime, from the OS CSPRNG.

    Distribution: exactly uniform on [0, q_j) (rejection sampling of 64-bit OS words masked to
    the prime's bit length). These are secret masks, so they come from the OS, not a seed.
    """
    out = np.empty((len(primes), degree), dtype=np.uint64)
    for i, q in enumerate(primes):
        mask = np.uint64((1 << int(q).bit_length()) - 1)
        filled = 0
        while filled < degree:
            draw = np.frombuffer(os.urandom(8 * degree), dtype=np.uint64) & mask
            draw = draw[draw < np.uint64(q)]
            take = min(degree - filled, draw.size)
            out[i, filled : filled + take] = draw[:take]
            filled += take
    return out


def uniform_flood(primes: tuple[int, ...], shape: tuple[int, ...], log2_bound: int) -> np.ndarray:
    """(L, *shape): integers uniform in [-2**k, 2**k) (k = log2_bound) from the OS CSPRNG,
    each given by its residue modulo every prime.

    Distribution: exactly uniform on the 2**(k+1) integers of the range, since a power-of-two
    range only takes random bits: k+1 bits in 31-bit limbs v = sum_l r_l 2**(31 l), then
    v - 2**k modulo each prime, each limb reduced with an exact modular multiply.
    """
    count = math.prod(shape)
    bits = log2_bound + 1
    limbs = -(-bits // 31)
    raw = np.frombuffer(os.urandom(4 * limbs * count), dtype="<u4").reshape(limbs, count)
    raw = raw.astype(np.uint64) & np.uint64(0x7FFFFFFF)
    top = bits - 31 * (limbs - 1)
    raw[-1] &= np.uint64((1 << top) - 1)
    out = np.empty((len(primes), count), dtype=np.uint64)
    for j, q in enumerate(primes):
        qq = np.uint64(q)
        acc = (qq - np.uint64(pow(2, log2_bound, q))) % qq + np.zeros(count, dtype=np.uint64)
        for limb in range(limbs):
            acc += mulmod_small(raw[limb], pow(2, 31 * limb, q), q)
            acc = np.where(acc >= qq, acc - qq, acc)
        out[j] = acc
    return out.reshape((len(primes), *shape))


def os_random_uniform(count: int) -> np.ndarray:
    """Floats uniform on the grid k / 2**53, k in [0, 2**53), from the OS CSPRNG.

    Distribution: the top 53 bits of a 64-bit OS word, so every float64 mantissa bit is random
    and 1.0 is never reached.
    """
    raw = np.frombuffer(os.urandom(8 * count), dtype=np.uint64) >> np.uint64(11)
    return raw.astype(np.float64) * (1.0 / (1 << 53))


def os_random_normal(count: int) -> np.ndarray:
    """Standard normal float64 samples from the OS CSPRNG.

    Distribution: N(0, 1) by Box-Muller, r = sqrt(-2 ln u1) with u1 in (0, 1] and angle
    2*pi*u2; both coordinates of each pair are used (they are independent normals).
    """
    half = (count + 1) // 2
    u1 = 1.0 - os_random_uniform(half)  # (0, 1]
    u2 = os_random_uniform(half)
    r = np.sqrt(-2.0 * np.log(u1))
    return np.concatenate([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)])[:count]


SEAL_PRNG_BLOCK = 4096  # bytes per refill of SEAL's generators (randomgen.h `buffer_size_`)
_MAX_U64 = (1 << 64) - 1


def seal_shake256_stream(seed: bytes, first_block: int, blocks: int) -> bytes:
    """Bytes of SEAL's `Shake256PRNG` stream for a 64-byte seed, from refill `first_block`.

    Construction (SEAL 4.x randomgen.cpp): refill c of the 4096-byte buffer is
    SHAKE-256(seed || u64le(c)) truncated to 4096 bytes, c = 0, 1, 2, ...; the stream is the
    refills concatenated.
    """
    return b"".join(
        hashlib.shake_256(seed + struct.pack("<Q", c)).digest(SEAL_PRNG_BLOCK)
        for c in range(first_block, first_block + blocks)
    )


def seal_uniform(seed: bytes, primes: tuple[int, ...], degree: int) -> np.ndarray:
    """(L, N) polynomial SEAL's `sample_poly_uniform` draws from a SHAKE-256 seed.

    Distribution (SEAL's, reproduced exactly so SEAL and this agree bit for bit): the stream's
    first L*N little-endian words, prime by prime; a word w >= M_j = 2**64 - 1 -
    ((2**64 - 1) mod q_j) - 1 is replaced by the next unused word of the stream (again until
    one is below M_j), then reduced mod q_j. The redraws come after the L*N words, in
    coefficient order, prime 0 first. This is how SEAL expands the uniform half c1 of a
    seeded ciphertext whose PRNG type is SHAKE-256.
    """
    count = len(primes) * degree
    blocks = -(-count * 8 // SEAL_PRNG_BLOCK)
    stream = seal_shake256_stream(seed, 0, blocks)
    words = np.frombuffer(stream, dtype="<u8")
    out = words[:count].reshape(len(primes), degree).copy()
    cursor = count
    for j, q in enumerate(primes):
        limit = _MAX_U64 - _MAX_U64 % q - 1
        row = out[j]
        for i in np.flatnonzero(row >= np.uint64(limit)).tolist():
            while True:
                if cursor == words.size:
                    more = seal_shake256_stream(seed, words.size * 8 // SEAL_PRNG_BLOCK, 1)
                    words = np.concatenate([words, np.frombuffer(more, dtype="<u8")])
                word = int(words[cursor])
                cursor += 1
                if word < limit:
                    row[i] = word
                    break
        _kernels.reduce_mod(row, q)  # row %= q, compiled (numpy's uint64 % divides)
    return out


def ternary(shape: tuple[int, ...]) -> np.ndarray:
    """int8 values uniform on {-1, 0, 1}, from the OS CSPRNG.

    Distribution: SEAL's `sample_poly_ternary` (each value 1/3), exactly: OS bytes below 255
    (= 3 * 85) are kept, value = byte mod 3 - 1; bytes of 255 are rejected and redrawn.
    """
    count = math.prod(shape)
    kept = np.empty(0, dtype=np.uint8)
    while kept.size < count:
        draw = np.frombuffer(os.urandom(count - kept.size + 64), dtype=np.uint8)
        kept = np.concatenate([kept, draw[draw < 255]])
    values = (kept[:count] % 3).astype(np.int8) - np.int8(1)
    return values.reshape(shape)
