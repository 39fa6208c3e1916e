"""The docs keep up with the code: every config key, every metric family of a real scrape and
the CI entry point are where the docs say; a real scrape passes `promtool check metrics`."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from conftest import REPO
from gpucostd.config import SCHEMA

README = (REPO / "README.md").read_text()
CONFIG_REFERENCE = (REPO / "docs" / "configuration.md").read_text()
METRIC_REFERENCE = (REPO / "docs" / "metric-reference.md").read_text()


def test_every_config_key_is_documented():
    documented, section = set(), None
    for line in CONFIG_REFERENCE.splitlines():
        if not line.startswith("|"):
            section = None
        m = re.match(r"^\| `\[([a-z_.]+)\]` \| \| \|$", line)
        if m:
            section = m.group(1)
            continue
        m = re.match(r"^\| `([a-z_]+)` \|", line)
        if m and section:
            documented.add(f"{section}.{m.group(1)}")
    declared = {f"{s}.{k}" for s, keys in SCHEMA.items() for k in keys}
    assert declared - documented == set(), "config keys missing from docs/configuration.md"
    assert documented - declared == set(), "docs/configuration.md documents keys that do not exist"


def test_two_setup_commands_and_ci_runs_the_test_one():
    setup = README.split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```sh\n(.*?)\n```", setup, re.S)
    assert len(commands) == 2, commands
    assert "gpucostd run --simulate" in commands[0]
    ci = (REPO / ".ci" / "run").read_text()
    assert commands[1] in ci


@pytest.fixture(scope="module")
def scrape(tmp_path_factory):
    from conftest import DaemonProcess
    d = DaemonProcess(tmp_path_factory.mktemp("docs"),
                      extra_config="[tuning.gpu]\npower_limit_watts = 600\n"
                                   "[cost]\ngpu_hour_usd = 2.0\n")
    d.start()
    try:
        yield d.metrics()
    finally:
        d.stop()


def test_every_metric_family_is_documented(scrape):
    families = set(re.findall(r"^# TYPE (\S+) ", scrape, re.M))
    assert len(families) > 30
    documented = set(re.findall(r"`(gpucostd_[a-z0-9_]+)`", METRIC_REFERENCE))
    missing = sorted(f for f in families if f not in documented)
    assert not missing, f"metric families not in docs/metric-reference.md: {missing}"


@pytest.mark.skipif(not shutil.which("promtool"), reason="promtool not installed (apt install "
                                                         "prometheus; dev-env.sh --test does)")
def test_promtool_accepts_a_real_scrape(scrape):
    r = subprocess.run(["promtool", "check", "metrics"], input=scrape, capture_output=True,
                       text=True)
    assert r.returncode == 0 and r.stdout.strip() == "" and r.stderr.strip() == "", r
