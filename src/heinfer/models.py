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
from heinfer.plans.linear import LinearPlan, compile_linear
from heinfer.plans.manifest import (
    InputSpec,
    KeysSpec,
    Manifest,
    OutputSpec,
    PrecisionSpec,
    PrivacySpec,
)

if TYPE_CHECKING:
    from heinfer.plans.network import NetworkPlan, NetworkSpec

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


NETWORK_LAYOUT = "ckks-network"


class EncryptedModel:
    """A compiled model: the private plan plus its public manifest.

    Linear estimators compile to a coefficient-encoded BFV `LinearPlan`; small neural networks
    (PyTorch or ONNX) to a slot-packed CKKS `NetworkPlan`. The manifest has the same shape for
    both, so the client and the HTTP API do not change with the model kind.
    """

    def __init__(
        self,
        plan: LinearPlan | NetworkPlan,
        *,
        spec: NetworkSpec | None = None,
        estimator: str = "network",
    ) -> None:
        self.plan = plan
        self.spec = spec
        if isinstance(plan, LinearPlan):
            self._manifest = plan.manifest
        else:
            self._manifest = _network_manifest(plan.manifest(), estimator)

    @property
    def manifest(self) -> Manifest:
        return self._manifest

    @property
    def kind(self) -> str:
        return "linear" if isinstance(self.plan, LinearPlan) else "network"

    @property
    def name(self) -> str:
        return self.manifest.name

    def predict_plain(self, X: Any) -> np.ndarray:
        """Plaintext reference scores, shape (n, n_outputs): what decrypted results match."""
        X = _check_X(X, self.manifest.n_features)
        if isinstance(self.plan, LinearPlan):
            return self.plan.predict_plain(X)
        assert self.spec is not None
        return self.spec.predict_plain(X)

    def save(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        header: dict[str, Any] = {
            "format": MODEL_FORMAT,
            "format_version": MODEL_FORMAT_VERSION,
            "plan": self.kind,
        }
        if isinstance(self.plan, LinearPlan):
            arrays = dict(self.plan.arrays)
            manifest_json = self.manifest.to_json()
        else:
            assert self.spec is not None
            arrays = {f"plan_{k}": v for k, v in self.plan.to_arrays().items()}
            layers, spec_arrays = _spec_to_arrays(self.spec)
            arrays.update(spec_arrays)
            header["layers"] = layers
            header["estimator"] = self.manifest.estimator
            manifest_json = json.dumps(self.plan.manifest())
        buffer = io.BytesIO()
        save_arrays: Any = np.savez  # numpy's stub cannot type **arrays
        save_arrays(buffer, **arrays)
        tmp = path.with_name(path.name + ".tmp")
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("heinfer.json", json.dumps(header))
            archive.writestr("manifest.json", manifest_json)
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


def _network_manifest(plan_manifest: dict[str, Any], estimator: str) -> Manifest:
    """The CKKS plan's own manifest, wrapped in the common shape every client reads."""
    precision = plan_manifest["precision"]
    privacy = plan_manifest["privacy"]
    scheme = {"scheme": "ckks", **plan_manifest["params"]}
    return Manifest(
        name=plan_manifest["name"],
        task="classification",
        estimator=estimator,
        input=InputSpec(
            shape=list(plan_manifest["input"]["shape"]),
            low=float(plan_manifest["input"]["range"][0]),
            high=float(plan_manifest["input"]["range"][1]),
            bits=None,
            encoding="CKKS slots: the image repeated as the layout says, one ciphertext each",
        ),
        output=OutputSpec(
            shape=list(plan_manifest["output"]["shape"]),
            classes=list(range(int(plan_manifest["output"]["shape"][0]))),
        ),
        scheme=scheme,
        layout={"kind": NETWORK_LAYOUT, "plan_manifest": plan_manifest},
        keys=KeysSpec(**plan_manifest["keys"]),
        precision=PrecisionSpec(
            max_abs_error=float(precision["score_abs_error"]),
            expected_abs_error=float(precision["score_abs_error"]),
            noise_abs_error=float(10 * precision["flood_noise_std"]),
        ),
        privacy=PrivacySpec(
            rerandomized=bool(privacy["rerandomized"]),
            masked=True,
            flooding_statistical_bits=int(privacy["statistical_security_bits"]),
            notes=f"masked: {privacy['masked_slots']}; not covered: {privacy['not_covered']}",
        ),
        max_batch=int(plan_manifest["input"]["max_images_per_request"]),
    )


def _spec_to_arrays(spec: NetworkSpec) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    layers, arrays = [], {}
    for index, layer in enumerate(spec.layers):
        scalars = {}
        for key, value in layer.items():
            if isinstance(value, np.ndarray):
                arrays[f"spec{index}_{key}"] = value
                scalars[key] = {"array": f"spec{index}_{key}"}
            else:
                scalars[key] = value
        layers.append(scalars)
    return layers, arrays


def _spec_from_arrays(layers: list[dict[str, Any]], arrays: dict[str, np.ndarray]) -> NetworkSpec:
    from heinfer.plans.network import NetworkSpec

    built = []
    for layer in layers:
        built.append(
            {
                key: arrays[value["array"]] if isinstance(value, dict) else value
                for key, value in layer.items()
            }
        )
    return NetworkSpec(built)


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
            manifest_text = archive.read("manifest.json")
            with np.load(io.BytesIO(archive.read("arrays.npz")), allow_pickle=False) as data:
                arrays = {key: data[key] for key in data.files}
        if header.get("plan") == "network":
            from heinfer.plans.network import NetworkPlan

            plan_arrays = {k[5:]: v for k, v in arrays.items() if k.startswith("plan_")}
            network = NetworkPlan.from_arrays(json.loads(manifest_text), plan_arrays)
            spec = _spec_from_arrays(header["layers"], arrays)
            return EncryptedModel(network, spec=spec, estimator=str(header.get("estimator")))
        manifest = Manifest.from_json(manifest_text)
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
    network = _network_spec(estimator)
    if network is not None:
        from heinfer.plans.network import compile_network

        spec, origin = network
        calibration = None if X is None else _check_X(X, 784)
        plan = compile_network(spec, name, calibration=calibration)
        return EncryptedModel(plan, spec=spec, estimator=origin)
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
