"""Encrypted CNN on MNIST: heinfer's packed CKKS plan vs a TenSEAL tutorial-style CNN.

    PYTHONPATH=src python bench/cnn.py [--retrain] [--agree-seconds 120] [--tenseal-images 10]
                                       [--batch-images 4096] [--skip-tenseal] [--quick]

Trains (or loads bench/results/cnn_spec.npz) the default `heinfer.nn.he_friendly_cnn`, reports
plaintext accuracy, encrypted latency (median of ~20 single images, keys parsed once with
`plan.load_keys`, as a worker's key cache holds them), key parse time, key / request / response
bytes, agreement of encrypted argmax with the plaintext network on as many
test digits as fit in the time budget, and the same for TenSEAL's "Encrypted convolution on
MNIST" tutorial model (ts.ckks_vector, im2col_encoding, conv2d_im2col, square, mm) in the same
run. The batched layout (one ciphertext per pixel, image i in slot i) is timed on one request
of `--batch-images` test digits: server time (key parse and evaluation apart), images/s,
batch-only key bytes, request and response bytes per image, agreement and max error against the
manifest's batched claim. `--quick` (a smoke run: 3 latency images, 10 s of agreement, a
64-image batch, no TenSEAL) checks the script still runs.
Writes bench/results/cnn.json. Needs torch (CPU build: pip install torch==2.13.0).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, cast

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from heinfer.errors import HeinferError  # noqa: E402
from heinfer.plans.network import (  # noqa: E402
    BATCH_LAYOUT,
    NetworkCodec,
    NetworkPlan,
    NetworkSpec,
    compile_network,
    import_torch,
)
from heinfer.plans.network.manifest import plan_manifest  # noqa: E402
from heinfer.plans.network.simulate import simulate  # noqa: E402

DATA = Path(os.environ.get("HEINFER_MNIST", "/work/shared/data/mnist"))
RESULTS = ROOT / "bench" / "results"


def idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    nd = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(nd)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * nd).reshape(dims)


def load_mnist() -> tuple[np.ndarray, ...]:
    Xtr = idx(DATA / "train-images-idx3-ubyte.gz").reshape(-1, 784) / 255.0
    ytr = idx(DATA / "train-labels-idx1-ubyte.gz").astype(np.int64)
    Xte = idx(DATA / "test-images-idx3-ubyte.gz").reshape(-1, 784) / 255.0
    yte = idx(DATA / "test-labels-idx1-ubyte.gz").astype(np.int64)
    return Xtr, ytr, Xte, yte


def save_spec(spec: NetworkSpec, path: Path) -> None:
    np.savez(path, **cast(dict[str, Any], spec.to_arrays()))  # numpy's stub reads ** as pickle


def load_spec(path: Path) -> NetworkSpec | None:
    """The spec saved by `save_spec`; None for a cache in another (older) format."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return NetworkSpec.from_arrays({k: z[k] for k in z.files})
    except (HeinferError, KeyError, ValueError):
        return None


def small_cnn(
    Xtr: np.ndarray, ytr: np.ndarray, *, retrain: bool = False, seed: int = 0
) -> tuple[NetworkSpec, float | None]:
    """The default CNN trained on 1,500 digits for 3 epochs (as tests/e2e does): the same
    architecture, so the same keys and HE work per request, in well under a minute. Cached in
    bench/results/cnn_spec_small.npz; returns (spec, training seconds or None if cached)."""
    cache = RESULTS / "cnn_spec_small.npz"
    spec = load_spec(cache) if cache.exists() and not retrain else None
    if spec is not None:
        return spec, None
    from heinfer.nn import train_mnist_cnn

    t = time.perf_counter()
    model = train_mnist_cnn(Xtr[:1500], ytr[:1500], epochs=3, seed=seed)
    train_s = time.perf_counter() - t
    spec = import_torch(model)
    RESULTS.mkdir(parents=True, exist_ok=True)
    save_spec(spec, cache)
    return spec, train_s


