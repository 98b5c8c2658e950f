"""Sizes and server time of linear heads over features x classes, heinfer's layouts and peers.

    PYTHONPATH=src python bench/sizes.py [--quick] [--samples N] [--no-peers] [--out F.json]
    PYTHONPATH=src python bench/sizes.py --acceptance   # 768 x 1,000, 200 samples

For every (features, classes) in {128, 784, 2048, 8192} x {2, 10, 100, 1000} (`--quick`: 784 x
10, 768 x 1,000, 2048 x 100): a random logistic-regression head (weights N(0, 1/features),
inputs uniform on [0, 1]) compiled with `heinfer.compile(head, X=calibration)`, so the
compiler picks the input bits (plans/linear/precision.py) and the layout (its cost model);
the other linear layout is measured too, forced, on fewer samples. Per single-sample request:
server time (`plan.evaluate` on the request bytes, keys parsed once; wall median and min, and
the process's CPU time, steadier when other jobs share the cores), key,
request and response bytes, and agreement of the decrypted class with the float head's
`predict`. In the same run and on the same inputs, where affordable (`--peer-max-product`
on features x classes): TenSEAL the tutorial way (`enc_x.mm(W.T) + b`, bench/peers.py) and
Zama's concrete-ml-extensions on the CPU (bench/peers.py). Writes JSON rows and a plot
(matplotlib) next to it and, with `--plot`, to more paths. Times on a shared 2-core machine
are noisy: the run records the load average before and after each row; compare within a run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

# One BLAS/OpenMP thread, as the service's workers run (`server/workers.py`): otherwise idle
# cores let BLAS threads spin and the wall time is not a worker's.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

FEATURES = (128, 784, 2048, 8192)
CLASSES = (2, 10, 100, 1000)
QUICK = ((784, 10), (768, 1000), (2048, 100))
LAYOUTS = ("coeff-rowpack", "coeff-packed")


def _load() -> str:
    return Path("/proc/loadavg").read_text().split()[0] if os.path.exists("/proc/loadavg") else "?"


def head(n_features: int, n_classes: int) -> Any:
    """A fitted-looking LogisticRegression with random weights (binary: one output)."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(n_features * 7 + n_classes)
    outputs = 1 if n_classes == 2 else n_classes
    model = LogisticRegression()
    model.coef_ = rng.normal(0, 1 / np.sqrt(n_features), (outputs, n_features))
    model.intercept_ = rng.normal(0, 0.1, outputs)
    model.classes_ = np.arange(n_classes)
    return model


def inputs(n_features: int, count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (count, n_features))


def _classes(scores: np.ndarray) -> np.ndarray:
    return (scores[:, 0] > 0).astype(int) if scores.shape[1] == 1 else scores.argmax(axis=1)


def measure(
    n_features: int, n_classes: int, layout: str | None, samples: int, X: np.ndarray
) -> dict[str, Any]:
    """One heinfer row: `layout` None is the cost model's pick."""
    import heinfer
    from heinfer.plans.base import codec_for
    from heinfer.plans.linear import LinearPlan

    load_before = _load()
    model = head(n_features, n_classes)
    started = time.perf_counter()
    compiled = heinfer.compile(
        model,
        name="sizes",
        X=inputs(n_features, 256, seed=1),
        input_range=(0.0, 1.0),
        layout=layout,
    )
    compile_s = time.perf_counter() - started
    plan = compiled.plan
    assert isinstance(plan, LinearPlan)
    manifest = plan.manifest
    picked = manifest.layout["choice"]["picked"]
    codec = codec_for(manifest)
    secret = codec.keygen()
    upload = codec.key_upload(secret, [picked])
    keys = plan.load_keys(upload)
    plan.warm_up()
    times, cpu, decided, request, response = [], [], [], 0, 0
    for i in range(samples):
        body = codec.encrypt(secret, X[i : i + 1], picked)
        begin, begin_cpu = time.perf_counter(), time.process_time()
        answer = plan.evaluate(body, keys)
        times.append(time.perf_counter() - begin)
        cpu.append(time.process_time() - begin_cpu)
        decided.append(_classes(codec.decrypt(secret, answer))[0])
        request, response = len(body), len(answer)
    agree = int(np.sum(np.array(decided) == model.predict(X[:samples])))
    packed = manifest.layout.get("packed", {})
    return {
        "system": "heinfer",
        "features": n_features,
        "classes": n_classes,
        "layout": picked,
        "forced": layout is not None,
        "N": plan.params.poly_modulus_degree,
        "input_bits": manifest.input.bits,
        "client_levels": packed.get("client_levels") if picked == "coeff-packed" else None,
        "key_bytes": len(upload),
        "request_bytes": request,
        "response_bytes": response,
        "server_ms_median": round(1000 * float(np.median(times)), 2),
        "server_ms_min": round(1000 * float(np.min(times)), 2),
        "server_cpu_ms_median": round(1000 * float(np.median(cpu)), 2),
        "agreement": f"{agree}/{samples}",
        "compile_s": round(compile_s, 2),
        "estimate": manifest.layout["choice"]["options"][picked],
        "load": f"{load_before} -> {_load()}",
    }


