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

import itertools
import os
import struct
import tempfile
import threading
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import tenseal.sealapi as seal
import zstandard

from heinfer.errors import MalformedPayloadError, ParameterMismatchError
from heinfer.he.params import BFVParameters

__all__ = [
    "Context",
    "EvaluationKey",
    "RequestCiphertext",
    "SecretKey",
    "find_ntt_primes",
    "pack_bits",
    "unpack_bits",
]

_HEADER = struct.Struct("<HBBBBHQ")
_SEAL_MAGIC = 0xA15E
_COMPR_NONE, _COMPR_ZSTD = 0, 2
# parms_id (4 x u64), is_ntt_form (u8), size, N, L (u64 each), scale (f64), correction (u64)
_CT_META = struct.Struct("<4QBQQQdQ")
_MAX_DECOMPRESSED = 64 << 20
_FINGERPRINT_BYTES = 8

T = TypeVar("T")


def _scratch_dir() -> Path:
    base = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else Path(tempfile.gettempdir())
    return Path(tempfile.mkdtemp(prefix="heinfer-", dir=base))


class _Scratch:
    """Per-process scratch files for the path-only SEAL binding; unique per thread and call."""

    def __init__(self) -> None:
        self._dir: Path | None = None
        self._pid = 0
        self._counter = itertools.count()

    def path(self) -> str:
        if self._dir is None or self._pid != os.getpid():
            self._dir, self._pid = _scratch_dir(), os.getpid()
        return str(self._dir / f"{threading.get_ident()}-{next(self._counter)}")

    def save(self, obj: Any) -> bytes:
        path = self.path()
        try:
            obj.save(path)
            with open(path, "rb") as fh:
                return fh.read()
        finally:
            _unlink(path)

    def load(self, obj: T, context: Any, data: bytes) -> T:
        path = self.path()
        try:
            with open(path, "wb") as fh:
                fh.write(data)
            obj.load(context, path)  # type: ignore[attr-defined]
            return obj
        finally:
            _unlink(path)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


_SCRATCH = _Scratch()


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


