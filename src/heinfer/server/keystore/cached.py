"""An in-memory LRU cache in front of any key store."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from heinfer.errors import KeyNotFoundError
from heinfer.server.keystore.base import (
    KeyStore,
    _as_bytes,
    _check_key_id,
    _check_tenant,
    _is_key_id,
)

__all__ = ["CacheStats", "CachedKeyStore"]

# What remembering "this key exists" costs without its body (the dict node, the key tuple and
# its two strings, the timestamp), rounded up; charged so that `max_bytes` bounds all of it.
PRESENCE_BYTES = 512


def _cost(data: bytes | None) -> int:
    return PRESENCE_BYTES if data is None else len(data)


@dataclass(frozen=True, slots=True)
class CacheStats:
    """The cache counters, read together under the lock so that they agree with each other.

    `hits` and `misses` count body lookups (`get`, `get_cached`), not `exists`; `entries` and
    `bytes` include keys remembered only as existing, each charged `PRESENCE_BYTES`.
    """

    hits: int
    misses: int
    evictions: int
    entries: int
    bytes: int
    max_bytes: int


class CachedKeyStore(KeyStore):
    """LRU cache of key bytes in front of a (remote) store, bounded in bytes.

    Bounded in bytes rather than entries because keys range from kilobytes to several
    megabytes. Every inference needs its tenant's evaluation keys, so this turns a remote
    round trip + multi-MB download into a dict lookup. Content addressing means a cached entry
    can only be stale by *existence* (deleted through another replica), which `ttl_seconds`
    bounds; deletes through this instance evict immediately. Writes go through to the store
    and populate the cache (a freshly uploaded key is usually used next).

    `exists` answers from a cached body when there is one; otherwise it asks the store and
    remembers a "yes" (not the body) for the same TTL, so a process that only checks keys never
    downloads them. A "no" is never remembered: a key uploaded through another replica must be
    usable here at once, so only "yes" can go stale, and only the way cached bodies can.
    """

    def __init__(
        self,
        inner: KeyStore,
        max_bytes: int,
        ttl_seconds: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        if ttl_seconds is not None and ttl_seconds <= 0:
            raise ValueError("ttl_seconds must be > 0 or None")
        self._inner = inner
        self._max_bytes = max_bytes
        self._ttl = ttl_seconds
        self._clock = clock
        self._lock = threading.Lock()
        # (tenant, key_id) -> (body, or None when only its existence is known; time learnt)
        self._entries: OrderedDict[tuple[str, str], tuple[bytes | None, float]] = OrderedDict()
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        # Bumped by every delete: a get or exists that asked the store before a delete must not
        # re-insert what it learnt after that delete evicted it.
        self._generation = 0

    @property
    def inner(self) -> KeyStore:
        return self._inner

    def __repr__(self) -> str:
        return f"CachedKeyStore({self._inner!r}, max_bytes={self._max_bytes}, ttl={self._ttl})"

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
                entries=len(self._entries),
                bytes=self._bytes,
                max_bytes=self._max_bytes,
            )

    def _insert_locked(self, key: tuple[str, str], data: bytes | None) -> None:
        """Cache a body, or with `data` None remember that the key exists."""
        if data is None and key in self._entries:
            return  # already known, maybe with its body: keep that
        if data is not None and len(data) > self._max_bytes:
            data = None  # it would evict everything and still not fit: only remember it exists
        if _cost(data) > self._max_bytes:
            return
        self._evict_locked(key)
        self._entries[key] = (data, self._clock())
        self._bytes += _cost(data)
        while self._bytes > self._max_bytes:
            _, (evicted, _) = self._entries.popitem(last=False)
            self._bytes -= _cost(evicted)
            self._evictions += 1

    def _evict_locked(self, key: tuple[str, str]) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= _cost(old[0])

    def put(self, tenant: str, data: bytes) -> str:
        payload = _as_bytes(data)
        key_id = self._inner.put(tenant, payload)
        with self._lock:
            self._insert_locked((tenant, key_id), payload)
        return key_id

    def _known_locked(self, key: tuple[str, str]) -> bool:
        """Whether the key is cached (body or existence) within the TTL; drops it if expired."""
        entry = self._entries.get(key)
        if entry is None:
            return False
        if self._ttl is not None and self._clock() - entry[1] > self._ttl:
            self._evict_locked(key)
            return False
        self._entries.move_to_end(key)
        return True

    def _lookup_locked(self, key: tuple[str, str]) -> bytes | None:
        if not self._known_locked(key):
            return None
        data = self._entries[key][0]
        if data is not None:
            self._hits += 1
        return data

    def get_cached(self, tenant: str, key_id: str) -> bytes | None:
        key = (_check_tenant(tenant), _check_key_id(key_id))
        with self._lock:
            return self._lookup_locked(key)

    def get(self, tenant: str, key_id: str) -> bytes:
        key = (_check_tenant(tenant), _check_key_id(key_id))
        with self._lock:
            cached = self._lookup_locked(key)
            if cached is not None:
                return cached
            self._misses += 1
            generation = self._generation
        try:
            data = self._inner.get(tenant, key_id)  # outside the lock: may take a while
        except KeyNotFoundError:
            with self._lock:
                self._evict_locked(key)  # a remembered "exists" is wrong now (or the copy corrupt)
            raise
        with self._lock:
            if generation == self._generation:
                self._insert_locked(key, data)
        return data

    def exists_cached(self, tenant: str, key_id: str) -> bool | None:
        tenant = _check_tenant(tenant)
        if not _is_key_id(key_id):
            return False
        with self._lock:
            return True if self._known_locked((tenant, key_id)) else None

    def exists(self, tenant: str, key_id: str) -> bool:
        tenant = _check_tenant(tenant)
        if not _is_key_id(key_id):
            return False
        key = (tenant, key_id)
        with self._lock:
            if self._known_locked(key):
                return True
            generation = self._generation
        found = self._inner.exists(tenant, key_id)  # outside the lock, like get
        if found:
            with self._lock:
                if generation == self._generation:
                    self._insert_locked(key, None)
        return found

    def delete(self, tenant: str, key_id: str) -> None:
        key = (_check_tenant(tenant), _check_key_id(key_id))
        try:
            self._inner.delete(tenant, key_id)
        finally:
            # Evict even when the store says "not found": then our copy is stale anyway.
            with self._lock:
                self._generation += 1
                self._evict_locked(key)

    def _scan(self, tenant: str) -> list[tuple[str, int]]:
        return self._inner._scan(tenant)  # listings are never cached: quotas need them fresh

    def check(self) -> None:
        self._inner.check()

    def close(self) -> None:
        self._inner.close()
