"""A bound on the part of a response that depends on the weights beyond the model's own output.

Why: a client can send the same request many times. Everything the server computes before
flooding is a deterministic function of (request, keys, weights), so averaging repeated answers
strips the fresh flooding noise and leaves that function. What a client is entitled to is the
served model f~ (the network with its weights as SEAL encodes them) at its own decrypted input
x~ (it knows both the input and its encryption noise). The rest, E = pre-flood result - f~(x~),
comes from the evaluation itself: key switching in every rotation and relinearization, the
rounding of every rescale, and the server's own encryptions of zero; it passes through the
later weights, so it depends on them, and flooding has to hide it.

`error_bound` walks the compiled schedule (the same walk as the SEAL executor and the
simulator, `schedule.run_single` / `run_batch`) with `BoundOps`, which carry per slot a bound
on |value| (triangle inequality over the input range, so valid for every input, not just the
calibration set) and the error as two parts:

* a Gaussian part: the standard deviation of each operation's fresh noise (`scales.noise_model`:
  SEAL's special-prime key switching, rescale rounding by the secret) propagated linearly,
  different operations' noises adding in quadrature (they are sums of many independent
  rounding and error terms: the usual canonical-embedding heuristic for CKKS noise, checked
  against SEAL in `tests/security/test_repeated_query.py`). The rounding terms that meet the
  secret (r1 s, r2 s^2) are not fresh per slot: for one key slot j carries the fixed factor
  |s(zeta_j)|^2 or |s(zeta_j)|^4, heavy-tailed across slots (measured: the worst of 4096
  slots ~20 mean-key standard deviations). So the bound takes the worst slot of any honestly
  drawn key (`scales.secret_embedding_bound`, a Hoeffding bound failing with probability
  2^-TAIL_BITS), not the simulator's mean-key numbers;
* a bounded part: the products of two errors in a multiplication, bounded worst-case from
  the tail bound of each factor.

A slot's error (real and imaginary parts alike) is then at most Z * std + bounded, where Z is
the Gaussian tail for probability 2^-TAIL_BITS after a union over every slot part of the
response; with the key bound's own 2^-TAIL_BITS, the bound fails with probability at most
2^-(TAIL_BITS-1), which is folded into the statistical distance the manifest states. It is a
bound for keys drawn as SEAL draws them: a client who crafts a secret with a large canonical
embedding amplifies the rounding terms beyond it (SECURITY.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from heinfer.plans.network.scales import noise_model, secret_embedding_bound
from heinfer.plans.network.schedule import (
    Vector,
    batch_blocks,
    batch_schedule,
    run_batch,
    run_single,
    single_schedule,
)

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "TAIL_BITS",
    "BoundOps",
    "BoundValue",
    "ErrorBound",
    "error_bound",
    "measured_error",
    "tail_factor",
]

# Each slot part's error exceeds its bound with probability at most 2^-TAIL_BITS in all.
TAIL_BITS = 64


def tail_factor(parts: int, bits: int = TAIL_BITS) -> float:
    """Z with parts * P(|N(0,1)| > Z) <= 2^-bits (P(|N| > z) <= exp(-z^2/2))."""
    return math.sqrt(2.0 * (bits * math.log(2.0) + math.log(parts)))


@dataclass
class BoundValue:
    """Per slot (or per batched value): |value| bound, error std, bounded error; scale, level,
    size (3: a product not relinearized yet)."""

    mag: np.ndarray
    std: np.ndarray
    det: np.ndarray
    scale: float
    level: int
    size: int = 2


class BoundOps:
    """`schedule.Ops` on `BoundValue`s (module docstring)."""

    def __init__(self, params: Any, z: float, secret_sq: float | None = None) -> None:
        self.primes = [int(p) for p in params.data_primes]
        n = params.poly_modulus_degree
        if secret_sq is None:
            secret_sq = secret_embedding_bound(n, TAIL_BITS)
        self.noise = noise_model(params, secret_sq)
        self.z = z

    def _enc(self, scale: float) -> float:
        """Largest slot perturbation SEAL's encoding rounding gives a vector (magnitudes only:
        f~ is defined with the encoded vector, so this is no error)."""
        return self.z * self.noise["enc"] / scale

    def fresh(self, mag: np.ndarray, scale: float, level: int) -> BoundValue:
        zero = np.zeros_like(mag, dtype=np.float64)
        return BoundValue(np.abs(mag).astype(np.float64), zero, zero.copy(), scale, level)

    def rotate(self, v: BoundValue, step: int) -> BoundValue:
        roll = (lambda a: np.roll(a, -step)) if v.mag.ndim else (lambda a: a)
        std = np.hypot(roll(v.std), self.noise["ks"] / v.scale)
        return BoundValue(roll(v.mag), std, roll(v.det), v.scale, v.level, v.size)

    def multiply_vector(self, v: BoundValue, w: Vector) -> BoundValue:
        wm = np.abs(w.values) + self._enc(w.scale)
        return BoundValue(v.mag * wm, v.std * wm, v.det * wm, v.scale * w.scale, v.level, v.size)

    def add_vector(self, v: BoundValue, w: Vector) -> BoundValue:
        mag = v.mag + np.abs(w.values) + self._enc(w.scale)
        return BoundValue(mag, v.std, v.det, v.scale, v.level, v.size)

    def multiply_scalar(self, v: BoundValue, w: float, scale: float) -> BoundValue:
        q = abs(round(w * scale) / scale)
        return BoundValue(v.mag * q, v.std * q, v.det * q, v.scale * scale, v.level, v.size)

    def add_scalar(self, v: BoundValue, value: float) -> BoundValue:
        q = abs(round(value * v.scale) / v.scale)
        return BoundValue(v.mag + q, v.std, v.det, v.scale, v.level, v.size)

    def add(self, a: BoundValue, b: BoundValue) -> BoundValue:
        return BoundValue(
            a.mag + b.mag,
            np.hypot(a.std, b.std),
            a.det + b.det,
            a.scale,
            a.level,
            max(a.size, b.size),
        )

    def add_inplace(self, a: BoundValue, b: BoundValue) -> None:
        a.mag, a.std, a.det = a.mag + b.mag, np.hypot(a.std, b.std), a.det + b.det
        a.size = max(a.size, b.size)

    def multiply(self, a: BoundValue, b: BoundValue) -> BoundValue:
        """(x + e)(y + f) - xy = x f + y e + e f; the two factors of an activation share their
        error, so their linear terms add up, not in quadrature."""
        std = a.mag * b.std + b.mag * a.std
        det = a.mag * b.det + b.mag * a.det + (self.z * a.std + a.det) * (self.z * b.std + b.det)
        return BoundValue(a.mag * b.mag, std, det, a.scale * b.scale, a.level, 3)

    def relinearize(self, v: BoundValue) -> None:
        if v.size > 2:
            v.std = np.hypot(v.std, self.noise["ks"] / v.scale)
            v.size = 2

    def rescale(self, v: BoundValue) -> None:
        key = "rs3" if v.size > 2 else "rs"
        v.scale /= self.primes[v.level - 1]
        v.level -= 1
        v.std = np.hypot(v.std, self.noise[key] / v.scale)

    def drop_to(self, v: BoundValue, primes: int) -> None:
        v.level = min(v.level, primes)

    def zero(self, scale: float, level: int) -> BoundValue:
        """The server's public-key encryption of 0 (for units no weight reaches)."""
        std = np.full((), self.noise["pk"] / scale)
        return BoundValue(np.zeros(()), std, np.zeros(()), scale, level)

    def level(self, v: BoundValue) -> int:
        return v.level


