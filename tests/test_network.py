"""Encrypted CNN plans (heinfer.plans.network): import, compile, evaluate, privacy of responses.

The encryption tests build their network from numpy weights (no torch); the import tests skip
cleanly when torch (or onnx) is not installed.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

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
from heinfer.plans.network import (
    BATCH_LAYOUT,
    BATCH_REQUEST_MAGIC,
    BATCH_RESPONSE_MAGIC,
    NetworkCodec,
    NetworkPlan,
    NetworkSpec,
    compile_network,
    decode_batch_frames,
    encode_batch_frames,
)

MNIST = Path(os.environ.get("HEINFER_MNIST", "/work/shared/data/mnist"))


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    nd = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(nd)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * nd).reshape(dims)


@pytest.fixture(scope="module")
def mnist() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    if not (MNIST / "test-images-idx3-ubyte.gz").exists():
        pytest.skip("MNIST data not available")
    Xtr = _idx(MNIST / "train-images-idx3-ubyte.gz").reshape(-1, 784)[:3000] / 255.0
    ytr = _idx(MNIST / "train-labels-idx1-ubyte.gz")[:3000]
    Xte = _idx(MNIST / "test-images-idx3-ubyte.gz").reshape(-1, 784) / 255.0
    yte = _idx(MNIST / "test-labels-idx1-ubyte.gz")
    return Xtr, ytr, Xte, yte


def _numpy_cnn(Xtr: np.ndarray, ytr: np.ndarray, filters: int = 3, stride: int = 1) -> NetworkSpec:
    """conv(random 5x5 filters) -> square -> avgpool 2 -> linear 10 fitted by ridge (no torch)."""
    rng = np.random.default_rng(0)
    conv = {
        "type": "conv2d",
        "weight": rng.normal(0, 0.25, (filters, 1, 5, 5)),
        "bias": rng.normal(0, 0.1, filters),
        "stride": stride,
        "padding": 0,
    }
    front = NetworkSpec(
        [
            conv,
            {"type": "poly", "a": 1.0, "b": 0.0},
            {"type": "avgpool", "kernel": 2, "stride": 2},
            {"type": "flatten"},
        ]
    )
    feats = front.predict_plain(Xtr)
    F = np.hstack([feats, np.ones((len(feats), 1))])
    Y = np.eye(10)[ytr] * 4.0 - 2.0
    coef = np.linalg.solve(F.T @ F + 1.0 * np.eye(F.shape[1]), F.T @ Y)
    linear = {"type": "linear", "weight": coef[:-1].T, "bias": coef[-1]}
    return NetworkSpec([*front.layers, linear])


@pytest.fixture(scope="module")
def he_setup(mnist):
    Xtr, ytr, Xte, yte = mnist
    spec = _numpy_cnn(Xtr, ytr)
    plan = compile_network(spec, "test-cnn", calibration=Xtr[:500])
    codec = NetworkCodec(plan.manifest())
    codec.keygen()
    keys = codec.public_keys()
    return spec, plan, codec, keys, Xte[:10], yte[:10]


# -- encryption (numpy weights, no torch) ---------------------------------------------------------
def test_encrypted_scores_match_plaintext(he_setup):
    spec, plan, codec, keys, X, y = he_setup
    ref = spec.predict_plain(X)
    scores = codec.decrypt(plan.evaluate(codec.encrypt(X), keys))
    assert scores.shape == (10, 10)
    assert np.array_equal(scores.argmax(1), ref.argmax(1))
    assert np.abs(scores - ref).max() <= plan.manifest()["precision"]["score_abs_error"]
    assert (ref.argmax(1) == y).mean() >= 0.7  # the toy ridge readout is a real classifier


def test_single_image_shape(he_setup):
    spec, plan, codec, keys, X, _ = he_setup
    out = codec.decrypt(plan.evaluate(codec.encrypt(X[0]), keys))
    assert out.shape == (1, 10)
    assert np.abs(out - spec.predict_plain(X[:1])).max() < 0.1


def test_manifest_lists_exactly_the_rotations_used(he_setup, monkeypatch):
    _spec, plan, codec, keys, X, _ = he_setup
    used: set[int] = set()
    ctx = plan.ctx
    original = ctx.rotate

    def spy(ct, step, galois):
        used.add(step)
        return original(ct, step, galois)

    monkeypatch.setattr(ctx, "rotate", spy)
    plan.evaluate(codec.encrypt(X[0]), keys)
    manifest = plan.manifest()
    assert sorted(used) == manifest["keys"]["galois_steps"]
    assert manifest["keys"]["public"] and manifest["keys"]["relin"]
    gk = ctx.load_galois_keys(keys["galois"], manifest["keys"]["galois_steps"])
    from heinfer.he.ckks import galois_element

    assert not gk.has_key(galois_element(2, ctx.n))  # no keys beyond the plan's steps
    assert sum(len(v) for v in keys.values()) < 20e6


def test_non_output_slots_are_masked(he_setup):
    spec, plan, codec, keys, X, _ = he_setup
    full = codec.decrypt_slots(plan.evaluate(codec.encrypt(X[:1]), keys))[0]
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
    spec, plan, codec, keys, X, _ = he_setup
    arrays = plan.to_arrays()
    assert all(isinstance(v, np.ndarray) and v.dtype != object for v in arrays.values())
    again = NetworkPlan.from_arrays(plan.manifest(), arrays)
    out = codec.decrypt(again.evaluate(codec.encrypt(X[:2]), keys))
    assert np.abs(out - spec.predict_plain(X[:2])).max() < 0.1


def test_simulation_matches_plaintext(he_setup):
    spec, plan, _codec, _keys, X, _ = he_setup
    sim = plan.simulate(X, np.random.default_rng(0))
    ref = spec.predict_plain(X)
    assert np.abs(sim - ref).max() < plan.manifest()["precision"]["score_abs_error"]


def test_secret_key_round_trip(he_setup):
    spec, plan, codec, keys, X, _ = he_setup
    other = NetworkCodec(plan.manifest())
    other.load_secret(codec.secret_bytes())
    out = other.decrypt(plan.evaluate(codec.encrypt(X[:1]), keys))
    assert np.abs(out - spec.predict_plain(X[:1])).max() < 0.1


def test_bad_payloads(he_setup):
    _spec, plan, codec, keys, X, _ = he_setup
    req = codec.encrypt(X[0])
    with pytest.raises(MalformedPayloadError):
        plan.evaluate(b"garbage", keys)
    with pytest.raises(MalformedPayloadError):
        plan.evaluate(req[:-100], keys)
    corrupt = bytearray(req)
    corrupt[8 + 4 + 14 : 8 + 4 + 14 + 2] = b"\x00\x00"  # SEAL magic inside the envelope
    with pytest.raises(MalformedPayloadError):
        plan.evaluate(bytes(corrupt), keys)
    bad_kind = bytearray(req)
    bad_kind[8 + 4 + 5] = 2  # envelope says: public key
    with pytest.raises(MalformedPayloadError):
        plan.evaluate(bytes(bad_kind), keys)
    with pytest.raises(MalformedPayloadError):
        plan.evaluate(req, {**keys, "galois": keys["galois"][:1000]})


def test_other_parameters_rejected(he_setup):
    _spec, plan, codec, keys, X, _ = he_setup
    manifest = plan.manifest()
    from heinfer.he.ckks import CkksContext, ClientKeys, select_parameters

    bits = manifest["params"]["coeff_modulus_bits"]
    other = CkksContext(select_parameters([bits[0] - 1, *bits[1:]]))
    foreign = ClientKeys(other)
    from heinfer.plans.network import REQUEST_MAGIC, encode_frames

    req = encode_frames(REQUEST_MAGIC, [foreign.encrypt(np.zeros(other.slots), 2.0**28)])
    with pytest.raises(ParameterMismatchError):
        plan.evaluate(req, keys)
    with pytest.raises(ParameterMismatchError):
        plan.evaluate(codec.encrypt(X[0]), foreign.public_keys(manifest["keys"]["galois_steps"]))


# -- batched layout (slot i = image i, one ciphertext per pixel) ---------------------------------
# A smaller conv (2 filters, stride 2: 288 hidden units) keeps one batch at a few seconds here.
BATCH_IMAGES = 48


@pytest.fixture(scope="module")
def batch_setup(mnist):
    Xtr, ytr, Xte, yte = mnist
    spec = _numpy_cnn(Xtr, ytr, filters=2, stride=2)
    plan = compile_network(spec, "test-cnn-batch", calibration=Xtr[:500])
    codec = NetworkCodec(plan.manifest())
    codec.keygen()
    keys = codec.public_keys(BATCH_LAYOUT)  # batch-only: public + relin
    X = Xte[:BATCH_IMAGES]
    request = codec.encrypt(X, layout=BATCH_LAYOUT)
    response = plan.evaluate(request, keys)
    return spec, plan, codec, keys, X, yte[:BATCH_IMAGES], request, response


def test_batched_scores_match_plaintext(batch_setup):
    spec, plan, codec, keys, X, y, _request, response = batch_setup
    manifest = plan.manifest()
    batch = manifest["batch"]
    assert set(keys) == {"public", "relin"} and batch["keys"]["galois_steps"] == []
    scores = codec.decrypt(response)
    ref = spec.predict_plain(X)
    assert scores.shape == (BATCH_IMAGES, 10)
    assert np.array_equal(scores.argmax(1), ref.argmax(1))
    assert np.abs(scores - ref).max() <= batch["precision"]["score_abs_error"]
    assert (ref.argmax(1) == y).mean() >= 0.7
    # the output sits where the single-image path leaves it: two primes, 2^log_df
    assert batch["output"]["level_primes"] == manifest["output"]["level_primes"] == 2
    assert batch["output"]["scale_log2"] == manifest["output"]["scale_log2"]


def test_batched_empty_slots_are_masked(batch_setup):
    """Slots >= n hold the network applied to an all-zero image (model values) before masking;
    the negative control evaluates without the final treatment and finds them there."""
    spec, plan, codec, keys, _X, _y, request, response = batch_setup
    n, full = codec.decrypt_batch_slots(response)
    assert n == BATCH_IMAGES and full.shape == (10, plan.ctx.slots)
    at_zero = spec.predict_plain(np.zeros((1, 784)))[0]
    rest = full[:, n:]
    assert np.mean(np.abs(rest - at_zero[:, None]) < 0.05) < 0.01
    assert np.abs(rest).max() <= 256 + np.abs(at_zero).max() + 1
    assert 100 < rest.std() < 200  # uniform on [-256, 256] has std 147.8

    ctx = plan.ctx
    _n, blobs = decode_batch_frames(
        BATCH_REQUEST_MAGIC, request, count=784, max_images=ctx.slots, max_record_bytes=1 << 20
    )
    xs = [ctx.load_ciphertext(b) for b in blobs]
    raw = plan.evaluate_batch_ciphertexts(xs, n, plan._server_keys(keys), raw=True)
    unmasked = np.stack([codec._need().decrypt_ciphertext(ct) for ct in raw])
    # without the final bias, slots >= n carry f(0) - bias: the model leaks there unmasked
    final_bias = spec.layers[-1]["bias"]
    assert np.abs(unmasked[:, n:] - (at_zero - final_bias)[:, None]).max() < 0.01


def test_batched_frames_rejected(batch_setup):
    _spec, plan, codec, keys, _X, _y, request, response = batch_setup
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
        with pytest.raises(MalformedPayloadError) as info:
            plan.evaluate(make(), keys)
        assert 400 <= info.value.status < 500
    with pytest.raises(PayloadTooLargeError):
        plan.evaluate(encode_batch_frames(BATCH_REQUEST_MAGIC, ctx.slots + 1, blobs), keys)
    with pytest.raises(MalformedPayloadError):
        codec.decrypt(response[:-50])
    with pytest.raises(MalformedPayloadError):  # a response frame is not a request
        plan.evaluate(BATCH_RESPONSE_MAGIC + response[4:], keys)
    with pytest.raises(PayloadTooLargeError):
        codec.encrypt(np.zeros((ctx.slots + 1, 784)), layout=BATCH_LAYOUT)
    assert (
        len(
            decode_batch_frames(
                BATCH_REQUEST_MAGIC,
                request,
                count=784,
                max_images=ctx.slots,
                max_record_bytes=1 << 20,
            )[1]
        )
        == 784
    )


def test_batch_only_keys_refuse_single_images(batch_setup):
    _spec, plan, codec, keys, X, _y, _request, _response = batch_setup
    assert frozenset(keys) in plan.key_part_sets()
    assert frozenset({"public", "relin", "galois"}) in plan.key_part_sets()
    with pytest.raises(ParameterMismatchError, match="Galois") as info:
        plan.evaluate(codec.encrypt(X[:1]), keys)
    assert isinstance(info.value, HeinferError) and info.value.status == 422
    full = codec.public_keys()
    assert set(full) == {"public", "relin", "galois"}
    batch_bytes = sum(len(v) for v in keys.values())
    assert batch_bytes < 4e6 < sum(len(v) for v in full.values())
    out = codec.decrypt(plan.evaluate(codec.encrypt(X[:1]), full))  # the full set serves both
    assert out.shape == (1, 10)


def test_batched_simulation_within_claim(batch_setup, mnist):
    spec, plan, *_ = batch_setup
    X = mnist[2][:300]
    ref = spec.predict_plain(X)
    claim = plan.manifest()["batch"]["precision"]["score_abs_error"]
    sim = plan.simulate(X, np.random.default_rng(0), layout=BATCH_LAYOUT)
    assert np.abs(sim - ref).max() < claim
    assert np.abs(sim - ref).max() > 0  # noise is modelled, not skipped


def test_format_1_models_load_and_refuse_batches(batch_setup):
    spec, plan, codec, keys, X, _y, request, _response = batch_setup
    arrays = plan.to_arrays()
    manifest = plan.manifest()
    again = NetworkPlan.from_arrays(manifest, arrays)
    assert again.manifest() == manifest
    old_manifest = {k: v for k, v in manifest.items() if k != "batch"}
    old_manifest["format_version"] = 1
    old_arrays = {k: v for k, v in arrays.items() if not k.startswith("bt")}
    old = NetworkPlan.from_arrays(old_manifest, old_arrays)
    assert not old.has_batch and old.key_part_sets() == [frozenset({"public", "relin", "galois"})]
    with pytest.raises(ParameterMismatchError, match="format 1"):
        old.evaluate(request, keys)
    assert NetworkCodec(old_manifest).batch_capacity == 0
    single = codec.decrypt(old.evaluate(codec.encrypt(X[:1]), codec.public_keys()))
    assert np.abs(single - spec.predict_plain(X[:1])).max() < 0.1
    # strict: a format-2 manifest needs its batch arrays, and they must be consistent
    with pytest.raises(ModelFormatError):
        NetworkPlan.from_arrays(manifest, old_arrays)
    with pytest.raises(ModelFormatError):
        NetworkPlan.from_arrays(old_manifest | {"format_version": 2}, arrays)
    for name, value in [
        ("bt0_col", np.full_like(arrays["bt0_col"], 784)),
        ("bt0_ptr", arrays["bt0_ptr"][::-1].copy()),
        ("bt1_val", arrays["bt1_val"] * 2),  # weights that disagree with the manifest claim
        ("bt0_c", arrays["bt0_c"][:-1]),
    ]:
        with pytest.raises(ModelFormatError):
            NetworkPlan.from_arrays(manifest, {**arrays, name: value})
    with pytest.raises(ModelFormatError):
        NetworkPlan.from_arrays(manifest | {"format_version": 3}, arrays)


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


def test_torch_and_numpy_agree(mnist):
    torch, models = _torch_models()
    from heinfer.plans.network import import_torch

    X = mnist[2][:16]
    for model in models:
        with torch.no_grad():
            ref = model(torch.tensor(X, dtype=torch.float64).float()).double().numpy()
        spec = import_torch(model)
        assert np.allclose(spec.predict_plain(X), ref, atol=1e-4)


def test_onnx_equals_torch(tmp_path, mnist):
    torch, models = _torch_models()
    pytest.importorskip("onnx")
    from heinfer.plans.network import import_onnx, import_torch

    X = mnist[2][:8]
    for i, model in enumerate(models):
        path = tmp_path / f"m{i}.onnx"
        torch.onnx.export(model, (torch.zeros(1, 784),), str(path), dynamo=False)
        a = import_onnx(str(path)).predict_plain(X)
        b = import_torch(model).predict_plain(X)
        assert np.allclose(a, b, atol=1e-6)


def test_mlp_single_and_batched_match_plaintext(mnist):
    """Linear(784, 16) -> square -> Linear(16, 10): the dense first layer takes the generic
    diagonal path; weights far below the encoding scale (here the only entries of the two
    extreme diagonals) encode to zero plaintexts, which must be skipped, not multiplied
    (SEAL refuses a product that is a transparent ciphertext)."""
    Xtr, ytr, Xte, _yte = mnist
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
    manifest = plan.manifest()
    codec = NetworkCodec(manifest)
    codec.keygen()
    keys = codec.public_keys()
    X = Xte[:24]
    ref = spec.predict_plain(X)
    single = codec.decrypt(plan.evaluate(codec.encrypt(X[:2]), keys))
    assert np.array_equal(single.argmax(1), ref[:2].argmax(1))
    assert np.abs(single - ref[:2]).max() <= manifest["precision"]["score_abs_error"]
    batched = codec.decrypt(plan.evaluate(codec.encrypt(X, layout=BATCH_LAYOUT), keys))
    assert np.array_equal(batched.argmax(1), ref.argmax(1))
    assert np.abs(batched - ref).max() <= manifest["batch"]["precision"]["score_abs_error"]


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
        ]
    )


def test_two_activation_network_compiles_and_simulates(mnist):
    """Depth-5 networks (the CryptoNets shape) compile to N=16384 and simulate accurately."""
    spec = _two_activation_spec()
    X = mnist[2][:4]
    plan = compile_network(spec, "deep", calibration=mnist[0][:200])
    assert plan.manifest()["params"]["poly_modulus_degree"] == 16384
    sim = plan.simulate(X, np.random.default_rng(0))
    ref = spec.predict_plain(X)
    assert np.abs(sim - ref).max() < plan.manifest()["precision"]["score_abs_error"]


@pytest.mark.slow
def test_two_activation_network_encrypted(mnist):
    spec = _two_activation_spec()
    X = mnist[2][:2]
    plan = compile_network(spec, "deep", calibration=mnist[0][:200])
    codec = NetworkCodec(plan.manifest())
    codec.keygen()
    out = codec.decrypt(plan.evaluate(codec.encrypt(X), codec.public_keys()))
    assert (
        np.abs(out - spec.predict_plain(X)).max() < plan.manifest()["precision"]["score_abs_error"]
    )


@pytest.mark.slow
def test_two_activation_network_batched(mnist):
    """The depth-5 shape in the batched layout: block-1 accumulators are relinearized before
    their own activation, and the scores land at the single-image path's level and scale."""
    spec = _two_activation_spec()
    X = mnist[2][:8]
    plan = compile_network(spec, "deep", calibration=mnist[0][:200])
    codec = NetworkCodec(plan.manifest())
    codec.keygen()
    keys = codec.public_keys(BATCH_LAYOUT)
    out = codec.decrypt(plan.evaluate(codec.encrypt(X, layout=BATCH_LAYOUT), keys))
    ref = spec.predict_plain(X)
    claim = plan.manifest()["batch"]["precision"]["score_abs_error"]
    assert np.abs(out - ref).max() < claim
    assert np.abs(plan.simulate_batch(X, np.random.default_rng(0)) - ref).max() < claim
