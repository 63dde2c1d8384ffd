"""docker-compose.yml: valid for Compose, and every setting it passes is one the services read."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from common.settings import GatewaySettings, WorkerSettings
from schemas.registry import load_registry

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"


def compose_command() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


@pytest.mark.skipif(compose_command() is None, reason="no Compose implementation (docker compose / docker-compose)")
def test_compose_file_validates() -> None:
    result = subprocess.run(
        [*compose_command(), "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_services_and_gpu_reservation(compose) -> None:
    services = compose["services"]
    assert {"rabbitmq", "minio", "minio-init", "gateway", "worker"} <= set(services)
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert any(v.startswith("hf-cache:") for v in services["worker"]["volumes"])
    assert "./infra/rabbitmq/rabbitmq.conf" in services["rabbitmq"]["volumes"][0]


@pytest.mark.parametrize(("service", "settings"), [("gateway", GatewaySettings), ("worker", WorkerSettings)])
def test_every_videogen_variable_is_a_real_setting(compose, service, settings) -> None:
    env = compose["services"][service]["environment"]
    fields = {f"VIDEOGEN_{name.upper()}" for name in settings.model_fields}
    unknown = {k for k in env if k.startswith("VIDEOGEN_")} - fields
    assert not unknown, f"{service} sets variables no setting reads: {unknown}"


def test_worker_serves_registered_models(compose) -> None:
    served = compose["services"]["worker"]["environment"]["VIDEOGEN_SERVE_MODELS"].split(",")
    assert set(served) <= set(load_registry().models)


def test_broker_config_raises_the_consumer_timeout() -> None:
    conf = (ROOT / "infra/rabbitmq/rabbitmq.conf").read_text()
    match = re.search(r"^consumer_timeout\s*=\s*(\d+)\s*$", conf, re.MULTILINE)
    assert match and int(match.group(1)) >= 2 * 3600 * 1000  # milliseconds


def test_gateway_gets_a_key_file(compose) -> None:
    gateway = compose["services"]["gateway"]
    target = gateway["environment"]["VIDEOGEN_API_KEYS_FILE"]
    assert any(v.split(":")[1] == target for v in gateway["volumes"]), "the key file is mounted where it is read"
    assert "VIDEOGEN_AUTH_DISABLED" not in gateway["environment"]
