"""Property-based fuzzing of every decoder that sees bytes from the network.

Random and mutated-valid inputs go to the wire decoders (requests, responses, key uploads),
to the SEAL loaders behind them (`Context.load_request`, `Context.load_evaluation_key`) and to
the client's result decoder (a hostile server). Whatever the input, the only exceptions that
may escape are `BadInputError` subclasses: the service maps those to 4xx, anything else would
be a 500 (or worse, a crash inside SEAL).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from heinfer.errors import BadInputError
from heinfer.he.backend import Context, SecretKey, pack_bits
from heinfer.plans.linear import LinearCodec, LinearPlan, compile_linear
from heinfer.plans.wire import (
    BatchRequest,
    decode_keys,
    decode_request,
    decode_response,
    encode_keys,
    encode_request,
    encode_response,
)
from heinfer.rlwe.sampling import SEED_BYTES

# HEINFER_FUZZ_EXAMPLES=5000 for a longer local run; CI keeps the default (a few seconds).
EXAMPLES = int(os.environ.get("HEINFER_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclass
class Valid:
    """A small compiled model and one valid specimen of every wire object for it."""

    plan: LinearPlan
    context: Context
    codec: LinearCodec
    secret: SecretKey
    record: bytes
    request: bytes
    public_key: bytes
    keys: bytes
    result: bytes
    response: bytes


@pytest.fixture(scope="module")
def valid() -> Valid:
    rng = np.random.default_rng(4)
    plan = compile_linear(
        rng.normal(size=(3, 64)), rng.normal(size=3), name="fuzz", task="classification",
        estimator="LogisticRegression", classes=[0, 1, 2], input_range=(0.0, 1.0), max_batch=8,
    )
    codec = LinearCodec(plan.manifest)
    secret = SecretKey.generate(codec.context)
    records = codec.layouts["coeff-rowpack"].encrypt_records(secret, rng.uniform(size=(2, 64)))
    public = secret.public_key_bytes()
    key = plan.context.load_evaluation_key(public)
    results = [plan.layouts[b"HEQ1"].evaluate_record(r, key) for r in records]
    return Valid(
        plan, plan.context, codec, secret, records[0], encode_request(records), public,
        encode_keys(codec.params.fingerprint, {"public": public}), results[0],
        encode_response(results),
    )


# -- mutations ----------------------------------------------------------------------------------

_INTERESTING_U32 = [0, 1, 2, 0x7F, 0x80, 0xFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]


@st.composite
def mutated(draw: st.DrawFn, seed: bytes) -> bytes:
    """`seed` after 1-4 structure-aware edits (bit flips, length fields, cuts, splices)."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        size = len(data)
        op = draw(st.sampled_from(
            ["flip", "byte", "u32", "truncate", "extend", "insert", "delete", "duplicate"]
        ))
        # Mostly near the start, where the framing and headers live.
        pos = draw(st.one_of(st.integers(0, min(size, 80)), st.integers(0, size)))
        if op == "flip" and size:
            pos = min(pos, size - 1)
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte" and size:
            data[min(pos, size - 1)] = draw(st.integers(0, 255))
        elif op == "u32" and size >= 4:
            pos = min(pos, size - 4)
            value = draw(st.one_of(
                st.sampled_from(_INTERESTING_U32),
                st.sampled_from([size, size - 1, size + 1, max(0, size - pos - 4)]),
            ))
            data[pos : pos + 4] = struct.pack("<I", value % (1 << 32))
        elif op == "truncate":
            del data[pos:]
        elif op == "extend":
            data += draw(st.binary(min_size=1, max_size=64))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
        elif op == "duplicate" and size:
            length = draw(st.integers(1, 64))
            data[pos:pos] = data[pos : pos + length]
    return bytes(data)


