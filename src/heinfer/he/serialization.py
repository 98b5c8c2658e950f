"""The only module that reads or writes Microsoft SEAL's byte format.

SEAL 4 serializes every object as a 16-byte header (magic 0xA15E, header size, version,
compression mode, total size), then a payload, zstd-compressed or not. The payloads we touch:

* Ciphertext and PublicKey (a ciphertext inside): `CT_META` (parms_id, is_ntt_form, size, N,
  L, scale, correction factor), then a DynArray (a nested SEAL object: count, uint64 data);
  a *seeded* one, as SEAL's `encrypt_symmetric` writes it, holds only the first polynomial in
  the DynArray, followed by a nested object with the PRNG type and its seed;
* Plaintext and SecretKey (a plaintext inside): parms_id, coeff_count, scale, then a DynArray;
* KSwitchKeys (RelinKeys, GaloisKeys): parms_id, a count of key lists, then per list a count
  and its keys, each a whole SEAL object (a PublicKey payload behind its own header).

The layouts are SEAL's (native/src/seal/{ciphertext,plaintext,kswitchkeys,dynarray}.cpp);
`tests/test_seal_format.py` round-trips every one of them through SEAL's own save and load.
The binding reads and writes only through files, so the bytes themselves come from and go to
`heinfer.he.scratch`.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import tenseal.sealapi as seal
import zstandard

from heinfer.errors import MalformedPayloadError
from heinfer.he.scratch import SCRATCH

__all__ = [
    "CT_META",
    "HEADER",
    "MAX_DECOMPRESSED",
    "PRNG_BLAKE2XB",
    "PRNG_SEED_BYTES",
    "PRNG_SHAKE256",
    "check_header",
    "check_seeded_key",
    "check_seeded_kswitch_keys",
    "ciphertext_arrays",
    "ciphertext_prefix",
    "compose_ciphertext",
    "key_arrays",
    "key_body",
    "map_kswitch_keys",
    "ntt_form_prefix",
    "payload_arrays",
    "plaintext_arrays",
    "plaintext_bytes",
    "seal_object",
    "seal_payload",
    "seal_version",
    "seed_object",
    "seeded_ciphertext",
    "seeded_ciphertext_parts",
    "seeded_key_body",
]

HEADER = struct.Struct("<HBBBBHQ")  # magic, header size, major, minor, compr mode, -, size
_SEAL_MAGIC = 0xA15E
_COMPR_NONE, _COMPR_ZSTD = 0, 2
# parms_id (4 x u64), is_ntt_form (u8), size, N, L (u64 each), scale (f64), correction (u64)
CT_META = struct.Struct("<4QBQQQdQ")
_PLAIN_META = struct.Struct("<4QQd")  # parms_id (4 x u64), coeff_count, scale
_COUNT = struct.Struct("<Q")
# What follows CT_META before the data of a ciphertext: the DynArray's header and count.
_CT_PREFIX = CT_META.size + HEADER.size + _COUNT.size
MAX_DECOMPRESSED = 64 << 20
PRNG_BLAKE2XB = 1  # SEAL's prng_type for the seeds it writes itself
PRNG_SHAKE256 = 2  # SEAL's prng_type for its SHAKE-256 generator (heinfer's requests)
PRNG_SEED_BYTES = 64


@functools.cache
def seal_version() -> tuple[int, int]:
    """The serialization version the bundled SEAL writes (and insists on reading)."""
    header = SCRATCH.save(seal.Plaintext())[: HEADER.size]
    return header[3], header[4]


def check_header(data: bytes, what: str, max_bytes: int) -> int:
    """Reject what SEAL would reject, before SEAL sees it; returns the compression mode.

    Only the modes the bundled SEAL reads (none, zstd) pass, and the declared size must be the
    size that arrived.
    """
    if len(data) < HEADER.size:
        raise MalformedPayloadError(f"{what}: {len(data)} bytes is too short for a SEAL object")
    if len(data) > max_bytes:
        raise MalformedPayloadError(f"{what}: {len(data)} bytes exceeds the {max_bytes} allowed")
    magic, hsize, major, _minor, compr, _res, size = HEADER.unpack_from(data)
    if magic != _SEAL_MAGIC or hsize != HEADER.size or major != 4:
        raise MalformedPayloadError(f"{what}: not a SEAL 4 serialization (bad header)")
    if compr not in (_COMPR_NONE, _COMPR_ZSTD):
        raise MalformedPayloadError(f"{what}: unsupported compression mode {compr}")
    if size != len(data):
        raise MalformedPayloadError(
            f"{what}: header declares {size} bytes but {len(data)} arrived (truncated?)"
        )
    return int(compr)


def seal_payload(data: bytes, max_bytes: int = MAX_DECOMPRESSED) -> bytes:
    """The (decompressed) bytes after a SEAL header; at most `max_bytes` are inflated."""
    compr = HEADER.unpack_from(data)[4]
    if compr == _COMPR_NONE:
        return data[HEADER.size :]
    try:
        return zstandard.ZstdDecompressor().decompress(
            data[HEADER.size :], max_output_size=max_bytes
        )
    except zstandard.ZstdError as exc:
        raise MalformedPayloadError("corrupt compressed SEAL data") from exc


def seal_object(body: bytes, *, compress: bool = False) -> bytes:
    """`body` behind a SEAL header of the bundled SEAL's version, zstd-compressed if asked."""
    mode = _COMPR_NONE
    if compress:
        body, mode = zstandard.ZstdCompressor().compress(body), _COMPR_ZSTD
    major, minor = seal_version()
    size = HEADER.size + len(body)
    return HEADER.pack(_SEAL_MAGIC, HEADER.size, major, minor, mode, 0, size) + body


