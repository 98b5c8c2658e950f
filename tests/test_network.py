"""Encrypted CNN plans (heinfer.plans.network): import, compile, evaluate, privacy of responses.

The encryption tests build their network from numpy weights (no torch); the import tests skip
cleanly when torch (or onnx) is not installed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from heinfer.errors import (
    HeinferError,
    MalformedPayloadError,
    ModelFormatError,
    ParameterMismatchError,
    PayloadTooLargeError,
    UnsupportedModelError,
)
from heinfer.plans.base import plan_from_arrays
from heinfer.plans.manifest import Manifest
from heinfer.plans.network import (
    BATCH_LAYOUT,
    SINGLE_LAYOUT,
    NetworkCodec,
    NetworkPlan,
    NetworkSpec,
    compile_network,
    convert_v1_network,
)
from heinfer.plans.network.batch import BatchServer
from heinfer.plans.network.frames import (
    BATCH_REQUEST_MAGIC,
    BATCH_RESPONSE_MAGIC,
    REQUEST_MAGIC,
    decode_batch_frames,
    encode_batch_frames,
    encode_frames,
)
from heinfer.plans.network.manifest import common_manifest
from heinfer.plans.wire import encode_keys
from network_helpers import ridge_cnn

IMAGE = (1, 28, 28)


@pytest.fixture(scope="module")
def digits(mnist: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """conftest's digits (the shared split, or the bundled sample in a bare clone), as tuples."""
    return mnist["X_train"][:3000], mnist["y_train"][:3000], mnist["X_test"], mnist["y_test"]




def _keys(plan: NetworkPlan, codec: NetworkCodec, secret: Any, layouts: Any = None) -> Any:
    return plan.load_keys(codec.key_upload(secret, layouts))


@pytest.fixture(scope="module")
def he_setup(digits):
    Xtr, ytr, Xte, yte = digits
    spec = ridge_cnn(Xtr, ytr)
    plan = compile_network(spec, "test-cnn", calibration=Xtr[:500])
    codec = NetworkCodec(plan.manifest)
    secret = codec.keygen()
    keys = _keys(plan, codec, secret)
    return spec, plan, codec, secret, keys, Xte[:10], yte[:10]


# -- encryption (numpy weights, no torch) ---------------------------------------------------------
def test_encrypted_scores_match_plaintext(he_setup):
    spec, plan, codec, secret, keys, X, y = he_setup
    ref = spec.predict_plain(X)
    assert np.array_equal(plan.predict_plain(X), ref)
    scores = codec.decrypt(secret, plan.evaluate(codec.encrypt(secret, X), keys))
    assert scores.shape == (10, 10)
    assert np.array_equal(scores.argmax(1), ref.argmax(1))
    assert np.abs(scores - ref).max() <= plan.manifest.precision.max_abs_error
    assert (ref.argmax(1) == y).mean() >= 0.7  # the toy ridge readout is a real classifier


def test_manifest_is_the_common_one(he_setup):
    _spec, plan, *_ = he_setup
    manifest = plan.manifest
    assert isinstance(manifest, Manifest) and manifest.layout["kind"] == "ckks-network"
    assert manifest.n_features == 784 and manifest.n_outputs == 10
    assert Manifest.from_json(manifest.to_json()) == manifest
    network = manifest.layout["plan_manifest"]
    assert network["input"]["shape"] == [784] and network["input"]["layout"]["stride"] == 784
    assert manifest.keys.galois_steps == network["keys"]["galois_steps"]


def test_single_image_shape(he_setup):
    spec, plan, codec, secret, keys, X, _ = he_setup
    out = codec.decrypt(secret, plan.evaluate(codec.encrypt(secret, X[0]), keys))
    assert out.shape == (1, 10)
    assert np.abs(out - spec.predict_plain(X[:1])).max() < 0.1


def test_split_and_join(he_setup):
    spec, plan, codec, secret, keys, X, _ = he_setup
    request = plan.check(codec.encrypt(secret, X[:3]))
    parts = plan.split(request, 2)
    assert [plan.check(p).samples for p in parts] == [2, 1]
    joined = plan.join(request, [plan.evaluate(p, keys) for p in parts])
    out = codec.decrypt(secret, joined)
    assert np.abs(out - spec.predict_plain(X[:3])).max() <= plan.manifest.precision.max_abs_error


