"""compose.yaml, the Dockerfile and the health checks: accepted by docker-compose, consistent with the
settings, and the health-check commands work against real peers (Redis, a DICOM SCP, an HTTP server).

No Docker engine runs here: ``docker-compose config`` validates the file (GPU reservations and depends_on
conditions included) without one.
"""

from __future__ import annotations

import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import yaml
from pynetdicom.sop_class import Verification

from radialog.presence import ready_key
from radialog.settings import Settings
from tests.support.brokers import redis_url
from tests.support.dicom_peers import StorePeer
from tests.support.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose.yaml"
HEALTHCHECK = ROOT / "deploy" / "healthcheck.py"
ENV = {
    "POSTGRES_PASSWORD": "pw",
    "ORTHANC_PASSWORD": "pw2",
    "RADIALOG_MODELS": "/srv/models",
    "GRAFANA_PASSWORD": "pw3",
}
TEST_REDIS = redis_url(__name__)


def compose_config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose; .ci/run does)")
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith(("RADIALOG_", "POSTGRES_", "ORTHANC_", "GRAFANA_"))
    }
    return subprocess.run(
        [binary, "-f", str(COMPOSE), "config"],
        cwd=ROOT,
        env={**clean, **env},
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def resolved() -> dict:
    result = compose_config(ENV)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_compose_has_the_hospital_services_with_health_checks(resolved: dict) -> None:
    services = resolved["services"]
    assert {"orthanc", "redis", "postgres", "migrate", "node", "worker-gpu0", "exporter", "api"} <= set(services)
    for name in ("orthanc", "redis", "postgres", "node", "worker-gpu0", "api"):
        assert services[name]["healthcheck"]["test"], name
    for name in ("node", "worker-gpu0", "exporter", "api"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_gpu_worker_reserves_its_gpu_and_mounts_the_models_read_only(resolved: dict) -> None:
    worker = resolved["services"]["worker-gpu0"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["device_ids"] == ["0"] and "gpu" in device["capabilities"]
    models = [v for v in worker["volumes"] if str(v).split(":")[0] == "/srv/models" or "/srv/models" in str(v)]
    assert models and all(str(v).endswith(":ro") for v in models), worker["volumes"]
    env = worker["environment"]
    assert env["RADIALOG_MODEL_DIR"].startswith("/models/") and env["RADIALOG_BASE_MODEL_DIR"].startswith("/models/")
    # its health check looks for the readiness key of the hostname it runs under
    hostname = worker["command"][worker["command"].index("--hostname") + 1]
    assert worker["healthcheck"]["test"][-1] == hostname


def test_every_radialog_variable_is_a_setting(resolved: dict) -> None:
    """A typo in an environment name would be silently ignored by pydantic-settings: catch it here."""
    fields = {f"RADIALOG_{name.upper()}" for name in Settings.model_fields} | {"RADIALOG_LOG_LEVEL"}
    used = {k for s in resolved["services"].values() for k in (s.get("environment") or {}) if k.startswith("RADIALOG_")}
    example = set(re.findall(r"^#?\s*(RADIALOG_[A-Z_]+)=", (ROOT / "deploy" / "env.example").read_text(), re.MULTILINE))
    assert used and (used | example) - fields - {"RADIALOG_MODELS", "RADIALOG_VERSION"} == set()


def test_compose_environment_parses_as_settings(resolved: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each process's environment, read the way it will be: by pydantic-settings from RADIALOG_* variables."""
    for name in ("node", "worker-gpu0", "api"):
        for key in [k for k in os.environ if k.startswith("RADIALOG_")]:
            monkeypatch.delenv(key)
        for key, value in resolved["services"][name]["environment"].items():
            monkeypatch.setenv(key, str(value))
        settings = Settings()
        assert settings.destinations[0].host == "orthanc" and settings.destinations[0].port == 4242
        assert settings.resolved_database_url.startswith("postgresql+psycopg2://radialog:pw@postgres")
        assert settings.broker_url == "redis://redis:6379/0"
        if name == "node":
            assert settings.allowed_calling_aets == ["ORTHANC", "HEALTHCHECK"]


def test_compose_refuses_to_start_without_the_passwords() -> None:
    result = compose_config({k: v for k, v in ENV.items() if k != "POSTGRES_PASSWORD"})
    assert result.returncode != 0 and "POSTGRES_PASSWORD" in result.stderr


def test_dockerfile_copies_only_what_exists() -> None:
    text = (ROOT / "Dockerfile").read_text()
    sources = [src for line in re.findall(r"^COPY\s+(.+)$", text, re.MULTILINE) for src in line.split()[:-1]]
    assert sources and all((ROOT / src).exists() for src in sources), sources
    targets = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, re.MULTILINE))
    assert {"app", "orthanc"} <= targets


def test_the_image_holds_every_package_of_the_wheel() -> None:
    """The image installs the project from its copied sources: a package the wheel ships (pyproject) but the
    Dockerfile does not copy is missing there (the `radialog` entry point lives in ``composition``)."""
    import tomllib

    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = set(re.findall(r"^COPY\s+(\w+)\s+\./\1$", (ROOT / "Dockerfile").read_text(), re.MULTILINE))
    assert {pattern.rstrip("*") for pattern in packages} <= copied


# -- the health-check commands, against real peers -------------------------------------------------
def healthcheck(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK), *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def echo_scp() -> Iterator[int]:
    peer = StorePeer(ae_title="RADIALOG", accept=(Verification,))
    yield peer.port
    peer.stop()


def test_dicom_echo_check(echo_scp: int) -> None:
    assert healthcheck("dicom-echo", "127.0.0.1", str(echo_scp), "RADIALOG").returncode == 0
    down = healthcheck("dicom-echo", "127.0.0.1", str(free_port()), "RADIALOG", "--timeout", "2")
    assert down.returncode == 1 and "unhealthy" in down.stderr


def test_worker_check_sees_the_readiness_key() -> None:
    hostname = f"radialog-test-{uuid.uuid4().hex[:8]}@host"
    client = redis.Redis.from_url(TEST_REDIS)
    env = {"RADIALOG_BROKER_URL": TEST_REDIS}
    try:
        missing = healthcheck("worker", hostname, env=env)
        assert missing.returncode == 1 and "not announced" in missing.stderr
        client.set(ready_key(hostname), '{"model": "test"}', ex=30)
        assert healthcheck("worker", hostname, env=env).returncode == 0
    finally:
        client.delete(ready_key(hostname))
        client.close()


def test_http_check() -> None:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/healthz" else 503)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        assert healthcheck("http", f"{base}/healthz").returncode == 0
        assert healthcheck("http", f"{base}/readyz").returncode == 1
    finally:
        server.shutdown()
        server.server_close()


def test_readme_configuration_reference_matches_the_settings() -> None:
    """The README's table is generated from radialog/settings.py; a new setting must appear there."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "config_reference.py"), "--check"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    readme = (ROOT / "README.md").read_text()
    for name in Settings.model_fields:
        assert f"`RADIALOG_{name.upper()}`" in readme
    for licence in ("Llama 2", "Vicuna v1.3", "non-commercial", "MIMIC-CXR", "CC BY-NC-SA", "Not a medical device"):
        assert licence in readme
