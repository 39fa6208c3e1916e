"""GPU tuners: power limit and persistence mode through the TuningManager.

Two layers: a small fake gateway (exact control over failures and call order) and the real
NvmlGateway on the simulated node (pynvml's own code over the simulated library).
"""
from __future__ import annotations

import json
import os

import pytest

from conftest import exposition

from gpucostd.clock import VirtualClock
from gpucostd.config import parse
from gpucostd.snapshot import CheckResult, GpuReading, GpuState, NodeSnapshot, Setting
from gpucostd.tuners.manager import (Change, TuningManager, format_changes, format_plan,
                                     plan_exit_code, shutdown_in_progress)
from gpucostd.views.metrics_tuning import metric_families
from gpucostd.tuners.originals import OriginalsError, OriginalsStore

MODEL = "NVIDIA H100 80GB HBM3"


class FakeNvmlError(Exception):
    def __init__(self, kind, message=""):
        super().__init__(message or kind)
        self.kind = kind


class FakeGateway:
    """The NvmlGateway setter/getter surface over plain dicts; records every write."""

    def __init__(self, n=4, limit=700.0, lo=200.0, hi=700.0, persistence=False,
                 permitted=True, state_dir=None):
        self.limits = {i: limit for i in range(n)}
        self.persistence = {i: persistence for i in range(n)}
        self.lo, self.hi, self.permitted = lo, hi, permitted
        self.writes = []
        self.state_dir = state_dir          # when set: check the original is saved first
        self.fail_after = None              # raise KeyboardInterrupt after this many writes

    def _before_write(self, name, index):
        if self.fail_after is not None and len(self.writes) >= self.fail_after:
            raise KeyboardInterrupt("killed in the middle of apply")
        if not self.permitted:
            raise FakeNvmlError("no_permission", "Insufficient Permissions (needs root)")
        if self.state_dir is not None:
            store = OriginalsStore(str(self.state_dir))
            assert store.get(name, f"gpu:{index}")[0], "write before the original was saved"

    def get_power_limit(self, index):
        return self.limits[index]

    def set_power_limit(self, index, watts):
        self._before_write("power_limit_watts", index)
        if not self.lo <= watts <= self.hi:
            raise FakeNvmlError("invalid_argument", "Invalid Argument")
        self.writes.append(("power", index, watts))
        self.limits[index] = float(watts)

    def get_persistence_mode(self, index):
        return self.persistence[index]

    def set_persistence_mode(self, index, enabled):
        self._before_write("persistence_mode", index)
        self.writes.append(("persistence", index, enabled))
        self.persistence[index] = bool(enabled)


def readings(gw, n=None):
    n = len(gw.limits) if n is None else n
    return tuple(GpuReading(i, uuid=f"GPU-{i:04d}", name=MODEL, power_limit_watts=gw.limits[i],
                            power_limit_min_watts=gw.lo, power_limit_max_watts=gw.hi,
                            power_limit_default_watts=700.0,
                            persistence_mode=gw.persistence[i]) for i in range(n))


def config(text="", interval=5, enforce=True):
    return parse(f"[tuning]\nverify_interval_seconds = {interval}\n"
                 f"enforce = {'true' if enforce else 'false'}\n" + text)


GPU_CFG = "[tuning.gpu]\npower_limit_watts = 600\npersistence_mode = true\n"


def manager(tmp_path, gw, text=GPU_CFG, **kw):
    clock = kw.pop("clock", None) or VirtualClock()
    return TuningManager(config(text, **kw), gw, str(tmp_path / "state"), clock), clock


def by_key(items):
    return {(s.name, s.subject): s for s in items}


