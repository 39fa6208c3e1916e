"""What NVML's return codes mean (gpucostd.hw.nvml, the gateway, raises these): the kinds of
failure, the user's message for each code (what, where, how to fix) and the mapping from a
pynvml exception. No pynvml import here: the exception is read by its ``value``."""
from __future__ import annotations

from typing import Optional

KINDS = ("not_supported", "lost", "no_permission", "timeout", "unavailable",
         "invalid_argument", "other")

# NVML return codes (nvml.h)
_NOT_SUPPORTED = 3
_NO_PERMISSION = 4
_INVALID_ARGUMENT = 2
_UNINITIALIZED = 1
_DRIVER_NOT_LOADED = 9
_TIMEOUT = 10
_LIBRARY_NOT_FOUND = 12
_FUNCTION_NOT_FOUND = 13
_GPU_IS_LOST = 15
_RESET_REQUIRED = 16
_LIB_RM_VERSION_MISMATCH = 18

_KIND_BY_CODE = {
    _NOT_SUPPORTED: "not_supported",
    _FUNCTION_NOT_FOUND: "not_supported",   # an older driver lacks the symbol: reading absent
    _GPU_IS_LOST: "lost",
    _NO_PERMISSION: "no_permission",
    _INVALID_ARGUMENT: "invalid_argument",
    _TIMEOUT: "timeout",
    _UNINITIALIZED: "unavailable",
    _DRIVER_NOT_LOADED: "unavailable",
    _LIBRARY_NOT_FOUND: "unavailable",
    _LIB_RM_VERSION_MISMATCH: "unavailable",
}
# Kinds that end a whole device read (the other kinds only blank the one reading).
_FATAL = ("lost", "timeout", "unavailable")

# Per-field return codes that mean "this driver has no such value": NOT_SUPPORTED, and
# INVALID_ARGUMENT / FUNCTION_NOT_FOUND for a field id newer than the driver.
_FIELD_ABSENT = (_NOT_SUPPORTED, _INVALID_ARGUMENT, _FUNCTION_NOT_FOUND)
_ERROR_TEXT = {_NO_PERMISSION: "Insufficient Permissions", _TIMEOUT: "Timeout",
               _RESET_REQUIRED: "GPU requires restart", 999: "Unknown Error"}


class NvmlError(Exception):
    """An NVML failure with its meaning. ``kind`` is one of KINDS; ``str()`` is the message
    for the user (what, where, how to fix)."""

    def __init__(self, kind: str, message: str, code: Optional[int] = None,
                 gpu: Optional[int] = None, function: Optional[str] = None):
        if kind not in KINDS:
            raise ValueError(f"unknown NvmlError kind {kind!r}")
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.code = code
        self.gpu = gpu
        self.function = function

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"NvmlError({self.kind!r}, {self.message!r})"


def _where(gpu: Optional[int]) -> str:
    return "NVML" if gpu is None else f"GPU {gpu}"


def _describe(code: int, kind: str, gpu: Optional[int], what: str, text: str) -> str:
    """The user message for an NVML return code."""
    w = _where(gpu)
    if kind == "lost":
        return (f"{w}: GPU is lost (NVML_ERROR_GPU_IS_LOST in {what}): it fell off the bus or "
                "is otherwise inaccessible; drain the node, check `dmesg` for Xid 79, reset "
                "the GPU (nvidia-smi -r) or reboot")
    if kind == "no_permission":
        return (f"{w}: {what} was refused (NVML_ERROR_NO_PERMISSION): it needs root (or "
                "CAP_SYS_ADMIN) and read/write access to /dev/nvidiactl and /dev/nvidia*; run "
                "gpucostd as root (the packaged systemd unit does)")
    if kind == "not_supported":
        return f"{w}: {what} is not supported on this GPU/driver"
    if kind == "timeout":
        return f"{w}: {what} timed out inside NVML (NVML_ERROR_TIMEOUT)"
    if code == _LIBRARY_NOT_FOUND:
        return ("NVML library libnvidia-ml.so.1 not found: the NVIDIA driver is not installed "
                "(install the driver package, e.g. nvidia-driver or cuda-drivers)")
    if code == _DRIVER_NOT_LOADED:
        return ("NVIDIA kernel driver not loaded (NVML_ERROR_DRIVER_NOT_LOADED): load it with "
                "`modprobe nvidia` and check `dmesg | grep NVRM`")
    if code == _LIB_RM_VERSION_MISMATCH:
        return ("NVML library and NVIDIA kernel driver versions differ (driver upgraded "
                "without reboot?): reboot, or unload and reload the nvidia kernel modules")
    if code == _UNINITIALIZED:
        return f"{w}: NVML is not initialised ({what})"
    if code == _RESET_REQUIRED:
        return f"{w}: {what} failed: the GPU requires a reset (nvidia-smi -r) or a reboot"
    return f"{w}: {what} failed: {text} (NVML error {code})"


def _from_nvml(exc: Exception, gpu: Optional[int], what: str) -> NvmlError:
    code = getattr(exc, "value", None)
    if code is None:   # NVMLLibraryMismatchError and friends: the function is missing
        return NvmlError("not_supported", f"{_where(gpu)}: {what} is not available in this "
                         f"NVML library ({exc})", None, gpu, what)
    kind = _KIND_BY_CODE.get(code, "other")
    try:
        text = str(exc)
    except Exception:  # noqa: BLE001
        text = f"NVML error {code}"
    return NvmlError(kind, _describe(code, kind, gpu, what, text), code, gpu, what)


def _refused(err: NvmlError, index: int, doing: str) -> NvmlError:
    """The NO_PERMISSION error of a setter, with the privilege it needs."""
    return NvmlError("no_permission", f"GPU {index}: {doing} was refused "
                     "(NVML_ERROR_NO_PERMISSION): it needs root (or CAP_SYS_ADMIN); run gpucostd "
                     "as root (the packaged systemd unit does)", err.code, index, err.function)

# public names for the modules split from this one's user (they import them under their
# old local names)
ERROR_TEXT = _ERROR_TEXT
FATAL = _FATAL
FIELD_ABSENT = _FIELD_ABSENT
GPU_IS_LOST = _GPU_IS_LOST
KIND_BY_CODE = _KIND_BY_CODE
NOT_SUPPORTED = _NOT_SUPPORTED
describe = _describe
from_nvml = _from_nvml
refused = _refused
where = _where
