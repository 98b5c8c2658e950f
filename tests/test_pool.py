"""The service's process pool with real spawned workers, under asyncio and uvloop."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

import pool_helpers as helpers
from heinfer.errors import ParameterMismatchError
from heinfer.server.pool import ProcessPool, WorkerCrashed


def _run(loop_kind: str, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    if loop_kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        uvloop.run(main())
    else:
        asyncio.run(main())


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def pool() -> Any:
    pool = ProcessPool(2, helpers.initialize)
    yield pool
    pool.shutdown()


def test_results_errors_and_large_payloads_come_back(pool: ProcessPool, loop_kind: str) -> None:
    big = os.urandom(5 << 20)  # larger than any socket buffer: exercises partial writes/reads

    async def main() -> None:
        answers = await asyncio.gather(*(pool.call(helpers.echo, bytes([i]) * 50_000)
                                         for i in range(40)))
        assert [a[1] for a in answers] == [bytes([i]) * 50_000 for i in range(40)]
        assert {a[0] for a in answers} <= set(pool.pids())
        _, back = await pool.call(helpers.echo, big)
        assert back == big[::-1]
        with pytest.raises(ParameterMismatchError, match="wrong parameters"):
            await pool.call(helpers.refuse, "wrong parameters")
        await pool.aclose()

    _run(loop_kind, main)
    assert pool.restarts == 0


def test_calls_spread_over_all_workers(pool: ProcessPool, loop_kind: str) -> None:
    async def main() -> None:
        pids = await asyncio.gather(*(pool.call(helpers.spin, 0.02) for _ in range(20)))
        assert set(pids) == set(pool.pids())

    _run(loop_kind, main)


def test_a_call_whose_worker_dies_is_retried_on_a_fresh_worker(
    pool: ProcessPool, loop_kind: str, tmp_path: Path
) -> None:
    async def main() -> None:
        before = set(pool.pids())
        pid = await pool.call(helpers.die_once, str(tmp_path / "died"))
        deadline = time.monotonic() + 20
        while pool.restarts < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert pool.restarts == 1
        assert pid in pool.pids() and len(set(pool.pids()) - before) == 1
        with pytest.raises(WorkerCrashed):
            await pool.call(helpers.always_die)  # dies on every attempt: reported, not looped
        assert await pool.call(helpers.spin, 0.0) in pool.pids()  # the pool still serves

    _run(loop_kind, main)


def test_an_idle_worker_that_is_killed_is_replaced_without_any_call(
    pool: ProcessPool, loop_kind: str
) -> None:
    async def main() -> None:
        await pool.call(helpers.spin, 0.0)  # runners started
        victim = pool.pids()[0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while (victim in pool.pids() or len(pool.pids()) < 2) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert victim not in pool.pids() and len(pool.pids()) == 2
        assert pool.restarts == 1

    _run(loop_kind, main)


def test_a_caller_that_gives_up_does_not_disturb_the_pool(
    pool: ProcessPool, loop_kind: str
) -> None:
    async def main() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(pool.call(helpers.spin, 0.5), 0.05)
        answers = await asyncio.gather(*(pool.call(helpers.echo, b"ab") for _ in range(4)))
        assert all(a[1] == b"ba" for a in answers)
        assert pool.restarts == 0

    _run(loop_kind, main)


@pytest.mark.parametrize("idle", [helpers.idle_until_five, helpers.idle_forever])
def test_idle_work_runs_between_calls_and_never_blocks_them(idle: Any) -> None:
    pool = ProcessPool(1, helpers.initialize, idle=idle)

    async def main() -> None:
        deadline = time.monotonic() + 20
        while await pool.call(helpers.idle_steps) < 5 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        steps = await pool.call(helpers.idle_steps)
        assert steps >= 5 if idle is helpers.idle_forever else steps == 5
        # endless idle work must not starve calls: they are answered between its steps
        # (the generous limit only turns a hang into a failure)
        for _ in range(20):
            _pid, back = await asyncio.wait_for(pool.call(helpers.echo, b"xy"), 60)
            assert back == b"yx"

    try:
        asyncio.run(main())
    finally:
        pool.shutdown()


def test_a_call_left_running_by_a_finished_loop_never_answers_the_next_loop(
    pool: ProcessPool,
) -> None:
    async def give_up() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(pool.call(helpers.spin, 1.0), 0.2)  # still running after

    async def ask() -> None:
        answers = await asyncio.gather(*(pool.call(helpers.echo, bytes([i])) for i in range(6)))
        assert [a[1] for a in answers] == [bytes([i]) for i in range(6)]

    asyncio.run(give_up())
    asyncio.run(ask())  # a late answer to spin() taken for echo's would fail here


def test_one_call_at_a_time_goes_to_the_worker_idle_longest(
    pool: ProcessPool, loop_kind: str
) -> None:
    """The other worker has finished its idle-time work; the one that just answered may be
    in the middle of a step."""

    async def main() -> None:
        await asyncio.gather(*(pool.call(helpers.spin, 0.05) for _ in range(2)))  # both attached
        pids = [await pool.call(helpers.spin, 0.0) for _ in range(6)]
        assert all(a != b for a, b in itertools.pairwise(pids)), pids

    _run(loop_kind, main)


def test_a_busy_worker_holds_one_small_call_behind_its_own_and_no_large_one(
    loop_kind: str,
) -> None:
    pool = ProcessPool(1, helpers.initialize)

    async def main() -> None:
        await pool.call(helpers.spin, 0.0)  # attached
        worker = pool._workers[0]
        small = [asyncio.ensure_future(pool.call(helpers.spin, 0.3)) for _ in range(3)]
        await asyncio.sleep(0.1)
        assert len(worker.jobs) == 2  # running one, holding the next; the third waits here
        assert set(await asyncio.gather(*small)) == set(pool.pids())
        big = b"x" * (1 << 20)
        calls = [
            asyncio.ensure_future(pool.call(helpers.spin, 0.3)),
            asyncio.ensure_future(pool.call(helpers.echo, big)),
        ]
        await asyncio.sleep(0.1)
        assert len(worker.jobs) == 1  # a large call waits here until the worker is free
        _pid, (_, back) = await asyncio.gather(*calls)
        assert back == big

    try:
        _run(loop_kind, main)
    finally:
        pool.shutdown()


def test_a_held_call_is_not_charged_for_the_death_of_the_call_ahead_of_it(
    loop_kind: str,
) -> None:
    """A call that died every time it ran is reported; the call each dead worker was holding
    never started, so it is re-queued with its attempts untouched and answered."""
    pool = ProcessPool(1, helpers.initialize)

    async def main() -> None:
        await pool.call(helpers.spin, 0.0)
        doomed = asyncio.ensure_future(pool.call(helpers.always_die))
        held = asyncio.ensure_future(pool.call(helpers.echo, b"held"))
        with pytest.raises(WorkerCrashed):
            await doomed
        _pid, back = await asyncio.wait_for(held, 60)
        assert back == b"dleh"
        assert pool.restarts == 2

    try:
        _run(loop_kind, main)
    finally:
        pool.shutdown()