# ------------------------------------------------------------------ plan / apply / verify
def test_plan_apply_verify_then_nothing_to_change(tmp_path):
    gw = FakeGateway(state_dir=tmp_path / "state")
    m, clock = manager(tmp_path, gw)
    gpus = readings(gw)
    plan = m.plan(gpus)
    assert len(plan) == 8 and plan_exit_code(plan) == 1
    s = by_key(plan)[("power_limit_watts", "gpu:0")]
    assert (s.actual, s.desired, s.source, s.error) == (700, 600, "tuning.gpu", None)
    assert gw.writes == []                       # plan writes nothing
    changes = m.apply(gpus)
    assert len(changes) == 8 and all(c.ok for c in changes)
    assert Change("gpu:0", "power_limit_watts", 700, 600, True) in changes
    assert gw.limits == {i: 600.0 for i in range(4)}
    assert all(gw.persistence.values())
    after = m.plan(readings(gw))
    assert all(s.in_sync for s in after) and plan_exit_code(after) == 0
    settings, events = m.verify(readings(gw), clock.monotonic())
    assert events == [] and all(s.in_sync for s in settings)
    assert m.apply(readings(gw)) == []           # nothing to do the second time


def test_percent_of_default_rounds_to_whole_watts(tmp_path):
    gw = FakeGateway()
    m, _ = manager(tmp_path, gw, "[tuning.gpu]\npower_limit_percent = 77.7\n")
    s = m.plan(readings(gw))[0]
    assert s.desired == 544 and "77.7% of 700 W" in s.source      # 700 * 0.777 = 543.9
    m.apply(readings(gw))
    assert gw.limits[0] == 544.0


def test_power_limit_above_max_is_refused_for_that_gpu_only(tmp_path):
    gw = FakeGateway()
    text = GPU_CFG + '[[tuning.gpu.override]]\nmatch = "index:2"\npower_limit_watts = 900\n'
    m, _ = manager(tmp_path, gw, text)
    changes = m.apply(readings(gw))
    failed = [c for c in changes if not c.ok]
    assert len(failed) == 1
    assert failed[0].error == (f"GPU 2 ({MODEL}): power_limit_watts = 900 is above the maximum "
                               f"700 W; allowed 200..700")
    assert not any(w[0] == "power" and w[1] == 2 for w in gw.writes)   # nothing written to it
    assert gw.limits[2] == 700.0 and gw.limits[0] == gw.limits[1] == gw.limits[3] == 600.0
    assert all(gw.persistence.values())          # GPU 2's other setting still applied
    store = OriginalsStore(str(tmp_path / "state"))
    assert not store.get("power_limit_watts", "gpu:2")[0]
    plan = m.plan(readings(gw))
    assert by_key(plan)[("power_limit_watts", "gpu:2")].source == "override index:2"
    assert plan_exit_code(plan) == 2
    assert "allowed 200..700" in " ".join(format_plan(plan).split())   # wrapped


def test_power_limit_below_min_is_refused(tmp_path):
    gw = FakeGateway()
    m, _ = manager(tmp_path, gw, "[tuning.gpu]\npower_limit_watts = 100\n")
    s = m.plan(readings(gw))[0]
    assert s.error == f"GPU 0 ({MODEL}): power_limit_watts = 100 is below the minimum 200 W; " \
                      f"allowed 200..700"


def test_denied_setters_give_a_permission_error(tmp_path):
    gw = FakeGateway(permitted=False)
    m, _ = manager(tmp_path, gw)
    changes = m.apply(readings(gw))
    assert changes and not any(c.ok for c in changes)
    for c in changes:
        assert "permission denied" in c.error and "needs root" in c.error, c.error
    assert gw.writes == []
    # nothing changed, so nothing needs restoring
    assert len(OriginalsStore(str(tmp_path / "state"))) == 0


def test_lost_gpu_is_an_error_for_that_gpu_alone(tmp_path):
    from gpucostd.snapshot import GpuState
    gw = FakeGateway()
    m, _ = manager(tmp_path, gw)
    gpus = list(readings(gw))
    gpus[1] = gpus[1].replace(state=GpuState.LOST, error="fell off the bus")
    changes = m.apply(gpus)
    bad = [c for c in changes if not c.ok]
    assert {c.subject for c in bad} == {"gpu:1"}
    assert "is lost: fell off the bus" in bad[0].error
    assert gw.limits[1] == 700.0 and gw.limits[0] == 600.0


