"""Locked SM clocks and workload power profiles as settings: the simulated NVML calls under
pynvml, the gateway, and the TuningManager's plan, apply, verify and restore on the simulated
H100 node (and a simulated Blackwell for the profiles)."""
from __future__ import annotations

import json
import os

import pytest

from gpucostd.clock import VirtualClock
from gpucostd.config import ConfigError, parse
from gpucostd.tuners.manager import TuningManager, format_plan

from test_tuners_gpu import MODEL, _builtin_text, _sim, _sim_readings

CLOCKS = "[tuning.gpu]\nlocked_sm_clocks_mhz = [345, 1500]\n"


def config(text, interval=5):
    return parse(f"[tuning]\nverify_interval_seconds = {interval}\nenforce = true\n" + text)


def manager(tmp_path, gw, clock, text=CLOCKS):
    return TuningManager(config(text), gw, str(tmp_path / "state"), clock)


def by_key(settings):
    return {(s.name, s.subject): s for s in settings}


def originals(tmp_path):
    path = tmp_path / "state" / "originals.json"
    return json.loads(path.read_text())["originals"] if path.exists() else {}


# ------------------------------------------------------------------ the simulated calls
def test_sim_supported_clocks_and_lock_lower_the_clock_and_the_draw(tmp_path):
    node, gw, clock = _sim(tmp_path)
    clocks = gw.get_supported_sm_clocks(0)
    assert clocks[0] == 1980 and clocks[-1] == 345 and 1500 in clocks and 1507 not in clocks
    before = node.state(0)
    assert before["sm_clock"] == 1980
    gw.set_locked_clocks(0, 345, 1500)
    after = node.state(0)
    assert after["sm_clock"] == 1500 and gw.get_sm_clock(0) == 1500
    assert after["power_draw"] < before["power_draw"]
    assert "ApplicationsClocksSetting" in after["clock_event_reasons"]
    assert gw.locked_clocks(0) == (345, 1500)
    assert node.state(1)["sm_clock"] == 1980                  # only GPU 0
    gw.reset_locked_clocks(0)
    assert node.state(0)["sm_clock"] == 1980 and gw.locked_clocks(0) is None
    assert "ApplicationsClocksSetting" not in node.state(0)["clock_event_reasons"]


def test_sim_lock_changes_the_energy_counter_and_tokens_from_the_moment_of_the_call(tmp_path):
    node, gw, clock = _sim(tmp_path)
    e0 = node.energy_joules(0)
    clock.advance(10)
    full = node.energy_joules(0) - e0
    gw.set_locked_clocks(0, 345, 1200)
    e1 = node.energy_joules(0)
    clock.advance(10)
    locked = node.energy_joules(0) - e1
    assert locked < full * 0.9


def test_sim_refuses_an_unsupported_clock_with_the_supported_list(tmp_path):
    from gpucostd.hw.nvml import NvmlError
    node, gw, clock = _sim(tmp_path)
    with pytest.raises(NvmlError) as e:
        gw.set_locked_clocks(0, 345, 1507)
    assert e.value.kind == "invalid_argument"
    assert "supported: 345..1980 MHz in 15 MHz steps" in str(e.value)
    with pytest.raises(NvmlError):
        gw.set_locked_clocks(0, 1500, 1200)                   # min above max
    assert node.state(0)["sm_clock"] == 1980


def test_sim_power_profiles_not_supported_on_h100(tmp_path):
    from gpucostd.hw.nvml import NvmlError
    node, gw, clock = _sim(tmp_path)
    with pytest.raises(NvmlError) as e:
        gw.get_power_profiles(0)
    assert e.value.kind == "not_supported"
    assert str(e.value) == "GPU 0 does not support workload power profiles (Blackwell or newer)"


# ------------------------------------------------------------------ the setting's lifecycle
def test_plan_apply_verify_restore_locked_clocks(tmp_path):
    node, gw, clock = _sim(tmp_path)
    m = manager(tmp_path, gw, clock)
    gpus = _sim_readings(gw, node)
    plan = by_key(m.plan(gpus))
    s = plan[("locked_sm_clocks_mhz", "gpu:0")]
    assert s.actual == "unlocked" and s.desired == (345, 1500) and s.error is None
    text = format_plan(m.plan(gpus))
    assert "locked_sm_clocks_mhz" in text and "unlocked -> 345-1500" in text
    changes = m.apply(gpus)
    assert changes and all(c.ok for c in changes)
    assert all(node.state(i)["sm_clock"] == 1500 for i in range(8))
    assert originals(tmp_path)["gpu:0"]["locked_sm_clocks_mhz"]["value"] == "unlocked"
    settings, events = m.verify(_sim_readings(gw, node), clock.monotonic())
    assert events == [] and all(s.in_sync for s in settings)
    changes = m.restore()
    assert len(changes) == 8 and all(c.ok for c in changes)
    assert all(node.state(i)["sm_clock"] == 1980 for i in range(8))
    assert originals(tmp_path) == {}


