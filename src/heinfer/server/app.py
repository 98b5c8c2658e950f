"""The HTTP service: Open-Inference-Protocol-style routes over binary HE payloads.

Errors are mapped to HTTP in one place (`_heinfer_error`); HE work runs in worker processes,
never on the event loop. Every route checks, in this order and before any HE work:

1. the bearer token (401), when the service has an auth file;
2. the model name (404) and, for inference, the key id header;
3. admission: at most `max_concurrent_requests + max_queued_requests` requests may be inside
   the HE routes at once; the next one gets 503 + Retry-After at once instead of queueing;
4. the body size, from Content-Length before reading and while reading (413), within
   `body_timeout_seconds` (408);
5. the framing, the parameter fingerprint and the exact byte length of every ciphertext and
   key (400/413/422), computed in this process from the model's public parameters;
6. the key's existence for *this* tenant (404, identical for absent and foreign keys) and the
   tenant's quotas (429);
7. for inference, the extraction budget: layouts switched off for the tenant (403) and the
   samples it may have evaluated of this model in the window (429 + Retry-After;
   `server/budget.py`);

and only then waits (at most `queue_timeout_seconds`, else 503) for an evaluation slot. Inside
the worker, SEAL's validating loaders do the remaining checks (coefficient ranges) before
evaluation. Log lines are JSON objects carrying a request id; they hold request metadata only,
never bodies, keys or tokens.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from heinfer.errors import (
    AuthError,
    BadInputError,
    BudgetExceededError,
    HeinferError,
    KeyNotFoundError,
    ModelNotFoundError,
    PayloadTooLargeError,
    QuotaExceededError,
    ServiceUnavailableError,
)
from heinfer.models import load_model
from heinfer.plans.base import Plan
from heinfer.protocol import oip
from heinfer.server import oip as oip_routes
from heinfer.server.auth import PUBLIC_TENANT, TokenFile
from heinfer.server.budget import (
    BudgetPolicy,
    ExtractionBudget,
    budget_warnings,
    open_budget_store,
)
from heinfer.server.keystore import KeyStore, key_id_for, open_key_store
from heinfer.server.openapi import allowed_methods, install_openapi
from heinfer.server.readiness import CachedProbe
from heinfer.server.settings import ServiceSettings
from heinfer.server.workers import WorkerPool
from heinfer.web import mount_page, page_enabled

__all__ = ["KEY_ID_HEADER", "JsonLogFormatter", "create_app", "logging_config"]

KEY_ID_HEADER = "X-Heinfer-Key-Id"
log = logging.getLogger("heinfer.service")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_KEY_ID = re.compile(r"[0-9a-f]{64}")
_UNKNOWN_KEY = "unknown key id: upload a public key with POST /v2/keys and use the id it returns"


# ------------------------------------------------------------------------------------------
# Logging: one JSON object per line
# ------------------------------------------------------------------------------------------

# Only these `extra` fields are ever written: a log call cannot leak a body by accident.
_LOG_FIELDS = (
    "request_id", "method", "route", "status", "ms", "tenant", "bytes_in", "bytes_out",
    "error", "tenants", "restarts",
)


class JsonLogFormatter(logging.Formatter):
    """`{"ts": ..., "level": ..., "logger": ..., "msg": ..., <whitelisted extras>}`."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in _LOG_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                document[name] = value
        if record.exc_info:
            document["exc"] = self.formatException(record.exc_info)
        return json.dumps(document, default=str)


def logging_config(level: str = "info") -> dict[str, Any]:
    """A `logging.config.dictConfig` for uvicorn's `log_config`: JSON lines on stderr."""
    level = level.upper()
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonLogFormatter}},
        "handlers": {"default": handler},
        "loggers": {
            "heinfer": {"handlers": ["default"], "level": level, "propagate": False},
            "uvicorn": {"handlers": ["default"], "level": level, "propagate": False},
            "uvicorn.error": {"level": level},
            # The access log would duplicate our request lines (and carries no request id).
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
        },
    }