# ------------------------------------------------------------------ drift
def test_drift_is_detected_counted_and_reapplied(tmp_path):
    gw = FakeGateway()
    m, clock = manager(tmp_path, gw, interval=5)
    m.apply(readings(gw))
    m.verify(readings(gw), clock.monotonic())
    gw.limits[0] = 450.0                          # behind the manager's back
    clock.advance(1)
    settings, events = m.verify(readings(gw), clock.monotonic())
    assert events == []                           # not yet: at most every verify interval
    clock.advance(5)
    settings, events = m.verify(readings(gw), clock.monotonic())
    assert len(events) == 1
    e = events[0]
    assert (e.code, e.subject, e.gpu, e.fields["setting"]) == ("drift", "gpu:0", 0,
                                                               "power_limit_watts")
    assert (e.fields["old"], e.fields["new"], e.fields["reapplied"]) == (600, 450, True)
    assert "from 600 W to 450 W" in e.message and "re-applied 600 W" in e.message
    assert gw.limits[0] == 600.0
    assert m.drift_counts == {("power_limit_watts", "gpu:0"): 1}
    assert by_key(settings)[("power_limit_watts", "gpu:0")].in_sync
    # a second drift is a second count
    gw.limits[0] = 500.0
    clock.advance(5)
    _, events = m.verify(readings(gw), clock.monotonic())
    assert len(events) == 1 and m.drift_counts[("power_limit_watts", "gpu:0")] == 2


def test_drift_only_reported_when_enforce_is_off(tmp_path):
    gw = FakeGateway()
    m, clock = manager(tmp_path, gw, interval=5, enforce=False)
    m.apply(readings(gw))
    gw.persistence[3] = False
    clock.advance(5)
    settings, events = m.verify(readings(gw), clock.monotonic())
    assert len(events) == 1 and "left as is (tuning.enforce = false)" in events[0].message
    assert gw.persistence[3] is False
    assert not by_key(settings)[("persistence_mode", "gpu:3")].in_sync
    clock.advance(5)
    _, events = m.verify(readings(gw), clock.monotonic())
    assert events == []                            # the same drift is counted once
    assert m.drift_counts == {("persistence_mode", "gpu:3"): 1}


# ------------------------------------------------------------------ originals and restore
def test_originals_saved_before_first_write_and_never_overwritten(tmp_path):
    state = tmp_path / "state"
    gw = FakeGateway(state_dir=state)             # asserts the original is on disk first
    m, _ = manager(tmp_path, gw)
    m.apply(readings(gw))
    data = json.loads((state / "originals.json").read_text())
    assert data["originals"]["gpu:1"]["power_limit_watts"]["value"] == 700
    assert data["originals"]["gpu:1"]["power_limit_watts"]["uuid"] == "GPU-0001"
    assert data["originals"]["gpu:1"]["persistence_mode"]["value"] is False
    # a second start (settings already at 600): the saved 700 stays
    gw.limits[1] = 650.0
    m2, _ = manager(tmp_path, gw)
    m2.apply(readings(gw))
    data = json.loads((state / "originals.json").read_text())
    assert data["originals"]["gpu:1"]["power_limit_watts"]["value"] == 700
    assert not [p for p in os.listdir(state) if p.endswith(".tmp")]


def test_restore_puts_originals_back_and_clears_them(tmp_path):
    gw = FakeGateway()
    m, _ = manager(tmp_path, gw)
    m.apply(readings(gw))
    changes = m.restore()
    assert len(changes) == 8 and all(c.ok for c in changes)
    assert gw.limits == {i: 700.0 for i in range(4)}
    assert not any(gw.persistence.values())
    assert len(OriginalsStore(str(tmp_path / "state"))) == 0
    assert m.restore() == []                      # nothing left to restore
    assert "8 changed, 0 failed" in format_changes(changes)


def test_kill_during_apply_then_restart_still_restores_first_originals(tmp_path):
    gw = FakeGateway()
    m, _ = manager(tmp_path, gw)
    gw.fail_after = 3                             # the process dies after three writes
    with pytest.raises(KeyboardInterrupt):
        m.apply(readings(gw))
    assert gw.limits[0] == 600.0                  # half applied
    gw.fail_after = None
    m2, _ = manager(tmp_path, gw)                 # restart
    assert all(c.ok for c in m2.apply(readings(gw)))
    changes = m2.restore()                        # stop
    assert all(c.ok for c in changes)
    assert gw.limits == {i: 700.0 for i in range(4)}
    assert not any(gw.persistence.values())