@dataclass(frozen=True)
class ErrorBound:
    """Per response ciphertext: the largest slot-part bound, and the l2 norm bound over all
    slot parts (both in score units)."""

    max_abs: float
    l2: float


def _l2(std: np.ndarray, det: np.ndarray) -> float:
    """sqrt(sum of squares) over both parts of every slot, with probability 2^-TAIL_BITS:
    Laurent-Massart for the weighted chi-square of the Gaussian parts, plus the bounded parts."""
    a = np.concatenate([std.ravel() ** 2] * 2)
    x = TAIL_BITS * math.log(2.0)
    gauss = math.sqrt(a.sum() + 2.0 * math.sqrt(float((a * a).sum()) * x) + 2.0 * a.max() * x)
    return gauss + math.sqrt(2.0) * float(np.linalg.norm(det))


def error_bound(
    params: Any,
    arrays: Mapping[str, np.ndarray],
    sc: dict[str, Any],
    n_act: int,
    n_features: int,
    input_range: tuple[float, float],
    layout: str,
    secret_sq: float | None = None,
) -> ErrorBound:
    """The bound of the module docstring for one layout's response ciphertext. `secret_sq`
    replaces the worst-slot bound on |s(zeta)|^2 (`scales.noise_model`); the mean over keys
    (pass 2n/3) gives the earlier, unsound bound, kept for the tests' negative control."""
    S = params.slots
    z = tail_factor(2 * S)
    ops = BoundOps(params, z, secret_sq)
    top = int(sc["top"])
    peak = max(abs(float(input_range[0])), abs(float(input_range[1])))
    if layout == "single":
        schedule, _ = single_schedule(
            arrays, sc, n_act, S, lambda values, _s, _l: (None, not np.any(values))
        )
        mag = np.zeros(S)
        for c in range(schedule.copies):
            mag[c * n_features : (c + 1) * n_features] = peak
        out = run_single(schedule, ops.fresh(mag, schedule.input_scale, top), ops)
        std, det = out.std, out.det
    else:
        blocks = batch_blocks(arrays, n_act, n_features)
        batch = batch_schedule(blocks, sc, n_act)
        xs = [ops.fresh(np.full((), peak), batch.input_scale, top) for _ in range(n_features)]
        outs = run_batch(batch, xs, ops)
        std = np.stack([np.broadcast_to(o.std, ()) for o in outs])
        det = np.stack([np.broadcast_to(o.det, ()) for o in outs])
        # every slot of a score ciphertext carries its own input: S slots each
        std, det = np.repeat(std, S), np.repeat(det, S)
    per_slot = z * std + det
    return ErrorBound(float(per_slot.max()), _l2(std, det))


