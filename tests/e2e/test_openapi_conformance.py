"""A third party checks the OpenAPI document against the live service: Schemathesis (PyPI).

`schemathesis run --checks all` generates requests from /openapi.json (examples, boundary
cases, random data, stateful sequences) and fails on any 5xx, any status, content type, header
or body the document does not declare, a 405 whose Allow header disagrees with it, or invalid
data accepted. `.ci/schemathesis.toml` holds the one allowance (schema-valid random bytes are
not valid ciphertext; see there). Bounded: `--max-examples`, and a timeout on the whole run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from service_helpers import REPO, RunningService

pytestmark = pytest.mark.e2e

pytest.importorskip("schemathesis")
MAX_EXAMPLES = 15
TIMEOUT_SECONDS = 300


@pytest.fixture(scope="module")
def own_service(mnist_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
    RunningService
]:
    """A service of its own: generated DELETEs and uploads must not touch other tests' keys."""
    keys = tmp_path_factory.mktemp("schemathesis-keys")
    running = RunningService(
        [str(mnist_model_path), "--workers", "1", "--key-store", str(keys),
         "--log-level", "warning"]
    )
    yield running
    running.stop()


def test_schemathesis_finds_nothing(own_service: RunningService, tmp_path: Path) -> None:
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "--config-file", str(REPO / ".ci" / "schemathesis.toml"),
        "run", f"{own_service.url}/openapi.json",
        "--checks", "all", "--max-examples", str(MAX_EXAMPLES), "--no-color",
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=TIMEOUT_SECONDS, cwd=tmp_path,
        env={**os.environ, "SCHEMATHESIS_TELEMETRY": "false"},
    )
    summary = done.stdout[-6000:] + done.stderr[-2000:]
    assert done.returncode == 0, summary
    assert " passed" in summary and "generated" in summary, summary
