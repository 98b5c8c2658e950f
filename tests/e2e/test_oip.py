"""The Open Inference Protocol face of a live `heinfer serve`, driven by a stock client.

`tritonclient[http]` from PyPI, unmodified, is the third party here: if it can check liveness,
readiness and metadata and run an inference whose answer heinfer's client decrypts to the
plaintext model's argmax, the service speaks OIP with the binary tensor data extension as
other tools expect. The httpx tests pin the framing's refusals (400 with a message, same codes
as the bare path) and the manifest's new route.
"""

from __future__ import annotations

import json
import struct

import httpx
import numpy as np
import pytest

import heinfer
from heinfer.protocol import oip

pytestmark = pytest.mark.e2e

tritonhttp = pytest.importorskip("tritonclient.http")
triton_utils = pytest.importorskip("tritonclient.utils")


@pytest.fixture(scope="module")
def client(service) -> heinfer.Client:  # type: ignore[no-untyped-def]
    client = heinfer.Client(service.url, model="mnist")
    client.upload_keys()
    return client


@pytest.fixture(scope="module")
def triton(service):  # type: ignore[no-untyped-def]
    triton = tritonhttp.InferenceServerClient(url=service.url.removeprefix("http://"))
    yield triton
    triton.close()


def _triton_infer(triton, body: bytes, key_id: str, version: str = ""):  # type: ignore[no-untyped-def]
    tensor = tritonhttp.InferInput(oip.INPUT_NAME, [1], "BYTES")
    tensor.set_data_from_numpy(np.array([body], dtype=np.object_), binary_data=True)
    wanted = tritonhttp.InferRequestedOutput(oip.OUTPUT_NAME, binary_data=True)
    return triton.infer(
        "mnist", [tensor], model_version=version, outputs=[wanted],
        parameters={oip.KEY_ID_PARAMETER: key_id}, request_id="r-1",
    )


def test_stock_tritonclient_end_to_end(
    triton, client: heinfer.Client, mnist: dict[str, np.ndarray],
    mnist_model: heinfer.EncryptedModel,
) -> None:  # type: ignore[no-untyped-def]
    assert triton.is_server_live() and triton.is_server_ready()
    server = triton.get_server_metadata()
    assert server["name"] == "heinfer" and oip.BINARY_EXTENSION in server["extensions"]
    metadata = triton.get_model_metadata("mnist")
    assert metadata["name"] == "mnist" and metadata["versions"] == ["1"]
    assert metadata["inputs"] == [{"name": oip.INPUT_NAME, "datatype": "BYTES", "shape": [1]}]
    assert metadata["outputs"][0]["datatype"] == "BYTES"
    assert metadata["parameters"]["plaintext_input_shape"] == [784]
    assert triton.is_model_ready("mnist") and triton.is_model_ready("mnist", "1")
    assert not triton.is_model_ready("mnist", "2") and not triton.is_model_ready("nope")

    X = mnist["X_test"][:20]
    result = _triton_infer(triton, client.encrypt(X), client.key_id or "")
    response = result.get_response()
    assert response["model_name"] == "mnist" and response["id"] == "r-1"
    [answer] = result.as_numpy(oip.OUTPUT_NAME)
    scores = client.decrypt(bytes(answer))
    assert scores.shape == (20, 10)
    assert (scores.argmax(1) == mnist_model.predict_plain(X).argmax(1)).all()

    versioned = _triton_infer(triton, client.encrypt(X[:2]), client.key_id or "", "1")
    assert client.decrypt(bytes(versioned.as_numpy(oip.OUTPUT_NAME)[0])).shape == (2, 10)


def test_tritonclient_sees_heinfer_errors(
    triton, client: heinfer.Client, mnist: dict[str, np.ndarray]
) -> None:  # type: ignore[no-untyped-def]
    body = client.encrypt(mnist["X_test"][:1])
    with pytest.raises(triton_utils.InferenceServerException) as caught:
        _triton_infer(triton, body, "0" * 64)
    assert caught.value.status() == "404" and "key_not_found" in caught.value.message()
    with pytest.raises(triton_utils.InferenceServerException) as caught:
        _triton_infer(triton, b"garbage", client.key_id or "")
    assert caught.value.status() == "400"
    with pytest.raises(triton_utils.InferenceServerException) as caught:
        _triton_infer(triton, body, client.key_id or "", version="7")
    assert caught.value.status() == "404"
    with pytest.raises(triton_utils.InferenceServerException) as caught:
        triton.get_model_metadata("nope")
    assert caught.value.status() == "404"


def test_manifest_route_and_versions(service) -> None:  # type: ignore[no-untyped-def]
    manifest = httpx.get(f"{service.url}/v2/models/mnist/manifest").json()
    assert manifest["format"] == "heinfer.manifest" and manifest["name"] == "mnist"
    metadata = httpx.get(f"{service.url}/v2/models/mnist").json()
    assert metadata["parameters"]["manifest"] == "/v2/models/mnist/manifest"
    versioned = httpx.get(f"{service.url}/v2/models/mnist/versions/1/manifest").json()
    assert versioned == manifest
    missing = httpx.get(f"{service.url}/v2/models/mnist/versions/2/manifest")
    assert missing.status_code == 404 and missing.json()["error"] == "model_not_found"
    assert "version 1" in missing.json()["message"]


