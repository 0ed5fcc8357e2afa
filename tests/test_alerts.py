"""configs/alerts.yml is valid Prometheus and its rules fire (and stay quiet) as intended:
`promtool check rules` and the promtool unit tests under tests/alerts/. That the rules use the
series names Ray really exports is checked against a live scrape in tests/test_monitoring.py."""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import ROOT
from tests.prometheus import PROMTOOL

ALERTS = ROOT / "configs" / "alerts.yml"
UNIT_TESTS = sorted((ROOT / "tests" / "alerts").glob("*.yml"))

pytestmark = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (apt-get install prometheus)"
)


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_alert_rules_are_valid():
    checked = promtool("check", "rules", str(ALERTS))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 6 rules found" in checked.stdout


def test_alert_rules_pass_their_unit_tests():
    assert UNIT_TESTS, "no promtool unit tests under tests/alerts/"
    tested = promtool("test", "rules", *map(str, UNIT_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "FAILED" not in tested.stdout + tested.stderr


def test_every_alert_has_a_unit_test():
    import yaml

    names = {
        rule["alert"]
        for group in yaml.safe_load(ALERTS.read_text())["groups"]
        for rule in group["rules"]
    }
    tested = {
        case["alertname"]
        for path in UNIT_TESTS
        for test in yaml.safe_load(path.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert names == tested, f"alerts never seen firing in a unit test: {names - tested}"
