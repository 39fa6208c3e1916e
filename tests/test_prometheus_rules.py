"""The Prometheus rules: promtool accepts them, the unit tests cover every alert firing and not
firing, and every alert carries a severity, a summary, a description and a runbook that exists."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from conftest import REPO

RULES_DIR = REPO / "packaging" / "prometheus"
RULES = RULES_DIR / "gpucostd-rules.yml"
RULE_TESTS = RULES_DIR / "gpucostd-rules.test.yml"
RUNBOOKS = REPO / "docs" / "runbooks.md"
PROMTOOL = shutil.which("promtool")
need_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt install "
                                                             "prometheus; dev-env.sh --test does)")


def alert_blocks():
    """{alert name: its text} from the rules file."""
    text = RULES.read_text()
    parts = re.split(r"^      - (?=alert: |record: )", text, flags=re.M)[1:]
    return {re.match(r"alert: (\S+)", p).group(1): p for p in parts if p.startswith("alert:")}


def test_every_cause_an_operator_acts_on_has_an_alert():
    names = set(alert_blocks())
    for needed in ("GpucostdGpuLost", "GpucostdGpuFellOffTheBus", "GpucostdEccUncorrectable",
                   "GpucostdRowRemapPending", "GpucostdRowRemapFailure",
                   "GpucostdGpuRecoveryAction", "GpucostdGpuMissing", "GpucostdNodeCritical",
                   "GpucostdNvswitchSxid",
                   "GpucostdHwSlowdownSustained", "GpucostdThrottleCostHigh",
                   "GpucostdBelowTokensPerDollarFloor", "GpucostdTokensPerDollarBelowPeers",
                   "GpucostdIdleCostHigh",
                   "GpucostdIdleCapacityHigh", "GpucostdInferenceEndpointDown", "GpucostdSettingDrift",
                   "GpucostdHostCheckFailing", "GpucostdNvmlDown", "GpucostdDown",
                   "GpucostdAbsent", "GpucostdLoopStalled", "GpucostdDrainFailing",
                   "GpucostdDrainBraked"):
        assert needed in names


def test_every_alert_has_severity_summary_description_and_a_runbook_that_exists():
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
               for h in re.findall(r"^## (.+)$", RUNBOOKS.read_text(), re.M)}
    for name, block in alert_blocks().items():
        assert re.search(r"severity: (critical|warning|info)\n", block), name
        assert "summary:" in block and "description:" in block, name
        m = re.search(r'runbook_url: "docs/runbooks.md#([a-z0-9-]+)"', block)
        assert m, f"{name} has no runbook_url into docs/runbooks.md"
        assert m.group(1) in anchors, f"{name}: docs/runbooks.md has no section #{m.group(1)}"
        assert m.group(1) == name.lower(), name


def test_the_unit_tests_cover_every_alert_firing_and_not_firing():
    text = RULE_TESTS.read_text()
    cases = re.findall(r"alertname: (\S+)\n\s+exp_alerts:( \[\])?", text)
    firing = {a for a, empty in cases if not empty}
    quiet = {a for a, empty in cases if empty}
    names = set(alert_blocks())
    assert names - firing == set(), "alerts never tested firing"
    assert names - quiet == set(), "alerts never tested not firing"


@need_promtool
def test_promtool_check_rules():
    r = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


@need_promtool
def test_promtool_test_rules():
    r = subprocess.run([PROMTOOL, "test", "rules", RULE_TESTS.name], cwd=str(RULES_DIR),
                       capture_output=True, text=True)
    assert r.returncode == 0, "alert rule unit tests failed:\n" + r.stdout + r.stderr
