"""Sizes and server time of linear heads over features x classes, per layout, with peers.

    PYTHONPATH=src python bench/sizes.py [--quick] [--peers] [--samples N] [--out sizes.json]

For every (features, classes) in {128, 784, 2048, 8192} x {2, 10, 100, 1000} (`--quick`: a
subset): a random linear head, compiled with each linear layout forced (coeff-rowpack,
coeff-packed) and with the cost model's pick; measured per single-sample request: server time
(median over `--samples` requests, keys loaded once), key, request and response bytes, and the
argmax agreement with plaintext. `--peers` adds TenSEAL (bench/peers.py, CKKS `mm`) in the same
run where it is affordable. Writes JSON and, with matplotlib, a plot next to it. On a shared
2-core machine times are noisy: compare columns of one run, not runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from heinfer.plans.base import codec_for
from heinfer.plans.linear import compile_linear

FEATURES = (128, 784, 2048, 8192)
CLASSES = (2, 10, 100, 1000)
QUICK = ((784, 10), (768, 1000), (2048, 100))


def measure(n_features: int, n_classes: int, layout: str | None, samples: int) -> dict[str, Any]:
    rng = np.random.default_rng(n_features * 7 + n_classes)
    coef = rng.normal(0, 1 / np.sqrt(n_features), (n_classes, n_features))
    intercept = rng.normal(0, 0.1, n_classes)
    started = time.perf_counter()
    plan = compile_linear(
        coef,
        intercept,
        name="sizes",
        task="classification",
        estimator="bench",
        classes=None,
        input_range=(0.0, 1.0),
        input_bits=10,
        layout=layout,
    )
    compile_s = time.perf_counter() - started
    picked = plan.manifest.layout["choice"]["picked"]
    codec = codec_for(plan.manifest)
    secret = codec.keygen()
    upload = codec.key_upload(secret, [picked])
    keys = plan.load_keys(upload)
    plan.warm_up()
    X = rng.uniform(0, 1, (samples, n_features))
    reference = plan.predict_plain(X)
    times, agree, request, response = [], 0, 0, 0
    for i in range(samples):
        body = codec.encrypt(secret, X[i : i + 1], picked)
        begin = time.perf_counter()
        answer = plan.evaluate(body, keys)
        times.append(time.perf_counter() - begin)
        scores = codec.decrypt(secret, answer)
        agree += int(scores[0].argmax() == reference[i].argmax())
        request, response = len(body), len(answer)
    return {
        "system": "heinfer",
        "features": n_features,
        "classes": n_classes,
        "layout": picked,
        "forced": layout is not None,
        "N": plan.params.poly_modulus_degree,
        "key_bytes": len(upload),
        "request_bytes": request,
        "response_bytes": response,
        "server_ms_median": 1000 * float(np.median(times)),
        "server_ms_min": 1000 * float(np.min(times)),
        "agreement": f"{agree}/{samples}",
        "compile_s": compile_s,
        "estimate": plan.manifest.layout["choice"]["options"][picked],
    }


def peer_rows(n_features: int, n_classes: int) -> list[dict[str, Any]]:
    sys.path.insert(0, str(Path(__file__).parent))
    import peers  # bench/peers.py

    rng = np.random.default_rng(0)
    W = rng.normal(0, 1 / np.sqrt(n_features), (n_classes, n_features))
    b = np.zeros(n_classes)
    X = rng.uniform(0, 1, (3, n_features))
    row = peers.run_peer("TenSEAL CKKS mm", peers.measure_tenseal_mm, W, b, X, n=2)
    return [{"features": n_features, "classes": n_classes, **row}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--peers", action="store_true")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("sizes.json"))
    args = parser.parse_args()
    grid = QUICK if args.quick else [(f, c) for f in FEATURES for c in CLASSES]
    rows: list[dict[str, Any]] = []
    for n_features, n_classes in grid:
        for layout in ("coeff-rowpack", "coeff-packed"):
            if layout == "coeff-packed" and n_features * n_classes <= 4096:
                continue
            try:
                row = measure(n_features, n_classes, layout, args.samples)
            except Exception as exc:
                row = {
                    "features": n_features,
                    "classes": n_classes,
                    "layout": layout,
                    "error": str(exc),
                }
            rows.append(row)
            print(json.dumps(row), flush=True)
        if args.peers and n_features <= 1024 and n_classes <= 10:
            for row in peer_rows(n_features, n_classes):
                rows.append(row)
                print(json.dumps(row, default=str), flush=True)
    args.out.write_text(json.dumps(rows, indent=1, default=str))
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for layout in ("coeff-rowpack", "coeff-packed"):
        pts = [r for r in rows if r.get("layout") == layout and "response_bytes" in r]
        ax.scatter(
            [r["features"] * r["classes"] for r in pts],
            [r["response_bytes"] for r in pts],
            label=layout,
        )
    ax.set(xscale="log", yscale="log", xlabel="features x classes", ylabel="response bytes")
    ax.legend()
    fig.savefig(args.out.with_suffix(".png"), dpi=120, bbox_inches="tight")


if __name__ == "__main__":
    main()