def only_bad_input(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except BadInputError:
        return None


# -- framing --------------------------------------------------------------------------------


@FUZZ
@given(body=st.one_of(
    st.binary(max_size=512),
    st.tuples(st.sampled_from([b"HEQ1", b"HEB1"]), st.binary(max_size=256)).map(b"".join),
))
def test_decode_request_random(body: bytes) -> None:
    records = only_bad_input(lambda: decode_request(body, max_records=8, max_record_bytes=128))
    if isinstance(records, BatchRequest):
        assert encode_request(records) == body and 1 <= records.samples <= 8
    elif records is not None:
        assert encode_request(records) == body and 1 <= len(records) <= 8
        assert all(len(r) <= 128 for r in records)


@FUZZ
@given(data=st.data())
def test_decode_request_mutated(valid: Valid, data: st.DataObject) -> None:
    body = data.draw(mutated(valid.request))
    records = only_bad_input(
        lambda: decode_request(body, max_records=8, max_record_bytes=1 << 20)
    )
    if records is not None:
        assert encode_request(records) == body


@FUZZ
@given(body=st.binary(max_size=512), record_bytes=st.integers(1, 64))
def test_decode_response_random(body: bytes, record_bytes: int) -> None:
    records = only_bad_input(lambda: decode_response(body, record_bytes))
    if records is not None:
        assert encode_response(records) == body


@FUZZ
@given(data=st.data())
def test_decode_response_mutated(valid: Valid, data: st.DataObject) -> None:
    body = data.draw(mutated(valid.response))
    only_bad_input(
        lambda: decode_response(body, valid.codec.layouts["coeff-rowpack"].record_bytes)
    )


@FUZZ
@given(body=st.one_of(st.binary(max_size=512), st.binary(max_size=200).map(
    lambda b: b"HEK1" + b"\x00" * 32 + b[:1] + b[1:])))
def test_decode_keys_random(body: bytes) -> None:
    decoded = only_bad_input(lambda: decode_keys(body))
    if decoded is not None:
        fingerprint, parts = decoded
        assert len(fingerprint) == 32 and set(parts) <= {"public", "relin", "galois"}


@FUZZ
@given(data=st.data())
def test_decode_keys_mutated(valid: Valid, data: st.DataObject) -> None:
    body = data.draw(mutated(valid.keys))
    decoded = only_bad_input(lambda: decode_keys(body))
    if decoded is not None:
        fingerprint, parts = decoded
        assert encode_keys(fingerprint, parts) == body


# -- SEAL loaders -----------------------------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_load_request_mutated(valid: Valid, data: st.DataObject) -> None:
    record = data.draw(mutated(valid.record))
    loaded = only_bad_input(lambda: valid.context.load_request(record))
    if loaded is not None:  # SEAL accepted it: it must then evaluate without error
        key = valid.context.load_evaluation_key(valid.public_key)
        result = valid.plan.layouts[b"HEQ1"].evaluate_record(record, key)
        assert len(result) == valid.codec.layouts["coeff-rowpack"].record_bytes


def _in_range_limbs(context: Context, rng: np.random.Generator, primes: tuple[int, ...]) -> bytes:
    """Bit-packed coefficients below each prime: they pass the range check and reach SEAL."""
    return b"".join(
        pack_bits(rng.integers(0, q, size=context.n, dtype=np.uint64), q.bit_length())
        for q in primes
    )


@FUZZ
@given(seed=st.integers(0, 2**64 - 1), in_range=st.booleans())
def test_load_request_random_of_the_right_size(valid: Valid, seed: int, in_range: bool) -> None:
    rng = np.random.default_rng(seed)
    size = valid.context.request_bytes
    if in_range:  # valid coefficients, random SEAL seed region
        limbs = _in_range_limbs(valid.context, rng, valid.context.params.data_primes)
        record = valid.record[:8] + limbs
        record += rng.bytes(size - len(record))
    else:
        record = valid.record[:8] + rng.bytes(size - 8)  # right tag and length only
    only_bad_input(lambda: valid.context.load_request(record))


@FUZZ
@given(data=st.data())
def test_load_request_seed_region(valid: Valid, data: st.DataObject) -> None:
    """The trailing bytes are SEAL's own seed serialization: fuzz them specifically."""
    size = valid.context.request_bytes
    cut = data.draw(st.integers(size - 96, size - 1))
    tail = data.draw(st.binary(min_size=size - cut, max_size=size - cut))
    only_bad_input(lambda: valid.context.load_request(valid.record[:cut] + tail))


@FUZZ
@given(data=st.data())
def test_load_evaluation_key_mutated(valid: Valid, data: st.DataObject) -> None:
    blob = data.draw(mutated(valid.public_key))
    only_bad_input(lambda: valid.context.load_evaluation_key(blob))


@settings(FUZZ, max_examples=max(1, EXAMPLES // 4))
@given(seed=st.integers(0, 2**64 - 1), in_range=st.booleans())
def test_load_evaluation_key_random_of_the_right_size(
    valid: Valid, seed: int, in_range: bool
) -> None:
    rng = np.random.default_rng(seed)
    if in_range:
        primes = valid.context.params.coeff_modulus
        blob = rng.bytes(SEED_BYTES) + _in_range_limbs(valid.context, rng, primes)
    else:
        blob = rng.bytes(len(valid.public_key))
    assert len(blob) == len(valid.public_key)
    only_bad_input(lambda: valid.context.load_evaluation_key(blob))


# -- the client against a hostile server --------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_client_decrypt_mutated_result(valid: Valid, data: st.DataObject) -> None:
    record = data.draw(mutated(valid.result))
    only_bad_input(
        lambda: valid.codec.layouts["coeff-rowpack"].decrypt_record(valid.secret, record)
    )


@FUZZ
@given(data=st.data())
def test_client_decrypt_mutated_response(valid: Valid, data: st.DataObject) -> None:
    """The whole response body, as `Client.decrypt` hands it to the codec."""
    body = data.draw(mutated(valid.response))
    only_bad_input(lambda: valid.codec.decrypt(valid.secret, body))


# -- the plan's request checks (what the HTTP process runs before a worker sees a body) -------


@FUZZ
@given(data=st.data())
def test_plan_check_mutated(valid: Valid, data: st.DataObject) -> None:
    body = data.draw(mutated(valid.request))
    request = only_bad_input(lambda: valid.plan.check(body))
    if request is not None:  # accepted: every record has the exact size and parameter tag
        records = decode_request(body, max_records=8, max_record_bytes=1 << 20)
        assert isinstance(records, list) and request.samples == len(records)
        assert all(len(r) == valid.context.request_bytes for r in records)


def test_specimens_are_valid(valid: Valid) -> None:
    """The seeds above really are valid, so the mutations start from the accepted language."""
    assert decode_request(valid.request, max_records=8, max_record_bytes=1 << 20)
    assert decode_keys(valid.keys)[1]["public"] == valid.public_key
    key = valid.context.load_evaluation_key(valid.public_key)
    assert valid.context.load_request(valid.record) is not None
    result = valid.plan.layouts[b"HEQ1"].evaluate_record(valid.record, key)
    scores = valid.codec.layouts["coeff-rowpack"].decrypt_record(valid.secret, result)
    assert scores.shape == (3,)
    assert valid.plan.check(valid.request).samples == 2
    body = valid.plan.evaluate(valid.request, valid.plan.load_keys(valid.keys))
    assert valid.codec.decrypt(valid.secret, body).shape == (2, 3)