def payload_arrays(payload: bytes) -> np.ndarray:
    """(size, L, N) read-only view of the RNS coefficients in a ciphertext-shaped payload
    (ciphertexts, public keys, key-switching key components)."""
    size, n, levels = struct.unpack_from("<QQQ", payload, 33)
    count = size * n * levels
    data = np.frombuffer(payload, dtype="<u8", count=count, offset=len(payload) - 8 * count)
    return data.reshape(size, levels, n)


def ciphertext_arrays(ciphertext: Any) -> np.ndarray:
    """(size, L, N) uint64 copy of a SEAL ciphertext's (or public key's) RNS coefficients."""
    return payload_arrays(seal_payload(SCRATCH.save(ciphertext))).copy()


def plaintext_arrays(plain: Any, degree: int) -> np.ndarray:
    """A SEAL plaintext's (or secret key's) raw coefficients: (N,) mod t, or (L, N) RNS values
    when in NTT form."""
    payload = seal_payload(SCRATCH.save(plain))
    (count,) = _COUNT.unpack_from(payload, 32)  # coeff_count, after the parms_id
    data = np.frombuffer(payload, dtype="<u8", count=count, offset=len(payload) - 8 * count)
    return data.reshape(-1, degree).copy() if count > degree else data.copy()


def plaintext_bytes(values: np.ndarray) -> bytes:
    """A serialized plaintext in coefficient form (parms_id zero) holding uint64 `values`."""
    count = values.size
    dyn = seal_object(_COUNT.pack(count) + np.ascontiguousarray(values, dtype="<u8").tobytes())
    return seal_object(_PLAIN_META.pack(0, 0, 0, 0, count, 1.0) + dyn)


def ciphertext_prefix(serialized: bytes) -> bytes:
    """Metadata + DynArray header of a serialized ciphertext-shaped object: everything but the
    data, to be reused as a template by `compose_ciphertext`."""
    return seal_payload(serialized)[:_CT_PREFIX]


def ntt_form_prefix(prefix: bytes) -> bytes:
    """A `ciphertext_prefix` with its is_ntt_form flag (the byte after the parms_id) set."""
    return prefix[:32] + b"\x01" + prefix[33:]


def compose_ciphertext(prefix: bytes, arrays: np.ndarray) -> bytes:
    """A serialized ciphertext (or public key) from a template prefix and its (size, L, N)
    coefficients; SEAL's loader checks the two agree."""
    return seal_object(prefix + np.ascontiguousarray(arrays, dtype="<u8").tobytes())


def seeded_ciphertext_parts(
    serialized: bytes, degree: int, levels: int
) -> tuple[bytes, np.ndarray, bytes]:
    """A seeded ciphertext (SEAL's `encrypt_symmetric`) split into the prefix before c0, c0 as
    (L, N) uint64, and the tail (the nested PRNG-type-and-seed object)."""
    payload = seal_payload(serialized)
    count = degree * levels
    c0 = np.frombuffer(payload, dtype="<u8", count=count, offset=_CT_PREFIX)
    return payload[:_CT_PREFIX], c0.reshape(levels, degree), payload[_CT_PREFIX + 8 * count :]


def seeded_ciphertext(prefix: bytes, c0: np.ndarray, tail: bytes) -> bytes:
    """Inverse of `seeded_ciphertext_parts` (uncompressed)."""
    return seal_object(prefix + np.ascontiguousarray(c0, dtype="<u8").tobytes() + tail)


def seed_object(prng_type: int, seed: bytes) -> bytes:
    """The nested object after a seeded ciphertext's c0 (SEAL's `UniformRandomGeneratorInfo`):
    one PRNG-type byte and the 64-byte seed, uncompressed, as SEAL's own save writes it."""
    if len(seed) != PRNG_SEED_BYTES:
        raise ValueError(f"SEAL seeds are {PRNG_SEED_BYTES} bytes")
    return seal_object(bytes([prng_type]) + seed)


def key_arrays(body: bytes, degree: int, levels: int) -> np.ndarray:
    """(2, L, N) coefficients (k0, a) of a public key or key-switching key component payload,
    after checking it is the 2-polynomial NTT-form object at the key level we expect."""
    meta = CT_META.unpack_from(body)
    if (meta[4], meta[5], meta[6], meta[7]) != (1, 2, degree, levels):
        raise ValueError("unexpected SEAL key layout")  # our own keys: a bug, not input
    return payload_arrays(body)


