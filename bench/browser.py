"""In-browser key generation, encryption and decryption times per digit, for the page at /.

    PYTHONPATH=src python bench/browser.py [--digits 20] [--loads 3] [--batch 50]
                                           [--screenshot docs/img/page.png]

Starts `heinfer serve` on loopback for the linear MNIST model and for the default CNN (trained
briefly here: timings and sizes depend on the architecture, not on the weights), and with
`--models mnist-packed` for the linear model compiled with coeff-packed, opens the page
in Debian's headless chromium (Playwright, executable_path=/usr/bin/chromium), and for each model
loads the page `--loads` times (each load makes a fresh secret key) and predicts `--digits` test
digits per load through the page's own button. The page's stage timers (performance.now() around
each call) give the numbers; medians are reported with the bytes each digit sent and received.
For the linear model it also drops `--batch` digits at once with the coeff-batch layout picked
(one request, one ciphertext per pixel for all of them), once per load after the per-digit runs
(keys already uploaded), and reports that request's stage times in total and per digit.
With --screenshot, a digit is drawn with the mouse on the CNN page and the page is saved as PNG.
Writes bench/results/browser.json.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from playwright.sync_api import FilePayload, Page, sync_playwright
from sklearn.linear_model import LogisticRegression

import heinfer
from heinfer.datasets import load_mnist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from linear import Service

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
RESULTS = Path(__file__).resolve().parent / "results"
STAGES = {
    "key generation": "keygen_ms",
    "public key(s): make": "public_keys_ms",
    "public key(s): upload": "key_upload_ms",
    "encrypt": "encrypt_ms",
    "service (network + encrypted inference)": "service_ms",
    "decrypt": "decrypt_ms",
}


def _models(workdir: Path, epochs: int, names: list[str]) -> dict[str, Path]:
    images, ytr = load_mnist(
        MNIST / "train-images-idx3-ubyte.gz", MNIST / "train-labels-idx1-ubyte.gz"
    )
    Xtr = images.astype(np.float64) / 255.0
    paths: dict[str, Path] = {}
    if "mnist" in names or "mnist-packed" in names:
        linear = LogisticRegression(max_iter=200).fit(Xtr, ytr)
        for name, layout in (("mnist", None), ("mnist-packed", "coeff-packed")):
            if name in names:
                compiled = heinfer.compile(
                    linear, name=name, input_range=(0.0, 1.0), layout=layout
                )
                paths[name] = compiled.save(workdir / f"{name}.heinfer")
    if "mnist-cnn" in names:
        from heinfer.nn import train_mnist_cnn

        network = train_mnist_cnn(Xtr[:1500], ytr[:1500], epochs=epochs)
        compiled = heinfer.compile(network, name="mnist-cnn", X=Xtr[:500])
        paths["mnist-cnn"] = compiled.save(workdir / "cnn.heinfer")
    return paths


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image.reshape(28, 28).astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _predict(page: Page, image: np.ndarray, run: int) -> dict[str, Any]:
    """One digit through the page's photo input and button; the page's own result record."""
    photo: FilePayload = {"name": "d.png", "mimeType": "image/png", "buffer": _png(image)}
    page.set_input_files("#photo", files=[photo])
    page.wait_for_selector(f"#pad[data-image='{run}']", state="attached")
    page.click("#go")
    page.wait_for_selector(
        f"body[data-run='{run}'], body[data-error='{run}']", state="attached", timeout=300_000
    )
    result: dict[str, Any] = page.evaluate("window.heinferPage.lastResult")
    if result is None or not page.inner_text("#status").startswith("Done"):
        raise RuntimeError(page.inner_text("#status"))
    return result


def _load(page: Page, url: str, model: str) -> float:
    page.goto(f"{url}/?audit=1")
    page.wait_for_selector("body[data-ready='1']", state="attached", timeout=60_000)
    page.select_option("#model", model)
    return float(page.inner_text("#status").split("ready in ")[1].split(" ms")[0])


def measure(page: Page, url: str, model: str, images: np.ndarray, loads: int) -> dict[str, Any]:
    samples: dict[str, list[float]] = {key: [] for key in STAGES.values()}
    init_ms: list[float] = []
    sent: list[int] = []
    received: list[int] = []
    key_upload = 0
    for _ in range(loads):
        init_ms.append(_load(page, url, model))
        for run, image in enumerate(images, start=1):
            result = _predict(page, image, run)
            for stage, ms in result["times"]:
                if stage in STAGES:
                    samples[STAGES[stage]].append(ms)
            if run > 1:  # steady state: the first digit also uploads the keys
                sent.append(result["sent"])
                received.append(result["received"])
            else:
                key_upload = result["sent"]
    out: dict[str, Any] = {
        "seal_init_ms": statistics.median(init_ms),
        **{key: statistics.median(v) for key, v in samples.items() if v},
        "samples": {key: len(v) for key, v in samples.items()},
        "sent_bytes_per_digit": statistics.median(sent) if sent else None,
        "received_bytes_per_digit": statistics.median(received) if received else None,
        "first_digit_sent_bytes": key_upload,
    }
    return out


def measure_batch(
    page: Page, url: str, model: str, images: np.ndarray, loads: int
) -> dict[str, Any]:
    """`loads` page loads, each: one single-digit run (key generation and upload), then all
    `images` in one coeff-batch request; that request's stages, total and per digit."""
    totals: dict[str, list[float]] = {key: [] for key in STAGES.values()}
    sent: list[int] = []
    received: list[int] = []
    for _ in range(loads):
        _load(page, url, model)
        page.wait_for_selector(f"body[data-layouts='{model}']", state="attached")
        _predict(page, images[0], 1)
        page.select_option("#layout", "coeff-batch")
        photos: list[FilePayload] = [
            {"name": f"{i}.png", "mimeType": "image/png", "buffer": _png(image)}
            for i, image in enumerate(images)
        ]
        page.set_input_files("#photo", files=photos)
        page.wait_for_selector("#pad[data-image='2']", state="attached")
        page.click("#go")
        page.wait_for_selector("body[data-run='2'], body[data-error='2']", state="attached",
                               timeout=600_000)
        result: dict[str, Any] = page.evaluate("window.heinferPage.lastResult")
        if result is None or result.get("samples") != len(images):
            raise RuntimeError(page.inner_text("#status"))
        for stage, ms in result["times"]:
            if stage in STAGES:
                totals[STAGES[stage]].append(ms)
        sent.append(result["sent"])
        received.append(result["received"])
    count = len(images)
    out: dict[str, Any] = {"digits_per_request": count}
    for key, values in totals.items():
        if values:
            out[key] = statistics.median(values)
            out[key.replace("_ms", "_ms_per_digit")] = statistics.median(values) / count
    out["request_bytes"] = statistics.median(sent)
    out["response_bytes"] = statistics.median(received)
    out["loads"] = loads
    return out


