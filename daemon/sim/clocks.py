"""The simulated NVML's clock and workload-power-profile calls (a mixin of SimulatedNode).

C functions, with the argument lists of nvml.h (tests/test_nvml_header.py checks them):

- ``nvmlDeviceGetSupportedMemoryClocks``: one memory clock (HBM runs at one clock; an H100 SXM
  reports 2619 MHz);
- ``nvmlDeviceGetSupportedGraphicsClocks``: for that memory clock, ``max_sm_clock`` down to the
  physics' ``min_sm_clock`` in ``CLOCK_STEP_MHZ`` steps (NVML_ERROR_NOT_FOUND for another memory
  clock); both use NVML's two-call protocol (count first, INSUFFICIENT_SIZE);
- ``nvmlDeviceSetGpuLockedClocks`` (min, max in MHz; a value not in the list, min > max, or a
  mix of a number and an ``nvmlClockLimitId_t`` is INVALID_ARGUMENT; ``setters_permitted =
  false`` is NO_PERMISSION) and ``nvmlDeviceResetGpuLockedClocks``. NVML has no call that reads
  the locked range back; the physics honours it (gpucostd.sim.physics: the clock the GPU asks
  for is at most the locked maximum, then the power cap applies), and a clock held below what
  the GPU would run at shows the clock-event reason ApplicationsClocksSetting (0x2, "clocks are
  set to application-specific values": ``apply_setters``);
- ``nvmlDeviceWorkloadPowerProfileGetProfilesInfo`` / ``GetCurrentProfiles`` /
  ``SetRequestedProfiles`` / ``ClearRequestedProfiles`` (Blackwell and later): NOT_SUPPORTED on
  every GPU whose name is not a Blackwell part (``PROFILE_GPUS``), so an H100 says so; on a
  Blackwell the requested mask is kept (the profiles change no physics here).
"""
from __future__ import annotations

import ctypes
from ctypes import c_int, c_uint, c_void_p
from typing import Any, Dict, List, Optional, Tuple

NVML_SUCCESS = 0
_INVALID_ARGUMENT = 2
_NOT_SUPPORTED = 3
_NO_PERMISSION = 4
_NOT_FOUND = 6
_INSUFFICIENT_SIZE = 7

CLOCK_STEP_MHZ = 15          # the spacing of the simulated GPU's supported graphics clocks
MEMORY_CLOCK_MHZ = 2619      # H100 SXM5 HBM3 (what nvmlDeviceGetClockInfo(MEM) reports)
LOCK_REASON = "ApplicationsClocksSetting"
NVML_CLOCK_LIMIT_ID_RANGE_START = 0xffffff00
NVML_CLOCK_LIMIT_ID_TDP = NVML_CLOCK_LIMIT_ID_RANGE_START + 1         # the enum's next values
NVML_CLOCK_LIMIT_ID_UNLIMITED = NVML_CLOCK_LIMIT_ID_RANGE_START + 2
NVML_255_MASK_NUM_ELEMS = 8
NVML_WORKLOAD_POWER_MAX_PROFILES = 255
# nvmlPowerProfileType_t (nvml.h): the profiles a simulated Blackwell offers
POWER_PROFILES = {"max_p": 0, "max_q": 1, "compute": 2, "memory_bound": 3, "network": 4,
                  "balanced": 5, "llm_inference": 6, "llm_training": 7}
PROFILE_GPUS = ("B200", "B300", "GB200", "GB300", "RTX PRO 6000 Blackwell")
_VERSION_CURRENT = (1 << 24) | 100      # nvmlWorkloadPowerProfileCurrentProfiles_v1 (100 bytes)
_VERSION_REQUESTED = (1 << 24) | 36     # nvmlWorkloadPowerProfileRequestedProfiles_v1
_VERSION_INFO = (1 << 24) | 0x2bf8      # nvmlWorkloadPowerProfileProfilesInfo_v1
_MASK_BYTES = 4 * NVML_255_MASK_NUM_ELEMS
_INFO_BYTES = 4 + 4 + 4 + _MASK_BYTES   # nvmlWorkloadPowerProfileInfo_v1_t

HEADER_CONSTANTS: Dict[str, int] = {
    "NVML_CLOCK_LIMIT_ID_RANGE_START": NVML_CLOCK_LIMIT_ID_RANGE_START,
    "NVML_255_MASK_NUM_ELEMS": NVML_255_MASK_NUM_ELEMS,
    "NVML_WORKLOAD_POWER_MAX_PROFILES": NVML_WORKLOAD_POWER_MAX_PROFILES,
}
HEADER_CONSTANTS.update({"NVML_POWER_PROFILE_" + k.upper(): v for k, v in POWER_PROFILES.items()})

