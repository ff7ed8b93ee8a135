"""docker-compose.yml stays valid (checked without a Docker engine), and the deployment files
it mounts exist and parse."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PASSWORDS = ("POSTGRES_PASSWORD", "REDIS_PASSWORD", "GRAFANA_ADMIN_PASSWORD")


def _compose_config(client: list[str], env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    if shutil.which(client[0]) is None:
        pytest.skip(f"{client[0]} not installed (make test installs Debian's docker-compose)")
    if client == ["docker", "compose"] and subprocess.run([*client, "version"], capture_output=True).returncode != 0:
        pytest.skip("docker compose plugin not installed")
    clean = {k: v for k, v in os.environ.items() if k not in PASSWORDS}
    # An empty env file: a developer's own .env beside the compose file must not fill the gaps.
    empty = tmp_path / "empty.env"
    empty.write_text("")
    return subprocess.run(
        [*client, "--env-file", str(empty), "-f", str(REPO / "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**clean, **env},
    )


@pytest.mark.parametrize("client", [["docker-compose"], ["docker", "compose"]])
def test_compose_file_is_valid(client, tmp_path):
    result = _compose_config(client, {name: f"pw-{name.lower()}" for name in PASSWORDS}, tmp_path)
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert "pw-postgres_password" in resolved["services"]["api"]["environment"]["AUDITOR_DATABASE_URL"]
    assert ":pw-redis_password@redis" in resolved["services"]["worker"]["environment"]["AUDITOR_BROKER_URL"]


@pytest.mark.parametrize("missing", PASSWORDS)
def test_compose_refuses_to_start_without_each_password(missing, tmp_path):
    """No default passwords: with one unset, `docker-compose config` fails and names it."""
    result = _compose_config(["docker-compose"], {n: "x" for n in PASSWORDS if n != missing}, tmp_path)
    assert result.returncode != 0 and missing in result.stderr, result.stderr


# ---- the compose file's shape, read with PyYAML (no Docker needed) ----

SERVICES = {"postgres", "redis", "migrate", "api", "worker", "prometheus", "grafana"}
APP_IMAGE = "auditor:latest"


@pytest.fixture(scope="module")
def compose() -> dict:
    # safe_load resolves the anchors and `<<` merge keys, as docker-compose does.
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def _environment(service: dict) -> dict:
    env = service.get("environment") or {}
    if isinstance(env, list):  # ["KEY=value", ...] form
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return env


def _depends_on(service: dict) -> dict:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: {"condition": "service_started"} for name in deps}
    return deps


def _app_services(compose: dict) -> dict:
    return {name: svc for name, svc in compose["services"].items() if "build" in svc or svc.get("image") == APP_IMAGE}


def _bind_sources(service: dict) -> list[str]:
    sources = []
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            source = volume.get("source", "") if volume.get("type", "bind") == "bind" else ""
        else:
            source = volume.split(":", 1)[0]
        if source.startswith("./deploy"):
            sources.append(source)
    return sources


def test_compose_has_the_seven_services(compose):
    assert set(compose["services"]) >= SERVICES


def test_app_services_wait_for_migrations(compose):
    services = compose["services"]
    assert services["migrate"]["command"] == ["auditor", "migrate"]
    assert _depends_on(services["migrate"])["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker"):
        deps = _depends_on(services[name])
        assert deps["migrate"]["condition"] == "service_completed_successfully", name
        assert deps["redis"]["condition"] == "service_healthy", name
    assert "--no-migrate" in services["api"]["command"]
    assert "8000:8000" in services["api"]["ports"]
    assert services["worker"]["command"] == ["auditor", "worker"]
    assert "AUDITOR_TORCH_THREADS" in _environment(services["worker"])


def test_backing_services_have_healthchecks(compose):
    services = compose["services"]
    for name in ("postgres", "redis", "api"):
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert services["redis"]["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]
    assert "/healthz" in " ".join(services["api"]["healthcheck"]["test"])
    env = _environment(services["postgres"])
    assert env["POSTGRES_USER"] == env["POSTGRES_DB"] == "auditor"
    assert env["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")  # required, no default


def test_every_app_service_gets_database_and_broker(compose):
    apps = _app_services(compose)
    assert {"migrate", "api", "worker"} <= set(apps)
    for name, service in apps.items():
        env = _environment(service)
        assert env.get("AUDITOR_DATABASE_URL") == (
            "postgresql://auditor:${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD (see .env.example)}@postgres:5432/auditor"
        ), name
        assert env.get("AUDITOR_BROKER_URL") == (
            "redis://:${REDIS_PASSWORD:?set REDIS_PASSWORD (see .env.example)}@redis:6379/0"
        ), name
        assert env.get("AUDITOR_DATA_DIR") == "/data", name
        assert any(str(v).endswith(":/data") for v in service.get("volumes", [])), name
        assert service.get("image") == APP_IMAGE, name


def test_mounted_deploy_files_exist(compose):
    sources = [src for svc in compose["services"].values() for src in _bind_sources(svc)]
    assert sources, "nothing is mounted from ./deploy"
    for source in sources:
        assert (REPO / source).exists(), f"{source} is mounted but missing from the repo"


def test_grafana_provisioning_and_dashboards_parse():
    grafana = REPO / "deploy" / "grafana"
    datasources = yaml.safe_load((grafana / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert [d["url"] for d in datasources["datasources"]] == ["http://prometheus:9090"]
    providers = yaml.safe_load((grafana / "provisioning" / "dashboards" / "auditor.yml").read_text())
    assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    dashboards = sorted((grafana / "dashboards").glob("*.json"))
    assert dashboards, "no dashboard JSON under deploy/grafana/dashboards"
    for path in dashboards:
        dashboard = json.loads(path.read_text())
        assert dashboard.get("uid") and dashboard.get("title"), path.name
        assert isinstance(dashboard.get("panels"), list), path.name


def test_prometheus_scrapes_api_and_workers():
    config = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets = {}
    for job in config["scrape_configs"]:
        found = [t for static in job.get("static_configs", []) for t in static["targets"]]
        found += [f"{name}:{sd['port']}" for sd in job.get("dns_sd_configs", []) for name in sd["names"]]
        for target in found:
            targets[target] = job.get("metrics_path", "/metrics")
    assert targets.get("api:8000") == "/metrics"
    assert targets.get("worker:9100") == "/metrics"


def test_docker_build_context_has_what_the_dockerfile_copies():
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    assert {".venv", ".git", ".auditor", "bench/results"} <= ignored
    dockerfile = (REPO / "Dockerfile").read_text()
    for line in dockerfile.splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), f"Dockerfile copies missing {source}"
                assert source not in ignored, f"Dockerfile copies {source}, which .dockerignore drops"
    assert "/opt/auditor-models" in dockerfile  # weights baked in at build time


def test_nothing_is_exposed_or_defaulted_that_leads_to_the_data(compose):
    """Postgres and Redis are not published; Prometheus (no authentication) and Grafana bind to
    127.0.0.1 unless told otherwise; Grafana gets no database credentials; Redis needs a password;
    the worker and Redis have memory limits."""
    services = compose["services"]
    text = (REPO / "docker-compose.yml").read_text()
    assert "ports" not in services["postgres"] and "ports" not in services["redis"]
    for name in ("prometheus", "grafana"):
        assert all(str(port).startswith("${") and "127.0.0.1" in str(port) for port in services[name]["ports"]), name
    assert not any("POSTGRES" in key or "DATABASE" in key for key in _environment(services["grafana"]))
    assert "--requirepass" in services["redis"]["command"]
    assert not re.search(r"PASSWORD:\s*(auditor|admin)\b|PASSWORD:-", text)  # no literal or default password
    for name in ("worker", "redis"):
        assert services[name]["deploy"]["resources"]["limits"]["memory"], name
    assert (REPO / ".env.example").read_text().count("_PASSWORD=") == 3


def test_the_image_runs_as_an_unprivileged_user():
    dockerfile = (REPO / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", dockerfile, flags=re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    assert dockerfile.rindex("USER ") > dockerfile.rindex("RUN ")  # nothing runs as root after it
