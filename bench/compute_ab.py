"""Compute-only A/B of two versions: the worker's per-request call, no HTTP, no pool.

    PYTHONPATH=src python bench/compute_ab.py --against CHECKOUT [--pairs 10] [--seconds 3]
                                              [--tenants 32]

What `bench/load.py --pairs K --against CHECKOUT` measures through the whole service (HTTP,
admission, pool, worker), reduced to the part a version change is most likely to move and
least exposed to the machine's other load: the function a worker process runs per request,
`heinfer.server.workers._infer`, in each version's own code (A: CHECKOUT, B: this checkout).

Setup, per version: `bench/load.py`'s MNIST logistic regression compiled by that version's
compiler (`load.checkout_model`), served once by that version's `heinfer serve` just long enough
for `--tenants` clients (this checkout's `heinfer.Client`, which speaks both versions' wire
formats, through `load.bench_client`) to upload their keys and encrypt one digit each; the key
store directory is kept.
Then one long-lived process per version imports that version's `heinfer.server.workers`,
initializes it as the pool would (model, key store, key cache, SCHED_BATCH, one BLAS thread),
calls `_infer` once per tenant (keys fetched and parsed into the worker's cache), and waits.
The parent then runs windows of `--seconds` each, A B B A, one process busy at a time, each
cycling through the tenants' requests, and reads back calls, wall and CPU seconds. Reported:
calls/s per window, CPU ms per call (process CPU: less exposed to other processes than wall
time), and the per-pair ratios B / A with median and quartiles. The HTTP-process work a version
moved in or out of the worker (8bbfa1e's service split HEQ1 bodies into records before the
pool; this checkout's worker checks the body again) is counted on the side that does it in the
worker only. Writes bench/results/compute-ab.json.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from linear import Service
from load import RESULTS, _launcher, bench_client, checkout_model, mnist_model

# Run by each version's own interpreter path: reads the work, initializes that version's worker
# module, then answers "run SECONDS" lines with one JSON line each.
DRIVER = r"""
import base64, inspect, json, sys, time
sys.path.insert(0, sys.argv[1])
from heinfer.server import workers
from heinfer.server.auth import PUBLIC_TENANT
work = json.load(open(sys.argv[2]))
workers._initialize([work["model"]], work["keys"], 256 << 20)
calls = []
old = "records" in inspect.signature(workers._infer).parameters
for key_id, body in work["requests"]:
    body = base64.b64decode(body)
    if old:  # 8bbfa1e's HTTP process split an HEQ1 body into records before the pool
        from heinfer.plans.wire import decode_request
        body = decode_request(body, max_records=1024, max_record_bytes=32 << 20)
    calls.append((key_id, body))
for key_id, body in calls:  # keys fetched and parsed into the worker's cache
    workers._infer("mnist", PUBLIC_TENANT, key_id, body)
print(json.dumps({"ready": True, "old_signature": old}), flush=True)
for line in sys.stdin:
    seconds = float(line.split()[1])
    done, wall0, cpu0 = 0, time.perf_counter(), time.process_time()
    deadline = wall0 + seconds
    while time.perf_counter() < deadline:
        key_id, body = calls[done % len(calls)]
        workers._infer("mnist", PUBLIC_TENANT, key_id, body)
        done += 1
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    print(json.dumps({"calls": done, "wall_s": wall, "cpu_s": cpu}), flush=True)
"""


def prepare(
    model_path: Path, src: Path, tenants: int, X: np.ndarray, root: Path, arm: str
) -> Path:
    """Keys uploaded through the version's own service, one encrypted digit per tenant."""
    service = Service(model_path, 1, launcher=_launcher(src))
    try:
        requests = []
        for i in range(tenants):
            with bench_client(service.url) as client:
                key_id = client.upload_keys()
                body = client.encrypt(X[i : i + 1])
                requests.append([key_id, base64.b64encode(body).decode()])
        keys = root / f"keys-{arm}"
        shutil.copytree(service._keys.name, keys)
    finally:
        service.stop()
    path = root / f"work-{arm}.json"
    path.write_text(json.dumps({"model": str(model_path), "keys": str(keys),
                                "requests": requests}))
    return path