def peer_rows(n_features: int, n_classes: int, X: np.ndarray, samples: int) -> list[dict[str, Any]]:
    """TenSEAL (tutorial `mm`) and concrete-ml-extensions on the same head and inputs."""
    sys.path.insert(0, str(Path(__file__).parent))
    import peers  # bench/peers.py

    model = head(n_features, n_classes)
    W, b = model.coef_, model.intercept_
    rows = []
    for name, fn in (
        ("TenSEAL CKKS mm", peers.measure_tenseal_mm),
        ("concrete-ml-extensions", peers.measure_concrete_ml_extensions),
    ):
        load_before = _load()
        try:
            row = peers.run_peer(name, fn, W, b, X, n=samples)
        except Exception as exc:  # a peer that cannot do this size: say why, keep going
            row = peers.skipped_row(name, f"{type(exc).__name__}: {exc}")
        rows.append(
            {
                "features": n_features,
                "classes": n_classes,
                "system": row["system"],
                "key_bytes": row["key_bytes"],
                "request_bytes": row["request_bytes"],
                "response_bytes": row["response_bytes"],
                "server_ms_median": row["server_eval_ms_per_image"],
                "agreement": row["agreement"],
                "notes": row["notes"],
                "load": f"{load_before} -> {_load()}",
            }
        )
    return rows


def plot(rows: list[dict[str, Any]], paths: list[Path]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(row: dict[str, Any]) -> str:
        if row["system"] != "heinfer":
            return str(row["system"]).split(" (")[0]
        return f"heinfer {row['layout']}" + (" (forced)" if row["forced"] else " (picked)")

    names = sorted({series(r) for r in rows if r.get("server_ms_median")})
    fig, axes = plt.subplots(1, 3, figsize=(15, 5))
    for ax, field, label in zip(
        axes,
        ("server_ms_median", "key_bytes", "response_bytes"),
        ("server ms per request (median)", "key bytes (once per client)", "response bytes"),
        strict=True,
    ):
        for name in names:
            pts = [r for r in rows if series(r) == name and r.get(field)]
            ax.plot(
                [r["features"] * r["classes"] for r in pts],
                [r[field] for r in pts],
                "o" if "forced" in name else "s",
                label=name,
                alpha=0.8,
            )
        ax.set(xscale="log", yscale="log", xlabel="features x classes", title=label)
        ax.grid(True, which="major", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--acceptance", action="store_true", help="768 x 1,000, 200 samples")
    parser.add_argument("--samples", type=int, default=3, help="per row, cost model's pick")
    parser.add_argument("--forced-samples", type=int, default=1, help="per forced-layout row")
    parser.add_argument("--peer-samples", type=int, default=1)
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--peer-max-product", type=int, default=1_000_000)
    parser.add_argument("--out", type=Path, default=Path("bench/results/sizes.json"))
    parser.add_argument("--plot", type=Path, action="append", default=[])
    args = parser.parse_args()
    if args.acceptance:
        grid: list[tuple[int, int]] = [(768, 1000)]
        args.samples, args.forced_samples, args.no_peers = 200, 0, True
    else:
        grid = list(QUICK) if args.quick else [(f, c) for f in FEATURES for c in CLASSES]
    rows: list[dict[str, Any]] = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for n_features, n_classes in grid:
        X = inputs(n_features, max(args.samples, args.peer_samples), seed=2)
        picked = measure(n_features, n_classes, None, args.samples, X)
        found = [picked]
        for layout in LAYOUTS:
            if layout == picked["layout"] or not args.forced_samples:
                continue
            if layout == "coeff-packed" and n_features * n_classes <= 4096:
                continue  # one group: nothing to pack
            try:
                found.append(measure(n_features, n_classes, layout, args.forced_samples, X))
            except Exception as exc:
                found.append(
                    {
                        "system": "heinfer",
                        "features": n_features,
                        "classes": n_classes,
                        "layout": layout,
                        "error": str(exc),
                    }
                )
        if not args.no_peers and n_features * n_classes <= args.peer_max_product:
            found += peer_rows(n_features, n_classes, X, args.peer_samples)
        for row in found:
            print(json.dumps(row, default=str), flush=True)
        rows += found
        args.out.write_text(json.dumps(rows, indent=1, default=str))
    try:
        plot(rows, [args.out.with_suffix(".png"), *args.plot])
    except ImportError:
        print("matplotlib missing: no plot (pip install 'heinfer[bench]')", file=sys.stderr)


if __name__ == "__main__":
    main()
