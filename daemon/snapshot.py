"""The plain data the daemon passes around: readings, snapshots, findings, events, settings.

Pure data, no I/O. Absent readings are ``None`` (never 0): a reading NVML does not support on a
GPU stays ``None`` all the way to /metrics, where it is left out.
"""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple


class Severity(enum.IntEnum):
    """Health levels, ordered so that ``max()`` gives the worst. UNKNOWN sorts above CRIT for
    exit codes (3) but is reported separately: it means "cannot tell", not "worse than CRIT"."""

    OK = 0
    WARN = 1
    CRIT = 2
    UNKNOWN = 3

    @property
    def label(self) -> str:
        return self.name


def worst(severities) -> Severity:
    """Worst of the given severities; CRIT beats UNKNOWN (a known fault is more urgent)."""
    result = Severity.OK
    for s in severities:
        if s == Severity.CRIT or result == Severity.CRIT:
            result = Severity.CRIT
        elif s > result:
            result = s
    return result


# Clock-event (throttle) reasons: NVML bit -> NVML name (nvmlClocksEventReason<Name>).
CLOCK_EVENT_REASONS: Tuple[Tuple[int, str], ...] = (
    (0x001, "GpuIdle"),
    (0x002, "ApplicationsClocksSetting"),
    (0x004, "SwPowerCap"),
    (0x008, "HwSlowdown"),
    (0x010, "SyncBoost"),
    (0x020, "SwThermalSlowdown"),
    (0x040, "HwThermalSlowdown"),
    (0x080, "HwPowerBrakeSlowdown"),
    (0x100, "DisplayClockSetting"),
    (0x200, "BoardLimit"),
    (0x400, "Reliability"),
)
REASON_BITS: Dict[str, int] = {name: bit for bit, name in CLOCK_EVENT_REASONS}
# Reasons that take throughput away from a busy GPU (the cost model's "throttling" reasons).
THROTTLE_REASONS: Tuple[str, ...] = (
    "SwPowerCap", "HwSlowdown", "SyncBoost", "SwThermalSlowdown", "HwThermalSlowdown",
    "HwPowerBrakeSlowdown", "BoardLimit", "Reliability",
)
# Reasons that mean the hardware is protecting itself (health WARN while active).
HW_SLOWDOWN_REASONS: Tuple[str, ...] = ("HwSlowdown", "HwThermalSlowdown", "HwPowerBrakeSlowdown")


def reasons_from_mask(mask: int) -> Tuple[str, ...]:
    return tuple(name for bit, name in CLOCK_EVENT_REASONS if mask & bit)


def mask_from_reasons(names) -> int:
    mask = 0
    for name in names:
        mask |= REASON_BITS[name]
    return mask


# Throttle-duration (violation-time) counters, seconds since the driver loaded or the GPU was
# reset. NVML 13 reads them as field values (NVML_FI_DEV_CLOCKS_EVENT_REASON_* and
# NVML_FI_DEV_PERF_POLICY_*, see gpucostd/hw/nvml_fields.py) and deprecates the old
# nvmlDeviceGetViolationStatus(policy). key -> the NVML_PERF_POLICY_* of that old call for the
# same counter, or None where only field values have it. "thermal" exists only through the old
# call: it is reported only when neither sw_thermal nor hw_thermal is (never beside them).
VIOLATION_POLICIES: Tuple[Tuple[str, Optional[int]], ...] = (
    ("power", 0),               # SW power cap (the same counter as field 74)
    ("thermal", 1),             # old call only: SW and HW thermal together
    ("sync_boost", 2),
    ("board_limit", 3),
    ("low_utilization", 4),
    ("reliability", 5),
    ("total_base_clocks", 11),  # held below base clocks by any limiter
    ("sw_thermal", None),
    ("hw_thermal", None),
    ("hw_power_brake", None),
)
# Which clock-event reasons each counter measures (the cost model; the simulator runs a counter
# while any of its reasons is active). HwSlowdown (the generic HW slowdown bit, set with the
# thermal and power-brake ones) counts as thermal, as it did before the finer counters.
VIOLATION_REASONS: Dict[str, Tuple[str, ...]] = {
    "power": ("SwPowerCap",),
    "thermal": ("SwThermalSlowdown", "HwThermalSlowdown", "HwSlowdown"),
    "sync_boost": ("SyncBoost",),
    "board_limit": ("BoardLimit",),
    "low_utilization": (),
    "reliability": ("Reliability",),
    "total_base_clocks": (),
    "sw_thermal": ("SwThermalSlowdown",),
    "hw_thermal": ("HwThermalSlowdown", "HwSlowdown"),
    "hw_power_brake": ("HwPowerBrakeSlowdown",),
}
# A counter that only the old call has, and the finer counters that replace it.
VIOLATION_REPLACED_BY: Dict[str, Tuple[str, ...]] = {"thermal": ("sw_thermal", "hw_thermal")}


