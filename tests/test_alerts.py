"""The chart's alerts and Grafana dashboard, checked by Prometheus' own promtool (built from the Go
module proxy by scripts/build-promtool): the rules rendered by helm pass `promtool check rules` and the
unit tests in tests/alerts/ (`promtool test rules`: each alert fires on series past its threshold and
stays silent below it), each alert has its runbook in the README, and every query of the dashboard
and the rules is valid PromQL naming only metrics our roles export."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from nats.js import JetStreamContext

import controlplane
from agentstudio.bundle_store import BundleWatcher, buckets
from agentstudio.conversation.metrics import VoiceMetrics
from agentstudio.dialer.metrics import DialerMetrics
from agentstudio.ingest.metrics import IngestMetrics
from agentstudio.metrics import CallMetrics
from agentstudio.operator.metrics import OperatorMetrics
from test_charts import PROMETHEUS_RULE, TENANT_CHART, render

ALERT_TESTS = Path(__file__).parent / "alerts"
README = controlplane.ROOT / "README.md"
# Where a team reads the runbooks: the README on its own docs site, say (the chart sets none).
RUNBOOKS = "https://docs.example.com/agent-studio/README.md"
RULES = ["--set", "prometheusRule.enabled=true", "--set", f"prometheusRule.runbookUrl={RUNBOOKS}",
         "--api-versions", PROMETHEUS_RULE]
# Grafana's own variables, as it substitutes them before a query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "30s", "$__range": "6h"}


def promtool_binary() -> str:
    """Path of promtool; built on the first run (cached by version)."""
    out = subprocess.run(["bash", str(controlplane.ROOT / "scripts" / "build-promtool")], check=True,
                         capture_output=True, text=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)["PROMTOOL"]


def promtool(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([promtool_binary(), *args], capture_output=True, text=True, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"promtool {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return proc


def rule_groups(*values: str) -> list[dict[str, Any]]:
    [rule] = [o for o in render(TENANT_CHART, [*RULES, *values]) if o["kind"] == "PrometheusRule"]
    return rule["spec"]["groups"]


def alerts(groups: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for g in groups for r in g["rules"]}


def unit_tests_in(folder: Path, groups: list[dict[str, Any]]) -> list[str]:
    """The rendered rules as rules.yaml beside a copy of tests/alerts/, which name that file."""
    (folder / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    names = []
    for test in sorted(ALERT_TESTS.glob("*.yaml")):
        shutil.copy(test, folder / test.name)
        names.append(test.name)
    return names


def test_the_rules_render_only_when_asked_and_where_the_crd_is_served() -> None:
    assert not [o for o in render(TENANT_CHART, []) if o["kind"] == "PrometheusRule"]
    assert not [o for o in render(TENANT_CHART, ["--set", "prometheusRule.enabled=true"]) if o["kind"] == "PrometheusRule"]
    [rule] = [o for o in render(TENANT_CHART, [*RULES, "--set", "prometheusRule.labels.release=kube-prometheus"])
              if o["kind"] == "PrometheusRule"]
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus"


def test_the_rules_pass_promtool_check_and_their_unit_tests(tmp_path: Path) -> None:
    tests = unit_tests_in(tmp_path, rule_groups())
    out = promtool("check", "rules", "rules.yaml", cwd=tmp_path).stdout
    assert "SUCCESS: 6 rules found" in out, out
    out = promtool("test", "rules", *tests, cwd=tmp_path).stdout
    assert out.count("SUCCESS") == len(tests), out


def test_every_alert_is_unit_tested_firing_and_silent_and_has_its_runbook() -> None:
    rules = alerts(rule_groups())
    assert set(rules) == {"AgentStudioCallsFailing", "AgentStudioWebhookDeadLetters", "AgentStudioQueueAgeGrowing",
                          "AgentStudioBundleStale", "AgentStudioTenantAtCap", "AgentStudioReconcileErrors"}
    firing: set[str] = set()
    silent: set[str] = set()
    for path in ALERT_TESTS.glob("*.yaml"):
        for test in yaml.safe_load(path.read_text())["tests"]:
            for case in test.get("alert_rule_test", []):
                (firing if case["exp_alerts"] else silent).add(case["alertname"])
    assert firing == silent == set(rules)
    anchors = {re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
               for line in README.read_text().splitlines() if line.startswith("#")}
    for name, rule in rules.items():
        url = rule["annotations"]["runbook_url"]
        assert url == f"{RUNBOOKS}#{name.lower()}" and name.lower() in anchors, url
        assert rule["annotations"]["description"]


def test_without_a_runbook_url_the_alerts_point_nowhere_and_still_say_what_to_check() -> None:
    # The chart cannot know where a team reads its README: a guessed default would be a dead link.
    [rule] = [o for o in render(TENANT_CHART, ["--set", "prometheusRule.enabled=true", "--api-versions", PROMETHEUS_RULE])
              if o["kind"] == "PrometheusRule"]
    for alert in rule["spec"]["groups"][0]["rules"]:
        assert "runbook_url" not in alert["annotations"] and len(alert["annotations"]["description"]) > 40, alert


def test_thresholds_are_the_values(tmp_path: Path) -> None:
    # Stricter values than the unit tests assume: the cases past the defaults fail, or fire below.
    groups = rule_groups("--set-json", "prometheusRule.thresholds.callFailureRatio=0.05",
                         "--set", "prometheusRule.thresholds.atCapFor=40m",
                         "--set", "prometheusRule.thresholds.queueOldestAgeSeconds=1000",
                         "--set", "prometheusRule.alertLabels.team=voice")
    rules = alerts(groups)
    assert "> 0.05" in rules["AgentStudioCallsFailing"]["expr"]
    assert rules["AgentStudioTenantAtCap"]["for"] == "40m"
    assert rules["AgentStudioCallsFailing"]["labels"] == {"severity": "warning", "team": "voice"}
    unit_tests_in(tmp_path, groups)
    for test, failing in [("calls_failing.yaml", "a tenth failing is below the threshold"),
                          ("tenant_at_cap.yaml", "at its cap for 30 minutes fires"),
                          ("queue_age.yaml", "a queue nobody takes from fires")]:
        proc = promtool("test", "rules", test, cwd=tmp_path, check=False)
        assert proc.returncode != 0 and failing in proc.stdout + proc.stderr, proc.stdout


def test_the_dashboard_is_a_configmap_for_grafanas_sidecar() -> None:
    assert not [o for o in render(TENANT_CHART, []) if o["kind"] == "ConfigMap" and "dashboard" in o["metadata"]["name"]]
    objects = render(TENANT_CHART, ["--set", "grafanaDashboard.enabled=true"])
    [cm] = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "agent-studio-dashboard"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["agent-studio.json"])
    assert dashboard["uid"] == "agent-studio" and dashboard["panels"]
    objects = render(TENANT_CHART, ["--set", "grafanaDashboard.enabled=true", "--set", "grafanaDashboard.label=dashboards",
                                    "--set", "grafanaDashboard.labelValue=voice",
                                    "--set", "grafanaDashboard.annotations.grafana_folder=Agent Studio"])
    [cm] = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "agent-studio-dashboard"]
    assert cm["metadata"]["labels"]["dashboards"] == "voice" and "grafana_dashboard" not in cm["metadata"]["labels"]
    assert cm["metadata"]["annotations"] == {"grafana_folder": "Agent Studio"}


def dashboard_queries() -> dict[str, str]:
    """Every query of the rendered dashboard by where it is, Grafana's variables substituted."""
    [cm] = [o for o in render(TENANT_CHART, ["--set", "grafanaDashboard.enabled=true"])
            if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "agent-studio-dashboard"]
    dashboard = json.loads(cm["data"]["agent-studio.json"])
    queries = {}
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            queries[f"panel_{panel['id']}_{target['refId']}"] = expr
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":  # label_values(metric, label): the metric's series
            metric = re.fullmatch(r"label_values\((\w+), *\w+\)", variable["query"]["query"])
            assert metric, variable
            queries[f"variable_{variable['name']}"] = metric.group(1)
    return queries


