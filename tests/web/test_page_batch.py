"""The page's coeff-batch layout: many digits in one request, encrypted in headless Chromium.

The JavaScript client makes coeff-batch ciphertexts (c1 expanded from one public seed with
SHAKE-128, c0 = -(c1*s + e) + round(q*m/t)) with SEAL doing every modular operation (see
LinearCodec.encryptBatch in web/src/heinfer.js). Here the page gets 50 shared test digits as
dropped photos, sends them in one request of the linear model's coeff-batch layout and decrypts
the answer; the scores must match the plaintext model. The request the page sent is then opened
with the Python client's parser and decrypted with the page's own secret key (exported for the
test only): every ciphertext holds exactly the quantized pixels, its error is SEAL's centered
binomial, and a different key does not decrypt it. No request leaves the service's origin or
carries secret-key bytes.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import pytest
from page_helpers import check_page_scores, drop_and_run, leaks, secret_needles

import heinfer
from heinfer.plans.base import codec_for
from heinfer.rlwe.ring import NegacyclicProduct
from service_helpers import RunningService

pytest.importorskip("playwright.sync_api")

pytestmark = [pytest.mark.web, pytest.mark.e2e]

DIGITS = 50


def test_page_batches_fifty_digits_in_one_request(
    service: RunningService,
    browser: Any,
    mnist: dict[str, np.ndarray],
    mnist_model: heinfer.EncryptedModel,
    tmp_path: Any,
) -> None:
    page = browser.new_page()
    requests: list[Any] = []
    page.on("request", lambda request: requests.append(request))
    page.goto(f"{service.url}/?audit=1")
    page.wait_for_selector("body[data-layouts='mnist']", state="attached", timeout=60_000)
    options = page.eval_on_selector_all("#layout option", "(all) => all.map((o) => o.value)")
    assert options == ["coeff-rowpack", "coeff-batch"]
    assert page.is_visible("#layout")
    page.select_option("#layout", "coeff-batch")

    images = np.rint(mnist["X_test"][:DIGITS] * 255).astype(np.uint8)
    X = images.astype(np.float64) / 255.0
    result = drop_and_run(page, images, timeout_ms=600_000)
    page.screenshot(path=str(tmp_path / "page-batch.png"), full_page=True)

    reference = check_page_scores(result, mnist_model, X, "coeff-batch")
    shown = page.inner_text("#digits").split(":")[1].split()
    assert [int(d) for d in shown] == list(reference.argmax(1))

    # One batch request held all 50 digits; nothing left the origin or carried the secret key.
    urls = [request.url for request in requests]
    assert all(url.startswith(f"{service.url}/") for url in urls), urls
    bodies = [request.post_data_buffer or b"" for request in requests]
    batches = [body for body in bodies if body[:4] == b"HEB1"]
    assert len(batches) == 1 and struct.unpack_from("<I", batches[0], 4)[0] == DIGITS
    secret = bytes(page.evaluate(
        "() => Array.from(window.heinferClients.get('mnist').secretBytes())"))
    needles = secret_needles(secret)
    assert len(needles) > 100 and leaks(needles, bodies) == 0
    assert leaks(needles, [b"\x00" + secret]) == len(needles)  # the scan can fail

    # Three polynomials per composed ciphertext leave the 784th feature alone in its own: SEAL
    # refuses single-component results, so it rides twice. The client's own API this time.
    few = X[:5]
    scores_few = np.array(page.evaluate(
        """async (X) => {
            const client = window.heinferClients.get('mnist');
            const response = await client.infer(client.codec.encryptBatch(X, undefined, 3));
            return client.decrypt(response).map((s) => Array.from(s));
        }""", few.tolist()))
    assert np.abs(scores_few - reference[:5]).max() <= mnist_model.manifest.precision.max_abs_error
    lone = [request.post_data_buffer for request in requests[len(bodies):]
            if (request.post_data_buffer or b"")[:4] == b"HEB1"]
    assert len(lone) == 1 and leaks(needles, lone) == 0

    # The Python client's parser and SEAL, with the page's secret key, read the request exactly.
    service_secret = bytes(page.evaluate(
        """async () => {
            const f = await import('./web/heinfer.js');
            const data = window.heinferClients.get('mnist').secretBytes().slice();
            f.setSealVersion(data, 0, 'plaintext', f.SERVICE_SEAL_MINOR);
            return Array.from(data);
        }"""))
    page.close()
    codec = codec_for(mnist_model.manifest)
    context = codec.context
    key = codec.load_secret(service_secret)
    columns = np.zeros((784, context.n), dtype=np.int64)
    columns[:, :DIGITS] = codec.quantize(X).T
    c0, c1 = context.load_batch_request(batches[0][8:], 784)  # tag, seed, packed c0 limbs
    features = (0, 15, 16, 400, 783)  # first and last of a 16-feature group, the last feature

    def feature(i: int) -> Any:
        return context.ciphertext_from_arrays(np.stack([c0[:, i], c1[:, i]]), last_level=False)

    for i in features:
        np.testing.assert_array_equal(key.decrypt_full(feature(i)), columns[i])
    assert not np.array_equal(codec.keygen().decrypt_full(feature(400)), columns[400])
    lone_c0, lone_c1 = context.load_batch_request(lone[0][8:], 784)
    for i in (780, 781, 782, 783):  # a group of three, then the lone feature
        pair = np.stack([lone_c0[:, i], lone_c1[:, i]])
        plain = key.decrypt_full(context.ciphertext_from_arrays(pair, last_level=False))
        np.testing.assert_array_equal(plain[:5], columns[i, :5])
        assert not plain[5:].any()

    # Its error, c0 + c1*s - round(q*m/t), is a fresh encryption's: SEAL's centered binomial.
    q = context.params.data_primes[0]
    rows = list(features)
    product = NegacyclicProduct(key.ternary()).multiply(c1[0, rows], q)
    scaled = context.scale_plain(columns[rows])[0]
    error = (c0[0, rows].astype(object) + product.astype(object) - scaled.astype(object)) % q
    centered = np.array([int(v) - q if v > q // 2 else int(v) for v in error.reshape(-1)])
    assert np.abs(centered).max() <= 21
    assert abs(centered.mean()) < 0.1
    assert centered.var() == pytest.approx(10.5, rel=0.1)
