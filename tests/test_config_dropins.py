"""Drop-ins: gpucostd.toml, then gpucostd.d/*.toml in name order; a later file wins key by key;
overrides with the same match merge; errors name the file and line; `config show` says where
each value came from."""
from __future__ import annotations

import subprocess

import pytest

from gpucostd.config import ConfigError, load

from conftest import gpucostd_cmd

MAIN = """[cost]
gpu_hour_usd = 2.0
currency = "EUR"

[tuning.gpu]
power_limit_percent = 90

[[tuning.gpu.override]]
match = "index:0"
persistence_mode = true
power_limit_percent = 80

[[inference.endpoint]]
url = "http://127.0.0.1:8000/metrics"
gpus = [0, 1]
"""


def setup(tmp_path, **dropins):
    main = tmp_path / "gpucostd.toml"
    main.write_text(MAIN)
    d = tmp_path / "gpucostd.d"
    d.mkdir()
    for name, text in dropins.items():
        stem, _, ext = name.rpartition("_")         # calibrated_toml -> calibrated.toml
        (d / f"{stem}.{ext}").write_text(text)
    return main


def test_dropins_are_read_in_name_order_and_win_key_by_key(tmp_path):
    main = setup(tmp_path)
    d = tmp_path / "gpucostd.d"
    (d / "20-late.toml").write_text("[cost]\ngpu_hour_usd = 4.0\n")
    (d / "10-early.toml").write_text("[cost]\ngpu_hour_usd = 3.0\npue = 1.2\n")
    (d / "notes.txt").write_text("[cost]\ngpu_hour_usd = 99.0\n")
    (d / ".hidden.toml").write_text("[cost]\ngpu_hour_usd = 98.0\n")
    cfg = load(str(main))
    assert cfg.cost.gpu_hour_usd == 4.0          # 20-late.toml after 10-early.toml
    assert cfg.cost.pue == 1.2 and cfg.cost.currency == "EUR"
    assert [p.rsplit("/", 1)[-1] for p, _t in cfg.files] == ["gpucostd.toml", "10-early.toml",
                                                             "20-late.toml"]


def test_an_override_with_the_same_match_merges_and_watts_replace_percent(tmp_path):
    main = setup(tmp_path, calibrated_toml='[[tuning.gpu.override]]\nmatch = "index:0"\n'
                                           'power_limit_watts = 550\n'
                                           '[[tuning.gpu.override]]\nmatch = "index:1"\n'
                                           'power_limit_watts = 500\n')
    cfg = load(str(main))
    desired, source = cfg.gpu_settings_for(0, "GPU-x", "NVIDIA H100 80GB HBM3")
    assert desired == {"persistence_mode": True, "power_limit_watts": 550}
    assert source["power_limit_watts"] == "override index:0"
    assert cfg.gpu_settings_for(1, None, None)[0]["power_limit_watts"] == 500
    assert cfg.gpu_settings_for(2, None, None)[0] == {"power_limit_percent": 90.0}
    assert [e.gpus for e in cfg.inference_endpoints] == [(0, 1)]


def test_an_error_in_a_dropin_names_its_file_and_line(tmp_path):
    main = setup(tmp_path, bad_toml="# comment\n[cost]\ngpu_hour_usd = -1\n")
    with pytest.raises(ConfigError) as e:
        load(str(main))
    assert str(e.value).startswith(str(tmp_path / "gpucostd.d" / "bad.toml") + ":3:")
    other = tmp_path / "other"
    other.mkdir()
    main = setup(other, conflict_toml='[inference]\nmetrics_url = "http://127.0.0.1:9/metrics"\n')
    with pytest.raises(ConfigError, match="not both.*merged config of"):
        load(str(main))


def test_config_show_says_where_each_value_came_from(tmp_path):
    main = setup(tmp_path, calibrated_toml='[[tuning.gpu.override]]\nmatch = "index:0"\n'
                                           'power_limit_watts = 550\n')
    r = subprocess.run(gpucostd_cmd() + ["config", "show", "--config", str(main)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    dropin = tmp_path / "gpucostd.d" / "calibrated.toml"
    out = r.stdout
    assert out.startswith(f"# files read, in order: {main}, {dropin}")
    assert f"power_limit_watts = 550  # {dropin}:3" in out
    assert f"persistence_mode = true  # {main}:10" in out
    assert f"gpu_hour_usd = 2.0  # {main}:2" in out
    assert "interval_seconds = 1.0  # default" in out
    assert "power_limit_percent = 80" not in out        # replaced by the drop-in's watts
    # what it prints is a valid config with the same values
    again = tmp_path / "again"
    again.mkdir()
    (again / "gpucostd.toml").write_text(out)
    assert load(str(again / "gpucostd.toml")).gpu_settings_for(0, None, None)[0] == \
        load(str(main)).gpu_settings_for(0, None, None)[0]
