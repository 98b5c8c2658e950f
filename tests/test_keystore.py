"""Key store contract, run against a directory, Azurite and a real Ceph radosgw.

The same behavioural tests run on every backend because the service must not care which one
it is configured with; backend-specific tests cover what only that backend can get wrong
(file atomicity and permissions, SDK auth and network failure mapping). The cache's own
bookkeeping is tested over an in-memory store in test_keystore_cache.py.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from heinfer.errors import BadInputError, KeyNotFoundError, StoreUnavailableError
from heinfer.server.keystore import (
    AzureKeyStore,
    CachedKeyStore,
    FileKeyStore,
    KeyStore,
    KeyStoreConfigError,
    S3KeyStore,
    key_id_for,
    open_key_store,
)
from storage_fixtures import (
    AzuriteServer,
    S3Server,
    TcpProxy,
    free_port,
    s3_client,
    set_azure_env,
    set_s3_env,
    start_azurite,
    stop_azurite,
    unique_store_name,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
KEY = os.urandom(3 << 20)  # evaluation-key sized: exercises multi-chunk writes and uploads
SMALL = b"public key material \x00\x01\x02"


def backend(url: str) -> KeyStore:
    """The store without its cache, so every call really reaches the backend."""
    store = open_key_store(url)
    assert isinstance(store, CachedKeyStore)
    return store.inner


@pytest.fixture
def store(key_store_url: str) -> Iterator[KeyStore]:
    s = backend(key_store_url)
    yield s
    s.close()


def raw_overwrite(url: str, tenant: str, key_id: str, data: bytes) -> None:
    """Replace a stored key's bytes behind the store's back (simulated corruption)."""
    kind, _, name = url.partition("://")
    if kind == "file":
        (Path(name) / tenant / key_id).write_bytes(data)
    elif kind == "azure":
        from azure.storage.blob import BlobServiceClient

        conn = os.environ["AZURE_STORAGE_CONNECTION_STRING"]
        with BlobServiceClient.from_connection_string(conn) as svc:
            svc.get_blob_client(name, f"{tenant}/{key_id}").upload_blob(data, overwrite=True)
    else:
        server = S3Server(
            os.environ["AWS_ENDPOINT_URL"],
            os.environ["AWS_ACCESS_KEY_ID"],
            os.environ["AWS_SECRET_ACCESS_KEY"],
        )
        s3_client(server).put_object(Bucket=name, Key=f"{tenant}/{key_id}", Body=data)


# ------------------------------------------------------------------------------------------
# The contract, on every backend
# ------------------------------------------------------------------------------------------


def test_put_get_list_usage_delete(store: KeyStore) -> None:
    assert store.list_keys("alice") == []
    assert store.usage("alice") == (0, 0)

    key_id = store.put("alice", KEY)
    assert key_id == key_id_for(KEY) == hashlib.sha256(KEY).hexdigest()
    assert store.get("alice", key_id) == KEY
    small_id = store.put("alice", SMALL)
    assert store.list_keys("alice") == sorted([key_id, small_id])
    assert store.usage("alice") == (2, len(KEY) + len(SMALL))

    store.delete("alice", key_id)
    with pytest.raises(KeyNotFoundError):
        store.get("alice", key_id)
    with pytest.raises(KeyNotFoundError):
        store.delete("alice", key_id)
    assert store.list_keys("alice") == [small_id]
    assert store.usage("alice") == (1, len(SMALL))
    store.check()


def test_put_is_idempotent_and_content_addressed(store: KeyStore) -> None:
    first = store.put("alice", SMALL)
    assert store.put("alice", bytes(SMALL)) == first
    assert store.list_keys("alice") == [first]
    assert store.usage("alice") == (1, len(SMALL))
    other = store.put("alice", SMALL + b"!")
    assert other != first
    assert store.get("alice", other) == SMALL + b"!"


def test_tenants_are_isolated(store: KeyStore) -> None:
    key_id = store.put("alice", SMALL)
    with pytest.raises(KeyNotFoundError):
        store.get("bob", key_id)
    with pytest.raises(KeyNotFoundError):
        store.delete("bob", key_id)
    assert store.list_keys("bob") == []
    assert store.usage("bob") == (0, 0)
    assert store.get("alice", key_id) == SMALL  # bob's delete did not touch it

    # The same bytes uploaded by both are two independent keys with the same id.
    assert store.put("bob", SMALL) == key_id
    store.delete("bob", key_id)
    assert store.get("alice", key_id) == SMALL
    # A tenant whose name is a prefix of another's sees nothing of it.
    store.put("alice-2", b"other")
    assert store.list_keys("alice") == [key_id]


BAD_IDS = [
    "",
    "../x",
    "..",
    "/etc/passwd",
    "0" * 63,
    "0" * 65,
    "A" * 64,
    "0" * 64 + "\n",
    "../bob/" + "0" * 64,
    "0" * 32 + "/" + "0" * 31,
    ".tmp-" + "0" * 64,
]
BAD_TENANTS = ["", "../x", "..", ".", "a/b", "Alice", "-a", "_a", "a" * 65, "a\n", "a b", "ä"]


def test_invalid_key_ids_are_not_found(store: KeyStore) -> None:
    store.put("alice", SMALL)
    for bad in BAD_IDS:
        with pytest.raises(KeyNotFoundError):
            store.get("alice", bad)
        with pytest.raises(KeyNotFoundError):
            store.delete("alice", bad)
    assert store.list_keys("alice") == [key_id_for(SMALL)]


def test_invalid_tenants_are_rejected(store: KeyStore) -> None:
    good_id = store.put("alice", SMALL)
    for bad in BAD_TENANTS:
        with pytest.raises(BadInputError):
            store.put(bad, SMALL)
        with pytest.raises(BadInputError):
            store.get(bad, good_id)
        with pytest.raises(BadInputError):
            store.delete(bad, good_id)
        with pytest.raises(BadInputError):
            store.list_keys(bad)
        with pytest.raises(BadInputError):
            store.usage(bad)
    assert store.list_keys("alice") == [good_id]
    for ok in ("a", "0", "a" * 64, "tenant_1-b"):
        assert store.put(ok, SMALL) == good_id


def test_exists_is_scoped_like_get_and_reads_no_body(store: KeyStore, key_store_url: str) -> None:
    key_id = key_id_for(SMALL)
    assert store.exists("alice", key_id) is False  # nothing stored yet (no container or bucket)
    assert store.put("alice", SMALL) == key_id
    assert store.exists("alice", key_id) is True
    # Another tenant's id is absent, whatever the name looks like.
    for other in ("bob", "alic", "alice-2", "alice_"):
        assert store.exists(other, key_id) is False
    assert store.put("bob", KEY) == key_id_for(KEY)
    assert store.exists("alice", key_id_for(KEY)) is False
    assert store.exists("bob", key_id_for(KEY)) is True
    # Malformed ids name nothing; invalid tenants are a bad request, as for get.
    for bad in BAD_IDS:
        assert store.exists("alice", bad) is False
    for bad_tenant in BAD_TENANTS:
        with pytest.raises(BadInputError):
            store.exists(bad_tenant, key_id)
    # The body is not downloaded, so not verified either: a corrupt copy exists, get refuses it.
    raw_overwrite(key_store_url, "alice", key_id, b"tampered")
    assert store.exists("alice", key_id) is True
    with pytest.raises(KeyNotFoundError):
        store.get("alice", key_id)
    store.delete("alice", key_id)
    assert store.exists("alice", key_id) is False
    assert store.exists("bob", key_id_for(KEY)) is True


def test_corrupt_key_reads_as_missing_and_put_repairs_it(
    store: KeyStore, key_store_url: str
) -> None:
    key_id = store.put("alice", SMALL)
    raw_overwrite(key_store_url, "alice", key_id, b"tampered")
    with pytest.raises(KeyNotFoundError):
        store.get("alice", key_id)
    assert store.put("alice", SMALL) == key_id
    assert store.get("alice", key_id) == SMALL


def test_overwrite_never_exposes_a_missing_or_partial_key(store: KeyStore) -> None:
    """Re-uploading an existing key (idempotent put) must be invisible to concurrent readers."""
    data = os.urandom(1 << 20)
    key_id = store.put("alice", data)
    failures: list[BaseException] = []
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            try:
                assert store.get("alice", key_id) == data
            except BaseException as exc:
                failures.append(exc)
                return

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for _ in range(8):
            store.put("alice", data)
    finally:
        done.set()
        for t in threads:
            t.join()
    assert failures == []


def test_replicas_share_the_backend(key_store_url: str) -> None:
    """Two service replicas (two store objects) over one backend see each other's writes;
    a delete on one replica reaches the other's cache at the latest after the TTL."""
    now = [0.0]
    a = CachedKeyStore(backend(key_store_url), 1 << 20, ttl_seconds=30, clock=lambda: now[0])
    b = CachedKeyStore(backend(key_store_url), 1 << 20, ttl_seconds=30, clock=lambda: now[0])
    key_id = a.put("alice", SMALL)
    assert b.get("alice", key_id) == SMALL
    assert b.list_keys("alice") == [key_id]
    b.delete("alice", key_id)
    assert a.list_keys("alice") == []
    assert a.get("alice", key_id) == SMALL  # a's cached copy, within the TTL
    now[0] += 31
    with pytest.raises(KeyNotFoundError):
        a.get("alice", key_id)
    with pytest.raises(KeyNotFoundError):
        b.get("alice", key_id)


