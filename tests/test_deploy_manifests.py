"""The container and cluster manifests, checked without a cluster or a Docker engine.

* Kubernetes objects (deploy/k8s) are validated against the Kubernetes OpenAPI schemas that
  `kubernetes-validate` bundles (offline, strict: unknown fields are errors), for the oldest
  and newest Kubernetes versions we claim.
* The KubeRay `RayService` (deploy/ray) has no schema on PyPI: it is validated against
  RAYSERVICE_SCHEMA below, a JSON Schema written here for the CRD fields we use (modelled on
  KubeRay's ray.io/v1 CRD; unknown fields are errors), while its embedded pod templates,
  resources and security contexts go through the real Kubernetes schemas, and serveConfigV2
  through Ray Serve's own config schema with the builder it names actually called.
* Lint-style rules for what a schema cannot say: non-root, read-only root filesystem,
  probes on the right routes, resource limits, pinned image tags, HPA -> Deployment,
  selectors that match, secrets only by reference, CLI arguments that `heinfer serve` parses.
* The Dockerfile is parsed: slim base, multi-stage wheel build, non-root USER, HEALTHCHECK.
"""

from __future__ import annotations

import importlib.resources
import json
import re
import shlex
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.specifiers import SpecifierSet
from referencing import Registry, Resource

