"""The simulated NVML's field values, as data (nvml.h's NVML_FI_* ids; the constants and names
are checked against the real header by tests/test_nvml_header.py through
gpucostd.sim.nvml.HEADER_CONSTANTS). gpucostd.sim.nvml answers nvmlDeviceGetFieldValues from
these tables."""
from __future__ import annotations

from typing import Any, Callable, Dict, Tuple

# What nvmlDeviceGetFieldValues answers, per field id (nvml.h NVML_FI_*): the nvml.h name, the
# scenario key that `unsupported` names to make it NOT_SUPPORTED, the value type, and the value
# in NVML's unit from the GPU state (temperatures in C, power in mW, counters in ns).
# Violation-time fields take their counter from VIOLATION_FIELDS instead. An id below
# NVML_FI_MAX that is not listed answers NOT_SUPPORTED, an id outside it INVALID_ARGUMENT.
NVML_VALUE_TYPE_DOUBLE = 0
NVML_VALUE_TYPE_UNSIGNED_INT = 1
NVML_VALUE_TYPE_UNSIGNED_LONG_LONG = 3
NVML_FI_MAX = 310
_D, _U, _ULL = NVML_VALUE_TYPE_DOUBLE, NVML_VALUE_TYPE_UNSIGNED_INT, \
    NVML_VALUE_TYPE_UNSIGNED_LONG_LONG


def _mw(key: str) -> Callable[[Dict[str, Any]], int]:
    return lambda st: int(round(st[key] * 1000))


def _n(key: str) -> Callable[[Dict[str, Any]], int]:
    return lambda st: int(st[key])


def _b(key: str) -> Callable[[Dict[str, Any]], int]:
    return lambda st: 1 if st[key] else 0


FIELD_VALUES: Dict[int, Tuple[str, str, int, Callable[[Dict[str, Any]], Any]]] = {
    308: ("NVML_FI_DEV_GPU_TEMP", "temperature", _D, lambda st: float(st["temperature"])),
    82: ("NVML_FI_DEV_MEMORY_TEMP", "memory_temperature", _U,
         lambda st: int(round(st["memory_temperature"]))),
    185: ("NVML_FI_DEV_POWER_AVERAGE", "power_draw", _U,
          lambda st: int(round(min(st["power_draw"], st["power_limit"]) * 1000))),
    186: ("NVML_FI_DEV_POWER_INSTANT", "power_draw", _U,
          lambda st: int(round(min(st["power_draw"], st["power_limit"]) * 1000))),
    187: ("NVML_FI_DEV_POWER_MIN_LIMIT", "power_limit_min", _U, _mw("power_limit_min")),
    188: ("NVML_FI_DEV_POWER_MAX_LIMIT", "power_limit_max", _U, _mw("power_limit_max")),
    189: ("NVML_FI_DEV_POWER_DEFAULT_LIMIT", "power_limit_default", _U,
          _mw("power_limit_default")),
    190: ("NVML_FI_DEV_POWER_CURRENT_LIMIT", "power_limit", _U, _mw("power_limit")),
    1: ("NVML_FI_DEV_ECC_CURRENT", "ecc_mode", _U, _b("ecc_mode")),
    3: ("NVML_FI_DEV_ECC_SBE_VOL_TOTAL", "ecc_volatile_corrected", _ULL,
        _n("ecc_volatile_corrected")),
    4: ("NVML_FI_DEV_ECC_DBE_VOL_TOTAL", "ecc_volatile_uncorrected", _ULL,
        _n("ecc_volatile_uncorrected")),
    5: ("NVML_FI_DEV_ECC_SBE_AGG_TOTAL", "ecc_aggregate_corrected", _ULL,
        _n("ecc_aggregate_corrected")),
    6: ("NVML_FI_DEV_ECC_DBE_AGG_TOTAL", "ecc_aggregate_uncorrected", _ULL,
        _n("ecc_aggregate_uncorrected")),
    29: ("NVML_FI_DEV_RETIRED_SBE", "retired_pages_sbe", _U, _n("retired_pages_sbe")),
    30: ("NVML_FI_DEV_RETIRED_DBE", "retired_pages_dbe", _U, _n("retired_pages_dbe")),
    31: ("NVML_FI_DEV_RETIRED_PENDING", "retired_pages_pending", _U,
         _b("retired_pages_pending")),
    142: ("NVML_FI_DEV_REMAPPED_COR", "remapped_rows_correctable", _U,
          _n("remapped_rows_correctable")),
    143: ("NVML_FI_DEV_REMAPPED_UNC", "remapped_rows_uncorrectable", _U,
          _n("remapped_rows_uncorrectable")),
    144: ("NVML_FI_DEV_REMAPPED_PENDING", "remapped_rows_pending", _U,
          _b("remapped_rows_pending")),
    145: ("NVML_FI_DEV_REMAPPED_FAILURE", "remapped_rows_failure", _U,
          _b("remapped_rows_failure")),
    94: ("NVML_FI_DEV_PCIE_REPLAY_COUNTER", "pcie_replay_count", _U, _n("pcie_replay_count")),
    230: ("NVML_FI_DEV_GET_GPU_RECOVERY_ACTION", "recovery_action", _U, _n("recovery_action")),
}
# The energy counter (mJ) is an exact integral with the setters' changes, read like the
# throttle counters: field id -> (nvml.h name, scenario key that `unsupported` names).
ENERGY_FIELDS: Dict[int, Tuple[str, str]] = {
    83: ("NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "total_energy"),
}
# Throttle-duration fields (ns): field id -> (nvml.h name, counter key of VIOLATION_POLICIES).
# All need violation_counters; the three clock-event ones (newer drivers) also answer
# NOT_SUPPORTED where `unsupported` names "clock_event_durations".
VIOLATION_FIELDS: Dict[int, Tuple[str, str]] = {
    74: ("NVML_FI_DEV_CLOCKS_EVENT_REASON_SW_POWER_CAP", "power"),
    76: ("NVML_FI_DEV_CLOCKS_EVENT_REASON_SYNC_BOOST", "sync_boost"),
    77: ("NVML_FI_DEV_PERF_POLICY_BOARD_LIMIT", "board_limit"),
    78: ("NVML_FI_DEV_PERF_POLICY_LOW_UTILIZATION", "low_utilization"),
    79: ("NVML_FI_DEV_PERF_POLICY_RELIABILITY", "reliability"),
    81: ("NVML_FI_DEV_PERF_POLICY_TOTAL_BASE_CLOCKS", "total_base_clocks"),
    269: ("NVML_FI_DEV_CLOCKS_EVENT_REASON_SW_THERM_SLOWDOWN", "sw_thermal"),
    270: ("NVML_FI_DEV_CLOCKS_EVENT_REASON_HW_THERM_SLOWDOWN", "hw_thermal"),
    271: ("NVML_FI_DEV_CLOCKS_EVENT_REASON_HW_POWER_BRAKE_SLOWDOWN", "hw_power_brake"),
}
CLOCK_EVENT_DURATION_FIELDS = (269, 270, 271)