def test_manifest_lists_exactly_the_rotations_used(he_setup, monkeypatch):
    _spec, plan, codec, secret, keys, X, _ = he_setup
    used: set[int] = set()
    ctx = plan.ctx
    original = ctx.rotate

    def spy(ct, step, galois):
        used.add(step)
        return original(ct, step, galois)

    monkeypatch.setattr(ctx, "rotate", spy)
    plan.evaluate(codec.encrypt(secret, X[0]), keys)
    manifest = plan.manifest
    assert sorted(used) == manifest.keys.galois_steps
    assert manifest.keys.public and manifest.keys.relin
    from heinfer.he.ckks import galois_element

    assert not keys.galois.has_key(galois_element(2, ctx.n))  # no keys beyond the plan's steps
    assert len(codec.key_upload(secret)) < 20e6
    assert keys.nbytes > len(codec.key_upload(secret))  # parsed keys: expanded, uncompressed


def test_non_output_slots_are_masked(he_setup):
    spec, plan, codec, secret, keys, X, _ = he_setup
    body = plan.evaluate(codec.encrypt(secret, X[:1]), keys)
    full = codec.layout(SINGLE_LAYOUT).decrypt_slots(secret, body)[0]
    ref = spec.predict_plain(X[:1])[0]
    m = len(ref)
    assert np.abs(full[:m] - ref).max() < 0.1
    rest = full[m:]
    # the fold replicates score i in every slot = i (mod 16); masking must hide those copies
    R = 16
    replicas = np.array([full[s] - ref[s % R] for s in range(R, len(full)) if s % R < m])
    assert np.mean(np.abs(replicas) < 0.05) < 0.01
    assert np.abs(rest).max() <= 256 + np.abs(ref).max() + 1  # mask + replica
    assert 100 < rest.std() < 200  # uniform on [-256, 256] has std 147.8


def test_plan_round_trip_arrays(he_setup):
    spec, plan, codec, secret, keys, X, _ = he_setup
    arrays = plan.to_arrays()
    assert all(isinstance(v, np.ndarray) and v.dtype != object for v in arrays.values())
    again = plan_from_arrays(plan.manifest, arrays)
    assert isinstance(again, NetworkPlan)
    assert np.array_equal(again.predict_plain(X), spec.predict_plain(X))
    out = codec.decrypt(secret, again.evaluate(codec.encrypt(secret, X[:2]), keys))
    assert np.abs(out - spec.predict_plain(X[:2])).max() < 0.1
    del arrays["spec_json"]
    with pytest.raises(ModelFormatError):
        NetworkPlan.from_arrays(plan.manifest, arrays)


def test_v1_model_files_convert(he_setup):
    """A file of the previous release: header layers with array references, the raw network
    dict as manifest.json, arrays prefixed plan_ and spec{i}_ (as its models.py wrote them)."""
    spec, plan, *_ = he_setup
    import json

    compiled = {k: v for k, v in plan.to_arrays().items() if not k.startswith("spec")}
    arrays = {f"plan_{k}": v for k, v in compiled.items()}
    layers = []
    for index, layer in enumerate(spec.layers):
        entry = {}
        for key, value in layer.items():
            if isinstance(value, np.ndarray):
                arrays[f"spec{index}_{key}"] = value
                entry[key] = {"array": f"spec{index}_{key}"}
            else:
                entry[key] = value
        layers.append(entry)
    header = {"format": "heinfer.model", "plan": "network", "layers": layers, "estimator": "onnx"}
    manifest, converted = convert_v1_network(header, json.dumps(plan.network), arrays)
    assert manifest.estimator == "onnx"
    again = NetworkPlan.from_arrays(manifest, converted)
    assert again.network == plan.network and again.spec.input_shape == IMAGE
    X = np.random.default_rng(0).random((3, 784))
    assert np.array_equal(again.predict_plain(X), spec.predict_plain(X))
    with pytest.raises(ModelFormatError):
        convert_v1_network({**header, "layers": None}, json.dumps(plan.network), arrays)


def test_simulation_matches_plaintext(he_setup):
    spec, plan, *_rest, X, _ = he_setup
    sim = plan.simulate(X, np.random.default_rng(0))
    ref = spec.predict_plain(X)
    assert np.abs(sim - ref).max() < plan.manifest.precision.max_abs_error
    assert np.abs(sim - ref).max() > 0  # noise is modelled, not skipped


