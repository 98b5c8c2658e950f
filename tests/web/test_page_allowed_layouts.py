"""The page offers a tenant only the layouts its manifest's `allowed_layouts` names.

The service of tests/e2e/test_allowed_layouts.py (an auth file, a budget rule switching
coeff-batch of mnist off for one tenant) on loopback: that tenant's page shows only
coeff-rowpack, selected; a tenant with every layout open (the control) is offered coeff-batch
too. The token travels as every request's Authorization header (the browser context's).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from heinfer.server.auth import new_token
from service_helpers import RunningService

pytest.importorskip("playwright.sync_api")

pytestmark = [pytest.mark.web, pytest.mark.e2e]

RULES = [{"tenant": "rowonly", "model": "mnist", "disabled_layouts": ["coeff-batch"]}]


@pytest.fixture(scope="module")
def served(
    mnist_model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("page-allowed-layouts")
    auth = root / "tokens.json"
    tokens = {tenant: new_token(tenant, auth) for tenant in ("rowonly", "full")}
    rules = root / "budget.json"
    rules.write_text(json.dumps({"rules": RULES}))
    service = RunningService([
        str(mnist_model_path), "--workers", "1", "--key-store", str(root / "keys"),
        "--auth-file", str(auth), "--budget-file", str(rules), "--sample-budget", "0",
        "--log-level", "warning",
    ])
    try:
        yield {"url": service.url, "tokens": tokens}
    finally:
        service.stop()


def _page_layouts(browser: Any, served: dict[str, Any], tenant: str) -> dict[str, Any]:
    token = served["tokens"][tenant]
    context = browser.new_context(extra_http_headers={"Authorization": f"Bearer {token}"})
    try:
        page = context.new_page()
        page.goto(f"{served['url']}/?audit=1")
        page.wait_for_selector("body[data-layouts='mnist']", state="attached", timeout=60_000)
        return {
            "options": page.eval_on_selector_all("#layout option", "all => all.map(o => o.value)"),
            "selected": page.input_value("#layout"),
            "choice_hidden": "hidden" in (page.get_attribute("#layout-row", "class") or ""),
            "client_layout": page.evaluate("window.heinferClients.get('mnist').layout"),
        }
    finally:
        context.close()


def test_page_offers_a_limited_tenant_only_its_allowed_layouts(
    served: dict[str, Any], browser: Any
) -> None:
    limited = _page_layouts(browser, served, "rowonly")
    assert limited["options"] == ["coeff-rowpack"]
    assert limited["selected"] == limited["client_layout"] == "coeff-rowpack"
    assert limited["choice_hidden"]
    # the control: every layout open, coeff-batch is offered
    full = _page_layouts(browser, served, "full")
    assert full["options"] == ["coeff-rowpack", "coeff-batch"]
    assert full["selected"] == full["client_layout"] == "coeff-rowpack"
    assert not full["choice_hidden"]
