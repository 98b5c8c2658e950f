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
from typing import TYPE_CHECKING, Any

import numpy as np

from heinfer.errors import (
    ModelFormatError,
    NotFittedError,
    ShapeError,
    UnsupportedModelError,
)
from heinfer.plans.base import Plan, plan_from_arrays
from heinfer.plans.linear import compile_linear
from heinfer.plans.manifest import Manifest

if TYPE_CHECKING:
    from heinfer.plans.network import NetworkSpec

__all__ = ["SUPPORTED_ESTIMATORS", "EncryptedModel", "compile", "load_model"]

MODEL_FORMAT = "heinfer.model"
# 2: one layout for every plan: manifest.json is the common manifest, arrays.npz the plan's
# `to_arrays()`. Version 1 files (networks kept their own manifest and spec arrays) still load.
MODEL_FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)

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
    """A compiled model: the private plan, which carries its public manifest.

    Every kind of model (linear estimators on BFV, small networks on CKKS) is a `Plan`, so the
    client, the service and this class do not change with the model kind.
    """

    def __init__(self, plan: Plan) -> None:
        self.plan = plan

    @property
    def manifest(self) -> Manifest:
        return self.plan.manifest

    @property
    def kind(self) -> str:
        """The model's family of layouts (the manifest's `layout.kind`)."""
        return self.plan.family

    @property
    def name(self) -> str:
        return self.manifest.name

    def predict_plain(self, X: Any) -> np.ndarray:
        """Plaintext reference scores, shape (n, n_outputs): what decrypted results match."""
        return self.plan.predict_plain(_check_X(X, self.manifest.n_features))

    def save(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        header = {
            "format": MODEL_FORMAT,
            "format_version": MODEL_FORMAT_VERSION,
            "family": self.plan.family,
        }
        buffer = io.BytesIO()
        save_arrays: Any = np.savez  # numpy's stub cannot type **arrays
        save_arrays(buffer, **self.plan.to_arrays())
        tmp = path.with_name(path.name + ".tmp")
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("heinfer.json", json.dumps(header))
            archive.writestr("manifest.json", self.manifest.to_json())
            archive.writestr("arrays.npz", buffer.getvalue())
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
            if not isinstance(header, dict) or header.get("format") != MODEL_FORMAT:
                raise ModelFormatError(f"{path} is not a heinfer model")
            version = header.get("format_version")
            if version not in _READABLE_VERSIONS:
                raise ModelFormatError(
                    f"{path} has model format version {version}; this heinfer reads versions "
                    f"{', '.join(map(str, _READABLE_VERSIONS))}: upgrade heinfer"
                )
            manifest_text = archive.read("manifest.json")
            with np.load(io.BytesIO(archive.read("arrays.npz")), allow_pickle=False) as data:
                arrays = {key: data[key] for key in data.files}
        if version == 1 and header.get("plan") == "network":
            from heinfer.plans.network import convert_v1_network

            manifest, arrays = convert_v1_network(header, json.loads(manifest_text), arrays)
        else:
            manifest = Manifest.from_json(manifest_text)
        return EncryptedModel(plan_from_arrays(manifest, arrays))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, ValueError, OSError) as exc:
        if isinstance(exc, ModelFormatError):
            raise
        raise ModelFormatError(f"cannot read heinfer model {path}: {exc}") from exc


