"""Encrypted neural networks (CKKS, LoLa/CryptoNets style): import, compile, evaluate.

Pipeline::

    spec = import_torch(model)            # or import_onnx(path); NetworkSpec = numpy weights
    plan = compile_network(spec, "mnist") # server side, private (weights as plaintexts)
    codec = NetworkCodec(plan.manifest()) # client side, from the public manifest only
    codec.keygen(); keys = codec.public_keys()
    scores = codec.decrypt(plan.evaluate(codec.encrypt(X), keys))
    # or the batched layout, up to 4096 images per request, keys without Galois keys:
    keys = codec.public_keys(BATCH_LAYOUT)
    scores = codec.decrypt(plan.evaluate(codec.encrypt(X, layout=BATCH_LAYOUT), keys))

Network shape: linear blocks (any mix of Conv2d / AvgPool2d / Flatten / Linear, composed into
one affine map each) separated by degree-2 activations (Square, PolyAct a*x^2+b*x), at most two
activations. Each activation costs one ciphertext-ciphertext multiplication and one rescale.

Two layouts share one compiled plan, one parameter set and one output contract; the request's
magic picks the layout (HNQ1 single-image, HNB1 batched).

Single-image packing (one ciphertext per image, N=8192 -> 4096 slots for one activation):

* Input: the client writes `copies` copies of the 784 pixels at offsets 0, 784, 1568, ...
  (manifest `input.layout`). For a conv layer, output channel f lives in copy f at the slot of
  its window's top-left pixel, so the whole first layer is `sum_t P_t * rot(x, t)` over the
  kernel offsets t = 28*a + b: 25 shifts, evaluated baby-step/giant-step with baby steps
  1..4 (4 rotations with the key for 1) and giant steps by Horner in 28 (4 rotations, key 28).
  Any other first layer falls back to a generic diagonal decomposition.
* Later blocks: hybrid diagonal method (Juvekar et al., GAZELLE) over the whole slot vector with
  R = next power of two >= outputs rows: R diagonals (BSGS, keys 1 and B), then a fold
  (rotate-and-sum over the S/R blocks, radix 4, keys R, 4R, 16R, ...). The fold leaves output i
  replicated in every slot s = i (mod R), and rows >= outputs hold exact zeros by construction, so
  no slot carries a partial sum of the model.
* Rotation keys: only the steps above (manifest `keys.galois_steps`).

Batched packing (CryptoNets; manifest `batch`): slot i holds image i, one ciphertext per pixel
(784 per request, unused slots zero), so every affine block is a matrix of scalars and costs
scalar multiply-and-adds across ciphertexts: no rotations and no Galois keys (the client uploads
public + relin keys, ~2.5 MB). The plan stores each normalised block matrix in CSR form
(`bt{k}_ptr/col/val`, with `bt{k}_bias/c`). Block 0 is gathered per hidden unit over its
nonzero taps (25 for a 5x5 conv), with weights encoded by SEAL's scalar encoder at the
single-image weight scale; x(x+c) is left unrelinearized; units whose columns in the next block
are equal (the 4 inputs of one average-pooling window) are summed, rescaled once and scattered
into the next block's accumulators; each accumulator is relinearized once. Only the inputs and
one layer of accumulators are live. Scales and levels are exactly those below, so the scores end
at the same level and scale 2^log_df, and each score ciphertext gets the same final treatment
(bias, mask of the slots >= n that hold the network applied to zeros, flooding with the same
sigma, fresh public-key re-randomization). A batch costs about the same for 1 or 4096 images.

Scales / levels (one activation; the chain is [q0 39, q1 39, qc 20, qa 56 | P 60] bits, 214 of
the 218 bits that the HE standard allows at N=8192 for 128-bit security, see he/ckks.py):
input at 2^28, first-layer weights at 2^19, product 2^47, square 2^94, rescale by qa -> 2^38;
last-layer weights at 2^50 so that product/qc = 2^68 after the last rescale. The response sits at
the lowest level that can hold 2^68 * scores plus flooding noise: the two 39-bit primes.

Model privacy of responses (same contract as the linear plans): after the last rescale the server
adds a fresh public-key encryption of a plaintext that holds the last-layer bias in the output
slots, uniform random values in all other slots, and flooding noise. Flooding: the ring noise
e = tau0 + tau1*s left by the last rescale (tau uniform in [-1/2,1/2]^N, s ternary) has, by
Hoeffding, every coefficient below sqrt(N*61*ln2/2) except with probability N*2^-60, so
||e||_2 <= B = sqrt(N)*(sqrt(N*61*ln2/2) + 1/2) (2^15.5 at N=8192). Coefficient-wise Gaussian
flooding with sigma = 2^40 * B / sqrt(2*pi) makes the statistical distance between the flooded
noise and a noise-free one at most ||e||_2 / (sigma*sqrt(2*pi)) <= 2^-40 (statistical security
parameter 40). In slots that is a real-part standard deviation sigma*sqrt(N/2)/2^68 ~ 0.0045 on
the scores. What flooding cannot hide is the CKKS approximation error of the earlier layers
(about 2^-12 relative), which is part of the decrypted value; it is far below the flooding noise
but is not covered by the 40-bit argument (documented in the manifest under `privacy`).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from heinfer.errors import (
    BadInputError,
    MalformedPayloadError,
    ModelFormatError,
    ParameterMismatchError,
    PayloadTooLargeError,
    ShapeError,
    UnsupportedModelError,
)

__all__ = [
    "BATCH_LAYOUT",
    "BATCH_REQUEST_MAGIC",
    "BATCH_RESPONSE_MAGIC",
    "FORMAT_VERSION",
    "SINGLE_LAYOUT",
    "NetworkCodec",
    "NetworkPlan",
    "NetworkSpec",
    "compile_network",
    "decode_batch_frames",
    "decode_frames",
    "encode_batch_frames",
    "encode_frames",
    "import_onnx",
    "import_torch",
]

# 2: the plan also holds the batched layout's sparse block matrices (`bt*` arrays). Version 1
# models (single-image layout only) still load and serve single images.
FORMAT_VERSION = 2
SUPPORTED_FORMAT_VERSIONS = (1, 2)
INPUT_SHAPE = (1, 28, 28)
INPUT_DIM = 784
REQUEST_MAGIC = b"HNQ1"
RESPONSE_MAGIC = b"HNR1"
BATCH_REQUEST_MAGIC = b"HNB1"
BATCH_RESPONSE_MAGIC = b"HNS1"
SINGLE_LAYOUT = "ckks-network"
BATCH_LAYOUT = "ckks-network-batch"
MAX_IMAGES_PER_REQUEST = 256
STAT_SECURITY_BITS = 40
_FRAME = struct.Struct("<4sI")
_BATCH_FRAME = struct.Struct("<4sII")  # magic, images, ciphertexts
_LEN = struct.Struct("<I")

# Scale plan (log2). See the module docstring.
LOG_INPUT_SCALE = 28
LOG_FIRST_PRODUCT = 47
LOG_MID_WEIGHT = 19
LOG_FINAL_SCALE = 68
FINAL_PRIME_BITS = [39, 39]
CLEAN_PRIME_BITS = 20
ACT_PRIME_BITS = [56, 60]
SPECIAL_PRIME_BITS = 60
MASK_RANGE = 256.0
FOLD_RADIX = 4


# ================================================================================================
# framing
# ================================================================================================
def encode_frames(magic: bytes, blobs: list[bytes]) -> bytes:
    parts = [_FRAME.pack(magic, len(blobs))]
    for blob in blobs:
        parts += [_LEN.pack(len(blob)), blob]
    return b"".join(parts)


def decode_frames(
    magic: bytes, body: bytes, max_records: int, max_record_bytes: int
) -> list[bytes]:
    if not isinstance(body, (bytes, bytearray, memoryview)):
        raise MalformedPayloadError("payload must be bytes")
    body = bytes(body)
    if len(body) < _FRAME.size:
        raise MalformedPayloadError("payload too short")
    got, count = _FRAME.unpack_from(body)
    if got != magic:
        raise MalformedPayloadError(f"payload does not start with {magic!r}")
    if count == 0:
        raise MalformedPayloadError("payload holds no ciphertexts")
    if count > max_records:
        raise PayloadTooLargeError(f"{count} ciphertexts; at most {max_records} per call")
    return _records(memoryview(body), _FRAME.size, count, max_record_bytes)


def _records(view: memoryview, offset: int, count: int, max_record_bytes: int) -> list[bytes]:
    """`count` length-prefixed records from `offset` to the very end of `view`."""
    out = []
    for i in range(count):
        if offset + _LEN.size > len(view):
            raise MalformedPayloadError(f"payload truncated before record {i}")
        (n,) = _LEN.unpack_from(view, offset)
        offset += _LEN.size
        if n > max_record_bytes:
            raise PayloadTooLargeError(f"record {i} is {n} bytes; at most {max_record_bytes}")
        if offset + n > len(view):
            raise MalformedPayloadError(f"payload truncated inside record {i}")
        out.append(bytes(view[offset : offset + n]))
        offset += n
    if offset != len(view):
        raise MalformedPayloadError("unexpected bytes after the last record")
    return out


def encode_batch_frames(magic: bytes, images: int, blobs: list[bytes]) -> bytes:
    """Batched-layout body: magic, image count, ciphertext count, then length-prefixed blobs."""
    parts = [_BATCH_FRAME.pack(magic, images, len(blobs))]
    for blob in blobs:
        parts += [_LEN.pack(len(blob)), blob]
    return b"".join(parts)


def decode_batch_frames(
    magic: bytes, body: bytes, *, count: int, max_images: int, max_record_bytes: int
) -> tuple[int, list[bytes]]:
    """(images, blobs) of a batched-layout body holding exactly `count` ciphertexts."""
    if not isinstance(body, (bytes, bytearray, memoryview)):
        raise MalformedPayloadError("payload must be bytes")
    view = memoryview(body)
    if len(view) < _BATCH_FRAME.size:
        raise MalformedPayloadError("batched payload too short")
    got, images, records = _BATCH_FRAME.unpack_from(view)
    if got != magic:
        raise MalformedPayloadError(f"payload does not start with {magic!r}")
    if images == 0:
        raise MalformedPayloadError("batched payload holds no images")
    if images > max_images:
        raise PayloadTooLargeError(f"{images} images; at most {max_images} per batched call")
    if records != count:
        raise MalformedPayloadError(
            f"batched payload must hold exactly {count} ciphertexts, not {records}"
        )
    return int(images), _records(view, _BATCH_FRAME.size, records, max_record_bytes)


def _max_ciphertext_bytes(manifest: dict[str, Any]) -> int:
    params = manifest["params"]
    return 64 + 16 * int(params["poly_modulus_degree"]) * len(params["coeff_modulus"])


# ================================================================================================
# NetworkSpec: numpy weights + layers
# ================================================================================================
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
    if kind == "conv2d":
        if z.ndim == 2:
            z = z.reshape(z.shape[0], *INPUT_SHAPE)
        p = int(layer["padding"])
        if p:
            z = np.pad(z, ((0, 0), (0, 0), (p, p), (p, p)))
        w = layer["weight"]
        cols = _im2col(np.ascontiguousarray(z), w.shape[2], w.shape[3], int(layer["stride"]))
        out = np.einsum("ncijhw,fcij->nfhw", cols, w, optimize=True)
        return out + layer["bias"][None, :, None, None]
    if kind == "avgpool":
        if z.ndim == 2:
            z = z.reshape(z.shape[0], *INPUT_SHAPE)
        k, st = int(layer["kernel"]), int(layer["stride"])
        cols = _im2col(np.ascontiguousarray(z), k, k, st)
        return cols.mean(axis=(2, 3))
    if kind == "flatten":
        return z.reshape(z.shape[0], -1)
    if kind == "linear":
        z = z.reshape(z.shape[0], -1)
        return z @ layer["weight"].T + layer["bias"]
    if kind == "poly":
        return layer["a"] * z * z + layer["b"] * z
    raise UnsupportedModelError(f"unknown layer type {kind!r}")


@dataclass
class NetworkSpec:
    """A network as plain numpy: `layers` is a list of dicts (see `_apply_layer`)."""

    layers: list[dict[str, Any]]
    input_shape: tuple[int, ...] = INPUT_SHAPE
    _plan_cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        for layer in self.layers:
            for key in ("weight", "bias"):
                if key in layer:
                    layer[key] = np.asarray(layer[key], dtype=np.float64)
        if self.activation_count() > 2:
            raise UnsupportedModelError(
                "at most two activations (multiplicative depth 5) are supported"
            )

    def activation_count(self) -> int:
        return sum(1 for layer in self.layers if layer["type"] == "poly")

    def predict_plain(self, X: np.ndarray) -> np.ndarray:
        z = _as_batch(X)
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

    def affine_blocks(self) -> tuple[list[tuple[np.ndarray, np.ndarray, tuple]], list[dict]]:
        """Each linear segment as (M, b, out_shape): segment(z) = M @ z + b."""
        segments, acts = self.blocks()
        out = []
        shape: tuple[int, ...] = (int(np.prod(self.input_shape)),)
        for seg in segments:
            dim = int(np.prod(shape))
            zero = np.zeros((1, *shape))
            eye = np.eye(dim).reshape(dim, *shape)
            b0 = zero
            for layer in seg:
                b0 = _apply_layer(layer, b0)
            out_shape = b0.shape[1:]
            cols = eye
            for layer in seg:
                cols = _apply_layer(layer, cols)
            bias = b0.reshape(-1)
            M = (cols.reshape(dim, -1) - bias[None, :]).T
            out.append((M, bias, out_shape))
            shape = out_shape
        return out, acts

    def simulate(self, X: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """The compiled plan run on plaintext slot vectors with CKKS-like noise of its parameters
        (encoding, fresh encryption, key switching, rescaling, flooding): accuracy without keys."""
        if "plan" not in self._plan_cache:
            self._plan_cache["plan"] = compile_network(self, "simulation")
        return self._plan_cache["plan"].simulate(X, rng)


def _as_batch(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim == 1:
        X = X[None, :]
    if X.ndim != 2 or X.shape[1] != 784:
        raise ShapeError(f"expected shape (784,) or (n, 784), got {X.shape}")
    return X


# ================================================================================================
# import from torch / ONNX
# ================================================================================================
_NOT_HE = "{name} is not HE-friendly: use heinfer.nn.Square or heinfer.nn.PolyAct"


def import_torch(module: Any) -> NetworkSpec:
    """torch.nn.Sequential of Conv2d/AvgPool2d/Flatten/Unflatten/Linear/Square/PolyAct."""
    import torch  # noqa: F401  (torch is an optional extra; only this function needs it)

    layers: list[dict[str, Any]] = []
    mods = list(module.children()) if hasattr(module, "children") else list(module)
    if not mods:
        raise UnsupportedModelError("expected a torch.nn.Sequential with layers")
    for mod in mods:
        name = type(mod).__name__
        if name == "Sequential":
            layers += import_torch(mod).layers
        elif name == "Conv2d":
            if mod.groups != 1 or mod.dilation != (1, 1) or mod.padding_mode != "zeros":
                raise UnsupportedModelError("Conv2d: groups/dilation/padding_mode unsupported")
            if (
                mod.stride[0] != mod.stride[1]
                or not isinstance(mod.padding, tuple)
                or (mod.padding[0] != mod.padding[1])
            ):
                raise UnsupportedModelError("Conv2d: only square stride and padding")
            w = mod.weight.detach().double().numpy()
            b = mod.bias.detach().double().numpy() if mod.bias is not None else np.zeros(len(w))
            layers.append(
                {
                    "type": "conv2d",
                    "weight": w,
                    "bias": b,
                    "stride": int(mod.stride[0]),
                    "padding": int(mod.padding[0]),
                }
            )
        elif name == "Linear":
            w = mod.weight.detach().double().numpy()
            b = mod.bias.detach().double().numpy() if mod.bias is not None else np.zeros(len(w))
            layers.append({"type": "linear", "weight": w, "bias": b})
        elif name == "AvgPool2d":
            k = mod.kernel_size if isinstance(mod.kernel_size, int) else mod.kernel_size[0]
            s = mod.stride if isinstance(mod.stride, int) else (mod.stride or (k,))[0]
            if mod.padding not in (0, (0, 0)) or mod.ceil_mode:
                raise UnsupportedModelError("AvgPool2d: padding/ceil_mode unsupported")
            layers.append({"type": "avgpool", "kernel": int(k), "stride": int(s or k)})
        elif name in ("Flatten", "Unflatten", "Identity", "Dropout"):
            if name == "Flatten":
                layers.append({"type": "flatten"})
        elif name == "Square":
            layers.append({"type": "poly", "a": 1.0, "b": 0.0})
        elif name == "PolyAct":
            layers.append({"type": "poly", "a": float(mod.a.detach()), "b": float(mod.b.detach())})
        elif name in (
            "ReLU",
            "Sigmoid",
            "Tanh",
            "GELU",
            "LeakyReLU",
            "ELU",
            "SiLU",
            "Softmax",
            "LogSoftmax",
            "MaxPool2d",
            "Softplus",
            "Hardtanh",
            "ReLU6",
        ):
            raise UnsupportedModelError(_NOT_HE.format(name=name))
        else:
            raise UnsupportedModelError(
                f"layer {name} is not supported: use Conv2d, AvgPool2d, Flatten, Linear and "
                "heinfer.nn.Square / heinfer.nn.PolyAct"
            )
    return NetworkSpec(layers)


def import_onnx(path: str) -> NetworkSpec:
    """An ONNX export of the same kind of network (Gemm/MatMul/Add/Conv/AveragePool/Flatten/
    Reshape/Mul). Activations are recognised symbolically: any Mul/Add combination that is a
    degree-2 polynomial of the previous linear output becomes a PolyAct."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(path)
    graph = model.graph
    consts: dict[str, np.ndarray] = {
        t.name: numpy_helper.to_array(t).astype(np.float64) for t in graph.initializer
    }
    # Poly state: tensor name -> (c2, c1, c0) polynomial of the pending pre-activation tensor.
    polys: dict[str, tuple[float, float, float]] = {}
    layers: list[dict[str, Any]] = []
    current = graph.input[0].name
    shape_like: set[str] = set()

    def attr(node: Any, name: str, default: Any) -> Any:
        for a in node.attribute:
            if a.name == name:
                return onnx.helper.get_attribute_value(a)
        return default

    def scalar(name: str) -> float | None:
        if name in consts and consts[name].size == 1:
            return float(consts[name].reshape(-1)[0])
        return None

    def flush(name: str) -> None:
        nonlocal current
        if name in polys:
            c2, c1, c0 = polys.pop(name)
            if c2 == 0.0:
                raise UnsupportedModelError("linear activation in ONNX graph is unsupported")
            layers.append({"type": "poly", "a": c2, "b": c1})
            if c0 != 0.0:
                layers.append({"type": "_const", "value": c0})
        current = name

    for node in graph.node:
        op = node.op_type
        ins = list(node.input)
        out = node.output[0]
        if op == "Constant":
            consts[out] = numpy_helper.to_array(attr(node, "value", None)).astype(np.float64)
            continue
        if op == "Shape" or (
            op not in ("Conv", "Gemm", "MatMul")
            and ins
            and all(i in consts or i in shape_like or i == "" for i in ins)
        ):
            shape_like.update(node.output)  # shape arithmetic feeding Reshape: not data
            continue
        if op in ("Mul", "Add", "Sub"):
            a, b = ins
            pa = polys.get(a, (0.0, 1.0, 0.0) if a == current else None)
            pb = polys.get(b, (0.0, 1.0, 0.0) if b == current else None)
            sa, sb = scalar(a), scalar(b)
            if op == "Mul" and pa and pb:
                if pa[0] or pb[0]:
                    raise UnsupportedModelError("activation of degree > 2 in ONNX graph")
                polys[out] = (pa[1] * pb[1], pa[1] * pb[2] + pa[2] * pb[1], pa[2] * pb[2])
            elif op == "Mul" and ((pa and sb is not None) or (pb and sa is not None)):
                p, s = (pa, sb) if pa else (pb, sa)
                assert p is not None and s is not None
                polys[out] = (p[0] * s, p[1] * s, p[2] * s)
            elif op in ("Add", "Sub") and pa and pb:
                sg = -1.0 if op == "Sub" else 1.0
                polys[out] = tuple(x + sg * y for x, y in zip(pa, pb, strict=True))  # type: ignore
            elif op in ("Add", "Sub") and pa and sb is not None:
                sg = -1.0 if op == "Sub" else 1.0
                polys[out] = (pa[0], pa[1], pa[2] + sg * sb)
            elif op == "Add" and pa and b in consts and layers and layers[-1]["type"] == "linear":
                layers[-1]["bias"] = layers[-1]["bias"] + consts[b].reshape(-1)
                current = out
            else:
                raise UnsupportedModelError(f"ONNX {op} node {node.name!r} is not supported here")
            if out in polys and polys[out] == (0.0, 1.0, 0.0):
                polys.pop(out)
                current = out
            continue
        if op in (
            "Relu",
            "Sigmoid",
            "Tanh",
            "Gelu",
            "LeakyRelu",
            "Elu",
            "Softmax",
            "MaxPool",
            "LogSoftmax",
            "Softplus",
            "HardSigmoid",
            "Clip",
        ):
            raise UnsupportedModelError(_NOT_HE.format(name=op))
        src = ins[0]
        if src != current:
            flush(src)
            if src != current:
                raise UnsupportedModelError(f"ONNX node {node.name!r}: not a sequential network")
        if op == "Conv":
            w = consts[ins[1]]
            b = consts[ins[2]] if len(ins) > 2 and ins[2] else np.zeros(w.shape[0])
            strides = attr(node, "strides", [1, 1])
            pads = attr(node, "pads", [0, 0, 0, 0])
            if attr(node, "group", 1) != 1 or len(set(strides)) != 1 or len(set(pads)) != 1:
                raise UnsupportedModelError("ONNX Conv: only square stride/padding, group 1")
            layers.append(
                {
                    "type": "conv2d",
                    "weight": w,
                    "bias": b,
                    "stride": int(strides[0]),
                    "padding": int(pads[0]),
                }
            )
        elif op == "Gemm":
            w = consts[ins[1]]
            if attr(node, "transB", 0) == 0:
                w = w.T
            b = consts[ins[2]] if len(ins) > 2 and ins[2] else np.zeros(w.shape[0])
            alpha, beta = attr(node, "alpha", 1.0), attr(node, "beta", 1.0)
            layers.append({"type": "linear", "weight": alpha * w, "bias": beta * b.reshape(-1)})
        elif op == "MatMul":
            w = consts[ins[1]].T
            layers.append({"type": "linear", "weight": w, "bias": np.zeros(w.shape[0])})
        elif op == "AveragePool":
            k = attr(node, "kernel_shape", [1, 1])
            s = attr(node, "strides", k)
            if len(set(k)) != 1 or len(set(s)) != 1 or any(attr(node, "pads", [0])):
                raise UnsupportedModelError("ONNX AveragePool: square kernel, no padding")
            layers.append({"type": "avgpool", "kernel": int(k[0]), "stride": int(s[0])})
        elif op == "Flatten":
            layers.append({"type": "flatten"})
        elif op in ("Reshape", "Identity", "Dropout"):
            pass  # our numpy layers reshape as needed (Unflatten to 1x28x28 / Flatten)
        else:
            raise UnsupportedModelError(f"ONNX op {op} is not supported")
        current = out
    flush(graph.output[0].name) if graph.output[0].name in polys else None
    # fold constant offsets of activations into the next linear block's bias
    final: list[dict[str, Any]] = []
    pending = 0.0
    for layer in layers:
        if layer["type"] == "_const":
            pending += layer["value"]
            continue
        if pending and layer["type"] in ("linear", "conv2d"):
            if layer["type"] == "linear":
                layer["bias"] = layer["bias"] + pending * layer["weight"].sum(axis=1)
            else:
                layer["bias"] = layer["bias"] + pending * layer["weight"].sum(axis=(1, 2, 3))
            pending = 0.0
        elif pending and layer["type"] == "avgpool":
            pass  # constant passes through average pooling unchanged
        final.append(layer)
    if pending:
        raise UnsupportedModelError("constant offset after the last layer is unsupported")
    return NetworkSpec(final)


