"""Tuning end to end: the real `gpucostd` CLI and daemon processes on the simulated node.

plan / apply / check as one-shot commands, then the daemon: apply at start, drift at t = 10 s
re-applied (or only reported) within one verify interval, refusals that name the GPU and the
allowed range or the missing privilege, restore on stop, and SIGKILL + restart keeping the
originals from before the first write.

Scenario files: tests/scenarios/tuning_*.toml. The simulated hardware lives inside the daemon
process and starts again from the scenario at every start; what survives a restart is the
state directory (originals.json, events.sqlite), which is what these tests look at.
"""
from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

from conftest import gpucostd_cmd, metric_value, wait_for

HERE = Path(__file__).resolve().parent
SCENARIOS = HERE / "scenarios"
DRIFT = str(SCENARIOS / "tuning_drift.toml")            # 4 GPUs at 700 W; GPU 2 -> 650 W at t=10
PREAPPLIED = str(SCENARIOS / "tuning_preapplied.toml")  # the same 4 GPUs, starting at 500 W
DENIED = str(SCENARIOS / "tuning_denied.toml")          # 2 GPUs; GPU 1's setters are denied
HOSTS = HERE / "fixtures" / "host"
MODEL = "NVIDIA H100 80GB HBM3"
WIDTH = 100

GPU_500 = "[tuning.gpu]\npower_limit_watts = 500\n"


# ------------------------------------------------------------------ helpers
def run_cli(tmp_path: Path, *args: str, config: str = "", timeout: float = 60):
    """`gpucostd ARGS --config F` with F = a [daemon] table pointing into tmp_path + `config`."""
    cfg = tmp_path / "cli.toml"
    cfg.write_text(f'[daemon]\nstate_dir = "{tmp_path / "cli-state"}"\n'
                   f'socket_path = "{tmp_path / "cli.sock"}"\nkernel_log = "none"\n' + config)
    return subprocess.run(gpucostd_cmd() + list(args) + ["--config", str(cfg)],
                          capture_output=True, text=True, timeout=timeout)


def words(text: str) -> str:
    """Text with its line wrapping undone (the CLI wraps long messages at 100 columns)."""
    return " ".join(text.split())


def assert_fits(text: str, width: int = WIDTH) -> None:
    long = [line for line in text.splitlines() if len(line) > width]
    assert not long, f"lines wider than {width} columns: {long}"


def rows(out: str, subject: str, setting: str):
    return [line for line in out.splitlines()
            if line.split()[:2] == [subject, setting] or line.split()[1:3] == [subject, setting]]


