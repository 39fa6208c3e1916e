"""The simulated NVML through the real pynvml: pynvml's own ctypes marshalling, structs and
error classes run on top of the simulated library, and what comes out matches the scenario.

(pynvml is imported here on purpose: these tests check the simulator at the library boundary,
below our gateway.)"""
from __future__ import annotations

import threading
import time

import pytest

pynvml = pytest.importorskip("pynvml", reason="nvidia-ml-py (pynvml) is not installed")

from gpucostd.clock import RealClock, VirtualClock  # noqa: E402
from gpucostd.sim.scenario import load_scenario, parse_scenario  # noqa: E402
from gpucostd.sim.nvml import SYMBOLS, SimulatedNode  # noqa: E402
from gpucostd.snapshot import VIOLATION_POLICIES, reasons_from_mask  # noqa: E402

BASE = """\
[node]
model = "NVIDIA H100 80GB HBM3"
gpu_count = 3
driver_version = "550.90.07"
cuda_version = "12.4"
"""


@pytest.fixture
def install(sim_nvml):
    """Install a simulated library as pynvml's loaded library (restored afterwards):
    install(scenario, clock=None) -> (node, clock)."""
    def _install(scenario, clock=None):
        node, _, clock = sim_nvml(scenario, clock, gateway=False)
        return node, clock
    return _install


def test_library_attributes_are_c_function_pointers(install):
    node, _ = install("builtin:h100x8")
    import ctypes
    for name in SYMBOLS:
        fn = getattr(node.library, name)
        assert isinstance(fn, ctypes._CFuncPtr), name
        assert ctypes.cast(fn, ctypes.c_void_p).value, name


def test_values_match_the_scenario_over_time(install):
    node, clock = install("builtin:h100x8")
    sc = node.scenario
    assert pynvml.nvmlSystemGetDriverVersion() == sc.node.driver_version
    assert pynvml.nvmlSystemGetCudaDriverVersion() == 12040
    assert pynvml.nvmlDeviceGetCount() == 8
    handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(8)]
    for t in (5.0, 30.0, 95.0, 150.0, 250.0):
        clock.advance(t - clock.monotonic())
        for i, h in enumerate(handles):
            st = sc.gpu_state_at(i, t)
            assert pynvml.nvmlDeviceGetName(h) == st["name"]
            assert pynvml.nvmlDeviceGetUUID(h) == st["uuid"]
            bus_id = pynvml.nvmlDeviceGetPciInfo(h).busId
            if isinstance(bus_id, bytes):       # older nvidia-ml-py gives bytes
                bus_id = bus_id.decode()
            assert bus_id == st["pci_bus_id"]
            assert pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU) == \
                st["temperature"]
            assert pynvml.nvmlDeviceGetTemperatureThreshold(
                h, pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN) == st["slowdown_temperature"]
            fv = pynvml.nvmlDeviceGetFieldValues(h, [pynvml.NVML_FI_DEV_MEMORY_TEMP])[0]
            assert fv.nvmlReturn == 0 and fv.value.uiVal == st["memory_temperature"]
            assert pynvml.nvmlDeviceGetPowerUsage(h) == st["power_draw"] * 1000
            assert pynvml.nvmlDeviceGetPowerManagementLimit(h) == st["power_limit"] * 1000
            assert pynvml.nvmlDeviceGetPowerManagementLimitConstraints(h) == [200000, 700000]
            assert pynvml.nvmlDeviceGetPowerManagementDefaultLimit(h) == 700000
            assert pynvml.nvmlDeviceGetPersistenceMode(h) == 1
            assert pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM) == st["sm_clock"]
            assert pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM) == 1980
            assert pynvml.nvmlDeviceGetUtilizationRates(h).gpu == 95
            mask = pynvml.nvmlDeviceGetCurrentClocksEventReasons(h)
            assert reasons_from_mask(mask) == st["clock_event_reasons"]
            assert pynvml.nvmlDeviceGetCurrentClocksThrottleReasons(h) == mask
            assert pynvml.nvmlDeviceGetEccMode(h) == [1, 1]
            assert pynvml.nvmlDeviceGetTotalEccErrors(
                h, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_AGGREGATE_ECC) == 0
            assert pynvml.nvmlDeviceGetRemappedRows(h) == (0, 0, 0, 0)
            assert pynvml.nvmlDeviceGetCurrPcieLinkGeneration(h) == 5
            assert pynvml.nvmlDeviceGetMaxPcieLinkWidth(h) == 16
            assert pynvml.nvmlDeviceGetPcieReplayCounter(h) == 0
            with pytest.raises(pynvml.NVMLError_NotSupported):   # Hopper: row remapping
                pynvml.nvmlDeviceGetRetiredPages(h, 0)
            for key, policy in VIOLATION_POLICIES:
                if policy is None:              # field values only (below)
                    continue
                v = pynvml.nvmlDeviceGetViolationStatus(h, policy)
                assert v.violationTime == round(st["violation_seconds"][key] * 1e9), (i, t, key)
    assert pynvml.nvmlDeviceGetClockInfo(handles[0], pynvml.NVML_CLOCK_SM) == 1980  # t=250


