"""A simulated NVML library, driven by a scenario, that sits BELOW pynvml.

``SimulatedNode(scenario, clock).library`` is an object to install as ``pynvml.nvmlLib`` in
place of ``CDLL("libnvidia-ml.so.1")``. Its attributes are real C function pointers
(``ctypes.CFUNCTYPE`` callbacks) named exactly like the C symbols of libnvidia-ml, with the
argument lists of nvml.h (tests/test_nvml_header.py checks every one against the real header).
pynvml's own code -- argument marshalling, structs, ``byref`` out-parameters, return codes,
``NVMLError`` classes, ``nvmlErrorString`` -- therefore runs unchanged on top of it.

This module does not import pynvml (only daemon/hw/nvml.py does): the struct layouts and constants
below are those of nvml.h.

Behaviour (see docs/scenarios.md):
- scenario time t = clock.monotonic() - (monotonic at construction);
- every per-GPU call first checks the GPU: inside a ``hang_seconds`` window the call blocks
  until the window ends (a real wait on a real clock; on a virtual clock it returns
  NVML_ERROR_TIMEOUT at once, since nothing would advance virtual time); ``lost`` returns
  NVML_ERROR_GPU_IS_LOST; a field listed in ``unsupported`` returns NVML_ERROR_NOT_SUPPORTED;
- violation-time counters are the scenario's analytic integrals (ns, as NVML reports them);
- setters change the simulated state until the timeline next sets the same field;
  ``setters_permitted = false`` gives NVML_ERROR_NO_PERMISSION, an out-of-range power limit
  NVML_ERROR_INVALID_ARGUMENT.
"""
from __future__ import annotations

import ctypes
import logging
import threading
from ctypes import CFUNCTYPE, c_int, c_uint, c_ulonglong, c_void_p
from typing import Any, Callable, Dict, List, Optional, Tuple

from gpucostd.sim import clocks as _clocks
from gpucostd.sim.corrections import SetterCorrections, SimulatedCounters
from gpucostd.sim.gpm import GpmCalls
from gpucostd.sim.mig import MIG_CONSTANTS, MIG_SYMBOLS, MigCalls
from gpucostd.sim.scenario import UNSUPPORTED_GROUPS, Scenario, load_scenario
from gpucostd.snapshot import VIOLATION_POLICIES, mask_from_reasons

from gpucostd.sim.nvml_abi import (  # noqa: F401 - the names callers import from here
    CLOCK_EVENT_DURATION_FIELDS, DeviceFault, ENERGY_FIELDS, ERROR_STRINGS, FIELD_VALUES, FieldValue,
    H100_PCI_DEVICE_ID, H100_PCI_SUBSYSTEM_ID, HEADER_CONSTANTS, I, NVML_AGGREGATE_ECC,
    NVML_CLOCK_GRAPHICS, NVML_CLOCK_MEM, NVML_CLOCK_SM, NVML_CLOCK_VIDEO,
    NVML_DEVICE_PCI_BUS_ID_BUFFER_SIZE, NVML_DEVICE_PCI_BUS_ID_BUFFER_V2_SIZE,
    NVML_ERROR_DRIVER_NOT_LOADED, NVML_ERROR_GPU_IS_LOST, NVML_ERROR_INSUFFICIENT_SIZE,
    NVML_ERROR_INVALID_ARGUMENT, NVML_ERROR_NOT_FOUND, NVML_ERROR_NOT_SUPPORTED,
    NVML_ERROR_NO_PERMISSION, NVML_ERROR_TIMEOUT, NVML_ERROR_UNINITIALIZED, NVML_ERROR_UNKNOWN,
    NVML_FI_MAX, NVML_MEMORY_ERROR_TYPE_CORRECTED, NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
    NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR,
    NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS, NVML_SUCCESS,
    NVML_TEMPERATURE_GPU, NVML_TEMPERATURE_THRESHOLD_GPU_MAX, NVML_TEMPERATURE_THRESHOLD_MEM_MAX,
    NVML_TEMPERATURE_THRESHOLD_SHUTDOWN, NVML_TEMPERATURE_THRESHOLD_SLOWDOWN,
    NVML_VALUE_TYPE_DOUBLE, NVML_VALUE_TYPE_UNSIGNED_INT, NVML_VALUE_TYPE_UNSIGNED_LONG_LONG,
    NVML_VOLATILE_ECC, P, PciInfo, SYMBOLS, U, Utilization, VIOLATION_FIELDS, Value,
    ViolationTime)
