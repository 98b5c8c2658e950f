"""Red team against a real `heinfer serve`: the auth file, tokens on the command line, the
anonymous readiness route, and the secret key file. Each attack has its negative control."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

import heinfer
from heinfer.errors import BadInputError
from heinfer.server.auth import new_token
from service_helpers import RunningService

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def guarded(
    mnist_model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("guarded")
    auth = root / "tokens.json"
    tokens = {tenant: new_token(tenant, auth) for tenant in ("alice", "bob")}
    log = root / "service.log"
    with log.open("wb") as sink:
        service = RunningService.__new__(RunningService)
        service.port = _free_port()
        service.url = f"http://127.0.0.1:{service.port}"
        service.process = subprocess.Popen(
            [sys.executable, "-m", "heinfer", "serve", str(mnist_model_path), "--workers", "1",
             "--key-store", str(root / "keys"), "--auth-file", str(auth),
             "--port", str(service.port)],
            stderr=sink,
        )
        service.wait_ready()
    try:
        yield {"url": service.url, "auth": auth, "tokens": tokens, "log": log}
    finally:
        service.stop()


def _free_port() -> int:
    from service_helpers import free_port

    return free_port()


def _status(url: str, token: str) -> int:
    return httpx.get(f"{url}/v2/keys", headers={"Authorization": f"Bearer {token}"}).status_code


def _wait_for(url: str, token: str, status: int) -> None:
    deadline = time.monotonic() + 10
    while _status(url, token) != status:
        assert time.monotonic() < deadline, f"never answered {status}"
        time.sleep(0.2)


def test_corrupt_or_missing_auth_file_refuses_every_token(guarded: dict[str, Any]) -> None:
    url, auth, token = guarded["url"], guarded["auth"], guarded["tokens"]["alice"]
    good = auth.read_text()
    assert _status(url, token) == 200  # the control: the token works while the file is good
    try:
        auth.write_text(good[: len(good) // 2])  # a torn write
        _wait_for(url, token, 503)
        response = httpx.get(f"{url}/v2/keys", headers={"Authorization": f"Bearer {token}"})
        assert response.json()["error"] == "unavailable" and "Retry-After" in response.headers
        auth.unlink()
        time.sleep(1.2)
        assert _status(url, token) == 503
    finally:
        auth.write_text(good)
    _wait_for(url, token, 200)  # repaired: tokens work again
    log = guarded["log"].read_text()
    assert "refusing every token" in log
    assert all(t not in log for t in guarded["tokens"].values())
    assert all(digest not in log for digest in re.findall(r"[0-9a-f]{64}", good))


def test_token_revoke_takes_effect_without_restart(guarded: dict[str, Any]) -> None:
    url, auth = guarded["url"], guarded["auth"]
    carol = new_token("carol", auth)
    _wait_for(url, carol, 200)
    done = subprocess.run(
        [sys.executable, "-m", "heinfer", "token", "revoke", "carol", "--auth-file", str(auth)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    _wait_for(url, carol, 401)
    assert _status(url, guarded["tokens"]["bob"]) == 200  # the others keep working
    again = subprocess.run(
        [sys.executable, "-m", "heinfer", "token", "revoke", "carol", "--auth-file", str(auth)],
        capture_output=True, text=True, timeout=120,
    )
    assert again.returncode == 1 and "no tenant" in again.stdout


def _predict(
    url: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "HEINFER_TOKEN"}
    return subprocess.run(
        [sys.executable, "-m", "heinfer", "predict", "--url", url, "--mnist-index", "0", *args],
        capture_output=True, text=True, timeout=300, env={**base, **(env or {})},
    )


def test_predict_takes_the_token_from_a_file_or_the_environment_never_argv(
    guarded: dict[str, Any], tmp_path: Path
) -> None:
    url, token = guarded["url"], guarded["tokens"]["alice"]
    refused = _predict(url, "--token", token)
    assert refused.returncode == 2 and "process list" in refused.stdout
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    by_file = _predict(url, "--token-file", str(token_file))
    assert by_file.returncode == 0 and "predicted class" in by_file.stdout, by_file.stdout
    by_env = _predict(url, env={"HEINFER_TOKEN": token})
    assert by_env.returncode == 0 and "predicted class" in by_env.stdout
    without = _predict(url)  # the control: the service does want a token
    assert without.returncode == 1 and "unauthorized" in without.stdout


def test_readiness_probes_are_shared_by_anonymous_callers(guarded: dict[str, Any]) -> None:
    url = guarded["url"]

    def probes() -> float:
        text = httpx.get(f"{url}/metrics").text
        return float(re.search(r"^heinfer_readiness_probes (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            answers = await asyncio.gather(*(http.get("/v2/health/ready") for _ in range(100)))
        return [a.status_code for a in answers]

    before = probes()
    assert set(asyncio.run(burst())) == {200}
    # 100 anonymous requests, at most one probe per 2 s (the burst may straddle one refresh)
    assert probes() - before <= 2
    time.sleep(2.1)  # the control: once the result is older than that, a request probes again
    httpx.get(f"{url}/v2/health/ready")
    assert probes() > before


def test_save_secret_refuses_a_symlink(service: RunningService, tmp_path: Path) -> None:
    client = heinfer.Client(service.url, model="mnist")
    client.upload_keys()
    target = tmp_path / "elsewhere"
    target.write_text("untouched")
    link = tmp_path / "secret.json"
    link.symlink_to(target)
    with pytest.raises(BadInputError):
        client.save_secret(link)
    assert target.read_text() == "untouched"
    plain = tmp_path / "plain.json"  # the control: a plain path is written, 0600
    client.save_secret(plain)
    assert plain.stat().st_mode & 0o777 == 0o600
    assert np.isfinite(client.predict(np.zeros((1, 784)))).all()
    client.delete_keys()
