"""How many requests/s one service process can feed: `heinfer serve` with evaluation replaced
by a canned answer, everything else real.

    python bench/front.py [--duration 15] [--clients 32 64] [--workers 2]

bench/load.py measures the service process at the rate two MNIST workers allow (~300
requests/s here). At that rate every request wakes the process from idle, and its CPU per
request (0.4-0.6 ms there) says little about the rate at which it runs out of CPU, which is
what sizes "workers per service" on a many-core machine. Here each worker answers at once: a
worker evaluates the first request it gets for real and returns that answer (same size as every
answer) to every later call. HTTP parsing, admission, key lookup, the pool's round trip of the
real ~46 KiB body and the response are all the real code, driven by bench/load.py's load
generator with one key per client. Answers are not decrypted (they belong to one client's key);
errors are counted. Writes bench/results/front.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import heinfer.server.workers as service_workers

sys.path.insert(0, str(Path(__file__).resolve().parent))

from linear import Service

_real_infer = service_workers._infer
_canned: bytes | None = None


def canned_infer(model: str, tenant: str, key_id: str, body: bytes | memoryview | str) -> bytes:
    """Runs in the workers (pickled by reference, as the service's own `_infer` is). Every
    request of the load generator holds one image, so every response has the same size."""
    global _canned
    if _canned is None:
        _canned = _real_infer(model, tenant, key_id, body)
    return _canned


def _serve(argv: list[str]) -> None:
    """`heinfer serve ARGV` in this process, its workers answering with `canned_infer`."""
    from heinfer.cli import main as heinfer_main

    service_workers._infer = canned_infer
    sys.argv = ["heinfer", "serve", *argv]
    heinfer_main()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--clients", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()

    import load
    from load import RESULTS, _prepare_clients, measure_level

    model_path, X, reference = load.mnist_model()
    service = Service(model_path, args.workers, launcher=(__file__,))
    levels = []
    try:
        clients = _prepare_clients(service.url, max(args.clients), X, reference, False, 1)
        for level in args.clients:
            result = measure_level(
                service, clients[:level], args.duration, min(3.0, args.duration)
            )
            result = {k: v for k, v in result.items() if not k.startswith("images_")}
            cpu = result["cpu_ms_per_request"]
            busy = cpu["http_process"] * result["requests_per_s"] / 1e3
            result["http_process_busy_cores"] = busy
            levels.append(result)
            print(
                f"canned answers, workers={args.workers} clients={level}: "
                f"{result['requests_per_s']:.0f} req/s, p50 {result['p50_ms']:.1f} ms, "
                f"p99 {result['p99_ms']:.1f} ms, errors {result['errors']}; service process "
                f"{cpu['http_process']:.3f} ms CPU/request, busy {busy:.2f} of a core; load "
                f"generator {cpu['load_generator']:.3f} ms/request",
                flush=True,
            )
        for sim in clients:
            sim.client.close()
    finally:
        service.stop()
    report: dict[str, Any] = {"cpus": os.cpu_count(), "workers": args.workers, "levels": levels}
    (RESULTS / "front.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:  # as Service launches it
        _serve(sys.argv[2:])
    else:
        main()