def test_violation_time_advances_only_while_the_reason_is_active(install):
    node, clock = install("builtin:h100x8")
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    thermal = pynvml.NVML_PERF_POLICY_THERMAL
    samples = {}
    for t in (0, 20, 50, 80, 100, 140, 170):
        clock.advance(t - clock.monotonic())
        samples[t] = pynvml.nvmlDeviceGetViolationStatus(h, thermal).violationTime
    ns = 1_000_000_000
    assert samples == {0: 0, 20: 0, 50: 30 * ns, 80: 60 * ns, 100: 60 * ns, 140: 60 * ns,
                       170: 90 * ns}
    ref = pynvml.nvmlDeviceGetViolationStatus(h, thermal).referenceTime
    assert ref == int(clock.time() * 1e6)       # microseconds, as NVML documents


def test_setters_change_state_and_report_errors(install):
    node, clock = install(BASE + """
[[gpu]]
index = 2
setters_permitted = false
""")
    h0, h2 = (pynvml.nvmlDeviceGetHandleByIndex(i) for i in (0, 2))
    pynvml.nvmlDeviceSetPowerManagementLimit(h0, 450000)            # milliwatts
    assert pynvml.nvmlDeviceGetPowerManagementLimit(h0) == 450000
    assert pynvml.nvmlDeviceGetEnforcedPowerLimit(h0) == 450000
    assert node.state(0)["power_limit"] == 450
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        pynvml.nvmlDeviceSetPowerManagementLimit(h0, 900000)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        pynvml.nvmlDeviceSetPowerManagementLimit(h0, 100000)
    pynvml.nvmlDeviceSetPersistenceMode(h0, 0)
    assert pynvml.nvmlDeviceGetPersistenceMode(h0) == 0
    with pytest.raises(pynvml.NVMLError_NoPermission):
        pynvml.nvmlDeviceSetPowerManagementLimit(h2, 450000)
    with pytest.raises(pynvml.NVMLError_NoPermission):
        pynvml.nvmlDeviceSetPersistenceMode(h2, 0)
    assert pynvml.nvmlDeviceGetPowerManagementLimit(h2) == 700000
    # the setting survives time passing (the timeline never sets the field)
    clock.advance(1000)
    assert pynvml.nvmlDeviceGetPowerManagementLimit(h0) == 450000


def test_timeline_overrides_a_setter_only_when_it_sets_the_field_later(install):
    node, clock = install(BASE + """
[[at]]
t = 50
gpu = 0
power_limit = 600
""")
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    clock.advance(10)
    pynvml.nvmlDeviceSetPowerManagementLimit(h, 400000)
    assert pynvml.nvmlDeviceGetPowerManagementLimit(h) == 400000
    clock.advance(45)
    assert pynvml.nvmlDeviceGetPowerManagementLimit(h) == 600000
    pynvml.nvmlDeviceSetPowerManagementLimit(h, 300000)
    clock.advance(5)
    assert pynvml.nvmlDeviceGetPowerManagementLimit(h) == 300000


def test_unsupported_fields_and_violation_counters(install):
    node, _ = install(BASE + """
[[gpu]]
index = 1
unsupported = ["memory_temperature", "remapped_rows", "pcie_replay_count", "ecc"]
violation_counters = false
""")
    h = pynvml.nvmlDeviceGetHandleByIndex(1)
    fv = pynvml.nvmlDeviceGetFieldValues(h, [pynvml.NVML_FI_DEV_MEMORY_TEMP])[0]
    assert fv.nvmlReturn == pynvml.NVML_ERROR_NOT_SUPPORTED
    for call in (lambda: pynvml.nvmlDeviceGetRemappedRows(h),
                 lambda: pynvml.nvmlDeviceGetPcieReplayCounter(h),
                 lambda: pynvml.nvmlDeviceGetEccMode(h),
                 lambda: pynvml.nvmlDeviceGetTotalEccErrors(h, 0, 0),
                 lambda: pynvml.nvmlDeviceGetViolationStatus(h, 0)):
        with pytest.raises(pynvml.NVMLError_NotSupported):
            call()
    assert pynvml.nvmlDeviceGetTemperature(h, 0) == 45       # the rest still answers


