"""Open Inference Protocol (KServe v2) framing for heinfer's one tensor: the ciphertext.

Why OIP at all: stock inference clients (`tritonclient`, KServe's SDK, load balancers' health
checks) speak it, so a heinfer service can sit where they expect a v2 server. Why only framing
here: an encrypted request is one opaque byte string whatever the model (its layout is named by
its magic, see plans/base.py), so the OIP view of *every* model is the same — one BYTES input
holding one request body, one BYTES output holding one response body — and nothing in this
module (or the HTTP layer using it) needs to know which layouts exist.

The binary tensor data extension frames a request as a JSON header followed by a binary tail;
`Inference-Header-Content-Length` says where the JSON ends, each input's `binary_data_size`
how many tail bytes it takes, and a BYTES element in the tail is a 4-byte little-endian length
and the bytes. The JSON-only form (Content-Type application/json) cannot carry arbitrary bytes,
so it is recognized only to refuse it with a message that says what to send instead.

Pure functions of bytes, no I/O and no server imports: the service decodes requests and
encodes responses with them, and Python callers (tests, scripts) build requests and read
responses with the other half.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from heinfer.errors import BadInputError, MalformedPayloadError

__all__ = [
    "BINARY_EXTENSION",
    "HEADER_LENGTH",
    "INPUT_NAME",
    "KEY_ID_PARAMETER",
    "OUTPUT_NAME",
    "InferCall",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
    "framing",
]

HEADER_LENGTH: Final = "Inference-Header-Content-Length"
BINARY_EXTENSION: Final = "binary_tensor_data"
INPUT_NAME: Final = "ciphertext"  # the encrypted request body
OUTPUT_NAME: Final = "encrypted_scores"  # the encrypted response body
KEY_ID_PARAMETER: Final = "key_id"  # request-level parameter: the id POST /v2/keys returned
BYTES: Final = "BYTES"
# A JSON header is a few hundred bytes; the limit keeps a hostile one from costing much to parse.
MAX_HEADER_BYTES: Final = 64 << 10
_LENGTH = struct.Struct("<I")


@dataclass(frozen=True)
class InferCall:
    """One decoded OIP inference request: the ciphertext and what the answer must echo."""

    tensor: memoryview  # the request body a Plan checks (a view into the HTTP body, no copy)
    key_id: str  # "" when the request names none
    request_id: str | None


def framing(headers: Mapping[str, str]) -> str | None:
    """Which framing a request uses, from its headers alone: "binary" (the binary tensor data
    extension), "json" (an OIP JSON body), or None for heinfer's bare body (the fast path)."""
    if HEADER_LENGTH.lower() in headers or HEADER_LENGTH in headers:
        return "binary"
    content_type = headers.get("content-type", "")
    if content_type.split(";", 1)[0].strip().lower() == "application/json":
        return "json"
    return None


def decode_request(
    body: bytes | memoryview, header_length: str | None, key_id_header: str | None = None
) -> InferCall:
    """The ciphertext, key id and request id of an OIP request body.

    `header_length` is the `Inference-Header-Content-Length` value (None for a JSON-only body,
    whose JSON is then the whole body); `key_id_header` a key id sent as X-Heinfer-Key-Id,
    used when the request names none in its parameters. Raises BadInputError (400) for
    anything that does not decode, naming what was expected.
    """
    view = memoryview(body)
    if header_length is None:
        size = len(view)
    else:
        text = header_length.strip()
        # isascii: headers arrive latin-1 decoded, and "²".isdigit() is true but int() refuses
        if not (text.isascii() and text.isdigit()) or len(text) > 12:
            raise BadInputError(f"{HEADER_LENGTH} must be a byte count, got {header_length[:20]!r}")
        size = int(text)
        if size > len(view):
            raise BadInputError(
                f"{HEADER_LENGTH} is {size} but the body holds only {len(view)} bytes"
            )
    if size > MAX_HEADER_BYTES:
        raise BadInputError(f"the JSON inference header exceeds {MAX_HEADER_BYTES} bytes")
    header = _json_object(view[:size])
    parameters = _parameters(header.get("parameters"), "the request's parameters")
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadInputError("the request's id must be a string")
    key_id = parameters.get(KEY_ID_PARAMETER) or key_id_header or ""
    if not isinstance(key_id, str):
        raise BadInputError(f"the {KEY_ID_PARAMETER!r} parameter must be a string")
    _check_outputs(header.get("outputs"))
    tensor = _ciphertext(header.get("inputs"), view[size:], binary=header_length is not None)
    return InferCall(tensor=tensor, key_id=key_id, request_id=request_id)


