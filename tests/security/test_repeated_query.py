"""The repeated-query attack on CKKS network responses (issue 20's acceptance), measured with
the secret key.

Averaging repeats of one request strips the fresh flooding and converges to the pre-flood
result, a deterministic function of request, keys and weights. What the client is entitled to
is the served model f~ on its own decrypted input x~; the rest, E, is what the attack would
resolve after about 2^(2s) repeats. The tests compile with the defaults, decrypt the pre-flood
result of real digits (the schedule walked by the SEAL executor without the final treatment),
subtract f~(x~) computed exactly (`bound.measured_error`, every slot, real and imaginary parts)
and check max|E| <= 2^-s * flood std, s and the flood's std being what the manifest states.

Negative controls: the same model on the earlier schedule (input at 2^28, the first layer
rotating its input, the batched groups rescaled before relinearization) with today's flood
fails that check against the s the default compile states (the measurement can fail, and it
does for the deployment this issue started from), in both layouts; on that schedule the
batched error also exceeds the earlier bound (the mean key instead of the worst slot). On the
default schedule the measured error is near float64's resolution of the decoded slots
(~1e-14 in the batched layout), an over-statement of E, which only makes the check harder.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from heinfer.errors import ModelFormatError, UnsupportedModelError
from heinfer.plans.base import codec_for
from heinfer.plans.network import NetworkPlan, compile_network
from heinfer.plans.network.bound import error_bound, measured_error
from heinfer.plans.network.manifest import build_plan_manifest, common_manifest
from heinfer.server.budget import BudgetPolicy, budget_warnings, repeated_query_lines
from network_helpers import ridge_cnn

# What the default compile of this CNN must reach per layout (the manifest states the exact
# value; these are floors so that a change that loses the protection fails here).
MIN_SINGLE_BITS = 20.0
MIN_BATCH_BITS = 25.0




def _earlier_schedule(plan: NetworkPlan) -> NetworkPlan:
    """The same compiled model without its `schedule` array: the schedule and scales of the
    release this issue was filed against, with its manifest recomputed (so its own claims)."""
    arrays = {k: v for k, v in plan.to_arrays().items() if k != "schedule"}
    net = plan.network
    network = build_plan_manifest(
        net["name"], plan.ctx.params, arrays, plan.n_act, plan.n_features, (0.0, 1.0)
    )
    manifest = common_manifest(network, plan.manifest.estimator, plan.spec.parameter_count)
    return NetworkPlan.from_arrays(manifest, arrays)


@pytest.fixture(scope="module")
def setup(mnist: dict[str, np.ndarray]):  # type: ignore[no-untyped-def]
    spec = ridge_cnn(mnist["X_train"][:2000], mnist["y_train"][:2000])
    plan = compile_network(spec, "flood-cnn", calibration=mnist["X_train"][:300])
    codec = codec_for(plan.manifest)
    secret = codec.keygen()
    keys = plan.load_keys(codec.key_upload(secret))
    return plan, codec.client_keys(secret), keys, mnist["X_test"]


def _check(errors: np.ndarray, privacy: dict) -> float:  # type: ignore[type-arg]
    """The acceptance check: max|E| <= 2^-s * flood std, with s and the std the manifest's."""
    s = float(privacy["statistical_security_bits"])
    sigma = float(privacy["flood_noise_std"])
    worst = float(np.abs(errors).max())
    assert worst <= 2.0**-s * sigma, f"max|E| {worst:.3g} > 2^-{s} * {sigma:.3g}"
    assert worst <= float(privacy["evaluation_error_bound"])
    return worst


def test_single_layout_repeated_queries(setup) -> None:  # type: ignore[no-untyped-def]
    plan, client, keys, X = setup
    privacy = plan.network["privacy"]
    assert privacy["statistical_security_bits"] >= MIN_SINGLE_BITS
    errors = measured_error(plan, client, keys, X[:3], "single")
    assert errors.size == 3 * 2 * plan.ctx.slots  # every slot of every request, both parts
    _check(errors, privacy)

    # negative control: the earlier schedule with today's flood is measurably short of the s
    # the default compile states (and within its own, honest, bound)
    earlier = _earlier_schedule(plan)
    assert earlier.network["privacy"]["flood_noise_std"] == privacy["flood_noise_std"]
    earlier_keys = earlier.load_keys(_upload(earlier, client))
    old = measured_error(earlier, client, earlier_keys, X[:3], "single")
    with pytest.raises(AssertionError, match=r"max\|E\|"):
        _check(old, privacy)
    _check(old, earlier.network["privacy"])


