"""The HTTP service: Open-Inference-Protocol-style routes over binary HE payloads.

Errors are mapped to HTTP in one place (`_heinfer_error`); every route validates sizes and
framing before any HE work, and HE work runs in worker processes, never on the event loop.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client import generate_latest

from heinfer.errors import (
    HeinferError,
    KeyNotFoundError,
    ModelNotFoundError,
    PayloadTooLargeError,
    QuotaExceededError,
    ServiceUnavailableError,
)
from heinfer.models import load_model
from heinfer.plans.manifest import Manifest
from heinfer.plans.wire import decode_request, encode_response
from heinfer.server.auth import PUBLIC_TENANT, TokenRegistry
from heinfer.server.keystore import KeyStore, open_key_store
from heinfer.server.settings import ServiceSettings
from heinfer.server.workers import WorkerPool

__all__ = ["KEY_ID_HEADER", "create_app"]

KEY_ID_HEADER = "X-Heinfer-Key-Id"
log = logging.getLogger("heinfer.service")


@dataclass
class _Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "heinfer_requests_total", "HTTP requests", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "heinfer_request_seconds", "request latency by route", ["route"], registry=r
        )
        self.stage = Histogram(
            "heinfer_stage_seconds", "time per stage", ["stage"], registry=r,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1, 5),
        )
        self.bytes_in = Counter("heinfer_bytes_in_total", "request body bytes", registry=r)
        self.bytes_out = Counter("heinfer_bytes_out_total", "response body bytes", registry=r)
        self.samples = Counter("heinfer_samples_total", "encrypted samples evaluated", registry=r)


@dataclass
class _Service:
    settings: ServiceSettings
    manifests: dict[str, Manifest]
    store: KeyStore
    pool: WorkerPool
    tokens: TokenRegistry | None
    limiter: anyio.CapacityLimiter
    metrics: _Metrics
    deleted: set[tuple[str, str]] = field(default_factory=set)

    def tenant(self, request: Request) -> str:
        if self.tokens is None:
            return PUBLIC_TENANT
        return self.tokens.tenant_for(request.headers.get("authorization"))

    def manifest(self, name: str) -> Manifest:
        try:
            return self.manifests[name]
        except KeyError:
            known = ", ".join(sorted(self.manifests)) or "none"
            raise ModelNotFoundError(f"unknown model {name!r}; served models: {known}") from None


async def _body(request: Request, limit: int) -> bytes:
    """Read at most `limit` bytes, refusing early from Content-Length when it is larger."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"body of {declared} bytes exceeds the {limit}-byte limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"body exceeds the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def _heinfer_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HeinferError)
    headers = {}
    if isinstance(exc, ServiceUnavailableError):
        headers["Retry-After"] = str(exc.retry_after)
    return JSONResponse(exc.to_dict(), status_code=exc.status, headers=headers)


