"""The BFV adapter: the only module of the linear path that imports the SEAL binding.

Binding choice: Microsoft SEAL 4.1 through TenSEAL's raw `tenseal.sealapi`, not seal-python.
seal-python's NTT is the same speed here, but our plans need three things only TenSEAL exposes:
seeded symmetric encryption (`encrypt_symmetric` returning SEAL's `Serializable`, which halves
every request), zstd serialization, and SEAL's validating loaders for untrusted input. Its one
wart, save/load through file paths only, is hidden here behind a tmpfs scratch directory.

Above the binding we speak SEAL's documented serialization format ourselves (a 16-byte header,
then parms_id, flags and a raw uint64 array), which gives the plans coefficient-level access
(masking, noise flooding, compact responses) with plain numpy.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tenseal.sealapi as seal
import zstandard

from heinfer.errors import MalformedPayloadError, ParameterMismatchError
from heinfer.he.params import BFVParameters
from heinfer.he.scratch import SCRATCH

__all__ = [
    "CT_META",
    "Context",
    "EvaluationKey",
    "RequestCiphertext",
    "SecretKey",
    "find_ntt_primes",
    "pack_bits",
    "pack_bits_into",
    "payload_arrays",
    "plaintext_arrays",
    "replace_uniform_half",
    "seal_object",
    "seal_payload",
    "unpack_bits",
]

_HEADER = struct.Struct("<HBBBBHQ")
_SEAL_MAGIC = 0xA15E
_COMPR_NONE, _COMPR_ZSTD = 0, 2
# parms_id (4 x u64), is_ntt_form (u8), size, N, L (u64 each), scale (f64), correction (u64)
CT_META = struct.Struct("<4QBQQQdQ")
_MAX_DECOMPRESSED = 64 << 20
_FINGERPRINT_BYTES = 8

_SCRATCH = SCRATCH


def _seal_version() -> tuple[int, int]:
    """The serialization version the bundled SEAL writes (and insists on reading)."""
    header = _SCRATCH.save(seal.Plaintext())[: _HEADER.size]
    return header[3], header[4]


_VERSION = _seal_version()


def _seal_header(compr_mode: int, total_size: int) -> bytes:
    return _HEADER.pack(_SEAL_MAGIC, 16, *_VERSION, compr_mode, 0, total_size)


def _check_header(data: bytes, what: str, max_bytes: int) -> int:
    """Reject what SEAL would reject, before SEAL sees it; returns the compression mode."""
    if len(data) < _HEADER.size:
        raise MalformedPayloadError(f"{what}: {len(data)} bytes is too short for a SEAL object")
    if len(data) > max_bytes:
        raise MalformedPayloadError(f"{what}: {len(data)} bytes exceeds the {max_bytes} allowed")
    magic, hsize, major, _minor, compr, _res, size = _HEADER.unpack_from(data)
    if magic != _SEAL_MAGIC or hsize != 16 or major != 4:
        raise MalformedPayloadError(f"{what}: not a SEAL 4 serialization (bad header)")
    if compr not in (_COMPR_NONE, _COMPR_ZSTD):
        raise MalformedPayloadError(f"{what}: unsupported compression mode {compr}")
    if size != len(data):
        raise MalformedPayloadError(
            f"{what}: header declares {size} bytes but {len(data)} arrived (truncated?)"
        )
    return int(compr)


def seal_payload(data: bytes, max_bytes: int = _MAX_DECOMPRESSED) -> bytes:
    """The (decompressed) bytes after a SEAL header."""
    compr = _HEADER.unpack_from(data)[4]
    if compr == _COMPR_NONE:
        return data[_HEADER.size :]
    try:
        return zstandard.ZstdDecompressor().decompress(
            data[_HEADER.size :], max_output_size=max_bytes
        )
    except zstandard.ZstdError as exc:
        raise MalformedPayloadError(f"corrupt compressed SEAL data: {exc}") from exc


def seal_object(body: bytes, *, compress: bool = False) -> bytes:
    """`body` behind a SEAL header of the bundled SEAL's version, zstd-compressed if asked."""
    mode = _COMPR_NONE
    if compress:
        body, mode = zstandard.ZstdCompressor().compress(body), _COMPR_ZSTD
    return _seal_header(mode, _HEADER.size + len(body)) + body


def payload_arrays(payload: bytes) -> np.ndarray:
    """(size, L, N) view of the RNS coefficients in a ciphertext-shaped object's payload
    (ciphertexts, public keys, key-switching key components)."""
    size, n, levels = struct.unpack_from("<QQQ", payload, 33)
    count = size * n * levels
    data = np.frombuffer(payload, dtype="<u8", count=count, offset=len(payload) - 8 * count)
    return data.reshape(size, levels, n)


