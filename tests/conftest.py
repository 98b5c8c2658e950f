"""Shared fixtures: real MNIST digits, a trained and compiled model, a live service."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

import heinfer
from heinfer.datasets import load_mnist, load_sample
from service_helpers import SHARED_MNIST, RunningService

pytest_plugins = ["storage_fixtures"]


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
