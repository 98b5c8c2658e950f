"""The end-to-end workflow on every key store backend, and replicas sharing one store.

Runs against real servers: a local directory, Azurite (Azure Blob) and Ceph radosgw (S3),
started by .ci/run or by the fixtures in tests/storage_fixtures.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import heinfer
from heinfer.errors import KeyNotFoundError
from service_helpers import RunningService

pytestmark = pytest.mark.e2e


def test_workflow_and_replicas_share_keys(
    key_store_url: str,
    mnist_model_path: Path,
    mnist: dict[str, np.ndarray],
    mnist_model: heinfer.EncryptedModel,
    tmp_path: Path,
) -> None:
    args = [
        str(mnist_model_path),
        "--workers",
        "1",
        "--key-store",
        key_store_url,
        "--log-level",
        "warning",
    ]
    first, second = RunningService(args), RunningService(args)
    try:
        X = mnist["X_test"][:20]
        reference = mnist_model.predict_plain(X)
        client = heinfer.Client(first.url, model="mnist")
        key_id = client.upload_keys()
        # Other clients resume with the same secret and key id, so they never upload.
        secret = client.save_secret(tmp_path / "secret.json")
        scores = client.predict(X, batch_size=10)
        assert (scores.argmax(1) == reference.argmax(1)).all()
        assert np.abs(scores - reference).max() <= 1e-3

        # The other replica never saw the upload: it fetches the key from the shared store.
        replica = heinfer.Client(second.url, model="mnist")
        replica.load_secret(secret)
        np.testing.assert_allclose(replica.predict(X), reference, atol=1e-3)
        assert replica.key_id == key_id  # no upload of its own

        # Bad input on this backend: 4xx, and the next good request still works.
        with pytest.raises(heinfer.errors.BadInputError):
            client.infer(b"HEQ1\x01\x00\x00\x00\x05\x00\x00\x00junk!")
        assert client.predict(X[:1]).shape == (1, 10)

        # Keys survive a restart of both replicas.
        first.stop()
        first = RunningService(args)
        restarted = heinfer.Client(first.url, model="mnist")
        restarted.load_secret(secret)
        np.testing.assert_allclose(restarted.predict(X[:2]), reference[:2], atol=1e-3)

        assert restarted.key_id == key_id
        body = restarted.encrypt(X[:1])
        restarted.delete_keys()
        restarted.key_id = key_id
        with pytest.raises(KeyNotFoundError):
            restarted.infer(body)
    finally:
        first.stop()
        second.stop()
