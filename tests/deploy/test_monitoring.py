"""The shipped alert rules (deploy/k8s/monitoring/prometheusrule.yaml) pass ``promtool check rules``, and
``promtool test rules`` runs deploy/k8s/monitoring/tests/alerts_test.yaml, where every alert has a case that
fires it and the quiet ones have a case that must not. That the metric names they use exist is checked
against a real worker in tests/fault/test_prometheus.py.

promtool is Debian's ``prometheus`` package, which ``make setup`` installs where it may (as it does kcat)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "monitoring"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not found (Debian: apt-get install "
                                                               "prometheus; make setup does it as root)")


def rule_groups() -> list[dict]:
    return yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())["spec"]["groups"]


def write_rules_file(folder: Path) -> Path:
    """The PrometheusRule's groups as the plain rules file Prometheus and promtool read."""
    path = folder / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule_groups()}, sort_keys=False, allow_unicode=True))
    return path


@needs_promtool
def test_promtool_checks_the_rules(tmp_path):
    done = subprocess.run([PROMTOOL, "check", "rules", str(write_rules_file(tmp_path))], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {sum(len(g['rules']) for g in rule_groups())} rules found" in done.stdout


@needs_promtool
def test_promtool_unit_tests_fire_every_alert(tmp_path):
    write_rules_file(tmp_path)
    shutil.copy(MONITORING / "tests" / "alerts_test.yaml", tmp_path)
    done = subprocess.run([PROMTOOL, "test", "rules", "alerts_test.yaml"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    tests = yaml.safe_load((MONITORING / "tests" / "alerts_test.yaml").read_text())["tests"]
    fired = {case["alertname"] for t in tests for case in t["alert_rule_test"] if case["exp_alerts"]}
    alerts = {r["alert"] for g in rule_groups() for r in g["rules"]}
    assert fired == alerts, f"alerts without a firing test: {sorted(alerts - fired)}"