def plaintext_arrays(plain: Any, degree: int) -> np.ndarray:
    """A plaintext's (or secret key's) raw coefficients: (N,) mod t, or (L, N) RNS values when
    in NTT form."""
    payload = seal_payload(_SCRATCH.save(plain))
    (count,) = struct.unpack_from("<Q", payload, 32)
    data = np.frombuffer(payload, dtype="<u8", count=count, offset=len(payload) - 8 * count)
    return data.reshape(-1, degree).copy() if count > degree else data.copy()


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Pack non-negative integers below 2**bits into exactly ceil(n*bits/8) bytes.

    The format is one little-endian bit stream: value k occupies bits [k*bits, (k+1)*bits).
    Higher bits of a value are dropped. Widths 8..57 take a vectorized path (each group of 8
    values is `bits` bytes; every value fits one unaligned 64-bit word of its group).
    """
    flat = np.ascontiguousarray(values, dtype="<u8").reshape(-1)
    count = flat.size
    if not _FAST_MIN_BITS <= bits <= _FAST_MAX_BITS or count == 0:
        return _pack_bits_generic(flat, bits)
    out = np.zeros(-(-count // 8) * bits + 8, dtype=np.uint8)
    pack_bits_into(flat, bits, out, 0)
    return out[: (count * bits + 7) // 8].tobytes()


def pack_bits_into(values: np.ndarray, bits: int, out: np.ndarray, offset: int) -> int:
    """`pack_bits` written into the zeroed uint8 buffer `out` at byte `offset`; returns the
    offset after it. Every value is OR-ed in as one unaligned 64-bit word whose bits above the
    value are zero, so `out` needs ceil(n/8)*bits + 8 bytes from `offset`, the bytes after the
    packed ones are left as they were, and consecutive calls can fill one buffer."""
    flat = np.ascontiguousarray(values, dtype="<u8").reshape(-1)
    count = flat.size
    size = (count * bits + 7) // 8
    if not _FAST_MIN_BITS <= bits <= _FAST_MAX_BITS:
        out[offset : offset + size] = np.frombuffer(_pack_bits_generic(flat, bits), np.uint8)
        return offset + size
    mask = np.uint64((1 << bits) - 1)
    for start in range(0, count, _PACK_CHUNK):  # cache-sized chunks of whole bytes
        chunk = flat[start : start + _PACK_CHUNK]
        groups = -(-chunk.size // 8)
        padded = np.zeros(groups * 8, dtype=np.uint64)
        np.bitwise_and(chunk, mask, out=padded[: chunk.size])
        lanes = padded.reshape(groups, 8)
        base = offset + start * bits // 8
        for lane in range(8):
            at, shift = divmod(lane * bits, 8)
            window = np.ndarray(
                (groups,), dtype="<u8", buffer=out, offset=base + at, strides=(bits,)
            )
            window |= lanes[:, lane] << np.uint64(shift)
    return offset + size


def unpack_bits(
    data: bytes | memoryview, count: int, bits: int, out: np.ndarray | None = None
) -> np.ndarray:
    """Inverse of `pack_bits`; the caller has checked len(data). Fills `out` when given."""
    if out is not None:
        for i in range(0, count, _PACK_CHUNK):  # whole bytes per chunk (multiple of 8)
            size = min(_PACK_CHUNK, count - i)
            part = data[i * bits // 8 : (i * bits + size * bits + 7) // 8]
            out[i : i + size] = unpack_bits(part, size, bits)
        return out
    if not _FAST_MIN_BITS <= bits <= _FAST_MAX_BITS or count == 0:
        return _unpack_bits_generic(data, count, bits)
    if count > _PACK_CHUNK:
        return unpack_bits(data, count, bits, out=np.empty(count, dtype=np.uint64))
    groups = -(-count // 8)
    raw = np.frombuffer(data, dtype=np.uint8)
    # Groups whose 8-byte windows all end inside `data` are read in place; the last one or
    # two are read from a zero-padded copy of the remaining bytes.
    reach = (7 * bits) // 8 + 8
    body = min(groups, max(0, (raw.size - reach) // bits + 1))
    tail = np.zeros((groups - body) * bits + 8, dtype=np.uint8)
    rest = raw[body * bits : groups * bits]
    tail[: rest.size] = rest
    out = np.empty((groups, 8), dtype=np.uint64)
    mask = np.uint64((1 << bits) - 1)
    for source, rows, target in ((raw, body, out[:body]), (tail, groups - body, out[body:])):
        if not rows:
            continue
        for lane in range(8):
            offset, shift = divmod(lane * bits, 8)
            window = np.ndarray((rows,), dtype="<u8", buffer=source, offset=offset, strides=(bits,))
            np.bitwise_and(window >> np.uint64(shift), mask, out=target[:, lane])
    flat = out.reshape(-1)
    return flat if flat.size == count else flat[:count].copy()


_FAST_MIN_BITS, _FAST_MAX_BITS = 8, 57
_PACK_CHUNK = 1 << 17


def _unpack_limbs(
    data: bytes, offset: int, primes: Sequence[int], degree: int, what: str
) -> tuple[np.ndarray, int]:
    """(L, N) values of one polynomial bit-packed prime by prime from `offset`, each checked
    below its prime, and the offset after it."""
    limbs = []
    for q in primes:
        size = (degree * q.bit_length() + 7) // 8
        limb = unpack_bits(data[offset : offset + size], degree, q.bit_length())
        if np.any(limb >= np.uint64(q)):
            raise MalformedPayloadError(f"{what} coefficient out of range")
        limbs.append(limb)
        offset += size
    return np.stack(limbs), offset


def _pack_bits_generic(flat: np.ndarray, bits: int) -> bytes:
    as_bits = np.unpackbits(flat.view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")
    return np.packbits(as_bits[:, :bits].reshape(-1), bitorder="little").tobytes()


def _unpack_bits_generic(data: bytes, count: int, bits: int) -> np.ndarray:
    stream = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
    padded = np.zeros((count, 64), dtype=np.uint8)
    padded[:, :bits] = stream[: count * bits].reshape(count, bits)
    return np.packbits(padded, axis=1, bitorder="little").view("<u8").reshape(count).copy()


# -- numpy RLWE arithmetic for the feature-major batch layout ----------------------------------
#
# A coeff-batch request is n fresh symmetric ciphertexts (one per feature). Making, parsing and
# combining them through SEAL would cost a file round trip plus a zstd pass per ciphertext,
# several times the arithmetic itself, so these helpers do the same arithmetic on uint64
# arrays. They implement exactly SEAL's BFV encryption equation (c0 = -(a*s + e) + round(q*m/t),
# c1 = a), so SEAL decrypts the result; what differs from SEAL is only where the randomness
# comes from: `a` is expanded from a public 32-byte seed with SHAKE-128 (like SEAL's own seeded
# ciphertexts, which use Blake2xb), and e is SEAL's default centered binomial error drawn from
# SHAKE-128 under a fresh secret key from the OS CSPRNG.

BATCH_A_TAG = b"heinfer/coeff-batch/a/v1"
PUBLIC_A_TAG = b"heinfer/public-key/a/v1"  # the uniform half of a seeded public key
_NOISE_TAG = b"heinfer/coeff-batch/e/v1"
SEED_BYTES = 32
CBD_HALF_BITS = 21  # SEAL 4.1's default error: hw(21 bits) - hw(21 bits), variance 21/2
CBD_VARIANCE = CBD_HALF_BITS / 2
# Digit width for float64 FFT products with a ternary secret: a 36-bit digit's product
# (|value| < N * 2**36) came out within 0.0044 of an integer in 13M measured coefficients at
# N=4096 (28 bits: 2e-5); every product is checked against 1/8 and refused beyond it.
_FFT_DIGIT_BITS = 36
_FFT_ROWS = 64  # polynomials per FFT block (cache-sized)
_MATMUL_COLUMNS = 1024  # columns per BLAS block in `linear_combination`
_EXACT_FLOAT = 1 << 53


def _mulmod_small(x: np.ndarray, k: int, q: int) -> np.ndarray:
    """x * k mod q for uint64 x < 2**32, k < q < 2**62: float quotient estimate + wrapping."""
    x = np.asarray(x, dtype=np.uint64)
    estimate = x.view(np.int64).astype(np.float64) * (k / q)  # off from x*k/q by < 2**-19
    total = x.view(np.int64) * np.int64(k)  # x*k mod 2**64
    return _reduce_estimated(total, estimate, q)


def mulmod_const(x: np.ndarray, k: int, q: int) -> np.ndarray:
    """x * k mod q elementwise, exactly, for uint64 x < q < 2**62 and a Python int k."""
    if q >= 1 << 62:
        raise ValueError("mulmod_const needs q < 2**62")
    x = np.asarray(x, dtype=np.uint64)
    low = _mulmod_small(x & np.uint64(0x7FFFFFFF), k % q, q)
    high = _mulmod_small(x >> np.uint64(31), (k << 31) % q, q)
    total = low + high  # < 2q < 2**63
    return np.where(total >= np.uint64(q), total - np.uint64(q), total)


def mulmod_arrays(x: np.ndarray, y: np.ndarray, q: int) -> np.ndarray:
    """x * y mod q elementwise, exactly, for uint64 arrays x, y < q < 2**62.

    y is taken in 16-bit digits and x in 32-bit halves, so every partial product fits 64 bits.
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


