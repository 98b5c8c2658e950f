"""The linear plan without HTTP: compile, encrypt, evaluate, decrypt on real digits."""

from __future__ import annotations

import io
import json
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import (
    LinearRegression,
    LogisticRegression,
    Ridge,
    SGDClassifier,
    SGDRegressor,
)
from sklearn.svm import LinearSVC
from sklearn.tree import DecisionTreeClassifier

import heinfer
from heinfer.errors import (
    BadInputError,
    ModelFormatError,
    NotFittedError,
    ParameterMismatchError,
    PayloadTooLargeError,
    ShapeError,
    UnsupportedModelError,
)
from heinfer.he.backend import SecretKey
from heinfer.plans.linear import LAYOUT_KIND, LinearCodec, RowpackClient, RowpackServer


def _roundtrip(model: heinfer.EncryptedModel, X: np.ndarray) -> np.ndarray:
    """Through the Plan/Codec interface: key upload, one coeff-rowpack body, its response."""
    codec = LinearCodec(model.manifest)
    secret = codec.keygen()
    keys = model.plan.load_keys(codec.key_upload(secret))
    body = codec.encrypt(secret, X, LAYOUT_KIND)
    assert model.plan.check(body).samples == len(X)
    scores = codec.decrypt(secret, model.plan.evaluate(body, keys))
    assert scores.shape == (len(X), model.manifest.n_outputs)
    return scores


def test_mnist_logreg_matches_plaintext(
    mnist: dict[str, np.ndarray],
    mnist_model: heinfer.EncryptedModel,
    mnist_estimator: LogisticRegression,
) -> None:
    X = mnist["X_test"][:40]
    decrypted = _roundtrip(mnist_model, X)
    reference = mnist_estimator.decision_function(X)
    np.testing.assert_allclose(mnist_model.predict_plain(X), reference, atol=1e-12)
    assert (decrypted.argmax(1) == reference.argmax(1)).all()
    error = np.abs(decrypted - reference).max()
    assert error <= mnist_model.manifest.precision.expected_abs_error
    assert error <= 1e-3


@pytest.mark.parametrize(
    "estimator",
    [
        LogisticRegression(max_iter=300),
        LinearRegression(),
        Ridge(alpha=1.0),
        LinearSVC(),
        SGDClassifier(random_state=0),
        SGDRegressor(random_state=0),
    ],
    ids=lambda e: type(e).__name__,
)
def test_supported_estimators(estimator: object, mnist: dict[str, np.ndarray]) -> None:
    X, y = mnist["X_train"][:1500], mnist["y_train"][:1500]
    binary = isinstance(estimator, LogisticRegression | LinearSVC)
    target = (y == 3).astype(int) if binary else y.astype(np.float64)
    estimator.fit(X, target)  # type: ignore[attr-defined]
    model = heinfer.compile(estimator, name="m", input_range=(0.0, 1.0))
    Xt = mnist["X_test"][:5]
    decrypted = _roundtrip(model, Xt)
    reference = model.predict_plain(Xt)
    assert decrypted.shape == reference.shape == (5, model.manifest.n_outputs)
    scale = max(1.0, float(np.abs(reference).max()))
    assert np.abs(decrypted - reference).max() <= 1e-3 * scale
    assert model.manifest.scheme["security_bits"] >= 128


def test_unfitted_and_unsupported() -> None:
    with pytest.raises(NotFittedError, match="fit"):
        heinfer.compile(LogisticRegression(), name="m", input_range=(0, 1))
    with pytest.raises(UnsupportedModelError, match="LogisticRegression"):
        heinfer.compile(DecisionTreeClassifier(), name="m", input_range=(0, 1))


def test_input_range_is_required(mnist_estimator: LogisticRegression) -> None:
    with pytest.raises(ShapeError, match="input_range"):
        heinfer.compile(mnist_estimator, name="m")


def test_predict_plain_checks_shape(mnist_model: heinfer.EncryptedModel) -> None:
    with pytest.raises(ShapeError, match=r"\(n_samples, 784\)"):
        mnist_model.predict_plain(np.zeros((2, 10)))