def test_restore_failure_keeps_the_original_and_says_how(tmp_path):
    gw = FakeGateway()
    m, _ = manager(tmp_path, gw)
    m.apply(readings(gw))
    gw.permitted = False
    changes = m.restore()
    assert changes and not any(c.ok for c in changes)
    assert "gpucostd restore" in changes[0].error
    assert len(OriginalsStore(str(tmp_path / "state"))) == 8


def test_unwritable_state_dir_means_nothing_is_changed(tmp_path):
    gw = FakeGateway()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    m = TuningManager(config(GPU_CFG), gw, str(blocker / "state"), VirtualClock())
    changes = m.apply(readings(gw))
    assert changes and not any(c.ok for c in changes)
    assert "cannot save originals" in changes[0].error and gw.writes == []


def test_corrupt_originals_file_is_kept_and_refuses_writes(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "originals.json").write_text("{not json")
    store = OriginalsStore(str(state))
    assert len(store) == 0 and store.problem and "unreadable" in store.problem
    with pytest.raises(OriginalsError, match="nothing was changed"):
        store.save_if_absent("persistence_mode", "gpu:0", True)
    assert (state / "originals.json").read_text() == "{not json"
    assert os.listdir(state) == ["originals.json"]
    (state / "originals.json").unlink()          # the operator decided
    store.reload()
    assert store.check() is None and store.save_if_absent("persistence_mode", "gpu:0", True)


# ------------------------------------------------------------------ views and metrics
def test_text_views_fit_100_columns(tmp_path):
    gw = FakeGateway(n=8)
    text = GPU_CFG + '[[tuning.gpu.override]]\nmatch = "model:*H100*"\npower_limit_watts = 9000\n'
    m, _ = manager(tmp_path, gw, text)
    plan = m.plan(readings(gw))
    out = format_plan(plan)
    assert all(len(line) <= 100 for line in out.splitlines()), out
    assert "override model:*H100*" in out and "ERROR" in out
    out = format_changes(m.apply(readings(gw)))
    assert all(len(line) <= 100 for line in out.splitlines()), out
    assert "FAILED" in out


def test_metric_families(tmp_path):

    settings = (Setting("gpu:0", "power_limit_watts", 600, 450, "tuning.gpu"),
                Setting("gpu:0", "persistence_mode", True, True, "tuning.gpu"),
                Setting("nic:eth0", "ring_rx", 4096, None, "tuning.nic.eth0", "eth0: boom"))
    snap = NodeSnapshot(time=0, monotonic=0, cycle=1, hostname="h", started_at=0,
                        nvml_available=True, nvml_error=None, driver_version=None,
                        cuda_version=None, gpus=(), settings=settings,
                        checks=(CheckResult("iommu", "pass", "ok"),
                                CheckResult("kernel", "fail", "old")),
                        counters={"drift": {("power_limit_watts", "gpu:0"): 2}},
                        nic_rings={"eth0": {"current": {"rx": 256, "tx": 256},
                                            "max": {"rx": 4096, "tx": 4096}}},
                        host={"iommu_enabled": True})

    text = exposition(metric_families(snap))
    assert 'gpucostd_setting_desired{setting="power_limit_watts",subject="gpu:0"} 600.0' in text
    assert 'gpucostd_setting_actual{setting="power_limit_watts",subject="gpu:0"} 450.0' in text
    assert 'gpucostd_setting_in_sync{setting="persistence_mode",subject="gpu:0"} 1.0' in text
    assert 'gpucostd_setting_in_sync{setting="ring_rx",subject="nic:eth0"} 0.0' in text
    assert 'gpucostd_setting_actual{setting="ring_rx"' not in text       # absent, not 0
    assert 'gpucostd_setting_drift_total{setting="power_limit_watts",subject="gpu:0"} 2.0' \
        in text
    assert 'gpucostd_nic_ring_entries{interface="eth0",kind="max",queue="rx"} 4096.0' in text
    assert 'gpucostd_iommu_enabled 1.0' in text
    assert 'gpucostd_check_passed{check="kernel"} 0.0' in text


