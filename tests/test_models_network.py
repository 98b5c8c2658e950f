"""Neural networks through the same model container as linear models: compile, save, load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import heinfer
from heinfer.plans.network import NetworkCodec, NetworkPlan

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.cnn


@pytest.fixture(scope="module")
def cnn_model(mnist: dict[str, np.ndarray]) -> heinfer.EncryptedModel:
    from heinfer.nn import train_mnist_cnn

    network = train_mnist_cnn(mnist["X_train"][:1500], mnist["y_train"][:1500], epochs=3)
    return heinfer.compile(network, name="mnist-cnn", X=mnist["X_train"][:500])


def test_manifest_has_the_common_shape(cnn_model: heinfer.EncryptedModel) -> None:
    manifest = cnn_model.manifest
    assert manifest.layout["kind"] == "ckks-network"
    assert manifest.keys.relin and manifest.keys.galois_steps
    assert manifest.scheme["scheme"] == "ckks" and manifest.scheme["security_bits"] >= 128
    assert manifest.n_features == 784 and manifest.n_outputs == 10


def test_save_load_and_encrypted_agreement(
    cnn_model: heinfer.EncryptedModel, mnist: dict[str, np.ndarray], tmp_path: Path
) -> None:
    loaded = heinfer.load_model(cnn_model.save(tmp_path / "cnn.heinfer"))
    X = mnist["X_test"][:4]
    np.testing.assert_array_equal(loaded.predict_plain(X), cnn_model.predict_plain(X))
    codec = NetworkCodec(loaded.manifest)
    secret = codec.keygen()
    keys = loaded.plan.load_keys(codec.key_upload(secret))
    scores = codec.decrypt(secret, loaded.plan.evaluate(codec.encrypt(secret, X), keys))
    reference = loaded.predict_plain(X)
    assert (scores.argmax(1) == reference.argmax(1)).all()
    assert np.abs(scores - reference).max() <= loaded.manifest.precision.max_abs_error


def test_torch_and_numpy_agree(
    cnn_model: heinfer.EncryptedModel, mnist: dict[str, np.ndarray]
) -> None:
    assert isinstance(cnn_model.plan, NetworkPlan)
    assert cnn_model.plan.spec.input_shape == (1, 28, 28)
    X = mnist["X_test"][:8]
    assert cnn_model.predict_plain(X).shape == (8, 10)


def test_unsupported_layer_names_the_alternative() -> None:
    network = torch.nn.Sequential(torch.nn.Linear(784, 10), torch.nn.ReLU())
    with pytest.raises(heinfer.errors.UnsupportedModelError, match="Square"):
        heinfer.compile(network, name="bad")
