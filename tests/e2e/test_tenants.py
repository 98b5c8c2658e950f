"""Tenants, bearer tokens and per-tenant quotas against real `heinfer serve` processes.

Two tenants (alice, bob) share one service. Everything bob does with alice's key id (infer,
read, delete, overwrite by uploading identical bytes, enumerate) must look exactly as if the
key did not exist, and must leave alice's key untouched.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from test_faults import Service
from typer.testing import CliRunner

import heinfer
from heinfer.errors import AuthError, QuotaExceededError

pytestmark = pytest.mark.e2e


def _token(tenant: str, auth_file: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "heinfer", "token", "new", tenant, "--auth-file", str(auth_file)],
        capture_output=True, text=True, check=True, timeout=120,
    )
    return done.stdout.strip()


@pytest.fixture(scope="module")
def tenants(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    auth_file = tmp_path_factory.mktemp("auth") / "tokens.json"
    return {
        "file": auth_file,
        "alice": _token("alice", auth_file),
        "bob": _token("bob", auth_file),
    }


@pytest.fixture(scope="module")
def tenant_service(
    mnist_model_path: Path, tenants: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    keys = tmp_path_factory.mktemp("tenant-keys")
    log_path = tmp_path_factory.mktemp("tenant-log") / "service.log"
    running = Service(
        [str(mnist_model_path), "--workers", "1", "--key-store", str(keys),
         "--auth-file", str(tenants["file"]), "--max-keys-per-tenant", "3",
         "--log-level", "info"],
        log_path=log_path,
    )
    running.key_dir = keys  # type: ignore[attr-defined]
    yield running
    running.stop()


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def alice(tenant_service: Service, tenants: dict[str, Any]) -> heinfer.Client:
    client = heinfer.Client(tenant_service.url, model="mnist", token=tenants["alice"])
    client.upload_keys()
    return client


def _infer(url: str, token: str, key_id: str, body: bytes) -> httpx.Response:
    return httpx.post(
        f"{url}/v2/models/mnist/infer", content=body, timeout=60,
        headers={**_auth(token), "X-Heinfer-Key-Id": key_id},
    )


# -- tokens -----------------------------------------------------------------------------------


def test_token_file_holds_only_hashes(tenants: dict[str, Any]) -> None:
    path: Path = tenants["file"]
    assert path.stat().st_mode & 0o777 == 0o600
    text = path.read_text()
    document = json.loads(text)
    assert {"alice", "bob"} <= set(document["tenants"])
    for tenant in ("alice", "bob"):
        token = tenants[tenant]
        assert len(token) >= 40 and token not in text
        digest = hashlib.sha256(token.encode()).hexdigest()
        assert document["tenants"][tenant] == {"token_sha256": digest}
    assert tenants["alice"] != tenants["bob"]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer not-a-token"},
        {"Authorization": "Basic YWxpY2U6cGFzcw=="},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer" + "x" * 5000},
        {"Authorization": "tokenwithoutscheme"},
    ],
    ids=["none", "bad", "basic", "empty", "huge", "no-scheme"],
)
def test_missing_or_bad_token_is_401(
    tenant_service: Service, alice: heinfer.Client, headers: dict[str, str]
) -> None:
    url = tenant_service.url
    key_id = alice.key_id or ""
    calls = [
        ("GET", "/v2/models", {}),
        ("GET", "/v2/models/mnist", {}),
        ("GET", "/v2/models/nope", {}),  # not even a 404 for model names without a token
        ("GET", "/v2/keys", {}),
        ("POST", "/v2/keys?model=mnist", {"content": alice.last_key_upload}),
        ("GET", f"/v2/keys/{key_id}", {}),
        ("DELETE", f"/v2/keys/{key_id}", {}),
        ("POST", "/v2/models/mnist/infer", {"content": b"HEQ1", "headers": {
            "X-Heinfer-Key-Id": key_id}}),
    ]
    for method, path, kwargs in calls:
        extra = kwargs.pop("headers", {})
        response = httpx.request(
            method, url + path, headers={**headers, **extra}, timeout=30, **kwargs
        )
        assert response.status_code == 401, (method, path, response.text)
        assert response.json()["error"] == "unauthorized"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    # alice's key survived all of that
    assert httpx.get(f"{url}/v2/keys/{key_id}", headers=_auth_of(alice)).status_code == 200


def _auth_of(client: heinfer.Client) -> dict[str, str]:
    return {"Authorization": client._http.headers["Authorization"]}


def test_health_and_metrics_need_no_token(tenant_service: Service) -> None:
    url = tenant_service.url
    assert httpx.get(f"{url}/v2/health/live").status_code == 200
    assert httpx.get(f"{url}/v2/health/ready").status_code == 200
    assert httpx.get(f"{url}/metrics").status_code == 200


def test_client_sends_bearer_token(
    tenant_service: Service, tenants: dict[str, Any], mnist: dict[str, np.ndarray],
    mnist_model: heinfer.EncryptedModel,
) -> None:
    with pytest.raises(AuthError):
        heinfer.Client(tenant_service.url, model="mnist")
    with pytest.raises(AuthError):
        heinfer.Client(tenant_service.url, model="mnist", token="wrong")
    with heinfer.Client(tenant_service.url, model="mnist", token=tenants["bob"]) as bob:
        X = mnist["X_test"][:3]
        scores = bob.predict(X)
        np.testing.assert_allclose(scores, mnist_model.predict_plain(X), atol=1e-3)
        bob.delete_keys()


# -- isolation --------------------------------------------------------------------------------


def test_foreign_key_is_indistinguishable_from_a_missing_one(
    tenant_service: Service, tenants: dict[str, Any], alice: heinfer.Client,
    mnist: dict[str, np.ndarray],
) -> None:
    url, bob = tenant_service.url, tenants["bob"]
    alice_id = alice.key_id or ""
    missing_id = hashlib.sha256(b"no such key").hexdigest()
    body = alice.encrypt(mnist["X_test"][:1])
    alice.decrypt(alice.infer(body))  # warm alice's key in the worker cache
    for method, path, kwargs in [
        ("POST", "/v2/models/mnist/infer", {"content": body}),
        ("GET", "/v2/keys/{id}", {}),
        ("DELETE", "/v2/keys/{id}", {}),
    ]:
        answers = []
        for key_id in (alice_id, missing_id, "not-a-key-id"):
            response = httpx.request(
                method, url + path.format(id=key_id), timeout=60, **kwargs,
                headers={**_auth(bob), "X-Heinfer-Key-Id": key_id},
            )
            answers.append((response.status_code, response.json()))
        assert answers[0][0] == 404, answers[0]
        assert answers[0] == answers[1] == answers[2], (method, answers)
        assert alice_id not in json.dumps(answers[0][1])
    listing = httpx.get(f"{url}/v2/keys", headers=_auth(bob)).json()["keys"]
    assert alice_id not in listing
    assert alice_id in httpx.get(f"{url}/v2/keys", headers=_auth(tenants["alice"])).json()["keys"]
    # alice's key still works after bob's attempts
    assert alice.decrypt(alice.infer(body)).shape == (1, 10)


def test_foreign_and_missing_keys_take_the_same_time(
    tenant_service: Service, tenants: dict[str, Any], alice: heinfer.Client,
    mnist: dict[str, np.ndarray],
) -> None:
    url, bob = tenant_service.url, tenants["bob"]
    body = alice.encrypt(mnist["X_test"][:1])
    missing_id = hashlib.sha256(b"missing").hexdigest()
    timings: dict[str, list[float]] = {"foreign": [], "missing": []}
    with httpx.Client(timeout=60) as http:
        for _ in range(25):
            for label, key_id in (("foreign", alice.key_id or ""), ("missing", missing_id)):
                started = time.perf_counter()
                response = http.post(
                    f"{url}/v2/models/mnist/infer", content=body,
                    headers={**_auth(bob), "X-Heinfer-Key-Id": key_id},
                )
                timings[label].append(time.perf_counter() - started)
                assert response.status_code == 404
    foreign, missing = (statistics.median(timings[k]) for k in ("foreign", "missing"))
    # Both are answered from the same code path before any evaluation: a few ms each.
    assert abs(foreign - missing) < 0.02, timings
    assert max(foreign, missing) < 0.25


def test_identical_upload_by_another_tenant_is_its_own_entry(
    tenant_service: Service, tenants: dict[str, Any], alice: heinfer.Client,
    mnist: dict[str, np.ndarray],
) -> None:
    url, bob = tenant_service.url, tenants["bob"]
    key_dir: Path = tenant_service.key_dir  # type: ignore[attr-defined]
    alice_id = alice.key_id or ""
    before = (key_dir / "alice" / alice_id).stat()
    response = httpx.post(
        f"{url}/v2/keys", params={"model": "mnist"}, content=alice.last_key_upload,
        headers=_auth(bob), timeout=60,
    )
    assert response.status_code == 200, response.text
    assert response.json() == {"key_id": alice_id}  # content addressed: the same id...
    assert (key_dir / "bob" / alice_id).read_bytes() == alice.last_key_upload  # ...bob's copy
    after = (key_dir / "alice" / alice_id).stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert alice_id in httpx.get(f"{url}/v2/keys", headers=_auth(bob)).json()["keys"]
    # bob can now infer with *his* copy (he holds no secret key, so he learns nothing), and
    # deleting it removes only his entry
    body = alice.encrypt(mnist["X_test"][:1])
    assert _infer(url, bob, alice_id, body).status_code == 200
    assert httpx.delete(f"{url}/v2/keys/{alice_id}", headers=_auth(bob)).status_code == 204
    assert _infer(url, bob, alice_id, body).status_code == 404
    assert alice_id not in httpx.get(f"{url}/v2/keys", headers=_auth(bob)).json()["keys"]
    assert (key_dir / "alice" / alice_id).exists()
    assert alice.decrypt(alice.infer(body)).shape == (1, 10)
    listing = httpx.get(f"{url}/v2/keys", headers=_auth(tenants["alice"])).json()["keys"]
    assert alice_id in listing


def test_owner_reads_and_deletes_its_key(
    tenant_service: Service, tenants: dict[str, Any], mnist: dict[str, np.ndarray]
) -> None:
    url = tenant_service.url
    with heinfer.Client(url, model="mnist", token=tenants["alice"]) as client:
        key_id = client.upload_keys()
        stored = httpx.get(f"{url}/v2/keys/{key_id}", headers=_auth(tenants["alice"]))
        assert stored.status_code == 200
        assert stored.content == client.last_key_upload
        assert hashlib.sha256(stored.content).hexdigest() == key_id
        client.delete_keys()
        again = httpx.get(f"{url}/v2/keys/{key_id}", headers=_auth(tenants["alice"]))
        assert again.status_code == 404


def test_key_count_quota_per_tenant(
    tenant_service: Service, tenants: dict[str, Any], alice: heinfer.Client
) -> None:
    url, bob = tenant_service.url, tenants["bob"]
    headers = _auth(bob)
    for key_id in httpx.get(f"{url}/v2/keys", headers=headers).json()["keys"]:
        httpx.delete(f"{url}/v2/keys/{key_id}", headers=headers)
    clients = [heinfer.Client(url, model="mnist", token=bob) for _ in range(4)]
    for client in clients[:3]:
        client.upload_keys()
    with pytest.raises(QuotaExceededError):
        clients[3].upload_keys()
    again = httpx.post(  # re-uploading a held key (identical bytes) is free
        f"{url}/v2/keys", params={"model": "mnist"}, content=clients[0].last_key_upload,
        headers=headers, timeout=60,
    )
    assert again.status_code == 200 and again.json() == {"key_id": clients[0].key_id}
    assert len(httpx.get(f"{url}/v2/keys", headers=headers).json()["keys"]) == 3
    # alice's quota is her own
    with heinfer.Client(url, model="mnist", token=tenants["alice"]) as other:
        other.upload_keys()
        other.delete_keys()
    for client in clients[:3]:
        client.delete_keys()
        client.close()


def test_key_bytes_quota_flag(mnist_model_path: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    running = Service(
        [str(mnist_model_path), "--workers", "1", "--key-store", str(keys),
         "--max-key-bytes-per-tenant", "125000"]
    )
    try:
        clients = [heinfer.Client(running.url, model="mnist") for _ in range(3)]
        clients[0].upload_keys()
        clients[1].upload_keys()  # 2 x ~56 KB fit in 125,000 bytes
        with pytest.raises(QuotaExceededError, match="storage quota"):
            clients[2].upload_keys()
        clients[0].delete_keys()
        clients[2].upload_keys()
    finally:
        running.stop()


# -- logs -------------------------------------------------------------------------------------


def test_logs_are_json_with_request_ids_and_no_secrets(
    tenant_service: Service, tenants: dict[str, Any], alice: heinfer.Client,
    mnist: dict[str, np.ndarray],
) -> None:
    url = tenant_service.url
    body = alice.encrypt(mnist["X_test"][:1])
    response = _infer(url, tenants["alice"], alice.key_id or "", body)
    assert response.status_code == 200
    request_id = response.headers["X-Request-Id"]
    supplied = httpx.get(f"{url}/v2/keys", headers={**_auth(tenants["bob"]),
                                                    "X-Request-Id": "trace-42"})
    assert supplied.headers["X-Request-Id"] == "trace-42"
    forged = httpx.get(f"{url}/v2/keys", headers={"X-Request-Id": '"}{"level":"x'})
    assert forged.headers["X-Request-Id"] != '"}{"level":"x'
    time.sleep(0.5)
    assert tenant_service.log_path is not None
    raw = tenant_service.log_path.read_bytes()
    lines = [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
    requests = [line for line in lines if line.get("msg") == "request"]
    assert any(
        r["request_id"] == request_id and r["route"] == "/v2/models/{name}/infer"
        and r["status"] == 200 and r["tenant"] == "alice" for r in requests
    )
    assert any(r["request_id"] == "trace-42" for r in requests)
    assert all({"ts", "level", "logger", "msg"} <= set(line) for line in lines)
    for secret in (tenants["alice"], tenants["bob"]):
        assert secret.encode() not in raw
    assert body[8:72].hex().encode() not in raw and body[8:72] not in raw
    assert (alice.last_key_upload or b"")[40:104] not in raw


# -- the CLI's loopback rule ------------------------------------------------------------------


@pytest.fixture
def fake_uvicorn(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    import uvicorn

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append(kwargs))
    return calls


@pytest.mark.parametrize(
    "host, extra, served",
    [
        ("127.0.0.1", [], True),
        ("::1", [], True),
        ("localhost", [], True),
        ("0.0.0.0", [], False),
        ("192.0.2.10", [], False),
        ("0.0.0.0", ["--allow-anonymous"], True),
        ("0.0.0.0", ["--auth-file", "{auth}"], True),
    ],
)
def test_cli_refuses_anonymous_non_loopback(
    fake_uvicorn: list[dict[str, Any]], mnist_model_path: Path, tenants: dict[str, Any],
    tmp_path: Path, host: str, extra: list[str], served: bool,
) -> None:
    from heinfer.cli import app

    args = ["serve", str(mnist_model_path), "--host", host, "--key-store", str(tmp_path),
            *[a.format(auth=tenants["file"]) for a in extra]]
    result = CliRunner().invoke(app, args)
    if served:
        assert result.exit_code == 0, result.output
        assert fake_uvicorn and fake_uvicorn[0]["host"] == host
        assert ("without authentication" in result.output) == ("--allow-anonymous" in extra)
    else:
        assert result.exit_code == 2
        assert "refusing to serve" in result.output
        assert not fake_uvicorn


def test_cli_limit_flags_reach_the_settings(
    fake_uvicorn: list[dict[str, Any]], mnist_model_path: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from heinfer import cli
    from heinfer.server import app as app_module

    seen = []
    original = app_module.create_app
    monkeypatch.setattr(app_module, "create_app", lambda s: seen.append(s) or original(s))
    result = CliRunner().invoke(cli.app, [
        "serve", str(mnist_model_path), "--key-store", str(tmp_path),
        "--max-keys-per-tenant", "7", "--max-key-bytes-per-tenant", "123456",
        "--max-concurrent-requests", "3", "--max-queued-requests", "5", "--queue-timeout", "2.5",
    ])
    assert result.exit_code == 0, result.output
    settings = seen[0]
    assert (settings.max_keys_per_tenant, settings.max_key_bytes_per_tenant) == (7, 123456)
    assert (settings.max_concurrent_requests, settings.max_queued_requests) == (3, 5)
    assert settings.queue_timeout_seconds == 2.5


def test_cli_rejects_unreadable_auth_file(
    fake_uvicorn: list[dict[str, Any]], mnist_model_path: Path, tmp_path: Path
) -> None:
    from heinfer.cli import app

    bad = tmp_path / "tokens.json"
    bad.write_text("{not json")
    result = CliRunner().invoke(app, ["serve", str(mnist_model_path), "--auth-file", str(bad)])
    assert result.exit_code == 2 and not fake_uvicorn
    missing = tmp_path / "absent.json"
    result = CliRunner().invoke(app, ["serve", str(mnist_model_path), "--auth-file", str(missing)])
    assert result.exit_code == 2 and not fake_uvicorn


def test_new_tokens_work_without_restart(
    tenant_service: Service, tenants: dict[str, Any]
) -> None:
    carol = _token("carol", tenants["file"])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        response = httpx.get(f"{tenant_service.url}/v2/keys", headers=_auth(carol))
        if response.status_code == 200:
            break
        assert response.status_code == 401
        time.sleep(0.3)
    assert response.status_code == 200 and response.json() == {"keys": []}
    # the other tenants' tokens still work
    assert httpx.get(
        f"{tenant_service.url}/v2/keys", headers=_auth(tenants["alice"])
    ).status_code == 200
