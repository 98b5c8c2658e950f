"""The container and cluster manifests, checked without a cluster or a Docker engine.

* Kubernetes objects (deploy/k8s) are validated against the Kubernetes OpenAPI schemas that
  `kubernetes-validate` bundles (offline, strict: unknown fields are errors), for the oldest
  and newest Kubernetes versions we claim.
* The KubeRay `RayCluster` (deploy/ray) has no schema on PyPI: it is validated against
  RAYCLUSTER_SCHEMA below, a JSON Schema written here for the CRD fields we use (modelled on
  KubeRay's ray.io/v1 CRD; unknown fields are errors), while its embedded pod templates,
  resources and security contexts go through the real Kubernetes schemas, and the Serve
  config through Ray Serve's own config schema with the builder it names actually called.
* Lint-style rules for what a schema cannot say: non-root, read-only root filesystem,
  probes on the right routes, resource limits, pinned image tags, HPA -> Deployment,
  selectors that match, secrets only by reference, CLI arguments that `heinfer serve` parses.
* Closed by default (`_check_closed`, `_check_ray_auth`): Ray token authentication in every
  Ray container, the dashboard on loopback, no control port declared on a container or
  published by a Service, and NetworkPolicies that open only the HTTP port to other pods.
  Each rule has a negative control: a loaded manifest, broken on purpose, must be flagged.
* The Dockerfile is parsed: slim base, multi-stage wheel build, non-root USER, HEALTHCHECK.
"""

from __future__ import annotations

import copy
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


def _k8s_objects(folder: Path = K8S_DIR) -> list[tuple[str, dict[str, Any]]]:
    """The plain Kubernetes objects in `folder` (not Kustomizations, not KubeRay's CRDs)."""
    return [
        (f"{path.parent.name}/{path.name}:{doc['kind']}", doc)
        for path in sorted(folder.glob("*.yaml"))
        for doc in _docs(path)
        if doc.get("kind") != "Kustomization" and not doc["apiVersion"].startswith("ray.io/")
    ]


def _all_k8s_objects() -> list[tuple[str, dict[str, Any]]]:
    return _k8s_objects(K8S_DIR) + _k8s_objects(RAY_DIR)


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
@pytest.mark.parametrize(
    "obj", [o for _, o in _all_k8s_objects()], ids=[n for n, _ in _all_k8s_objects()]
)
def test_k8s_objects_match_the_kubernetes_schema(obj: dict[str, Any], version: str) -> None:
    kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("folder", [K8S_DIR, RAY_DIR], ids=["k8s", "ray"])
def test_kustomization_lists_every_manifest(folder: Path) -> None:
    (kustomization,) = _docs(folder / "kustomization.yaml")
    listed = set(kustomization["resources"])
    present = {p.name for p in folder.glob("*.yaml")} - {"kustomization.yaml"}
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
# KubeRay RayCluster
# ------------------------------------------------------------------------------------------

_QUANTITY_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_POD_TEMPLATE = {"type": "object", "required": ["spec"]}  # checked against k8s separately

RAYCLUSTER_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "KubeRay RayCluster (ray.io/v1), the fields heinfer uses",
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayCluster"},
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
        "spec": {"$ref": "#/$defs/RayClusterSpec"},
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


def _ray_manifests() -> list[dict[str, Any]]:
    return [
        doc
        for path in sorted(RAY_DIR.glob("*.yaml"))
        for doc in _docs(path)
        if doc.get("kind") != "Kustomization"
    ]


