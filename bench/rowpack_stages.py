"""CPU per stage of one single-image (coeff-rowpack) prediction, client and worker, in-process.

    PYTHONPATH=src python bench/rowpack_stages.py [--repeat 400]

Each stage runs `--repeat` times on one MNIST digit in this process (one BLAS thread) and is
reported as process CPU ms per call, the median of 5 rounds (process CPU is less exposed to
other processes than wall time; the machine's load average is printed with it). Stages: the
client's encryption, the worker's request expansion (SHAKE-256 seed), its numpy evaluation,
the switch to the last prime, the whole worker call (`RowpackServer.evaluate_record`, all of
the above plus bit packing) and the client's decryption. No HTTP: see `bench/load.py`.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import heinfer
from heinfer.he.backend import EvaluationKey
from heinfer.plans.linear import LinearCodec, LinearPlan, RowpackClient, RowpackServer
from heinfer.rlwe.encrypt import divide_and_round_q_last


def cpu_ms(call: Callable[[], object], repeat: int) -> float:
    call()
    rounds = []
    for _ in range(5):
        start = time.process_time()
        for _ in range(repeat):
            call()
        rounds.append((time.process_time() - start) / repeat * 1e3)
    return statistics.median(rounds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--repeat", type=int, default=400)
    args = ap.parse_args()
    from load import mnist_model

    path, X, _ = mnist_model()
    model = heinfer.load_model(path)
    plan = model.plan
    assert isinstance(plan, LinearPlan)
    codec = LinearCodec(model.manifest)
    secret = codec.keygen()
    key = plan.load_keys(codec.key_upload(secret))
    assert isinstance(key, EvaluationKey)
    server, client = plan.layouts[b"HEQ1"], codec.layouts["coeff-rowpack"]
    assert isinstance(server, RowpackServer) and isinstance(client, RowpackClient)
    x_int = codec.quantize(X[:1])[0]
    record = secret.encrypt(x_int)
    c0_x, c1_x = plan.context.request_arrays(record)
    weights, treatment = plan.rowpack_weights, plan._treatment
    results = weights.evaluate(c0_x, c1_x, key, treatment)
    primes = plan.params.data_primes
    response = server.evaluate_record(record, key)
    stages: dict[str, Callable[[], object]] = {
        "client: encrypt one digit": lambda: secret.encrypt(x_int),
        "worker: expand the request (tag, c0, SHAKE-256 c1)": lambda: plan.context.request_arrays(
            record
        ),
        "worker: evaluate (products, re-randomizer, flooding)": lambda: weights.evaluate(
            c0_x, c1_x, key, treatment
        ),
        "worker: switch to the last prime": lambda: [
            (divide_and_round_q_last(r.c1, primes), divide_and_round_q_last(r.c0, primes))
            for r in results
        ],
        "worker: whole call (evaluate_record)": lambda: server.evaluate_record(record, key),
        "client: decrypt one response": lambda: client.decrypt_record(secret, response),
    }
    load = os.getloadavg()
    cpus = os.cpu_count()
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {cpus} CPUs")
    for name, call in stages.items():
        print(f"{cpu_ms(call, args.repeat):7.3f} ms  {name}")
    scores = client.decrypt_record(secret, response)
    assert np.abs(scores - model.predict_plain(X[:1])[0]).max() <= 1e-3
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