def test_simulation_agrees_with_encryption(he_setup):
    """The same inputs through both executors of one schedule: both within the claim of the
    plaintext, and within twice the claim of each other (independent noise)."""
    spec, plan, codec, secret, keys, X, _ = he_setup
    ref = spec.predict_plain(X[:4])
    enc = codec.decrypt(secret, plan.evaluate(codec.encrypt(secret, X[:4]), keys))
    sim = plan.simulate(X[:4], np.random.default_rng(1))
    claim = plan.manifest.precision.max_abs_error
    assert np.abs(enc - ref).max() <= claim and np.abs(sim - ref).max() <= claim
    assert np.abs(sim - enc).max() <= 2 * claim
    assert np.array_equal(sim.argmax(1), enc.argmax(1))


def test_secret_key_round_trip(he_setup):
    spec, plan, codec, secret, keys, X, _ = he_setup
    other = NetworkCodec(plan.manifest)
    again = other.load_secret(secret.to_bytes())
    out = other.decrypt(again, plan.evaluate(codec.encrypt(secret, X[:1]), keys))
    assert np.abs(out - spec.predict_plain(X[:1])).max() < 0.1
    assert repr(again) == "NetworkSecret()"


def test_bad_payloads(he_setup):
    _spec, plan, codec, secret, keys, X, _ = he_setup
    req = codec.encrypt(secret, X[0])
    for bad in (b"garbage", req[:-100]):
        with pytest.raises(MalformedPayloadError):
            plan.check(bad)
        with pytest.raises(MalformedPayloadError):
            plan.evaluate(bad, keys)
    corrupt = bytearray(req)
    corrupt[8 + 4 + 14 : 8 + 4 + 14 + 2] = b"\x00\x00"  # SEAL magic inside the envelope
    plan.check(bytes(corrupt))  # the header is fine: SEAL finds it in the worker
    with pytest.raises(MalformedPayloadError):
        plan.evaluate(bytes(corrupt), keys)
    bad_kind = bytearray(req)
    bad_kind[8 + 4 + 5] = 2  # envelope says: public key
    with pytest.raises(MalformedPayloadError):
        plan.check(bytes(bad_kind))
    with pytest.raises(MalformedPayloadError):
        plan.evaluate(bytes(bad_kind), keys)
    parts = codec.public_keys(secret, frozenset({"public", "relin", "galois"}))
    parts["galois"] = parts["galois"][:1000]
    upload = encode_keys(plan.key_fingerprint, parts)
    for step in (plan.check_keys, plan.load_keys):  # the seeded-form check parses every key
        with pytest.raises(MalformedPayloadError):
            step(upload)


def test_other_parameters_rejected(he_setup):
    _spec, plan, _codec, _secret, keys, _X, _ = he_setup
    from heinfer.he.ckks import CkksContext, ClientKeys, select_parameters

    bits = plan.network["params"]["coeff_modulus_bits"]
    other = CkksContext(select_parameters([bits[0] - 1, *bits[1:]]))
    foreign = ClientKeys(other)
    req = encode_frames(REQUEST_MAGIC, [foreign.encrypt(np.zeros(other.slots), 2.0**28)])
    with pytest.raises(ParameterMismatchError):
        plan.check(req)
    with pytest.raises(ParameterMismatchError):
        plan.evaluate(req, keys)
    steps = plan.manifest.keys.galois_steps
    with pytest.raises(ParameterMismatchError):  # right header, keys for other parameters
        plan.load_keys(encode_keys(plan.key_fingerprint, foreign.public_keys(steps)))


def test_spec_needs_its_input_shape():
    conv = {"type": "conv2d", "weight": np.ones((1, 1, 3, 3)), "bias": np.zeros(1)}
    with pytest.raises(UnsupportedModelError, match="input_shape"):
        NetworkSpec([{**conv, "stride": 1, "padding": 0}])
    mlp = NetworkSpec([{"type": "linear", "weight": np.ones((2, 5)), "bias": np.zeros(2)}])
    assert mlp.input_shape == (5,) and mlp.n_features == 5


