"""Model privacy of the coeff-batch linear layout, attacked with the secret key in hand.

Each attack is also run with the protection switched off (`service_helpers.protections`) and
must then succeed, so a passing check means the protection is what stops it: masked output
coefficients decrypt to uniform values, a response's c1 is not the linear combination of the
request's c1s that would let a client solve for W (shown end to end on a 24-feature model), and
the output noise is flooded within the manifest's precision. Moved here from
tests/test_batch_layout.py, unchanged in substance.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from scipy.stats import chisquare

import heinfer
from heinfer.he.backend import SecretKey
from heinfer.plans.linear import BATCH_LAYOUT_KIND, BatchClient, LinearCodec, LinearPlan
from heinfer.rlwe.ring import linear_combination
from service_helpers import protections


@pytest.fixture(scope="module")
def setup(mnist_model: heinfer.EncryptedModel) -> dict[str, Any]:
    codec = LinearCodec(mnist_model.manifest)
    secret = SecretKey.generate(codec.context)
    key = mnist_model.plan.context.load_evaluation_key(secret.public_key_bytes())
    return {"plan": mnist_model.plan, "codec": codec, "secret": secret, "key": key}


def _encrypt_batch(codec: LinearCodec, secret: SecretKey, X: np.ndarray) -> bytes:
    layout = codec.layouts[BATCH_LAYOUT_KIND]
    assert isinstance(layout, BatchClient)
    return layout.encrypt_record(secret, X)



def _first_level_arrays(plan: LinearPlan, ciphertexts: list[Any]) -> np.ndarray:
    return np.stack([plan.context.ciphertext_arrays(c) for c in ciphertexts])  # (rows, 2, L, N)


def test_masked_coefficients_are_uniform(
    setup: dict[str, Any], mnist: dict[str, np.ndarray]
) -> None:
    plan, codec, secret = setup["plan"], setup["codec"], setup["secret"]
    samples = 40
    record = _encrypt_batch(codec, secret, mnist["X_test"][:samples])
    t = plan.params.plain_modulus

    def pvalue() -> float:
        values = np.concatenate([
            secret.decrypt_full(c)[samples:] % t
            for c in plan.evaluate_batch_full(record, samples, setup["key"])
        ])
        bins = np.bincount((values.astype(np.float64) * 32 // t).astype(int), minlength=32)
        return float(chisquare(bins).pvalue)

    assert pvalue() > 1e-4
    with protections(plan, mask=False):
        assert pvalue() < 1e-12  # unmasked, they decrypt to (near) zero


def test_result_c1_is_not_a_known_combination_of_request_c1s(
    setup: dict[str, Any], mnist: dict[str, np.ndarray]
) -> None:
    """Without re-randomization, c1_j = sum_i w_ji c1_i exactly: a linear system in W."""
    plan, codec, secret = setup["plan"], setup["codec"], setup["secret"]
    record = _encrypt_batch(codec, secret, mnist["X_test"][:10])
    _, c1 = plan.context.load_batch_request(record, 784)
    w = plan.arrays["w_int"]
    combos = [linear_combination(w, c1[j], q) for j, q in enumerate(plan.params.data_primes)]

    def matching_fraction() -> float:
        arrays = _first_level_arrays(plan, plan.evaluate_batch_full(record, 10, setup["key"]))
        hits = sum((arrays[:, 1, j] == combos[j]).sum() for j in range(len(combos)))
        return float(hits / (arrays[:, 1].size))

    with protections(plan, rerandomize=False):
        assert matching_fraction() == 1.0
    assert matching_fraction() < 0.001


def _solve_mod(matrix: list[list[int]], rhs: list[int], q: int) -> list[int] | None:
    """Gaussian elimination over Z_q (q prime) on the first square block, or None."""
    n = len(matrix[0])
    rows = [[*row, b] for row, b in zip(matrix[:n], rhs[:n], strict=True)]
    for col in range(n):
        pivot = next((r for r in range(col, n) if rows[r][col] % q), None)
        if pivot is None:
            return None
        rows[col], rows[pivot] = rows[pivot], rows[col]
        inv = pow(rows[col][col], -1, q)
        rows[col] = [(v * inv) % q for v in rows[col]]
        for r in range(n):
            if r != col and rows[r][col]:
                factor = rows[r][col]
                rows[r] = [(a - factor * b) % q for a, b in zip(rows[r], rows[col], strict=True)]
    return [rows[r][n] for r in range(n)]


def test_weights_are_solvable_from_one_response_only_without_rerandomization(
    mnist: dict[str, np.ndarray],
) -> None:
    """The attack itself, on a 24-feature model: solve c1_j = sum_i w_ji c1_i mod q1."""
    X, y = mnist["X_train"][:2000, 300:324], mnist["y_train"][:2000]
    from sklearn.linear_model import LogisticRegression

    estimator = LogisticRegression(max_iter=300).fit(X, y)
    model = heinfer.compile(estimator, name="small", input_range=(0.0, 1.0))
    plan = model.plan
    codec = LinearCodec(model.manifest)
    secret = SecretKey.generate(codec.context)
    key = plan.context.load_evaluation_key(secret.public_key_bytes())
    record = _encrypt_batch(codec, secret, mnist["X_test"][:5, 300:324])
    _, c1 = plan.context.load_batch_request(record, 24)
    q = plan.params.data_primes[0]
    n_features = 24
    # equations: coefficient k of c1_j mod q1 = sum_i w_ji * (coefficient k of c1_i mod q1)
    a = c1[0].astype(object)  # (24, N)
    equations = [[int(a[i, k]) for i in range(n_features)] for k in range(40)]
    w_true = [int(v) % q for v in plan.arrays["w_int"][3]]

    def attack() -> tuple[bool, bool]:
        result = plan.evaluate_batch_full(record, 5, key)[3]
        c1_result = plan.context.ciphertext_arrays(result)[1, 0]
        rhs = [int(v) for v in c1_result[:40]]
        solved = _solve_mod(equations, rhs, q)
        assert solved is not None
        consistent = all(
            sum(c * s for c, s in zip(eq, solved, strict=True)) % q == r
            for eq, r in zip(equations[n_features:], rhs[n_features:], strict=True)
        )
        return solved == w_true, consistent

    with protections(plan, rerandomize=False):
        assert attack() == (True, True)  # the weights, exactly, from one response
    assert attack() == (False, False)  # re-randomized: no solution at all


def _deviation(setup: dict[str, Any], X: np.ndarray, repeats: int = 2) -> np.ndarray:
    plan, codec, secret = setup["plan"], setup["codec"], setup["secret"]
    record = _encrypt_batch(codec, secret, X)
    exact = codec.quantize(X) @ plan.arrays["w_int"].T + plan.arrays["b_int"]
    out = []
    for _ in range(repeats):
        for j, ciphertext in enumerate(plan.evaluate_batch_full(record, len(X), setup["key"])):
            out.append(secret.decrypt_full(ciphertext)[: len(X)] - exact[:, j])
    return np.concatenate(out).astype(np.float64)


def test_output_noise_is_flooded(
    setup: dict[str, Any], mnist: dict[str, np.ndarray], mnist_model: heinfer.EncryptedModel
) -> None:
    X = mnist["X_test"][:200]
    eta = mnist_model.manifest.layout["batch"]["noise"]["eta_target"]
    flooded = _deviation(setup, X)
    assert np.abs(flooded).max() <= eta  # within the precision the manifest promises
    assert flooded.std() > eta / 20  # and visibly randomized
    with protections(setup["plan"], flood=False):
        assert np.abs(_deviation(setup, X)).max() <= 2  # exact without flooding