def key_body(body: bytes, arrays: np.ndarray) -> bytes:
    """A key component payload with its (2, L, N) coefficients replaced (same metadata and
    DynArray header, which fix the sizes SEAL's loader checks)."""
    return body[:_CT_PREFIX] + np.ascontiguousarray(arrays, dtype="<u8").tobytes()


def seeded_key_body(body: bytes, k0: np.ndarray, seed: bytes) -> bytes:
    """The seeded form of a key payload (as SEAL's `Serializable` keys write it): the same
    metadata, only k0 as the data, then the PRNG type (Blake2xb) and the 64-byte seed from which
    SEAL's loader expands the uniform half."""
    data = _COUNT.pack(k0.size) + np.ascontiguousarray(k0, dtype="<u8").tobytes()
    return body[: CT_META.size] + seal_object(data) + seal_object(bytes([PRNG_BLAKE2XB]) + seed)


SEEDED_FORM = (
    "SEAL's seeded form: the first polynomial only, the uniform half as a PRNG seed that the "
    "server expands (what SEAL's Serializable keys and heinfer's key generation write)"
)


def check_seeded_key(body: bytes, degree: int, levels: int, what: str) -> None:
    """Refuse a public-key or key-switching-key payload that is not in seeded form.

    Why: the uniform half of a key must come from a seed the server expands, never from the
    client's bytes; a key such as (0, 0) would otherwise make the re-randomizing encryption of
    zero a no-op. The form is exact: the ciphertext metadata (2 polynomials, NTT form, N, the
    key level's prime count), a nested array holding only k0 (N * L values), then a nested
    object of one PRNG-type byte and the 64-byte seed, and nothing after it.
    """
    bad = MalformedPayloadError(f"{what} is not in {SEEDED_FORM}")
    if len(body) < CT_META.size + HEADER.size:
        raise bad
    meta = CT_META.unpack_from(body)
    if (meta[4], meta[5], meta[6], meta[7]) != (1, 2, degree, levels):
        raise MalformedPayloadError(
            f"{what}: expected a 2-polynomial NTT-form key with N={degree} and {levels} primes"
        )
    offset = CT_META.size
    data_size = HEADER.unpack_from(body, offset)[6]
    data = body[offset + HEADER.size : offset + data_size] if data_size <= len(body) else b""
    if len(data) < _COUNT.size or _COUNT.unpack_from(data)[0] != degree * levels:
        raise bad
    offset += data_size
    if len(body) - offset != HEADER.size + 1 + PRNG_SEED_BYTES:
        raise bad
    if HEADER.unpack_from(body, offset)[6] != HEADER.size + 1 + PRNG_SEED_BYTES:
        raise bad


def check_seeded_kswitch_keys(
    serialized: bytes, degree: int, levels: int, what: str, max_bytes: int = MAX_DECOMPRESSED
) -> int:
    """`check_seeded_key` for every component of a serialized KSwitchKeys (relinearization or
    Galois keys); returns the number of components."""
    payload = seal_payload(serialized, max_bytes)
    count, offset = 0, 32  # after the parms_id
    try:
        (lists,) = _COUNT.unpack_from(payload, offset)
        offset += 8
        if lists > len(payload):
            raise MalformedPayloadError(f"{what}: corrupt key-switching key layout")
        for _ in range(lists):
            (keys,) = _COUNT.unpack_from(payload, offset)
            offset += 8
            if keys > len(payload):
                raise MalformedPayloadError(f"{what}: corrupt key-switching key layout")
            for _ in range(keys):
                size = HEADER.unpack_from(payload, offset)[6]
                if size < HEADER.size or offset + size > len(payload):
                    raise MalformedPayloadError(f"{what}: corrupt key-switching key layout")
                check_seeded_key(
                    seal_payload(payload[offset : offset + size], max_bytes), degree, levels, what
                )
                offset += size
                count += 1
    except struct.error as exc:
        raise MalformedPayloadError(f"{what}: truncated key-switching keys") from exc
    if offset != len(payload):
        raise MalformedPayloadError(f"{what}: trailing bytes after the key-switching keys")
    return count


def map_kswitch_keys(
    serialized: bytes, rewrite: Callable[[bytes], bytes], max_bytes: int = MAX_DECOMPRESSED
) -> bytes:
    """A serialized KSwitchKeys (RelinKeys, GaloisKeys) with every key component's payload
    replaced by `rewrite(payload)`, zstd-compressed as SEAL writes it."""
    payload = seal_payload(serialized, max_bytes)
    out = [payload[:32]]  # parms_id
    offset = 32
    (lists,) = _COUNT.unpack_from(payload, offset)
    out.append(payload[offset : offset + 8])
    offset += 8
    for _ in range(lists):
        (keys,) = _COUNT.unpack_from(payload, offset)
        out.append(payload[offset : offset + 8])
        offset += 8
        for _ in range(keys):
            size = HEADER.unpack_from(payload, offset)[6]
            body = payload[offset + HEADER.size : offset + size]
            out.append(seal_object(rewrite(body)))
            offset += size
    if offset != len(payload):
        raise ValueError("unexpected SEAL key layout")  # our own keys: a bug, not input
    return seal_object(b"".join(out), compress=True)
