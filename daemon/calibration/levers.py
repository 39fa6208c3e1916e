"""What a calibration steps, per lever: the power limit (``power``), the locked SM clock
(``clocks``: each step locks the clock to [the lowest supported, the step's MHz], the original is
"unlocked" and comes back with nvmlDeviceResetGpuLockedClocks) or the workload power profile
(``profile``, Blackwell and later). The session (gpucostd.calibration.session) writes, checks and
restores through the tuning manager's public interface (hold, save_original, set, read,
restore_held, forget_original, release), so the tuners' read-back and error texts
(tuners/gpu_power.py, tuners/gpu_clocks.py) hold for every lever.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from gpucostd.calibration.maths import LEVER_SETTINGS, Group, Params, plan as plan_groups

CLOCK_SLACK_MHZ = 30        # an SM clock this far above the locked maximum: no longer locked


def setting(grp: Group) -> str:
    return LEVER_SETTINGS[grp.lever]


def value(grp: Group, step: Any) -> Any:
    """The tuner's value for a step."""
    if grp.lever == "clocks":
        return (int(grp.clock_floor or step), int(step))
    if grp.lever == "profile":
        return str(step)
    return whole(step)


def original(grp: Group, start: Any) -> Any:
    """A start value in the tuner's (and the originals file's) form."""
    if grp.lever == "power":
        return whole(start)
    return tuner_form(grp.lever, start)


def tuner_form(lever: str, raw: Any) -> Any:
    if lever == "clocks":
        from gpucostd.tuners.gpu_clocks import clock_value
        return clock_value(raw)
    if lever == "profile":
        from gpucostd.tuners.gpu_clocks import profile_value
        return profile_value(raw)
    return whole(raw)


def whole(w: Any):
    w = round(float(w), 3)
    return int(w) if w.is_integer() else w


def info(daemon, snap, params: Params) -> Dict[str, Any]:
    """What plan() needs from NVML for the clock and profile levers (asked only when the lever
    may be one of them): supported clocks, the settings now, whether profiles exist."""
    out: Dict[str, Any] = {"clocks": {}, "start": {}, "profiles": {}}
    if params.lever == "power" or snap is None:
        return out
    gw = daemon.gateway
    t = daemon.tuning
    for g in snap.gpus:
        i = g.index
        if params.lever in ("auto", "clocks"):
            try:
                out["clocks"][i] = gw.get_supported_sm_clocks(i)
                out["start"][("locked_sm_clocks_mhz", i)] = t.read("locked_sm_clocks_mhz", i)
            except Exception as e:  # noqa: BLE001 - NvmlError, TunerError: the text says why
                out["clocks"][i] = str(e)
        if params.lever == "profile":
            try:
                out["start"][("power_profile", i)] = t.read("power_profile", i)
                out["profiles"][i] = None
            except Exception as e:  # noqa: BLE001 - TunerError: the text says why
                out["profiles"][i] = ("NVML says not supported (Blackwell and later have them)"
                                      if getattr(e, "kind", None) == "not_supported" else str(e))
    return out


def plan(daemon, snap, params: Params):
    """maths.plan with what the levers need read from the GPUs."""
    return plan_groups(snap, params, daemon.config, info(daemon, snap, params))


def start_values(daemon, snap, grp: Group) -> Dict[int, Any]:
    """Each GPU's setting before the first step, read now."""
    out: Dict[int, Any] = {}
    for i in grp.gpus:
        if grp.lever == "power":
            out[i] = float(snap.gpu(i).power_limit_watts)
        else:
            out[i] = daemon.tuning.read(setting(grp), i)
    return out


def value_text(name: str, value: Any) -> str:
    """A value of setting `name` in words, for events ("700 W", "345..1500 MHz", "unlocked")."""
    if name == "power_limit_watts":
        return f"{whole(value)} W"
    if name == "locked_sm_clocks_mhz":
        from gpucostd.tuners.gpu_clocks import clock_text
        return clock_text(value)
    return str(value)


def changed_behind(grp: Group, g, step: Any) -> Optional[str]:
    """Why the step's setting no longer holds on GPU reading `g` (None: it holds)."""
    if grp.lever == "power":
        if g.power_limit_watts is not None and abs(g.power_limit_watts - step) > 0.5:
            return (f"GPU {g.index}: the power limit changed to {g.power_limit_watts:g} W "
                    f"outside the calibration (it set {step} W)")
    elif grp.lever == "clocks":
        if g.sm_clock_mhz is not None and g.sm_clock_mhz > step + CLOCK_SLACK_MHZ:
            return (f"GPU {g.index}: the SM clock runs at {g.sm_clock_mhz:g} MHz, above the "
                    f"{step} MHz the calibration locked (unlocked outside the calibration)")
    return None


def progress(groups: List[Group], k: int) -> Dict[str, Dict[str, Any]]:
    """{"limits": {gpu: watts}, "clocks": {gpu: MHz}, "profiles": {gpu: name}} held now."""
    out: Dict[str, Dict[str, Any]] = {"limits": {}, "clocks": {}, "profiles": {}}
    key = {"power": "limits", "clocks": "clocks", "profile": "profiles"}
    for g in groups:
        for i in g.gpus:
            out[key[g.lever]][str(i)] = g.steps[k]
    return {k: v for k, v in out.items() if v}


def step_words(grp: Group, step: Any) -> str:
    if grp.lever == "clocks":
        return f"{step} MHz"
    if grp.lever == "profile":
        return str(step)
    return f"{step} W"