# ================================================================================================
# compilation
# ================================================================================================
def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _bsgs_split(shifts: np.ndarray, slots: int) -> int:
    """Giant step B minimising (max baby step) + (max giant index) over the given shifts."""
    best, best_cost = 1, None
    for B in range(1, slots):
        b = shifts % B
        g = shifts // B
        cost = int(b.max()) + int(g.max())
        if best_cost is None or cost < best_cost:
            best, best_cost = B, cost
        if int(shifts.max()) + 1 < B:
            break
    return best


def _fold_steps(rows: int, slots: int) -> list[tuple[int, int]]:
    """(key step, rotations) chunks of a rotate-and-sum over slots/rows blocks, radix 4."""
    steps, span = [], rows
    while span < slots:
        radix = min(FOLD_RADIX, slots // span)
        steps.append((span, radix - 1))
        span *= radix
    return steps


def _place_first(M: np.ndarray, slots: int) -> tuple[int, np.ndarray] | None:
    """Translation-structured placement: output o at copy(o)*784 + anchor(o)."""
    dim = M.shape[1]
    nz = M != 0
    anchors = np.where(nz.any(axis=1), nz.argmax(axis=1), 0)
    copy_index = np.zeros(M.shape[0], dtype=np.int64)
    seen: dict[int, int] = {}
    for o, a in enumerate(anchors.tolist()):
        copy_index[o] = seen.get(a, 0)
        seen[a] = copy_index[o] + 1
    copies = int(copy_index.max()) + 1
    if copies * dim > slots:
        return None
    return copies, copy_index * dim + anchors


@dataclass
class _Hybrid:
    rows: int  # R
    n_out: int
    diag: np.ndarray  # (R, S) diagonal d at row d
    used: np.ndarray  # which d are nonzero
    B: int
    fold: list[tuple[int, int]]


def compile_network(
    spec: NetworkSpec, name: str, calibration: np.ndarray | None = None
) -> NetworkPlan:
    """Compile a NetworkSpec into a server-side NetworkPlan (parameters chosen from depth).

    `calibration` (optional (n, 784) inputs) tightens the value bounds used to normalise the
    layers; without it worst-case interval bounds over inputs in [0, 1] are used.
    """
    from heinfer.he.ckks import select_parameters

    blocks, acts = spec.affine_blocks()
    n_act = len(acts)
    if n_act == 0:
        raise UnsupportedModelError("network has no activation: serve it as a linear model")
    if blocks[0][0].shape[1] != 784:
        raise UnsupportedModelError("input must be 784 values (1x28x28)")
    act_bits = list(reversed(ACT_PRIME_BITS[:n_act]))
    bits = [*FINAL_PRIME_BITS, CLEAN_PRIME_BITS, *act_bits, SPECIAL_PRIME_BITS]
    params = select_parameters(bits)
    S = params.slots

    # -- value bounds and normalisation (fold scalars into the following block) ---------------
    Ms = [blk[0].copy() for blk in blocks]
    bs = [blk[1].copy() for blk in blocks]
    cs: list[float] = []
    for k, act in enumerate(acts):
        a, b = float(act["a"]), float(act["b"])
        if a == 0.0:
            raise UnsupportedModelError("PolyAct with a == 0 is linear: fold it into the layers")
        Ms[k + 1] = Ms[k + 1] * a
        cs.append(b / a)

    # bound of each pre-activation block output, then normalise it to |u| <= 4
    def block_bound(k: int, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        Mp, Mn = np.maximum(Ms[k], 0), np.minimum(Ms[k], 0)
        return Mp @ hi + Mn @ lo + bs[k], Mp @ lo + Mn @ hi + bs[k]

    lo, hi = np.zeros(784), np.ones(784)
    alphas = []
    calib = _as_batch(calibration) if calibration is not None else None
    z = calib
    for k in range(n_act + 1):
        hi_k, lo_k = block_bound(k, lo, hi)
        bound = float(np.max(np.maximum(np.abs(hi_k), np.abs(lo_k))))
        if z is not None:
            u = z @ Ms[k].T + bs[k]
            bound = min(bound, 4.0 * float(np.abs(u).max()) + 1e-9)
        if k == n_act:
            out_bound = bound
            break
        alpha = max(bound / 4.0, 1e-12)
        alphas.append(alpha)
        Ms[k] /= alpha
        bs[k] /= alpha
        cs[k] /= alpha
        Ms[k + 1] = Ms[k + 1] * alpha * alpha
        hi_k, lo_k = hi_k / alpha, lo_k / alpha
        c = cs[k]
        # x(x+c) over [lo, hi]
        cand = np.stack([lo_k * (lo_k + c), hi_k * (hi_k + c)])
        inside = (lo_k <= -c / 2) & (-c / 2 <= hi_k)
        lo = np.where(inside, -c * c / 4, cand.min(axis=0))
        hi = cand.max(axis=0)
        if z is not None:
            uu = z @ Ms[k].T + bs[k]
            z = uu * (uu + c)
    q_final = float(params.primes[0]) * float(params.primes[1])
    log_df = min(LOG_FINAL_SCALE, math.floor(math.log2(q_final / (8.0 * max(out_bound, 1.0)))))

    # -- first block placement ---------------------------------------------------------------
    M0 = Ms[0]
    placed = _place_first(M0, S)
    if placed is not None:
        nz_shifts = (_first_shifts(M0, placed[1], 784) % S)[M0 != 0]
        if len(np.unique(nz_shifts)) > 256:
            placed = None
    if placed is None:
        if M0.shape[0] > S:
            raise UnsupportedModelError(f"first layer has {M0.shape[0]} outputs > {S} slots")
        copies, out_slots = 1, np.arange(M0.shape[0])
    else:
        copies, out_slots = placed
    shifts_full = _first_shifts(M0, out_slots, 784) % S
    T = np.unique(shifts_full[M0 != 0])
    first_diag = np.zeros((len(T), S))
    t_index = {int(t): i for i, t in enumerate(T.tolist())}
    rows, cols = np.nonzero(M0)
    for o, j in zip(rows.tolist(), cols.tolist(), strict=True):
        first_diag[t_index[int(shifts_full[o, j])], out_slots[o]] = M0[o, j]
    first_B = _bsgs_split(T, S)
    first_bias = np.zeros(S)
    first_bias[out_slots] = bs[0]
    first_c = np.zeros(S)
    first_c[out_slots] = cs[0]

    # -- later blocks: hybrid diagonal method ---------------------------------------------------
    hybrids: list[_Hybrid] = []
    in_slots = out_slots  # slot of each input feature of the next block
    extra = []  # per block: (bias vector, c vector) for intermediate blocks
    for k in range(1, n_act + 1):
        W = Ms[k]
        m = W.shape[0]
        R = _next_pow2(m)
        if R > S:
            raise UnsupportedModelError(f"layer with {m} outputs exceeds {S} slots")
        diag = np.zeros((R, S))
        rr, kk = np.nonzero(W)
        s_in = in_slots[kk]
        d = (s_in - rr) % R
        s = (s_in - d) % S
        diag[d, s] = W[rr, kk]
        used = np.nonzero(np.abs(diag).sum(axis=1) > 0)[0]
        B = _bsgs_split(used, S) if len(used) else 1
        hybrids.append(_Hybrid(R, m, diag, used, B, _fold_steps(R, S)))
        rep = np.arange(S) % R
        valid = rep < m
        bias_vec = np.where(valid, bs[k][np.minimum(rep, m - 1)], 0.0)
        c_vec = np.where(valid, cs[k] if k < n_act else 0.0, 0.0)
        extra.append((bias_vec, c_vec))
        in_slots = np.arange(m)

    arrays: dict[str, np.ndarray] = {
        "first_shifts": T.astype(np.int64),
        "first_diag": first_diag,
        "first_bias": first_bias,
        "first_c": first_c,
        "first_meta": np.array([first_B, copies], dtype=np.int64),
        "final_bias": bs[-1].copy(),
        "scales": np.array([float(log_df), float(out_bound)]),
    }
    for k, M in enumerate(Ms):
        ptr, col, val = _csr(M)
        arrays[f"bt{k}_ptr"], arrays[f"bt{k}_col"], arrays[f"bt{k}_val"] = ptr, col, val
        if k < n_act:
            arrays[f"bt{k}_bias"] = bs[k].copy()
            arrays[f"bt{k}_c"] = np.full(M.shape[0], cs[k])
    for k, hy in enumerate(hybrids):
        arrays[f"h{k}_diag"] = hy.diag
        arrays[f"h{k}_used"] = hy.used.astype(np.int64)
        arrays[f"h{k}_meta"] = np.array([hy.rows, hy.n_out, hy.B], dtype=np.int64)
        arrays[f"h{k}_bias"] = extra[k][0]
        arrays[f"h{k}_c"] = extra[k][1]
    manifest = _build_manifest(name, params, arrays, n_act, spec)
    return NetworkPlan(manifest, arrays)


def _first_shifts(M: np.ndarray, out_slots: np.ndarray, dim: int) -> np.ndarray:
    """Shift t[o, j] = slot of pixel j in the copy of output o  -  slot of output o."""
    base = (out_slots // dim) * dim
    return base[:, None] + np.arange(dim)[None, :] - out_slots[:, None]


def _galois_steps(arrays: dict[str, np.ndarray], n_act: int, S: int) -> list[int]:
    steps: set[int] = set()
    T = arrays["first_shifts"]
    B = int(arrays["first_meta"][0])
    if T.size and int((T % B).max()) > 0:
        steps.add(1)
    if T.size and int((T // B).max()) > 0:
        steps.add(B)
    for k in range(n_act):
        R, _m, Bh = (int(v) for v in arrays[f"h{k}_meta"])
        used = arrays[f"h{k}_used"]
        if used.size and int((used % Bh).max()) > 0:
            steps.add(1)
        if used.size and int((used // Bh).max()) > 0:
            steps.add(Bh)
        for step, count in _fold_steps(R, S):
            if count:
                steps.add(step)
    return sorted(s % S for s in steps if s % S)


def _scale_plan(primes: list[int], n_act: int, log_df: float) -> dict[str, Any]:
    """Exact scales per stage for both layouts (SEAL divides by the exact primes)."""
    data = primes[:-1]
    top = len(data)
    d0 = 2.0**LOG_INPUT_SCALE
    w0 = 2.0**LOG_FIRST_PRODUCT / d0
    prod = d0 * w0
    stage_in = []  # scale of each later block's input ciphertext
    for k in range(n_act):
        q = float(data[top - 1 - k])
        scale_in = prod * prod / q
        stage_in.append(scale_in)
        if k + 1 < n_act:
            prod = scale_in * 2.0**LOG_MID_WEIGHT
    df = 2.0**log_df
    q_clean = float(data[2])
    wf = df * q_clean / stage_in[-1]
    wscales = [2.0**LOG_MID_WEIGHT] * (n_act - 1) + [wf]
    return {"d0": d0, "w0": w0, "stage_in": stage_in, "w": wscales, "df": df, "top": top}


def _noise_model(params: Any) -> dict[str, float]:
    """Slot-domain noise standard deviations (before dividing by the scale) of each operation:
    plaintext rounding, fresh encryption, key switching, rescaling (rs3: rescaling a product
    that is not relinearized yet, whose rounding error also meets s^2)."""
    n = params.poly_modulus_degree
    q_max = max(params.data_primes)
    P = params.primes[-1]
    return {
        "enc": math.sqrt(n / 24),
        "fresh": 3.2 * math.sqrt(n / 2),
        "ks": 2.0**11 * (1 + 16 * q_max / P),
        "rs": math.sqrt(n / 2) * math.sqrt(n / 18),
        "rs3": math.sqrt(n / 2) * math.sqrt(n / 18 + n * n / 27),
    }


# -- batched layout: sparse block matrices ------------------------------------------------------
@dataclass(frozen=True)
class _Block:
    """One affine block of the batched layout in CSR form (rows = outputs)."""

    ptr: np.ndarray
    col: np.ndarray
    val: np.ndarray
    bias: np.ndarray
    c: np.ndarray  # activation offset per output: y = x * (x + c); zeros for the last block
    in_dim: int

    @property
    def rows(self) -> int:
        return len(self.ptr) - 1

    def dense(self) -> np.ndarray:
        M = np.zeros((self.rows, self.in_dim))
        np.add.at(M, (np.repeat(np.arange(self.rows), np.diff(self.ptr)), self.col), self.val)
        return M


def _csr(M: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows, cols = np.nonzero(M)
    ptr = np.zeros(M.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=M.shape[0]), out=ptr[1:])
    return ptr, cols.astype(np.int64), M[rows, cols].astype(np.float64)


def _has_batch(arrays: dict[str, np.ndarray]) -> bool:
    return "bt0_ptr" in arrays


def _batch_array_names(n_act: int) -> list[str]:
    names = []
    for k in range(n_act + 1):
        names += [f"bt{k}_ptr", f"bt{k}_col", f"bt{k}_val"]
        if k < n_act:
            names += [f"bt{k}_bias", f"bt{k}_c"]
    return names


def _batch_blocks(arrays: dict[str, np.ndarray], n_act: int) -> list[_Block]:
    """The batched layout's blocks, checked (ModelFormatError on anything inconsistent)."""
    blocks, in_dim = [], INPUT_DIM
    for k in range(n_act + 1):
        ptr, col, val = (np.asarray(arrays[f"bt{k}_{x}"]) for x in ("ptr", "col", "val"))
        if k < n_act:
            bias, c = np.asarray(arrays[f"bt{k}_bias"]), np.asarray(arrays[f"bt{k}_c"])
        else:
            bias = np.asarray(arrays["final_bias"])
            c = np.zeros(bias.shape)
        ok = (
            ptr.ndim == col.ndim == val.ndim == bias.ndim == c.ndim == 1
            and ptr.dtype.kind == "i"
            and col.dtype.kind == "i"
            and val.dtype.kind == "f"
            and bias.dtype.kind == "f"
            and c.dtype.kind == "f"
            and len(ptr) == len(bias) + 1 == len(c) + 1
            and len(col) == len(val)
            and len(bias) >= 1
        )
        ok = (
            ok and int(ptr[0]) == 0 and int(ptr[-1]) == len(col) and bool(np.all(np.diff(ptr) >= 0))
        )
        ok = ok and (col.size == 0 or (int(col.min()) >= 0 and int(col.max()) < in_dim))
        ok = ok and bool(np.all(np.isfinite(val)) and np.all(np.isfinite(bias)))
        ok = ok and bool(np.all(np.isfinite(c)))
        if not ok:
            raise ModelFormatError(f"batched-layout block {k} arrays are inconsistent")
        blocks.append(
            _Block(
                ptr.astype(np.int64),
                col.astype(np.int64),
                val.astype(np.float64),
                bias.astype(np.float64),
                c.astype(np.float64),
                in_dim,
            )
        )
        in_dim = len(bias)
    return blocks


def _quantize(M: np.ndarray, scale: float) -> np.ndarray:
    """Weights as SEAL's scalar encoder stores them at `scale` (those rounding to 0 skipped)."""
    q = np.round(M * scale) / scale
    return np.where(np.abs(M * scale) > 0.5, q, 0.0)


def _batch_schedule(
    blocks: list[_Block], wscales: list[float]
) -> tuple[list[list[tuple[int, float]]], list[list[tuple[list[int], list[tuple[int, float]]]]]]:
    """Block 0 as per-output (pixel, weight) lists (gather), and for every later block k the
    units of block k-1 grouped by identical (encoded) columns of block k, each group with its
    shared column as (output, weight) targets: the group's activations are summed before they
    are multiplied (average pooling makes 4 columns equal). Groups that reach no output are
    left out, and so are weights the scalar encoder rounds to 0 (SEAL refuses a product with 0).
    """
    first = _quantize(blocks[0].dense(), wscales[0])
    gather = [
        [(int(j), float(first[h, j])) for j in np.flatnonzero(first[h])] for h in range(len(first))
    ]
    groups = []
    for blk, wscale in zip(blocks[1:], wscales[1:], strict=True):
        Mq = _quantize(blk.dense(), wscale)
        columns, inverse = np.unique(Mq.T, axis=0, return_inverse=True)
        inverse = np.asarray(inverse).reshape(-1)
        block_groups = []
        for g, column in enumerate(columns):
            targets = [(int(i), float(column[i])) for i in np.flatnonzero(column)]
            if targets:
                block_groups.append(([int(u) for u in np.flatnonzero(inverse == g)], targets))
        groups.append(block_groups)
    return gather, groups


def _weight_scales(sc: dict[str, Any], n_act: int) -> list[float]:
    """Scale of block k's weights in the batched layout (the single-image plan's scales)."""
    return [sc["w0"], *sc["w"][:n_act]]


def _batch_precision(
    params: Any, arrays: dict[str, np.ndarray], n_act: int, flood_std: float
) -> dict[str, float]:
    """Score error of the batched layout: Gaussian noise of every operation propagated through
    the blocks (|u| <= 4 after normalisation, so x(x+c) amplifies noise by at most 8+|c|; one
    unrelinearized rescale counted per unit, though groups share one), plus a worst-case bound
    on the scalar-weight rounding, plus the flooding noise."""
    primes = [int(p) for p in params.primes]
    sc = _scale_plan(primes, n_act, float(arrays["scales"][0]))
    noise = _noise_model(params)
    blocks = _batch_blocks(arrays, n_act)
    std = np.full(INPUT_DIM, math.hypot(noise["fresh"], noise["enc"]) / sc["d0"])
    rnd = np.zeros(INPUT_DIM)
    vmax = np.ones(INPUT_DIM)
    for k, (blk, wscale) in enumerate(zip(blocks, _weight_scales(sc, n_act), strict=True)):
        M = blk.dense()
        std_u = np.sqrt((M * M) @ (std * std))
        rnd_u = np.abs(M) @ rnd + np.abs(_quantize(M, wscale) - M) @ vmax
        if k == n_act:
            break
        prod_scale = sc["d0"] * sc["w0"] if k == 0 else sc["stage_in"][k - 1] * wscale
        gain = 8.0 + np.abs(blk.c)
        std = np.hypot(gain * std_u, noise["rs3"] / sc["stage_in"][k])
        rnd = gain * (rnd_u + 1.0 / prod_scale)
        vmax = 4.0 * (4.0 + np.abs(blk.c))
    final_prod = sc["stage_in"][-1] * sc["w"][-1]
    final = np.hypot(std_u, math.hypot(noise["ks"] / final_prod, noise["rs"] / sc["df"]))
    compute_std = float(np.max(final))
    total = math.hypot(compute_std, flood_std)
    rounding = float(np.max(rnd_u))
    return {
        "score_abs_error": float(10 * total + rounding + 0.02),
        "flood_noise_std": float(flood_std),
        "compute_noise_std": compute_std,
        "weight_rounding_bound": rounding,
    }


def _batch_manifest(
    params: Any, arrays: dict[str, np.ndarray], n_act: int, flood_std: float
) -> dict[str, Any]:
    blocks = _batch_blocks(arrays, n_act)
    n_out = blocks[-1].rows
    sc = _scale_plan([int(p) for p in params.primes], n_act, float(arrays["scales"][0]))
    gather, groups = _batch_schedule(blocks, _weight_scales(sc, n_act))
    return {
        "layout": BATCH_LAYOUT,
        "packing": "slot i = image i; one ciphertext per input pixel; unused slots zero",
        "max_images": params.slots,
        "ciphertexts": INPUT_DIM,
        "request_magic": BATCH_REQUEST_MAGIC.decode(),
        "response_magic": BATCH_RESPONSE_MAGIC.decode(),
        "input": {
            "scale_log2": LOG_INPUT_SCALE,
            "level": "top",
            "encryption": "seeded-symmetric",
        },
        "output": {
            "ciphertexts": n_out,
            "take": "real",
            "level_primes": 2,
            "scale_log2": float(arrays["scales"][0]),
            "masked_slots": f"slots >= images (uniform in +-{MASK_RANGE:g})",
        },
        "keys": {"public": True, "relin": True, "galois_steps": []},
        "precision": _batch_precision(params, arrays, n_act, flood_std),
        "work": {
            "plain_multiplications": sum(map(len, gather))
            + sum(len(t) for block_groups in groups for _m, t in block_groups),
            "ciphertext_multiplications": sum(
                len(m) for block_groups in groups for m, _t in block_groups
            ),
            "rescales": sum(map(len, groups)) + n_out,
            "relinearizations": sum(b.rows for b in blocks[1:]),
        },
    }


def _mask(count: int) -> np.ndarray:
    """Uniform values in +-MASK_RANGE from the OS CSPRNG for slots that must not carry model
    values."""
    from heinfer.he.ckks import os_random_uniform

    return (2.0 * os_random_uniform(count) - 1.0) * MASK_RANGE


def _flood_sigma(n: int) -> tuple[float, float]:
    """(noise l2 bound B, coefficient sigma) for 2^-40 statistical distance (module docstring)."""
    bound = math.sqrt(n) * (math.sqrt(n * 61 * math.log(2) / 2) + 0.5)
    sigma = 2.0**STAT_SECURITY_BITS * bound / math.sqrt(2 * math.pi)
    return bound, sigma


def _build_manifest(
    name: str, params: Any, arrays: dict[str, np.ndarray], n_act: int, spec: NetworkSpec | None
) -> dict[str, Any]:
    S = params.slots
    n = params.poly_modulus_degree
    log_df = float(arrays["scales"][0])
    bound, sigma = _flood_sigma(n)
    slot_std = sigma * math.sqrt(n / 2) / 2.0**log_df
    n_out = int(arrays[f"h{n_act - 1}_meta"][1])
    copies = int(arrays["first_meta"][1])
    steps = _galois_steps(arrays, n_act, S)
    manifest: dict[str, Any] = {
        "format": "heinfer-network",
        "format_version": FORMAT_VERSION if _has_batch(arrays) else 1,
        "name": name,
        "kind": "network",
        "input": {
            "shape": [784],
            "range": [0.0, 1.0],
            "encoding": "ckks-real",
            "layout": {"type": "copies", "copies": copies, "stride": 784, "slots": S},
            "scale_log2": LOG_INPUT_SCALE,
            "level": "top",
            "encryption": "seeded-symmetric",
            "images_per_ciphertext": 1,
            "max_images_per_request": MAX_IMAGES_PER_REQUEST,
        },
        "output": {
            "shape": [n_out],
            "slots": list(range(n_out)),
            "take": "real",
            "level_primes": 2,
            "scale_log2": log_df,
        },
        "scheme": "ckks",
        "params": params.to_dict(),
        "scale_log2": {"input": LOG_INPUT_SCALE, "output": log_df},
        "keys": {"public": True, "relin": True, "galois_steps": steps},
        "precision": {
            "score_abs_error": float(10 * slot_std + 0.02),
            "flood_noise_std": float(slot_std),
        },
        "privacy": {
            "statistical_security_bits": STAT_SECURITY_BITS,
            "flood_noise_l2_bound_log2": math.log2(bound),
            "flood_sigma_log2": math.log2(sigma),
            "rerandomized": True,
            "masked_slots": f"all but output.slots (uniform in +-{MASK_RANGE:g})",
            "not_covered": "CKKS approximation error of earlier layers (~2^-12 relative)",
        },
        "activations": n_act,
    }
    if _has_batch(arrays):
        manifest["batch"] = _batch_manifest(params, arrays, n_act, slot_std)
    return manifest


# ================================================================================================
# the plan (server side)
# ================================================================================================
class _KeyCache:
    def __init__(self, size: int = 4) -> None:
        self._items: OrderedDict[bytes, Any] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def get(self, ident: bytes, make: Any) -> Any:
        with self._lock:
            if ident in self._items:
                self._items.move_to_end(ident)
                return self._items[ident]
        value = make()
        with self._lock:
            self._items[ident] = value
            while len(self._items) > self._size:
                self._items.popitem(last=False)
        return value


class NetworkPlan:
    """Server-side compiled network: private weights, public `manifest()`."""

    def __init__(self, manifest: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self._manifest = manifest
        self._arrays = {k: np.asarray(v) for k, v in arrays.items()}
        self.n_act = int(manifest["activations"])
        self._ctx: Any = None
        self._plains: dict[str, Any] | None = None
        self._batch_plan: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._keys = _KeyCache()
        self.last_timings: dict[str, float] = {}

    # -- persistence ---------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._manifest))

    @property
    def key_fingerprint(self) -> bytes:
        """32 bytes naming the parameters keys must be made for (the key upload header)."""
        return network_key_fingerprint(self._manifest)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self._arrays.items()}

    @classmethod
    def from_arrays(cls, manifest: dict[str, Any], arrays: dict[str, np.ndarray]) -> NetworkPlan:
        if manifest.get("format") != "heinfer-network":
            raise ModelFormatError("not a heinfer network manifest")
        version = manifest.get("format_version")
        if version not in SUPPORTED_FORMAT_VERSIONS:
            raise ModelFormatError(
                f"network format version {version} is not supported by this heinfer (reads "
                f"{', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}); upgrade heinfer"
            )
        n_act = int(manifest["activations"])
        need = [
            "first_shifts",
            "first_diag",
            "first_bias",
            "first_c",
            "first_meta",
            "final_bias",
            "scales",
        ]
        for k in range(n_act):
            need += [f"h{k}_diag", f"h{k}_used", f"h{k}_meta", f"h{k}_bias", f"h{k}_c"]
        if version == FORMAT_VERSION:
            need += _batch_array_names(n_act)
        missing = [k for k in need if k not in arrays]
        if missing:
            raise ModelFormatError(f"network arrays missing: {missing}")
        from heinfer.he.ckks import CkksParameters

        params = CkksParameters.from_dict(manifest["params"])
        rebuilt = _build_manifest(
            manifest["name"], params, {k: arrays[k] for k in need}, n_act, None
        )
        if any(
            rebuilt.get(k) != manifest.get(k) for k in ("format_version", "keys", "input", "batch")
        ):
            raise ModelFormatError("network manifest does not match its arrays")
        if "batch" in rebuilt:
            single_out = int(np.asarray(arrays[f"h{n_act - 1}_meta"])[1])
            if rebuilt["batch"]["output"]["ciphertexts"] != single_out:
                raise ModelFormatError("the two layouts of this network disagree on its outputs")
        return cls(manifest, {k: np.asarray(arrays[k]) for k in need})

    # -- HE state --------------------------------------------------------------------------------
    @property
    def ctx(self) -> Any:
        if self._ctx is None:
            from heinfer.he.ckks import CkksContext, CkksParameters

            self._ctx = CkksContext(CkksParameters.from_dict(self._manifest["params"]))
        return self._ctx

    def _scales(self) -> dict[str, Any]:
        """Exact scales per stage (SEAL divides by the exact primes)."""
        primes = [int(p) for p in self._manifest["params"]["coeff_modulus"]]
        return _scale_plan(primes, self.n_act, float(self._arrays["scales"][0]))

    def _prepare(self) -> dict[str, Any]:
        with self._lock:
            if self._plains is not None:
                return self._plains
            ctx, a, sc = self.ctx, self._arrays, self._scales()
            top = sc["top"]
            T = a["first_shifts"].astype(np.int64)
            B = int(a["first_meta"][0])
            S = ctx.slots
            groups: dict[int, list[tuple[int, Any]]] = {}
            for i, t in enumerate(T.tolist()):
                g, b = divmod(int(t), B)
                pre = np.roll(a["first_diag"][i], g * B)
                plain = ctx.encode(pre, sc["w0"], top)
                if not plain.is_zero():  # weights below the encoding scale: nothing to add
                    groups.setdefault(g, []).append((b, plain))
            prod_scale = sc["d0"] * sc["w0"]
            first = {
                "B": B,
                "groups": groups,
                "max_b": int((T % B).max()) if T.size else 0,
                "bias": ctx.encode(a["first_bias"], prod_scale, top),
                "biasc": ctx.encode(a["first_bias"] + a["first_c"], prod_scale, top)
                if np.any(a["first_c"])
                else None,
            }
            hyb = []
            for k in range(self.n_act):
                R, m, Bh = (int(v) for v in a[f"h{k}_meta"])
                level = top - 1 - k
                used = a[f"h{k}_used"].astype(np.int64)
                hgroups: dict[int, list[tuple[int, Any]]] = {}
                for d in used.tolist():
                    g, b = divmod(int(d), Bh)
                    pre = np.roll(a[f"h{k}_diag"][d], g * Bh)
                    plain = ctx.encode(pre, sc["w"][k], level)
                    if not plain.is_zero():
                        hgroups.setdefault(g, []).append((b, plain))
                entry = {
                    "R": R,
                    "m": m,
                    "B": Bh,
                    "groups": hgroups,
                    "max_b": int((used % Bh).max()) if used.size else 0,
                    "fold": _fold_steps(R, S),
                    "level": level,
                }
                if k + 1 < self.n_act:
                    ps = sc["stage_in"][k] * sc["w"][k]
                    entry["bias"] = ctx.encode(a[f"h{k}_bias"], ps, level)
                    entry["biasc"] = (
                        ctx.encode(a[f"h{k}_bias"] + a[f"h{k}_c"], ps, level)
                        if np.any(a[f"h{k}_c"])
                        else None
                    )
                hyb.append(entry)
            self._plains = {"first": first, "hyb": hyb, "scales": sc}
            return self._plains

    @property
    def has_batch(self) -> bool:
        """Whether this plan offers the batched layout (every plan compiled by FORMAT_VERSION 2)."""
        return "batch" in self._manifest

    def key_part_sets(self) -> list[frozenset[str]]:
        """Key uploads this plan accepts: the manifest's full set (both layouts) and, with the
        batched layout, its smaller set (public + relin: batches only)."""
        specs = [self._manifest["keys"]]
        if self.has_batch:
            specs.append(self._manifest["batch"]["keys"])
        out = []
        for spec in specs:
            parts = {"public"} | ({"relin"} if spec["relin"] else set())
            if spec["galois_steps"]:
                parts.add("galois")
            out.append(frozenset(parts))
        return out

    def load_keys(self, keys: dict[str, bytes]) -> None:
        """Validate uploaded key parts with SEAL's loaders (and keep them parsed for later)."""
        self._server_keys(keys)

    def _server_keys(self, keys: dict[str, bytes]) -> Any:
        from heinfer.he.ckks import ServerKeys

        if not isinstance(keys, dict) or not all(
            isinstance(v, (bytes, bytearray)) for v in keys.values()
        ):
            raise MalformedPayloadError("keys must map names to serialized key bytes")
        h = hashlib.blake2b(digest_size=16)
        for name in ("public", "relin", "galois"):
            v = keys.get(name, b"")
            h.update(len(v).to_bytes(8, "little"))
            h.update(v)
        # A batch-only upload has no Galois part: load it without; single images then refuse it.
        steps = self._manifest["keys"]["galois_steps"] if "galois" in keys else []
        return self._keys.get(h.digest(), lambda: ServerKeys(self.ctx, keys, steps, True))

    # -- evaluation ------------------------------------------------------------------------------
    def _matvec(
        self, ct: Any, groups: dict[int, list[tuple[int, Any]]], B: int, max_b: int, galois: Any
    ) -> Any:
        ctx = self.ctx
        babies = [ct]
        for _ in range(max_b):
            babies.append(ctx.rotate(babies[-1], 1, galois))
        acc = None
        for g in range(max(groups), -1, -1):
            if acc is not None:
                acc = ctx.rotate(acc, B, galois)
            for b, plain in groups.get(g, []):
                term = ctx.multiply_plain(babies[b], plain)
                if acc is None:
                    acc = term
                else:
                    ctx.add_inplace(acc, term)
        return acc

    def _activate(self, acc: Any, bias: Any, biasc: Any, relin: Any) -> Any:
        ctx = self.ctx
        x = ctx.add_plain(acc, bias)
        if biasc is None:
            return ctx.multiply_relin_rescale(x, x, relin)
        t = ctx.add_plain(acc, biasc)
        return ctx.multiply_relin_rescale(x, t, relin)

    def evaluate_ciphertext(self, ct: Any, skeys: Any, raw: bool = False) -> Any:
        ctx = self.ctx
        P = self._prepare()
        f = P["first"]
        acc = self._matvec(ct, f["groups"], f["B"], f["max_b"], skeys.galois)
        ct = self._activate(acc, f["bias"], f["biasc"], skeys.relin)
        for k, hy in enumerate(P["hyb"]):
            acc = self._matvec(ct, hy["groups"], hy["B"], hy["max_b"], skeys.galois)
            for step, count in hy["fold"]:
                t, total = acc, None
                for _ in range(count):
                    t = ctx.rotate(t, step, skeys.galois)
                    if total is None:
                        total = ctx.add(acc, t)
                    else:
                        ctx.add_inplace(total, t)
                acc = total if total is not None else acc
            if k + 1 < self.n_act:
                ct = self._activate(acc, hy["bias"], hy["biasc"], skeys.relin)
            else:
                ctx.rescale_inplace(acc)
                ct = acc
        ctx.mod_switch_to(ct, 2)
        if raw:
            return ct
        return self._finalize(ct, skeys)

    def _finalize(self, ct: Any, skeys: Any) -> Any:
        """Mask non-output slots, add the final bias, flood and re-randomize (pk encryption)."""
        S = self.ctx.slots
        m = int(self._manifest["output"]["shape"][0])
        values = np.empty(S, dtype=np.complex128)
        values[:m] = self._arrays["final_bias"]
        values[m:] = _mask(S - m)
        return self._flood_and_rerandomize(ct, values, skeys)

    def _finalize_batch(self, ct: Any, images: int, bias: float, skeys: Any) -> Any:
        """The same treatment for one score of a batch: bias in the image slots, the mask in
        the slots no image occupies (they hold the network applied to zeros: model values)."""
        values = np.empty(self.ctx.slots, dtype=np.complex128)
        values[:images] = bias
        values[images:] = _mask(self.ctx.slots - images)
        return self._flood_and_rerandomize(ct, values, skeys)

    def _flood_and_rerandomize(self, ct: Any, values: np.ndarray, skeys: Any) -> Any:
        """Add one fresh public-key encryption of `values` + flooding noise (module docstring)."""
        from heinfer.he.ckks import os_random_normal

        ctx = self.ctx
        S, n = ctx.slots, ctx.n
        _bound, sigma = _flood_sigma(n)
        # slots z with iid complex Gaussian parts of std s give coefficients of std
        # scale*s*sqrt(2/N); we want sigma (in units of the ciphertext modulus) -> s below.
        s = sigma * math.sqrt(n / 2) / ct.scale
        noise = os_random_normal(2 * S).reshape(2, S) * s
        values = values + noise[0] + 1j * noise[1]
        plain = ctx.encode(values, ct.scale, 2)
        ctx.add_inplace(ct, ctx.encrypt_public(skeys.encryptor, plain))
        return ct

    def evaluate(self, request: bytes, keys: dict[str, bytes]) -> bytes:
        """One request body of either layout (dispatched on its magic) -> response body."""
        if isinstance(request, (bytes, bytearray, memoryview)) and (
            bytes(request[:4]) == BATCH_REQUEST_MAGIC
        ):
            return self.evaluate_batch(request, keys)
        t0 = time.perf_counter()
        skeys = self._server_keys(keys)
        t1 = time.perf_counter()
        ctx = self.ctx
        max_bytes = _max_ciphertext_bytes(self._manifest)
        blobs = decode_frames(REQUEST_MAGIC, request, MAX_IMAGES_PER_REQUEST, max_bytes)
        if skeys.galois is None and self._manifest["keys"]["galois_steps"]:
            raise ParameterMismatchError(
                "this key upload has no Galois keys (the batch-only set): single-image requests "
                "need the full key set of the manifest's `keys`; upload it, or send batched "
                f"({BATCH_REQUEST_MAGIC.decode()}) requests"
            )
        scale = 2.0 ** self._manifest["input"]["scale_log2"]
        top = len(self._manifest["params"]["coeff_modulus"]) - 1
        cts = [
            ctx.load_ciphertext(b, prime_count=top, scale=scale, max_bytes=max_bytes) for b in blobs
        ]
        out = [ctx.save_ciphertext(self.evaluate_ciphertext(ct, skeys)) for ct in cts]
        t2 = time.perf_counter()
        self.last_timings = {"keys_s": t1 - t0, "eval_s": t2 - t1}
        return encode_frames(RESPONSE_MAGIC, out)

    # -- batched layout --------------------------------------------------------------------------
    def _prepare_batch(self) -> dict[str, Any]:
        """The batched evaluation schedule (`_batch_schedule`), built once."""
        with self._lock:
            if self._batch_plan is None:
                sc = self._scales()
                blocks = _batch_blocks(self._arrays, self.n_act)
                wscales = _weight_scales(sc, self.n_act)
                gather, groups = _batch_schedule(blocks, wscales)
                self._batch_plan = {
                    "blocks": blocks,
                    "gather": gather,
                    "groups": groups,
                    "wscales": wscales,
                    "scales": sc,
                }
            return self._batch_plan

    def evaluate_batch(self, request: bytes, keys: dict[str, bytes]) -> bytes:
        """A batched request (HNB1: n images, one ciphertext per pixel) -> HNS1 (n, one
        ciphertext per score). Every ciphertext is validated before any evaluation."""
        if not self.has_batch:
            raise ParameterMismatchError(
                "this model was compiled before the batched layout existed (network format 1): "
                "recompile it with this heinfer, or send single-image requests"
            )
        t0 = time.perf_counter()
        skeys = self._server_keys(keys)
        ctx = self.ctx
        max_bytes = _max_ciphertext_bytes(self._manifest)
        images, blobs = decode_batch_frames(
            BATCH_REQUEST_MAGIC,
            request,
            count=INPUT_DIM,
            max_images=ctx.slots,
            max_record_bytes=max_bytes,
        )
        scale = 2.0 ** self._manifest["batch"]["input"]["scale_log2"]
        top = len(self._manifest["params"]["coeff_modulus"]) - 1
        xs = [
            ctx.load_ciphertext(b, prime_count=top, scale=scale, max_bytes=max_bytes) for b in blobs
        ]
        del blobs
        t1 = time.perf_counter()
        outs = self.evaluate_batch_ciphertexts(xs, images, skeys)
        body = encode_batch_frames(
            BATCH_RESPONSE_MAGIC, images, [ctx.save_ciphertext(ct) for ct in outs]
        )
        t2 = time.perf_counter()
        self.last_timings = {"keys_load_s": t1 - t0, "eval_s": t2 - t1}
        return body

    def evaluate_batch_ciphertexts(
        self, xs: list[Any], images: int, skeys: Any, raw: bool = False
    ) -> list[Any]:
        """The batched network on 784 pixel ciphertexts: scalar multiply-and-add only (no
        rotations), streamed group by group so that only the inputs and one layer of
        accumulators are live. Activation products stay unrelinearized: they are summed per
        group, rescaled, scattered into the next block's accumulators, and each accumulator is
        relinearized once (CryptoNets-style lazy relinearization)."""
        ctx = self.ctx
        P = self._prepare_batch()
        blocks, gather, groups = P["blocks"], P["gather"], P["groups"]
        wscales, sc = P["wscales"], P["scales"]
        top = sc["top"]
        relin = skeys.relin

        def zero(scale: float, level: int) -> Any:
            # a unit that no (nonzero) weight reaches: a fresh encryption of 0
            return ctx.encrypt_public(skeys.encryptor, ctx.encode(np.zeros(1), scale, level))

        def activate(acc: Any, bias: float, c: float) -> Any:
            ctx.relinearize_inplace(acc, relin)
            level = ctx.prime_count(acc)
            x = ctx.add_plain(acc, ctx.encode_scalar(bias, acc.scale, level))
            if c == 0.0:
                return ctx.multiply(x, x)
            return ctx.multiply(
                x, ctx.add_plain(acc, ctx.encode_scalar(bias + c, acc.scale, level))
            )

        def accumulate(total: Any, term: Any) -> Any:
            if total is None:
                return term
            ctx.add_inplace(total, term)
            return total

        def first_unit(h: int) -> Any:
            acc = None
            for j, w in gather[h]:
                plain = ctx.encode_scalar(w, wscales[0], top)
                if not plain.is_zero():  # |w| below the weight scale rounds to nothing
                    acc = accumulate(acc, ctx.multiply_plain(xs[j], plain))
            return acc if acc is not None else zero(sc["d0"] * wscales[0], top)

        current: list[Any] = []
        for k in range(self.n_act):
            blk, nxt = blocks[k], blocks[k + 1]
            accs: list[Any] = [None] * nxt.rows
            for members, targets in groups[k]:
                total = None
                for i in members:
                    if k == 0:
                        acc = first_unit(i)
                    else:
                        acc = current[i]
                        current[i] = None  # free as we go
                        if acc is None:
                            acc = zero(sc["stage_in"][k - 1] * wscales[k], top - k)
                    total = accumulate(total, activate(acc, float(blk.bias[i]), float(blk.c[i])))
                assert total is not None
                ctx.rescale_inplace(total)
                level = ctx.prime_count(total)
                for i, w in targets:
                    plain = ctx.encode_scalar(w, wscales[k + 1], level)
                    if not plain.is_zero():
                        accs[i] = accumulate(accs[i], ctx.multiply_plain(total, plain))
            current = accs
        outs = []
        for i, acc in enumerate(current):
            if acc is None:
                acc = zero(sc["stage_in"][-1] * wscales[-1], top - self.n_act)
            ctx.relinearize_inplace(acc, relin)
            ctx.rescale_inplace(acc)
            ctx.mod_switch_to(acc, 2)
            bias = float(blocks[-1].bias[i])
            outs.append(acc if raw else self._finalize_batch(acc, images, bias, skeys))
        return outs

    def simulate_batch(self, X: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """Emulation of `evaluate_batch` (images in slots) with the noise of each operation:
        fresh encryption, the scalar encoder's exact weight rounding, relinearization,
        rescaling and flooding. The batched precision claim in the manifest bounds it."""
        if not self.has_batch:
            raise ParameterMismatchError("this model has no batched layout (network format 1)")
        rng = rng or np.random.default_rng()
        X = _as_batch(X)
        from heinfer.he.ckks import CkksParameters

        params = CkksParameters.from_dict(self._manifest["params"])
        noise = _noise_model(params)
        P = self._prepare_batch()
        blocks, wscales, sc = P["blocks"], P["wscales"], P["scales"]
        v = X + rng.normal(0, math.hypot(noise["fresh"], noise["enc"]) / sc["d0"], X.shape)
        prod = sc["d0"] * wscales[0]
        for k, blk in enumerate(blocks):
            u = v @ _quantize(blk.dense(), wscales[k]).T
            if k > 0:  # accumulators of unrelinearized products: one relinearization each
                u = u + rng.normal(0, noise["ks"] / prod, u.shape)
            if k == self.n_act:
                break
            x = u + np.round(blk.bias * prod) / prod
            y = x * (u + np.round((blk.bias + blk.c) * prod) / prod)
            v = y + rng.normal(0, noise["rs3"] / sc["stage_in"][k], y.shape)
            prod = sc["stage_in"][k] * wscales[k + 1]
        out = u + rng.normal(0, noise["rs"] / sc["df"], u.shape) + blocks[-1].bias[None, :]
        flood = self._manifest["batch"]["precision"]["flood_noise_std"]
        return out + rng.normal(0, flood, out.shape)

    # -- plaintext simulation --------------------------------------------------------------------
    def simulate(
        self, X: np.ndarray, rng: np.random.Generator | None = None, *, layout: str = SINGLE_LAYOUT
    ) -> np.ndarray:
        """Slot-level emulation of `evaluate` with CKKS-like Gaussian noise (no encryption);
        `layout=BATCH_LAYOUT` emulates the batched layout (`simulate_batch`)."""
        if layout == BATCH_LAYOUT:
            return self.simulate_batch(X, rng)
        if layout != SINGLE_LAYOUT:
            raise BadInputError(f"unknown layout {layout!r}: {SINGLE_LAYOUT} or {BATCH_LAYOUT}")
        rng = rng or np.random.default_rng()
        X = _as_batch(X)
        from heinfer.he.ckks import CkksParameters

        params = CkksParameters.from_dict(self._manifest["params"])
        S = params.slots
        a = self._arrays
        sc = self._scales()
        noise = _noise_model(params)
        enc_err, fresh_err, ks_err, rs_err = (noise[k] for k in ("enc", "fresh", "ks", "rs"))

        def noisy(v: np.ndarray, std: float) -> np.ndarray:
            return v + rng.normal(0, std, v.shape)

        def rot(v: np.ndarray, k: int, scale: float) -> np.ndarray:
            return noisy(np.roll(v, -k, axis=-1), ks_err / scale)

        copies = int(a["first_meta"][1])
        v = np.zeros((X.shape[0], S))
        for c in range(copies):
            v[:, c * 784 : (c + 1) * 784] = X
        v = noisy(v, fresh_err / sc["d0"])

        def matvec(
            v: np.ndarray, diag: np.ndarray, idx: np.ndarray, B: int, scale: float, wscale: float
        ) -> np.ndarray:
            max_b = int((idx % B).max())
            babies = [v]
            for _ in range(max_b):
                babies.append(rot(babies[-1], 1, scale))
            acc = None
            gmax = int((idx // B).max())
            for g in range(gmax, -1, -1):
                if acc is not None:
                    acc = rot(acc, B, scale * wscale)
                for i, t in enumerate(idx.tolist()):
                    if t // B != g:
                        continue
                    w = noisy(np.roll(diag[i], g * B), enc_err / wscale)
                    term = babies[t % B] * w
                    acc = term if acc is None else acc + term
            assert acc is not None
            return acc

        T = a["first_shifts"]
        acc = matvec(v, a["first_diag"], T, int(a["first_meta"][0]), sc["d0"], sc["w0"])
        x = acc + a["first_bias"]
        y = x * (x + a["first_c"])
        for k in range(self.n_act):
            y = noisy(y, rs_err / sc["stage_in"][k])
            R, _m, Bh = (int(t) for t in a[f"h{k}_meta"])
            used = a[f"h{k}_used"]
            acc = matvec(y, a[f"h{k}_diag"][used], used, Bh, sc["stage_in"][k], sc["w"][k])
            for step, count in _fold_steps(R, S):
                t, total = acc, acc
                for _ in range(count):
                    t = rot(t, step, sc["stage_in"][k] * sc["w"][k])
                    total = total + t
                acc = total
            if k + 1 < self.n_act:
                x = acc + a[f"h{k}_bias"]
                y = x * (x + a[f"h{k}_c"])
            else:
                y = acc
        m = int(self._manifest["output"]["shape"][0])
        flood = self._manifest["precision"]["flood_noise_std"]
        out = y[:, :m] + a["final_bias"][None, :]
        return noisy(out, math.hypot(flood, rs_err / sc["df"]))


# ================================================================================================
# client codec
# ================================================================================================
def network_key_fingerprint(manifest: dict[str, Any]) -> bytes:
    """Key uploads carry 32 bytes naming the parameter set; derived from the CKKS primes."""
    from heinfer.he.ckks import CkksParameters

    params = CkksParameters.from_dict(manifest["params"])
    return hashlib.sha256(b"heinfer-ckks-keys:" + params.fingerprint).digest()


class NetworkCodec:
    """Client side, built from the public manifest only: keys, encryption, decryption."""

    def __init__(self, manifest: dict[str, Any]) -> None:
        from heinfer.he.ckks import CkksContext, CkksParameters

        if manifest.get("format") != "heinfer-network":
            raise ModelFormatError("not a heinfer network manifest")
        if manifest.get("format_version") not in SUPPORTED_FORMAT_VERSIONS:
            raise ModelFormatError(f"unsupported network format {manifest.get('format_version')}")
        self.manifest = json.loads(json.dumps(manifest))
        self.ctx = CkksContext(CkksParameters.from_dict(manifest["params"]))
        layout = manifest["input"]["layout"]
        if layout["type"] != "copies" or layout["slots"] != self.ctx.slots:
            raise ModelFormatError("unsupported input layout")
        self._copies = int(layout["copies"])
        self._stride = int(layout["stride"])
        self._scale = 2.0 ** float(manifest["input"]["scale_log2"])
        self._out_slots = np.asarray(manifest["output"]["slots"], dtype=np.int64)
        self.batch: dict[str, Any] | None = manifest.get("batch")
        if self.batch is not None and (
            self.batch.get("layout") != BATCH_LAYOUT
            or self.batch.get("max_images") != self.ctx.slots
            or self.batch.get("ciphertexts") != INPUT_DIM
        ):
            raise ModelFormatError("unsupported batched layout")
        self._keys: Any = None

    @property
    def key_fingerprint(self) -> bytes:
        return network_key_fingerprint(self.manifest)

    @property
    def has_keys(self) -> bool:
        return self._keys is not None

    def keygen(self) -> None:
        from heinfer.he.ckks import ClientKeys

        self._keys = ClientKeys(self.ctx)

    def _need(self) -> Any:
        if self._keys is None:
            raise BadInputError("no keys: call keygen() or load_secret() first")
        return self._keys

    @property
    def batch_capacity(self) -> int:
        """Most images one batched request holds (0: the plan has no batched layout)."""
        return int(self.batch["max_images"]) if self.batch is not None else 0

    def public_keys(self, layout: str | None = None) -> dict[str, bytes]:
        """Key parts to upload: by default the manifest's full set (both layouts);
        `layout=BATCH_LAYOUT` only what batches need (public + relin, no Galois keys)."""
        spec = self.manifest["keys"]
        if layout == BATCH_LAYOUT:
            spec = self._need_batch()["keys"]
        elif layout not in (None, SINGLE_LAYOUT):
            raise BadInputError(f"unknown layout {layout!r}: {SINGLE_LAYOUT} or {BATCH_LAYOUT}")
        return self._need().public_keys(spec["galois_steps"], relin=bool(spec["relin"]))

    def _need_batch(self) -> dict[str, Any]:
        if self.batch is None:
            raise ParameterMismatchError(
                "this model has no batched layout (compiled with network format 1)"
            )
        return self.batch

    def secret_bytes(self) -> bytes:
        return self._need().secret_bytes()

    def load_secret(self, data: bytes) -> None:
        from heinfer.he.ckks import ClientKeys

        self._keys = ClientKeys.from_secret_bytes(self.ctx, data)

    def layout(self, x: np.ndarray) -> np.ndarray:
        v = np.zeros(self.ctx.slots)
        for c in range(self._copies):
            v[c * self._stride : c * self._stride + 784] = x
        return v

    def encrypt(self, X: np.ndarray, layout: str | None = None) -> bytes:
        """A request body: one ciphertext per image (default), or `layout=BATCH_LAYOUT`."""
        if layout == BATCH_LAYOUT:
            return self.encrypt_batch(X)
        if layout not in (None, SINGLE_LAYOUT):
            raise BadInputError(f"unknown layout {layout!r}: {SINGLE_LAYOUT} or {BATCH_LAYOUT}")
        X = _as_batch(X)
        if X.shape[0] > MAX_IMAGES_PER_REQUEST:
            raise PayloadTooLargeError(f"at most {MAX_IMAGES_PER_REQUEST} images per request")
        if not np.all(np.isfinite(X)):
            raise BadInputError("input contains NaN or infinity")
        keys = self._need()
        return encode_frames(REQUEST_MAGIC, [keys.encrypt(self.layout(x), self._scale) for x in X])

    def encrypt_batch(self, X: np.ndarray) -> bytes:
        """A batched request body (HNB1): pixel j of image i in slot i of ciphertext j."""
        batch = self._need_batch()
        X = _as_batch(X)
        if X.shape[0] > batch["max_images"]:
            raise PayloadTooLargeError(f"at most {batch['max_images']} images per batched request")
        if not np.all(np.isfinite(X)):
            raise BadInputError("input contains NaN or infinity")
        keys = self._need()
        scale = 2.0 ** float(batch["input"]["scale_log2"])
        columns = np.zeros((INPUT_DIM, self.ctx.slots))
        columns[:, : X.shape[0]] = X.T
        blobs = [keys.encrypt(column, scale) for column in columns]
        return encode_batch_frames(BATCH_REQUEST_MAGIC, X.shape[0], blobs)

    def decrypt_batch_slots(self, payload: bytes) -> tuple[int, np.ndarray]:
        """(images, every slot of every score ciphertext (outputs, slots)) of an HNS1 body."""
        batch = self._need_batch()
        keys = self._need()
        images, blobs = decode_batch_frames(
            BATCH_RESPONSE_MAGIC,
            payload,
            count=int(batch["output"]["ciphertexts"]),
            max_images=int(batch["max_images"]),
            max_record_bytes=_max_ciphertext_bytes(self.manifest),
        )
        prime_count = int(batch["output"]["level_primes"])
        return images, np.stack([keys.decrypt(b, prime_count=prime_count) for b in blobs])

    def decrypt_slots(self, payload: bytes) -> np.ndarray:
        """All slots of every result ciphertext, shape (n, slots) (diagnostics and tests)."""
        keys = self._need()
        max_bytes = _max_ciphertext_bytes(self.manifest)
        blobs = decode_frames(RESPONSE_MAGIC, payload, MAX_IMAGES_PER_REQUEST, max_bytes)
        prime_count = int(self.manifest["output"]["level_primes"])
        return np.stack([keys.decrypt(b, prime_count=prime_count) for b in blobs])

    def decrypt(self, payload: bytes) -> np.ndarray:
        """Scores (n, outputs) from a response body of either layout."""
        if isinstance(payload, (bytes, bytearray, memoryview)) and (
            bytes(payload[:4]) == BATCH_RESPONSE_MAGIC
        ):
            images, slots = self.decrypt_batch_slots(payload)
            return np.ascontiguousarray(slots[:, :images].T)
        return self.decrypt_slots(payload)[:, self._out_slots]
