"""Check deploy/compose and deploy/k8s without Docker or a cluster.

Neither a Docker engine nor a Kubernetes cluster is available where these tests run,
so nothing here starts a container. The tests load the files with PyYAML and pin
what the services rely on: start order, probes on routes the API really serves,
every ``VITALS_*`` name an existing settings field, secrets kept out of the files.
``kubectl kustomize`` renders the Kubernetes manifests when kubectl is installed.
docs/runbook.md must name every metric and every ``kiosk add``/``revoke`` flag.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import pytest
import typer
import yaml
from pydantic import BaseModel

from api.cli import app
from api.rest import router
from bridge.config import BridgeSettings
from bridge.metrics import BridgeMetrics

REPO_DIR = Path(__file__).resolve().parents[2]
RUNBOOK = REPO_DIR / "docs" / "runbook.md"
COMPOSE_DIR = REPO_DIR / "deploy" / "compose"
K8S_DIR = REPO_DIR / "deploy" / "k8s"
BROKER_CONF = REPO_DIR / "broker_config" / "mosquitto.conf"
ENV_PREFIX = "VITALS_"
ENV_NAME = re.compile(r"\bVITALS_[A-Z0-9_]+\b")
# Besides VITALS_*, the only variable the bridge image takes from a secret file.
OTHER_SECRET_VARIABLES = frozenset({"PGPASSWORD"})
# Secret-bearing settings: never given a value in a committed file.
SECRET_SETTINGS = frozenset(
    {"VITALS_AUTH__JWT_SECRET", "VITALS_MQTT__PASSWORD", "VITALS_DATABASE_URL"}
)
TEST_JWT_SECRET = "x" * 48
KUBECTL_TIMEOUT_SECONDS = 60

Doc = dict[str, Any]


# -- helpers ------------------------------------------------------------------------


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """Return the pydantic model inside ``annotation`` (also ``Model | None``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (Union, types.UnionType):
        for arg in get_args(annotation):
            if (model := _model_of(arg)) is not None:
                return model
    return None


def settings_env_names(
    model: type[BaseModel] = BridgeSettings, path: tuple[str, ...] = ()
) -> set[str]:
    """Return every environment variable name that sets a field of ``model``."""
    names: set[str] = set()
    for name, field in model.model_fields.items():
        here = (*path, name)
        names.add(ENV_PREFIX + "__".join(here).upper())
        nested = _model_of(field.annotation)
        if nested is not None:
            names |= settings_env_names(nested, here)
    return names


SETTINGS_ENV_NAMES = settings_env_names()


def unknown_keys(
    values: dict[str, Any], model: type[BaseModel], path: str = ""
) -> list[str]:
    """Return keys of ``values`` that no field of ``model`` takes, at any depth.

    The nested settings models ignore unknown keys, so a typo under ``[mqtt]`` would
    otherwise go unnoticed; only the top level forbids them.
    """
    found: list[str] = []
    for key, value in values.items():
        field = model.model_fields.get(key)
        if field is None:
            found.append(path + key)
            continue
        nested = _model_of(field.annotation)
        if nested is not None and isinstance(value, dict):
            found += unknown_keys(value, nested, f"{path}{key}.")
    return found


def get_routes() -> set[str]:
    """Return the paths the REST router serves with GET."""
    return {
        route.path
        for route in router.routes
        if "GET" in getattr(route, "methods", set())
    }


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_docs(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def read_env_file(path: Path) -> dict[str, str]:
    """Parse KEY=VALUE lines, skipping comments and blank lines."""
    values: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
        values[key.strip()] = value.strip()
    return values


def mosquitto_options(path: Path) -> dict[str, list[str]]:
    """Parse a mosquitto.conf into option -> values (options may repeat)."""
    options: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        options.setdefault(key, []).append(value.strip())
    return options


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Remove VITALS_* variables of the calling shell, so only the test's count."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    return monkeypatch


# -- the helpers themselves ---------------------------------------------------------


def test_settings_env_names_walk_nested_models() -> None:
    assert {
        "VITALS_DATABASE_URL",
        "VITALS_MQTT__HOST",
        "VITALS_MQTT__PASSWORD",
        "VITALS_AUTH__JWT_SECRET",
        "VITALS_INGEST__CLIENT_ID",
    } <= SETTINGS_ENV_NAMES
    assert "VITALS_MQTT_HOST" not in SETTINGS_ENV_NAMES
    assert "VITALS_AUTH__JWT" not in SETTINGS_ENV_NAMES
    assert unknown_keys({"mqtt": {"hostname": "x", "port": 1}}, BridgeSettings) == [
        "mqtt.hostname"
    ]


def test_probe_routes_exist() -> None:
    assert {"/health", "/ready", "/metrics"} <= get_routes()


# -- Docker Compose -----------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> Doc:
    data = load_yaml(COMPOSE_DIR / "compose.yaml")
    assert isinstance(data, dict)
    return data


def services_running(compose: Doc, subcommand: str) -> dict[str, Doc]:
    return {
        name: svc
        for name, svc in compose["services"].items()
        if svc.get("command") == ["vitals-bridge", subcommand]
    }


def test_compose_header_says_it_was_not_run() -> None:
    header = (COMPOSE_DIR / "compose.yaml").read_text().split("\nname:", 1)[0]
    assert "no Docker engine" in header
    assert "test_manifests.py" in header


def test_compose_has_the_services(compose: Doc) -> None:
    services = compose["services"]
    assert {"mosquitto", "postgres", "migrate"} <= services.keys()
    assert len(services_running(compose, "run")) == 3
    assert list(services_running(compose, "migrate")) == ["migrate"]


def test_compose_mosquitto_uses_the_repository_config(compose: Doc) -> None:
    mosquitto = compose["services"]["mosquitto"]
    assert str(mosquitto["image"]).startswith("eclipse-mosquitto:2")
    mounts = {}
    for spec in mosquitto["volumes"]:
        source, target = spec.split(":")[:2]
        mounts[target] = source
    # The repository's files are mounted, not copies of them.
    sources = {
        (COMPOSE_DIR / s).resolve() for s in mounts.values() if s.startswith(".")
    }
    assert BROKER_CONF in sources
    assert REPO_DIR / "broker_config" / "mosquitto.acl" in sources
    for source in mounts.values():
        if source.startswith("../"):
            assert (COMPOSE_DIR / source).exists(), source

    # Every file the repository config names is mounted at that path.
    options = mosquitto_options(BROKER_CONF)
    for option in ("password_file", "acl_file", "certfile", "keyfile"):
        for path in options[option]:
            assert path in mounts, f"{option} {path} is not mounted"
    persistence = options["persistence_location"][0].rstrip("/")
    assert mounts[persistence] in compose["volumes"], "persistence needs a volume"

    # The image's main config includes the directory the repository config is in.
    main = COMPOSE_DIR / mounts["/mosquitto/config/mosquitto.conf"]
    include_dirs = mosquitto_options(main)["include_dir"]
    conf_target = next(
        t for t, s in mounts.items() if (COMPOSE_DIR / s).resolve() == BROKER_CONF
    )
    assert any(conf_target.startswith(d.rstrip("/") + "/") for d in include_dirs)
    assert "8883:8883" in [str(p) for p in mosquitto["ports"]]


def test_compose_postgres_is_persistent_and_checked(compose: Doc) -> None:
    postgres = compose["services"]["postgres"]
    assert re.fullmatch(r"postgres:1[56](\..*)?", postgres["image"])
    assert "pg_isready" in postgres["healthcheck"]["test"]
    data = [v for v in postgres["volumes"] if v.endswith(":/var/lib/postgresql/data")]
    assert data
    assert data[0].split(":")[0] in compose["volumes"]
    assert "POSTGRES_PASSWORD" not in postgres["environment"]
    assert postgres["environment"]["POSTGRES_PASSWORD_FILE"].startswith("/run/secrets/")


def test_compose_start_order(compose: Doc) -> None:
    migrate = compose["services"]["migrate"]
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert migrate["restart"] == "no"
    for name, bridge in services_running(compose, "run").items():
        condition = bridge["depends_on"]["migrate"]["condition"]
        assert condition == "service_completed_successfully", name


def test_compose_bridges_are_checked_and_distinct(compose: Doc) -> None:
    bridges = services_running(compose, "run")
    client_ids = set()
    for name, bridge in bridges.items():
        probe = " ".join(bridge["healthcheck"]["test"])
        assert re.search(r"http://127\.0\.0\.1:8000/health\b", probe), name
        assert bridge["env_file"] == "bridge.env", name
        assert bridge["image"] == compose["services"]["migrate"]["image"], name
        client_ids.add(bridge["environment"]["VITALS_INGEST__CLIENT_ID"])
    # Two MQTT clients with one id would take the session from each other.
    assert len(client_ids) == len(bridges)


def test_compose_secrets_come_from_files(compose: Doc) -> None:
    declared = compose["secrets"]
    for name, secret in declared.items():
        assert set(secret) == {"file"}, f"secret {name} must be a file"
    for name, svc in compose["services"].items():
        for ref in svc.get("secrets", []):
            source = ref["source"] if isinstance(ref, dict) else ref
            assert source in declared, f"{name}: undeclared secret {source}"
            target = ref.get("target", source) if isinstance(ref, dict) else ref
            if name != "postgres":
                assert target in SETTINGS_ENV_NAMES | OTHER_SECRET_VARIABLES, target
        environment = svc.get("environment", {})
        assert not SECRET_SETTINGS & set(environment), f"{name}: secret in compose"


def test_compose_env_names_are_settings(compose: Doc) -> None:
    text = (COMPOSE_DIR / "compose.yaml").read_text()
    text += (COMPOSE_DIR / "bridge.env.example").read_text()
    unknown = set(ENV_NAME.findall(text)) - SETTINGS_ENV_NAMES
    assert not unknown, f"no such bridge setting: {sorted(unknown)}"


def test_bridge_env_example_loads(clean_env: pytest.MonkeyPatch) -> None:
    values = read_env_file(COMPOSE_DIR / "bridge.env.example")
    assert values["VITALS_MQTT__HOST"] == "mosquitto"
    url = values["VITALS_DATABASE_URL"]
    assert url.startswith("postgresql+psycopg://")
    # The password comes from a secret (PGPASSWORD), never from this file.
    assert ":" not in url.split("://", 1)[1].split("@", 1)[0]
    assert not (SECRET_SETTINGS - {"VITALS_DATABASE_URL"}) & values.keys()

    for key, value in values.items():
        clean_env.setenv(key, value)
    clean_env.setenv("VITALS_AUTH__JWT_SECRET", TEST_JWT_SECRET)
    settings = BridgeSettings()
    assert settings.http.host == "0.0.0.0"
    assert settings.migrate_on_start is False
    assert settings.mqtt.tls_ca_file is not None


def test_dockerfile() -> None:
    text = (COMPOSE_DIR / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.MULTILINE)
    assert "pip install '.[server,postgres]'" in text
    users = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert users
    assert users[-1].split(":")[0] not in {"root", "0"}
    assert re.search(r"HEALTHCHECK .*\n.*/health", text)
    unknown = set(ENV_NAME.findall(text)) - SETTINGS_ENV_NAMES
    assert not unknown, sorted(unknown)

    # Every COPY source exists and passes the .dockerignore next to the Dockerfile.
    ignore = (COMPOSE_DIR / "Dockerfile.dockerignore").read_text().splitlines()
    patterns = [line for line in ignore if line and not line.startswith("#")]
    assert patterns[0] == "*", "the context should start from nothing"
    kept = {line[1:] for line in patterns if line.startswith("!")}
    for line in re.findall(r"^COPY (?!--from)(.+)$", text, re.MULTILINE):
        words = [w for w in line.split() if not w.startswith("--")]
        for source in words[:-1]:
            assert (REPO_DIR / source).exists(), source
            assert source.rstrip("/") in kept, f"{source} is dockerignored"


def test_entrypoint_exports_secret_files(tmp_path: Path) -> None:
    shell = shutil.which("sh")
    if shell is None:
        pytest.skip("no sh")
    (tmp_path / "VITALS_AUTH__JWT_SECRET").write_text("from-file\n")
    (tmp_path / "VITALS_MQTT__PASSWORD").write_text("ignored")
    (tmp_path / "PGPASSWORD").write_text("pg")
    (tmp_path / "unrelated").write_text("nope")
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "SECRETS_DIR": str(tmp_path),
        "VITALS_MQTT__PASSWORD": "from-env",
    }
    out = subprocess.run(
        [shell, str(COMPOSE_DIR / "docker-entrypoint.sh"), "env"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert "VITALS_AUTH__JWT_SECRET=from-file" in out
    assert "VITALS_MQTT__PASSWORD=from-env" in out  # the environment wins
    assert "PGPASSWORD=pg" in out
    assert not any(line.startswith("unrelated=") for line in out)
    assert os.access(COMPOSE_DIR / "docker-entrypoint.sh", os.X_OK)


# -- Kubernetes ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def kustomization() -> Doc:
    data = load_yaml(K8S_DIR / "kustomization.yaml")
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def resources(kustomization: Doc) -> list[Doc]:
    docs: list[Doc] = []
    for name in kustomization["resources"]:
        docs += load_docs(K8S_DIR / name)
    return docs


@pytest.fixture(scope="module")
def job() -> Doc:
    (doc,) = load_docs(K8S_DIR / "job-migrate.yaml")
    return doc


@pytest.fixture(scope="module")
def secret_example() -> Doc:
    (doc,) = load_docs(K8S_DIR / "secret.example.yaml")
    return doc


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


@pytest.fixture(scope="module")
def workload(resources: list[Doc]) -> Doc:
    (bridge,) = of_kind(resources, "StatefulSet") + of_kind(resources, "Deployment")
    return bridge


def containers(workload: Doc) -> list[Doc]:
    return list(workload["spec"]["template"]["spec"]["containers"])


def env_of(container: Doc) -> dict[str, Doc]:
    return {e["name"]: e for e in container.get("env", [])}


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_every_manifest_is_applied_or_named_apart(kustomization: Doc) -> None:
    apart = {"kustomization.yaml", "job-migrate.yaml", "secret.example.yaml"}
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S_DIR.glob("*.yaml")}
    assert on_disk - apart == listed, "a manifest is neither listed nor set apart"
    assert not listed & {"job-migrate.yaml", "secret.example.yaml"}


def test_manifests_have_the_required_keys(resources: list[Doc], job: Doc) -> None:
    kinds = {d["kind"] for d in resources}
    assert {"Service", "PodDisruptionBudget", "NetworkPolicy"} <= kinds
    for doc in [*resources, job]:
        assert {"apiVersion", "kind", "metadata"} <= doc.keys(), doc
        assert doc["metadata"].get("name"), doc


def test_bridge_replicas_and_labels(workload: Doc) -> None:
    spec = workload["spec"]
    assert spec["replicas"] == 3
    labels = spec["template"]["metadata"]["labels"]
    assert matches(spec["selector"]["matchLabels"], labels)


def test_bridge_probes_use_real_routes(workload: Doc) -> None:
    routes = get_routes()
    (bridge,) = containers(workload)
    ports = {p["name"]: p["containerPort"] for p in bridge["ports"]}
    assert bridge["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert bridge["livenessProbe"]["httpGet"]["path"] == "/health"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        if probe not in bridge:
            continue
        get = bridge[probe]["httpGet"]
        assert get["path"] in routes, f"{probe}: no route {get['path']}"
        assert get["port"] in ports or get["port"] in ports.values(), probe


def test_bridge_resources_and_security(workload: Doc, job: Doc) -> None:
    dockerfile = (COMPOSE_DIR / "Dockerfile").read_text()
    found = re.search(r"^ARG APP_UID=(\d+)$", dockerfile, re.MULTILINE)
    assert found, "the Dockerfile no longer pins the user id"
    uid = int(found.group(1))
    for owner in (workload, job):
        pod = owner["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == uid
        assert pod.get("automountServiceAccountToken") is False
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True
            assert security["allowPrivilegeEscalation"] is False
            assert security["capabilities"]["drop"] == ["ALL"]
            resources = container["resources"]
            assert {"cpu", "memory"} <= resources["requests"].keys()
            assert "memory" in resources["limits"]


def test_env_names_are_settings_and_secrets_exist(
    workload: Doc, job: Doc, secret_example: Doc
) -> None:
    keys = set(secret_example["stringData"])
    assert keys <= SETTINGS_ENV_NAMES
    for owner in (workload, job):
        for container in owner["spec"]["template"]["spec"]["containers"]:
            for name, entry in env_of(container).items():
                assert name in SETTINGS_ENV_NAMES, f"no such bridge setting: {name}"
                if name in SECRET_SETTINGS:
                    ref = entry["valueFrom"]["secretKeyRef"]
                    assert ref["name"] == secret_example["metadata"]["name"]
                    assert ref["key"] in keys
    # Every VITALS_ name written anywhere in the manifests is a setting.
    for path in K8S_DIR.iterdir():
        unknown = set(ENV_NAME.findall(path.read_text())) - SETTINGS_ENV_NAMES
        assert not unknown, f"{path.name}: {sorted(unknown)}"


def test_bridge_client_id_is_unique_per_pod(workload: Doc) -> None:
    (bridge,) = containers(workload)
    client_id = env_of(bridge)["VITALS_INGEST__CLIENT_ID"]
    assert client_id["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    # Pod names survive restarts only in a StatefulSet (see statefulset.yaml).
    assert workload["kind"] == "StatefulSet"


def test_bridge_config_map_holds_a_valid_bridge_toml(
    workload: Doc, kustomization: Doc, clean_env: pytest.MonkeyPatch
) -> None:
    (generator,) = kustomization["configMapGenerator"]
    (file_name,) = generator["files"]
    pod = workload["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    (bridge,) = pod["containers"]
    config_mounts = [
        m["mountPath"]
        for m in bridge["volumeMounts"]
        if volumes[m["name"]].get("configMap", {}).get("name") == generator["name"]
    ]
    assert config_mounts, "the generated ConfigMap is not mounted"
    args = bridge["args"]
    assert args[:2] == ["run", "--config"]
    assert args[2] == f"{config_mounts[0]}/{file_name}"

    with (K8S_DIR / file_name).open("rb") as fh:
        values = tomllib.load(fh)
    assert not unknown_keys(values, BridgeSettings)
    # Secrets come from the Secret, never from the ConfigMap.
    assert "database_url" not in values
    assert "jwt_secret" not in values.get("auth", {})
    assert "password" not in values.get("mqtt", {})
    clean_env.setenv("VITALS_AUTH__JWT_SECRET", TEST_JWT_SECRET)
    settings = BridgeSettings.load(K8S_DIR / file_name)
    assert settings.migrate_on_start is False
    assert settings.http.host == "0.0.0.0"
    mounted = {m["mountPath"] for m in bridge["volumeMounts"]}
    assert settings.mqtt.tls_ca_file is not None
    assert str(settings.mqtt.tls_ca_file.parent) in mounted


def test_services_and_policies_select_the_bridges(
    resources: list[Doc], workload: Doc
) -> None:
    labels = workload["spec"]["template"]["metadata"]["labels"]
    (bridge,) = containers(workload)
    port_names = {p["name"] for p in bridge["ports"]}
    services = of_kind(resources, "Service")
    if workload["kind"] == "StatefulSet":
        service_names = {s["metadata"]["name"] for s in services}
        assert workload["spec"]["serviceName"] in service_names
    for service in services:
        assert matches(service["spec"]["selector"], labels)
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names
    (pdb,) = of_kind(resources, "PodDisruptionBudget")
    assert matches(pdb["spec"]["selector"]["matchLabels"], labels)
    assert pdb["spec"].get("maxUnavailable") == 1 or pdb["spec"].get("minAvailable")

    policies = [
        p
        for p in of_kind(resources, "NetworkPolicy")
        if matches(p["spec"]["podSelector"]["matchLabels"], labels)
    ]
    assert policies, "no NetworkPolicy selects the bridges"
    egress_ports = {
        port["port"]
        for policy in policies
        for rule in policy["spec"].get("egress", [])
        for port in rule.get("ports", [])
    }
    assert {5432, 53} <= egress_ports
    with (K8S_DIR / "bridge.toml").open("rb") as fh:
        assert tomllib.load(fh)["mqtt"]["port"] in egress_ports


def test_migration_job(job: Doc, workload: Doc, kustomization: Doc) -> None:
    assert job["kind"] == "Job"
    assert job["metadata"]["namespace"] == kustomization["namespace"]
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (migrate,) = pod["containers"]
    assert [*migrate["command"], *migrate["args"]] == ["vitals-bridge", "migrate"]
    # The job migrates the database of the release about to roll out.
    (bridge,) = containers(workload)
    assert migrate["image"] == bridge["image"]
    name, _, tag = migrate["image"].partition(":")
    pins = {i["name"]: i.get("newTag") for i in kustomization.get("images", [])}
    assert pins.get(name, tag) == tag


def kubectl_kustomize(directory: Path) -> Iterator[Doc]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed")
    done = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=KUBECTL_TIMEOUT_SECONDS,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    yield from (d for d in yaml.safe_load_all(done.stdout) if d is not None)


def test_kustomize_renders(kustomization: Doc) -> None:
    rendered = list(kubectl_kustomize(K8S_DIR))
    (config,) = of_kind(rendered, "ConfigMap")
    (bridge,) = of_kind(rendered, "StatefulSet")
    assert config["metadata"]["name"].startswith("vitals-bridge-config-")
    volumes = bridge["spec"]["template"]["spec"]["volumes"]
    assert config["metadata"]["name"] in {
        v.get("configMap", {}).get("name") for v in volumes
    }
    for doc in rendered:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == kustomization["namespace"]


# -- the runbook follows the code ---------------------------------------------------


def test_runbook_lists_every_metric() -> None:
    text = RUNBOOK.read_text()
    names = [metric.name for metric in BridgeMetrics().registry.collect()]
    assert names
    missing = [name for name in names if f"`{name}" not in text]
    assert not missing, f"docs/runbook.md does not explain {missing}"


@pytest.mark.parametrize("command", ["add", "revoke"])
def test_runbook_names_every_kiosk_flag(command: str) -> None:
    cli = typer.main.get_command(app)
    kiosk = cli.commands["kiosk"]  # type: ignore[attr-defined]
    params = kiosk.commands[command].params
    flags = [opt for p in params for opt in p.opts if opt.startswith("--")]
    assert flags
    text = RUNBOOK.read_text()
    missing = [flag for flag in flags if flag not in text]
    assert not missing, f"docs/runbook.md lacks kiosk {command} {missing}"
