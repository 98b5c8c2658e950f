# The compiled loops of heinfer.rlwe (_kernels.c). Called only through the wrappers in ring.py,
# encrypt.py and sampling.py, which check dtypes, shapes and contiguity.
import numpy as np

__all__ = [
    "centered_binomial_21",
    "divide_and_round_q_last",
    "fold_digits",
    "negacyclic_at",
    "recombine_digits",
    "reduce_mod",
]

def fold_digits(
    values: np.ndarray,
    widths: tuple[int, ...],
    digits: tuple[int, ...],
    twist: np.ndarray,
    out: np.ndarray,
) -> None: ...
def recombine_digits(
    rounded: np.ndarray,
    widths: tuple[int, ...],
    digits: tuple[int, ...],
    primes: tuple[int, ...],
    batch: int,
    small: np.ndarray | None,
    out: np.ndarray,
) -> None: ...
def divide_and_round_q_last(
    values: np.ndarray,
    primes: tuple[int, ...],
    inverses: tuple[int, ...],
    count: int,
    out: np.ndarray,
) -> None: ...
def reduce_mod(values: np.ndarray, modulus: int) -> None: ...
def centered_binomial_21(stream: bytes, out: np.ndarray) -> None: ...
def negacyclic_at(
    small: np.ndarray,
    values: np.ndarray,
    coefficients: np.ndarray,
    polys: np.ndarray,
    primes: tuple[int, ...],
    degree: int,
    out: np.ndarray,
) -> None: ...
