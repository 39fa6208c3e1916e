"""Scenario files for the simulated NVML: a node, its GPUs' initial state and a timeline.

The format is documented in docs/scenarios.md. A scenario is pure data: it never touches time
or threads. It answers "what is GPU i like at scenario time t" analytically, so tests compute
ground truth from the same object the simulator is driven by::

    sc = load_scenario("builtin:h100x8")
    sc.gpu_state_at(0, 30.0)["clock_event_reasons"]   # ("HwThermalSlowdown",)
    sc.gpu_state_at(0, 130.0)["violation_seconds"]["thermal"]   # 60.0 (one cycle's [20, 80))
    sc.change_times(0)                                 # [20.0, 80.0] (within one cycle)

With ``repeat_every = R`` the timeline (all ``t`` < R) replays every R seconds; each cycle starts
again from the initial state. Violation-time counters are integrals over absolute time (they keep
growing across cycles) and drop to zero at every ``reset = true`` entry.
"""
from __future__ import annotations

import bisect
import dataclasses
import math
import os
import re
import sys
import uuid as uuidlib
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python < 3.11
    import tomli as tomllib

from gpucostd.config import FileError
from gpucostd.tomllines import TomlLines
from gpucostd.sim import physics as phys
from gpucostd.sim.mig import (MigSpec, check_serving_instances, instance_endpoint_rate,
                              parse_mig)
from gpucostd.sim.scenario_time import ScenarioTimeQueries
from gpucostd.sim.sections import (ScenarioPrices, fmt_value as _fmt, index_list as _indexes,
                                   num_text as _num, parse_physics, parse_prices, parse_serving)
from gpucostd.snapshot import CLOCK_EVENT_REASONS, REASON_BITS, VIOLATION_POLICIES, VIOLATION_REASONS

BUILTIN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scenarios")
MAX_SCENARIO_BYTES = 8 << 20     # the built-in ones are a few KiB; a timeline is not 8 MiB
REASON_NAMES = tuple(name for _bit, name in CLOCK_EVENT_REASONS)
PCI_BUS_ID_RE = re.compile(r"^[0-9A-Fa-f]{8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.[0-7]$")


class ScenarioError(FileError):
    """A scenario that cannot be used. str() names the file, line (when known), key, value and
    what is allowed."""


# --------------------------------------------------------------------------- field schema
@dataclass(frozen=True)
class Field:
    type: str            # "str" "int" "number" "bool" "reasons" "names" "pci" "percent"
    default: Any
    doc: str
    min: Optional[float] = None
    max: Optional[float] = None


def _f(type_, default, doc, **kw) -> Field:
    return Field(type_, default, doc, **kw)