def test_non_mnist_shapes_compile_and_simulate():
    """A 2x12x12 input (not MNIST): shapes come from the spec, not from constants."""
    rng = np.random.default_rng(5)
    spec = NetworkSpec(
        [
            {
                "type": "conv2d",
                "weight": rng.normal(0, 0.3, (2, 2, 3, 3)),
                "bias": np.zeros(2),
                "stride": 1,
                "padding": 0,
            },
            {"type": "poly", "a": 1.0, "b": 0.0},
            {"type": "flatten"},
            {"type": "linear", "weight": rng.normal(0, 0.1, (3, 200)), "bias": np.zeros(3)},
        ],
        (2, 12, 12),
    )
    plan = compile_network(spec, "small-image")
    assert plan.manifest.n_features == 288 and plan.manifest.n_outputs == 3
    X = rng.random((5, 288))
    ref = spec.predict_plain(X)
    for layout in (SINGLE_LAYOUT, BATCH_LAYOUT):
        sim = plan.simulate(X, np.random.default_rng(0), layout=layout)
        assert np.abs(sim - ref).max() < plan.manifest.precision.max_abs_error


# -- batched layout (slot i = image i, one ciphertext per pixel) ---------------------------------
# A smaller conv (2 filters, stride 2: 288 hidden units) keeps one batch at a few seconds here.
BATCH_IMAGES = 48


class _Unfinished(BatchServer):
    """Test hook: the batched layout without its final treatment (bias, mask, flooding)."""

    def _finalize(self, ct: Any, images: int, bias: float, keys: Any) -> Any:
        return ct


@pytest.fixture(scope="module")
def batch_setup(digits):
    Xtr, ytr, Xte, yte = digits
    spec = ridge_cnn(Xtr, ytr, filters=2, stride=2)
    plan = compile_network(spec, "test-cnn-batch", calibration=Xtr[:500])
    codec = NetworkCodec(plan.manifest)
    secret = codec.keygen()
    keys = _keys(plan, codec, secret, [BATCH_LAYOUT])  # batch-only: public + relin
    X = Xte[:BATCH_IMAGES]
    request = codec.encrypt(secret, X, BATCH_LAYOUT)
    response = plan.evaluate(request, keys)
    return spec, plan, codec, secret, keys, X, yte[:BATCH_IMAGES], request, response


def test_batched_scores_match_plaintext(batch_setup):
    spec, plan, codec, secret, keys, X, y, request, response = batch_setup
    batch = plan.network["batch"]
    assert keys.galois is None and batch["keys"]["galois_steps"] == []
    assert plan.check(request).samples == BATCH_IMAGES
    scores = codec.decrypt(secret, response)
    ref = spec.predict_plain(X)
    assert scores.shape == (BATCH_IMAGES, 10)
    assert np.array_equal(scores.argmax(1), ref.argmax(1))
    assert np.abs(scores - ref).max() <= batch["precision"]["score_abs_error"]
    assert (ref.argmax(1) == y).mean() >= 0.7
    # the output sits where the single-image path leaves it: two primes, 2^log_df
    assert batch["output"]["level_primes"] == plan.network["output"]["level_primes"] == 2
    assert batch["output"]["scale_log2"] == plan.network["output"]["scale_log2"]


def test_batched_empty_slots_are_masked(batch_setup):
    """Slots >= n hold the network applied to an all-zero image (model values) before masking;
    the negative control evaluates without the final treatment and finds them there."""
    spec, plan, codec, secret, keys, _X, _y, request, response = batch_setup
    client = codec.layout(BATCH_LAYOUT)
    n, full = client.decrypt_slots(secret, response)
    assert n == BATCH_IMAGES and full.shape == (10, plan.ctx.slots)
    at_zero = spec.predict_plain(np.zeros((1, 784)))[0]
    rest = full[:, n:]
    assert np.mean(np.abs(rest - at_zero[:, None]) < 0.05) < 0.01
    assert np.abs(rest).max() <= 256 + np.abs(at_zero).max() + 1
    assert 100 < rest.std() < 200  # uniform on [-256, 256] has std 147.8

    _n, unmasked = client.decrypt_slots(secret, _Unfinished(plan).evaluate(request, keys))
    # without the final bias, slots >= n carry f(0) - bias: the model leaks there unmasked
    final_bias = spec.layers[-1]["bias"]
    assert np.abs(unmasked[:, n:] - (at_zero - final_bias)[:, None]).max() < 0.01


