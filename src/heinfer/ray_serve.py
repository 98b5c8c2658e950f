"""heinfer on Ray Serve: the same FastAPI app, replicated and autoscaled by Ray.

Why Ray Serve and not a home-made cluster: Serve already does what scale-out needs (an HTTP
proxy per node or on the head, replica placement and restarts, queue-length autoscaling,
in-place config updates with `serve deploy`), and it can host an ASGI app unchanged. So a
replica here *is* `heinfer.server.app.create_app(settings)`: clients see the identical HTTP API
(/v2, /v2/models/{m}[/manifest|/ready], /v2/keys, /v2/models/{m}/infer, /v2/health/*,
/metrics), errors and all.

Why keys never travel through Ray: a client uploads its public key once (POST /v2/keys); the
replica that happens to take that request writes it to the key store named by the key store URL
(a shared directory, Azure Blob or S3), and every replica reads keys from that store by key id,
exactly as the worker processes of a single `heinfer serve` do. Ray only carries the encrypted
requests and answers through its proxy, never key material between replicas, and no replica
needs to have seen the upload.

Each replica runs its own `WorkerPool` of SEAL processes (SEAL holds the GIL), so a replica
reserves `replica_cpus` Ray CPUs and starts that many evaluation processes by default.

Entry points:

* `heinfer serve MODEL... --key-store URL --ray ADDRESS` (see `serve_on_ray`) deploys and keeps
  the application up until the command is stopped.
* `heinfer.ray_serve:build_app` is an application builder for `serve run` / `serve deploy`
  (a Serve config's `applications[].import_path`); its `args` are the `ServiceSettings` fields
  plus the `RayServeOptions` fields (see deploy/ray/serve-config.yaml).

Scaling knobs come from `RayServeOptions`: arguments, or `HEINFER_RAY_*` environment variables.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import ray.serve
from fastapi import FastAPI
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from ray.serve import Application
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from heinfer.server.app import create_app
from heinfer.server.settings import ServiceSettings

__all__ = [
    "DEFAULT_FORWARDED_ENV",
    "REPLICA_HEADER",
    "RayServeOptions",
    "budget_actor",
    "build_app",
    "heinfer_application",
    "replica_settings",
    "serve_on_ray",
]

REPLICA_HEADER = "X-Heinfer-Replica"

# Key store credentials/endpoints the replicas need. Ray worker processes inherit the
# environment of the *node* (`ray start`), not of the process that deploys, so `serve_on_ray`
# forwards these from its own environment when they are set. In Kubernetes they come from the
# pod's Secret instead and nothing is forwarded (`build_app`).
DEFAULT_FORWARDED_ENV = (
    "AZURE_STORAGE_CONNECTION_STRING",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_EC2_METADATA_DISABLED",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
)


class RayServeOptions(BaseSettings):
    """How the service is replicated; arguments first, then HEINFER_RAY_* variables.

    The autoscaler adds a replica when the average number of requests in flight per replica
    stays above `target_ongoing_requests` for `upscale_delay_s`. An encrypted request is CPU
    work of tens to hundreds of milliseconds in the replica's worker processes, so the target is
    about the number of worker processes: enough queued work to keep them busy, little enough
    that latency does not grow before a new replica is asked for.
    """

    model_config = SettingsConfigDict(env_prefix="HEINFER_RAY_", frozen=True, extra="forbid")

    app_name: str = "heinfer"
    deployment_name: str = "heinfer"
    route_prefix: str = "/"
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=4, ge=1)
    initial_replicas: int | None = Field(default=None, ge=0)
    target_ongoing_requests: float = Field(default=2.0, gt=0)
    max_ongoing_requests: int = Field(default=8, ge=1)
    upscale_delay_s: float = Field(default=10.0, ge=0)
    downscale_delay_s: float = Field(default=120.0, ge=0)
    # Ray CPUs each replica reserves; also its default number of SEAL worker processes.
    replica_cpus: float = Field(default=1.0, gt=0)
    # Ray `memory` resource reserved per replica (scheduling only, bytes); None: no reservation.
    replica_memory_bytes: int | None = Field(default=None, ge=1)
    # Custom Ray resources a replica needs, e.g. {"heinfer": 1} to pin replicas to nodes
    # started with `--resources '{"heinfer": N}'`.
    replica_resources: dict[str, float] = Field(default_factory=dict)
    max_replicas_per_node: int | None = Field(default=None, ge=1)
    # Where Serve runs its HTTP proxies: "HeadOnly" suits one machine (several nodes cannot
    # share a port) and a single Service in front of the head; "EveryNode" suits clusters.
    proxy_location: Literal["HeadOnly", "EveryNode", "Disabled"] = "HeadOnly"
    # Add X-Heinfer-Replica (replica id, node id, pid) to every response: which replica
    # answered is what you need when debugging a cluster; it reveals no addresses.
    replica_header: bool = True
    graceful_shutdown_timeout_s: float = Field(default=30.0, ge=0)
    # Replicas cache keys; a key deleted through one replica stays usable on the others until
    # their cached copy expires. Used when the service settings set no key_ttl_seconds.
    key_ttl_seconds: float = Field(default=30.0, gt=0)
    # For a Ray cluster that `heinfer serve --ray local|auto` starts itself (ignored when it
    # joins an existing one).
    object_store_bytes: int = Field(default=256 << 20, ge=75 << 20)

    @model_validator(mode="after")
    def _check_bounds(self) -> RayServeOptions:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        if self.initial_replicas is not None and not (
            self.min_replicas <= self.initial_replicas <= self.max_replicas
        ):
            raise ValueError("initial_replicas must lie between min_replicas and max_replicas")
        return self

    @property
    def worker_processes(self) -> int:
        """Default SEAL processes per replica: one per reserved CPU."""
        return max(1, math.floor(self.replica_cpus))

    def autoscaling_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
        }
        if self.initial_replicas is not None:
            config["initial_replicas"] = self.initial_replicas
        return config

    def actor_options(self, env_vars: dict[str, str] | None = None) -> dict[str, Any]:
        options: dict[str, Any] = {"num_cpus": self.replica_cpus}
        if self.replica_memory_bytes is not None:
            options["memory"] = self.replica_memory_bytes
        if self.replica_resources:
            options["resources"] = dict(self.replica_resources)
        if env_vars:
            options["runtime_env"] = {"env_vars": dict(env_vars)}
        return options


# ------------------------------------------------------------------------------------------
# The replica
# ------------------------------------------------------------------------------------------


_REQUEST_ID = b"x-request-id"


class ReplicaHeaderMiddleware:
    """Pure ASGI middleware adding `X-Heinfer-Replica` to every HTTP response.

    Pure ASGI (not BaseHTTPMiddleware) so that streamed bodies are untouched. It also drops
    the app's own X-Request-Id when the request came through Serve's proxy: the proxy put that
    id on the request (the app echoes it) and appends the same header to the response itself,
    so clients would otherwise see it twice.
    """

    def __init__(self, app: ASGIApp, value: str) -> None:
        self.app = app
        self._header = (REPLICA_HEADER.lower().encode(), value.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        via_proxy = any(name.lower() == _REQUEST_ID for name, _ in scope.get("headers", []))

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (name, value)
                    for name, value in message.get("headers", [])
                    if not (via_proxy and name.lower() == _REQUEST_ID)
                ]
                message = {**message, "headers": [*headers, self._header]}
            await send(message)

        await self.app(scope, receive, send_with_header)


def replica_identity() -> str:
    """`replica=<serve replica id>; node=<ray node id>; pid=<pid>` of the calling replica."""
    parts = []
    with contextlib.suppress(Exception):
        replica_id = ray.serve.get_replica_context().replica_id
        parts.append(f"replica={getattr(replica_id, 'unique_id', replica_id)}")
    with contextlib.suppress(Exception):
        parts.append(f"node={ray.get_runtime_context().get_node_id()}")
    parts.append(f"pid={os.getpid()}")
    return "; ".join(parts)


def _replica_app(settings: dict[str, Any], replica_header: bool) -> FastAPI:
    """Runs on each replica when it starts: the unchanged heinfer app (+ identity header)."""
    app = create_app(ServiceSettings(**settings))
    if replica_header:
        app.add_middleware(ReplicaHeaderMiddleware, value=replica_identity())
    return app


def replica_settings(settings: ServiceSettings, options: RayServeOptions) -> dict[str, Any]:
    """The settings every replica is built from, as plain JSON values.

    Paths become absolute (replicas do not run in the caller's working directory, and a bare
    relative key directory would silently differ per replica), and a key cache TTL is set
    when none was given: with several replicas, a key deleted through one of them must stop
    working on the others.
    """
    if settings.key_ttl_seconds is None:
        settings = settings.model_copy(update={"key_ttl_seconds": options.key_ttl_seconds})
    if settings.budget_store == "auto":  # one count for all replicas (server/budget.py)
        settings = settings.model_copy(update={"budget_store": budget_actor(options)})
    payload = settings.model_dump(mode="json")
    payload["model_paths"] = [str(Path(p).absolute()) for p in settings.model_paths]
    if settings.auth_file:
        payload["auth_file"] = str(Path(settings.auth_file).absolute())
    payload["key_store"] = _absolute_store_url(settings.key_store)
    return payload


def heinfer_application(
    settings: ServiceSettings,
    options: RayServeOptions | None = None,
    *,
    env_vars: dict[str, str] | None = None,
) -> Application:
    """The Serve application: one autoscaled deployment whose replicas run `create_app`.

    `settings` travel to the replicas as plain values (model paths, key store URL, limits):
    every node must see the same model files and reach the same key store. `env_vars` are set
    in the replica processes (key store credentials when the nodes do not have them).
    """
    options = options or RayServeOptions()
    payload = replica_settings(settings, options)
    header = options.replica_header

    def build() -> FastAPI:
        return _replica_app(payload, header)

    @ray.serve.ingress(build)
    class HeinferReplica:
        """One replica of the heinfer HTTP service (the FastAPI app, built on the replica)."""

    config: dict[str, Any] = {
        "name": options.deployment_name,
        "autoscaling_config": options.autoscaling_config(),
        "max_ongoing_requests": options.max_ongoing_requests,
        "ray_actor_options": options.actor_options(env_vars),
        "graceful_shutdown_timeout_s": options.graceful_shutdown_timeout_s,
    }
    if options.max_replicas_per_node is not None:
        config["max_replicas_per_node"] = options.max_replicas_per_node
    return ray.serve.deployment(**config)(HeinferReplica).bind()


def budget_actor(options: RayServeOptions) -> str:
    """The budget store of an application: one named, detached Ray actor all its replicas
    count with, so a tenant's budget does not multiply by the number of replicas."""
    return f"ray:{options.app_name}-sample-budget"