from gpucostd.sim.nvml_abi import (  # noqa: F401 - the old local names
    FV_HEAD as _FV_HEAD, FV_KEY as _FV_KEY, FV_OFF_TS as _FV_OFF_TS, FV_OFF_VALUE as _FV_OFF_VALUE,
    FV_SIZE as _FV_SIZE, FV_STAMP as _FV_STAMP, FV_VALUE as _FV_VALUE)

log = logging.getLogger("gpucostd.simnvml")


_DeviceFault = DeviceFault       # the old local name


def _put_uint(addr: Optional[int], value: Any) -> None:
    if not addr:
        raise _DeviceFault(NVML_ERROR_INVALID_ARGUMENT)
    c_uint.from_address(addr).value = int(round(value))


def _put_ull(addr: Optional[int], value: Any) -> None:
    if not addr:
        raise _DeviceFault(NVML_ERROR_INVALID_ARGUMENT)
    c_ulonglong.from_address(addr).value = int(value)


def _put_str(addr: Optional[int], length: int, text: str) -> None:
    data = text.encode() + b"\0"
    if not addr:
        raise _DeviceFault(NVML_ERROR_INVALID_ARGUMENT)
    if len(data) > length:
        raise _DeviceFault(NVML_ERROR_INSUFFICIENT_SIZE)
    ctypes.memmove(addr, data, len(data))


class SimulatedLibrary:
    """Stands in for the CDLL of libnvidia-ml: one C function pointer attribute per symbol."""

    _gpucostd_simulated = True

    def __init__(self, node: "SimulatedNode"):
        self._node = node
        self._callbacks: Dict[str, Any] = {}
        for name, (restype, argtypes) in SYMBOLS.items():
            impl = getattr(node, "_c_" + name)
            proto = CFUNCTYPE(restype, *argtypes)
            fptr = proto(_guard(name, impl, node.calls))
            self._callbacks[name] = fptr
            setattr(self, name, fptr)

    def __getattr__(self, name: str) -> Any:
        # pynvml looks symbols up with getattr(); a missing one becomes FUNCTION_NOT_FOUND.
        # Record it so tests can tell the simulator lacks a symbol the gateway uses.
        if name.startswith("nvml"):
            self.__dict__["_node"].missing.add(name)
        raise AttributeError(name)

    def release(self) -> None:
        """Release calls blocked in a simulated hang (NvmlGateway.shutdown calls this)."""
        self._node.close()

    def __repr__(self) -> str:
        return f"<SimulatedLibrary of {self._node.scenario!r}>"


def _guard(name: str, impl: Callable[..., int], counts: Dict[str, int]) -> Callable[..., int]:
    """Never let a Python exception escape a ctypes callback (ctypes would return 0 =
    SUCCESS). Counts calls per symbol (SimulatedNode.calls)."""

    def call(*args):
        counts[name] = counts.get(name, 0) + 1
        try:
            return impl(*args)
        except _DeviceFault as fault:
            return fault.code
        except Exception:   # pragma: no cover - a bug in the simulator
            log.exception("simulated %s failed", name)
            return NVML_ERROR_UNKNOWN

    return call


SYMBOLS.update(_clocks.SYMBOLS)
HEADER_CONSTANTS.update(_clocks.HEADER_CONSTANTS)
SYMBOLS.update(MIG_SYMBOLS)
HEADER_CONSTANTS.update(MIG_CONSTANTS)