def test_batched_frames_rejected(batch_setup):
    _spec, plan, codec, secret, keys, _X, _y, request, response = batch_setup
    ctx = plan.ctx
    _n, blobs = decode_batch_frames(
        BATCH_REQUEST_MAGIC, request, count=784, max_images=ctx.slots, max_record_bytes=1 << 20
    )
    bad_bodies = [  # built one at a time: each is ~150 MB
        lambda: request[:-100],  # truncated inside the last record
        lambda: request[:10],  # truncated header
        lambda: request + b"\x00",  # trailing bytes
        lambda: encode_batch_frames(BATCH_REQUEST_MAGIC, BATCH_IMAGES, blobs[:-1]),  # 783
        lambda: encode_batch_frames(BATCH_REQUEST_MAGIC, BATCH_IMAGES, [*blobs, blobs[0]]),
        lambda: encode_batch_frames(BATCH_REQUEST_MAGIC, 0, blobs),  # no images
        lambda: encode_batch_frames(BATCH_REQUEST_MAGIC, 2, [b"junk" * 10, *blobs[1:]]),
        lambda: BATCH_REQUEST_MAGIC + bytes(40),
    ]
    for make in bad_bodies:
        body = make()
        with pytest.raises(MalformedPayloadError) as info:
            plan.check(body)
        assert 400 <= info.value.status < 500
        with pytest.raises(MalformedPayloadError):
            plan.evaluate(body, keys)
    too_many = encode_batch_frames(BATCH_REQUEST_MAGIC, ctx.slots + 1, blobs)
    with pytest.raises(PayloadTooLargeError):
        plan.check(too_many)
    with pytest.raises(MalformedPayloadError):
        codec.decrypt(secret, response[:-50])
    with pytest.raises(MalformedPayloadError):  # a response frame is not a request
        plan.evaluate(BATCH_RESPONSE_MAGIC + response[4:], keys)


def test_batch_only_keys_refuse_single_images(batch_setup):
    _spec, plan, codec, secret, keys, X, _y, _request, _response = batch_setup
    assert codec.key_parts([BATCH_LAYOUT]) == frozenset({"public", "relin"})
    assert codec.key_parts() == frozenset({"public", "relin", "galois"})
    with pytest.raises(ParameterMismatchError, match="Galois") as info:
        plan.evaluate(codec.encrypt(secret, X[:1]), keys)
    assert isinstance(info.value, HeinferError) and info.value.status == 422
    batch_bytes = len(codec.key_upload(secret, [BATCH_LAYOUT]))
    full = codec.key_upload(secret)
    assert batch_bytes < 4e6 < len(full)
    out = codec.decrypt(secret, plan.evaluate(codec.encrypt(secret, X[:1]), plan.load_keys(full)))
    assert out.shape == (1, 10)  # the full set serves both


def test_batched_simulation_within_claim(batch_setup, digits):
    spec, plan, *_ = batch_setup
    X = digits[2][:300]
    ref = spec.predict_plain(X)
    claim = plan.network["batch"]["precision"]["score_abs_error"]
    sim = plan.simulate(X, np.random.default_rng(0), layout=BATCH_LAYOUT)
    assert np.abs(sim - ref).max() < claim
    assert np.abs(sim - ref).max() > 0  # noise is modelled, not skipped


def test_batched_simulation_agrees_with_encryption(batch_setup):
    _spec, plan, codec, secret, _keys, X, _y, _request, response = batch_setup
    enc = codec.decrypt(secret, response)
    sim = plan.simulate(X, np.random.default_rng(2), layout=BATCH_LAYOUT)
    claim = plan.network["batch"]["precision"]["score_abs_error"]
    assert np.abs(sim - enc).max() <= 2 * claim
    assert np.mean(sim.argmax(1) == enc.argmax(1)) >= 0.95


