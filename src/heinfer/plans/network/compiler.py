"""Compile a `NetworkSpec` into a `NetworkPlan`: parameters from the depth, value bounds and
normalisation, the single-image placement and diagonals, the batched layout's sparse blocks.

Network shape: linear blocks (any mix of Conv2d / AvgPool2d / Flatten / Linear, composed into
one affine map each) separated by degree-2 activations (Square, PolyAct a*x^2+b*x), at most two
activations; each costs one ciphertext-ciphertext multiplication and one rescale. The arrays
made here are what `schedule.py` turns into the evaluation schedule of each layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from heinfer.errors import UnsupportedModelError
from heinfer.plans.network.manifest import build_plan_manifest, common_manifest
from heinfer.plans.network.plan import NetworkPlan
from heinfer.plans.network.scales import (
    ACT_PRIME_BITS,
    CLEAN_PRIME_BITS,
    FINAL_PRIME_BITS,
    LOG_FINAL_SCALE,
    SPECIAL_PRIME_BITS,
    fold_steps,
    schedule_options,
)
from heinfer.plans.network.spec import NetworkSpec, as_batch

__all__ = ["compile_network"]


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


def _place_first(M: np.ndarray, slots: int) -> tuple[int, np.ndarray] | None:
    """Translation-structured placement: output o at copy(o)*n + anchor(o) (n inputs)."""
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
    spec: NetworkSpec,
    name: str,
    calibration: np.ndarray | None = None,
    *,
    estimator: str = "network",
    input_range: tuple[float, float] = (0.0, 1.0),
    statistical_security_bits: float | None = None,
) -> NetworkPlan:
    """Compile a NetworkSpec into a server-side NetworkPlan (parameters chosen from depth).

    `calibration` (optional (n, n_features) inputs) tightens the value bounds used to normalise
    the layers; without it worst-case interval bounds over inputs in `input_range` are used.
    `estimator` names the model's origin in the manifest (e.g. "torch.Sequential").
    `statistical_security_bits` (s): size each layout's flooding to 2^s times the bound on the
    weight-dependent evaluation error (`bound.py`); refused when that flood would swamp the
    scores. Without it the default width is used and the manifest states the s it reaches.
    """
    from heinfer.he.ckks import select_parameters

    n_features = spec.n_features
    low, high = float(input_range[0]), float(input_range[1])
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise UnsupportedModelError(
            f"input range must be finite with low < high, not {input_range}"
        )
    blocks, acts = spec.affine_blocks()
    n_act = len(acts)
    if n_act == 0:
        raise UnsupportedModelError("network has no activation: serve it as a linear model")
    act_bits = list(reversed(ACT_PRIME_BITS[:n_act]))
    bits = [*FINAL_PRIME_BITS, CLEAN_PRIME_BITS, *act_bits, SPECIAL_PRIME_BITS]
    params = select_parameters(bits)
    S = params.slots
    if n_features > S:
        raise UnsupportedModelError(
            f"{n_features} inputs do not fit the {S} slots of one ciphertext"
        )

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

    lo, hi = np.full(n_features, low), np.full(n_features, high)
    alphas = []
    calib = as_batch(calibration, n_features) if calibration is not None else None
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
        nz_shifts = (_first_shifts(M0, placed[1], n_features) % S)[M0 != 0]
        if len(np.unique(nz_shifts)) > 256:
            placed = None
    if placed is None:
        if M0.shape[0] > S:
            raise UnsupportedModelError(f"first layer has {M0.shape[0]} outputs > {S} slots")
        copies, out_slots = 1, np.arange(M0.shape[0])
    else:
        copies, out_slots = placed
    shifts_full = _first_shifts(M0, out_slots, n_features) % S
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
        hybrids.append(_Hybrid(R, m, diag, used, B, fold_steps(R, S)))
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
        "schedule": schedule_options(n_act, len(T)),
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
    if statistical_security_bits is not None:
        arrays["flood_std"] = _flood_for(
            params, arrays, n_act, n_features, (low, high), float(statistical_security_bits)
        )
    network = build_plan_manifest(name, params, arrays, n_act, n_features, (low, high))
    return NetworkPlan(common_manifest(network, estimator, spec.parameter_count), arrays, spec)


def _flood_for(
    params: object,
    arrays: dict[str, np.ndarray],
    n_act: int,
    n_features: int,
    input_range: tuple[float, float],
    bits: float,
) -> np.ndarray:
    """Flooding std per layout (score units) 2^bits above its error bound, or refuse: a flood
    wider than a tenth of the largest score leaves no score worth serving."""
    from heinfer.plans.network.manifest import layout_error_bound

    out_bound = float(arrays["scales"][1])
    widths = []
    for layout in ("single", "batch"):
        bound = layout_error_bound(params, arrays, n_act, n_features, input_range, layout)
        std = 2.0**bits * bound.max_abs
        if std > out_bound / 10:
            reach = math.log2(out_bound / 10 / bound.max_abs)
            raise UnsupportedModelError(
                f"{bits:g} bits of statistical security need a flooding std of {std:.3g} in the "
                f"{layout} layout (evaluation error bound {bound.max_abs:.3g}), more than a tenth "
                f"of the scores' bound {out_bound:.3g}; this model reaches {reach:.1f} bits at "
                "most with these parameters"
            )
        widths.append(std)
    return np.array(widths)


def _first_shifts(M: np.ndarray, out_slots: np.ndarray, dim: int) -> np.ndarray:
    """Shift t[o, j] = slot of pixel j in the copy of output o  -  slot of output o."""
    base = (out_slots // dim) * dim
    return base[:, None] + np.arange(dim)[None, :] - out_slots[:, None]


def _csr(M: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows, cols = np.nonzero(M)
    ptr = np.zeros(M.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=M.shape[0]), out=ptr[1:])
    return ptr, cols.astype(np.int64), M[rows, cols].astype(np.float64)