# ------------------------------------------------------------------------------------------
# Metrics, per-model checks, admission control
# ------------------------------------------------------------------------------------------


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
        self.rejected = Counter(
            "heinfer_rejected_total", "requests refused by admission control", ["reason"],
            registry=r,
        )
        self.admitted = Gauge(
            "heinfer_requests_admitted", "requests inside the HE routes (running or queued)",
            registry=r,
        )
        self.readiness_probes = Gauge(
            "heinfer_readiness_probes", "readiness probes of the workers and key store run",
            registry=r,
        )
        self.worker_restarts = Gauge(
            "heinfer_worker_restarts", "times the worker pool was restarted after a crash",
            registry=r,
        )
        self.evaluate_seconds = self.stage.labels("evaluate")
        # (route template, status) -> its counter and histogram: labels() is a locked lookup
        # per call, and routes and statuses are few
        self._per_route: dict[tuple[str, int], tuple[Any, Any]] = {}

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        children = self._per_route.get((route, status))
        if children is None:
            children = (self.requests.labels(route, str(status)), self.latency.labels(route))
            self._per_route[(route, status)] = children
        children[0].inc()
        children[1].observe(seconds)


class _Admission:
    """Bounded admission: running + queued requests never exceed a fixed number."""

    def __init__(self, settings: ServiceSettings, metrics: _Metrics) -> None:
        # asyncio's semaphore: anyio's CapacityLimiter looks up the current task on every
        # acquire and release, and this is on every request
        self._slots = asyncio.Semaphore(settings.max_concurrent_requests)
        self._capacity = settings.max_concurrent_requests + settings.max_queued_requests
        self._queue_timeout = settings.queue_timeout_seconds
        self._retry_after = settings.retry_after_seconds
        self._metrics = metrics
        self.admitted = 0
        self._body_budget = settings.max_inflight_body_bytes
        self.body_bytes = 0

    def admit(self, request: Request, limit: int) -> _Admitted:
        """Count the request in, with its body's size (Content-Length, else `limit`) in the
        in-flight budget; 503 at once when either is full."""
        if self.admitted >= self._capacity:
            self._metrics.rejected.labels("busy").inc()
            raise ServiceUnavailableError(
                "the service is at capacity; retry later", retry_after=self._retry_after
            )
        declared = request.headers.get("content-length", "")
        size = min(int(declared), limit) if declared.isdigit() else limit
        if self.body_bytes and self.body_bytes + size > self._body_budget:
            self._metrics.rejected.labels("memory").inc()
            raise _unread(ServiceUnavailableError(
                "the service holds as many large requests as it may; retry later",
                retry_after=self._retry_after,
            ))
        return _Admitted(self, size)

    def slot(self) -> _Slot:
        """An evaluation slot, waited for at most `queue_timeout_seconds`."""
        return _Slot(self)

    async def acquire_slot(self) -> None:
        if self._slots.locked():
            await self._wait_for_slot()
        else:
            await self._slots.acquire()  # the common case: free at once, no timer needed

    def release_slot(self) -> None:
        self._slots.release()

    async def _wait_for_slot(self) -> None:
        try:
            async with asyncio.timeout(self._queue_timeout):
                await self._slots.acquire()
        except TimeoutError:
            self._metrics.rejected.labels("queue_timeout").inc()
            raise ServiceUnavailableError(
                "no evaluation slot became free in time; retry later",
                retry_after=self._retry_after,
            ) from None


class _Admitted:
    """One admitted request's place (a class, not a generator: it is on every request)."""

    def __init__(self, admission: _Admission, size: int) -> None:
        self._admission = admission
        self._size = size

    def __enter__(self) -> None:
        self._admission.admitted += 1
        self._admission.body_bytes += self._size

    def __exit__(self, *_: object) -> None:
        self._admission.admitted -= 1
        self._admission.body_bytes -= self._size


