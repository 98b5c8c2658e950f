"""Graceful shutdown: SIGTERM drains requests already accepted before the service exits."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import heinfer
from service_helpers import RunningService

pytestmark = pytest.mark.e2e


def test_sigterm_drains_in_flight_requests(
    mnist_model_path: Path,
    mnist: dict[str, np.ndarray],
    tmp_path: Path,
    mnist_model: heinfer.EncryptedModel,
) -> None:
    service = RunningService(
        [
            str(mnist_model_path),
            "--workers",
            "1",
            "--key-store",
            str(tmp_path / "keys"),
            "--log-level",
            "warning",
        ]
    )
    try:
        client = heinfer.Client(service.url, model="mnist")
        client.upload_keys()
        X = mnist["X_test"][:120]  # about a second of work for one worker
        body = client.encrypt(X)
        outcome: dict[str, object] = {}

        def call() -> None:
            try:
                outcome["scores"] = client.decrypt(client.infer(body))
            except Exception as exc:
                outcome["error"] = exc

        worker = threading.Thread(target=call)
        worker.start()
        time.sleep(0.3)  # the request is accepted and evaluating
        service.process.send_signal(signal.SIGTERM)
        worker.join(timeout=120)
        assert "error" not in outcome, outcome.get("error")
        scores = outcome["scores"]
        assert isinstance(scores, np.ndarray)
        np.testing.assert_allclose(scores, mnist_model.predict_plain(X), atol=1e-3)
        # uvicorn re-raises the caught SIGTERM after a clean shutdown, hence -15.
        assert service.process.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        service.stop()
