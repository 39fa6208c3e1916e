"""What a device read asks NVML, as two data tables: field values first, the old calls after.

``FIELDS``: readings served by ``nvmlDeviceGetFieldValues`` -- one call per GPU per cycle for
all of them. Each row names the GpuReading attribute it fills (``violation_seconds.<key>`` for a
throttle-duration counter, key as in ``gpucostd.snapshot.VIOLATION_POLICIES``), the NVML field
id with its ``NVML_FI_*`` name in nvml.h (tests/test_nvml_header.py checks every id against the
real header of nvidia-nvml-dev), how to convert the value, and whether it is static (read once
per NVML session). Several rows for one reading are alternatives, best first: the next one is
asked only once the earlier ones said NOT_SUPPORTED.

``LEGACY``: the older one-value-per-call functions. A reading that no field value gave (the
field is not supported, the driver lacks nvmlDeviceGetFieldValues, or the value carried an
error) is read by its first legacy row whose function exists; again several rows for one
reading are alternatives, best first.

To read something new: add a row (and the reading to GpuReading, the simulator's field table
in gpucostd/sim/fieldvalues.py, the metric and its docs). This module imports no pynvml: functions are
named by string and looked up on the pynvml module by the gateway.
"""
from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

from gpucostd.hw.gpm import GpmSession
from gpucostd.hw.nvml_mig import MigSession
from gpucostd.hw.nvml_errors import NvmlError
from gpucostd.snapshot import VIOLATION_POLICIES, VIOLATION_REPLACED_BY, reasons_from_mask

VIOLATION_PREFIX = "violation_seconds."


class Field(NamedTuple):
    reading: str          # GpuReading attribute, or "violation_seconds.<counter key>"
    nvml_name: str        # the NVML_FI_* macro in nvml.h
    field_id: int         # its value
    convert: str          # key of CONVERT: NVML's unit -> the reading's unit
    static: bool = False  # True: read once per NVML session (and after a reset)


# Conversions from NVML's units: mW -> W, ns -> s, 1/0 -> bool.
CONVERT: Dict[str, Callable[[Any], Any]] = {
    "float": float,
    "int": int,
    "bool": lambda v: int(v) == 1,
    "milli": lambda v: v / 1000.0,
    "nano": lambda v: v / 1e9,
}