def bench_heinfer(
    spec: NetworkSpec, Xtr: np.ndarray, Xte: np.ndarray, args: argparse.Namespace
) -> tuple[dict[str, Any], NetworkPlan]:
    t = time.perf_counter()
    plan = compile_network(spec, "mnist-cnn", calibration=Xtr[:2000])
    compile_s = time.perf_counter() - t
    network = plan_manifest(plan.manifest)
    codec = NetworkCodec(plan.manifest)
    t = time.perf_counter()
    secret = codec.keygen()
    parts = codec.public_keys(secret, codec.key_parts())
    keygen_s = time.perf_counter() - t
    key_bytes = {k: len(v) for k, v in parts.items()}
    upload = codec.key_upload(secret)  # every layout's keys, as `Client.upload_keys` sends
    plain = spec.predict_plain(Xte)
    # cold call: key parse (once per worker) + plaintext encoding of the weights
    req = codec.encrypt(secret, Xte[0])
    t = time.perf_counter()
    keys = plan.load_keys(upload)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    resp = plan.evaluate(req, keys)
    cold_s = load_s + time.perf_counter() - t
    lat, enc_t, dec_t = [], [], []
    for i in range(args.latency_images):
        t = time.perf_counter()
        req = codec.encrypt(secret, Xte[i])
        enc_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        resp = plan.evaluate(req, keys)
        lat.append(time.perf_counter() - t)
        t = time.perf_counter()
        codec.decrypt(secret, resp)
        dec_t.append(time.perf_counter() - t)
    req_bytes, resp_bytes = len(req), len(resp)
    # agreement on as many test digits as fit in the budget
    deadline = time.perf_counter() + args.agree_seconds
    n, agree, max_err, _correct = 0, 0, 0.0, 0
    while n < len(Xte) and time.perf_counter() < deadline:
        batch = Xte[n : n + 8]
        scores = codec.decrypt(secret, plan.evaluate(codec.encrypt(secret, batch), keys))
        ref = plain[n : n + len(batch)]
        agree += int((scores.argmax(1) == ref.argmax(1)).sum())
        max_err = max(max_err, float(np.abs(scores - ref).max()))
        n += len(batch)
    sim = simulate(plan, Xte, np.random.default_rng(0))
    result = {
        "params": network["params"],
        "galois_steps": network["keys"]["galois_steps"],
        "precision_claim": network["precision"]["score_abs_error"],
        "compile_s": compile_s,
        "keygen_s": keygen_s,
        "key_bytes": key_bytes,
        "key_bytes_total": sum(key_bytes.values()),
        "key_upload_bytes": len(upload),
        "key_parse_s": load_s,
        "parsed_key_bytes": keys.nbytes,
        "request_bytes": req_bytes,
        "response_bytes": resp_bytes,
        "cold_first_call_s": cold_s,
        "latency_median_s": statistics.median(lat),
        "latency_p90_s": float(np.percentile(lat, 90)),
        "client_encrypt_median_s": statistics.median(enc_t),
        "client_decrypt_median_s": statistics.median(dec_t),
        "throughput_img_per_s": 1.0 / statistics.median(lat),
        "agreement_images": n,
        "agreement": agree / max(n, 1),
        "max_abs_score_error": max_err,
        "simulated_agreement_all": float((sim.argmax(1) == plain.argmax(1)).mean()),
    }
    return result, plan


def bench_batch(spec: NetworkSpec, plan: NetworkPlan, X: np.ndarray) -> dict:
    """One batched request of len(X) images: client encrypt, server evaluate, client decrypt."""
    batch = plan_manifest(plan.manifest)["batch"]
    codec = NetworkCodec(plan.manifest)
    secret = codec.keygen()
    parts = codec.public_keys(secret, codec.key_parts([BATCH_LAYOUT]))
    upload = codec.key_upload(secret, [BATCH_LAYOUT])
    n = len(X)
    t = time.perf_counter()
    req = codec.encrypt(secret, X, BATCH_LAYOUT)
    enc_s = time.perf_counter() - t
    t = time.perf_counter()
    keys = plan.load_keys(upload)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    resp = plan.evaluate(req, keys)
    eval_s = time.perf_counter() - t
    t = time.perf_counter()
    scores = codec.decrypt(secret, resp)
    dec_s = time.perf_counter() - t
    ref = spec.predict_plain(X)
    sim = simulate(plan, X, np.random.default_rng(0), layout=BATCH_LAYOUT)
    return {
        "images": n,
        "work": batch["work"],
        "precision_claim": batch["precision"]["score_abs_error"],
        "precision": batch["precision"],
        "key_bytes": {k: len(v) for k, v in parts.items()},
        "key_bytes_total": sum(len(v) for v in parts.values()),
        "key_upload_bytes": len(upload),
        "request_bytes": len(req),
        "response_bytes": len(resp),
        "request_bytes_per_image": len(req) / n,
        "response_bytes_per_image": len(resp) / n,
        "client_encrypt_s": enc_s,
        "server_s": load_s + eval_s,
        "server_load_s": load_s,
        "server_eval_s": eval_s,
        "client_decrypt_s": dec_s,
        "throughput_img_per_s": n / eval_s,
        "agreement": float((scores.argmax(1) == ref.argmax(1)).mean()),
        "max_abs_score_error": float(np.abs(scores - ref).max()),
        "simulated_max_abs_score_error": float(np.abs(sim - ref).max()),
    }


