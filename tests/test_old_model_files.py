"""Model files written by the previous release (model format 1) still load and serve.

`tests/data/v1-small-cnn.heinfer` was saved by release 8bbfa1e (conv 5x5 stride 2 -> square ->
linear, both CKKS layouts) from the bundled digits; its stored privacy and precision claims are
recomputed on load by this release's rules.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

import heinfer
from heinfer.plans.base import codec_for

V1_CNN = Path(__file__).parent / "data" / "v1-small-cnn.heinfer"


def test_a_v1_network_file_loads_and_serves_both_layouts(mnist: dict[str, np.ndarray]) -> None:
    with zipfile.ZipFile(V1_CNN) as archive:
        header = json.loads(archive.read("heinfer.json"))
    assert header["format_version"] == 1 and header["plan"] == "network"
    model = heinfer.load_model(V1_CNN)
    plan = model.plan
    assert plan.manifest.privacy.extraction is not None  # recomputed, not copied
    codec = codec_for(plan.manifest)
    secret = codec.keygen()
    keys = plan.load_keys(codec.key_upload(secret))
    X = mnist["X_test"][:2]
    reference = model.predict_plain(X)
    network = plan.manifest.layout["plan_manifest"]
    claims = {
        "ckks-network": plan.manifest.precision.max_abs_error,
        "ckks-network-batch": float(network["batch"]["precision"]["score_abs_error"]),
    }
    assert set(codec.layouts) == set(claims)
    for layout, claim in claims.items():
        scores = codec.decrypt(secret, plan.evaluate(codec.encrypt(secret, X, layout), keys))
        assert np.array_equal(scores.argmax(1), reference.argmax(1)), layout
        assert np.abs(scores - reference).max() <= claim, layout


def test_a_v1_linear_file_loads_and_serves_both_layouts(mnist: dict[str, np.ndarray]) -> None:
    """`tests/data/v1-linear.heinfer`: a LogisticRegression saved by release 8bbfa1e."""
    model = heinfer.load_model(Path(__file__).parent / "data" / "v1-linear.heinfer")
    plan = model.plan
    assert plan.manifest.format_version == 1
    codec = codec_for(plan.manifest)
    secret = codec.keygen()
    keys = plan.load_keys(codec.key_upload(secret))
    X = mnist["X_test"][:20]
    reference = model.predict_plain(X)
    for layout in ("coeff-rowpack", "coeff-batch"):
        scores = codec.decrypt(secret, plan.evaluate(codec.encrypt(secret, X, layout), keys))
        assert np.array_equal(scores.argmax(1), reference.argmax(1)), layout
        assert np.abs(scores - reference).max() <= plan.manifest.precision.max_abs_error
