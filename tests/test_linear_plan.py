"""The linear plan without HTTP: compile, encrypt, evaluate, decrypt on real digits."""

from __future__ import annotations

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
    ModelFormatError,
    NotFittedError,
    ShapeError,
    UnsupportedModelError,
)
from heinfer.he.backend import SecretKey
from heinfer.plans.linear import LinearCodec


def _roundtrip(model: heinfer.EncryptedModel, X: np.ndarray) -> np.ndarray:
    codec = LinearCodec(model.manifest)
    secret = SecretKey.generate(codec.context)
    key = model.plan.load_key(secret.public_key_bytes())
    out = [
        codec.decrypt(secret, model.plan.evaluate(record, key))
        for record in codec.encrypt(secret, X)
    ]
    return np.stack(out)


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
    loaded = heinfer.load_model(path)
    assert loaded.manifest == mnist_model.manifest
    X = np.random.default_rng(0).random((3, 784))
    np.testing.assert_array_equal(loaded.predict_plain(X), mnist_model.predict_plain(X))


def test_load_rejects_foreign_files(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import pickle
    import zipfile

    bad = tmp_path / "pickle.heinfer"
    bad.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ModelFormatError):
        heinfer.load_model(bad)
    future = tmp_path / "future.heinfer"
    with zipfile.ZipFile(future, "w") as archive:
        archive.writestr("heinfer.json", '{"format": "heinfer.model", "format_version": 99}')
    with pytest.raises(ModelFormatError, match="version 99"):
        heinfer.load_model(future)


def test_work_made_ahead_is_used_once_and_changes_no_result(
    mnist_model: heinfer.EncryptedModel, mnist: dict[str, np.ndarray]
) -> None:
    """Idle workers pre-make encryptions of zero and masks; each must serve one result only
    (a reused re-randomizer or mask would let two responses be subtracted)."""
    plan = mnist_model.plan
    codec = LinearCodec(mnist_model.manifest)
    secret = SecretKey.generate(codec.context)
    key = plan.load_key(secret.public_key_bytes())
    assert key.prepare_spare(2) and key.prepare_spare(2) and not key.prepare_spare(2)
    while plan.context.prepare_spare_mask(3):
        pass
    made = {id(c) for c in key._spare_zeros}
    masks = [m.copy() for m in plan.context._spare_masks]
    handed = [key.encrypt_zero() for _ in range(3)]
    assert {id(c) for c in handed[:2]} == made and id(handed[2]) not in made
    drawn = [plan.context.uniform_c0() for _ in range(4)]
    assert all(any(np.array_equal(d, m) for m in masks) for d in drawn[:3])
    assert not any(np.array_equal(drawn[3], m) for m in masks)
    assert len({d.tobytes() for d in drawn}) == 4
    # with a fresh stock, results are what they always are
    key.prepare_spare(2)
    plan.context.prepare_spare_mask(2)
    X = mnist["X_test"][:4]
    scores = np.stack(
        [codec.decrypt(secret, plan.evaluate(r, key)) for r in codec.encrypt(secret, X)]
    )
    assert np.abs(scores - mnist_model.predict_plain(X)).max() <= 1e-3