def test_cached_exists_across_replicas(key_store_url: str) -> None:
    """The HTTP process's check: a "yes" is remembered without the body for the TTL, a "no"
    never (a key uploaded through another replica is usable at once), a delete forgets."""
    now = [0.0]
    a = CachedKeyStore(backend(key_store_url), 1 << 20, ttl_seconds=30, clock=lambda: now[0])
    b = CachedKeyStore(backend(key_store_url), 1 << 20, ttl_seconds=30, clock=lambda: now[0])
    key_id = key_id_for(KEY)
    assert a.exists("alice", key_id) is False
    assert b.put("alice", KEY) == key_id
    assert a.exists_cached("alice", key_id) is None  # the "no" was not remembered
    assert a.exists("alice", key_id) is True
    assert a.exists("bob", key_id) is False
    assert a.exists_cached("alice", key_id) is True
    assert a.get_cached("alice", key_id) is None  # the key's bytes were not downloaded
    assert a.stats().bytes < len(KEY)

    b.delete("alice", key_id)
    now[0] += 30
    assert a.exists("alice", key_id) is True  # a's answer, within the TTL
    now[0] += 1
    assert a.exists("alice", key_id) is False

    a.put("alice", SMALL)
    assert b.exists("alice", key_id_for(SMALL)) is True
    a.delete("alice", key_id_for(SMALL))  # a delete through this instance forgets at once
    assert a.exists("alice", key_id_for(SMALL)) is False
    assert b.exists("alice", key_id_for(SMALL)) is True  # b's answer, within the TTL
    now[0] += 31
    assert b.exists("alice", key_id_for(SMALL)) is False


