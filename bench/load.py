"""Load benchmark: throughput and latency percentiles under concurrent clients.

    python bench/load.py [--duration 20] [--clients 1 8 32] [--workers 1 2]

For each worker count it starts a real `heinfer serve` on loopback, gives every simulated
client its own key (uploaded once), pre-encrypts a few request bodies per client (so the load
generator spends its CPU on HTTP, not on encryption), then runs each concurrency level for a
fixed time with an httpx async client. Reports requests/s, p50/p95/p99 latency, errors, and
the resident memory of the service and each worker; writes bench/results/load.json and
load.png. Requests, durations and addresses are bounded and loopback-only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import heinfer
from linear import Service

RESULTS = Path(__file__).resolve().parent / "results"
KEY_HEADER = "X-Heinfer-Key-Id"


def _rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _prepare_clients(
    url: str, count: int, X: np.ndarray, batch: bool
) -> list[tuple[str, list[bytes]]]:
    clients = []
    for i in range(count):
        client = heinfer.Client(url, model="mnist")
        key_id = client.upload_keys()
        if batch:  # one full coeff-batch request (N images) per client
            images = np.resize(np.roll(X, i, axis=0), (client.batch_capacity, X.shape[1]))
            bodies = [client.encrypt(images, layout="coeff-batch")]
        else:
            bodies = [client.encrypt(X[(i * 3 + k) % len(X)]) for k in range(3)]
        clients.append((key_id, bodies))
        client.close()
    return clients


async def _run_level(
    url: str, clients: list[tuple[str, list[bytes]]], duration: float
) -> dict[str, Any]:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    deadline = time.monotonic() + duration
    limits = httpx.Limits(max_connections=len(clients) + 4)

    async def one_client(http: httpx.AsyncClient, key_id: str, bodies: list[bytes]) -> None:
        k = 0
        while time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                response = await http.post(
                    "/v2/models/mnist/infer",
                    content=bodies[k % len(bodies)],
                    headers={KEY_HEADER: key_id},
                )
                if response.status_code == 200:
                    latencies.append((time.perf_counter() - started) * 1e3)
                else:
                    errors[str(response.status_code)] = errors.get(str(response.status_code), 0) + 1
            except httpx.HTTPError as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            k += 1

    started = time.monotonic()
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        await asyncio.gather(*(one_client(http, key, bodies) for key, bodies in clients))
    elapsed = time.monotonic() - started
    values = np.asarray(latencies) if latencies else np.zeros(1)
    return {
        "clients": len(clients),
        "seconds": elapsed,
        "requests": len(latencies),
        "requests_per_s": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(values, 50)),
        "p95_ms": float(np.percentile(values, 95)),
        "p99_ms": float(np.percentile(values, 99)),
        "errors": errors,
    }


def run(
    workers: int,
    levels: list[int],
    duration: float,
    model_path: Path,
    X: np.ndarray,
    batch: bool = False,
) -> dict[str, Any]:
    service = Service(model_path, workers)
    try:
        clients = _prepare_clients(service.url, max(levels), X, batch)
        results = []
        for level in levels:
            asyncio.run(_run_level(service.url, clients[:level], min(3.0, duration)))  # warm-up
            results.append(asyncio.run(_run_level(service.url, clients[:level], duration)))
            print(
                f"workers={workers} clients={level}: {results[-1]['requests_per_s']:.1f} req/s, "
                f"p50 {results[-1]['p50_ms']:.1f} ms, p99 {results[-1]['p99_ms']:.1f} ms, "
                f"errors {results[-1]['errors']}",
                flush=True,
            )
        pid = service.process.pid
        memory = {"service_mib": _rss_mib(pid), "worker_mib": [_rss_mib(c) for c in _children(pid)]}
        return {"workers": workers, "levels": results, "memory": memory}
    finally:
        service.stop()


def _plot(report: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for run_ in report:
        clients = [lv["clients"] for lv in run_["levels"]]
        axes[0].plot(
            clients,
            [lv["requests_per_s"] for lv in run_["levels"]],
            "o-",
            label=f"{run_['workers']} worker(s)",
        )
        axes[1].plot(
            clients,
            [lv["p99_ms"] for lv in run_["levels"]],
            "o-",
            label=f"{run_['workers']} worker(s) p99",
        )
        axes[1].plot(
            clients,
            [lv["p50_ms"] for lv in run_["levels"]],
            "x--",
            label=f"{run_['workers']} worker(s) p50",
        )
    axes[0].set_xlabel("concurrent clients")
    axes[0].set_ylabel("requests/s (one image each)")
    axes[1].set_xlabel("concurrent clients")
    axes[1].set_ylabel("latency (ms)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, os.cpu_count() or 2])
    parser.add_argument(
        "--batch", action="store_true", help="each request is one full coeff-batch (N images)"
    )
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    from sklearn.linear_model import LogisticRegression

    import _mnist

    fitted = _mnist.model()
    X, _ = _mnist.load("test")
    estimator = LogisticRegression()
    estimator.coef_, estimator.intercept_, estimator.classes_ = fitted.W, fitted.b, np.arange(10)
    model_path = heinfer.compile(estimator, name="mnist", input_range=(0.0, 1.0)).save(
        RESULTS / "mnist-load.heinfer"
    )
    report = [
        run(w, args.clients, args.duration, model_path, X, args.batch) for w in args.workers
    ]
    if len(report) >= 2:
        base, best = report[0], report[-1]
        for lv_base, lv_best in zip(base["levels"], best["levels"], strict=True):
            print(
                f"clients={lv_base['clients']}: {best['workers']} workers / {base['workers']} = "
                f"{lv_best['requests_per_s'] / lv_base['requests_per_s']:.2f}x throughput"
            )
    out = {"loadavg": os.getloadavg(), "cpus": os.cpu_count(), "batch": args.batch, "runs": report}
    name = "load-batch" if args.batch else "load"
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=2))
    _plot(report, RESULTS / f"{name}.png")


if __name__ == "__main__":
    main()
