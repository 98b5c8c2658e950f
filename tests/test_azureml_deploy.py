"""deploy/azureml, checked offline with the Azure ML SDK v2's own YAML loaders (no account).

`load_online_endpoint` / `load_online_deployment` / `load_model` validate the files against the
SDK's schemas (unknown fields and wrong types are errors). On top, what the schemas cannot
say: the probe and scoring routes are routes the service really has (matched against the
FastAPI app `heinfer serve` builds), the key store comes from environment variables only and
uses the managed identity (no secret), and the image's command finds the mounted model and
takes its key store from the environment.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from starlette.routing import Match
from typer.testing import CliRunner

import heinfer
from heinfer.server.app import create_app
from heinfer.server.settings import ServiceSettings

azure_ai_ml = pytest.importorskip("azure.ai.ml")

AZUREML = Path(__file__).resolve().parents[1] / "deploy" / "azureml"


@pytest.fixture(scope="module")
def deployment():  # type: ignore[no-untyped-def]
    return azure_ai_ml.load_online_deployment(AZUREML / "deployment.yml")


def test_endpoint_uses_key_auth_and_a_managed_identity() -> None:
    endpoint = azure_ai_ml.load_online_endpoint(AZUREML / "endpoint.yml")
    assert endpoint.name == "heinfer-mnist" and endpoint.auth_mode == "key"
    assert endpoint.identity.type == "system_assigned"


def test_registered_model_loads() -> None:
    model = azure_ai_ml.load_model(AZUREML / "model.yml")
    assert model.type == "custom_model" and str(model.version) == "1"


def test_routes_are_the_services_own(
    deployment, mnist_estimator, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    endpoint = azure_ai_ml.load_online_endpoint(AZUREML / "endpoint.yml")
    assert deployment.endpoint_name == endpoint.name
    config = deployment.environment.inference_config
    routes = {kind: config[f"{kind}Route"] for kind in ("liveness", "readiness", "scoring")}
    assert {route["port"] for route in routes.values()} == {8000}
    assert routes["liveness"]["path"] == "/v2/health/live"
    assert routes["readiness"]["path"] == "/v2/health/ready"
    # The scoring route names the model the deployment mounts: serve one of that name.
    model_name = routes["scoring"]["path"].split("/")[3]
    assert deployment.model == f"{model_name}:1"
    saved = heinfer.compile(mnist_estimator, name=model_name, input_range=(0.0, 1.0)).save(
        tmp_path / "model.heinfer"
    )
    app = create_app(ServiceSettings(model_paths=[str(saved)]))
    for kind, method in (("liveness", "GET"), ("readiness", "GET"), ("scoring", "POST")):
        scope = {"type": "http", "method": method, "path": routes[kind]["path"]}
        assert any(r.matches(scope)[0] is Match.FULL for r in app.router.routes), kind
    # ... and the model route answers for that name only (a typo would be a 404 at run time)
    assert [plan.manifest.name for plan in [heinfer.load_model(saved).plan]] == [model_name]


def test_key_store_from_environment_with_managed_identity(deployment) -> None:  # type: ignore[no-untyped-def]
    env = deployment.environment_variables
    assert env["HEINFER_KEY_STORE"].startswith("azure://")
    assert env["AZURE_STORAGE_ACCOUNT_URL"].startswith("https://")
    assert not {"AZURE_STORAGE_CONNECTION_STRING", "AZURE_CLIENT_SECRET"} & set(env)


def test_image_command_finds_the_mounted_model_and_reads_the_environment(
    deployment, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    cmd = next(
        line for line in (AZUREML / "Dockerfile").read_text().splitlines()
        if line.startswith("CMD ")
    )
    args = [a.strip('",[] ') for a in shlex.split(cmd[4:].replace(",", " "))]
    args = [a for a in args if a]
    assert args[0] == f"{deployment.model_mount_path}/model.heinfer"
    assert "--key-store" not in args  # from HEINFER_KEY_STORE
    assert "--allow-anonymous" in args  # behind the endpoint's key auth

    from heinfer.cli import app

    monkeypatch.setenv("HEINFER_KEY_STORE", "azure://heinfer-keys")
    shown = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    assert "HEINFER_KEY_STORE" in shown.output