def test_unsupported_clock_refused_for_that_gpu_with_the_list_and_nothing_written(tmp_path):
    node, gw, clock = _sim(tmp_path)
    text = (CLOCKS + '[[tuning.gpu.override]]\nmatch = "index:2"\n'
            "locked_sm_clocks_mhz = [345, 1507]\n")
    m = manager(tmp_path, gw, clock, text)
    gpus = _sim_readings(gw, node)
    s = by_key(m.plan(gpus))[("locked_sm_clocks_mhz", "gpu:2")]
    assert s.error == (f"GPU 2 ({MODEL}): locked_sm_clocks_mhz = [345, 1507]: 1507 MHz is not a "
                       f"supported SM clock (nearest 1500 or 1515 MHz); supported: "
                       f"345..1980 MHz in 15 MHz steps")
    changes = m.apply(gpus)
    assert [c.subject for c in changes if not c.ok] == ["gpu:2"]
    assert node.state(2)["sm_clock"] == 1980 and node.state(0)["sm_clock"] == 1500
    assert "gpu:2" not in originals(tmp_path)


def test_unlocked_behind_our_back_is_drift_and_is_locked_again(tmp_path):
    node, gw, clock = _sim(tmp_path)
    m = manager(tmp_path, gw, clock)
    m.apply(_sim_readings(gw, node))
    other = _sim_other_process(tmp_path, node, clock)
    other.reset_locked_clocks(0)                      # nvidia-smi -rgc by someone else
    assert node.state(0)["sm_clock"] == 1980
    clock.advance(6)
    _, events = m.verify(_sim_readings(gw, node), clock.monotonic())
    assert [e.code for e in events] == ["drift"]
    assert events[0].fields["new"] == "unlocked" and events[0].fields["reapplied"]
    assert node.state(0)["sm_clock"] == 1500


def _sim_other_process(tmp_path, node, clock):
    """A second gateway on the same node: what another process (or a restarted gpucostd)
    sees: it does not know what the first locked."""
    from gpucostd.hw import nvml
    gw2 = nvml.NvmlGateway(library=node.library, clock=clock)
    assert gw2.ensure_initialized(), gw2.error
    return gw2


def test_restore_after_a_crash_resets_although_nothing_is_remembered(tmp_path):
    """gpucostd killed with clocks locked: `gpucostd restore` (a new process) knows only the
    saved original, "unlocked", and calls the reset."""
    node, gw, clock = _sim(tmp_path)
    manager(tmp_path, gw, clock).apply(_sim_readings(gw, node))
    assert node.state(0)["sm_clock"] == 1500
    gw2 = _sim_other_process(tmp_path, node, clock)
    m2 = TuningManager(config(""), gw2, str(tmp_path / "state"), clock)
    changes = m2.restore()
    assert changes and all(c.ok for c in changes)
    assert all(node.state(i)["sm_clock"] == 1980 for i in range(8))
    assert originals(tmp_path) == {}


def test_a_failed_lock_keeps_nothing_and_the_daemon_restores_on_stop(tmp_path):
    """A write the driver refuses (no permission) leaves the GPU unlocked and no original;
    a daemon stop restores what it locked (the loop's shutdown calls restore)."""
    node, gw, clock = _sim(tmp_path, _builtin_text(setters_permitted="false"))
    m = manager(tmp_path, gw, clock)
    changes = m.apply(_sim_readings(gw, node))
    assert changes and not any(c.ok for c in changes)
    assert all("permission denied" in c.error for c in changes)
    assert all(node.state(i)["sm_clock"] == 1980 for i in range(8))
    assert originals(tmp_path) == {}


def test_daemon_stop_restores_locked_clocks(tmp_path):
    from gpucostd.loop import Daemon
    from gpucostd.replay import replay_config
    clock = VirtualClock()
    cfg = replay_config(config(CLOCKS), str(tmp_path / "state"))
    d = Daemon(cfg, clock=clock, simulate="builtin:h100x8", journal=False)
    d.start()
    try:
        d.step()
        clock.advance(1)
        d.step()
        assert d.gateway.locked_clocks(0) == (345, 1500)
        assert d.gateway.get_sm_clock(0) == 1500
    finally:
        d.shutdown()
    gw2 = _sim_other_process(tmp_path, _node_of(d), clock)
    assert gw2.get_sm_clock(0) == 1980
    assert originals(tmp_path) == {}


def _node_of(daemon):
    lib = daemon.gateway.library
    return lib._node


# ------------------------------------------------------------------ power profiles
def test_power_profile_on_h100_says_not_supported(tmp_path):
    node, gw, clock = _sim(tmp_path)
    m = manager(tmp_path, gw, clock, '[tuning.gpu]\npower_profile = "llm_inference"\n')
    s = by_key(m.plan(_sim_readings(gw, node)))[("power_profile", "gpu:0")]
    assert s.error == (f"GPU 0 ({MODEL}): power_profile = 'llm_inference': workload power "
                       f"profiles are not supported on this GPU (Blackwell and later have "
                       f"them); set it only for the GPUs that have them "
                       f"([[tuning.gpu.override]] instead of [tuning.gpu])")
    assert all(not c.ok for c in m.apply(_sim_readings(gw, node)))
    assert originals(tmp_path) == {}