class GpuState(str, enum.Enum):
    OK = "ok"                      # answered every call in time
    UNRESPONSIVE = "unresponsive"  # a call overran its deadline (still stuck)
    LOST = "lost"                  # NVML said GPU_IS_LOST, or it fell off the bus
    UNKNOWN = "unknown"            # NVML not available (driver not loaded, library missing)


@dataclass(frozen=True)
class GpuActivity:
    """What a GPU's units did between two GPU Performance Monitoring samples (NVML GPM,
    nvmlGpmMetricsGet; Hopper and later), as ratios 0..1. GPU-Util says that *a* kernel ran;
    these say how much of the GPU worked. None: NVML did not give that metric."""

    sm: Optional[float] = None              # NVML_GPM_METRIC_SM_UTIL: share of SMs busy
    sm_occupancy: Optional[float] = None    # NVML_GPM_METRIC_SM_OCCUPANCY: warps resident/max
    tensor: Optional[float] = None          # NVML_GPM_METRIC_ANY_TENSOR_UTIL (FP8 included)
    tensor_hmma: Optional[float] = None     # NVML_GPM_METRIC_HMMA_TENSOR_UTIL (FP16/BF16)
    tensor_imma: Optional[float] = None     # NVML_GPM_METRIC_IMMA_TENSOR_UTIL (INT8)
    dram: Optional[float] = None            # NVML_GPM_METRIC_DRAM_BW_UTIL: bandwidth used/max
    fp16: Optional[float] = None            # NVML_GPM_METRIC_FP16_UTIL (non-tensor)
    fp32: Optional[float] = None            # NVML_GPM_METRIC_FP32_UTIL (non-tensor)
    seconds: Optional[float] = None         # the time between the two samples


ACTIVITY_FIELDS: Tuple[str, ...] = ("sm", "sm_occupancy", "tensor", "tensor_hmma", "tensor_imma",
                                    "dram", "fp16", "fp32")


@dataclass(frozen=True)
class MigInstance:
    """One MIG compute instance as read in one cycle (NVML: nvmlDeviceGetMigDeviceHandleByIndex,
    nvmlGpuInstanceGetInfo, nvmlComputeInstanceGetInfo). Power, clocks and temperatures are the
    parent GPU's, shared by all its instances: they are not repeated here.

    The contract between the MIG readers (simulator, NVML gateway) and the parts that judge and
    price instances: health, cost, status and metrics key an instance by `key`."""

    gpu_index: int                          # the parent GPU's index
    gi_id: int                              # GPU instance id (nvmlGpuInstanceInfo_t.id)
    ci_id: int                              # compute instance id (nvmlComputeInstanceInfo_t.id)
    profile: str                            # "1g.10gb", "3g.40gb", "7g.80gb", "1g.18gb" ...
    slices: int                             # compute slices of the profile (the "1" of 1g)
    gpu_slices: int = 7                     # compute slices on the parent (7 on A100/H100/H200)
    uuid: Optional[str] = None              # "MIG-<uuid>"
    memory_used_bytes: Optional[int] = None
    memory_total_bytes: Optional[int] = None
    # per-instance GPU Performance Monitoring (nvmlGpmMigSampleGet, Hopper and later); None
    # where the GPU has no GPM or before the second sample
    activity: Optional[GpuActivity] = None

    @property
    def key(self) -> str:
        """'0/1/0': GPU index / GPU instance / compute instance (the id in views and state)."""
        return f"{self.gpu_index}/{self.gi_id}/{self.ci_id}"

    @property
    def share(self) -> float:
        """The instance's share of its GPU: compute slices over the GPU's (1g of 7 = 1/7)."""
        return self.slices / self.gpu_slices if self.gpu_slices > 0 else 0.0


