"""deployments/k8s/ against the Kubernetes schemas (no cluster here): every object validated strictly (unknown
fields are errors) against the JSON schemas of kubernetes-validate, and against the OpenAPI models of the
pinned `kubernetes` client (required fields, types); then the wiring between objects and our own CLI."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from deployments.routes import load_routes, registry_destructive

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deployments/k8s"
KUBERNETES_VERSION = "1.30"


def objects() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found.append((f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return found


OBJECTS = objects()
BY_KIND: dict[str, list[dict[str, Any]]] = {}
for _name, _doc in OBJECTS:
    BY_KIND.setdefault(_doc["kind"], []).append(_doc)


def test_the_manifests_cover_worker_bridge_and_server_on_postgres() -> None:
    names = {name.split(":")[1] for name, _ in OBJECTS}
    assert {"Deployment/prefect-worker", "Deployment/runbooks-bridge", "Service/runbooks-bridge",
            "Secret/runbooks-bridge", "Deployment/prefect-server", "StatefulSet/prefect-postgres",
            "Service/prefect-server", "Role/prefect-worker", "ConfigMap/runbooks-bridge-routes"} <= names


@pytest.mark.parametrize("name, doc", OBJECTS, ids=[n for n, _ in OBJECTS])
def test_strict_json_schema(name: str, doc: dict[str, Any]) -> None:
    import kubernetes_validate  # the Kubernetes JSON schemas, offline (dev extra)

    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def _check_model(data: Any, type_name: str, where: str) -> None:
    """Walk ``data`` against the client's OpenAPI types: unknown fields and wrong types are errors."""
    import kubernetes.client as k8s

    if type_name.startswith("List["):
        assert isinstance(data, list), f"{where}: expected a list"
        for i, item in enumerate(data):
            _check_model(item, type_name[5:-1], f"{where}[{i}]")
        return
    if type_name.startswith("Dict["):
        assert isinstance(data, dict), f"{where}: expected a mapping"
        value_type = type_name[5:-1].split(", ", 1)[1]
        for key, value in data.items():
            _check_model(value, value_type, f"{where}.{key}")
        return
    primitive = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": (str, int, dict, list)}
    if type_name in primitive:
        assert isinstance(data, primitive[type_name]) and not (type_name == "int" and isinstance(data, bool)), \
            f"{where}: expected {type_name}, got {data!r}"
        return
    model = getattr(k8s, type_name)
    assert isinstance(data, dict), f"{where}: expected {type_name}"
    json_to_attr = {v: k for k, v in model.attribute_map.items()}
    for key, value in data.items():
        assert key in json_to_attr, f"{where}: {type_name} has no field {key!r}"
        _check_model(value, model.openapi_types[json_to_attr[key]], f"{where}.{key}")


@pytest.mark.parametrize("name, doc", OBJECTS, ids=[n for n, _ in OBJECTS])
def test_kubernetes_client_models(name: str, doc: dict[str, Any]) -> None:
    import kubernetes.client as k8s

    group_version = doc["apiVersion"].split("/")
    version = group_version[-1].capitalize()
    model = f"{version}{doc['kind']}"
    _check_model(doc, model, name)
    # the generated setters check required fields
    k8s.ApiClient()._ApiClient__deserialize(doc, model)


def _containers(kind: str, name: str) -> list[dict[str, Any]]:
    [doc] = [d for d in BY_KIND[kind] if d["metadata"]["name"] == name]
    return doc["spec"]["template"]["spec"]["containers"]