# Per-GPU state. Every key may appear in [gpu_defaults], [[gpu]] and [[at]] (except identity
# keys in [[at]], see TIMELINE_FORBIDDEN).
GPU_FIELDS: Dict[str, Field] = {
    "name": _f("str", None, "Product name as NVML reports it (default: [node] model)."),
    "uuid": _f("str", None, "GPU UUID, 'GPU-...' (default: derived from model, index and "
               "scenario name)."),
    "pci_bus_id": _f("pci", None, "PCI bus id 'DDDDDDDD:BB:DD.F' (default: derived from index)."),
    "temperature": _f("number", 45.0, "GPU temperature, °C.", min=0, max=200),
    "memory_temperature": _f("number", 50.0, "Memory (HBM) temperature, °C.", min=0, max=200),
    "slowdown_temperature": _f("number", 89.0, "HW slowdown threshold, °C.", min=0, max=200),
    "shutdown_temperature": _f("number", 92.0, "Shutdown threshold, °C.", min=0, max=200),
    "power_draw": _f("number", 100.0, "Power draw, W (clamped to the current limit).", min=0,
                     max=10000),
    "power_limit": _f("number", 700.0, "Current enforced power limit, W.", min=1, max=10000),
    "power_limit_min": _f("number", 200.0, "Lowest settable power limit, W.", min=1, max=10000),
    "power_limit_max": _f("number", 700.0, "Highest settable power limit, W.", min=1, max=10000),
    "power_limit_default": _f("number", 700.0, "Default power limit, W.", min=1, max=10000),
    "persistence_mode": _f("bool", True, "Persistence mode enabled."),
    "sm_clock": _f("int", 1980, "Current SM clock, MHz.", min=0, max=100000),
    "max_sm_clock": _f("int", 1980, "Max SM clock, MHz.", min=1, max=100000),
    "app_sm_clock": _f("int", 1755, "Application SM clock, MHz.", min=0, max=100000),
    "utilization": _f("percent", 0.0, "GPU utilization, percent.", min=0, max=100),
    "memory_utilization": _f("percent", 0.0, "Memory controller utilization, percent.", min=0,
                             max=100),
    "clock_event_reasons": _f("reasons", (), "Active clock-event reasons by NVML name."),
    "supported_clock_event_reasons": _f("reasons", REASON_NAMES,
                                        "Reasons the GPU can report (default: all)."),
    "violation_counters": _f("bool", True,
                             "Violation-time counters supported (false: NOT_SUPPORTED)."),
    "ecc_mode": _f("bool", True, "ECC enabled."),
    "ecc_volatile_corrected": _f("int", 0, "Volatile corrected ECC errors.", min=0),
    "ecc_volatile_uncorrected": _f("int", 0, "Volatile uncorrected ECC errors.", min=0),
    "ecc_aggregate_corrected": _f("int", 0, "Aggregate corrected ECC errors.", min=0),
    "ecc_aggregate_uncorrected": _f("int", 0, "Aggregate uncorrected ECC errors.", min=0),
    "retired_pages_sbe": _f("int", 0, "Pages retired for multiple single-bit errors.", min=0),
    "retired_pages_dbe": _f("int", 0, "Pages retired for double-bit errors.", min=0),
    "retired_pages_pending": _f("bool", False, "Page retirement pending (needs reset)."),
    "remapped_rows_correctable": _f("int", 0, "Rows remapped for correctable errors.", min=0),
    "remapped_rows_uncorrectable": _f("int", 0, "Rows remapped for uncorrectable errors.",
                                      min=0),
    "remapped_rows_pending": _f("bool", False, "Row remapping pending (needs reset)."),
    "remapped_rows_failure": _f("bool", False, "Row remapping failed."),
    "pcie_link_gen": _f("int", 5, "Current PCIe link generation.", min=0, max=16),
    "pcie_link_gen_max": _f("int", 5, "Max PCIe link generation.", min=0, max=16),
    "pcie_link_width": _f("int", 16, "Current PCIe link width.", min=0, max=64),
    "pcie_link_width_max": _f("int", 16, "Max PCIe link width.", min=0, max=64),
    "pcie_replay_count": _f("int", 0, "PCIe replay counter.", min=0),
    "setters_permitted": _f("bool", True, "Setters succeed (false: NO_PERMISSION)."),
    "unsupported": _f("names", (), "Fields whose NVML calls return NOT_SUPPORTED."),
    "lost": _f("bool", False, "Every call on this GPU returns GPU_IS_LOST."),
    "recovery_action": _f("int", 0, "NVML's GPU recovery action (field 230): 0 none, 1 GPU "
                          "reset, 2 node reboot, 3 drain P2P, 4 drain and reset, 5-7 newer.",
                          min=0, max=255),
    "present": _f("bool", True, "Listed by NVML; false: left out of nvmlDeviceGetCount (the "
                  "GPUs after it move up an index) from the next nvmlInit on, with no Xid."),
    "decode_share": _f("number", 0.0, "Share of the busy time spent in memory-bound decode at "
                       "the max clock, 0..1; the rest is compute-bound prefill ([physics]).",
                       min=0, max=1),
    "mig_mode": _f("bool", False, "MIG mode now (nvmlDeviceGetMigMode current; a GPU with "
                   "[[mig]] instances: true unless set)."),
    "mig_mode_pending": _f("bool", None, "MIG mode after the next GPU reset (default: "
                           "mig_mode)."),
    "total_energy": _f("number", 0.0, "Energy counter at t = 0, J "
                       "(nvmlDeviceGetTotalEnergyConsumption counts up from here; NVML's "
                       "counter is an unsigned 64-bit count of mJ).", min=0, max=1.8e16),
}
IDENTITY_FIELDS = ("name", "uuid", "pci_bus_id")
TIMELINE_FORBIDDEN = IDENTITY_FIELDS
# Names accepted in `unsupported`: any measured field, plus groups.
UNSUPPORTED_GROUPS: Dict[str, Tuple[str, ...]] = {
    "ecc": ("ecc_mode", "ecc_volatile_corrected", "ecc_volatile_uncorrected",
            "ecc_aggregate_corrected", "ecc_aggregate_uncorrected"),
    "retired_pages": ("retired_pages_sbe", "retired_pages_dbe", "retired_pages_pending"),
    "remapped_rows": ("remapped_rows_correctable", "remapped_rows_uncorrectable",
                      "remapped_rows_pending", "remapped_rows_failure"),
    "power_limit_constraints": ("power_limit_min", "power_limit_max"),
    "clock_event_reasons": ("clock_event_reasons", "supported_clock_event_reasons"),
    "pcie": ("pcie_link_gen", "pcie_link_gen_max", "pcie_link_width", "pcie_link_width_max",
             "pcie_replay_count"),
    "utilization": ("utilization", "memory_utilization"),
    # nvmlDeviceGetFieldValues itself answers NOT_SUPPORTED (the old calls must serve)
    "field_values": (),
    # the clock-event duration fields (SW/HW thermal, HW power brake) of newer drivers
    "clock_event_durations": (),
    # GPU Performance Monitoring (nvmlGpm*): Hopper and later; an older GPU's name (A100,
    # L40S, ...) makes it NOT_SUPPORTED without this (gpucostd.sim.gpm)
    "gpm": (),
    # locked SM clocks and the supported-clocks lists (pre-Volta GPUs, some vGPUs):
    # gpucostd.sim.clocks
    "locked_clocks": ("supported_clocks",),
    # Multi-Instance GPU: every MIG call (gpucostd.sim.mig)
    "mig": (),
}
_NOT_UNSUPPORTABLE = set(IDENTITY_FIELDS) | {"setters_permitted", "unsupported", "lost", "present",
                                            "violation_counters", "decode_share", "mig_mode",
                                            "mig_mode_pending"}
