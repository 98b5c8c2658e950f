"""The extraction budget: a per-tenant, per-model limit on evaluated samples.

Why samples and not requests: encryption hides the client's inputs and the server's weights,
not what the answers reveal, and `n_features + 1` answered samples determine a linear model
(the manifest's `privacy.extraction` says how many determine each model). One coeff-batch
request carries up to 4,096 samples, so a limit on requests (a gateway's rate limit) lets one
request take the whole model. The service therefore counts the samples `Plan.check` finds in a
request body, whatever its layout, before any evaluation, and answers 429 + Retry-After when a
(tenant, model) pair has used its budget.

The budget is a GCRA bucket (the generic cell rate algorithm) per (tenant, model): `samples`
per `window_seconds`, refilled continuously, holding at most `samples`, so no window boundary
lets twice the budget through. Its whole state is one number per pair (the time at which the
bucket is full again), which keeps a store shared by replicas small and its calls cheap.

Counting happens in one of two stores:

* `LocalStore`: one `heinfer serve` process (its workers evaluate, the HTTP process counts).
* `RayStore`: Ray Serve replicas share one named Ray actor. A replica takes a *lease* of a few
  extra samples when it asks the actor, and serves later requests from it without an actor
  call; a lease is charged to the bucket when it is taken, so the samples admitted across all
  replicas never exceed the budget. An unused remainder goes back to the actor with the
  replica's next call after the lease expires; at most one lease per replica and pair is ever
  outstanding.

Rules (`BudgetRule`) set the sample budget and the layouts switched off per model, per tenant
or per pair; the most specific rule that sets a field wins. SECURITY.md ("Model extraction")
says what the budget stops and what it does not.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from heinfer.errors import (
    BudgetExceededError,
    LayoutDisabledError,
    ServiceUnavailableError,
)
from heinfer.plans.base import Plan, Request, layout_kinds
from heinfer.plans.manifest import Manifest

__all__ = [
    "ANY",
    "Buckets",
    "BudgetActor",
    "BudgetPolicy",
    "BudgetRule",
    "BudgetStore",
    "ExtractionBudget",
    "Limit",
    "LocalStore",
    "RayStore",
    "budget_warnings",
    "open_budget_store",
    "repeated_query_lines",
]

ANY = "*"
RAY_NAMESPACE = "heinfer"
LEASE_SECONDS = 2.0  # a replica's unused lease goes back to the actor after this long
MAX_LEASE = 4096  # samples a replica may take beyond a request's own (one full batch)
log = logging.getLogger("heinfer.budget")


class BudgetRule(BaseModel):
    """One line of the budget configuration; `*` matches every tenant or model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant: str = ANY
    model: str = ANY
    samples: int | None = Field(default=None, ge=0, description="per window; 0: unlimited")
    disabled_layouts: list[str] | None = Field(
        default=None, description="layout kinds refused (403), e.g. coeff-batch"
    )

    @property
    def rank(self) -> int:
        return 2 * (self.tenant != ANY) + (self.model != ANY)


@dataclass(frozen=True)
class Limit:
    samples: int  # per window; 0: unlimited
    window: float
    disabled: frozenset[str]


