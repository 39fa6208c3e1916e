"""Field values in the NVML gateway, on the simulated node through the real pynvml: one
nvmlDeviceGetFieldValues per GPU per cycle serves every value NVML has a field id for, each
value's own return code is honoured (NOT_SUPPORTED -> absent, never 0; an id the driver does
not know -> the old call; GPU_IS_LOST -> lost), the old calls serve what fields do not, the
throttle-duration counters come from the clock-event fields instead of the deprecated
nvmlDeviceGetViolationStatus, and static values are read once per NVML session."""
from __future__ import annotations

import ctypes
import os

import pytest

pynvml = pytest.importorskip("pynvml", reason="nvidia-ml-py (pynvml) is not installed")

from gpucostd.hw.nvml_fields import FIELDS, SLOW_SECONDS  # noqa: E402
from gpucostd.probes.gpu import GpuProbe  # noqa: E402
from gpucostd.sim.nvml import FieldValue  # noqa: E402
from gpucostd.sim.scenario import BUILTIN_DIR  # noqa: E402
from gpucostd.snapshot import GpuState  # noqa: E402

BASE = """\
[node]
model = "NVIDIA H100 80GB HBM3"
gpu_count = 3
driver_version = "550.90.07"
cuda_version = "12.4"

[gpu_defaults]
utilization = 90
clock_event_reasons = ["SwPowerCap"]
"""
# every cycle after the first, with field values: these and nothing else
PER_CYCLE = {"nvmlDeviceGetFieldValues", "nvmlDeviceGetClockInfo",
             "nvmlDeviceGetUtilizationRates", "nvmlDeviceGetCurrentClocksEventReasons",
             "nvmlDeviceGetCurrPcieLinkGeneration", "nvmlDeviceGetCurrPcieLinkWidth",
             # GPU Performance Monitoring (Hopper): one sample per cycle, metrics from two
             "nvmlGpmSampleGet", "nvmlGpmMetricsGet",
             # MIG mode can change between cycles (after a reset): one call per GPU and cycle
             "nvmlDeviceGetMigMode"}
# what only someone's setting changes: every SLOW_SECONDS (and after a setter)
SLOW = {"nvmlDeviceGetPersistenceMode", "nvmlDeviceGetApplicationsClock"}


@pytest.fixture
def sim(sim_nvml):
    """sim(scenario, **gateway_kw) -> (node, initialized gateway, clock, GpuProbe)."""
    def _make(scenario="builtin:h100x8", **kw):
        node, gw, clock = sim_nvml(scenario, **kw)
        assert gw.ensure_initialized(), gw.error
        return node, gw, clock, GpuProbe(gw)
    return _make


def intercept(node, returns=None):
    """Replace the simulated nvmlDeviceGetFieldValues by a wrapper that records the field ids
    asked for (a list per call) and then overrides the return code of some fields
    ({field id: code}), as a driver would set them."""
    real = node.library.nvmlDeviceGetFieldValues
    asked = []
    proto = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p)

    def wrapper(h, count, values):
        arr = (FieldValue * count).from_address(values)
        asked.append([fv.fieldId for fv in arr])
        rc = real(h, count, values)
        for fv in arr:
            if returns and fv.fieldId in returns:
                fv.nvmlReturn = returns[fv.fieldId]
                fv.value.ullVal = 0          # what a failed value holds is undefined
        return rc

    fptr = proto(wrapper)
    node.library.nvmlDeviceGetFieldValues = fptr
    with pynvml.libLoadLock:                 # pynvml caches the function pointers it found
        pynvml._nvmlGetFunctionPointer_cache.pop("nvmlDeviceGetFieldValues", None)
    node._keep = fptr                        # keep the callback alive
    return asked


def calls_of(node, read):
    before = dict(node.calls)
    read()
    return {k: v - before.get(k, 0) for k, v in node.calls.items() if v != before.get(k, 0)}