FIELDS: Tuple[Field, ...] = (
    # temperatures (GPU_TEMP has sub-degree precision on drivers that have it)
    Field("temperature_celsius", "NVML_FI_DEV_GPU_TEMP", 308, "float"),
    Field("memory_temperature_celsius", "NVML_FI_DEV_MEMORY_TEMP", 82, "float"),
    # power, milliwatts. POWER_AVERAGE (1 s) is what nvmlDeviceGetPowerUsage returns on Ampere
    # and later except GA100; POWER_INSTANT is what it returns on the others.
    Field("power_draw_watts", "NVML_FI_DEV_POWER_AVERAGE", 185, "milli"),
    Field("power_draw_watts", "NVML_FI_DEV_POWER_INSTANT", 186, "milli"),
    Field("power_limit_watts", "NVML_FI_DEV_POWER_CURRENT_LIMIT", 190, "milli"),
    Field("power_limit_min_watts", "NVML_FI_DEV_POWER_MIN_LIMIT", 187, "milli", True),
    Field("power_limit_max_watts", "NVML_FI_DEV_POWER_MAX_LIMIT", 188, "milli", True),
    Field("power_limit_default_watts", "NVML_FI_DEV_POWER_DEFAULT_LIMIT", 189, "milli", True),
    # ECC (single bit = corrected, double bit = uncorrected)
    Field("ecc_mode", "NVML_FI_DEV_ECC_CURRENT", 1, "bool"),
    Field("ecc_volatile_corrected", "NVML_FI_DEV_ECC_SBE_VOL_TOTAL", 3, "int"),
    Field("ecc_volatile_uncorrected", "NVML_FI_DEV_ECC_DBE_VOL_TOTAL", 4, "int"),
    Field("ecc_aggregate_corrected", "NVML_FI_DEV_ECC_SBE_AGG_TOTAL", 5, "int"),
    Field("ecc_aggregate_uncorrected", "NVML_FI_DEV_ECC_DBE_AGG_TOTAL", 6, "int"),
    Field("retired_pages_sbe", "NVML_FI_DEV_RETIRED_SBE", 29, "int"),
    Field("retired_pages_dbe", "NVML_FI_DEV_RETIRED_DBE", 30, "int"),
    Field("retired_pages_pending", "NVML_FI_DEV_RETIRED_PENDING", 31, "bool"),
    Field("remapped_rows_correctable", "NVML_FI_DEV_REMAPPED_COR", 142, "int"),
    Field("remapped_rows_uncorrectable", "NVML_FI_DEV_REMAPPED_UNC", 143, "int"),
    Field("remapped_rows_pending", "NVML_FI_DEV_REMAPPED_PENDING", 144, "bool"),
    Field("remapped_rows_failure", "NVML_FI_DEV_REMAPPED_FAILURE", 145, "bool"),
    Field("pcie_replay_count", "NVML_FI_DEV_PCIE_REPLAY_COUNTER", 94, "int"),
    # the driver's verdict: nvmlDeviceGpuRecoveryAction_t (0 none, 1 GPU reset, 2 node reboot,
    # 3 drain P2P, 4 drain and reset; newer drivers 5-7); older drivers: NOT_SUPPORTED/absent
    Field("gpu_recovery_action", "NVML_FI_DEV_GET_GPU_RECOVERY_ACTION", 230, "int"),
    # energy since the driver loaded, millijoules (Volta and later)
    Field("energy_joules", "NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION", 83, "milli"),
    # throttle-duration counters, nanoseconds (replace nvmlDeviceGetViolationStatus)
    Field("violation_seconds.power", "NVML_FI_DEV_CLOCKS_EVENT_REASON_SW_POWER_CAP", 74,
          "nano"),
    Field("violation_seconds.sw_thermal", "NVML_FI_DEV_CLOCKS_EVENT_REASON_SW_THERM_SLOWDOWN",
          269, "nano"),
    Field("violation_seconds.hw_thermal", "NVML_FI_DEV_CLOCKS_EVENT_REASON_HW_THERM_SLOWDOWN",
          270, "nano"),
    Field("violation_seconds.hw_power_brake",
          "NVML_FI_DEV_CLOCKS_EVENT_REASON_HW_POWER_BRAKE_SLOWDOWN", 271, "nano"),
    Field("violation_seconds.sync_boost", "NVML_FI_DEV_CLOCKS_EVENT_REASON_SYNC_BOOST", 76,
          "nano"),
    Field("violation_seconds.board_limit", "NVML_FI_DEV_PERF_POLICY_BOARD_LIMIT", 77, "nano"),
    Field("violation_seconds.low_utilization", "NVML_FI_DEV_PERF_POLICY_LOW_UTILIZATION", 78,
          "nano"),
    Field("violation_seconds.reliability", "NVML_FI_DEV_PERF_POLICY_RELIABILITY", 79, "nano"),
    Field("violation_seconds.total_base_clocks", "NVML_FI_DEV_PERF_POLICY_TOTAL_BASE_CLOCKS",
          81, "nano"),
)