class BudgetPolicy:
    """Which limit applies to a (tenant, model) pair."""

    def __init__(self, samples: int, window: float, rules: list[BudgetRule]) -> None:
        self.default_samples = samples
        self.window = window
        self.rules = list(rules)
        seen: set[tuple[str, str]] = set()
        for rule in self.rules:
            if (rule.tenant, rule.model) in seen:
                raise ValueError(f"two budget rules for tenant {rule.tenant!r}, "
                                 f"model {rule.model!r}")
            seen.add((rule.tenant, rule.model))
        self._cache: dict[tuple[str, str], Limit] = {}

    def check_against(self, models: Mapping[str, Plan]) -> None:
        """Refuse rules naming models or layouts that do not exist: a typo would otherwise
        leave a layout on that the operator meant to switch off."""
        kinds = set(layout_kinds())
        for rule in self.rules:
            if rule.model != ANY and rule.model not in models:
                raise ValueError(f"budget rule names model {rule.model!r}, which is not served")
            unknown = set(rule.disabled_layouts or ()) - kinds
            if unknown:
                raise ValueError(f"budget rule names unknown layouts {sorted(unknown)} "
                                 f"(known: {', '.join(sorted(kinds))})")

    def limit(self, tenant: str, model: str) -> Limit:
        found = self._cache.get((tenant, model))
        if found is None:
            found = self._cache[(tenant, model)] = self._resolve(tenant, model)
        return found

    def _resolve(self, tenant: str, model: str) -> Limit:
        matching = sorted(
            (r for r in self.rules if r.tenant in (ANY, tenant) and r.model in (ANY, model)),
            key=lambda r: r.rank,
        )
        samples, disabled = self.default_samples, frozenset[str]()
        for rule in matching:  # least specific first: later ones override
            if rule.samples is not None:
                samples = rule.samples
            if rule.disabled_layouts is not None:
                disabled = frozenset(rule.disabled_layouts)
        return Limit(samples, self.window, disabled)

    def layouts_for(self, tenant: str, model: str, plan: Plan) -> list[str]:
        """The layouts `plan` serves that no rule switches off for `tenant`: what the manifest
        endpoint can state to a caller so that its client picks among them instead of meeting
        a 403 (`layout_disabled`)."""
        disabled = self.limit(tenant, model).disabled
        served = (layout.kind for layout in plan.layouts.values())
        return sorted(kind for kind in served if kind not in disabled)

    def most_generous(self, model: str) -> int:
        """The largest budget any tenant may get for `model` (0: some tenant is unlimited)."""
        budgets = [self.limit(ANY, model).samples]
        budgets += [r.samples for r in self.rules if r.samples is not None
                    and r.model in (ANY, model)]
        return 0 if 0 in budgets else max(budgets)


# ------------------------------------------------------------------------------------------
# The counters
# ------------------------------------------------------------------------------------------


class Buckets:
    """GCRA state: per key, the time (monotonic) at which its bucket will be full again."""

    def __init__(self) -> None:
        self._full_at: dict[str, float] = {}
        self._takes = 0

    def take(
        self, key: str, need: int, extra: int, samples: int, window: float, now: float
    ) -> tuple[int, float]:
        """(granted, 0) with need <= granted <= need + extra, or (0, seconds to wait)."""
        interval = window / samples
        full_at = max(self._full_at.get(key, now), now)
        room = math.floor((now + window - full_at) / interval + 1e-9)
        if need > room:
            wait = window if need > samples else full_at + need * interval - window - now
            return 0, max(wait, 0.0)
        granted = need + max(0, min(extra, room - need))
        self._full_at[key] = full_at + granted * interval
        self._takes += 1
        if self._takes % 4096 == 0:  # forget full buckets: the dict stays as large as use
            self._full_at = {k: v for k, v in self._full_at.items() if v > now}
        return granted, 0.0

    def give_back(self, key: str, count: int, samples: int, window: float, now: float) -> None:
        full_at = self._full_at.get(key)
        if full_at is not None:
            self._full_at[key] = max(now, full_at - count * window / samples)


class BudgetStore(abc.ABC):
    """Where the counts live."""

    @abc.abstractmethod
    async def take(self, key: str, samples: int, limit: Limit) -> float:
        """0.0 when `samples` were taken from the key's budget, else seconds to wait."""

    @abc.abstractmethod
    async def give_back(self, key: str, samples: int, limit: Limit) -> None:
        """Return samples that were taken but not evaluated."""

    def close(self) -> None:  # noqa: B027
        """Release what the store holds (nothing, for most)."""


class LocalStore(BudgetStore):
    """One process: the buckets in a dict, touched only from the event loop."""

    def __init__(self) -> None:
        self._buckets = Buckets()

    async def take(self, key: str, samples: int, limit: Limit) -> float:
        _, wait = self._buckets.take(key, samples, 0, limit.samples, limit.window,
                                     time.monotonic())
        return wait

    async def give_back(self, key: str, samples: int, limit: Limit) -> None:
        self._buckets.give_back(key, samples, limit.samples, limit.window, time.monotonic())


