"""The extraction budget's parts without a service: the GCRA buckets, rule resolution, the
start-up warning, and the cached readiness probe (server/budget.py, server/readiness.py)."""

from __future__ import annotations

import asyncio

import pytest

import heinfer
from heinfer.server.budget import Buckets, BudgetPolicy, BudgetRule, budget_warnings
from heinfer.server.readiness import CachedProbe


def test_bucket_holds_the_budget_and_refills_continuously() -> None:
    buckets = Buckets()
    assert buckets.take("k", 700, 0, 700, 3600.0, now=0.0) == (700, 0.0)
    granted, wait = buckets.take("k", 100, 0, 700, 3600.0, now=0.0)
    assert granted == 0 and wait == pytest.approx(100 * 3600 / 700)
    granted, wait = buckets.take("k", 1, 0, 700, 3600.0, now=3600 / 700 + 1e-6)
    assert (granted, wait) == (1, 0.0)  # one sample's worth of time refills one sample
    assert buckets.take("other", 5, 0, 700, 3600.0, now=0.0) == (5, 0.0)  # keys are separate
    # a request larger than the whole budget can never pass: it waits a full window
    assert buckets.take("big", 701, 0, 700, 3600.0, now=0.0) == (0, 3600.0)


def test_bucket_grants_leases_within_the_budget_and_takes_returns() -> None:
    buckets = Buckets()
    assert buckets.take("k", 10, 50, 100, 100.0, now=0.0) == (60, 0.0)
    assert buckets.take("k", 10, 50, 100, 100.0, now=0.0) == (40, 0.0)  # only what is left
    assert buckets.take("k", 1, 0, 100, 100.0, now=0.0)[0] == 0
    buckets.give_back("k", 30, 100, 100.0, now=0.0)
    assert buckets.take("k", 30, 0, 100, 100.0, now=0.0) == (30, 0.0)


def test_most_specific_rule_wins_per_field() -> None:
    policy = BudgetPolicy(1000, 60.0, [
        BudgetRule(model="m", samples=10, disabled_layouts=["coeff-batch"]),
        BudgetRule(tenant="alice", samples=0),
        BudgetRule(tenant="alice", model="m", disabled_layouts=[]),
    ])
    assert policy.limit("bob", "m").samples == 10
    assert policy.limit("bob", "m").disabled == {"coeff-batch"}
    assert policy.limit("bob", "other").samples == 1000
    assert policy.limit("alice", "m").samples == 0 and not policy.limit("alice", "m").disabled
    assert policy.most_generous("m") == 0
    with pytest.raises(ValueError, match="two budget rules"):
        BudgetPolicy(1, 1.0, [BudgetRule(tenant="a"), BudgetRule(tenant="a", samples=3)])


def test_rules_naming_unknown_models_or_layouts_are_refused(
    mnist_model: heinfer.EncryptedModel,
) -> None:
    plans = {"mnist": mnist_model.plan}
    BudgetPolicy(1, 1.0, [BudgetRule(model="mnist", disabled_layouts=["coeff-batch"])]
                 ).check_against(plans)
    with pytest.raises(ValueError, match="not served"):
        BudgetPolicy(1, 1.0, [BudgetRule(model="mnsit")]).check_against(plans)
    with pytest.raises(ValueError, match="unknown layouts"):
        BudgetPolicy(1, 1.0, [BudgetRule(disabled_layouts=["coeff-btach"])]).check_against(plans)


def test_layouts_a_tenant_may_use(mnist_model: heinfer.EncryptedModel) -> None:
    offered = sorted(layout.kind for layout in mnist_model.plan.layouts.values())
    assert "coeff-batch" in offered
    policy = BudgetPolicy(
        1, 1.0, [BudgetRule(tenant="t", model="mnist", disabled_layouts=["coeff-batch"])]
    )
    assert policy.layouts_for("t", "mnist", mnist_model.plan) == [
        kind for kind in offered if kind != "coeff-batch"
    ]
    assert policy.layouts_for("u", "mnist", mnist_model.plan) == offered  # the control


def test_manifest_states_extraction_and_serve_warns(mnist_model: heinfer.EncryptedModel) -> None:
    extraction = mnist_model.manifest.privacy.extraction
    assert extraction is not None and extraction.exact
    assert extraction.samples == 785 and extraction.parameters == 7850
    assert "privacy" in mnist_model.manifest.to_dict()
    plans = {"mnist": mnist_model.plan}
    # 33 samples per hour is 792 a day: enough to extract; 32 per hour (768) is not
    assert budget_warnings(BudgetPolicy(33, 3600.0, []), plans)
    assert not budget_warnings(BudgetPolicy(32, 3600.0, []), plans)
    assert budget_warnings(BudgetPolicy(32, 3600.0, [BudgetRule(tenant="t", samples=0)]), plans)


def test_version_1_manifests_still_parse_and_go_out_unchanged(
    mnist_model: heinfer.EncryptedModel,
) -> None:
    from heinfer.plans.manifest import Manifest

    old = mnist_model.manifest.to_dict()
    old["format_version"] = 1
    del old["privacy"]["extraction"]
    parsed = Manifest.from_dict(old)
    assert parsed.privacy.extraction is None and parsed.to_dict() == old


def test_caller_view_names_the_open_layouts_and_is_versioned(
    mnist_model: heinfer.EncryptedModel,
) -> None:
    from heinfer.errors import ModelFormatError
    from heinfer.plans.base import codec_for
    from heinfer.plans.manifest import CALLER_VIEW_VERSION, Manifest

    manifest = mnist_model.manifest
    assert manifest.for_caller(None) is manifest  # nothing switched off: the compiled document
    assert "allowed_layouts" not in manifest.to_dict()
    view = Manifest.from_dict(manifest.for_caller(["coeff-rowpack"]).to_dict())
    assert view.allowed_layouts == ["coeff-rowpack"]
    assert view.format_version == CALLER_VIEW_VERSION
    unversioned = {**view.to_dict(), "format_version": manifest.format_version}
    with pytest.raises(ModelFormatError, match="allowed_layouts needs format_version 3"):
        Manifest.from_dict(unversioned)
    # the codec picks among the allowed layouts only
    codec = codec_for(manifest)
    assert codec.layout_for(4096) == "coeff-batch"  # the control: batch pays from ~440 on
    assert codec.layout_for(4096, allowed=["coeff-rowpack"]) == "coeff-rowpack"
    assert {kind for *_, kind in codec.chunks(5000, allowed=["coeff-rowpack"])} == {
        "coeff-rowpack"
    }
    assert codec.fallback_layout(["coeff-batch"]) == "coeff-batch"


def test_readiness_runs_one_probe_for_concurrent_callers_and_reuses_it() -> None:
    calls = 0

    async def probe() -> dict[str, bool]:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return {"ready": True}

    async def scenario(ttl: float) -> int:
        cached = CachedProbe(probe, ttl)
        await asyncio.gather(*(cached.result() for _ in range(50)))
        for _ in range(20):
            await cached.result()
        return cached.probes

    assert asyncio.run(scenario(5.0)) == 1
    calls_before = calls
    # negative control: with no reuse, every sequential call probes again
    assert asyncio.run(scenario(0.0)) == 21
    assert calls - calls_before == 21
