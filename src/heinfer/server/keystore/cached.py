"""An in-memory LRU cache in front of any key store."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from heinfer.server.keystore.base import KeyStore, _as_bytes, _check_key_id, _check_tenant


@dataclass(frozen=True, slots=True)
class CacheStats:
    """The cache counters, read together under the lock so that they agree with each other."""

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
        self._entries: OrderedDict[tuple[str, str], tuple[bytes, float]] = OrderedDict()
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        # Bumped by every delete: a get that started fetching before a delete must not
        # re-insert the key it fetched after that delete evicted it.
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

    def _insert_locked(self, key: tuple[str, str], data: bytes) -> None:
        if len(data) > self._max_bytes:
            return  # would evict everything else and still not fit
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= len(old[0])
        self._entries[key] = (data, self._clock())
        self._bytes += len(data)
        while self._bytes > self._max_bytes:
            _, (evicted, _) = self._entries.popitem(last=False)
            self._bytes -= len(evicted)
            self._evictions += 1

    def _evict_locked(self, key: tuple[str, str]) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= len(old[0])

    def put(self, tenant: str, data: bytes) -> str:
        payload = _as_bytes(data)
        key_id = self._inner.put(tenant, payload)
        with self._lock:
            self._insert_locked((tenant, key_id), payload)
        return key_id

    def _lookup_locked(self, key: tuple[str, str]) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self._ttl is not None and self._clock() - entry[1] > self._ttl:
            self._evict_locked(key)
            return None
        self._entries.move_to_end(key)
        self._hits += 1
        return entry[0]

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
        data = self._inner.get(tenant, key_id)  # outside the lock: may take a while
        with self._lock:
            if generation == self._generation:
                self._insert_locked(key, data)
        return data

    def exists(self, tenant: str, key_id: str) -> bool:
        return self._inner.exists(tenant, key_id)

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
