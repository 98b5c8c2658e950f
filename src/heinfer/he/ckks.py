"""The CKKS adapter: the only module of the network path that imports the SEAL binding.

Everything the encrypted-network code (`heinfer.plans.network`) does with Microsoft SEAL goes
through this file: parameter selection, key generation, encoding, the few evaluator calls the
plans need, and (de)serialization of untrusted bytes with validation.

Binding: `tenseal.sealapi` (SEAL 4.1). Its quirks are hidden here:

* objects save/load only through file paths: each call gets its own anonymous memory file
  (`heinfer.he.scratch`), never a file on disk;
* `KeyGenerator.create_galois_keys(list)` takes Galois *elements*, not rotation steps, so we
  convert steps ourselves (`galois_element`, SEAL's generator 3);
* the seeded `Serializable` return values of key generation are not registered in the binding,
  so `ClientKeys.public_keys` writes SEAL's seeded form of each key itself (`_KeySeeder`, with
  the byte layout in `heinfer.he.serialization` and the arithmetic in `heinfer.rlwe`), which
  halves every key; ciphertexts from the client use seeded symmetric encryption
  (`encrypt_symmetric(plain)` -> Serializable), which halves requests.

Wire envelope: every object we emit is `MAGIC(4) | version(1) | kind(1) | fingerprint(8) | SEAL
bytes`. The fingerprint is a hash of the exact parameters (N and every prime), so bytes made for
other parameters are recognised *before* SEAL parses them (-> ParameterMismatchError) and bytes
that are not ours, truncated or corrupt fail SEAL's validating loader (-> MalformedPayloadError).
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tenseal.sealapi as seal

from heinfer.errors import MalformedPayloadError, ParameterMismatchError
from heinfer.he import serialization as fmt
from heinfer.he.scratch import SCRATCH
from heinfer.rlwe.encrypt import replace_uniform_half

__all__ = [
    "HE_STANDARD_MAX_LOG_Q",
    "KIND_CIPHERTEXT",
    "KIND_GALOIS",
    "KIND_PUBLIC",
    "KIND_RELIN",
    "KIND_SECRET",
    "CkksContext",
    "CkksParameters",
    "ClientKeys",
    "ServerKeys",
    "check_seeded",
    "galois_element",
    "select_parameters",
    "unwrap",
]

# HomomorphicEncryption.org Security Standard (Albrecht et al., Nov 2018), Table 1,
# "uniform ternary secret" rows (SEAL samples the secret from {-1, 0, 1}), classical attacks,
# lambda = 128: the largest total log2(q) (all primes, special prime included) per ring degree N.
#   N:        1024  2048  4096  8192  16384  32768
#   log2(q):    27    54   109   218    438    881
HE_STANDARD_MAX_LOG_Q: dict[int, int] = {
    1024: 27,
    2048: 54,
    4096: 109,
    8192: 218,
    16384: 438,
    32768: 881,
}

MAGIC = b"HNC1"
VERSION = 1
KIND_CIPHERTEXT, KIND_PUBLIC, KIND_RELIN, KIND_GALOIS, KIND_SECRET = 1, 2, 3, 4, 5
_KIND_NAMES = {
    1: "ciphertext",
    2: "public key",
    3: "relinearization keys",
    4: "Galois keys",
    5: "secret key",
}
_ENVELOPE = struct.Struct("<4sBB8s")
_MAX_OBJECT_BYTES = 256 << 20


_SCRATCH = SCRATCH


def galois_element(step: int, poly_modulus_degree: int) -> int:
    """SEAL's Galois element for a left rotation by `step` slots (generator 3, as in SEAL 4)."""
    slots = poly_modulus_degree // 2
    step %= slots
    if step == 0:
        raise ValueError("rotation by 0 needs no key")
    return pow(3, step, 2 * poly_modulus_degree)


