"""Locked SM clocks (`locked_sm_clocks_mhz = [min, max]`) and workload power profiles
(`power_profile = "llm_inference"`), with the power limit's lifecycle: plan, apply (read back),
verify, restore.

Locked clocks: both values must be among the GPU's supported graphics clocks
(nvmlDeviceGetSupportedGraphicsClocks); a value outside is refused for that GPU alone with the
supported list in the message, and nothing is written. The original is "unlocked" and is
restored with nvmlDeviceResetGpuLockedClocks (what `nvidia-smi -rgc` does): NVML cannot read a
locked range back, so the value read is the range gpucostd locked (the gateway remembers it),
checked against the SM clock NVML reports: a clock above the locked maximum means someone
unlocked it (a drift). A restore always calls the reset, whatever is remembered.

Power profiles (Blackwell and later): the requested profile mask is the setting; the original
is the set requested before (usually none). Other GPUs say "not supported".
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple, Union

from gpucostd.hw.nvml_clocks import POWER_PROFILES, clocks_text
from gpucostd.tuners.base import (GpuSettingTuner, Planned, TunerError, gpu_unusable,
                                  nvml_error_text)

UNLOCKED = "unlocked"
NO_PROFILE = "none"
CLOCK_SLACK_MHZ = 30        # a read clock this far above the locked maximum: not locked
ClockValue = Union[str, Tuple[int, int]]


def clock_value(value: Any) -> ClockValue:
    """The canonical form: (min, max) or "unlocked" (from config lists, JSON, tuples)."""
    if value is None or value == UNLOCKED:
        return UNLOCKED
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return (int(value[0]), int(value[1]))
    raise ValueError(f"{value!r} is not a clock range [min, max] or {UNLOCKED!r}")


def clock_text(value: Any) -> str:
    if value is None:
        return "?"
    if value == UNLOCKED:
        return UNLOCKED
    lo, hi = value
    return f"{lo}..{hi} MHz"


class GpuLockedClocksTuner(GpuSettingTuner):
    name = "locked_sm_clocks_mhz"
    what = "the locked SM clocks"
    always_restore = True        # the original cannot be read back: always reset

    def plan(self, gpu: Any, desired: Dict[str, Any], sources: Dict[str, str]) -> List[Planned]:
        if self.name not in desired:
            return []
        want = clock_value(desired[self.name])
        p = self.planned(gpu, want, sources.get(self.name, "tuning.gpu"))
        if want != UNLOCKED and gpu_unusable(gpu, p.label) is None:
            lo, hi = want
            asked = f"{self.name} = [{lo}, {hi}]"
            try:
                allowed = self.gateway.get_supported_sm_clocks(gpu.index)
            except Exception as e:  # noqa: BLE001 - NvmlError, duck-typed
                p.error = str(nvml_error_text(p.label, "cannot read the supported SM clocks",
                                              e))
                return self.read_actual(p, gpu)
            bad = [v for v in (lo, hi) if v not in allowed]
            if lo > hi:
                p.error = f"{p.label}: {asked}: the minimum is above the maximum"
            elif bad:
                near = _nearest(allowed, bad[0])
                p.error = (f"{p.label}: {asked}: {bad[0]} MHz is not a supported SM clock "
                           f"(nearest {near}); supported: {clocks_text(allowed)}")
        return self.read_actual(p, gpu)

    def coerce(self, value: Any) -> Any:
        return clock_value(value)

    def original_value(self, raw: Any) -> Any:
        return clock_value(raw)

    def text(self, value: Any) -> str:
        return clock_text(value)

    def set_words(self, value: Any) -> str:
        if value == UNLOCKED:
            return "unlock the SM clock"
        return f"lock the SM clock to {clock_text(value)}"

    def read(self, index: int) -> Any:
        locked = self.gateway.locked_clocks(index)
        if locked is None:
            return UNLOCKED
        clock = self.gateway.get_sm_clock(index)
        if clock > locked[1] + CLOCK_SLACK_MHZ:
            return UNLOCKED       # unlocked behind our back (nvidia-smi -rgc, a reset)
        return locked

    def write(self, index: int, value: Any) -> None:
        if value == UNLOCKED:
            self.gateway.reset_locked_clocks(index)
        else:
            self.gateway.set_locked_clocks(index, value[0], value[1])


def _nearest(allowed: List[int], value: int) -> str:
    below = [c for c in allowed if c < value]
    above = [c for c in allowed if c > value]
    near = ([max(below)] if below else []) + ([min(above)] if above else [])
    return " or ".join(f"{c}" for c in near) + " MHz" if near else "none"


def profile_value(value: Any) -> str:
    """"llm_inference", "none", or several joined with "+" (sorted)."""
    if value is None or value == NO_PROFILE or value == () or value == []:
        return NO_PROFILE
    if isinstance(value, (list, tuple)):
        return "+".join(sorted(str(v) for v in value)) or NO_PROFILE
    return str(value)


class GpuPowerProfileTuner(GpuSettingTuner):
    name = "power_profile"
    what = "the workload power profile"

    def plan(self, gpu: Any, desired: Dict[str, Any], sources: Dict[str, str]) -> List[Planned]:
        if self.name not in desired:
            return []
        want = profile_value(desired[self.name])
        p = self.planned(gpu, want, sources.get(self.name, "tuning.gpu"))
        unknown = [n for n in want.split("+") if n != NO_PROFILE and n not in POWER_PROFILES]
        if unknown:
            p.error = (f"{p.label}: power_profile = {want!r} is not a workload power profile; "
                       f"choose one of: {', '.join(POWER_PROFILES)}")
            return [p]
        unusable = gpu_unusable(gpu, p.label)
        if unusable:
            p.error = unusable
            return [p]
        try:
            p.actual = self.verify(p)
        except TunerError as e:
            p.error = str(e)
            if e.kind == "not_supported":
                p.error = (f"{p.label}: power_profile = {want!r}: workload power profiles are "
                           f"not supported on this GPU (Blackwell and later have them); set it "
                           f"only for the GPUs that have them ([[tuning.gpu.override]] instead "
                           f"of [tuning.gpu])")
        return [p]

    def coerce(self, value: Any) -> Any:
        return profile_value(value)

    def original_value(self, raw: Any) -> Any:
        return profile_value(raw)

    def set_words(self, value: Any) -> str:
        return f"request the workload power profile {value}"

    def read(self, index: int) -> Any:
        return profile_value(self.gateway.get_power_profiles(index))

    def write(self, index: int, value: Any) -> None:
        names = [] if value == NO_PROFILE else value.split("+")
        self.gateway.set_power_profiles(index, names)
