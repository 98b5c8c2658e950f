"""Pipeline folding (plans/linear/fold.py) and the chosen input precision (precision.py)."""

from __future__ import annotations

import numpy as np
import pytest

import heinfer
from heinfer.errors import UnsupportedModelError
from heinfer.plans.base import codec_for
from heinfer.plans.linear.precision import choose_input_bits


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    X = rng.normal(0, 1, (300, 20)) * rng.uniform(0.5, 5, 20) + rng.uniform(-3, 3, 20)
    y = (X[:, 0] + 0.5 * X[:, 1] - X[:, 2] > 0).astype(int) + (X[:, 3] > 2)
    return X, y


def test_scaler_pca_logistic_folds_into_one_layer() -> None:
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = _data()
    pipe = make_pipeline(StandardScaler(), PCA(8, whiten=True), LogisticRegression()).fit(X, y)
    model = heinfer.compile(pipe, name="pipe", X=X)
    assert model.manifest.n_features == 20 and model.manifest.input.client_side == []
    assert "StandardScaler" in model.manifest.estimator
    np.testing.assert_allclose(model.predict_plain(X), pipe.decision_function(X), atol=1e-9)
    codec = codec_for(model.manifest)
    secret = codec.keygen()
    keys = model.plan.load_keys(codec.key_upload(secret))
    scores = codec.decrypt(secret, model.plan.evaluate(codec.encrypt(secret, X[:3]), keys))
    assert (
        np.abs(scores - pipe.decision_function(X[:3])).max()
        <= model.manifest.precision.max_abs_error
    )


def test_leading_nonlinear_steps_stay_on_the_client() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer, StandardScaler

    X, y = _data()
    pipe = make_pipeline(FunctionTransformer(np.tanh), StandardScaler(), LogisticRegression()).fit(
        X, y
    )
    model = heinfer.compile(pipe, name="pipe", X=X)
    assert model.manifest.input.client_side == ["functiontransformer:FunctionTransformer"]
    embedded = np.tanh(X)
    np.testing.assert_allclose(model.predict_plain(embedded), pipe.decision_function(X), atol=1e-9)
    late = make_pipeline(StandardScaler(), FunctionTransformer(np.tanh), LogisticRegression())
    with pytest.raises(UnsupportedModelError):
        heinfer.compile(late.fit(X, y), name="late", X=X)


def test_exact_grid_keeps_its_bits() -> None:
    """MNIST pixels / 255 lie on the 8-bit grid of (0, 1): 8 bits, no rounding at all."""
    rng = np.random.default_rng(0)
    X = rng.integers(0, 256, (50, 30)) / 255.0
    choice = choose_input_bits(rng.normal(size=(3, 30)), np.zeros(3), 0.0, 1.0, X=X)
    assert choice.bits == 8


def test_target_error_sets_the_bits_and_the_manifest_reports_it() -> None:
    from sklearn.linear_model import LinearRegression

    X, _ = _data()
    y = X @ np.arange(20.0)
    reg = LinearRegression().fit(X, y)
    coarse = heinfer.compile(reg, name="r", X=X, target_error=5.0)
    fine = heinfer.compile(reg, name="r", X=X, target_error=0.05)
    assert coarse.manifest.input.bits < fine.manifest.input.bits
    assert fine.manifest.precision.input_abs_error <= 0.05
    assert "target" in (fine.manifest.precision.input_choice or "")
