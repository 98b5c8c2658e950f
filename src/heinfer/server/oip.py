"""The Open Inference Protocol (KServe v2) routes, beside heinfer's own.

Why a module of its own: OIP is a second *view* of the same service, not a second service.
`GET /v2` and the model metadata, readiness and version routes are answered here from what
`app.py` already holds (plans, the worker pool, the tenant check); inference stays one handler
(`app._infer`), which asks `unwrap` / `wrap` here to take the ciphertext out of an OIP request
and put the answer into an OIP response, so both framings share every check, the admission
control and the worker path. Nothing here branches on a model's kind: every model's OIP face is
one BYTES input and one BYTES output (see heinfer.protocol.oip).

The heinfer manifest, which OIP's model metadata has no room for, lives at
`GET /v2/models/{name}/manifest`; the metadata's `parameters.manifest` points there.
"""

from __future__ import annotations

from typing import Any, Protocol

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

import heinfer
from heinfer.errors import KeyNotFoundError, ModelNotFoundError
from heinfer.plans.base import Plan
from heinfer.protocol import oip

__all__ = [
    "INFER_ROUTES",
    "SERVER_NAME",
    "add_oip_routes",
    "allowed_layouts",
    "model_metadata",
    "unwrap",
    "versioned_plan",
    "wrap",
]

SERVER_NAME = "heinfer"
MODEL_ROUTE = "/v2/models/{name}"
VERSION_ROUTE = "/v2/models/{name}/versions/{version}"
INFER_ROUTES = (f"{MODEL_ROUTE}/infer", f"{VERSION_ROUTE}/infer")
# What `GET /v2` announces: only what the service really does (the binary tensor data
# extension, and the manifest route that replaces nothing OIP defines).
EXTENSIONS = [oip.BINARY_EXTENSION, "heinfer_manifest"]


class _Service(Protocol):
    """What these routes use of `app._Service` (a protocol: app.py imports this module)."""

    def tenant(self, request: Request) -> str: ...

    def plan(self, name: str) -> Plan: ...

    @property
    def pool(self) -> Any: ...

    @property
    def settings(self) -> Any: ...

    @property
    def readiness(self) -> Any: ...

    @property
    def tokens(self) -> Any: ...

    @property
    def budget(self) -> Any: ...


def _service(request: Request) -> _Service:
    svc: _Service = request.app.state.service
    return svc


def versioned_plan(svc: _Service, request: Request) -> Plan:
    """The plan a request's path names, refusing a version the model does not have (404):
    a model is served at exactly one version, its manifest's `model_version`."""
    name = str(request.path_params["name"])
    plan = svc.plan(name)
    version = request.path_params.get("version")
    if version is not None and version != str(plan.manifest.model_version):
        raise ModelNotFoundError(
            f"model {name[:64]!r} has no version {str(version)[:20]!r}; it serves version "
            f"{plan.manifest.model_version}"
        )
    return plan


def model_metadata(plan: Plan, layouts: list[str] | None = None) -> dict[str, Any]:
    """OIP model metadata: one BYTES tensor in and out (an encrypted request and response
    body); the plaintext shapes, the layouts open to the caller (`layouts`, by default every
    served one) and the manifest's route are in `parameters`."""
    manifest = plan.manifest
    if layouts is None:
        layouts = [layout.kind for layout in plan.layouts.values()]
    tensor = {"datatype": oip.BYTES, "shape": [1]}
    return {
        "name": manifest.name,
        "versions": [str(manifest.model_version)],
        "platform": f"heinfer_{manifest.layout.get('kind', 'unknown')}",
        "inputs": [{"name": oip.INPUT_NAME, **tensor}],
        "outputs": [{"name": oip.OUTPUT_NAME, **tensor}],
        "parameters": {
            "manifest": f"/v2/models/{manifest.name}/manifest",
            "key_id_parameter": oip.KEY_ID_PARAMETER,
            "layouts": sorted(layouts),
            "plaintext_input_shape": list(manifest.input.shape),
            "plaintext_output_shape": list(manifest.output.shape),
        },
    }


async def _server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": heinfer.__version__, "extensions": EXTENSIONS}


