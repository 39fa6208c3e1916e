"""GPU power limit: `power_limit_watts = N` or `power_limit_percent = N` (of the default limit).

The desired value is always whole watts (a percentage is rounded). It is validated against the
GPU's [min, max] before anything is written: a value outside is refused for that GPU alone, with
the allowed range in the message, and nothing is written to it.
"""
from __future__ import annotations

from typing import Any, Dict, List

from gpucostd.tuners.base import GpuSettingTuner, Planned, gpu_unusable, normalise_number

NAME = "power_limit_watts"
UNIT = "W"


class GpuPowerTuner(GpuSettingTuner):
    name = NAME
    what = "the power limit"

    def plan(self, gpu: Any, desired: Dict[str, Any], sources: Dict[str, str]) -> List[Planned]:
        if "power_limit_watts" not in desired and "power_limit_percent" not in desired:
            return []
        p = self.planned(gpu, None, "")
        label = p.label
        if "power_limit_watts" in desired:
            want = int(desired["power_limit_watts"])
            p.source = sources.get("power_limit_watts", "tuning.gpu")
            asked = f"power_limit_watts = {want}"
        else:
            pct = float(desired["power_limit_percent"])
            default = normalise_number(gpu.power_limit_default_watts)
            source = sources.get("power_limit_percent", "tuning.gpu")
            if default is None:
                p.source = f"{source} ({pct:g}%)"
                p.error = (f"{label}: power_limit_percent = {pct:g} needs the GPU's default "
                           f"power limit, which NVML did not report; use power_limit_watts")
                want = None
            else:
                want = int(round(default * pct / 100.0))
                p.source = f"{source} ({pct:g}% of {default} W)"
                asked = f"power_limit_percent = {pct:g} ({want} W)"
        p.desired = want
        if want is not None and gpu_unusable(gpu, label) is None:
            lo = normalise_number(gpu.power_limit_min_watts)
            hi = normalise_number(gpu.power_limit_max_watts)
            if lo is None or hi is None:
                p.error = (f"{label}: the allowed power limit range is unknown (NVML did not "
                           f"report it); not changed")
            elif want > hi:
                p.error = f"{label}: {asked} is above the maximum {hi} W; allowed {lo}..{hi}"
            elif want < lo:
                p.error = f"{label}: {asked} is below the minimum {lo} W; allowed {lo}..{hi}"
        return self.read_actual(p, gpu)

    def coerce(self, value: Any) -> Any:
        return normalise_number(value)

    def text(self, value: Any) -> str:
        return f"{value if value is not None else '?'} {UNIT}"

    def set_words(self, value: Any) -> str:
        return f"set the power limit to {self.text(value)}"

    def read(self, index: int) -> Any:
        return self.gateway.get_power_limit(index)

    def write(self, index: int, value: Any) -> None:
        self.gateway.set_power_limit(index, float(value))

