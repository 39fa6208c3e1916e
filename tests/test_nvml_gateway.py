"""The NVML gateway and the GPU probe on the simulated node (real pynvml over the simulated
library): readings match the scenario, errors are mapped to meaning, a hung GPU costs one
deadline and the others keep answering, both names of the clock-event-reason functions work,
NVML missing at start is retried every retry_seconds."""
from __future__ import annotations

import threading
import time

import pytest

pynvml = pytest.importorskip("pynvml", reason="nvidia-ml-py (pynvml) is not installed")

from gpucostd.clock import RealClock, VirtualClock  # noqa: E402
from gpucostd.hw.nvml import NvmlError, NvmlGateway  # noqa: E402
from gpucostd.probes.gpu import GpuProbe  # noqa: E402
from gpucostd.snapshot import GpuReading, GpuState  # noqa: E402

from conftest import wait_for  # noqa: E402

BASE = """\
[node]
model = "NVIDIA H100 80GB HBM3"
gpu_count = 3
driver_version = "550.90.07"
cuda_version = "12.4"
"""


@pytest.fixture
def sim(sim_nvml):
    """sim(scenario_text_or_spec, clock=None, **gateway_kw) -> (node, gateway, clock)."""
    return sim_nvml


def test_probe_reads_every_field_as_the_scenario_says(sim):
    node, gw, clock = sim()
    assert gw.ensure_initialized(), gw.error
    assert (gw.available, gw.error) == (True, None)
    assert (gw.device_count, gw.driver_version, gw.cuda_version) == (8, "550.90.07", "12.4")
    probe = GpuProbe(gw)
    sc = node.scenario
    for t in (10.0, 30.0, 150.0):
        clock.advance(t - clock.monotonic())
        gpus = probe.read()
        assert [g.index for g in gpus] == list(range(8))
        for g in gpus:
            st = sc.gpu_state_at(g.index, t)
            assert g.state == GpuState.OK and g.error is None
            assert (g.uuid, g.name, g.pci_bus_id) == (st["uuid"], st["name"], st["pci_bus_id"])
            assert g.temperature_celsius == st["temperature"]
            assert g.memory_temperature_celsius == st["memory_temperature"]
            assert (g.temp_slowdown_celsius, g.temp_shutdown_celsius) == (89, 92)
            assert g.power_draw_watts == st["power_draw"]
            assert (g.power_limit_watts, g.power_limit_min_watts, g.power_limit_max_watts,
                    g.power_limit_default_watts) == (700, 200, 700, 700)
            assert g.persistence_mode is True
            assert (g.sm_clock_mhz, g.sm_clock_max_mhz) == (st["sm_clock"], 1980)
            assert g.app_sm_clock_mhz == 1980
            assert g.utilization_percent == 95
            assert g.clock_event_reasons == st["clock_event_reasons"]
            assert "HwThermalSlowdown" in g.supported_reasons
            # field values: the finer thermal counters, never the old combined one beside them
            expect = {k: v for k, v in st["violation_seconds"].items() if k != "thermal"}
            assert g.violation_seconds == pytest.approx(expect)
            assert g.ecc_mode is True
            assert (g.ecc_volatile_corrected, g.ecc_volatile_uncorrected,
                    g.ecc_aggregate_corrected, g.ecc_aggregate_uncorrected) == (0, 0, 0, 0)
            # Hopper: page retirement NOT_SUPPORTED -> absent, never 0
            assert (g.retired_pages_sbe, g.retired_pages_dbe, g.retired_pages_pending) == \
                (None, None, None)
            assert (g.remapped_rows_correctable, g.remapped_rows_uncorrectable,
                    g.remapped_rows_pending, g.remapped_rows_failure) == (0, 0, False, False)
            assert (g.pcie_link_gen, g.pcie_link_gen_max, g.pcie_link_width,
                    g.pcie_link_width_max, g.pcie_replay_count) == (5, 5, 16, 16, 0)
    clock.advance(30 - clock.monotonic() + 120)      # t = 150: second cycle, throttled again
    g0 = probe.read()[0]
    assert g0.clock_event_reasons == ("HwThermalSlowdown",) and g0.sm_clock_mhz == 1410
    assert g0.violation_seconds["hw_thermal"] == pytest.approx(60 + 10)
    assert g0.violation_seconds["sw_thermal"] == 0.0 and "thermal" not in g0.violation_seconds


