"""Helpers shared by test modules (a plain module: importing `conftest` by name is ambiguous
once subfolders have their own conftest.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from heinfer.cli import wait_ready
from heinfer.server.auth import new_token

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RunningService:
    """A real `heinfer serve` subprocess on a loopback port."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "heinfer", "serve", *args, "--port", str(self.port)]
        self.process = subprocess.Popen(command, env={**os.environ, **(env or {})})
        self.wait_ready()

    def wait_ready(self, timeout: float = 120.0) -> None:
        wait_ready(self.url, self.process, timeout)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@contextmanager
def tenant_service(
    model_path: Path,
    root: Path,
    tenants: Sequence[str],
    rules: list[dict[str, Any]],
    *args: str,
) -> Iterator[dict[str, Any]]:
    """A `heinfer serve` of one model with an auth file (one token per tenant) and a budget
    file holding `rules`; yields its URL and the tokens. `args` go to `heinfer serve`."""
    auth = root / "tokens.json"
    tokens = {tenant: new_token(tenant, auth) for tenant in tenants}
    budget = root / "budget.json"
    budget.write_text(json.dumps({"rules": rules}))
    service = RunningService([
        str(model_path), "--key-store", str(root / "keys"), "--auth-file", str(auth),
        "--budget-file", str(budget), "--log-level", "warning", *args,
    ])
    try:
        yield {"url": service.url, "tokens": tokens}
    finally:
        service.stop()


@contextmanager
def protections(plan: Any, **flags: bool) -> Iterator[None]:
    """Switch a plan's privacy treatment off (negative controls), restoring it afterwards.

    The treatment is a frozen `heinfer.plans.linear.Treatment` held by the plan; an unknown
    flag name raises (TypeError), so a renamed switch cannot make a negative control vacuous.
    """
    saved = plan._treatment
    plan._treatment = dataclasses.replace(saved, **flags)
    try:
        yield
    finally:
        plan._treatment = saved