def _framed(header: dict, tail: bytes, length: int | None = None) -> tuple[bytes, dict]:  # type: ignore[type-arg]
    head = json.dumps(header).encode()
    size = len(head) if length is None else length
    return head + tail, {oip.HEADER_LENGTH: str(size), "Content-Type": "application/octet-stream"}


def _input(size: int, **changes: object) -> dict:  # type: ignore[type-arg]
    tensor = {"name": oip.INPUT_NAME, "datatype": "BYTES", "shape": [1],
              "parameters": {"binary_data_size": size}}
    return {**tensor, **changes}


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("length-not-number", "byte count"),
        ("length-past-body", "holds only"),
        ("header-not-json", "not valid JSON"),
        ("two-inputs", "exactly one input"),
        ("wrong-name", "one input"),
        ("wrong-datatype", "BYTES"),
        ("size-mismatch", "binary_data_size"),
        ("element-length", "4-byte little-endian"),
        ("json-output", "binary_data true"),
        ("no-key-id", "key_id"),
        ("json-only", "binary data"),
    ],
)
def test_bad_oip_framing_is_a_400_with_a_message(
    service, client: heinfer.Client, mnist: dict[str, np.ndarray], case: str, fragment: str
) -> None:  # type: ignore[no-untyped-def]
    ciphertext = client.encrypt(mnist["X_test"][:1])
    element = struct.pack("<I", len(ciphertext)) + ciphertext
    params = {"parameters": {oip.KEY_ID_PARAMETER: client.key_id}}
    good = {**params, "inputs": [_input(len(element))]}
    body, headers = _framed(good, element)
    if case == "length-not-number":
        headers[oip.HEADER_LENGTH] = "-3"
    elif case == "length-past-body":
        headers[oip.HEADER_LENGTH] = str(len(body) + 1)
    elif case == "header-not-json":
        body, headers = _framed(good, element, length=5)
    elif case == "two-inputs":
        body, headers = _framed({**params, "inputs": [_input(len(element))] * 2}, element)
    elif case == "wrong-name":
        body, headers = _framed({**params, "inputs": [_input(len(element), name="x")]}, element)
    elif case == "wrong-datatype":
        body, headers = _framed(
            {**params, "inputs": [_input(len(element), datatype="FP32")]}, element
        )
    elif case == "size-mismatch":
        body, headers = _framed({**params, "inputs": [_input(len(element) - 1)]}, element)
    elif case == "element-length":
        bad = struct.pack("<I", 3) + ciphertext
        body, headers = _framed({**params, "inputs": [_input(len(bad))]}, bad)
    elif case == "json-output":
        outputs = [{"name": oip.OUTPUT_NAME, "parameters": {"binary_data": False}}]
        body, headers = _framed({**good, "outputs": outputs}, element)
    elif case == "no-key-id":
        body, headers = _framed({"inputs": [_input(len(element))]}, element)
    elif case == "json-only":
        body = json.dumps({**params, "inputs": [{
            "name": oip.INPUT_NAME, "datatype": "BYTES", "shape": [1], "data": ["abc"]}]}
        ).encode()
        headers = {"Content-Type": "application/json"}
    response = httpx.post(
        f"{service.url}/v2/models/mnist/infer", content=body, headers=headers, timeout=60
    )
    expected = 404 if case == "no-key-id" else 400
    assert response.status_code == expected, response.text
    error = response.json()
    assert isinstance(error["error"], str) and fragment in error["message"], error


def test_oip_framing_keeps_the_bare_paths_codes(
    service, client: heinfer.Client, mnist: dict[str, np.ndarray]
) -> None:  # type: ignore[no-untyped-def]
    """A malformed or foreign ciphertext inside OIP framing gets the bare path's answer, and a
    good one round-trips through heinfer.protocol.oip's caller half."""
    good = client.encrypt(mnist["X_test"][:3])
    for ciphertext, status, code in [(good[:-7], 400, "malformed_payload"), (good, 200, None)]:
        body, headers = oip.encode_request(ciphertext, client.key_id or "")
        response = httpx.post(
            f"{service.url}/v2/models/mnist/infer", content=body, headers=headers, timeout=60
        )
        assert response.status_code == status, response.text
        if code is not None:
            assert response.json()["error"] == code
            continue
        assert response.headers["content-type"] == "application/octet-stream"
        payload = oip.decode_response(response.content, response.headers[oip.HEADER_LENGTH])
        assert client.decrypt(payload).shape == (3, 10)


def test_405_lists_every_method_of_the_path(service) -> None:  # type: ignore[no-untyped-def]
    response = httpx.put(f"{service.url}/v2/keys/{'0' * 64}")
    assert response.status_code == 405
    assert set(response.headers["allow"].replace(" ", "").split(",")) >= {"GET", "DELETE"}
    assert response.json()["error"] == "method_not_allowed"
