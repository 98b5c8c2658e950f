"""The command line, run as a user would: real subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import heinfer
from heinfer.models import MODEL_FORMAT_VERSION
from heinfer.plans.manifest import MANIFEST_VERSION
from service_helpers import SHARED_MNIST


def run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "heinfer", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.e2e
def test_demo_reports_full_agreement(tmp_path: Path) -> None:
    result = run("demo", "--n", "30", env={"XDG_CACHE_HOME": str(tmp_path), "COLUMNS": "120"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "agreement with plaintext model" in result.stdout
    assert "100.0%" in result.stdout
    # cached per model-file and manifest version, so an upgrade never serves an older model
    cached = f"mnist-demo-f{MODEL_FORMAT_VERSION}-m{MANIFEST_VERSION}.heinfer"
    assert (tmp_path / "heinfer" / cached).exists()


def test_train_mnist_and_inspect(tmp_path: Path) -> None:
    if not (SHARED_MNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("shared MNIST files not present")
    out = tmp_path / "model.heinfer"
    result = run(
        "train-mnist",
        "--images",
        str(SHARED_MNIST / "train-images-idx3-ubyte.gz"),
        "--labels",
        str(SHARED_MNIST / "train-labels-idx1-ubyte.gz"),
        "--test-images",
        str(SHARED_MNIST / "test-images-idx3-ubyte.gz"),
        "--test-labels",
        str(SHARED_MNIST / "test-labels-idx1-ubyte.gz"),
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    assert "test accuracy" in result.stdout
    model = heinfer.load_model(out)
    assert model.name == "mnist" and model.manifest.n_features == 784
    shown = run("inspect", str(out))
    assert shown.returncode == 0
    manifest = json.loads(shown.stdout)
    assert "extraction: 785 answered samples" in shown.stderr  # n_features + 1
    assert manifest["name"] == "mnist"
    assert manifest["keys"]["galois_steps"] == []


def test_token_new_prints_once_and_stores_hash(tmp_path: Path) -> None:
    auth = tmp_path / "auth.json"
    result = run("token", "new", "alice", "--auth-file", str(auth))
    assert result.returncode == 0
    token = result.stdout.strip()
    assert len(token) >= 40
    stored = auth.read_text()
    assert token not in stored and "alice" in stored
    assert auth.stat().st_mode & 0o777 == 0o600


def test_serve_refuses_public_host_without_auth(mnist_model_path: Path) -> None:
    result = run("serve", str(mnist_model_path), "--host", "0.0.0.0", "--port", "1", timeout=60)
    assert result.returncode == 2
    assert "--auth-file" in result.stdout + result.stderr


def test_serve_warns_that_anonymous_callers_share_one_budget(mnist_model_path: Path) -> None:
    """Without --auth-file every caller is tenant 'public'. The port is taken, so the service
    stops after start-up."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        shared = run("serve", str(mnist_model_path), "--port", port, timeout=120)
        unlimited = run(
            "serve", str(mnist_model_path), "--port", port, "--sample-budget", "0", timeout=120
        )
    assert "share one sample budget" in " ".join((shared.stdout + shared.stderr).split())
    assert "share one sample budget" not in unlimited.stdout + unlimited.stderr


@pytest.mark.cnn
@pytest.mark.parametrize("arch", ["cnn", "mlp"])
def test_train_mnist_network(tmp_path: Path, arch: str) -> None:
    pytest.importorskip("torch")
    if not (SHARED_MNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("shared MNIST files not present")
    out = tmp_path / f"{arch}.heinfer"
    result = run(
        "train-mnist", "--arch", arch, "--epochs", "2",
        "--images", str(SHARED_MNIST / "train-images-idx3-ubyte.gz"),
        "--labels", str(SHARED_MNIST / "train-labels-idx1-ubyte.gz"),
        "--out", str(out),
    )
    assert result.returncode == 0, result.stderr
    model = heinfer.load_model(out)
    assert model.name == f"mnist-{arch}" and model.manifest.layout["kind"] == "ckks-network"


def test_compile_forces_a_layout_and_inspect_shows_it(tmp_path: Path) -> None:
    """`heinfer compile --layout` recompiles a saved linear model with the layout forced; the
    cost model's own pick for this small model is coeff-rowpack."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    estimator = LogisticRegression()
    estimator.coef_ = rng.normal(0, 0.05, (20, 300))
    estimator.intercept_ = np.zeros(20)
    estimator.classes_ = np.arange(20)
    source = heinfer.compile(estimator, name="wide", input_range=(0.0, 1.0))
    assert source.manifest.layout["choice"]["picked"] == "coeff-rowpack"
    source.save(tmp_path / "wide.heinfer")
    out = tmp_path / "packed.heinfer"
    result = run("compile", str(tmp_path / "wide.heinfer"), "--out", str(out),
                 "--layout", "coeff-packed")
    assert result.returncode == 0, result.stderr
    assert "coeff-packed (forced)" in result.stdout
    model = heinfer.load_model(out)
    choice = model.manifest.layout["choice"]
    assert choice["picked"] == "coeff-packed" and choice["forced"]
    assert model.manifest.keys.galois_elements
    X = rng.uniform(0, 1, (3, 300))
    assert np.allclose(model.predict_plain(X), source.predict_plain(X))
    shown = run("inspect", "--summary", str(out), env={"COLUMNS": "200"})
    assert shown.returncode == 0, shown.stderr
    assert "forced" in shown.stderr and "Galois keys" in shown.stderr
    refused = run("compile", str(tmp_path / "wide.heinfer"), "--out", str(out),
                  "--layout", "diagonal")
    assert refused.returncode != 0 and "unknown layout" in refused.stderr
