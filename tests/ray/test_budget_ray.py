"""The extraction budget across Ray Serve replicas: two replicas on two nodes count one tenant's
samples in one shared Ray actor (server/budget.py, `RayStore`), so the budget holds for the
whole application. Negative control: with each replica counting alone (`budget_store=local`),
the same requests get through to almost twice the budget."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import numpy as np
import pytest

import heinfer

if TYPE_CHECKING:
    from conftest import RayCluster
else:
    from conftest import RayCluster, RayService

pytestmark = pytest.mark.ray

BUDGET = 700
PER_REQUEST = 50


def _spend(url: str, X: np.ndarray) -> tuple[int, set[str], list[int]]:
    """Batches of 50 samples until four in a row are refused: (samples answered, replicas that
    answered, statuses)."""
    client = heinfer.Client(url, model="mnist")
    client.upload_keys()
    body = client.encrypt(X[:PER_REQUEST], layout="coeff-batch")
    answered, replicas, statuses = 0, set(), []
    refused_in_a_row = 0
    for _ in range(60):
        response = httpx.post(
            f"{url}/v2/models/mnist/infer", content=body, timeout=120,
            headers={"X-Heinfer-Key-Id": client.key_id or ""},
        )
        statuses.append(response.status_code)
        if response.status_code == 200:
            answered += PER_REQUEST
            replicas.add(response.headers.get("x-heinfer-replica", "").split(";")[0])
            refused_in_a_row = 0
        else:
            assert response.status_code == 429, response.text
            assert int(response.headers["Retry-After"]) >= 1
            refused_in_a_row += 1
            if refused_in_a_row == 4:
                break
    return answered, replicas, statuses


@pytest.mark.parametrize("store", ["shared", "local"])
def test_replicas_share_one_budget(
    ray_cluster: RayCluster,
    mnist_model_path: Path,
    mnist: dict[str, np.ndarray],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    store: str,
) -> None:
    if store == "local":
        monkeypatch.setenv("HEINFER_BUDGET_STORE", "local")
    service = RayService(
        ray_cluster,
        [str(mnist_model_path), "--key-store", (tmp_path / "keys").as_uri(),
         "--sample-budget", str(BUDGET)],
        tmp_path / "serve.log",
    )
    try:
        answered, replicas, statuses = _spend(service.url, mnist["X_test"])
    finally:
        service.stop()
    print(f"{store}: {answered} samples answered by {len(replicas)} replicas; {statuses}")
    assert len(replicas) == 2  # both replicas answered
    if store == "shared":
        # leases: each replica may hold up to 700 // 64 samples unused
        assert BUDGET - 2 * (BUDGET // 64) - PER_REQUEST < answered <= BUDGET
    else:
        assert answered > BUDGET  # each replica counted alone