P, U = c_void_p, c_uint
SYMBOLS: Dict[str, Tuple[Any, Tuple[Any, ...]]] = {
    "nvmlDeviceGetSupportedMemoryClocks": (c_int, (P, P, P)),
    "nvmlDeviceGetSupportedGraphicsClocks": (c_int, (P, U, P, P)),
    "nvmlDeviceSetGpuLockedClocks": (c_int, (P, U, U)),
    "nvmlDeviceResetGpuLockedClocks": (c_int, (P,)),
    "nvmlDeviceWorkloadPowerProfileGetProfilesInfo": (c_int, (P, P)),
    "nvmlDeviceWorkloadPowerProfileGetCurrentProfiles": (c_int, (P, P)),
    "nvmlDeviceWorkloadPowerProfileSetRequestedProfiles": (c_int, (P, P)),
    "nvmlDeviceWorkloadPowerProfileClearRequestedProfiles": (c_int, (P, P)),
}

LOCKED = "locked_sm_clocks"   # the setter key (physics.LOCKED_CLOCKS): (min, max) MHz or None
PROFILES = "power_profiles"   # the setter key: the requested profile mask (int)


def supported_graphics_clocks(max_sm_clock: int, min_sm_clock: int) -> List[int]:
    """The simulated GPU's graphics clocks, highest first, as NVML lists them."""
    top = int(max_sm_clock)
    low = max(1, min(int(min_sm_clock), top))
    out = list(range(top, low - 1, -CLOCK_STEP_MHZ))
    if out[-1] != low and low < top:
        out.append(low)
    return out


def _put_list(count_addr: Optional[int], out_addr: Optional[int], values: List[int]) -> int:
    if not count_addr:
        return _INVALID_ARGUMENT
    count = c_uint.from_address(count_addr)
    room = count.value
    count.value = len(values)
    if not out_addr or room < len(values):
        return _INSUFFICIENT_SIZE
    arr = (c_uint * len(values)).from_address(out_addr)
    for k, v in enumerate(values):
        arr[k] = int(v)
    return NVML_SUCCESS


def _mask_bytes(mask: int) -> bytes:
    return b"".join(((mask >> (32 * k)) & 0xffffffff).to_bytes(4, "little")
                    for k in range(NVML_255_MASK_NUM_ELEMS))


def _mask_at(addr: int) -> int:
    raw = ctypes.string_at(addr, _MASK_BYTES)
    return sum(int.from_bytes(raw[4 * k:4 * k + 4], "little") << (32 * k)
               for k in range(NVML_255_MASK_NUM_ELEMS))


def profiles_supported(name: Optional[str]) -> bool:
    return bool(name) and any(part in name for part in PROFILE_GPUS)