def test_power_profile_lifecycle_on_a_simulated_blackwell(tmp_path):
    text = _builtin_text().replace('model = "NVIDIA H100 80GB HBM3"', 'model = "NVIDIA B200"')
    assert "NVIDIA B200" in text
    node, gw, clock = _sim(tmp_path, text)
    m = manager(tmp_path, gw, clock, '[tuning.gpu]\npower_profile = "llm_inference"\n')
    gpus = _sim_readings(gw, node)
    s = by_key(m.plan(gpus))[("power_profile", "gpu:0")]
    assert (s.actual, s.desired, s.error) == ("none", "llm_inference", None)
    assert all(c.ok for c in m.apply(gpus))
    assert gw.get_power_profiles(0) == ("llm_inference",)
    _, events = m.verify(_sim_readings(gw, node), clock.monotonic())
    assert events == []
    assert all(c.ok for c in m.restore())
    assert gw.get_power_profiles(0) == ()


# ------------------------------------------------------------------ config
@pytest.mark.parametrize("value, words", [
    ("[1500]", "must be [min, max] in MHz"),
    ("[1500, 1200]", "min must not be above max"),
    ('"1500"', "must be [min, max] in MHz"),
    ("[1200.5, 1500]", "must be [min, max] in MHz"),
])
def test_config_refuses_a_bad_clock_range(value, words):
    with pytest.raises(ConfigError) as e:
        parse(f"[tuning.gpu]\nlocked_sm_clocks_mhz = {value}\n")
    assert words in str(e.value) and "tuning.gpu.locked_sm_clocks_mhz" in str(e.value)


def test_config_refuses_an_unknown_profile():
    with pytest.raises(ConfigError) as e:
        parse('[tuning.gpu]\npower_profile = "fast"\n')
    assert "llm_inference" in str(e.value)


def test_override_sets_clocks_for_one_gpu(tmp_path):
    node, gw, clock = _sim(tmp_path)
    m = manager(tmp_path, gw, clock, '[[tuning.gpu.override]]\nmatch = "index:3"\n'
                                     "locked_sm_clocks_mhz = [1005, 1410]\n")
    plan = m.plan(_sim_readings(gw, node))
    assert [(s.subject, s.desired) for s in plan] == [("gpu:3", (1005, 1410))]
    m.apply(_sim_readings(gw, node))
    assert node.state(3)["sm_clock"] == 1410 and node.state(2)["sm_clock"] == 1980


def test_a_gpu_without_locked_clocks_says_so_and_nothing_is_written(tmp_path):
    text = _builtin_text().replace('unsupported = [', 'unsupported = ["locked_clocks", ', 1)
    assert '"locked_clocks"' in text
    node, gw, clock = _sim(tmp_path, text)
    m = manager(tmp_path, gw, clock)
    s = by_key(m.plan(_sim_readings(gw, node)))[("locked_sm_clocks_mhz", "gpu:0")]
    assert s.error == (f"GPU 0 ({MODEL}): cannot read the supported SM clocks: not supported "
                       f"on this GPU; set it only for the GPUs that support it "
                       f"([[tuning.gpu.override]] instead of [tuning.gpu])")
    assert all(not c.ok for c in m.apply(_sim_readings(gw, node)))
    assert originals(tmp_path) == {}


def test_simulated_profile_structs_match_pynvml():
    """The simulator writes the workload-power-profile structs by offset: their versions and
    sizes are pynvml's (which follow nvml.h's NVML_STRUCT_VERSION)."""
    import ctypes
    import pynvml
    from gpucostd.sim import clocks
    cur = pynvml.c_nvmlWorkloadPowerProfileCurrentProfiles_v1_t
    req = pynvml.c_nvmlWorkloadPowerProfileRequestedProfiles_v1_t
    info = pynvml.c_nvmlWorkloadPowerProfileProfilesInfo_v1_t
    assert clocks._VERSION_CURRENT == pynvml.nvmlWorkloadPowerProfileCurrentProfiles_v1
    assert clocks._VERSION_REQUESTED == pynvml.nvmlWorkloadPowerProfileRequestedProfiles_v1
    assert clocks._VERSION_INFO == pynvml.nvmlWorkloadPowerProfileProfilesInfo_v1
    assert ctypes.sizeof(cur) == 4 + 3 * clocks._MASK_BYTES
    assert cur.requestedProfilesMask.offset == 4 + clocks._MASK_BYTES
    assert req.requestedProfilesMask.offset == 4
    assert ctypes.sizeof(pynvml.c_nvmlWorkloadPowerProfileInfo_v1_t) == clocks._INFO_BYTES
    assert info.perfProfile.offset == 4 + clocks._MASK_BYTES
