"""Request and response bodies of the two network layouts: a fixed header, then length-prefixed
ciphertext records (each a `heinfer.he.ckks` envelope around SEAL bytes).

HNQ1 (request) / HNR1 (response), layout `ckks-network`: magic, record count, one ciphertext
per image. HNB1 / HNS1, layout `ckks-network-batch`: magic, image count, record count, one
ciphertext per input feature (request) or per output (response). The decoders check every
length before slicing and return memoryviews into the body, so the HTTP process checks a
~150 MB batch without copying it; `check_ciphertext_tags` reads each record's envelope header
(parameter fingerprint) without calling SEAL.
"""

from __future__ import annotations

import struct
from typing import Any

from heinfer.errors import MalformedPayloadError, ParameterMismatchError, PayloadTooLargeError
from heinfer.he.ckks import KIND_CIPHERTEXT, MAGIC, VERSION

__all__ = [
    "BATCH_REQUEST_MAGIC",
    "BATCH_RESPONSE_MAGIC",
    "MAX_IMAGES_PER_REQUEST",
    "REQUEST_MAGIC",
    "RESPONSE_MAGIC",
    "check_ciphertext_tags",
    "ciphertext_bytes_estimate",
    "decode_batch_frames",
    "decode_frames",
    "encode_batch_frames",
    "encode_frames",
    "max_ciphertext_bytes",
]

REQUEST_MAGIC = b"HNQ1"
RESPONSE_MAGIC = b"HNR1"
BATCH_REQUEST_MAGIC = b"HNB1"
BATCH_RESPONSE_MAGIC = b"HNS1"
MAX_IMAGES_PER_REQUEST = 256
_FRAME = struct.Struct("<4sI")  # magic, records
_BATCH_FRAME = struct.Struct("<4sII")  # magic, images, records
_LEN = struct.Struct("<I")
_ENVELOPE = struct.Struct("<4sBB8s")  # he.ckks: magic, version, kind, parameter fingerprint

Body = bytes | bytearray | memoryview


def encode_frames(magic: bytes, blobs: list[bytes] | list[memoryview]) -> bytes:
    parts: list[bytes | memoryview] = [_FRAME.pack(magic, len(blobs))]
    for blob in blobs:
        parts += [_LEN.pack(len(blob)), blob]
    return b"".join(parts)


def decode_frames(
    magic: bytes, body: Body, max_records: int, max_record_bytes: int
) -> list[memoryview]:
    view = _view(body)
    if len(view) < _FRAME.size:
        raise MalformedPayloadError("payload too short")
    got, count = _FRAME.unpack_from(view)
    if got != magic:
        raise MalformedPayloadError(f"payload does not start with {magic!r}")
    if count == 0:
        raise MalformedPayloadError("payload holds no ciphertexts")
    if count > max_records:
        raise PayloadTooLargeError(f"{count} ciphertexts; at most {max_records} per call")
    return _records(view, _FRAME.size, count, max_record_bytes)


def encode_batch_frames(magic: bytes, images: int, blobs: list[bytes] | list[memoryview]) -> bytes:
    """Batched-layout body: magic, image count, ciphertext count, then length-prefixed blobs."""
    parts: list[bytes | memoryview] = [_BATCH_FRAME.pack(magic, images, len(blobs))]
    for blob in blobs:
        parts += [_LEN.pack(len(blob)), blob]
    return b"".join(parts)


def decode_batch_frames(
    magic: bytes, body: Body, *, count: int, max_images: int, max_record_bytes: int
) -> tuple[int, list[memoryview]]:
    """(images, blobs) of a batched-layout body holding exactly `count` ciphertexts."""
    view = _view(body)
    if len(view) < _BATCH_FRAME.size:
        raise MalformedPayloadError("batched payload too short")
    got, images, records = _BATCH_FRAME.unpack_from(view)
    if got != magic:
        raise MalformedPayloadError(f"payload does not start with {magic!r}")
    if images == 0:
        raise MalformedPayloadError("batched payload holds no images")
    if images > max_images:
        raise PayloadTooLargeError(f"{images} images; at most {max_images} per batched call")
    if records != count:
        raise MalformedPayloadError(
            f"batched payload must hold exactly {count} ciphertexts, not {records}"
        )
    return int(images), _records(view, _BATCH_FRAME.size, records, max_record_bytes)


def check_ciphertext_tags(blobs: list[memoryview], fingerprint: bytes) -> None:
    """Each record is a CKKS ciphertext envelope for these parameters (header only: SEAL
    validates the rest in the worker). Another model's ciphertexts fail here, in the HTTP
    process, with the same error the worker's loader would give."""
    for index, blob in enumerate(blobs):
        if len(blob) < _ENVELOPE.size:
            raise MalformedPayloadError(f"record {index} is too short to be a ciphertext")
        magic, version, kind, tag = _ENVELOPE.unpack_from(blob)
        if magic != MAGIC or kind != KIND_CIPHERTEXT:
            raise MalformedPayloadError(f"record {index} is not a heinfer CKKS ciphertext")
        if version != VERSION or tag != fingerprint:
            raise ParameterMismatchError(
                f"record {index} was encrypted for other parameters than this model's: fetch "
                "its manifest and encrypt for it"
            )


def max_ciphertext_bytes(params: dict[str, Any]) -> int:
    """Largest envelope a two-polynomial ciphertext of these parameters serializes to."""
    return 64 + 16 * int(params["poly_modulus_degree"]) * len(params["coeff_modulus"])


def ciphertext_bytes_estimate(params: dict[str, Any], primes: int, polys: int) -> int:
    """About what one ciphertext envelope of `polys` polynomials at `primes` primes weighs on
    the wire: SEAL's zstd stores uniform residues in about their bit length; 10% margin."""
    bits = sum(int(b) for b in params["coeff_modulus_bits"][:primes])
    return polys * int(params["poly_modulus_degree"]) * bits // 8 * 11 // 10 + 256


def _view(body: Body) -> memoryview:
    if not isinstance(body, (bytes, bytearray, memoryview)):
        raise MalformedPayloadError("payload must be bytes")
    return memoryview(body).cast("B") if isinstance(body, memoryview) else memoryview(body)


def _records(view: memoryview, offset: int, count: int, max_record_bytes: int) -> list[memoryview]:
    """`count` length-prefixed records from `offset` to the very end of `view`."""
    out = []
    for i in range(count):
        if offset + _LEN.size > len(view):
            raise MalformedPayloadError(f"payload truncated before record {i}")
        (n,) = _LEN.unpack_from(view, offset)
        offset += _LEN.size
        if n > max_record_bytes:
            raise PayloadTooLargeError(f"record {i} is {n} bytes; at most {max_record_bytes}")
        if offset + n > len(view):
            raise MalformedPayloadError(f"payload truncated inside record {i}")
        out.append(view[offset : offset + n])
        offset += n
    if offset != len(view):
        raise MalformedPayloadError("unexpected bytes after the last record")
    return out
