"""heinfer.protocol.oip without a service: round trips, and hostile bytes only ever get a 400."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from heinfer.errors import BadInputError
from heinfer.protocol import oip


def test_request_and_response_round_trip() -> None:
    body, headers = oip.encode_request(b"HEQ1" + bytes(range(50)), "ab" * 32, request_id="7")
    call = oip.decode_request(body, headers[oip.HEADER_LENGTH])
    assert bytes(call.tensor) == b"HEQ1" + bytes(range(50))
    assert call.key_id == "ab" * 32 and call.request_id == "7"
    framed, length = oip.encode_response(b"HER1xyz", model_name="m", model_version="1",
                                         request_id="7")
    assert oip.decode_response(framed, str(length)) == b"HER1xyz"
    assert json.loads(framed[:length])["outputs"][0]["parameters"]["binary_data_size"] == 11


def test_key_id_header_is_the_fallback() -> None:
    body, headers = oip.encode_request(b"x" * 8, "")
    assert oip.decode_request(body, headers[oip.HEADER_LENGTH], "cd" * 32).key_id == "cd" * 32


def test_framing_is_picked_by_headers() -> None:
    assert oip.framing({"inference-header-content-length": "3"}) == "binary"
    assert oip.framing({"content-type": "application/json; charset=utf-8"}) == "json"
    assert oip.framing({"content-type": "application/octet-stream"}) is None


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=300), length=st.one_of(st.none(), st.text(max_size=6)))
def test_hostile_bodies_are_refused_as_bad_input(body: bytes, length: str | None) -> None:
    with contextlib.suppress(BadInputError):
        oip.decode_request(body, length)


@settings(max_examples=200, deadline=None)
@given(header=st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["inputs", "outputs", "parameters", "name", "datatype", "shape",
                         "binary_data_size", "binary_data", "key_id", "id"]), inner, max_size=4),
    max_leaves=12,
), tail=st.binary(max_size=20))
def test_hostile_json_headers_are_refused_as_bad_input(header: object, tail: bytes) -> None:
    head = json.dumps(header).encode()
    with pytest.raises(BadInputError):
        call = oip.decode_request(head + tail, str(len(head)))
        if not call.key_id:
            raise BadInputError("no key id")  # a decodable header without one is refused later
