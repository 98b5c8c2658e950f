"""Paired in-process A/B of one single-image prediction's CPU: worker call, client encryption,
client decryption, for this checkout's `src` (B) against another checkout's (A).

    python bench/stages_ab.py --against CHECKOUT [--rounds 24] [--calls 150]

One long-lived process per version (its `src` first on the path, one BLAS thread) sets up the
MNIST logistic regression of `bench/load.py` and one encrypted digit, then waits. The parent
runs rounds, A B in even rounds and B A in odd ones, one process busy at a time; each round
times `--calls` calls of each stage in process CPU. Reported per stage: medians per version
and the median (with quartiles) of the per-round ratios B / A, which share the VM's drift
(this VM's speed moves by +-30% over minutes; paired rounds a second apart do not). Every
round's decrypted scores are checked against the plaintext model. No HTTP: see `bench/load.py`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from load import SRC, build_extensions

_CHILD = """
import json, os, sys, time
os.environ["OPENBLAS_NUM_THREADS"] = "1"
sys.path.insert(0, sys.argv[1])
sys.path.insert(1, sys.argv[2])
import heinfer
from heinfer.plans.linear import LinearCodec
from load import mnist_model
path, X, reference = mnist_model()
model = heinfer.load_model(path)
plan = model.plan
codec = LinearCodec(model.manifest)
secret = codec.keygen()
key = plan.load_keys(codec.key_upload(secret))
server, client = plan.layouts[b"HEQ1"], codec.layouts["coeff-rowpack"]
digit = X[:1]
body = client.encrypt(secret, codec.quantize(digit))
response = server.evaluate(body, key)
stages = {
    "worker call": lambda: server.evaluate(body, key),
    "client encrypt": lambda: client.encrypt(secret, codec.quantize(digit)),
    "client decrypt": lambda: client.decrypt(secret, response),
}
for stage in stages.values():
    stage()
print("ready", flush=True)
for line in sys.stdin:
    calls, out = int(line), {}
    for name, stage in stages.items():
        start = time.process_time()
        for _ in range(calls):
            stage()
        out[name] = (time.process_time() - start) / calls * 1e3
    fresh = client.encrypt(secret, codec.quantize(digit))
    scores = client.decrypt(secret, server.evaluate(fresh, key))
    out["agrees"] = bool(scores[0].argmax() == reference[0].argmax())
    print(json.dumps(out), flush=True)
"""


def _start(src: Path) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(src), str(Path(__file__).resolve().parent)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert process.stdout is not None
    if process.stdout.readline().strip() != "ready":
        raise RuntimeError(f"the process for {src} did not start")
    return process


def _round(process: subprocess.Popen[str], calls: int) -> dict[str, float]:
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write(f"{calls}\n")
    process.stdin.flush()
    found: dict[str, float] = json.loads(process.stdout.readline())
    if not found.pop("agrees"):
        raise RuntimeError("a decrypted argmax disagreed with the plaintext model")
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--against", type=Path, required=True, help="checkout of version A")
    ap.add_argument("--rounds", type=int, default=24)
    ap.add_argument("--calls", type=int, default=150, help="calls per stage per round")
    args = ap.parse_args()
    checkout = args.against.resolve()
    build_extensions(checkout)
    processes = {"A": _start(checkout / "src"), "B": _start(SRC)}
    results: dict[str, list[dict[str, float]]] = {"A": [], "B": []}
    try:
        for index in range(args.rounds):
            for arm in ("A", "B") if index % 2 == 0 else ("B", "A"):
                results[arm].append(_round(processes[arm], args.calls))
    finally:
        for process in processes.values():
            assert process.stdin is not None
            process.stdin.close()
            process.wait()
    print(f"A = {checkout}, B = this checkout; {args.rounds} rounds of {args.calls} calls, "
          "process CPU per call; every round's argmax checked")
    for stage in results["A"][0]:
        a = [r[stage] for r in results["A"]]
        b = [r[stage] for r in results["B"]]
        ratios = [y / x for x, y in zip(a, b, strict=True)]
        q1, _, q3 = statistics.quantiles(ratios, n=4)
        print(f"{stage:15s} A {statistics.median(a):.3f} ms  B {statistics.median(b):.3f} ms  "
              f"B/A {statistics.median(ratios):.3f} (quartiles {q1:.3f}-{q3:.3f})")


if __name__ == "__main__":
    main()