def quartiles(values: list[float]) -> dict[str, float]:
    q1, q2, q3 = (float(v) for v in np.percentile(values, [25, 50, 75]))
    return {"median": q2, "q1": q1, "q3": q3, "min": min(values), "max": max(values)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--against", required=True, metavar="CHECKOUT")
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--tenants", type=int, default=32)
    args = ap.parse_args()
    load_start = os.getloadavg()
    checkout = Path(args.against).resolve()
    here = Path(__file__).resolve().parents[1]
    model_b, X, _ = mnist_model()
    model_a = checkout_model(checkout)
    sources = {"A": checkout / "src", "B": here / "src"}
    procs: dict[str, subprocess.Popen[str]] = {}
    with tempfile.TemporaryDirectory(prefix="heinfer-compute-ab-") as tmp:
        root = Path(tmp)
        works = {
            "A": prepare(model_a, sources["A"], args.tenants, X, root, "A"),
            "B": prepare(model_b, sources["B"], args.tenants, X, root, "B"),
        }
        try:
            for arm in "AB":
                procs[arm] = subprocess.Popen(
                    [sys.executable, "-c", DRIVER, str(sources[arm]), str(works[arm])],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                )
            for arm, proc in procs.items():
                assert proc.stdout is not None
                print(f"{arm} ready: {proc.stdout.readline().strip()}", flush=True)

            def window(arm: str) -> dict[str, Any]:
                proc = procs[arm]
                assert proc.stdin is not None and proc.stdout is not None
                proc.stdin.write(f"run {args.seconds}\n")
                proc.stdin.flush()
                result: dict[str, Any] = json.loads(proc.stdout.readline())
                return result

            windows: dict[str, list[dict[str, Any]]] = {"A": [], "B": []}
            rate_ratios, cpu_ratios = [], []
            for index in range(args.pairs):
                for arm in ("A", "B") if index % 2 == 0 else ("B", "A"):
                    windows[arm].append(window(arm))
                a, b = windows["A"][-1], windows["B"][-1]
                rate_ratios.append((b["calls"] / b["wall_s"]) / (a["calls"] / a["wall_s"]))
                cpu_ratios.append((b["cpu_s"] / b["calls"]) / (a["cpu_s"] / a["calls"]))
                print(
                    f"pair {index + 1}/{args.pairs}: A {a['calls'] / a['wall_s']:.1f}/s "
                    f"({1e3 * a['cpu_s'] / a['calls']:.2f} ms CPU/call), B "
                    f"{b['calls'] / b['wall_s']:.1f}/s ({1e3 * b['cpu_s'] / b['calls']:.2f} ms "
                    f"CPU/call); B/A rate {rate_ratios[-1]:.3f}, CPU/call {cpu_ratios[-1]:.3f}",
                    flush=True,
                )
        finally:
            for proc in procs.values():
                if proc.stdin is not None:
                    proc.stdin.close()
                proc.wait(timeout=30)
    cpu_ms = {
        arm: [1e3 * w["cpu_s"] / w["calls"] for w in runs] for arm, runs in windows.items()
    }
    result = {
        "arms": {"A": str(checkout), "B": "this checkout"},
        "tenants": args.tenants,
        "pairs": args.pairs,
        "seconds": args.seconds,
        "rate_ratio_b_over_a": quartiles(rate_ratios),
        "cpu_per_call_ratio_b_over_a": quartiles(cpu_ratios),
        "cpu_ms_per_call": {arm: quartiles(v) for arm, v in cpu_ms.items()},
        "calls_per_s": {
            arm: [w["calls"] / w["wall_s"] for w in runs] for arm, runs in windows.items()
        },
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "windows": windows,
    }
    r, c = result["rate_ratio_b_over_a"], result["cpu_per_call_ratio_b_over_a"]
    print(
        f"B / A calls/s: median {r['median']:.3f} (quartiles {r['q1']:.3f}-{r['q3']:.3f}, range "
        f"{r['min']:.3f}-{r['max']:.3f}); B / A CPU per call: median {c['median']:.3f} "
        f"(quartiles {c['q1']:.3f}-{c['q3']:.3f}); CPU ms/call A "
        f"{statistics.median(cpu_ms['A']):.2f}, B {statistics.median(cpu_ms['B']):.2f}; "
        f"load average {load_start[0]:.1f} -> {os.getloadavg()[0]:.1f}"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "compute-ab.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