def test_services_select_pods_and_named_ports_exist() -> None:
    workloads = BY_KIND["Deployment"] + BY_KIND["StatefulSet"]
    for service in BY_KIND["Service"]:
        selector = service["spec"]["selector"]
        [workload] = [w for w in workloads if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        port_names = {p.get("name") for c in workload["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names, (service["metadata"]["name"], port)
    for workload in workloads:
        assert workload["spec"]["selector"]["matchLabels"].items() <= \
            workload["spec"]["template"]["metadata"]["labels"].items()


def documented_secrets() -> dict[str, set[str]]:
    """Secret name -> keys, from the `kubectl create secret` commands of docs/operations.md's cluster steps."""
    import shlex

    created: dict[str, set[str]] = {}
    lines = (ROOT / "docs/operations.md").read_text().replace("\\\n", " ").splitlines()
    for line in lines:
        argv = shlex.split(line, comments=True) if line.startswith("kubectl ") else []
        if argv[:6] == ["kubectl", "-n", "runbooks", "create", "secret", "generic"]:
            assert not [a for a in argv if a.startswith("--from-literal")], f"a secret literal in argv: {line}"
            created[argv[6]] = {a.removeprefix("--from-file=").split("=")[0] for a in argv[7:]
                                if a.startswith("--from-file=")}
    return created


def test_secrets_configmaps_and_service_accounts_referenced_exist() -> None:
    secrets = {d["metadata"]["name"]: set(d.get("stringData") or {}) | set(d.get("data") or {})
               for d in BY_KIND["Secret"]}
    documented = documented_secrets()  # created by kubectl from files, never committed
    assert {"prefect-postgres", "prefect-api-auth", "runbooks-bridge"} <= set(documented)
    for kind in ("Deployment", "StatefulSet"):
        for doc in BY_KIND[kind]:
            spec = doc["spec"]["template"]["spec"]
            for container in spec["containers"]:
                for env in container.get("env", []):
                    ref = env.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        keys = secrets.get(ref["name"], set()) | documented.get(ref["name"], set())
                        assert ref["key"] in keys, f"{doc['metadata']['name']}: secret {ref} is created nowhere"
            for volume in spec.get("volumes", []):
                if "secret" in volume:
                    assert volume["secret"]["secretName"] in secrets
                if "configMap" in volume:
                    assert volume["configMap"]["name"] in {d["metadata"]["name"] for d in BY_KIND["ConfigMap"]}
            if "serviceAccountName" in spec:
                assert spec["serviceAccountName"] in {d["metadata"]["name"] for d in BY_KIND["ServiceAccount"]}
    assert all(d["metadata"]["namespace"] == "runbooks" for _n, d in OBJECTS if d["kind"] != "Namespace")


def test_the_bridge_runs_our_cli_with_a_mounted_token_and_routes() -> None:
    from deployments.bridge.auth import MIN_SECRET_LENGTH
    from deployments.webhook import build_parser

    [bridge] = _containers("Deployment", "runbooks-bridge")
    assert bridge["command"][:2] == ["runbooks", "webhook"]
    args = build_parser().parse_args(bridge["command"][2:])
    mounts = {m["mountPath"]: m["name"] for m in bridge["volumeMounts"]}
    assert str(Path(args.token_file).parent) in mounts and str(Path(args.routes).parent) in mounts
    assert all(e["name"] != "RUNBOOKS_WEBHOOK_TOKEN" for e in bridge.get("env", []))  # the token is a file
    assert bridge["securityContext"]["readOnlyRootFilesystem"] is True
    [secret] = BY_KIND["Secret"]
    assert len(secret["stringData"]["token"]) < MIN_SECRET_LENGTH  # the placeholder can never go live
    [routes] = [d for d in BY_KIND["ConfigMap"] if d["metadata"]["name"] == "runbooks-bridge-routes"]
    shipped = load_routes(routes["data"]["routes.yaml"], registry_destructive)
    example = load_routes((ROOT / "deployments/routes.example.yaml").read_text(), registry_destructive)
    assert shipped == example  # the ConfigMap carries the example routes unchanged
    assert bridge["readinessProbe"]["httpGet"]["path"] == "/healthz"


def test_worker_and_server_commands() -> None:
    [worker] = _containers("Deployment", "prefect-worker")
    assert worker["command"][:3] == ["prefect", "worker", "start"] and "kubernetes" in worker["command"]
    env = {e["name"]: e.get("value") for e in worker["env"]}
    assert re.fullmatch(r"http://prefect-server\.runbooks\.svc:4200/api", env["PREFECT_API_URL"])
    [server] = _containers("Deployment", "prefect-server")
    assert server["image"].endswith("3.8.8-python3.11")  # the server version the project pins
    assert any(e["name"] == "PREFECT_API_DATABASE_CONNECTION_URL" and "secretKeyRef" in e["valueFrom"]
               for e in server["env"])


def test_the_validators_catch_typos_and_missing_fields() -> None:
    import copy

    import kubernetes_validate
    from kubernetes_validate.utils import ValidationError

    [deployment] = [d for d in BY_KIND["Deployment"] if d["metadata"]["name"] == "runbooks-bridge"]
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}  # misspelt
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "two"
    missing = copy.deepcopy(deployment)
    del missing["spec"]["template"]["spec"]["containers"][0]["name"]
    for broken in (typo, wrong_type, missing):
        with pytest.raises(ValidationError):
            kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
    for broken in (typo, wrong_type):
        with pytest.raises(AssertionError):
            _check_model(broken, "V1Deployment", "broken")
    import kubernetes.client as k8s

    with pytest.raises(ValueError):
        k8s.ApiClient()._ApiClient__deserialize(missing, "V1Deployment")


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def test_every_deployment_that_talks_to_the_api_gets_the_auth_string_from_a_secret() -> None:
    """The server checks PREFECT_SERVER_API_AUTH_STRING, every client sends PREFECT_API_AUTH_STRING: both from
    the Secret prefect-api-auth, never a literal value in a manifest."""
    talking = 0
    for doc in BY_KIND["Deployment"]:
        for container in doc["spec"]["template"]["spec"]["containers"]:
            env = _env(container)
            command = container.get("command", [])
            is_server = command[:3] == ["prefect", "server", "start"]
            if not (is_server or "PREFECT_API_URL" in env):
                continue
            talking += 1
            name = "PREFECT_SERVER_API_AUTH_STRING" if is_server else "PREFECT_API_AUTH_STRING"
            where = f"{doc['metadata']['name']}/{container['name']}"
            assert name in env, f"{where} talks to the API without {name}"
            assert "value" not in env[name], f"{where}: {name} is a literal"
            assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "prefect-api-auth", "key": "auth-string"}
    assert talking == 3  # the server, the worker, the bridge
    for _name, doc in OBJECTS:
        text = yaml.safe_dump(doc)
        assert "AUTH_STRING" not in text or "secretKeyRef" in text


def test_only_the_worker_bridge_flow_runs_and_ingress_reach_the_api_and_only_the_server_its_database() -> None:
    policies = {d["metadata"]["name"]: d for d in BY_KIND["NetworkPolicy"]}
    server = policies["prefect-server"]["spec"]
    assert server["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prefect-server"}
    assert server["policyTypes"] == ["Ingress"]
    [rule] = server["ingress"]
    sources = rule["from"]
    pods = {s["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/name") for s in sources
            if "podSelector" in s}
    assert pods == {"prefect-worker", "runbooks-bridge", None}  # None: the flow-run Jobs' label selector
    assert [s["podSelector"]["matchExpressions"] for s in sources if "podSelector" in s
            and "matchExpressions" in s["podSelector"]] == [[{"key": "prefect.io/flow-run-id", "operator": "Exists"}]]
    assert [p["port"] for p in rule["ports"]] == ["http"]
    database = policies["prefect-postgres"]["spec"]
    assert database["ingress"][0]["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name":
                                                                               "prefect-server"}}}]