UNSUPPORTABLE = tuple(sorted((set(GPU_FIELDS) - _NOT_UNSUPPORTABLE) | set(UNSUPPORTED_GROUPS)))

NODE_FIELDS: Dict[str, Field] = {
    "model": _f("str", "NVIDIA H100 80GB HBM3", "Default product name of every GPU."),
    "gpu_count": _f("int", None, "Number of GPUs (required).", min=0, max=64),
    "driver_version": _f("str", "550.90.07", "Driver version string."),
    "cuda_version": _f("str", "12.4", "CUDA driver version 'MAJOR.MINOR'."),
    "duration": _f("number", None, "Length of the scenario in seconds (informational; "
                   "replay runs this long).", min=0),
    "repeat_every": _f("number", None, "Cycle period: the timeline replays every N seconds.",
                       min=0.001),
    "driver_loaded": _f("bool", True, "false: nvmlInit fails with DRIVER_NOT_LOADED."),
    "set_seconds": _f("number", None, "Real seconds every setter call takes (a test knob: a "
                      "kill can then land inside an apply).", min=0.001, max=10),
}
TIMELINE_EXTRA: Dict[str, Field] = {
    "t": _f("number", None, "Seconds from scenario start (within one cycle when repeating).",
            min=0),
    "gpu": _f("int", None, "GPU index this entry changes (omit for node-only entries).", min=0),
    "kernel_log": _f("str", None, "A raw kernel log line emitted at t."),
    "hang_seconds": _f("number", None, "Calls on this GPU block until t + N.", min=0.001),
    "reset": _f("bool", None, "GPU reset: violation counters and volatile ECC drop to zero, "
                "pending remaps/retirements clear."),
    "driver_loaded": NODE_FIELDS["driver_loaded"],
}


@dataclass(frozen=True)
class NodeInfo:
    model: str
    gpu_count: int
    driver_version: str
    cuda_version: str
    duration: Optional[float] = None
    repeat_every: Optional[float] = None
    driver_loaded: bool = True
    set_seconds: Optional[float] = None

    # aliases some callers may prefer
    @property
    def driver(self) -> str:
        return self.driver_version

    @property
    def cuda(self) -> str:
        return self.cuda_version


@dataclass(frozen=True)
class TimelineEntry:
    t: float
    gpu: Optional[int]
    changes: Mapping[str, Any]
    kernel_log: Optional[str] = None
    hang_seconds: Optional[float] = None
    reset: bool = False
    driver_loaded: Optional[bool] = None
    line: Optional[int] = None


