"""The network's public description: the plan manifest (the dict clients have always read under
`layout.plan_manifest`) and the common `heinfer.plans.manifest.Manifest` that wraps it.

The plan manifest's JSON is what it was before the package split (existing clients and the
browser client read it); the wrapper holds the fields every family shares.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from heinfer.plans.manifest import (
    InputSpec,
    KeysSpec,
    Manifest,
    OutputSpec,
    PrecisionSpec,
    PrivacySpec,
    extraction_spec,
)
from heinfer.plans.network.frames import (
    BATCH_REQUEST_MAGIC,
    BATCH_RESPONSE_MAGIC,
    MAX_IMAGES_PER_REQUEST,
)
from heinfer.plans.network.scales import (
    MASK_RANGE,
    OUTPUT_PRIMES,
    flood_sigma,
    galois_steps,
    noise_model,
    plan_scales,
)
from heinfer.plans.network.schedule import batch_blocks, batch_schedule, quantize

__all__ = [
    "BATCH_LAYOUT",
    "FAMILY",
    "FORMAT_VERSION",
    "SINGLE_LAYOUT",
    "SUPPORTED_FORMAT_VERSIONS",
    "build_plan_manifest",
    "common_manifest",
    "default_flood_std",
    "flood_widths",
    "has_batch",
    "layout_error_bound",
    "plan_manifest",
    "repeated_query_bits",
]

FAMILY = "ckks-network"  # the common manifest's layout.kind
SINGLE_LAYOUT = "ckks-network"
BATCH_LAYOUT = "ckks-network-batch"
# 2: the plan also holds the batched layout's sparse block matrices (`bt*` arrays). Version 1
# models (single-image layout only) still load and serve single images.
FORMAT_VERSION = 2
SUPPORTED_FORMAT_VERSIONS = (1, 2)


def plan_manifest(manifest: Manifest) -> dict[str, Any]:
    """The network dict inside a common manifest."""
    return dict(manifest.layout["plan_manifest"])


def has_batch(manifest: Manifest) -> bool:
    """Whether a model offers the batched layout (every model compiled with format 2)."""
    return "batch" in manifest.layout.get("plan_manifest", {})


def repeated_query_bits(manifest: Manifest) -> dict[str, float]:
    """Per layout of a network model, the statistical security s its flooding reaches against
    the repeated-query attack (averaging resolves the weight-dependent error after about
    2^(2s) repeats, each one evaluated sample); empty for other families and for models whose
    manifest states none."""
    network = manifest.layout.get("plan_manifest")
    if manifest.layout.get("kind") != FAMILY or not isinstance(network, dict):
        return {}
    found = {}
    for kind, section in ((SINGLE_LAYOUT, network), (BATCH_LAYOUT, network.get("batch", {}))):
        bits = section.get("privacy", {}).get("statistical_security_bits")
        if bits is not None:
            found[kind] = float(bits)
    return found


def _has_batch_arrays(arrays: Mapping[str, np.ndarray]) -> bool:
    return "bt0_ptr" in arrays


def build_plan_manifest(
    name: str,
    params: Any,
    arrays: Mapping[str, np.ndarray],
    n_act: int,
    n_features: int,
    input_range: tuple[float, float],
) -> dict[str, Any]:
    S = params.slots
    log_df = float(arrays["scales"][0])
    log_input = round(math.log2(plan_scales([int(p) for p in params.primes], n_act, arrays)["d0"]))
    flood_std = flood_widths(params, arrays)
    privacy = _privacy(params, arrays, n_act, n_features, input_range, "single", flood_std[0])
    slot_std = flood_std[0]
    n_out = int(arrays[f"h{n_act - 1}_meta"][1])
    copies = int(arrays["first_meta"][1])
    manifest: dict[str, Any] = {
        "format": "heinfer-network",
        "format_version": FORMAT_VERSION if _has_batch_arrays(arrays) else 1,
        "name": name,
        "kind": "network",
        "input": {
            "shape": [n_features],
            "range": [float(input_range[0]), float(input_range[1])],
            "encoding": "ckks-real",
            "layout": {"type": "copies", "copies": copies, "stride": n_features, "slots": S},
            "scale_log2": log_input,
            "level": "top",
            "encryption": "seeded-symmetric",
            "images_per_ciphertext": 1,
            "max_images_per_request": MAX_IMAGES_PER_REQUEST,
        },
        "output": {
            "shape": [n_out],
            "slots": list(range(n_out)),
            "take": "real",
            "level_primes": OUTPUT_PRIMES,
            "scale_log2": log_df,
        },
        "scheme": "ckks",
        "params": params.to_dict(),
        "scale_log2": {"input": log_input, "output": log_df},
        "keys": {
            "public": True,
            "relin": True,
            "galois_steps": galois_steps(dict(arrays), n_act, S),
        },
        "precision": {
            "score_abs_error": float(10 * slot_std + 0.02),
            "flood_noise_std": float(slot_std),
        },
        "privacy": {
            **privacy,
            "rerandomized": True,
            "masked_slots": (
                f"real parts of all but output.slots, imaginary parts of all slots "
                f"(uniform in +-{MASK_RANGE:g})"
            ),
            "not_covered": NOT_COVERED,
        },
        "activations": n_act,
    }
    if _has_batch_arrays(arrays):
        manifest["batch"] = _batch_manifest(params, arrays, n_act, n_features, flood_std[1])
        manifest["batch"]["privacy"] = _privacy(
            params, arrays, n_act, n_features, input_range, "batch", flood_std[1]
        )
    return manifest


NOT_COVERED = (
    "nothing of the evaluation error beyond the stated statistical distance; the served model "
    "is the network with its weights as SEAL encodes them"
)


def default_flood_std(params: Any, log_df: float) -> float:
    """The flooding width (score units, per slot part) of models compiled without a security
    target: the width of earlier releases, sized for precision, not for a stated security."""
    n = params.poly_modulus_degree
    return flood_sigma(n)[1] * math.sqrt(n / 2) / 2.0**log_df


def flood_widths(params: Any, arrays: Mapping[str, np.ndarray]) -> tuple[float, float]:
    """(single, batched) flooding standard deviations per slot part, in score units: the
    compiler's choice (`flood_std` array), or the default width."""
    if "flood_std" in arrays:
        single, batch = (float(v) for v in np.asarray(arrays["flood_std"]).reshape(2))
        return single, batch
    default = default_flood_std(params, float(arrays["scales"][0]))
    return default, default