class _Slot:
    def __init__(self, admission: _Admission) -> None:
        self._admission = admission

    async def __aenter__(self) -> None:
        await self._admission.acquire_slot()

    async def __aexit__(self, *_: object) -> None:
        self._admission.release_slot()


@dataclass
class _Service:
    settings: ServiceSettings
    plans: dict[str, Plan]  # used for `check` and `check_keys` only: no HE work here
    store: KeyStore
    pool: WorkerPool
    tokens: TokenFile | None
    admission: _Admission
    metrics: _Metrics
    budget: ExtractionBudget
    readiness: CachedProbe
    tenant_locks: dict[str, anyio.Lock] = field(default_factory=dict)

    def tenant(self, request: Request) -> str:
        if self.tokens is None:
            tenant = PUBLIC_TENANT
        else:
            tenant = self.tokens.tenant_for(request.headers.get("authorization"))
        request.state.tenant = tenant
        return tenant

    def plan(self, name: str) -> Plan:
        try:
            return self.plans[name]
        except KeyError:
            known = ", ".join(sorted(self.plans)) or "none"
            raise ModelNotFoundError(
                f"unknown model {name[:64]!r}; served models: {known}"
            ) from None

    def tenant_lock(self, tenant: str) -> anyio.Lock:
        lock = self.tenant_locks.get(tenant)
        if lock is None:
            lock = self.tenant_locks[tenant] = anyio.Lock()
        return lock

    async def evaluate(self, call: Any) -> Any:
        """Await one worker-pool call with the evaluation time limit."""
        try:
            # asyncio's own timeout: cheaper than anyio's cancel scope (docs/performance.md)
            async with asyncio.timeout(self.settings.evaluation_timeout_seconds):
                return await call
        except TimeoutError:
            raise ServiceUnavailableError(
                "evaluation took too long; retry later",
                retry_after=self.settings.retry_after_seconds,
            ) from None

    async def require_key(self, tenant: str, key_id: str) -> None:
        """404 unless the tenant holds this key; asked without downloading it (the worker that
        evaluates fetches and parses the key itself, once, into its cache)."""
        if _KEY_ID.fullmatch(key_id) is None:
            raise KeyNotFoundError(_UNKNOWN_KEY)
        found = self.store.exists_cached(tenant, key_id)
        if found is None:
            found = await anyio.to_thread.run_sync(self.store.exists, tenant, key_id)
        if not found:
            raise KeyNotFoundError(_UNKNOWN_KEY)

    async def existing_key(self, tenant: str, key_id: str) -> bytes:
        """The tenant's key bytes; absent, foreign and malformed ids are all the same 404."""
        if _KEY_ID.fullmatch(key_id) is None:
            raise KeyNotFoundError(_UNKNOWN_KEY)
        cached = self.store.get_cached(tenant, key_id)
        if cached is not None:
            return cached
        try:
            data: bytes = await anyio.to_thread.run_sync(self.store.get, tenant, key_id)
        except KeyNotFoundError:
            raise KeyNotFoundError(_UNKNOWN_KEY) from None
        return data


# ------------------------------------------------------------------------------------------
# Error mapping and the request observer
# ------------------------------------------------------------------------------------------


