"""One description of each layout's evaluation, walked by two executors.

The compiler's arrays are turned into a schedule once per plan: `SingleSchedule` (a list of
stages over one slot vector) and `BatchSchedule` (scalar multiply-and-adds across one ciphertext
per input). `run_single` and `run_batch` walk a schedule and call an `Ops` for every operation;
the encrypted evaluation passes SEAL operations (`plan.SealOps`), `simulate` passes plaintext
operations that add each operation's CKKS noise (`simulate.NoisyOps`). The two cannot drift
apart: they are the same walk, and both track scale and level per value (SEAL refuses
mismatched scales; the simulator asserts them).

Single-image packing (one ciphertext per input, N=8192 -> 4096 slots for one activation):

* Input: `copies` copies of the n features at offsets 0, n, 2n, ... For a conv layer, output
  channel f lives in copy f at the slot of its window's top-left pixel, so the first layer is
  `sum_t P_t * rot(x, t)` over the kernel offsets t, evaluated baby-step/giant-step (`MatVec`),
  or, in models compiled with `rotate_products` (the default for up to 64 offsets), as
  `sum_t rot(P'_t * x, t)` by Horner, so that no rotation meets the input's lower scale.
  Any other first layer falls back to a generic diagonal decomposition.
* Later blocks: hybrid diagonal method (Juvekar et al., GAZELLE) with R = next power of two >=
  outputs rows: R diagonals (BSGS), then a `Fold` (rotate-and-sum over the S/R blocks, radix 4).
  Output i ends replicated in every slot s = i (mod R); rows >= outputs are exact zeros.

Batched packing (CryptoNets): slot i holds input i, one ciphertext per feature, so every affine
block is a matrix of scalars: no rotations, no Galois keys. Block 0 is gathered per hidden unit
over its nonzero taps; x(x+c) is left unrelinearized; units whose columns in the next block are
equal (the inputs of one average-pooling window) are summed, rescaled once and scattered into
the next block's accumulators, each relinearized once. Only the inputs and one layer of
accumulators are live.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np

from heinfer.errors import ModelFormatError
from heinfer.plans.network.scales import OUTPUT_PRIMES, fold_steps

__all__ = [
    "Activate",
    "BatchBlock",
    "BatchSchedule",
    "Fold",
    "MatVec",
    "Ops",
    "Rescale",
    "SingleSchedule",
    "Vector",
    "batch_blocks",
    "batch_schedule",
    "quantize",
    "run_batch",
    "run_single",
    "single_schedule",
]

V = TypeVar("V")


# -- the single-image schedule -------------------------------------------------------------------
@dataclass(frozen=True)
class Vector:
    """A plaintext slot vector; `index` names its encoding in the plan's table (made once)."""

    index: int
    values: np.ndarray
    scale: float
    level: int  # primes of the ciphertexts it meets


@dataclass(frozen=True)
class MatVec:
    """sum over diagonals of diag * rot(x, giant*g + b), giants by Horner in `giant`.

    Baby steps either rotate the input (rot(x, 1..babies); groups[g] holds (b, diagonal
    pre-rotated by giant*g)) or, with `rotate_products`, rotate the products (Horner in steps of
    1 inside each group; the diagonal pre-rotated by giant*g + b). The second costs one rotation
    per diagonal instead of babies + giants, but no rotation then meets the input at its own
    (lower) scale, so the key-switching error it adds is 2^w smaller against the values (w:
    the weights' scale bits), which is what keeps the first layer's rotations from dominating
    the weight-dependent error (`bound.py`)."""

    groups: tuple[tuple[tuple[int, Vector], ...], ...]
    giant: int
    babies: int
    rotate_products: bool = False


@dataclass(frozen=True)
class Fold:
    steps: tuple[tuple[int, int], ...]  # (rotation step, rotations) per radix-4 round


@dataclass(frozen=True)
class Activate:
    """(x + bias) * (x + shifted), relinearized and rescaled; shifted None: a square."""

    bias: Vector
    shifted: Vector | None


@dataclass(frozen=True)
class Rescale:
    pass


Stage = MatVec | Fold | Activate | Rescale


@dataclass(frozen=True)
class SingleSchedule:
    stages: tuple[Stage, ...]
    vectors: tuple[Vector, ...]  # by index
    copies: int
    input_scale: float


