"""deploy/prometheus and deploy/grafana: the alert rules and the board validate (promtool from Debian's
prometheus package), the rules fire on the series that should raise them, and every metric they use is
in the real exposition of the API (/metrics over a registry and Redis) and of a worker (its default
registry, the queue-depth collector on Redis and the collector of a real engine over the tiny model)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from api.app import create_app
from radialog.registry import Registry
from radialog.settings import Settings
from tests.support.brokers import redis_url

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "radialog.json"
METRIC = re.compile(r"\b(radialog_[A-Za-z0-9_:]+)")
SELECTOR = re.compile(r"\b(radialog_[A-Za-z0-9_:]+)\{([^}]*)\}")
#: Grafana's own variables, as Grafana substitutes them before the query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}


def promtool(*args: str, cwd: Path = PROMETHEUS) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool is not installed (apt-get install prometheus; .ci/run and scripts/setup do)")
    return subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def rule_expressions() -> dict[str, str]:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    return {rule["alert"]: rule["expr"] for group in rules["groups"] for rule in group["rules"]}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_expressions() -> dict[str, str]:
    out = {}
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            out[f"{panel['title']} / {target['refId']}"] = expr
    return out


# -- promtool ------------------------------------------------------------------------------------------
def test_alert_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert {
        "RadialogNoWorkerReady",
        "RadialogExportDead",
        "RadialogQueueGrowing",
        "RadialogDiskFloorNear",
        "RadialogReportLatencyHigh",
    } <= set(rule_expressions())


def test_alert_rules_fire_on_their_series_and_not_otherwise() -> None:
    """deploy/prometheus/alerts_test.yml: each alert raised by the series that should raise it, at the
    right time and with its text; a healthy or draining series raises nothing."""
    result = promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
    tested = {case["alertname"] for test in tests for case in test["alert_rule_test"] if case["exp_alerts"]}
    assert tested == set(rule_expressions())  # every rule is shown to fire


def test_prometheus_config_passes_promtool_and_scrapes_the_compose_services() -> None:
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    for target in targets:
        service, port = target.split(":")
        command = compose[service]["command"]
        if service == "api":
            assert command[command.index("--port") + 1] == port
        else:  # a worker serves its metrics only with --metrics-port
            assert command[command.index("--metrics-port") + 1] == port, service


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses every panel's query (as a recording rule), Grafana's variables substituted."""
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": expr}
                    for i, expr in enumerate(dashboard_expressions().values())
                ],
            }
        ]
    }
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = promtool("check", "rules", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


# -- the Grafana board and its provisioning ------------------------------------------------------------
def test_dashboard_json_is_a_provisioned_grafana_board() -> None:
    board = dashboard()
    assert board["uid"] == "radialog-node" and board["title"] and isinstance(board["schemaVersion"], int)
    datasource = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = datasource["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        assert panel["type"] in {"timeseries", "stat"}, panel["title"]
        assert panel["datasource"]["uid"] == source["uid"], panel["title"]
        grid = panel["gridPos"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), panel["title"]
    exprs = " ".join(dashboard_expressions().values())
    for needed in (
        "radialog_instances_received_total",
        "radialog_job_stage_seconds_bucket",
        "radialog_queue_depth",
        "radialog_engine_slots",
        'radialog_dialog_turn_seconds_bucket{phase="first"}',
        'radialog_exports{state="PENDING"}',
        "radialog_job_failures_total",
    ):
        assert needed in exprs, needed  # what the issue asks the board to show
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "radialog.yml").read_text())
    (entry,) = provider["providers"]
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in compose["grafana"]["volumes"] if v.startswith("./")}
    assert (ROOT / mounts[entry["options"]["path"]] / DASHBOARD.name).is_file()
    assert (ROOT / mounts["/etc/grafana/provisioning"] / "datasources" / "prometheus.yml").is_file()
    for service in ("grafana", "prometheus"):
        assert compose[service]["profiles"] == ["monitoring"]  # optional: plain `up` starts neither


# -- every metric used exists -------------------------------------------------------------------------
def _families(text: str) -> dict[str, tuple[set[str], set[str]]]:
    """Sample name -> (the family's type, label names seen) from a Prometheus text exposition, with the
    sample names a family has even before its first observation (``_total``, ``_bucket``, ...)."""
    out: dict[str, tuple[set[str], set[str]]] = {}
    suffixes = {
        "counter": ["_total", "_created"],
        "histogram": ["_bucket", "_sum", "_count", "_created"],
        "summary": ["_sum", "_count", "_created", ""],
        "gauge": [""],
        "untyped": [""],
        "info": ["_info"],
    }
    for family in text_string_to_metric_families(text):
        labels = {key for sample in family.samples for key in sample.labels}
        names = {family.name + suffix for suffix in suffixes.get(family.type, [""])}
        names |= {sample.name for sample in family.samples}
        for name in names:
            out[name] = ({family.type}, labels - {"le", "quantile"})
    return out


@pytest.fixture
def exposition(sqlite_registry: Registry, settings: Settings, tiny_model: tuple[Path, Path]) -> dict:
    """The metric families the API and a worker really export."""
    from prometheus_client import REGISTRY

    import workers.metrics  # noqa: F401  (the worker's histograms and counters live in the default registry)
    from workers.engine import Engine, EngineConfig
    from workers.metrics import QueueDepthCollector, register_engine
    from workers.models.radialog_v2.backend import load_radialog_v2

    api_settings = settings.model_copy(update={"broker_url": redis_url(__name__)})
    with TestClient(create_app(api_settings, sqlite_registry)) as client:
        api_text = client.get("/metrics").text
    worker = CollectorRegistry()
    worker.register(QueueDepthCollector(api_settings))
    register_engine(
        Engine(load_radialog_v2(*tiny_model, device="cpu"), EngineConfig(report_slots=2, dialog_slots=1)), worker
    )
    text = generate_latest(REGISTRY).decode() + generate_latest(worker).decode()
    return {**_families(text), **_families(api_text)}


def test_every_metric_of_the_rules_and_the_board_is_exported(exposition: dict) -> None:
    used = {
        **{f"rule {k}": v for k, v in rule_expressions().items()},
        **{f"panel {k}": v for k, v in dashboard_expressions().items()},
    }
    missing = {where: name for where, expr in used.items() for name in METRIC.findall(expr) if name not in exposition}
    assert missing == {}, f"metrics used but not exported: {missing}"
    for where, expr in used.items():
        for name, selector in SELECTOR.findall(expr):
            keys = {part.split("=")[0].strip().rstrip("!~") for part in selector.split(",") if part.strip()}
            _types, labels = exposition[name]
            if labels:  # labels are known once the family has a sample
                assert keys <= labels, f"{where}: {name} has no label {keys - labels}"