# --------------------------------------------------------------------------- validation
def _type_ok(field: Field, value: Any) -> bool:
    t = field.type
    if t == "str" or t == "pci":
        return isinstance(value, str)
    if t == "bool":
        return isinstance(value, bool)
    if t == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if t in ("number", "percent"):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if t in ("reasons", "names"):
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return False


_TYPE_WORDS = {"str": "a string", "pci": "a PCI bus id string like \"00000000:18:00.0\"",
               "bool": "true or false", "int": "an integer", "number": "a number",
               "percent": "a number 0..100", "reasons": "a list of clock-event reason names",
               "names": "a list of field names"}


class _Validator:
    def __init__(self, path: str, text: str):
        self.path = path
        self.loc = TomlLines(text)

    def fail(self, message: str, table: str, key: Optional[str] = None, array: bool = False,
             occurrence: int = 0):
        line = self.loc.line(table, key, occurrence, array) or \
            self.loc.line(table, None, occurrence, array)
        raise ScenarioError(message, self.path, line, key)

    def value(self, where: str, table: str, key: str, field: Field, value: Any,
              array: bool = False, occurrence: int = 0) -> Any:
        raw = value

        def bad(why: str):
            self.fail(f"{where}.{key} = {_fmt(raw)}: {why}", table, key, array, occurrence)

        if not _type_ok(field, value):
            bad(f"wrong type; expected {_TYPE_WORDS[field.type]}")
        if field.type in ("number", "percent"):
            value = float(value)
            if not math.isfinite(value):
                bad("must be a finite number")
        if field.type in ("int", "number", "percent"):
            lo, hi = field.min, field.max
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                rng = (f"{_num(lo) if lo is not None else '-inf'}.."
                       f"{_num(hi) if hi is not None else 'inf'}")
                bad(f"out of range; allowed {rng}")
        if field.type == "pci" and not PCI_BUS_ID_RE.match(value):
            bad('not a PCI bus id; expected "DDDDDDDD:BB:DD.F", e.g. "00000000:18:00.0"')
        if field.type == "reasons":
            for name in value:
                if name not in REASON_BITS:
                    bad(f"unknown clock-event reason {name!r}; allowed: "
                        + ", ".join(REASON_NAMES))
            value = tuple(name for name in REASON_NAMES if name in value)
        if field.type == "names":
            for name in value:
                if name not in UNSUPPORTABLE:
                    bad(f"unknown field {name!r}; allowed: " + ", ".join(UNSUPPORTABLE))
            value = tuple(value)
        if key == "uuid" and not value.startswith("GPU-"):
            bad('a GPU UUID starts with "GPU-"')
        return value

    def table(self, where: str, table: str, data: Any, fields: Mapping[str, Field],
              array: bool = False, occurrence: int = 0) -> Dict[str, Any]:
        if not isinstance(data, dict):
            self.fail(f"{where} must be a table", table, None, array, occurrence)
        out: Dict[str, Any] = {}
        for key, value in data.items():
            if key not in fields:
                self.fail(f"{where}.{key}: unknown key; allowed keys: "
                          + ", ".join(sorted(fields)), table, key, array, occurrence)
            out[key] = self.value(where, table, key, fields[key], value, array, occurrence)
        return out


