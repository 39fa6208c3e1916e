"""MIG seen (issue 25): the simulator speaks MIG below pynvml as nvml.h declares it; the gateway
reads mode and instances into GpuReading.mig; status, status --json and metrics show every
instance; the series budget of a fully sliced 8-GPU node holds; capture records the slicing so it
replays. In-process on the simulated NVML, except one daemon process
(`gpucostd run --simulate builtin:h100x8_mig`)."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import metric_value  # noqa: E402

pynvml = pytest.importorskip("pynvml", reason="nvidia-ml-py (pynvml) is not installed")

from gpucostd.probes.gpu import GpuProbe  # noqa: E402
from gpucostd.sim.scenario import ScenarioError, parse_scenario  # noqa: E402

MIG_SCENARIO = "builtin:h100x8_mig"


def read_twice(sim_nvml, scenario=MIG_SCENARIO, seconds=5.0):
    """Two probe reads `seconds` apart on a virtual clock (GPM needs two samples)."""
    node, gw, clock = sim_nvml(scenario)
    probe = GpuProbe(gw)
    probe.read()
    clock.advance(seconds)
    return node, gw, clock, probe, probe.read()


# ------------------------------------------------------------------ simulator vs nvml.h
def test_mig_structs_and_versions_match_the_header_and_pynvml():
    from test_nvml_header import HEADER, parse_struct_fields
    from gpucostd.sim import mig
    if HEADER is None:
        pytest.skip("nvml.h not found: pip install nvidia-nvml-dev")
    text = open(HEADER, encoding="utf-8", errors="replace").read()
    for cls, typedef in ((mig.Memory, "nvmlMemory_t"),
                         (mig.DeviceAttributes, "nvmlDeviceAttributes_t"),
                         (mig.GpuInstanceProfileInfo, "nvmlGpuInstanceProfileInfo_t"),
                         (mig.GpuInstanceProfileInfoV2, "nvmlGpuInstanceProfileInfo_v2_t"),
                         (mig.GpuInstancePlacement, "nvmlGpuInstancePlacement_t"),
                         (mig.GpuInstanceInfo, "nvmlGpuInstanceInfo_t")):
        assert [f[0] for f in cls._fields_] == parse_struct_fields(text, typedef), typedef
    assert mig.PROFILE_INFO_V2_VERSION == pynvml.nvmlGpuInstanceProfileInfo_v2
    # every MIG symbol is in the table tests/test_nvml_header.py checks against nvml.h
    from gpucostd.sim.nvml import HEADER_CONSTANTS, SYMBOLS
    assert set(mig.MIG_SYMBOLS) <= set(SYMBOLS)
    assert set(mig.MIG_CONSTANTS) <= set(HEADER_CONSTANTS)


def test_the_simulator_answers_the_mig_calls_as_nvml_does(sim_nvml):
    node, _gw, clock = sim_nvml(MIG_SCENARIO, gateway=False)
    nv = pynvml
    h0, h2 = nv.nvmlDeviceGetHandleByIndex(0), nv.nvmlDeviceGetHandleByIndex(2)
    assert nv.nvmlDeviceGetMigMode(h0) == [1, 1]
    assert nv.nvmlDeviceGetMigMode(h2) == [0, 0]          # an H100 with MIG off
    assert nv.nvmlDeviceGetMaxMigDeviceCount(h0) == 7
    assert nv.nvmlDeviceGetMaxMigDeviceCount(h2) == 0
    m = nv.nvmlDeviceGetMigDeviceHandleByIndex(h0, 0)
    assert nv.nvmlDeviceIsMigDeviceHandle(m).value == 1
    assert nv.nvmlDeviceIsMigDeviceHandle(h0).value == 0
    assert (nv.nvmlDeviceGetGpuInstanceId(m), nv.nvmlDeviceGetComputeInstanceId(m)) == (7, 0)
    assert nv.nvmlDeviceGetUUID(m).startswith("MIG-")
    parent = nv.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(m)
    assert nv.nvmlDeviceGetUUID(parent) == nv.nvmlDeviceGetUUID(h0)
    mem = nv.nvmlDeviceGetMemoryInfo(m)
    assert mem.used == 9100 << 20 and mem.total == mem.used + mem.free
    attrs = nv.nvmlDeviceGetAttributes_v2(m)
    assert (attrs.gpuInstanceSliceCount, attrs.memorySizeMB) == (1, 10112)
    info = nv.nvmlDeviceGetGpuInstanceProfileInfo(h0, nv.NVML_GPU_INSTANCE_PROFILE_1_SLICE)
    assert (info.name, info.sliceCount, info.instanceCount) == ("MIG 1g.10gb", 1, 7)
    gi = nv.nvmlGpuInstanceGetInfo(nv.nvmlDeviceGetGpuInstanceById(h0, 13))
    assert (gi.id, gi.profileId) == (13, info.id)
    with pytest.raises(nv.NVMLError_NotFound):              # GPU 1 has two instances
        nv.nvmlDeviceGetMigDeviceHandleByIndex(nv.nvmlDeviceGetHandleByIndex(1), 2)
    # a MIG handle is not a GPU: a GPU-only call refuses it; a GPU handle has no GI id
    with pytest.raises(nv.NVMLError_InvalidArgument):
        nv.nvmlDeviceGetPowerUsage(m)
    with pytest.raises(nv.NVMLError_NotSupported):
        nv.nvmlDeviceGetGpuInstanceId(h0)
    assert node.missing == set()


def test_a_gpu_without_mig_answers_not_supported(sim_nvml):
    _node, _gw, _clock = sim_nvml('[node]\ngpu_count = 2\nmodel = "NVIDIA L40S"\n'
                                  '[[gpu]]\nindex = 1\nname = "NVIDIA H100 80GB HBM3"\n'
                                  'unsupported = ["mig"]\n', gateway=False)
    for i in (0, 1):
        with pytest.raises(pynvml.NVMLError_NotSupported):
            pynvml.nvmlDeviceGetMigMode(pynvml.nvmlDeviceGetHandleByIndex(i))


@pytest.mark.parametrize("body,where,words", [
    ('[[mig]]\ngpu = 0\nprofile = "1g.12gb"\ncount = 8\n', "test.toml:6", "allowed 1..7"),
    ('[[mig]]\ngpu = 0\nprofile = "2g.10gb.x"\n', "test.toml:5", "1g.10gb, 1g.20gb"),
    ('[[mig]]\ngpu = 0\nprofile = "4g.40gb"\n[[mig]]\ngpu = 0\nprofile = "4g.40gb"\n', None,
     "at most 1 fit"),
    ('[[mig]]\ngpu = 0\nprofile = "4g.40gb"\n[[mig]]\ngpu = 0\nprofile = "7g.80gb"\n', None,
     "do not fit"),
    ('[[mig]]\ngpu = 1\nprofile = "1g.10gb"\n', "test.toml:4", "L40S) has no MIG"),
    ('[[mig]]\ngpu = 0\nprofile = "1g.10gb"\nmemory_used_mib = 20000\n', "test.toml:6",
     "has 10112 MiB"),
    ('[[serving.endpoint]]\ninstances = ["0/9/0"]\n[[mig]]\ngpu = 0\nprofile = "1g.10gb"\n',
     None, "0/9/0 is not a [[mig]] instance; the scenario has: 0/7/0"),
])
def test_a_bad_mig_layout_is_a_scenario_error_that_says_why(body, where, words):
    text = '[node]\ngpu_count = 2\n' + body + '[[gpu]]\nindex = 1\nname = "NVIDIA L40S"\n'
    with pytest.raises(ScenarioError) as err:
        parse_scenario(text, "test.toml")
    assert words in str(err.value)
    if where:
        assert str(err.value).startswith(where + ":"), str(err.value)


# ------------------------------------------------------------------ the gateway
def test_the_gateway_reads_every_instance_of_the_builtin_mig_scenario(sim_nvml):
    node, _gw, _clock, _probe, gpus = read_twice(sim_nvml)
    g0, g1, g2 = gpus[0], gpus[1], gpus[2]
    assert (g0.mig_mode, g0.mig_mode_pending) == (True, True)
    assert [m.key for m in g0.mig] == [f"0/{gi}/0" for gi in range(7, 14)]
    assert {m.profile for m in g0.mig} == {"1g.10gb"}
    assert all(m.share == pytest.approx(1 / 7) for m in g0.mig)
    assert all(m.uuid.startswith("MIG-") for m in g0.mig) and len({m.uuid for m in g0.mig}) == 7
    assert g0.mig[0].memory_used_bytes == 9100 << 20
    assert g0.mig[0].memory_total_bytes == 10112 << 20
    busy, idle = g0.mig[0], g0.mig[6]
    # ground truth: the physics of GPU 0's state at the instance's own 95% busy
    from gpucostd.sim.physics import state_activity
    truth = state_activity(dict(node.scenario.gpu_state_at(0, 3.0), utilization=95),
                           node.scenario.physics)
    assert busy.activity.sm == pytest.approx(truth["sm"], rel=1e-6)
    assert busy.activity.dram == pytest.approx(truth["dram"], rel=1e-6)
    assert idle.activity.sm == 0.0
    assert [(m.key, m.profile, m.slices) for m in g1.mig] == [("1/1/0", "4g.40gb", 4),
                                                            ("1/2/0", "3g.40gb", 3)]
    assert (g2.mig_mode, g2.mig) == (False, ())
    assert g0.error is None and node.missing == set()


def test_a_gpu_without_mig_reads_none_and_is_asked_once(sim_nvml):
    node, _gw, clock = sim_nvml('[node]\ngpu_count = 1\nmodel = "NVIDIA L40S"\n')
    probe = GpuProbe(_gw)
    for _ in range(3):
        (g,) = probe.read()
        clock.advance(1)
    assert (g.mig_mode, g.mig_mode_pending, g.mig) == (None, None, ())
    assert node.calls["nvmlDeviceGetMigMode"] == 1


def test_an_instance_destroyed_leaves_the_reading_and_a_pending_change_shows(sim_nvml):
    text = ('[node]\ngpu_count = 1\n[[mig]]\ngpu = 0\nprofile = "3g.40gb"\n'
            '[[mig]]\ngpu = 0\nprofile = "4g.40gb"\nuntil = 10\n'
            '[[at]]\nt = 20\ngpu = 0\nmig_mode_pending = false\n')
    node, gw, clock = sim_nvml(text)
    probe = GpuProbe(gw)
    assert [m.profile for m in probe.read()[0].mig] == ["4g.40gb", "3g.40gb"]
    clock.advance(11)
    (g,) = probe.read()
    assert [m.key for m in g.mig] == ["0/2/0"] and g.error is None
    clock.advance(10)
    (g,) = probe.read()
    assert (g.mig_mode, g.mig_mode_pending) == (True, False)


def test_a_hung_gpu_is_unresponsive_with_no_instances(sim_nvml):
    text = ('[node]\ngpu_count = 1\n[[mig]]\ngpu = 0\nprofile = "7g.80gb"\n'
            '[[at]]\nt = 1\ngpu = 0\nhang_seconds = 30\n')
    _node, gw, clock = sim_nvml(text)
    probe = GpuProbe(gw)
    assert len(probe.read()[0].mig) == 1
    clock.advance(2)
    (g,) = probe.read()
    assert g.state.value != "ok" and g.mig == ()


# ------------------------------------------------------------------ views
def test_status_shows_one_line_per_instance_within_100_columns(sim_nvml):
    from gpucostd.snapshot import Severity
    from gpucostd.views.statusview import _gpu_json, mig_json
    from gpucostd.views.statustext import mig_lines
    _n, _g, _c, _p, gpus = read_twice(sim_nvml)
    g = _gpu_json(gpus[0], Severity.OK, [])
    assert g["mig_mode"] is True and len(g["mig_instances"]) == 7
    first = g["mig_instances"][0]
    assert {k: first[k] for k in ("key", "gpu_instance", "compute_instance", "profile")} == \
        {"key": "0/7/0", "gpu_instance": 7, "compute_instance": 0, "profile": "1g.10gb"}
    assert first["uuid"].startswith("MIG-") and first["activity"]["sm"] > 0
    assert first["memory_total_bytes"] == 10112 << 20
    lines = mig_lines(g)
    assert len(lines) == 7 and all(len(line) <= 100 for line in lines)
    assert lines[0].split()[:4] == ["mig", "0/7/0", "1g.10gb", "1/7"]
    assert lines[0].endswith(first["uuid"])            # never cut off
    assert "0/0/0%" in lines[6]                         # the idle slice
    assert mig_json(gpus[1].mig[0])["share"] == pytest.approx(4 / 7)


FULLY_SLICED = ('[node]\ngpu_count = 8\n[gpu_defaults]\nutilization = 90\n'
                '[physics]\nidle_watts = 70\nfull_load_watts = 900\n'
                + "".join(f'[[mig]]\ngpu = {i}\nprofile = "1g.10gb"\ncount = 7\n'
                          f'utilization = 90\nmemory_used_mib = 9000\n' for i in range(8)))


def test_series_budget_of_a_fully_sliced_8_gpu_node(tmp_path):
    """docs/metrics.md: the MIG families add at most 2 per GPU + 7 per instance = 408 series
    on 8 x 7 instances, and the node's whole scrape stays under 1,500."""
    from gpucostd import config
    from gpucostd.loop import Daemon
    from gpucostd.views import metrics, metrics_mig
    scen = tmp_path / "sliced.toml"
    scen.write_text(FULLY_SLICED)
    cfg = config.parse(f'[daemon]\nstate_dir = "{tmp_path}/state"\nkernel_log = "none"\n'
                       f'socket_path = "{tmp_path}/s.sock"\n[cost]\ngpu_hour_usd = 3.0\n')
    d = Daemon(cfg, simulate=str(scen), journal=False)
    d.start()
    try:
        for _ in range(3):
            snap = d.step()
    finally:
        d.shutdown()
    assert sum(len(g.mig) for g in snap.gpus) == 56
    text = metrics.render(snap).decode()
    samples = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    mig = [s for s in samples if s.startswith(("gpucostd_mig_", "gpucostd_gpu_mig_"))]
    budget = 8 * metrics_mig.SERIES_PER_GPU + 56 * metrics_mig.SERIES_PER_INSTANCE
    assert budget == 408 and len(mig) == budget          # every instance fully read
    assert len(samples) < 1500, len(samples)
    assert metric_value(text, "gpucostd_mig_share_ratio", gpu="3", gpu_instance="9") == \
        pytest.approx(1 / 7)


