"""The encrypted evaluation emulated in plaintext: the plan's own schedules (`schedule.py`)
walked with `NoisyOps`, which add the CKKS noise of every operation (encoding, fresh
encryption, key switching, rescaling) at the scale SEAL would hold, then the final bias and the
flooding noise. No keys; the manifest's precision claims bound its error, and it tells a model
owner what accuracy to expect before serving."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from heinfer.errors import BadInputError
from heinfer.plans.network.manifest import BATCH_LAYOUT, SINGLE_LAYOUT
from heinfer.plans.network.scales import noise_model
from heinfer.plans.network.schedule import Vector, run_batch, run_single
from heinfer.plans.network.spec import as_batch

if TYPE_CHECKING:
    from heinfer.plans.network.plan import NetworkPlan

__all__ = ["ExactOps", "NoisyOps", "SimValue", "simulate"]


@dataclass
class SimValue:
    """Slot values (any leading shape) with the scale, level and size SEAL's ciphertext would
    have: size 3 is a product not relinearized yet."""

    values: np.ndarray
    scale: float
    level: int
    size: int = 2


class NoisyOps:
    """`schedule.Ops` on `SimValue`s, each operation adding its noise (`scales.noise_model`)."""

    def __init__(self, params: Any, rng: np.random.Generator, width: int = 1) -> None:
        self.width = width  # slots of a batched value (the inputs of the batch)
        self.primes = [int(p) for p in params.data_primes]
        self.noise = noise_model(params)
        self.rng = rng

    def _noisy(self, values: np.ndarray, std: float) -> np.ndarray:
        return values + self.rng.normal(0.0, std, values.shape)

    @staticmethod
    def _same(a: SimValue, b: SimValue | Vector) -> None:
        if a.level != b.level or not math.isclose(a.scale, b.scale, rel_tol=1e-9):
            raise AssertionError(
                f"scale/level mismatch: {a.scale}@{a.level} vs {b.scale}@{b.level}"
            )

    def fresh(self, values: np.ndarray, scale: float, level: int) -> SimValue:
        std = math.hypot(self.noise["fresh"], self.noise["enc"]) / scale
        return SimValue(self._noisy(values, std), scale, level)

    def rotate(self, v: SimValue, step: int) -> SimValue:
        rolled = np.roll(v.values, -step, axis=-1)
        return SimValue(self._noisy(rolled, self.noise["ks"] / v.scale), v.scale, v.level, v.size)

    def multiply_vector(self, v: SimValue, w: Vector) -> SimValue:
        if v.level != w.level:
            raise AssertionError(f"weights at level {w.level} meet a value at {v.level}")
        weights = self._noisy(w.values, self.noise["enc"] / w.scale)
        return SimValue(v.values * weights, v.scale * w.scale, v.level, v.size)

    def add_vector(self, v: SimValue, w: Vector) -> SimValue:
        self._same(v, w)
        values = self._noisy(w.values, self.noise["enc"] / w.scale)
        return SimValue(v.values + values, v.scale, v.level, v.size)

    def multiply_scalar(self, v: SimValue, w: float, scale: float) -> SimValue:
        q = round(w * scale) / scale
        return SimValue(v.values * q, v.scale * scale, v.level, v.size)

    def add_scalar(self, v: SimValue, value: float) -> SimValue:
        q = round(value * v.scale) / v.scale
        return SimValue(v.values + q, v.scale, v.level, v.size)

    def add(self, a: SimValue, b: SimValue) -> SimValue:
        self._same(a, b)
        return SimValue(a.values + b.values, a.scale, a.level, max(a.size, b.size))

    def add_inplace(self, a: SimValue, b: SimValue) -> None:
        self._same(a, b)
        a.values = a.values + b.values
        a.size = max(a.size, b.size)

    def multiply(self, a: SimValue, b: SimValue) -> SimValue:
        if a.level != b.level:
            raise AssertionError("product of values at different levels")
        return SimValue(a.values * b.values, a.scale * b.scale, a.level, 3)

    def relinearize(self, v: SimValue) -> None:
        if v.size > 2:
            v.values = self._noisy(v.values, self.noise["ks"] / v.scale)
            v.size = 2

    def rescale(self, v: SimValue) -> None:
        v.scale /= self.primes[v.level - 1]
        v.level -= 1
        std = self.noise["rs3" if v.size > 2 else "rs"] / v.scale
        v.values = self._noisy(v.values, std)

    def drop_to(self, v: SimValue, primes: int) -> None:
        v.level = min(v.level, primes)

    def zero(self, scale: float, level: int) -> SimValue:
        return self.fresh(np.zeros(self.width), scale, level)

    def level(self, v: SimValue) -> int:
        return v.level


class ExactOps(NoisyOps):
    """The served model exactly: every operation without noise, each vector as SEAL encoded it
    (`decoded[vector.index]`: the plan's plaintexts decoded, imaginary parts included; the
    schedule's own values when None, which is exact for the batched layout's scalars). Walked on
    a client's decrypted input it gives f~(x~), what the client is entitled to (`bound.py`), so
    an encrypted result minus it is the evaluation's weight-dependent error."""

    def __init__(self, params: Any, width: int = 1, decoded: list[np.ndarray] | None = None):
        super().__init__(params, np.random.default_rng(0), width)
        self.noise = dict.fromkeys(self.noise, 0.0)
        self.decoded = decoded

    def _noisy(self, values: np.ndarray, std: float) -> np.ndarray:
        return values

    def _values(self, w: Vector) -> np.ndarray:
        return w.values if self.decoded is None else self.decoded[w.index]

    def multiply_vector(self, v: SimValue, w: Vector) -> SimValue:
        if v.level != w.level:
            raise AssertionError(f"weights at level {w.level} meet a value at {v.level}")
        return SimValue(v.values * self._values(w), v.scale * w.scale, v.level, v.size)

    def add_vector(self, v: SimValue, w: Vector) -> SimValue:
        self._same(v, w)
        return SimValue(v.values + self._values(w), v.scale, v.level, v.size)