def test_save_load_roundtrip(mnist_model: heinfer.EncryptedModel, tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = mnist_model.save(tmp_path / "m.heinfer")
    with zipfile.ZipFile(path) as archive:
        header = json.loads(archive.read("heinfer.json"))
    assert header == {"format": "heinfer.model", "format_version": 2, "family": "coeff-rowpack"}
    loaded = heinfer.load_model(path)
    assert loaded.manifest == mnist_model.manifest
    X = np.random.default_rng(0).random((3, 784))
    np.testing.assert_array_equal(loaded.predict_plain(X), mnist_model.predict_plain(X))


def _rewrite_header(source: Path, target: Path, header: dict[str, object]) -> Path:
    """A copy of a saved model whose heinfer.json is `header` (same manifest and arrays)."""
    with zipfile.ZipFile(source) as archive:
        manifest_json = archive.read("manifest.json")
        arrays_npz = archive.read("arrays.npz")
    with zipfile.ZipFile(target, "w") as archive:
        archive.writestr("heinfer.json", json.dumps(header))
        archive.writestr("manifest.json", manifest_json)
        archive.writestr("arrays.npz", arrays_npz)
    return target


def test_format_version_1_linear_models_still_load(
    mnist_model: heinfer.EncryptedModel, mnist: dict[str, np.ndarray], tmp_path: Path
) -> None:
    """A model saved before format 2: header named the plan ("linear"), no family; the
    manifest and the plan arrays (coef, intercept, w_int, b_int) were already what they are."""
    saved = mnist_model.save(tmp_path / "v2.heinfer")
    v1 = _rewrite_header(
        saved, tmp_path / "v1.heinfer",
        {"format": "heinfer.model", "format_version": 1, "plan": "linear"},
    )
    with np.load(io.BytesIO(zipfile.ZipFile(v1).read("arrays.npz"))) as data:
        assert sorted(data.files) == ["b_int", "coef", "intercept", "w_int"]
    loaded = heinfer.load_model(v1)
    assert loaded.manifest == mnist_model.manifest and loaded.kind == "coeff-rowpack"
    for name in ("coef", "intercept", "w_int", "b_int"):
        np.testing.assert_array_equal(loaded.plan.to_arrays()[name], mnist_model.plan.arrays[name])
    X = mnist["X_test"][:6]
    np.testing.assert_array_equal(loaded.predict_plain(X), mnist_model.predict_plain(X))
    decrypted = _roundtrip(loaded, X)
    assert (decrypted.argmax(1) == mnist_model.predict_plain(X).argmax(1)).all()
    assert np.abs(decrypted - mnist_model.predict_plain(X)).max() <= 1e-3
    # and the loaded plan serves a client of the original model (same parameters, same keys)
    assert loaded.plan.key_fingerprint == mnist_model.plan.key_fingerprint


def test_unknown_format_versions_are_refused(
    mnist_model: heinfer.EncryptedModel, tmp_path: Path
) -> None:
    saved = mnist_model.save(tmp_path / "v2.heinfer")
    for version in (99, 0, "2", None):
        future = _rewrite_header(
            saved, tmp_path / "future.heinfer",
            {"format": "heinfer.model", "format_version": version, "family": "coeff-rowpack"},
        )
        with pytest.raises(ModelFormatError, match=f"format version {version}.*upgrade heinfer"):
            heinfer.load_model(future)
    # the same archive with a readable version loads: the version alone was refused
    current = _rewrite_header(
        saved, tmp_path / "current.heinfer",
        {"format": "heinfer.model", "format_version": 2, "family": "coeff-rowpack"},
    )
    assert heinfer.load_model(current).manifest == mnist_model.manifest


def test_load_rejects_foreign_files(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import pickle

    bad = tmp_path / "pickle.heinfer"
    bad.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ModelFormatError):
        heinfer.load_model(bad)
    future = tmp_path / "future.heinfer"
    with zipfile.ZipFile(future, "w") as archive:
        archive.writestr("heinfer.json", '{"format": "heinfer.model", "format_version": 99}')
    with pytest.raises(ModelFormatError, match="version 99"):
        heinfer.load_model(future)


def test_plan_check_answers_what_the_service_answers(
    mnist_model: heinfer.EncryptedModel,
    mnist: dict[str, np.ndarray],
    mnist_estimator: LogisticRegression,
) -> None:
    """`Plan.check` decides the service's 400/413/422 for per-sample bodies (as
    tests/e2e/test_service.py sees them over HTTP): a short body is malformed, not too large."""
    plan, codec = mnist_model.plan, LinearCodec(mnist_model.manifest)
    secret = codec.keygen()
    assert plan.check(codec.encrypt(secret, mnist["X_test"][:2], LAYOUT_KIND)).samples == 2
    body = codec.encrypt(secret, mnist["X_test"][:1], LAYOUT_KIND)  # as the e2e test sends
    assert plan.check(body).samples == 1 and plan.check(body).layout == LAYOUT_KIND
    malformed = {
        "garbage": b"garbage",
        "truncated": body[:-1000],
        "header-only": body[:20],
        "trailing": body + b"x",
        "no records": body[:4] + bytes(4),
    }
    answers = {}
    for name, bad in malformed.items():
        try:
            plan.check(bad)
            answers[name] = "accepted"
        except BadInputError as exc:
            answers[name] = f"{type(exc).__name__} {exc.status}"
    assert answers == dict.fromkeys(malformed, "MalformedPayloadError 400")
    too_many = body[:4] + struct.pack("<I", mnist_model.manifest.max_batch + 1) + body[8:]
    with pytest.raises(PayloadTooLargeError):
        plan.check(too_many)
    other = LinearCodec(heinfer.compile(
        mnist_estimator, name="other", input_range=(0.0, 1.0), weight_bits=14
    ).manifest)
    assert other.key_fingerprint != codec.key_fingerprint
    with pytest.raises(ParameterMismatchError):
        plan.check(other.encrypt(other.keygen(), mnist["X_test"][:1], LAYOUT_KIND))


def test_every_test_digit_agrees_with_plaintext_in_process(
    mnist_model: heinfer.EncryptedModel, mnist: dict[str, np.ndarray]
) -> None:
    """All shared test digits (1,500; the bundled sample where the share is absent) through
    the single-image path as a worker runs it, no HTTP: numpy encryption, numpy evaluation
    with the full privacy treatment, numpy decryption; every argmax equals plaintext's."""
    plan = mnist_model.plan
    codec = LinearCodec(mnist_model.manifest)
    secret = SecretKey.generate(codec.context)
    key = plan.load_keys(codec.key_upload(secret))
    derived = [a for arrays in key._derived.values() for a in arrays]
    assert derived and key.nbytes >= sum(a.nbytes for a in derived)  # the cache counts them
    rowpack = plan.layouts[b"HEQ1"]
    client = codec.layouts[LAYOUT_KIND]
    assert isinstance(rowpack, RowpackServer) and isinstance(client, RowpackClient)
    X = mnist["X_test"]
    scores = np.stack([
        client.decrypt_record(secret, rowpack.evaluate_record(r, key))
        for r in client.encrypt_records(secret, X)
    ])
    reference = mnist_model.predict_plain(X)
    assert (scores.argmax(1) == reference.argmax(1)).all()
    assert np.abs(scores - reference).max() <= mnist_model.manifest.precision.expected_abs_error


def test_requests_seeded_by_seals_own_generator_take_seals_loader(
    mnist_model: heinfer.EncryptedModel, mnist: dict[str, np.ndarray]
) -> None:
    """A request as SEAL's `encrypt_symmetric` writes it (Blake2xb seed: node-seal, older
    clients) is expanded by SEAL's loader and evaluated like a SHAKE-256 one."""
    import tenseal.sealapi as seal

    from heinfer.he import serialization as fmt
    from heinfer.he.scratch import SCRATCH

    plan = mnist_model.plan
    codec = LinearCodec(mnist_model.manifest)
    context = codec.context
    secret = SecretKey.generate(context)
    key = plan.load_keys(codec.key_upload(secret))
    x_int = codec.quantize(mnist["X_test"][:1])[0]
    encryptor = seal.Encryptor(context.seal_context, secret._secret)
    saved = SCRATCH.save(encryptor.encrypt_symmetric(context.plaintext_from_coefficients(x_int)))
    _, c0, tail = fmt.seeded_ciphertext_parts(saved, context.n, 2)
    assert tail[fmt.HEADER.size] == fmt.PRNG_BLAKE2XB
    record = context.request_bytes_from(c0, fmt.PRNG_BLAKE2XB, tail[-fmt.PRNG_SEED_BYTES :])
    ours = secret.encrypt(x_int)
    assert ours[-fmt.PRNG_SEED_BYTES - 1] == fmt.PRNG_SHAKE256
    client = codec.layouts[LAYOUT_KIND]
    assert isinstance(client, RowpackClient)
    reference = mnist_model.predict_plain(mnist["X_test"][:1])[0]
    for request in (record, ours):
        c0_x, c1_x = context.request_arrays(request)
        loaded = context.ciphertext_arrays(context.load_request(request).ciphertext)
        assert np.array_equal(c0_x, loaded[0]) and np.array_equal(c1_x, loaded[1])
        response = plan.layouts[b"HEQ1"].evaluate_record(request, key)
        assert np.abs(client.decrypt_record(secret, response) - reference).max() <= 1e-3
    # an unknown PRNG type reaches SEAL's loader, which refuses it as malformed
    bad = record[: -fmt.PRNG_SEED_BYTES - 1] + b"\x07" + record[-fmt.PRNG_SEED_BYTES :]
    with pytest.raises(BadInputError):
        context.request_arrays(bad)
