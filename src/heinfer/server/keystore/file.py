"""Keys in a local (or mounted) directory."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import stat
import time

from heinfer.errors import StoreUnavailableError
from heinfer.server.keystore.base import (
    _KEY_ID_RE,
    KeyStore,
    _as_bytes,
    _check_key_id,
    _check_tenant,
    _is_key_id,
    _not_found,
    _verified,
    key_id_for,
)

__all__ = ["FileKeyStore"]

log = logging.getLogger(__name__)

_TMP_PREFIX = ".tmp-"
_WRITE_CHUNK = 1 << 20


class FileKeyStore(KeyStore):
    """Keys as files ``root/{tenant}/{key_id}`` (mode 0600).

    Writes go to a hidden temp file in the same directory, are fsynced, then renamed over the
    final name: rename is atomic within a filesystem, so a reader (or a crash) can only ever
    observe no file or the complete key. Temp names start with a dot and never match the key id
    pattern, so listing and lookup cannot see them; leftovers of a crashed writer are removed
    when a store is opened, once older than `stale_tmp_seconds` (an age limit, because another
    replica sharing the directory may be writing right now).
    """

    def __init__(self, root: str | os.PathLike[str], *, stale_tmp_seconds: float = 900.0) -> None:
        self._root = os.path.abspath(os.fspath(root))
        try:
            os.makedirs(self._root, mode=0o700, exist_ok=True)
        except OSError as exc:
            # Not fatal: the volume may be mounted later; check() reports it until then.
            log.warning("key store directory %s is not usable yet: %s", self._root, exc.strerror)
        self.sweep_temp_files(stale_tmp_seconds)

    def __repr__(self) -> str:
        return f"FileKeyStore({self._root!r})"

    def sweep_temp_files(self, older_than_seconds: float) -> int:
        """Delete crashed writers' temp files older than the given age; returns how many."""
        removed = 0
        cutoff = time.time() - older_than_seconds
        try:
            tenants = [e for e in os.scandir(self._root) if e.is_dir(follow_symlinks=False)]
        except OSError:
            return 0
        for tenant_dir in tenants:
            with contextlib.suppress(OSError), os.scandir(tenant_dir.path) as entries:
                for entry in entries:
                    if not entry.name.startswith(_TMP_PREFIX):
                        continue
                    with contextlib.suppress(OSError):
                        if entry.stat(follow_symlinks=False).st_mtime <= cutoff:
                            os.unlink(entry.path)
                            removed += 1
        if removed:
            log.info("removed %d leftover temp file(s) from %s", removed, self._root)
        return removed

    def _unavailable(self, action: str, exc: OSError) -> StoreUnavailableError:
        # The path stays in the server log; clients only learn what kind of failure it was.
        log.warning("key store %s: cannot %s: %s", self._root, action, exc)
        reason = exc.strerror or type(exc).__name__
        return StoreUnavailableError(f"key store directory cannot {action}: {reason}")

    def put(self, tenant: str, data: bytes) -> str:
        tenant = _check_tenant(tenant)
        payload = _as_bytes(data)
        key_id = key_id_for(payload)
        directory = os.path.join(self._root, tenant)
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            self._write_atomically(directory, key_id, payload)
        except OSError as exc:
            raise self._unavailable("write", exc) from exc
        return key_id

    @staticmethod
    def _write_atomically(directory: str, key_id: str, payload: bytes) -> None:
        tmp = os.path.join(directory, f"{_TMP_PREFIX}{key_id}-{secrets.token_hex(8)}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
        fd = os.open(tmp, flags, 0o600)
        try:
            try:
                os.fchmod(fd, 0o600)  # exact mode whatever the umask
                view = memoryview(payload)
                while len(view) > 0:
                    view = view[os.write(fd, view[:_WRITE_CHUNK]) :]
                os.fsync(fd)  # data durable before the rename makes it visible
            finally:
                os.close(fd)
            os.replace(tmp, os.path.join(directory, key_id))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        # Make the rename itself durable; some filesystems cannot fsync a directory.
        with contextlib.suppress(OSError):
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def get(self, tenant: str, key_id: str) -> bytes:
        tenant = _check_tenant(tenant)
        key_id = _check_key_id(key_id)
        path = os.path.join(self._root, tenant, key_id)
        try:
            # O_NOFOLLOW: we never create symlinks, so one in the store is not a key of ours.
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except (FileNotFoundError, NotADirectoryError):
            raise _not_found(key_id) from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _not_found(key_id) from None
            raise self._unavailable("read", exc) from exc
        try:
            with os.fdopen(fd, "rb") as f:
                data = f.read()
        except IsADirectoryError:
            raise _not_found(key_id) from None
        except OSError as exc:
            raise self._unavailable("read", exc) from exc
        return _verified(tenant, key_id, data)

    def exists(self, tenant: str, key_id: str) -> bool:
        tenant = _check_tenant(tenant)
        if not _is_key_id(key_id):
            return False
        try:
            st = os.stat(os.path.join(self._root, tenant, key_id), follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return False  # as in `get`
            raise self._unavailable("read", exc) from exc
        # Only a regular file is a key: `get` refuses symlinks and directories as well.
        return stat.S_ISREG(st.st_mode)

    def delete(self, tenant: str, key_id: str) -> None:
        tenant = _check_tenant(tenant)
        key_id = _check_key_id(key_id)
        try:
            os.unlink(os.path.join(self._root, tenant, key_id))
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise _not_found(key_id) from None
        except OSError as exc:
            raise self._unavailable("delete", exc) from exc

    def _scan(self, tenant: str) -> list[tuple[str, int]]:
        directory = os.path.join(self._root, _check_tenant(tenant))
        found: list[tuple[str, int]] = []
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    if _KEY_ID_RE.fullmatch(entry.name) is None:
                        continue  # temp files and anything else that is not a key
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # deleted while we listed
                    if entry.is_file(follow_symlinks=False):
                        found.append((entry.name, st.st_size))
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            raise self._unavailable("list", exc) from exc
        found.sort()
        return found

    def check(self) -> None:
        try:
            os.makedirs(self._root, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise self._unavailable("be created", exc) from exc
        if not os.access(self._root, os.W_OK | os.X_OK):
            raise self._unavailable("be written", PermissionError(errno.EACCES, "not writable"))
