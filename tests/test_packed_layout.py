"""coeff-packed (plans/linear/packed.py): correctness of the packing tree, its privacy treatment
with negative controls, its seeded Galois keys; the cost model's pick; Pipeline folding; the
chosen input precision. Models are small: CPU is scarce."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from heinfer.errors import MalformedPayloadError
from heinfer.plans.base import codec_for
from heinfer.plans.linear import compile_linear
from heinfer.plans.linear.packed import PackedServer
from heinfer.plans.linear.plan import Treatment
from heinfer.plans.wire import decode_keys, encode_keys


@pytest.fixture(scope="module")
def setup() -> dict[str, Any]:
    rng = np.random.default_rng(3)
    coef = rng.normal(0, 1, (20, 700))  # stride 1024, 8 rows a group: 3 groups, a lone one
    plan = compile_linear(
        coef,
        rng.normal(0, 1, 20),
        name="packed",
        task="classification",
        estimator="t",
        classes=None,
        input_range=(0.0, 1.0),
        layout="coeff-packed",
    )
    codec = codec_for(plan.manifest)
    secret = codec.keygen()
    keys = plan.load_keys(codec.key_upload(secret, ["coeff-packed"]))
    server = next(x for x in plan.layouts.values() if isinstance(x, PackedServer))
    X = rng.uniform(0, 1, (2, 700))
    return {"plan": plan, "codec": codec, "secret": secret, "keys": keys, "server": server, "X": X}


def test_scores_match_plaintext(setup: dict[str, Any]) -> None:
    plan, codec, secret = setup["plan"], setup["codec"], setup["secret"]
    assert plan.manifest.layout["packed"]["levels"] == 2
    body = codec.encrypt(secret, setup["X"], "coeff-packed")
    scores = codec.decrypt(secret, plan.evaluate(body, setup["keys"]))
    error = np.abs(scores - plan.predict_plain(setup["X"])).max()
    assert error <= plan.manifest.precision.max_abs_error


def test_response_is_one_polynomial_plus_outputs(setup: dict[str, Any]) -> None:
    plan = setup["plan"]
    n = plan.params.poly_modulus_degree
    bits = plan.manifest.layout["packed"]["result_prime_bits"]
    body = setup["codec"].encrypt(setup["secret"], setup["X"][:1], "coeff-packed")
    response = plan.evaluate(body, setup["keys"])
    assert len(response) == 8 + (n * bits + 7) // 8 + (20 * bits + 7) // 8


def _full(setup: dict[str, Any], treatment: Treatment, record: bytes) -> Any:
    plan = setup["plan"]
    plan._treatment = treatment
    try:
        return setup["server"].evaluate_full(record, setup["keys"])[0]
    finally:
        plan._treatment = Treatment()


def test_flooding_and_its_negative_control(setup: dict[str, Any]) -> None:
    """Masks off (so the noise budget reads the outputs): flooding eats >= 30 bits of budget;
    without it the client would see the small, W-dependent noise."""
    secret = setup["secret"]
    record = secret.encrypt(setup["codec"].quantize(setup["X"][:1])[0])
    flooded = secret.noise_budget(_full(setup, Treatment(mask=False), record))
    bare = secret.noise_budget(_full(setup, Treatment(mask=False, flood=False), record))
    assert bare - flooded >= 30


def test_masks_and_their_negative_control(setup: dict[str, Any]) -> None:
    """Non-output coefficients hold partial sums of W x unless masked: two evaluations agree
    there without masks and not with them."""
    secret, plan = setup["secret"], setup["plan"]
    record = secret.encrypt(setup["codec"].quantize(setup["X"][:1])[0])
    outputs = set(plan.manifest.layout["packed"]["results"][0]["coefficients"])
    others = np.array([i for i in range(plan.params.poly_modulus_degree) if i not in outputs])
    bare = Treatment(mask=False, flood=False)
    a = secret.decrypt_full(_full(setup, bare, record))[others]
    b = secret.decrypt_full(_full(setup, bare, record))[others]
    assert np.array_equal(a, b) and np.count_nonzero(a) > len(others) // 2
    c = secret.decrypt_full(_full(setup, Treatment(), record))[others]
    d = secret.decrypt_full(_full(setup, Treatment(), record))[others]
    assert np.mean(c == d) < 0.01


def test_rerandomization_and_its_negative_control(setup: dict[str, Any]) -> None:
    """c1 of the result is a fixed function of the request's c1 and W unless re-randomized."""
    context, secret = setup["plan"].context, setup["secret"]
    record = secret.encrypt(setup["codec"].quantize(setup["X"][:1])[0])
    off = Treatment(rerandomize=False)
    c1 = [context.ciphertext_arrays(_full(setup, off, record))[1] for _ in range(2)]
    assert np.array_equal(c1[0], c1[1])
    c1 = [context.ciphertext_arrays(_full(setup, Treatment(), record))[1] for _ in range(2)]
    assert not np.array_equal(c1[0], c1[1])


def test_galois_keys_are_seeded_and_checked_by_size(setup: dict[str, Any]) -> None:
    plan, codec, secret = setup["plan"], setup["codec"], setup["secret"]
    from heinfer.he.galois import galois_key_bytes

    fingerprint, parts = decode_keys(codec.key_upload(secret, ["coeff-packed"]))
    elements = plan.manifest.keys.galois_elements
    assert len(parts["galois"]) == galois_key_bytes(plan.context, elements)
    # seeded: one polynomial per component, not two
    n, L = plan.params.poly_modulus_degree, len(plan.params.data_primes)
    unseeded = (
        len(elements) * L * 2 * sum(n * q.bit_length() // 8 for q in plan.params.coeff_modulus)
    )
    assert len(parts["galois"]) < 0.51 * unseeded
    short = encode_keys(fingerprint, {**parts, "galois": parts["galois"][:-1]})
    with pytest.raises(MalformedPayloadError):
        plan.check_keys(short)
    flipped = bytearray(parts["galois"])
    flipped[40] ^= 0xFF  # a k0 coefficient out of its prime's range or a wrong key: refused
    tampered = plan.load_keys(encode_keys(fingerprint, {**parts, "galois": bytes(flipped)}))
    body = codec.encrypt(secret, setup["X"][:1], "coeff-packed")
    scores = codec.decrypt(secret, plan.evaluate(body, tampered))
    assert np.abs(scores - plan.predict_plain(setup["X"][:1])).max() > 1.0


def test_cost_model_keeps_rowpack_for_small_models() -> None:
    rng = np.random.default_rng(0)
    plan = compile_linear(
        rng.normal(size=(10, 784)),
        np.zeros(10),
        name="m",
        task="classification",
        estimator="t",
        classes=None,
        input_range=(0.0, 1.0),
    )
    assert plan.manifest.layout["choice"]["picked"] == "coeff-rowpack"
    assert "packed" not in plan.manifest.layout


def test_cost_model_packs_wide_models_with_many_classes() -> None:
    rng = np.random.default_rng(0)
    plan = compile_linear(
        rng.normal(size=(300, 768)),
        np.zeros(300),
        name="w",
        task="classification",
        estimator="t",
        classes=None,
        input_range=(0.0, 1.0),
    )
    choice = plan.manifest.layout["choice"]
    assert choice["picked"] == "coeff-packed"
    options = choice["options"]
    assert (
        options["coeff-packed"]["response_bytes"] * 10 < options["coeff-rowpack"]["response_bytes"]
    )
    assert plan.manifest.keys.galois_elements