# ------------------------------------------------------------------ the old calls
def as_text(value: Any) -> Optional[str]:
    """NVML's char buffers (bytes in older pynvml) as text; None stays None."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value)


def _pci(v: Any) -> Optional[str]:
    return as_text(v.busId)


def _violation(v: Any) -> float:
    return v.violationTime / 1e9


LEGACY_CONVERT: Dict[str, Callable[[Any], Any]] = dict(CONVERT)
LEGACY_CONVERT.update({
    "text": as_text,
    "pci": _pci,
    "first_milli": lambda v: v[0] / 1000.0,
    "second_milli": lambda v: v[1] / 1000.0,
    "first_bool": lambda v: v[0] == 1,
    "count": len,
    "gpu_util": lambda v: float(v.gpu),
    "reasons": reasons_from_mask,
    "violation": _violation,
    "row0": lambda v: int(v[0]),
    "row1": lambda v: int(v[1]),
    "row2": lambda v: bool(v[2]),
    "row3": lambda v: bool(v[3]),
})


class Legacy(NamedTuple):
    reading: str
    function: str               # pynvml function (called with the handle, then args)
    args: Tuple[int, ...]
    convert: str                # key of LEGACY_CONVERT
    static: bool = False


NVML_CLOCK_SM = 1
NVML_TEMPERATURE_GPU = 0
NVML_TEMPERATURE_THRESHOLD_SHUTDOWN = 0
NVML_TEMPERATURE_THRESHOLD_SLOWDOWN = 1

LEGACY: Tuple[Legacy, ...] = (
    # identity and limits: static
    Legacy("uuid", "nvmlDeviceGetUUID", (), "text", True),
    Legacy("name", "nvmlDeviceGetName", (), "text", True),
    Legacy("pci_bus_id", "nvmlDeviceGetPciInfo", (), "pci", True),
    Legacy("temp_slowdown_celsius", "nvmlDeviceGetTemperatureThreshold",
           (NVML_TEMPERATURE_THRESHOLD_SLOWDOWN,), "float", True),
    Legacy("temp_shutdown_celsius", "nvmlDeviceGetTemperatureThreshold",
           (NVML_TEMPERATURE_THRESHOLD_SHUTDOWN,), "float", True),
    Legacy("power_limit_min_watts", "nvmlDeviceGetPowerManagementLimitConstraints", (),
           "first_milli", True),
    Legacy("power_limit_max_watts", "nvmlDeviceGetPowerManagementLimitConstraints", (),
           "second_milli", True),
    Legacy("power_limit_default_watts", "nvmlDeviceGetPowerManagementDefaultLimit", (),
           "milli", True),
    Legacy("sm_clock_max_mhz", "nvmlDeviceGetMaxClockInfo", (NVML_CLOCK_SM,), "float", True),
    Legacy("supported_reasons", "nvmlDeviceGetSupportedClocksEventReasons", (), "reasons",
           True),
    Legacy("supported_reasons", "nvmlDeviceGetSupportedClocksThrottleReasons", (), "reasons",
           True),
    Legacy("pcie_link_gen_max", "nvmlDeviceGetMaxPcieLinkGeneration", (), "int", True),
    Legacy("pcie_link_width_max", "nvmlDeviceGetMaxPcieLinkWidth", (), "int", True),
    # every cycle
    Legacy("temperature_celsius", "nvmlDeviceGetTemperature", (NVML_TEMPERATURE_GPU,),
           "float"),
    Legacy("power_draw_watts", "nvmlDeviceGetPowerUsage", (), "milli"),
    Legacy("power_limit_watts", "nvmlDeviceGetEnforcedPowerLimit", (), "milli"),
    Legacy("power_limit_watts", "nvmlDeviceGetPowerManagementLimit", (), "milli"),
    Legacy("persistence_mode", "nvmlDeviceGetPersistenceMode", (), "bool"),
    Legacy("sm_clock_mhz", "nvmlDeviceGetClockInfo", (NVML_CLOCK_SM,), "float"),
    Legacy("app_sm_clock_mhz", "nvmlDeviceGetApplicationsClock", (NVML_CLOCK_SM,), "float"),
    Legacy("utilization_percent", "nvmlDeviceGetUtilizationRates", (), "gpu_util"),
    Legacy("clock_event_reasons", "nvmlDeviceGetCurrentClocksEventReasons", (), "reasons"),
    Legacy("clock_event_reasons", "nvmlDeviceGetCurrentClocksThrottleReasons", (), "reasons"),
    Legacy("ecc_mode", "nvmlDeviceGetEccMode", (), "first_bool"),
    Legacy("ecc_volatile_corrected", "nvmlDeviceGetTotalEccErrors", (0, 0), "int"),
    Legacy("ecc_volatile_uncorrected", "nvmlDeviceGetTotalEccErrors", (1, 0), "int"),
    Legacy("ecc_aggregate_corrected", "nvmlDeviceGetTotalEccErrors", (0, 1), "int"),
    Legacy("ecc_aggregate_uncorrected", "nvmlDeviceGetTotalEccErrors", (1, 1), "int"),
    Legacy("retired_pages_sbe", "nvmlDeviceGetRetiredPages", (0,), "count"),
    Legacy("retired_pages_dbe", "nvmlDeviceGetRetiredPages", (1,), "count"),
    Legacy("retired_pages_pending", "nvmlDeviceGetRetiredPagesPendingStatus", (), "bool"),
    Legacy("remapped_rows_correctable", "nvmlDeviceGetRemappedRows", (), "row0"),
    Legacy("remapped_rows_uncorrectable", "nvmlDeviceGetRemappedRows", (), "row1"),
    Legacy("remapped_rows_pending", "nvmlDeviceGetRemappedRows", (), "row2"),
    Legacy("remapped_rows_failure", "nvmlDeviceGetRemappedRows", (), "row3"),
    Legacy("pcie_link_gen", "nvmlDeviceGetCurrPcieLinkGeneration", (), "int"),
    Legacy("pcie_link_width", "nvmlDeviceGetCurrPcieLinkWidth", (), "int"),
    Legacy("pcie_replay_count", "nvmlDeviceGetPcieReplayCounter", (), "int"),
    Legacy("energy_joules", "nvmlDeviceGetTotalEnergyConsumption", (), "milli"),
) + tuple(
    # deprecated in NVML 13.0, removed in CUDA 14: only where the field value is missing
    Legacy(VIOLATION_PREFIX + key, "nvmlDeviceGetViolationStatus", (policy,), "violation")
    for key, policy in VIOLATION_POLICIES if policy is not None)

# Readings a legacy row need not read when one of these readings is present (a coarser old
# counter beside the finer new ones would count the same throttled time twice).
SKIP_IF_PRESENT: Dict[str, Tuple[str, ...]] = {
    VIOLATION_PREFIX + old: tuple(VIOLATION_PREFIX + k for k in new)
    for old, new in VIOLATION_REPLACED_BY.items()}

# Every reading a device read produces (violation counters are folded into one mapping).
READINGS: Tuple[str, ...] = tuple(dict.fromkeys(
    [r.reading for r in LEGACY if not r.reading.startswith(VIOLATION_PREFIX)]
    + [f.reading for f in FIELDS if not f.reading.startswith(VIOLATION_PREFIX)]
    + ["violation_seconds"]))
STATIC_READINGS = frozenset([r.reading for r in LEGACY if r.static]
                            + [f.reading for f in FIELDS if f.static])
IDENTITY = ("uuid", "name", "pci_bus_id")
# Readings that change only when someone sets them (nvidia-smi -pm, -ac; our own tuners): read
# every SLOW_SECONDS, at once after a setter of this daemon ran on the GPU (the gateway's
# ``call`` for an nvmlDeviceSet*/Reset* function) and after a GPU reset; between, the last value.
# Not the PCIe link: an idle GPU lowers its link generation, and the link rule judges a busy one.
SLOW_READINGS = frozenset({"persistence_mode", "app_sm_clock_mhz"})
SLOW_SECONDS = 30.0

# nvmlValueType_t -> member of the nvmlValue_t union (nvml.h)
VALUE_MEMBERS = ("dVal", "uiVal", "ulVal", "ullVal", "sllVal", "siVal", "usVal")


def field_value(fv: Any) -> Optional[float]:
    """The number in an nvmlFieldValue_t (valid only when its nvmlReturn is SUCCESS)."""
    vt = fv.valueType
    member = VALUE_MEMBERS[vt] if 0 <= vt < len(VALUE_MEMBERS) else None
    value = getattr(fv.value, member, None) if member else None
    return None if value is None else value


# ------------------------------------------------------------------ the call itself
# nvmlValueType_t -> struct format of that member of nvmlValue_t (native sizes: "L" is the C
# unsigned long)
_VALUE_FORMATS = (struct.Struct("@d"), struct.Struct("@I"), struct.Struct("@L"),
                  struct.Struct("@Q"), struct.Struct("@q"), struct.Struct("@i"),
                  struct.Struct("@H"))
_layouts: Dict[Any, Optional[Tuple[int, int, int, int]]] = {}


def _layout(cls: Any) -> Optional[Tuple[int, int, int, int]]:
    """(size, offset of valueType, of nvmlReturn, of value) of pynvml's nvmlFieldValue_t,
    or None when it does not look like nvml.h's (then the slow, attribute path is used)."""
    if cls not in _layouts:
        got = None
        try:
            names = [f[0] for f in cls._fields_]
            if names == ["fieldId", "scopeId", "timestamp", "latencyUsec", "valueType",
                         "nvmlReturn", "value"] and \
                    cls.valueType.size == 4 and cls.nvmlReturn.size == 4 and \
                    cls.value.size == 8 and cls.fieldId.offset == 0:
                got = (ctypes.sizeof(cls), cls.valueType.offset, cls.nvmlReturn.offset,
                       cls.value.offset)
        except Exception:  # noqa: BLE001 - any surprise: the slow path
            got = None
        _layouts[cls] = got
    return _layouts[cls]