@dataclass(frozen=True)
class GpuReading:
    """One GPU as read in one cycle. Every measured field is Optional: None = not supported or
    not read (never 0)."""

    index: int
    state: GpuState = GpuState.OK
    error: Optional[str] = None            # why state is not OK, in words
    uuid: Optional[str] = None
    name: Optional[str] = None             # "NVIDIA H100 80GB HBM3"
    pci_bus_id: Optional[str] = None       # "00000000:1B:00.0" as NVML gives it
    # temperatures
    temperature_celsius: Optional[float] = None
    memory_temperature_celsius: Optional[float] = None
    temp_slowdown_celsius: Optional[float] = None
    temp_shutdown_celsius: Optional[float] = None
    # power
    power_draw_watts: Optional[float] = None
    power_limit_watts: Optional[float] = None
    power_limit_min_watts: Optional[float] = None
    power_limit_max_watts: Optional[float] = None
    power_limit_default_watts: Optional[float] = None
    energy_joules: Optional[float] = None      # energy counter since the driver loaded
    persistence_mode: Optional[bool] = None
    # clocks and load
    sm_clock_mhz: Optional[float] = None
    sm_clock_max_mhz: Optional[float] = None
    app_sm_clock_mhz: Optional[float] = None   # application clock when one is set
    utilization_percent: Optional[float] = None
    clock_event_reasons: Optional[Tuple[str, ...]] = None  # names, see CLOCK_EVENT_REASONS
    supported_reasons: Optional[Tuple[str, ...]] = None
    # violation-time counters in seconds, by key of VIOLATION_POLICIES; missing key = unsupported
    violation_seconds: Optional[Mapping[str, float]] = None
    # ECC
    ecc_mode: Optional[bool] = None
    ecc_volatile_corrected: Optional[int] = None
    ecc_volatile_uncorrected: Optional[int] = None
    ecc_aggregate_corrected: Optional[int] = None
    ecc_aggregate_uncorrected: Optional[int] = None
    retired_pages_sbe: Optional[int] = None
    retired_pages_dbe: Optional[int] = None
    retired_pages_pending: Optional[bool] = None
    remapped_rows_correctable: Optional[int] = None
    remapped_rows_uncorrectable: Optional[int] = None
    remapped_rows_pending: Optional[bool] = None
    remapped_rows_failure: Optional[bool] = None
    # PCIe
    pcie_link_gen: Optional[int] = None
    pcie_link_gen_max: Optional[int] = None
    pcie_link_width: Optional[int] = None
    pcie_link_width_max: Optional[int] = None
    pcie_replay_count: Optional[int] = None
    # NVML_FI_DEV_GET_GPU_RECOVERY_ACTION: what the driver says the GPU needs (0 none, 1 GPU
    # reset, 2 node reboot, 3 drain P2P, 4 drain and reset; gpucostd.health.recovery)
    gpu_recovery_action: Optional[int] = None
    # GPU Performance Monitoring: True/False whether the GPU has it (None: not asked yet);
    # activity None where it has not (or on the first cycle, before a second sample)
    gpm_supported: Optional[bool] = None
    activity: Optional[GpuActivity] = None
    # MIG: mode now and after the next GPU reset (None: not supported or not read), and the
    # instances when MIG is on (empty when it is off)
    mig_mode: Optional[bool] = None
    mig_mode_pending: Optional[bool] = None
    mig: Tuple[MigInstance, ...] = ()

    def replace(self, **changes) -> "GpuReading":
        return dataclasses.replace(self, **changes)

    @property
    def model_short(self) -> str:
        """'NVIDIA H100 80GB HBM3' -> 'H100 80GB HBM3' (for 100-column views)."""
        name = self.name or "?"
        return name[len("NVIDIA "):] if name.startswith("NVIDIA ") else name


@dataclass(frozen=True)
class Finding:
    """One health judgement about a subject ("gpu:3", "node", "setting:...")."""

    subject: str
    code: str              # stable identifier, e.g. "hw_thermal_slowdown", "xid_79"
    severity: Severity
    action: str            # recommended action in words ("none", "reset GPU", "RMA", ...)
    message: str           # what, in words
    since: Optional[float] = None   # wall time the condition was first seen
    gpu: Optional[int] = None


@dataclass(frozen=True)
class Event:
    """Something that happened at a time. Stored, journaled, counted; never lost."""

    time: float
    subject: str           # "gpu:3", "node", "setting:power_limit:gpu:0", ...
    code: str              # event type: "xid", "health_change", "drift", "ack", ...
    severity: Severity
    action: str
    message: str
    gpu: Optional[int] = None
    uuid: Optional[str] = None
    xid: Optional[int] = None
    fields: Mapping[str, Any] = field(default_factory=dict)   # extra structured fields
    id: Optional[int] = None   # assigned by the event store


@dataclass(frozen=True)
class Setting:
    """One tunable setting on one subject, as planned or verified."""

    subject: str           # "gpu:0", "nic:eth0"
    name: str              # "power_limit_watts", "persistence_mode", "ring_rx", ...
    desired: Any
    actual: Any
    source: str            # where the desired value came from ("tuning.gpu", "override index:3")
    error: Optional[str] = None   # why it cannot be applied, in words

    @property
    def in_sync(self) -> bool:
        return self.error is None and self.desired == self.actual