def _absolute_store_url(url: str) -> str:
    """A bare relative directory would resolve against each replica's working directory."""
    if "://" in url:
        return url
    return Path(url).absolute().as_uri()


def build_app(args: dict[str, Any]) -> Application:
    """Application builder for `serve run heinfer.ray_serve:build_app` and KubeRay.

    `args` holds `ServiceSettings` fields (model_paths, key_store, workers, limits...) and
    `RayServeOptions` fields side by side; unknown names are an error, not silently ignored.
    Per-deployment overrides in a Serve config file (autoscaling_config, ray_actor_options)
    still win over what is set here, as usual in Serve.

    Like `heinfer serve` on a non-loopback host, it refuses to run without tenant tokens
    (`auth_file`) unless `allow_anonymous: true` says so: a Serve proxy in a cluster is
    reachable by whoever reaches the cluster's Service.
    """
    args = dict(args)
    allow_anonymous = bool(args.pop("allow_anonymous", False))
    option_names = set(RayServeOptions.model_fields)
    options = RayServeOptions(**{k: args.pop(k) for k in list(args) if k in option_names})
    unknown = set(args) - set(ServiceSettings.model_fields)
    if unknown:
        raise ValueError(f"unknown heinfer arguments: {', '.join(sorted(unknown))}")
    if not args.get("auth_file") and not allow_anonymous:
        raise ValueError(
            "refusing to serve without auth_file (tenant tokens): anyone reaching the Serve "
            "proxy could upload keys and use the models; set auth_file, or allow_anonymous: true"
        )
    if isinstance(args.get("model_paths"), str):
        args["model_paths"] = [args["model_paths"]]
    args.setdefault("workers", options.worker_processes)
    return heinfer_application(ServiceSettings(**args), options)