def simulate(
    plan: NetworkPlan,
    X: np.ndarray,
    rng: np.random.Generator | None = None,
    *,
    layout: str = SINGLE_LAYOUT,
    ops: NoisyOps | None = None,
) -> np.ndarray:
    """Scores (n, outputs) as the encrypted `layout` would decrypt them, give or take noise."""
    from heinfer.he.ckks import CkksParameters

    rng = rng or np.random.default_rng()
    X = as_batch(X, plan.n_features)
    params = CkksParameters.from_dict(plan.network["params"])
    ops = ops or NoisyOps(params, rng, width=X.shape[0])
    top = len(params.data_primes)
    bias = plan.final_bias
    if layout == SINGLE_LAYOUT:
        schedule, _plains = plan.single_schedule()
        v = np.zeros((X.shape[0], params.slots))
        stride = int(plan.network["input"]["layout"]["stride"])
        for c in range(schedule.copies):
            v[:, c * stride : c * stride + X.shape[1]] = X
        out = run_single(schedule, ops.fresh(v, schedule.input_scale, top), ops)
        scores = out.values[:, : len(bias)] + bias[None, :]
        flood = plan.network["precision"]["flood_noise_std"]
    elif layout == BATCH_LAYOUT and "batch" in plan.network:
        batch = plan.batch_schedule()
        xs = [ops.fresh(column, batch.input_scale, top) for column in X.T]
        outs = run_batch(batch, xs, ops)
        scores = np.stack([o.values for o in outs], axis=1) + bias[None, :]
        flood = plan.network["batch"]["precision"]["flood_noise_std"]
    else:
        raise BadInputError(f"model {plan.manifest.name!r} has no layout {layout!r}")
    return scores + rng.normal(0.0, flood, scores.shape)
