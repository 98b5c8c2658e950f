"""Small BFV contexts and SEAL-computed references for the rlwe and SEAL-format tests.

Every reference here is computed by SEAL itself (its evaluator, decryptor and encryptor), so
the tests compare our numpy arithmetic with SEAL's, not with a second copy of our own.
"""

from __future__ import annotations

import functools

import numpy as np
import tenseal.sealapi as seal

from heinfer.he.backend import Context, SecretKey, find_ntt_primes
from heinfer.he.params import BFVParameters
from heinfer.he.serialization import ciphertext_arrays

N = 4096
# The MNIST model's shape: two data primes (36, 55 bits), an 18-bit special prime, t = 2**34.
BIT_SIZES = [36, 55, 18]


@functools.cache
def bfv_context(plain_modulus: int = 1 << 34) -> Context:
    primes = find_ntt_primes(N, BIT_SIZES)
    return Context(BFVParameters(N, primes, plain_modulus))


def centered(values: np.ndarray, q: int) -> np.ndarray:
    """Residues mod q as signed integers in (-q/2, q/2]."""
    v = values.astype(object) % q
    return np.array([int(x) - q if x > q // 2 else int(x) for x in v.reshape(-1)]).reshape(
        values.shape
    )


def seal_times_secret(context: Context, secret: SecretKey, polys: np.ndarray) -> np.ndarray:
    """(L, rows, N) -> (L, rows, N) products poly * s mod each data prime, computed by SEAL:
    `multiply_plain` of the ciphertext (poly, poly) by the plaintext s (its -1 coefficients as
    t - 1, which SEAL lifts to q - 1); (poly, 0) would be refused as transparent."""
    t = context.params.plain_modulus
    s = secret.ternary().astype(np.int64)
    plain = context.plaintext_from_coefficients(np.mod(s, t))
    out = np.empty_like(polys)
    for row in range(polys.shape[1]):
        arrays = np.stack([polys[:, row], polys[:, row]])
        ciphertext = context.ciphertext_from_arrays(arrays, last_level=False)
        product = seal.Ciphertext()
        context.evaluator.multiply_plain(ciphertext, plain, product)
        out[:, row] = ciphertext_arrays(product)[0]
    return out


def seal_error(
    context: Context, secret: SecretKey, c0: np.ndarray, c1: np.ndarray, scaled: np.ndarray
) -> np.ndarray:
    """e = round(q*m/t) - (c0 + c1*s) at the first data prime, with c1*s computed by SEAL;
    c0, c1, scaled: (L, rows, N)."""
    q = context.params.data_primes[0]
    c1_s = seal_times_secret(context, secret, c1)[0]
    return -centered(c0[0].astype(object) + c1_s.astype(object) - scaled[0].astype(object), q)


def seal_symmetric(context: Context, secret: SecretKey, count: int) -> tuple[np.ndarray, ...]:
    """(c0, c1), each (L, count, N), of `count` SEAL symmetric encryptions of zero."""
    encryptor = seal.Encryptor(context.seal_context, secret._secret)
    zero = context.plaintext_from_coefficients(None)
    cts = []
    for _ in range(count):
        ct = seal.Ciphertext()
        encryptor.encrypt_symmetric(zero, ct)
        cts.append(ciphertext_arrays(ct))
    stacked = np.stack(cts, axis=2)  # (2, L, count, N)
    return stacked[0], stacked[1]


def seal_times_small(context: Context, small: np.ndarray, polys: np.ndarray) -> np.ndarray:
    """(L, N) -> poly * small mod each data prime, computed by SEAL's `multiply_plain` with
    the integer polynomial `small` (|coefficients| < t/2) as a plaintext."""
    plain = context.plaintext_from_coefficients(np.asarray(small, dtype=np.int64))
    ciphertext = context.ciphertext_from_arrays(np.stack([polys, polys]), last_level=False)
    product = seal.Ciphertext()
    context.evaluator.multiply_plain(ciphertext, plain, product)
    return ciphertext_arrays(product)[0]
