"""Hypothesis-driven hostile HTTP against a live `heinfer serve` with two tenants.

Random methods, paths, headers and bodies, and mutations of valid key uploads and requests,
plus malformed HTTP on raw sockets. Invariants: the status is always < 500, except 503 with
Retry-After and a documented error code; bob never gets a 2xx for alice's key; the service
stays up, no worker crashes, and a good request still decrypts correctly afterwards.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import struct
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_faults import Service

import heinfer
from test_fuzz_wire import mutated

pytestmark = pytest.mark.e2e

EXAMPLES = int(os.environ.get("HEINFER_FUZZ_EXAMPLES", "600"))
UNAVAILABLE_CODES = {"unavailable", "key_store_unavailable"}


@dataclass
class Target:
    url: str
    service: Service
    alice: heinfer.Client
    tokens: dict[str, str]
    alice_key: str
    request: bytes  # a valid request body under alice's key
    upload: bytes  # a valid key upload (not alice's bytes)
    X: np.ndarray
    expected: np.ndarray


def _token(tenant: str, auth_file: Path) -> str:
    return subprocess.run(
        [sys.executable, "-m", "heinfer", "token", "new", tenant, "--auth-file", str(auth_file)],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout.strip()


@pytest.fixture(scope="module")
def target(
    mnist_model_path: Path, tmp_path_factory: pytest.TempPathFactory,
    mnist: dict[str, np.ndarray], mnist_model: heinfer.EncryptedModel,
) -> Iterator[Target]:
    base = tmp_path_factory.mktemp("fuzz-http")
    auth = base / "tokens.json"
    tokens = {name: _token(name, auth) for name in ("alice", "bob")}
    service = Service(
        [str(mnist_model_path), "--workers", "1", "--key-store", str(base / "keys"),
         "--auth-file", str(auth), "--max-body-bytes", "2000000"],
        env={"HEINFER_MAX_KEY_BYTES": "200000"},
    )
    try:
        alice = heinfer.Client(service.url, model="mnist", token=tokens["alice"])
        alice.upload_keys()
        X = mnist["X_test"][:2]
        upload = alice.codec.key_upload(alice.codec.keygen())  # another key pair's upload
        yield Target(
            service.url, service, alice, tokens, alice.key_id or "", alice.encrypt(X), upload,
            X, mnist_model.predict_plain(X),
        )
    finally:
        service.stop()


def _check(response: httpx.Response, what: object) -> None:
    status = response.status_code
    if status >= 500:
        assert status == 503, (what, status, response.text[:300])
        assert response.headers.get("Retry-After"), what
        assert response.json()["error"] in UNAVAILABLE_CODES, (what, response.text[:300])
    if status not in (204, 304) and response.request.method != "HEAD" and status >= 400:
        body = response.json()  # every error is our JSON shape
        assert set(body) == {"error", "message"}, (what, body)


# -- strategies ---------------------------------------------------------------------------------

_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80)
_HEADER_TEXT = _TEXT.map(str.strip).filter(bool)
_SEGMENT = st.one_of(
    _TEXT.map(lambda s: urllib.parse.quote(s, safe="")),
    st.sampled_from(["..", "%2e%2e", "%00", "mnist%00", "a" * 300, "mnist/", "%2F", "."]),
    st.text(st.sampled_from("0123456789abcdef"), min_size=64, max_size=64),
)
_PATHS = st.one_of(
    st.sampled_from([
        "/v2/health/live", "/v2/health/ready", "/v2/models", "/v2/models/mnist",
        "/v2/models/mnist/infer", "/v2/keys", "/v2/keys?model=mnist", "/metrics", "/",
        "/openapi.json", "/docs", "/v2/keys/{alice}", "/v2/keys?model=mnist&model=x",
    ]),
    st.builds("/v2/models/{}".format, _SEGMENT),
    st.builds("/v2/models/{}/infer".format, _SEGMENT),
    st.builds("/v2/keys/{}".format, _SEGMENT),
    st.builds("/v2/keys?model={}".format, _SEGMENT),
    st.builds("/{}".format, _SEGMENT),
)
_METHODS = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])


@st.composite
def hostile(draw: st.DrawFn, t: Target) -> tuple[str, str, dict[str, str], bytes]:
    """Mostly well-aimed: real routes with real tokens and mutated real payloads."""
    scenario = draw(st.sampled_from(["infer"] * 4 + ["upload"] * 2 + ["keys", "random"]))
    if scenario == "infer":
        method, path = "POST", "/v2/models/mnist/infer"
        seeds = [t.request]
    elif scenario == "upload":
        method, path = "POST", "/v2/keys?model=mnist"
        seeds = [t.upload]
    elif scenario == "keys":
        method = draw(st.sampled_from(["GET", "DELETE", "HEAD", "POST"]))
        path = draw(st.sampled_from(["/v2/keys", "/v2/keys/{alice}", "/v2/keys/" + "0" * 64]))
        seeds = [t.upload, t.request]
    else:
        method, path = draw(_METHODS), draw(_PATHS)
        seeds = [t.request, t.upload]
    path = path.replace("{alice}", t.alice_key)
    headers: dict[str, str] = {}
    who = draw(st.sampled_from(["alice", "alice", "bob", "bob", "garbage", "none"]))
    if who in t.tokens:
        headers["Authorization"] = f"Bearer {t.tokens[who]}"
    elif who == "garbage":
        headers["Authorization"] = draw(_HEADER_TEXT)
    key = draw(st.sampled_from(["alice", "alice", "random", "text", "none"]))
    if key == "alice":
        headers["X-Heinfer-Key-Id"] = t.alice_key
    elif key == "random":
        headers["X-Heinfer-Key-Id"] = draw(st.text(st.sampled_from("0123456789abcdef"),
                                                   min_size=64, max_size=64))
    elif key == "text":
        headers["X-Heinfer-Key-Id"] = draw(_HEADER_TEXT)
    for name in draw(st.lists(st.sampled_from(
        ["Content-Type", "X-Request-Id", "Accept", "Content-Encoding", "Expect", "X-Forwarded-For"]
    ), max_size=2, unique=True)):
        headers[name] = draw(_HEADER_TEXT)
    if method == "DELETE" and who == "alice" and t.alice_key in path:
        headers["Authorization"] = f"Bearer {t.tokens['bob']}"  # alice keeps her key
    seed = draw(st.sampled_from(seeds))
    body = draw(st.one_of(
        mutated(seed), mutated(seed), mutated(seed),
        st.just(b""), st.binary(max_size=2048), st.just(seed),
        st.sampled_from([b"HEQ1", b"HEK1", seed * 2, seed[:-1]]),
    ))
    return method, path, headers, body


# -- the tests ----------------------------------------------------------------------------------


def test_hostile_http(target: Target) -> None:
    statuses: dict[int, int] = {}
    with httpx.Client(base_url=target.url, timeout=60) as http:

        @settings(
            max_examples=EXAMPLES, deadline=None, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(case=hostile(target))
        def run(case: tuple[str, str, dict[str, str], bytes]) -> None:
            method, path, headers, body = case
            try:
                response = http.request(method, path, headers=headers, content=body)
            except httpx.LocalProtocolError:
                return  # httpx refused to send it (not the server's business)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            what = (method, path, {k: v[:40] for k, v in headers.items()}, body[:40])
            _check(response, what)
            bob = headers.get("Authorization") == f"Bearer {target.tokens['bob']}"
            uses_alice_key = target.alice_key in path or (
                "/infer" in path and headers.get("X-Heinfer-Key-Id") == target.alice_key
            )
            if bob and uses_alice_key:
                assert response.status_code >= 400, ("bob reached alice's key", what)

        run()
    assert sum(statuses.values()) >= EXAMPLES // 2, statuses
    print("statuses:", dict(sorted(statuses.items())))
    _assert_still_serving(target)


_RAW_REQUESTS = [
    b"GARBAGE\r\n\r\n",
    b"GET / HTTP/9.9\r\n\r\n",
    b"GET /v2/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\n\r\n",
    b"POST /v2/keys?model=mnist HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"POST /v2/keys?model=mnist HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n"
    b"Content-Length: 20\r\n\r\n0123456789",
    b"POST /v2/keys?model=mnist HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
    b"Content-Length: 5\r\n\r\nzz\r\n",
    b"POST /v2/keys?model=mnist HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"fffffffffffffff\r\nabc\r\n",
    b"POST /v2/models/mnist/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999999\r\n\r\n",
    b"POST /v2/models/mnist/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nHEQ1",
    b"GET /v2/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n",
    b"GET /v2/models HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(5000)) + b"\r\n",
    b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n" * 50,
    b"GET /%00%ff/../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64),  # a TLS ClientHello
    b"",
]


def _raw(port: int, payload: bytes) -> list[int]:
    """Send bytes, half-close, collect the status codes of whatever comes back."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        received = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                received += chunk
    return [int(s) for s in re.findall(rb"HTTP/1\.[01] (\d{3}) ", received)]


