"""Model side: fitted scikit-learn estimators in, encrypted-inference plans out.

`compile` is where a model owner starts; `EncryptedModel` is what `heinfer serve` loads. The
saved format is a zip of a JSON manifest and a numpy `.npz` read with `allow_pickle=False`:
loading a model never executes code from the file.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from heinfer.errors import (
    ModelFormatError,
    NotFittedError,
    ShapeError,
    UnsupportedModelError,
)
from heinfer.plans.linear import LinearPlan, compile_linear
from heinfer.plans.manifest import Manifest

__all__ = ["SUPPORTED_ESTIMATORS", "EncryptedModel", "compile", "load_model"]

MODEL_FORMAT = "heinfer.model"
MODEL_FORMAT_VERSION = 1

SUPPORTED_ESTIMATORS = (
    "LogisticRegression",
    "LinearRegression",
    "Ridge",
    "RidgeClassifier",
    "Lasso",
    "ElasticNet",
    "LinearSVC",
    "LinearSVR",
    "SGDClassifier",
    "SGDRegressor",
)


class EncryptedModel:
    """A compiled model: the private plan plus its public manifest."""

    def __init__(self, plan: LinearPlan) -> None:
        self.plan = plan

    @property
    def manifest(self) -> Manifest:
        return self.plan.manifest

    @property
    def name(self) -> str:
        return self.manifest.name

    def predict_plain(self, X: Any) -> np.ndarray:
        """Plaintext reference scores, shape (n, n_outputs): what decrypted results match."""
        X = _check_X(X, self.manifest.n_features)
        return self.plan.predict_plain(X)

    def save(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        arrays = io.BytesIO()
        save_arrays: Any = np.savez  # numpy's stub cannot type **arrays
        save_arrays(arrays, **self.plan.arrays)
        header = {"format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION, "plan": "linear"}
        tmp = path.with_name(path.name + ".tmp")
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("heinfer.json", json.dumps(header))
            archive.writestr("manifest.json", self.manifest.to_json())
            archive.writestr("arrays.npz", arrays.getvalue())
        os.replace(tmp, path)
        return path

    def __repr__(self) -> str:
        m = self.manifest
        return (
            f"EncryptedModel(name={m.name!r}, estimator={m.estimator}, "
            f"inputs={m.n_features}, outputs={m.n_outputs}, "
            f"N={m.scheme['poly_modulus_degree']}, security={m.scheme['security_bits']} bits)"
        )


def load_model(path: str | os.PathLike[str]) -> EncryptedModel:
    """Load a model saved by `EncryptedModel.save`, checking its format version."""
    try:
        with zipfile.ZipFile(path) as archive:
            header = json.loads(archive.read("heinfer.json"))
            if header.get("format") != MODEL_FORMAT:
                raise ModelFormatError(f"{path} is not a heinfer model")
            if header.get("format_version") != MODEL_FORMAT_VERSION:
                raise ModelFormatError(
                    f"{path} has model format version {header.get('format_version')}; this "
                    f"heinfer reads version {MODEL_FORMAT_VERSION}"
                )
            manifest = Manifest.from_json(archive.read("manifest.json"))
            with np.load(io.BytesIO(archive.read("arrays.npz")), allow_pickle=False) as data:
                arrays = {key: data[key] for key in data.files}
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, ValueError, OSError) as exc:
        if isinstance(exc, ModelFormatError):
            raise
        raise ModelFormatError(f"cannot read heinfer model {path}: {exc}") from exc
    return EncryptedModel(LinearPlan(manifest, arrays))


def compile(
    estimator: Any,
    *,
    name: str,
    input_range: tuple[float, float] | None = None,
    X: Any = None,
    input_bits: int = 8,
    weight_bits: int | None = None,
    max_batch: int = 4096,
) -> EncryptedModel:
    """Compile a fitted linear estimator for encrypted inference.

    The encryption encodes each feature on `input_bits` bits over a fixed range, so the range
    must be known: pass `input_range=(low, high)` (e.g. (0, 1) for pixels / 255) or sample
    inputs `X` to take it from. Clients refuse inputs outside it rather than clip silently.
    """
    kind = type(estimator).__name__
    if kind not in SUPPORTED_ESTIMATORS:
        raise UnsupportedModelError(
            f"{kind} is not supported; heinfer compiles fitted linear models: "
            + ", ".join(SUPPORTED_ESTIMATORS)
        )
    if not hasattr(estimator, "coef_"):
        raise NotFittedError(f"this {kind} is not fitted yet: call fit(X, y) before compile")
    coef = np.atleast_2d(np.asarray(estimator.coef_, dtype=np.float64))
    intercept = np.broadcast_to(
        np.atleast_1d(np.asarray(getattr(estimator, "intercept_", 0.0), dtype=np.float64)),
        (coef.shape[0],),
    ).copy()
    input_range = _input_range(input_range, X, coef.shape[1])
    classes = getattr(estimator, "classes_", None)
    task = "classification" if classes is not None else "regression"
    return EncryptedModel(
        compile_linear(
            coef,
            intercept,
            name=name,
            task=task,
            estimator=kind,
            classes=None if classes is None else [_plain(c) for c in classes],
            input_range=input_range,
            input_bits=input_bits,
            weight_bits=weight_bits,
            max_batch=max_batch,
        )
    )


def _plain(value: Any) -> int | str:
    return int(value) if isinstance(value, np.integer | int) else str(value)


def _input_range(
    input_range: tuple[float, float] | None, X: Any, n_features: int
) -> tuple[float, float]:
    if input_range is not None:
        low, high = float(input_range[0]), float(input_range[1])
    elif X is not None:
        data = _check_X(X, n_features)
        low, high = float(data.min()), float(data.max())
    else:
        raise ShapeError(
            "compile needs the input range the encryption must cover: pass "
            "input_range=(low, high), e.g. (0.0, 1.0) for pixels / 255, or sample inputs X=..."
        )
    if not (np.isfinite(low) and np.isfinite(high) and high > low):
        raise ShapeError(f"input range must be finite with low < high, got ({low}, {high})")
    return low, high


def _check_X(X: Any, n_features: int) -> np.ndarray:
    data = np.asarray(X, dtype=np.float64)
    if data.ndim == 1:
        data = data.reshape(1, -1)
    if data.ndim != 2 or data.shape[1] != n_features:
        raise ShapeError(
            f"expected X of shape (n_samples, {n_features}) or ({n_features},), got {np.shape(X)}"
        )
    if not np.all(np.isfinite(data)):
        raise ShapeError("X contains NaN or infinite values")
    return data