def encode_response(
    payload: bytes, *, model_name: str, model_version: str, request_id: str | None
) -> tuple[bytes, int]:
    """The response body (JSON header + binary tail) and its header length, for the
    `Inference-Header-Content-Length` response header."""
    element = _LENGTH.pack(len(payload))
    header: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        header["id"] = request_id
    header["outputs"] = [
        {
            "name": OUTPUT_NAME,
            "datatype": BYTES,
            "shape": [1],
            "parameters": {"binary_data_size": len(element) + len(payload)},
        }
    ]
    head = json.dumps(header, separators=(",", ":")).encode()
    return b"".join((head, element, payload)), len(head)


# -- the caller's half ---------------------------------------------------------------------------


def encode_request(
    ciphertext: bytes, key_id: str, *, request_id: str | None = None
) -> tuple[bytes, dict[str, str]]:
    """An OIP request body for one encrypted request body, and the headers to send with it."""
    element = _LENGTH.pack(len(ciphertext))
    header: dict[str, Any] = {
        "parameters": {KEY_ID_PARAMETER: key_id, "binary_data_output": True},
        "inputs": [
            {
                "name": INPUT_NAME,
                "datatype": BYTES,
                "shape": [1],
                "parameters": {"binary_data_size": len(element) + len(ciphertext)},
            }
        ],
        "outputs": [{"name": OUTPUT_NAME, "parameters": {"binary_data": True}}],
    }
    if request_id is not None:
        header["id"] = request_id
    head = json.dumps(header, separators=(",", ":")).encode()
    headers = {HEADER_LENGTH: str(len(head)), "Content-Type": "application/octet-stream"}
    return b"".join((head, element, ciphertext)), headers


def decode_response(body: bytes, header_length: str | None) -> bytes:
    """The encrypted response body inside an OIP response (what `Codec.decrypt` reads)."""
    if header_length is None:
        raise MalformedPayloadError(f"the response has no {HEADER_LENGTH} header")
    size = int(header_length)
    header = _json_object(memoryview(body)[:size])
    outputs = header.get("outputs")
    if not isinstance(outputs, list) or len(outputs) != 1:
        raise MalformedPayloadError("the response does not hold exactly one output")
    element = memoryview(body)[size:]
    if len(element) < 4 or _LENGTH.unpack_from(element)[0] != len(element) - 4:
        raise MalformedPayloadError("the response's binary output is not one BYTES element")
    return bytes(element[4:])


# -- checks ----------------------------------------------------------------------------------------


def _json_object(data: memoryview) -> dict[str, Any]:
    try:
        document = json.loads(bytes(data))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise BadInputError("the inference header is not valid JSON") from None
    if not isinstance(document, dict):
        raise BadInputError("the inference header must be a JSON object")
    return document


def _parameters(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadInputError(f"{where} must be a JSON object")
    return value


def _check_outputs(outputs: Any) -> None:
    """Only our one output may be asked for, and only in binary form: a ciphertext is not text,
    so the JSON form of a BYTES output (a string) cannot hold it."""
    if outputs is None:
        return
    if not isinstance(outputs, list):
        raise BadInputError("the request's outputs must be a list")
    for output in outputs:
        if not isinstance(output, dict) or output.get("name") != OUTPUT_NAME:
            raise BadInputError(f"this model has one output, {OUTPUT_NAME!r}")
        if _parameters(output.get("parameters"), "an output's parameters").get(
            "binary_data", True
        ) is not True:
            raise BadInputError(
                f"{OUTPUT_NAME!r} is ciphertext and travels only as binary data: "
                "ask for binary_data true"
            )


def _ciphertext(inputs: Any, tail: memoryview, *, binary: bool) -> memoryview:
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise BadInputError(f"send exactly one input, {INPUT_NAME!r} (BYTES, shape [1])")
    tensor = inputs[0]
    if tensor.get("name") != INPUT_NAME:
        raise BadInputError(f"this model has one input, {INPUT_NAME!r}")
    if tensor.get("datatype") != BYTES:
        raise BadInputError(f"input {INPUT_NAME!r} has datatype BYTES")
    if tensor.get("shape") != [1]:
        raise BadInputError(f"input {INPUT_NAME!r} has shape [1]: one request body")
    size = _parameters(tensor.get("parameters"), "the input's parameters").get("binary_data_size")
    if not binary or size is None:
        raise BadInputError(
            f"input {INPUT_NAME!r} is ciphertext: send it as binary data "
            f"(the {BINARY_EXTENSION} extension: {HEADER_LENGTH} and binary_data_size)"
        )
    if not isinstance(size, int) or isinstance(size, bool) or size != len(tail):
        raise BadInputError(
            f"binary_data_size of {INPUT_NAME!r} must be the {len(tail)} bytes after the header"
        )
    if size < 4 or _LENGTH.unpack_from(tail)[0] != size - 4:
        raise BadInputError(
            f"input {INPUT_NAME!r} must be one BYTES element: a 4-byte little-endian length, "
            "then that many bytes"
        )
    return tail[4:]
