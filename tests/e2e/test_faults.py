"""Faults against real `heinfer serve` processes: dead workers, a killed service, a dead key
store, and more load than the service admits.

The invariants: an accepted request either succeeds or gets a clean 503 + Retry-After that the
client can retry; the service heals itself (worker pool, key store) without a restart; a crash
never leaves a partial key behind; nothing ever hangs.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

import heinfer
from heinfer.errors import HeinferError
from heinfer.plans.base import codec_for
from heinfer.plans.linear import LAYOUT_KIND
from heinfer.plans.manifest import Manifest
from heinfer.plans.wire import decode_keys

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Service:
    """`heinfer serve` on a loopback port, in its own session so that the whole service (the
    server and its workers) can be killed at once. Shared by the other e2e files of issue 4."""

    def __init__(
        self, args: list[str], *, env: dict[str, str] | None = None, wait: str = "ready",
        log_path: Path | None = None,
    ) -> None:
        self.args = args
        self.env = {**os.environ, **(env or {})}
        self.log_path = log_path
        self.start(wait)

    def start(self, wait: str = "ready") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "heinfer", "serve", *self.args, "--port", str(self.port)]
        if "--log-level" not in self.args:
            command += ["--log-level", "warning"]
        log = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115
        try:
            self.process = subprocess.Popen(
                command, env=self.env, start_new_session=True, stderr=log
            )
        finally:
            if log is not None:
                log.close()
        self.wait_for(f"/v2/health/{wait}")

    def wait_for(self, path: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"service exited with {self.process.returncode}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + path, timeout=15).status_code == 200:
                    return
            time.sleep(0.2)
        raise AssertionError(f"{path} never answered 200")

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill_all(self) -> None:
        """kill -9 the service and its workers (one process group)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=30)
        self.kill_all()  # and any worker left behind


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry))
    return found


def worker_pids(pid: int) -> list[int]:
    """The pool's worker processes: spawned children of the service (not its resource tracker)."""
    workers = []
    for child in _children(pid):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as fh:
                cmdline = fh.read()
        except OSError:
            continue
        if b"spawn_main" in cmdline:
            workers.append(child)
    return sorted(workers)


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    match = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
    assert match, name
    return float(match.group(1))


@pytest.fixture
def model_args(mnist_model_path: Path, tmp_path: Path) -> list[str]:
    return [str(mnist_model_path), "--key-store", str(tmp_path / "keys")]


# -- (a) a worker dies while requests are in flight ---------------------------------------------


def test_killed_worker_loses_no_request(
    model_args: list[str], mnist: dict[str, np.ndarray], mnist_model: heinfer.EncryptedModel
) -> None:
    service = Service([*model_args, "--workers", "2"])
    try:
        client = heinfer.Client(service.url, model="mnist")
        client.upload_keys()
        X = mnist["X_test"][:12]
        body = client.encrypt(X)
        expected = mnist_model.predict_plain(X)
        first: list[int] = []
        retries = [0]
        lock = threading.Lock()

        def send(n: int) -> None:
            with httpx.Client(base_url=service.url, timeout=120) as http:
                for _ in range(n):
                    for attempt in range(20):
                        response = http.post(
                            "/v2/models/mnist/infer", content=body,
                            headers={"X-Heinfer-Key-Id": client.key_id or ""},
                        )
                        with lock:
                            if attempt == 0:
                                first.append(response.status_code)
                            else:
                                retries[0] += 1
                        if response.status_code == 200:
                            scores = client.decrypt(response.content)
                            np.testing.assert_allclose(scores, expected, atol=1e-3)
                            break
                        assert response.status_code == 503, response.text
                        time.sleep(float(response.headers["Retry-After"]))
                    else:
                        raise AssertionError("never succeeded")

        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(send, 10) for _ in range(4)]
            deadline = time.monotonic() + 30  # the pool starts its workers on demand
            while len(before := worker_pids(service.pid)) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(before) == 2, before
            time.sleep(0.2)
            os.kill(before[0], signal.SIGKILL)  # one worker, mid-flight
            for future in futures:
                future.result(timeout=300)
        assert len(first) == 40 and set(first) <= {200, 503}, first
        print(f"first attempts: {sorted(collections.Counter(first).items())}, "
              f"retries after 503: {retries[0]}")
        service.wait_for("/v2/health/ready", timeout=60)
        after = worker_pids(service.pid)
        # only the killed worker is replaced; the other one kept its caches and kept serving
        assert len(after) == 2 and before[0] not in after and before[1] in after
        if hasattr(os, "SCHED_BATCH"):  # the replacement is a batch task, as the first were
            assert {os.sched_getscheduler(pid) for pid in after} == {os.SCHED_BATCH}
        assert metric(service.url, "heinfer_worker_restarts") >= 1
        # and again, both workers at once, while idle
        for pid in after:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        assert client.decrypt(client.infer(body)).shape == (12, 10)
        service.wait_for("/v2/health/ready", timeout=60)
        assert service.process.poll() is None
    finally:
        service.stop()