Encode = Callable[[np.ndarray, float, int], tuple[Any, bool]]


class _Table:
    """Collects the schedule's vectors and the executor's encodings of them, in one pass."""

    def __init__(self, encode: Encode) -> None:
        self._encode = encode
        self.vectors: list[Vector] = []
        self.plains: list[Any] = []

    def add(self, values: np.ndarray, scale: float, level: int) -> tuple[Vector, bool]:
        plain, zero = self._encode(values, scale, level)
        vector = Vector(len(self.vectors), values, scale, level)
        self.vectors.append(vector)
        self.plains.append(plain)
        return vector, zero


def _matvec(
    table: _Table,
    diags: np.ndarray,
    shifts: np.ndarray,
    giant: int,
    scale: float,
    level: int,
    rotate_products: bool = False,
) -> MatVec:
    groups: dict[int, list[tuple[int, Vector]]] = {}
    for diag, shift in zip(diags, shifts.tolist(), strict=True):
        g, b = divmod(int(shift), giant)
        roll = g * giant + (b if rotate_products else 0)
        vector, zero = table.add(np.roll(diag, roll), scale, level)
        if not zero:  # weights below the encoding scale: nothing to multiply (SEAL refuses 0)
            groups.setdefault(g, []).append((b, vector))
    top = max(groups, default=-1)
    babies = int((shifts % giant).max()) if shifts.size else 0
    return MatVec(
        tuple(tuple(groups.get(g, [])) for g in range(top + 1)), giant, babies, rotate_products
    )


def single_schedule(
    arrays: Mapping[str, np.ndarray], sc: dict[str, Any], n_act: int, slots: int, encode: Encode
) -> tuple[SingleSchedule, list[Any]]:
    """The single-image schedule of the compiled arrays, and `encode`'s result per vector."""
    table = _Table(encode)
    a, top = arrays, int(sc["top"])
    prod = sc["d0"] * sc["w0"]
    first_c = a["first_c"]
    stages: list[Stage] = [
        _matvec(
            table,
            a["first_diag"],
            a["first_shifts"],
            int(a["first_meta"][0]),
            sc["w0"],
            top,
            bool(sc.get("rotate_products", False)),
        ),
        Activate(
            table.add(a["first_bias"], prod, top)[0],
            table.add(a["first_bias"] + first_c, prod, top)[0] if np.any(first_c) else None,
        ),
    ]
    for k in range(n_act):
        R, _m, giant = (int(v) for v in a[f"h{k}_meta"])
        level = top - 1 - k
        used = np.asarray(a[f"h{k}_used"], dtype=np.int64)
        diags = a[f"h{k}_diag"][used]
        stages.append(_matvec(table, diags, used, giant, sc["w"][k], level))
        stages.append(Fold(tuple(fold_steps(R, slots))))
        if k + 1 < n_act:
            prod = sc["stage_in"][k] * sc["w"][k]
            bias, c = a[f"h{k}_bias"], a[f"h{k}_c"]
            stages.append(
                Activate(
                    table.add(bias, prod, level)[0],
                    table.add(bias + c, prod, level)[0] if np.any(c) else None,
                )
            )
        else:
            stages.append(Rescale())
    schedule = SingleSchedule(
        tuple(stages), tuple(table.vectors), int(a["first_meta"][1]), float(sc["d0"])
    )
    return schedule, table.plains


# -- the batched schedule ------------------------------------------------------------------------
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


def batch_blocks(arrays: Mapping[str, np.ndarray], n_act: int, n_features: int) -> list[_Block]:
    """The batched layout's blocks, checked (ModelFormatError on anything inconsistent)."""
    blocks, in_dim = [], n_features
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


def quantize(M: np.ndarray, scale: float) -> np.ndarray:
    """Weights as SEAL's scalar encoder stores them at `scale` (those rounding to 0 skipped)."""
    q = np.round(M * scale) / scale
    return np.where(np.abs(M * scale) > 0.5, q, 0.0)