async def _body(request: Request, limit: int, timeout: float) -> bytes:
    """Read at most `limit` bytes, refusing early from Content-Length when it is larger."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _unread(PayloadTooLargeError(f"body of {declared[:20]} bytes exceeds the "
                                           f"{limit}-byte limit"))
    chunks, size, more = [], 0, True
    try:
        async with asyncio.timeout(timeout):
            while more:  # ASGI messages as they come: Request.stream() adds a generator
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    raise BadInputError("the client disconnected while sending the body")
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise _unread(PayloadTooLargeError(f"body exceeds the {limit}-byte limit"))
                chunks.append(chunk)
                more = message.get("more_body", False)
    except TimeoutError:
        raise _unread(
            _RequestTimeoutError(f"the body did not arrive within {timeout:g} s")
        ) from None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class _RequestTimeoutError(BadInputError):
    status = 408
    code = "request_timeout"


def _unread(exc: HeinferError) -> HeinferError:
    """Mark an error raised with most of the body unread: the connection must then close,
    rather than the server reading (and discarding) an arbitrarily large remainder."""
    exc.close_connection = True  # type: ignore[attr-defined]
    return exc


def _heinfer_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HeinferError)
    headers = {}
    if isinstance(exc, ServiceUnavailableError | BudgetExceededError):
        headers["Retry-After"] = str(exc.retry_after)
    if isinstance(exc, AuthError):
        headers["WWW-Authenticate"] = 'Bearer realm="heinfer"'
    if getattr(exc, "close_connection", False):
        headers["Connection"] = "close"
    return JSONResponse(exc.to_dict(), status_code=exc.status, headers=headers)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    message = exc.detail if isinstance(exc.detail, str) else "request refused"
    headers = exc.headers
    if exc.status_code == 405:  # every method of the path, not only the first route's
        headers = {**(headers or {}), "Allow": allowed_methods(request.app, request.scope)}
    return JSONResponse(
        {"error": code, "message": message}, status_code=exc.status_code, headers=headers
    )


def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    fields = sorted({".".join(str(p) for p in e.get("loc", ())) for e in exc.errors()})
    message = "invalid or missing request parameters: " + ", ".join(fields)[:200]
    return JSONResponse({"error": BadInputError.code, "message": message}, status_code=400)


def _unexpected_error(_: Request, exc: Exception) -> JSONResponse:
    log.error("unexpected error", exc_info=exc)
    return JSONResponse(
        {"error": "internal_error", "message": "internal error; see the service log"},
        status_code=500,
    )


class _Observe:
    """Pure ASGI middleware: request id, metrics and one JSON log line per request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        # Ids need to be unique, not secret: a random per-process prefix and a counter (a
        # uuid4 per request was a getrandom syscall on the hot path).
        self._id_prefix = secrets.token_hex(4)
        self._id_counter = itertools.count()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        supplied = ""
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id":
                supplied = value.decode("latin-1")
                break
        if _REQUEST_ID.fullmatch(supplied):
            request_id = supplied
        else:
            request_id = f"{self._id_prefix}{next(self._id_counter):08x}"
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        id_bytes = request_id.encode()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", id_bytes)]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", "unmatched")
            svc: _Service | None = getattr(scope["app"].state, "service", None)
            if svc is not None:
                svc.metrics.observe_request(route, status, elapsed)
            if log.isEnabledFor(logging.INFO):  # the fields are not built for nothing
                log.info(
                    "request",
                    extra={
                        "request_id": request_id, "method": scope.get("method"),
                        "route": route, "status": status, "ms": round(elapsed * 1e3, 2),
                        "tenant": state.get("tenant"),
                    },
                )


# ------------------------------------------------------------------------------------------
# Inference: the hot path
# ------------------------------------------------------------------------------------------

INFER_ROUTE = "/v2/models/{name}/infer"