def test_unsupported_readings_are_none_not_zero(sim):
    node, gw, _ = sim(BASE + """
[[gpu]]
index = 1
unsupported = ["memory_temperature", "ecc", "remapped_rows", "pcie", "app_sm_clock"]
violation_counters = false
""")
    gw.ensure_initialized()
    g = GpuProbe(gw).read()[1]
    assert g.state == GpuState.OK and g.error is None
    for name in ("memory_temperature_celsius", "ecc_mode", "ecc_volatile_corrected",
                 "ecc_aggregate_uncorrected", "remapped_rows_pending", "pcie_link_gen",
                 "pcie_replay_count", "app_sm_clock_mhz", "violation_seconds"):
        assert getattr(g, name) is None, name
    assert g.temperature_celsius == 45


def test_lost_gpu_is_lost_and_keeps_its_identity(sim):
    node, gw, clock = sim(BASE + "\n[[at]]\nt = 10\ngpu = 2\nlost = true\n")
    gw.ensure_initialized()
    probe = GpuProbe(gw)
    first = probe.read()[2]
    clock.advance(11)
    gpus = probe.read()
    g = gpus[2]
    assert g.state == GpuState.LOST
    assert "GPU 2" in g.error and "lost" in g.error and "Xid 79" in g.error
    assert (g.uuid, g.pci_bus_id) == (first.uuid, first.pci_bus_id)
    assert g.temperature_celsius is None
    assert [x.state for x in gpus[:2]] == [GpuState.OK, GpuState.OK]
    with pytest.raises(NvmlError) as info:
        gw.get_power_limit(2)
    assert info.value.kind == "lost"


def test_setters_and_their_errors(sim):
    node, gw, _ = sim(BASE + "\n[[gpu]]\nindex = 1\nsetters_permitted = false\n")
    gw.ensure_initialized()
    gw.set_power_limit(0, 550)
    assert gw.get_power_limit(0) == 550 and node.state(0)["power_limit"] == 550
    gw.set_persistence_mode(0, False)
    assert gw.get_persistence_mode(0) is False
    assert gw.get_power_limit_constraints(0) == (200, 700)
    assert gw.get_default_power_limit(0) == 700

    with pytest.raises(NvmlError) as info:
        gw.set_power_limit(0, 900)
    assert info.value.kind == "invalid_argument"
    assert "900 W" in str(info.value) and "allowed 200..700 W" in str(info.value)

    for call in (lambda: gw.set_power_limit(1, 500), lambda: gw.set_persistence_mode(1, True)):
        with pytest.raises(NvmlError) as info:
            call()
        assert info.value.kind == "no_permission"
        assert "root" in str(info.value) and "CAP_SYS_ADMIN" in str(info.value)
    assert node.state(1)["power_limit"] == 700

    with pytest.raises(NvmlError) as info:
        gw.set_power_limit(7, 500)
    assert info.value.kind == "invalid_argument" and "GPU 7 does not exist" in str(info.value)


def test_hung_gpu_times_out_fast_others_keep_answering_then_it_recovers(sim):
    node, gw, clock = sim(BASE + "\n[[at]]\nt = 0\ngpu = 1\nhang_seconds = 1.5\n",
                          clock=RealClock(), timeout_seconds=0.3)
    assert gw.ensure_initialized()
    probe = GpuProbe(gw)
    t0 = time.monotonic()
    gpus = probe.read()
    took = time.monotonic() - t0
    assert took < 1.0, f"read took {took:.2f} s with a 0.3 s deadline"
    assert gpus[1].state == GpuState.UNRESPONSIVE
    assert "GPU 1" in gpus[1].error and "0.3 s" in gpus[1].error
    assert [gpus[0].state, gpus[2].state] == [GpuState.OK, GpuState.OK]
    # while the call is stuck, the GPU is not called again: the next read does not wait
    calls_before = sum(node.calls.values())
    t0 = time.monotonic()
    gpus = probe.read()
    assert time.monotonic() - t0 < 0.25
    assert gpus[1].state == GpuState.UNRESPONSIVE and "has not returned" in gpus[1].error
    assert gpus[0].temperature_celsius == 45
    with pytest.raises(NvmlError) as info:
        gw.set_power_limit(1, 500)
    assert info.value.kind == "timeout"
    assert sum(node.calls.values()) > calls_before       # GPUs 0 and 2 were read
    # the stuck call returns at t = 1.5 s; the GPU then answers again
    wait_for(lambda: probe.read()[1].state == GpuState.OK, 10, what="GPU 1 recovered")