def test_open_key_store_wraps_in_cache(key_store_url: str) -> None:
    store = open_key_store(key_store_url, cache_bytes=1 << 20)
    assert isinstance(store, CachedKeyStore)
    key_id = store.put("alice", SMALL)
    assert store.get("alice", key_id) == SMALL
    assert store.stats().hits == 1
    assert store.stats().misses == 0


# ------------------------------------------------------------------------------------------
# File backend
# ------------------------------------------------------------------------------------------


def test_file_modes_and_layout(tmp_path: Path) -> None:
    store = FileKeyStore(tmp_path / "keys")
    key_id = store.put("alice", SMALL)
    path = tmp_path / "keys" / "alice" / key_id
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert sorted(p.name for p in path.parent.iterdir()) == [key_id]  # no temp file left


def test_file_temp_files_are_invisible_and_swept(tmp_path: Path) -> None:
    root = tmp_path / "keys"
    store = FileKeyStore(root)
    key_id = key_id_for(SMALL)
    (root / "alice").mkdir(mode=0o700)
    leftover = root / "alice" / f".tmp-{key_id}-deadbeef"
    leftover.write_bytes(SMALL[:5])
    assert store.list_keys("alice") == []
    assert store.usage("alice") == (0, 0)
    with pytest.raises(KeyNotFoundError):
        store.get("alice", key_id)

    FileKeyStore(root)  # a young temp file may be another replica's write in progress
    assert leftover.exists()
    old = time.time() - 3600
    os.utime(leftover, (old, old))
    FileKeyStore(root)
    assert not leftover.exists()


