"""infra/k8s: valid YAML, complete, and consistent with the settings, the registry and the topology."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from collections import Counter
from pathlib import Path

import pytest
import yaml

from common.settings import CommonSettings, GatewaySettings, WorkerSettings
from common.topology import Topology
from gateway.auth import KeyFile
from schemas.jobs import PRIORITIES
from schemas.registry import load_registry

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra/k8s"
FILES = sorted([*K8S.rglob("*.yaml"), *K8S.rglob("*.yml")])
# Resources of third-party operators: kept out of the default kustomization, so that it applies to a
# cluster without those operators.
OPERATOR_KINDS = {"RabbitmqCluster", "Tenant", "PodMonitor", "ServiceMonitor"}
ROLES = {"videogen-gateway": GatewaySettings, "videogen-worker": WorkerSettings}


def variables(settings: type[CommonSettings]) -> set[str]:
    return {f"VIDEOGEN_{name.upper()}" for name in settings.model_fields}


def load(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return [doc for path in FILES if path.name != "kustomization.yaml" for doc in load(path)]


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def named(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r}, found {len(found)}"
    return found[0]


def containers(docs: list[dict]) -> list[tuple[dict, dict]]:
    """(Deployment, container) for every videogen container, identified by its command."""
    return [
        (d, c)
        for d in of_kind(docs, "Deployment")
        for c in d["spec"]["template"]["spec"]["containers"]
        if c.get("command", [None])[0] in ROLES
    ]


def role_of(container: dict) -> str:
    return container["command"][0]


def env_of(docs: list[dict], container: dict) -> dict[str, object]:
    """A container's environment: its ConfigMaps (envFrom) overlaid by its own `env` (value or valueFrom)."""
    env: dict[str, object] = {}
    for source in container.get("envFrom", []):
        env.update(named(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    for item in container.get("env", []):
        env[item["name"]] = item.get("value", item.get("valueFrom"))
    return env


def the(docs: list[dict], role: str) -> tuple[dict, dict]:
    found = [(d, c) for d, c in containers(docs) if role_of(c) == role]
    assert found, f"no Deployment runs {role}"
    return found[0]


def port_number(container: dict, port: int | str) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container["ports"] if p["name"] == port)


# --- files --------------------------------------------------------------------------------------------


def test_every_file_is_yaml_of_named_resources() -> None:
    assert FILES, "no manifests under infra/k8s"
    for path in FILES:
        for doc in load(path):
            assert isinstance(doc, dict), path
            assert doc.get("apiVersion") and doc.get("kind"), f"{path.name}: a document without apiVersion/kind"
            if doc["kind"] != "Kustomization":
                assert doc.get("metadata", {}).get("name"), f"{path.name}: a {doc['kind']} without a name"


def test_kinds_present(docs) -> None:
    kinds = Counter(d["kind"] for d in docs)
    expected = {
        "Namespace",
        "ConfigMap",
        "Secret",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "PersistentVolumeClaim",
        "ScaledObject",
        "TriggerAuthentication",
        "RabbitmqCluster",
        "Tenant",
        "Ingress",
    }
    assert expected <= set(kinds), f"missing: {expected - set(kinds)}"
    assert kinds["Deployment"] >= 2


def test_no_duplicate_resources(docs) -> None:
    keys = Counter((d["kind"], d["metadata"]["name"]) for d in docs)
    assert not [k for k, n in keys.items() if n > 1]


def test_kustomization_lists_existing_files() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    assert kustomization["namespace"] == "videogen"
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    for name in listed:
        assert (K8S / name).is_file(), f"kustomization.yaml lists {name}, which does not exist"
    in_default = {kind for name in listed for kind in (d["kind"] for d in load(K8S / name))}
    assert not in_default & OPERATOR_KINDS, "resources of third-party operators belong in optional files"
    # Every file left out is an optional one, documented as such.
    deployment_doc = (ROOT / "docs/DEPLOYMENT.md").read_text()
    kustomization_text = (K8S / "kustomization.yaml").read_text()
    for path in FILES:
        name = str(path.relative_to(K8S))
        if name != "kustomization.yaml" and name not in listed:
            assert name in kustomization_text and name in deployment_doc, f"{name}: neither listed nor documented"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_builds() -> None:
    result = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    built = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert all(d["metadata"].get("namespace", "videogen") == "videogen" for d in built)


# --- settings -----------------------------------------------------------------------------------------


def test_every_videogen_variable_is_a_real_setting(docs) -> None:
    known = variables(GatewaySettings) | variables(WorkerSettings)
    for config in of_kind(docs, "ConfigMap"):
        # A ConfigMap is read by every process that mounts it.
        unknown = {k for k in config.get("data", {}) if k.startswith("VIDEOGEN_")} - known
        assert not unknown, f"ConfigMap {config['metadata']['name']} sets variables no setting reads: {unknown}"
    for deployment, container in containers(docs):
        fields = variables(ROLES[role_of(container)])
        unknown = {k for k in env_of(docs, container) if k.startswith("VIDEOGEN_")} - fields
        assert not unknown, f"{deployment['metadata']['name']} sets variables its process does not read: {unknown}"


def test_env_values_are_strings(docs) -> None:
    for config in of_kind(docs, "ConfigMap"):
        assert all(isinstance(v, str) for v in config.get("data", {}).values()), config["metadata"]["name"]
    for _, container in containers(docs):
        for item in container.get("env", []):
            assert ("value" in item) != ("valueFrom" in item), item["name"]
            if "value" in item:
                assert isinstance(item["value"], str), f"{item['name']}: quote the value"


def test_processes_agree_on_shared_settings(docs) -> None:
    """Broker, store and registry settings are the same for the gateway and every worker."""
    shared = variables(CommonSettings)
    environments = [env_of(docs, c) for _, c in containers(docs)]
    for name in shared:
        values = [env.get(name) for env in environments]
        assert all(v == values[0] for v in values), f"{name} differs between the processes: {values}"
    gateway_env = env_of(docs, the(docs, "videogen-gateway")[1])
    for name in ("VIDEOGEN_AMQP_URL", "VIDEOGEN_S3_ENDPOINT", "VIDEOGEN_S3_ACCESS_KEY", "VIDEOGEN_S3_SECRET_KEY"):
        assert name in gateway_env


def test_references_resolve(docs) -> None:
    """Every Secret, ConfigMap and claim a pod uses is in the manifests, with the keys it names."""
    for deployment in of_kind(docs, "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        for container in pod["containers"]:
            for item in container.get("env", []):
                for ref_kind, kind in (("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")):
                    ref = item.get("valueFrom", {}).get(ref_kind)
                    if ref is None or ref.get("optional"):
                        continue
                    resource = named(docs, kind, ref["name"])
                    assert ref["key"] in {**resource.get("data", {}), **resource.get("stringData", {})}, item
        for volume in pod.get("volumes", []):
            if "secret" in volume:
                secret = named(docs, "Secret", volume["secret"]["secretName"])
                for item in volume["secret"].get("items", []):
                    assert item["key"] in secret.get("stringData", {}) | secret.get("data", {})
            if "persistentVolumeClaim" in volume:
                named(docs, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])


def test_pods_are_hardened_and_get_no_service_variables(docs) -> None:
    for deployment, container in containers(docs):
        pod = deployment["spec"]["template"]["spec"]
        # Service links would inject <SERVICE>_PORT=tcp://...; a Service named `videogen` would set VIDEOGEN_PORT.
        assert pod.get("enableServiceLinks") is False, deployment["metadata"]["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]


# --- gateway ------------------------------------------------------------------------------------------


def test_gateway(docs) -> None:
    deployment, container = the(docs, "videogen-gateway")
    env = env_of(docs, container)
    assert deployment["spec"]["replicas"] == 2
    assert env["VIDEOGEN_HOST"] == "0.0.0.0"
    port = int(env["VIDEOGEN_PORT"])
    assert port_number(container, container["readinessProbe"]["httpGet"]["port"]) == port
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert port_number(container, container["livenessProbe"]["httpGet"]["port"]) == port
    assert "VIDEOGEN_AUTH_DISABLED" not in env
    assert env.get("VIDEOGEN_S3_PUBLIC_ENDPOINT"), "presigned links need the address clients use"

    service = named(docs, "Service", deployment["metadata"]["name"])
    assert service["spec"]["type"] == "ClusterIP"
    (service_port,) = service["spec"]["ports"]
    assert service_port["port"] == 80 and port_number(container, service_port["targetPort"]) == port
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_gateway_key_file_is_mounted_where_it_is_read(docs) -> None:
    deployment, container = the(docs, "videogen-gateway")
    target = Path(env_of(docs, container)["VIDEOGEN_API_KEYS_FILE"])
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    mount = next(m for m in container["volumeMounts"] if Path(m["mountPath"]) == target.parent)
    source = volumes[mount["name"]]["secret"]
    (item,) = [i for i in source["items"] if i["path"] == target.name]
    secret = named(docs, "Secret", source["secretName"])
    # The example file is a valid key file (the gateway refuses to start with an invalid one).
    keys = KeyFile.model_validate(tomllib.loads(secret["stringData"][item["key"]])).keys
    assert keys


# --- workers ------------------------------------------------------------------------------------------


def test_workers(docs) -> None:
    models = set(load_registry().models)
    workers = [(d, c) for d, c in containers(docs) if role_of(c) == "videogen-worker"]
    assert workers
    for deployment, container in workers:
        name = deployment["metadata"]["name"]
        env = env_of(docs, container)
        pod = deployment["spec"]["template"]["spec"]
        served = [m.strip() for m in env["VIDEOGEN_SERVE_MODELS"].split(",")]
        assert served and set(served) <= models, f"{name} serves unregistered models"
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
        assert pod["terminationGracePeriodSeconds"] > float(env["VIDEOGEN_SHUTDOWN_GRACE_S"])
        assert env["VIDEOGEN_HEALTH_HOST"] == "0.0.0.0"
        health = int(env["VIDEOGEN_HEALTH_PORT"])
        assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
        assert container["livenessProbe"]["httpGet"]["path"] == "/health"
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert port_number(container, container[probe]["httpGet"]["port"]) == health
        assert "replicas" not in deployment["spec"], f"{name}: KEDA owns the replica count"
        pdbs = [
            p
            for p in of_kind(docs, "PodDisruptionBudget")
            if p["spec"]["selector"]["matchLabels"].items() <= pod_labels(deployment).items()
        ]
        assert pdbs, f"{name} has no PodDisruptionBudget"


def pod_labels(deployment: dict) -> dict:
    return deployment["spec"]["template"]["metadata"]["labels"]


def test_worker_cache_volume_is_the_images_hf_home(docs) -> None:
    match = re.search(r"^ENV HF_HOME=(\S+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert match
    for deployment, container in containers(docs):
        if role_of(container) != "videogen-worker":
            continue
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == match.group(1))
        claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
        assert named(docs, "PersistentVolumeClaim", claim)


# --- KEDA ---------------------------------------------------------------------------------------------


def test_keda_scales_each_worker_on_its_models_queues(docs) -> None:
    scaled = {s["spec"]["scaleTargetRef"]["name"]: s for s in of_kind(docs, "ScaledObject")}
    for deployment, container in containers(docs):
        if role_of(container) != "videogen-worker":
            continue
        env = env_of(docs, container)
        topology = Topology(env.get("VIDEOGEN_BROKER_NAMESPACE", "videogen"))
        assert topology.namespace == "videogen"
        spec = scaled[deployment["metadata"]["name"]]["spec"]
        served = [m.strip() for m in env["VIDEOGEN_SERVE_MODELS"].split(",")]
        expected = {topology.job_queue(model, priority) for model in served for priority in PRIORITIES}
        triggers = spec["triggers"]
        assert all(t["type"] == "rabbitmq" for t in triggers)
        assert {t["metadata"]["queueName"] for t in triggers} == expected
        assert len(triggers) == len(expected)
        for trigger in triggers:
            assert trigger["metadata"]["mode"] == "QueueLength"
            assert float(trigger["metadata"]["value"]) > 0
            assert trigger["metadata"].get("protocol", "auto") in {"auto", "http", "amqp"}
            auth = named(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
            (host,) = [r for r in auth["spec"]["secretTargetRef"] if r["parameter"] == "host"]
            url = named(docs, "Secret", host["name"])["stringData"][host["key"]]
            protocol = trigger["metadata"].get("protocol", "auto")
            assert protocol == "auto" or url.startswith(protocol), f"protocol {protocol} with {url}"
        assert spec["minReplicaCount"] in (0, 1)
        assert spec["maxReplicaCount"] >= max(spec["minReplicaCount"], 1)
        assert spec["cooldownPeriod"] > 0
        modifiers = spec.get("advanced", {}).get("scalingModifiers")
        if modifiers:
            formula = modifiers["formula"]
            assert all(re.search(rf"\b{t['name']}\b", formula) for t in triggers), "the formula uses every queue"
            assert float(modifiers["target"]) > 0


# --- third-party services -----------------------------------------------------------------------------


def test_rabbitmq_cluster_has_three_nodes_and_the_consumer_timeout(docs) -> None:
    (cluster,) = of_kind(docs, "RabbitmqCluster")
    assert cluster["spec"]["replicas"] == 3
    pattern = re.compile(r"^consumer_timeout\s*=\s*(\d+)\s*$", re.MULTILINE)
    wanted = pattern.search((ROOT / "infra/rabbitmq/rabbitmq.conf").read_text())
    configured = pattern.search(cluster["spec"]["rabbitmq"]["additionalConfig"])
    assert wanted and configured and configured.group(1) == wanted.group(1)


def test_minio_tenant_is_distributed(docs) -> None:
    (tenant,) = of_kind(docs, "Tenant")
    drives = sum(p["servers"] * p["volumesPerServer"] for p in tenant["spec"]["pools"])
    assert all(p["servers"] >= 4 for p in tenant["spec"]["pools"]) and drives >= 4
    bucket = named(docs, "ConfigMap", "videogen-common")["data"]["VIDEOGEN_S3_BUCKET"]
    assert bucket in {b["name"] for b in tenant["spec"].get("buckets", [])}


def test_the_example_ingress_routes_every_api_path_and_not_metrics() -> None:
    """Every route of the gateway's API reaches it through the example Ingress's API host; /metrics
    and /ready (no API key; for scrapers and probes) stay inside the cluster."""
    from aiohttp import web

    from gateway.app import add_routes
    from gateway.keys import SETTINGS

    app = web.Application()
    app[SETTINGS] = GatewaySettings()
    add_routes(app)
    paths = {resource.canonical for resource in app.router.resources()}
    [api] = [
        d
        for d in yaml.safe_load_all((K8S / "ingress.example.yaml").read_text())
        if d["metadata"]["name"] == "videogen-api"
    ]
    rules = [p for rule in api["spec"]["rules"] for p in rule["http"]["paths"]]

    def routed(path: str) -> bool:
        return any(
            path == r["path"] if r["pathType"] == "Exact" else path == r["path"] or path.startswith(r["path"] + "/")
            for r in rules
        )

    assert {p for p in paths if not routed(p)} == {"/metrics", "/ready"}
