"""What every tuner module shares: the planned item, the change record, the error type.

A tuner module handles one kind of setting and offers, for one planned item:
  plan (build items with desired and actual) · apply (write desired, read back) ·
  verify (read actual) · restore (write an original back, read back).
The manager (tuners/manager.py) does the rest: originals, drift, enforcement, reporting.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from gpucostd.snapshot import Setting


class TunerError(Exception):
    """A setting that cannot be read or written. str() says what, where and how to fix."""

    def __init__(self, message: str, kind: str = "other"):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Change:
    """One write (or refused write) to one setting."""

    subject: str          # "gpu:2", "nic:eth0"
    name: str             # "power_limit_watts", "persistence_mode", "ring_rx"
    old: Any              # value before (None: unknown)
    new: Any              # value asked for
    ok: bool
    error: Optional[str] = None


@dataclass
class Planned:
    """One setting on one subject with everything needed to apply, verify and restore it."""

    tuner: Any
    subject: str
    name: str
    desired: Any
    actual: Any
    source: str
    label: str                     # "GPU 2 (NVIDIA H100 80GB HBM3)", "eth0"
    target: Any = None             # GpuReading, interface name, ...
    error: Optional[str] = None
    identity: Dict[str, Any] = field(default_factory=dict)   # stored with the original

    @property
    def key(self):
        return (self.name, self.subject)

    @property
    def in_sync(self) -> bool:
        return self.error is None and self.desired == self.actual

    def setting(self) -> Setting:
        return Setting(self.subject, self.name, self.desired, self.actual, self.source,
                       self.error)


def gpu_label(index: int, name: Optional[str]) -> str:
    return f"GPU {index} ({name})" if name else f"GPU {index}"


def nvml_error_text(label: str, what: str, exc: BaseException) -> TunerError:
    """Turn an NvmlError (duck-typed by .kind) into a TunerError whose text says what to do."""
    kind = getattr(exc, "kind", "other")
    detail = str(exc)
    if kind == "no_permission":
        msg = (f"{label}: {what}: permission denied; changing GPU settings needs root (or "
               f"CAP_SYS_ADMIN with access to /dev/nvidiactl); run gpucostd as root, e.g. via "
               f"gpucostd.service")
    elif kind == "not_supported":
        msg = f"{label}: {what}: not supported on this GPU"
    elif kind == "lost":
        msg = f"{label}: {what}: the GPU is lost (fell off the bus); reset the GPU or reboot"
    elif kind == "timeout":
        msg = f"{label}: {what}: NVML did not answer in time; the GPU may be hung"
    elif kind == "invalid_argument":
        msg = f"{label}: {what}: refused by the driver as invalid ({detail})"
    elif kind == "unavailable":
        msg = f"{label}: {what}: NVML not available ({detail})"
    else:
        msg = f"{label}: {what}: {detail or type(exc).__name__}"
    return TunerError(msg, kind)


def fmt_value(value: Any, unit: str = "") -> str:
    if value is None:
        return "?"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"{value}{(' ' + unit) if unit else ''}"


def gpu_unusable(gpu: Any, label: str) -> Optional[str]:
    """Why a GPU reading cannot be tuned now (lost, hung, NVML down), or None."""
    state = getattr(gpu, "state", None)
    value = getattr(state, "value", state)
    if value in (None, "ok"):
        return None
    why = getattr(gpu, "error", None)
    return f"{label} is {value}{': ' + why if why else ''}; not changed"


def normalise_number(value: Any) -> Any:
    """NVML gives watts as floats from milliwatts; 700.0 -> 700, 123.4567 -> 123.457."""
    if value is None or isinstance(value, bool):
        return value
    value = round(float(value), 3)
    return int(value) if value.is_integer() else value
