"""The page offers a tenant only the layouts its manifest's `allowed_layouts` names.

The service of tests/e2e/test_allowed_layouts.py (an auth file, a budget rule switching
coeff-batch of mnist off for one tenant) on loopback: that tenant's page shows only
coeff-rowpack, selected; a tenant with every layout open (the control) is offered coeff-batch
too. The token travels as every request's Authorization header (the browser context's).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service_helpers import tenant_service

pytest.importorskip("playwright.sync_api")

pytestmark = [pytest.mark.web, pytest.mark.e2e]

TENANTS = ("rowonly", "full")
RULES = [{"tenant": "rowonly", "model": "mnist", "disabled_layouts": ["coeff-batch"]}]


@pytest.fixture(scope="module")
def served(
    mnist_model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    with tenant_service(
        mnist_model_path, tmp_path_factory.mktemp("page-allowed-layouts"), TENANTS, RULES,
        "--workers", "1", "--sample-budget", "0",
    ) as served:
        yield served


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