class _Request:
    """A prepared nvmlDeviceGetFieldValues request: the array with the field ids filled in,
    copied fresh for every call (NVML writes into it)."""

    __slots__ = ("ids", "array_type", "template", "count")

    def __init__(self, cls: Any, ids: Tuple[int, ...]):
        self.ids = ids
        self.count = ctypes.c_int(len(ids))
        self.array_type = cls * len(ids)
        arr = self.array_type()
        for i, fid in enumerate(ids):
            arr[i].fieldId = fid
        self.template = bytes(memoryview(arr).cast("B"))


_requests: Dict[Tuple[Any, Tuple[int, ...]], _Request] = {}


def get_field_values(nv: Any, handle: Any, ids: Tuple[int, ...]) -> List[Tuple[int, Any]]:
    """One nvmlDeviceGetFieldValues call: [(nvmlReturn, value or None)] in the order of ids.
    Raises pynvml's NVMLError when the call itself fails.

    The fast path calls the C function with a prepared array and decodes the returned
    structs with ``struct`` (pynvml's per-attribute structure access and its per-field
    try/except cost more than the call); any pynvml without the pieces it needs gets the
    public ``nvmlDeviceGetFieldValues``."""
    cls = getattr(nv, "c_nvmlFieldValue_t", None)
    lookup = getattr(nv, "_nvmlGetFunctionPointer", None)
    layout = _layout(cls) if cls is not None and lookup is not None else None
    if layout is None:
        return [(fv.nvmlReturn, field_value(fv) if fv.nvmlReturn == 0 else None)
                for fv in nv.nvmlDeviceGetFieldValues(handle, list(ids))]
    req = _requests.get((cls, ids))
    if req is None:
        req = _requests[(cls, ids)] = _Request(cls, ids)
    arr = req.array_type.from_buffer_copy(req.template)
    ret = lookup("nvmlDeviceGetFieldValues")(handle, req.count, ctypes.byref(arr))
    if ret != 0:
        raise nv.NVMLError(ret)
    size, o_type, o_ret, o_val = layout
    data = memoryview(arr).cast("B")
    unpack_ii = _II.unpack_from
    out = []
    base = 0
    for _ in ids:
        vtype, code = unpack_ii(data, base + o_type) if o_ret == o_type + 4 else \
            (_I.unpack_from(data, base + o_type)[0], _I.unpack_from(data, base + o_ret)[0])
        value = None
        if code == 0 and 0 <= vtype < len(_VALUE_FORMATS):
            value = _VALUE_FORMATS[vtype].unpack_from(data, base + o_val)[0]
        out.append((code, value))
        base += size
    return out


