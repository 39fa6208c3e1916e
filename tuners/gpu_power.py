"""GPU power limit: `power_limit_watts = N` or `power_limit_percent = N` (of the default limit).

The desired value is always whole watts (a percentage is rounded). It is validated against the
GPU's [min, max] before anything is written: a value outside is refused for that GPU alone, with
the allowed range in the message, and nothing is written to it.
"""
from __future__ import annotations

from typing import Any, Dict, List

from gpucostd.tuners.base import (Planned, TunerError, gpu_label, gpu_unusable,
                                  normalise_number, nvml_error_text)

NAME = "power_limit_watts"
UNIT = "W"


class GpuPowerTuner:
    names = (NAME,)
    kind = "gpu"

    def __init__(self, gateway):
        self.gateway = gateway

    # ------------------------------------------------------------------ plan
    def plan(self, gpu: Any, desired: Dict[str, Any], sources: Dict[str, str]) -> List[Planned]:
        if "power_limit_watts" not in desired and "power_limit_percent" not in desired:
            return []
        label = gpu_label(gpu.index, gpu.name)
        p = Planned(self, f"gpu:{gpu.index}", NAME, None, None, "", label, target=gpu.index,
                    identity={"uuid": gpu.uuid} if gpu.uuid else {})
        lo = normalise_number(gpu.power_limit_min_watts)
        hi = normalise_number(gpu.power_limit_max_watts)
        if "power_limit_watts" in desired:
            want = int(desired["power_limit_watts"])
            p.source = sources.get("power_limit_watts", "tuning.gpu")
            asked = f"power_limit_watts = {want}"
        else:
            pct = float(desired["power_limit_percent"])
            default = normalise_number(gpu.power_limit_default_watts)
            p.source = f"{sources.get('power_limit_percent', 'tuning.gpu')} ({pct:g}%)"
            if default is None:
                p.error = (f"{label}: power_limit_percent = {pct:g} needs the GPU's default "
                           f"power limit, which NVML did not report; use power_limit_watts")
                want = None
                asked = ""
            else:
                want = int(round(default * pct / 100.0))
                p.source = f"{sources.get('power_limit_percent', 'tuning.gpu')} " \
                           f"({pct:g}% of {default} W)"
                asked = f"power_limit_percent = {pct:g} ({want} W)"
        p.desired = want
        unusable = gpu_unusable(gpu, label)
        if unusable:
            p.error = p.error or unusable
            return [p]
        if want is not None and p.error is None:
            if lo is None or hi is None:
                p.error = (f"{label}: the allowed power limit range is unknown (NVML did not "
                           f"report it); not changed")
            elif want > hi:
                p.error = f"{label}: {asked} is above the maximum {hi} W; allowed {lo}..{hi}"
            elif want < lo:
                p.error = f"{label}: {asked} is below the minimum {lo} W; allowed {lo}..{hi}"
        try:
            p.actual = self.verify(p)
        except TunerError as e:
            p.error = p.error or str(e)
        return [p]

    # ------------------------------------------------------------------ read / write
    def verify(self, p: Planned) -> Any:
        try:
            return normalise_number(self.gateway.get_power_limit(p.target))
        except Exception as e:   # NvmlError (duck-typed: the gateway owns the type)
            raise nvml_error_text(p.label, "cannot read the power limit", e) from None

    def _write(self, p: Planned, value: Any) -> Any:
        try:
            self.gateway.set_power_limit(p.target, float(value))
        except Exception as e:
            raise nvml_error_text(p.label, f"cannot set the power limit to {value} W", e) \
                from None
        got = self.verify(p)
        if got != normalise_number(value):
            raise TunerError(f"{p.label}: power limit set to {value} W but the GPU reports "
                             f"{got} W", "not_applied")
        return got

    def apply(self, p: Planned) -> Any:
        return self._write(p, p.desired)

    def restore(self, p: Planned, original: Any) -> Any:
        return self._write(p, original)