def _upload(plan: NetworkPlan, client) -> bytes:  # type: ignore[no-untyped-def]
    """The same client key, uploaded for another plan with the same parameters."""
    from heinfer.plans.network.codec import NetworkSecret

    codec = codec_for(plan.manifest)
    return codec.key_upload(NetworkSecret(client))


def test_batch_layout_repeated_queries(setup) -> None:  # type: ignore[no-untyped-def]
    plan, client, keys, X = setup
    privacy = plan.network["batch"]["privacy"]
    assert privacy["statistical_security_bits"] >= MIN_BATCH_BITS
    # every slot holds an input (the key's worst slot is among them), at no extra cost
    inputs = np.resize(X[:64], (plan.ctx.slots, X.shape[1]))
    _check(measured_error(plan, client, keys, inputs, "batch"), privacy)

    # negative controls on the earlier schedule, whose error is large enough to measure: with
    # today's flood it is short of the s the default compile states; it stays within its own
    # bound, and exceeds the earlier bound (the mean over keys of |s(zeta_j)|^2 in every slot)
    earlier = _earlier_schedule(plan)
    earlier_keys = earlier.load_keys(_upload(earlier, client))
    old = measured_error(earlier, client, earlier_keys, inputs, "batch")
    with pytest.raises(AssertionError, match=r"max\|E\|"):
        _check(old, privacy)
    _check(old, earlier.network["batch"]["privacy"])
    n = plan.ctx.params.poly_modulus_degree
    mean_key = error_bound(
        plan.ctx.params, earlier._arrays, earlier.scales(), plan.n_act, plan.n_features,
        (0.0, 1.0), "batch", secret_sq=2.0 * n / 3.0,
    )
    assert float(np.abs(old).max()) > mean_key.max_abs


def test_manifest_states_the_computed_security(setup) -> None:  # type: ignore[no-untyped-def]
    plan, *_ = setup
    for privacy in (plan.network["privacy"], plan.network["batch"]["privacy"]):
        s = math.log2(privacy["flood_noise_std"] / privacy["evaluation_error_bound"])
        assert privacy["statistical_security_bits"] == pytest.approx(s, abs=0.01)
    stated = min(
        plan.network["privacy"]["statistical_security_bits"],
        plan.network["batch"]["privacy"]["statistical_security_bits"],
    )
    assert plan.manifest.privacy.flooding_statistical_bits == math.floor(stated)


def test_compiler_sizes_the_flood_or_refuses(setup) -> None:  # type: ignore[no-untyped-def]
    plan, *_ = setup
    spec = plan.spec
    target = plan.network["privacy"]["statistical_security_bits"] + 3
    sized = compile_network(spec, "flood-cnn-more", statistical_security_bits=target)
    for privacy in (sized.network["privacy"], sized.network["batch"]["privacy"]):
        assert privacy["statistical_security_bits"] >= target - 0.01
    with pytest.raises(UnsupportedModelError, match="bits of statistical security"):
        compile_network(spec, "flood-cnn-60", statistical_security_bits=60)


def test_budget_states_whether_the_repeats_fit(setup) -> None:  # type: ignore[no-untyped-def]
    """The service compares 2^(2s) repeats with what the sample budget allows one tenant: at
    the default budget (10^6 per hour) the default compile is out of reach; the earlier
    schedule, an unlimited budget, are flagged (`heinfer serve` logs the line at start)."""
    plan, *_ = setup
    lines = repeated_query_lines("m", plan.manifest, 1_000_000, 3600.0)
    assert [reachable for reachable, _ in lines] == [False, False]
    assert all("years" in line for _, line in lines)
    warned = budget_warnings(BudgetPolicy(1_000_000, 3600.0, []), {"m": plan})
    assert not any("averaging" in line for line in warned)  # (the extraction line stays)
    assert all(reachable for reachable, _ in repeated_query_lines("m", plan.manifest, 0, 3600.0))
    earlier = _earlier_schedule(plan)
    warned = budget_warnings(BudgetPolicy(1_000_000, 3600.0, []), {"m": earlier})
    assert any("layout ckks-network:" in line and "averaging" in line for line in warned)


def test_model_files_state_their_schedule(setup) -> None:  # type: ignore[no-untyped-def]
    """The schedule travels with the model; one this release does not write is refused."""
    plan, *_ = setup
    arrays = plan.to_arrays()
    assert NetworkPlan.from_arrays(plan.manifest, arrays).scales() == plan.scales()  # control
    arrays["schedule"] = np.array([48.0, 67.0, 1.0, 1.0])
    with pytest.raises(ModelFormatError, match="schedule"):
        NetworkPlan.from_arrays(plan.manifest, arrays)
