"""A tenant whose batch layout the budget rules switch off is told so by the manifest, and its
client works through the single-image layout, against a real `heinfer serve` on loopback.

Why: before `allowed_layouts`, a client picked the batch layout from the public manifest once
enough samples were asked for (about 440 MNIST digits) and got a 403. The negative control is
a client ignoring the field: it still picks coeff-batch and still meets the 403.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

import heinfer
from heinfer.errors import LayoutDisabledError
from heinfer.plans.wire import decode_keys
from linear_helpers import random_packed_head
from service_helpers import RunningService, tenant_service

pytestmark = pytest.mark.e2e

SAMPLES = 480  # above the ~440 digits from which an unrestricted client picks coeff-batch
TENANTS = ("rowonly", "full")
RULES = [{"tenant": "rowonly", "model": "mnist", "disabled_layouts": ["coeff-batch"]}]


@pytest.fixture(scope="module")
def served(
    mnist_model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    with tenant_service(
        mnist_model_path, tmp_path_factory.mktemp("allowed-layouts"), TENANTS, RULES,
        "--workers", "2", "--sample-budget", "0",
    ) as served:
        yield served


def _manifest(served: dict[str, Any], tenant: str) -> httpx.Response:
    token = served["tokens"][tenant]
    return httpx.get(f"{served['url']}/v2/models/mnist/manifest", timeout=30,
                     headers={"Authorization": f"Bearer {token}"})


def _client(served: dict[str, Any], tenant: str) -> heinfer.Client:
    return heinfer.Client(served["url"], model="mnist", token=served["tokens"][tenant])


def test_manifest_names_the_open_layouts_for_this_tenant_only(
    served: dict[str, Any], mnist_model: heinfer.EncryptedModel
) -> None:
    limited = _manifest(served, "rowonly")
    assert limited.status_code == 200
    document = limited.json()
    assert document["allowed_layouts"] == ["coeff-rowpack"] and document["format_version"] == 3
    assert limited.headers["Cache-Control"].startswith("private")
    assert limited.headers["Vary"] == "Authorization"
    # the field is what the OpenAPI document says it is
    schema = httpx.get(f"{served['url']}/openapi.json", timeout=30).json()
    operation = schema["paths"]["/v2/models/{name}/manifest"]["get"]
    assert "Cache-Control" in operation["responses"]["200"]["headers"]
    manifest_schema = {**schema["components"]["schemas"]["Manifest"],
                       "components": schema["components"]}
    jsonschema.validate(document, manifest_schema)
    # the control: a tenant with every layout open gets the compiled document unchanged
    full = _manifest(served, "full")
    assert full.json() == mnist_model.manifest.to_dict()
    assert "allowed_layouts" not in full.json()


def test_model_metadata_names_the_same_open_layouts(
    served: dict[str, Any], mnist_model: heinfer.EncryptedModel
) -> None:
    """OIP model metadata agrees with the manifest on what this tenant may use; the control is
    a tenant with every layout open, which sees every served layout."""
    def metadata(tenant: str) -> httpx.Response:
        return httpx.get(f"{served['url']}/v2/models/mnist", timeout=30,
                         headers={"Authorization": f"Bearer {served['tokens'][tenant]}"})

    limited = metadata("rowonly")
    assert limited.json()["parameters"]["layouts"] == ["coeff-rowpack"]
    assert limited.headers["Cache-Control"].startswith("private")
    assert limited.headers["Vary"] == "Authorization"
    served_layouts = sorted(layout.kind for layout in mnist_model.plan.layouts.values())
    assert len(served_layouts) > 1
    assert metadata("full").json()["parameters"]["layouts"] == served_layouts


def test_predict_uses_the_single_image_layout_with_correct_answers(
    served: dict[str, Any], mnist: dict[str, np.ndarray], mnist_estimator: LogisticRegression
) -> None:
    X = mnist["X_test"][:SAMPLES]
    with _client(served, "rowonly") as client:
        assert client.allowed_layouts == ("coeff-rowpack",)
        assert client.layout_for(SAMPLES) == "coeff-rowpack"
        assert client.batch_capacity == 0
        scores = client.predict(X)
    expected = mnist_estimator.decision_function(X)
    assert np.abs(scores - expected).max() <= client.manifest.precision.max_abs_error
    assert (scores.argmax(1) == expected.argmax(1)).all()
    with _client(served, "full") as control:  # the same call would batch for another tenant
        assert control.layout_for(SAMPLES) == "coeff-batch"


def test_client_ignoring_the_field_meets_the_403(
    served: dict[str, Any], mnist: dict[str, np.ndarray]
) -> None:
    """The negative control: the rule is enforced by the service, whatever the client picks."""
    X = mnist["X_test"][:SAMPLES]
    with _client(served, "rowonly") as client:
        client.allowed_layouts = tuple(client.codec.layouts)  # as if the field were not there
        assert client.layout_for(SAMPLES) == "coeff-batch"
        with pytest.raises(LayoutDisabledError, match="send one sample per request"):
            client.predict(X)
        response = httpx.post(
            f"{served['url']}/v2/models/mnist/infer", content=client.encrypt(X), timeout=120,
            headers={"Authorization": f"Bearer {served['tokens']['rowonly']}",
                     "X-Heinfer-Key-Id": client.key_id or ""},
        )
    assert response.status_code == 403 and response.json()["error"] == "layout_disabled"


def test_forced_disallowed_layout_fails_before_encryption(
    served: dict[str, Any], mnist: dict[str, np.ndarray]
) -> None:
    X = mnist["X_test"][:4]
    with _client(served, "rowonly") as client:
        def no_encryption(*_: Any, **__: Any) -> bytes:
            raise AssertionError("encrypted although the layout is switched off")

        client.codec.encrypt = no_encryption  # type: ignore[method-assign]
        for call in (lambda: client.predict(X, layout="coeff-batch"),
                     lambda: client.encrypt(X, layout="coeff-batch"),
                     lambda: client.upload_keys(layout="coeff-batch")):
            with pytest.raises(LayoutDisabledError, match="allowed: coeff-rowpack"):
                call()
        assert client.key_id is None  # nothing was uploaded either


def test_anonymous_manifest_is_one_public_document(
    mnist_model_path: Path, mnist_model: heinfer.EncryptedModel, tmp_path: Path
) -> None:
    """Without auth every caller is one tenant: a model-wide rule gives every caller the same
    document, which any cache may keep."""
    rules = tmp_path / "budget.json"
    rules.write_text(json.dumps({"rules": [{"model": "mnist",
                                            "disabled_layouts": ["coeff-batch"]}]}))
    service = RunningService([
        str(mnist_model_path), "--workers", "1", "--key-store", str(tmp_path / "keys"),
        "--budget-file", str(rules), "--log-level", "warning",
    ])
    try:
        first = httpx.get(f"{service.url}/v2/models/mnist/manifest", timeout=30)
        second = httpx.get(f"{service.url}/v2/models/mnist/manifest", timeout=30)
    finally:
        service.stop()
    assert first.content == second.content
    assert first.headers["Cache-Control"].startswith("public") and "Vary" not in first.headers
    expected = mnist_model.manifest.for_caller(["coeff-rowpack"]).to_dict()
    assert first.json() == expected


def test_keys_cover_only_the_open_layouts(tmp_path: Path) -> None:
    """A tenant that may not use coeff-packed uploads no Galois keys; a tenant with every
    layout open (the control) uploads them, and both get correct answers; a tenant with no
    open layout is told so before anything is made or uploaded."""
    rng = np.random.default_rng(7)
    plan = random_packed_head(rng, "head")
    assert {layout.kind for layout in plan.layouts.values()} == {
        "coeff-batch", "coeff-packed", "coeff-rowpack"
    }
    path = heinfer.EncryptedModel(plan).save(tmp_path / "head.heinfer")
    rules = [{"tenant": "nopacked", "model": "head", "disabled_layouts": ["coeff-packed"]},
             {"tenant": "nothing", "model": "head",
              "disabled_layouts": ["coeff-batch", "coeff-packed", "coeff-rowpack"]}]
    X = rng.uniform(0, 1, (3, 700))
    expected = plan.predict_plain(X)
    with tenant_service(path, tmp_path, ("nopacked", "full", "nothing"), rules,
                        "--workers", "1", "--sample-budget", "0") as served:
        with heinfer.Client(served["url"], model="head",
                            token=served["tokens"]["nothing"]) as shut_out:
            with pytest.raises(LayoutDisabledError, match="every layout"):
                shut_out.upload_keys()
            assert shut_out.key_id is None
        parts = {}
        for tenant in ("nopacked", "full"):
            with heinfer.Client(served["url"], model="head",
                                token=served["tokens"][tenant]) as client:
                client.upload_keys()
                parts[tenant] = set(decode_keys(client.last_key_upload)[1])
                scores = client.predict(X)
                assert (scores.argmax(1) == expected.argmax(1)).all()
                client.delete_keys()
    assert parts == {"nopacked": {"public"}, "full": {"public", "galois"}}