class BudgetActor:
    """The Ray actor every replica counts with (one process: its clock orders all takes)."""

    def __init__(self) -> None:
        self._buckets = Buckets()

    def take(
        self, key: str, need: int, extra: int, returned: int, samples: int, window: float
    ) -> tuple[int, float]:
        now = time.monotonic()
        if returned:
            self._buckets.give_back(key, returned, samples, window, now)
        return self._buckets.take(key, need, extra, samples, window, now)


@dataclass
class _Lease:
    remaining: int
    expires: float


class RayStore(BudgetStore):
    """Replicas of one Ray Serve application share the named actor `name`, with leases."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._actor: Any = None
        self._leases: dict[str, _Lease] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.actor_calls = 0

    def _handle(self) -> Any:
        if self._actor is None:
            import ray

            remote = ray.remote(num_cpus=0)(BudgetActor)
            self._actor = remote.options(
                name=self.name, namespace=RAY_NAMESPACE, lifetime="detached",
                get_if_exists=True,
            ).remote()
        return self._actor

    async def take(self, key: str, samples: int, limit: Limit) -> float:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        async with lock:
            lease = self._leases.get(key)
            now = time.monotonic()
            if lease is not None and lease.expires > now and lease.remaining >= samples:
                lease.remaining -= samples
                return 0.0
            returned = self._leases.pop(key).remaining if lease is not None else 0
            extra = min(MAX_LEASE, limit.samples // 64)
            try:
                self.actor_calls += 1
                granted, wait = await self._handle().take.remote(
                    key, samples, extra, returned, limit.samples, limit.window
                )
            except Exception as exc:  # the actor died or Ray is gone: refuse, never count less
                self._actor = None
                log.warning("the shared budget counter failed", extra={"error": type(exc).__name__})
                raise ServiceUnavailableError(
                    "the extraction budget's shared counter cannot be reached; retry later"
                ) from None
            if granted:
                self._leases[key] = _Lease(granted - samples, now + LEASE_SECONDS)
            return float(wait)

    async def give_back(self, key: str, samples: int, limit: Limit) -> None:
        lease = self._leases.get(key)
        if lease is not None:
            lease.remaining += samples


def open_budget_store(spec: str) -> BudgetStore:
    """`local` (or `auto` outside Ray) or `ray:ACTOR_NAME`."""
    if spec in ("local", "auto"):
        return LocalStore()
    if spec.startswith("ray:") and len(spec) > 4:
        return RayStore(spec[4:])
    raise ValueError(f"budget store must be 'local', 'auto' or 'ray:NAME', not {spec!r}")


# ------------------------------------------------------------------------------------------
# What the HTTP process calls
# ------------------------------------------------------------------------------------------


class ExtractionBudget:
    """The policy and the store together; `charge` guards one request's evaluation."""

    def __init__(
        self,
        policy: BudgetPolicy,
        store: BudgetStore,
        on_refusal: Callable[[str], None] = lambda _: None,
    ) -> None:
        self.policy = policy
        self.store = store
        self._on_refusal = on_refusal

    def charge(self, tenant: str, model: str, request: Request) -> _Charge:
        return _Charge(self, tenant, model, request)

    async def _take(self, tenant: str, model: str, request: Request) -> Limit | None:
        limit = self.policy.limit(tenant, model)
        if request.layout in limit.disabled:
            self._on_refusal("layout")
            raise LayoutDisabledError(
                f"the {request.layout} layout of model {model!r} is switched off for this "
                "tenant; send one sample per request (the client's default layout)"
            )
        if limit.samples == 0:
            return None
        wait = await self.store.take(f"{tenant}\0{model}", request.samples, limit)
        if wait > 0:
            self._on_refusal("budget")
            retry = max(1, math.ceil(wait))
            if request.samples > limit.samples:
                message = (f"a request of {request.samples} samples exceeds model {model!r}'s "
                           f"budget of {limit.samples} samples per {limit.window:g} s; send "
                           "fewer samples per request")
            else:
                message = (f"the sample budget of model {model!r} ({limit.samples} per "
                           f"{limit.window:g} s) is used up; retry in {retry} s")
            raise BudgetExceededError(message, retry_after=retry)
        return limit