# -- parameters ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class CkksParameters:
    """A CKKS parameter set by value (exact primes), so server and client agree bit for bit.

    `primes` follows SEAL: the last one is the special (key-switching) prime; ciphertexts live
    modulo the others, and SEAL drops data primes from the end (rescale / mod switch).
    """

    poly_modulus_degree: int
    primes: tuple[int, ...]

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def bit_sizes(self) -> list[int]:
        return [p.bit_length() for p in self.primes]

    @property
    def data_primes(self) -> tuple[int, ...]:
        return self.primes[:-1]

    @property
    def total_log_q(self) -> float:
        return sum(math.log2(p) for p in self.primes)

    @property
    def fingerprint(self) -> bytes:
        text = f"ckks:{self.poly_modulus_degree}:" + ",".join(map(str, self.primes))
        return hashlib.sha256(text.encode()).digest()[:8]

    def check_security(self) -> None:
        limit = HE_STANDARD_MAX_LOG_Q.get(self.poly_modulus_degree)
        if limit is None or self.total_log_q > limit:
            raise ValueError(
                f"log2(q)={self.total_log_q:.1f} exceeds the HE-standard 128-bit limit "
                f"{limit} for N={self.poly_modulus_degree}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "poly_modulus_degree": self.poly_modulus_degree,
            "coeff_modulus_bits": self.bit_sizes,
            "coeff_modulus": [str(p) for p in self.primes],
            "security_bits": 128,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CkksParameters:
        params = cls(int(data["poly_modulus_degree"]), tuple(int(p) for p in data["coeff_modulus"]))
        params.check_security()
        return params


def select_parameters(
    bit_sizes: Sequence[int], *, min_slots: int = 0, security: int = 128
) -> CkksParameters:
    """Smallest ring degree whose HE-standard row admits these primes (and `min_slots` slots).

    `bit_sizes` lists the data primes bottom-up followed by the special prime (SEAL order); the
    multiplicative depth of the plan is what determines how many there are.
    """
    if security != 128:
        raise ValueError("only the 128-bit row of the HE standard is used")
    total = sum(bit_sizes)
    for n in (4096, 8192, 16384, 32768):
        if n // 2 < min_slots or total > HE_STANDARD_MAX_LOG_Q[n]:
            continue
        primes = tuple(int(m.value()) for m in seal.CoeffModulus.Create(n, list(bit_sizes)))
        params = CkksParameters(n, primes)
        if params.total_log_q <= HE_STANDARD_MAX_LOG_Q[n]:
            return params
    raise ValueError(f"no ring degree up to 32768 fits {total} bits of modulus at 128-bit security")


def unwrap(
    fingerprint_expected: bytes, kind: int, data: bytes, max_bytes: int = _MAX_OBJECT_BYTES
) -> bytes:
    """The SEAL bytes inside one of our envelopes, after checking magic, version, kind,
    parameter fingerprint and SEAL header."""
    what = _KIND_NAMES.get(kind, "object")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MalformedPayloadError(f"{what}: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < _ENVELOPE.size + fmt.HEADER.size:
        raise MalformedPayloadError(f"{what}: {len(data)} bytes is too short")
    if len(data) > max_bytes:
        raise MalformedPayloadError(f"{what}: {len(data)} bytes exceeds {max_bytes}")
    magic, version, got_kind, fingerprint = _ENVELOPE.unpack_from(data)
    if magic != MAGIC:
        raise MalformedPayloadError(f"{what}: not a heinfer CKKS object (bad magic)")
    if version != VERSION:
        raise ParameterMismatchError(f"{what}: envelope version {version}, expected {VERSION}")
    if got_kind != kind:
        raise MalformedPayloadError(
            f"expected {what}, got {_KIND_NAMES.get(got_kind, f'kind {got_kind}')}"
        )
    if fingerprint != fingerprint_expected:
        raise ParameterMismatchError(
            f"{what} was made for other encryption parameters than this model's"
        )
    body = data[_ENVELOPE.size :]
    fmt.check_header(body, what, max_bytes)
    return body


def check_seeded(params: CkksParameters, kind: int, data: bytes) -> None:
    """Refuse a public, relinearization or Galois key not in SEAL's seeded form, without SEAL
    (the HTTP process calls this before storing a key; the loaders call it again)."""
    what = _KIND_NAMES[kind]
    body = unwrap(params.fingerprint, kind, data)
    n, levels = params.poly_modulus_degree, len(params.primes)
    try:
        if kind == KIND_PUBLIC:
            fmt.check_seeded_key(fmt.seal_payload(body, _MAX_OBJECT_BYTES), n, levels, what)
        elif kind in (KIND_RELIN, KIND_GALOIS):
            fmt.check_seeded_kswitch_keys(body, n, levels, what, _MAX_OBJECT_BYTES)
        else:
            raise MalformedPayloadError(f"{what} is not a key a server receives")
    except struct.error as exc:
        raise MalformedPayloadError(f"{what}: truncated ({exc})") from exc


# -- context -------------------------------------------------------------------------------------
class CkksContext:
    """SEAL context + encoder + evaluator for one parameter set, with levels by prime count."""

    def __init__(self, params: CkksParameters) -> None:
        params.check_security()
        self.params = params
        parms = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
        parms.set_poly_modulus_degree(params.poly_modulus_degree)
        parms.set_coeff_modulus([seal.Modulus(p) for p in params.primes])
        self.seal_context = seal.SEALContext(parms, True, seal.SEC_LEVEL_TYPE.TC128)
        if not self.seal_context.parameters_set():
            raise ValueError(
                f"SEAL rejected the parameters: {self.seal_context.parameters_error_message()}"
            )
        self.encoder = seal.CKKSEncoder(self.seal_context)
        self.evaluator = seal.Evaluator(self.seal_context)
        self.n = params.poly_modulus_degree
        self.slots = self.n // 2
        # parms_id per number of data primes still present (k = len(data_primes) .. 1).
        self._parms_by_count: dict[int, list[int]] = {}
        data = self.seal_context.first_context_data()
        while data is not None:
            count = len(data.parms().coeff_modulus())
            self._parms_by_count[count] = list(data.parms_id())
            data = data.next_context_data()
        self.top_count = len(params.data_primes)
        self.fingerprint = params.fingerprint

    # levels ----------------------------------------------------------------------------------
    def parms_id(self, prime_count: int) -> list[int]:
        return self._parms_by_count[prime_count]

    def prime_count(self, ct: Any) -> int:
        return int(ct.coeff_modulus_size())

    # encoding --------------------------------------------------------------------------------
    def encode(self, values: np.ndarray, scale: float, prime_count: int) -> Any:
        """Encode real (or complex) slot values at `scale` for a ciphertext at that level."""
        plain = seal.Plaintext()
        vals = np.asarray(values)
        if vals.shape != (self.slots,):
            full = np.zeros(self.slots, dtype=vals.dtype)
            full[: vals.size] = vals.reshape(-1)
            vals = full
        if np.iscomplexobj(vals):
            self.encoder.encode(
                vals.astype(np.complex128).tolist(), self.parms_id(prime_count), float(scale), plain
            )
        else:
            self.encoder.encode(
                vals.astype(np.float64).tolist(), self.parms_id(prime_count), float(scale), plain
            )
        return plain

    def encode_scalar(self, value: float, scale: float, prime_count: int) -> Any:
        """One real number in every slot (SEAL's scalar encode: ~100x cheaper than a vector)."""
        plain = seal.Plaintext()
        self.encoder.encode(float(value), self.parms_id(prime_count), float(scale), plain)
        return plain

    def decode(self, plain: Any) -> np.ndarray:
        return np.asarray(self.encoder.decode_double(plain), dtype=np.float64)

    def decode_complex(self, plain: Any) -> np.ndarray:
        """Real and imaginary parts of every slot (the imaginary parts carry error too)."""
        return np.asarray(self.encoder.decode_complex(plain), dtype=np.complex128)

    # evaluator (thin wrappers so plans never touch the binding) -------------------------------
    def rotate(self, ct: Any, step: int, galois: Any) -> Any:
        out = seal.Ciphertext()
        self.evaluator.rotate_vector(ct, step, galois, out)
        return out

    def multiply_plain(self, ct: Any, plain: Any) -> Any:
        out = seal.Ciphertext()
        self.evaluator.multiply_plain(ct, plain, out)
        return out

    def add_inplace(self, ct: Any, other: Any) -> None:
        self.evaluator.add_inplace(ct, other)

    def add(self, a: Any, b: Any) -> Any:
        out = seal.Ciphertext()
        self.evaluator.add(a, b, out)
        return out

    def add_plain_inplace(self, ct: Any, plain: Any) -> None:
        self.evaluator.add_plain_inplace(ct, plain)

    def add_plain(self, ct: Any, plain: Any) -> Any:
        out = seal.Ciphertext()
        self.evaluator.add_plain(ct, plain, out)
        return out

    def multiply_relin_rescale(self, a: Any, b: Any, relin: Any) -> Any:
        out = seal.Ciphertext()
        if a is b:
            self.evaluator.square(a, out)
        else:
            self.evaluator.multiply(a, b, out)
        self.evaluator.relinearize_inplace(out, relin)
        self.evaluator.rescale_to_next_inplace(out)
        return out

    def multiply(self, a: Any, b: Any) -> Any:
        """a * b left unrelinearized (3 polynomials): sums of such products need one
        relinearization in total instead of one each."""
        out = seal.Ciphertext()
        if a is b:
            self.evaluator.square(a, out)
        else:
            self.evaluator.multiply(a, b, out)
        return out

    def relinearize_inplace(self, ct: Any, relin: Any) -> None:
        if ct.size() > 2:
            self.evaluator.relinearize_inplace(ct, relin)

    def rescale_inplace(self, ct: Any) -> None:
        self.evaluator.rescale_to_next_inplace(ct)

    def mod_switch_to(self, ct: Any, prime_count: int) -> None:
        if self.prime_count(ct) != prime_count:
            self.evaluator.mod_switch_to_inplace(ct, self.parms_id(prime_count))

    # serialization ---------------------------------------------------------------------------
    def wrap(self, kind: int, seal_bytes: bytes) -> bytes:
        return _ENVELOPE.pack(MAGIC, VERSION, kind, self.fingerprint) + seal_bytes

    def unwrap(self, kind: int, data: bytes, *, max_bytes: int = _MAX_OBJECT_BYTES) -> bytes:
        return unwrap(self.fingerprint, kind, data, max_bytes)

    def _load(self, kind: int, obj: Any, data: bytes, max_bytes: int = _MAX_OBJECT_BYTES) -> Any:
        body = self.unwrap(kind, data, max_bytes=max_bytes)
        try:
            return _SCRATCH.load(obj, self.seal_context, body)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise MalformedPayloadError(
                f"{_KIND_NAMES[kind]} failed SEAL validation"
            ) from exc

    def save_ciphertext(self, ct: Any) -> bytes:
        return self.wrap(KIND_CIPHERTEXT, _SCRATCH.save(ct))

    def load_ciphertext(
        self,
        data: bytes,
        *,
        prime_count: int | None = None,
        scale: float | None = None,
        max_bytes: int = _MAX_OBJECT_BYTES,
    ) -> Any:
        """Validated load; `prime_count`/`scale` pin the level and scale the plan expects."""
        ct = self._load(KIND_CIPHERTEXT, seal.Ciphertext(), data, max_bytes)
        if ct.size() != 2:
            raise ParameterMismatchError(f"ciphertext has {ct.size()} polynomials, expected 2")
        if prime_count is not None and self.prime_count(ct) != prime_count:
            raise ParameterMismatchError(
                f"ciphertext is at a level with {self.prime_count(ct)} primes, expected "
                f"{prime_count}"
            )
        if scale is not None and not math.isclose(ct.scale, scale, rel_tol=1e-9):
            raise ParameterMismatchError(
                f"ciphertext scale 2^{math.log2(ct.scale):.3f} is not the manifest's "
                f"2^{math.log2(scale):.3f}"
            )
        return ct

    def check_seeded(self, kind: int, data: bytes) -> None:
        check_seeded(self.params, kind, data)

    def load_public_key(self, data: bytes) -> Any:
        self.check_seeded(KIND_PUBLIC, data)
        return self._load(KIND_PUBLIC, seal.PublicKey(), data)

    def load_relin_keys(self, data: bytes) -> Any:
        self.check_seeded(KIND_RELIN, data)
        return self._load(KIND_RELIN, seal.RelinKeys(), data)

    def load_galois_keys(self, data: bytes, steps: Sequence[int]) -> Any:
        self.check_seeded(KIND_GALOIS, data)
        keys = self._load(KIND_GALOIS, seal.GaloisKeys(), data)
        missing = [s for s in steps if not keys.has_key(galois_element(s, self.n))]
        if missing:
            raise ParameterMismatchError(f"Galois keys lack the rotation steps {missing}")
        return keys

    def encryptor(self, public_key: Any) -> Any:
        return seal.Encryptor(self.seal_context, public_key)

    def encrypt_public(self, encryptor: Any, plain: Any) -> Any:
        out = seal.Ciphertext()
        encryptor.encrypt(plain, out)
        return out


# -- keys ----------------------------------------------------------------------------------------
class ClientKeys:
    """Client-side key material: the secret key never leaves this object unless asked to."""

    def __init__(self, ctx: CkksContext, secret: Any | None = None) -> None:
        self.ctx = ctx
        if secret is None:
            secret = seal.KeyGenerator(ctx.seal_context).secret_key()
        self._secret = secret
        self._keygen = seal.KeyGenerator(ctx.seal_context, secret)
        self._encryptor = seal.Encryptor(ctx.seal_context, secret)
        self._decryptor = seal.Decryptor(ctx.seal_context, secret)

    def __repr__(self) -> str:  # never print key material
        return f"ClientKeys(N={self.ctx.n})"

    @classmethod
    def from_secret_bytes(cls, ctx: CkksContext, data: bytes) -> ClientKeys:
        return cls(ctx, ctx._load(KIND_SECRET, seal.SecretKey(), data))

    def secret_bytes(self) -> bytes:
        return self.ctx.wrap(KIND_SECRET, _SCRATCH.save(self._secret))

    def public_keys(self, galois_steps: Sequence[int], relin: bool = True) -> dict[str, bytes]:
        """The keys the server needs, each in SEAL's seeded form (half the bytes)."""
        ctx = self.ctx
        seeder = _KeySeeder(ctx, self._secret)
        public = seal.PublicKey()
        self._keygen.create_public_key(public)
        out = {"public": ctx.wrap(KIND_PUBLIC, seeder.public_key(_SCRATCH.save(public)))}
        if relin:
            rk = seal.RelinKeys()
            self._keygen.create_relin_keys(rk)
            out["relin"] = ctx.wrap(KIND_RELIN, seeder.switching_keys(_SCRATCH.save(rk)))
        if galois_steps:
            gk = seal.GaloisKeys()
            elements = sorted({galois_element(s, ctx.n) for s in galois_steps})
            self._keygen.create_galois_keys(elements, gk)
            out["galois"] = ctx.wrap(KIND_GALOIS, seeder.switching_keys(_SCRATCH.save(gk)))
        return out

    def encrypt(self, values: np.ndarray, scale: float) -> bytes:
        """Seeded symmetric encryption at the top level (half the bytes of a full ciphertext)."""
        plain = self.ctx.encode(values, scale, self.ctx.top_count)
        serializable = self._encryptor.encrypt_symmetric(plain)
        return self.ctx.wrap(KIND_CIPHERTEXT, _SCRATCH.save(serializable))

    def decrypt_ciphertext(self, ct: Any) -> np.ndarray:
        """All slots (real parts) of a loaded ciphertext."""
        plain = seal.Plaintext()
        self._decryptor.decrypt(ct, plain)
        return self.ctx.decode(plain)

    def decrypt(self, data: bytes, *, prime_count: int | None = None) -> np.ndarray:
        return self.decrypt_ciphertext(self.ctx.load_ciphertext(data, prime_count=prime_count))

    def decrypt_complex(self, ct: Any) -> np.ndarray:
        """Every slot of a loaded ciphertext, imaginary parts included (error measurements)."""
        plain = seal.Plaintext()
        self._decryptor.decrypt(ct, plain)
        return self.ctx.decode_complex(plain)


class _KeySeeder:
    """Rewrites SEAL keys in the seeded form SEAL's own `Serializable` keys have.

    Every key (the public key, and each component of relinearization and Galois keys) is an
    RLWE pair (k0, a) in NTT form at the key level with k0 = -(a*s + e) + (what the key
    carries). In the seeded form `a` is replaced by a 64-byte seed that SEAL's loader expands;
    we draw the seed from the OS, let SEAL expand it to a', and correct k0 by (a - a')*s
    (`replace_uniform_half`), so the key keeps SEAL's error e and payload. The server loads the
    result with SEAL's validating loader, unchanged. The secret key's NTT form is held here for
    the corrections and is part of nothing written out.
    """

    def __init__(self, ctx: CkksContext, secret: Any) -> None:
        self._ctx = ctx
        key_data = ctx.seal_context.key_context_data()
        self._primes = [m.value() for m in key_data.parms().coeff_modulus()]
        self._secret_ntt = fmt.plaintext_arrays(secret, ctx.n)  # (L, N) at the key level

    def public_key(self, serialized: bytes) -> bytes:
        body = fmt.seal_payload(serialized, _MAX_OBJECT_BYTES)
        return fmt.seal_object(self._seeded(body), compress=True)

    def switching_keys(self, serialized: bytes) -> bytes:
        return fmt.map_kswitch_keys(serialized, self._seeded, _MAX_OBJECT_BYTES)

    def _seeded(self, body: bytes) -> bytes:
        k0, a = fmt.key_arrays(body, self._ctx.n, len(self._primes))
        seed = os.urandom(fmt.PRNG_SEED_BYTES)
        probe = fmt.seal_object(fmt.seeded_key_body(body, np.zeros_like(k0), seed))
        expanded = _SCRATCH.load(seal.PublicKey(), self._ctx.seal_context, probe)
        a_seeded = fmt.ciphertext_arrays(expanded)[1]
        corrected = replace_uniform_half(k0, a, a_seeded, self._secret_ntt, self._primes)
        return fmt.seeded_key_body(body, corrected, seed)


class ServerKeys:
    """The evaluation keys a client uploaded, loaded and validated once (cache these)."""

    def __init__(
        self, ctx: CkksContext, keys: dict[str, bytes], steps: Sequence[int], relin: bool
    ) -> None:
        if not isinstance(keys, dict):
            raise MalformedPayloadError("keys must be a dict of serialized keys")
        if "public" not in keys:
            raise MalformedPayloadError("keys lack the public key")
        self.public = ctx.load_public_key(keys["public"])
        self.encryptor = ctx.encryptor(self.public)
        self.relin = None
        if relin:
            if "relin" not in keys:
                raise MalformedPayloadError("keys lack the relinearization keys")
            self.relin = ctx.load_relin_keys(keys["relin"])
        self.galois = None
        if steps:
            if "galois" not in keys:
                raise MalformedPayloadError("keys lack the Galois keys")
            self.galois = ctx.load_galois_keys(keys["galois"], steps)

    @property
    def nbytes(self) -> int:
        """Memory the parsed keys hold (what a byte-bounded key cache counts): every key is
        RLWE polynomials of N 64-bit coefficients per key-level prime; the uploads are smaller
        because they travel seeded and compressed."""
        keys = [self.public]
        for switching in (self.relin, self.galois):
            if switching is not None:
                keys += [key for row in switching.data() for key in row]
        return sum(_ciphertext_bytes(key.data()) for key in keys)


def _ciphertext_bytes(ct: Any) -> int:
    return int(ct.size()) * int(ct.poly_modulus_degree()) * int(ct.coeff_modulus_size()) * 8
