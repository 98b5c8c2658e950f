"""Functions the pool tests run in worker processes (importable by spawned children)."""

from __future__ import annotations

import os
import time

from heinfer.errors import ParameterMismatchError


def initialize() -> None:
    """Nothing to load: the pool's own behaviour is under test."""


def echo(value: bytes) -> tuple[int, bytes]:
    return os.getpid(), value[::-1]


def refuse(message: str) -> None:
    raise ParameterMismatchError(message)


def spin(seconds: float) -> int:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pass
    return os.getpid()


def die_once(marker: str) -> int:
    """Kill the worker the first time (marker file absent), answer on the retry."""
    if not os.path.exists(marker):
        with open(marker, "w"):
            pass
        os._exit(9)
    return os.getpid()


def always_die() -> None:
    os._exit(9)


IDLE_STEPS = 0


def idle_until_five() -> bool:
    """Idle-time work with an end: five steps."""
    global IDLE_STEPS
    if IDLE_STEPS >= 5:
        return False
    IDLE_STEPS += 1
    return True


def idle_forever() -> bool:
    """Idle-time work that never ends: calls must still be answered between steps."""
    global IDLE_STEPS
    IDLE_STEPS += 1
    time.sleep(0.002)
    return True


def idle_steps() -> int:
    return IDLE_STEPS
