"""A network as plain numpy: the layers the importers produce and the compiler consumes.

`NetworkSpec.layers` is a list of dicts (`type` plus its parameters; see `_apply_layer`),
`input_shape` the shape of one input: (n_features,) for an MLP, (C, H, W) for a CNN. Clients
send flat vectors of prod(input_shape) values; the spec reshapes them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from heinfer.errors import ModelFormatError, ShapeError, UnsupportedModelError

__all__ = ["MAX_ACTIVATIONS", "NetworkSpec", "as_batch"]

MAX_ACTIVATIONS = 2
LAYER_TYPES = ("conv2d", "avgpool", "flatten", "reshape", "linear", "poly")
_ARRAY_KEYS = ("weight", "bias")


def _im2col(x: np.ndarray, kh: int, kw: int, stride: int) -> np.ndarray:
    """x: (n, C, H, W) -> (n, C, kh, kw, Ho, Wo) view."""
    n, c, h, w = x.shape
    ho, wo = (h - kh) // stride + 1, (w - kw) // stride + 1
    s = x.strides
    return np.lib.stride_tricks.as_strided(
        x,
        (n, c, kh, kw, ho, wo),
        (s[0], s[1], s[2], s[3], s[2] * stride, s[3] * stride),
        writeable=False,
    )


def _apply_layer(layer: dict[str, Any], z: np.ndarray) -> np.ndarray:
    kind = layer["type"]
    if kind in ("conv2d", "avgpool") and z.ndim != 4:
        raise UnsupportedModelError(f"{kind} needs an image input (C, H, W), got {z.shape[1:]}")
    if kind == "conv2d":
        p = int(layer["padding"])
        if p:
            z = np.pad(z, ((0, 0), (0, 0), (p, p), (p, p)))
        w = layer["weight"]
        cols = _im2col(np.ascontiguousarray(z), w.shape[2], w.shape[3], int(layer["stride"]))
        out = np.einsum("ncijhw,fcij->nfhw", cols, w, optimize=True)
        return out + layer["bias"][None, :, None, None]
    if kind == "avgpool":
        k, st = int(layer["kernel"]), int(layer["stride"])
        cols = _im2col(np.ascontiguousarray(z), k, k, st)
        return cols.mean(axis=(2, 3))
    if kind == "flatten":
        return z.reshape(z.shape[0], -1)
    if kind == "reshape":
        return z.reshape(z.shape[0], *(int(d) for d in layer["shape"]))
    if kind == "linear":
        z = z.reshape(z.shape[0], -1)
        return z @ layer["weight"].T + layer["bias"]
    if kind == "poly":
        return layer["a"] * z * z + layer["b"] * z
    raise UnsupportedModelError(f"unknown layer type {kind!r}")


def as_batch(X: Any, n_features: int) -> np.ndarray:
    """X of shape (n_features,) or (n, n_features) as float64 (n, n_features)."""
    data = np.asarray(X, dtype=np.float64)
    if data.ndim == 1:
        data = data[None, :]
    if data.ndim != 2 or data.shape[1] != n_features:
        raise ShapeError(f"expected shape ({n_features},) or (n, {n_features}), got {data.shape}")
    return data


@dataclass
class NetworkSpec:
    """Layers as numpy; `input_shape` defaults to the first Linear layer's input width (a
    network that starts with a convolution must say its (C, H, W))."""

    layers: list[dict[str, Any]]
    input_shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for layer in self.layers:
            if layer.get("type") not in LAYER_TYPES:
                raise UnsupportedModelError(f"unknown layer type {layer.get('type')!r}")
            for key in _ARRAY_KEYS:
                if key in layer:
                    layer[key] = np.asarray(layer[key], dtype=np.float64)
        if self.input_shape is None:
            first = self.layers[0] if self.layers else {}
            if first.get("type") != "linear":
                raise UnsupportedModelError(
                    "a network that does not start with a Linear layer needs its input shape: "
                    "pass input_shape=(channels, height, width)"
                )
            self.input_shape = (int(first["weight"].shape[1]),)
        self.input_shape = tuple(int(d) for d in self.input_shape)
        if len(self.input_shape) not in (1, 3) or min(self.input_shape) < 1:
            raise UnsupportedModelError(
                f"input shape must be (n_features,) or (C, H, W), got {self.input_shape}"
            )
        if self.activation_count() > MAX_ACTIVATIONS:
            raise UnsupportedModelError(
                f"at most {MAX_ACTIVATIONS} activations (multiplicative depth 5) are supported"
            )

    @property
    def shape(self) -> tuple[int, ...]:
        """`input_shape`, known to be set after construction."""
        assert self.input_shape is not None
        return self.input_shape

    @property
    def parameter_count(self) -> int:
        """Weights and biases: what an extraction attack solves for (the manifest states it)."""
        return sum(
            int(np.asarray(layer[key]).size)
            for layer in self.layers
            for key in _ARRAY_KEYS
            if layer.get(key) is not None
        )

    @property
    def n_features(self) -> int:
        return int(np.prod(self.shape))

    def activation_count(self) -> int:
        return sum(1 for layer in self.layers if layer["type"] == "poly")

    def predict_plain(self, X: Any) -> np.ndarray:
        z = as_batch(X, self.n_features)
        z = z.reshape(z.shape[0], *self.shape)
        for layer in self.layers:
            z = _apply_layer(layer, z)
        return z.reshape(z.shape[0], -1)

    def blocks(self) -> tuple[list[list[dict[str, Any]]], list[dict[str, Any]]]:
        """Linear segments and the activations between them."""
        segments: list[list[dict[str, Any]]] = [[]]
        acts: list[dict[str, Any]] = []
        for layer in self.layers:
            if layer["type"] == "poly":
                acts.append(layer)
                segments.append([])
            else:
                segments[-1].append(layer)
        return segments, acts

    def affine_blocks(
        self,
    ) -> tuple[list[tuple[np.ndarray, np.ndarray, tuple[int, ...]]], list[dict[str, Any]]]:
        """Each linear segment as (M, b, out_shape): segment(z) = M @ z + b (z flattened)."""
        segments, acts = self.blocks()
        out = []
        shape: tuple[int, ...] = self.shape
        for seg in segments:
            dim = int(np.prod(shape))
            b0 = np.zeros((1, *shape))
            for layer in seg:
                b0 = _apply_layer(layer, b0)
            out_shape = tuple(b0.shape[1:])
            cols = np.eye(dim).reshape(dim, *shape)
            for layer in seg:
                cols = _apply_layer(layer, cols)
            bias = b0.reshape(-1)
            M = (cols.reshape(dim, -1) - bias[None, :]).T
            out.append((M, bias, out_shape))
            shape = out_shape
        return out, acts

    # -- persistence: JSON scalars in a uint8 array, weights as arrays (no pickle) --------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        layers = []
        arrays: dict[str, np.ndarray] = {}
        for index, layer in enumerate(self.layers):
            scalars: dict[str, Any] = {}
            for key, value in layer.items():
                if isinstance(value, np.ndarray):
                    arrays[f"spec{index}_{key}"] = value
                    scalars[key] = {"array": f"spec{index}_{key}"}
                else:
                    scalars[key] = value
            layers.append(scalars)
        text = json.dumps({"input_shape": list(self.shape), "layers": layers})
        arrays["spec_json"] = np.frombuffer(text.encode(), dtype=np.uint8).copy()
        return arrays

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> NetworkSpec:
        if "spec_json" not in arrays:
            raise ModelFormatError("network model lacks its layer description (spec_json)")
        try:
            data = json.loads(np.asarray(arrays["spec_json"], dtype=np.uint8).tobytes())
            return cls.from_layers(data["layers"], arrays, tuple(data["input_shape"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelFormatError(f"invalid network layer description: {exc}") from exc

    @classmethod
    def from_layers(
        cls,
        layers: list[dict[str, Any]],
        arrays: Mapping[str, np.ndarray],
        input_shape: tuple[int, ...],
    ) -> NetworkSpec:
        """Layers whose array values are references {"array": name} into `arrays`."""
        built = []
        for layer in layers:
            entry = {}
            for key, value in layer.items():
                if isinstance(value, dict):
                    name = str(value["array"])
                    if not name.startswith("spec") or name not in arrays:
                        raise ModelFormatError(f"network layer array {name!r} missing")
                    entry[key] = np.asarray(arrays[name])
                else:
                    entry[key] = value
            built.append(entry)
        return cls(built, input_shape)