def compile(
    estimator: Any,
    *,
    name: str,
    input_range: tuple[float, float] | None = None,
    X: Any = None,
    input_bits: int | None = None,
    target_error: float | None = None,
    weight_bits: int | None = None,
    max_batch: int = 4096,
    layout: str | None = None,
) -> EncryptedModel:
    """Compile a fitted linear estimator (or a `Pipeline` ending in one) for encrypted inference.

    The encryption encodes each feature on a fixed grid over a fixed range, so the range must be
    known: pass `input_range=(low, high)` (e.g. (0, 1) for pixels / 255) or sample inputs `X` to
    take it from. The grid's bits are `input_bits` when given, else chosen from `X` or
    `target_error` (`heinfer.plans.linear.precision`; 8 without either). A Pipeline's affine
    steps (StandardScaler, PCA, ...) fold into the served weights; a leading run of other steps
    stays on the client (`heinfer.plans.linear.fold`). `layout` forces a linear layout
    (`coeff-rowpack`, `coeff-packed`) instead of the cost model's choice.
    """
    network = _network_spec(estimator)
    if network is not None:
        from heinfer.plans.network import compile_network

        spec, origin = network
        calibration = None if X is None else _check_X(X, spec.n_features)
        return EncryptedModel(
            compile_network(spec, name, calibration=calibration, estimator=origin)
        )
    from heinfer.errors import ParameterMismatchError
    from heinfer.plans.linear.fold import fold_pipeline
    from heinfer.plans.linear.precision import MIN_BITS, choose_input_bits

    folded = fold_pipeline(estimator)
    estimator = folded.estimator
    kind = type(estimator).__name__
    if kind not in SUPPORTED_ESTIMATORS:
        raise UnsupportedModelError(
            f"{kind} is not supported; heinfer compiles fitted linear models ("
            + ", ".join(SUPPORTED_ESTIMATORS)
            + "), PyTorch nn.Sequential networks and ONNX files (see heinfer.nn)"
        )
    if not hasattr(estimator, "coef_"):
        raise NotFittedError(f"this {kind} is not fitted yet: call fit(X, y) before compile")
    coef = np.atleast_2d(np.asarray(estimator.coef_, dtype=np.float64))
    intercept = np.broadcast_to(
        np.atleast_1d(np.asarray(getattr(estimator, "intercept_", 0.0), dtype=np.float64)),
        (coef.shape[0],),
    ).copy()
    coef, intercept = folded.served_weights(coef, intercept)
    samples = None
    if X is not None:
        samples = folded.client_transform(np.asarray(X, dtype=np.float64))
        samples = _check_X(samples, coef.shape[1])
    input_range = _input_range(input_range, samples, coef.shape[1])
    classes = getattr(estimator, "classes_", None)
    task = "classification" if classes is not None else "regression"
    if input_bits is None:
        choice = choose_input_bits(
            coef, intercept, *input_range, X=samples, target_error=target_error,
            classification=classes is not None,
        )
        bits, reason = choice.bits, choice.reason
    else:
        bits, reason = input_bits, "fixed by the model owner"
    estimator_name = kind
    if folded.client_steps or folded.folded_steps:
        estimator_name = "Pipeline(" + ", ".join(
            [*(f"{n}:{type(s).__name__}" for n, s in folded.client_steps),
             *folded.folded_steps, kind]
        ) + ")"
    while True:  # within the noise budget: fewer input bits if the chosen ones do not fit
        try:
            plan = compile_linear(
                coef,
                intercept,
                name=name,
                task=task,
                estimator=estimator_name,
                classes=None if classes is None else [_plain(c) for c in classes],
                input_range=input_range,
                input_bits=bits,
                weight_bits=weight_bits,
                max_batch=max_batch,
                input_choice=reason,
                client_side=[f"{n}:{type(s).__name__}" for n, s in folded.client_steps],
                layout=layout,
            )
            return EncryptedModel(plan)
        except ParameterMismatchError:
            if input_bits is not None or bits <= MIN_BITS:
                raise
            bits, reason = bits - 1, f"{reason}; reduced to fit the noise budget"


def _network_spec(model: Any) -> tuple[NetworkSpec, str] | None:
    """A PyTorch nn.Sequential or an ONNX file path as a NetworkSpec; None for anything else."""
    if isinstance(model, str | os.PathLike) and str(model).endswith(".onnx"):
        from heinfer.plans.network import import_onnx

        return import_onnx(str(model)), "onnx"
    module = type(model).__module__
    if module.startswith("torch.nn"):
        from heinfer.plans.network import import_torch

        return import_torch(model), f"torch.{type(model).__name__}"
    return None


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