def layout_error_bound(
    params: Any,
    arrays: Mapping[str, np.ndarray],
    n_act: int,
    n_features: int,
    input_range: tuple[float, float],
    layout: str,
) -> Any:
    """`bound.error_bound` of one layout's response (score units)."""
    from heinfer.plans.network.bound import error_bound

    sc = plan_scales([int(p) for p in params.primes], n_act, arrays)
    return error_bound(params, arrays, sc, n_act, n_features, input_range, layout)


def _privacy(
    params: Any,
    arrays: Mapping[str, np.ndarray],
    n_act: int,
    n_features: int,
    input_range: tuple[float, float],
    layout: str,
    flood_std: float,
) -> dict[str, Any]:
    """What the flooding reaches, computed (bound.py): s = log2(flood std / error bound) per
    slot part, so averaging k repeats resolves the error only when k ~ 2^(2s) (the service
    compares that with its sample budget, `server.budget.repeated_query_lines`); the statistical
    distance per slot part is at most 2^-s / sqrt(2 pi) + 2^-(TAIL_BITS-1) (the bound and the
    key bound it relies on each fail with probability 2^-TAIL_BITS), and over a whole
    response (Pinsker over every slot part) 2^-s_response."""
    from heinfer.plans.network.bound import TAIL_BITS

    bound = layout_error_bound(params, arrays, n_act, n_features, input_range, layout)
    return {
        "statistical_security_bits": round(math.log2(flood_std / bound.max_abs), 2),
        "response_statistical_security_bits": round(math.log2(2 * flood_std / bound.l2), 2),
        "evaluation_error_bound": bound.max_abs,
        "evaluation_error_l2_bound": bound.l2,
        "flood_noise_std": flood_std,
        "tail_probability_log2": -(TAIL_BITS - 1),
    }