def _ray_cluster(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (cluster,) = [o for o in objects if o["kind"] == "RayCluster"]
    return cluster


@pytest.fixture
def raycluster() -> dict[str, Any]:
    return _ray_cluster(_ray_manifests())


def _pod_templates(cluster: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    spec = cluster["spec"]
    return [("head", spec["headGroupSpec"]["template"])] + [
        (f"worker:{g['groupName']}", g["template"]) for g in spec["workerGroupSpecs"]
    ]


def _serve_config(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (config_map,) = [
        o for o in objects if o["kind"] == "ConfigMap" and "serve.yaml" in o.get("data", {})
    ]
    config: dict[str, Any] = yaml.safe_load(config_map["data"]["serve.yaml"])
    return config


def test_raycluster_matches_its_schema(raycluster: dict[str, Any]) -> None:
    jsonschema.Draft202012Validator.check_schema(RAYCLUSTER_SCHEMA)
    jsonschema.Draft202012Validator(RAYCLUSTER_SCHEMA).validate(raycluster)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_raycluster_pods_match_the_kubernetes_schema(
    raycluster: dict[str, Any], version: str
) -> None:
    for where, template in _pod_templates(raycluster):
        try:
            _validate_definition(template, "io.k8s.api.core.v1.PodTemplateSpec", version)
        except jsonschema.ValidationError as exc:
            pytest.fail(f"{where}: {exc.message} at {list(exc.absolute_path)}")
    options = raycluster["spec"]["autoscalerOptions"]
    _validate_definition(options["resources"], "io.k8s.api.core.v1.ResourceRequirements", version)
    _validate_definition(options["securityContext"], "io.k8s.api.core.v1.SecurityContext", version)
    for env in options["env"]:
        _validate_definition(env, "io.k8s.api.core.v1.EnvVar", version)


def test_raycluster_pods_are_hardened(raycluster: dict[str, Any]) -> None:
    for where, template in _pod_templates(raycluster):
        _check_hardened_pod(template["spec"], f"RayCluster {where}")
    for group in raycluster["spec"]["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    head = raycluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # no replicas there
    (ray_head, _deployer) = head["template"]["spec"]["containers"]
    names = {env["name"] for env in ray_head.get("env", [])}
    assert not names & SECRET_ENV, "the head runs no replica: no store credentials there"


def test_raycluster_ray_version_is_in_the_ray_extra(raycluster: dict[str, Any]) -> None:
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    (requirement,) = extras["ray"]
    specifier = SpecifierSet(re.sub(r"^ray(\[[^]]*\])?", "", requirement))
    assert raycluster["spec"]["rayVersion"] in specifier


def test_serve_config_deploys_heinfer() -> None:
    """The Serve config passes Ray Serve's schema, its builder accepts its args, and the head's
    deployer applies that file through the dashboard on loopback."""
    pytest.importorskip("ray.serve", reason="needs the ray extra")
    from ray.serve.schema import ServeDeploySchema

    from heinfer.ray_serve import RayServeOptions, build_app

    objects = _ray_manifests()
    schema = ServeDeploySchema.model_validate(_serve_config(objects))
    assert schema.http_options.port == SERVE_PORT
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
    cluster = _ray_cluster(objects)
    # Every Ray container mounts what the args point at.
    for where, template in _pod_templates(cluster):
        container = template["spec"]["containers"][0]
        mounts = [m["mountPath"] for m in container["volumeMounts"]]
        for path in [*application.args["model_paths"], application.args["auth_file"]]:
            assert any(path.startswith(m.rstrip("/") + "/") for m in mounts), (where, path)
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    (deployer,) = [c for c in head["containers"] if c["name"] == "serve-deploy"]
    script = " ".join(deployer["args"])
    (mount,) = [m for m in deployer["volumeMounts"] if m["name"] == "serve-config"]
    assert f"serve deploy {mount['mountPath']}/serve.yaml" in script
    assert "--address http://127.0.0.1:8265" in script


# ------------------------------------------------------------------------------------------
# Closed by default: Ray authentication, no exposed control port, NetworkPolicies
# ------------------------------------------------------------------------------------------

SERVE_PORT = 8000  # heinfer's HTTP API, the one port other pods may reach
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def _pods(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(where, pod template) of every Deployment and RayCluster among `objects`."""
    found = []
    for obj in objects:
        if obj["kind"] == "Deployment":
            found.append((f"Deployment {obj['metadata']['name']}", obj["spec"]["template"]))
        elif obj["kind"] == "RayCluster":
            found += [(f"RayCluster {where}", t) for where, t in _pod_templates(obj)]
    return found


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"only matchLabels selectors are checked: {selector}"
    return selector.get("matchLabels", {}).items() <= labels.items()


def _port_number(port: int | str, pod_spec: dict[str, Any]) -> int | None:
    if isinstance(port, int):
        return port
    for container in pod_spec["containers"]:
        for declared in container.get("ports", []):
            if declared.get("name") == port:
                return int(declared["containerPort"])
    return None


def _check_closed(objects: list[dict[str, Any]]) -> None:
    """Every pod: hardened (non-root, secrets by reference), no container port but the HTTP
    one, guarded by an ingress NetworkPolicy whose every rule opens either the HTTP port only
    or any port to pods of the guarded set only; every Service publishes the HTTP port only."""
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    pods = _pods(objects)
    assert pods, "no pods"
    for where, template in pods:
        spec, labels = template["spec"], template["metadata"]["labels"]
        _check_hardened_pod(spec, where)
        for container in spec["containers"]:
            for port in container.get("ports", []):
                assert port["containerPort"] == SERVE_PORT, (
                    f"{where}/{container['name']}: control port {port['containerPort']} exposed"
                )
        guards = [
            p for p in policies
            if "Ingress" in p["spec"].get("policyTypes", [])
            and _selects(p["spec"]["podSelector"], labels)
        ]
        assert guards, f"{where}: no NetworkPolicy guards its ingress: every port is exposed"
        for policy in guards:
            own = policy["spec"]["podSelector"].get("matchLabels", {})
            # (an empty selector would make "pods of the guarded set" every pod around)
            assert own, f"NetworkPolicy {policy['metadata']['name']} selects every pod"
            for index, rule in enumerate(policy["spec"].get("ingress", [])):
                peers = rule.get("from", [])
                internal = bool(peers) and all(
                    set(peer) == {"podSelector"}
                    and own.items() <= peer["podSelector"].get("matchLabels", {}).items()
                    for peer in peers
                )
                ports = [_port_number(p.get("port", 0), spec) for p in rule.get("ports", [])]
                assert internal or (ports and set(ports) == {SERVE_PORT}), (
                    f"{where}: NetworkPolicy {policy['metadata']['name']} ingress rule {index} "
                    f"opens {ports or 'every port'} to {peers or 'anyone'}: a control port is "
                    "exposed"
                )
    for service in (o for o in objects if o["kind"] == "Service"):
        selected = [t for _, t in pods if _selects(
            {"matchLabels": service["spec"]["selector"]}, t["metadata"]["labels"]
        )]
        assert selected, f"Service {service['metadata']['name']} selects no pod"
        for port in service["spec"]["ports"]:
            for template in selected:
                number = _port_number(port.get("targetPort", port["port"]), template["spec"])
                assert number == SERVE_PORT, (
                    f"Service {service['metadata']['name']}: control port {number} exposed"
                )


def _check_ray_auth(cluster: dict[str, Any]) -> None:
    """Ray token authentication in every Ray container (and the autoscaler's), the token from
    a Secret, and the dashboard (jobs API included) on loopback."""
    host = cluster["spec"]["headGroupSpec"]["rayStartParams"].get("dashboard-host", "0.0.0.0")
    assert host in LOOPBACK, f"the Ray dashboard listens on {host}: a control port is exposed"
    containers = [
        (f"{where}/{c['name']}", c)
        for where, template in _pod_templates(cluster)
        for c in _containers(template["spec"])
    ]
    if cluster["spec"].get("enableInTreeAutoscaling"):
        containers.append(("autoscaler", cluster["spec"].get("autoscalerOptions", {})))
    for where, container in containers:
        env = {e["name"]: e for e in container.get("env", [])}
        mode = env.get("RAY_AUTH_MODE", {}).get("value")
        assert mode == "token", f"{where}: Ray token auth is off (RAY_AUTH_MODE={mode})"
        token = env.get("RAY_AUTH_TOKEN", {})
        assert "value" not in token, f"{where}: RAY_AUTH_TOKEN must come from a Secret"
        assert "secretKeyRef" in token.get("valueFrom", {}), f"{where}: no Ray token"


def test_plain_deployment_is_closed_by_default() -> None:
    _check_closed([o for _, o in _k8s_objects()])


def test_ray_deployment_is_closed_by_default() -> None:
    objects = _ray_manifests()
    _check_closed(objects)
    _check_ray_auth(_ray_cluster(objects))


def _env(container: dict[str, Any], name: str) -> dict[str, Any]:
    (env,) = [e for e in container["env"] if e["name"] == name]
    return env


def _break_ray(objects: list[dict[str, Any]], how: str) -> None:
    cluster = _ray_cluster(objects)
    head = cluster["spec"]["headGroupSpec"]
    head_pod = head["template"]["spec"]
    worker_pod = cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]
    (policy,) = [o for o in objects if o["kind"] == "NetworkPolicy"]
    (service,) = [o for o in objects if o["kind"] == "Service"]
    if how == "auth disabled":
        _env(worker_pod["containers"][0], "RAY_AUTH_MODE")["value"] = "disabled"
    elif how == "auth unset in the deployer":
        deployer = head_pod["containers"][1]
        deployer["env"] = [e for e in deployer["env"] if e["name"] != "RAY_AUTH_MODE"]
    elif how == "auth unset in the autoscaler":
        cluster["spec"]["autoscalerOptions"]["env"] = []
    elif how == "ray token inlined":
        token = _env(head_pod["containers"][0], "RAY_AUTH_TOKEN")
        token.pop("valueFrom")
        token["value"] = "x"
    elif how == "dashboard on the pod network":
        head["rayStartParams"]["dashboard-host"] = "0.0.0.0"
    elif how == "dashboard host left to the default":
        del head["rayStartParams"]["dashboard-host"]
    elif how == "gcs port declared":
        head_pod["containers"][0]["ports"] = [{"name": "gcs", "containerPort": 6379}]
    elif how == "client port published":
        service["spec"]["ports"].append({"name": "client", "port": 10001, "targetPort": 10001})
    elif how == "policy open to all":
        policy["spec"]["ingress"].append({})
    elif how == "policy opens the dashboard to the namespace":
        policy["spec"]["ingress"].append(
            {"from": [{"namespaceSelector": {}}], "ports": [{"port": 8265}]}
        )
    elif how == "no policy":
        objects.remove(policy)
    elif how == "runAsNonRoot false":
        worker_pod["securityContext"]["runAsNonRoot"] = False
    elif how == "store secret inlined":
        env = _env(worker_pod["containers"][0], "AZURE_STORAGE_CONNECTION_STRING")
        env.pop("valueFrom")
        env["value"] = "DefaultEndpointsProtocol=https;AccountKey=x"
    else:
        raise AssertionError(how)


RAY_BREAKS = [
    ("auth disabled", "Ray token auth is off"),
    ("auth unset in the deployer", "serve-deploy: Ray token auth is off"),
    ("auth unset in the autoscaler", "autoscaler: Ray token auth is off"),
    ("ray token inlined", "RAY_AUTH_TOKEN must come from a Secret"),
    ("dashboard on the pod network", "control port is exposed"),
    ("dashboard host left to the default", "control port is exposed"),
    ("gcs port declared", "control port 6379 exposed"),
    ("client port published", "control port 10001 exposed"),
    ("policy open to all", "control port is exposed"),
    ("policy opens the dashboard to the namespace", "control port is exposed"),
    ("no policy", "no NetworkPolicy"),
    ("runAsNonRoot false", "worker"),
    ("store secret inlined", "AZURE_STORAGE_CONNECTION_STRING must come from a Secret"),
]


@pytest.mark.parametrize(("how", "message"), RAY_BREAKS, ids=[h for h, _ in RAY_BREAKS])
def test_the_ray_checks_flag_a_broken_manifest(how: str, message: str) -> None:
    """Negative controls: each rule fails on a manifest broken in the way it guards against."""
    objects = copy.deepcopy(_ray_manifests())
    _break_ray(objects, how)
    with pytest.raises(AssertionError, match=re.escape(message)):
        _check_closed(objects)
        _check_ray_auth(_ray_cluster(objects))


def _break_plain(objects: list[dict[str, Any]], how: str) -> None:
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (policy,) = [o for o in objects if o["kind"] == "NetworkPolicy"]
    if how == "policy opens every port":
        policy["spec"]["ingress"][0].pop("ports")
    elif how == "policy selects the whole namespace":
        policy["spec"]["podSelector"] = {}
    elif how == "no policy":
        objects.remove(policy)
    elif how == "metrics port declared":
        pod["containers"][0]["ports"].append({"name": "debug", "containerPort": 9090})
    elif how == "runAsNonRoot false":
        pod["securityContext"]["runAsNonRoot"] = False
    elif how == "store secret inlined":
        env = _env(pod["containers"][0], "AWS_SECRET_ACCESS_KEY")
        env.pop("valueFrom")
        env["value"] = "x"
    else:
        raise AssertionError(how)


PLAIN_BREAKS = [
    ("policy opens every port", "control port is exposed"),
    ("policy selects the whole namespace", "NetworkPolicy heinfer selects every pod"),
    ("no policy", "no NetworkPolicy"),
    ("metrics port declared", "control port 9090 exposed"),
    ("runAsNonRoot false", "Deployment heinfer"),
    ("store secret inlined", "AWS_SECRET_ACCESS_KEY must come from a Secret"),
]


@pytest.mark.parametrize(("how", "message"), PLAIN_BREAKS, ids=[h for h, _ in PLAIN_BREAKS])
def test_the_plain_checks_flag_a_broken_manifest(how: str, message: str) -> None:
    objects = copy.deepcopy([o for _, o in _k8s_objects()])
    _break_plain(objects, how)
    with pytest.raises(AssertionError, match=re.escape(message)):
        _check_closed(objects)


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
    # heinfer's C extensions compile in the build stage only
    assert any(kind == "RUN" and "install" in arg and " gcc " in f" {arg} " for kind, arg in build)
    assert not any("gcc" in arg for kind, arg in runtime)

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
    assert included == {"pyproject.toml", "setup.py", "README.md", "src"}
    copied = {
        part.rstrip("/")
        for kind, arg in _dockerfile()
        if kind == "COPY" and "--from" not in arg
        for part in shlex.split(arg)[:-1]
    }
    assert copied <= included