class SimulatedNode(_clocks.ClockCalls, SimulatedCounters, GpmCalls, MigCalls):
    """A simulated GPU node. ``.library`` goes to NvmlGateway(library=...)."""

    def __init__(self, scenario: Any, clock: Any):
        if isinstance(scenario, str):
            scenario = load_scenario(scenario)
        self.scenario: Scenario = scenario
        self.clock = clock
        self._virtual = bool(getattr(clock, "virtual", False))
        self._start = clock.monotonic()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._init_count = 0
        # setter overrides: index -> field -> (value, scenario time of the set)
        self._overrides: List[Dict[str, Tuple[Any, float]]] = [
            {} for _ in range(scenario.node.gpu_count)]
        self._unsup_cache: Dict[Tuple[str, ...], frozenset] = {}
        self._spans: Dict[int, Tuple[float, float, Dict[str, Any]]] = {}
        self._fv_cache: Dict[int, Tuple[Any, ...]] = {}
        self._kernel_t = -1.0
        # scenario indexes NVML lists, fixed at each nvmlInit (a GPU that stops being
        # `present` leaves the count only when NVML is initialised again, as on a real node)
        self._visible: List[int] = list(range(scenario.node.gpu_count))
        # what setters changed beyond the scenario's exact integrals
        self._corr = SetterCorrections(scenario, lambda i: bool(self._overrides[i]),
                                       self._effective)
        self._error_strings = {code: ctypes.create_string_buffer(text.encode())
                               for code, text in ERROR_STRINGS.items()}
        self.calls: Dict[str, int] = {}     # C symbol -> number of calls (for tests)
        self.missing: set = set()           # symbols pynvml asked for that we lack
        self.library = SimulatedLibrary(self)

    # ------------------------------------------------------------------ python API
    def now(self) -> float:
        """Scenario time in seconds."""
        return self.clock.monotonic() - self._start

    def drain_kernel_lines(self) -> List[str]:
        """Kernel log lines of timeline entries that came due since the last call."""
        t = self.now()
        with self._lock:
            t0, self._kernel_t = self._kernel_t, t
        return [line for _t, _g, line in self.scenario.kernel_lines_between(t0, t)]

    def close(self) -> None:
        """Release calls blocked in a hang window (they return NVML_ERROR_TIMEOUT)."""
        self._closed.set()

    # ------------------------------------------------------------------ internals
    def _effective(self, index: int, t: float, st: Dict[str, Any]) -> Dict[str, Any]:
        """Setter overrides that still apply at t (until the timeline sets the field again)."""
        ov = self._overrides[index]
        if not ov:
            return {}
        out = {}
        for key, (value, set_t) in ov.items():
            last = self.scenario.last_change_time(index, key, t)
            if last is None or last < set_t:
                out[key] = value
        return out

    def _unsupported(self, st: Dict[str, Any]) -> frozenset:
        key = st["unsupported"]
        got = self._unsup_cache.get(key)
        if got is None:
            names = set()
            for name in key:
                names.add(name)
                names.update(UNSUPPORTED_GROUPS.get(name, ()))
            got = self._unsup_cache[key] = frozenset(names)
        return got

    def _check_init(self) -> None:
        if self._init_count <= 0:
            raise _DeviceFault(NVML_ERROR_UNINITIALIZED)

    def _wait_hang(self, index: int, t: float) -> float:
        until = self.scenario.hang_until(index, t)
        while until is not None:
            if self._virtual or self._closed.is_set():
                raise _DeviceFault(NVML_ERROR_TIMEOUT)
            remaining = until - self.now()
            if remaining > 0:
                if self._closed.wait(remaining):
                    raise _DeviceFault(NVML_ERROR_TIMEOUT)
            t = self.now()
            until = self.scenario.hang_until(index, t)
        return t

    def _dev(self, handle: Optional[int], *needs: str) -> Tuple[int, float, Dict[str, Any]]:
        """Resolve a handle; apply hang / lost / driver / unsupported; return
        (index, t, state)."""
        self._check_init()
        count = self.scenario.node.gpu_count
        if not handle or not 1 <= handle <= count or handle - 1 not in self._visible:
            raise _DeviceFault(NVML_ERROR_INVALID_ARGUMENT)
        index = handle - 1
        now = self.now()
        span = self._spans.get(index)
        if span is not None and span[0] <= now < span[1]:
            # the state stays the same over this span (no hang, no driver change in it), so
            # one lookup serves every call of every cycle inside it
            t, st = now, span[2]
        else:
            t = self._wait_hang(index, now)
            if not self.scenario.driver_loaded_at(t):
                raise _DeviceFault(NVML_ERROR_DRIVER_NOT_LOADED)
            st = self.scenario.state_ref(index, t)
            span = self.scenario.state_span(index, t)
            if span is not None:
                self._spans[index] = span
        if st["lost"]:
            raise _DeviceFault(NVML_ERROR_GPU_IS_LOST)
        if needs and st["unsupported"]:
            unsup = self._unsupported(st)
            for need in needs:
                if need in unsup:
                    raise _DeviceFault(NVML_ERROR_NOT_SUPPORTED)
        if self._overrides[index]:
            eff = self._effective(index, t, st)
            if eff:
                st = dict(st)
                st.update(eff)
                _clocks.apply_setters(st, eff, self.scenario.physics)
        return index, t, st

    def _index_checked(self, index: int) -> int:
        """For calls that take an NVML index (not a handle): the scenario index of the GPU
        listed there; hang and lost apply too."""
        self._check_init()
        if not 0 <= index < len(self._visible):
            raise _DeviceFault(NVML_ERROR_INVALID_ARGUMENT)
        index = self._visible[index]
        t = self._wait_hang(index, self.now())
        if self.scenario.state_ref(index, t)["lost"]:
            raise _DeviceFault(NVML_ERROR_GPU_IS_LOST)
        return index

    # ------------------------------------------------------------------ C symbols
    # Each _c_<symbol> implements one C function; arguments arrive as ctypes converted them
    # (pointers as int addresses or None, unsigned ints as int).
    def _init(self) -> int:
        if not self.scenario.driver_loaded_at(self.now()):
            return NVML_ERROR_DRIVER_NOT_LOADED
        t = self.now()
        with self._lock:
            self._init_count += 1
            self._visible = [i for i in range(self.scenario.node.gpu_count)
                             if self.scenario.state_ref(i, t).get("present", True)]
        return NVML_SUCCESS

    def _c_nvmlInit_v2(self) -> int:
        return self._init()

    def _c_nvmlInitWithFlags(self, flags: int) -> int:
        return self._init()

    def _c_nvmlShutdown(self) -> int:
        with self._lock:
            if self._init_count <= 0:
                return NVML_ERROR_UNINITIALIZED
            self._init_count -= 1
        return NVML_SUCCESS

    def _c_nvmlErrorString(self, result: int) -> int:
        buf = self._error_strings.get(result)
        if buf is None:
            buf = self._error_strings[NVML_ERROR_UNKNOWN]
        return ctypes.addressof(buf)

    def _c_nvmlSystemGetDriverVersion(self, buf, length) -> int:
        self._check_init()
        _put_str(buf, length, self.scenario.node.driver_version)
        return NVML_SUCCESS

    def _c_nvmlSystemGetNVMLVersion(self, buf, length) -> int:
        self._check_init()
        major = self.scenario.node.cuda_version.split(".")[0]
        _put_str(buf, length, f"{major}.{self.scenario.node.driver_version}")
        return NVML_SUCCESS

    def _cuda_int(self) -> int:
        major, minor = self.scenario.node.cuda_version.split(".")[:2]
        return int(major) * 1000 + int(minor) * 10

    def _c_nvmlSystemGetCudaDriverVersion(self, out) -> int:
        if not out:
            return NVML_ERROR_INVALID_ARGUMENT
        c_int.from_address(out).value = self._cuda_int()
        return NVML_SUCCESS

    _c_nvmlSystemGetCudaDriverVersion_v2 = _c_nvmlSystemGetCudaDriverVersion

    def _c_nvmlDeviceGetCount_v2(self, out) -> int:
        self._check_init()
        _put_uint(out, len(self._visible))
        return NVML_SUCCESS

    def _put_handle(self, out, index: int) -> int:
        if not out:
            return NVML_ERROR_INVALID_ARGUMENT
        c_void_p.from_address(out).value = index + 1
        return NVML_SUCCESS

    def _c_nvmlDeviceGetHandleByIndex_v2(self, index, out) -> int:
        return self._put_handle(out, self._index_checked(index))

    def _find(self, key: str, text: Optional[int]) -> int:
        self._check_init()
        if not text:
            return NVML_ERROR_INVALID_ARGUMENT
        wanted = ctypes.string_at(text).decode(errors="replace").upper()
        for pos, i in enumerate(self._visible):
            have = self.scenario.initial[i][key].upper()
            if have == wanted or (key == "pci_bus_id" and have.endswith(wanted)
                                  and len(wanted) >= 12):
                return self._index_checked(pos)
        raise _DeviceFault(NVML_ERROR_NOT_FOUND)

    def _c_nvmlDeviceGetHandleByUUID(self, uuid, out) -> int:
        return self._put_handle(out, self._find("uuid", uuid))

    def _c_nvmlDeviceGetHandleByPciBusId_v2(self, bus, out) -> int:
        return self._put_handle(out, self._find("pci_bus_id", bus))

    def _c_nvmlDeviceGetIndex(self, h, out) -> int:
        index, _t, _st = self._dev(h)
        _put_uint(out, self._visible.index(index))
        return NVML_SUCCESS

    def _c_nvmlDeviceGetName(self, h, buf, length) -> int:
        _i, _t, st = self._dev(h)
        _put_str(buf, length, st["name"])
        return NVML_SUCCESS

    def _c_nvmlDeviceGetUUID(self, h, buf, length) -> int:
        if self._is_mig_handle(h):              # "MIG-..." (gpucostd.sim.mig)
            return self.mig_uuid(h, buf, length)
        _i, _t, st = self._dev(h)
        _put_str(buf, length, st["uuid"])
        return NVML_SUCCESS

    def _c_nvmlDeviceGetPciInfo_v3(self, h, out) -> int:
        _i, _t, st = self._dev(h)
        if not out:
            return NVML_ERROR_INVALID_ARGUMENT
        bus_id = st["pci_bus_id"]
        dom, bus, devfn = bus_id.split(":")
        dev = devfn.split(".")[0]
        info = PciInfo.from_address(out)
        info.busIdLegacy = f"{int(dom, 16) & 0xFFFF:04X}:{bus}:{devfn}".encode()
        info.busId = bus_id.encode()
        info.domain = int(dom, 16)
        info.bus = int(bus, 16)
        info.device = int(dev, 16)
        info.pciDeviceId = H100_PCI_DEVICE_ID
        info.pciSubSystemId = H100_PCI_SUBSYSTEM_ID
        return NVML_SUCCESS

    def _c_nvmlDeviceGetTemperature(self, h, sensor, out) -> int:
        if sensor != NVML_TEMPERATURE_GPU:
            self._dev(h)
            return NVML_ERROR_INVALID_ARGUMENT
        _i, _t, st = self._dev(h, "temperature")
        _put_uint(out, st["temperature"])
        return NVML_SUCCESS

    def _c_nvmlDeviceGetTemperatureThreshold(self, h, kind, out) -> int:
        key = {NVML_TEMPERATURE_THRESHOLD_SHUTDOWN: "shutdown_temperature",
               NVML_TEMPERATURE_THRESHOLD_SLOWDOWN: "slowdown_temperature",
               NVML_TEMPERATURE_THRESHOLD_GPU_MAX: "slowdown_temperature",
               NVML_TEMPERATURE_THRESHOLD_MEM_MAX: "memory_temperature"}.get(kind)
        if key is None:
            self._dev(h)
            return NVML_ERROR_NOT_SUPPORTED
        _i, _t, st = self._dev(h, key)
        if kind == NVML_TEMPERATURE_THRESHOLD_GPU_MAX:
            value = st["slowdown_temperature"] - 2
        elif kind == NVML_TEMPERATURE_THRESHOLD_MEM_MAX:
            value = 95
        else:
            value = st[key]
        _put_uint(out, value)
        return NVML_SUCCESS

    def _c_nvmlDeviceGetFieldValues(self, h, count, values) -> int:
        index, t, st = self._dev(h, "field_values")
        if count < 0 or (count and not values):
            return NVML_ERROR_INVALID_ARGUMENT
        if not count:
            return NVML_SUCCESS
        size = _FV_SIZE * count
        view = memoryview((ctypes.c_char * size).from_address(values)).cast("B")
        ids = tuple(_FV_KEY.unpack_from(view, k * _FV_SIZE) for k in range(count))
        # What depends on the state alone is packed once per state dict (a scenario segment)
        # and request; the counters and the timestamps are written on every call.
        cached = self._fv_cache.get(index)
        if cached is None or cached[0] is not st or cached[1] != ids:
            template, dynamic = self._fv_template(st, ids)
            cached = self._fv_cache[index] = (st, ids, template, dynamic)
        view[:size] = cached[2]
        stamp = int(self.clock.time() * 1e6)
        for k in range(count):
            _FV_STAMP.pack_into(view, k * _FV_SIZE + _FV_OFF_TS, stamp)
        dynamic = cached[3]
        if dynamic:
            counters = None
            for offset, kind in dynamic:
                if kind == "energy":
                    value = int(round(self.energy_joules(index, t) * 1000.0))
                else:
                    if counters is None:   # the scenario's integrals, setter changes included
                        counters = dict(self.scenario.violation_seconds_at(index, t))
                        counters["power"] = self.violation_seconds(index, "power", t)
                    value = int(round(counters[kind] * 1e9))
                _FV_VALUE[NVML_VALUE_TYPE_UNSIGNED_LONG_LONG].pack_into(view, offset, value)
        return NVML_SUCCESS

    def _fv_template(self, st: Dict[str, Any], ids: Tuple[int, ...]):
        """(bytes of the answer without timestamps and counters, [(value offset, counter)]);
        ids holds the requested (fieldId, scopeId) pairs."""
        unsup = self._unsupported(st) if st["unsupported"] else frozenset()
        buf = bytearray(_FV_SIZE * len(ids))
        dynamic = []
        for k, (fid, scope) in enumerate(ids):
            base = k * _FV_SIZE
            _FV_KEY.pack_into(buf, base, fid, scope)     # fieldId and scopeId as asked
            spec = FIELD_VALUES.get(fid)
            viol = VIOLATION_FIELDS.get(fid)
            vtype, code, fmt, value = 0, NVML_SUCCESS, None, 0
            if spec is not None and spec[1] not in unsup and \
                    (fid not in (3, 4, 5, 6) or st["ecc_mode"]):
                vtype, value = spec[2], spec[3](st)
                fmt = _FV_VALUE[vtype]
            elif viol is not None and st["violation_counters"] and not (
                    fid in CLOCK_EVENT_DURATION_FIELDS and "clock_event_durations" in unsup):
                vtype = NVML_VALUE_TYPE_UNSIGNED_LONG_LONG
                dynamic.append((base + _FV_OFF_VALUE, viol[1]))
            elif fid in ENERGY_FIELDS and ENERGY_FIELDS[fid][1] not in unsup:
                vtype = NVML_VALUE_TYPE_UNSIGNED_LONG_LONG
                dynamic.append((base + _FV_OFF_VALUE, "energy"))
            elif 0 < fid < NVML_FI_MAX:
                code = NVML_ERROR_NOT_SUPPORTED
            else:
                code = NVML_ERROR_INVALID_ARGUMENT
            # timestamp (per call), latencyUsec, valueType, nvmlReturn; then the value
            _FV_HEAD.pack_into(buf, base + _FV_OFF_TS, 0, 0, vtype, code)
            if fmt is not None:
                fmt.pack_into(buf, base + _FV_OFF_VALUE, value)
        return bytes(buf), tuple(dynamic)

    def _c_nvmlDeviceGetPowerUsage(self, h, out) -> int:
        _i, _t, st = self._dev(h, "power_draw")
        _put_uint(out, min(st["power_draw"], st["power_limit"]) * 1000)
        return NVML_SUCCESS

    def _c_nvmlDeviceGetPowerManagementLimit(self, h, out) -> int:
        _i, _t, st = self._dev(h, "power_limit")
        _put_uint(out, st["power_limit"] * 1000)
        return NVML_SUCCESS

    _c_nvmlDeviceGetEnforcedPowerLimit = _c_nvmlDeviceGetPowerManagementLimit

    def _c_nvmlDeviceGetPowerManagementLimitConstraints(self, h, lo, hi) -> int:
        _i, _t, st = self._dev(h, "power_limit_min", "power_limit_max")
        _put_uint(lo, st["power_limit_min"] * 1000)
        _put_uint(hi, st["power_limit_max"] * 1000)
        return NVML_SUCCESS

    def _c_nvmlDeviceGetPowerManagementDefaultLimit(self, h, out) -> int:
        _i, _t, st = self._dev(h, "power_limit_default")
        _put_uint(out, st["power_limit_default"] * 1000)
        return NVML_SUCCESS

    def _set(self, index: int, t: float, key: str, value: Any) -> None:
        if self.scenario.node.set_seconds:      # in real time; close() cuts it short
            self._closed.wait(self.scenario.node.set_seconds)
        with self._lock:
            # integrate the old state up to the set before the new value applies
            self._corr.advance_all(index, t)
            self._overrides[index][key] = (value, t)
            self._spans.pop(index, None)

    def _c_nvmlDeviceSetPowerManagementLimit(self, h, milliwatts) -> int:
        index, t, st = self._dev(h, "power_limit")
        if not st["setters_permitted"]:
            return NVML_ERROR_NO_PERMISSION
        if not st["power_limit_min"] * 1000 <= milliwatts <= st["power_limit_max"] * 1000:
            return NVML_ERROR_INVALID_ARGUMENT
        self._set(index, t, "power_limit", milliwatts / 1000.0)
        return NVML_SUCCESS

    def _c_nvmlDeviceGetPersistenceMode(self, h, out) -> int:
        _i, _t, st = self._dev(h, "persistence_mode")
        _put_uint(out, 1 if st["persistence_mode"] else 0)
        return NVML_SUCCESS

    def _c_nvmlDeviceSetPersistenceMode(self, h, mode) -> int:
        index, t, st = self._dev(h, "persistence_mode")
        if mode not in (0, 1):
            return NVML_ERROR_INVALID_ARGUMENT
        if not st["setters_permitted"]:
            return NVML_ERROR_NO_PERMISSION
        self._set(index, t, "persistence_mode", bool(mode))
        return NVML_SUCCESS

    def _clock(self, h, kind, out, key: str) -> int:
        if kind not in (NVML_CLOCK_GRAPHICS, NVML_CLOCK_SM, NVML_CLOCK_MEM, NVML_CLOCK_VIDEO):
            self._dev(h)
            return NVML_ERROR_INVALID_ARGUMENT
        if kind in (NVML_CLOCK_MEM, NVML_CLOCK_VIDEO):
            self._dev(h)
            _put_uint(out, 2619 if kind == NVML_CLOCK_MEM else 1755)
            return NVML_SUCCESS
        _i, _t, st = self._dev(h, key)
        _put_uint(out, st[key])
        return NVML_SUCCESS

    def _c_nvmlDeviceGetClockInfo(self, h, kind, out) -> int:
        return self._clock(h, kind, out, "sm_clock")

    def _c_nvmlDeviceGetMaxClockInfo(self, h, kind, out) -> int:
        return self._clock(h, kind, out, "max_sm_clock")

    def _c_nvmlDeviceGetApplicationsClock(self, h, kind, out) -> int:
        return self._clock(h, kind, out, "app_sm_clock")

    def _c_nvmlDeviceGetUtilizationRates(self, h, out) -> int:
        _i, _t, st = self._dev(h, "utilization")
        if st.get("mig_mode"):      # "not currently supported" on MIG-enabled GPUs (NVML)
            return NVML_ERROR_NOT_SUPPORTED
        if not out:
            return NVML_ERROR_INVALID_ARGUMENT
        u = Utilization.from_address(out)
        u.gpu = int(round(st["utilization"]))
        u.memory = int(round(st["memory_utilization"]))
        return NVML_SUCCESS

    def _c_nvmlDeviceGetCurrentClocksEventReasons(self, h, out) -> int:
        _i, _t, st = self._dev(h, "clock_event_reasons")
        _put_ull(out, mask_from_reasons(st["clock_event_reasons"]))
        return NVML_SUCCESS

    _c_nvmlDeviceGetCurrentClocksThrottleReasons = _c_nvmlDeviceGetCurrentClocksEventReasons

    def _c_nvmlDeviceGetSupportedClocksEventReasons(self, h, out) -> int:
        _i, _t, st = self._dev(h, "supported_clock_event_reasons")
        _put_ull(out, mask_from_reasons(st["supported_clock_event_reasons"]))
        return NVML_SUCCESS

    _c_nvmlDeviceGetSupportedClocksThrottleReasons = _c_nvmlDeviceGetSupportedClocksEventReasons

    _POLICY_KEYS = {value: key for key, value in VIOLATION_POLICIES if value is not None}

    def _c_nvmlDeviceGetViolationStatus(self, h, policy, out) -> int:
        index, t, st = self._dev(h)
        key = self._POLICY_KEYS.get(policy)
        if not st["violation_counters"] or key is None:
            return NVML_ERROR_NOT_SUPPORTED
        if not out:
            return NVML_ERROR_INVALID_ARGUMENT
        seconds = self.violation_seconds(index, key, t)
        v = ViolationTime.from_address(out)
        v.referenceTime = int(self.clock.time() * 1e6)
        v.violationTime = int(round(seconds * 1e9))
        return NVML_SUCCESS

    def _c_nvmlDeviceGetEccMode(self, h, current, pending) -> int:
        _i, _t, st = self._dev(h, "ecc_mode")
        _put_uint(current, 1 if st["ecc_mode"] else 0)
        _put_uint(pending, 1 if st["ecc_mode"] else 0)
        return NVML_SUCCESS

    def _c_nvmlDeviceGetTotalEccErrors(self, h, error_type, counter_type, out) -> int:
        kinds = {NVML_MEMORY_ERROR_TYPE_CORRECTED: "corrected",
                 NVML_MEMORY_ERROR_TYPE_UNCORRECTED: "uncorrected"}
        counters = {NVML_VOLATILE_ECC: "volatile", NVML_AGGREGATE_ECC: "aggregate"}
        if error_type not in kinds or counter_type not in counters:
            self._dev(h)
            return NVML_ERROR_INVALID_ARGUMENT
        key = f"ecc_{counters[counter_type]}_{kinds[error_type]}"
        _i, _t, st = self._dev(h, key)
        if not st["ecc_mode"]:
            return NVML_ERROR_NOT_SUPPORTED
        _put_ull(out, st[key])
        return NVML_SUCCESS

    def _c_nvmlDeviceGetRetiredPages(self, h, cause, count, addresses) -> int:
        keys = {NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS: "retired_pages_sbe",
                NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR: "retired_pages_dbe"}
        if cause not in keys or not count:
            self._dev(h)
            return NVML_ERROR_INVALID_ARGUMENT
        _i, _t, st = self._dev(h, keys[cause])
        n = int(st[keys[cause]])
        room = c_uint.from_address(count).value
        c_uint.from_address(count).value = n
        if room < n or (n and not addresses):
            return NVML_ERROR_INSUFFICIENT_SIZE
        for k in range(n):
            c_ulonglong.from_address(addresses + 8 * k).value = 0x1000 * (k + 1) + cause
        return NVML_SUCCESS

    def _c_nvmlDeviceGetRetiredPagesPendingStatus(self, h, out) -> int:
        _i, _t, st = self._dev(h, "retired_pages_pending")
        _put_uint(out, 1 if st["retired_pages_pending"] else 0)
        return NVML_SUCCESS

    def _c_nvmlDeviceGetRemappedRows(self, h, corr, unc, pending, failure) -> int:
        _i, _t, st = self._dev(h, "remapped_rows_correctable", "remapped_rows_uncorrectable",
                               "remapped_rows_pending", "remapped_rows_failure")
        _put_uint(corr, st["remapped_rows_correctable"])
        _put_uint(unc, st["remapped_rows_uncorrectable"])
        _put_uint(pending, 1 if st["remapped_rows_pending"] else 0)
        _put_uint(failure, 1 if st["remapped_rows_failure"] else 0)
        return NVML_SUCCESS

    def _uint_field(self, h, out, key: str) -> int:
        _i, _t, st = self._dev(h, key)
        _put_uint(out, st[key])
        return NVML_SUCCESS

    def _c_nvmlDeviceGetCurrPcieLinkGeneration(self, h, out) -> int:
        return self._uint_field(h, out, "pcie_link_gen")

    def _c_nvmlDeviceGetMaxPcieLinkGeneration(self, h, out) -> int:
        return self._uint_field(h, out, "pcie_link_gen_max")

    def _c_nvmlDeviceGetCurrPcieLinkWidth(self, h, out) -> int:
        return self._uint_field(h, out, "pcie_link_width")

    def _c_nvmlDeviceGetMaxPcieLinkWidth(self, h, out) -> int:
        return self._uint_field(h, out, "pcie_link_width_max")

    def _c_nvmlDeviceGetPcieReplayCounter(self, h, out) -> int:
        return self._uint_field(h, out, "pcie_replay_count")

    def _c_nvmlDeviceGetTotalEnergyConsumption(self, h, out) -> int:
        index, t, _st = self._dev(h, "total_energy")
        _put_ull(out, round(self.energy_joules(index, t) * 1000.0))     # mJ, as NVML
        return NVML_SUCCESS