class ClockCalls:
    """Mixin of SimulatedNode: needs self._dev, self._set, self.scenario."""

    def _graphics_clocks(self, st: Dict[str, Any]) -> List[int]:
        phys = getattr(self.scenario, "physics", None)
        low = getattr(phys, "min_sm_clock", 345) if phys is not None else 345
        return supported_graphics_clocks(st["max_sm_clock"], low)

    def _c_nvmlDeviceGetSupportedMemoryClocks(self, h, count, out) -> int:
        self._dev(h, "supported_clocks")
        return _put_list(count, out, [MEMORY_CLOCK_MHZ])

    def _c_nvmlDeviceGetSupportedGraphicsClocks(self, h, mem, count, out) -> int:
        _i, _t, st = self._dev(h, "supported_clocks")
        if mem != MEMORY_CLOCK_MHZ:
            return _NOT_FOUND
        return _put_list(count, out, self._graphics_clocks(st))

    def _c_nvmlDeviceSetGpuLockedClocks(self, h, lo, hi) -> int:
        index, t, st = self._dev(h, "locked_clocks")
        if not st["setters_permitted"]:
            return _NO_PERMISSION
        symbolic = (lo >= NVML_CLOCK_LIMIT_ID_RANGE_START, hi >= NVML_CLOCK_LIMIT_ID_RANGE_START)
        if any(symbolic):
            if not all(symbolic):
                return _INVALID_ARGUMENT        # a number and a limit id mixed
            if lo == hi == NVML_CLOCK_LIMIT_ID_UNLIMITED:
                self._set(index, t, LOCKED, None)
                return NVML_SUCCESS
            return _NOT_SUPPORTED               # TDP locks: not simulated
        allowed = self._graphics_clocks(st)
        if lo > hi or lo not in allowed or hi not in allowed:
            return _INVALID_ARGUMENT
        self._set(index, t, LOCKED, (int(lo), int(hi)))
        return NVML_SUCCESS

    def _c_nvmlDeviceResetGpuLockedClocks(self, h) -> int:
        index, t, st = self._dev(h, "locked_clocks")
        if not st["setters_permitted"]:
            return _NO_PERMISSION
        self._set(index, t, LOCKED, None)
        return NVML_SUCCESS

    # -- workload power profiles
    def _profile_dev(self, h):
        index, t, st = self._dev(h, "power_profiles")
        if not profiles_supported(st.get("name")):
            return None
        return index, t, st

    def _valid_mask(self) -> int:
        return sum(1 << bit for bit in POWER_PROFILES.values())

    def _c_nvmlDeviceWorkloadPowerProfileGetProfilesInfo(self, h, out) -> int:
        got = self._profile_dev(h)
        if got is None:
            return _NOT_SUPPORTED
        if not out or c_uint.from_address(out).value != _VERSION_INFO:
            return _INVALID_ARGUMENT
        ctypes.memmove(out + 4, _mask_bytes(self._valid_mask()), _MASK_BYTES)
        base = out + 4 + _MASK_BYTES
        for name, bit in POWER_PROFILES.items():
            entry = base + bit * _INFO_BYTES
            c_uint.from_address(entry).value = (1 << 24) | _INFO_BYTES
            c_uint.from_address(entry + 4).value = bit
            c_uint.from_address(entry + 8).value = bit
        return NVML_SUCCESS

    def _c_nvmlDeviceWorkloadPowerProfileGetCurrentProfiles(self, h, out) -> int:
        got = self._profile_dev(h)
        if got is None:
            return _NOT_SUPPORTED
        _i, _t, st = got
        if not out or c_uint.from_address(out).value != _VERSION_CURRENT:
            return _INVALID_ARGUMENT
        requested = int(st.get(PROFILES) or 0)
        ctypes.memmove(out + 4, _mask_bytes(self._valid_mask()), _MASK_BYTES)
        ctypes.memmove(out + 4 + _MASK_BYTES, _mask_bytes(requested), _MASK_BYTES)
        ctypes.memmove(out + 4 + 2 * _MASK_BYTES, _mask_bytes(requested), _MASK_BYTES)
        return NVML_SUCCESS

    def _requested_change(self, h, req, add: bool) -> int:
        got = self._profile_dev(h)
        if got is None:
            return _NOT_SUPPORTED
        index, t, st = got
        if not st["setters_permitted"]:
            return _NO_PERMISSION
        if not req or c_uint.from_address(req).value != _VERSION_REQUESTED:
            return _INVALID_ARGUMENT
        mask = _mask_at(req + 4)
        if mask & ~self._valid_mask():
            return _INVALID_ARGUMENT
        current = int(st.get(PROFILES) or 0)
        self._set(index, t, PROFILES, (current | mask) if add else (current & ~mask))
        return NVML_SUCCESS

    def _c_nvmlDeviceWorkloadPowerProfileSetRequestedProfiles(self, h, req) -> int:
        return self._requested_change(h, req, True)

    def _c_nvmlDeviceWorkloadPowerProfileClearRequestedProfiles(self, h, req) -> int:
        return self._requested_change(h, req, False)


def apply_setters(state: Dict[str, Any], eff: Dict[str, Any], physics: Any) -> None:
    """A GPU state (a copy) with setter values `eff` already in it: the physics they imply
    (gpucostd.sim.physics: a locked range caps the clock the GPU asks for, then the power
    cap), and ApplicationsClocksSetting while the lock holds the clock below that."""
    from gpucostd.sim.physics import DEMAND_CLOCK, PHYSICS_INPUTS, apply_power
    from gpucostd.snapshot import CLOCK_EVENT_REASONS
    lock = state.get(LOCKED)
    if physics is not None:
        if any(k in eff for k in PHYSICS_INPUTS):
            apply_power(state, physics)
    elif lock:                                  # no [physics]: the clock as written, capped
        state.setdefault(DEMAND_CLOCK, state["sm_clock"])
        state["sm_clock"] = min(state["sm_clock"], lock[1])
    if lock and state.get(DEMAND_CLOCK, state["sm_clock"]) > lock[1]:
        have = set(state["clock_event_reasons"]) | {LOCK_REASON}
        state["clock_event_reasons"] = tuple(n for _b, n in CLOCK_EVENT_REASONS if n in have)