def test_format_1_models_load_and_refuse_batches(batch_setup):
    spec, plan, codec, secret, _keys, X, _y, request, _response = batch_setup
    arrays = plan.to_arrays()
    manifest = plan.manifest
    again = NetworkPlan.from_arrays(manifest, arrays)
    assert again.manifest == manifest
    old_network = {k: v for k, v in plan.network.items() if k != "batch"}
    old_network["format_version"] = 1
    old_manifest = common_manifest(old_network, manifest.estimator)
    old_arrays = {k: v for k, v in arrays.items() if not k.startswith("bt")}
    old = NetworkPlan.from_arrays(old_manifest, old_arrays)
    assert list(old.layouts) == [REQUEST_MAGIC]
    with pytest.raises(ParameterMismatchError, match="ckks-network-batch"):
        old.check(request)
    assert list(NetworkCodec(old_manifest).layouts) == [SINGLE_LAYOUT]
    full = old.load_keys(codec.key_upload(secret))
    single = codec.decrypt(secret, old.evaluate(codec.encrypt(secret, X[:1]), full))
    assert np.abs(single - spec.predict_plain(X[:1])).max() < 0.1
    # strict: a format-2 manifest needs its batch arrays, and they must be consistent
    with pytest.raises(ModelFormatError):
        NetworkPlan.from_arrays(manifest, old_arrays)
    with pytest.raises(ModelFormatError):
        NetworkPlan.from_arrays(
            common_manifest(old_network | {"format_version": 2}, manifest.estimator), arrays
        )
    for name, value in [
        ("bt0_col", np.full_like(arrays["bt0_col"], 784)),
        ("bt0_ptr", arrays["bt0_ptr"][::-1].copy()),
        ("bt1_val", arrays["bt1_val"] * 2),  # weights that disagree with the manifest claim
        ("bt0_c", arrays["bt0_c"][:-1]),
    ]:
        with pytest.raises(ModelFormatError):
            NetworkPlan.from_arrays(manifest, {**arrays, name: value})
    with pytest.raises(ModelFormatError):
        NetworkPlan.from_arrays(
            common_manifest(plan.network | {"format_version": 3}, manifest.estimator), arrays
        )


# -- import from torch / ONNX -----------------------------------------------------------------
def _torch_models():
    torch = pytest.importorskip("torch")
    from heinfer.nn import PolyAct, Square, he_friendly_cnn

    torch.manual_seed(0)
    nn = torch.nn
    deep = nn.Sequential(
        nn.Unflatten(1, (1, 28, 28)),
        nn.Conv2d(1, 5, 5, 2),
        nn.Flatten(),
        Square(),
        nn.Linear(720, 32),
        PolyAct(0.2, 0.7),
        nn.Linear(32, 10),
    )
    return torch, [he_friendly_cnn(filters=3), he_friendly_cnn(filters=2, poly=True), deep]


def test_unsupported_layers_named():
    torch = pytest.importorskip("torch")
    from heinfer.plans.network import import_torch

    nn = torch.nn
    with pytest.raises(UnsupportedModelError, match=r"ReLU is not HE-friendly: use heinfer.nn"):
        import_torch(nn.Sequential(nn.Linear(784, 10), nn.ReLU(), nn.Linear(10, 10)))
    with pytest.raises(UnsupportedModelError, match="MaxPool2d"):
        import_torch(
            nn.Sequential(nn.Unflatten(1, (1, 28, 28)), nn.Conv2d(1, 2, 3), nn.MaxPool2d(2))
        )
    with pytest.raises(UnsupportedModelError, match="BatchNorm1d"):
        import_torch(nn.Sequential(nn.Linear(784, 10), nn.BatchNorm1d(10)))


def test_torch_and_numpy_agree(digits):
    torch, models = _torch_models()
    from heinfer.plans.network import import_torch

    X = digits[2][:16]
    for model in models:
        with torch.no_grad():
            ref = model(torch.tensor(X, dtype=torch.float64).float()).double().numpy()
        spec = import_torch(model)
        assert spec.input_shape == IMAGE  # the leading Unflatten
        assert np.allclose(spec.predict_plain(X), ref, atol=1e-4)


def test_onnx_equals_torch(tmp_path, digits):
    torch, models = _torch_models()
    pytest.importorskip("onnx")
    from heinfer.plans.network import import_onnx, import_torch

    X = digits[2][:8]
    for i, model in enumerate(models):
        path = tmp_path / f"m{i}.onnx"
        torch.onnx.export(model, (torch.zeros(1, 784),), str(path), dynamo=False)
        from_onnx, from_torch = import_onnx(str(path)), import_torch(model)
        assert from_onnx.input_shape == from_torch.input_shape == IMAGE  # from the export
        assert np.allclose(from_onnx.predict_plain(X), from_torch.predict_plain(X), atol=1e-6)