def test_one_field_values_call_per_gpu_per_cycle_and_no_deprecated_call(sim):
    node, gw, clock, probe = sim()
    first = calls_of(node, probe.read)
    assert first["nvmlDeviceGetFieldValues"] == 8
    clock.advance(1)
    probe.read()                # the second GPM sample buffer is allocated here, once
    clock.advance(1)
    steady = calls_of(node, probe.read)
    assert set(steady) == PER_CYCLE and set(steady.values()) == {8}, steady
    clock.advance(SLOW_SECONDS - 2)         # t = 30: SLOW_SECONDS after the first read
    slow = calls_of(node, probe.read)
    assert set(slow) == PER_CYCLE | SLOW and set(slow.values()) == {8}, slow
    assert "nvmlDeviceGetViolationStatus" not in first     # deprecated in NVML 13
    g0 = probe.read()[0]
    assert g0.clock_event_reasons == ("HwThermalSlowdown",)
    assert g0.violation_seconds["hw_thermal"] == pytest.approx(10.0)
    assert set(g0.violation_seconds) == {"power", "sw_thermal", "hw_thermal", "hw_power_brake",
                                         "sync_boost", "board_limit", "low_utilization",
                                         "reliability", "total_base_clocks"}


def test_slow_readings_are_kept_between_reads_and_read_again_after_a_setter(sim):
    """Persistence mode and the application clock are read every SLOW_SECONDS; a cycle
    between shows the last value, and a setter of this daemon makes the next read ask."""
    node, gw, clock, probe = sim()
    probe.read()
    clock.advance(1)
    gpus = probe.read()
    assert [g.persistence_mode for g in gpus] == [True] * 8
    assert gpus[3].app_sm_clock_mhz == 1980
    gw.set_persistence_mode(3, False)
    clock.advance(1)
    calls = calls_of(node, probe.read)
    assert calls["nvmlDeviceGetPersistenceMode"] == 1            # GPU 3 only
    gpus = probe.read()
    assert gpus[3].persistence_mode is False and gpus[2].persistence_mode is True


