"""Shared fixtures: real MNIST digits, a trained and compiled model, a live service."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

import heinfer
from heinfer.datasets import load_mnist, load_sample

pytest_plugins = ["storage_fixtures"]

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"


@pytest.fixture(scope="session")
def mnist() -> dict[str, np.ndarray]:
    """The shared 7,000/1,500 split when present (CI, dev machines), else the bundled sample."""
    if (SHARED_MNIST / "train-images-idx3-ubyte.gz").exists():
        Xtr, ytr = load_mnist(
            SHARED_MNIST / "train-images-idx3-ubyte.gz", SHARED_MNIST / "train-labels-idx1-ubyte.gz"
        )
        Xte, yte = load_mnist(
            SHARED_MNIST / "test-images-idx3-ubyte.gz", SHARED_MNIST / "test-labels-idx1-ubyte.gz"
        )
    else:
        Xtr, ytr = load_sample("train")
        Xte, yte = load_sample("test")
    return {
        "X_train": Xtr.astype(np.float64) / 255.0,
        "y_train": ytr,
        "X_test": Xte.astype(np.float64) / 255.0,
        "y_test": yte,
    }


@pytest.fixture(scope="session")
def mnist_estimator(mnist: dict[str, np.ndarray]) -> LogisticRegression:
    return LogisticRegression(max_iter=200).fit(mnist["X_train"], mnist["y_train"])


@pytest.fixture(scope="session")
def mnist_model(mnist_estimator: LogisticRegression) -> heinfer.EncryptedModel:
    return heinfer.compile(mnist_estimator, name="mnist", input_range=(0.0, 1.0))


@pytest.fixture(scope="session")
def mnist_model_path(
    mnist_model: heinfer.EncryptedModel, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    return mnist_model.save(tmp_path_factory.mktemp("models") / "mnist.heinfer")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RunningService:
    """A real `heinfer serve` subprocess on a loopback port."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "heinfer", "serve", *args, "--port", str(self.port)]
        self.process = subprocess.Popen(command, env={**os.environ, **(env or {})})
        self.wait_ready()

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"heinfer serve exited with {self.process.returncode}")
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=10).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("service did not become ready")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="session")
def key_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("keys")


@pytest.fixture(scope="session")
def service(mnist_model_path: Path, key_dir: Path) -> Iterator[RunningService]:
    running = RunningService(
        [
            str(mnist_model_path),
            "--workers",
            "2",
            "--key-store",
            str(key_dir),
            "--log-level",
            "warning",
        ]
    )
    yield running
    running.stop()