# --------------------------------------------------------------------------- the scenario
class Scenario(ScenarioTimeQueries):
    """A validated scenario. Build with load_scenario() or parse_scenario()."""

    # per GPU, its MIG instances ([[mig]], gpucostd.sim.mig); () on a GPU without
    mig: Tuple[Tuple[MigSpec, ...], ...] = ()

    def __init__(self, name: str, path: str, node: NodeInfo, gpus: Sequence[Dict[str, Any]],
                 timeline: Sequence[TimelineEntry], physics: Optional[phys.PowerModel] = None,
                 serving: Optional[phys.ServingModel] = None,
                 prices: Optional[ScenarioPrices] = None,
                 mig: Tuple[Tuple[MigSpec, ...], ...] = ()):
        self.name = name
        self.mig = mig
        self.prices = prices            # None: no illustrative prices (gpucostd.sim.sections)
        self.physics = physics          # None: power_draw and sm_clock are as written
        if serving is not None:         # tokens follow the phases of the physics
            serving = dataclasses.replace(serving, physics=physics or phys.DEFAULT_MODEL)
        self.serving = serving          # None: no simulated inference server
        self.path = path
        self.node = node
        self.duration = node.duration
        self.repeat_every = node.repeat_every
        self.initial: Tuple[Dict[str, Any], ...] = tuple(dict(g) for g in gpus)
        self.timeline: Tuple[TimelineEntry, ...] = tuple(sorted(timeline, key=lambda e: e.t))
        self._build()

    # ---- precomputation: piecewise-constant segments per GPU within one cycle
    def _build(self) -> None:
        self._seg_starts: List[List[float]] = []
        self._seg_states: List[List[Dict[str, Any]]] = []
        self._seg_viol_rate: List[List[Dict[str, float]]] = []   # per policy: 1.0 if active
        self._seg_cum: List[List[Dict[str, float]]] = []          # integral up to segment start
        self._cycle_total: List[Dict[str, float]] = []
        self._resets: List[List[float]] = []
        self._hangs: List[List[Tuple[float, float]]] = []
        self._field_changes: List[Dict[str, List[float]]] = []
        self._kernel: List[Tuple[float, Optional[int], str]] = []
        for e in self.timeline:
            if e.kernel_log is not None:
                self._kernel.append((e.t, e.gpu, e.kernel_log))
        for index in range(self.node.gpu_count):
            state = dict(self.initial[index])
            starts = [0.0]
            states = [dict(state)]
            resets: List[float] = []
            hangs: List[Tuple[float, float]] = []
            changes: Dict[str, List[float]] = {}
            for e in self.timeline:
                if e.gpu != index:
                    continue
                for key in e.changes:
                    changes.setdefault(key, []).append(e.t)
                if e.hang_seconds:
                    hangs.append((e.t, e.hang_seconds))
                if e.reset:
                    resets.append(e.t)
                    for k in ("ecc_volatile_corrected", "ecc_volatile_uncorrected"):
                        state[k] = 0
                    state["remapped_rows_pending"] = False
                    state["retired_pages_pending"] = False
                state.update(e.changes)
                if e.t == starts[-1]:
                    states[-1] = dict(state)
                else:
                    starts.append(e.t)
                    states.append(dict(state))
            for st in states:
                st["clock_event_reasons"] = tuple(st["clock_event_reasons"])
                if self.physics is not None:
                    phys.apply_power(st, self.physics)
            rates = [{p: (1.0 if set(st["clock_event_reasons"]) & set(VIOLATION_REASONS[p])
                          else 0.0) for p, _ in VIOLATION_POLICIES} for st in states]
            cum = [{p: 0.0 for p, _ in VIOLATION_POLICIES}]
            for i in range(1, len(starts)):
                span = starts[i] - starts[i - 1]
                cum.append({p: cum[-1][p] + rates[i - 1][p] * span for p, _ in VIOLATION_POLICIES})
            if self.repeat_every:
                span = self.repeat_every - starts[-1]
                total = {p: cum[-1][p] + rates[-1][p] * span for p, _ in VIOLATION_POLICIES}
            else:
                total = {}
            self._seg_starts.append(starts)
            self._seg_states.append(states)
            self._seg_viol_rate.append(rates)
            self._seg_cum.append(cum)
            self._cycle_total.append(total)
            self._resets.append(sorted(resets))
            self._hangs.append(hangs)
            self._field_changes.append(changes)
        self._energy = [phys.Piecewise(starts, [min(st["power_draw"], st["power_limit"])
                                                for st in states], self.repeat_every)
                        for starts, states in zip(self._seg_starts, self._seg_states)]
        # GPM activity (physics.ACTIVITY_NAMES): exact integrals, like the energy counter
        self._activity = []
        for starts, states in zip(self._seg_starts, self._seg_states):
            acts = [phys.state_activity(st, self.physics) for st in states]
            self._activity.append([phys.Piecewise(starts, [a[name] for a in acts],
                                                  self.repeat_every)
                                   for name in phys.ACTIVITY_NAMES])
        self._tokens: List[phys.Piecewise] = []
        for ep in (self.serving.endpoints if self.serving else ()):
            starts = phys.merged_starts([self._seg_starts[i] for i in ep.gpus]
                                        + [[s.until] for g in self.mig for s in g
                                           if s.until is not None and s.key in
                                           (ep.instances or ())])

            def state(i: int, t: float) -> Dict[str, Any]:
                return self._seg_states[i][bisect.bisect_right(self._seg_starts[i], t) - 1]
            rates = [instance_endpoint_rate(self.serving, ep, self.mig, lambda i: state(i, t), t)
                     if ep.instances else self.serving.endpoint_rate(
                         ep, [self.serving.state_rate(state(i, t)) for i in ep.gpus])
                     for t in starts]
            self._tokens.append(phys.Piecewise(starts, rates, self.repeat_every))
        node_changes = [e for e in self.timeline if e.driver_loaded is not None]
        self._node_starts = [0.0] + [e.t for e in node_changes]
        self._node_loaded = [self.node.driver_loaded] + [bool(e.driver_loaded)
                                                          for e in node_changes]

    def __repr__(self) -> str:
        return f"Scenario({self.name!r}, gpus={self.node.gpu_count})"


