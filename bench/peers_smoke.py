"""Quick end-to-end run of every peer measurement on real MNIST (small n).

    python bench/peers_smoke.py [--n-ei 2] [--n-mm 2] [--n-best 10] [--n-batch 1500]

Prints a table and writes bench/results/peers.json. Meant to finish in a few
minutes on a 2-core machine; raise the n's for the real benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _mnist
import peers

RESULTS = Path(__file__).resolve().parent / "results" / "peers.json"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _fmt(value: Any, key: str) -> str:
    """Human units for the table; the JSON keeps raw numbers."""
    if value is None:
        return "-"
    if key.endswith("_bytes"):
        return f"{value / 1e6:.2f} MB" if value >= 1e6 else f"{value / 1e3:.1f} kB"
    if key.endswith("_ms") or key == "server_eval_ms_per_image":
        return f"{value:.3f}" if value < 1 else f"{value:,.1f}"
    if key == "agreement":
        return f"{value:.3f}"
    if key == "max_abs_error":
        return f"{value:.1e}"
    return str(value)


def print_table(rows: list[dict[str, Any]]) -> None:
    """Rich table if rich is installed, else aligned plain text; notes listed below."""
    cols = [k for k in peers.FIELDS if k != "notes"]
    heads = {
        "system": "system",
        "server_eval_ms_per_image": "server ms/img",
        "client_encrypt_ms": "enc ms",
        "client_decrypt_ms": "dec ms",
        "key_bytes": "keys",
        "request_bytes": "request",
        "response_bytes": "response",
        "agreement": "argmax agree",
        "max_abs_error": "max |err|",
        "n_images": "n",
    }
    cells = [[_fmt(r[c], c) for c in cols] for r in rows]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(heads[c]), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
        print("  ".join(heads[c].ljust(w) for c, w in zip(cols, widths, strict=True)))
        for row in cells:
            print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
    else:
        table = Table(title="Encrypted MNIST logistic regression: peers")
        for i, c in enumerate(cols):
            table.add_column(heads[c], justify="left" if i == 0 else "right")
        for row in cells:
            table.add_row(*row)
        Console(width=200).print(table)
    for r in rows:
        print(f"- {r['system']}: {r['notes']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-ei", type=int, default=2, help="images for encrypted-inference")
    ap.add_argument("--n-mm", type=int, default=2, help="images for TenSEAL enc_x.mm")
    ap.add_argument("--n-best", type=int, default=10, help="images per TenSEAL layout")
    ap.add_argument("--n-batch", type=int, default=1500, help="images for the batched layout")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    started = time.perf_counter()
    load_start = list(os.getloadavg())
    t0 = time.perf_counter()
    model = _mnist.model()
    X, _ = _mnist.load("test")
    train_s = time.perf_counter() - t0
    print(
        f"model: train acc {model.train_accuracy:.4f}, test acc {model.test_accuracy:.4f} "
        f"({train_s:.1f}s incl. loading); {len(X)} test images"
    )

    W, b = model.W, model.b
    plan = [
        ("plaintext numpy", peers.measure_plaintext_numpy, (W, b, X)),
        ("TenSEAL enc_x.mm", peers.measure_tenseal_mm, (W, b, X, args.n_mm)),
        ("TenSEAL best", peers.measure_tenseal_best, (W, b, X, args.n_best)),
        ("TenSEAL batched", peers.measure_tenseal_batched, (W, b, X, args.n_batch)),
        ("encrypted-inference", peers.measure_encrypted_inference, (W, b, X, args.n_ei)),
    ]
    rows = []
    timings = {}
    for name, fn, fargs in plan:
        t = time.perf_counter()
        rows.append(peers.run_peer(name, fn, *fargs))
        timings[name] = round(time.perf_counter() - t, 2)
        print(f"  {name}: {timings[name]:.1f}s", flush=True)
    elapsed = time.perf_counter() - started
    print_table(rows)
    load_end = os.getloadavg()[0]
    print(f"total {elapsed:.1f}s; 1-min load average {load_start[0]:.2f} -> {load_end:.2f}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "created_unix": time.time(),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            # Other jobs share this machine; a high load average means noisy timings.
            "loadavg_start": load_start,
            "loadavg_end": list(os.getloadavg()),
        },
        "versions": {
            d: _version(d) for d in ("numpy", "scikit-learn", "tenseal", "encrypted-inference")
        },
        "model": {
            "train_accuracy": model.train_accuracy,
            "test_accuracy": model.test_accuracy,
        },
        "args": {k: str(v) for k, v in vars(args).items()},
        "seconds_per_peer": timings,
        "elapsed_s": round(elapsed, 2),
        "rows": rows,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