@dataclass(frozen=True)
class BatchBlock:
    """Block k's units: activation x(x+c) with their bias, grouped by identical (encoded)
    columns of block k+1, each group with its shared column as (output, weight) targets."""

    bias: np.ndarray
    c: np.ndarray
    groups: tuple[tuple[tuple[int, ...], tuple[tuple[int, float], ...]], ...]
    weight_scale: float  # of block k+1's weights
    unit_scale: float  # scale and level of block k's accumulators (for units no weight reaches)
    unit_level: int


@dataclass(frozen=True)
class BatchSchedule:
    gather: tuple[tuple[tuple[int, float], ...], ...]  # block 0: per unit, (input, weight)
    first_scale: float  # block 0's weight scale
    input_scale: float
    top: int
    blocks: tuple[BatchBlock, ...]
    output_scale: float  # scale and level of the last block's accumulators
    output_level: int
    final_bias: np.ndarray
    relinearize_groups: bool = False  # before their rescale: s^2 never meets the rounding


def batch_schedule(blocks: list[_Block], sc: dict[str, Any], n_act: int) -> BatchSchedule:
    """Groups that reach no output are left out, and so are weights the scalar encoder rounds
    to 0 (SEAL refuses a product with 0)."""
    wscales = [sc["w0"], *sc["w"][:n_act]]
    top = int(sc["top"])
    unit_scales = [sc["d0"] * sc["w0"]] + [
        sc["stage_in"][k - 1] * wscales[k] for k in range(1, n_act + 1)
    ]
    first = quantize(blocks[0].dense(), wscales[0])
    gather = tuple(
        tuple((int(j), float(first[h, j])) for j in np.flatnonzero(first[h]))
        for h in range(len(first))
    )
    out = []
    for k in range(n_act):
        Mq = quantize(blocks[k + 1].dense(), wscales[k + 1])
        columns, inverse = np.unique(Mq.T, axis=0, return_inverse=True)
        inverse = np.asarray(inverse).reshape(-1)
        groups = []
        for g, column in enumerate(columns):
            targets = tuple((int(i), float(column[i])) for i in np.flatnonzero(column))
            if targets:
                members = tuple(int(u) for u in np.flatnonzero(inverse == g))
                groups.append((members, targets))
        out.append(
            BatchBlock(
                blocks[k].bias, blocks[k].c, tuple(groups), wscales[k + 1], unit_scales[k], top - k
            )
        )
    return BatchSchedule(
        gather,
        float(wscales[0]),
        float(sc["d0"]),
        top,
        tuple(out),
        unit_scales[n_act],
        top - n_act,
        blocks[-1].bias,
        bool(sc.get("relinearize_groups", False)),
    )


# -- the walks ------------------------------------------------------------------------------------
class Ops(Protocol[V]):
    """What a schedule asks of an executor. Values carry their own scale and level."""

    def rotate(self, v: V, step: int) -> V: ...
    def multiply_vector(self, v: V, w: Vector) -> V: ...
    def add_vector(self, v: V, w: Vector) -> V: ...
    def multiply_scalar(self, v: V, w: float, scale: float) -> V: ...
    def add_scalar(self, v: V, value: float) -> V: ...
    def add(self, a: V, b: V) -> V: ...
    def add_inplace(self, a: V, b: V) -> None: ...
    def multiply(self, a: V, b: V) -> V: ...  # left unrelinearized; a is b: a square
    def relinearize(self, v: V) -> None: ...  # no-op on a relinearized value
    def rescale(self, v: V) -> None: ...
    def drop_to(self, v: V, primes: int) -> None: ...
    def zero(self, scale: float, level: int) -> V: ...
    def level(self, v: V) -> int: ...


def _accumulate(ops: Ops[V], total: V | None, term: V) -> V:
    if total is None:
        return term
    ops.add_inplace(total, term)
    return total


def _run_matvec(x: V, stage: MatVec, ops: Ops[V]) -> V:
    if stage.rotate_products:
        return _run_rotated_products(x, stage, ops)
    babies = [x]
    for _ in range(stage.babies):
        babies.append(ops.rotate(babies[-1], 1))
    acc: V | None = None
    for g in range(len(stage.groups) - 1, -1, -1):
        if acc is not None:
            acc = ops.rotate(acc, stage.giant)
        for b, diag in stage.groups[g]:
            acc = _accumulate(ops, acc, ops.multiply_vector(babies[b], diag))
    if acc is None:
        raise ModelFormatError("a layer of this network has no weight above the encoding scale")
    return acc