# ------------------------------------------------------------------ capture round trip
def test_capture_records_the_slicing_and_it_replays(sim_nvml):
    from gpucostd.capture import scenario_text
    _n, gw, _c, _p, gpus = read_twice(sim_nvml)
    text = scenario_text(gpus, gw.driver_version, gw.cuda_version, "node-a")
    assert text.count("[[mig]]") == 9
    _n2, _g2, _c2, _p2, again = read_twice(sim_nvml, text)

    def layout(readings):
        return [(g.index, g.mig_mode, m.key, m.profile, m.slices, m.uuid, m.memory_used_bytes,
                 m.memory_total_bytes) for g in readings for m in g.mig]
    assert layout(again) == layout(gpus)
    assert [g.mig_mode for g in again] == [g.mig_mode for g in gpus]
    # the work of each slice replays too (NVML has no GPU-Util on a MIG GPU: from GPM)
    assert gpus[0].utilization_percent is None
    assert [m.activity.sm for g in again for m in g.mig] == pytest.approx(
        [m.activity.sm for g in gpus for m in g.mig], abs=1e-3)
    assert again[0].mig[6].activity.sm == 0.0 and again[0].mig[0].activity.sm > 0.2


def test_capture_of_a_profile_the_simulator_has_no_table_for_still_replays():
    """A captured node's profile named in NVIDIA's form that the model's table lacks (an H100
    NVL's 1g.12gb) replays with its slices and memory from its name."""
    sc = parse_scenario('[node]\ngpu_count = 1\n[[mig]]\ngpu = 0\nprofile = "1g.12gb"\n'
                        'gi_id = 9\nmemory_used_mib = 11000\n', "cap.toml")
    (spec,) = sc.mig[0]
    assert (spec.key, spec.profile.slices, spec.profile.memory_mib) == ("0/9/0", 1, 12288)


