"""Real storage servers for key store tests (a pytest plugin; tests/conftest.py loads it).

The servers are the real thing, not mocks: Azurite (Microsoft's Blob Storage emulator, enforces
SharedKey signatures) and a throwaway Ceph radosgw (real S3 API and SigV4 checks), so the tests
exercise the actual SDK request paths, auth failures and network failures.

Environment:

    HEINFER_TEST_AZURITE_CONN    connection string of a running Azurite
    HEINFER_TEST_S3_ENDPOINT     http://127.0.0.1:PORT of a running radosgw
    HEINFER_TEST_S3_ACCESS_KEY   access key of an S3 user on it
    HEINFER_TEST_S3_SECRET_KEY   its secret key
    CI                           "true"/"1": a server that cannot be started fails the tests
                                 loudly instead of skipping them

.ci/run starts both servers once and exports those variables:

    .ci/services/azurite.sh install && .ci/services/radosgw.sh install
    eval "$(.ci/services/azurite.sh start)"; eval "$(.ci/services/radosgw.sh start)"

Without them, the session fixtures start private servers with the same scripts under a pytest
temp directory (free ports, so they never collide with a running instance) and stop them when
the session ends.

Fixtures: `azurite` and `radosgw` (session; connection details), `key_store_url` (a fresh,
empty store URL for each of "file", "azure", "s3", with the SDK environment variables set
through monkeypatch). Helpers for tests that need to break the network: `TcpProxy`,
`start_azurite` / `stop_azurite`, `free_port`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shlex
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVICES = REPO_ROOT / ".ci" / "services"

AZURITE_ENV = "HEINFER_TEST_AZURITE_CONN"
S3_ENDPOINT_ENV = "HEINFER_TEST_S3_ENDPOINT"
S3_ACCESS_KEY_ENV = "HEINFER_TEST_S3_ACCESS_KEY"
S3_SECRET_KEY_ENV = "HEINFER_TEST_S3_SECRET_KEY"

__all__ = [
    "AzuriteServer",
    "S3Server",
    "TcpProxy",
    "azurite",
    "free_port",
    "key_store_url",
    "radosgw",
    "start_azurite",
    "stop_azurite",
    "unique_store_name",
]


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def server_unavailable(reason: str) -> NoReturn:
    """Skip on a developer machine without the tooling; in CI a missing server is a failure."""
    if in_ci():
        pytest.fail(f"{reason} (CI is set, so this is an error, not a skip)", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def unique_store_name() -> str:
    """A container/bucket name valid for both Azure and S3, unique per test."""
    return f"heinfer-{uuid.uuid4().hex[:16]}"


def _parse_exports(text: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in text.splitlines():
        words = shlex.split(line)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            name, _, value = words[1].partition("=")
            found[name] = value
    return found


def run_service_script(script: str, action: str, env: dict[str, str]) -> dict[str, str]:
    """Run .ci/services/<script> <action>; returns the variables of its `export` lines."""
    command = [str(SERVICES / script), action]
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith("HEINFER_TEST_")}
    try:
        done = subprocess.run(
            command,
            env={**clean_env, **env},
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        server_unavailable(f"{script} {action} could not run: {exc}")
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-12:])
        server_unavailable(f"{script} {action} failed (exit {done.returncode}):\n{tail}")
    return _parse_exports(done.stdout)


# ------------------------------------------------------------------------------------------
# Azurite
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AzuriteServer:
    connection_string: str

    @property
    def blob_endpoint(self) -> str:
        for part in self.connection_string.split(";"):
            name, _, value = part.partition("=")
            if name == "BlobEndpoint":
                return value
        raise ValueError("connection string has no BlobEndpoint")

    @property
    def port(self) -> int:
        return int(self.blob_endpoint.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])

    def with_port(self, port: int) -> str:
        """The connection string pointed at another port (a proxy, a dead port)."""
        return self.connection_string.replace(f"127.0.0.1:{self.port}/", f"127.0.0.1:{port}/")

    def with_account_key(self, key: str) -> str:
        parts = self.connection_string.split(";")
        return ";".join(f"AccountKey={key}" if p.startswith("AccountKey=") else p for p in parts)


def start_azurite(state_dir: Path, **env: str) -> AzuriteServer:
    """Start (or restart, keeping data and port) a private Azurite whose state is `state_dir`;
    `env`: more knobs of azurite.sh (AZURITE_CERT and AZURITE_KEY: HTTPS and OAuth)."""
    found = run_service_script(
        "azurite.sh", "start", {"AZURITE_STATE_DIR": str(state_dir), **env}
    )
    if AZURITE_ENV not in found:
        server_unavailable(f"azurite.sh start printed no {AZURITE_ENV}")
    return AzuriteServer(found[AZURITE_ENV])


def stop_azurite(state_dir: Path, *, wipe: bool = False) -> None:
    args = "stop --wipe" if wipe else "stop"
    subprocess.run(
        [str(SERVICES / "azurite.sh"), *args.split()],
        env={**os.environ, "AZURITE_STATE_DIR": str(state_dir)},
        capture_output=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AzuriteServer]:
    conn = os.environ.get(AZURITE_ENV)
    if conn:
        yield AzuriteServer(conn)
        return
    state = tmp_path_factory.mktemp("azurite")
    try:
        yield start_azurite(state)
    finally:
        stop_azurite(state, wipe=True)


# ------------------------------------------------------------------------------------------
# Ceph radosgw
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str

    @property
    def port(self) -> int:
        return int(self.endpoint.rsplit(":", 1)[1].rstrip("/"))

    def with_port(self, port: int) -> str:
        return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def radosgw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    names = (S3_ENDPOINT_ENV, S3_ACCESS_KEY_ENV, S3_SECRET_KEY_ENV)
    if all(os.environ.get(n) for n in names):
        yield S3Server(*(os.environ[n] for n in names))
        return
    # Short path: the daemons' admin sockets must fit in sun_path (108 bytes).
    state = tmp_path_factory.mktemp("ceph")
    env = {"RADOSGW_STATE_DIR": str(state)}
    try:
        found = run_service_script("radosgw.sh", "start", env)
        if not all(n in found for n in names):
            server_unavailable("radosgw.sh start printed no S3 endpoint/keys")
        yield S3Server(*(found[n] for n in names))
    finally:
        subprocess.run(
            [str(SERVICES / "radosgw.sh"), "stop"],
            env={**os.environ, **env},
            capture_output=True,
            timeout=60,
            check=False,
        )


# ------------------------------------------------------------------------------------------
# Per-test stores
# ------------------------------------------------------------------------------------------


def set_azure_env(monkeypatch: pytest.MonkeyPatch, connection_string: str) -> None:
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", connection_string)


def set_s3_env(
    monkeypatch: pytest.MonkeyPatch, server: S3Server, *, endpoint: str | None = None
) -> None:
    """Point boto3 at `server` only: no profile, config file or instance metadata."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint or server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", server.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)