def _payload(data: bytes) -> bytes:
    """The (decompressed) bytes after a SEAL header."""
    compr = _HEADER.unpack_from(data)[4]
    if compr == _COMPR_NONE:
        return data[_HEADER.size :]
    try:
        return zstandard.ZstdDecompressor().decompress(
            data[_HEADER.size :], max_output_size=_MAX_DECOMPRESSED
        )
    except zstandard.ZstdError as exc:
        raise MalformedPayloadError(f"corrupt compressed SEAL data: {exc}") from exc


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Pack non-negative integers below 2**bits into exactly ceil(n*bits/8) bytes."""
    flat = np.ascontiguousarray(values, dtype="<u8").reshape(-1)
    as_bits = np.unpackbits(flat.view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")
    return np.packbits(as_bits[:, :bits].reshape(-1), bitorder="little").tobytes()


def unpack_bits(data: bytes, count: int, bits: int) -> np.ndarray:
    """Inverse of `pack_bits`; the caller has checked len(data)."""
    raw = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
    raw = raw[: count * bits].reshape(count, bits)
    padded = np.zeros((count, 64), dtype=np.uint8)
    padded[:, :bits] = raw
    return np.packbits(padded, axis=1, bitorder="little").view("<u8").reshape(count).copy()


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
        self._build_templates()

    # -- templates: SEAL metadata prefixes we reuse to write objects from numpy arrays --------
    def _build_templates(self) -> None:
        keygen = seal.KeyGenerator(self.seal_context)
        encryptor = seal.Encryptor(self.seal_context, keygen.secret_key())
        plain = self.plaintext_from_coefficients(None)
        seeded = _payload(_SCRATCH.save(encryptor.encrypt_symmetric(plain)))
        self._seeded_prefix = seeded[: _CT_META.size + 16 + 8]
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

    @staticmethod
    def _prefix(serialized: bytes) -> bytes:
        """Metadata + DynArray header of a ciphertext-shaped object (everything but the data)."""
        return _payload(serialized)[: _CT_META.size + 16 + 8]

    @staticmethod
    def _compose(prefix: bytes, data: np.ndarray) -> bytes:
        body = prefix + np.ascontiguousarray(data, dtype="<u8").tobytes()
        return _seal_header(_COMPR_NONE, _HEADER.size + len(body)) + body

    def plaintext_from_coefficients(self, coefficients: np.ndarray | None) -> Any:
        """A Plaintext with N coefficients taken mod t (negative values wrap, as BFV expects)."""
        t = self.params.plain_modulus
        values = np.zeros(self.n, dtype=np.uint64)
        if coefficients is not None:
            coeffs = np.asarray(coefficients, dtype=np.int64)
            values[: coeffs.size] = np.mod(coeffs, t).astype(np.uint64)
        # Plaintext metadata: parms_id (zero: not NTT), coeff_count, scale; then a DynArray.
        dyn = _seal_header(_COMPR_NONE, 16 + 8 + 8 * self.n) + struct.pack("<Q", self.n)
        body = struct.pack("<4QQd", 0, 0, 0, 0, self.n, 1.0) + dyn + values.astype("<u8").tobytes()
        data = _seal_header(_COMPR_NONE, _HEADER.size + len(body)) + body
        return _SCRATCH.load(seal.Plaintext(), self.seal_context, data)

    def ntt_plaintext(self, coefficients: np.ndarray) -> Any:
        """Weights as an NTT-form plaintext at the first data level: precomputed once per plan."""
        plain = self.plaintext_from_coefficients(coefficients)
        self.evaluator.transform_to_ntt_inplace(plain, list(self.first_parms_id))
        return plain

    # -- ciphertext <-> numpy -----------------------------------------------------------------
    def ciphertext_arrays(self, ciphertext: Any) -> np.ndarray:
        """(size, L, N) uint64 view of a ciphertext's RNS coefficients."""
        payload = _payload(_SCRATCH.save(ciphertext))
        size, n, levels = struct.unpack_from("<QQQ", payload, 33)
        count = size * n * levels
        data = np.frombuffer(payload, dtype="<u8", count=count, offset=len(payload) - 8 * count)
        return data.reshape(size, levels, n).copy()

    def plaintext_arrays(self, plain: Any) -> np.ndarray:
        """A plaintext's raw coefficients: (N,) mod t, or (L, N) RNS values when in NTT form."""
        payload = _payload(_SCRATCH.save(plain))
        (count,) = struct.unpack_from("<Q", payload, 32)
        data = np.frombuffer(payload, dtype="<u8", count=count, offset=len(payload) - 8 * count)
        return data.reshape(-1, self.n).copy() if count > self.n else data.copy()

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
        """(L, N) values uniform modulo each data prime, from the OS CSPRNG (rejection sampled)."""
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
        payload = _payload(serialized)
        count = self.n * len(self._data_bits)
        start = len(self._seeded_prefix)
        c0 = np.frombuffer(payload, dtype="<u8", count=count, offset=start).reshape(-1, self.n)
        packed = b"".join(pack_bits(c0[i], b) for i, b in enumerate(self._data_bits))
        return self.params.fingerprint[:_FINGERPRINT_BYTES] + packed + payload[start + 8 * count :]

    def load_request(self, data: bytes) -> RequestCiphertext:
        """Validate and load one compact client ciphertext; SEAL re-expands c1 from the seed."""
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
        limbs, offset = [], _FINGERPRINT_BYTES
        for q, bits in zip(self.params.data_primes, self._data_bits, strict=True):
            size = (self.n * bits + 7) // 8
            limb = unpack_bits(data[offset : offset + size], self.n, bits)
            if np.any(limb >= np.uint64(q)):
                raise MalformedPayloadError("ciphertext coefficient out of range")
            limbs.append(limb)
            offset += size
        body = (
            self._seeded_prefix
            + np.stack(limbs).astype("<u8").tobytes()
            + data[offset:]
        )
        serialized = _seal_header(_COMPR_NONE, _HEADER.size + len(body)) + body
        try:
            ciphertext = _SCRATCH.load(seal.Ciphertext(), self.seal_context, serialized)
        except (RuntimeError, ValueError) as exc:
            raise MalformedPayloadError(f"ciphertext rejected by SEAL: {exc}") from exc
        if ciphertext.size() != 2 or ciphertext.is_ntt_form():
            raise MalformedPayloadError("ciphertext must be a fresh 2-component BFV ciphertext")
        return RequestCiphertext(self, ciphertext)

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

    @classmethod
    def from_bytes(cls, context: Context, data: bytes) -> EvaluationKey:
        """Unpack our bit-packed public key and hand it to SEAL's validating loader."""
        primes = context.params.coeff_modulus
        bits = [q.bit_length() for q in primes]
        sizes = [(context.n * b + 7) // 8 for b in bits]
        expected = 2 * sum(sizes)
        if len(data) != expected:
            raise MalformedPayloadError(
                f"public key must be {expected} bytes for these parameters, got {len(data)}"
            )
        limbs, offset = [], 0
        for _ in range(2):
            for q, b, size in zip(primes, bits, sizes, strict=True):
                limb = unpack_bits(data[offset : offset + size], context.n, b)
                if np.any(limb >= np.uint64(q)):
                    raise MalformedPayloadError("public key coefficient out of range")
                limbs.append(limb)
                offset += size
        arrays = np.stack(limbs).reshape(2, len(primes), context.n)
        serialized = Context._compose(context._pk_prefix, arrays)
        try:
            public = _SCRATCH.load(seal.PublicKey(), context.seal_context, serialized)
        except (RuntimeError, ValueError) as exc:
            raise MalformedPayloadError(f"public key rejected by SEAL: {exc}") from exc
        return cls(context, public)

    def encrypt_zero(self) -> Any:
        """A fresh public-key encryption of zero at the first data level (u*pk + e)."""
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
        """The public key, bit-packed at each prime's exact width (SEAL's zstd gets ~20% more)."""
        public = seal.PublicKey()
        seal.KeyGenerator(self._context.seal_context, self._secret).create_public_key(public)
        payload = _payload(_SCRATCH.save(public))
        primes = self._context.params.coeff_modulus
        count = 2 * len(primes) * self._context.n
        arrays = np.frombuffer(payload, dtype="<u8", count=count, offset=len(payload) - 8 * count)
        arrays = arrays.reshape(2, len(primes), self._context.n)
        return b"".join(
            pack_bits(arrays[c, i], q.bit_length())
            for c in range(2)
            for i, q in enumerate(primes)
        )

    def encrypt(self, coefficients: np.ndarray) -> bytes:
        """Seeded symmetric encryption: the uniform half of the ciphertext travels as a seed."""
        plain = self._context.plaintext_from_coefficients(coefficients)
        return self._context.compact_request(_SCRATCH.save(self._encryptor.encrypt_symmetric(plain)))

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
        payload = _payload(_SCRATCH.save(plain))
        (count,) = struct.unpack_from("<Q", payload, 32)
        values = np.zeros(self._context.n, dtype=np.int64)
        raw = np.frombuffer(payload, dtype="<u8", count=count, offset=len(payload) - 8 * count)
        t = self._context.params.plain_modulus
        centered = raw.astype(object)
        centered = np.where(raw >= np.uint64((t + 1) // 2), centered - t, centered)
        values[:count] = centered.astype(np.int64)
        return values