def test_file_ignores_symlinks_and_stray_files(tmp_path: Path) -> None:
    root = tmp_path / "keys"
    store = FileKeyStore(root)
    secret = tmp_path / "outside"
    secret.write_bytes(SMALL)
    (root / "alice").mkdir(mode=0o700)
    (root / "alice" / key_id_for(SMALL)).symlink_to(secret)
    (root / "alice" / "README").write_text("not a key")
    (root / "alice" / key_id_for(b"x")).mkdir()
    for key_id in (key_id_for(SMALL), key_id_for(b"x")):
        with pytest.raises(KeyNotFoundError):
            store.get("alice", key_id)
        assert store.exists("alice", key_id) is False
    assert store.list_keys("alice") == []


def test_file_path_traversal_writes_nothing_outside(tmp_path: Path) -> None:
    root = tmp_path / "root" / "keys"
    store = FileKeyStore(root)
    for bad in ("../x", "..", "../../etc"):
        with pytest.raises(BadInputError):
            store.put(bad, SMALL)
    with pytest.raises(KeyNotFoundError):
        store.get("alice", "../../outside")
    assert sorted(p.name for p in (tmp_path / "root").iterdir()) == ["keys"]
    assert list(root.iterdir()) == []


_SLOW_WRITER = """
import os, sys, time
from heinfer.server import keystore

real_write = os.write

def write_then_hang(fd, data):
    n = real_write(fd, data)
    print("WRITING", flush=True)
    time.sleep(60)
    return n

data = os.urandom(3 << 20)
print(keystore.key_id_for(data), flush=True)
os.write = write_then_hang
keystore.FileKeyStore(sys.argv[1]).put("alice", data)
"""


def test_file_writer_killed_mid_write_leaves_no_visible_key(tmp_path: Path) -> None:
    root = tmp_path / "keys"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "src"), *sys.path])}
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_WRITER, str(root)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        key_id = proc.stdout.readline().strip()
        assert proc.stdout.readline().strip() == "WRITING"
        store = FileKeyStore(root)  # a reader while the writer is mid-write
        assert store.list_keys("alice") == []
        with pytest.raises(KeyNotFoundError):
            store.get("alice", key_id)
    finally:
        proc.kill()  # SIGKILL: no cleanup handlers run
        proc.wait()

    partial = list((root / "alice").iterdir())
    assert len(partial) == 1 and partial[0].name.startswith(".tmp-")
    assert 0 < partial[0].stat().st_size < 3 << 20
    store = FileKeyStore(root)
    assert store.list_keys("alice") == []
    assert store.usage("alice") == (0, 0)
    with pytest.raises(KeyNotFoundError):
        store.get("alice", key_id)
    assert store.sweep_temp_files(0) == 1
    assert list((root / "alice").iterdir()) == []