# --------------------------------------------------------------------------- loading
def _default_uuid(model: str, index: int, name: str) -> str:
    return "GPU-" + str(uuidlib.uuid5(uuidlib.NAMESPACE_URL,
                                      f"gpucostd-sim:{name}:{model}:{index}"))


def _default_bus_id(index: int) -> str:
    return f"{index // 200:08X}:{0x10 + index % 200:02X}:00.0"


def parse_scenario(text: str, path: str = "<scenario>", name: Optional[str] = None) -> Scenario:
    """Parse and validate a scenario. Raises ScenarioError and nothing else, whatever the text
    holds (a huge number, values nested hundreds deep): a bad file is exit 2, never a
    traceback."""
    try:
        return _parse_scenario(text, path, name)
    except ScenarioError:
        raise
    except RecursionError:
        raise ScenarioError("values are nested too deeply; no scenario key takes such a value",
                            path) from None
    except (OverflowError, ValueError, TypeError, KeyError, AttributeError, IndexError,
            ZeroDivisionError, MemoryError) as exc:
        raise ScenarioError(f"cannot be used ({type(exc).__name__}: {str(exc)[:120]}); "
                            f"check the values against docs/scenarios.md", path) from None


def _parse_scenario(text: str, path: str, name: Optional[str]) -> Scenario:
    v = _Validator(path, text)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        raise ScenarioError(f"not valid TOML: {exc}", path, int(m.group(1)) if m else None)
    allowed_top = ("node", "gpu_defaults", "gpu", "at", "physics", "serving", "prices", "mig")
    for key in data:
        if key not in allowed_top:
            v.fail(f"{key}: unknown top-level key; allowed: [node], [gpu_defaults], [[gpu]], "
                   "[[at]], [physics], [serving], [prices], [[mig]]", key, None)
    if "node" not in data:
        raise ScenarioError("missing [node] table (needs at least gpu_count)", path)
    node_d = v.table("node", "node", data["node"], NODE_FIELDS)
    if "gpu_count" not in node_d:
        v.fail("node.gpu_count is required (an integer 0..64)", "node")
    merged = {k: f.default for k, f in NODE_FIELDS.items()}
    merged.update(node_d)
    if not re.match(r"^\d+\.\d+$", merged["cuda_version"]):
        v.fail(f'node.cuda_version = {_fmt(merged["cuda_version"])}: expected "MAJOR.MINOR", '
               'e.g. "12.4"', "node", "cuda_version")
    node = NodeInfo(**merged)
    count = node.gpu_count

    defaults = {k: f.default for k, f in GPU_FIELDS.items()}
    if "gpu_defaults" in data:
        gd = v.table("gpu_defaults", "gpu_defaults", data["gpu_defaults"], GPU_FIELDS)
        for k in ("uuid", "pci_bus_id"):
            if k in gd:
                v.fail(f"gpu_defaults.{k}: must differ per GPU; set it in [[gpu]]",
                       "gpu_defaults", k)
        defaults.update(gd)
    scen_name = name or os.path.splitext(os.path.basename(path))[0]
    gpus: List[Dict[str, Any]] = []
    for i in range(count):
        g = dict(defaults)
        g["name"] = g["name"] or node.model
        gpus.append(g)
    gpu_list = data.get("gpu", [])
    if not isinstance(gpu_list, list):
        v.fail("gpu must be an array of tables: [[gpu]]", "gpu")
    fields_with_index = dict(GPU_FIELDS)
    fields_with_index["index"] = _f("int", None, "GPU index (required).", min=0)
    seen_index = set()
    gpu_occ: Dict[int, int] = {}           # GPU index -> its [[gpu]] entry
    for occ, entry in enumerate(gpu_list):
        d = v.table(f"gpu[{occ}]", "gpu", entry, fields_with_index, True, occ)
        if "index" not in d:
            v.fail(f"gpu[{occ}].index is required", "gpu", None, True, occ)
        idx = d.pop("index")
        if idx >= count:
            v.fail(f"gpu[{occ}].index = {idx}: out of range; node.gpu_count is {count}, "
                   f"{_indexes(count)}", "gpu", "index", True, occ)
        if idx in seen_index:
            v.fail(f"gpu[{occ}].index = {idx}: duplicate [[gpu]] for this index", "gpu",
                   "index", True, occ)
        seen_index.add(idx)
        gpu_occ[idx] = occ
        gpus[idx].update(d)
    for i, g in enumerate(gpus):
        if not g.get("uuid"):
            g["uuid"] = _default_uuid(node.model, i, scen_name)
        if not g.get("pci_bus_id"):
            g["pci_bus_id"] = _default_bus_id(i)
        g["pci_bus_id"] = g["pci_bus_id"].upper()
    def gpu_line(index: int, keys: Sequence[str]) -> Optional[int]:
        """Where GPU `index`'s initial value of the first of `keys` that a file sets comes
        from: its [[gpu]] entry or [gpu_defaults]."""
        occ = gpu_occ.get(index)
        for key in keys:
            if occ is not None and key in gpu_list[occ]:
                return v.loc.line("gpu", key, occ, True) or v.loc.line("gpu", None, occ, True)
            if key in (data.get("gpu_defaults") or {}):
                return v.loc.line("gpu_defaults", key, 0, False) or \
                    v.loc.line("gpu_defaults", None, 0, False)
        return None if occ is None else v.loc.line("gpu", None, occ, True)

    for key in ("uuid", "pci_bus_id"):
        seen: Dict[str, int] = {}
        for i, g in enumerate(gpus):
            if g[key] in seen:
                raise ScenarioError(f"GPU {i} has the same {key} {g[key]!r} as GPU "
                                    f"{seen[g[key]]}; every GPU needs its own", path,
                                    gpu_line(i, (key,)), key)
            seen[g[key]] = i
    for i, g in enumerate(gpus):
        bad = _inconsistency(f"GPU {i} initial state", g)
        if bad:
            raise ScenarioError(bad[0], path, gpu_line(i, bad[1]), bad[1][0])

    at_list = data.get("at", [])
    if not isinstance(at_list, list):
        v.fail("at must be an array of tables: [[at]]", "at")
    at_fields = dict(GPU_FIELDS)
    for k in TIMELINE_FORBIDDEN:
        at_fields.pop(k)
    at_fields.update(TIMELINE_EXTRA)
    timeline: List[TimelineEntry] = []
    for occ, entry in enumerate(at_list):
        where = f"at[{occ}]"
        if isinstance(entry, dict):
            for k in TIMELINE_FORBIDDEN:
                if k in entry:
                    v.fail(f"{where}.{k}: identity fields cannot change in the timeline",
                           "at", k, True, occ)
        if isinstance(entry, dict) and "total_energy" in entry:
            v.fail(f"{where}.total_energy: the energy counter only counts up; set its start in "
                   "[gpu_defaults] or [[gpu]]", "at", "total_energy", True, occ)
        d = v.table(where, "at", entry, at_fields, True, occ)
        line = v.loc.line("at", None, occ, True)
        if "t" not in d:
            v.fail(f"{where}.t is required (seconds from start)", "at", None, True, occ)
        t = d.pop("t")
        if node.repeat_every and t >= node.repeat_every:
            v.fail(f"{where}.t = {_num(t)}: out of range; with node.repeat_every = "
                   f"{_num(node.repeat_every)} allowed 0..<{_num(node.repeat_every)}",
                   "at", "t", True, occ)
        gpu = d.pop("gpu", None)
        kernel = d.pop("kernel_log", None)
        hang = d.pop("hang_seconds", None)
        reset = bool(d.pop("reset", False))
        loaded = d.pop("driver_loaded", None)
        if gpu is not None and gpu >= count:
            v.fail(f"{where}.gpu = {gpu}: out of range; {_indexes(count)}", "at", "gpu",
                   True, occ)
        if gpu is None and (d or hang or reset):
            v.fail(f"{where}: GPU fields, hang_seconds and reset need `gpu = INDEX`", "at",
                   None, True, occ)
        timeline.append(TimelineEntry(t=t, gpu=gpu, changes=d, kernel_log=kernel,
                                      hang_seconds=hang, reset=reset, driver_loaded=loaded,
                                      line=line))
    physics = parse_physics(v, data, gpu_list, at_list)
    serving = parse_serving(v, data, count)
    mig = parse_mig(v, data, gpus, scen_name)      # before Scenario: it may set mig_mode
    check_serving_instances(v, serving, mig)
    sc = Scenario(scen_name, path, node, gpus, timeline, physics, serving,
                  parse_prices(v, data), mig)
    for i in range(count):
        for st, start in zip(sc._seg_states[i], sc._seg_starts[i]):
            bad = _inconsistency(f"GPU {i} at t={_num(start)}", st)
            if bad:
                # the [[at]] entry that made this state (the last one at that time)
                line = None
                for e in timeline:
                    if e.gpu == i and e.t == start:
                        line = e.line
                        for key in bad[1]:
                            if key in e.changes:
                                line = _key_line(v.loc, e.line, key)
                                break
                raise ScenarioError(bad[0], path, line, bad[1][0])
    return sc