REPO = Path(__file__).resolve().parents[1]
K8S_DIR = REPO / "deploy" / "k8s"
RAY_DIR = REPO / "deploy" / "ray"
# The oldest Kubernetes release still maintained by major providers, and the newest bundled.
K8S_VERSIONS = ["1.29", ".".join(kubernetes_validate.latest_version().split(".")[:2])]
SECRET_ENV = {"AZURE_STORAGE_CONNECTION_STRING", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
# Kubernetes' resource.Quantity syntax (the OpenAPI schema only says "int or string").
QUANTITY = re.compile(
    r"^[+-]?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE][+-]?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)


def _docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _k8s_objects() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{path.name}:{doc['kind']}", doc)
        for path in sorted(K8S_DIR.glob("*.yaml"))
        for doc in _docs(path)
        if doc.get("kind") != "Kustomization"
    ]


def _one(kind: str) -> dict[str, Any]:
    found = [doc for _, doc in _k8s_objects() if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


@cache
def _definitions_registry(version: str) -> Registry:
    """Kubernetes' definitions as kubernetes-validate bundles them (strict variant)."""
    root = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    folder = next(
        d
        for d in sorted(root.iterdir(), key=lambda d: d.name, reverse=True)
        if d.name.startswith(f"v{version}.") and d.name.endswith("-local-strict")
    )
    definitions = json.loads((folder / "_definitions.json").read_text())
    return Resource.from_contents(definitions) @ Registry()


def _validate_definition(obj: Any, definition: str, version: str) -> None:
    """Validate a sub-object (a pod template, resources...) against one k8s definition."""
    registry = _definitions_registry(version)
    schema = {"$ref": f"https://kubernetes.io/api/_definitions.json#/$defs/{definition}"}
    jsonschema.Draft202012Validator(schema, registry=registry).validate(obj)


# ------------------------------------------------------------------------------------------
# Kubernetes objects
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("obj", [o for _, o in _k8s_objects()], ids=[n for n, _ in _k8s_objects()])
def test_k8s_objects_match_the_kubernetes_schema(obj: dict[str, Any], version: str) -> None:
    kubernetes_validate.validate(obj, version, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    (kustomization,) = _docs(K8S_DIR / "kustomization.yaml")
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def _containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod_spec.get("initContainers", []), *pod_spec["containers"]]


def _check_hardened_pod(pod_spec: dict[str, Any], where: str) -> None:
    """Non-root, no privilege escalation, read-only root fs with /tmp and /dev/shm emptyDirs,
    limits on everything, pinned images, no service account token, secrets by reference."""
    pod_security = pod_spec.get("securityContext", {})
    assert pod_security.get("runAsNonRoot") is True, where
    assert pod_security.get("runAsUser", 0) != 0, where
    assert pod_security.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
    assert pod_spec.get("automountServiceAccountToken") is False, where
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    for container in _containers(pod_spec):
        name = f"{where}/{container['name']}"
        security = container.get("securityContext", {})
        assert security.get("allowPrivilegeEscalation") is False, name
        assert security.get("readOnlyRootFilesystem") is True, name
        assert security.get("capabilities", {}).get("drop") == ["ALL"], name
        assert security.get("runAsUser", 1) != 0 and not security.get("privileged"), name

        image = container["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and "/" not in tag and tag not in ("", "latest"), f"{name}: {image}"

        resources = container.get("resources", {})
        for section in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources.get(section, {})), f"{name}: {section}"
            for value in resources[section].values():
                assert QUANTITY.match(str(value)), f"{name}: {section} {value!r}"

        mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
        assert all(m["name"] in volumes for m in mounts.values()), name
        assert "emptyDir" in volumes[mounts["/tmp"]["name"]], f"{name}: /tmp"
        shm = volumes[mounts["/dev/shm"]["name"]].get("emptyDir", {})
        assert shm.get("medium") == "Memory" and shm.get("sizeLimit"), f"{name}: /dev/shm"
        for volume in volumes.values():  # scratch space is bounded
            if "emptyDir" in volume:
                assert QUANTITY.match(str(volume["emptyDir"].get("sizeLimit", ""))), where

        for env in container.get("env", []):
            if env["name"] in SECRET_ENV or re.search(r"SECRET|PASSWORD|TOKEN", env["name"]):
                assert "value" not in env, f"{name}: {env['name']} must come from a Secret"
                assert "secretKeyRef" in env.get("valueFrom", {}), f"{name}: {env['name']}"


def test_deployment_is_hardened_and_probed() -> None:
    deployment = _one("Deployment")
    pod_spec = deployment["spec"]["template"]["spec"]
    _check_hardened_pod(pod_spec, "Deployment")
    (container,) = pod_spec["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000}
    probes = {kind: container[kind]["httpGet"] for kind in ("readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == "/v2/health/ready"
    assert probes["livenessProbe"]["path"] == "/v2/health/live"
    assert all(p["port"] in ports for p in probes.values())
    assert container["startupProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_store_credentials_and_tokens_are_only_referenced() -> None:
    assert not [name for name, obj in _k8s_objects() if obj["kind"] == "Secret"]
    config = _one("ConfigMap")["data"]
    assert not SECRET_ENV & set(config)
    assert not [k for k in config if re.search(r"SECRET|PASSWORD|TOKEN|CONNECTION", k)]
    container = _one("Deployment")["spec"]["template"]["spec"]["containers"][0]
    referenced = {
        e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e
    }
    assert set(referenced) == SECRET_ENV
    assert {ref["name"] for ref in referenced.values()} == {"heinfer-store"}


def test_configmap_settings_are_real_settings() -> None:
    from heinfer.server.settings import ServiceSettings

    fields = set(ServiceSettings.model_fields)
    for key in _one("ConfigMap")["data"]:
        if key.startswith("HEINFER_"):
            assert key.removeprefix("HEINFER_").lower() in fields, key
    ServiceSettings(
        **{
            k.removeprefix("HEINFER_").lower(): v
            for k, v in _one("ConfigMap")["data"].items()
            if k.startswith("HEINFER_")
        }
    )


def test_deployment_arguments_parse_as_heinfer_serve() -> None:
    """$(VAR) references resolve from the ConfigMap, and the CLI knows every option."""
    import typer.main

    from heinfer.cli import app

    container = _one("Deployment")["spec"]["template"]["spec"]["containers"][0]
    config = _one("ConfigMap")["data"]
    assert {ref["configMapRef"]["name"] for ref in container["envFrom"]} == {"heinfer-config"}

    def substitute(arg: str) -> str:
        return re.sub(r"\$\((\w+)\)", lambda m: config[m.group(1)], arg)

    args = [substitute(a) for a in container["args"]]
    command = typer.main.get_command(app)
    serve = command.commands["serve"]  # type: ignore[attr-defined]
    context = serve.make_context("serve", args)
    assert context.params["host"] == "0.0.0.0" and context.params["port"] == 8000
    assert context.params["auth_file"] is not None  # a non-loopback host needs tokens
    assert context.params["key_store"].split("://")[0] in {"azure", "s3"}


def test_service_and_disruption_budget_select_the_pods() -> None:
    labels = _one("Deployment")["spec"]["template"]["metadata"]["labels"]
    service = _one("Service")
    assert service["spec"]["selector"].items() <= labels.items()
    ports = _one("Deployment")["spec"]["template"]["spec"]["containers"][0]["ports"]
    assert service["spec"]["ports"][0]["targetPort"] in {p["name"] for p in ports}
    pdb = _one("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_hpa_scales_the_deployment_on_cpu() -> None:
    hpa, deployment = _one("HorizontalPodAutoscaler"), _one("Deployment")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        "apps/v1",
        "Deployment",
        deployment["metadata"]["name"],
    )
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    # Utilization is relative to requests: every container must request CPU.
    for container in deployment["spec"]["template"]["spec"]["containers"]:
        assert "cpu" in container["resources"]["requests"]


# ------------------------------------------------------------------------------------------
# KubeRay RayService
# ------------------------------------------------------------------------------------------

_QUANTITY_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_POD_TEMPLATE = {"type": "object", "required": ["spec"]}  # checked against k8s separately

RAYSERVICE_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "KubeRay RayService (ray.io/v1), the fields heinfer uses",
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayService"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "additionalProperties": False,
            "properties": {
                "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"},
                "namespace": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "spec": {
            "type": "object",
            "required": ["serveConfigV2", "rayClusterConfig"],
            "additionalProperties": False,
            "properties": {
                "serveConfigV2": {"type": "string", "minLength": 1},
                "upgradeStrategy": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "type": {"enum": ["NewCluster", "NewClusterWithIncrementalUpgrade", "None"]}
                    },
                },
                "rayClusterDeletionDelaySeconds": {"type": "integer", "minimum": 0},
                "excludeHeadPodFromServeSvc": {"type": "boolean"},
                "rayClusterConfig": {"$ref": "#/$defs/RayClusterSpec"},
            },
        },
    },
    "$defs": {
        "RayStartParams": {"type": "object", "additionalProperties": {"type": "string"}},
        "RayClusterSpec": {
            "type": "object",
            "required": ["headGroupSpec"],
            "additionalProperties": False,
            "properties": {
                "rayVersion": {"type": "string", "pattern": r"^\d+\.\d+\.\d+$"},
                "enableInTreeAutoscaling": {"type": "boolean"},
                "autoscalerOptions": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
                        "idleTimeoutSeconds": {"type": "integer", "minimum": 0},
                        "image": {"type": "string"},
                        "imagePullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
                        "resources": {"type": "object"},
                        "securityContext": {"type": "object"},
                        "env": {"type": "array"},
                    },
                },
                "headGroupSpec": {
                    "type": "object",
                    "required": ["rayStartParams", "template"],
                    "additionalProperties": False,
                    "properties": {
                        "rayStartParams": {"$ref": "#/$defs/RayStartParams"},
                        "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                        "template": _POD_TEMPLATE,
                    },
                },
                "workerGroupSpecs": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["groupName", "rayStartParams", "template"],
                        "additionalProperties": False,
                        "properties": {
                            "groupName": {"type": "string", "minLength": 1},
                            "replicas": {"type": "integer", "minimum": 0},
                            "minReplicas": {"type": "integer", "minimum": 0},
                            "maxReplicas": {"type": "integer", "minimum": 0},
                            "idleTimeoutSeconds": {"type": "integer", "minimum": 0},
                            "rayStartParams": {"$ref": "#/$defs/RayStartParams"},
                            "template": _POD_TEMPLATE,
                        },
                    },
                },
            },
        },
    },
}