def test_shutdown_detection_from_systemd_jobs():
    jobs = "123 reboot.target start waiting\n124 systemd-reboot.service start waiting\n"
    assert shutdown_in_progress(run=lambda argv: jobs if "list-jobs" in argv else "running")
    assert not shutdown_in_progress(run=lambda argv: "" if "list-jobs" in argv else "running")
    assert shutdown_in_progress(run=lambda argv: "" if "list-jobs" in argv else "stopping\n")
    assert shutdown_in_progress(run=lambda argv: "7 soft-reboot.target start waiting\n"
                                if "list-jobs" in argv else "running")
    assert not shutdown_in_progress(
        run=lambda argv: "5 shutdown.target stop waiting\n" if "list-jobs" in argv else "")
    assert shutdown_in_progress() in (True, False)    # the real systemctl (or none) answers


# ------------------------------------------------------------------ on the simulated node
def _sim(tmp_path, scenario_text=None):
    nvml = pytest.importorskip("gpucostd.hw.nvml", reason="daemon/hw/nvml.py (NvmlGateway) not "
                                                       "in the tree yet")
    from gpucostd.sim.scenario import load_scenario, parse_scenario
    from gpucostd.sim.nvml import SimulatedNode
    clock = VirtualClock()
    scenario = load_scenario("builtin:h100x8") if scenario_text is None else \
        parse_scenario(scenario_text, str(tmp_path / "s.toml"))
    node = SimulatedNode(scenario, clock)
    gw = nvml.NvmlGateway(library=node.library, clock=clock)
    assert gw.ensure_initialized(), gw.error
    return node, gw, clock


def _sim_readings(gw, node):
    try:
        from gpucostd.probes.gpu import GpuProbe
    except ImportError:
        GpuProbe = None
    if GpuProbe is not None:
        return tuple(GpuProbe(gw).read())
    out = []
    for i in range(node.scenario.node.gpu_count):
        st = node.state(i)
        out.append(GpuReading(i, uuid=st.get("uuid"), name=node.scenario.node.model,
                              power_limit_min_watts=st["power_limit_min"],
                              power_limit_max_watts=st["power_limit_max"],
                              power_limit_default_watts=st["power_limit_default"]))
    return tuple(out)


def _builtin_text(**gpu_defaults):
    from gpucostd.sim.scenario import BUILTIN_DIR
    text = open(os.path.join(BUILTIN_DIR, "h100x8.toml"), encoding="utf-8").read()
    for k, v in gpu_defaults.items():
        text = text.replace(f"\n{k} = ", f"\n{k} = {v}\n# was: ", 1)
    return text


def test_sim_plan_apply_verify_restore(tmp_path):
    node, gw, clock = _sim(tmp_path)
    text = ("[tuning.gpu]\npower_limit_watts = 550\npersistence_mode = false\n"
            '[[tuning.gpu.override]]\nmatch = "index:2"\npower_limit_watts = 900\n')
    m = TuningManager(config(text), gw, str(tmp_path / "state"), clock)
    gpus = _sim_readings(gw, node)
    plan = by_key(m.plan(gpus))
    assert plan[("power_limit_watts", "gpu:0")].actual == 700
    assert plan[("power_limit_watts", "gpu:2")].error == (
        f"GPU 2 ({MODEL}): power_limit_watts = 900 is above the maximum 700 W; allowed 200..700")
    changes = m.apply(gpus)
    assert [c.subject for c in changes if not c.ok] == ["gpu:2"]
    assert node.state(2)["power_limit"] == 700            # nothing written to GPU 2
    assert node.state(2)["persistence_mode"] is False     # its other setting applied
    for i in (0, 1, 3, 4, 5, 6, 7):
        assert node.state(i)["power_limit"] == 550
        assert gw.get_power_limit(i) == 550
    after = [s for s in m.plan(_sim_readings(gw, node)) if not s.error]
    assert all(s.in_sync for s in after)
    _, events = m.verify(_sim_readings(gw, node), clock.monotonic())
    assert events == []
    changes = m.restore()
    assert all(c.ok for c in changes)
    assert all(node.state(i)["power_limit"] == 700 for i in range(8))
    assert all(node.state(i)["persistence_mode"] is True for i in range(8))


