"""GPU persistence mode: `persistence_mode = true|false` (keeps the driver initialised)."""
from __future__ import annotations

from typing import Any, Dict, List

from gpucostd.tuners.base import Planned, TunerError, gpu_label, gpu_unusable, nvml_error_text

NAME = "persistence_mode"


class GpuPersistenceTuner:
    names = (NAME,)
    kind = "gpu"

    def __init__(self, gateway):
        self.gateway = gateway

    def plan(self, gpu: Any, desired: Dict[str, Any], sources: Dict[str, str]) -> List[Planned]:
        if NAME not in desired:
            return []
        label = gpu_label(gpu.index, gpu.name)
        p = Planned(self, f"gpu:{gpu.index}", NAME, bool(desired[NAME]), None,
                    sources.get(NAME, "tuning.gpu"), label, target=gpu.index,
                    identity={"uuid": gpu.uuid} if gpu.uuid else {})
        unusable = gpu_unusable(gpu, label)
        if unusable:
            p.error = unusable
            return [p]
        try:
            p.actual = self.verify(p)
        except TunerError as e:
            p.error = str(e)
        return [p]

    def verify(self, p: Planned) -> Any:
        try:
            return bool(self.gateway.get_persistence_mode(p.target))
        except Exception as e:
            raise nvml_error_text(p.label, "cannot read persistence mode", e) from None

    def _write(self, p: Planned, value: Any) -> Any:
        word = "on" if value else "off"
        try:
            self.gateway.set_persistence_mode(p.target, bool(value))
        except Exception as e:
            raise nvml_error_text(p.label, f"cannot turn persistence mode {word}", e) from None
        got = self.verify(p)
        if got != bool(value):
            raise TunerError(f"{p.label}: persistence mode set {word} but the GPU reports "
                             f"{'on' if got else 'off'}", "not_applied")
        return got

    def apply(self, p: Planned) -> Any:
        return self._write(p, p.desired)

    def restore(self, p: Planned, original: Any) -> Any:
        return self._write(p, bool(original))