def replace_uniform_half(
    k0: np.ndarray, a: np.ndarray, a_new: np.ndarray, secret: np.ndarray, primes: Sequence[int]
) -> np.ndarray:
    """k0 + (a - a_new)*s per prime, all (L, N) in NTT form: the first half of an RLWE pair
    (k0, a) = (-(a*s + e) + m, a) rewritten for a_new, with the same e and m."""
    out = np.empty_like(k0)
    for j, q in enumerate(primes):
        qq = np.uint64(q)
        difference = (a[j] + (qq - a_new[j])) % qq
        out[j] = (k0[j] + mulmod_arrays(difference, secret[j], q)) % qq
    return out


def expand_uniform(
    seed: bytes,
    primes: tuple[int, ...],
    count: int,
    degree: int,
    first: int = 0,
    tag: bytes = BATCH_A_TAG,
) -> np.ndarray:
    """(L, count, N) polynomials first..first+count-1, uniform modulo each prime, from a seed.

    Polynomial i modulo prime j is SHAKE-128(tag || seed || u32le(i) || u8(j)) read as
    little-endian uint64 words masked to the prime's bit length, keeping the first N words
    below the prime (rejection sampling: exactly uniform).
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
    mask = np.uint64((1 << q.bit_length()) - 1)
    words = 2 * degree
    while True:
        raw = np.frombuffer(hashlib.shake_128(key).digest(8 * words), dtype="<u8") & mask
        kept = raw[raw < np.uint64(q)]
        if kept.size >= degree:
            return kept[:degree]
        words *= 2


def centered_binomial(shape: tuple[int, ...]) -> np.ndarray:
    """SEAL's default error distribution, int8 in [-21, 21], from a fresh secret seed.

    Each value is popcount(21 bits) - popcount(21 other bits) of SHAKE-128 output keyed with
    32 bytes from the OS CSPRNG; two 64-bit words give three values.
    """
    count = math.prod(shape)
    triples = -(-count // 3)
    key = os.urandom(SEED_BYTES)
    stream = hashlib.shake_128(_NOISE_TAG + key).digest(16 * triples)
    words = np.frombuffer(stream, dtype="<u8").reshape(triples, 2)
    half = np.uint64((1 << CBD_HALF_BITS) - 1)
    out = np.empty((triples, 3), dtype=np.int8)
    for lane, (first, second) in enumerate(((0, 0), (1, 1), (0, 1))):
        shift = np.uint64(42) if lane == 2 else np.uint64(0)
        other = np.uint64(42) if lane == 2 else np.uint64(CBD_HALF_BITS)
        plus = np.bitwise_count((words[:, first] >> shift) & half).view(np.int8)
        minus = np.bitwise_count((words[:, second] >> other) & half).view(np.int8)
        np.subtract(plus, minus, out=out[:, lane])
    return out.reshape(-1)[:count].reshape(shape)


def linear_combination(weights: np.ndarray, polys: np.ndarray, q: int) -> np.ndarray:
    """weights (rows, n) int64 @ polys (n, cols) uint64 < q, modulo q, exactly.

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

    The negacyclic product of real length-N polynomials is a cyclic product of length N/2
    after folding (x_k + i x_{k+N/2}) and twisting by exp(i*pi*k/N). a is split into digits
    of at most 36 bits so each digit product comes out of the FFT within a small fraction of
    an integer (checked on every call: more than 1/8 raises) and rounds exactly. The digits
    are recombined modulo q with one float-estimated quotient.
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
            out[start : start + block.shape[0]] = _reduce_estimated(total, estimate, q)
        return out


