"""The page heinfer serves is web/'s build output, committed under src/heinfer/web/static.

`pip install .` ships that directory as package data, so a user never runs npm. This test
rebuilds the page from web/src and web/node_modules (`npm ci` in web/, as .ci/run does) and
fails when the committed copy differs: edit web/src, run `npm run build` in web/, commit both.
It also checks the service answers for every file with the page's CSP.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from heinfer.web import CONTENT_SECURITY_POLICY, page_enabled, page_files
from service_helpers import REPO, RunningService

pytestmark = pytest.mark.web

STATIC = REPO / "src" / "heinfer" / "web" / "static"


def tree(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def test_committed_page_is_the_build_of_web_src(tmp_path: Path) -> None:
    node = shutil.which("node")
    assert node, "node is not installed (Debian: apt-get install nodejs)"
    modules = REPO / "web" / "node_modules" / "node-seal"
    assert modules.is_dir(), "run `npm ci` in web/ first (.ci/run does)"
    subprocess.run([node, str(REPO / "web" / "build.mjs"), str(tmp_path)], check=True, timeout=60)
    built, committed = tree(tmp_path), tree(STATIC)
    assert built.keys() == committed.keys()
    stale = [name for name in built if built[name] != committed[name]]
    assert not stale, f"stale build output (npm run build in web/): {stale}"


@pytest.mark.e2e
def test_every_file_is_served_with_the_policy(service: RunningService) -> None:
    """The session's loopback service (no --page flag: on by default there)."""
    client = httpx.Client(base_url=service.url)
    files = page_files()
    assert "vendor/node-seal/seal_throws.wasm" in files and "index.html" in files
    index = client.get("/")
    assert index.status_code == 200 and b'src="web/page.js"' in index.content
    for name, body in files.items():
        if name == "index.html":
            continue
        response = client.get(f"/web/{name}")
        assert response.status_code == 200 and response.content == body, name
        assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert response.headers["x-content-type-options"] == "nosniff"
    wasm = client.get("/web/vendor/node-seal/seal_throws.wasm")
    assert wasm.headers["content-type"] == "application/wasm"
    assert client.get("/web/../__init__.py").status_code == 404
    assert client.get("/web/nothing.js").status_code == 404
    client.close()


def test_page_is_on_by_default_only_on_loopback() -> None:
    assert page_enabled(None, "127.0.0.1") and page_enabled(None, "::1")
    assert page_enabled(None, "localhost")
    assert not page_enabled(None, "0.0.0.0") and not page_enabled(None, "example.org")
    assert page_enabled(True, "0.0.0.0") and not page_enabled(False, "127.0.0.1")