def _run_rotated_products(x: V, stage: MatVec, ops: Ops[V]) -> V:
    """The same sum with every rotation after a product: inside group g, Horner in b
    (rot(rot(d_B x, 1) + d_{B-1} x, 1) + ...), then Horner in the giant step over groups."""
    acc: V | None = None
    for g in range(len(stage.groups) - 1, -1, -1):
        if acc is not None:
            acc = ops.rotate(acc, stage.giant)
        by_baby = dict(stage.groups[g])
        inner: V | None = None
        for b in range(max(by_baby, default=-1), -1, -1):
            if inner is not None:
                inner = ops.rotate(inner, 1)
            if b in by_baby:
                inner = _accumulate(ops, inner, ops.multiply_vector(x, by_baby[b]))
        if inner is not None:
            acc = _accumulate(ops, acc, inner)
    if acc is None:
        raise ModelFormatError("a layer of this network has no weight above the encoding scale")
    return acc


def run_single(schedule: SingleSchedule, x: V, ops: Ops[V]) -> V:
    """The single-image network on one input value; the result at OUTPUT_PRIMES primes, before
    the final bias, mask, flooding and re-randomization (the layout's `_finalize`)."""
    for stage in schedule.stages:
        if isinstance(stage, MatVec):
            x = _run_matvec(x, stage, ops)
        elif isinstance(stage, Fold):
            for step, count in stage.steps:
                t, total = x, None
                for _ in range(count):
                    t = ops.rotate(t, step)
                    total = ops.add(x, t) if total is None else _accumulate(ops, total, t)
                x = total if total is not None else x
        elif isinstance(stage, Activate):
            y = ops.add_vector(x, stage.bias)
            shifted = y if stage.shifted is None else ops.add_vector(x, stage.shifted)
            x = ops.multiply(y, shifted)
            ops.relinearize(x)
            ops.rescale(x)
        else:
            ops.rescale(x)
    ops.drop_to(x, OUTPUT_PRIMES)
    return x


def run_batch(schedule: BatchSchedule, xs: list[V], ops: Ops[V]) -> list[V]:
    """The batched network on one value per input feature (streamed group by group, see the
    module docstring); one value per output at OUTPUT_PRIMES primes, before the final bias,
    mask, flooding and re-randomization."""

    def activate(acc: V, bias: float, c: float) -> V:
        ops.relinearize(acc)
        x = ops.add_scalar(acc, bias)
        return ops.multiply(x, x if c == 0.0 else ops.add_scalar(acc, bias + c))

    def first_unit(h: int) -> V | None:
        acc: V | None = None
        for j, w in schedule.gather[h]:
            acc = _accumulate(ops, acc, ops.multiply_scalar(xs[j], w, schedule.first_scale))
        return acc

    current: list[V | None] = []
    for k, block in enumerate(schedule.blocks):
        accs: list[V | None] = [None] * _outputs(schedule, k)
        for members, targets in block.groups:
            total: V | None = None
            for i in members:
                if k == 0:
                    acc = first_unit(i)
                else:
                    acc = current[i]
                    current[i] = None  # free as we go
                if acc is None:  # no weight reaches this unit: a fresh encryption of 0
                    acc = ops.zero(block.unit_scale, block.unit_level)
                total = _accumulate(
                    ops, total, activate(acc, float(block.bias[i]), float(block.c[i]))
                )
            assert total is not None
            if schedule.relinearize_groups:
                ops.relinearize(total)
            ops.rescale(total)
            for i, w in targets:
                accs[i] = _accumulate(
                    ops, accs[i], ops.multiply_scalar(total, w, block.weight_scale)
                )
        current = accs
    outs = []
    for acc in current:
        out = acc if acc is not None else ops.zero(schedule.output_scale, schedule.output_level)
        ops.relinearize(out)
        ops.rescale(out)
        ops.drop_to(out, OUTPUT_PRIMES)
        outs.append(out)
    return outs


def _outputs(schedule: BatchSchedule, k: int) -> int:
    """Units of block k+1."""
    if k + 1 < len(schedule.blocks):
        return len(schedule.blocks[k + 1].bias)
    return len(schedule.final_bias)
