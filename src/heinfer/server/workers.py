"""HE evaluation in worker processes.

SEAL's Python bindings hold the GIL, so CPU parallelism needs processes. Each worker loads the
models and opens the key store itself (keys travel by id, never through the parent), and keeps
one byte-bounded cache of parsed keys, keyed by (tenant, key id, model). A worker that dies (a
native crash, kill -9) is replaced at once and the call it was running is retried once on the
fresh one: evaluation is a pure function of (request, key), so a retry is safe. Workers speak
only the `Plan` interface: they never look at which layout a request uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from heinfer.errors import ServiceUnavailableError
from heinfer.models import load_model
from heinfer.plans.base import Keys, Plan
from heinfer.server.keystore import KeyStore, open_key_store
from heinfer.server.pool import ProcessPool, WorkerCrashed

__all__ = ["KeyCache", "WorkerPool"]

log = logging.getLogger("heinfer.workers")
T = TypeVar("T")
# Large request bodies (a coeff-batch request is 36 MB for MNIST) go to the worker as a private
# file on tmpfs instead of through the pool's pipe, which pickles them.
_HANDOFF_BYTES = 1 << 20


@dataclass
class KeyCache:
    """Parsed keys by (tenant, key id, model), least recently used first out, bounded by the
    memory the parsed keys hold (`Keys.nbytes`). The entry in use is never evicted, so one key
    larger than the bound still serves its request."""

    max_bytes: int
    entries: OrderedDict[tuple[str, str, str], Keys] = field(default_factory=OrderedDict)
    nbytes: int = 0

    def get(self, key: tuple[str, str, str]) -> Keys | None:
        found = self.entries.get(key)
        if found is not None:
            self.entries.move_to_end(key)
        return found

    def put(self, key: tuple[str, str, str], keys: Keys) -> None:
        previous = self.entries.pop(key, None)
        if previous is not None:
            self.nbytes -= previous.nbytes
        self.entries[key] = keys
        self.nbytes += keys.nbytes
        while self.nbytes > self.max_bytes and len(self.entries) > 1:
            _, evicted = self.entries.popitem(last=False)
            self.nbytes -= evicted.nbytes

    def recent(self, model: str) -> list[Keys]:
        """The model's cached keys, most recently used first."""
        return [keys for (_, _, name), keys in reversed(self.entries.items()) if name == model]


@dataclass
class _WorkerState:
    """Everything one worker process holds; set once by the pool's initializer."""

    plans: dict[str, Plan]
    store: KeyStore
    keys: KeyCache


_STATE: _WorkerState | None = None  # per worker process, never in the service process


def _initialize(model_paths: list[str], store_url: str, cache_bytes: int) -> None:
    global _STATE
    _batch_scheduling()
    _single_threaded_blas()
    plans = {}
    for path in model_paths:
        plan = load_model(path).plan
        plan.warm_up()  # build HE objects now, not on the first request
        plans[plan.manifest.name] = plan
    store = open_key_store(store_url, cache_bytes=0)
    _STATE = _WorkerState(plans, store, KeyCache(cache_bytes))


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


def _keys(model: str, tenant: str, key_id: str) -> Keys:
    state = _state()
    cache_key = (tenant, key_id, model)
    keys = state.keys.get(cache_key)
    if keys is None:
        keys = state.plans[model].load_keys(state.store.get(tenant, key_id))
        state.keys.put(cache_key, keys)
    return keys


def _handed(body: bytes | memoryview | str) -> bytes | memoryview:
    """A request body, read from its handoff file when the pool passed a path."""
    if isinstance(body, str):
        with open(body, "rb") as fh:
            return fh.read()
    return body


def _infer(model: str, tenant: str, key_id: str, body: bytes | memoryview | str) -> bytes:
    """One request body (or the path of a handoff file holding it) -> its response body."""
    data = _handed(body)
    plan = _state().plans[model]
    plan.check(data)  # cheap refusals before the key is fetched and parsed
    return plan.evaluate(data, _keys(model, tenant, key_id))


def _validate_key(model: str, body: bytes) -> None:
    _state().plans[model].load_keys(body)


def _prepare_ahead() -> bool:
    """One step of idle-time work for any plan that has some; False when all are stocked."""
    state = _state()
    return any(
        plan.prepare_ahead(state.keys.recent(name)) for name, plan in state.plans.items()
    )


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

    async def infer(
        self, model: str, tenant: str, key_id: str, bodies: list[bytes | memoryview]
    ) -> list[bytes]:
        """Independent request bodies (a plan's `split`) fan out over the workers; responses
        come back in order. A large body goes by handoff file."""
        if len(bodies) == 1:  # the common case: no gather, no extra task
            return [await self._infer_one(model, tenant, key_id, bodies[0])]
        return list(
            await asyncio.gather(
                *(self._infer_one(model, tenant, key_id, body) for body in bodies)
            )
        )

    async def _infer_one(
        self, model: str, tenant: str, key_id: str, body: bytes | memoryview
    ) -> bytes:
        return await self._handed_over(
            body, lambda data: self._call(_infer, model, tenant, key_id, data)
        )

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
            return await call(path or (data if isinstance(data, bytes) else bytes(data)))
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