# -- (b) the whole service dies while keys are being uploaded ------------------------------------


def test_service_killed_during_uploads_leaves_no_partial_key(
    model_args: list[str], mnist: dict[str, np.ndarray], tmp_path: Path
) -> None:
    service = Service([*model_args, "--workers", "1"])
    key_dir = tmp_path / "keys"
    try:
        first = heinfer.Client(service.url, model="mnist")
        first.upload_keys()
        secret_file = first.save_secret(tmp_path / "secret.json")
        confirmed = {first.key_id}
        in_flight = 0
        for round_ in range(2):
            stop = threading.Event()
            failures: list[BaseException] = []

            def upload(url: str = service.url, stop: threading.Event = stop,
                       failures: list[BaseException] = failures) -> None:
                client = heinfer.Client(url, model="mnist")
                while not stop.is_set():
                    try:
                        key_id = client.upload_keys()  # a fresh public key each time
                    except (httpx.HTTPError, HeinferError) as exc:
                        failures.append(exc)
                        return
                    confirmed.add(key_id)

            threads = [threading.Thread(target=upload) for _ in range(3)]
            for thread in threads:
                thread.start()
            time.sleep(1.0 + 0.4 * round_)
            service.kill_all()
            stop.set()
            for thread in threads:
                thread.join(timeout=60)
            in_flight += sum(isinstance(f, httpx.TransportError) for f in failures)
            service.start()  # same --key-store directory
        assert in_flight >= 1, "no upload was cut off; the test proved nothing"
        listing = httpx.get(f"{service.url}/v2/keys").json()["keys"]
        assert confirmed <= set(listing), "an acknowledged upload was lost"
        for key_id in listing:
            data = httpx.get(f"{service.url}/v2/keys/{key_id}").content
            assert hashlib.sha256(data).hexdigest() == key_id
            decode_keys(data)
        on_disk = {p.name for p in (key_dir / "public").iterdir()}
        assert {n for n in on_disk if not n.startswith(".tmp-")} == set(listing)
        resumed = heinfer.Client(service.url, model="mnist")
        resumed.load_secret(secret_file)
        assert resumed.predict(mnist["X_test"][:2]).shape == (2, 10)
    finally:
        service.stop()


# -- (c) the key store is unreachable ------------------------------------------------------------