def tenseal_tutorial(
    Xtr: np.ndarray, ytr: np.ndarray, Xte: np.ndarray, yte: np.ndarray, args: argparse.Namespace
) -> dict[str, Any]:
    """TenSEAL's 'Encrypted convolution on MNIST' tutorial model and HE evaluation."""
    import tenseal as ts
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(2)

    class ConvNet(torch.nn.Module):
        def __init__(self, hidden: int = 64, output: int = 10) -> None:
            super().__init__()
            self.conv1 = torch.nn.Conv2d(1, 4, kernel_size=7, padding=0, stride=3)
            self.fc1 = torch.nn.Linear(256, hidden)
            self.fc2 = torch.nn.Linear(hidden, output)

        def forward(self, x: Any) -> Any:
            x = self.conv1(x)
            x = x * x
            x = x.view(-1, 256)
            x = self.fc1(x)
            x = x * x
            return self.fc2(x)

    model = ConvNet()
    X = torch.tensor(Xtr, dtype=torch.float32).view(-1, 1, 28, 28)
    y = torch.tensor(ytr)
    opt = torch.optim.Adam(model.parameters(), lr=0.001)
    for _ in range(10):  # the tutorial trains 10 epochs, batch 64
        perm = torch.randperm(len(X))
        for i in range(0, len(X), 64):
            b = perm[i : i + 64]
            loss = torch.nn.functional.cross_entropy(model(X[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        plain = model(torch.tensor(Xte, dtype=torch.float32).view(-1, 1, 28, 28)).numpy()
    acc = float((plain.argmax(1) == yte).mean())

    # tutorial parameters
    bits_scale = 26
    context = ts.context(
        ts.SCHEME_TYPE.CKKS,
        poly_modulus_degree=8192,
        coeff_mod_bit_sizes=[31] + [bits_scale] * 6 + [31],
    )
    context.global_scale = 2**bits_scale
    t = time.perf_counter()
    context.generate_galois_keys()
    keygen_s = time.perf_counter() - t
    public = context.copy()
    public.make_context_public()
    key_bytes = len(public.serialize(save_galois_keys=True, save_relin_keys=True))

    w_conv = model.conv1.weight.data.view(4, 7, 7).tolist()
    assert model.conv1.bias is not None  # Conv2d's default bias=True
    b_conv = model.conv1.bias.data.tolist()
    fc1_w = model.fc1.weight.T.data.tolist()
    fc1_b = model.fc1.bias.data.tolist()
    fc2_w = model.fc2.weight.T.data.tolist()
    fc2_b = model.fc2.bias.data.tolist()
    lat, agree, n, req_b, resp_b = [], 0, 0, 0, 0
    for i in range(args.tenseal_images):
        img = Xte[i].reshape(28, 28).tolist()
        enc_x, windows_nb = ts.im2col_encoding(context, img, 7, 7, 3)
        req = enc_x.serialize()
        req_b = len(req)
        t = time.perf_counter()
        enc_x = ts.lazy_ckks_vector_from(req)
        enc_x.link_context(public)
        channels = [
            enc_x.conv2d_im2col(k, windows_nb) + b for k, b in zip(w_conv, b_conv, strict=True)
        ]
        out = ts.CKKSVector.pack_vectors(channels)
        out.square_()
        out = out.mm(fc1_w) + fc1_b
        out.square_()
        out = out.mm(fc2_w) + fc2_b
        resp = out.serialize()
        lat.append(time.perf_counter() - t)
        resp_b = len(resp)
        res = ts.lazy_ckks_vector_from(resp)
        res.link_context(context)
        scores = np.array(res.decrypt())
        agree += int(scores.argmax() == plain[i].argmax())
        n += 1
    return {
        "model": "TenSEAL tutorial ConvNet: conv 4x7x7 stride 3 -> square -> fc 256x64 -> "
        "square -> fc 64x10",
        "params": {"poly_modulus_degree": 8192, "coeff_modulus_bits": [31] + [26] * 6 + [31]},
        "plain_accuracy": acc,
        "keygen_s": keygen_s,
        "key_bytes_total": key_bytes,
        "request_bytes": req_b,
        "response_bytes": resp_b,
        "latency_median_s": statistics.median(lat),
        "agreement_images": n,
        "agreement": agree / max(n, 1),
    }


def bench_repeated_query(plan: NetworkPlan, X: np.ndarray, layouts: list[str]) -> dict:
    """The repeated-query attack's target, measured with the secret key: the weight-dependent
    part E of the pre-flood result (every slot part; single: one request per image of X,
    batch: every slot filled from X) against the manifest's bound and 2^-s * flood std."""
    from heinfer.plans.network.bound import measured_error

    network = plan_manifest(plan.manifest)
    codec = NetworkCodec(plan.manifest)
    secret = codec.keygen()
    keys = plan.load_keys(codec.key_upload(secret))
    client = codec.client_keys(secret)
    out = {}
    for layout in layouts:
        privacy = network["privacy"] if layout == "single" else network["batch"]["privacy"]
        inputs = X if layout == "single" else np.resize(X, (plan.ctx.slots, X.shape[1]))
        t = time.perf_counter()
        errors = measured_error(plan, client, keys, inputs, layout)
        worst = float(np.abs(errors).max())
        allowed = 2.0 ** -privacy["statistical_security_bits"] * privacy["flood_noise_std"]
        out[layout] = {
            "requests": len(X) if layout == "single" else 1,
            "slot_parts": int(errors.size),
            "measured_max_abs": worst,
            "measured_rms": float(np.sqrt(np.mean(errors**2))),
            "bound": privacy["evaluation_error_bound"],
            "bound_over_measured_log2": math.log2(privacy["evaluation_error_bound"] / worst),
            "statistical_security_bits": privacy["statistical_security_bits"],
            "flood_noise_std": privacy["flood_noise_std"],
            "holds": worst <= allowed,
            "seconds": time.perf_counter() - t,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--latency-images", type=int, default=20)
    ap.add_argument("--agree-seconds", type=float, default=120.0)
    ap.add_argument("--tenseal-images", type=int, default=10)
    ap.add_argument("--skip-tenseal", action="store_true")
    ap.add_argument(
        "--batch-images", type=int, default=4096, help="batched-layout request size (0: skip)"
    )
    ap.add_argument(
        "--privacy-images",
        type=int,
        default=3,
        help="measure the repeated-query attack's target E with the secret key on this many "
        "single-image requests and one full batch (0: skip; --quick: single images only)",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: a small CNN (1,500 digits, 3 epochs, cached apart), 3 latency images, "
        "10 s of agreement, a 64-image batch, no TenSEAL; writes cnn-quick.json",
    )
    args = ap.parse_args()
    if args.quick:
        args.latency_images, args.agree_seconds, args.batch_images = 3, 10.0, 64
        args.skip_tenseal = True
    RESULTS.mkdir(parents=True, exist_ok=True)
    Xtr, ytr, Xte, yte = load_mnist()
    train_s = None
    if args.quick:
        spec, train_s = small_cnn(Xtr, ytr, retrain=args.retrain, seed=args.seed)
    else:
        cache = RESULTS / "cnn_spec.npz"
        cached = load_spec(cache) if cache.exists() and not args.retrain else None
        if cached is not None:
            spec = cached
        else:
            from heinfer.nn import train_mnist_cnn

            t = time.perf_counter()
            model = train_mnist_cnn(Xtr, ytr, epochs=args.epochs, seed=args.seed)
            train_s = time.perf_counter() - t
            spec = import_torch(model)
            save_spec(spec, cache)
    plain_acc = float((spec.predict_plain(Xte).argmax(1) == yte).mean())
    print(f"plaintext accuracy {plain_acc:.4f} on {len(yte)} test digits", flush=True)
    he, plan = bench_heinfer(spec, Xtr, Xte, args)
    he["plain_accuracy"] = plain_acc
    he["train_s"] = train_s
    if args.batch_images:
        # the shared split has 1,500 test digits: a full batch is topped up from the training
        # digits (agreement with the plaintext network does not depend on which digits)
        extra = max(0, args.batch_images - len(Xte))
        X = np.concatenate([Xte[: args.batch_images], Xtr[len(Xtr) - extra :]])
        he["batch"] = bench_batch(spec, plan, X)
        he["batch"]["digits"] = {"test": len(X) - extra, "train": extra}
    if args.privacy_images:
        layouts = ["single"] if args.quick else ["single", "batch"]
        he["repeated_query"] = bench_repeated_query(plan, Xte[: args.privacy_images], layouts)
    ts_res = None if args.skip_tenseal else tenseal_tutorial(Xtr, ytr, Xte, yte, args)
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "heinfer": he,
        "tenseal_tutorial": ts_res,
    }
    if ts_res:
        result["latency_ratio_tenseal_over_heinfer"] = (
            ts_res["latency_median_s"] / he["latency_median_s"]
        )
    rows = [
        ("plaintext accuracy", f"{plain_acc:.4f}", ts_res and f"{ts_res['plain_accuracy']:.4f}"),
        (
            "latency / image (median)",
            f"{he['latency_median_s'] * 1e3:.0f} ms",
            ts_res and f"{ts_res['latency_median_s'] * 1e3:.0f} ms",
        ),
        (
            "key upload",
            f"{he['key_bytes_total'] / 1e6:.2f} MB",
            ts_res and f"{ts_res['key_bytes_total'] / 1e6:.2f} MB",
        ),
        (
            "request",
            f"{he['request_bytes'] / 1e3:.0f} kB",
            ts_res and f"{ts_res['request_bytes'] / 1e3:.0f} kB",
        ),
        (
            "response",
            f"{he['response_bytes'] / 1e3:.0f} kB",
            ts_res and f"{ts_res['response_bytes'] / 1e3:.0f} kB",
        ),
        (
            "argmax agreement",
            f"{he['agreement']:.4f} ({he['agreement_images']} imgs)",
            ts_res and f"{ts_res['agreement']:.4f} ({ts_res['agreement_images']} imgs)",
        ),
    ]
    print(f"\n{'':28s} {'heinfer':>22s} {'TenSEAL tutorial':>22s}")
    for name, a, b in rows:
        print(f"{name:28s} {a:>22s} {b or '-':>22s}")
    if ts_res:
        ratio = result["latency_ratio_tenseal_over_heinfer"]
        print(f"\nlatency ratio TenSEAL / heinfer: {ratio:.1f}x")
    print(
        f"max |score error| {he['max_abs_score_error']:.4f} (claim {he['precision_claim']:.4f});"
        f" cold first call {he['cold_first_call_s']:.2f} s"
    )
    print(
        f"key upload {he['key_upload_bytes'] / 1e6:.2f} MB parses in {he['key_parse_s']:.2f} s "
        f"to {he['parsed_key_bytes'] / 1e6:.1f} MB (what a worker's key cache holds per key)"
    )
    if "batch" in he:
        b = he["batch"]
        print(
            f"batched layout, {b['images']} images in one request: server {b['server_s']:.1f} s "
            f"({b['throughput_img_per_s']:.0f} images/s; load {b['server_load_s']:.1f} s), "
            f"client encrypt {b['client_encrypt_s']:.1f} s / decrypt {b['client_decrypt_s']:.2f} s"
        )
        print(
            f"  keys {b['key_bytes_total'] / 1e6:.2f} MB (public + relin), request "
            f"{b['request_bytes'] / 1e6:.1f} MB ({b['request_bytes_per_image'] / 1e3:.1f} kB/image)"
            f", response {b['response_bytes'] / 1e6:.2f} MB "
            f"({b['response_bytes_per_image']:.0f} B/image)"
        )
        print(
            f"  agreement {b['agreement']:.4f}, max |score error| {b['max_abs_score_error']:.4f}"
            f" (claim {b['precision_claim']:.4f}; "
            f"simulated {b['simulated_max_abs_score_error']:.4f})"
        )
    for layout, r in he.get("repeated_query", {}).items():
        print(
            f"repeated-query target E ({layout}, {r['slot_parts']} slot parts): max "
            f"{r['measured_max_abs']:.3g}, bound {r['bound']:.3g} "
            f"(2^{r['bound_over_measured_log2']:.1f} above), s = "
            f"{r['statistical_security_bits']:.2f} bits against a flood std of "
            f"{r['flood_noise_std']:.3g}: {'holds' if r['holds'] else 'FAILS'}"
        )
    (RESULTS / ("cnn-quick.json" if args.quick else "cnn.json")).write_text(
        json.dumps(result, indent=2)
    )


if __name__ == "__main__":
    main()
