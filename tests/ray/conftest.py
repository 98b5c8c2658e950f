"""A real two-node Ray cluster for the Ray Serve tests (.ci/services/ray.sh).

.ci/run starts it once and exports its address (`eval "$(.ci/services/ray.sh start)"`);
without that, the session fixture starts a private one with the same script under a pytest
temp directory and stops it at the end. On a machine without the `ray` extra the tests skip;
in CI (CI=true) a cluster that cannot be had is a failure, not a skip.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
RAY_SH = REPO / ".ci" / "services" / "ray.sh"
ENV_NAMES = (
    "HEINFER_TEST_RAY_ADDRESS",
    "HEINFER_TEST_RAY_HTTP",
    "HEINFER_TEST_RAY_TOKEN_PATH",
    "HEINFER_TEST_RAY_STATE_DIR",
)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def unavailable(reason: str) -> NoReturn:
    if _in_ci():
        pytest.fail(f"{reason} (CI is set, so this is an error, not a skip)", pytrace=False)
    pytest.skip(reason)


@dataclass(frozen=True)
class RayCluster:
    address: str
    http_host: str
    http_port: int
    token_path: str
    state_dir: str

    @property
    def url(self) -> str:
        return f"http://{self.http_host}:{self.http_port}"

    def client_env(self) -> dict[str, str]:
        """What a process that connects to the cluster (ray.init) needs."""
        return {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": self.token_path,
            "RAY_USAGE_STATS_ENABLED": "0",
        }

    def footprint_bytes(self) -> int:
        """Resident memory of every process of the cluster (Ray, Serve, replicas, workers)."""
        done = subprocess.run(
            [str(RAY_SH), "footprint"],
            env={**os.environ, "RAY_STATE_DIR": self.state_dir},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return int(done.stdout.strip() or 0) * 1024


def _parse_exports(text: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in text.splitlines():
        words = shlex.split(line)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            name, _, value = words[1].partition("=")
            found[name] = value
    return found


def _cluster(found: dict[str, str]) -> RayCluster:
    host, _, port = found["HEINFER_TEST_RAY_HTTP"].rpartition(":")
    return RayCluster(
        found["HEINFER_TEST_RAY_ADDRESS"],
        host,
        int(port),
        found["HEINFER_TEST_RAY_TOKEN_PATH"],
        found["HEINFER_TEST_RAY_STATE_DIR"],
    )


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    try:
        import ray.serve  # noqa: F401
    except ImportError:
        unavailable("Ray Serve is not installed (pip install -e '.[ray]')")
    if all(os.environ.get(name) for name in ENV_NAMES):
        yield _cluster({name: os.environ[name] for name in ENV_NAMES})
        return
    state = tmp_path_factory.mktemp("ray")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("HEINFER_TEST_RAY")},
        "RAY_STATE_DIR": str(state),
    }
    try:
        done = subprocess.run(
            [str(RAY_SH), "start"],
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        if done.returncode != 0:
            tail = "\n".join(done.stderr.strip().splitlines()[-15:])
            unavailable(f"ray.sh start failed (exit {done.returncode}):\n{tail}")
        found = _parse_exports(done.stdout)
        if not all(name in found for name in ENV_NAMES):
            unavailable("ray.sh start printed no cluster address")
        yield _cluster(found)
    finally:
        subprocess.run(
            [str(RAY_SH), "stop"], env=env, capture_output=True, timeout=120, check=False
        )


class RayService:
    """`heinfer serve --ray ADDRESS` as a subprocess; stops with SIGTERM (deletes the app)."""

    def __init__(self, cluster: RayCluster, args: list[str], log: Path) -> None:
        self.url = cluster.url
        env = {
            **os.environ,
            **cluster.client_env(),
            "HEINFER_RAY_MIN_REPLICAS": "2",
            "HEINFER_RAY_MAX_REPLICAS": "2",
            "HEINFER_RAY_MAX_REPLICAS_PER_NODE": "1",
            "HEINFER_KEY_TTL_SECONDS": "1",
        }
        command = [
            sys.executable,
            "-m",
            "heinfer",
            "serve",
            *args,
            "--ray",
            cluster.address,
            "--host",
            cluster.http_host,
            "--port",
            str(cluster.http_port),
            "--workers",
            "1",
        ]
        self.log = log
        self._log_file = log.open("wb")
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            command, env=env, stdout=self._log_file, stderr=subprocess.STDOUT
        )
        self.ready_s = self._wait_ready()

    def _wait_ready(self, timeout: float = 150.0) -> float:
        deadline = self.started + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"heinfer serve --ray exited:\n{self.log.read_text()[-3000:]}")
            # The CLI prints its banner once serve.run has returned: all replicas are up.
            if b"heinfer on Ray" in self.log.read_bytes():
                try:
                    if httpx.get(f"{self.url}/v2/health/ready", timeout=10).status_code == 200:
                        return time.monotonic() - self.started
                except httpx.HTTPError:
                    pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"not ready in {timeout:.0f} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log_file.close()


@pytest.fixture
def ray_service(
    ray_cluster: RayCluster, key_store_url: str, mnist_model_path: Path, tmp_path: Path
) -> Iterator[RayService]:
    service = RayService(
        ray_cluster, [str(mnist_model_path), "--key-store", key_store_url], tmp_path / "serve.log"
    )
    try:
        yield service
    finally:
        service.stop()
