"""A small CNN built without torch, shared by the network tests (a plain module, not conftest)."""

from __future__ import annotations

import numpy as np

from heinfer.plans.network import NetworkSpec

IMAGE = (1, 28, 28)


def ridge_cnn(X: np.ndarray, y: np.ndarray, filters: int = 3, stride: int = 1) -> NetworkSpec:
    """conv (random 5x5 filters) -> square -> avgpool 2 -> a 10-class linear readout fitted by
    ridge regression on (X, y): a network the HE plans handle, in seconds, with no training."""
    rng = np.random.default_rng(0)
    conv = {
        "type": "conv2d",
        "weight": rng.normal(0, 0.25, (filters, 1, 5, 5)),
        "bias": rng.normal(0, 0.1, filters),
        "stride": stride,
        "padding": 0,
    }
    front = NetworkSpec(
        [
            conv,
            {"type": "poly", "a": 1.0, "b": 0.0},
            {"type": "avgpool", "kernel": 2, "stride": 2},
            {"type": "flatten"},
        ],
        IMAGE,
    )
    feats = front.predict_plain(X)
    F = np.hstack([feats, np.ones((len(feats), 1))])
    coef = np.linalg.solve(F.T @ F + np.eye(F.shape[1]), F.T @ (np.eye(10)[y] * 4.0 - 2.0))
    readout = {"type": "linear", "weight": coef[:-1].T, "bias": coef[-1]}
    return NetworkSpec([*front.layers, readout], IMAGE)
