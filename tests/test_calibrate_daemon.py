"""`gpucostd calibrate` through the running daemon (real processes on a simulated node): the
calibration runs in the daemon's loop, enforcement does not fight it, --apply writes the drop-in
the daemon then enforces, --last, metrics, events; SIGTERM of the daemon and SIGKILL in the middle
restore the limits (the latter at the next start)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from gpucostd.calibration import command as cal_mod
from gpucostd.calibration import session
from gpucostd.views.statusclient import request

from conftest import gpucostd_cmd, metric_value, need_root, wait_for

pytestmark = need_root("calibrate changes power limits and is root only")
BUILTIN = Path(cal_mod.__file__).parents[1] / "sim" / "scenarios" / "calibrate.toml"
PRICES = "[cost]\ngpu_hour_usd = 1.0\nenergy_usd_per_kwh = 0.3\npue = 1.4\n"


def _scenario(tmp_path, limit=None, name="cal.toml", decode_share=None):
    text = BUILTIN.read_text()
    if decode_share is not None:    # a serving mix (docs/scenarios.md, "Physics")
        text = text.replace("decode_share = 0.0\n", f"decode_share = {decode_share}\n", 1)
    if limit is not None:       # the driver kept a calibration step's limit across the crash
        text = text.replace("power_limit = 700\n", f"power_limit = {limit}\n", 1)
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def _limits(d):
    m = d.metrics()
    return [metric_value(m, "gpucostd_gpu_power_limit_watts", gpu=str(i)) for i in range(4)]


def _progress(d):
    try:
        return request(d.socket, {"cmd": "calibrate", "action": "status"})["calibration"]
    except Exception:  # noqa: BLE001 - not started yet
        return None


def _start_cli(d, *args):
    return subprocess.Popen(gpucostd_cmd() + ["calibrate", "--config", str(d.config)]
                            + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _events(d):
    r = d.cli("events", "--json")
    return json.loads(r.stdout)


def test_calibrate_through_the_daemon_and_apply(daemon_factory, tmp_path):
    # the configured limit is enforced every 0.1 s: the calibration must not be fought. Half
    # decode, half prefill at $0.50 per GPU-hour: 450 W keeps 95% of the tokens/s and is the
    # cheapest per token (physics.steady_state at 700, 450 and 200 W says so)
    prices = PRICES.replace("gpu_hour_usd = 1.0", "gpu_hour_usd = 0.5")
    # interval 0.5 s: the endpoint's deadline is half of it, and 0.1 s is missed on a loaded host
    d = daemon_factory(scenario=_scenario(tmp_path, decode_share=0.5), interval=0.5,
                       extra_config=prices + (
        "[tuning]\nverify_interval_seconds = 0.1\n[tuning.gpu]\npower_limit_watts = 700\n"))
    d.start()
    wait_for(lambda: metric_value(d.metrics(), "gpucostd_node_tokens_per_second"), 15,
             what="tokens/s")
    # --lever power: at this mix the GPUs draw 574 of 700 W, so auto would sweep the clock
    r = d.cli("calibrate", "--steps", "3", "--dwell", "3", "--warmup", "1", "--apply", "--json",
              "--min-throughput", "0.9", "--lever", "power",
              timeout=90)
    assert r.returncode == 0, r.stderr + d.output()
    rep = json.loads(r.stdout)
    assert rep["state"] == "done" and rep["applied"]
    assert r.stderr == ""                                   # no progress in a pipe
    g = rep["groups"][0]
    assert g["steps_watts"] == [700, 450, 200]
    rec = g["recommendation"]["tokens_per_dollar"]["power_limit_watts"]
    assert rec == 450
    assert [row["power_limit_watts"] for row in g["rows"]] == [700, 450, 200]
    assert g["rows"][1]["reasons"] == ["SwPowerCap"]
    dropin = tmp_path / "gpucostd.d" / "calibrated.toml"
    assert rep["dropin"] == str(dropin) and "power_limit_watts = 450" in dropin.read_text()
    # reloaded: the daemon now enforces the recommendation
    wait_for(lambda: _limits(d) == [450.0] * 4, 15, what="the applied limits enforced")
    m = d.metrics()
    assert metric_value(m, "gpucostd_gpu_power_limit_applied_watts", gpu="0") == 450
    assert metric_value(m, "gpucostd_gpu_power_limit_recommended_watts", gpu="3") == 450
    assert metric_value(m, "gpucostd_calibration_running") == 0
    assert metric_value(m, "gpucostd_calibration_last_success") == 1
    codes = [e["code"] for e in _events(d)]
    assert "calibration_started" in codes and "calibration_finished" in codes
    assert "drift" not in codes                             # enforcement held off
    show = d.cli("config", "show").stdout
    assert f"power_limit_watts = 450  # {dropin}:" in show
    last = d.cli("calibrate", "--last")
    assert last.returncode == 0 and "Recommended: 450 W" in last.stdout
    # --last without the daemon reads the state directory
    d.stop()
    last = d.cli("calibrate", "--last", "--json")
    assert json.loads(last.stdout)["id"] == rep["id"]


IDLE_23 = ("\n[[gpu]]\nindex = 1\npower_limit = 450\n"
           "\n[[at]]\nt = 0\ngpu = 2\nutilization = 0\n"
           "\n[[at]]\nt = 0\ngpu = 3\nutilization = 0\n")


def test_refused_while_idle_and_running_shows_in_metrics(daemon_factory, tmp_path):
    # GPUs 2-3 idle for good, GPU 1 at 450 W before the calibration
    spec = tmp_path / "idle.toml"
    spec.write_text(BUILTIN.read_text() + IDLE_23)
    d = daemon_factory(scenario=str(spec), extra_config=PRICES, interval=0.5)
    d.start()
    wait_for(lambda: _progress(d) is None and d.metrics(), 10, what="daemon up")
    r = d.cli("calibrate", "--gpus", "2,3", "--dwell", "2")
    assert r.returncode == 5 and "idle" in r.stderr
    p = _start_cli(d, "--gpus", "0,1", "--steps", "3", "--dwell", "4", "--warmup", "1")
    try:
        wait_for(lambda: metric_value(d.metrics(), "gpucostd_calibration_step_power_limit_watts",
                                      gpu="0"), 20, what="the calibration's step in /metrics")
        m = d.metrics()
        assert metric_value(m, "gpucostd_calibration_running") == 1
        assert metric_value(m, "gpucostd_calibration_step_power_limit_watts", gpu="1") in (
            700, 450, 200)
        rc, st = d.status_json()
        assert st["calibration"]["gpus"] == [0, 1] and st["calibration"]["steps"] == 3
        text = d.cli("status").stdout
        assert "power-limit calibration running: step" in text
        again = d.cli("calibrate", "--gpus", "0,1")
        assert again.returncode == 5 and "already running" in again.stderr
        # SIGINT to the command: it asks the daemon to abort, which restores at once
        wait_for(lambda: (_progress(d) or {}).get("step", 0) >= 2, 20, what="step 2")
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 6, err
    assert "interrupted (SIGINT" in " ".join(out.split())
    wait_for(lambda: _limits(d)[:2] == [700.0, 450.0], 5,  # GPU 1 was at 450 W before
             what="limits back")


NARROW_23 = ("\n[[gpu]]\nindex = 2\npower_limit_min = 699\n"
             "\n[[gpu]]\nindex = 3\npower_limit_min = 699\n")


def test_unequal_groups_each_step_through_their_own_plan(daemon_factory, tmp_path):
    # GPUs 2-3 span 699..700 W: 2 whole-watt limits to the 3 of GPUs 0-1. They are measured
    # at both, get their limits back and leave the calibration's hold; GPUs 0-1 go on
    spec = tmp_path / "narrow.toml"
    spec.write_text(BUILTIN.read_text() + NARROW_23)
    d = daemon_factory(scenario=str(spec), extra_config=PRICES, interval=0.5)
    d.start()
    wait_for(lambda: metric_value(d.metrics(), "gpucostd_node_tokens_per_second"), 15,
             what="tokens/s")
    p = _start_cli(d, "--steps", "3", "--dwell", "4", "--warmup", "1", "--json")
    try:
        wait_for(lambda: (_progress(d) or {}).get("step", 0) >= 3, 40, what="step 3")
        prog = _progress(d)
        assert prog["steps"] == 3 and sorted(prog["limits"]) == ["0", "1"], prog
        wait_for(lambda: _limits(d) == [200.0, 200.0, 700.0, 700.0], 10,
                 what="GPUs 0-1 at the last step, GPUs 2-3 back")
        m = d.metrics()
        assert metric_value(m, "gpucostd_calibration_step_power_limit_watts", gpu="0") == 200
        assert metric_value(m, "gpucostd_calibration_step_power_limit_watts", gpu="2") is None
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err + d.output()
    rep = json.loads(out)
    assert rep["state"] == "done"
    by = {tuple(g["gpus"]): g for g in rep["groups"]}
    assert by[(0, 1)]["steps_watts"] == [700, 450, 200]
    assert by[(2, 3)]["steps_watts"] == [700, 699]
    for g in rep["groups"]:
        assert [r["power_limit_watts"] for r in g["rows"]] == g["steps_watts"]
    wait_for(lambda: _limits(d) == [700.0] * 4, 5, what="limits back")
    assert not (d.state_dir / session.PROGRESS_FILE).exists()


def test_sigterm_of_the_daemon_aborts_and_restores(daemon_factory, tmp_path):
    d = daemon_factory(scenario=_scenario(tmp_path), extra_config=PRICES, interval=0.5)
    d.start()
    wait_for(lambda: metric_value(d.metrics(), "gpucostd_node_tokens_per_second"), 15,
             what="tokens/s")
    # 4 steps of 3 s: step 2 is reached after 3 s and the calibration still runs 6 s more
    p = _start_cli(d, "--steps", "4", "--dwell", "3", "--warmup", "1")
    try:
        wait_for(lambda: (_progress(d) or {}).get("step", 0) >= 2, 30, what="step 2")
        wait_for(lambda: _limits(d) != [700.0] * 4, 10, what="a step below 700 W")
        assert d.stop() == 0
        p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode in (3, 6)
    ev = [e for e in _events(d) if e["code"] == "calibration_aborted"]
    assert ev and "daemon is stopping" in ev[0]["message"] and "limits restored" in \
        ev[0]["message"]
    assert not (d.state_dir / session.PROGRESS_FILE).exists()
    originals = json.loads((d.state_dir / "originals.json").read_text())["originals"]
    assert originals == {}


def test_sigkill_mid_calibration_is_restored_at_the_next_start(daemon_factory, tmp_path):
    d = daemon_factory(scenario=_scenario(tmp_path), extra_config=PRICES, interval=0.5)
    d.start()
    wait_for(lambda: metric_value(d.metrics(), "gpucostd_node_tokens_per_second"), 15,
             what="tokens/s")
    # 4 steps of 3 s: step 2 is reached after 3 s and the calibration still runs 6 s more
    p = _start_cli(d, "--steps", "4", "--dwell", "3", "--warmup", "1")
    try:
        wait_for(lambda: (_progress(d) or {}).get("step", 0) >= 2, 30, what="step 2")
        step_limit = wait_for(lambda: _limits(d)[0] < 700 and _limits(d)[0], 10,
                              what="a step below 700 W")
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(10)
        p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    progress = json.loads((d.state_dir / session.PROGRESS_FILE).read_text())
    assert [g["start_watts"] for g in progress["gpus"]] == [700.0] * 4
    originals = json.loads((d.state_dir / "originals.json").read_text())["originals"]
    assert originals["gpu:0"]["power_limit_watts"]["value"] == 700
    # the next start: the GPUs still hold the step's limit (the driver keeps it); the same
    # scenario file, so the same GPU UUIDs (another node's GPUs would not be touched)
    d2 = daemon_factory(scenario=_scenario(tmp_path, limit=int(step_limit)),
                        extra_config=PRICES, state_dir=d.state_dir)
    d2.start()
    wait_for(lambda: _limits(d2) == [700.0] * 4, 15, what="limits restored after SIGKILL")
    assert any(e["code"] == "calibration_restored" for e in _events(d2))
    assert not (d.state_dir / session.PROGRESS_FILE).exists()
    assert json.loads((d.state_dir / "originals.json").read_text())["originals"] == {}
