"""What serving HTTP inside each evaluating process would save (issue 17's last lever), measured
against `heinfer serve` in the same run.

    PYTHONPATH=src python bench/http_in_worker.py [--pairs 6] [--pair-seconds 6] [--clients 32]

`heinfer serve --workers 2` parses each request in one HTTP process and evaluates it in one
of two worker processes. The other arm is a process model, not a service: uvicorn runs two
processes on one listening socket, and each evaluates the coeff-rowpack requests it parses
itself (`plan.check`, a per-process key cache, `plan.evaluate`), with no pool hop. It has
none of the service's auth, extraction budget, metrics, request log, admission control or
crash isolation (a worker that dies takes its connections with it), so its figures bound
what the process model can give; they are not a service's. Both arms get the same load
(bench/load.py's raw load generator, one key per client, answers decrypted and checked), in
adjacent windows, A B B A: service CPU per request (all processes), requests/s, and the
1-client round trip. Writes bench/results/http-in-worker.json.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response

sys.path.insert(0, str(Path(__file__).resolve().parent))

_MODEL_ENV, _KEYS_ENV = "HEINFER_PROTOTYPE_MODEL", "HEINFER_PROTOTYPE_KEYS"


def _prototype_app() -> Any:
    """The ASGI app each uvicorn process imports (`http_in_worker:app`)."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the service's workers run
    import heinfer

    plan = heinfer.load_model(os.environ[_MODEL_ENV]).plan
    plan.warm_up()
    keys_dir = Path(os.environ[_KEYS_ENV])
    cache: dict[str, Any] = {}
    app = FastAPI()

    @app.get("/v2/health/ready")
    def ready() -> dict[str, bool]:
        return {"ready": True}

    @app.get(f"/v2/models/{plan.manifest.name}/manifest")
    def manifest() -> dict[str, Any]:
        return plan.manifest.to_dict()

    @app.post("/v2/keys")
    async def upload(request: Request) -> dict[str, str]:
        key_id = secrets.token_hex(8)
        (keys_dir / key_id).write_bytes(await request.body())
        return {"key_id": key_id}

    @app.post(f"/v2/models/{plan.manifest.name}/infer")
    async def infer(request: Request) -> Response:
        key_id = request.headers["x-heinfer-key-id"]
        body = await request.body()
        plan.check(body)
        keys = cache.get(key_id)
        if keys is None:
            keys = cache[key_id] = plan.load_keys((keys_dir / key_id).read_bytes())
        return Response(plan.evaluate(body, keys), media_type="application/octet-stream")

    return app


if _MODEL_ENV in os.environ:  # imported by uvicorn in the prototype's processes
    app = _prototype_app()


class Prototype:
    """uvicorn, `processes` processes on one socket, each serving `_prototype_app`."""

    def __init__(self, model_path: Path, processes: int) -> None:
        from heinfer.cli import wait_ready
        from linear import _free_port

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._keys = tempfile.TemporaryDirectory(prefix="heinfer-prototype-")
        here = Path(__file__).resolve().parent
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "http_in_worker:app", "--app-dir", str(here),
             "--port", str(self.port), "--workers", str(processes), "--log-level", "warning",
             "--no-access-log"],
            env={**os.environ, _MODEL_ENV: str(model_path), _KEYS_ENV: self._keys.name},
        )
        wait_ready(self.url, self.process, 120, "prototype")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self._keys.cleanup()


def _cpu(level: dict[str, Any]) -> float:
    cpu = level["cpu_ms_per_request"]
    return float(cpu["http_process"] + cpu["workers"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--pair-seconds", type=float, default=6.0)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--processes", type=int, default=2)
    args = ap.parse_args()
    from linear import Service
    from load import RESULTS, _prepare_clients, measure_level, mnist_model

    model_path, X, reference = mnist_model()
    arms: dict[str, Any] = {
        "service": Service(model_path, args.processes),
        "prototype": Prototype(model_path, args.processes),
    }
    load = os.getloadavg()
    found: dict[str, dict[str, list[float]]] = {
        arm: {"cpu_ms": [], "requests_per_s": [], "round_trip_p50_ms": [], "round_trip_cpu_ms": []}
        for arm in arms
    }
    checked = agreeing = 0
    try:
        clients = {
            arm: _prepare_clients(svc.url, args.clients, X, reference, False, 1)
            for arm, svc in arms.items()
        }
        for index in range(args.pairs):
            order = list(arms) if index % 2 == 0 else list(reversed(arms))
            for arm in order:
                busy = measure_level(arms[arm], clients[arm], args.pair_seconds, 1.0)
                one = measure_level(arms[arm], clients[arm][:1], args.pair_seconds, 1.0)
                if busy["errors"] or one["errors"]:
                    raise SystemExit(f"{arm}: errors {busy['errors']} {one['errors']}")
                checked += busy["images_checked"] + one["images_checked"]
                agreeing += busy["images_agreeing"] + one["images_agreeing"]
                found[arm]["cpu_ms"].append(_cpu(busy))
                found[arm]["requests_per_s"].append(busy["requests_per_s"])
                found[arm]["round_trip_p50_ms"].append(one["p50_ms"])
                found[arm]["round_trip_cpu_ms"].append(_cpu(one))
                print(f"pair {index + 1}/{args.pairs} {arm}: {busy['requests_per_s']:.0f} req/s, "
                      f"{_cpu(busy):.2f} ms CPU/request at {args.clients} clients; 1 client "
                      f"p50 {one['p50_ms']:.2f} ms, {_cpu(one):.2f} ms CPU", flush=True)
    finally:
        for svc in arms.values():
            svc.stop()
    medians = {arm: {k: statistics.median(v) for k, v in f.items()} for arm, f in found.items()}
    for arm, m in medians.items():
        print(f"{arm} (median of {args.pairs} windows): {m['requests_per_s']:.0f} req/s, "
              f"{m['cpu_ms']:.2f} ms service CPU/request at {args.clients} clients; 1 client "
              f"p50 {m['round_trip_p50_ms']:.2f} ms, {m['round_trip_cpu_ms']:.2f} ms CPU")
    print(f"prototype / service: throughput "
          f"{medians['prototype']['requests_per_s'] / medians['service']['requests_per_s']:.2f}x, "
          f"CPU per request {medians['prototype']['cpu_ms'] / medians['service']['cpu_ms']:.2f}x; "
          f"argmax {agreeing}/{checked}; load average before {load[0]:.2f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "http-in-worker.json").write_text(json.dumps(
        {"windows": found, "medians": medians, "checked": checked, "agreeing": agreeing,
         "loadavg_before": load, "pair_seconds": args.pair_seconds, "clients": args.clients},
        indent=1,
    ))


if __name__ == "__main__":
    main()