def test_sim_denied_setters(tmp_path):
    node, gw, clock = _sim(tmp_path, _builtin_text(setters_permitted="false"))
    m = TuningManager(config(GPU_CFG), gw, str(tmp_path / "state"), clock)
    changes = m.apply(_sim_readings(gw, node))
    assert changes and not any(c.ok for c in changes)
    assert all("permission denied" in c.error and "root" in c.error for c in changes)
    assert all(node.state(i)["power_limit"] == 700 for i in range(8))


def test_sim_drift_at_10s_is_reapplied_within_one_interval(tmp_path):
    text = _builtin_text() + "\n[[at]]\nt = 10\ngpu = 0\npower_limit = 450\n"
    node, gw, clock = _sim(tmp_path, text)
    m = TuningManager(config(GPU_CFG, interval=5), gw, str(tmp_path / "state"), clock)
    m.apply(_sim_readings(gw, node))
    drift_at = None
    for _ in range(40):                          # 20 s of a 0.5 s loop
        clock.advance(0.5)
        _, events = m.verify(_sim_readings(gw, node), clock.monotonic())
        if events:
            drift_at = node.now()
            assert events[0].fields["new"] == 450 and events[0].fields["reapplied"]
    assert drift_at is not None and 10 <= drift_at <= 15   # within one verify interval
    assert node.state(0)["power_limit"] == 600
    assert m.drift_counts == {("power_limit_watts", "gpu:0"): 1}


def test_setting_already_in_sync_keeps_its_value_as_the_original(tmp_path):
    gw = FakeGateway()
    gw.limits = {i: 600.0 for i in range(4)}        # an admin set 600 W before gpucostd
    m, clock = manager(tmp_path, gw, "[tuning.gpu]\npower_limit_watts = 600\n")
    assert m.apply(readings(gw)) == [] and gw.writes == []
    gw.limits[0] = 450.0                             # drift, re-applied
    clock.advance(5)
    _, events = m.verify(readings(gw), clock.monotonic())
    assert len(events) == 1 and gw.limits[0] == 600.0
    assert m.restore() == []                         # 600 was the original: nothing to write
    assert gw.limits[0] == 600.0


# ------------------------------------------------------------------ a real SIGKILL mid-apply
class FileGateway:
    """A gateway whose "hardware" is a JSON file, so it outlives the process that writes it.
    With pause_after=N it announces itself and hangs after N writes (to be SIGKILLed)."""

    def __init__(self, path, pause_after=None):
        self.path, self.pause_after, self.count = str(path), pause_after, 0

    def _load(self):
        with open(self.path) as f:
            return json.load(f)

    def _store(self, data):
        with open(self.path, "w") as f:
            json.dump(data, f)

    def _set(self, key, index, value):
        if self.pause_after is not None and self.count >= self.pause_after:
            open(self.path + ".paused", "w").close()
            import time
            while True:
                time.sleep(1)
        data = self._load()
        data[key][str(index)] = value
        self._store(data)
        self.count += 1

    def get_power_limit(self, index):
        return self._load()["limits"][str(index)]

    def set_power_limit(self, index, watts):
        self._set("limits", index, float(watts))

    def get_persistence_mode(self, index):
        return self._load()["persistence"][str(index)]

    def set_persistence_mode(self, index, enabled):
        self._set("persistence", index, bool(enabled))


CHILD = r'''
import sys
sys.path.insert(0, sys.argv[1])
from gpucostd.clock import RealClock
from gpucostd.config import parse
from gpucostd.tuners.manager import TuningManager
from test_tuners_gpu import FileGateway, GPU_CFG, GpuReading, MODEL
device, state, mode = sys.argv[2], sys.argv[3], sys.argv[4]
gw = FileGateway(device, int(sys.argv[5]) if len(sys.argv) > 5 else None)
gpus = [GpuReading(i, uuid=f"GPU-{i:04d}", name=MODEL, power_limit_min_watts=200.0,
                   power_limit_max_watts=700.0) for i in range(4)]
m = TuningManager(parse(GPU_CFG), gw, state, RealClock())
changes = m.apply(gpus) if mode == "apply" else m.restore(gpus)
assert all(c.ok for c in changes), changes
print(len(changes))
'''


