"""An encrypted CNN behind the same HTTP API and the same Client as the linear models."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

import heinfer
from heinfer.errors import ParameterMismatchError
from heinfer.plans.network import BATCH_LAYOUT, compile_network
from network_helpers import ridge_cnn
from service_helpers import RunningService

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.e2e, pytest.mark.cnn]


@pytest.fixture(scope="module")
def cnn_model(mnist: dict[str, np.ndarray]) -> heinfer.EncryptedModel:
    from heinfer.nn import train_mnist_cnn

    network = train_mnist_cnn(mnist["X_train"][:1500], mnist["y_train"][:1500], epochs=3)
    return heinfer.compile(network, name="mnist-cnn", X=mnist["X_train"][:500])


@pytest.fixture(scope="module")
def two_models(
    cnn_model: heinfer.EncryptedModel,
    mnist_model_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningService]:
    root = tmp_path_factory.mktemp("cnn")
    cnn_path = cnn_model.save(root / "cnn.heinfer")
    service = RunningService(
        [
            str(mnist_model_path),
            str(cnn_path),
            "--workers",
            "2",
            "--key-store",
            str(root / "keys"),
            "--log-level",
            "warning",
        ]
    )
    yield service
    service.stop()


def test_cnn_through_the_service(
    two_models: RunningService, cnn_model: heinfer.EncryptedModel, mnist: dict[str, np.ndarray]
) -> None:
    names = {m["name"] for m in httpx.get(f"{two_models.url}/v2/models").json()["models"]}
    assert names == {"mnist", "mnist-cnn"}
    client = heinfer.Client(two_models.url, model="mnist-cnn")
    client.upload_keys()
    X = mnist["X_test"][:6]
    scores = client.predict(X)
    reference = cnn_model.predict_plain(X)
    assert scores.shape == (6, 10)
    assert (scores.argmax(1) == reference.argmax(1)).all()
    assert np.abs(scores - reference).max() <= cnn_model.manifest.precision.max_abs_error
    # A linear-model key is no key for the CNN, and garbage gets a 4xx.
    linear = heinfer.Client(two_models.url, model="mnist")
    linear.upload_keys()
    wrong = httpx.post(
        f"{two_models.url}/v2/models/mnist-cnn/infer",
        content=client.encrypt(X[:1]),
        headers={"X-Heinfer-Key-Id": linear.key_id or ""},
        timeout=60,
    )
    assert wrong.status_code == 422, wrong.text
    bad = httpx.post(
        f"{two_models.url}/v2/models/mnist-cnn/infer",
        content=b"HNQ1" + bytes(40),
        headers={"X-Heinfer-Key-Id": client.key_id or ""},
        timeout=60,
    )
    assert 400 <= bad.status_code < 500, bad.text
    assert client.predict(X[:1]).shape == (1, 10)


# -- the batched layout (one ciphertext per pixel, up to 4,096 images per request) -------------


@pytest.fixture(scope="module")
def batch_service(
    mnist: dict[str, np.ndarray], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RunningService, heinfer.EncryptedModel]]:
    root = tmp_path_factory.mktemp("cnn-batch")
    spec = ridge_cnn(mnist["X_train"][:2000], mnist["y_train"][:2000], filters=2, stride=2)
    plan = compile_network(spec, "cnn-batch", calibration=mnist["X_train"][:500])
    model = heinfer.EncryptedModel(plan)
    path = model.save(root / "cnn-batch.heinfer")
    service = RunningService(
        [str(path), "--workers", "1", "--key-store", str(root / "keys"), "--log-level", "warning"]
    )
    yield service, model
    service.stop()


def test_cnn_batched_layout_through_the_service(
    batch_service: tuple[RunningService, heinfer.EncryptedModel], mnist: dict[str, np.ndarray]
) -> None:
    service, model = batch_service
    client = heinfer.Client(service.url, model="cnn-batch")
    X = mnist["X_test"][:40]
    handoffs = set(Path("/dev/shm").glob("heinfer-batch-*"))
    scores = client.predict(X, layout=BATCH_LAYOUT)  # uploads the batch-only key set
    # no handoff file outlives the call (that the ~150 MB body takes one is tested on the pool)
    assert set(Path("/dev/shm").glob("heinfer-batch-*")) <= handoffs
    reference = model.predict_plain(X)
    claim = client.manifest.layout["plan_manifest"]["batch"]["precision"]["score_abs_error"]
    assert scores.shape == (40, 10)
    assert (scores.argmax(1) == reference.argmax(1)).all()
    assert np.abs(scores - reference).max() <= claim
    assert client.last_key_upload is not None and len(client.last_key_upload) < 4_000_000
    # that key has no Galois part: a single-image request with it is a clear 422, not a 500
    batch_key = client.key_id
    with pytest.raises(ParameterMismatchError, match="Galois"):
        client.infer(client.encrypt(X[:1], layout="ckks-network"))
    # predict with the single-image layout uploads the full set by itself and works
    single = client.predict(X[:2])
    assert client.key_id != batch_key
    assert np.abs(single - reference[:2]).max() <= model.manifest.precision.max_abs_error
