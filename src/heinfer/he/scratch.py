"""Scratch files for TenSEAL's path-only save/load, shared by the BFV and CKKS adapters.

Per process a private directory on tmpfs (/dev/shm when writable), removed at exit; file
names are unique per thread and call, so concurrent threads never collide.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["SCRATCH", "Scratch"]

T = TypeVar("T")


def _scratch_dir() -> Path:
    base = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else Path(tempfile.gettempdir())
    path = Path(tempfile.mkdtemp(prefix="heinfer-", dir=base))
    atexit.register(_remove_scratch, path, os.getpid())
    return path


def _remove_scratch(path: Path, owner: int) -> None:
    """At exit, remove this process's scratch directory, never a parent's."""
    if os.getpid() == owner:
        shutil.rmtree(path, ignore_errors=True)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class Scratch:
    """Round-trips SEAL objects through files: `save(obj) -> bytes`, `load(obj, ctx, bytes)`."""

    def __init__(self) -> None:
        self._dir: Path | None = None
        self._pid = 0
        self._counter = itertools.count()
        self._lock = threading.Lock()

    def path(self) -> str:
        with self._lock:
            if self._dir is None or self._pid != os.getpid():
                self._dir, self._pid = _scratch_dir(), os.getpid()
            return str(self._dir / f"{threading.get_ident()}-{next(self._counter)}")

    def save(self, obj: Any) -> bytes:
        path = self.path()
        try:
            obj.save(path)
            with open(path, "rb") as fh:
                return fh.read()
        finally:
            _unlink(path)

    def load(self, obj: T, context: Any, data: bytes) -> T:
        path = self.path()
        try:
            with open(path, "wb") as fh:
                fh.write(data)
            obj.load(context, path)  # type: ignore[attr-defined]
            return obj
        finally:
            _unlink(path)


SCRATCH = Scratch()
