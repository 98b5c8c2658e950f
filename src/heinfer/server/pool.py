"""An asyncio-native pool of worker processes: one socket per worker, no helper threads.

Why not `concurrent.futures.ProcessPoolExecutor`: each call there crosses a feeder thread, a
management thread and a result thread, and a crash breaks the whole pool. Every inference
passes through this one process, and where it shares cores with the workers, its CPU per call
is taken from them. Here each worker's socket is an asyncio protocol on the event loop: a call
is pickled and written to an idle worker at once, and the answer, parsed in the protocol's
callback, hands that worker its next queued call before it wakes the caller: no task, queue or
stream per call. A worker that dies (busy or idle) is noticed as its socket closing, replaced,
and its call retried on the fresh worker (`WorkerCrashed` once the attempts are used up).

When every worker is busy, each also gets the next small call to hold behind the one it runs,
so that it goes from call to call without waiting for this process to wake up and answer.
Only small calls wait behind small calls, so a long batch shard never holds a short call back;
a held call cannot move to another worker that frees up first, which costs nothing when calls
of that size take about the same time (single samples of a linear model).

Only our own processes are ever on the other end of these sockets (spawned children), so the
pickles they carry are as trusted as the code itself; nothing from the network is unpickled.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import multiprocessing
import os
import pickle
import select
import signal
import socket
import struct
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, cast

__all__ = ["ProcessPool", "WorkerCrashed"]

log = logging.getLogger("heinfer.pool")
_HEADER = struct.Struct("<Q")  # message length; 0 asks the worker to exit
_RESTART_BACKOFF_MAX_S = 5.0
_ONE_WRITE_BYTES = 1 << 20
_QUEUE_BEHIND_MAX_BYTES = 1 << 18  # calls this small may wait in a busy worker's socket


class WorkerCrashed(Exception):
    """The worker process running a call died before answering it."""


def _recv_exact(sock: socket.socket, size: int) -> bytearray | None:
    buffer = bytearray(size)
    view, got = memoryview(buffer), 0
    while got < size:
        count = sock.recv_into(view[got:])
        if count == 0:
            return None
        got += count
    return buffer  # pickle reads a bytearray as it is: no second copy of a large call


def _work_while_idle(sock: socket.socket, idle: Callable[[], bool] | None) -> bool:
    """Run `idle()` steps until a call arrives or it has nothing left; False if it failed."""
    while idle is not None and not select.select([sock], [], [], 0)[0]:
        try:
            if not idle():
                return True
        except Exception:
            log.exception("idle-time work failed; the worker stops doing it")
            return False
    return True


def _worker_main(
    conn: Connection,
    initializer: Callable[..., None],
    initargs: Sequence[Any],
    idle: Callable[[], bool] | None,
) -> None:
    # Ctrl-C goes to the whole process group; the parent decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=os.dup(conn.fileno()))
    conn.close()
    initializer(*initargs)
    while True:
        if not _work_while_idle(sock, idle):
            idle = None
        try:
            header = _recv_exact(sock, _HEADER.size)
            size = _HEADER.unpack(header)[0] if header else 0
            message = _recv_exact(sock, size) if size else None
        except OSError:
            return
        if message is None:
            return  # stop request (size 0) or the parent is gone
        fn, args = pickle.loads(message)
        try:
            outcome: tuple[bool, Any] = (True, fn(*args))
        except Exception as exc:  # every failure goes back to the caller
            outcome = (False, exc)
        try:
            data = pickle.dumps(outcome, pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            data = pickle.dumps((False, RuntimeError(f"unpicklable result: {exc!r}")))
        try:
            _send_frame(sock, data)
        except OSError:
            return


def _send_frame(sock: socket.socket, data: bytes) -> None:
    """Header and answer in one write when small: two writes woke the parent twice."""
    if len(data) <= _ONE_WRITE_BYTES:
        sock.sendall(_HEADER.pack(len(data)) + data)
    else:  # not worth copying a large answer to save a write
        sock.sendall(_HEADER.pack(len(data)))
        sock.sendall(data)


class _Link(asyncio.Protocol):
    """The parent's end of one worker's socket on one event loop: each whole answer frame goes
    to `on_frame`; the socket closing (the worker exited) goes to `on_lost`."""

    def __init__(
        self, on_frame: Callable[[bytearray], None], on_lost: Callable[[], None]
    ) -> None:
        self._on_frame = on_frame
        self._on_lost = on_lost
        self._buffer = bytearray()
        self._size: int | None = None  # of the frame being read, once its header is in
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while True:
            if self._size is None:
                if len(self._buffer) < _HEADER.size:
                    return
                self._size = _HEADER.unpack_from(self._buffer)[0]
                del self._buffer[: _HEADER.size]
            if len(self._buffer) < self._size:
                return
            if len(self._buffer) == self._size:  # the usual case: no copy
                frame, self._buffer = self._buffer, bytearray()
            else:
                frame = self._buffer[: self._size]
                del self._buffer[: self._size]
            self._size = None
            self._on_frame(frame)

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_lost()


@dataclass
class _Job:
    payload: bytes
    future: asyncio.Future[bytearray]
    attempts: int = 0
    started: float = 0.0  # when its worker began it (monotonic)

    @property
    def small(self) -> bool:
        return len(self.payload) <= _QUEUE_BEHIND_MAX_BYTES


class _Worker:
    """One child process, the parent's end of its socket pair and the call it is running."""

    def __init__(
        self,
        context: Any,
        initializer: Callable[..., None],
        initargs: Sequence[Any],
        idle: Callable[[], bool] | None,
    ):
        parent, child = context.Pipe(duplex=True)
        self.process = context.Process(
            target=_worker_main, args=(child, initializer, tuple(initargs), idle), daemon=True
        )
        self.process.start()
        child.close()
        self.sock = socket.socket(fileno=os.dup(parent.fileno()))
        parent.close()
        self.started = time.monotonic()
        self.link: _Link | None = None
        self.jobs: collections.deque[_Job] = collections.deque()  # running first, then held
        self.gone = False  # its socket closed: it is being replaced

    @property
    def job(self) -> _Job | None:
        """The call it is running, if any."""
        return self.jobs[0] if self.jobs else None

    def can_hold(self, job: _Job) -> bool:
        """Whether `job` may wait behind the one small call this worker is running."""
        return (
            job.small and len(self.jobs) == 1 and self.jobs[0].small
            and not self.gone and self.link is not None
        )

    async def connect(
        self, on_frame: Callable[[bytearray], None], on_lost: Callable[[], None]
    ) -> None:
        """Attach this worker's socket to the running loop (a duplicate: the original stays
        blocking for `stop`)."""
        loop = asyncio.get_running_loop()
        _, self.link = await loop.create_connection(
            lambda: _Link(on_frame, on_lost), sock=self.sock.dup()
        )

    def send(self, job: _Job) -> None:
        assert self.link is not None and self.link.transport is not None
        if not self.jobs:
            job.started = time.monotonic()
        self.jobs.append(job)
        self.link.transport.writelines((_HEADER.pack(len(job.payload)), job.payload))

    def stop(self, timeout: float) -> None:
        with contextlib.suppress(OSError):
            self.sock.setblocking(True)
            self.sock.sendall(_HEADER.pack(0))
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self.sock.close()

    def detach(self) -> None:
        """Close this loop's end (call from the loop that made it)."""
        if self.link is not None and self.link.transport is not None:
            self.link.transport.abort()
        self.link = None