def _key_line(loc: TomlLines, start: Optional[int], key: str) -> Optional[int]:
    """The line of `key` in the [[at]] entry whose header is at line `start`."""
    for occ, (first, _end) in enumerate(loc.tables("at", True)):
        if first == start:
            return loc.line("at", key, occ, True) or start
    return start


def _inconsistency(where: str, g: Mapping[str, Any]
                   ) -> Optional[Tuple[str, Tuple[str, ...]]]:
    """(message, keys) when one GPU state contradicts itself, else None. keys: the key at
    fault first, then the keys it clashes with (for pointing at a line)."""
    lo, hi = g["power_limit_min"], g["power_limit_max"]
    if lo > hi:
        return (f"{where}: power_limit_min {_num(lo)} W is above power_limit_max {_num(hi)} W",
                ("power_limit_min", "power_limit_max"))
    for key in ("power_limit", "power_limit_default"):
        if not lo <= g[key] <= hi:
            bound = "power_limit_max" if g[key] > hi else "power_limit_min"
            return (f"{where}: {key} = {_num(g[key])} W is outside power_limit_min.."
                    f"power_limit_max; allowed {_num(lo)}..{_num(hi)}", (key, bound))
    for name in g["clock_event_reasons"]:
        if name not in g["supported_clock_event_reasons"]:
            return (f"{where}: clock_event_reasons has {name!r}, which is not in "
                    "supported_clock_event_reasons",
                    ("clock_event_reasons", "supported_clock_event_reasons"))
    return None