def screenshot(page: Page, url: str, path: Path) -> None:
    """Draw a 7 with the mouse on the CNN page, predict, save the page."""
    _load(page, url, "mnist-cnn")
    box = page.locator("#pad").bounding_box()
    assert box is not None
    x0, y0 = box["x"], box["y"]
    page.mouse.move(x0 + 70, y0 + 60)
    page.mouse.down()
    for x, y in [(150, 58), (210, 60), (185, 120), (160, 180), (140, 235)]:
        page.mouse.move(x0 + x, y0 + y, steps=8)
    page.mouse.up()
    page.click("#go")
    page.wait_for_selector("body[data-run='1'], body[data-error='1']", state="attached",
                           timeout=300_000)
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--digits", type=int, default=20)
    ap.add_argument("--loads", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--batch", type=int, default=50, help="digits in the coeff-batch request")
    ap.add_argument("--models", nargs="+", default=["mnist", "mnist-cnn"],
                    choices=["mnist", "mnist-packed", "mnist-cnn"],
                    help="mnist-packed: the linear model compiled with coeff-packed (Galois keys)")
    ap.add_argument("--screenshot", type=Path)
    args = ap.parse_args()
    Xte, _ = load_mnist(MNIST / "test-images-idx3-ubyte.gz", MNIST / "test-labels-idx1-ubyte.gz")
    images = Xte[: args.digits].astype(np.uint8)
    batch_images = Xte[: args.batch].astype(np.uint8)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as playwright:
        paths = _models(Path(tmp), args.epochs, args.models)
        browser = playwright.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
        results["browser"] = f"Chromium {browser.version} (headless), Playwright"
        for model, path in paths.items():
            service = Service(path, workers=1)
            try:
                page = browser.new_page()
                results[model] = measure(page, service.url, model, images, args.loads)
                if model == "mnist" and args.batch:
                    batch = measure_batch(browser.new_page(), service.url, model, batch_images,
                                          args.loads)
                    results["mnist coeff-batch"] = batch
                    print("mnist coeff-batch", json.dumps(batch, indent=1), flush=True)
                if args.screenshot and model == "mnist-cnn":
                    screenshot(browser.new_page(), service.url, args.screenshot)
            finally:
                service.stop()
            print(model, json.dumps(results[model], indent=1), flush=True)
        browser.close()
    results["machine"] = {"python": platform.python_version(), "cpu": platform.processor()}
    results["digits_per_load"], results["loads"] = args.digits, args.loads
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "browser.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