def test_a_cycle_reads_every_gpu_on_one_thread_while_none_is_slow(sim):
    """One hand-off per cycle, not one per GPU (docs/performance.md); a GPU whose read hangs
    holds the others up for at most SCATTER_SECONDS, then they go to their own threads."""
    node, gw, clock = sim(BASE + "\n[[at]]\nt = 0\ngpu = 0\nhang_seconds = 1.5\n",
                          clock=RealClock(), timeout_seconds=1.0)
    assert gw.ensure_initialized()
    seen = []
    read = gw._read_device

    def spy(index):
        seen.append((index, threading.current_thread().name))
        return read(index)

    gw._read_device = spy
    t0 = time.monotonic()
    gpus = GpuProbe(gw).read()                  # GPU 0 hangs: the others must not wait
    assert gpus[0].state == GpuState.UNRESPONSIVE
    assert [g.state for g in gpus[1:]] == [GpuState.OK, GpuState.OK]
    assert {name for i, name in seen if i > 0} <= {"gpucostd-nvml-gpu1",
                                                   "gpucostd-nvml-gpu2"}
    assert time.monotonic() - t0 < 1.9
    wait_for(lambda: GpuProbe(gw).read()[0].state == GpuState.OK, 10, what="GPU 0 back")
    seen.clear()
    assert [g.state for g in GpuProbe(gw).read()] == [GpuState.OK] * 3
    assert sorted(seen) == [(0, "gpucostd-nvml-batch"), (1, "gpucostd-nvml-batch"),
                            (2, "gpucostd-nvml-batch")]


def test_hang_on_a_virtual_clock_is_unresponsive_without_waiting(sim):
    node, gw, clock = sim(BASE + "\n[[at]]\nt = 5\ngpu = 0\nhang_seconds = 30\n")
    gw.ensure_initialized()
    probe = GpuProbe(gw)
    clock.advance(6)
    t0 = time.monotonic()
    g = probe.read()[0]
    assert time.monotonic() - t0 < 1.0
    assert g.state == GpuState.UNRESPONSIVE
    clock.advance(30)
    assert probe.read()[0].state == GpuState.OK


@pytest.mark.parametrize("remove,expect", [
    (("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetSupportedClocksEventReasons"),
     "nvmlDeviceGetCurrentClocksThrottleReasons"),
    (("nvmlDeviceGetCurrentClocksThrottleReasons",
      "nvmlDeviceGetSupportedClocksThrottleReasons"),
     "nvmlDeviceGetCurrentClocksEventReasons"),
])
def test_old_and_new_reason_names_of_nvidia_ml_py(sim, monkeypatch, remove, expect):
    for name in remove:
        monkeypatch.delattr(pynvml, name, raising=False)
    node, gw, clock = sim()
    gw.ensure_initialized()
    clock.advance(30)
    g = GpuProbe(gw).read()[0]
    assert g.clock_event_reasons == ("HwThermalSlowdown",)
    assert g.supported_reasons and "SwPowerCap" in g.supported_reasons
    assert node.calls.get(expect, 0) >= 1
    for name in remove:
        assert node.calls.get(name, 0) == 0


def test_driver_lacking_the_new_symbol_falls_back_to_the_old(sim):
    node, gw, clock = sim()
    del node.library.nvmlDeviceGetCurrentClocksEventReasons     # an older libnvidia-ml
    gw.ensure_initialized()
    clock.advance(30)
    assert GpuProbe(gw).read()[0].clock_event_reasons == ("HwThermalSlowdown",)
    assert node.calls.get("nvmlDeviceGetCurrentClocksThrottleReasons", 0) >= 1


