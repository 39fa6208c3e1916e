"""Config: defaults, validation errors (file, line, key, value, what is allowed), exit codes."""
from __future__ import annotations

import subprocess
import sys

import pytest

from gpucostd import config
from gpucostd.config import ConfigError

CLI = [sys.executable, "-m", "gpucostd"]


def test_missing_default_file_means_all_defaults(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "DEFAULT_PATH", str(tmp_path / "absent.toml"))
    cfg = config.load()
    assert cfg.daemon.interval_seconds == 1.0
    assert cfg.simulate.scenario == "builtin:h100x8"
    assert cfg.daemon.listen_address.endswith(":9477")
    assert cfg.tuning.enforce is True and cfg.checks.min_kernel == "5.15"


def test_explicit_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        config.load(str(tmp_path / "nope.toml"))


@pytest.mark.parametrize("text,key,needle,line", [
    ("[daemon]\ninterval_secnds = 2\n", "daemon.interval_secnds", "unknown key", 2),
    ("[daemon]\n\ninterval_seconds = \"fast\"\n", "daemon.interval_seconds", "must be a number",
     3),
    ("[daemon]\ninterval_seconds = 0\n", "daemon.interval_seconds", "allowed 0.05..3600", 2),
    ("[tuning]\nenforce = \"yes\"\n", "tuning.enforce", "true or false", 2),
    ("[checks]\niommu = \"maybe\"\n", "checks.iommu", '"passthrough"', 2),
    ("[tuning.gpu]\npower_limit_watts = 500\npower_limit_percent = 80\n",
     "power_limit_percent", "not both", 3),
    ("[tuning.nic.eth0]\nrx = -5\n", "tuning.nic.eth0.rx", '"max"', 2),
    ("[[tuning.gpu.override]]\nmatch = \"model:H100*\"\n[[tuning.gpu.override]]\n"
     "match = \"model:H100 80GB*\"\n", "overlap", "overlap", 4),
    ("[daemon]\nlisten_address = \"9477\"\n", "daemon.listen_address", "host:port", 2),
    ("[bogus]\nx = 1\n", "[bogus]", "unknown section", 1),
    ("[daemon\n", "", "not valid TOML", 1),
])
def test_errors_name_file_line_key_and_fix(tmp_path, text, key, needle, line):
    path = tmp_path / "gpucostd.toml"
    path.write_text(text)
    r = subprocess.run(CLI + ["config", "check", str(path)], capture_output=True, text=True)
    assert r.returncode == 2, r
    assert r.stdout == ""
    assert f"{path}:{line}:" in r.stderr, r.stderr
    assert key in r.stderr and needle in r.stderr, r.stderr


def test_check_prints_only_ok(tmp_path):
    path = tmp_path / "gpucostd.toml"
    path.write_text("[daemon]\ninterval_seconds = 2\n[cost]\ngpu_hour_usd = 2.5\n")
    r = subprocess.run(CLI + ["config", "check", str(path)], capture_output=True, text=True)
    assert (r.returncode, r.stdout, r.stderr) == (0, "ok\n", "")


def test_show_round_trips_with_defaults(tmp_path):
    path = tmp_path / "gpucostd.toml"
    path.write_text("[tuning.gpu]\npower_limit_watts = 600\n[[tuning.gpu.override]]\n"
                    "match = \"index:3\"\npersistence_mode = true\n[tuning.nic.eth1]\n"
                    "rx = \"max\"\ntx = 1024\n[cost.model_hour_usd]\n\"*H100*\" = 2.9\n")
    r = subprocess.run(CLI + ["config", "show", "--config", str(path)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    again = config.parse(r.stdout)
    assert again.daemon.interval_seconds == 1.0
    assert again.gpu_settings_for(3, None, None)[0] == {"power_limit_watts": 600,
                                                        "persistence_mode": True}
    assert dict(again.nic_tuning["eth1"]) == {"rx": "max", "tx": 1024}
    assert again.price_for_model("NVIDIA H100 80GB HBM3") == 2.9


def test_run_with_bad_config_exits_2(tmp_path):
    path = tmp_path / "gpucostd.toml"
    path.write_text("[daemon]\nkernel_log = \"dmesg\"\n")
    r = subprocess.run(CLI + ["run", "--config", str(path), "--simulate"], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 2
    assert "daemon.kernel_log" in r.stderr and '"journal"' in r.stderr


def test_override_specificity():
    cfg = config.parse('[tuning.gpu]\npower_limit_percent = 90\n'
                       '[[tuning.gpu.override]]\nmatch = "model:*H100*"\npower_limit_watts = 650\n'
                       '[[tuning.gpu.override]]\nmatch = "index:2"\npower_limit_watts = 500\n')
    h100 = "NVIDIA H100 80GB HBM3"
    assert cfg.gpu_settings_for(0, None, h100)[0] == {"power_limit_watts": 650}
    assert cfg.gpu_settings_for(2, None, h100) == ({"power_limit_watts": 500},
                                                   {"power_limit_watts": "override index:2"})
    assert cfg.gpu_settings_for(1, None, "NVIDIA A100")[0] == {"power_limit_percent": 90}
