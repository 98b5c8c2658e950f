"""heinfer on Ray Serve, for real: two replicas on two Ray nodes behind Serve's HTTP proxy.

The cluster is .ci/services/ray.sh's (a head on 127.0.0.2, a worker node on 127.0.0.3, one
CPU each). `heinfer serve --ray` deploys two replicas, one per node; the client uploads its
key once through the proxy and sends requests until both replicas have answered: the replica
that did not take the upload must find the key in the shared key store by id. Scores must
equal the plaintext model's, and the HTTP API must be the one `heinfer serve` has.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
import pytest

import heinfer
from heinfer.errors import KeyNotFoundError

if TYPE_CHECKING:  # tests/ray/conftest.py (no package: a `ray` package would shadow Ray)
    from conftest import RayCluster, RayService

pytestmark = pytest.mark.ray

REPLICA_HEADER = "x-heinfer-replica"
MAX_REQUESTS = 40  # bounded: with two replicas and random routing, both answer within a few


def _replica_fields(value: str) -> dict[str, str]:
    return dict(part.strip().split("=", 1) for part in value.split(";"))


def test_two_replicas_on_two_nodes_share_keys_through_the_store(
    ray_service: RayService,
    ray_cluster: RayCluster,
    key_store_url: str,
    mnist: dict[str, np.ndarray],
    mnist_model: heinfer.EncryptedModel,
) -> None:
    url = ray_service.url
    seen: list[tuple[str, str, str]] = []  # (method, path, replica header) of every response

    def record(response: httpx.Response) -> None:
        seen.append(
            (
                response.request.method,
                response.request.url.path,
                response.headers.get(REPLICA_HEADER, ""),
            )
        )

    http = httpx.Client(base_url=url, timeout=120, event_hooks={"response": [record]})
    client = heinfer.Client(url, model="mnist", http=http)

    # The same HTTP API as a single `heinfer serve`: manifest, model list, health.
    assert client.manifest.to_dict() == mnist_model.manifest.to_dict()
    assert [m["name"] for m in http.get("/v2/models").json()["models"]] == ["mnist"]
    assert http.get("/v2/health/live").json() == {"live": True}
    live = http.get("/v2/health/live")
    assert live.headers.get_list("x-request-id") == [live.headers["x-request-id"]]  # once

    key_id = client.upload_keys()  # once, through the proxy
    uploads = [s for s in seen if s[:2] == ("POST", "/v2/keys")]
    assert len(uploads) == 1
    if key_store_url.startswith("file://"):
        stored = [p for p in Path(key_store_url.removeprefix("file://")).rglob("*") if p.is_file()]
        assert [p.name for p in stored] == [key_id]

    X_all = mnist["X_test"]
    answered: dict[str, dict[str, str]] = {}
    latencies = []
    for i in range(MAX_REQUESTS):
        X = X_all[i * 4 : (i + 1) * 4]
        body = client.encrypt(X)
        started = time.perf_counter()
        payload = client.infer(body)
        latencies.append(time.perf_counter() - started)
        replica = seen[-1][2]
        assert seen[-1][:2] == ("POST", "/v2/models/mnist/infer") and replica
        answered[replica] = _replica_fields(replica)
        scores = client.decrypt(payload)
        reference = mnist_model.predict_plain(X)
        assert (scores.argmax(1) == reference.argmax(1)).all()
        np.testing.assert_allclose(scores, reference, atol=1e-3)
        if len(answered) == 2 and i >= 3:
            break
    assert len(answered) == 2, f"only {list(answered)} answered {MAX_REQUESTS} requests"
    nodes = {fields["node"] for fields in answered.values()}
    assert len(nodes) == 2, "both replicas ran on the same Ray node"

    footprint = ray_cluster.footprint_bytes()
    median_ms = 1e3 * float(np.median(latencies[1:] or latencies))
    print(
        f"\n[ray] {key_store_url.split(':')[0]}: ready in {ray_service.ready_s:.1f} s; "
        f"{len(latencies)} requests of 4 digits, median {median_ms:.0f} ms through the proxy; "
        f"cluster RSS {footprint / 2**30:.2f} GiB with 2 replicas"
    )
    # Memory-bounded: Ray + Serve + 2 replicas (+1 SEAL process each) on two 1-CPU nodes.
    assert footprint < 4 * 2**30

    # A key deleted through one replica is gone on both once their key cache (1 s TTL here,
    # 30 s by default on Ray) expires.
    client.delete_keys()
    time.sleep(1.5)
    client.key_id = key_id
    refused: set[str] = set()
    for _ in range(MAX_REQUESTS):
        with pytest.raises(KeyNotFoundError):
            client.infer(client.encrypt(X_all[:1]))
        refused.add(seen[-1][2])
        if len(refused) == 2:
            break
    assert len(refused) == 2
    http.close()


# ------------------------------------------------------------------------------------------
# Without a cluster: options, the replica header, the builder's argument checks
# ------------------------------------------------------------------------------------------


def test_options_come_from_arguments_then_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    ray_serve = pytest.importorskip("heinfer.ray_serve")
    from pydantic import ValidationError

    monkeypatch.setenv("HEINFER_RAY_MAX_REPLICAS", "6")
    monkeypatch.setenv("HEINFER_RAY_REPLICA_RESOURCES", '{"node_a": 1}')
    options = ray_serve.RayServeOptions(replica_cpus=2)
    assert options.autoscaling_config()["max_replicas"] == 6
    assert options.worker_processes == 2
    assert options.actor_options({"AWS_REGION": "x"}) == {
        "num_cpus": 2.0,
        "resources": {"node_a": 1.0},
        "runtime_env": {"env_vars": {"AWS_REGION": "x"}},
    }
    with pytest.raises(ValidationError):
        ray_serve.RayServeOptions(min_replicas=3, max_replicas=2)
    with pytest.raises(ValidationError):
        ray_serve.RayServeOptions(max_replica=2)  # a typo is an error, not ignored


def test_replica_header_and_a_single_request_id() -> None:
    ray_serve = pytest.importorskip("heinfer.ray_serve")

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"x-request-id", b"from-app"), (b"content-length", b"2")],
            }
        )
        await send({"type": "http.response.body", "body": b"ok"})

    def call(headers: list[tuple[bytes, bytes]]) -> dict[bytes, list[bytes]]:
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b""}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        middleware = ray_serve.ReplicaHeaderMiddleware(app, value="replica=r1; pid=7")
        scope = {"type": "http", "method": "GET", "path": "/", "headers": headers}
        asyncio.run(middleware(scope, receive, send))
        found: dict[bytes, list[bytes]] = {}
        for name, value in sent[0]["headers"]:
            found.setdefault(name, []).append(value)
        assert sent[1]["body"] == b"ok"
        return found

    direct = call([])
    assert direct[REPLICA_HEADER.encode()] == [b"replica=r1; pid=7"]
    assert direct[b"x-request-id"] == [b"from-app"]
    proxied = call([(b"x-request-id", b"from-proxy")])
    assert proxied[REPLICA_HEADER.encode()] == [b"replica=r1; pid=7"]
    assert b"x-request-id" not in proxied  # Serve's proxy adds it to the response, once


def test_replicas_get_absolute_paths_and_a_key_ttl() -> None:
    ray_serve = pytest.importorskip("heinfer.ray_serve")
    from heinfer.server.settings import ServiceSettings

    settings = ServiceSettings(model_paths=["m.heinfer"], key_store="keys", workers=1)
    payload = ray_serve.replica_settings(settings, ray_serve.RayServeOptions())
    assert payload["model_paths"] == [str(Path.cwd() / "m.heinfer")]
    assert payload["key_store"] == (Path.cwd() / "keys").as_uri()
    assert payload["key_ttl_seconds"] == 30
    assert ServiceSettings(**payload).workers == 1  # round-trips on the replica
    given = ServiceSettings(key_store="s3://bucket", key_ttl_seconds=5, workers=1)
    payload = ray_serve.replica_settings(given, ray_serve.RayServeOptions())
    assert (payload["key_store"], payload["key_ttl_seconds"]) == ("s3://bucket", 5)