def _equal_but_violations(a, b):
    return {f: (getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__
            if f != "violation_seconds" and getattr(a, f) != getattr(b, f)}


@pytest.mark.parametrize("how", ["symbol_missing", "not_supported"])
def test_without_field_values_the_old_calls_give_the_same_readings(sim, how):
    """An older libnvidia-ml without the symbol (FUNCTION_NOT_FOUND), or a driver answering
    NOT_SUPPORTED for the whole call: the old calls serve every reading, with the same values;
    the throttle time comes from nvmlDeviceGetViolationStatus (thermal as one counter)."""
    times = (10.0, 30.0, 150.0)
    # pynvml talks to one library per process: read the field-value node first, then the other
    _n, gw_a, clock_a, new = sim()
    seen = []
    for t in times:
        clock_a.advance(t - clock_a.monotonic())
        seen.append(new.read())
    gw_a.shutdown()
    with open(os.path.join(BUILTIN_DIR, "h100x8.toml"), encoding="utf-8") as fh:
        text = fh.read()
    if how == "not_supported":
        text = text.replace('unsupported = ["retired_pages"]',
                            'unsupported = ["retired_pages", "field_values"]')
        assert "field_values" in text
    node, gw, clock_b, old = sim(text)
    if how == "symbol_missing":
        del node.library.nvmlDeviceGetFieldValues
    for t, gpus in zip(times, seen):
        clock_b.advance(t - clock_b.monotonic())
        for a, b in zip(gpus, old.read()):
            assert a.state == b.state == GpuState.OK and a.error is None and b.error is None
            # memory temperature and the recovery action exist only as field values: absent
            # without them
            assert _equal_but_violations(a, b) == {
                "memory_temperature_celsius": (a.memory_temperature_celsius, None),
                "gpu_recovery_action": (a.gpu_recovery_action, None)}
            va, vb = a.violation_seconds, b.violation_seconds
            assert "thermal" in vb and "hw_thermal" not in vb and "hw_thermal" in va
            assert vb["thermal"] == pytest.approx(va["sw_thermal"] + va["hw_thermal"])
            for key in ("power", "sync_boost", "board_limit", "low_utilization",
                        "reliability", "total_base_clocks"):
                assert vb[key] == pytest.approx(va[key]), key
    assert node.calls.get("nvmlDeviceGetFieldValues", 0) <= 8      # once per GPU at most
    assert node.calls.get("nvmlDeviceGetViolationStatus", 0) > 0


def test_field_values_not_supported_on_one_gpu_is_asked_once(sim):
    node, gw, clock, probe = sim(BASE + '\n[[gpu]]\nindex = 1\nunsupported = ["field_values"]\n')
    first = calls_of(node, probe.read)
    assert first["nvmlDeviceGetFieldValues"] == 3
    gpus = probe.read()
    assert gpus[1].power_limit_watts == 700 and gpus[1].temperature_celsius == 45
    assert gpus[1].memory_temperature_celsius is None       # no old call for it: absent
    assert gpus[0].memory_temperature_celsius == 50
    assert gpus[1].violation_seconds.keys() >= {"power", "thermal"}
    steady = calls_of(node, probe.read)
    assert steady["nvmlDeviceGetFieldValues"] == 2          # GPU 1 is not asked again
    assert steady["nvmlDeviceGetViolationStatus"] == 7      # GPU 1's old counters only


def test_driver_without_the_clock_event_duration_fields(sim):
    """A driver older than the SW/HW thermal and power-brake fields: the combined old thermal
    counter is read the old way, the rest still as field values, and never both."""
    node, gw, clock, probe = sim(
        BASE + 'unsupported = ["clock_event_durations"]\n'
        '\n[[at]]\nt = 10\ngpu = 0\nclock_event_reasons = ["HwThermalSlowdown"]\n')
    probe.read()
    clock.advance(25)
    steady = calls_of(node, probe.read)
    assert steady["nvmlDeviceGetViolationStatus"] == 3      # thermal only, per GPU
    g = probe.read()[0]
    assert set(g.violation_seconds) == {"power", "thermal", "sync_boost", "board_limit",
                                        "low_utilization", "reliability", "total_base_clocks"}
    assert g.violation_seconds["thermal"] == pytest.approx(15.0)
    assert g.violation_seconds["power"] == pytest.approx(10.0)


def test_per_field_not_supported_is_absent_and_not_asked_again(sim):
    node, gw, clock, probe = sim(BASE)
    asked = intercept(node, {82: 3, 190: 3})        # memory temp, current power limit
    g = probe.read()[0]
    assert g.memory_temperature_celsius is None     # absent, never 0
    assert g.power_limit_watts == 700               # the old call serves it
    assert g.error is None
    asked.clear()
    probe.read()
    assert all(82 not in ids and 190 not in ids for ids in asked) and len(asked) == 3


def test_a_field_id_this_driver_does_not_know_falls_back(sim):
    node, gw, clock, probe = sim(BASE)
    intercept(node, {308: 2})                       # INVALID_ARGUMENT: newer than the driver
    g = probe.read()[0]
    assert g.temperature_celsius == 45 and g.error is None
    assert node.calls["nvmlDeviceGetTemperature"] == 3


def test_a_field_error_without_fallback_is_reported_and_retried(sim):
    node, gw, clock, probe = sim(BASE)
    asked = intercept(node, {270: 999})             # UNKNOWN on HW thermal
    g = probe.read()[0]
    assert g.state == GpuState.OK
    assert "hw_thermal" not in g.violation_seconds and g.violation_seconds["power"] == 0.0
    assert "NVML_FI_DEV_CLOCKS_EVENT_REASON_HW_THERM_SLOWDOWN" in g.error
    asked.clear()
    probe.read()
    assert all(270 in ids for ids in asked)         # not remembered as unsupported


def test_a_field_saying_gpu_is_lost_makes_the_gpu_lost(sim):
    node, gw, clock, probe = sim(BASE)
    probe.read()
    intercept(node, {74: 15})
    gpus = probe.read()
    assert [g.state for g in gpus] == [GpuState.LOST] * 3
    assert "lost" in gpus[0].error


def test_field_values_carry_nvml_units(sim):
    """Power limits and draw in mW, counters in ns, temperatures in C: the readings come out
    in W, s and C."""
    node, gw, clock, probe = sim(BASE + "power_draw = 412.5\npower_limit = 600\n")
    clock.advance(40)
    g = probe.read()[2]
    assert g.power_draw_watts == 412.5 and g.power_limit_watts == 600
    assert (g.power_limit_min_watts, g.power_limit_max_watts,
            g.power_limit_default_watts) == (200, 700, 700)
    assert g.violation_seconds["power"] == pytest.approx(40.0)
    h = pynvml.nvmlDeviceGetHandleByIndex(2)
    raw = {fv.fieldId: fv for fv in pynvml.nvmlDeviceGetFieldValues(
        h, [f.field_id for f in FIELDS])}
    assert raw[190].value.uiVal == 600000 and raw[74].value.ullVal == 40 * 10 ** 9
    assert raw[308].value.dVal == 45.0
    assert all(fv.nvmlReturn in (0, 3) for fv in raw.values())


def test_static_values_once_per_session_and_after_reinit_or_reset(sim):
    node, gw, clock, probe = sim(BASE.replace("[gpu_defaults]", "repeat_every = 1000\n\n[gpu_defaults]") + """
[[at]]
t = 20
gpu = 1
reset = true
[[at]]
t = 100
driver_loaded = false
[[at]]
t = 110
driver_loaded = true
""", retry_seconds=1)
    static = ("nvmlDeviceGetUUID", "nvmlDeviceGetName", "nvmlDeviceGetPciInfo_v3",
              "nvmlDeviceGetTemperatureThreshold", "nvmlDeviceGetMaxClockInfo",
              "nvmlDeviceGetSupportedClocksEventReasons", "nvmlDeviceGetMaxPcieLinkGeneration",
              "nvmlDeviceGetMaxPcieLinkWidth")
    first = calls_of(node, probe.read)
    assert all(first.get(name) for name in static), first
    for _ in range(3):
        clock.advance(5)
        steady = calls_of(node, probe.read)
        assert not set(static) & set(steady), steady
    clock.advance(6)                 # t = 21: GPU 1 was reset, its counters went backwards
    probe.read()
    again = calls_of(node, probe.read)
    assert again.get("nvmlDeviceGetUUID") == 1, again      # GPU 1 only
    clock.advance(80)                # t = 101: driver gone
    assert probe.read()[0].state == GpuState.UNKNOWN
    clock.advance(10)                # t = 111: back; a new session reads them again
    back = calls_of(node, probe.read)
    assert back.get("nvmlInitWithFlags") == 1 and back.get("nvmlDeviceGetUUID") == 3, back
    gw.forget_static(2)
    forgot = calls_of(node, probe.read)
    assert forgot.get("nvmlDeviceGetUUID") == 1


def test_the_fast_field_values_path_agrees_with_pynvmls_own(sim, monkeypatch):
    """The gateway calls the C function with a prepared array and decodes the structs itself;
    a pynvml without the private pieces gets its public function: both give the same."""
    from gpucostd.hw import nvml_fields
    node, gw, clock, probe = sim(BASE + 'unsupported = ["memory_temperature"]\n')
    clock.advance(12)
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    ids = tuple(f.field_id for f in FIELDS) + (0, 5000)
    fast = nvml_fields.get_field_values(pynvml, h, ids)
    monkeypatch.setattr(nvml_fields, "_layout", lambda cls: None)     # the slow path
    slow = nvml_fields.get_field_values(pynvml, h, ids)
    assert fast == slow
    codes = dict(zip(ids, (c for c, _v in fast)))
    assert codes[82] == 3 and codes[0] == 2 and codes[5000] == 2 and codes[74] == 0
    assert dict(zip(ids, (v for _c, v in fast)))[308] == 45.0