async def _infer(request: Request) -> Response:
    """POST /v2/models/{name}/infer: an encrypted request body in, an encrypted answer out,
    either bare (the fast path) or in OIP framing (`oip.framing` decides from the headers)."""
    name = str(request.path_params["name"])
    svc: _Service = request.app.state.service
    tenant = svc.tenant(request)
    plan = oip_routes.versioned_plan(svc, request)
    settings = svc.settings
    key_id = request.headers.get(KEY_ID_HEADER, "")
    framing = oip.framing(request.headers)
    if not key_id and framing is None:
        raise KeyNotFoundError(f"send the key id from POST /v2/keys in {KEY_ID_HEADER}")
    with svc.admission.admit(request, settings.max_body_bytes):
        if framing is None:  # the key is checked before a large body is read
            await svc.require_key(tenant, key_id)
        body = await _body(request, settings.max_body_bytes, settings.body_timeout_seconds)
        if framing is not None:  # the key id is inside the body
            call = oip_routes.unwrap(framing, body, request, key_id)
            body, key_id = call.tensor, call.key_id
            await svc.require_key(tenant, key_id)
        checked = plan.check(body)
        svc.metrics.bytes_in.inc(len(body))
        async with svc.budget.charge(tenant, name, checked), svc.admission.slot():
            started = time.perf_counter()
            try:
                parts = plan.split(checked, svc.pool.workers)
                results = await svc.evaluate(svc.pool.infer(name, tenant, key_id, parts))
            except KeyNotFoundError:  # deleted meanwhile: the same answer as above
                raise KeyNotFoundError(_UNKNOWN_KEY) from None
            svc.metrics.evaluate_seconds.observe(time.perf_counter() - started)
    payload = plan.join(checked, results)
    svc.metrics.bytes_out.inc(len(payload))
    svc.metrics.samples.inc(checked.samples)
    if framing is not None:
        return oip_routes.wrap(call, plan, payload)
    return Response(payload, media_type="application/octet-stream")


# ------------------------------------------------------------------------------------------
# The app
# ------------------------------------------------------------------------------------------


def create_app(settings: ServiceSettings) -> FastAPI:
    """The ASGI app; models load at startup, workers start in the lifespan."""
    plans: dict[str, Plan] = {}
    for path in settings.model_paths:
        plan = load_model(path).plan
        plans[plan.manifest.name] = plan
    policy = BudgetPolicy(
        settings.sample_budget, settings.sample_budget_window_seconds, settings.budget_rules
    )
    policy.check_against(plans)  # a rule naming no served model or layout is a typo: refuse

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        tokens = TokenFile(settings.auth_file) if settings.auth_file else None
        store = open_key_store(
            settings.key_store,
            cache_bytes=settings.key_cache_bytes,
            ttl_seconds=settings.key_ttl_seconds,
        )
        pool = WorkerPool(
            list(settings.model_paths), settings.key_store, settings.workers,
            settings.key_cache_bytes,
        )
        metrics = _Metrics()
        metrics.worker_restarts.set_function(lambda: pool.restarts)
        admission = _Admission(settings, metrics)
        metrics.admitted.set_function(lambda: admission.admitted)
        budget = ExtractionBudget(
            policy, open_budget_store(settings.budget_store),
            lambda reason: metrics.rejected.labels(reason).inc(),
        )
        for line in budget_warnings(policy, plans):
            log.warning(line)
        readiness = CachedProbe(lambda: _probe(pool, store), settings.ready_cache_seconds)
        metrics.readiness_probes.set_function(lambda: readiness.probes)
        app.state.service = _Service(
            settings, plans, store, pool, tokens, admission, metrics, budget, readiness
        )
        try:
            yield
        finally:
            await pool.aclose()
            store.close()
            budget.store.close()

    app = FastAPI(
        title="heinfer", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None
    )
    app.add_exception_handler(HeinferError, _heinfer_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected_error)

    def service(request: Request) -> _Service:
        svc: _Service = request.app.state.service
        return svc

    for route in oip_routes.INFER_ROUTES:  # INFER_ROUTE and its /versions/{version} form
        app.add_api_route(route, _infer, methods=["POST"])
    oip_routes.add_oip_routes(app)  # GET /v2, model metadata, readiness, manifest
    app.add_middleware(_Observe)

    if page_enabled(settings.web_page, settings.host):  # the browser page at /
        mount_page(app)

    @app.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready(request: Request) -> JSONResponse:
        svc = service(request)
        body = await svc.readiness.result()  # cached: server/readiness.py
        ok = body["ready"]
        headers = {} if ok else {"Retry-After": str(svc.settings.retry_after_seconds)}
        return JSONResponse(body, status_code=200 if ok else 503, headers=headers)

    @app.get("/v2/models")
    async def list_models(request: Request) -> dict[str, list[dict[str, object]]]:
        svc = service(request)
        svc.tenant(request)
        return {
            "models": [
                {"name": m.name, "version": m.model_version, "estimator": m.estimator,
                 "inputs": m.n_features, "outputs": m.n_outputs}
                for m in (plan.manifest for plan in svc.plans.values())
            ]
        }

    @app.post("/v2/keys")
    async def upload_key(request: Request, model: str) -> dict[str, str]:
        svc = service(request)
        tenant = svc.tenant(request)
        plan = svc.plan(model)
        settings = svc.settings
        with svc.admission.admit(request, settings.max_key_bytes):
            body = await _body(request, settings.max_key_bytes, settings.body_timeout_seconds)
            plan.check_keys(body)
            key_id = key_id_for(body)
            await _check_quota(svc, tenant, key_id, len(body))
            async with svc.admission.slot():
                await svc.evaluate(svc.pool.validate_key(model, body))
            async with svc.tenant_lock(tenant):  # quota check and put are one step per tenant
                await _check_quota(svc, tenant, key_id, len(body))
                stored = await anyio.to_thread.run_sync(svc.store.put, tenant, body)
        svc.metrics.bytes_in.inc(len(body))
        return {"key_id": stored}

    @app.get("/v2/keys")
    async def list_keys(request: Request) -> dict[str, list[str]]:
        svc = service(request)
        tenant = svc.tenant(request)
        return {"keys": await anyio.to_thread.run_sync(svc.store.list_keys, tenant)}

    @app.get("/v2/keys/{key_id}")
    async def get_key(key_id: str, request: Request) -> Response:
        svc = service(request)
        tenant = svc.tenant(request)
        data = await svc.existing_key(tenant, key_id)
        return Response(data, media_type="application/octet-stream")

    @app.delete("/v2/keys/{key_id}")
    async def delete_key(key_id: str, request: Request) -> Response:
        svc = service(request)
        tenant = svc.tenant(request)
        if _KEY_ID.fullmatch(key_id) is None:
            raise KeyNotFoundError(_UNKNOWN_KEY)
        try:
            async with svc.tenant_lock(tenant):
                await anyio.to_thread.run_sync(svc.store.delete, tenant, key_id)
        except KeyNotFoundError:
            raise KeyNotFoundError(_UNKNOWN_KEY) from None
        return Response(status_code=204)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        svc = service(request)
        return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    install_openapi(  # after every route: the document describes them all (openapi.py)
        app, auth=settings.auth_file is not None,
        models=[(p.manifest.name, p.manifest.model_version) for p in plans.values()],
    )
    return app


