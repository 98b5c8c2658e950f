"""The browser page `heinfer serve` shows at `/`: encrypt a digit in the page, infer, decrypt.

The page and its JavaScript client are built from `web/` (npm) into `static/` here and committed
as reviewed build output, so an installed heinfer serves them without npm or a network (see
web/README.md). Everything the page loads comes from these routes, each response carrying a
Content-Security-Policy that allows only this origin plus WebAssembly compilation (node-seal's
SEAL), so the page cannot load or send anything elsewhere even if a script were injected.
"""

from __future__ import annotations

import ipaddress
from importlib import resources
from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response

__all__ = ["CONTENT_SECURITY_POLICY", "mount_page", "page_enabled", "page_files"]

# 'wasm-unsafe-eval' lets the page compile WebAssembly (SEAL) and nothing else: no eval, no
# inline script or style, no other origin, no framing, no form posts, no plugins.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; style-src 'self'; "
    "img-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'; form-action 'none'"
)
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".wasm": "application/wasm",
}


def page_enabled(setting: bool | None, host: str) -> bool:
    """The page is on by default only where the service listens on loopback: elsewhere a
    deployment opts in (`--page`), since the page lets any visitor use the models."""
    if setting is not None:
        return setting
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def page_files() -> dict[str, bytes]:
    """Every file of the built page by its path under /web/ (read once at startup)."""
    root = resources.files("heinfer.web") / "static"
    files: dict[str, bytes] = {}

    def walk(node: Any, prefix: str) -> None:
        for child in node.iterdir():
            name = f"{prefix}{child.name}"
            if child.is_dir():
                walk(child, f"{name}/")
            elif any(name.endswith(ext) for ext in _TYPES):
                files[name] = child.read_bytes()

    walk(root, "")
    return files


def _response(body: bytes, name: str) -> Response:
    kind = next(t for ext, t in _TYPES.items() if name.endswith(ext))
    return Response(
        body,
        media_type=kind,
        headers={
            "Content-Security-Policy": CONTENT_SECURITY_POLICY,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-cache",
        },
    )


def mount_page(app: FastAPI) -> None:
    """GET / (the page) and GET /web/{file} (its scripts, style and SEAL's WebAssembly)."""
    files = page_files()
    index = files.pop("index.html")

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        return _response(index, "index.html")

    @app.get("/web/{name:path}", include_in_schema=False)
    async def asset(name: str) -> Response:
        body = files.get(name)
        if body is None:
            return Response(status_code=404)
        return _response(body, name)