def _drop_azure_container(conn: str, name: str) -> None:
    from azure.storage.blob import BlobServiceClient

    with contextlib.suppress(Exception), BlobServiceClient.from_connection_string(conn) as svc:
        svc.delete_container(name)


def _drop_s3_bucket(server: S3Server, name: str) -> None:
    with contextlib.suppress(Exception):
        client = s3_client(server)
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
            for obj in page.get("Contents", []):
                client.delete_object(Bucket=name, Key=obj["Key"])
        client.delete_bucket(Bucket=name)


def s3_client(server: S3Server, *, endpoint: str | None = None) -> Any:
    """A plain boto3 client for tests that poke at the bucket behind the store's back."""
    return _s3_client(endpoint or server.endpoint, server.access_key, server.secret_key)


@functools.cache
def _s3_client(endpoint: str, access_key: str, secret_key: str) -> Any:
    # Cached: creating a boto3 client is slow (it parses the service model); clients are
    # thread-safe.
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name="us-east-1",
        config=Config(
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )


@pytest.fixture(
    params=[
        "file",
        pytest.param("azure", marks=pytest.mark.azure),
        pytest.param("s3", marks=pytest.mark.s3),
    ]
)
def key_store_url(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """A fresh, empty key store URL per backend, with the SDK environment configured."""
    kind: str = request.param
    if kind == "file":
        yield (tmp_path / "keys").as_uri()
        return
    name = unique_store_name()
    if kind == "azure":
        az: AzuriteServer = request.getfixturevalue("azurite")
        set_azure_env(monkeypatch, az.connection_string)
        yield f"azure://{name}"
        _drop_azure_container(az.connection_string, name)
    else:
        s3: S3Server = request.getfixturevalue("radosgw")
        set_s3_env(monkeypatch, s3)
        yield f"s3://{name}"
        _drop_s3_bucket(s3, name)


# ------------------------------------------------------------------------------------------
# Network fault injection
# ------------------------------------------------------------------------------------------


class TcpProxy:
    """A loopback TCP forwarder that can be stopped and restarted on the same port.

    Lets a test make a real server vanish and come back (connections refused, pooled
    connections reset) without touching the server other tests share.
    """

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self._target = (target_host, target_port)
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> TcpProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.05)
        self._listener = listener
        self._thread = threading.Thread(target=self._accept_loop, args=(listener,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        with self._lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def _accept_loop(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self._target, timeout=5)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            with self._lock:
                self._conns.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