# ------------------------------------------------------------------------------------------
# `heinfer serve --ray ADDRESS`
# ------------------------------------------------------------------------------------------


def _forwarded_env(names: tuple[str, ...] = DEFAULT_FORWARDED_ENV) -> dict[str, str]:
    return {name: os.environ[name] for name in names if os.environ.get(name)}


@contextlib.contextmanager
def _connected(address: str, options: RayServeOptions) -> Iterator[bool]:
    """ray.init for ADDRESS; yields True when this process started (and so owns) the cluster.

    `local`: always a fresh private cluster that lives as long as this process. `auto`: Ray's
    own lookup for `ray.init(address="auto")` (RAY_ADDRESS, then the latest `ray start` on this
    machine), else a fresh private cluster. Anything else (`HOST:PORT` of a cluster this machine
    is a node of, `ray://HOST:PORT` from anywhere) must be a running cluster.
    """
    connect: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
    # a cluster of our own: a bounded object store, and no dashboard (nothing here uses it)
    start = {
        **connect, "object_store_memory": options.object_store_bytes, "include_dashboard": False
    }
    started = address == "local"
    if address == "auto":
        try:
            ray.init(address="auto", **connect)
        except ConnectionError:  # no running cluster found
            started = True
    if started:
        ray.init(address="local", **start)
    elif address != "auto":
        ray.init(address=address, **connect)
    try:
        yield started
    finally:
        ray.shutdown()


