"""The nvml.h side of the simulated NVML (gpucostd.sim.nvml): return codes and constants, the
struct layouts the simulator writes, and the symbol table (name -> ctypes prototype) of every C
function it implements, the GPM ones (gpucostd.sim.gpm) included. tests/test_nvml_header.py
checks all of it against the real header."""
from __future__ import annotations

import ctypes
import struct
from ctypes import (Structure, Union, c_char, c_double, c_int, c_int64, c_longlong, c_uint,
                    c_uint32, c_ulong, c_ulonglong, c_ushort, c_void_p)
from typing import Any, Dict, Tuple

from gpucostd.sim.gpm import GPM_CONSTANTS, GPM_SYMBOLS

class DeviceFault(Exception):
    """Raised inside a simulated C function: the call returns `code` (an NVML return code)."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


# ----------------------------------------------------------------------- nvml.h constants
NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_INSUFFICIENT_SIZE = 7
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_UNKNOWN = 999

ERROR_STRINGS = {
    0: "Success", 1: "Uninitialized", 2: "Invalid Argument", 3: "Not Supported",
    4: "Insufficient Permissions", 5: "Already Initialized", 6: "Not Found",
    7: "Insufficient Size", 8: "Insufficient External Power", 9: "Driver Not Loaded",
    10: "Timeout", 11: "Interrupt Request Issue", 12: "NVML Shared Library Not Found",
    13: "Function Not Found", 14: "Corrupted infoROM", 15: "GPU is lost",
    16: "GPU requires restart", 17: "The operating system has blocked the request.",
    18: "RM has detected an NVML/RM version mismatch.", 19: "In use by another client",
    20: "Insufficient Memory", 21: "No data", 999: "Unknown Error",
}

NVML_TEMPERATURE_GPU = 0
NVML_TEMPERATURE_THRESHOLD_SHUTDOWN = 0
NVML_TEMPERATURE_THRESHOLD_SLOWDOWN = 1
NVML_TEMPERATURE_THRESHOLD_MEM_MAX = 2
NVML_TEMPERATURE_THRESHOLD_GPU_MAX = 3
NVML_CLOCK_GRAPHICS = 0
NVML_CLOCK_SM = 1
NVML_CLOCK_MEM = 2
NVML_CLOCK_VIDEO = 3
NVML_MEMORY_ERROR_TYPE_CORRECTED = 0
NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
NVML_VOLATILE_ECC = 0
NVML_AGGREGATE_ECC = 1
NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS = 0
NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR = 1
from gpucostd.sim.fieldvalues import (NVML_FI_MAX, NVML_VALUE_TYPE_DOUBLE,  # noqa: E402,F401
                                      NVML_VALUE_TYPE_UNSIGNED_INT,
                                      NVML_VALUE_TYPE_UNSIGNED_LONG_LONG)
NVML_DEVICE_PCI_BUS_ID_BUFFER_SIZE = 32
NVML_DEVICE_PCI_BUS_ID_BUFFER_V2_SIZE = 16

# Constants checked against nvml.h by tests/test_nvml_header.py.
HEADER_CONSTANTS: Dict[str, int] = {
    "NVML_SUCCESS": NVML_SUCCESS,
    "NVML_ERROR_UNINITIALIZED": NVML_ERROR_UNINITIALIZED,
    "NVML_ERROR_INVALID_ARGUMENT": NVML_ERROR_INVALID_ARGUMENT,
    "NVML_ERROR_NOT_SUPPORTED": NVML_ERROR_NOT_SUPPORTED,
    "NVML_ERROR_NO_PERMISSION": NVML_ERROR_NO_PERMISSION,
    "NVML_ERROR_NOT_FOUND": NVML_ERROR_NOT_FOUND,
    "NVML_ERROR_INSUFFICIENT_SIZE": NVML_ERROR_INSUFFICIENT_SIZE,
    "NVML_ERROR_DRIVER_NOT_LOADED": NVML_ERROR_DRIVER_NOT_LOADED,
    "NVML_ERROR_TIMEOUT": NVML_ERROR_TIMEOUT,
    "NVML_ERROR_GPU_IS_LOST": NVML_ERROR_GPU_IS_LOST,
    "NVML_ERROR_UNKNOWN": NVML_ERROR_UNKNOWN,
    "NVML_TEMPERATURE_GPU": NVML_TEMPERATURE_GPU,
    "NVML_TEMPERATURE_THRESHOLD_SHUTDOWN": NVML_TEMPERATURE_THRESHOLD_SHUTDOWN,
    "NVML_TEMPERATURE_THRESHOLD_SLOWDOWN": NVML_TEMPERATURE_THRESHOLD_SLOWDOWN,
    "NVML_TEMPERATURE_THRESHOLD_MEM_MAX": NVML_TEMPERATURE_THRESHOLD_MEM_MAX,
    "NVML_TEMPERATURE_THRESHOLD_GPU_MAX": NVML_TEMPERATURE_THRESHOLD_GPU_MAX,
    "NVML_CLOCK_GRAPHICS": NVML_CLOCK_GRAPHICS,
    "NVML_CLOCK_SM": NVML_CLOCK_SM,
    "NVML_CLOCK_MEM": NVML_CLOCK_MEM,
    "NVML_CLOCK_VIDEO": NVML_CLOCK_VIDEO,
    "NVML_MEMORY_ERROR_TYPE_CORRECTED": NVML_MEMORY_ERROR_TYPE_CORRECTED,
    "NVML_MEMORY_ERROR_TYPE_UNCORRECTED": NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
    "NVML_VOLATILE_ECC": NVML_VOLATILE_ECC,
    "NVML_AGGREGATE_ECC": NVML_AGGREGATE_ECC,
    "NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS":
        NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS,
    "NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR":
        NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR,
    "NVML_VALUE_TYPE_DOUBLE": NVML_VALUE_TYPE_DOUBLE,
    "NVML_VALUE_TYPE_UNSIGNED_INT": NVML_VALUE_TYPE_UNSIGNED_INT,
    "NVML_VALUE_TYPE_UNSIGNED_LONG_LONG": NVML_VALUE_TYPE_UNSIGNED_LONG_LONG,
    "NVML_FI_MAX": NVML_FI_MAX,
    "NVML_DEVICE_PCI_BUS_ID_BUFFER_SIZE": NVML_DEVICE_PCI_BUS_ID_BUFFER_SIZE,
    "NVML_DEVICE_PCI_BUS_ID_BUFFER_V2_SIZE": NVML_DEVICE_PCI_BUS_ID_BUFFER_V2_SIZE,
    "NVML_PERF_POLICY_POWER": 0,
    "NVML_PERF_POLICY_THERMAL": 1,
    "NVML_PERF_POLICY_SYNC_BOOST": 2,
    "NVML_PERF_POLICY_BOARD_LIMIT": 3,
    "NVML_PERF_POLICY_LOW_UTILIZATION": 4,
    "NVML_PERF_POLICY_RELIABILITY": 5,
    "NVML_PERF_POLICY_TOTAL_BASE_CLOCKS": 11,
}

H100_PCI_DEVICE_ID = 0x233010DE      # device 0x2330 (H100 SXM5 80GB), vendor 0x10DE
H100_PCI_SUBSYSTEM_ID = 0x16C110DE


# ----------------------------------------------------------------------- nvml.h structs
class PciInfo(Structure):           # nvmlPciInfo_t
    _fields_ = [
        ("busIdLegacy", c_char * NVML_DEVICE_PCI_BUS_ID_BUFFER_V2_SIZE),
        ("domain", c_uint),
        ("bus", c_uint),
        ("device", c_uint),
        ("pciDeviceId", c_uint),
        ("pciSubSystemId", c_uint),
        ("busId", c_char * NVML_DEVICE_PCI_BUS_ID_BUFFER_SIZE),
    ]


class Utilization(Structure):       # nvmlUtilization_t
    _fields_ = [("gpu", c_uint), ("memory", c_uint)]


class ViolationTime(Structure):     # nvmlViolationTime_t
    _fields_ = [("referenceTime", c_ulonglong), ("violationTime", c_ulonglong)]


class Value(Union):                 # nvmlValue_t
    _fields_ = [("dVal", c_double), ("siVal", c_int), ("uiVal", c_uint), ("ulVal", c_ulong),
                ("ullVal", c_ulonglong), ("sllVal", c_longlong), ("usVal", c_ushort)]


class FieldValue(Structure):        # nvmlFieldValue_t
    _fields_ = [("fieldId", c_uint32), ("scopeId", c_uint32), ("timestamp", c_int64),
                ("latencyUsec", c_int64), ("valueType", c_uint), ("nvmlReturn", c_uint),
                ("value", Value)]


# ----------------------------------------------------------------------- field values
# The tables of what nvmlDeviceGetFieldValues answers live in fieldvalues.py.
from gpucostd.sim.fieldvalues import (CLOCK_EVENT_DURATION_FIELDS, ENERGY_FIELDS,  # noqa: E402
                                      FIELD_VALUES, VIOLATION_FIELDS)

HEADER_CONSTANTS.update({name: fid for fid, (name, *_rest) in FIELD_VALUES.items()})
HEADER_CONSTANTS.update({name: fid for fid, (name, _key) in ENERGY_FIELDS.items()})
HEADER_CONSTANTS.update({name: fid for fid, (name, _key) in VIOLATION_FIELDS.items()})


# The nvmlFieldValue_t layout (written with struct: ctypes attribute access per field costs
# more than the rest of the call)
_FV_SIZE = ctypes.sizeof(FieldValue)
_FV_OFF_TS = FieldValue.timestamp.offset
_FV_OFF_VALUE = FieldValue.value.offset
assert FieldValue.latencyUsec.offset == _FV_OFF_TS + 8 and \
    FieldValue.valueType.offset == _FV_OFF_TS + 16 and FieldValue.nvmlReturn.offset == _FV_OFF_TS + 20
_FV_KEY = struct.Struct("@II")     # fieldId, scopeId
_FV_HEAD = struct.Struct("@qqII")
_FV_STAMP = struct.Struct("@q")
_FV_VALUE = {NVML_VALUE_TYPE_DOUBLE: struct.Struct("@d"),
             NVML_VALUE_TYPE_UNSIGNED_INT: struct.Struct("@I"),
             NVML_VALUE_TYPE_UNSIGNED_LONG_LONG: struct.Struct("@Q")}


# Argument kinds for the symbol table: C types as the ctypes callback sees them.
P = c_void_p      # any pointer (device handle, out-parameter, buffer)
U = c_uint        # unsigned int and every enum (pynvml passes enums as c_uint)
I = c_int

# name -> (restype, argtypes). Arg counts are checked against nvml.h.
SYMBOLS: Dict[str, Tuple[Any, Tuple[Any, ...]]] = {
    "nvmlInit_v2": (c_int, ()),
    "nvmlInitWithFlags": (c_int, (U,)),
    "nvmlShutdown": (c_int, ()),
    "nvmlErrorString": (c_void_p, (I,)),
    "nvmlSystemGetDriverVersion": (c_int, (P, U)),
    "nvmlSystemGetNVMLVersion": (c_int, (P, U)),
    "nvmlSystemGetCudaDriverVersion": (c_int, (P,)),
    "nvmlSystemGetCudaDriverVersion_v2": (c_int, (P,)),
    "nvmlDeviceGetCount_v2": (c_int, (P,)),
    "nvmlDeviceGetHandleByIndex_v2": (c_int, (U, P)),
    "nvmlDeviceGetHandleByUUID": (c_int, (P, P)),
    "nvmlDeviceGetHandleByPciBusId_v2": (c_int, (P, P)),
    "nvmlDeviceGetIndex": (c_int, (P, P)),
    "nvmlDeviceGetName": (c_int, (P, P, U)),
    "nvmlDeviceGetUUID": (c_int, (P, P, U)),
    "nvmlDeviceGetPciInfo_v3": (c_int, (P, P)),
    "nvmlDeviceGetTemperature": (c_int, (P, U, P)),
    "nvmlDeviceGetTemperatureThreshold": (c_int, (P, U, P)),
    "nvmlDeviceGetFieldValues": (c_int, (P, I, P)),
    "nvmlDeviceGetPowerUsage": (c_int, (P, P)),
    "nvmlDeviceGetPowerManagementLimit": (c_int, (P, P)),
    "nvmlDeviceGetEnforcedPowerLimit": (c_int, (P, P)),
    "nvmlDeviceGetPowerManagementLimitConstraints": (c_int, (P, P, P)),
    "nvmlDeviceGetPowerManagementDefaultLimit": (c_int, (P, P)),
    "nvmlDeviceSetPowerManagementLimit": (c_int, (P, U)),
    "nvmlDeviceGetPersistenceMode": (c_int, (P, P)),
    "nvmlDeviceSetPersistenceMode": (c_int, (P, U)),
    "nvmlDeviceGetClockInfo": (c_int, (P, U, P)),
    "nvmlDeviceGetMaxClockInfo": (c_int, (P, U, P)),
    "nvmlDeviceGetApplicationsClock": (c_int, (P, U, P)),
    "nvmlDeviceGetUtilizationRates": (c_int, (P, P)),
    "nvmlDeviceGetCurrentClocksEventReasons": (c_int, (P, P)),
    "nvmlDeviceGetCurrentClocksThrottleReasons": (c_int, (P, P)),
    "nvmlDeviceGetSupportedClocksEventReasons": (c_int, (P, P)),
    "nvmlDeviceGetSupportedClocksThrottleReasons": (c_int, (P, P)),
    "nvmlDeviceGetViolationStatus": (c_int, (P, U, P)),
    "nvmlDeviceGetEccMode": (c_int, (P, P, P)),
    "nvmlDeviceGetTotalEccErrors": (c_int, (P, U, U, P)),
    "nvmlDeviceGetRetiredPages": (c_int, (P, U, P, P)),
    "nvmlDeviceGetRetiredPagesPendingStatus": (c_int, (P, P)),
    "nvmlDeviceGetRemappedRows": (c_int, (P, P, P, P, P)),
    "nvmlDeviceGetCurrPcieLinkGeneration": (c_int, (P, P)),
    "nvmlDeviceGetMaxPcieLinkGeneration": (c_int, (P, P)),
    "nvmlDeviceGetCurrPcieLinkWidth": (c_int, (P, P)),
    "nvmlDeviceGetMaxPcieLinkWidth": (c_int, (P, P)),
    "nvmlDeviceGetPcieReplayCounter": (c_int, (P, P)),
    "nvmlDeviceGetTotalEnergyConsumption": (c_int, (P, P)),
}

SYMBOLS.update(GPM_SYMBOLS)
HEADER_CONSTANTS.update(GPM_CONSTANTS)

# public names for the modules split from this one's user (they import them under their
# old local names)
FV_HEAD = _FV_HEAD
FV_KEY = _FV_KEY
FV_OFF_TS = _FV_OFF_TS
FV_OFF_VALUE = _FV_OFF_VALUE
FV_SIZE = _FV_SIZE
FV_STAMP = _FV_STAMP
FV_VALUE = _FV_VALUE