def _batch_precision(
    params: Any, blocks: list[Any], sc: dict[str, Any], n_act: int, flood_std: float
) -> dict[str, float]:
    """Score error of the batched layout: Gaussian noise of every operation propagated through
    the blocks (|u| <= 4 after normalisation, so x(x+c) amplifies noise by at most 8+|c|; one
    unrelinearized rescale counted per unit, though groups share one), plus a worst-case bound
    on the scalar-weight rounding, plus the flooding noise."""
    noise = noise_model(params)
    dim = blocks[0].in_dim
    std = np.full(dim, math.hypot(noise["fresh"], noise["enc"]) / sc["d0"])
    rnd = np.zeros(dim)
    vmax = np.ones(dim)
    wscales = [sc["w0"], *sc["w"][:n_act]]
    std_u = rnd_u = np.zeros(1)
    for k, (blk, wscale) in enumerate(zip(blocks, wscales, strict=True)):
        M = blk.dense()
        std_u = np.sqrt((M * M) @ (std * std))
        rnd_u = np.abs(M) @ rnd + np.abs(quantize(M, wscale) - M) @ vmax
        if k == n_act:
            break
        prod_scale = sc["d0"] * sc["w0"] if k == 0 else sc["stage_in"][k - 1] * wscale
        gain = 8.0 + np.abs(blk.c)
        if sc["relinearize_groups"]:  # key switching at the product's scale, then a rescale
            q = float(params.data_primes[sc["top"] - 1 - k])
            rescale = math.hypot(noise["rs"], noise["ks"] / q)
        else:
            rescale = noise["rs3"]
        std = np.hypot(gain * std_u, rescale / sc["stage_in"][k])
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
    params: Any, arrays: Mapping[str, np.ndarray], n_act: int, n_features: int, flood_std: float
) -> dict[str, Any]:
    blocks = batch_blocks(arrays, n_act, n_features)
    n_out = blocks[-1].rows
    sc = plan_scales([int(p) for p in params.primes], n_act, arrays)
    schedule = batch_schedule(blocks, sc, n_act)
    groups = [block.groups for block in schedule.blocks]
    return {
        "layout": BATCH_LAYOUT,
        "packing": "slot i = image i; one ciphertext per input pixel; unused slots zero",
        "max_images": params.slots,
        "ciphertexts": n_features,
        "request_magic": BATCH_REQUEST_MAGIC.decode(),
        "response_magic": BATCH_RESPONSE_MAGIC.decode(),
        "input": {
            "scale_log2": round(math.log2(sc["d0"])),
            "level": "top",
            "encryption": "seeded-symmetric",
        },
        "output": {
            "ciphertexts": n_out,
            "take": "real",
            "level_primes": OUTPUT_PRIMES,
            "scale_log2": float(arrays["scales"][0]),
            "masked_slots": f"slots >= images (uniform in +-{MASK_RANGE:g})",
        },
        "keys": {"public": True, "relin": True, "galois_steps": []},
        "precision": _batch_precision(params, blocks, sc, n_act, flood_std),
        "work": {
            "plain_multiplications": sum(map(len, schedule.gather))
            + sum(len(t) for block_groups in groups for _m, t in block_groups),
            "ciphertext_multiplications": sum(
                len(m) for block_groups in groups for m, _t in block_groups
            ),
            "rescales": sum(map(len, groups)) + n_out,
            "relinearizations": (
                sum(map(len, groups)) if schedule.relinearize_groups
                else sum(b.rows for b in blocks[1:])
            ),
        },
    }


def _stated_bits(network: dict[str, Any]) -> int:
    """The common manifest's integer: the weakest layout, rounded down, never below 0."""
    bits = [float(network["privacy"]["statistical_security_bits"])]
    if "privacy" in network.get("batch", {}):
        bits.append(float(network["batch"]["privacy"]["statistical_security_bits"]))
    return max(0, math.floor(min(bits)))


def common_manifest(
    network: dict[str, Any], estimator: str, parameters: int | None = None
) -> Manifest:
    """The plan manifest wrapped in the common shape every client reads; `parameters` (the
    network's weights and biases) states its extraction cost (None: a model compiled before)."""
    precision = network["precision"]
    privacy = network["privacy"]
    return Manifest(
        name=network["name"],
        task="classification",
        estimator=estimator,
        input=InputSpec(
            shape=list(network["input"]["shape"]),
            low=float(network["input"]["range"][0]),
            high=float(network["input"]["range"][1]),
            bits=None,
            encoding="CKKS slots: the image repeated as the layout says, one ciphertext each",
        ),
        output=OutputSpec(
            shape=list(network["output"]["shape"]),
            classes=list(range(int(network["output"]["shape"][0]))),
        ),
        scheme={"scheme": "ckks", **network["params"]},
        layout={"kind": FAMILY, "plan_manifest": network},
        keys=KeysSpec(**network["keys"]),
        precision=PrecisionSpec(
            max_abs_error=float(precision["score_abs_error"]),
            expected_abs_error=float(precision["score_abs_error"]),
            noise_abs_error=float(10 * precision["flood_noise_std"]),
        ),
        privacy=PrivacySpec(
            rerandomized=bool(privacy["rerandomized"]),
            masked=True,
            flooding_statistical_bits=_stated_bits(network),
            notes=f"masked: {privacy['masked_slots']}; not covered: {privacy['not_covered']}",
            extraction=None if parameters is None else extraction_spec(
                parameters, int(network["output"]["shape"][0]), linear=False
            ),
        ),
        max_batch=int(network["input"]["max_images_per_request"]),
    )
