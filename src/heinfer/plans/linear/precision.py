"""Choosing the input quantization: bits and range from sample inputs or a target score error.

Rounding an input to a grid of step h = (high - low) / (2**bits - 1) moves score j by
sum_i w_ji d_i, d_i uniform in [-h/2, h/2]: a sum of many small independent terms, standard
deviation h ||w_j||_2 / sqrt(12). We report three of those standard deviations as the expected
score error and choose the fewest bits that keep it under the target, because every extra
input bit costs one bit of plaintext modulus (and so ciphertext modulus, request and response
bytes) in every layout.

The target comes from, in order: the caller (`target_error`); the sample inputs' own grid, if
they lie on one exactly (MNIST pixels / 255 are exact at 8 bits: no rounding at all); the
samples' decision margins for a classifier (half the 1% quantile of top-1 minus top-2 score,
so that quantization flips fewer than 1 in 100 near ties, and checked on the samples
themselves: no sample may change its argmax, then two bits more because a sample's tail is
thinner than the population's); 1% of the predictions' spread for a regressor.
Without samples or a target the historical 8 bits stand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "DEFAULT_BITS",
    "MAX_BITS",
    "MIN_BITS",
    "InputChoice",
    "choose_input_bits",
    "input_error",
]

DEFAULT_BITS = 8
MIN_BITS, MAX_BITS = 4, 16
_HEADROOM_BITS = 2


@dataclass(frozen=True)
class InputChoice:
    bits: int
    target_error: float | None  # what the choice aimed for (score units); None: fixed bits
    reason: str


def input_error(coef: np.ndarray, low: float, high: float, bits: int) -> float:
    """Three standard deviations of the worst output's score error from input rounding."""
    step = (high - low) / ((1 << bits) - 1)
    norm = float(np.sqrt((np.asarray(coef, np.float64) ** 2).sum(axis=1)).max())
    return 3.0 * step * norm / math.sqrt(12.0)


def _quantized(X: np.ndarray, low: float, high: float, bits: int) -> np.ndarray:
    levels = (1 << bits) - 1
    grid = np.clip(np.rint((X - low) / (high - low) * levels), 0, levels)
    return low + grid * (high - low) / levels


def _exact_bits(X: np.ndarray, low: float, high: float) -> int | None:
    for bits in range(1, MAX_BITS + 1):
        if np.allclose(_quantized(X, low, high, bits), X, rtol=0, atol=1e-9 * (high - low)):
            return bits
    return None


def choose_input_bits(
    coef: np.ndarray,
    intercept: np.ndarray,
    low: float,
    high: float,
    *,
    X: np.ndarray | None = None,
    target_error: float | None = None,
    classification: bool = True,
) -> InputChoice:
    """The fewest bits in [MIN_BITS, MAX_BITS] meeting the target (see the module docstring)."""
    if X is not None and target_error is None:
        exact = _exact_bits(X, low, high)
        if exact is not None:
            return InputChoice(max(exact, 1), 0.0, f"sample inputs lie on a {exact}-bit grid")
    if target_error is None and X is None:
        return InputChoice(DEFAULT_BITS, None, "fixed default (no samples or target given)")
    scores = None if X is None else X @ coef.T + intercept
    if target_error is None:
        assert scores is not None
        if classification and scores.shape[1] > 1:
            top = np.sort(scores, axis=1)
            margins = top[:, -1] - top[:, -2]
        elif classification:
            margins = np.abs(scores[:, 0])
        else:
            margins = np.full(len(scores), 2.0 * 0.01 * float(scores.std() or 1.0))
        target = max(float(np.quantile(margins, 0.01)) / 2.0, 1e-12)
        source = "half the 1% quantile of the samples' decision margins"
        if not classification:
            source = "1% of the samples' prediction spread"
    else:
        target, source = float(target_error), "the stated target score error"
    for bits in range(MIN_BITS, MAX_BITS + 1):
        if input_error(coef, low, high, bits) > target:
            continue
        if classification and scores is not None and X is not None and scores.shape[1] > 1:
            moved = _quantized(X, low, high, bits) @ coef.T + intercept
            if np.any(moved.argmax(axis=1) != scores.argmax(axis=1)):
                continue
        if target_error is None:  # the samples' tail is not the population's: 2 bits spare
            bits = min(MAX_BITS, bits + _HEADROOM_BITS)
            source += f", plus {_HEADROOM_BITS} bits of headroom"
        return InputChoice(bits, target, f"fewest bits with expected score error <= {source}")
    return InputChoice(MAX_BITS, target, f"{source} needs more than {MAX_BITS} bits: capped")