def test_mlp_single_and_batched_match_plaintext(digits):
    """Linear(784, 16) -> square -> Linear(16, 10): the dense first layer takes the generic
    diagonal path; weights far below the encoding scale (here the only entries of the two
    extreme diagonals) encode to zero plaintexts, which must be skipped, not multiplied
    (SEAL refuses a product that is a transparent ciphertext)."""
    Xtr, ytr, Xte, _yte = digits
    rng = np.random.default_rng(3)
    hidden = rng.normal(0, 0.05, (16, 784))
    hidden[0, 783] = hidden[15, 0] = 1e-9
    front = NetworkSpec(
        [
            {"type": "linear", "weight": hidden, "bias": rng.normal(0, 0.1, 16)},
            {"type": "poly", "a": 1.0, "b": 0.0},
        ]
    )
    feats = front.predict_plain(Xtr)
    F = np.hstack([feats, np.ones((len(feats), 1))])
    coef = np.linalg.solve(F.T @ F + np.eye(17), F.T @ (np.eye(10)[ytr] * 4.0 - 2.0))
    spec = NetworkSpec([*front.layers, {"type": "linear", "weight": coef[:-1].T, "bias": coef[-1]}])
    plan = compile_network(spec, "mlp", calibration=Xtr[:500])
    codec = NetworkCodec(plan.manifest)
    secret = codec.keygen()
    keys = _keys(plan, codec, secret)
    X = Xte[:24]
    ref = spec.predict_plain(X)
    single = codec.decrypt(secret, plan.evaluate(codec.encrypt(secret, X[:2]), keys))
    assert np.array_equal(single.argmax(1), ref[:2].argmax(1))
    assert np.abs(single - ref[:2]).max() <= plan.manifest.precision.max_abs_error
    batched = codec.decrypt(secret, plan.evaluate(codec.encrypt(secret, X, BATCH_LAYOUT), keys))
    assert np.array_equal(batched.argmax(1), ref.argmax(1))
    assert np.abs(batched - ref).max() <= plan.network["batch"]["precision"]["score_abs_error"]


# -- one schedule, two executors ------------------------------------------------------------------
class _Trace:
    """Wraps an executor's ops and records, per operation, its name, its step and the scale
    and level of its result: what SEAL holds for the encrypted executor, what the simulator
    tracks for the plaintext one."""

    def __init__(self, ops: Any, scale: Any, level: Any) -> None:
        self.ops, self.scale, self.level = ops, scale, level
        self.log: list[tuple[Any, ...]] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.ops, name)
        if name == "fresh":  # the simulator's input encryption: not part of the schedule
            return method

        def traced(*args: Any) -> Any:
            result = method(*args)
            value = result if result is not None else args[0]
            step = args[1] if name == "rotate" else None
            if name == "level":
                self.log.append((name,))
            else:
                scale = round(float(np.log2(self.scale(value))), 6)
                self.log.append((name, step, self.level(value), scale))
            return result

        return traced


def _traces(plan: NetworkPlan, codec: NetworkCodec, x: np.ndarray, layout: str) -> list[Any]:
    from heinfer.he.ckks import CkksParameters
    from heinfer.plans.network.schedule import run_batch, run_single
    from heinfer.plans.network.simulate import NoisyOps, simulate

    secret = codec.keygen()
    keys = _keys(plan, codec, secret, [layout])
    params = CkksParameters.from_dict(plan.network["params"])
    sim = _Trace(NoisyOps(params, np.random.default_rng(0)), lambda v: v.scale, lambda v: v.level)
    simulate(plan, x, layout=layout, ops=sim)  # type: ignore[arg-type]
    ctx = plan.ctx
    top = ctx.top_count
    if layout == SINGLE_LAYOUT:
        schedule, plains = plan.single_schedule()
        he = _Trace(plan.seal_ops(keys, plains), lambda v: v.scale, ctx.prime_count)
        slots = codec.layout(SINGLE_LAYOUT).slots(x[0])
        ct = ctx.load_ciphertext(secret.keys.encrypt(slots, schedule.input_scale))
        assert ctx.prime_count(ct) == top
        run_single(schedule, ct, he)
    else:
        batch = plan.batch_schedule()
        he = _Trace(plan.seal_ops(keys), lambda v: v.scale, ctx.prime_count)
        columns = np.zeros((x.shape[1], ctx.slots))
        columns[:, :1] = x.T
        xs = [ctx.load_ciphertext(secret.keys.encrypt(c, batch.input_scale)) for c in columns]
        run_batch(batch, xs, he)
    return [sim.log, he.log]