def events_json(daemon):
    r = daemon.cli("events", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


def tuning_config(power: int = 500, verify: float = 1, enforce: bool = True, extra: str = ""):
    return (f"[tuning]\nverify_interval_seconds = {verify}\n"
            f"enforce = {'true' if enforce else 'false'}\n"
            f"[tuning.gpu]\npower_limit_watts = {power}\n" + extra)


def scrape_powers(daemon, n):
    text = daemon.metrics()
    return [metric_value(text, "gpucostd_gpu_power_limit_watts", gpu=str(i)) for i in range(n)]


def originals(state_dir: Path):
    return json.loads((state_dir / "originals.json").read_text())["originals"]


# ------------------------------------------------------------------ one-shot commands
def test_plan_shows_current_to_desired_and_exits_1(tmp_path):
    r = run_cli(tmp_path, "plan", "--simulate",
                config="[tuning.gpu]\npower_limit_watts = 500\npersistence_mode = true\n")
    assert r.returncode == 1, r.stdout + r.stderr
    out = r.stdout
    assert_fits(out)
    for i in range(8):                      # builtin:h100x8: 8 GPUs at 700 W, persistence on
        power = rows(out, f"gpu:{i}", "power_limit_watts")
        assert len(power) == 1, out
        assert "700 W -> 500 W" in power[0] and "change" in power[0], power[0]
        persistence = rows(out, f"gpu:{i}", "persistence_mode")
        assert len(persistence) == 1, out
        assert "on -> on" in persistence[0] and "keep" in persistence[0], persistence[0]
    assert "8 would change" in out and "0 with errors" in out, out


def test_plan_with_nothing_configured_exits_0(tmp_path):
    r = run_cli(tmp_path, "plan", "--simulate")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no settings configured" in r.stdout


def test_plan_when_everything_is_in_sync_exits_0(tmp_path):
    r = run_cli(tmp_path, "plan", "--simulate", config="[tuning.gpu]\npower_limit_watts = 700\n")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 would change" in r.stdout, r.stdout
    assert all("keep" in line for line in r.stdout.splitlines() if line.startswith("gpu:"))


def test_apply_prints_what_changed(tmp_path):
    r = run_cli(tmp_path, "apply", "--simulate",
                config="[tuning.gpu]\npower_limit_watts = 500\npersistence_mode = true\n")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert_fits(out)
    for i in range(8):
        line = rows(out, f"gpu:{i}", "power_limit_watts")
        assert len(line) == 1 and line[0].startswith("ok") and "700 W -> 500 W" in line[0], out
        assert not rows(out, f"gpu:{i}", "persistence_mode"), "an in-sync setting was written"
    assert "8 changed, 0 failed" in out


def test_check_prints_pass_warn_fail_with_fixes_and_exit_code_as_status(tmp_path):
    host = HOSTS / "intel_iommu_on"          # kernel 6.8, intel_iommu=on, 4 IOMMU groups
    base = f'host_root = "{host}"\n'         # a [daemon] key: goes before any other table
    ok = run_cli(tmp_path, "check", "--simulate", config=base + '[checks]\niommu = "on"\n')
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert_fits(ok.stdout)
    names = {}
    for line in ok.stdout.splitlines():
        if line[:1].strip():
            status, name = line.split()[:2]
            names[name] = status
    assert names == {n: "PASS" for n in ("kernel", "driver", "cuda", "iommu", "persistence",
                                         "nic", "persistenced", "driver_match", "toolkit",
                                         "open_ports")}, ok.stdout

    # a driver older than the minimum and the wrong IOMMU mode: FAIL with the fix -> exit 2
    bad = run_cli(tmp_path, "check", "--simulate",
                  config=base + '[checks]\niommu = "passthrough"\nmin_driver = "560"\n')
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert_fits(bad.stdout)
    text = words(bad.stdout)
    assert "FAIL driver NVIDIA driver 550.90.07 is older than the minimum 560" in text, text
    assert "fix: install NVIDIA driver 560 or newer" in text, text
    assert "FAIL iommu" in text and "iommu=pt" in text and "update-grub" in text, text

    # persistence mode off on a GPU: WARN with the fix -> exit 1 (as `status`)
    warn = run_cli(tmp_path, "check", "--simulate", DENIED,
                   config=base + '[checks]\niommu = "on"\n')
    assert warn.returncode == 1, warn.stdout + warn.stderr
    text = words(warn.stdout)
    assert "WARN persistence persistence mode is off on GPU 0, 1" in text, text
    assert "fix: enable nvidia-persistenced" in text, text
    assert "or set [tuning.gpu] persistence_mode = true" in text, text

    js = run_cli(tmp_path, "check", "--simulate", "--json",
                 config=base + '[checks]\niommu = "passthrough"\nmin_driver = "560"\n')
    assert js.returncode == 2
    by_name = {c["name"]: c for c in json.loads(js.stdout)}
    assert by_name["driver"]["status"] == "fail" and by_name["driver"]["fix"]
    assert by_name["kernel"]["status"] == "pass"


def test_power_limit_above_maximum_refused_for_that_gpu_only_cli(tmp_path):
    cfg = GPU_500 + '[[tuning.gpu.override]]\nmatch = "index:1"\npower_limit_watts = 900\n'
    plan = run_cli(tmp_path, "plan", "--simulate", config=cfg)
    assert plan.returncode == 2, plan.stdout + plan.stderr     # an error wins over a change
    expected = (f"GPU 1 ({MODEL}): power_limit_watts = 900 is above the maximum 700 W; "
                f"allowed 200..700")
    assert expected in words(plan.stdout), plan.stdout
    applied = run_cli(tmp_path, "apply", "--simulate", config=cfg)
    assert applied.returncode == 2, applied.stdout + applied.stderr
    out = applied.stdout
    assert_fits(out)
    assert rows(out, "gpu:1", "power_limit_watts")[0].startswith("FAILED"), out
    assert expected in words(out), out
    for i in (0, 2, 3, 4, 5, 6, 7):
        assert rows(out, f"gpu:{i}", "power_limit_watts")[0].startswith("ok"), out
    assert "7 changed, 1 failed" in out


def test_denied_setters_give_a_permission_error_naming_the_privilege(tmp_path):
    r = run_cli(tmp_path, "apply", "--simulate", DENIED,
                config=GPU_500 + "persistence_mode = true\n")
    assert r.returncode == 2, r.stdout + r.stderr
    out = r.stdout
    assert_fits(out)
    text = words(out)
    for setting in ("power_limit_watts", "persistence_mode"):
        assert rows(out, "gpu:0", setting)[0].startswith("ok"), out      # GPU 0 still applied
        assert rows(out, "gpu:1", setting)[0].startswith("FAILED"), out
    assert (f"GPU 1 ({MODEL}): cannot set the power limit to 500 W: permission denied" in text)
    assert f"GPU 1 ({MODEL}): cannot turn persistence mode on: permission denied" in text
    assert "needs root (or CAP_SYS_ADMIN with access to /dev/nvidiactl)" in text, text
    assert "2 changed, 2 failed" in out


# ------------------------------------------------------------------ the daemon
def test_drift_at_10s_is_counted_and_reapplied_within_one_verify_interval(daemon_factory):
    verify = 1.0
    d = daemon_factory(scenario=DRIFT, extra_config=tuning_config(500, verify)).start()
    started_at = d.status_json()[1]["daemon"]["started_at"]      # ~ scenario t = 0 (wall)
    wait_for(lambda: scrape_powers(d, 4) == [500.0] * 4, 10, what="apply at start: 500 W")
    # The drift at scenario t = 10 must be seen and undone within one verify interval:
    # wait until t = 10 + verify + a margin for process scheduling.
    margin = 3.0
    budget = started_at + 10 + verify + margin - time.time()

    def drift_undone():
        text = d.metrics()
        n = metric_value(text, "gpucostd_setting_drift_total", setting="power_limit_watts",
                         subject="gpu:2")
        power = metric_value(text, "gpucostd_gpu_power_limit_watts", gpu="2")
        return n == 1 and power == 500 and text
    text = wait_for(drift_undone, budget, what="drift on GPU 2 counted and 500 W re-applied")
    assert metric_value(text, "gpucostd_setting_in_sync", setting="power_limit_watts",
                        subject="gpu:2") == 1
    for i in (0, 1, 3):
        assert metric_value(text, "gpucostd_setting_drift_total", setting="power_limit_watts",
                            subject=f"gpu:{i}") is None
        assert metric_value(text, "gpucostd_gpu_power_limit_watts", gpu=str(i)) == 500

    drift = [e for e in events_json(d) if e["code"] == "drift"]
    assert len(drift) == 1, drift
    e = drift[0]
    assert e["subject"] == "gpu:2" and e["gpu"] == 2 and e["severity"] == "WARN"
    assert e["message"] == (f"GPU 2 ({MODEL}): power_limit_watts changed outside gpucostd "
                            f"from 500 W to 650 W; re-applied 500 W"), e
    # detected after t = 10 and within one verify interval (+ one 0.2 s cycle + scheduling)
    assert 10.0 <= e["time"] - started_at <= 10 + verify + 1.5, e["time"] - started_at


def test_drift_with_enforce_off_is_counted_and_reported_not_reapplied(daemon_factory):
    verify = 1.0
    d = daemon_factory(scenario=DRIFT,
                       extra_config=tuning_config(500, verify, enforce=False)).start()
    started_at = d.status_json()[1]["daemon"]["started_at"]
    wait_for(lambda: scrape_powers(d, 4) == [500.0] * 4, 10, what="apply at start: 500 W")
    budget = started_at + 10 + verify + 3.0 - time.time()

    def drift_seen():
        text = d.metrics()
        n = metric_value(text, "gpucostd_setting_drift_total", setting="power_limit_watts",
                         subject="gpu:2")
        sync = metric_value(text, "gpucostd_setting_in_sync", setting="power_limit_watts",
                            subject="gpu:2")
        return n == 1 and sync == 0 and text
    text = wait_for(drift_seen, budget, what="drift on GPU 2 counted, setting out of sync")
    assert metric_value(text, "gpucostd_gpu_power_limit_watts", gpu="2") == 650
    assert metric_value(text, "gpucostd_setting_actual", setting="power_limit_watts",
                        subject="gpu:2") == 650

    rc, status = d.status_json()
    s = [s for s in status["settings"] if (s["subject"], s["name"]) ==
         ("gpu:2", "power_limit_watts")]
    assert s and s[0]["in_sync"] is False and s[0]["actual"] == 650 and s[0]["desired"] == 500
    assert all(x["in_sync"] for x in status["settings"] if x["subject"] != "gpu:2")
    r = d.cli("status")
    assert "Settings out of sync:" in r.stdout, r.stdout
    assert "gpu:2 power_limit_watts: actual 650, desired 500" in words(r.stdout), r.stdout

    # several verify intervals later: still left alone, and the same drift counted only once
    cycle = status["daemon"]["cycle"]
    wait_for(lambda: d.status_json()[1]["daemon"]["cycle"] >= cycle + int(3 * verify / 0.2),
             15, what="three more verify intervals")
    text = d.metrics()
    assert metric_value(text, "gpucostd_gpu_power_limit_watts", gpu="2") == 650
    assert metric_value(text, "gpucostd_setting_drift_total", setting="power_limit_watts",
                        subject="gpu:2") == 1
    drift = [e for e in events_json(d) if e["code"] == "drift"]
    assert len(drift) == 1, drift
    assert "from 500 W to 650 W; left as is (tuning.enforce = false)" in drift[0]["message"]


def test_stop_restores_every_original_and_empties_originals_json(daemon_factory):
    d = daemon_factory(scenario=DRIFT, extra_config=tuning_config(500, 30)).start()
    wait_for(lambda: scrape_powers(d, 4) == [500.0] * 4, 10, what="apply at start: 500 W")
    saved = originals(d.state_dir)
    assert {s: v["power_limit_watts"]["value"] for s, v in saved.items()} == {
        f"gpu:{i}": 700 for i in range(4)}, saved
    assert d.stop() == 0
    events = events_json(d)          # the daemon is gone: read from the event store
    restored = {e["subject"]: e["message"] for e in events if e["code"] == "setting_restored"}
    assert restored == {f"gpu:{i}": f"gpu:{i}: power_limit_watts restored 500 -> 700"
                        for i in range(4)}, events
    assert not [e for e in events if e["code"] == "setting_failed"], events
    assert originals(d.state_dir) == {}


def test_power_limit_above_maximum_daemon_applies_the_others(daemon_factory):
    cfg = tuning_config(500, 30, extra='[[tuning.gpu.override]]\nmatch = "index:1"\n'
                                        'power_limit_watts = 900\n')
    d = daemon_factory(extra_config=cfg).start()                     # builtin:h100x8
    expected = [500.0, 700.0] + [500.0] * 6
    wait_for(lambda: scrape_powers(d, 8) == expected, 10,
             what="GPUs 0, 2..7 at 500 W, GPU 1 left at 700 W")
    failed = [e for e in events_json(d) if e["code"] == "setting_failed"]
    assert [e["subject"] for e in failed] == ["gpu:1"], failed
    assert (f"GPU 1 ({MODEL}): power_limit_watts = 900 is above the maximum 700 W; "
            f"allowed 200..700") in failed[0]["message"]
    _, status = d.status_json()
    s = {x["subject"]: x for x in status["settings"]}
    assert "allowed 200..700" in s["gpu:1"]["error"] and not s["gpu:1"]["in_sync"]
    assert all(s[f"gpu:{i}"]["in_sync"] for i in (0, 2, 3, 4, 5, 6, 7))
    assert "gpu:1" not in originals(d.state_dir)         # nothing was written to GPU 1
    # still untouched after a few more cycles (no retry loop writing it)
    cycle = status["daemon"]["cycle"]
    wait_for(lambda: d.status_json()[1]["daemon"]["cycle"] >= cycle + 5, 10, what="5 cycles")
    assert scrape_powers(d, 8) == expected


def test_sigkill_after_apply_then_restart_keeps_first_originals_and_stop_restores(
        daemon_factory, tmp_path):
    state = tmp_path / "state"
    cfg = tuning_config(500, 30)
    first = daemon_factory(scenario=DRIFT, extra_config=cfg, state_dir=state).start()
    # killed right after it applied: the originals (700 W) are on disk before any write
    wait_for(lambda: len(originals(state)) == 4 and scrape_powers(first, 4) == [500.0] * 4,
             10, what="the first daemon applied 500 W and saved the originals")
    before = originals(state)
    assert {s: v["power_limit_watts"]["value"] for s, v in before.items()} == {
        f"gpu:{i}": 700 for i in range(4)}
    first.proc.send_signal(signal.SIGKILL)
    assert first.proc.wait(10) == -signal.SIGKILL
    first._logf.close()
    assert not [e for e in events_json(first) if e["code"] == "setting_restored"]
    assert originals(state) == before                      # no restore happened

    # The hardware keeps the 500 W the killed daemon set: the second start finds 500 W,
    # already the desired value. It must not take 500 W for the original.
    second = daemon_factory(scenario=PREAPPLIED, extra_config=cfg, state_dir=state).start()
    wait_for(lambda: d_settings_in_sync(second, 4), 10, what="second start: all in sync")
    assert scrape_powers(second, 4) == [500.0] * 4
    assert originals(state) == before, "a second start overwrote the saved originals"
    n_restored = len([e for e in events_json(second) if e["code"] == "setting_restored"])
    assert second.stop() == 0
    events = events_json(second)
    restored = [e for e in events if e["code"] == "setting_restored"][n_restored:]
    assert {e["subject"]: e["message"] for e in restored} == {
        f"gpu:{i}": f"gpu:{i}: power_limit_watts restored 500 -> 700" for i in range(4)}, events
    assert originals(state) == {}


def d_settings_in_sync(daemon, n):
    _, status = daemon.status_json()
    settings = [s for s in status["settings"] if s["name"] == "power_limit_watts"]
    return len(settings) == n and all(s["in_sync"] for s in settings)


def test_setting_events_carry_their_gpu_index_and_uuid(daemon_factory):
    """setting_applied / setting_restored events are about one GPU: like drift events they
    carry its index and UUID (the `gpu`/`uuid` of `events --json`, GPU= and UUID= in the
    journal), so filtering events by GPU finds them."""
    d = daemon_factory(scenario=DRIFT, extra_config=tuning_config(500, 30)).start()
    wait_for(lambda: scrape_powers(d, 4) == [500.0] * 4, 10, what="apply at start: 500 W")
    _, status = d.status_json()
    uuids = {g["index"]: g["uuid"] for g in status["gpus"]}
    assert d.stop() == 0
    events = [e for e in events_json(d) if e["code"] in ("setting_applied", "setting_restored")]
    assert len(events) == 8, events
    wrong = [(e["code"], e["subject"], e["gpu"], e["uuid"]) for e in events
             if (e["gpu"], e["uuid"]) != (int(e["subject"][4:]), uuids[int(e["subject"][4:])])]
    assert not wrong, f"setting events without their GPU (code, subject, gpu, uuid): {wrong}"
