"""Many tenants, one worker: per-request latency of 16 tenants calling in turn vs one tenant.

    PYTHONPATH=src python bench/tenants.py [--tenants 16] [--cycles 3] [--window 32]
                                           [--key-cache-mib 256 512] [--retrain]

Issue 16's acceptance test, as a new user would try it: a real `heinfer serve` with an auth
file of `--tenants` tenants, one worker, a small CNN (the default `heinfer.nn.he_friendly_cnn`
trained on 1,500 digits for 3 epochs, `bench/cnn.py --quick`'s model: the same keys and HE
work per request as the full one). Every tenant makes its own CKKS keys with `heinfer.Client`
and uploads them (all layouts, ~8.4 MB each, parsed by the worker to ~21.6 MB), and
pre-encrypts two single-image requests. Then, with one request in flight at a time:

  A  one tenant calls `--window` times;
  B  all tenants call in turn (round robin), `--window` requests in all;

in windows A B B A, `--cycles` times (interleaved, so the load of other processes on the
machine hits both phases alike). Each request's latency is the client's wall time of
`Client.infer` (HTTP round trip, queueing, key lookup, evaluation). Reported per phase: median,
quartiles and p90 of all requests, the worker's CPU milliseconds per request, and the ratio
B / A of medians, overall and per cycle (its spread says how noisy the run was).

The workers' parsed-key cache is bounded by `ServiceSettings.key_cache_bytes` (default
256 MiB, environment variable HEINFER_KEY_CACHE_BYTES); the benchmark sets it explicitly for
each `--key-cache-mib` value, starting one service per value. Sixteen full CNN key sets need
~346 MB, more than the default holds: with least-recently-used eviction and tenants in turn,
a cache holding fewer key sets than there are tenants misses on every call. Writes
bench/results/tenants.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import heinfer
from cnn import RESULTS, load_mnist, small_cnn
from heinfer.cli import wait_ready
from heinfer.plans.network import compile_network
from heinfer.server.auth import new_token
from linear import _free_port
from load import _children, _cpu_seconds, _rss_mib

MODEL = "cnn"


def _quantiles(values: list[float]) -> dict[str, float]:
    q1, q2, q3 = np.percentile(values, [25, 50, 75])
    return {
        "median": float(q2),
        "q1": float(q1),
        "q3": float(q3),
        "p90": float(np.percentile(values, 90)),
        "n": len(values),
    }


class TenantService:
    """`heinfer serve MODEL --workers 1 --auth-file AUTH` on loopback with a set key cache."""

    def __init__(self, model_path: Path, auth_file: Path, cache_bytes: int) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._keys = tempfile.TemporaryDirectory(prefix="heinfer-tenants-")
        env = {**os.environ, "HEINFER_KEY_CACHE_BYTES": str(cache_bytes)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "heinfer", "serve", str(model_path), "--port", str(self.port),
             "--workers", "1", "--key-store", self._keys.name, "--auth-file", str(auth_file),
             "--log-level", "warning"],
            env=env,
        )
        wait_ready(self.url, self.process, 180, "service")
        self.workers = _children(self.process.pid)

    def worker_cpu(self) -> float:
        return sum(_cpu_seconds(pid) for pid in self.workers)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self._keys.cleanup()


def run_config(
    model_path: Path, tokens: list[str], X: np.ndarray, cache_bytes: int, args: argparse.Namespace
) -> dict[str, Any]:
    service = TenantService(model_path, args.auth_file, cache_bytes)
    try:
        clients, bodies = [], []
        t = time.perf_counter()
        for i, token in enumerate(tokens):
            client = heinfer.Client(service.url, model=MODEL, token=token)
            client.upload_keys()  # every layout's keys, as a new user's first call would
            clients.append(client)
            bodies.append([client.encrypt(X[2 * i + j : 2 * i + j + 1]) for j in range(2)])
        setup_s = time.perf_counter() - t
        upload_bytes = len(clients[0].last_key_upload or b"")
        # one call each, decrypted and checked: every key has been fetched and parsed once
        agree = 0
        for i, client in enumerate(clients):
            scores = client.decrypt(client.infer(bodies[i][0]))
            agree += int(scores.argmax() == args.reference[2 * i].argmax())

        def window(phase: str) -> tuple[list[float], float]:
            lat = []
            cpu0 = service.worker_cpu()
            for r in range(args.window):
                i = 0 if phase == "A" else r % len(clients)
                body = bodies[i][(r // len(clients)) % 2 if phase == "B" else r % 2]
                t0 = time.perf_counter()
                clients[i].infer(body)
                lat.append(time.perf_counter() - t0)
            return lat, (service.worker_cpu() - cpu0) / args.window

        windows: list[dict[str, Any]] = []
        for cycle in range(args.cycles):
            for phase in "ABBA":
                latencies, cpu_s = window(phase)
                windows.append({"cycle": cycle, "phase": phase, "latency_s": latencies,
                                "worker_cpu_s_per_request": cpu_s})
        worker_rss = [_rss_mib(pid) for pid in service.workers]
        for client in clients:
            client.close()
    finally:
        service.stop()

    def phase_of(p: str) -> list[dict[str, Any]]:
        return [w for w in windows if w["phase"] == p]

    lat = {p: [x for w in phase_of(p) for x in w["latency_s"]] for p in "AB"}
    cpu = {p: [w["worker_cpu_s_per_request"] for w in phase_of(p)] for p in "AB"}
    per_cycle = []
    for c in range(args.cycles):
        a = [x for w in windows if w["cycle"] == c and w["phase"] == "A" for x in w["latency_s"]]
        b = [x for w in windows if w["cycle"] == c and w["phase"] == "B" for x in w["latency_s"]]
        per_cycle.append(statistics.median(b) / statistics.median(a))
    return {
        "key_cache_bytes": cache_bytes,
        "key_upload_bytes": upload_bytes,
        "setup_s": setup_s,
        "warmup_argmax_agreement": agree / len(clients),
        "service_children_rss_mib_after": worker_rss,
        "one_tenant": {**_quantiles(lat["A"]),
                       "worker_cpu_ms_per_request": 1e3 * statistics.median(cpu["A"])},
        "all_tenants": {**_quantiles(lat["B"]),
                        "worker_cpu_ms_per_request": 1e3 * statistics.median(cpu["B"])},
        "ratio_of_medians": statistics.median(lat["B"]) / statistics.median(lat["A"]),
        "ratio_per_cycle": per_cycle,
        "windows": windows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--tenants", type=int, default=16)
    ap.add_argument("--cycles", type=int, default=3, help="A B B A blocks")
    ap.add_argument("--window", type=int, default=32, help="requests per window")
    ap.add_argument(
        "--key-cache-mib", type=int, nargs="+", default=[256, 512],
        help="worker key cache bounds to run, one service each (256: the default)",
    )
    ap.add_argument("--retrain", action="store_true", help="retrain the small CNN")
    args = ap.parse_args()
    load_start = os.getloadavg()
    Xtr, ytr, Xte, _ = load_mnist()
    spec, _train_s = small_cnn(Xtr, ytr, retrain=args.retrain)
    X = Xte[: 2 * args.tenants]
    args.reference = spec.predict_plain(X)
    with tempfile.TemporaryDirectory(prefix="heinfer-tenants-model-") as tmp:
        root = Path(tmp)
        plan = compile_network(spec, MODEL, calibration=Xtr[:500])
        model_path = heinfer.EncryptedModel(plan).save(root / "cnn.heinfer")
        args.auth_file = root / "tokens.json"
        # what `heinfer token new TENANT --auth-file FILE` runs
        tokens = [new_token(f"tenant{i:02d}", args.auth_file) for i in range(args.tenants)]
        runs = []
        for mib in args.key_cache_mib:
            print(f"key cache {mib} MiB: starting a service, {args.tenants} key uploads ...",
                  flush=True)
            run = run_config(model_path, tokens, X, mib << 20, args)
            runs.append(run)
            a, b = run["one_tenant"], run["all_tenants"]
            print(
                f"  1 tenant: median {a['median'] * 1e3:.0f} ms (IQR {a['q1'] * 1e3:.0f}-"
                f"{a['q3'] * 1e3:.0f}), worker CPU {a['worker_cpu_ms_per_request']:.0f} ms/req\n"
                f"  {args.tenants} tenants in turn: median {b['median'] * 1e3:.0f} ms (IQR "
                f"{b['q1'] * 1e3:.0f}-{b['q3'] * 1e3:.0f}), worker CPU "
                f"{b['worker_cpu_ms_per_request']:.0f} ms/req\n"
                f"  ratio {run['ratio_of_medians']:.2f}x (per A B B A cycle: "
                f"{', '.join(f'{r:.2f}' for r in run['ratio_per_cycle'])}); service children "
                f"RSS {', '.join(f'{m:.0f}' for m in run['service_children_rss_mib_after'])} MiB",
                flush=True,
            )
    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "tenants": args.tenants,
        "cycles": args.cycles,
        "window": args.window,
        "workers": 1,
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "runs": runs,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tenants.json").write_text(json.dumps(result, indent=2))
    print(f"load average {load_start[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end")


if __name__ == "__main__":
    main()