@pytest.mark.parametrize("layout", [SINGLE_LAYOUT, BATCH_LAYOUT])
def test_executors_walk_the_same_schedule(layout):
    """Operation by operation, the simulator does what SEAL does, at the same scale and level
    (a tiny MLP keeps the encrypted walk short). Fails if either executor skips, adds or
    reorders an operation, or if the simulator's scale bookkeeping drifts from SEAL's."""
    rng = np.random.default_rng(4)
    spec = NetworkSpec(
        [
            {"type": "linear", "weight": rng.normal(0, 0.2, (4, 20)), "bias": np.zeros(4)},
            {"type": "poly", "a": 1.0, "b": 0.5},
            {"type": "linear", "weight": rng.normal(0, 0.5, (3, 4)), "bias": np.ones(3)},
        ]
    )
    plan = compile_network(spec, "tiny")
    sim_log, he_log = _traces(plan, NetworkCodec(plan.manifest), rng.random((1, 20)), layout)
    assert len(sim_log) > 10
    assert sim_log == he_log


def _two_activation_spec() -> NetworkSpec:
    """conv (2 filters, stride 2) -> square -> linear 16 -> 0.5x^2 + x -> linear 10."""
    rng = np.random.default_rng(1)
    return NetworkSpec(
        [
            {
                "type": "conv2d",
                "weight": rng.normal(0, 0.3, (2, 1, 5, 5)),
                "bias": np.zeros(2),
                "stride": 2,
                "padding": 0,
            },
            {"type": "poly", "a": 1.0, "b": 0.0},
            {"type": "flatten"},
            {"type": "linear", "weight": rng.normal(0, 0.05, (16, 288)), "bias": np.zeros(16)},
            {"type": "poly", "a": 0.5, "b": 1.0},
            {"type": "linear", "weight": rng.normal(0, 0.2, (10, 16)), "bias": np.zeros(10)},
        ],
        IMAGE,
    )


def test_two_activation_network_compiles_and_simulates(digits):
    """Depth-5 networks (the CryptoNets shape) compile to N=16384 and simulate accurately."""
    spec = _two_activation_spec()
    X = digits[2][:4]
    plan = compile_network(spec, "deep", calibration=digits[0][:200])
    assert plan.network["params"]["poly_modulus_degree"] == 16384
    sim = plan.simulate(X, np.random.default_rng(0))
    ref = spec.predict_plain(X)
    assert np.abs(sim - ref).max() < plan.manifest.precision.max_abs_error


@pytest.mark.slow
def test_two_activation_network_encrypted(digits):
    spec = _two_activation_spec()
    X = digits[2][:2]
    plan = compile_network(spec, "deep", calibration=digits[0][:200])
    codec = NetworkCodec(plan.manifest)
    secret = codec.keygen()
    out = codec.decrypt(secret, plan.evaluate(codec.encrypt(secret, X), _keys(plan, codec, secret)))
    assert np.abs(out - spec.predict_plain(X)).max() < plan.manifest.precision.max_abs_error


@pytest.mark.slow
def test_two_activation_network_batched(digits):
    """The depth-5 shape in the batched layout: block-1 accumulators are relinearized before
    their own activation, and the scores land at the single-image path's level and scale."""
    spec = _two_activation_spec()
    X = digits[2][:8]
    plan = compile_network(spec, "deep", calibration=digits[0][:200])
    codec = NetworkCodec(plan.manifest)
    secret = codec.keygen()
    keys = _keys(plan, codec, secret, [BATCH_LAYOUT])
    out = codec.decrypt(secret, plan.evaluate(codec.encrypt(secret, X, BATCH_LAYOUT), keys))
    ref = spec.predict_plain(X)
    claim = plan.network["batch"]["precision"]["score_abs_error"]
    assert np.abs(out - ref).max() < claim
    sim = plan.simulate(X, np.random.default_rng(0), layout=BATCH_LAYOUT)
    assert np.abs(sim - ref).max() < claim