def test_file_store_unavailable_when_directory_unusable(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    store = FileKeyStore(blocker / "keys")  # constructing must not fail: volume may appear later
    with pytest.raises(StoreUnavailableError):
        store.check()
    with pytest.raises(StoreUnavailableError):
        store.put("alice", SMALL)
    blocker.unlink()
    store.check()  # recovers without a new store object
    assert store.get("alice", store.put("alice", SMALL)) == SMALL


# ------------------------------------------------------------------------------------------
# URL parsing and configuration
# ------------------------------------------------------------------------------------------


def test_open_key_store_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(backend(str(tmp_path / "a")), FileKeyStore)
    assert isinstance(backend((tmp_path / "b").as_uri()), FileKeyStore)
    assert isinstance(backend(f"file://localhost{tmp_path / 'c'}"), FileKeyStore)
    for bad in (
        "file://relative/dir",
        "ftp://host/x",
        "",
        "azure://",
        "azure://Bad_Name",
        "s3://bucket/extra",
        "s3://b",
        "azure://name?x=1",
    ):
        with pytest.raises(KeyStoreConfigError):
            open_key_store(bad)

    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING", raising=False)
    monkeypatch.delenv("AZURE_STORAGE_ACCOUNT_URL", raising=False)
    with pytest.raises(KeyStoreConfigError, match="AZURE_STORAGE_CONNECTION_STRING"):
        open_key_store("azure://keys")
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", "AccountKey=hunter2;garbage")
    with pytest.raises(KeyStoreConfigError) as info:
        open_key_store("azure://keys")
    assert "hunter2" not in str(info.value)


# ------------------------------------------------------------------------------------------
# Azure / S3: failures and recovery against the real servers
# ------------------------------------------------------------------------------------------


def _expect_unavailable(call: Callable[[], object], within: float) -> StoreUnavailableError:
    start = time.monotonic()
    with pytest.raises(StoreUnavailableError) as info:
        call()
    assert time.monotonic() - start < within
    return info.value


def _all_ops_unavailable(store: KeyStore, within: float) -> None:
    some_id = key_id_for(SMALL)
    for call in (
        store.check,
        lambda: store.put("alice", SMALL),
        lambda: store.get("alice", some_id),
        lambda: store.exists("alice", some_id),
        lambda: store.delete("alice", some_id),
        lambda: store.list_keys("alice"),
        lambda: store.usage("alice"),
    ):
        _expect_unavailable(call, within)


@pytest.fixture
def azure_env(azurite: AzuriteServer, monkeypatch: pytest.MonkeyPatch) -> AzuriteServer:
    set_azure_env(monkeypatch, azurite.connection_string)
    return azurite


@pytest.fixture
def s3_env(radosgw: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    set_s3_env(monkeypatch, radosgw)
    return radosgw


@pytest.mark.azure
def test_azure_dead_port_fails_fast(
    azure_env: AzuriteServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_azure_env(monkeypatch, azure_env.with_port(free_port()))
    _all_ops_unavailable(AzureKeyStore(unique_store_name()), within=3.0)


@pytest.mark.s3
def test_s3_dead_port_fails_fast(s3_env: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    set_s3_env(monkeypatch, s3_env, endpoint=s3_env.with_port(free_port()))
    _all_ops_unavailable(S3KeyStore(unique_store_name()), within=3.0)


@pytest.fixture
def hung_port() -> Iterator[int]:
    """A port that accepts TCP connections (kernel backlog) but never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield int(sock.getsockname()[1])


@pytest.mark.azure
def test_azure_hung_server_times_out(
    azure_env: AzuriteServer, hung_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_azure_env(monkeypatch, azure_env.with_port(hung_port))
    store = AzureKeyStore(unique_store_name(), read_timeout=0.3)
    _expect_unavailable(lambda: store.get("alice", key_id_for(SMALL)), within=3.0)
    _expect_unavailable(lambda: store.exists("alice", key_id_for(SMALL)), within=3.0)


@pytest.mark.s3
def test_s3_hung_server_times_out(
    s3_env: S3Server, hung_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_s3_env(monkeypatch, s3_env, endpoint=s3_env.with_port(hung_port))
    store = S3KeyStore(unique_store_name(), read_timeout=0.3)
    _expect_unavailable(lambda: store.get("alice", key_id_for(SMALL)), within=3.0)
    _expect_unavailable(lambda: store.exists("alice", key_id_for(SMALL)), within=3.0)


def _outage_and_recovery(store: KeyStore, proxy: TcpProxy) -> None:
    key_id = store.put("alice", SMALL)
    assert store.get("alice", key_id) == SMALL  # leaves a pooled keep-alive connection
    proxy.stop()
    _all_ops_unavailable(store, within=3.0)
    proxy.start()
    # Same store object: the dead pooled connection is replaced transparently.
    store.check()
    assert store.get("alice", key_id) == SMALL
    assert store.exists("alice", key_id) is True
    assert store.list_keys("alice") == [key_id]


@pytest.mark.azure
def test_azure_outage_and_recovery(
    azure_env: AzuriteServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    with TcpProxy(azure_env.port) as proxy:
        set_azure_env(monkeypatch, azure_env.with_port(proxy.port))
        _outage_and_recovery(AzureKeyStore(unique_store_name()), proxy)


@pytest.mark.s3
def test_s3_outage_and_recovery(s3_env: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    with TcpProxy(s3_env.port) as proxy:
        set_s3_env(monkeypatch, s3_env, endpoint=s3_env.with_port(proxy.port))
        _outage_and_recovery(S3KeyStore(unique_store_name()), proxy)


@pytest.mark.azure
def test_azurite_restart_recovers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stop the actual Azurite process and start it again (same port, persisted data)."""
    state = tmp_path / "azurite"
    server = start_azurite(state)
    try:
        set_azure_env(monkeypatch, server.connection_string)
        store = open_key_store(f"azure://{unique_store_name()}", cache_bytes=0)
        key_id = store.put("alice", SMALL)
        stop_azurite(state)
        _expect_unavailable(lambda: store.get("alice", key_id), within=3.0)
        _expect_unavailable(store.check, within=3.0)
        assert start_azurite(state).port == server.port
        store.check()
        assert store.get("alice", key_id) == SMALL
    finally:
        stop_azurite(state, wipe=True)


@pytest.mark.azure
def test_azure_wrong_account_key(
    azure_env: AzuriteServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "d3JvbmcgYWNjb3VudCBrZXkgd3JvbmcgYWNjb3VudCBrZXk="
    set_azure_env(monkeypatch, azure_env.with_account_key(wrong))
    store = AzureKeyStore(unique_store_name())
    with caplog.at_level(logging.DEBUG, logger="heinfer"):
        for call in (
            store.check,
            lambda: store.put("alice", SMALL),
            lambda: store.exists("alice", key_id_for(SMALL)),  # a HEAD, so no error body
        ):
            err = _expect_unavailable(call, within=3.0)
            assert "AZURE_STORAGE_CONNECTION_STRING" in err.message
            assert wrong not in err.message
    assert wrong not in caplog.text


@pytest.mark.s3
def test_s3_wrong_secret_key(
    s3_env: S3Server, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-" + s3_env.secret_key)
    store = S3KeyStore(unique_store_name())
    with caplog.at_level(logging.DEBUG, logger="heinfer"):
        for call in (
            store.check,
            lambda: store.put("alice", SMALL),
            lambda: store.exists("alice", key_id_for(SMALL)),  # a HEAD, so no error body
        ):
            err = _expect_unavailable(call, within=3.0)
            assert "AWS_SECRET_ACCESS_KEY" in err.message
            assert s3_env.secret_key not in err.message
    assert s3_env.secret_key not in caplog.text


@pytest.mark.azure
def test_azure_container_recreated_after_deletion(azure_env: AzuriteServer) -> None:
    from azure.storage.blob import BlobServiceClient

    name = unique_store_name()
    store = AzureKeyStore(name)
    store.put("alice", SMALL)
    with BlobServiceClient.from_connection_string(azure_env.connection_string) as svc:
        svc.delete_container(name)
    assert store.list_keys("alice") == []
    assert store.exists("alice", key_id_for(SMALL)) is False
    assert store.put("alice", SMALL) == key_id_for(SMALL)
    assert store.list_keys("alice") == [key_id_for(SMALL)]


@pytest.mark.s3
def test_s3_bucket_recreated_after_deletion(s3_env: S3Server) -> None:
    name = unique_store_name()
    store = S3KeyStore(name)
    key_id = store.put("alice", SMALL)
    client = s3_client(s3_env)
    client.delete_object(Bucket=name, Key=f"alice/{key_id}")
    client.delete_bucket(Bucket=name)
    assert store.list_keys("alice") == []
    with pytest.raises(KeyNotFoundError):
        store.get("alice", key_id)
    assert store.exists("alice", key_id) is False
    assert store.put("alice", SMALL) == key_id
    assert store.get("alice", key_id) == SMALL
