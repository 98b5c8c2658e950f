"""An asyncio-native pool of worker processes: one pipe per worker, no helper threads.

Why not `concurrent.futures.ProcessPoolExecutor`: each call there crosses a feeder thread, a
management thread and a result thread, and a crash breaks the whole pool. On a 2-core machine
that bookkeeping cost the HTTP process ~0.5 ms of CPU per request, a tenth of an MNIST
evaluation, which was taken straight from the second worker. Here the event loop writes the
pickled call to an idle worker's socket and reads the answer through asyncio streams; a
worker that dies is detected by end-of-file on its socket (busy or idle), replaced, and its
call retried on the fresh worker (`WorkerCrashed` once the attempts are used up).

Only our own processes are ever on the other end of these pipes (spawned children), so the
pickles they carry are as trusted as the code itself; nothing from the network is unpickled.
"""

from __future__ import annotations

import asyncio
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

__all__ = ["ProcessPool", "WorkerCrashed"]

log = logging.getLogger("heinfer.pool")
_HEADER = struct.Struct("<Q")  # message length; 0 asks the worker to exit
_RESTART_BACKOFF_MAX_S = 5.0


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
            sock.sendall(_HEADER.pack(len(data)))
            sock.sendall(data)
        except OSError:
            return


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class _Worker:
    """One child process and the parent's end of its socket pair.

    Framing is ours (8-byte length + pickle) on a plain socket, read in the parent through
    asyncio streams, so no read or write ever blocks the event loop.
    """

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
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._header: asyncio.Future[bytes] | None = None

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        loop = asyncio.get_running_loop()
        if self._streams is None or self._loop is not loop:
            self._streams = await asyncio.open_connection(sock=self.sock.dup(), limit=1 << 20)
            self._loop = loop
            self._header = None
        return self._streams

    async def next_header(self) -> asyncio.Future[bytes]:
        """The pending read of the next answer's header. While the worker is idle it doubles
        as a death watch: it only completes (with IncompleteReadError) if the worker exits."""
        reader, _ = await self._connect()
        if self._header is None:
            self._header = asyncio.ensure_future(reader.readexactly(_HEADER.size))
            # a worker stopped while idle ends this read with an error nobody awaits
            self._header.add_done_callback(_consume)
        return self._header

    async def run(self, payload: bytes) -> bytes:
        """Send one pickled call and wait for its pickled outcome; WorkerCrashed on EOF."""
        reader, writer = await self._connect()
        header = await self.next_header()
        try:
            writer.writelines((_HEADER.pack(len(payload)), payload))
            await writer.drain()
            size = _HEADER.unpack(await header)[0]
            return await reader.readexactly(size)
        except (OSError, asyncio.IncompleteReadError):
            raise WorkerCrashed() from None
        finally:
            self._header = None

    def alive(self) -> bool:
        return self.process.is_alive()

    def stop(self, timeout: float) -> None:
        with contextlib.suppress(OSError):
            self.sock.setblocking(True)
            self.sock.sendall(_HEADER.pack(0))
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self.sock.close()

    def close_streams(self) -> None:
        """Close this loop's end (call from the loop that made it)."""
        if self._streams is not None:
            self._streams[1].transport.abort()
            self._streams = None


@dataclass
class _Job:
    payload: bytes
    future: asyncio.Future[Any]
    attempts: int = 0


@dataclass
class _LoopState:
    """What belongs to the event loop the pool is used from (tests run several loops)."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[_Job]
    runners: list[asyncio.Task[None]] = field(default_factory=list)


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
        self._busy = 0
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
        dies is retried on a fresh worker, `attempts` times in all, then WorkerCrashed."""
        if self._closed:
            raise RuntimeError("the pool is shut down")
        state = self._loop_state()
        job = _Job(pickle.dumps((fn, args), pickle.HIGHEST_PROTOCOL), state.loop.create_future())
        state.queue.put_nowait(job)
        ok, value = pickle.loads(await job.future)
        if ok:
            return value
        raise value

    def _loop_state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        if self._state is None or self._state.loop is not loop:
            state = _LoopState(loop, asyncio.Queue())
            state.runners = [loop.create_task(self._serve(i, state)) for i in range(self.workers)]
            self._state = state
        return self._state

    async def _serve(self, slot: int, state: _LoopState) -> None:
        """One runner per worker: take a job, run it there, replace the worker if it died."""
        while True:
            if not self._workers[slot].alive():
                await self._replace(slot)
            job = await self._next_job(self._workers[slot], state.queue)
            if job is None:
                await self._replace(slot)  # it died while idle
                continue
            if job.future.done():  # the caller gave up (timeout, disconnect)
                continue
            self._busy += 1
            try:
                answer = await self._workers[slot].run(job.payload)
            except WorkerCrashed:
                job.attempts += 1
                if job.attempts >= self._attempts:
                    if not job.future.done():
                        job.future.set_exception(WorkerCrashed())
                else:
                    state.queue.put_nowait(job)
                await self._replace(slot)
                continue
            finally:
                self._busy -= 1
            if not job.future.done():
                job.future.set_result(answer)

    @staticmethod
    async def _next_job(worker: _Worker, queue: asyncio.Queue[_Job]) -> _Job | None:
        """The next job, or None as soon as the idle worker dies."""
        if not queue.empty():  # busy pool: no waiting, so no death watch (run() notices)
            return queue.get_nowait()
        try:
            died = await worker.next_header()
        except OSError:
            return None
        getter: asyncio.Future[Any] = asyncio.ensure_future(queue.get())
        try:
            await asyncio.wait((getter, died), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not getter.done():
                getter.cancel()
        if getter.done() and not getter.cancelled():
            job: _Job = getter.result()
            return job  # a job that arrived together with the death fails over in run()
        return None

    async def _replace(self, slot: int) -> None:
        old = self._workers[slot]
        quick = time.monotonic() - old.started < 10.0
        self._quick_deaths[slot] = self._quick_deaths[slot] + 1 if quick else 0
        if self._quick_deaths[slot] > 1:  # dying at start-up: do not spin
            await asyncio.sleep(min(_RESTART_BACKOFF_MAX_S, 0.1 * 2 ** self._quick_deaths[slot]))
        old.close_streams()
        old.stop(timeout=0)
        log.warning("worker process %s exited (code %s); starting a new one",
                    old.process.pid, old.process.exitcode)
        self._workers[slot] = self._spawn()
        self.restarts += 1

    async def aclose(self, timeout: float = 30.0) -> None:
        """Let queued and running calls finish (up to `timeout`), then stop the workers."""
        state = self._state
        if state is not None and state.loop is asyncio.get_running_loop():
            deadline = time.monotonic() + timeout
            while (self._busy or not state.queue.empty()) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            for runner in state.runners:
                runner.cancel()
            await asyncio.gather(*state.runners, return_exceptions=True)
            for worker in self._workers:
                worker.close_streams()
        await asyncio.to_thread(self.shutdown)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the workers now (each finishes the call it is running, if any)."""
        self._closed = True
        for worker in self._workers:
            worker.stop(timeout)