async def _model_metadata(request: Request) -> JSONResponse:
    """Like the manifest, the metadata names only the layouts open to this caller."""
    svc = _service(request)
    tenant = svc.tenant(request)
    plan = versioned_plan(svc, request)
    return JSONResponse(
        model_metadata(plan, allowed_layouts(svc, tenant, plan)),
        headers=_cache_headers(svc.tokens is not None),
    )


# The manifest changes only when the service restarts; a minute keeps a restart visible soon.
MANIFEST_MAX_AGE = 60


def allowed_layouts(svc: _Service, tenant: str, plan: Plan) -> list[str] | None:
    """The layouts the budget rules leave open to `tenant`, or None when all are open."""
    allowed = svc.budget.policy.layouts_for(tenant, plan.manifest.name, plan)
    served = {layout.kind for layout in plan.layouts.values()}
    return None if set(allowed) == served else list(allowed)


def _cache_headers(authenticated: bool) -> dict[str, str]:
    """Without auth every caller is one tenant and gets one document: any cache may keep it.
    With auth the document depends on the token: only the caller's own cache may."""
    if not authenticated:
        return {"Cache-Control": f"public, max-age={MANIFEST_MAX_AGE}"}
    return {"Cache-Control": f"private, max-age={MANIFEST_MAX_AGE}", "Vary": "Authorization"}


async def _manifest(request: Request) -> JSONResponse:
    """The compiled manifest, plus `allowed_layouts` (format_version 3) when the budget rules
    switch layouts off for this caller, so that its client picks among the open ones instead
    of meeting a 403."""
    svc = _service(request)
    tenant = svc.tenant(request)
    plan = versioned_plan(svc, request)
    manifest = plan.manifest.for_caller(allowed_layouts(svc, tenant, plan))
    return JSONResponse(manifest.to_dict(), headers=_cache_headers(svc.tokens is not None))


async def _model_ready(request: Request) -> JSONResponse:
    """200 when the model is loaded and the workers that evaluate it answer, else 503: a
    model is ready exactly when the service's evaluation side is (every worker holds every
    model). The workers' answer comes from the service's cached readiness probe, so OIP
    clients polling each model add no pings."""
    svc = _service(request)
    svc.tenant(request)
    plan = versioned_plan(svc, request)
    ok = bool((await svc.readiness.result())["workers"])  # the cached probe (readiness.py)
    body = {"name": plan.manifest.name, "ready": ok}
    headers = {} if ok else {"Retry-After": str(svc.settings.retry_after_seconds)}
    return JSONResponse(body, status_code=200 if ok else 503, headers=headers)


def add_oip_routes(app: FastAPI) -> None:
    """`GET /v2`, and model metadata, readiness and manifest with and without a version."""
    app.add_api_route("/v2", _server_metadata, methods=["GET"])
    for base in (MODEL_ROUTE, VERSION_ROUTE):
        app.add_api_route(base, _model_metadata, methods=["GET"])
        app.add_api_route(f"{base}/ready", _model_ready, methods=["GET"])
        app.add_api_route(f"{base}/manifest", _manifest, methods=["GET"])


# -- inference framing (called by app._infer) ------------------------------------------------


def unwrap(
    framing: str, body: bytes, request: Request, header_key_id: str | None
) -> oip.InferCall:
    """The ciphertext and key id of an OIP request (400 for bad framing, 404 for no key id)."""
    header_length = request.headers.get(oip.HEADER_LENGTH) if framing == "binary" else None
    call = oip.decode_request(body, header_length, header_key_id)
    if not call.key_id:
        raise KeyNotFoundError(
            f"send the key id from POST /v2/keys as the request parameter "
            f"{oip.KEY_ID_PARAMETER!r}"
        )
    return call


def wrap(call: oip.InferCall, plan: Plan, payload: bytes) -> Response:
    """The OIP response (JSON header + binary tail) around an encrypted response body."""
    body, header_length = oip.encode_response(
        payload,
        model_name=plan.manifest.name,
        model_version=str(plan.manifest.model_version),
        request_id=call.request_id,
    )
    return Response(
        body,
        media_type="application/octet-stream",
        headers={oip.HEADER_LENGTH: str(header_length)},
    )