def _unexpected_error(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error", exc_info=exc)
    return JSONResponse(
        {"error": "internal_error", "message": "internal error; see the service log"},
        status_code=500,
    )


def create_app(settings: ServiceSettings) -> FastAPI:
    """The ASGI app; models load at startup, workers start in the lifespan."""
    manifests = {}
    for path in settings.model_paths:
        manifest = load_model(path).manifest
        manifests[manifest.name] = manifest

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = open_key_store(
            settings.key_store,
            cache_bytes=settings.key_cache_bytes,
            ttl_seconds=settings.key_ttl_seconds,
        )
        pool = WorkerPool(
            list(settings.model_paths), settings.key_store, settings.workers,
            settings.key_cache_bytes,
        )
        tokens = TokenRegistry.from_file(settings.auth_file) if settings.auth_file else None
        app.state.service = _Service(
            settings, manifests, store, pool, tokens,
            anyio.CapacityLimiter(settings.max_concurrent_requests), _Metrics(),
        )
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(pool.shutdown)

    app = FastAPI(title="heinfer", version="0.1.0", lifespan=lifespan)
    app.add_exception_handler(HeinferError, _heinfer_error)
    app.add_exception_handler(Exception, _unexpected_error)

    def service(request: Request) -> _Service:
        svc: _Service = request.app.state.service
        return svc

    @app.middleware("http")
    async def observe(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        started = time.perf_counter()
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex[:16]
        response = await call_next(request)
        route = request.scope.get("route")
        name = getattr(route, "path", "unmatched")
        svc: _Service | None = getattr(request.app.state, "service", None)
        if svc is not None:
            svc.metrics.requests.labels(name, str(response.status_code)).inc()
            svc.metrics.latency.labels(name).observe(time.perf_counter() - started)
        response.headers["X-Request-Id"] = request_id
        log.info(
            "request",
            extra={
                "request_id": request_id, "method": request.method, "route": name,
                "status": response.status_code,
                "ms": round((time.perf_counter() - started) * 1e3, 2),
            },
        )
        return response

    @app.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready(request: Request) -> JSONResponse:
        svc = service(request)
        workers_ok = await svc.pool.ready()
        try:
            await anyio.to_thread.run_sync(svc.store.check)
            store_ok = True
        except HeinferError:
            store_ok = False
        ok = workers_ok and store_ok
        body = {"ready": ok, "workers": workers_ok, "key_store": store_ok}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v2/models")
    async def list_models(request: Request) -> dict[str, list[dict[str, object]]]:
        svc = service(request)
        return {
            "models": [
                {"name": m.name, "version": m.model_version, "estimator": m.estimator,
                 "inputs": m.n_features, "outputs": m.n_outputs}
                for m in svc.manifests.values()
            ]
        }

    @app.get("/v2/models/{name}")
    async def get_manifest(name: str, request: Request) -> JSONResponse:
        return JSONResponse(service(request).manifest(name).to_dict())

    @app.post("/v2/keys")
    async def upload_key(request: Request, model: str) -> dict[str, str]:
        svc = service(request)
        tenant = svc.tenant(request)
        svc.manifest(model)
        body = await _body(request, svc.settings.max_key_bytes)
        await svc.pool.validate_key(model, body)
        count, used = await anyio.to_thread.run_sync(svc.store.usage, tenant)
        if count + 1 > svc.settings.max_keys_per_tenant:
            raise QuotaExceededError(
                f"tenant holds {count} keys; the limit is {svc.settings.max_keys_per_tenant}"
            )
        if used + len(body) > svc.settings.max_key_bytes_per_tenant:
            raise QuotaExceededError("tenant key storage quota exceeded; delete unused keys")
        key_id = await anyio.to_thread.run_sync(svc.store.put, tenant, body)
        svc.deleted.discard((tenant, key_id))
        return {"key_id": key_id}

    @app.delete("/v2/keys/{key_id}")
    async def delete_key(key_id: str, request: Request) -> Response:
        svc = service(request)
        tenant = svc.tenant(request)
        await anyio.to_thread.run_sync(svc.store.delete, tenant, key_id)
        svc.deleted.add((tenant, key_id))
        return Response(status_code=204)

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: Request) -> Response:
        svc = service(request)
        tenant = svc.tenant(request)
        manifest = svc.manifest(name)
        key_id = request.headers.get(KEY_ID_HEADER)
        if not key_id:
            raise KeyNotFoundError(f"send the key id from POST /v2/keys in {KEY_ID_HEADER}")
        if (tenant, key_id) in svc.deleted:
            raise KeyNotFoundError(f"unknown key id {key_id!r}")
        body = await _body(request, svc.settings.max_body_bytes)
        records = decode_request(
            body, max_records=manifest.max_batch, max_record_bytes=svc.settings.max_key_bytes
        )
        svc.metrics.bytes_in.inc(len(body))
        async with svc.limiter:
            started = time.perf_counter()
            results = await svc.pool.infer(name, tenant, key_id, records)
            svc.metrics.stage.labels("evaluate").observe(time.perf_counter() - started)
        payload = encode_response(results)
        svc.metrics.bytes_out.inc(len(payload))
        svc.metrics.samples.inc(len(records))
        return Response(payload, media_type="application/octet-stream")

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        svc = service(request)
        return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