async def _probe(pool: WorkerPool, store: KeyStore) -> dict[str, bool]:
    """One readiness probe: every worker answers a ping, the key store answers a check."""
    workers_ok = await pool.ready(timeout=10.0)
    try:
        await anyio.to_thread.run_sync(store.check)
        store_ok = True
    except Exception as exc:  # any failure means "not ready", never a 500
        if not isinstance(exc, HeinferError):
            log.warning("key store check failed unexpectedly", exc_info=exc)
        store_ok = False
    return {"ready": workers_ok and store_ok, "workers": workers_ok, "key_store": store_ok}


async def _check_quota(svc: _Service, tenant: str, key_id: str, size: int) -> None:
    """429 when one more key would pass the tenant's limits (re-uploading a held key is free)."""
    count, used = await anyio.to_thread.run_sync(svc.store.usage, tenant)
    limits = svc.settings
    if count + 1 <= limits.max_keys_per_tenant and used + size <= limits.max_key_bytes_per_tenant:
        return
    try:
        await anyio.to_thread.run_sync(svc.store.get, tenant, key_id)
        return  # identical bytes already stored: the put is a no-op
    except KeyNotFoundError:
        pass
    if count + 1 > limits.max_keys_per_tenant:
        raise QuotaExceededError(
            f"tenant holds {count} keys; the limit is {limits.max_keys_per_tenant}: "
            "delete unused keys"
        )
    raise QuotaExceededError("tenant key storage quota exceeded; delete unused keys")