def test_library_missing_is_unavailable_with_the_reason(monkeypatch):
    saved = pynvml.nvmlLib

    def no_library(name, *a, **kw):
        raise OSError(f"{name}: cannot open shared object file: No such file or directory")

    monkeypatch.setattr(pynvml, "CDLL", no_library)
    with pynvml.libLoadLock:
        pynvml.nvmlLib = None
        pynvml._nvmlGetFunctionPointer_cache.clear()
    try:
        gw = NvmlGateway(clock=VirtualClock())
        assert gw.ensure_initialized() is False
        assert gw.available is False
        assert "libnvidia-ml.so.1 not found" in gw.error and "retrying every 30 s" in gw.error
        assert GpuProbe(gw).read() == ()       # count unknown: no readings, reason in gw.error
        assert GpuProbe(gw, expected_count=2).read() == (
            GpuReading(0, state=GpuState.UNKNOWN, error=gw.error),
            GpuReading(1, state=GpuState.UNKNOWN, error=gw.error))
        gw.shutdown()
    finally:
        with pynvml.libLoadLock:
            pynvml.nvmlLib = saved
            pynvml._nvmlGetFunctionPointer_cache.clear()


def test_driver_not_loaded_is_retried_every_retry_seconds(sim):
    node, gw, clock = sim(BASE + "driver_loaded = false\n\n[[at]]\nt = 10\ndriver_loaded = true\n",
                          retry_seconds=30)
    probe = GpuProbe(gw)
    assert probe.read() == ()
    assert "driver not loaded" in gw.error and "modprobe nvidia" in gw.error
    inits = node.calls.get("nvmlInitWithFlags", 0)
    clock.advance(15)                 # the driver is loaded now, but no retry before 30 s
    assert probe.read() == () and node.calls.get("nvmlInitWithFlags", 0) == inits
    clock.advance(16)
    gpus = probe.read()
    assert gw.available and [g.state for g in gpus] == [GpuState.OK] * 3


def test_driver_unloaded_at_runtime_gives_unknown_readings_then_recovers(sim):
    node, gw, clock = sim(BASE + """repeat_every = 100
[[at]]
t = 10
driver_loaded = false
[[at]]
t = 50
driver_loaded = true
""", retry_seconds=5)
    probe = GpuProbe(gw)
    good = probe.read()
    assert [g.state for g in good] == [GpuState.OK] * 3
    clock.advance(11)
    gpus = probe.read()
    assert [g.state for g in gpus] == [GpuState.UNKNOWN] * 3
    assert gw.available is False and "driver not loaded" in gpus[0].error
    assert gpus[0].uuid == good[0].uuid and gpus[0].temperature_celsius is None
    clock.advance(40)
    wait_for(lambda: [g.state for g in probe.read()] == [GpuState.OK] * 3, 5,
             what="recovery after the driver came back")