def _store_env(kind: str, port: int) -> tuple[str, dict[str, str]]:
    if kind == "s3":
        return "s3://heinfer-keys", {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": "dummy", "AWS_SECRET_ACCESS_KEY": "dummy",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }
    account_key = "ZHVtbXkta2V5LWZvci1hLWRlYWQtcG9ydA=="
    return "azure://heinfer-keys", {
        "AZURE_STORAGE_CONNECTION_STRING": (
            f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={account_key};"
            f"BlobEndpoint=http://127.0.0.1:{port}/devstoreaccount1;"
        )
    }


def _valid_payloads(url: str, X: np.ndarray) -> tuple[bytes, bytes]:
    """A key upload and a request body for the served model, made from its manifest alone."""
    manifest = Manifest.from_dict(httpx.get(f"{url}/v2/models/mnist/manifest").json())
    codec = codec_for(manifest)
    secret = codec.keygen()
    return codec.key_upload(secret), codec.encrypt(secret, X, LAYOUT_KIND)


def _ready_after_cache(url: str) -> httpx.Response:
    """The readiness answer once the probe cached before the outage has expired (it is reused
    for ServiceSettings.ready_cache_seconds, 2 s by default)."""
    deadline = time.monotonic() + 8
    while True:
        response = httpx.get(f"{url}/v2/health/ready", timeout=30)
        if response.status_code != 200 or time.monotonic() > deadline:
            return response
        time.sleep(0.25)


def _assert_unavailable(response: httpx.Response, started: float) -> None:
    assert response.status_code == 503, response.text
    assert int(response.headers["Retry-After"]) >= 1
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("kind", ["s3", "azure"])
def test_dead_key_store_is_503_with_retry_after(
    kind: str, mnist_model_path: Path, mnist: dict[str, np.ndarray]
) -> None:
    url, env = _store_env(kind, free_port())  # nothing listens there
    service = Service(
        [str(mnist_model_path), "--workers", "1", "--key-store", url], env=env, wait="live"
    )
    try:
        started = time.monotonic()
        ready = httpx.get(f"{service.url}/v2/health/ready", timeout=30)
        _assert_unavailable(ready, started)
        assert ready.json() == {"ready": False, "workers": True, "key_store": False}
        keys, body = _valid_payloads(service.url, mnist["X_test"][:1])
        started = time.monotonic()
        upload = httpx.post(f"{service.url}/v2/keys", params={"model": "mnist"}, content=keys,
                            timeout=30)
        _assert_unavailable(upload, started)
        assert upload.json()["error"] == "key_store_unavailable"
        started = time.monotonic()
        infer = httpx.post(
            f"{service.url}/v2/models/mnist/infer", content=body, timeout=30,
            headers={"X-Heinfer-Key-Id": hashlib.sha256(keys).hexdigest()},
        )
        _assert_unavailable(infer, started)
        started = time.monotonic()
        _assert_unavailable(httpx.get(f"{service.url}/v2/keys", timeout=30), started)
        assert service.process.poll() is None
        assert httpx.get(f"{service.url}/v2/health/live").status_code == 200
    finally:
        service.stop()


@pytest.mark.azure
def test_key_store_outage_heals_without_restart(
    azurite: object, mnist_model_path: Path, mnist: dict[str, np.ndarray]
) -> None:
    storage = pytest.importorskip("storage_fixtures")
    conn = azurite.connection_string  # type: ignore[attr-defined]
    with storage.TcpProxy(azurite.port) as proxy:  # type: ignore[attr-defined]
        env = {"AZURE_STORAGE_CONNECTION_STRING": azurite.with_port(proxy.port)}  # type: ignore[attr-defined]
        assert conn != env["AZURE_STORAGE_CONNECTION_STRING"]
        service = Service(
            [str(mnist_model_path), "--workers", "1",
             "--key-store", f"azure://{storage.unique_store_name()}"], env=env,
        )
        try:
            client = heinfer.Client(service.url, model="mnist")
            client.upload_keys()
            assert client.predict(mnist["X_test"][:1]).shape == (1, 10)
            proxy.stop()  # the store vanishes
            started = time.monotonic()
            _assert_unavailable(_ready_after_cache(service.url), started)
            other = heinfer.Client(service.url, model="mnist")
            keys, _ = _valid_payloads(service.url, mnist["X_test"][:1])
            started = time.monotonic()
            _assert_unavailable(
                httpx.post(f"{service.url}/v2/keys", params={"model": "mnist"}, content=keys,
                           timeout=30), started,
            )
            started = time.monotonic()
            _assert_unavailable(httpx.get(f"{service.url}/v2/keys", timeout=30), started)
            proxy.start()  # ... and comes back: no restart of the service
            service.wait_for("/v2/health/ready", timeout=30)
            other.upload_keys()
            assert other.predict(mnist["X_test"][:1]).shape == (1, 10)
            assert client.key_id in httpx.get(f"{service.url}/v2/keys").json()["keys"]
        finally:
            service.stop()


# -- overload: fail fast instead of queueing forever ---------------------------------------------


def test_excess_load_fails_fast_with_503(
    model_args: list[str], mnist: dict[str, np.ndarray]
) -> None:
    service = Service([*model_args, "--workers", "1", "--max-concurrent-requests", "1",
                       "--max-queued-requests", "1"])
    try:
        client = heinfer.Client(service.url, model="mnist")
        client.upload_keys()
        body = client.encrypt(mnist["X_test"][:64])  # ~0.5 s of evaluation per request
        barrier = threading.Barrier(8)

        def send(_: int) -> tuple[int, float, str | None]:
            with httpx.Client(timeout=120) as http:
                barrier.wait()
                started = time.monotonic()
                response = http.post(
                    f"{service.url}/v2/models/mnist/infer", content=body,
                    headers={"X-Heinfer-Key-Id": client.key_id or ""},
                )
                return (response.status_code, time.monotonic() - started,
                        response.headers.get("Retry-After"))

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(send, range(8)))
        statuses = [status for status, _, _ in results]
        assert set(statuses) == {200, 503}, results
        assert statuses.count(200) >= 2
        for status, seconds, retry_after in results:
            if status == 503:
                assert retry_after is not None and seconds < 1.0, results
        assert metric(service.url, 'heinfer_rejected_total{reason="busy"}') >= 1
        assert client.predict(mnist["X_test"][:1]).shape == (1, 10)
    finally:
        service.stop()


