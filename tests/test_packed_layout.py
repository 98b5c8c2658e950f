"""coeff-packed (plans/linear/packed.py): correctness of the packing tree, its privacy treatment
with negative controls, its seeded Galois keys; the cost model's pick; Pipeline folding; the
chosen input precision. Models are small: CPU is scarce."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from heinfer.errors import MalformedPayloadError, ParameterMismatchError
from heinfer.plans.base import codec_for
from heinfer.plans.linear import compile as compile_module
from heinfer.plans.linear import compile_linear
from heinfer.plans.linear.packed import (
    PackedClient,
    PackedServer,
    automorphism,
    monomial_shift,
    node_weights,
    packing,
)
from heinfer.plans.linear.plan import LinearPlan, Treatment
from heinfer.plans.manifest import Manifest
from heinfer.plans.wire import decode_keys, encode_keys
from linear_helpers import random_packed_head


@pytest.fixture(scope="module")
def setup() -> dict[str, Any]:
    rng = np.random.default_rng(3)
    with pytest.MonkeyPatch.context() as patch:  # one tree level on the client: 2 images
        patch.setattr(compile_module, "_CLIENT_LEVELS", (1,))
        plan = random_packed_head(rng, "packed")
    codec = codec_for(plan.manifest)
    secret = codec.keygen()
    keys = plan.load_keys(codec.key_upload(secret, ["coeff-packed"]))
    server = next(x for x in plan.layouts.values() if isinstance(x, PackedServer))
    client = PackedClient(codec)
    X = rng.uniform(0, 1, (2, 700))
    record = client.encrypt_record(secret, codec.quantize(X[:1])[0])
    return {
        "plan": plan,
        "codec": codec,
        "secret": secret,
        "keys": keys,
        "server": server,
        "X": X,
        "record": record,
    }


def test_scores_match_plaintext(setup: dict[str, Any]) -> None:
    plan, codec, secret = setup["plan"], setup["codec"], setup["secret"]
    assert plan.manifest.layout["packed"]["levels"] == 2
    body = codec.encrypt(secret, setup["X"], "coeff-packed")
    scores = codec.decrypt(secret, plan.evaluate(body, setup["keys"]))
    error = np.abs(scores - plan.predict_plain(setup["X"])).max()
    assert error <= plan.manifest.precision.max_abs_error


def test_client_levels_chosen_and_request_carries_the_images(setup: dict[str, Any]) -> None:
    plan = setup["plan"]
    spec = plan.manifest.layout["packed"]
    assert spec["client_levels"] == 1
    assert len(spec["images"]) == 1 << spec["client_levels"]
    assert len(setup["record"]) == len(spec["images"]) * plan.context.request_bytes
    # one Galois key per level the server does itself
    assert len(plan.manifest.keys.galois_elements) == spec["levels"] - spec["client_levels"]


def test_server_only_tree_matches_plaintext() -> None:
    """The cost model's pick for a small tree (2 key switches) is client_levels = 0: one
    ciphertext per sample, every level a key switch."""
    rng = np.random.default_rng(5)
    plan = random_packed_head(rng, "packed0")
    assert plan.manifest.layout["packed"]["client_levels"] == 0
    codec = codec_for(plan.manifest)
    secret = codec.keygen()
    keys = plan.load_keys(codec.key_upload(secret, ["coeff-packed"]))
    X = rng.uniform(0, 1, (1, 700))
    body = codec.encrypt(secret, X, "coeff-packed")
    assert len(body) == 8 + plan.context.request_bytes
    scores = codec.decrypt(secret, plan.evaluate(body, keys))
    assert np.abs(scores - plan.predict_plain(X)).max() <= plan.manifest.precision.max_abs_error


def test_whole_tree_on_the_client_needs_no_galois_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """client_levels = levels: 4 images, no key switch, an empty set of Galois keys."""
    monkeypatch.setattr(compile_module, "_CLIENT_LEVELS", (2,))
    rng = np.random.default_rng(7)
    plan = random_packed_head(rng, "packed2")
    spec = plan.manifest.layout["packed"]
    assert spec["client_levels"] == spec["levels"] == 2
    assert plan.manifest.keys.galois_elements == []
    codec = codec_for(plan.manifest)
    secret = codec.keygen()
    keys = plan.load_keys(codec.key_upload(secret, ["coeff-packed"]))
    X = rng.uniform(0, 1, (2, 700))
    scores = codec.decrypt(secret, plan.evaluate(codec.encrypt(secret, X, "coeff-packed"), keys))
    assert np.abs(scores - plan.predict_plain(X)).max() <= plan.manifest.precision.max_abs_error


def test_automorphism_matches_seal(setup: dict[str, Any]) -> None:
    """x(X^e) in numpy equals SEAL's apply_galois on an encryption of x, for every Galois key
    of the tree; negative control: the permutation without the negacyclic sign does not."""
    plan, secret, key = setup["plan"], setup["secret"], setup["keys"]
    context = plan.context
    t = plan.params.plain_modulus
    rng = np.random.default_rng(11)
    x = rng.integers(-1000, 1000, context.n)
    for element in plan.manifest.keys.galois_elements:
        ciphertext = context.load_request(secret.encrypt(x)).ciphertext
        context.evaluator.apply_galois_inplace(ciphertext, element, key.galois)
        seal_result = np.mod(secret.decrypt_full(ciphertext), t)
        assert np.array_equal(seal_result, np.mod(automorphism(x, element), t))
        unsigned = np.zeros_like(x)
        unsigned[np.arange(context.n) * element % (2 * context.n) % context.n] = x
        assert not np.array_equal(seal_result, np.mod(unsigned, t))


def _negacyclic(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    full = np.convolve(a, b)
    n = a.size
    out = full[:n].copy()
    out[: full.size - n] -= full[n:]
    return out


@pytest.mark.parametrize("client_levels", [1, 2, 3])
def test_node_weights_do_the_client_levels(client_levels: int) -> None:
    """sum_b tau_b(x) * u_b holds 2^r W_row . x at each output position of the node (numpy
    W @ x, plain integers, negacyclic products by convolution); negative control: the images
    in the wrong order do not."""
    rng = np.random.default_rng(client_levels)
    n_features, degree = 12, 128  # stride 16, 8 rows a group, 8 groups: depth 3
    pack = packing(64, n_features, degree, client_levels)
    assert pack is not None and pack.client_levels == client_levels
    w = rng.integers(-50, 50, (64, n_features))
    x = np.zeros(degree, dtype=np.int64)
    x[:n_features] = rng.integers(0, 16, n_features)
    from heinfer.plans.linear.packed import _output_positions, _weight_polynomial

    block = pack.blocks[0]
    polys = [_weight_polynomial(w, pack, rows) for rows in block]
    images = [automorphism(x, e) for e in pack.image_elements]
    for start in range(0, len(block), pack.images):
        groups = block[start : start + pack.images]
        u = node_weights(polys[start : start + pack.images], pack)
        node = sum(_negacyclic(image, ub) for image, ub in zip(images, u, strict=True))
        expected = (w[[r for rows in groups for r in rows]] @ x[:n_features]) << client_levels
        positions = _output_positions(pack, groups)
        assert np.array_equal(node[positions], expected)
        swapped = sum(_negacyclic(image, ub) for image, ub in zip(images[::-1], u, strict=True))
        assert not np.array_equal(swapped[positions], expected)


def test_monomial_shift_is_negacyclic() -> None:
    poly = np.arange(1, 9)
    assert monomial_shift(poly, 3).tolist() == [-6, -7, -8, 1, 2, 3, 4, 5]


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
    record = setup["record"]
    flooded = secret.noise_budget(_full(setup, Treatment(mask=False), record))
    bare = secret.noise_budget(_full(setup, Treatment(mask=False, flood=False), record))
    assert bare - flooded >= 30


def test_masks_and_their_negative_control(setup: dict[str, Any]) -> None:
    """Non-output coefficients hold partial sums of W x unless masked: two evaluations agree
    there without masks and not with them."""
    secret, plan = setup["secret"], setup["plan"]
    record = setup["record"]
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
    context = setup["plan"].context
    record = setup["record"]
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


def _output_noise(setup: dict[str, Any], ciphertext: Any, x_int: np.ndarray) -> np.ndarray:
    """|c0 + c1*s - (q/t) M| at the output coefficients (ciphertext units), M = 2^levels
    (W_int x_int + b_int) mod t: the noise the client sees, computed with the secret in numpy
    and Python integers (CRT over the data primes)."""
    plan, secret = setup["plan"], setup["secret"]
    context, spec = plan.context, plan.manifest.layout["packed"]
    primes = [int(q) for q in plan.params.data_primes]
    q, t, n = math.prod(primes), int(plan.params.plain_modulus), context.n
    arrays = context.ciphertext_arrays(ciphertext)  # (2, L, N)
    s = secret.ternary().astype(np.int64)
    w_int, b_int = plan.arrays["w_int"], plan.arrays["b_int"]
    noise = []
    for position, row in zip(
        spec["results"][0]["coefficients"], spec["results"][0]["outputs"], strict=True
    ):
        index = position - np.arange(n)  # coefficient P of c1 * s: c1[i] s[P - i], negacyclic
        s_window = np.where(index < 0, -s[index % n], s[index % n])
        residues = []
        for j, prime in enumerate(primes):
            c1 = arrays[1, j].astype(np.int64 if prime < 2**62 else object)
            low, high = c1 & 0xFFFFFFFF, c1 >> 32
            total = int((low * s_window).sum()) + (int((high * s_window).sum()) << 32)
            residues.append((int(arrays[0, j, position]) + total) % prime)
        value = (
            sum(r * (q // p) * pow(q // p, -1, p) for r, p in zip(residues, primes, strict=True))
            % q
        )
        message = (int(w_int[row] @ x_int) + int(b_int[row])) << int(spec["levels"])
        scaled = (t * value - q * (message % t)) % (q * t)
        noise.append(abs(scaled - q * t if scaled > q * t // 2 else scaled) / t)
    return np.array(noise)


def test_leak_bound_holds_on_the_measured_noise(setup: dict[str, Any]) -> None:
    """The output noise of an untreated result (no re-randomization, no flood) is below the
    bound the flood is sized from, and not vacuously: within 2^12 of it."""
    from heinfer.plans.linear.compile import packed_tail_bound

    plan, server = setup["plan"], setup["server"]
    x_int = setup["codec"].quantize(setup["X"][:1])[0]
    bare = Treatment(rerandomize=False, mask=False, flood=False)
    noise = _output_noise(setup, _full(setup, bare, setup["record"]), x_int)
    bound = packed_tail_bound(plan.arrays["w_int"], server.pack)
    assert noise.max() <= bound
    assert noise.max() >= bound / 2**12
    # negative control: the flooded result's noise is far above the bound
    flooded = _output_noise(
        setup, _full(setup, Treatment(rerandomize=False), setup["record"]), x_int
    )
    assert flooded.max() > 2**30 * bound


def test_flood_one_bit_too_small_is_refused(setup: dict[str, Any]) -> None:
    """The server recomputes the leak bound from its weights: the manifest's flood passes,
    half of it (one bit less, below 2^40 x the bound) is refused when the model loads."""
    plan = setup["plan"]
    setup["server"].check_flood()
    manifest = plan.manifest.to_dict()
    flood = int(manifest["layout"]["packed"]["flood_bound"])
    manifest["layout"]["packed"]["flood_bound"] = str(flood // 2)
    weak = LinearPlan(Manifest.from_dict(manifest), plan.arrays)
    with pytest.raises(ParameterMismatchError, match="flood bound"):
        _ = weak.layouts
