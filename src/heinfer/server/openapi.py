"""The service's OpenAPI document, written to say exactly what the routes do.

Why not FastAPI's generated document as it is: heinfer's hot routes read raw bodies from the
`Request` (no pydantic body model, no copy), so FastAPI sees neither their binary bodies, nor
their headers, nor the path parameters of routes added with `add_api_route`; it also declares a
422 "validation error" the service never sends (validation failures are 400 here, like every
other bad input) and none of the 4xx/503 answers the checks in app.py give. Third-party tools
(Schemathesis in CI, client generators) trust this document, so it is built here from one table
of operations, each listing every status its handler can answer with; the conformance run
(tests/e2e/test_openapi_conformance.py) fails when a route answers something not listed.

Also here: the `Allow` header of a 405, which must list every method of the path (Starlette's
router names only the methods of the first route that matched the path, and GET and DELETE of
/v2/keys/{key_id} are two routes).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.routing import Match
from starlette.types import Scope

from heinfer.plans.manifest import Manifest
from heinfer.protocol import oip

__all__ = ["allowed_methods", "install_openapi"]

_ERROR = {"$ref": "#/components/schemas/Error"}
_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error", "message"],
    "properties": {
        "error": {
            "type": "string",
            "description": "a stable error code (OIP's `error` string); heinfer.errors names it",
        },
        "message": {"type": "string", "description": "what was wrong and what to do"},
    },
}
_REASONS = {
    400: "bad input: malformed body, framing, header or parameter",
    401: "missing or unknown bearer token",
    403: "refused for this tenant (a layout switched off for it)",
    404: "unknown model, version or key id (another tenant's key is unknown too)",
    408: "the body did not arrive in time",
    413: "the body exceeds the service's limit",
    422: "well-formed keys or ciphertext made for other encryption parameters",
    429: "the tenant's quota is exhausted",
    503: "temporarily unavailable (at capacity, evaluation slow, key store down): retry",
}
_RETRY_AFTER = {"Retry-After": {"schema": {"type": "integer"}, "required": True,
                                "description": "seconds to wait before retrying"}}
_BINARY = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
_BOOL = {"type": "boolean"}
_STRINGS = {"type": "array", "items": {"type": "string"}}
_TENSOR = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": {
        "name": {"type": "string"},
        "datatype": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer"}},
    },
}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _object(**properties: Any) -> dict[str, Any]:
    return {"type": "object", "required": list(properties), "properties": properties}


_READY = _object(ready=_BOOL, workers=_BOOL, key_store=_BOOL)
_MODEL_READY = _object(name={"type": "string"}, ready=_BOOL)
_MODEL_METADATA = {
    **_object(
        name={"type": "string"}, versions=_STRINGS, platform={"type": "string"},
        inputs={"type": "array", "items": _TENSOR}, outputs={"type": "array", "items": _TENSOR},
    ),
    "description": "OIP model metadata; `parameters.manifest` is the heinfer manifest's route",
}
_MODEL_METADATA["properties"]["parameters"] = {"type": "object"}

# Documents that depend on the caller's token (its open layouts)
_CALLER_CACHE = {
    "Cache-Control": {
        "schema": {"type": "string"}, "required": True,
        "description": "public without auth; private (per token) with it",
    },
    "Vary": {
        "schema": {"type": "string"}, "required": False,
        "description": "Authorization, when the service checks tokens",
    },
}

# (method, path) -> summary, success responses, error statuses, extra parameters, request body.
# `auth`: the route checks the bearer token (401 when the service has an auth file).
_OPERATIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("get", "/v2/health/live"): {
        "summary": "Liveness (OIP server live)",
        "ok": {"200": _json(_object(live=_BOOL))},
    },
    ("get", "/v2/health/ready"): {
        "summary": "Readiness (OIP server ready): workers and key store",
        "ok": {
            "200": _json(_READY),
            "503": {**_json(_READY, "not ready"), "headers": _RETRY_AFTER},
        },
    },
    ("get", "/v2"): {
        "summary": "OIP server metadata",
        "ok": {"200": _json(_object(
            name={"type": "string"}, version={"type": "string"}, extensions=_STRINGS))},
    },
    ("get", "/v2/models"): {
        "summary": "The served models", "auth": True,
        "ok": {"200": _json(_object(models={"type": "array", "items": {"type": "object"}}))},
    },
    ("get", "/v2/models/{name}"): {
        "summary": "OIP model metadata",
        "description": "`parameters.layouts` names the layouts open to the caller, as the "
        "manifest's `allowed_layouts` does.",
        "auth": True, "errors": [404],
        "ok": {"200": {**_json(_MODEL_METADATA), "headers": _CALLER_CACHE}},
    },
    ("get", "/v2/models/{name}/ready"): {
        "summary": "OIP model ready", "auth": True, "errors": [404],
        "ok": {
            "200": _json(_MODEL_READY),
            "503": {**_json(_MODEL_READY, "not ready"), "headers": _RETRY_AFTER},
        },
    },
    ("get", "/v2/models/{name}/manifest"): {
        "summary": "The heinfer manifest: what a client needs to make keys and encrypt",
        "description": (
            "The compiled manifest, the same for every caller who may use all of the model's "
            "layouts. When the service's budget rules switch layouts off for the caller, the "
            "document also holds `allowed_layouts` (the open ones) and says format_version 3; "
            "requests in the other layouts get 403 layout_disabled."
        ),
        "auth": True, "errors": [404],
        "ok": {"200": {
            **_json({"$ref": "#/components/schemas/Manifest"}),
            "headers": _CALLER_CACHE,
        }},
    },
    ("post", "/v2/models/{name}/infer"): {
        "summary": "Encrypted inference: a bare request body, or OIP binary tensor framing",
        "description": (
            "Bare (the fast path): the body is one encrypted request body, the key id in "
            "X-Heinfer-Key-Id; the answer is the encrypted response body. OIP: with "
            f"{oip.HEADER_LENGTH}, the body is a JSON inference request followed by the binary "
            f"tail; input {oip.INPUT_NAME!r} (BYTES, shape [1], binary_data_size) holds one "
            "4-byte little-endian length and the encrypted request body, the request parameter "
            f"{oip.KEY_ID_PARAMETER!r} the key id; the answer is framed the same way, its "
            f"output {oip.OUTPUT_NAME!r} holding the encrypted response body."
        ),
        "auth": True, "errors": [400, 403, 404, 408, 413, 422, 503],
        "headers": {
            "X-Heinfer-Key-Id": {"type": "string"},
            oip.HEADER_LENGTH: {"type": "integer", "minimum": 0},
        },
        "body": _BINARY,
        "ok": {"200": {
            "description": "the encrypted answer (bare, or OIP-framed when the request was)",
            "content": _BINARY,
            "headers": {oip.HEADER_LENGTH: {
                "schema": {"type": "integer"}, "required": False,
                "description": "OIP framing: the length of the JSON header",
            }},
        },
            # the extraction budget (server/budget.py): samples per window used up
            "429": {**_json(_ERROR, "the tenant's sample budget for this model is used up"),
                    "headers": _RETRY_AFTER},
        },
    },
    ("post", "/v2/keys"): {
        "summary": "Upload public key material for a model; answers its content-addressed id",
        "auth": True, "errors": [400, 404, 408, 413, 422, 429, 503],
        "query": {"model": {"type": "string"}},
        "body": _BINARY,
        "ok": {"200": _json(_object(key_id={"type": "string"}))},
    },
    ("get", "/v2/keys"): {
        "summary": "The tenant's key ids", "auth": True, "errors": [503],
        "ok": {"200": _json(_object(keys=_STRINGS))},
    },
    ("get", "/v2/keys/{key_id}"): {
        "summary": "One of the tenant's uploads", "auth": True, "errors": [404, 503],
        "ok": {"200": {"description": "the key upload as sent", "content": _BINARY}},
    },
    ("delete", "/v2/keys/{key_id}"): {
        "summary": "Delete one of the tenant's keys", "auth": True, "errors": [404, 503],
        "ok": {"204": {"description": "deleted"}},
    },
    ("get", "/metrics"): {
        "summary": "Prometheus metrics",
        "ok": {"200": {"description": "OK", "content": {"text/plain": {"schema": {
            "type": "string"}}}}},
    },
}
# The /versions/{version} forms answer like the unversioned routes.
for (_method, _path), _spec in list(_OPERATIONS.items()):
    if _path.startswith("/v2/models/{name}"):
        _versioned = _path.replace("/v2/models/{name}", "/v2/models/{name}/versions/{version}")
        _OPERATIONS[(_method, _versioned)] = _spec

_PATH_PARAM = re.compile(r"{(\w+)}")


def install_openapi(app: FastAPI, *, auth: bool, models: Iterable[tuple[str, int]]) -> None:
    """Make `app.openapi()` return the document of `_OPERATIONS` (cached, like FastAPI's).

    `auth`: whether the service checks bearer tokens (then 401 is a possible answer);
    `models`: (name, version) of each served model, given as examples of the path parameters.
    """
    served = list(models)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title, version=app.version, routes=app.routes,
                description="heinfer: encrypted inference; OIP (KServe v2) with binary data",
            )
            _rewrite(document, auth=auth, served=served)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _rewrite(document: dict[str, Any], *, auth: bool, served: list[tuple[str, int]]) -> None:
    components = document.setdefault("components", {})
    schemas: dict[str, Any] = {"Error": _ERROR_SCHEMA}
    manifest = Manifest.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(manifest.pop("$defs", {}))
    schemas["Manifest"] = manifest
    components["schemas"] = schemas
    if auth:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    examples = {
        "name": [name for name, _ in served],
        "version": sorted({str(version) for _, version in served}),
    }
    for path, operations in document["paths"].items():
        for method in list(operations):
            spec = _OPERATIONS.get((method, path))
            if spec is None:
                raise RuntimeError(f"{method.upper()} {path} is not documented in openapi.py")
            operations[method] = _operation(path, spec, auth=auth, examples=examples)


def _operation(
    path: str, spec: dict[str, Any], *, auth: bool, examples: dict[str, list[str]]
) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": spec["summary"]}
    if "description" in spec:
        operation["description"] = spec["description"]
    parameters = []
    for name in _PATH_PARAM.findall(path):
        schema: dict[str, Any] = {"type": "string"}
        if examples.get(name):
            schema["examples"] = examples[name]
        parameters.append({"name": name, "in": "path", "required": True, "schema": schema})
    for name, schema in spec.get("query", {}).items():
        example = {"examples": examples["name"]} if name == "model" and examples["name"] else {}
        parameters.append(
            {"name": name, "in": "query", "required": True, "schema": {**schema, **example}}
        )
    for name, schema in spec.get("headers", {}).items():
        parameters.append({"name": name, "in": "header", "required": False, "schema": schema})
    if parameters:
        operation["parameters"] = parameters
    if "body" in spec:
        operation["requestBody"] = {"required": True, "content": spec["body"]}
    responses = dict(spec["ok"])
    statuses = set(spec.get("errors", []))
    if auth and spec.get("auth"):
        statuses.add(401)
        operation["security"] = [{"bearer": []}]
    if spec.get("query") or spec.get("headers") or "body" in spec:
        statuses.add(400)  # a missing or malformed parameter is a 400 with a message
    for status in sorted(statuses):
        if str(status) in responses:
            continue
        response = _json(_ERROR, _REASONS[status])
        if status == 503:
            response["headers"] = _RETRY_AFTER
        if status == 401:
            response["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"},
                                                        "required": True}}
        responses[str(status)] = response
    operation["responses"] = responses
    return operation


def allowed_methods(app: FastAPI, scope: Scope) -> str:
    """The `Allow` header value for a 405: every method of every route matching the path."""
    methods: set[str] = set()
    for route in app.router.routes:
        match, _ = route.matches({**scope, "method": "\0"})  # no method matches: path only
        if match is not Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return ", ".join(sorted(methods))
