"""What every tuner module shares: the planned item, the change record, the error type.

A tuner module handles one kind of setting and offers, for one planned item:
  plan (build items with desired and actual) · apply (write desired, read back) ·
  verify (read actual) · restore (write an original back, read back).
The manager (tuners/manager.py) does the rest: originals, drift, enforcement, reporting.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

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
        msg = (f"{label}: {what}: not supported on this GPU; set it only for the GPUs that "
               f"support it ([[tuning.gpu.override]] instead of [tuning.gpu])")
    elif kind == "lost":
        msg = f"{label}: {what}: the GPU is lost (fell off the bus); reset the GPU or reboot"
    elif kind == "timeout":
        msg = (f"{label}: {what}: NVML did not answer in time; the GPU may be hung (check "
               f"`dmesg` for Xid errors); it is tried again at the next verify")
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


class GpuSettingTuner:
    """One NVML setting per GPU (power limit, persistence mode): read, write with read-back,
    restore. Subclasses give the NVML read/write, the value's form and its words."""

    kind = "gpu"
    name = ""                   # the setting's name in config, originals and metrics
    what = ""                   # "the power limit": for "cannot read <what>"

    def __init__(self, gateway):
        self.gateway = gateway

    @property
    def names(self):
        return (self.name,)

    # ---- what a subclass provides
    def coerce(self, value: Any) -> Any:
        """The value in the form verify() returns and the config compares with."""
        return value

    def text(self, value: Any) -> str:
        return fmt_value(value)

    def set_words(self, value: Any) -> str:
        """"set the power limit to 600 W", "turn persistence mode on"."""
        raise NotImplementedError

    def read(self, index: int) -> Any:
        raise NotImplementedError

    def write(self, index: int, value: Any) -> None:
        raise NotImplementedError

    # ---- shared
    def planned(self, gpu: Any, desired: Any, source: str) -> Planned:
        return Planned(self, f"gpu:{gpu.index}", self.name, desired, None, source,
                       gpu_label(gpu.index, gpu.name), target=gpu.index,
                       identity={"uuid": gpu.uuid} if gpu.uuid else {})

    def read_actual(self, p: Planned, gpu: Any) -> List[Planned]:
        """plan's last step: the actual value, unless the GPU cannot be tuned now."""
        unusable = gpu_unusable(gpu, p.label)
        if unusable:
            p.error = p.error or unusable
            return [p]
        try:
            p.actual = self.verify(p)
        except TunerError as e:
            p.error = p.error or str(e)
        return [p]

    def verify(self, p: Planned) -> Any:
        try:
            return self.coerce(self.read(p.target))
        except Exception as e:   # NvmlError (duck-typed: the gateway owns the type)
            raise nvml_error_text(p.label, f"cannot read {self.what}", e) from None

    def _write(self, p: Planned, value: Any) -> Any:
        value = self.coerce(value)
        try:
            self.write(p.target, value)
        except Exception as e:
            raise nvml_error_text(p.label, f"cannot {self.set_words(value)}", e) from None
        got = self.verify(p)
        if got != value:
            raise TunerError(f"{p.label}: asked to {self.set_words(value)} but the GPU "
                             f"reports {self.text(got)}", "not_applied")
        return got

    def apply(self, p: Planned) -> Any:
        return self._write(p, p.desired)

    def restore(self, p: Planned, original: Any) -> Any:
        return self._write(p, original)
