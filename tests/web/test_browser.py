"""The page `heinfer serve` shows, driven in headless Chromium against a real service.

For 50 digits of the shared test set and each served model (the linear MNIST model and a small
CNN), the test hands the page an MNIST image as a dropped photo, presses the button and reads the
predicted digit and the decrypted scores off the page; they must match the plaintext model. It
also records every request the page made: none may leave the service's origin, and none may
carry bytes of the page's secret key. Debian's chromium, driven by Playwright from PyPI.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from page_helpers import leaks, png, secret_needles

import heinfer
from heinfer.web import CONTENT_SECURITY_POLICY
from service_helpers import RunningService

torch = pytest.importorskip("torch")
pytest.importorskip("playwright.sync_api")

pytestmark = [pytest.mark.web, pytest.mark.e2e, pytest.mark.cnn]

DIGITS = 50


@pytest.fixture(scope="module")
def cnn_model(mnist: dict[str, np.ndarray]) -> heinfer.EncryptedModel:
    from heinfer.nn import train_mnist_cnn

    network = train_mnist_cnn(mnist["X_train"][:1500], mnist["y_train"][:1500], epochs=3)
    return heinfer.compile(network, name="mnist-cnn", X=mnist["X_train"][:500])


@pytest.fixture(scope="module")
def web_service(
    cnn_model: heinfer.EncryptedModel,
    mnist_model_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningService]:
    """Both models behind one service on loopback, where the page is on by default."""
    root = tmp_path_factory.mktemp("web")
    running = RunningService(
        [
            str(mnist_model_path),
            str(cnn_model.save(root / "cnn.heinfer")),
            "--workers", "2",
            "--key-store", str(root / "keys"),
            "--log-level", "warning",
        ]
    )
    yield running
    running.stop()


class PageRun:
    """One browser session on the page, with every request and console line it produced."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.requests: list[Any] = []
        self.console: list[str] = []
        page.on("request", lambda request: self.requests.append(request))
        page.on("console", lambda message: self.console.append(message.text))

    def predict(self, image: np.ndarray, run: int) -> dict[str, Any]:
        """Drop `image` (28x28 uint8) as a PNG file, press the button, read the result."""
        self.page.set_input_files(
            "#photo", files=[{"name": f"{run}.png", "mimeType": "image/png",
                              "buffer": png(image)}]
        )
        self.page.wait_for_selector(f"#pad[data-image='{run}']", state="attached")
        self.page.click("#go")
        self.page.wait_for_selector(
            f"body[data-run='{run}'], body[data-error='{run}']", state="attached", timeout=120_000
        )
        status = self.page.inner_text("#status")
        assert status.startswith("Done"), status
        result: dict[str, Any] = self.page.evaluate("window.heinferPage.lastResult")
        result["shown"] = int(self.page.inner_text("#digit"))
        result["input"] = self.page.evaluate("Array.from(window.heinferPage.lastInput)")
        return result

    def secret(self, model: str) -> bytes:
        values = self.page.evaluate(
            "(m) => Array.from(window.heinferClients.get(m).secretBytes())", model
        )
        return bytes(values)


def test_page_predicts_like_the_plaintext_models(
    web_service: RunningService,
    browser: Any,
    mnist: dict[str, np.ndarray],
    mnist_model_path: Path,
    cnn_model: heinfer.EncryptedModel,
    tmp_path: Path,
) -> None:
    page_response = httpx.get(f"{web_service.url}/")
    assert page_response.status_code == 200
    assert page_response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY

    images = np.rint(mnist["X_test"][:DIGITS] * 255).astype(np.uint8)
    X = images.astype(np.float64) / 255.0
    linear = heinfer.load_model(mnist_model_path)
    models = {"mnist": linear, "mnist-cnn": cnn_model}
    session = PageRun(browser.new_page())
    session.page.goto(f"{web_service.url}/?audit=1")
    session.page.wait_for_selector("body[data-ready='1']", state="attached", timeout=60_000)

    run = 0
    agreement: dict[str, int] = {}
    for model, compiled in models.items():
        session.page.select_option("#model", model)
        reference = compiled.predict_plain(X)
        bound = compiled.manifest.precision.max_abs_error
        agree = 0
        for i in range(DIGITS):
            run += 1
            result = session.predict(images[i], run)
            assert np.array_equal(np.asarray(result["input"]), X[i])  # the pixels it encrypted
            scores = np.asarray(result["scores"])
            assert result["shown"] == result["digit"] == int(scores.argmax())
            assert np.abs(scores - reference[i]).max() <= bound, (model, i)
            agree += result["digit"] == int(reference[i].argmax())
        agreement[model] = agree
        session.page.screenshot(path=str(tmp_path / f"page-{model}.png"), full_page=True)
    assert agreement == {"mnist": DIGITS, "mnist-cnn": DIGITS}, agreement
    assert (tmp_path / "page-mnist-cnn.png").stat().st_size > 10_000

    # Nothing left the service's origin, and the CSP the page runs under is enforced.
    urls = [request.url for request in session.requests]
    assert urls and all(url.startswith(f"{web_service.url}/") for url in urls), urls
    violation = session.page.evaluate(
        """() => new Promise((resolve) => {
            document.addEventListener(
                'securitypolicyviolation', (e) => resolve(e.effectiveDirective));
            fetch('http://127.0.0.2:9/').catch(() => {});
        })"""
    )
    assert violation == "connect-src"
    assert not [line for line in session.console if "Content Security Policy" in line
                and "127.0.0.2" not in line]

    # No request carried secret-key bytes (uploads are public keys and ciphertexts only).
    bodies = [request.post_data_buffer or b"" for request in session.requests]
    assert sum(len(body) for body in bodies) > 11_000_000  # the CNN's keys were among them
    for model in models:
        needles = secret_needles(session.secret(model))
        assert len(needles) > 100
        assert leaks(needles, bodies) == 0, model
        assert leaks(needles, [b"\x00" + session.secret(model)]) == len(needles)  # it can fail


def test_kept_secret_key_survives_a_reload_and_only_when_asked(
    web_service: RunningService, browser: Any, mnist: dict[str, np.ndarray]
) -> None:
    """'keep my secret key' stores it in this browser's IndexedDB and the next visit reuses it;
    unticked, a reload makes a fresh key."""
    image = np.rint(mnist["X_test"][0] * 255).astype(np.uint8)
    context = browser.new_context()
    secrets = []
    for visit, keep in enumerate([True, True, False]):
        session = PageRun(context.new_page())
        session.page.goto(f"{web_service.url}/?audit=1")
        session.page.wait_for_selector("body[data-ready='1']", state="attached", timeout=60_000)
        session.page.select_option("#model", "mnist")
        if keep:
            session.page.check("#keep")
        result = session.predict(image, 1)
        stages = [stage for stage, _ms in result["times"]]
        assert ("load kept secret key" in stages) == (visit == 1), stages
        secrets.append(session.secret("mnist"))
        session.page.close()
    assert secrets[0] == secrets[1] != secrets[2]
    context.close()