# ------------------------------------------------------------------ the daemon
def test_run_simulate_builtin_mig_shows_every_instance_in_status_and_metrics(daemon_factory):
    from conftest import wait_for
    # a loaded CI host must not turn a slow simulated read into an unresponsive GPU
    d = daemon_factory(scenario=MIG_SCENARIO, extra_config="nvml_timeout_seconds = 20\n")
    d.start()
    # activity needs two GPM samples, so the second cycle's scrape at the earliest
    try:
        wait_for(lambda: metric_value(d.metrics(), "gpucostd_mig_sm_active_ratio", gpu="0",
                                      gpu_instance="13") is not None, 60, interval=0.2,
                 what="MIG activity")
    except AssertionError as err:
        raise AssertionError(f"{err}\n{d.cli('status').stdout}\n{d.output()[-3000:]}") from None
    text = d.metrics()
    assert len(re.findall(r"^gpucostd_mig_instance_info\{", text, re.M)) == 9
    assert metric_value(text, "gpucostd_mig_sm_active_ratio", gpu="0", gpu_instance="13") == 0
    assert metric_value(text, "gpucostd_gpu_mig_mode", gpu="2") == 0
    code, data = d.status_json()
    assert [m["key"] for g in data["gpus"] for m in g["mig_instances"]] == \
        [f"0/{i}/0" for i in range(7, 14)] + ["1/1/0", "1/2/0"]
    out = d.cli("status").stdout
    assert all(len(line) <= 100 for line in out.splitlines())
    assert re.search(r"^  mig 1/2/0 +3g\.40gb +3/7 ", out, re.M), out


