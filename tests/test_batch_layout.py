"""The coeff-batch layout: one ciphertext per feature for up to N samples.

Correctness on real digits, the numpy RLWE arithmetic against SEAL and exact integers, model
malformed requests, and the whole workflow through a real service. Its model privacy attacks
(masked coefficients, c1 linear combination, flooding) live in
tests/security/test_batch_layout_privacy.py.
"""

from __future__ import annotations

import contextlib
import struct
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

import heinfer
from heinfer.errors import (
    BadInputError,
    MalformedPayloadError,
    ParameterMismatchError,
    PayloadTooLargeError,
    ShapeError,
)
from heinfer.he.backend import SecretKey, pack_bits, pack_bits_into, unpack_bits
from heinfer.plans.base import Codec
from heinfer.plans.linear import (
    BATCH_LAYOUT_KIND,
    LAYOUT_KIND,
    BatchClient,
    BatchServer,
    LinearCodec,
    LinearPlan,
    RowpackClient,
    compile_linear,
)
from heinfer.plans.linear.compile import _batch_budget, _budget, _group_rows
from heinfer.plans.wire import (
    BatchRequest,
    BatchResponse,
    decode_batch_response,
    decode_request,
    encode_request,
    encode_response,
)
from heinfer.rlwe.ring import NegacyclicProduct, linear_combination, mulmod_const
from heinfer.rlwe.sampling import centered_binomial, expand_uniform


@pytest.fixture(scope="module")
def setup(mnist_model: heinfer.EncryptedModel) -> dict[str, Any]:
    codec = LinearCodec(mnist_model.manifest)
    secret = SecretKey.generate(codec.context)
    key = mnist_model.plan.context.load_evaluation_key(secret.public_key_bytes())
    return {"plan": mnist_model.plan, "codec": codec, "secret": secret, "key": key}


def _client_batch(codec: Codec) -> BatchClient:
    layout = codec.layouts[BATCH_LAYOUT_KIND]
    assert isinstance(layout, BatchClient)
    return layout


def _encrypt_batch(codec: LinearCodec, secret: SecretKey, X: np.ndarray) -> bytes:
    return _client_batch(codec).encrypt_record(secret, X)


def _decrypt_batch(
    codec: LinearCodec, secret: SecretKey, record: bytes, samples: int
) -> np.ndarray:
    return _client_batch(codec).decrypt_record(secret, record, samples)


def _evaluate_batch(plan: LinearPlan, record: bytes, samples: int, key: Any) -> bytes:
    layout = plan.layouts[b"HEB1"]
    assert isinstance(layout, BatchServer)
    return layout.evaluate_record(record, samples, key)


# -- correctness -------------------------------------------------------------------------------


def test_manifest_advertises_both_layouts(mnist_model: heinfer.EncryptedModel) -> None:
    layout = mnist_model.manifest.layout
    assert layout["kind"] == LAYOUT_KIND
    batch = layout["batch"]
    assert batch["kind"] == BATCH_LAYOUT_KIND
    n = mnist_model.manifest.scheme["poly_modulus_degree"]
    assert batch["max_samples"] == min(n, mnist_model.manifest.max_batch)
    assert batch["ciphertexts"] == mnist_model.manifest.n_features == 784
    # one parameter set: the result prime and the scale are shared with coeff-rowpack
    assert batch["result_prime_bits"] == layout["result_prime_bits"]
    assert batch["output_scale"] == layout["output_scale"]
    flood = int(batch["flood_bound"])
    assert flood & (flood - 1) == 0  # a power of two
    assert flood >= 2**40 * batch["noise"]["leak_bound"]


def test_one_parameter_set_satisfies_both_budgets(mnist_model: heinfer.EncryptedModel) -> None:
    plan = mnist_model.plan
    w, b = plan.arrays["w_int"], plan.arrays["b_int"]
    n = plan.params.poly_modulus_degree
    eta = mnist_model.manifest.layout["noise"]["eta_target"]
    levels = (1 << mnist_model.manifest.input.bits) - 1
    rowpack = _budget(w, b, levels, _group_rows(w.shape[0], w.shape[1], n), n, eta)
    batch = _batch_budget(w, b, levels, n, eta)
    assert rowpack is not None and batch is not None
    data_bits = sum(q.bit_length() for q in plan.params.data_primes)
    assert data_bits >= max(rowpack.data_bits, batch.data_bits)
    assert plan.params.coeff_modulus[0].bit_length() >= batch.result_prime_bits
    assert plan.params.plain_modulus == 1 << batch.plain_bits
    assert plan.params.security_bits >= 128
    # per row: z * sigma * ||w_j||_2 + ||w_j||_1 / 2, with z over all N * rows coefficients
    rows = w.astype(np.float64)
    z = np.sqrt(2 * np.log(2 * n * w.shape[0] * 2.0**41))
    per_row = z * np.sqrt(10.5) * np.sqrt((rows**2).sum(1)) + 0.5 * np.abs(rows).sum(1)
    assert batch.leak_bound == pytest.approx(per_row.max())