def _proxy_answers(host: str, port: int, timeout: float = 10.0) -> bool:
    """True when Serve's proxy health route answers on host:port (from this machine)."""
    import httpx

    probe_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    if ":" in probe_host:
        probe_host = f"[{probe_host}]"
    try:
        return httpx.get(f"http://{probe_host}:{port}/-/healthz", timeout=timeout).is_success
    except httpx.HTTPError:
        return False


def _wait_for_signal() -> None:
    stop = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve_on_ray(
    settings: ServiceSettings,
    address: str,
    *,
    workers: int | None = None,
    options: RayServeOptions | None = None,
    forward_env: bool = True,
    announce: Callable[[str], object] = print,
) -> None:
    """Deploy heinfer on the Ray cluster at `address` and serve until SIGINT/SIGTERM.

    The Serve HTTP proxy listens on settings.host:settings.port (on the head node, or on every
    node with proxy_location=EveryNode). On exit the application is deleted; a cluster that
    this call started is shut down with it.
    """
    options = options or RayServeOptions()
    if workers is None:
        settings = settings.model_copy(update={"workers": options.worker_processes})
    env = _forwarded_env() if forward_env else {}
    with _connected(address, options) as started:
        ray.serve.start(
            proxy_location=options.proxy_location,
            http_options={"host": settings.host, "port": settings.port},
        )
        app = heinfer_application(settings, options, env_vars=env)
        ray.serve.run(app, name=options.app_name, route_prefix=options.route_prefix)
        if not _proxy_answers(settings.host, settings.port):
            # serve.start ignores new HTTP options when Serve already runs on the cluster.
            announce(
                f"warning: no Serve proxy answers on {settings.host}:{settings.port} from here; "
                "if Serve already ran on this cluster with other HTTP options it kept them "
                "(`serve shutdown` resets them)"
            )
        announce(
            f"heinfer on Ray ({'local cluster' if started else address}): "
            f"http://{settings.host}:{settings.port}{options.route_prefix.rstrip('/')} "
            f"with {options.min_replicas}-{options.max_replicas} replicas of "
            f"{settings.workers} worker process(es)"
        )
        try:
            _wait_for_signal()
        finally:
            with contextlib.suppress(Exception):
                ray.serve.delete(options.app_name)
            with contextlib.suppress(Exception):  # the next deployment counts afresh
                from heinfer.server.budget import RAY_NAMESPACE

                name = budget_actor(options).removeprefix("ray:")
                ray.kill(ray.get_actor(name, namespace=RAY_NAMESPACE))
            if started:
                with contextlib.suppress(Exception):
                    ray.serve.shutdown()
