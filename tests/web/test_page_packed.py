"""The page's coeff-packed layout: rowpack's requests, the scores packed by Galois automorphisms.

A linear MNIST model compiled with coeff-packed (N = 8192, a packing tree of one level) is
served on loopback, once with the tree's level on the server (one Galois element) and once on
the client (client_levels = 1: the page also encrypts x(X^e), no Galois key). The page, with
that layout preselected (the Python client's choice too), makes the public key and any Galois
keys re-seeded as heinfer's compact upload, sends 50 shared test digits in one request and
decrypts the packed scores. Every output depends on the tree's automorphism (the page's Galois
key, or the page's automorphic image), so agreement with the plaintext model on all 50 digits
checks those as well as the request and response formats.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from page_helpers import check_page_scores, drop_and_run, leaks, secret_needles
from sklearn.linear_model import LogisticRegression

import heinfer
from heinfer.he.galois import galois_key_bytes
from heinfer.plans.base import codec_for
from heinfer.plans.linear import compile as compile_module
from service_helpers import RunningService

pytest.importorskip("playwright.sync_api")

pytestmark = [pytest.mark.web, pytest.mark.e2e]

DIGITS = 50


@pytest.fixture(scope="module", params=[0, 1], ids=["tree-on-server", "tree-on-client"])
def packed_model(
    request: pytest.FixtureRequest, mnist_estimator: LogisticRegression
) -> heinfer.EncryptedModel:
    with pytest.MonkeyPatch.context() as patch:  # the cost model would pick one of the two
        patch.setattr(compile_module, "_CLIENT_LEVELS", (request.param,))
        model = heinfer.compile(
            mnist_estimator, name="mnist-packed", input_range=(0.0, 1.0), layout="coeff-packed"
        )
    assert model.manifest.layout["packed"]["client_levels"] == request.param
    return model


@pytest.fixture(scope="module")
def packed_service(
    packed_model: heinfer.EncryptedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningService]:
    root = tmp_path_factory.mktemp("packed")
    running = RunningService(
        [
            str(packed_model.save(root / "packed.heinfer")),
            "--workers", "1",
            "--key-store", str(root / "keys"),
            "--log-level", "warning",
        ]
    )
    yield running
    running.stop()


def key_parts(body: bytes) -> dict[int, bytes]:
    """The parts of a HEK1 key upload by kind (magic, fingerprint, count, then kind/length/blob)."""
    assert body[:4] == b"HEK1"
    parts, offset = {}, 37
    for _ in range(body[36]):
        kind, length = struct.unpack_from("<BI", body, offset)
        parts[kind] = body[offset + 5 : offset + 5 + length]
        offset += 5 + length
    assert offset == len(body)
    return parts


def test_page_packs_fifty_digits_like_the_plaintext_model(
    packed_service: RunningService,
    browser: Any,
    mnist: dict[str, np.ndarray],
    packed_model: heinfer.EncryptedModel,
    tmp_path: Path,
) -> None:
    spec = packed_model.manifest.layout["packed"]
    elements = packed_model.manifest.keys.galois_elements
    assert bool(elements) == (spec["client_levels"] < spec["levels"])
    page = browser.new_page()
    requests: list[Any] = []
    page.on("request", lambda request: requests.append(request))
    page.goto(f"{packed_service.url}/?audit=1")
    page.wait_for_selector("body[data-layouts='mnist-packed']", state="attached", timeout=60_000)
    options = page.eval_on_selector_all("#layout option", "(all) => all.map((o) => o.value)")
    assert options == ["coeff-packed", "coeff-rowpack", "coeff-batch"]
    assert page.input_value("#layout") == "coeff-packed"

    images = np.rint(mnist["X_test"][:DIGITS] * 255).astype(np.uint8)
    X = images.astype(np.float64) / 255.0
    result = drop_and_run(page, images, timeout_ms=300_000)
    page.screenshot(path=str(tmp_path / "page-packed.png"), full_page=True)

    check_page_scores(result, packed_model, X, "coeff-packed")

    urls = [request.url for request in requests]
    assert all(url.startswith(f"{packed_service.url}/") for url in urls), urls
    bodies = [request.post_data_buffer or b"" for request in requests]
    infer = [body for body in bodies if body[:4] == b"HEP1"]
    assert len(infer) == 1 and struct.unpack_from("<I", infer[0], 4)[0] == DIGITS
    context = codec_for(packed_model.manifest).context
    images = 1 << spec["client_levels"]  # ciphertexts per digit: x and its automorphic images
    assert len(infer[0]) == 8 + DIGITS * images * context.request_bytes
    uploads = [key_parts(body) for body in bodies if body[:4] == b"HEK1"]
    assert len(uploads) == 1 and set(uploads[0]) == {1, 3}  # public and Galois
    # the whole tree on the client: the Galois part is the Python client's 32-byte empty form
    assert len(uploads[0][3]) == galois_key_bytes(context, elements) >= 32
    secret = bytes(page.evaluate(
        "() => Array.from(window.heinferClients.get('mnist-packed').secretBytes())"))
    page.close()
    needles = secret_needles(secret)
    assert len(needles) > 100 and leaks(needles, bodies) == 0
    assert leaks(needles, [b"\x00" + secret]) == len(needles)  # the scan can fail


KEY_UPLOAD = """async ({allowed}) => {
    const { default: initialize } = await import('./web/vendor/node-seal/index_throws.js');
    const h = await import('./web/heinfer.js');
    const manifest = await (await fetch('./v2/models/mnist-packed/manifest')).json();
    if (allowed !== null) manifest.allowed_layouts = allowed;  // as the service states it
    const client = new h.Client({ model: 'mnist-packed', seal: await initialize(), manifest });
    try {
        return { body: Array.from(client.keyUpload()) };
    } catch (error) {
        return { error: `${error.name}: ${error.message}` };
    }
}"""


def test_page_uploads_galois_keys_only_when_coeff_packed_is_open(
    packed_service: RunningService, browser: Any
) -> None:
    """A tenant whose manifest leaves coeff-packed out uploads the public key alone; with every
    layout open (the control) the Galois keys come too; with none open nothing is made."""
    page = browser.new_page()
    page.goto(f"{packed_service.url}/")
    page.wait_for_selector("body[data-layouts='mnist-packed']", state="attached", timeout=60_000)

    def upload(allowed: list[str] | None) -> dict[str, Any]:
        return dict(page.evaluate(KEY_UPLOAD, {"allowed": allowed}))

    limited = upload(["coeff-batch", "coeff-rowpack"])
    assert set(key_parts(bytes(limited["body"]))) == {1}  # public only
    assert set(key_parts(bytes(upload(None)["body"]))) == {1, 3}  # public and Galois
    assert set(key_parts(bytes(upload(["coeff-packed"])["body"]))) == {1, 3}
    refused = upload([])
    assert refused["error"].startswith("LayoutDisabledError: no layout of model mnist-packed")