@dataclass(frozen=True)
class CheckResult:
    """One host prerequisite check."""

    name: str              # "kernel", "driver", "cuda", "iommu", ...
    status: str            # "pass" | "warn" | "fail"
    message: str
    fix: str = ""


@dataclass(frozen=True)
class DaemonInfo:
    """The process behind a snapshot (status's "daemon" block)."""

    version: str = ""
    pid: int = 0
    config_path: Optional[str] = None
    simulated: Optional[str] = None       # the scenario of `run --simulate`


@dataclass(frozen=True)
class KernelLogStatus:
    """The kernel-log part: the source read, why it cannot be read, records lost to a flood."""

    source: str = "none"
    error: Optional[str] = None
    lines_lost: int = 0
    last_loss_time: Optional[float] = None     # wall time of the last loss


@dataclass(frozen=True)
class StateDirStatus:
    """The state-directory part: why it cannot take writes (None: usable), since when, and the
    events held in memory meanwhile."""

    problem: Optional[str] = None
    since: Optional[float] = None
    events_pending: int = 0

    @property
    def usable(self) -> bool:
        return self.problem is None


@dataclass(frozen=True)
class NodeSnapshot:
    """Everything known about the node after one poll cycle. Immutable; views render from it."""

    time: float                                  # wall clock (epoch seconds)
    monotonic: float
    cycle: int
    hostname: str
    started_at: float                            # daemon start (wall)
    nvml_available: bool
    nvml_error: Optional[str]
    driver_version: Optional[str]
    cuda_version: Optional[str]
    gpus: Tuple[GpuReading, ...]
    gpu_health: Mapping[int, Severity] = field(default_factory=dict)
    node_health: Severity = Severity.UNKNOWN
    findings: Tuple[Finding, ...] = ()
    recent_events: Tuple[Event, ...] = ()
    settings: Tuple[Setting, ...] = ()
    checks: Tuple[CheckResult, ...] = ()
    cost: Optional[Any] = None                   # gpucostd.cost.report.CostReport
    counters: Mapping[str, Any] = field(default_factory=dict)  # monotone totals for /metrics
    started_monotonic: Optional[float] = None    # daemon start (monotonic): uptime
    daemon: DaemonInfo = DaemonInfo()
    kernel_log: KernelLogStatus = KernelLogStatus()
    state_dir: StateDirStatus = StateDirStatus()
    host: Optional[Any] = None                   # gpucostd.probes.host.HostFacts
    persistenced: Optional[bool] = None          # nvidia-persistenced running (None: unknown)
    nic_rings: Mapping[str, Any] = field(default_factory=dict)   # {ifname: {current, max}}
    inference: Tuple[Any, ...] = ()              # gpucostd.probes.inference readings
    gpu_inventory: Optional[Mapping[str, Any]] = None   # {expected, missing}
    calibration: Optional[Mapping[str, Any]] = None     # gpucostd.calibration.session
    parts: Tuple[Any, ...] = ()                  # gpucostd.part.PartResult, in run order

    def part(self, name: str) -> Optional[Any]:
        """The named part's result in this cycle (its .data, .ok, .seconds), or None."""
        for r in self.parts:
            if r.name == name:
                return r
        return None

    def gpu(self, index: int) -> Optional[GpuReading]:
        for g in self.gpus:
            if g.index == index:
                return g
        return None


# --------------------------------------------------------------------------- text from outside
_CONTROL = None


def printable(text: Any) -> Any:
    """`text` with control characters (C0, DEL, C1: terminal escape sequences among them, as a
    kernel line may carry) replaced by "?", so they never reach a terminal or a log line.
    Anything that is not a str comes back as it is."""
    global _CONTROL
    if not isinstance(text, str) or text.isprintable():    # (fast: no control characters)
        return text
    if _CONTROL is None:
        import re
        _CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
    return _CONTROL.sub("?", text)


def printable_tree(value: Any, depth: int = 0) -> Any:
    """printable() applied to every string (keys too) of a JSON-like tree; deeper than 32
    levels is cut off (None): a document for people is never that deep."""
    if depth > 32:
        return None
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {printable(k) if isinstance(k, str) else k: printable_tree(v, depth + 1)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [printable_tree(v, depth + 1) for v in value]
    return value


def printable_event(event: "Event") -> "Event":
    """The event with its message and string fields made printable (kernel text inside)."""
    fields = event.fields
    if fields:
        fields = {k: printable(v) for k, v in fields.items()}
    message = printable(event.message)
    if message is event.message and fields == event.fields:
        return event
    return dataclasses.replace(event, message=message, fields=fields)
