"""Framing of request and response bodies: a few fixed fields, then opaque records.

Per-sample requests (HEQ1, layout coeff-rowpack) carry one or more ciphertexts, each with its
length; their responses (HER1) carry fixed-size result records whose size the manifest
determines. A batch request (HEB1, layout coeff-batch) carries a sample count and one record
holding the n feature ciphertexts of those samples; its response (HRB1) carries the sample
count and one result record. The frame's magic says which layout a body uses. The decoders
check every length before slicing, so truncated or oversized bodies fail with a clear error.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from heinfer.errors import MalformedPayloadError, PayloadTooLargeError

__all__ = [
    "BATCH_REQUEST_MAGIC",
    "BATCH_RESPONSE_MAGIC",
    "KEYS_MAGIC",
    "KEY_KINDS",
    "REQUEST_MAGIC",
    "RESPONSE_MAGIC",
    "BatchRequest",
    "BatchResponse",
    "decode_batch_response",
    "decode_keys",
    "decode_request",
    "decode_response",
    "encode_keys",
    "encode_request",
    "encode_response",
    "is_batch_response",
]

REQUEST_MAGIC = b"HEQ1"
RESPONSE_MAGIC = b"HER1"
BATCH_REQUEST_MAGIC = b"HEB1"
BATCH_RESPONSE_MAGIC = b"HRB1"
_FRAME = struct.Struct("<4sI")  # magic, record count (HEB1/HRB1: sample count)
_LENGTH = struct.Struct("<I")


@dataclass(frozen=True)
class BatchRequest:
    """A coeff-batch request: `samples` samples in one record of feature ciphertexts.

    len() is the number of samples, like a per-sample request's list of records. `record`
    may be a memoryview into the request body (tens of MB: decoding does not copy it).
    """

    samples: int
    record: bytes | memoryview

    def __len__(self) -> int:
        return self.samples


@dataclass(frozen=True)
class BatchResponse:
    """The result of a BatchRequest: one record holding every output for every sample."""

    samples: int
    record: bytes

    def __len__(self) -> int:
        return self.samples


def encode_request(ciphertexts: list[bytes] | BatchRequest) -> bytes:
    if isinstance(ciphertexts, BatchRequest):
        return b"".join([_FRAME.pack(BATCH_REQUEST_MAGIC, ciphertexts.samples), ciphertexts.record])
    parts = [_FRAME.pack(REQUEST_MAGIC, len(ciphertexts))]
    for blob in ciphertexts:
        parts.append(_LENGTH.pack(len(blob)))
        parts.append(blob)
    return b"".join(parts)


def decode_request(
    body: bytes, *, max_records: int, max_record_bytes: int
) -> list[bytes] | BatchRequest:
    """HEQ1 -> the list of per-sample records; HEB1 -> a BatchRequest (checked by the plan).

    max_records bounds the number of samples either way; max_record_bytes bounds one
    per-sample record (a batch record's exact size follows from the model's parameters).
    """
    if len(body) < _FRAME.size:
        raise MalformedPayloadError("request body is too short to be a heinfer request")
    magic, count = _FRAME.unpack_from(body)
    if magic == BATCH_REQUEST_MAGIC:
        if count == 0:
            raise MalformedPayloadError("batch request holds no samples")
        if count > max_records:
            raise PayloadTooLargeError(
                f"batch request holds {count} samples; this model accepts at most "
                f"{max_records} per call"
            )
        if len(body) == _FRAME.size:
            raise MalformedPayloadError("batch request holds no ciphertexts")
        return BatchRequest(count, memoryview(body)[_FRAME.size :])
    if magic != REQUEST_MAGIC:
        raise MalformedPayloadError(
            "request body does not start with a heinfer magic (HEQ1 or HEB1)"
        )
    if count == 0:
        raise MalformedPayloadError("request holds no ciphertexts")
    if count > max_records:
        raise PayloadTooLargeError(
            f"request holds {count} ciphertexts; this model accepts at most {max_records} per call"
        )
    records, offset = [], _FRAME.size
    for index in range(count):
        if offset + _LENGTH.size > len(body):
            raise MalformedPayloadError(f"request truncated before ciphertext {index}")
        (length,) = _LENGTH.unpack_from(body, offset)
        offset += _LENGTH.size
        if length > max_record_bytes:
            raise PayloadTooLargeError(
                f"ciphertext {index} is {length} bytes; at most {max_record_bytes} expected"
            )
        if offset + length > len(body):
            raise MalformedPayloadError(f"request truncated inside ciphertext {index}")
        records.append(body[offset : offset + length])
        offset += length
    if offset != len(body):
        raise MalformedPayloadError(f"{len(body) - offset} unexpected bytes after the last record")
    return records


def encode_response(records: list[bytes] | BatchResponse) -> bytes:
    if isinstance(records, BatchResponse):
        return _FRAME.pack(BATCH_RESPONSE_MAGIC, records.samples) + records.record
    return _FRAME.pack(RESPONSE_MAGIC, len(records)) + b"".join(records)


def is_batch_response(body: bytes) -> bool:
    return body[:4] == BATCH_RESPONSE_MAGIC


def decode_batch_response(body: bytes, max_samples: int) -> BatchResponse:
    """HRB1 -> BatchResponse; the record's exact size is checked by the client codec."""
    if len(body) < _FRAME.size:
        raise MalformedPayloadError("response body is too short")
    magic, samples = _FRAME.unpack_from(body)
    if magic != BATCH_RESPONSE_MAGIC:
        raise MalformedPayloadError("response body does not start with HRB1")
    if not 1 <= samples <= max_samples:
        raise MalformedPayloadError(f"batch response for {samples} samples")
    return BatchResponse(samples, body[_FRAME.size :])