def test_malformed_http_on_raw_sockets(target: Target) -> None:
    port = int(target.url.rsplit(":", 1)[1])
    for payload in _RAW_REQUESTS:
        started = time.monotonic()
        statuses = _raw(port, payload)
        assert time.monotonic() - started < 10, payload[:60]
        assert all(s < 500 or s == 503 for s in statuses), (payload[:60], statuses)
    _assert_still_serving(target)


def test_half_open_and_slow_clients_do_not_block(target: Target) -> None:
    """Connections that send half a request and stall do not stop other clients."""
    port = int(target.url.rsplit(":", 1)[1])
    stalled = []
    try:
        for _ in range(20):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(b"POST /v2/models/mnist/infer HTTP/1.1\r\nHost: x\r\n"
                         b"Authorization: Bearer " + target.tokens["alice"].encode() +
                         b"\r\nX-Heinfer-Key-Id: " + target.alice_key.encode() +
                         b"\r\nContent-Length: 100000\r\n\r\nHEQ1")
            stalled.append(sock)
        started = time.monotonic()
        scores = target.alice.decrypt(target.alice.infer(target.request))
        assert time.monotonic() - started < 10
        np.testing.assert_allclose(scores, target.expected, atol=1e-3)
    finally:
        for sock in stalled:
            sock.close()


