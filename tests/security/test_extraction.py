"""Red team against a real `heinfer serve`: model extraction through honest answers, and what
the service's error bodies and tenant scoping give away.

The extraction is the one of issue 20: the zero vector and the 784 unit vectors (785 samples)
answered in one coeff-batch request recover every weight and intercept of the MNIST logistic
regression, because the scores are W.x + b. The extraction budget (server/budget.py) stops it
when set below 785 samples per window, whether the samples come in one request or in many and
in either layout. Every attack runs against its defence and, as a negative control, against a
tenant for whom that defence is off, where it must succeed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

import heinfer
from heinfer.plans.linear import LinearCodec
from service_helpers import tenant_service

pytestmark = pytest.mark.e2e

BUDGET = 700  # below the 785 samples that extract the model
TENANTS = ("one", "spread", "control", "rowonly", "owner", "intruder")
RULES = [
    {"tenant": "one", "samples": BUDGET},
    {"tenant": "spread", "samples": BUDGET},
    {"tenant": "control", "samples": 0},  # the negative control: no budget
    {"tenant": "rowonly", "model": "mnist", "disabled_layouts": ["coeff-batch"]},
]


@pytest.fixture(scope="module")
def redteam(
    mnist_model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    with tenant_service(
        mnist_model_path, tmp_path_factory.mktemp("redteam"), TENANTS, RULES,
        "--workers", "1",
    ) as served:
        yield served


class _Tenant(heinfer.Client):
    """A client that also keeps its URL and token, to send raw requests (status, headers)."""

    def __init__(self, url: str, token: str) -> None:
        super().__init__(url, model="mnist", token=token)
        self.url, self.token = url, token
        self.upload_keys()


def _client(redteam: dict[str, Any], tenant: str) -> _Tenant:
    return _Tenant(redteam["url"], redteam["tokens"][tenant])


def _post(client: _Tenant, body: bytes, key_id: str | None = None) -> httpx.Response:
    return httpx.post(
        f"{client.url}/v2/models/mnist/infer", content=body, timeout=300,
        headers={"Authorization": f"Bearer {client.token}",
                 "X-Heinfer-Key-Id": key_id or client.key_id or ""},
    )


def _probe_inputs() -> np.ndarray:
    """The zero image and the 784 one-pixel images: 785 samples."""
    return np.vstack([np.zeros((1, 784)), np.eye(784)])


def _extract(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """W and b from the answers to `_probe_inputs`: b = s(0), W[:, i] = s(e_i) - s(0)."""
    intercept = scores[0]
    return (scores[1:] - intercept).T, intercept


def _assert_refused(response: httpx.Response) -> None:
    assert response.status_code == 429, response.text
    assert response.json()["error"] == "sample_budget_exceeded"
    assert 1 <= int(response.headers["Retry-After"]) <= 3600


def test_one_request_extraction_is_refused_and_succeeds_without_budget(
    redteam: dict[str, Any], mnist_estimator: LogisticRegression
) -> None:
    X = _probe_inputs()
    attacker = _client(redteam, "one")
    _assert_refused(_post(attacker, attacker.encrypt(X, layout="coeff-batch")))
    # honest use below the budget is unaffected: the refused request took nothing
    small = attacker.encrypt(X[:BUDGET], layout="coeff-batch")
    assert _post(attacker, small).status_code == 200

    control = _client(redteam, "control")  # the same attack, budget off: it works
    response = _post(control, control.encrypt(X, layout="coeff-batch"))
    assert response.status_code == 200
    W, b = _extract(control.decrypt(response.content))
    weight_error = np.abs(W - mnist_estimator.coef_).max()
    intercept_error = np.abs(b - mnist_estimator.intercept_).max()
    print(f"recovered 7,850 weights to {weight_error:.2g}, intercepts to {intercept_error:.2g} "
          f"(precision.max_abs_error {control.manifest.precision.max_abs_error:.2g})")
    # issue 20 found 6.5e-6 and 2.9e-6 on its model; here: within the scores' own precision,
    # while the weights themselves are of order 0.1
    bound = control.manifest.precision.max_abs_error
    assert weight_error <= 2 * bound and intercept_error <= bound
    assert weight_error < 1e-4 < 1e-2 < np.abs(mnist_estimator.coef_).max()
    manifest = control.manifest.privacy.extraction
    assert manifest is not None and manifest.exact and manifest.samples == len(X)


def test_extraction_spread_over_requests_and_layouts_is_refused(redteam: dict[str, Any]) -> None:
    X = _probe_inputs()
    attacker = _client(redteam, "spread")
    answered = 0
    for i in range(5):  # the rowpack layout counts as well
        assert _post(attacker, attacker.encrypt(X[i], layout="coeff-rowpack")).status_code == 200
        answered += 1
    refused = None
    for start in range(5, len(X), 100):
        response = _post(attacker, attacker.encrypt(X[start : start + 100], layout="coeff-batch"))
        if response.status_code != 200:
            refused = response
            break
        answered += min(100, len(X) - start)
    assert refused is not None
    _assert_refused(refused)
    assert answered <= BUDGET < len(X)
    assert answered > BUDGET - 100  # honest use up to the budget went through


def test_batch_layout_switched_off_per_tenant(redteam: dict[str, Any]) -> None:
    X = _probe_inputs()[:20]
    limited = _client(redteam, "rowonly")
    with pytest.raises(heinfer.errors.LayoutDisabledError):  # its manifest says so: refused
        limited.encrypt(X, layout="coeff-batch")
    limited.allowed_layouts = tuple(limited.codec.layouts)  # an attacker ignores the manifest
    response = _post(limited, limited.encrypt(X, layout="coeff-batch"))
    assert response.status_code == 403 and response.json()["error"] == "layout_disabled"
    assert _post(limited, limited.encrypt(X[0], layout="coeff-rowpack")).status_code == 200
    control = _client(redteam, "control")  # the same request from another tenant
    assert _post(control, control.encrypt(X, layout="coeff-batch")).status_code == 200


def test_seal_exception_text_never_reaches_the_client(
    redteam: dict[str, Any], mnist_model: heinfer.EncryptedModel
) -> None:
    """A rowpack record with one byte of SEAL's seed area flipped: SEAL's loader raises (with
    its own text, the negative control below) and the body says only that SEAL refused it."""
    client = _client(redteam, "control")
    body = bytearray(client.encrypt(np.zeros(784), layout="coeff-rowpack"))
    body[-80] ^= 0xFF
    response = _post(client, bytes(body))
    assert response.status_code == 400, response.text
    message = response.json()["message"]
    assert "rejected by SEAL" in message
    codec = LinearCodec(mnist_model.manifest)
    record = bytes(body[-codec.context.request_bytes :])
    with pytest.raises(heinfer.errors.MalformedPayloadError) as raised:
        mnist_model.plan.context.load_request(record)
    seal_text = str(raised.value.__cause__)
    assert seal_text and "SEAL" in seal_text  # what SEAL said, kept in the chain...
    assert seal_text not in message  # ...and not sent


def test_another_tenants_key_and_traversal_ids_are_unknown(redteam: dict[str, Any]) -> None:
    owner = _client(redteam, "owner")
    intruder = _client(redteam, "intruder")
    body = intruder.encrypt(np.zeros(784))  # under the intruder's own secret key
    for key_id in (owner.key_id, "../" * 8 + "etc/passwd", "..%2F..%2Fkeys"):
        response = _post(intruder, body, key_id=key_id)
        assert response.status_code == 404 and response.json()["error"] == "key_not_found"
        assert httpx.get(
            f"{intruder.url}/v2/keys/{key_id}", timeout=30,
            headers={"Authorization": f"Bearer {intruder.token}"},
        ).status_code == 404
    # the control: the key exists and the same request succeeds for its owner
    assert _post(owner, owner.encrypt(np.zeros(784))).status_code == 200