_II = struct.Struct("@II")
_I = struct.Struct("@I")


# --------------------------------------------------------------------------- per GPU
@dataclass
class DeviceRead:
    """One GPU's readings: ``values`` holds GpuReading field names (None = not supported);
    ``errors`` holds the non-fatal errors (e.g. no_permission) of single readings."""

    index: int
    values: Dict[str, Any] = field(default_factory=dict)
    errors: Dict[str, NvmlError] = field(default_factory=dict)


class _GpuSession:
    """What one GPU's reads learned in this NVML session: which field ids and functions are
    not supported, whether nvmlDeviceGetFieldValues works, the static readings."""

    __slots__ = ("fields_ok", "bad_fields", "unsupported", "static", "plans", "counters", "ids",
                 "rows", "gpm", "mig", "slow", "slow_errors", "slow_at")

    def __init__(self) -> None:
        self.gpm = GpmSession()              # GPU Performance Monitoring (gpucostd.hw.gpm)
        self.mig = MigSession()              # Multi-Instance GPU (gpucostd.hw.nvml_mig)
        self.fields_ok = True
        self.bad_fields: set = set()
        self.unsupported: set = set()
        self.static: Optional[Dict[str, Any]] = None
        self.plans: Dict[bool, Tuple[Field, ...]] = {}
        self.counters: Dict[str, float] = {}
        self.ids: Dict[Tuple[Field, ...], Tuple[int, ...]] = {}
        self.rows: Dict[Tuple[bool, Tuple[Field, ...], bool], Tuple[Legacy, ...]] = {}
        self.slow: Dict[str, Any] = {}                 # SLOW_READINGS: the last values
        self.slow_errors: Dict[str, NvmlError] = {}
        self.slow_at = float("-inf")                   # when they are read again (monotonic)

    def legacy_rows(self, with_static: bool, plan: Tuple[Field, ...],
                    with_slow: bool = True) -> Tuple[Legacy, ...]:
        """The old calls that may be needed beside this field plan: those of readings no
        planned field serves (static ones only on a first read, SLOW_READINGS when due)."""
        key = (with_static, plan, with_slow)
        rows = self.rows.get(key)
        if rows is None:
            served = {f.reading for f in plan}
            rows = self.rows[key] = tuple(
                r for r in LEGACY if r.reading not in served and (with_static or not r.static)
                and (with_slow or r.reading not in SLOW_READINGS))
        return rows

    def keep_slow(self, due: bool, now: float, got: Dict[str, Any],
                  errors: Dict[str, NvmlError]) -> None:
        """After a read: remember SLOW_READINGS when they were read (due), else fill them in."""
        if due:
            self.slow = {k: got[k] for k in SLOW_READINGS if k in got}
            self.slow_errors = {k: errors[k] for k in SLOW_READINGS if k in errors}
            self.slow_at = now + SLOW_SECONDS
            return
        for k, v in self.slow.items():
            got.setdefault(k, v)
        for k, e in self.slow_errors.items():
            if k not in got:
                errors.setdefault(k, e)

    def plan_ids(self, plan: Tuple[Field, ...]) -> Tuple[int, ...]:
        ids = self.ids.get(plan)
        if ids is None:
            ids = self.ids[plan] = tuple(f.field_id for f in plan)
        return ids

    def field_plan(self, with_static: bool) -> Tuple[Field, ...]:
        """The fields to ask for: per reading the best alternative not known unsupported."""
        plan = self.plans.get(with_static)
        if plan is None:
            chosen: Dict[str, Field] = {}
            for f in FIELDS:
                if f.field_id in self.bad_fields or f.reading in chosen:
                    continue
                if f.static and not with_static:
                    continue
                chosen[f.reading] = f
            plan = self.plans[with_static] = tuple(chosen.values())
        return plan

# public names for the modules split from this one's user (they import them under their
# old local names)
GpuSession = _GpuSession