def decode_response(body: bytes, record_bytes: int) -> list[bytes]:
    if len(body) < _FRAME.size:
        raise MalformedPayloadError("response body is too short")
    magic, count = _FRAME.unpack_from(body)
    if magic != RESPONSE_MAGIC:
        raise MalformedPayloadError("response body does not start with HER1")
    if len(body) != _FRAME.size + count * record_bytes:
        raise MalformedPayloadError(
            f"response has {len(body)} bytes; {count} records of {record_bytes} expected"
        )
    return [
        body[_FRAME.size + i * record_bytes : _FRAME.size + (i + 1) * record_bytes]
        for i in range(count)
    ]


KEYS_MAGIC = b"HEK1"
KEY_KINDS = {"public": 1, "relin": 2, "galois": 3}
_KEYS_HEAD = struct.Struct("<4s32sB")
_KEY_PART = struct.Struct("<BI")


def encode_keys(fingerprint: bytes, parts: dict[str, bytes]) -> bytes:
    """A key upload: the parameter fingerprint, then each public key part by kind."""
    out = [_KEYS_HEAD.pack(KEYS_MAGIC, fingerprint, len(parts))]
    for kind, blob in parts.items():
        out.append(_KEY_PART.pack(KEY_KINDS[kind], len(blob)))
        out.append(blob)
    return b"".join(out)


def decode_keys(body: bytes) -> tuple[bytes, dict[str, bytes]]:
    if len(body) < _KEYS_HEAD.size:
        raise MalformedPayloadError("key upload is too short")
    magic, fingerprint, count = _KEYS_HEAD.unpack_from(body)
    if magic != KEYS_MAGIC:
        raise MalformedPayloadError("key upload does not start with the heinfer magic HEK1")
    names = {code: name for name, code in KEY_KINDS.items()}
    parts: dict[str, bytes] = {}
    offset = _KEYS_HEAD.size
    for index in range(count):
        if offset + _KEY_PART.size > len(body):
            raise MalformedPayloadError(f"key upload truncated before part {index}")
        code, length = _KEY_PART.unpack_from(body, offset)
        offset += _KEY_PART.size
        if code not in names or names[code] in parts:
            raise MalformedPayloadError(f"key part {index} has an unknown or repeated kind {code}")
        if offset + length > len(body):
            raise MalformedPayloadError(f"key upload truncated inside part {index}")
        parts[names[code]] = body[offset : offset + length]
        offset += length
    if offset != len(body):
        raise MalformedPayloadError("unexpected bytes after the last key part")
    return fingerprint, parts
