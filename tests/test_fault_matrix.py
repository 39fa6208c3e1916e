"""The fault matrix rows not held elsewhere, through the real daemon process: NVML hanging on
every GPU, a GPU lost mid-run, NVML absent at start then present, SIGKILL inside an apply and
inside a restore (slow simulated setters and the originals file as the barrier). docs/reliability.md lists every row with its test.
"""
from __future__ import annotations

import json
import os
import signal
import time

import pytest

from conftest import http_get, wait_for

HERE = os.path.dirname(__file__)
DRIFT = os.path.join(HERE, "scenarios", "tuning_drift.toml")     # 4 GPUs at 700 W

NODE = """
[node]
model = "NVIDIA H100 80GB HBM3"
gpu_count = 4
driver_version = "550.90.07"
cuda_version = "12.4"
"""


def status(d):
    from gpucostd.views.statusapi import request
    return request(d.socket, {"cmd": "status"}, timeout=10)["status"]


def cycles(d):
    return status(d)["daemon"]["cycle"]


def test_nvml_hang_on_every_gpu_keeps_the_loop_and_scrapes_alive(daemon_factory, tmp_path):
    scenario = tmp_path / "hang_all.toml"
    scenario.write_text(NODE + "".join(f"[[at]]\nt = 1\ngpu = {i}\nhang_seconds = 6\n"
                                       for i in range(4)))
    d = daemon_factory(scenario=str(scenario), extra_config="nvml_timeout_seconds = 0.3\n")
    d.start()
    wait_for(lambda: all(g["state"] == "unresponsive" for g in status(d)["gpus"]), 15,
             what="every GPU unresponsive")
    assert status(d)["node"]["health"] == "CRIT"
    before = cycles(d)
    t0 = time.monotonic()
    assert http_get(d.url + "/healthz")[0] == 200
    assert time.monotonic() - t0 < 1.0
    wait_for(lambda: cycles(d) > before + 2, 10, what="cycles while every GPU hangs")
    wait_for(lambda: all(g["state"] == "ok" for g in status(d)["gpus"]), 30,
             what="the GPUs answer again")


def test_gpu_lost_mid_run_is_crit_and_the_others_go_on(daemon_factory, tmp_path):
    scenario = tmp_path / "lost.toml"
    scenario.write_text(NODE + "[[at]]\nt = 1\ngpu = 2\nlost = true\n")
    d = daemon_factory(scenario=str(scenario)).start()
    doc = wait_for(lambda: (lambda s: s if s["gpus"][2]["state"] == "lost" else None)(status(d)),
                   15, what="GPU 2 lost")
    assert doc["gpus"][2]["health"] == "CRIT"
    assert [g["state"] for i, g in enumerate(doc["gpus"]) if i != 2] == ["ok"] * 3
    before = cycles(d)
    wait_for(lambda: cycles(d) > before + 2, 10, what="cycles after the loss")
    assert d.proc.poll() is None and "Traceback" not in d.output()


def test_nvml_absent_at_start_then_present(daemon_factory, tmp_path):
    scenario = tmp_path / "late_driver.toml"
    scenario.write_text(NODE.replace("[node]\n", "[node]\ndriver_loaded = false\n")
                        + "[[at]]\nt = 2\ndriver_loaded = true\n")
    d = daemon_factory(scenario=str(scenario), extra_config="nvml_retry_seconds = 0.5\n")
    d.start()
    first = status(d)
    assert first["node"]["nvml_available"] is False and first["node"]["health"] == "UNKNOWN"
    doc = wait_for(lambda: (lambda s: s if s["node"]["nvml_available"] else None)(status(d)),
                   20, what="NVML up once the driver is there")
    assert len(doc["gpus"]) == 4 and doc["node"]["health"] == "OK", doc["node"]


def originals_on_disk(state):
    """The saved originals file must always be whole and hold only true originals."""
    path = state / "originals.json"
    if not path.exists():
        return {}
    data = json.loads(path.read_text())["originals"]      # never torn
    for subject, settings in data.items():
        assert settings["power_limit_watts"]["value"] == 700, (subject, settings)
    return data


def saved_count(state):
    """How many originals the file holds now (0 before it exists)."""
    return len(originals_on_disk(state))


def kill_when(d, state, count, what):
    """SIGKILL the daemon as soon as originals.json holds `count` entries. Each setter takes
    SET_SECONDS, so the daemon is then inside the write that follows (apply) or the next
    restore write: the barrier that puts the kill mid-apply or mid-restore."""
    wait_for(lambda: saved_count(state) == count, 30, interval=0.01, what=what)
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(10)
    d._logf.close()


SET_SECONDS = 0.5


def test_sigkill_during_apply_and_during_restore_never_loses_an_original(daemon_factory,
                                                                         tmp_path):
    """Kills that land inside an apply (after 1, 2 or 3 of 4 originals are saved, the next
    GPU's write under way) and inside a restore (1, 2 or 3 of 4 written back): the file is never
    torn, holds only true originals (700 W, never the tuned 450 W: the simulated GPUs start at
    700 W again in each process, and a start that finds them in sync with the saved 700 W keeps
    it), and the GPUs left in it are restored by the next stop."""
    scenario = tmp_path / "slow_setters.toml"
    scenario.write_text(open(DRIFT).read().replace(
        "[node]\n", f"[node]\nset_seconds = {SET_SECONDS}\n", 1))
    state = tmp_path / "state"
    cfg = "[tuning.gpu]\npower_limit_watts = 450\n"
    for k in (1, 2, 3):
        # during the apply: k originals saved, the write of GPU k - 1 under way
        d = daemon_factory(scenario=str(scenario), extra_config=cfg, state_dir=state)
        d.start(wait=False)
        kill_when(d, state, k, f"{k} originals saved (the apply under way)")
        assert saved_count(state) == k, "the kill did not land inside the apply"
        # during the restore at stop
        d = daemon_factory(scenario=str(scenario), extra_config=cfg, state_dir=state).start()

        def applied():
            sets = status(d)["settings"]
            return len(sets) == 4 and all(s["in_sync"] for s in sets)
        wait_for(applied, 30, what="the apply done")
        assert saved_count(state) == 4
        d.proc.send_signal(signal.SIGTERM)
        kill_when(d, state, 4 - k, f"{k} originals written back (the restore under way)")
        left = originals_on_disk(state)
        assert len(left) == 4 - k, "the kill did not land inside the restore"
        assert set(left) <= {f"gpu:{i}" for i in range(4)}, (k, left)
        # the next start and stop restore what was left (the next round starts empty)
        d = daemon_factory(scenario=str(scenario), extra_config=cfg, state_dir=state).start()
        wait_for(applied, 30, what="the apply done")
        assert d.stop() == 0
        assert originals_on_disk(state) == {}