def test_queue_timeout_is_503(model_args: list[str], mnist: dict[str, np.ndarray]) -> None:
    service = Service([*model_args, "--workers", "1", "--max-concurrent-requests", "1",
                       "--max-queued-requests", "4", "--queue-timeout", "0.2"])
    try:
        client = heinfer.Client(service.url, model="mnist")
        client.upload_keys()
        body = client.encrypt(mnist["X_test"][:128])  # ~1 s per request

        def send(_: int) -> int:
            return httpx.post(
                f"{service.url}/v2/models/mnist/infer", content=body, timeout=120,
                headers={"X-Heinfer-Key-Id": client.key_id or ""},
            ).status_code

        with ThreadPoolExecutor(3) as pool:
            statuses = list(pool.map(send, range(3)))
        assert 200 in statuses and 503 in statuses, statuses
        assert metric(service.url, 'heinfer_rejected_total{reason="queue_timeout"}') >= 1
    finally:
        service.stop()


@contextlib.contextmanager
def _partial_infer(url: str, key_id: str, body: bytes) -> Iterator[socket.socket]:
    """An inference request whose headers announce all of `body` but that sends 1,000 bytes
    of it and then stalls (a slow sender), on a raw socket closed on exit."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as slow:
        slow.sendall(
            f"POST /v2/models/mnist/infer HTTP/1.1\r\nHost: {host}\r\n"
            f"X-Heinfer-Key-Id: {key_id}\r\nContent-Length: {len(body)}\r\n\r\n"
            .encode() + body[:1000]
        )
        yield slow


def test_large_bodies_in_flight_are_bounded_in_bytes(
    model_args: list[str], mnist: dict[str, np.ndarray]
) -> None:
    """A slow sender holding a large body reserves its size; the next large body that would
    pass the in-flight budget gets 503 + Retry-After at once, and the budget is released."""
    service = Service([*model_args, "--workers", "1"],
                      env={"HEINFER_MAX_INFLIGHT_BODY_BYTES": str(150_000)})
    try:
        client = heinfer.Client(service.url, model="mnist")
        client.upload_keys()
        body = client.encrypt(mnist["X_test"][:2])  # ~93 KB
        with _partial_infer(service.url, client.key_id or "", body):
            deadline = time.monotonic() + 30
            while metric(service.url, "heinfer_requests_admitted") < 1:
                assert time.monotonic() < deadline, "the slow request was never admitted"
                time.sleep(0.05)
            refused = httpx.post(
                f"{service.url}/v2/models/mnist/infer", content=body, timeout=60,
                headers={"X-Heinfer-Key-Id": client.key_id or ""},
            )
            assert refused.status_code == 503 and refused.headers.get("Retry-After"), refused.text
            assert "retry" in refused.json()["message"]
            small = client.predict(mnist["X_test"][:1])  # 46 KB still fits beside it
            assert small.shape == (1, 10)
        deadline = time.monotonic() + 30
        while metric(service.url, "heinfer_requests_admitted") > 0:
            assert time.monotonic() < deadline, "the abandoned request kept its reservation"
            time.sleep(0.05)
        assert client.decrypt(client.infer(body)).shape == (2, 10)
        assert metric(service.url, 'heinfer_rejected_total{reason="memory"}') >= 1
    finally:
        service.stop()


def test_slow_body_is_408_and_slow_evaluation_is_503(
    model_args: list[str], mnist: dict[str, np.ndarray]
) -> None:
    service = Service([*model_args, "--workers", "1"],
                      env={"HEINFER_BODY_TIMEOUT_SECONDS": "1",
                           "HEINFER_EVALUATION_TIMEOUT_SECONDS": "0.05"})
    try:
        client = heinfer.Client(service.url, model="mnist")
        client.upload_keys()
        body = client.encrypt(mnist["X_test"][:64])  # ~0.4 s of evaluation: past 0.05 s
        with _partial_infer(service.url, client.key_id or "", body) as slow:
            answer = slow.recv(65536)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        slow_eval = httpx.post(
            f"{service.url}/v2/models/mnist/infer", content=body, timeout=60,
            headers={"X-Heinfer-Key-Id": client.key_id or ""},
        )
        assert slow_eval.status_code == 503 and slow_eval.headers.get("Retry-After")
        assert "too long" in slow_eval.json()["message"]
    finally:
        service.stop()
