"""Import HE-friendly networks from PyTorch and ONNX into a `NetworkSpec` (numpy weights).

Supported: Conv2d / AvgPool2d / Flatten / Linear and degree-2 activations (heinfer.nn.Square,
PolyAct, or any ONNX Mul/Add combination that is a degree-2 polynomial of the previous linear
output). Anything else is refused with the HE-friendly alternative named. The input shape comes
from the model (a leading Unflatten, a constant ONNX Reshape, a 4-D graph input, or the first
Linear layer's width) or from `input_shape=`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from heinfer.errors import UnsupportedModelError
from heinfer.plans.network.spec import NetworkSpec

__all__ = ["import_onnx", "import_torch"]

_NOT_HE = "{name} is not HE-friendly: use heinfer.nn.Square or heinfer.nn.PolyAct"


def import_torch(module: Any, input_shape: tuple[int, ...] | None = None) -> NetworkSpec:
    """torch.nn.Sequential of Conv2d/AvgPool2d/Flatten/Unflatten/Linear/Square/PolyAct.

    The input shape is `input_shape`, else a leading Unflatten's shape, else the first Linear
    layer's width."""
    import torch  # noqa: F401  (torch is an optional extra; only this function needs it)

    layers: list[dict[str, Any]] = []
    shape = _torch_layers(module, layers)
    if not layers and shape is None:
        raise UnsupportedModelError("expected a torch.nn.Sequential with layers")
    return NetworkSpec(layers, input_shape if input_shape is not None else shape)


def _torch_layers(module: Any, layers: list[dict[str, Any]]) -> tuple[int, ...] | None:
    """Append `module`'s layers; returns the shape a leading Unflatten gives the input."""
    shape: tuple[int, ...] | None = None
    mods = list(module.children()) if hasattr(module, "children") else list(module)
    if not mods:
        raise UnsupportedModelError("expected a torch.nn.Sequential with layers")
    for mod in mods:
        name = type(mod).__name__
        if name == "Sequential":
            before = len(layers)
            inner = _torch_layers(mod, layers)
            if inner is not None and before == 0:
                shape = inner
        elif name == "Unflatten":
            size = tuple(int(d) for d in mod.unflattened_size)
            if layers:
                layers.append({"type": "reshape", "shape": list(size)})
            else:
                shape = size
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
        elif name in ("Flatten", "Identity", "Dropout"):
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
    return shape


def import_onnx(path: str, input_shape: tuple[int, ...] | None = None) -> NetworkSpec:
    """An ONNX export of the same kind of network (Gemm/MatMul/Add/Conv/AveragePool/Flatten/
    Reshape/Mul). Activations are recognised symbolically: any Mul/Add combination that is a
    degree-2 polynomial of the previous linear output becomes a PolyAct. The input shape is
    `input_shape`, else a 4-D graph input's, else what a Reshape of the graph input yields
    (evaluated with onnx's reference evaluator), else the first Gemm's width."""
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
    dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    shape: tuple[int, ...] | None = None
    if len(dims) == 4 and all(dims[1:]):
        shape = tuple(int(d) for d in dims[1:])

    def reshaped(name: str) -> tuple[int, ...]:
        """The shape a Reshape of the graph input gives one sample (its target is computed by
        shape arithmetic in torch exports, so evaluate it on a zero input)."""
        from onnx.reference import ReferenceEvaluator

        feed = np.zeros([1, *(d or 1 for d in dims[1:])], dtype=np.float32)
        outs: Any = ReferenceEvaluator(model).run([name], {graph.input[0].name: feed})
        return tuple(int(d) for d in np.shape(outs[0])[1:])

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
        elif op == "Reshape" and not layers and src == graph.input[0].name:
            shape = reshaped(out)
        elif op in ("Reshape", "Identity", "Dropout"):
            pass  # our numpy layers reshape as needed (linear layers flatten)
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
    return NetworkSpec(final, input_shape if input_shape is not None else shape)
