"""Folding the linear steps of a scikit-learn `Pipeline` into one served linear layer.

A head is often `StandardScaler -> PCA -> LogisticRegression`: every step is affine, so their
composition is one affine map W' x + b' that the server evaluates as a single encrypted layer
(one request, one response, no extra noise or keys). Folding happens at compile time, in
float64, before quantization: the served weights are exactly the pipeline's.

Steps that are not affine (a `FunctionTransformer`, a neural feature extractor, a
`PolynomialFeatures`) cannot be folded; a *leading* run of them stays on the client, which
computes the embedding locally and encrypts that. Their names go into the manifest
(`input.client_side`) so the client knows what to apply before encrypting. A non-affine step
*after* a foldable one would need the server to evaluate it on ciphertexts: refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from heinfer.errors import UnsupportedModelError

__all__ = ["FOLDABLE_STEPS", "Folded", "fold_pipeline"]

FOLDABLE_STEPS = ("StandardScaler", "PCA", "MaxAbsScaler", "MinMaxScaler")


@dataclass
class Folded:
    """The final estimator, the affine map in front of it, and the client-side steps."""

    estimator: Any
    client_steps: list[tuple[str, Any]] = field(default_factory=list)
    folded_steps: list[str] = field(default_factory=list)
    # x_served = x_client @ A.T + c  (None: identity)
    A: np.ndarray | None = None
    c: np.ndarray | None = None

    def served_weights(
        self, coef: np.ndarray, intercept: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """W (A x + c) + b = (W A) x + (W c + b): the one layer the server evaluates."""
        if self.A is None or self.c is None:
            return coef, intercept
        return coef @ self.A, coef @ self.c + intercept

    def client_transform(self, X: np.ndarray) -> np.ndarray:
        """What the client computes locally before encrypting (the client-side steps)."""
        for _, step in self.client_steps:
            X = np.asarray(step.transform(X), dtype=np.float64)
        return X


def _affine(step: Any) -> tuple[np.ndarray, np.ndarray]:
    """(A, c) with step.transform(x) == A x + c for a fitted affine transformer."""
    kind = type(step).__name__
    if kind == "StandardScaler":
        n = int(step.n_features_in_)
        mean = np.zeros(n) if step.mean_ is None else np.asarray(step.mean_, np.float64)
        scale = np.ones(n) if step.scale_ is None else np.asarray(step.scale_, np.float64)
        return np.diag(1.0 / scale), -mean / scale
    if kind in ("MaxAbsScaler", "MinMaxScaler"):
        scale = np.asarray(step.scale_, np.float64)
        offset = np.asarray(getattr(step, "min_", np.zeros_like(scale)), np.float64)
        if kind == "MaxAbsScaler":
            return np.diag(1.0 / scale), np.zeros_like(scale)
        return np.diag(scale), offset
    if kind == "PCA":
        components = np.asarray(step.components_, np.float64)
        if getattr(step, "whiten", False):
            components = components / np.sqrt(np.asarray(step.explained_variance_))[:, None]
        mean = np.asarray(step.mean_, np.float64)
        return components, -components @ mean
    raise UnsupportedModelError(f"{kind} is not an affine step heinfer can fold")


def fold_pipeline(model: Any) -> Folded:
    """Split a fitted `Pipeline` into client-side steps, folded affine steps and the estimator.

    Anything that is not a Pipeline comes back as the estimator alone.
    """
    steps = getattr(model, "steps", None)
    if type(model).__name__ != "Pipeline" or not steps:
        return Folded(model)
    *transforms, (_, estimator) = steps
    transforms = [(name, step) for name, step in transforms if step not in (None, "passthrough")]
    first = len(transforms)
    for index, (_, step) in enumerate(transforms):
        if type(step).__name__ in FOLDABLE_STEPS:
            first = index
            break
    client, served = transforms[:first], transforms[first:]
    refused = [type(s).__name__ for _, s in served if type(s).__name__ not in FOLDABLE_STEPS]
    if refused:
        raise UnsupportedModelError(
            f"pipeline step {refused[0]} comes after a folded linear step; only a leading run of "
            f"non-linear steps can run on the client (foldable: {', '.join(FOLDABLE_STEPS)})"
        )
    folded = Folded(estimator, client, [f"{n}:{type(s).__name__}" for n, s in served])
    for _, step in served:
        A, c = _affine(step)
        if folded.A is None or folded.c is None:
            folded.A, folded.c = A, c
        else:  # x -> A2 (A1 x + c1) + c2
            folded.A, folded.c = A @ folded.A, A @ folded.c + c
    return folded