@dataclass
class _LoopState:
    """What belongs to the event loop the pool is used from (tests run several loops)."""

    loop: asyncio.AbstractEventLoop
    pending: collections.deque[_Job] = field(default_factory=collections.deque)
    idle: list[_Worker] = field(default_factory=list)  # attached and not running a call
    tasks: set[asyncio.Task[None]] = field(default_factory=set)  # attaching, replacing
    closed: bool = False

    def start(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = self.loop.create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


class ProcessPool:
    """`workers` spawned processes, each running `initializer(*initargs)` once, then calls.

    `idle`, if given, is called in a worker whenever no call is waiting, one small step at a
    time, until it returns False: request-independent work done ahead (it must be safe to
    interrupt between steps and must not change results).
    """

    def __init__(
        self,
        workers: int,
        initializer: Callable[..., None],
        initargs: Sequence[Any] = (),
        *,
        attempts: int = 2,
        idle: Callable[[], bool] | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self._context = multiprocessing.get_context("spawn")
        self._initializer = initializer
        self._initargs = tuple(initargs)
        self._attempts = attempts
        self._idle = idle
        self._workers = [self._spawn() for _ in range(workers)]
        self._quick_deaths = [0] * workers
        self._state: _LoopState | None = None
        self._closed = False
        self.restarts = 0

    def _spawn(self) -> _Worker:
        return _Worker(self._context, self._initializer, self._initargs, self._idle)

    @property
    def workers(self) -> int:
        return len(self._workers)

    def pids(self) -> list[int]:
        return sorted(w.process.pid for w in self._workers if w.process.pid is not None)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` in a worker; its exception is re-raised here. A call whose worker
        dies while running it is retried on a fresh worker, `attempts` times in all, then
        WorkerCrashed; a call the worker was only holding is queued again, uncharged."""
        if self._closed:
            raise RuntimeError("the pool is shut down")
        state = self._loop_state()
        job = _Job(pickle.dumps((fn, args), pickle.HIGHEST_PROTOCOL), state.loop.create_future())
        state.pending.append(job)
        self._dispatch(state)
        ok, value = pickle.loads(await job.future)
        if ok:
            return value
        raise value

    def _loop_state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        if self._state is None or self._state.loop is not loop:
            if self._state is not None:
                self._forget(self._state)
            state = _LoopState(loop)
            for worker in self._workers:
                state.start(self._attach(state, worker))
            self._state = state
        return self._state

    def _forget(self, state: _LoopState) -> None:
        """Leave a finished event loop's state behind. A worker still running a call from it
        would answer into the next loop's socket as if answering that loop's call: replace it."""
        state.closed = True
        for slot, worker in enumerate(self._workers):
            if worker.job is not None:
                worker.stop(timeout=0)
                self._workers[slot] = self._spawn()

    def _dispatch(self, state: _LoopState) -> None:
        """Hand queued calls to idle workers, then small ones to busy workers to hold (a call
        whose caller gave up is dropped)."""
        while state.pending:
            job = state.pending[0]
            if job.future.done():
                state.pending.popleft()
                continue
            worker = self._taker(state, job)
            if worker is None:
                break
            state.pending.popleft()
            worker.send(job)

    def _taker(self, state: _LoopState, job: _Job) -> _Worker | None:
        if state.idle:
            return state.idle.pop(0)  # the one idle longest: done with its idle-time work
        holders = [w for w in self._workers if w.can_hold(job)]
        return min(holders, key=lambda w: w.jobs[0].started, default=None)  # soonest done

    async def _attach(self, state: _LoopState, worker: _Worker) -> None:
        try:
            await worker.connect(
                lambda frame: self._answered(state, worker, frame),
                lambda: self._lost(state, worker),
            )
        except OSError:
            self._lost(state, worker)
            return
        if not state.closed and not worker.gone and worker in self._workers:
            state.idle.append(worker)  # (gone: its socket closed as it was attached)
            self._dispatch(state)

    def _answered(self, state: _LoopState, worker: _Worker, frame: bytearray) -> None:
        job = worker.jobs.popleft() if worker.jobs else None
        if job is None or state.closed:
            return
        if worker.jobs:
            worker.jobs[0].started = time.monotonic()  # it was waiting in the socket: it runs now
        else:
            state.idle.append(worker)
        self._dispatch(state)  # the worker's next call first: it is idle until then
        if not job.future.done():
            job.future.set_result(frame)

    def _lost(self, state: _LoopState, worker: _Worker) -> None:
        """The worker's socket closed: retry its calls elsewhere and replace it."""
        if state.closed or worker.gone:
            return
        worker.gone = True
        if worker in state.idle:
            state.idle.remove(worker)
        jobs = list(worker.jobs)
        worker.jobs.clear()
        if jobs:
            jobs[0].attempts += 1  # the one it was running; the held ones never started
            if jobs[0].attempts >= self._attempts:
                if not jobs[0].future.done():
                    jobs[0].future.set_exception(WorkerCrashed())
                del jobs[0]
            state.pending.extendleft(reversed(jobs))
            self._dispatch(state)
        state.start(self._replace(state, worker))

    async def _replace(self, state: _LoopState, old: _Worker) -> None:
        slot = self._workers.index(old)
        quick = time.monotonic() - old.started < 10.0
        self._quick_deaths[slot] = self._quick_deaths[slot] + 1 if quick else 0
        if self._quick_deaths[slot] > 1:  # dying at start-up: do not spin
            await asyncio.sleep(min(_RESTART_BACKOFF_MAX_S, 0.1 * 2 ** self._quick_deaths[slot]))
        old.detach()
        old.stop(timeout=0)
        log.warning("worker process %s exited (code %s); starting a new one",
                    old.process.pid, old.process.exitcode)
        if self._closed or state.closed:
            return
        new = self._workers[slot] = self._spawn()
        self.restarts += 1
        await self._attach(state, new)

    async def aclose(self, timeout: float = 30.0) -> None:
        """Let queued and running calls finish (up to `timeout`), then stop the workers."""
        state = self._state
        if state is not None and state.loop is asyncio.get_running_loop():
            deadline = time.monotonic() + timeout
            while (state.pending or self._running()) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            state.closed = True
            for task in list(state.tasks):
                task.cancel()
            await asyncio.gather(*state.tasks, return_exceptions=True)
            for worker in self._workers:
                worker.detach()
        await asyncio.to_thread(self.shutdown)

    def _running(self) -> bool:
        return any(worker.job is not None for worker in self._workers)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the workers now (each finishes the call it is running, if any)."""
        self._closed = True
        for worker in self._workers:
            worker.stop(timeout)