def test_batch_of_1500_digits_matches_plaintext(
    setup: dict[str, Any], mnist: dict[str, np.ndarray], mnist_model: heinfer.EncryptedModel
) -> None:
    """1,500 test digits where ../shared has them; a bare clone's bundled sample holds fewer,
    and then the batch is all of them (the line printed says how many)."""
    X = mnist["X_test"][:1500]
    n = len(X)
    print(f"\n[batch] {n} test digits in one coeff-batch request")
    codec, secret = setup["codec"], setup["secret"]
    batch = _client_batch(codec)
    record = batch.encrypt_record(secret, X)
    assert len(record) == batch.record_request_bytes == 8 + 32 + 784 * (4096 * 91 // 8)
    result = _evaluate_batch(setup["plan"], record, n, setup["key"])
    assert len(result) == batch.record_bytes(n) == 10 * (4096 + n) * 36 // 8
    scores = batch.decrypt_record(secret, result, n)
    reference = mnist_model.predict_plain(X)
    assert scores.shape == (n, 10)
    assert (scores.argmax(1) == reference.argmax(1)).all()
    error = np.abs(scores - reference).max()
    assert error <= mnist_model.manifest.precision.expected_abs_error
    assert error <= 1e-3


def test_partial_and_single_sample_batches(
    setup: dict[str, Any], mnist: dict[str, np.ndarray], mnist_model: heinfer.EncryptedModel
) -> None:
    codec, secret = setup["codec"], setup["secret"]
    for X in (mnist["X_test"][7:8], mnist["X_test"][:13]):
        record = _encrypt_batch(codec, secret, X)
        result = _evaluate_batch(setup["plan"], record, len(X), setup["key"])
        scores = _decrypt_batch(codec, secret, result, len(X))
        assert np.abs(scores - mnist_model.predict_plain(X)).max() <= 1e-3


def test_full_batch_decrypts_exactly_with_seal(setup: dict[str, Any]) -> None:
    """numpy-made request ciphertexts are SEAL ciphertexts: SEAL decrypts every coefficient."""
    codec, secret = setup["codec"], setup["secret"]
    context = codec.context
    columns = np.random.default_rng(1).integers(0, 256, size=(784, context.n))
    record = secret.encrypt_columns(columns)
    c0, c1 = context.load_batch_request(record, 784)
    for i in (0, 391, 783):
        arrays = np.stack([c0[:, i], c1[:, i]])
        ciphertext = context.ciphertext_from_arrays(arrays, last_level=False)
        np.testing.assert_array_equal(secret.decrypt_full(ciphertext), columns[i])


def test_request_error_is_seals_centered_binomial(setup: dict[str, Any]) -> None:
    """c0 + c1*s - round(q*m/t) is SEAL's default error: centered binomial, variance 10.5."""
    codec, secret = setup["codec"], setup["secret"]
    context = codec.context
    columns = np.random.default_rng(2).integers(0, 256, size=(784, 100))
    c0, c1 = context.load_batch_request(secret.encrypt_columns(columns), 784)
    q = context.params.data_primes[0]
    rows = slice(0, 60)
    product = NegacyclicProduct(secret.ternary()).multiply(c1[0, rows], q)
    scaled = np.zeros((60, context.n), dtype=np.uint64)
    scaled[:, :100] = context.scale_plain(columns[rows])[0]
    error = (c0[0, rows].astype(object) + product.astype(object) - scaled.astype(object)) % q
    centered = np.array([int(v) - q if v > q // 2 else int(v) for v in error.reshape(-1)])
    assert np.abs(centered).max() <= 21
    assert abs(centered.mean()) < 0.02
    assert centered.var() == pytest.approx(10.5, abs=0.1)


# -- numpy arithmetic against exact integers ---------------------------------------------------


def _negacyclic_reference(a: np.ndarray, s: np.ndarray, q: int) -> np.ndarray:
    """Exact a*s mod (X^N + 1, q): 19-bit digits keep int64 convolutions exact."""
    n = a.size
    total = np.zeros(n, dtype=object)
    for k in range(3):
        digit = ((a >> np.uint64(19 * k)) & np.uint64((1 << 19) - 1)).astype(np.int64)
        full = np.convolve(digit, s)  # |value| < N * 2**19: exact in int64
        folded = full[:n] - np.concatenate([full[n:], [0]])
        total += folded.astype(object) * (1 << (19 * k))
    return (total % q).astype(np.uint64)


def test_negacyclic_product_is_exact(setup: dict[str, Any]) -> None:
    context, secret = setup["codec"].context, setup["secret"]
    s = secret.ternary().astype(np.int64)
    rng = np.random.default_rng(3)
    for q in context.params.data_primes:
        a = rng.integers(0, q, size=(3, context.n), dtype=np.uint64)
        a[2] = q - 1  # the largest digits everywhere
        got = NegacyclicProduct(s).multiply(a, q)
        for row in range(3):
            np.testing.assert_array_equal(got[row], _negacyclic_reference(a[row], s, q))


def test_linear_combination_and_mulmod_are_exact(mnist_model: heinfer.EncryptedModel) -> None:
    rng = np.random.default_rng(4)
    w = mnist_model.plan.arrays["w_int"]
    for q in (*mnist_model.plan.params.data_primes, (1 << 61) - 1):
        polys = rng.integers(0, q, size=(w.shape[1], 64), dtype=np.uint64)
        polys[:, 0] = q - 1
        expected = (w.astype(object) @ polys.astype(object)) % q
        assert (linear_combination(w, polys, q) == expected.astype(np.uint64)).all()
        x = rng.integers(0, q, size=3000, dtype=np.uint64)
        for k in (0, 1, q - 1, int(rng.integers(1, q))):
            expected = np.array([(int(v) * k) % q for v in x], dtype=np.uint64)
            assert (mulmod_const(x, k, q) == expected).all()


def test_uniform_expansion_is_deterministic_and_uniform(setup: dict[str, Any]) -> None:
    context = setup["codec"].context
    primes = context.params.data_primes
    seed = bytes(range(32))
    a = expand_uniform(seed, primes, 6, context.n)
    np.testing.assert_array_equal(a[:, 2:5], expand_uniform(seed, primes, 3, context.n, first=2))
    assert not np.array_equal(a, expand_uniform(bytes(32), primes, 6, context.n))
    for j, q in enumerate(primes):
        assert (a[j] < np.uint64(q)).all()
        bins = np.bincount((a[j].reshape(-1) * 32 // q).astype(int), minlength=32)
        assert chisquare(bins).pvalue > 1e-4
    # a prime far below its power of two forces rejections: still uniform and below q
    q = 3 * (1 << 40) + 1
    wide = expand_uniform(seed, (q,), 4, 1024)
    assert (wide < np.uint64(q)).all()
    assert chisquare(np.bincount((wide.reshape(-1) * 16 // q).astype(int))).pvalue > 1e-4


def test_centered_binomial_and_flooding_distributions(setup: dict[str, Any]) -> None:
    e = centered_binomial((200, 4096)).astype(np.int64)
    assert np.abs(e).max() <= 21 and e.var() == pytest.approx(10.5, abs=0.1)
    context = setup["codec"].context
    q1, q2 = context.params.data_primes
    flood = context.uniform_flood((3000,), 66)
    # the residues are one integer in [-2**66, 2**66) (CRT), uniform over that range
    values = []
    inverse = pow(q1, -1, q2)
    for r1, r2 in zip(flood[0].tolist(), flood[1].tolist(), strict=True):
        v = r1 + q1 * (((r2 - r1) * inverse) % q2)
        values.append(v - q1 * q2 if v > q1 * q2 // 2 else v)
    values_arr = np.array(values, dtype=object)
    assert min(values) >= -(2**66) and max(values) < 2**66
    bins = np.bincount([(v + 2**66) * 16 // 2**67 for v in values], minlength=16)
    assert chisquare(bins).pvalue > 1e-4
    assert abs(float(np.mean(values_arr.astype(float)))) < 2**66 * 0.1


@pytest.mark.parametrize("bits", [1, 3, 8, 13, 36, 55, 57, 60, 63, 64])
@pytest.mark.parametrize("count", [0, 1, 7, 8, 9, 4096, (1 << 17) + 3])
def test_pack_bits_roundtrip(bits: int, count: int) -> None:
    values = np.random.default_rng(bits * count).integers(0, 1 << bits, size=count, dtype=np.uint64)
    packed = pack_bits(values, bits)
    assert len(packed) == (count * bits + 7) // 8
    np.testing.assert_array_equal(unpack_bits(packed, count, bits), values)
    # the same little-endian bit stream as the generic definition
    as_bits = np.unpackbits(values.view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")
    assert packed == np.packbits(as_bits[:, :bits].reshape(-1), bitorder="little").tobytes()


def test_pack_bits_drops_high_bits_and_fills_one_buffer() -> None:
    values = np.array([2**64 - 1, 5, 2**40 + 3], dtype=np.uint64)
    assert pack_bits(values, 4) == bytes([0x5F, 0x03])
    out = np.full(2 + 3 + 1, 0xEE, dtype=np.uint8)
    offset = pack_bits_into(values, 4, out, 0)  # 12 bits: 2 bytes
    offset = pack_bits_into(values[1:], 9, out, offset)  # 18 bits: 3 bytes
    assert offset == 5 and out[5] == 0xEE  # the byte after is left as it was
    assert out[:2].tobytes() == pack_bits(values, 4)
    assert out[2:5].tobytes() == pack_bits(values[1:], 9)
    with pytest.raises(ValueError):
        pack_bits_into(values, 9, out, 3)  # 4 bytes do not fit in the 3 left


def test_response_is_compact(setup: dict[str, Any], mnist: dict[str, np.ndarray]) -> None:
    codec = setup["codec"]
    for samples in (1, 9, 100):
        record = _encrypt_batch(codec, setup["secret"], mnist["X_test"][:samples])
        result = _evaluate_batch(setup["plan"], record, samples, setup["key"])
        n, bits = codec.params.poly_modulus_degree, 36
        assert len(result) == 10 * ((n * bits + 7) // 8 + (samples * bits + 7) // 8)


# -- malformed requests ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def valid_batch(setup: dict[str, Any], mnist: dict[str, np.ndarray]) -> bytes:
    return bytes(_encrypt_batch(setup["codec"], setup["secret"], mnist["X_test"][:3]))


def _evaluate(setup: dict[str, Any], record: bytes, samples: int = 3) -> bytes:
    return bytes(_evaluate_batch(setup["plan"], record, samples, setup["key"]))


def test_malformed_batch_records_are_refused(setup: dict[str, Any], valid_batch: bytes) -> None:
    context = setup["codec"].context
    q1_bits = context.params.data_primes[0].bit_length()
    with pytest.raises(MalformedPayloadError, match="bytes"):
        _evaluate(setup, valid_batch[:-1])  # truncated
    with pytest.raises(MalformedPayloadError, match="bytes"):
        _evaluate(setup, valid_batch + b"\x00")  # trailing
    with pytest.raises(MalformedPayloadError, match="bytes"):
        _evaluate(setup, valid_batch[:40])  # header only
    with pytest.raises(ParameterMismatchError):
        _evaluate(setup, b"\x00" * 8 + valid_batch[8:])  # other parameters
    # one coefficient of the first ciphertext set to 2**36 - 1 >= q1: out of range
    high = pack_bits(np.array([(1 << q1_bits) - 1] * 8, dtype=np.uint64), q1_bits)
    bad = valid_batch[:40] + high + valid_batch[40 + len(high) :]
    with pytest.raises(MalformedPayloadError, match="out of range"):
        _evaluate(setup, bad)
    for samples in (0, -1, 4097):
        with pytest.raises(MalformedPayloadError, match="samples"):
            _evaluate(setup, valid_batch, samples)
    assert len(_evaluate(setup, valid_batch)) == _client_batch(setup["codec"]).record_bytes(3)


def test_malformed_batch_bodies_are_refused_by_check_and_evaluate(
    setup: dict[str, Any], valid_batch: bytes
) -> None:
    """The same records in whole HEB1 bodies: refused by `Plan.check` (what the HTTP process
    runs, no HE work) and by `Plan.evaluate` (what the workers run, trusting nothing)."""
    plan, key = setup["plan"], setup["key"]
    q1_bits = plan.params.data_primes[0].bit_length()
    cases = [
        (valid_batch[:-1], MalformedPayloadError),
        (valid_batch + b"\x00", MalformedPayloadError),
        (valid_batch[:40], MalformedPayloadError),
        (b"\x00" * 8 + valid_batch[8:], ParameterMismatchError),
    ]
    for record, error in cases:
        body = encode_request(BatchRequest(3, record))
        with pytest.raises(error):
            plan.check(body)
        with pytest.raises(error):
            plan.evaluate(body, key)
    high = pack_bits(np.array([(1 << q1_bits) - 1] * 8, dtype=np.uint64), q1_bits)
    bad = valid_batch[:40] + high + valid_batch[40 + len(high) :]
    out_of_range = encode_request(BatchRequest(3, bad))
    with pytest.raises(MalformedPayloadError, match="out of range"):
        plan.evaluate(out_of_range, key)
    good = encode_request(BatchRequest(3, valid_batch))
    assert plan.check(good).samples == 3 and plan.check(good).layout == BATCH_LAYOUT_KIND
    scores = setup["codec"].decrypt(setup["secret"], plan.evaluate(good, key))
    assert scores.shape == (3, 10)


def test_batch_frames(valid_batch: bytes) -> None:
    body = encode_request(BatchRequest(3, valid_batch))
    assert body[:4] == b"HEB1" and struct.unpack_from("<I", body, 4) == (3,)
    decoded = decode_request(body, max_records=4096, max_record_bytes=1 << 20)
    assert isinstance(decoded, BatchRequest) and len(decoded) == 3
    assert bytes(decoded.record) == valid_batch and encode_request(decoded) == body
    with pytest.raises(PayloadTooLargeError):
        decode_request(body, max_records=2, max_record_bytes=1 << 20)
    for bad in (b"HEB1" + struct.pack("<I", 0) + b"x", b"HEB1" + struct.pack("<I", 3), b"HEB"):
        with pytest.raises(MalformedPayloadError):
            decode_request(bad, max_records=4096, max_record_bytes=1 << 20)
    response = encode_response(BatchResponse(3, b"abc"))
    assert response[:4] == b"HRB1" and decode_batch_response(response, 4096).record == b"abc"
    for bad in (b"HRB1", b"HER1" + response[4:], b"HRB1" + struct.pack("<I", 5000)):
        with pytest.raises(MalformedPayloadError):
            decode_batch_response(bad, 4096)


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_mutated_batch_records_raise_only_bad_input(
    setup: dict[str, Any], valid_batch: bytes, data: st.DataObject
) -> None:
    record = bytearray(valid_batch)
    op = data.draw(st.sampled_from(["flip", "cut", "extend", "tag", "limb"]))
    pos = data.draw(st.integers(0, len(record) - 1))
    if op == "flip":
        record[pos] ^= 1 << data.draw(st.integers(0, 7))
    elif op == "cut":
        del record[pos:]
    elif op == "extend":
        record += data.draw(st.binary(min_size=1, max_size=32))
    elif op == "tag":
        record[:8] = data.draw(st.binary(min_size=8, max_size=8))
    else:
        record[pos : pos + 8] = b"\xff" * 8
    samples = data.draw(st.sampled_from([-1, 0, 3, 3, 3, 4097]))
    with contextlib.suppress(BadInputError):
        _evaluate(setup, bytes(record), samples)


def test_client_decrypt_refuses_malformed_batch_results(
    setup: dict[str, Any], valid_batch: bytes
) -> None:
    codec, secret = setup["codec"], setup["secret"]
    result = _evaluate(setup, valid_batch)
    with pytest.raises(MalformedPayloadError):
        _decrypt_batch(codec, secret, result[:-1], 3)
    with pytest.raises(MalformedPayloadError):
        _decrypt_batch(codec, secret, result, 4)
    with pytest.raises(MalformedPayloadError, match="out of range"):
        _decrypt_batch(codec, secret, b"\xff" * len(result), 3)
    with pytest.raises(ShapeError):
        _encrypt_batch(codec, secret, np.zeros((4097, 784)))


def test_models_without_the_batch_layout_refuse_batches(
    mnist_model: heinfer.EncryptedModel, valid_batch: bytes, setup: dict[str, Any]
) -> None:
    manifest = mnist_model.manifest.model_copy(
        update={"layout": {k: v for k, v in mnist_model.manifest.layout.items() if k != "batch"}}
    )
    old = LinearPlan(manifest, mnist_model.plan.arrays)
    body = encode_request(BatchRequest(3, valid_batch))
    assert mnist_model.plan.check(body).samples == 3  # the same body, to a model that has it
    with pytest.raises(ParameterMismatchError, match="does not serve the coeff-batch layout"):
        old.check(body)
    with pytest.raises(ParameterMismatchError, match="does not serve the coeff-batch layout"):
        old.evaluate(body, setup["key"])
    assert b"HEB1" not in old.layouts
    codec = LinearCodec(manifest)
    assert BATCH_LAYOUT_KIND not in codec.layouts and list(codec.layouts) == [LAYOUT_KIND]
    assert codec.layout_for(4096) == LAYOUT_KIND
    with pytest.raises(BadInputError, match="unknown layout"):
        codec.encrypt(setup["secret"], np.zeros((3, 784)), BATCH_LAYOUT_KIND)


def test_crossover_from_the_manifest(setup: dict[str, Any]) -> None:
    codec = setup["codec"]
    batch = _client_batch(codec)
    crossover = batch.crossover
    assert crossover is not None and 100 < crossover < 1000
    rowpack = codec.layouts[LAYOUT_KIND]
    assert isinstance(rowpack, RowpackClient)
    per_sample = codec.context.request_bytes + 4 + rowpack.record_bytes

    def batch_bytes(samples: int) -> int:
        return 16 + batch.record_request_bytes + batch.record_bytes(samples)

    assert batch_bytes(crossover) <= crossover * per_sample
    assert batch_bytes(crossover - 1) > (crossover - 1) * per_sample


def test_small_models_get_a_batch_layout_too() -> None:
    rng = np.random.default_rng(5)
    plan = compile_linear(
        rng.normal(size=(1, 30)), rng.normal(size=1), name="tiny", task="regression",
        estimator="LinearRegression", classes=None, input_range=(-1.0, 1.0), max_batch=64,
    )
    codec = LinearCodec(plan.manifest)
    secret = SecretKey.generate(codec.context)
    key = plan.context.load_evaluation_key(secret.public_key_bytes())
    X = rng.uniform(-1, 1, size=(64, 30))
    result = _evaluate_batch(plan, _encrypt_batch(codec, secret, X), 64, key)
    scores = _decrypt_batch(codec, secret, result, 64)
    assert np.abs(scores - plan.predict_plain(X)).max() <= plan.manifest.precision.max_abs_error
    batch = _client_batch(codec)
    assert batch.capacity == 64 and batch.crossover is not None


# -- through a real service --------------------------------------------------------------------


@pytest.mark.e2e
def test_service_predicts_large_x_with_the_batch_layout(
    service: Any, mnist: dict[str, np.ndarray], mnist_model: heinfer.EncryptedModel
) -> None:
    client = heinfer.Client(service.url, model="mnist")
    client.upload_keys()
    X = mnist["X_test"]
    crossover = _client_batch(client.codec).crossover
    assert crossover is not None and len(X) >= crossover
    assert client.layout_for(len(X)) == BATCH_LAYOUT_KIND
    assert client.layout_for(10) == LAYOUT_KIND
    seen: list[int] = []
    scores = client.predict(X, progress=seen.append)
    reference = mnist_model.predict_plain(X)
    assert sum(seen) == len(X) and scores.shape == (len(X), 10)
    assert (scores.argmax(1) == reference.argmax(1)).all()
    assert np.abs(scores - reference).max() <= mnist_model.manifest.precision.expected_abs_error
    # explicit layouts, both through encrypt/infer/decrypt; the response frame says which
    body = client.encrypt(X[:20], layout=BATCH_LAYOUT_KIND)
    assert body[:4] == b"HEB1"
    payload = client.infer(body)
    assert payload[:4] == b"HRB1"
    assert np.abs(client.decrypt(payload) - reference[:20]).max() <= 1e-3
    small = client.infer(client.encrypt(X[:2]))
    assert small[:4] == b"HER1" and client.decrypt(small).shape == (2, 10)


@pytest.mark.e2e
def test_service_refuses_malformed_batches_and_keeps_serving(
    service: Any, mnist: dict[str, np.ndarray]
) -> None:
    client = heinfer.Client(service.url, model="mnist")
    client.upload_keys()
    good = client.encrypt(mnist["X_test"][:5], layout=BATCH_LAYOUT_KIND)
    bad_bodies = {
        "truncated": good[:-100],
        "no-record": good[:8],
        "zero-samples": good[:4] + struct.pack("<I", 0) + good[8:],
        "too-many-samples": good[:4] + struct.pack("<I", 5000) + good[8:],
        "out-of-range": good[:48] + b"\xff" * 64 + good[112:],
        "other-parameters": good[:8] + b"\x00" * 8 + good[16:],
    }
    for name, body in bad_bodies.items():
        response = httpx.post(
            f"{service.url}/v2/models/mnist/infer", content=body,
            headers={"X-Heinfer-Key-Id": client.key_id or ""}, timeout=120,
        )
        assert 400 <= response.status_code < 500, (name, response.text)
        assert response.json()["error"] in {
            "malformed_payload", "payload_too_large", "parameter_mismatch"
        }, name
    assert client.decrypt(client.infer(good)).shape == (5, 10)


@pytest.mark.e2e
def test_worker_pool_hands_large_batches_over_with_or_without_tmpfs(
    mnist_model_path: Any, mnist: dict[str, np.ndarray], tmp_path: Any
) -> None:
    import asyncio
    import os

    from heinfer.plans.wire import encode_keys
    from heinfer.server.keystore import open_key_store
    from heinfer.server.workers import WorkerPool

    model = heinfer.load_model(mnist_model_path)
    codec = LinearCodec(model.manifest)
    secret = SecretKey.generate(codec.context)
    store = open_key_store(str(tmp_path))
    key_id = store.put("public", encode_keys(codec.params.fingerprint,
                                             {"public": secret.public_key_bytes()}))
    X = mnist["X_test"][:50]
    request = encode_request(BatchRequest(len(X), _encrypt_batch(codec, secret, X)))
    pool = WorkerPool([str(mnist_model_path)], str(tmp_path), 1, 1 << 26)

    def handoff_files() -> set[str]:
        return {f for f in os.listdir(pool._handoff_dir or "/tmp") if f.startswith("heinfer-batch")}

    written: list[str | None] = []
    handoff = pool._handoff

    def spy(data: bytes | memoryview) -> str | None:
        path = handoff(data)
        written.append(path)
        return path

    pool._handoff = spy  # type: ignore[method-assign]

    async def run() -> list[bytes]:
        before = handoff_files()
        [first] = await pool.infer("mnist", "public", key_id, [request])
        assert handoff_files() <= before  # the handoff file is gone again
        pool._handoff_dir = str(tmp_path / "missing")  # no tmpfs: the record goes by pipe
        [second] = await pool.infer("mnist", "public", key_id, [request])
        return [first, second]

    try:
        responses = asyncio.run(run())
        assert len(written) == 2 and written[0] is not None and written[1] is None
        for response in responses:
            assert response[:4] == b"HRB1"
            scores = codec.decrypt(secret, response)
            assert np.abs(scores - model.predict_plain(X)).max() <= 1e-3
    finally:
        pool.shutdown()


def test_worker_pool_hands_a_large_single_record_over_by_file(
    mnist_model_path: Any, tmp_path: Any
) -> None:
    """A batched network body (~150 MB) is one record: it too goes by tmpfs file, not pipe."""
    import asyncio
    import os

    from heinfer.plans.wire import encode_keys
    from heinfer.server.keystore import open_key_store
    from heinfer.server.workers import WorkerPool

    codec = LinearCodec(heinfer.load_model(mnist_model_path).manifest)
    public = SecretKey.generate(codec.context).public_key_bytes()
    key_id = open_key_store(str(tmp_path)).put(
        "public", encode_keys(codec.params.fingerprint, {"public": public})
    )
    pool = WorkerPool([str(mnist_model_path)], str(tmp_path), 1, 1 << 26)
    written: list[str] = []
    handoff = pool._handoff

    def spy(data: bytes | memoryview) -> str | None:
        path = handoff(data)
        if path is not None:
            written.append(path)
        return path

    pool._handoff = spy  # type: ignore[method-assign]
    oversized = b"HEQ1" + bytes(3 << 20)
    try:
        with pytest.raises(BadInputError):  # read from the file, then refused with a 4xx error
            asyncio.run(pool.infer("mnist", "public", key_id, [oversized]))
    finally:
        pool.shutdown()
    assert len(written) == 1  # on /dev/shm, else the temp directory: never the pipe
    assert not any(os.path.exists(path) for path in written)
