"""MNIST loading and model fitting for the benchmarks.

Kept separate from ``heinfer.datasets`` on purpose: the peer benchmarks must stay
runnable (and comparable) while the package itself is being changed.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

_IDX_UINT8 = 0x08
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("test-images-idx3-ubyte.gz", "test-labels-idx1-ubyte.gz"),
}


@dataclass(frozen=True)
class Model:
    """Fitted multinomial logistic regression: scores = X @ W.T + b."""

    W: np.ndarray  # (10, 784) float64
    b: np.ndarray  # (10,) float64
    train_accuracy: float
    test_accuracy: float

    def scores(self, X: np.ndarray) -> np.ndarray:
        """Plaintext reference scores every peer is compared against."""
        return X @ self.W.T + self.b


def data_dir() -> Path:
    """Find the IDX files: $HEINFER_MNIST_DIR, else a ``shared/data/mnist`` near the repo."""
    env = os.environ.get("HEINFER_MNIST_DIR")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parent.parent
    for cand in (repo / "shared/data/mnist", repo.parent / "shared/data/mnist"):
        if (cand / _FILES["test"][0]).exists():
            return cand
    raise FileNotFoundError("MNIST IDX files not found; set HEINFER_MNIST_DIR")


def read_idx(path: Path) -> np.ndarray:
    """Read a gzip'd big-endian IDX file of uint8 (the only type MNIST uses)."""
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != _IDX_UINT8:
        raise ValueError(f"{path}: not a uint8 IDX file (magic {raw[:4].hex()})")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims}, body has {body.size} bytes")
    return body.reshape(dims)


@lru_cache(maxsize=2)
def load(split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """Return (X float64 in [0, 1] of shape (n, 784), labels int64) for 'train' or 'test'."""
    images, labels = _FILES[split]
    root = data_dir()
    X = read_idx(root / images).reshape(-1, 28 * 28).astype(np.float64) / 255.0
    y = read_idx(root / labels).astype(np.int64)
    if len(X) != len(y):
        raise ValueError(f"{split}: {len(X)} images but {len(y)} labels")
    return X, y


@lru_cache(maxsize=1)
def model() -> Model:
    """Fit LogisticRegression(max_iter=200) once per process (memory cache only)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    Xtr, ytr = load("train")
    Xte, yte = load("test")
    clf = LogisticRegression(max_iter=200)
    with warnings.catch_warnings():
        # 200 lbfgs iterations may stop short of tolerance; the fit is still what we serve.
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(Xtr, ytr)
    W = np.ascontiguousarray(clf.coef_, dtype=np.float64)
    b = np.ascontiguousarray(clf.intercept_, dtype=np.float64)
    if W.shape != (10, 784):
        raise ValueError(f"unexpected coef shape {W.shape}")
    return Model(
        W=W,
        b=b,
        train_accuracy=float(clf.score(Xtr, ytr)),
        test_accuracy=float(clf.score(Xte, yte)),
    )