def test_concurrent_callers_are_safe(sim):
    node, gw, clock = sim()
    gw.ensure_initialized()
    probe = GpuProbe(gw)
    errors = []

    def reader():
        try:
            for _ in range(20):
                assert len(probe.read()) == 8
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    def setter():
        try:
            for k in range(40):
                gw.set_power_limit(k % 8, 400 + k)
                assert gw.get_power_limit(k % 8) == 400 + k
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(3)] + [threading.Thread(target=setter)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors


def test_nvml_error_kinds_are_checked():
    with pytest.raises(ValueError):
        NvmlError("bogus", "x")
    e = NvmlError("lost", "GPU 1: gone", gpu=1)
    assert str(e) == "GPU 1: gone" and e.kind == "lost" and e.gpu == 1


@pytest.mark.hardware
def test_real_nvml_when_a_gpu_is_present():
    """On a machine with an NVIDIA driver: the gateway reads the real GPUs. Skipped otherwise."""
    saved = pynvml.nvmlLib
    gw = NvmlGateway(timeout_seconds=5.0)
    try:
        if not gw.ensure_initialized():
            pytest.skip(f"no usable NVIDIA driver here: {gw.error}")
        gpus = GpuProbe(gw).read()
        assert len(gpus) == gw.device_count >= 1
        for g in gpus:
            assert g.state == GpuState.OK, g.error
            assert g.uuid.startswith("GPU-") and g.name and g.pci_bus_id
            assert g.temperature_celsius is not None and 0 < g.temperature_celsius < 120
            assert g.power_limit_watts and g.sm_clock_max_mhz
            assert g.clock_event_reasons is not None
    finally:
        gw.shutdown()
        with pynvml.libLoadLock:
            pynvml.nvmlLib = saved
            pynvml._nvmlGetFunctionPointer_cache.clear()


def test_enforced_limit_not_supported_falls_back_to_the_management_limit(sim):
    """Both functions serve one reading: NOT_SUPPORTED from the first must not blank the
    fallback (it did when the unsupported cache was keyed by reading, not by function)."""
    import ctypes
    node, gw, clock = sim(BASE)
    proto = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
    not_supported = proto(lambda h, out: 3)
    node.library.nvmlDeviceGetEnforcedPowerLimit = not_supported
    probe = GpuProbe(gw)
    for _ in range(3):
        assert [g.power_limit_watts for g in probe.read()] == [700.0] * 3
    assert gw.get_power_limit(0) == 700.0


def test_unsupported_reason_functions_cost_one_call_each(sim):
    node, gw, clock = sim(BASE + '\n[gpu_defaults]\nunsupported = ["clock_event_reasons"]\n')
    probe = GpuProbe(gw)
    for _ in range(4):
        g = probe.read()[0]
        assert g.clock_event_reasons is None and g.supported_reasons is None
        clock.advance(1)
    for name in ("nvmlDeviceGetCurrentClocksEventReasons",
                 "nvmlDeviceGetCurrentClocksThrottleReasons",
                 "nvmlDeviceGetSupportedClocksEventReasons",
                 "nvmlDeviceGetSupportedClocksThrottleReasons"):
        assert node.calls.get(name, 0) == 3, name      # once per GPU, not once per cycle


def test_reinit_after_the_driver_came_back_closes_the_old_session(sim):
    node, gw, clock = sim(BASE + """repeat_every = 100
[[at]]
t = 10
driver_loaded = false
[[at]]
t = 50
driver_loaded = true
""", retry_seconds=5)
    probe = GpuProbe(gw)
    assert probe.read()[0].state == GpuState.OK
    clock.advance(11)
    assert probe.read()[0].state == GpuState.UNKNOWN
    clock.advance(40)
    wait_for(lambda: probe.read()[0].state == GpuState.OK, 5, what="recovery")
    assert node._init_count == 1        # nvmlInit not stacked on the stale session
    gw.shutdown()
    assert node._init_count == 0


@pytest.mark.parametrize("vtype,member,expect", [
    (0, "dVal", 1.5), (1, "uiVal", 7.0), (6, "usVal", 9.0), (42, None, None)])
def test_field_values_by_value_type(vtype, member, expect):
    from types import SimpleNamespace

    from gpucostd.hw.nvml import _field_value
    value = SimpleNamespace(**({member: expect} if member else {}))   # no other members
    assert _field_value(SimpleNamespace(valueType=vtype, value=value)) == expect


def test_slow_nvml_init_is_taken_once_it_returns(sim):
    """nvmlInit that overruns the deadline (seconds without persistence mode on a big node)
    must not be thrown away and started again: every new attempt would overrun too."""
    import ctypes
    node, gw, clock = sim(BASE, clock=RealClock(), timeout_seconds=0.2, retry_seconds=0.0)
    real = node.library.nvmlInitWithFlags

    def slow(flags):
        time.sleep(0.6)
        return real(flags)

    node.library.nvmlInitWithFlags = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_uint)(slow)
    started = time.monotonic()
    assert gw.ensure_initialized() is False
    assert time.monotonic() - started < 0.5 and "did not return within 0.2 s" in gw.error
    wait_for(gw.ensure_initialized, 5, what="the late nvmlInit taken")
    assert node.calls["nvmlInitWithFlags"] == 1 and node._init_count == 1
    assert [g.state for g in GpuProbe(gw).read()] == [GpuState.OK] * 3