def measured_error(plan: Any, client: Any, keys: Any, X: np.ndarray, layout: str) -> np.ndarray:
    """The quantity `error_bound` bounds, measured with the secret key: every slot part of the
    pre-flood result of each input (single: one request per row of X, all slots; batch: one
    request with row i in slot i, as many rows as slots) minus the served model exactly
    (`simulate.ExactOps`: SEAL's encodings of the weights, on the client's decrypted input).

    `client` holds the secret key (`codec.client_keys(secret)`), `keys` the server's parsed
    keys. This is what averaging repeated answers converges to beyond f~(x~); the tests and
    bench/cnn.py compare it with the bound and with the flood."""
    from heinfer.plans.network.simulate import ExactOps

    ctx = plan.ctx
    top = ctx.top_count
    errors = []
    if layout == "single":
        schedule, plains = plan.single_schedule()
        ops = plan.seal_ops(keys, plains)
        exact = ExactOps(ctx.params, decoded=[ctx.decode_complex(p) for p in plains])
        stride = int(plan.network["input"]["layout"]["stride"])
        for x in X:
            v = np.zeros(ctx.slots)
            for c in range(schedule.copies):
                v[c * stride : c * stride + len(x)] = x
            ct = ctx.load_ciphertext(client.encrypt(v, schedule.input_scale))
            seen = exact.fresh(client.decrypt_complex(ct), schedule.input_scale, top)
            reference = run_single(schedule, seen, exact).values
            errors.append(client.decrypt_complex(run_single(schedule, ct, ops)) - reference)
    else:
        batch = plan.batch_schedule()
        exact = ExactOps(ctx.params, width=ctx.slots)
        columns = np.zeros((X.shape[1], ctx.slots))
        columns[:, : len(X)] = X.T
        cts = [ctx.load_ciphertext(client.encrypt(c, batch.input_scale)) for c in columns]
        inputs = [exact.fresh(client.decrypt_complex(ct), batch.input_scale, top) for ct in cts]
        references = run_batch(batch, inputs, exact)
        outs = run_batch(batch, cts, plan.seal_ops(keys))
        del cts
        for out, served in zip(outs, references, strict=True):
            errors.append(client.decrypt_complex(out) - served.values)
    e = np.stack(errors)
    return np.concatenate([e.real.ravel(), e.imag.ravel()])