def _assert_still_serving(t: Target) -> None:
    assert t.service.process.poll() is None, "the service died"
    assert httpx.get(f"{t.url}/v2/health/ready", timeout=30).status_code == 200
    text = httpx.get(f"{t.url}/metrics", timeout=10).text
    match = re.search(r"^heinfer_worker_restarts ([0-9.e+]+)$", text, re.M)
    assert match and float(match.group(1)) == 0, "a worker crashed"
    keys = httpx.get(f"{t.url}/v2/keys", headers={
        "Authorization": f"Bearer {t.tokens['alice']}"}).json()["keys"]
    assert t.alice_key in keys, "alice's key disappeared"
    scores = t.alice.decrypt(t.alice.infer(t.request))
    np.testing.assert_allclose(scores, t.expected, atol=1e-3)


def test_batch_requests_are_checked_before_evaluation(
    service: Any, mnist: dict[str, np.ndarray], mnist_model: heinfer.EncryptedModel
) -> None:
    """coeff-batch (HEB1) bodies: a valid one round-trips, hostile ones get a 4xx and are not
    evaluated. Uses the shared session service (default body limit: batch bodies are ~36 MB)."""
    alice = heinfer.Client(service.url, model="mnist")
    if alice.batch_capacity == 0:
        pytest.skip("the test model was compiled without the coeff-batch layout")
    alice.upload_keys()
    headers = {"X-Heinfer-Key-Id": alice.key_id or ""}
    X = mnist["X_test"][:5]
    body = alice.encrypt(X, layout="coeff-batch")
    single = alice.encrypt(X[:1], layout="coeff-rowpack")
    assert body[:4] == b"HEB1"
    record = body[8:]
    frame = struct.Struct("<4sI")
    cases = {
        "no samples": (frame.pack(b"HEB1", 0) + record, 400),
        "too many samples": (frame.pack(b"HEB1", 1 << 30) + record, 413),
        "header only": (frame.pack(b"HEB1", 5), 400),
        "short record": (body[:-1], 400),
        "long record": (body + b"\0", 400),
        "other parameters": (body[:8] + bytes(8) + body[16:], 422),
        "per-sample bytes in a batch frame": (b"HEB1" + single[4:], 422),  # no tag
        "batch bytes in a per-sample frame": (b"HEQ1" + body[4:], 413),
    }
    with httpx.Client(base_url=service.url, timeout=120) as http:
        before = _samples_evaluated(service.url)
        for name, (hostile_body, status) in cases.items():
            response = http.post("/v2/models/mnist/infer", content=hostile_body, headers=headers)
            assert response.status_code == status, (name, response.text)
            _check(response, name)
        assert _samples_evaluated(service.url) == before  # the refusals evaluated nothing
        response = http.post("/v2/models/mnist/infer", content=body, headers=headers)
        assert response.status_code == 200, response.text
        np.testing.assert_allclose(
            alice.decrypt(response.content), mnist_model.predict_plain(X), atol=1e-3
        )
        assert _samples_evaluated(service.url) == before + 5
    alice.delete_keys()


def _samples_evaluated(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    match = re.search(r"^heinfer_samples_total ([0-9.e+]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0