def test_sigkill_during_apply_then_restart_then_stop_restores_first_originals(tmp_path):
    import signal
    import subprocess
    import sys
    from conftest import wait_for

    device = tmp_path / "device.json"
    device.write_text(json.dumps({"limits": {str(i): 700.0 for i in range(4)},
                                  "persistence": {str(i): False for i in range(4)}}))
    state = tmp_path / "state"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    tests_dir = os.path.dirname(os.path.abspath(__file__))

    def child(*args):
        return [sys.executable, str(script), tests_dir, str(device), str(state), *args]

    proc = subprocess.Popen(child("apply", "3"))
    try:
        wait_for(lambda: os.path.exists(str(device) + ".paused"), timeout=30,
                 what="the first apply to pause after three writes")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    half = json.loads(device.read_text())
    assert half["limits"]["0"] == 600.0 and half["limits"]["2"] == 700.0   # half applied
    os.unlink(str(device) + ".paused")
    r = subprocess.run(child("apply"), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(device.read_text())["limits"] == {str(i): 600.0 for i in range(4)}
    r = subprocess.run(child("restore"), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(device.read_text()) == {"limits": {str(i): 700.0 for i in range(4)},
                                              "persistence": {str(i): False for i in range(4)}}
    assert json.loads((state / "originals.json").read_text())["originals"] == {}


def test_restore_after_renumbering_follows_the_uuid_and_skips_a_missing_gpu(tmp_path):
    gw = FakeGateway(persistence=True)
    gw.limits = {0: 650.0, 1: 500.0, 2: 400.0, 3: 300.0}
    m, _ = manager(tmp_path, gw, "[tuning.gpu]\npower_limit_watts = 600\n")
    assert all(c.ok for c in m.apply(readings(gw)))
    # reboot: GPU-0002 is gone, GPU-0001 is now index 0, GPU-0000 index 1, GPU-0003 index 2
    gw.limits = {0: 600.0, 1: 600.0, 2: 600.0}
    now = (GpuReading(0, uuid="GPU-0001", name=MODEL), GpuReading(1, uuid="GPU-0000", name=MODEL),
           GpuReading(2, uuid="GPU-0003", name=MODEL))
    m2, _ = manager(tmp_path, gw, "[tuning.gpu]\npower_limit_watts = 600\n")
    changes = {c.subject: c for c in m2.restore(now)}
    assert gw.limits == {0: 500.0, 1: 650.0, 2: 300.0}    # each GPU got its own original
    assert changes["gpu:0"].ok and changes["gpu:1"].ok and changes["gpu:3"].ok
    missing = changes["gpu:2"]
    assert not missing.ok and "GPU-0002" in missing.error and "not on this node" in missing.error
    assert "gpucostd restore" in missing.error
    assert OriginalsStore(str(tmp_path / "state")).get("power_limit_watts", "gpu:2") == \
        (True, 400.0)                                      # kept for when it comes back


def test_sim_restore_without_readings_asks_nvml_which_gpu_is_which(tmp_path):
    """`gpucostd restore` runs with no GPU readings: the saved UUID still decides."""
    node, gw, clock = _sim(tmp_path)
    state = tmp_path / "state"
    uuid1 = node.scenario.initial[1]["uuid"]
    store = OriginalsStore(str(state))
    store.save_if_absent("power_limit_watts", "gpu:0", 450, uuid=uuid1)   # saved as index 0
    store.save_if_absent("power_limit_watts", "gpu:5", 300, uuid="GPU-not-here")
    m = TuningManager(config(""), gw, str(state), clock)
    changes = {c.subject: c for c in m.restore()}
    assert changes["gpu:0"].ok, changes["gpu:0"].error
    assert node.state(1)["power_limit"] == 450 and node.state(0)["power_limit"] == 700
    assert not changes["gpu:5"].ok and "GPU-not-here" in changes["gpu:5"].error
    assert all(node.state(i)["power_limit"] == 700 for i in (0, 2, 3, 4, 5, 6, 7))


def test_restore_when_no_gpu_can_be_identified_goes_by_index(tmp_path):
    """NVML down at stop: readings without UUIDs cannot tell GPUs apart, so the restore is
    tried by index (and fails or succeeds on its own terms), not refused as 'not on this node'."""
    gw = FakeGateway(n=2)
    m, _ = manager(tmp_path, gw, "[tuning.gpu]\npower_limit_watts = 600\n")
    assert all(c.ok for c in m.apply(readings(gw)))
    blind = (GpuReading(0, state=GpuState.UNKNOWN, error="NVML not available"),
             GpuReading(1, state=GpuState.UNKNOWN, error="NVML not available"))
    m2, _ = manager(tmp_path, gw, "[tuning.gpu]\npower_limit_watts = 600\n")
    changes = m2.restore(blind)
    assert [c.ok for c in changes] == [True, True] and gw.limits == {0: 700.0, 1: 700.0}


def test_restore_names_gpus_that_could_not_be_identified(tmp_path):
    gw = FakeGateway(n=2)
    m, _ = manager(tmp_path, gw, "[tuning.gpu]\npower_limit_watts = 600\n")
    assert all(c.ok for c in m.apply(readings(gw)))
    now = (GpuReading(0, uuid="GPU-0000", name=MODEL),
           GpuReading(1, state=GpuState.LOST, error="GPU is lost"))
    m2, _ = manager(tmp_path, gw, "[tuning.gpu]\npower_limit_watts = 600\n")
    changes = {c.subject: c for c in m2.restore(now)}
    assert changes["gpu:0"].ok
    assert "GPU-0001" in changes["gpu:1"].error and "GPU 1 could not be identified" in \
        changes["gpu:1"].error and gw.limits[1] == 600.0


@pytest.mark.parametrize("kind,words", [
    ("timeout", ("did not answer in time", "dmesg", "next verify")),
    ("not_supported", ("not supported on this GPU", "[[tuning.gpu.override]]")),
    ("lost", ("lost", "reset the GPU or reboot")),
    ("no_permission", ("permission denied", "root")),
])
def test_gpu_error_texts_say_what_and_how_to_fix(tmp_path, kind, words):
    class Failing(FakeGateway):
        def set_power_limit(self, index, watts):
            raise FakeNvmlError(kind, "raw NVML text")

    gw = Failing(n=1)
    m, _ = manager(tmp_path, gw, "[tuning.gpu]\npower_limit_watts = 600\n")
    (change,) = m.apply(readings(gw))
    assert not change.ok and change.error.startswith(
        f"GPU 0 ({MODEL}): cannot set the power limit to 600 W: ")
    assert all(w in change.error for w in words), change.error


def test_unusable_saved_original_is_reported_and_the_others_restored(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "originals.json").write_text(json.dumps({"version": 1, "originals": {
        "gpu:0": {"power_limit_watts": {"value": "lots", "uuid": "GPU-0000"}},
        "gpu:1": {"power_limit_watts": {"value": None, "uuid": "GPU-0001"},
                  "persistence_mode": {"value": [1], "uuid": "GPU-0001"}},
        "gpu:2": {"power_limit_watts": {"value": 650, "uuid": "GPU-0002"}}}}))
    gw = FakeGateway(n=3, limit=600.0)
    m, _ = manager(tmp_path, gw)
    changes = {(c.subject, c.name): c for c in m.restore(readings(gw))}
    assert changes[("gpu:2", "power_limit_watts")].ok and gw.limits[2] == 650.0
    for key in (("gpu:0", "power_limit_watts"), ("gpu:1", "power_limit_watts"),
                ("gpu:1", "persistence_mode")):
        assert not changes[key].ok and "correct or remove that entry" in changes[key].error
    assert gw.limits[0] == gw.limits[1] == 600.0


def test_shutdown_check_does_not_hold_up_a_stop_when_systemctl_hangs(tmp_path, monkeypatch):
    import time
    fake = tmp_path / "bin" / "systemctl"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexec sleep 30\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ.get('PATH', '')}")
    started = time.monotonic()
    assert shutdown_in_progress() is False
    assert time.monotonic() - started < 2.0       # the daemon must exit within 2 s
