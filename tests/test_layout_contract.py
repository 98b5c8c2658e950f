"""The interface contract every layout keeps (heinfer.plans.base), one parametrization for all.

For each layout: keygen -> key_upload -> plan.load_keys -> encrypt -> plan.check -> evaluate ->
decrypt agrees with predict_plain; a truncated body, a wrong magic and a body made for another
model's parameters each get their HeinferError from `check` and from `evaluate`; a key upload
missing a part the layout needs is refused (by `check_keys`/`load_keys`, or, where the rest is
another layout's valid set, by `evaluate` with a 422). Models are tiny: CPU is scarce.

A family adds its layouts by adding a `Case` builder to `BUILDERS` and its kinds to `LAYOUTS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest

from heinfer.errors import HeinferError, MalformedPayloadError, ParameterMismatchError
from heinfer.plans.base import Codec, Plan, codec_for
from heinfer.plans.manifest import Manifest
from heinfer.plans.wire import encode_keys


@dataclass
class Case:
    plan: Plan
    codec: Codec  # built from the plan's public manifest
    foreign: Codec  # same layouts, other encryption parameters
    X: np.ndarray  # a few real inputs
    tolerance: Callable[[str], float]  # per layout: what |decrypted - plaintext| may reach


# -- networks (CKKS) ----------------------------------------------------------------------------
def _network_case(mnist: dict[str, np.ndarray]) -> Case:
    """conv (1 filter, 5x5, stride 2) -> square -> ridge readout: 144 hidden units."""
    from heinfer.he.ckks import select_parameters
    from heinfer.plans.network import NetworkSpec, compile_network
    from heinfer.plans.network.manifest import BATCH_LAYOUT

    rng = np.random.default_rng(0)
    conv = {"type": "conv2d", "weight": rng.normal(0, 0.3, (1, 1, 5, 5)), "bias": np.zeros(1)}
    front = [{**conv, "stride": 2, "padding": 0}, {"type": "poly", "a": 1.0, "b": 0.0}]
    X_train, y_train = mnist["X_train"][:1000], mnist["y_train"][:1000]
    feats = NetworkSpec(front, (1, 28, 28)).predict_plain(X_train)
    F = np.hstack([feats, np.ones((len(feats), 1))])
    coef = np.linalg.solve(F.T @ F + np.eye(F.shape[1]), F.T @ (np.eye(10)[y_train] * 2.0 - 1.0))
    readout = {"type": "linear", "weight": coef[:-1].T, "bias": coef[-1]}
    spec = NetworkSpec([*front, {"type": "flatten"}, readout], (1, 28, 28))
    plan = compile_network(spec, "contract-cnn", calibration=X_train[:300])
    manifest = plan.manifest
    network = manifest.layout["plan_manifest"]
    bits = network["params"]["coeff_modulus_bits"]
    other = select_parameters([bits[0] - 1, *bits[1:]]).to_dict()
    foreign_network = {**network, "params": other}
    foreign = Manifest.from_dict(
        manifest.to_dict()
        | {"scheme": {"scheme": "ckks", **other}}
        | {"layout": {**manifest.layout, "plan_manifest": foreign_network}}
    )
    batch_claim = float(network["batch"]["precision"]["score_abs_error"])

    def tolerance(layout: str) -> float:
        return batch_claim if layout == BATCH_LAYOUT else manifest.precision.max_abs_error

    return Case(plan, codec_for(manifest), codec_for(foreign), mnist["X_test"][:3], tolerance)


# -- linear models (BFV) --------------------------------------------------------------------------
def _linear_case(mnist: dict[str, np.ndarray]) -> Case:
    """A logistic regression on the digits; its foreign twin has other (still 128-bit) moduli."""
    from sklearn.linear_model import LogisticRegression

    import heinfer

    X_train, y_train = mnist["X_train"][:1000], mnist["y_train"][:1000]
    clf = LogisticRegression(max_iter=200).fit(X_train, y_train)
    plan = heinfer.compile(clf, name="contract-linear", input_range=(0.0, 1.0)).plan
    foreign_plan = heinfer.compile(
        clf, name="contract-linear", input_range=(0.0, 1.0), weight_bits=14
    ).plan
    assert foreign_plan.key_fingerprint != plan.key_fingerprint
    manifest = plan.manifest
    return Case(
        plan,
        codec_for(manifest),
        codec_for(foreign_plan.manifest),
        mnist["X_test"][:3],
        lambda _: manifest.precision.max_abs_error,
    )


def _packed_case(mnist: dict[str, np.ndarray]) -> Case:
    """The digits' logistic regression with 30 classes (its rows repeated and perturbed), forced
    to coeff-packed: several groups, so the packing tree and its Galois keys are exercised."""
    from heinfer.plans.linear import compile_linear

    rng = np.random.default_rng(0)
    coef = rng.normal(0, 0.05, (30, 784))
    plans = [
        compile_linear(
            coef,
            rng.normal(0, 0.1, 30),
            name="contract-packed",
            task="classification",
            estimator="test",
            classes=None,
            input_range=(0.0, 1.0),
            layout="coeff-packed",
            weight_bits=bits,
        )
        for bits in (12, 13)
    ]
    assert plans[0].key_fingerprint != plans[1].key_fingerprint
    manifest = plans[0].manifest
    return Case(
        plans[0],
        codec_for(manifest),
        codec_for(plans[1].manifest),
        mnist["X_test"][:2],
        lambda _: manifest.precision.max_abs_error,
    )


BUILDERS: dict[str, Callable[[dict[str, np.ndarray]], Case]] = {
    "linear": _linear_case,
    "packed": _packed_case,
    "network": _network_case,
}
LAYOUTS = [
    ("coeff-rowpack", "linear"),
    ("coeff-batch", "linear"),
    ("coeff-packed", "packed"),
    ("ckks-network", "network"),
    ("ckks-network-batch", "network"),
]


@pytest.fixture(scope="module")
def cases(mnist: dict[str, np.ndarray]) -> Callable[[str], Case]:
    built: dict[str, Case] = {}

    def get(name: str) -> Case:
        if name not in built:
            built[name] = BUILDERS[name](mnist)
        return built[name]

    return get


@pytest.fixture(params=LAYOUTS, ids=[kind for kind, _ in LAYOUTS])
def layout(request: pytest.FixtureRequest, cases: Callable[[str], Case]) -> tuple[str, Case]:
    kind, name = request.param
    return kind, cases(name)


def test_round_trip(layout: tuple[str, Case]) -> None:
    kind, case = layout
    plan, codec = case.plan, case.codec
    assert kind in codec.layouts and kind in {entry.kind for entry in plan.layouts.values()}
    secret = codec.keygen()
    upload = codec.key_upload(secret, [kind])
    plan.check_keys(upload)
    keys = plan.load_keys(upload)
    assert keys.nbytes > 0
    body = codec.encrypt(secret, case.X, kind)
    request = plan.check(body)
    assert (request.layout, request.samples) == (kind, len(case.X))
    scores = codec.decrypt(secret, plan.evaluate(body, keys))
    reference = plan.predict_plain(case.X)
    assert scores.shape == reference.shape == (len(case.X), plan.manifest.n_outputs)
    assert np.abs(scores - reference).max() <= case.tolerance(kind)


def test_bad_bodies(layout: tuple[str, Case]) -> None:
    kind, case = layout
    plan, codec = case.plan, case.codec
    secret = codec.keygen()
    keys = plan.load_keys(codec.key_upload(secret, [kind]))
    body = codec.encrypt(secret, case.X[:1], kind)
    foreign_secret = case.foreign.keygen()
    bad: list[tuple[bytes, type[HeinferError]]] = [
        (body[: len(body) // 2], MalformedPayloadError),
        (body[:6], MalformedPayloadError),
        (b"XXXX" + body[4:], MalformedPayloadError),
        (case.foreign.encrypt(foreign_secret, case.X[:1], kind), ParameterMismatchError),
    ]
    for payload, error in bad:
        with pytest.raises(error):
            plan.check(payload)
        with pytest.raises(error):
            plan.evaluate(payload, keys)


def test_key_upload_missing_a_part(layout: tuple[str, Case]) -> None:
    kind, case = layout
    plan, codec = case.plan, case.codec
    secret = codec.keygen()
    needed = codec.layout(kind).key_parts
    assert needed == next(e.key_parts for e in plan.layouts.values() if e.kind == kind)
    parts = codec.public_keys(secret, needed)
    accepted = {frozenset(entry.key_parts) for entry in plan.layouts.values()}
    body = codec.encrypt(secret, case.X[:1], kind)
    for missing in sorted(needed):
        rest = {name: blob for name, blob in parts.items() if name != missing}
        upload = encode_keys(codec.key_fingerprint, rest)
        if frozenset(rest) in accepted:  # another layout's set: this layout's requests refuse it
            keys = plan.load_keys(upload)
            with pytest.raises(ParameterMismatchError) as info:
                plan.evaluate(body, keys)
            assert info.value.status == 422
            continue
        with pytest.raises(HeinferError):
            plan.check_keys(upload)
        with pytest.raises(HeinferError):
            plan.load_keys(upload)


def test_every_registered_layout_is_under_contract() -> None:
    """A layout added to the registry must join LAYOUTS (and BUILDERS) above."""
    from heinfer.plans.base import layout_kinds

    assert sorted(layout_kinds()) == sorted(kind for kind, _ in LAYOUTS)