class _Charge:
    """Takes the samples on entry; gives them back if the request fails (no answer left)."""

    def __init__(self, budget: ExtractionBudget, tenant: str, model: str, request: Request):
        self._budget, self._tenant, self._model, self._request = budget, tenant, model, request
        self._limit: Limit | None = None

    async def __aenter__(self) -> None:
        self._limit = await self._budget._take(self._tenant, self._model, self._request)

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is not None and self._limit is not None:
            key = f"{self._tenant}\0{self._model}"
            await self._budget.store.give_back(key, self._request.samples, self._limit)


# The repeated-query attack is flagged when the budget lets one tenant make the repeats it
# needs within this many days.
REPEATS_HORIZON_DAYS = 365.0


def repeated_query_lines(
    name: str, manifest: Manifest, samples: int, window: float
) -> list[tuple[bool, str]]:
    """Per CKKS layout: whether a budget of `samples` per `window` seconds (0: none) lets one
    tenant make the ~2^(2s) repeats of one request that resolve the weight-dependent error
    within `REPEATS_HORIZON_DAYS`, and a line saying so, computed from the manifest's s.

    Each repeat is one evaluated sample (a batched request of n copies is n repeats), so the
    sample budget bounds the attack's speed: 2^(2s) / (samples per day) days at best."""
    from heinfer.plans.network.manifest import repeated_query_bits

    out = []
    per_day = math.inf if samples == 0 else samples * 86400 / window
    allowed = "no sample budget" if samples == 0 else f"{samples} samples per {window:g} s"
    for kind, bits in sorted(repeated_query_bits(manifest).items()):
        repeats_log2 = 2.0 * bits
        days = 2.0**repeats_log2 / per_day
        reachable = days <= REPEATS_HORIZON_DAYS
        verdict = "nothing bounds how fast" if samples == 0 else (
            f"that is {days:.3g} days" if days < 3650 else f"that is {days / 365:.3g} years")
        out.append((reachable, (
            f"model {name!r}, layout {kind}: resolving the weight-dependent error by averaging "
            f"repeats needs about 2^{repeats_log2:.1f} of them (s = {bits:g} bits); {allowed} "
            f"allows {per_day:.3g} per day per tenant: {verdict}"
        )))
    return out


def budget_warnings(policy: BudgetPolicy, plans: Mapping[str, Plan]) -> list[str]:
    """One line per model whose budget lets one tenant take enough samples to extract it
    within a day, or that states no extraction cost (compiled before manifest version 2),
    and one per CKKS layout whose budget lets one tenant make the repeats that resolve its
    weight-dependent error within `REPEATS_HORIZON_DAYS` (`repeated_query_lines`)."""
    lines = []
    for name, plan in sorted(plans.items()):
        budget = policy.most_generous(name)
        lines += [
            line
            for reachable, line in repeated_query_lines(name, plan.manifest, budget, policy.window)
            if reachable
        ]
        extraction = plan.manifest.privacy.extraction
        if extraction is None:
            lines.append(f"model {name!r} states no extraction cost (compiled before heinfer "
                         "manifest version 2); recompile it to have it checked")
            continue
        per_day = math.inf if budget == 0 else budget * 86400 / policy.window
        if per_day >= extraction.samples:
            allowed = "no sample budget" if budget == 0 else (
                f"a budget of {budget} samples per {policy.window:g} s")
            verb = (
                "suffice to extract it"
                if extraction.exact
                else "give as many equations as it has parameters"
            )
            lines.append(
                f"model {name!r}: {extraction.samples} samples {verb}, and {allowed} lets one "
                "tenant have that many within a day; the budget slows extraction, it does "
                "not prevent it (SECURITY.md, 'Model extraction')"
            )
    return lines
