"""The BFV adapter: the only module of the linear path that imports the SEAL binding.

Binding choice: Microsoft SEAL 4.1 through TenSEAL's raw `tenseal.sealapi`, not seal-python.
seal-python 4.4 has in-memory `to_string`/`load_bytes` and typed stubs, but our plans need
what only TenSEAL gives: seeded symmetric encryption (`encrypt_symmetric` returning SEAL's
`Serializable`; seal-python's returns the expanded ciphertext, twice the bytes of every
request), zstd serialization (seal-python's wheel is built without it), and SEAL's validating
loaders for untrusted input. TenSEAL's one wart, save/load through file paths only, is met with
anonymous memory files (`heinfer.he.scratch`), and kept off the per-request path: requests are
encrypted, expanded and decrypted in numpy (SEAL's SHAKE-256 seeded format, so SEAL itself
still loads them), and only keys and the Blake2xb-seeded requests of other clients go through
SEAL's loader.

SEAL's byte format is read and written only by `heinfer.he.serialization`, and the lattice
arithmetic and sampling done in numpy (request encryption, seeded keys, flooding, masks) live
in `heinfer.rlwe`; this module connects them to SEAL's objects.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import tenseal.sealapi as seal

from heinfer.errors import MalformedPayloadError, ParameterMismatchError
from heinfer.he import _bits
from heinfer.he import serialization as fmt
from heinfer.he.params import BFVParameters
from heinfer.he.scratch import SCRATCH
from heinfer.he.serialization import PRNG_SEED_BYTES as SEAL_SEED_BYTES
from heinfer.rlwe.encrypt import bfv_decode, replace_uniform_half, scale_plain, symmetric_c0
from heinfer.rlwe.ring import (
    NegacyclicProduct,
    SmallProduct,
    negacyclic_at,
)
from heinfer.rlwe.sampling import (
    PUBLIC_A_TAG,
    SEED_BYTES,
    centered_binomial,
    expand_uniform,
    seal_uniform,
    uniform_flood,
    uniform_mod,
)

__all__ = [
    "Context",
    "EvaluationKey",
    "RequestCiphertext",
    "SecretKey",
    "find_ntt_primes",
    "pack_bits",
    "pack_bits_into",
    "unpack_bits",
]

_FINGERPRINT_BYTES = 8
_ENCRYPT_ROWS = 64  # ciphertexts per block in `SecretKey.encrypt_columns` (cache-sized)
_SCRATCH = SCRATCH
_SMALL_TABLE_MAX = 1 << 17


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Pack non-negative integers below 2**bits into exactly ceil(n*bits/8) bytes.

    The format is one little-endian bit stream: value k occupies bits [k*bits, (k+1)*bits).
    Higher bits of a value are dropped.
    """
    flat = np.ascontiguousarray(values, dtype="<u8").reshape(-1)
    out = np.zeros((flat.size * bits + 7) // 8, dtype=np.uint8)
    _bits.pack_into(flat, bits, out, 0)
    return out.tobytes()


def pack_bits_into(values: np.ndarray, bits: int, out: np.ndarray, offset: int) -> int:
    """`pack_bits` written into the uint8 buffer `out` at byte `offset`; returns the offset
    after it. The bytes after the packed ones are left as they were, so consecutive calls can
    fill one buffer."""
    flat = np.ascontiguousarray(values, dtype="<u8").reshape(-1)
    return _bits.pack_into(flat, bits, out, offset)


def unpack_bits(
    data: bytes | memoryview, count: int, bits: int, out: np.ndarray | None = None
) -> np.ndarray:
    """Inverse of `pack_bits`; the caller has checked len(data). Fills `out` when given."""
    if out is None:
        out = np.empty(count, dtype=np.uint64)
    _bits.unpack_into(data, bits, out[:count])
    return out


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
        self.last_prime = int(params.coeff_modulus[0])
        self.tag = params.fingerprint[:_FINGERPRINT_BYTES]  # what every request starts with
        self._small_table = np.zeros((len(params.data_primes), 0), dtype=np.uint64)
        self._build_templates()

    # -- templates: SEAL metadata prefixes we reuse to write objects from numpy arrays --------
    def _build_templates(self) -> None:
        keygen = seal.KeyGenerator(self.seal_context)
        encryptor = seal.Encryptor(self.seal_context, keygen.secret_key())
        plain = self.plaintext_from_coefficients(None)
        levels = len(self.params.data_primes)
        seeded = _SCRATCH.save(encryptor.encrypt_symmetric(plain))
        self._seeded_prefix, _, seed = fmt.seeded_ciphertext_parts(seeded, self.n, levels)
        self._seed_bytes = len(seed)
        fresh = seal.Ciphertext()
        encryptor.encrypt_symmetric(plain, fresh)
        self._ct_prefix_first = fmt.ciphertext_prefix(_SCRATCH.save(fresh))
        self._ct_prefix_first_ntt = fmt.ntt_form_prefix(self._ct_prefix_first)
        self._shake_seed_prefix = fmt.seed_object(fmt.PRNG_SHAKE256, bytes(SEAL_SEED_BYTES))[
            :-SEAL_SEED_BYTES
        ]
        last = seal.Ciphertext()
        self.evaluator.mod_switch_to(fresh, list(self.last_parms_id), last)
        self._ct_prefix_last = fmt.ciphertext_prefix(_SCRATCH.save(last))
        public = seal.PublicKey()
        keygen.create_public_key(public)
        self._pk_prefix = fmt.ciphertext_prefix(_SCRATCH.save(public))
        self._data_bits = [q.bit_length() for q in self.params.data_primes]
        self.request_bytes = (
            _FINGERPRINT_BYTES
            + sum((self.n * b + 7) // 8 for b in self._data_bits)
            + self._seed_bytes
        )
        self.max_key_bytes = 2 * self.n * len(self.params.coeff_modulus) * 8 + 4096
        polynomial = sum((self.n * q.bit_length() + 7) // 8 for q in self.params.coeff_modulus)
        self.public_key_bytes = SEED_BYTES + polynomial  # seeded: see SecretKey.public_key_bytes

    def plaintext_from_coefficients(self, coefficients: np.ndarray | None) -> Any:
        """A Plaintext with N coefficients taken mod t (negative values wrap, as BFV expects)."""
        t = self.params.plain_modulus
        values = np.zeros(self.n, dtype=np.uint64)
        if coefficients is not None:
            coeffs = np.asarray(coefficients, dtype=np.int64)
            values[: coeffs.size] = np.mod(coeffs, t).astype(np.uint64)
        return _SCRATCH.load(seal.Plaintext(), self.seal_context, fmt.plaintext_bytes(values))

    def ntt_plaintext(self, coefficients: np.ndarray) -> Any:
        """Weights as an NTT-form plaintext at the first data level: precomputed once per plan."""
        plain = self.plaintext_from_coefficients(coefficients)
        self.evaluator.transform_to_ntt_inplace(plain, list(self.first_parms_id))
        return plain

    # -- ciphertext <-> numpy -----------------------------------------------------------------
    @staticmethod
    def ciphertext_arrays(ciphertext: Any) -> np.ndarray:
        """(size, L, N) uint64 copy of a ciphertext's RNS coefficients."""
        return fmt.ciphertext_arrays(ciphertext)

    def plaintext_arrays(self, plain: Any) -> np.ndarray:
        """A plaintext's raw coefficients: (N,) mod t, or (L, N) RNS values when in NTT form."""
        return fmt.plaintext_arrays(plain, self.n)

    def to_ntt(self, ciphertext: Any) -> Any:
        result = seal.Ciphertext()
        self.evaluator.transform_to_ntt(ciphertext, result)
        return result

    def ciphertext_from_arrays(self, arrays: np.ndarray, *, last_level: bool) -> Any:
        prefix = self._ct_prefix_last if last_level else self._ct_prefix_first
        data = fmt.compose_ciphertext(prefix, arrays)
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
        """(L, N) values uniform modulo each data prime, from the OS CSPRNG (rejection sampled)."""
        return uniform_mod(self.params.data_primes, self.n)

    def load_request(self, data: bytes) -> RequestCiphertext:
        """Validate and load one compact client ciphertext; SEAL re-expands c1 from the seed."""
        c0, offset = self._request_c0(data)
        return self._seal_request(c0, bytes(data[offset:]))

    def request_arrays(self, data: bytes | memoryview) -> tuple[np.ndarray, np.ndarray]:
        """Validate one compact client ciphertext; (c0, c1), each (L, N) uint64.

        A SHAKE-256 seed (what `SecretKey.encrypt` writes) is expanded in numpy exactly as
        SEAL's loader would (`heinfer.rlwe.sampling.seal_uniform`); any other seed object
        (SEAL's own Blake2xb, as node-seal writes) goes through SEAL's validating loader, so
        the same bytes are accepted and refused either way.
        """
        c0, offset = self._request_c0(data)
        tail = bytes(data[offset:])
        if tail[:-SEAL_SEED_BYTES] == self._shake_seed_prefix:
            return c0, seal_uniform(tail[-SEAL_SEED_BYTES:], self.params.data_primes, self.n)
        ciphertext = self._seal_request(c0, tail).ciphertext
        return c0, self.ciphertext_arrays(ciphertext)[1]

    def request_bytes_from(self, c0: np.ndarray, prng_type: int, seed: bytes) -> bytes:
        """A compact request (tag, c0 bit-packed per data prime, SEAL's seed object)."""
        packed = b"".join(pack_bits(c0[i], b) for i, b in enumerate(self._data_bits))
        tag = self.tag
        return tag + packed + fmt.seed_object(prng_type, seed)

    def _request_c0(self, data: bytes | memoryview) -> tuple[np.ndarray, int]:
        """Tag, exact length and c0 of a compact request; c0 (L, N) and the seed's offset."""
        if len(data) <= _FINGERPRINT_BYTES:
            raise MalformedPayloadError(f"ciphertext of {len(data)} bytes is too short")
        if data[:_FINGERPRINT_BYTES] != self.tag:
            raise ParameterMismatchError(
                "ciphertext was made for other encryption parameters: fetch the model's "
                "manifest again and re-encrypt"
            )
        if len(data) != self.request_bytes:
            raise MalformedPayloadError(
                f"ciphertext must be {self.request_bytes} bytes for these parameters, "
                f"got {len(data)}"
            )
        primes = self.params.data_primes
        return _unpack_limbs(data, _FINGERPRINT_BYTES, primes, self.n, "ciphertext")

    def _seal_request(self, c0: np.ndarray, tail: bytes) -> RequestCiphertext:
        serialized = fmt.seeded_ciphertext(self._seeded_prefix, c0, tail)
        try:
            ciphertext = _SCRATCH.load(seal.Ciphertext(), self.seal_context, serialized)
        except (RuntimeError, ValueError) as exc:
            raise MalformedPayloadError("ciphertext rejected by SEAL's validation") from exc
        if ciphertext.size() != 2 or ciphertext.is_ntt_form():
            raise MalformedPayloadError("ciphertext must be a fresh 2-component BFV ciphertext")
        return RequestCiphertext(self, ciphertext)

    # -- coeff-batch requests: n fresh ciphertexts travelling as arrays --------------------------
    def batch_request_bytes(self, count: int) -> int:
        """Size of a compact batch request of `count` ciphertexts (tag + seed + c0 limbs)."""
        per = sum((self.n * b + 7) // 8 for b in self._data_bits)
        return _FINGERPRINT_BYTES + SEED_BYTES + count * per

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
        if data[:_FINGERPRINT_BYTES] != self.tag:
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
        """round(q*m/t) modulo each data prime (`heinfer.rlwe.encrypt.scale_plain`)."""
        return scale_plain(values, self.params.data_primes, self.params.plain_modulus)

    def scale_small(self, values: np.ndarray) -> np.ndarray:
        """`scale_plain` of values in [0, t) through a table of round(q*m/t) for every m up to
        the largest seen (grown in powers of two, at most 2**17 entries: client inputs)."""
        values = np.asarray(values, dtype=np.int64)
        top = int(values.max(initial=0)) + 1
        if top > _SMALL_TABLE_MAX:
            return self.scale_plain(values)
        if self._small_table.shape[1] < top:
            size = 1 << (top - 1).bit_length()
            self._small_table = self.scale_plain(np.arange(size))
        return self._small_table[:, values]

    def uniform_flood(self, shape: tuple[int, ...], log2_bound: int) -> np.ndarray:
        """Integers uniform in [-2**k, 2**k) modulo each data prime, from the OS
        (`heinfer.rlwe.sampling.uniform_flood`)."""
        return uniform_flood(self.params.data_primes, shape, log2_bound)

    def load_evaluation_key(self, data: bytes) -> EvaluationKey:
        return EvaluationKey.from_bytes(self, data)

    def data_level_coefficients(self, ntt_arrays: np.ndarray) -> np.ndarray:
        """(size, L', N) NTT-form arrays at the key level or first data level -> (size, L, N)
        coefficient form at the data primes (SEAL's inverse NTT; once per key, not per request)."""
        levels = len(self.params.data_primes)
        data = fmt.compose_ciphertext(self._ct_prefix_first_ntt, ntt_arrays[:, :levels])
        ciphertext = _SCRATCH.load(seal.Ciphertext(), self.seal_context, data)
        self.evaluator.transform_from_ntt_inplace(ciphertext)
        return self.ciphertext_arrays(ciphertext)


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
        self._public_key = public_key
        self._encryptor: Any = None
        self.nbytes = 2 * context.n * len(context.params.coeff_modulus) * 8
        self._derived: dict[object, tuple[np.ndarray, ...]] = {}

    def coefficients(self) -> np.ndarray:
        """(pk0, pk1) at the data primes in coefficient form, (2, L, N) uint64: the public key
        restricted to the data primes is itself an RLWE sample, pk0 + pk1*s = -e mod q_j.
        Through SEAL (about a millisecond): plans derive what they keep from it once per key."""
        context = self._context
        return context.data_level_coefficients(context.ciphertext_arrays(self._public_key))

    def derived(
        self, name: object, make: Callable[[], tuple[np.ndarray, ...]]
    ) -> tuple[np.ndarray, ...]:
        """Arrays precomputed from this key (a plan's spectra of it), made once and counted in
        `nbytes`, so the key cache bounds them."""
        if name not in self._derived:
            arrays = make()
            self._derived[name] = arrays
            self.nbytes += sum(a.nbytes for a in arrays)
        return self._derived[name]

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
        serialized = fmt.compose_ciphertext(context._pk_prefix, arrays)
        try:
            public = _SCRATCH.load(seal.PublicKey(), context.seal_context, serialized)
        except (RuntimeError, ValueError) as exc:
            raise MalformedPayloadError("public key rejected by SEAL's validation") from exc
        return cls(context, public)

    def encrypt_zero(self) -> Any:
        """A fresh public-key encryption of zero at the first data level (SEAL's u*pk + e)."""
        if self._encryptor is None:
            self._encryptor = seal.Encryptor(self._context.seal_context, self._public_key)
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
        self._request_product: tuple[SmallProduct, np.ndarray] | None = None

    @classmethod
    def generate(cls, context: Context) -> SecretKey:
        return cls(context, seal.KeyGenerator(context.seal_context).secret_key())

    @classmethod
    def from_bytes(cls, context: Context, data: bytes) -> SecretKey:
        fmt.check_header(data, "secret key", 4 * context.max_key_bytes)
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
        """Seeded symmetric encryption: the uniform half of the ciphertext travels as a seed.

        SEAL's equation in numpy: c1 = a, expanded from a fresh 64-byte OS seed by SEAL's own
        SHAKE-256 generator (`seal_uniform`), c0 = -(a*s + e) + round(q*m/t) with SEAL's
        centered binomial e; written in SEAL's seeded form with PRNG type SHAKE-256, so SEAL's
        loader expands the same c1 (servers that load requests through SEAL accept it).
        """
        context = self._context
        primes = context.params.data_primes
        t = context.params.plain_modulus
        values = np.mod(np.asarray(coefficients, dtype=np.int64).reshape(1, -1), t)
        if values.shape[1] > context.n:
            raise ValueError(f"at most N={context.n} values per polynomial")
        seed = os.urandom(SEAL_SEED_BYTES)
        a = seal_uniform(seed, primes, context.n)
        error = centered_binomial((1, context.n))
        scaled = context.scale_small(values)
        if self._request_product is None:  # one FFT product for every prime (|s|_1 <= N)
            product = SmallProduct(context.n, context.n, primes)
            self._request_product = product, product.spectrum(self.ternary())
        product, secret_spectrum = self._request_product
        a_s = product.reduce(product.digit_spectra(a) * secret_spectrum)
        c0 = np.stack(
            [
                symmetric_c0(a_s[j : j + 1], scaled[j], error, q)[0]
                for j, q in enumerate(primes)
            ]
        )
        return context.request_bytes_from(c0, fmt.PRNG_SHAKE256, seed)

    def _secret_product(self) -> NegacyclicProduct:
        if self._product is None:
            self._product = NegacyclicProduct(self.ternary())
        return self._product

    def decrypt_coefficients(
        self, c0: np.ndarray, c1: np.ndarray, coefficients: Sequence[int]
    ) -> np.ndarray:
        """Decrypt a one-prime ciphertext at a few coefficients only: c0 (m,) at those
        coefficients, c1 (N,), both uint64 below the last prime; centered int64 values.

        (c0 + c1*s)[k] needs one dot product of c1 with s read backwards from k
        (`negacyclic_at`), then BFV's round(t*v/q) (`bfv_decode`).
        """
        q = self._context.last_prime
        at = np.asarray(coefficients, dtype=np.int64)
        c1_s = negacyclic_at(self.ternary()[None], np.asarray(c1, np.uint64)[None], at, 0, (q,))[0]
        total = np.asarray(c0, dtype=np.uint64) + c1_s
        total -= np.uint64(q) * (total >= np.uint64(q))
        return bfv_decode(total, q, self._context.params.plain_modulus)

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

        SEAL's equation, computed with numpy (`heinfer.rlwe.encrypt.symmetric_c0`): c1 = a
        (expanded from a fresh public seed), c0 = -(a*s + e) + round(q*m/t) with e from SEAL's
        default centered binomial. Going through SEAL would cost a file round trip and a zstd
        pass per ciphertext, several times the arithmetic; this works through the n
        ciphertexts in cache-sized blocks.
        """
        context = self._context
        columns = np.asarray(columns, dtype=np.int64)
        count, width = columns.shape
        if width > context.n:
            raise ValueError(f"at most N={context.n} values per polynomial")
        product = self._secret_product()
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
            context.tag, np.uint8
        )
        out[_FINGERPRINT_BYTES:header] = np.frombuffer(seed, np.uint8)
        offsets = [header + sum(sizes[:j]) for j in range(len(primes))]
        for start in range(0, count, _ENCRYPT_ROWS):
            stop = min(count, start + _ENCRYPT_ROWS)
            a = expand_uniform(seed, primes, stop - start, context.n, first=start)
            error = centered_binomial((stop - start, context.n))
            for j, q in enumerate(primes):
                scaled = np.take(tables[j], columns[start:stop])
                c0 = symmetric_c0(product.multiply(a[j], q), scaled, error, q)
                offsets[j] = pack_bits_into(c0, q.bit_length(), out, offsets[j])
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
        raw = fmt.plaintext_arrays(plain, self._context.n)
        values = np.zeros(self._context.n, dtype=np.int64)
        t = self._context.params.plain_modulus
        centered = raw.astype(object)
        centered = np.where(raw >= np.uint64((t + 1) // 2), centered - t, centered)
        values[: raw.size] = centered.astype(np.int64)
        return values