def builtin_names() -> List[str]:
    try:
        return sorted(os.path.splitext(f)[0] for f in os.listdir(BUILTIN_DIR)
                      if f.endswith(".toml"))
    except OSError:
        return []


def load_scenario(spec: str) -> Scenario:
    """`spec` is "builtin:NAME" (a file shipped in gpucostd/sim/scenarios/) or a path to a TOML
    file. Raises ScenarioError (file, line, key, value, what is allowed)."""
    if spec.startswith("builtin:"):
        name = spec[len("builtin:"):]
        names = builtin_names()
        if name not in names:
            raise ScenarioError(f"unknown built-in scenario {spec!r}; available: "
                                + ", ".join("builtin:" + n for n in names))
        path = os.path.join(BUILTIN_DIR, name + ".toml")
    else:
        path = spec
        name = None
    from gpucostd.statefile import UnreadableFile, read_regular
    try:
        raw = read_regular(path, MAX_SCENARIO_BYTES)[0]
    except UnreadableFile as exc:
        raise ScenarioError(f"the scenario file {exc}; give a TOML file", path)
    except OSError as exc:
        raise ScenarioError(f"cannot read scenario file: {exc.strerror or exc}; give "
                            "builtin:NAME (" + ", ".join("builtin:" + n for n in builtin_names())
                            + ") or a path to a TOML file", path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ScenarioError(f"not UTF-8 text: {exc}", path)
    return parse_scenario(text, path, name)
