"""The in-memory key cache (`CachedKeyStore`) on its own, over a counting in-memory store.

A memory store makes every read and lookup countable and every interleaving reproducible; the
cache over the real backends is covered in test_keystore.py.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from heinfer.errors import BadInputError, KeyNotFoundError
from heinfer.server.keystore import CachedKeyStore, KeyStore, key_id_for
from heinfer.server.keystore.cached import PRESENCE_BYTES

SMALL = b"public key material \x00\x01\x02"


class MemoryStore(KeyStore):
    """Minimal in-memory backend that counts reads and lookups, for cache tests."""

    def __init__(self) -> None:
        self.data: dict[tuple[str, str], bytes] = {}
        self.reads = 0
        self.lookups = 0
        self.before_read: Callable[[], None] = lambda: None

    def put(self, tenant: str, data: bytes) -> str:
        key_id = key_id_for(data)
        self.data[(tenant, key_id)] = bytes(data)
        return key_id

    def get(self, tenant: str, key_id: str) -> bytes:
        self.reads += 1
        try:
            found = self.data[(tenant, key_id)]
        except KeyError:
            raise KeyNotFoundError("no") from None
        self.before_read()
        return found

    def exists(self, tenant: str, key_id: str) -> bool:
        self.lookups += 1
        found = (tenant, key_id) in self.data
        self.before_read()
        return found

    def delete(self, tenant: str, key_id: str) -> None:
        if self.data.pop((tenant, key_id), None) is None:
            raise KeyNotFoundError("no")

    def _scan(self, tenant: str) -> list[tuple[str, int]]:
        return sorted((k, len(v)) for (t, k), v in self.data.items() if t == tenant)

    def check(self) -> None:
        pass


def test_cache_is_bounded_in_bytes_lru() -> None:
    inner = MemoryStore()
    cache = CachedKeyStore(inner, max_bytes=100)
    a = cache.put("t", b"a" * 40)
    b = cache.put("t", b"b" * 40)
    assert cache.stats().bytes == 80
    cache.get("t", a)  # a is now most recently used
    c = cache.put("t", b"c" * 40)  # 120 > 100: evicts b, the least recently used
    stats = cache.stats()
    assert (stats.entries, stats.bytes, stats.evictions) == (2, 80, 1)
    reads = inner.reads
    assert cache.get("t", a) == b"a" * 40
    assert cache.get("t", c) == b"c" * 40
    assert inner.reads == reads
    assert cache.get("t", b) == b"b" * 40  # miss: refetched
    assert inner.reads == reads + 1
    assert cache.stats().bytes <= 100

    big = cache.put("t", b"x" * 101)  # larger than the whole cache: not cached at all
    assert cache.stats().bytes <= 100
    cache.get("t", big)
    assert inner.reads == reads + 2


def test_cache_counts_hits_and_misses_and_expires() -> None:
    now = [100.0]
    inner = MemoryStore()
    key_id = inner.put("t", SMALL)
    cache = CachedKeyStore(inner, max_bytes=1 << 20, ttl_seconds=10, clock=lambda: now[0])
    assert cache.get("t", key_id) == SMALL
    assert cache.get("t", key_id) == SMALL
    assert (cache.stats().hits, cache.stats().misses, inner.reads) == (1, 1, 1)
    now[0] += 9
    cache.get("t", key_id)
    assert inner.reads == 1
    now[0] += 2  # entry is now 11 s old (TTL counts from fetch, not from last use)
    cache.get("t", key_id)
    assert (cache.stats().hits, cache.stats().misses, inner.reads) == (2, 2, 2)
    with pytest.raises(KeyNotFoundError):
        cache.get("other-tenant", key_id)
    assert cache.stats().entries == 1


def test_get_cached_never_does_io_and_honours_ttl() -> None:
    now = [100.0]
    inner = MemoryStore()
    key_id = inner.put("t", SMALL)
    cache = CachedKeyStore(inner, max_bytes=1 << 20, ttl_seconds=10, clock=lambda: now[0])
    assert cache.get_cached("t", key_id) is None  # not fetched yet: no read to find out
    assert inner.reads == 0
    cache.get("t", key_id)
    assert cache.get_cached("t", key_id) == SMALL
    assert cache.get_cached("other-tenant", key_id) is None
    now[0] += 11
    assert cache.get_cached("t", key_id) is None  # expired entries are not served
    assert inner.reads == 1
    with pytest.raises(BadInputError):
        cache.get_cached("../t", key_id)


def test_cache_delete_evicts() -> None:
    inner = MemoryStore()
    cache = CachedKeyStore(inner, max_bytes=1 << 20)
    key_id = cache.put("t", SMALL)
    cache.delete("t", key_id)
    assert cache.stats().entries == 0
    with pytest.raises(KeyNotFoundError):
        cache.get("t", key_id)
    # Deleted elsewhere (another replica): our delete still evicts the stale copy.
    key_id = cache.put("t", SMALL)
    inner.data.clear()
    with pytest.raises(KeyNotFoundError):
        cache.delete("t", key_id)
    with pytest.raises(KeyNotFoundError):
        cache.get("t", key_id)


def test_cache_does_not_resurrect_a_key_deleted_during_a_read() -> None:
    inner = MemoryStore()
    key_id = inner.put("t", SMALL)
    cache = CachedKeyStore(inner, max_bytes=1 << 20)
    reading, release = threading.Event(), threading.Event()

    def slow() -> None:
        reading.set()
        release.wait(5)

    inner.before_read = slow
    result: list[bytes] = []
    reader = threading.Thread(target=lambda: result.append(cache.get("t", key_id)))
    reader.start()
    assert reading.wait(5)
    inner.before_read = lambda: None
    cache.delete("t", key_id)
    release.set()
    reader.join()
    assert result == [SMALL]  # the read began before the delete
    with pytest.raises(KeyNotFoundError):
        cache.get("t", key_id)


def test_cache_validates_before_lookup() -> None:
    cache = CachedKeyStore(MemoryStore(), max_bytes=1 << 20)
    with pytest.raises(BadInputError):
        cache.get("../x", "0" * 64)
    with pytest.raises(KeyNotFoundError):
        cache.get("t", "../x")
    assert cache.stats().misses == 0


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["put", "get", "exists", "delete"]), st.integers(0, 7)),
        max_size=60,
    ),
    # Small enough to evict bodies, or just big enough to remember a few existing keys too.
    max_bytes=st.integers(0, 64) | st.integers(PRESENCE_BYTES, 2 * PRESENCE_BYTES + 64),
)
def test_cache_model(ops: list[tuple[str, int]], max_bytes: int) -> None:
    """Whatever the sequence, the cache answers like the store and respects its byte bound."""
    inner = MemoryStore()
    cache = CachedKeyStore(inner, max_bytes=max_bytes)
    blobs = [bytes([i]) * (i * 5) for i in range(8)]
    for op, i in ops:
        key_id = key_id_for(blobs[i])
        expected = inner.data.get(("t", key_id))
        if op == "put":
            cache.put("t", blobs[i])
        elif op == "exists":
            assert cache.exists("t", key_id) is (expected is not None)
        elif op == "get":
            if expected is None:
                with pytest.raises(KeyNotFoundError):
                    cache.get("t", key_id)
            else:
                assert cache.get("t", key_id) == expected
        else:
            if expected is None:
                with pytest.raises(KeyNotFoundError):
                    cache.delete("t", key_id)
            else:
                cache.delete("t", key_id)
        stats = cache.stats()
        assert 0 <= stats.bytes <= max_bytes
    stats = cache.stats()
    assert stats.hits + stats.misses == sum(1 for op, _ in ops if op == "get")


def test_cache_is_thread_safe() -> None:
    inner = MemoryStore()
    cache = CachedKeyStore(inner, max_bytes=300)
    blobs = [bytes([i]) * 50 for i in range(12)]
    ids = [cache.put("t", b) for b in blobs]
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            for n in range(400):
                i = (seed * 7 + n) % len(blobs)
                assert cache.get("t", ids[i]) == blobs[i]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    stats = cache.stats()
    assert stats.bytes <= 300 and stats.bytes == stats.entries * 50
    assert stats.hits + stats.misses == 6 * 400


# ------------------------------------------------------------------------------------------
# exists: what the HTTP process asks before handing a request to a worker
# ------------------------------------------------------------------------------------------


def test_exists_answers_from_a_cached_body_without_io() -> None:
    inner = MemoryStore()
    key_id = inner.put("t", SMALL)
    cache = CachedKeyStore(inner, max_bytes=1 << 20)
    cache.get("t", key_id)
    assert cache.exists_cached("t", key_id) is True
    assert cache.exists("t", key_id) is True
    assert inner.lookups == 0
    # Scoped like get: the same id under another tenant is asked for, and absent.
    assert cache.exists_cached("u", key_id) is None
    assert cache.exists("u", key_id) is False
    assert inner.lookups == 1
    for bad_id in ("", "../t", "0" * 63, key_id.upper(), key_id + "\n"):
        assert cache.exists_cached("t", bad_id) is False
        assert cache.exists("t", bad_id) is False
    assert inner.lookups == 1
    for bad_tenant in ("../t", "", "T"):
        with pytest.raises(BadInputError):
            cache.exists(bad_tenant, key_id)
        with pytest.raises(BadInputError):
            cache.exists_cached(bad_tenant, key_id)
    stats = cache.stats()
    assert (stats.hits, stats.misses) == (0, 1)  # exists is not a body lookup


def test_exists_remembers_yes_without_the_body_for_the_ttl() -> None:
    now = [100.0]
    inner = MemoryStore()
    key_id = inner.put("t", SMALL)
    cache = CachedKeyStore(inner, max_bytes=1 << 20, ttl_seconds=10, clock=lambda: now[0])
    assert cache.exists_cached("t", key_id) is None
    assert cache.exists("t", key_id) is True
    assert (inner.lookups, inner.reads) == (1, 0)
    stats = cache.stats()
    assert (stats.entries, stats.bytes) == (1, PRESENCE_BYTES)  # the answer, not the body
    assert cache.get_cached("t", key_id) is None

    inner.data.clear()  # deleted through another replica
    now[0] += 10
    assert cache.exists_cached("t", key_id) is True
    assert cache.exists("t", key_id) is True  # stale within the TTL, like a cached body
    assert inner.lookups == 1
    now[0] += 1  # 11 s after the store answered (the TTL counts from then, not from last use)
    assert cache.exists_cached("t", key_id) is None
    assert cache.stats().entries == 0
    assert cache.exists("t", key_id) is False
    assert inner.lookups == 2


def test_exists_never_remembers_no() -> None:
    inner = MemoryStore()
    cache = CachedKeyStore(inner, max_bytes=1 << 20)
    key_id = key_id_for(SMALL)
    assert cache.exists("t", key_id) is False
    assert cache.exists_cached("t", key_id) is None
    inner.put("t", SMALL)  # uploaded through another replica: usable here at once
    assert cache.exists("t", key_id) is True
    assert inner.lookups == 2


def test_delete_and_a_failed_get_forget_existence() -> None:
    inner = MemoryStore()
    cache = CachedKeyStore(inner, max_bytes=1 << 20)
    key_id = inner.put("t", SMALL)
    assert cache.exists("t", key_id) is True
    cache.delete("t", key_id)
    assert cache.exists_cached("t", key_id) is None
    assert cache.exists("t", key_id) is False

    # Deleted elsewhere: a delete here still forgets, and so does a get that finds nothing.
    for forget in (cache.delete, cache.get):
        inner.put("t", SMALL)
        assert cache.exists("t", key_id) is True
        inner.data.clear()
        with pytest.raises(KeyNotFoundError):
            forget("t", key_id)
        assert cache.exists_cached("t", key_id) is None
        assert cache.stats().entries == 0


def test_a_get_after_exists_caches_the_body() -> None:
    inner = MemoryStore()
    key_id = inner.put("t", SMALL)
    cache = CachedKeyStore(inner, max_bytes=1 << 20)
    cache.exists("t", key_id)
    assert cache.get("t", key_id) == SMALL
    assert cache.get("t", key_id) == SMALL
    assert inner.reads == 1
    assert (cache.stats().entries, cache.stats().bytes) == (1, len(SMALL))
    cache.exists("t", key_id)  # keeps the body, does not downgrade it to a presence
    assert cache.get_cached("t", key_id) == SMALL
    assert inner.lookups == 1


def test_remembered_existence_counts_against_the_byte_bound() -> None:
    inner = MemoryStore()
    ids = [inner.put("t", bytes([i])) for i in range(3)]
    cache = CachedKeyStore(inner, max_bytes=2 * PRESENCE_BYTES)
    for key_id in ids:
        assert cache.exists("t", key_id) is True
    stats = cache.stats()
    assert (stats.entries, stats.bytes, stats.evictions) == (2, 2 * PRESENCE_BYTES, 1)
    assert cache.exists_cached("t", ids[0]) is None  # the least recently used went first

    # A body too big to hold is not cached, but that it exists is.
    big = cache.put("t", b"x" * (2 * PRESENCE_BYTES + 1))
    assert cache.get_cached("t", big) is None
    lookups = inner.lookups
    assert cache.exists("t", big) is True
    assert inner.lookups == lookups

    nothing = CachedKeyStore(inner, max_bytes=0)  # the workers' setting: remembers nothing
    assert nothing.exists("t", ids[0]) is True
    assert nothing.exists_cached("t", ids[0]) is None
    assert nothing.stats().entries == 0


def test_exists_does_not_remember_a_key_deleted_during_the_lookup() -> None:
    inner = MemoryStore()
    key_id = inner.put("t", SMALL)
    cache = CachedKeyStore(inner, max_bytes=1 << 20)
    asking, release = threading.Event(), threading.Event()

    def slow() -> None:
        asking.set()
        release.wait(5)

    inner.before_read = slow
    result: list[bool] = []
    asker = threading.Thread(target=lambda: result.append(cache.exists("t", key_id)))
    asker.start()
    assert asking.wait(5)
    inner.before_read = lambda: None
    cache.delete("t", key_id)
    release.set()
    asker.join()
    assert result == [True]  # the lookup began before the delete
    assert cache.exists_cached("t", key_id) is None
    assert cache.exists("t", key_id) is False
