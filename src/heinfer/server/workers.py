"""HE evaluation in worker processes.

SEAL's Python bindings hold the GIL, so CPU parallelism needs processes. Each worker loads the
models and opens the key store itself (keys travel by id, never through the parent), and keeps
its own byte-bounded cache of parsed public keys. A worker that dies (a native crash, kill -9)
is replaced at once and the call it was running is retried once on the fresh one: evaluation
is a pure function of (request, key), so a retry is safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import tempfile
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, overload

from heinfer.errors import ParameterMismatchError, ServiceUnavailableError
from heinfer.he.backend import EvaluationKey
from heinfer.models import EncryptedModel, load_model
from heinfer.plans.linear import BATCH_LAYOUT_KIND, LinearPlan
from heinfer.plans.network import NetworkPlan
from heinfer.plans.wire import BatchRequest, BatchResponse, decode_keys
from heinfer.server.keystore import KeyStore, open_key_store
from heinfer.server.pool import ProcessPool, WorkerCrashed

__all__ = ["WorkerPool"]

log = logging.getLogger("heinfer.workers")
T = TypeVar("T")
# A coeff-batch record (36 MB for MNIST) costs ~150 ms to pickle through the pool's pipe;
# above this size it goes to the worker as a private file on tmpfs instead (~10 ms each way).
_HANDOFF_BYTES = 1 << 20


@dataclass(frozen=True)
class NetworkKeys:
    """A network model's uploaded key parts; the plan keeps the parsed SEAL keys cached."""

    parts: dict[str, bytes]

    @property
    def nbytes(self) -> int:
        return sum(len(v) for v in self.parts.values())


@dataclass
class _WorkerState:
    """Everything one worker process holds; set once by the pool's initializer."""

    models: dict[str, EncryptedModel]
    store: KeyStore
    keys: OrderedDict[tuple[str, str, str], EvaluationKey | NetworkKeys]
    key_bytes: int
    max_key_bytes: int


_STATE: _WorkerState | None = None  # per worker process, never in the service process


def _initialize(model_paths: list[str], store_url: str, cache_bytes: int) -> None:
    global _STATE
    _batch_scheduling()
    _single_threaded_blas()
    models = {}
    for path in model_paths:
        model = load_model(path)
        if isinstance(model.plan, LinearPlan):
            _ = model.plan.context  # build SEAL objects now, not on the first request
        models[model.name] = model
    store = open_key_store(store_url, cache_bytes=0)
    _STATE = _WorkerState(models, store, OrderedDict(), 0, cache_bytes)


def _batch_scheduling() -> None:
    """Linux's SCHED_BATCH: evaluation is throughput work, and the service process that feeds
    every worker must not wait behind one. A batch task that wakes never preempts the running
    task, so a worker handed its next call lets the service process finish the request it is
    on; unlike a nice value, the worker's share of the CPU is unchanged. With 2 workers on 2
    cores this was worth 1.5-2.6% in throughput (bench: paired 6 s runs, 32 clients)."""
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or not permitted
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))


