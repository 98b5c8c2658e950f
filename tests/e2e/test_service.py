"""The whole workflow against a real `heinfer serve` on loopback."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import numpy as np
import pytest

import heinfer
from heinfer.errors import (
    KeyNotFoundError,
    MalformedPayloadError,
    ModelNotFoundError,
    ParameterMismatchError,
    PayloadTooLargeError,
)
from heinfer.server.settings import ServiceSettings

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def client(service) -> heinfer.Client:  # type: ignore[no-untyped-def]
    client = heinfer.Client(service.url, model="mnist")
    client.upload_keys()
    return client


def test_health_and_models(service) -> None:  # type: ignore[no-untyped-def]
    assert httpx.get(f"{service.url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{service.url}/v2/health/ready").json()["ready"] is True
    models = httpx.get(f"{service.url}/v2/models").json()["models"]
    assert [m["name"] for m in models] == ["mnist"]
    manifest = httpx.get(f"{service.url}/v2/models/mnist/manifest").json()
    assert manifest["keys"] == {
        "public": True, "relin": False, "galois_steps": [], "galois_elements": []
    }
    assert int(manifest["scheme"]["security_bits"]) >= 128


def test_unseen_digits_match_plaintext(
    client: heinfer.Client, mnist: dict[str, np.ndarray], mnist_model: heinfer.EncryptedModel
) -> None:
    X = mnist["X_test"][-300:]  # digits neither the model nor the other tests used
    scores = client.predict(X, batch_size=100)
    reference = mnist_model.predict_plain(X)
    assert scores.shape == (300, 10)
    agreement = (scores.argmax(1) == reference.argmax(1)).mean()
    assert agreement >= 0.999
    score_range = reference.max() - reference.min()
    assert np.abs(scores - reference).max() <= 1e-3 * score_range
    assert np.abs(scores - reference).max() <= 1e-3


def test_single_vector_and_classify(client: heinfer.Client, mnist: dict[str, np.ndarray]) -> None:
    x = mnist["X_test"][0]
    assert client.predict(x).shape == (1, 10)
    assert client.classify(mnist["X_test"][:3]).shape == (3,)


def test_new_user_predicts_one_image_then_chunks_in_order(
    service, mnist: dict[str, np.ndarray], mnist_model: heinfer.EncryptedModel
) -> None:  # type: ignore[no-untyped-def]
    """As the README's new user calls it: no explicit key upload, one image per call (answered
    in the calling thread), then several chunks one after another with `concurrency=1`."""
    X = mnist["X_test"][:7]
    reference = mnist_model.predict_plain(X)
    with heinfer.Client(service.url, model="mnist") as fresh:
        first = fresh.predict(X[0])
        key_id = fresh.key_id
        assert key_id is not None  # uploaded by the first call, and only then
        second = fresh.predict(X[1])
        assert fresh.key_id == key_id
        seen: list[int] = []
        chunked = fresh.predict(X, batch_size=3, concurrency=1, progress=seen.append)
        fresh.delete_keys()
    assert seen == [3, 3, 1]
    scores = np.concatenate([first, second])
    assert np.abs(scores - reference[:2]).max() <= 1e-3
    assert np.abs(chunked - reference).max() <= 1e-3
    assert (chunked.argmax(1) == reference.argmax(1)).all()


def _post_infer(
    service, client: heinfer.Client, body: bytes, key_id: str | None = None
) -> httpx.Response:  # type: ignore[no-untyped-def]
    return httpx.post(
        f"{service.url}/v2/models/mnist/infer",
        content=body,
        headers={"X-Heinfer-Key-Id": key_id or client.key_id or ""},
        timeout=60,
    )


@pytest.mark.parametrize(
    "mutate, status, code",
    [
        (lambda body: b"garbage", 400, "malformed_payload"),
        (lambda body: body[:-1000], 400, "malformed_payload"),
        (lambda body: body[:20], 400, "malformed_payload"),
        (lambda body: body[:24] + b"\xff" * 200 + body[224:], 400, "malformed_payload"),
        (lambda body: body + b"x", 400, "malformed_payload"),
    ],
    ids=["garbage", "truncated", "header-only", "out-of-range", "trailing"],
)
def test_bad_ciphertexts_get_4xx_and_service_keeps_serving(
    service,
    client: heinfer.Client,
    mnist: dict[str, np.ndarray],
    mutate,
    status: int,
    code: str,  # type: ignore[no-untyped-def]
) -> None:
    good = client.encrypt(mnist["X_test"][:1])
    response = _post_infer(service, client, mutate(good))
    assert response.status_code == status, response.text
    assert response.json()["error"] == code
    assert client.decrypt(client.infer(good)).shape == (1, 10)


def test_errors_map_to_exceptions(
    service, client: heinfer.Client, mnist: dict[str, np.ndarray]
) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ModelNotFoundError):
        heinfer.Client(service.url, model="nope")
    body = client.encrypt(mnist["X_test"][:1])
    response = _post_infer(service, client, body, key_id="0" * 64)
    assert response.status_code == 404 and response.json()["error"] == "key_not_found"
    response = _post_infer(service, client, body, key_id="../../etc/passwd")
    assert response.status_code == 404
    response = httpx.post(f"{service.url}/v2/models/mnist/infer", content=body)
    assert response.status_code == 404
    too_big = bytes(ServiceSettings.model_fields["max_body_bytes"].default + 1)
    huge = httpx.post(
        f"{service.url}/v2/models/mnist/infer",
        content=too_big,
        headers={"X-Heinfer-Key-Id": client.key_id or ""},
        timeout=60,
    )
    assert huge.status_code == 413
    with pytest.raises(PayloadTooLargeError):
        client.infer(too_big)
    del too_big
    with pytest.raises(MalformedPayloadError):
        client.infer(b"HEQ1")


def test_ciphertext_for_other_parameters_is_refused(
    service,
    client: heinfer.Client,
    mnist: dict[str, np.ndarray],
    mnist_estimator,  # type: ignore[no-untyped-def]
) -> None:
    other = heinfer.compile(mnist_estimator, name="other", input_range=(0.0, 1.0), weight_bits=14)
    assert other.manifest.scheme != client.manifest.scheme
    from heinfer.plans.linear import LAYOUT_KIND, LinearCodec

    codec = LinearCodec(other.manifest)
    secret = codec.keygen()
    body = codec.encrypt(secret, mnist["X_test"][:1], LAYOUT_KIND)
    response = _post_infer(service, client, body)
    assert response.status_code == 422 and response.json()["error"] == "parameter_mismatch"
    keys = codec.key_upload(secret)
    response = httpx.post(f"{service.url}/v2/keys", params={"model": "mnist"}, content=keys)
    assert response.status_code == 422
    response = httpx.post(f"{service.url}/v2/keys", params={"model": "mnist"}, content=b"HEK1junk")
    assert response.status_code == 400
    assert client.predict(mnist["X_test"][:2]).shape == (2, 10)


def test_secret_key_never_reaches_the_server(
    service,
    key_dir: Path,
    mnist: dict[str, np.ndarray],
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    client = heinfer.Client(service.url, model="mnist")
    client.upload_keys()
    secret_file = client.save_secret(tmp_path / "secret.json")
    assert secret_file.stat().st_mode & 0o777 == 0o600
    secret_raw = base64.b64decode(json.loads(secret_file.read_text())["secret_key"])
    from heinfer.he.serialization import seal_payload

    secret_poly = seal_payload(secret_raw)[-4096:]  # a slice of the raw secret polynomial
    body = client.encrypt(mnist["X_test"][:2])
    stored = [p.read_bytes() for p in key_dir.rglob("*") if p.is_file()]
    assert stored, "the key store should hold the uploaded public key"
    for blob in [*stored, body, client.last_key_upload or b""]:
        assert secret_poly not in blob
        assert secret_raw[16:80] not in blob
    resumed = heinfer.Client(service.url, model="mnist")
    resumed.load_secret(secret_file)
    assert resumed.key_id == client.key_id
    np.testing.assert_allclose(
        resumed.predict(mnist["X_test"][:2]), client.predict(mnist["X_test"][:2]), atol=1e-3
    )


def test_delete_keys(service, mnist: dict[str, np.ndarray]) -> None:  # type: ignore[no-untyped-def]
    client = heinfer.Client(service.url, model="mnist")
    client.upload_keys()
    key_id = client.key_id
    body = client.encrypt(mnist["X_test"][:1])
    client.delete_keys()
    response = _post_infer(service, client, body, key_id=key_id)
    assert response.status_code == 404
    with pytest.raises(KeyNotFoundError):
        httpx_delete = httpx.delete(f"{service.url}/v2/keys/{key_id}")
        raise heinfer.errors.error_for_status(
            httpx_delete.status_code, httpx_delete.json()["error"], ""
        )


def test_infer_route_edges_behave_like_any_route(
    service, client: heinfer.Client, mnist: dict[str, np.ndarray]
) -> None:  # type: ignore[no-untyped-def]
    """The inference route behaves at its edges like any route (405s, unknown paths, root paths)."""
    body = client.encrypt(mnist["X_test"][:1])
    headers = {"X-Heinfer-Key-Id": client.key_id or "", "X-Request-Id": "edge-1"}
    url = f"{service.url}/v2/models"
    wrong_method = httpx.get(f"{url}/mnist/infer", timeout=60)
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"] == "method_not_allowed"
    unknown = httpx.post(f"{url}/nope/infer", content=body, headers=headers, timeout=60)
    assert unknown.status_code == 404 and "'nope'" in unknown.json()["message"]
    assert unknown.headers["X-Request-Id"] == "edge-1"
    encoded = httpx.post(f"{url}/mn%69st/infer", content=body, headers=headers, timeout=60)
    assert encoded.status_code == 200 and encoded.headers["X-Request-Id"] == "edge-1"
    assert client.decrypt(encoded.content).shape == (1, 10)
    twice = httpx.post(f"{url}/mn%2569st/infer", content=body, headers=headers, timeout=60)
    assert twice.status_code == 404 and "'mn%69st'" in twice.json()["message"]
    nested = httpx.post(f"{url}/mnist/infer/x", content=body, headers=headers, timeout=60)
    assert nested.status_code == 404 and nested.json()["error"] == "not_found"
    ids = {httpx.get(f"{service.url}/v2/health/live").headers["X-Request-Id"] for _ in range(3)}
    assert len(ids) == 3
    metrics = httpx.get(f"{service.url}/metrics").text
    assert 'heinfer_requests_total{route="/v2/models/{name}/infer",status="200"}' in metrics
    assert 'heinfer_requests_total{route="/v2/models/{name}/infer",status="404"}' in metrics


def test_metrics_exposed(service) -> None:  # type: ignore[no-untyped-def]
    text = httpx.get(f"{service.url}/metrics").text
    assert "heinfer_requests_total" in text
    assert "heinfer_stage_seconds" in text


def test_wrong_parameters_secret_file(service, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"format": "heinfer.secret", "parameters": "00", "secret_key": ""}))
    with pytest.raises(ParameterMismatchError):
        heinfer.Client(service.url, model="mnist").load_secret(path)
