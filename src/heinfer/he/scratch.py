"""Memory files for the binding's path-only save/load, shared by the BFV and CKKS adapters.

TenSEAL's `sealapi` saves and loads SEAL objects only through file paths, and some of those
objects are secret keys. Each call therefore gets its own anonymous memory file
(`memfd_create`), which SEAL opens as `/proc/self/fd/N`: it has no name in any filesystem,
no other process can open it, it is closed (and freed) before the call returns, and threads
never share one. Where the platform has no memory files (not Linux, or no /proc) this module
raises instead of falling back to a directory on disk: a secret key must never reach a
filesystem except through the client's `save_secret`.
"""

from __future__ import annotations

import os
from typing import Any, TypeVar

__all__ = ["SCRATCH", "Scratch", "ScratchUnavailableError"]

T = TypeVar("T")


class ScratchUnavailableError(RuntimeError):
    """No memory-backed file for SEAL's save/load on this platform: failing closed."""


def _memory_file() -> tuple[int, str]:
    """A fresh anonymous memory file (close-on-exec) and the path SEAL can open it by."""
    create = getattr(os, "memfd_create", None)
    if create is None:
        raise ScratchUnavailableError(
            "os.memfd_create is not available: heinfer needs Linux to keep SEAL's key "
            "serialization in memory, and will not write it to disk"
        )
    fd = create("heinfer-seal", os.MFD_CLOEXEC)
    path = f"/proc/self/fd/{fd}"
    if not os.path.exists(path):
        os.close(fd)
        raise ScratchUnavailableError(
            "/proc is not mounted: SEAL cannot open heinfer's memory files, and heinfer will "
            "not write SEAL objects to disk instead"
        )
    return fd, path


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    chunks, offset = [], 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class Scratch:
    """Round-trips SEAL objects through memory files: `save(obj) -> bytes`,
    `load(obj, ctx, bytes)`."""

    def save(self, obj: Any) -> bytes:
        fd, path = _memory_file()
        try:
            obj.save(path)
            return _read_all(fd)
        finally:
            os.close(fd)

    def load(self, obj: T, context: Any, data: bytes) -> T:
        fd, path = _memory_file()
        try:
            _write_all(fd, data)
            obj.load(context, path)  # type: ignore[attr-defined]
            return obj
        finally:
            os.close(fd)


SCRATCH = Scratch()
