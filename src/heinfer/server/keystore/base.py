"""The `KeyStore` contract every backend implements, and the checks they all share.

The checks live here, not in each backend, so that a tenant name or key id means the same thing
(and can never become a path or object name) whichever store is configured.
"""

from __future__ import annotations

import hashlib
import logging
import re
from abc import ABC, abstractmethod

from heinfer.errors import BadInputError, KeyNotFoundError

__all__ = ["KeyStore", "KeyStoreConfigError", "key_id_for"]

log = logging.getLogger(__name__)

# fullmatch, never `$`: `$` also matches before a trailing newline.
_TENANT_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_KEY_ID_RE = re.compile(r"[0-9a-f]{64}")

# Short timeouts so a dead store turns into a 503 within seconds instead of hanging request
# threads for the SDK defaults (Azure: 20 s connect and 15-45 s backoff; boto3: 60 s); one
# retry so a stale pooled connection after a store restart is transparently replaced.
DEFAULT_CONNECT_TIMEOUT = 1.0
DEFAULT_READ_TIMEOUT = 2.0
DEFAULT_RETRIES = 1


class KeyStoreConfigError(ValueError):
    """The key store URL or its environment is wrong: an operator error found at start-up,
    not a request error, so it is deliberately not a `HeinferError` (no HTTP status)."""


def key_id_for(data: bytes) -> str:
    """The content address of `data`; the same function the client uses to name its upload."""
    return hashlib.sha256(data).hexdigest()


def _check_tenant(tenant: str) -> str:
    if not isinstance(tenant, str) or _TENANT_RE.fullmatch(tenant) is None:
        raise BadInputError(
            "invalid tenant name: expected 1-64 characters of a-z, 0-9, '_' or '-', "
            "starting with a letter or digit"
        )
    return tenant


def _is_key_id(key_id: str) -> bool:
    return isinstance(key_id, str) and _KEY_ID_RE.fullmatch(key_id) is not None


def _check_key_id(key_id: str) -> str:
    # Anything that is not a well-formed id cannot name a stored key; answering "not found"
    # (rather than 400) means no string can ever be turned into a path or object name.
    if not _is_key_id(key_id):
        raise KeyNotFoundError("key not found")
    return key_id


def _not_found(key_id: str) -> KeyNotFoundError:
    return KeyNotFoundError(f"key {key_id} not found")


def _as_bytes(data: bytes) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, bytearray | memoryview):
        return bytes(data)
    raise TypeError(f"key material must be bytes, not {type(data).__name__}")


def _verified(tenant: str, key_id: str, data: bytes) -> bytes:
    """Content addressing makes corruption detectable; a corrupt key must not reach SEAL."""
    if key_id_for(data) != key_id:
        log.warning(
            "stored key %s of tenant %s fails its sha256 check; treating as missing", key_id, tenant
        )
        raise _not_found(key_id)
    return data


class KeyStore(ABC):
    """Public key material by (tenant, key_id); key_id = sha256(data).hexdigest().

    Implementations are thread-safe: the service shares one instance between request threads.
    """

    @abstractmethod
    def put(self, tenant: str, data: bytes) -> str:
        """Store `data` for `tenant` and return its key id.

        Atomic (a concurrent reader sees the whole key or nothing) and idempotent (putting the
        same bytes again is harmless and returns the same id; it also repairs a corrupt copy).
        """

    @abstractmethod
    def get(self, tenant: str, key_id: str) -> bytes:
        """The key's bytes; `KeyNotFoundError` if absent, owned by another tenant, or corrupt."""

    @abstractmethod
    def exists(self, tenant: str, key_id: str) -> bool:
        """Whether the tenant has the key, found out without downloading it.

        For callers that only need to know a key is there, such as the HTTP process before it
        hands a request to a worker that fetches the key itself. Scoped exactly like `get`:
        another tenant's id and a malformed id are absent (False), an invalid tenant is
        `BadInputError`, and a store that cannot answer is `StoreUnavailableError`. The bytes
        are not read, so a corrupt copy exists here while `get` reports it missing.
        """

    @abstractmethod
    def delete(self, tenant: str, key_id: str) -> None:
        """Remove the key; `KeyNotFoundError` if the tenant has no such key."""

    def get_cached(self, tenant: str, key_id: str) -> bytes | None:
        """The key's bytes if they are at hand without I/O, else None (then call `get`).

        Lets an event loop answer the common case inline instead of hopping to a thread.
        """
        return None

    def exists_cached(self, tenant: str, key_id: str) -> bool | None:
        """`exists`'s answer if it is at hand without I/O, else None (then call `exists`).

        The same inline fast path as `get_cached`, for callers that only need existence.
        """
        return None

    @abstractmethod
    def _scan(self, tenant: str) -> list[tuple[str, int]]:
        """(key id, size in bytes) of each of the tenant's keys, sorted by id."""

    def list_keys(self, tenant: str) -> list[str]:
        """The tenant's key ids, sorted."""
        return [name for name, _ in self._scan(tenant)]

    def usage(self, tenant: str) -> tuple[int, int]:
        """(key count, total bytes) of the tenant, for quota checks before a put."""
        found = self._scan(tenant)
        return len(found), sum(size for _, size in found)

    @abstractmethod
    def check(self) -> None:
        """Cheap reachability probe for /ready; raises `StoreUnavailableError`."""

    def close(self) -> None:  # noqa: B027 - optional hook, most stores hold nothing to release
        """Release network clients; the store must not be used afterwards."""