async def exported_metrics(js: JetStreamContext) -> set[str]:
    """The names of every series our roles' registries can expose: ingest's (its requests, and the
    calls it ends and bundles it serves), the dialer's and its voice agent's, the operator's."""
    watcher = BundleWatcher(await buckets(js))  # not started: its collector still names its families
    served, dialer = CallMetrics(), DialerMetrics()
    served.watch_bundles(watcher)
    dialer.watch_bundles(watcher)
    names = set()
    for registry in (IngestMetrics().registry, served.registry, dialer.registry, VoiceMetrics().registry,
                     OperatorMetrics().registry):
        for family in registry.collect():
            suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"]}[family.type]
            names |= {family.name + suffix for suffix in suffixes}
    return names


def metric_names(expr: str) -> set[str]:
    names = set(re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*(?=\s*[{\[])", expr))
    return names | set(re.findall(r"\bagentstudio_[a-z0-9_]+", expr))


async def test_every_dashboard_and_alert_query_is_valid_promql_over_exported_metrics(
        js: JetStreamContext, tmp_path: Path) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 20
    rules = [{"record": f"agentstudio:dashboard:{where}", "expr": expr} for where, expr in queries.items()]
    (tmp_path / "dashboard.yaml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = promtool("check", "rules", "dashboard.yaml", cwd=tmp_path).stdout
    assert f"SUCCESS: {len(rules)} rules found" in out, out
    exported = await exported_metrics(js)
    # The list, each in the exported names: nothing here can pass by being left out.
    assert {"agentstudio_queue_pending_calls", "agentstudio_queue_oldest_pending_age_seconds",
            "agentstudio_calls_ended_total", "agentstudio_webhook_deliveries_total",
            "agentstudio_concurrency_slots_in_use", "agentstudio_concurrency_slots_cap",
            "agentstudio_bundle_loaded_version", "agentstudio_bundle_published_version",
            "agentstudio_bundle_loaded_compiled_timestamp_seconds",
            "agentstudio_operator_reconcile_errors_total"} <= exported
    used = {where: metric_names(expr) for where, expr in queries.items()}
    used |= {rule["alert"]: metric_names(rule["expr"]) for g in rule_groups() for rule in g["rules"]}
    unknown = {where: sorted(names - exported) for where, names in used.items() if names - exported}
    assert not unknown, f"queries naming metrics no role exports: {unknown}"
    assert all(used.values()), [where for where, names in used.items() if not names]


@pytest.mark.parametrize("expr", ["rate(agentstudio_calls_ended_total[5m]", "agentstudio_made_up_total"])
async def test_the_checks_catch_a_bad_query(expr: str, js: JetStreamContext, tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"groups": [{"name": "bad", "rules": [
        {"record": "agentstudio:bad", "expr": expr}]}]}))
    valid = promtool("check", "rules", "bad.yaml", cwd=tmp_path, check=False).returncode == 0
    assert not valid or metric_names(expr) - await exported_metrics(js)