def _single_threaded_blas() -> None:
    """One BLAS thread per worker: the pool already runs one worker per core, and the batch
    layout's matrix products (10 rows) gain nothing from threads but lose a lot to contention."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return
    threadpool_limits(1)


def _state() -> _WorkerState:
    if _STATE is None:
        raise RuntimeError("worker used before initialization")
    return _STATE


def _evaluation_key(
    model: EncryptedModel, tenant: str, key_id: str
) -> EvaluationKey | NetworkKeys:
    state = _state()
    cache_key = (model.name, tenant, key_id)
    cached = state.keys.get(cache_key)
    if cached is not None:
        state.keys.move_to_end(cache_key)
        return cached
    fingerprint, parts = decode_keys(state.store.get(tenant, key_id))
    key = _parse_key(model, fingerprint, parts)
    state.keys[cache_key] = key
    state.key_bytes += key.nbytes
    while state.key_bytes > state.max_key_bytes and len(state.keys) > 1:
        _, evicted = state.keys.popitem(last=False)
        state.key_bytes -= evicted.nbytes
    return key


def _parse_key(
    model: EncryptedModel, fingerprint: bytes, parts: dict[str, bytes]
) -> EvaluationKey | NetworkKeys:
    if not isinstance(model.plan, LinearPlan):
        return _parse_network_keys(model, model.plan, fingerprint, parts)
    if fingerprint != model.plan.params.fingerprint:
        raise ParameterMismatchError(
            f"this key was made for other encryption parameters than model {model.name!r}: "
            "fetch its manifest and make keys for it"
        )
    if "public" not in parts:
        raise ParameterMismatchError(f"model {model.name!r} needs a public key in the upload")
    return model.plan.load_key(parts["public"])


def _parse_network_keys(
    model: EncryptedModel, plan: NetworkPlan, fingerprint: bytes, parts: dict[str, bytes]
) -> NetworkKeys:
    if fingerprint != plan.key_fingerprint:
        raise ParameterMismatchError(
            f"this key was made for other encryption parameters than model {model.name!r}: "
            "fetch its manifest and make keys for it"
        )
    # The full set serves both layouts; with the batched layout, {public, relin} serves batches
    # (single-image requests with it get a 422 from the plan).
    accepted = plan.key_part_sets()
    if frozenset(parts) not in accepted:
        options = " or ".join(str(sorted(a)) for a in accepted)
        raise ParameterMismatchError(
            f"model {model.name!r} needs exactly one of these sets of key parts: {options}"
        )
    plan.load_keys(parts)  # SEAL's validating loaders, cached by content in the plan
    return NetworkKeys(parts)


def _handed(record: bytes | str) -> bytes:
    """A record, read from its handoff file when the pool passed a path."""
    if isinstance(record, str):
        with open(record, "rb") as fh:
            return fh.read()
    return record


def _infer(
    model_name: str, tenant: str, key_id: str, records: list[bytes] | list[bytes | str]
) -> list[bytes]:
    """Per-sample records (a large single record may come as the path of a handoff file)."""
    records = [_handed(record) for record in records]
    model = _state().models[model_name]
    key = _evaluation_key(model, tenant, key_id)
    if isinstance(key, NetworkKeys):
        # Either layout: the plan dispatches on the body's magic (HNQ1 single, HNB1 batched).
        assert not isinstance(model.plan, LinearPlan)
        return [model.plan.evaluate(record, key.parts) for record in records]
    assert isinstance(model.plan, LinearPlan)
    return [model.plan.evaluate(record, key) for record in records]


def _infer_batch(
    model_name: str, tenant: str, key_id: str, samples: int, record: bytes | str
) -> bytes:
    """One coeff-batch request: n feature ciphertexts for `samples` samples, one unit of work.

    `record` is the request record, or the path of a handoff file holding it.
    """
    record = _handed(record)
    model = _state().models[model_name]
    plan = model.plan
    if not isinstance(plan, LinearPlan):
        raise ParameterMismatchError(
            f"model {model_name!r} does not accept {BATCH_LAYOUT_KIND} requests"
        )
    plan.check_batch_samples(samples)  # cheap refusals before the key is fetched
    key = _evaluation_key(model, tenant, key_id)
    assert isinstance(key, EvaluationKey)  # a LinearPlan's keys parse to EvaluationKey
    return plan.evaluate_batch(record, samples, key)


def _validate_key(model_name: str, body: bytes) -> None:
    model = _state().models[model_name]
    fingerprint, parts = decode_keys(body)
    _parse_key(model, fingerprint, parts)


# Idle-time work: per-sample linear requests need two public-key encryptions of zero and two
# uniform masks (~2.5 ms of a ~6 ms evaluation); made while a worker waits, they leave the
# request path. Bounded: a few per key for the most recently used keys.
_SPARES_PER_KEY = 4
_SPARE_KEYS = 4
_SPARE_MASKS = 4


def _prepare_ahead() -> bool:
    """One step of idle-time work; False when everything is stocked."""
    state = _state()
    for model in state.models.values():
        plan = model.plan
        if isinstance(plan, LinearPlan) and plan.mask and plan.context.prepare_spare_mask(
            _SPARE_MASKS
        ):
            return True
    recent = [key for key in reversed(state.keys.values()) if isinstance(key, EvaluationKey)]
    return any(key.prepare_spare(_SPARES_PER_KEY) for key in recent[:_SPARE_KEYS])


def _ping() -> int:
    return os.getpid()


class WorkerPool:
    """The service's worker processes (see `ProcessPool`): a dead worker is replaced and the
    calls it was running are retried once on a fresh one."""

    def __init__(
        self, model_paths: list[str], store_url: str, workers: int, cache_bytes: int
    ) -> None:
        self._pool = ProcessPool(
            workers, _initialize, (model_paths, store_url, cache_bytes), idle=_prepare_ahead
        )
        self._handoff_dir = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None

    @property
    def workers(self) -> int:
        return self._pool.workers

    @property
    def restarts(self) -> int:
        return self._pool.restarts

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            result: T = await self._pool.call(fn, *args)
        except WorkerCrashed:
            raise ServiceUnavailableError(
                "evaluation worker crashed twice on this request", retry_after=1
            ) from None
        return result

    @overload
    async def infer(
        self, model: str, tenant: str, key_id: str, records: list[bytes]
    ) -> list[bytes]: ...

    @overload
    async def infer(
        self, model: str, tenant: str, key_id: str, records: BatchRequest
    ) -> BatchResponse: ...

    async def infer(
        self, model: str, tenant: str, key_id: str, records: list[bytes] | BatchRequest
    ) -> list[bytes] | BatchResponse:
        """Per-sample records fan out over all workers, results in request order; a coeff-batch
        request is one unit of work on one worker (clients send several concurrently)."""
        if isinstance(records, BatchRequest):
            samples = records.samples
            record = await self._handed_over(
                records.record,
                lambda data: self._call(_infer_batch, model, tenant, key_id, samples, data),
            )
            return BatchResponse(samples, record)
        if len(records) == 1 and len(records[0]) > _HANDOFF_BYTES:  # a batched network body
            return await self._handed_over(
                records[0], lambda data: self._call(_infer, model, tenant, key_id, [data])
            )
        size = max(1, math.ceil(len(records) / self.workers))
        chunks = [records[i : i + size] for i in range(0, len(records), size)]
        if len(chunks) == 1:  # the common single-sample request: no gather, no extra task
            return await self._call(_infer, model, tenant, key_id, records)
        parts = await asyncio.gather(
            *(self._call(_infer, model, tenant, key_id, chunk) for chunk in chunks)
        )
        return [record for part in parts for record in part]

    async def validate_key(self, model: str, body: bytes) -> None:
        await self._call(_validate_key, model, body)

    async def ready(self, timeout: float = 30.0) -> bool:
        try:
            await asyncio.wait_for(self._call(_ping), timeout)
            return True
        except (TimeoutError, ServiceUnavailableError):
            return False

    def worker_pids(self) -> list[int]:
        return self._pool.pids()

    async def _handed_over(
        self, data: bytes | memoryview, call: Callable[[bytes | str], Awaitable[T]]
    ) -> T:
        """`call(data)`, or `call(path)` with `data` in a handoff file when it is large."""
        path = None
        if len(data) > _HANDOFF_BYTES:
            path = await asyncio.to_thread(self._handoff, data)  # None: tmpfs full
        try:
            return await call(path or bytes(data))
        finally:
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)

    def _handoff(self, data: bytes | memoryview) -> str | None:
        """Write a large record to a fresh 0600 file on tmpfs (removed after the call); None
        when that fails (a small /dev/shm, as in containers): the record then goes by pipe."""
        try:
            fd, path = tempfile.mkstemp(prefix="heinfer-batch-", dir=self._handoff_dir)
        except OSError:
            return None
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(path)
            return None
        return path

    async def aclose(self) -> None:
        """Drain queued and running calls, then stop the workers."""
        await self._pool.aclose()

    def shutdown(self) -> None:
        self._pool.shutdown()