def test_lost_gpu_fails_every_call_others_answer(install):
    node, clock = install(BASE + "\n[[at]]\nt = 10\ngpu = 1\nlost = true\n")
    h1 = pynvml.nvmlDeviceGetHandleByIndex(1)
    assert pynvml.nvmlDeviceGetTemperature(h1, 0) == 45
    clock.advance(10)
    for call in (lambda: pynvml.nvmlDeviceGetTemperature(h1, 0),
                 lambda: pynvml.nvmlDeviceGetPowerUsage(h1),
                 lambda: pynvml.nvmlDeviceGetUUID(h1),
                 lambda: pynvml.nvmlDeviceSetPowerManagementLimit(h1, 300000),
                 lambda: pynvml.nvmlDeviceGetHandleByIndex(1)):
        with pytest.raises(pynvml.NVMLError_GpuIsLost) as info:
            call()
        assert str(info.value) == "GPU is lost"
    assert pynvml.nvmlDeviceGetTemperature(pynvml.nvmlDeviceGetHandleByIndex(0), 0) == 45


def test_reset_drops_violation_counters_and_volatile_ecc(install):
    node, clock = install(BASE + """
[[at]]
t = 0
gpu = 0
clock_event_reasons = ["SwPowerCap"]
ecc_volatile_corrected = 3
ecc_aggregate_corrected = 3
[[at]]
t = 40
gpu = 0
reset = true
clock_event_reasons = []
""")
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    clock.advance(30)
    assert pynvml.nvmlDeviceGetViolationStatus(h, 0).violationTime == 30 * 10**9
    assert pynvml.nvmlDeviceGetTotalEccErrors(h, 0, pynvml.NVML_VOLATILE_ECC) == 3
    clock.advance(30)
    assert pynvml.nvmlDeviceGetViolationStatus(h, 0).violationTime == 0
    assert pynvml.nvmlDeviceGetTotalEccErrors(h, 0, pynvml.NVML_VOLATILE_ECC) == 0
    assert pynvml.nvmlDeviceGetTotalEccErrors(h, 0, pynvml.NVML_AGGREGATE_ECC) == 3


def test_kernel_lines_are_drained_once(install):
    node, clock = install(BASE + """repeat_every = 60
[[at]]
t = 5
gpu = 2
kernel_log = "NVRM: Xid (PCI:0000:12:00): 48, pid=1, DBE (0x1) detected"
""")
    assert node.drain_kernel_lines() == []
    clock.advance(6)
    assert node.drain_kernel_lines() == ["NVRM: Xid (PCI:0000:12:00): 48, pid=1, "
                                         "DBE (0x1) detected"]
    assert node.drain_kernel_lines() == []
    clock.advance(120)     # two more cycles
    assert len(node.drain_kernel_lines()) == 2


def test_hang_blocks_that_gpu_on_a_real_clock(install):
    node, _ = install(BASE + "\n[[at]]\nt = 0\ngpu = 1\nhang_seconds = 0.6\n", RealClock())
    h0 = pynvml.nvmlDeviceGetHandleByIndex(0)
    done = threading.Event()
    result = {}

    def stuck():
        result["handle"] = pynvml.nvmlDeviceGetHandleByIndex(1)     # blocks until t = 0.6
        done.set()

    t0 = time.monotonic()
    threading.Thread(target=stuck, daemon=True).start()
    assert not done.wait(0.2)
    # another GPU answers while GPU 1 is stuck
    assert pynvml.nvmlDeviceGetTemperature(h0, 0) == 45
    assert done.wait(5)
    assert time.monotonic() - t0 >= 0.35
    assert pynvml.nvmlDeviceGetTemperature(result["handle"], 0) == 45


def test_hang_on_a_virtual_clock_times_out_at_once(install):
    node, clock = install(BASE + "\n[[at]]\nt = 5\ngpu = 1\nhang_seconds = 30\n")
    h = pynvml.nvmlDeviceGetHandleByIndex(1)
    clock.advance(6)
    with pytest.raises(pynvml.NVMLError_Timeout):
        pynvml.nvmlDeviceGetTemperature(h, 0)
    clock.advance(30)
    assert pynvml.nvmlDeviceGetTemperature(h, 0) == 45


def test_driver_not_loaded_and_uninitialized(install):
    node, _ = install("builtin:h100x8")
    pynvml.nvmlShutdown()
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        pynvml.nvmlDeviceGetCount()
    sc = parse_scenario(BASE + "driver_loaded = false\n", "x.toml")
    node2 = SimulatedNode(sc, VirtualClock())
    with pynvml.libLoadLock:
        pynvml.nvmlLib = node2.library
        pynvml._nvmlGetFunctionPointer_cache.clear()
    with pytest.raises(pynvml.NVMLError_DriverNotLoaded):
        pynvml.nvmlInit()


def test_error_strings_come_from_the_library(install):
    node, _ = install("builtin:h100x8")
    assert pynvml.nvmlErrorString(15) == "GPU is lost"
    assert pynvml.nvmlErrorString(3) == "Not Supported"


def test_scenario_spec_strings_are_accepted():
    node = SimulatedNode("builtin:h100x8", VirtualClock())
    assert node.scenario.node.gpu_count == 8
    assert node.scenario is not load_scenario("builtin:h100x8")