def test_a_simulated_server_per_instance_generates_its_share_of_the_gpu():
    """builtin:h100x8_mig: a 1g.10gb instance's server makes 1/7 of its GPU's 2000 tokens/s at
    95% busy, the idle one none; --simulate points [[inference.endpoint]] instances at them."""
    from gpucostd.sim.scenario import load_scenario
    from gpucostd.sim.serving import endpoint_specs
    sc = load_scenario(MIG_SCENARIO)
    eps = sc.serving.endpoints
    rate = {ep.instances[0]: sc.endpoint_rate_at(k, 1.0) for k, ep in enumerate(eps)
            if ep.instances}
    assert rate["0/7/0"] == pytest.approx(2000 / 7 * 0.95)
    assert rate["0/13/0"] == 0.0
    assert rate["1/1/0"] == pytest.approx(2000 * 4 / 7 * 0.95)

    class Serving:
        endpoints = eps
    specs = endpoint_specs(Serving(), [f"http://127.0.0.1:{9000 + k}/metrics"
                                       for k in range(len(eps))])
    assert specs[0] == {"url": "http://127.0.0.1:9000/metrics", "instances": ["0/7/0"]}
    assert specs[-1]["gpus"] == [6, 7]


def test_a_gpu_in_mig_mode_without_instances_says_so():
    from gpucostd.views.statustext import mig_lines
    assert mig_lines({"mig_mode": True, "mig_instances": []}) == ["    MIG on, no instances"]
    assert mig_lines({"mig_mode": False, "mig_instances": []}) == []
    assert mig_lines({}) == []


def test_the_capture_command_records_each_instances_work(tmp_path):
    """`gpucostd capture` reads twice on a MIG GPU with GPM, so each instance's work (and its
    GPU's, which NVML does not give on a MIG GPU) is in the scenario it writes."""
    from gpucostd.cli import main
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[daemon]\nstate_dir = "{tmp_path}/state"\nkernel_log = "none"\n'
                   f'socket_path = "{tmp_path}/s.sock"\n')
    out = tmp_path / "captured.toml"
    assert main(["capture", "--config", str(cfg), "--simulate", MIG_SCENARIO,
                 "--out", str(out)]) == 0
    sc = parse_scenario(out.read_text(), str(out))
    busy = {s.key: s.utilization for g in sc.mig for s in g}
    assert len(busy) == 9 and busy["0/13/0"] == 0 and busy["0/7/0"] > 0
    assert sc.initial[0]["utilization"] == pytest.approx(6 / 7 * busy["0/7/0"], abs=0.02)