@pytest.fixture(scope="module")
def rayservice() -> dict[str, Any]:
    (doc,) = _docs(RAY_DIR / "rayservice.yaml")
    return doc


def _pod_templates(rayservice: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    return [("head", cluster["headGroupSpec"]["template"])] + [
        (f"worker:{g['groupName']}", g["template"]) for g in cluster["workerGroupSpecs"]
    ]


def test_rayservice_matches_its_schema(rayservice: dict[str, Any]) -> None:
    jsonschema.Draft202012Validator.check_schema(RAYSERVICE_SCHEMA)
    jsonschema.Draft202012Validator(RAYSERVICE_SCHEMA).validate(rayservice)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_rayservice_pods_match_the_kubernetes_schema(
    rayservice: dict[str, Any], version: str
) -> None:
    for where, template in _pod_templates(rayservice):
        try:
            _validate_definition(template, "io.k8s.api.core.v1.PodTemplateSpec", version)
        except jsonschema.ValidationError as exc:
            pytest.fail(f"{where}: {exc.message} at {list(exc.absolute_path)}")
    options = rayservice["spec"]["rayClusterConfig"]["autoscalerOptions"]
    _validate_definition(options["resources"], "io.k8s.api.core.v1.ResourceRequirements", version)
    _validate_definition(options["securityContext"], "io.k8s.api.core.v1.SecurityContext", version)


def test_rayservice_pods_are_hardened(rayservice: dict[str, Any]) -> None:
    for where, template in _pod_templates(rayservice):
        _check_hardened_pod(template["spec"], f"RayService {where}")
    cluster = rayservice["spec"]["rayClusterConfig"]
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no replicas there


def test_rayservice_ray_version_is_in_the_ray_extra(rayservice: dict[str, Any]) -> None:
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    (requirement,) = extras["ray"]
    specifier = SpecifierSet(re.sub(r"^ray(\[[^]]*\])?", "", requirement))
    assert rayservice["spec"]["rayClusterConfig"]["rayVersion"] in specifier


def test_rayservice_serve_config_deploys_heinfer(rayservice: dict[str, Any]) -> None:
    """serveConfigV2 passes Ray Serve's schema, and its builder accepts its args."""
    pytest.importorskip("ray.serve", reason="needs the ray extra")
    from ray.serve.schema import ServeDeploySchema

    from heinfer.ray_serve import RayServeOptions, build_app

    config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    schema = ServeDeploySchema.model_validate(config)
    (application,) = schema.applications
    assert application.import_path == "heinfer.ray_serve:build_app"
    assert application.route_prefix == "/"
    # Overrides apply by deployment name: it must be the one build_app creates.
    assert [d.name for d in application.deployments] == [RayServeOptions().deployment_name]
    autoscaling = application.deployments[0].autoscaling_config
    assert autoscaling["min_replicas"] <= autoscaling["max_replicas"]
    assert build_app(dict(application.args)) is not None
    with pytest.raises(ValueError, match="unknown heinfer arguments"):
        build_app({**application.args, "modle_paths": []})
    anonymous = {k: v for k, v in application.args.items() if k != "auth_file"}
    with pytest.raises(ValueError, match="auth_file"):
        build_app(anonymous)
    # Every pod mounts what the args point at.
    for where, template in _pod_templates(rayservice):
        (container,) = template["spec"]["containers"]
        mounts = [m["mountPath"] for m in container["volumeMounts"]]
        for path in [*application.args["model_paths"], application.args["auth_file"]]:
            assert any(path.startswith(m.rstrip("/") + "/") for m in mounts), (where, path)


# ------------------------------------------------------------------------------------------
# Dockerfile
# ------------------------------------------------------------------------------------------


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in (REPO / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return instructions


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instruction in _dockerfile():
        if instruction[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def _resolve_args(text: str) -> str:
    defaults = dict(
        arg.split("=", 1) for kind, arg in _dockerfile() if kind == "ARG" and "=" in arg
    )
    return re.sub(r"\$\{(\w+)\}", lambda m: defaults.get(m.group(1), m.group(0)), text)


def test_dockerfile_is_a_slim_multistage_non_root_image() -> None:
    stages = _stages()
    assert len(stages) >= 2, "multi-stage: build wheels, install them in a clean stage"
    for stage in stages:
        image = _resolve_args(stage[0][1].split()[0])
        assert re.fullmatch(r"python:3\.11-slim(-\w+)?", image), image
    build, runtime = stages[0], stages[-1]
    build_name = stages[0][0][1].split()[-1]
    assert any(kind == "RUN" and "pip wheel" in arg for kind, arg in build)
    assert any(
        f"from={build_name}" in arg or f"--from={build_name}" in arg
        for kind, arg in runtime
        if kind in ("RUN", "COPY")
    ), "the runtime stage installs the build stage's wheels"
    assert any(kind == "RUN" and "--no-index" in arg for kind, arg in runtime)

    users = [arg for kind, arg in runtime if kind == "USER"]
    assert users, "runtime stage sets USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0") and user.isdigit(), "numeric non-root uid (runAsNonRoot)"
    uid = int(user)
    pod_uid = _one("Deployment")["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    assert uid == pod_uid

    (healthcheck,) = [arg for kind, arg in runtime if kind == "HEALTHCHECK"]
    assert "CMD" in healthcheck and "/v2/health/live" in healthcheck
    assert "8000" in [arg for kind, arg in runtime if kind == "EXPOSE"][-1].split()
    (entrypoint,) = [json.loads(arg) for kind, arg in runtime if kind == "ENTRYPOINT"]
    assert entrypoint == ["heinfer", "serve"]
    (cmd,) = [json.loads(arg) for kind, arg in runtime if kind == "CMD"]
    assert "--auth-file" in cmd  # the default command listens on 0.0.0.0


def test_dockerignore_keeps_the_context_to_the_package() -> None:
    lines = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "allow-list: ignore everything, then re-include"
    included = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert included == {"pyproject.toml", "README.md", "src"}
    copied = {
        part.rstrip("/")
        for kind, arg in _dockerfile()
        if kind == "COPY" and "--from" not in arg
        for part in shlex.split(arg)[:-1]
    }
    assert copied <= included