def _reduce_estimated(total: np.ndarray, estimate: np.ndarray, q: int) -> np.ndarray:
    """V mod q from V mod 2**64 (int64, wrapping) and a float estimate of V/q off by < 1."""
    quotient = np.floor(estimate).astype(np.int64)
    r = total - quotient * np.int64(q)  # wraps mod 2**64; the true value is in [-q, 2q)
    qq = np.int64(q)
    r += (r >> np.int64(63)) & qq
    r -= qq
    r += (r >> np.int64(63)) & qq
    return r.view(np.uint64)


def find_ntt_primes(poly_modulus_degree: int, bit_sizes: list[int]) -> tuple[int, ...]:
    """Distinct primes = 1 mod 2N of exactly the given bit sizes (SEAL's own search)."""
    mods = seal.CoeffModulus.Create(poly_modulus_degree, bit_sizes)
    return tuple(int(m.value()) for m in mods)


class Context:
    """A SEAL context for one BFV parameter set plus serialization templates for it."""

    def __init__(self, params: BFVParameters) -> None:
        self.params = params
        parms = seal.EncryptionParameters(seal.SCHEME_TYPE.BFV)
        parms.set_poly_modulus_degree(params.poly_modulus_degree)
        parms.set_coeff_modulus([seal.Modulus(q) for q in params.coeff_modulus])
        parms.set_plain_modulus(seal.Modulus(params.plain_modulus))
        self.seal_context = seal.SEALContext(parms, True, seal.SEC_LEVEL_TYPE.TC128)
        if not self.seal_context.parameters_set():
            raise ValueError(
                "SEAL rejects these parameters: " + self.seal_context.parameters_error_message()
            )
        self.n = params.poly_modulus_degree
        self.first_parms_id = tuple(self.seal_context.first_parms_id())
        self.last_parms_id = tuple(self.seal_context.last_parms_id())
        self.key_parms_id = tuple(self.seal_context.key_parms_id())
        self.evaluator = seal.Evaluator(self.seal_context)
        self.data_primes = np.array(params.data_primes, dtype=np.uint64)
        self._spare_masks: list[np.ndarray] = []  # uniform_c0 draws made ahead, each used once
        self.last_prime = int(params.coeff_modulus[0])
        self._build_templates()

    # -- templates: SEAL metadata prefixes we reuse to write objects from numpy arrays --------
    def _build_templates(self) -> None:
        keygen = seal.KeyGenerator(self.seal_context)
        encryptor = seal.Encryptor(self.seal_context, keygen.secret_key())
        plain = self.plaintext_from_coefficients(None)
        seeded = seal_payload(_SCRATCH.save(encryptor.encrypt_symmetric(plain)))
        self._seeded_prefix = seeded[: CT_META.size + 16 + 8]
        self._seed_bytes = len(seeded) - len(self._seeded_prefix) - 8 * self.n * len(
            self.params.data_primes
        )
        fresh = seal.Ciphertext()
        encryptor.encrypt_symmetric(plain, fresh)
        self._ct_prefix_first = self._prefix(_SCRATCH.save(fresh))
        last = seal.Ciphertext()
        self.evaluator.mod_switch_to(fresh, list(self.last_parms_id), last)
        self._ct_prefix_last = self._prefix(_SCRATCH.save(last))
        public = seal.PublicKey()
        keygen.create_public_key(public)
        self._pk_prefix = self._prefix(_SCRATCH.save(public))
        self._data_bits = [q.bit_length() for q in self.params.data_primes]
        self.request_bytes = (
            _FINGERPRINT_BYTES
            + sum((self.n * b + 7) // 8 for b in self._data_bits)
            + self._seed_bytes
        )
        self.max_key_bytes = 2 * self.n * len(self.params.coeff_modulus) * 8 + 4096
        polynomial = sum((self.n * q.bit_length() + 7) // 8 for q in self.params.coeff_modulus)
        self.public_key_bytes = SEED_BYTES + polynomial  # seeded: see SecretKey.public_key_bytes

    @staticmethod
    def _prefix(serialized: bytes) -> bytes:
        """Metadata + DynArray header of a ciphertext-shaped object (everything but the data)."""
        return seal_payload(serialized)[: CT_META.size + 16 + 8]

    @staticmethod
    def _compose(prefix: bytes, data: np.ndarray) -> bytes:
        body = prefix + np.ascontiguousarray(data, dtype="<u8").tobytes()
        return seal_object(body)

    def plaintext_from_coefficients(self, coefficients: np.ndarray | None) -> Any:
        """A Plaintext with N coefficients taken mod t (negative values wrap, as BFV expects)."""
        t = self.params.plain_modulus
        values = np.zeros(self.n, dtype=np.uint64)
        if coefficients is not None:
            coeffs = np.asarray(coefficients, dtype=np.int64)
            values[: coeffs.size] = np.mod(coeffs, t).astype(np.uint64)
        # Plaintext metadata: parms_id (zero: not NTT), coeff_count, scale; then a DynArray.
        dyn = seal_object(struct.pack("<Q", self.n) + values.astype("<u8").tobytes())
        data = seal_object(struct.pack("<4QQd", 0, 0, 0, 0, self.n, 1.0) + dyn)
        return _SCRATCH.load(seal.Plaintext(), self.seal_context, data)

    def ntt_plaintext(self, coefficients: np.ndarray) -> Any:
        """Weights as an NTT-form plaintext at the first data level: precomputed once per plan."""
        plain = self.plaintext_from_coefficients(coefficients)
        self.evaluator.transform_to_ntt_inplace(plain, list(self.first_parms_id))
        return plain

    # -- ciphertext <-> numpy -----------------------------------------------------------------
    @staticmethod
    def ciphertext_arrays(ciphertext: Any) -> np.ndarray:
        """(size, L, N) uint64 copy of a ciphertext's RNS coefficients."""
        return payload_arrays(seal_payload(_SCRATCH.save(ciphertext))).copy()

    def plaintext_arrays(self, plain: Any) -> np.ndarray:
        """A plaintext's raw coefficients: (N,) mod t, or (L, N) RNS values when in NTT form."""
        return plaintext_arrays(plain, self.n)

    def to_ntt(self, ciphertext: Any) -> Any:
        result = seal.Ciphertext()
        self.evaluator.transform_to_ntt(ciphertext, result)
        return result

    def ciphertext_from_arrays(self, arrays: np.ndarray, *, last_level: bool) -> Any:
        prefix = self._ct_prefix_last if last_level else self._ct_prefix_first
        data = self._compose(prefix, arrays)
        return _SCRATCH.load(seal.Ciphertext(), self.seal_context, data)

    def add_to_c0(self, ciphertext: Any, c0: np.ndarray) -> None:
        """ciphertext += (c0, 0): raw additions to the first component (masks, flooding noise)."""
        arrays = np.zeros((2, *c0.shape), dtype=np.uint64)
        arrays[0] = c0
        extra = self.ciphertext_from_arrays(arrays, last_level=False)
        self.evaluator.add_inplace(ciphertext, extra)

    def add(self, ciphertext: Any, other: Any) -> None:
        self.evaluator.add_inplace(ciphertext, other)

    def last_level_arrays(self, ciphertext: Any) -> np.ndarray:
        """Switch down to the single smallest prime (SEAL's exact RNS rounding), as arrays."""
        self.evaluator.mod_switch_to_inplace(ciphertext, list(self.last_parms_id))
        return self.ciphertext_arrays(ciphertext)[:, 0, :]

    def uniform_c0(self) -> np.ndarray:
        """(L, N) values uniform modulo each data prime, from the OS CSPRNG (rejection sampled).

        Taken from the draws `prepare_spare_mask` made ahead of time when there are any.
        """
        if self._spare_masks:
            return self._spare_masks.pop()
        return self._draw_uniform_c0()

    def prepare_spare_mask(self, limit: int) -> bool:
        """Draw one mask ahead of time (idle workers call this); False once `limit` wait."""
        if len(self._spare_masks) >= limit:
            return False
        self._spare_masks.append(self._draw_uniform_c0())
        return True

    def _draw_uniform_c0(self) -> np.ndarray:
        out = np.empty((len(self.data_primes), self.n), dtype=np.uint64)
        for i, q in enumerate(self.data_primes.tolist()):
            mask = np.uint64((1 << int(q).bit_length()) - 1)
            filled = 0
            while filled < self.n:
                draw = np.frombuffer(os.urandom(8 * self.n), dtype=np.uint64) & mask
                draw = draw[draw < np.uint64(q)]
                take = min(self.n - filled, draw.size)
                out[i, filled : filled + take] = draw[:take]
                filled += take
        return out

    def compact_request(self, serialized: bytes) -> bytes:
        """SEAL's seeded ciphertext -> parameter tag + c0 bit-packed per prime + SEAL's seed."""
        payload = seal_payload(serialized)
        count = self.n * len(self._data_bits)
        start = len(self._seeded_prefix)
        c0 = np.frombuffer(payload, dtype="<u8", count=count, offset=start).reshape(-1, self.n)
        packed = b"".join(pack_bits(c0[i], b) for i, b in enumerate(self._data_bits))
        return self.params.fingerprint[:_FINGERPRINT_BYTES] + packed + payload[start + 8 * count :]

    def load_request(self, data: bytes) -> RequestCiphertext:
        """Validate and load one compact client ciphertext; SEAL re-expands c1 from the seed."""
        if len(data) <= _FINGERPRINT_BYTES:
            raise MalformedPayloadError(f"ciphertext of {len(data)} bytes is too short")
        if data[:_FINGERPRINT_BYTES] != self.params.fingerprint[:_FINGERPRINT_BYTES]:
            raise ParameterMismatchError(
                "ciphertext was made for other encryption parameters: fetch the model's "
                "manifest again and re-encrypt"
            )
        if len(data) != self.request_bytes:
            raise MalformedPayloadError(
                f"ciphertext must be {self.request_bytes} bytes for these parameters, "
                f"got {len(data)}"
            )
        c0, offset = _unpack_limbs(
            data, _FINGERPRINT_BYTES, self.params.data_primes, self.n, "ciphertext"
        )
        body = self._seeded_prefix + c0.astype("<u8").tobytes() + data[offset:]
        serialized = seal_object(body)
        try:
            ciphertext = _SCRATCH.load(seal.Ciphertext(), self.seal_context, serialized)
        except (RuntimeError, ValueError) as exc:
            raise MalformedPayloadError(f"ciphertext rejected by SEAL: {exc}") from exc
        if ciphertext.size() != 2 or ciphertext.is_ntt_form():
            raise MalformedPayloadError("ciphertext must be a fresh 2-component BFV ciphertext")
        return RequestCiphertext(self, ciphertext)

    # -- coeff-batch requests: n fresh ciphertexts travelling as arrays --------------------------
    def batch_request_bytes(self, count: int) -> int:
        """Size of a compact batch request of `count` ciphertexts (tag + seed + c0 limbs)."""
        per = sum((self.n * b + 7) // 8 for b in self._data_bits)
        return _FINGERPRINT_BYTES + SEED_BYTES + count * per

    def compact_batch_request(self, seed: bytes, c0: np.ndarray) -> bytes:
        """Parameter tag + the seed of every c1 + all c0 polynomials, bit-packed prime by prime."""
        tag = self.params.fingerprint[:_FINGERPRINT_BYTES]
        limbs = [pack_bits(c0[j], bits) for j, bits in enumerate(self._data_bits)]
        return tag + seed + b"".join(limbs)

    def load_batch_request(self, data: bytes, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Validate a compact batch request; (c0, c1) as (L, count, N) uint64 arrays.

        Length plus every c0 coefficient below its prime is a complete well-formedness check
        for fresh 2-component ciphertexts (c1 is expanded from the seed, so always in range);
        SEAL never parses client bytes on this path.
        """
        c0 = np.empty((len(self.params.data_primes), count, self.n), dtype=np.uint64)
        c1 = np.empty_like(c0)
        for start, block0, block1 in self.iter_batch_request(data, count):
            c0[:, start : start + block0.shape[1]] = block0
            c1[:, start : start + block1.shape[1]] = block1
        return c0, c1

    def iter_batch_request(
        self, data: bytes | memoryview, count: int, rows: int = 128
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """`load_batch_request` in blocks of `rows` ciphertexts: (first, c0, c1), each array
        (L, rows, N). Tag and length are checked before the first block, the range of every
        c0 coefficient block by block (cache-sized working set, no 100 MB intermediates)."""
        seed = self._check_batch_request(data, count)
        primes = self.params.data_primes
        starts = [_FINGERPRINT_BYTES + SEED_BYTES]
        for bits in self._data_bits[:-1]:
            starts.append(starts[-1] + count * self.n * bits // 8)
        for first in range(0, count, rows):
            size = min(rows, count - first)
            c0 = np.empty((len(primes), size, self.n), dtype=np.uint64)
            for j, (q, bits) in enumerate(zip(primes, self._data_bits, strict=True)):
                begin = starts[j] + first * self.n * bits // 8
                part = data[begin : begin + size * self.n * bits // 8]
                limb = unpack_bits(part, size * self.n, bits, out=c0[j].reshape(-1))
                if limb.max(initial=0) >= q:
                    raise MalformedPayloadError("batch request coefficient out of range")
            yield first, c0, expand_uniform(seed, primes, size, self.n, first=first)

    def _check_batch_request(self, data: bytes | memoryview, count: int) -> bytes:
        """Tag and exact length of a batch request of `count` ciphertexts; returns the seed."""
        if data[:_FINGERPRINT_BYTES] != self.params.fingerprint[:_FINGERPRINT_BYTES]:
            raise ParameterMismatchError(
                "batch request was made for other encryption parameters: fetch the model's "
                "manifest again and re-encrypt"
            )
        expected = self.batch_request_bytes(count)
        if len(data) != expected:
            raise MalformedPayloadError(
                f"batch request of {count} ciphertexts must be {expected} bytes for these "
                f"parameters, got {len(data)}"
            )
        return bytes(data[_FINGERPRINT_BYTES : _FINGERPRINT_BYTES + SEED_BYTES])

    def scale_plain(self, values: np.ndarray) -> np.ndarray:
        """SEAL's BFV plaintext scaling round(q*m/t) (ties up) modulo each data prime.

        values: integers, taken mod t; returns (L, *values.shape) uint64. The rounding error
        (|.| <= 1/2 per coefficient) is what NoiseBudget calls `rounding`.
        """
        t = self.params.plain_modulus
        primes = self.params.data_primes
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

    def uniform_flood(self, shape: tuple[int, ...], log2_bound: int) -> np.ndarray:
        """Integers uniform in [-2**k, 2**k) (k = log2_bound) from the OS CSPRNG, mod each prime.

        A power-of-two range makes exact uniform sampling a matter of taking random bits:
        k+1 bits in 31-bit limbs, each limb reduced with an exact modular multiply.
        """
        count = math.prod(shape)
        bits = log2_bound + 1
        limbs = -(-bits // 31)
        raw = np.frombuffer(os.urandom(4 * limbs * count), dtype="<u4").reshape(limbs, count)
        raw = raw.astype(np.uint64) & np.uint64(0x7FFFFFFF)
        top = bits - 31 * (limbs - 1)
        raw[-1] &= np.uint64((1 << top) - 1)
        out = np.empty((len(self.data_primes), count), dtype=np.uint64)
        for j, q in enumerate(self.params.data_primes):
            qq = np.uint64(q)
            acc = (qq - np.uint64(pow(2, log2_bound, q))) % qq + np.zeros(count, dtype=np.uint64)
            for limb in range(limbs):
                acc += _mulmod_small(raw[limb], pow(2, 31 * limb, q), q)
                acc = np.where(acc >= qq, acc - qq, acc)
            out[j] = acc
        return out.reshape((len(self.data_primes), *shape))

    def load_evaluation_key(self, data: bytes) -> EvaluationKey:
        return EvaluationKey.from_bytes(self, data)


class RequestCiphertext:
    """A validated client ciphertext on the server side."""

    def __init__(self, context: Context, ciphertext: Any) -> None:
        self._context = context
        self.ciphertext = ciphertext

    def multiply_ntt(self, plains: list[Any]) -> list[Any]:
        """One NTT of the input, then one pointwise product per weight plaintext."""
        ev = self._context.evaluator
        ntt = seal.Ciphertext()
        ev.transform_to_ntt(self.ciphertext, ntt)
        results = []
        for plain in plains:
            product = seal.Ciphertext()
            ev.multiply_plain(ntt, plain, product)
            ev.transform_from_ntt_inplace(product)
            results.append(product)
        return results


class EvaluationKey:
    """The public key the server holds for one client: re-randomizes results."""

    def __init__(self, context: Context, public_key: Any) -> None:
        self._context = context
        self._encryptor = seal.Encryptor(context.seal_context, public_key)
        self.nbytes = 2 * context.n * len(context.params.coeff_modulus) * 8
        self._spare_zeros: list[Any] = []  # encryptions of zero made ahead, each used once

    @classmethod
    def from_bytes(cls, context: Context, data: bytes) -> EvaluationKey:
        """Expand a seeded public key (`SecretKey.public_key_bytes`) and hand it to SEAL's
        validating loader."""
        if len(data) != context.public_key_bytes:
            raise MalformedPayloadError(
                f"public key must be {context.public_key_bytes} bytes for these parameters, "
                f"got {len(data)}"
            )
        primes = context.params.coeff_modulus
        a = expand_uniform(data[:SEED_BYTES], primes, 1, context.n, tag=PUBLIC_A_TAG)[:, 0]
        pk0, _ = _unpack_limbs(data, SEED_BYTES, primes, context.n, "public key")
        arrays = np.stack([pk0, a])
        serialized = Context._compose(context._pk_prefix, arrays)
        try:
            public = _SCRATCH.load(seal.PublicKey(), context.seal_context, serialized)
        except (RuntimeError, ValueError) as exc:
            raise MalformedPayloadError(f"public key rejected by SEAL: {exc}") from exc
        return cls(context, public)

    def encrypt_zero(self) -> Any:
        """A fresh public-key encryption of zero at the first data level (u*pk + e).

        Fresh means never used before: one that `prepare_spare` made ahead of time (while the
        worker was idle) is handed out once and dropped, so re-randomization is unchanged.
        """
        if self._spare_zeros:
            return self._spare_zeros.pop()
        return self._fresh_zero()

    def prepare_spare(self, limit: int) -> bool:
        """Make one encryption of zero ahead of time; False once `limit` are waiting."""
        if len(self._spare_zeros) >= limit:
            return False
        self._spare_zeros.append(self._fresh_zero())
        return True

    def _fresh_zero(self) -> Any:
        zero = seal.Ciphertext()
        self._encryptor.encrypt_zero(zero)
        return zero


class SecretKey:
    """The client's secret key and everything that needs it. Never leaves the client process."""

    def __init__(self, context: Context, secret: Any) -> None:
        self._context = context
        self._secret = secret
        self._encryptor = seal.Encryptor(context.seal_context, secret)
        self._decryptor = seal.Decryptor(context.seal_context, secret)
        self._ternary: np.ndarray | None = None
        self._product: NegacyclicProduct | None = None

    @classmethod
    def generate(cls, context: Context) -> SecretKey:
        return cls(context, seal.KeyGenerator(context.seal_context).secret_key())

    @classmethod
    def from_bytes(cls, context: Context, data: bytes) -> SecretKey:
        _check_header(data, "secret key", 4 * context.max_key_bytes)
        try:
            secret = _SCRATCH.load(seal.SecretKey(), context.seal_context, data)
        except (RuntimeError, ValueError) as exc:
            raise ParameterMismatchError(
                f"secret key does not match this model's parameters: {exc}"
            ) from exc
        return cls(context, secret)

    def to_bytes(self) -> bytes:
        return _SCRATCH.save(self._secret)

    def __repr__(self) -> str:  # never print key material
        return f"SecretKey(N={self._context.n}, <hidden>)"

    def public_key_bytes(self) -> bytes:
        """The public key as the seed of its uniform half plus its other half, bit-packed.

        SEAL's key generator makes pk = (-(a*s + e), a) in NTT form with `a` from its own
        generator, so `a` would travel whole: half the upload. Here `a` is replaced by a' expanded
        from a fresh public seed (SHAKE-128, exactly uniform) and pk0 is corrected to match:
        pk0 + (a - a')*s = -(a'*s + e), the same error e. The result is one fresh RLWE sample,
        as SEAL's own seeded objects are; SEAL's original key never leaves this method.
        """
        context = self._context
        public = seal.PublicKey()
        seal.KeyGenerator(context.seal_context, self._secret).create_public_key(public)
        pk0, a = context.ciphertext_arrays(public)  # (L, N) each, NTT form, key level
        s = context.plaintext_arrays(self._secret)  # (L, N), NTT form, key level
        seed = os.urandom(SEED_BYTES)
        primes = context.params.coeff_modulus
        a_seeded = expand_uniform(seed, primes, 1, context.n, tag=PUBLIC_A_TAG)[:, 0]
        corrected = replace_uniform_half(pk0, a, a_seeded, s, primes)
        limbs = [pack_bits(limb, q.bit_length()) for limb, q in zip(corrected, primes, strict=True)]
        return seed + b"".join(limbs)

    def encrypt(self, coefficients: np.ndarray) -> bytes:
        """Seeded symmetric encryption: the uniform half of the ciphertext travels as a seed."""
        plain = self._context.plaintext_from_coefficients(coefficients)
        serialized = _SCRATCH.save(self._encryptor.encrypt_symmetric(plain))
        return self._context.compact_request(serialized)

    def ternary(self) -> np.ndarray:
        """The secret polynomial's coefficients in {-1, 0, 1} (int8), recovered once.

        Decrypting (c0, c1) = (0, K) with K = round(q1/t) at the last level gives
        round(t*K*s/q1) = s exactly, since t*K/q1 is within t/(2*q1) <= 1/4 of 1.
        """
        if self._ternary is None:
            q1, t = self._context.last_prime, self._context.params.plain_modulus
            c1 = np.zeros(self._context.n, dtype=np.uint64)
            c1[0] = (q1 + t // 2) // t
            values = self.decrypt_last_level(np.zeros(self._context.n, dtype=np.uint64), c1)
            if np.abs(values).max() > 1:
                raise ParameterMismatchError("secret key is not ternary for these parameters")
            self._ternary = values.astype(np.int8)
        return self._ternary

    def encrypt_columns(self, columns: np.ndarray) -> bytes:
        """n fresh symmetric encryptions of sum_b columns[i, b] X^b, as a compact batch request.

        SEAL's equation, computed with numpy: c1 = a (expanded from a fresh public seed),
        c0 = -(a*s + e) + round(q*m/t) with e from SEAL's default centered binomial. Works
        through the n ciphertexts in cache-sized blocks.
        """
        context = self._context
        columns = np.asarray(columns, dtype=np.int64)
        count, width = columns.shape
        if width > context.n:
            raise ValueError(f"at most N={context.n} values per polynomial")
        if self._product is None:
            self._product = NegacyclicProduct(self.ternary())
        primes = context.params.data_primes
        t = context.params.plain_modulus
        columns = np.mod(columns, t)
        # round(q*m/t) mod q_j for every value that occurs (inputs are small integers)
        tables = context.scale_plain(np.arange(int(columns.max(initial=0)) + 1))
        seed = os.urandom(SEED_BYTES)
        header = _FINGERPRINT_BYTES + SEED_BYTES
        sizes = [count * context.n * q.bit_length() // 8 for q in primes]  # N is a multiple of 8
        out = np.zeros(header + sum(sizes) + 8, dtype=np.uint8)
        out[:_FINGERPRINT_BYTES] = np.frombuffer(
            context.params.fingerprint[:_FINGERPRINT_BYTES], np.uint8
        )
        out[_FINGERPRINT_BYTES:header] = np.frombuffer(seed, np.uint8)
        offsets = [header + sum(sizes[:j]) for j in range(len(primes))]
        for start in range(0, count, _FFT_ROWS):
            stop = min(count, start + _FFT_ROWS)
            a = expand_uniform(seed, primes, stop - start, context.n, first=start)
            error = centered_binomial((stop - start, context.n)).astype(np.int64)
            for j, q in enumerate(primes):
                qq = np.int64(q)
                value = -self._product.multiply(a[j], q).view(np.int64)  # -(a*s) in (-q, 0]
                value[:, :width] += np.take(tables[j], columns[start:stop]).view(np.int64)
                value -= error  # now in (-q - 21, q + 21)
                value += (value >> np.int64(63)) & qq
                value += (value >> np.int64(63)) & qq
                value -= qq
                value += (value >> np.int64(63)) & qq
                offsets[j] = pack_bits_into(value.view(np.uint64), q.bit_length(), out, offsets[j])
        return out[:-8].tobytes()

    def decrypt_last_level(self, c0: np.ndarray, c1: np.ndarray) -> np.ndarray:
        """Decrypt a one-prime ciphertext given as arrays; returns coefficients centered mod t."""
        arrays = np.stack([c0, c1]).reshape(2, 1, self._context.n)
        ciphertext = self._context.ciphertext_from_arrays(arrays, last_level=True)
        plain = seal.Plaintext()
        self._decryptor.decrypt(ciphertext, plain)
        return self._plain_coefficients(plain)

    def decrypt_full(self, ciphertext: Any) -> np.ndarray:
        """Decrypt a SEAL ciphertext at any level (tests use it to inspect server results)."""
        plain = seal.Plaintext()
        self._decryptor.decrypt(ciphertext, plain)
        return self._plain_coefficients(plain)

    def noise_budget(self, ciphertext: Any) -> int:
        return int(self._decryptor.invariant_noise_budget(ciphertext))

    def _plain_coefficients(self, plain: Any) -> np.ndarray:
        raw = plaintext_arrays(plain, self._context.n)
        values = np.zeros(self._context.n, dtype=np.int64)
        t = self._context.params.plain_modulus
        centered = raw.astype(object)
        centered = np.where(raw >= np.uint64((t + 1) // 2), centered - t, centered)
        values[: raw.size] = centered.astype(np.int64)
        return values
