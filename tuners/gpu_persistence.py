"""GPU persistence mode: `persistence_mode = true|false` (keeps the driver initialised)."""
from __future__ import annotations

from typing import Any, Dict, List

from gpucostd.tuners.base import GpuSettingTuner, Planned

NAME = "persistence_mode"


class GpuPersistenceTuner(GpuSettingTuner):
    name = NAME
    what = "persistence mode"

    def plan(self, gpu: Any, desired: Dict[str, Any], sources: Dict[str, str]) -> List[Planned]:
        if NAME not in desired:
            return []
        p = self.planned(gpu, bool(desired[NAME]), sources.get(NAME, "tuning.gpu"))
        return self.read_actual(p, gpu)

    def coerce(self, value: Any) -> Any:
        return bool(value)

    def set_words(self, value: Any) -> str:
        return f"turn persistence mode {self.text(value)}"

    def read(self, index: int) -> Any:
        return self.gateway.get_persistence_mode(index)

    def write(self, index: int, value: Any) -> None:
        self.gateway.set_persistence_mode(index, value)
