"""The maths of `gpucostd calibrate` (pure: no time, no I/O): the lever and the step plan, one
step's measurement window with its warm-up excluded, the table's figures and the
recommendation (its text is gpucostd.calibration.report).

A calibration steps one lever of a GPU group (the GPUs of one inference endpoint): the power
limit, the locked SM clock or the workload power profile; with --lever auto, the power limit
where it binds (a GPU draws BINDS_AT of it or more, or SwPowerCap is seen), else the SM clock
(``choose_lever``). It goes from the top of the range down to the bottom and holds each step
for a dwell time. The first
`warmup` seconds of a step are not measured (the clock settles within milliseconds, but the
server's batches and the token counter need a few scrapes); the rest is the window::

    tokens/s        = (tokens at the window's last sample - at its first) / window seconds
    watts           = energy counter difference / window seconds (sum over the group's GPUs;
                      the mean of the sampled draw where a GPU has no energy counter)
    $/h             = sum of the GPUs' GPU-hour prices + watts / 1000 x PUE x $/kWh
    tokens/J        = tokens/s / watts
    tokens/$        = tokens/s x 3600 / ($/h)
    $/M tokens      = 1e6 / tokens/$

The recommendation: among the steps whose throughput is at least `min_throughput` of the best
step's, the one with the most tokens per dollar (ties go to the lower setting); the most
tokens per joule at or above that floor (with its gain over the first step); and, over all
steps, the one with the most tokens per joule.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from gpucostd.calibration.mig import endpoint_groups, gpu_activity, gpu_busy, group_reading
from gpucostd.snapshot import GpuState, Severity, THROTTLE_REASONS

# Throttle reasons a calibration may cause; any other throttle reason aborts it.
OWN_REASON = "SwPowerCap"
FOREIGN_REASONS = tuple(r for r in THROTTLE_REASONS if r != OWN_REASON)


# The levers a calibration sweeps, the key of a row's setting, its unit, and the config key
# --apply writes (docs/tuning.md, "Levers").
LEVERS = ("auto", "power", "clocks", "profile")
LEVER_KEYS = {"power": "power_limit_watts", "clocks": "locked_sm_clock_mhz",
              "profile": "power_profile"}
LEVER_UNITS = {"power": "W", "clocks": "MHz", "profile": ""}
LEVER_SETTINGS = {"power": "power_limit_watts", "clocks": "locked_sm_clocks_mhz",
                  "profile": "power_profile"}
# The power limit binds when a GPU draws this share of it or more, or SwPowerCap is seen.
BINDS_AT = 0.95
# A sweep whose tokens/s and watts change less than this over the limits above the draw: the
# limit does not bind there.
NO_EFFECT = 0.02
# Profiles a profile sweep compares (each alone), after "none" (no profile requested).
PROFILE_STEPS = ("none", "max_p", "llm_inference", "memory_bound", "balanced", "max_q")

STEPS_TOO_FEW = ("--steps {steps} is too few: a calibration compares at least 2 limits (the "
                 "first is --from, the last --to)")


def step_plan(hi: float, lo: float, steps: int) -> List[int]:
    """Whole-watt limits from `hi` down to `lo` in `steps` evenly spaced steps (both ends
    included; duplicates after rounding dropped, so a narrow range gives fewer, and a range
    holding one whole watt gives one). ValueError for a bad range or fewer than 2 steps."""
    if not (math.isfinite(hi) and math.isfinite(lo)) or hi < lo:
        raise ValueError(f"the range {lo:g}..{hi:g} W is empty; --from must be above --to")
    if steps < 2:
        raise ValueError(STEPS_TOO_FEW.format(steps=steps))
    hi_w, lo_w = int(math.floor(hi)), int(math.ceil(lo))
    if hi_w <= lo_w:
        return [hi_w]
    out: List[int] = []
    for k in range(steps):
        w = int(round(hi_w - (hi_w - lo_w) * k / (steps - 1)))
        w = min(hi_w, max(lo_w, w))
        if w not in out:
            out.append(w)
    return out


def default_warmup(dwell: float) -> float:
    """The warm-up excluded from a step when none is given: a quarter of the dwell, at most
    15 s."""
    return min(15.0, dwell / 4.0)


@dataclass
class Sample:
    """One cycle's reading of a group: the endpoint's token counter (summed series) at its
    scrape time, and per GPU the energy counter, draw, SM clock and clock-event reasons."""
    t: float                              # monotonic seconds (the cycle)
    tokens_t: Optional[float]             # monotonic seconds of the scrape
    tokens: Optional[float]               # the endpoint's token counter
    energy_joules: Optional[float]        # sum over the group (None if any GPU lacks one)
    power_watts: Optional[float]          # sum of the sampled draw
    sm_clock_mhz: Optional[float]         # mean over the group
    reasons: Tuple[str, ...] = ()
    activity: Optional[float] = None      # mean SM activity (GPM) or GPU-Util, 0..1


@dataclass
class Window:
    """The samples of one step after its warm-up."""
    samples: List[Sample] = field(default_factory=list)

    def add(self, s: Sample) -> None:
        self.samples.append(s)

    @property
    def seconds(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        return self.samples[-1].t - self.samples[0].t

    def tokens_per_second(self) -> Optional[float]:
        pts = [s for s in self.samples if s.tokens is not None and s.tokens_t is not None]
        if len(pts) < 2:
            return None
        dt = pts[-1].tokens_t - pts[0].tokens_t
        dn = pts[-1].tokens - pts[0].tokens
        if dt <= 0 or dn < 0:          # a counter reset (server restart) is no rate
            return None
        return dn / dt

    def watts(self) -> Optional[float]:
        ss = self.samples
        if len(ss) >= 2 and all(s.energy_joules is not None for s in ss):
            dt = ss[-1].t - ss[0].t
            de = ss[-1].energy_joules - ss[0].energy_joules
            if dt > 0 and de >= 0:
                return de / dt
        ws = [s.power_watts for s in ss if s.power_watts is not None]
        return sum(ws) / len(ws) if ws else None

    def energy_joules(self) -> Optional[float]:
        w = self.watts()
        return w * self.seconds if w is not None else None

    def sm_clock_mhz(self) -> Optional[float]:
        cs = [s.sm_clock_mhz for s in self.samples if s.sm_clock_mhz is not None]
        return sum(cs) / len(cs) if cs else None

    def activity(self) -> Optional[float]:
        xs = [s.activity for s in self.samples if s.activity is not None]
        return sum(xs) / len(xs) if xs else None

    def reasons(self) -> Tuple[str, ...]:
        seen: List[str] = []
        for s in self.samples:
            for r in s.reasons:
                if r not in seen:
                    seen.append(r)
        return tuple(seen)


def price_per_hour(gpu_hour_usd_sum: float, watts: Optional[float], energy_usd_per_kwh: float,
                   pue: float) -> Optional[float]:
    """$/h of a group: its GPU-hours plus the energy it draws (x PUE). None without a price."""
    energy = (watts / 1000.0 * pue * energy_usd_per_kwh) if watts is not None else 0.0
    total = gpu_hour_usd_sum + energy
    return total if total > 0 else None


def step_row(limit: Any, window: Window, gpu_hour_usd_sum: float, energy_usd_per_kwh: float,
             pue: float, lever: str = "power") -> Dict[str, Any]:
    """One line of the table (percent of the best step is filled in by finish_rows). `limit`
    is the step's setting: watts (lever "power"), the locked maximum SM clock in MHz
    ("clocks") or a workload power profile ("profile"); the row holds it under the lever's
    key and as "setting"."""
    tps = window.tokens_per_second()
    w = window.watts()
    usd_h = price_per_hour(gpu_hour_usd_sum, w, energy_usd_per_kwh, pue)
    tpd = tps * 3600.0 / usd_h if tps is not None and usd_h else None
    key = LEVER_KEYS[lever]
    return {
        key: limit if lever == "profile" else int(limit),
        "lever": lever, "setting": limit if lever == "profile" else int(limit),
        "activity": _r(window.activity(), 3),
        "power_watts": _r(w, 1),
        "sm_clock_mhz": _r(window.sm_clock_mhz(), 0),
        "tokens_per_second": _r(tps, 2),
        "throughput_ratio": None,
        "tokens_per_joule": _r(tps / w, 4) if tps is not None and w else None,
        "dollars_per_hour": _r(usd_h, 4),
        "tokens_per_dollar": _r(tpd, 1),
        "dollars_per_million_tokens": _r(1e6 / tpd, 4) if tpd else None,
        "window_seconds": _r(window.seconds, 1),
        "energy_joules": _r(window.energy_joules(), 1),
        "samples": len(window.samples),
        "reasons": list(window.reasons()),
    }


def finish_rows(rows: List[Dict[str, Any]]) -> Optional[float]:
    """Fill each row's throughput_ratio (tokens/s over the best step's); returns the best
    tokens/s (None when no step has a rate)."""
    rates = [r["tokens_per_second"] for r in rows if r.get("tokens_per_second") is not None]
    best = max(rates) if rates else None
    for r in rows:
        t = r.get("tokens_per_second")
        r["throughput_ratio"] = _r(t / best, 4) if best and t is not None else None
    return best


def _argmax(rows: Sequence[Dict[str, Any]], key: str) -> Optional[Dict[str, Any]]:
    best = None
    for r in rows:
        v = r.get(key)
        if v is None:
            continue
        if best is None or v > best[key] * (1 + 1e-9) or (
                abs(v - best[key]) <= abs(best[key]) * 1e-9 and
                _lower(r, best)):
            best = r
    return best


def _lower(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
    """Ties go to the lower setting (watts or MHz; a profile keeps the first)."""
    x, y = setting_of(a), setting_of(b)
    return isinstance(x, (int, float)) and isinstance(y, (int, float)) and x < y


def setting_of(row: Dict[str, Any]) -> Any:
    return row.get("setting", row.get("power_limit_watts"))


def recommend(rows: List[Dict[str, Any]], min_throughput: float) -> Dict[str, Any]:
    """{"tokens_per_dollar": row or None, "tokens_per_joule": row or None,
    "tokens_per_joule_at_floor": row or None, "joule_gain": ratio or None, "why": text}.

    tokens_per_dollar: the most tokens per dollar among steps at or above `min_throughput`
    (0..1) of the best step's tokens/s; tokens_per_joule: the most tokens per joule of all;
    tokens_per_joule_at_floor: the most tokens per joule at or above `min_throughput`, and
    joule_gain its tokens per joule over the first step's (the setting as it was at the top)
    minus 1."""
    best = finish_rows(rows)
    out: Dict[str, Any] = {"tokens_per_dollar": None, "tokens_per_joule": None,
                           "tokens_per_joule_at_floor": None, "joule_gain": None, "why": None}
    if best is None:
        out["why"] = "no step measured a token rate"
        return out
    eligible = [r for r in rows if r.get("tokens_per_second") is not None and
                r["tokens_per_second"] >= min_throughput * best * (1 - 1e-9)]
    out["tokens_per_joule"] = _argmax(rows, "tokens_per_joule")
    floor = out["tokens_per_joule_at_floor"] = _argmax(eligible, "tokens_per_joule")
    first = rows[0].get("tokens_per_joule") if rows else None
    if floor is not None and first:
        out["joule_gain"] = _r(floor["tokens_per_joule"] / first - 1.0, 4)
    per_dollar = _argmax(eligible, "tokens_per_dollar")
    out["tokens_per_dollar"] = per_dollar
    if per_dollar is None:
        out["why"] = ("no price: set [cost] gpu_hour_usd (and energy_usd_per_kwh) for tokens "
                      "per dollar")
    return out


def _r(x: Optional[float], nd: int) -> Optional[float]:
    if x is None or not math.isfinite(x):
        return None
    return round(float(x), nd)


# ---------------------------------------------------------------------- plan
class CalibrationRefused(Exception):
    """The calibration cannot start; str() says why and what to do."""


# ---------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class Params:
    gpus: Optional[Tuple[int, ...]] = None   # None: all
    from_watts: Optional[float] = None
    to_watts: Optional[float] = None
    steps: int = 6
    dwell_seconds: float = 60.0
    warmup_seconds: Optional[float] = None
    min_throughput: float = 0.95
    abort_below: float = 0.5
    apply: bool = False
    lever: str = "auto"
    from_mhz: Optional[float] = None
    to_mhz: Optional[float] = None

    @property
    def warmup(self) -> float:
        return default_warmup(self.dwell_seconds) if self.warmup_seconds is None \
            else self.warmup_seconds

    def to_json(self) -> Dict[str, Any]:
        return {"gpus": list(self.gpus) if self.gpus is not None else "all",
                "from_watts": self.from_watts, "to_watts": self.to_watts, "steps": self.steps,
                "dwell_seconds": self.dwell_seconds, "warmup_seconds": self.warmup,
                "min_throughput": self.min_throughput, "abort_below": self.abort_below,
                "apply": self.apply, "lever": self.lever, "from_mhz": self.from_mhz,
                "to_mhz": self.to_mhz}


def params_from(d: Dict[str, Any]) -> Params:
    """Params from a request / the command line; ValueError says which value is wrong."""
    if not isinstance(d, dict):     # {"params": [1]} on the socket
        raise ValueError(f"params = {str(d)[:60]} must be an object such as "
                         f'{{"gpus": [0], "steps": 4}}')
    def num(key, lo, hi, default, integer=False):
        v = d.get(key, default)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{key} = {v!r} must be a number")
        if integer and int(v) != v:
            raise ValueError(f"{key} = {v!r} must be a whole number")
        if not lo <= v <= hi:
            raise ValueError(f"{key} = {v!r} is out of range; allowed {lo:g}..{hi:g}")
        return int(v) if integer else float(v)

    gpus = d.get("gpus", "all")
    if gpus in (None, "all"):
        gtuple = None
    elif isinstance(gpus, str):
        try:
            gtuple = tuple(sorted({int(x) for x in gpus.split(",") if x.strip()}))
        except ValueError:
            raise ValueError(f"--gpus {gpus!r} must be 'all' or indexes like 0,1") from None
        if not gtuple:
            raise ValueError("--gpus is empty; give indexes like 0,1 or 'all'")
    elif isinstance(gpus, list) and all(isinstance(x, int) and not isinstance(x, bool)
                                        for x in gpus) and gpus:
        gtuple = tuple(sorted(set(gpus)))
    else:
        raise ValueError(f"gpus = {gpus!r} must be 'all' or a list of indexes")
    dwell = num("dwell_seconds", 2, 3600, 60.0)
    warm = num("warmup_seconds", 0, 3600, None)
    if warm is not None and warm >= dwell:
        raise ValueError(f"--warmup {warm:g} must be shorter than --dwell {dwell:g}")
    steps = d.get("steps", 6)
    if isinstance(steps, int) and not isinstance(steps, bool) and steps < 2:
        raise ValueError(STEPS_TOO_FEW.format(steps=steps))
    lever = d.get("lever") or "auto"
    if lever not in LEVERS:
        raise ValueError(f"--lever {lever!r}: choose one of {', '.join(LEVERS)}")
    p = Params(gtuple, num("from_watts", 1, 100000, None), num("to_watts", 1, 100000, None),
               num("steps", 2, 100, 6, integer=True), dwell, warm,
               num("min_throughput", 0, 1, 0.95), num("abort_below", 0, 1, 0.5),
               bool(d.get("apply", False)), lever, num("from_mhz", 1, 100000, None),
               num("to_mhz", 1, 100000, None))
    if p.from_mhz is not None and p.to_mhz is not None and p.to_mhz >= p.from_mhz:
        raise ValueError(f"--to-mhz {p.to_mhz:g} must be below --from-mhz {p.from_mhz:g}: a "
                         f"calibration compares at least 2 clocks")
    if p.from_watts is not None and p.to_watts is not None and \
            math.ceil(p.to_watts) >= math.floor(p.from_watts):
        raise ValueError(f"--to {p.to_watts:g} must be below --from {p.from_watts:g} (a whole "
                         f"watt apart at least): a calibration compares at least 2 limits")
    return p


# ---------------------------------------------------------------------- groups
@dataclass
class Group:
    gpus: Tuple[int, ...]
    url: Optional[str]                       # the endpoint whose tokens are the group's
    uuids: Dict[int, Optional[str]] = field(default_factory=dict)
    names: Dict[int, Optional[str]] = field(default_factory=dict)
    steps: List[int] = field(default_factory=list)
    lo: float = 0.0
    hi: float = 0.0
    start: Dict[int, float] = field(default_factory=dict)      # the limit before the first step
    saved: Dict[int, bool] = field(default_factory=dict)       # originals saved by us
    rows: List[Dict[str, Any]] = field(default_factory=list)
    window: Window = field(default_factory=Window)
    skipped: Optional[str] = None
    done: bool = False                       # stepped through its whole plan (or ended)
    restored: bool = False                   # its limits are back at `start`
    price_sum: float = 0.0
    recommendation: Dict[str, Any] = field(default_factory=dict)
    lever: str = "power"                     # what its steps set (power, clocks, profile)
    lever_why: Optional[str] = None          # why (with --lever auto: what was measured)
    clock_floor: int = 0                     # the lowest supported clock: a lock's minimum
    notes: List[str] = field(default_factory=list)
    urls: Tuple[str, ...] = ()               # every endpoint whose tokens are summed (MIG)

    def label(self) -> str:
        return "GPU" + ("s " if len(self.gpus) > 1 else " ") + ", ".join(map(str, self.gpus))


def _foreign(reasons) -> List[str]:
    return [r for r in (reasons or ()) if r in FOREIGN_REASONS]


def gpu_trouble(snap, index: int) -> Optional[str]:
    """Why GPU `index` is not fit to calibrate now (None: fit). The calibration's own
    SwPowerCap finding does not count."""
    g = snap.gpu(index)
    if g is None:
        return f"GPU {index} is not on this node"
    if g.state != GpuState.OK:
        return f"GPU {index} is {g.state.value}" + (f": {g.error}" if g.error else "")
    bad = [f for f in snap.findings if (f.gpu == index or f.subject == f"gpu:{index}")
           and f.severity not in (Severity.OK,) and f.code != "sw_power_cap"]
    if bad:
        f = max(bad, key=lambda f: int(f.severity))
        return f"GPU {index} health is {f.severity.name}: {f.message}"
    foreign = _foreign(g.clock_event_reasons)
    if foreign:
        return f"GPU {index} is throttled by {', '.join(foreign)} (not by its power limit)"
    return None


def plan(snap, params: Params, config, levers: Optional[Dict[str, Any]] = None
         ) -> Tuple[List[Group], List[str]]:
    """The groups to calibrate and notes on the GPUs left out. Raises CalibrationRefused.
    `levers` holds what the clock and profile levers need from NVML (LeverInfo, filled by
    gpucostd.calibration.levers): {"clocks": {gpu: [MHz, ...] or why not}, "start": {(setting,
    gpu): value}, "profiles": {gpu: None or why not}}."""
    if snap is None:
        raise CalibrationRefused("the daemon has no reading yet; try again in a second")
    if not snap.gpus:
        raise CalibrationRefused("no GPUs to calibrate (NVML: "
                                 f"{snap.nvml_error or 'reports none'})")
    readings = list(snap.inference or ())
    wanted = set(params.gpus) if params.gpus is not None else None
    if wanted is not None:
        missing = sorted(wanted - {g.index for g in snap.gpus})
        if missing:
            raise CalibrationRefused(f"GPU {', '.join(map(str, missing))} not on this node "
                                     f"(GPUs: {', '.join(str(g.index) for g in snap.gpus)})")
    busy = float(config.cost.busy_utilization_percent)
    groups: List[Group] = []
    notes: List[str] = []
    by_url = {r.url: r for r in readings if r is not None}
    for gpus, url, urls in endpoint_groups(snap, readings):   # MIG: calibration/mig.py
        if wanted is not None and not wanted & set(gpus):
            continue
        if wanted is not None and not set(gpus) <= wanted:
            raise CalibrationRefused(
                f"GPUs {', '.join(map(str, gpus))} serve one endpoint ({url}); calibrate them "
                f"together: --gpus {','.join(map(str, gpus))}")
        label = ", ".join(map(str, gpus))
        why = None
        reading = group_reading(url, urls, by_url)
        if url is None:
            why = (f"no token source maps to GPU {label}: configure its inference server "
                   f"([[inference.endpoint]] url and gpus)")
        elif reading is None or not reading.ok:
            why = (f"the inference endpoint {getattr(reading, 'url', '') or ''} of GPUs {label} "
                   f"does not answer "
                   f"({getattr(reading, 'error', None) or 'no reading'})")
        for i in gpus:
            if why:
                break
            why = gpu_trouble(snap, i)
            g = snap.gpu(i)
            if why is None and not gpu_busy(g, busy):
                why = (f"GPU {i} is idle ({_pct(g.utilization_percent)} utilization): a "
                       f"calibration needs steady traffic; run it under normal load")
            if why is None and (g.power_limit_min_watts is None or
                                g.power_limit_max_watts is None or g.power_limit_watts is None):
                why = f"GPU {i} does not report its power limit and range"
        grp = Group(tuple(gpus), url, lever=params.lever, urls=urls)
        readings_g = [snap.gpu(i) for i in gpus]
        if why is None and grp.lever == "auto":
            grp.lever, grp.lever_why = choose_lever(snap, gpus)
        if why is None and grp.lever in ("clocks", "profile"):
            why = _plan_other_lever(grp, readings_g, params, levers or {}, config, notes)
            if why is None:
                groups.append(grp)
                continue
        if why is None:
            grp.lo = max(g.power_limit_min_watts for g in readings_g)
            grp.hi = min(g.power_limit_max_watts for g in readings_g)
            if len(step_plan(max(grp.hi, grp.lo), grp.lo, 2)) < 2:
                why = (f"the power limit of {grp.label()} cannot be stepped: the range "
                       f"{_range(readings_g)} holds only one whole-watt limit, so there is "
                       f"nothing to compare")
        if why:
            if wanted is not None:
                raise CalibrationRefused(why)
            notes.append(f"skipped GPU {label}: {why}")
            continue
        hi = grp.hi if params.from_watts is None else params.from_watts
        lo = grp.lo if params.to_watts is None else params.to_watts
        for name, v in (("--from", hi), ("--to", lo)):
            if not grp.lo <= v <= grp.hi:
                raise CalibrationRefused(
                    f"{name} {v:g} W is outside the power limit range of GPUs {label}; "
                    f"allowed {grp.lo:g}..{grp.hi:g} W")
        try:
            grp.steps = step_plan(hi, lo, params.steps)
        except ValueError as e:
            raise CalibrationRefused(str(e)) from None
        if len(grp.steps) < 2:           # --from/--to one whole watt apart within this range
            raise CalibrationRefused(
                f"{lo:g}..{hi:g} W holds only one whole-watt limit for {grp.label()} "
                f"({grp.steps[0]} W): a calibration compares at least 2 limits")
        if len(grp.steps) < params.steps:
            notes.append(f"{grp.label()}: {lo:g}..{hi:g} W holds only {len(grp.steps)} "
                         f"distinct whole-watt limits (--steps {params.steps}): measured at "
                         f"those, the group ends after them and gets its limits back while "
                         f"the others go on")
        for g in readings_g:
            grp.uuids[g.index] = g.uuid
            grp.names[g.index] = g.name
            grp.start[g.index] = float(g.power_limit_watts)
            grp.price_sum += float(config.price_for_model(g.name))
        groups.append(grp)
    if not groups:
        raise CalibrationRefused("nothing to calibrate: " + "; ".join(
            n[len("skipped GPU "):] for n in notes) if notes else "nothing to calibrate")
    return groups, notes


def choose_lever(snap, gpus) -> Tuple[str, str]:
    """--lever auto: the power limit when it binds (a GPU draws BINDS_AT of its limit or more,
    or SwPowerCap is seen), else locked SM clocks. (lever, what was measured)."""
    seen = []
    for i in gpus:
        g = snap.gpu(i)
        draw, limit = g.power_draw_watts, g.power_limit_watts
        if "SwPowerCap" in (g.clock_event_reasons or ()):
            return "power", f"the power limit binds: GPU {i} is capped by it (SwPowerCap)"
        if draw is not None and limit and draw >= BINDS_AT * limit:
            return "power", (f"the power limit binds: GPU {i} draws {draw:.0f} W of its "
                             f"{limit:.0f} W limit")
        seen.append(f"GPU {i} draws {'?' if draw is None else format(draw, '.0f')} of "
                    f"{'?' if limit is None else format(limit, '.0f')} W")
    return "clocks", ("the power limit does not bind (" + ", ".join(seen) + "; no SwPowerCap): "
                      "the SM clock is the lever")


def clock_plan(supported: Sequence[int], hi: float, lo: float, steps: int) -> List[int]:
    """Supported clocks from `hi` down to `lo` in `steps` about evenly spaced steps (each the
    supported clock nearest its target; duplicates dropped)."""
    cand = sorted((int(c) for c in supported if lo <= c <= hi), reverse=True)
    if len(cand) < 2:
        return cand
    top, low = cand[0], cand[-1]
    out: List[int] = []
    for k in range(steps):
        target = top - (top - low) * k / (steps - 1)
        c = min(cand, key=lambda c: (abs(c - target), -c))
        if c not in out:
            out.append(c)
    return out


DEFAULT_LOWEST_CLOCK = 0.6    # a clock sweep goes down to 60% of the highest clock by default


def _plan_other_lever(grp: Group, gs, params: Params, levers: Dict[str, Any], config,
                      notes: List[str]) -> Optional[str]:
    """Steps and start values of a clock or profile sweep; why it cannot run, or None."""
    label = grp.label()
    setting = LEVER_SETTINGS[grp.lever]
    if grp.lever == "clocks":
        lists = []
        for g in gs:
            got = (levers.get("clocks") or {}).get(g.index)
            if not isinstance(got, (list, tuple)) or not got:
                return (f"GPU {g.index} cannot lock its SM clock: "
                        f"{got or 'its supported clocks are unknown'}")
            lists.append(set(got))
        common = sorted(set.intersection(*lists))
        if len(common) < 2:
            return f"{label}: the GPUs have fewer than 2 supported SM clocks in common"
        top = common[-1]
        hi = top if params.from_mhz is None else params.from_mhz
        lo = (params.to_mhz if params.to_mhz is not None
              else min(common, key=lambda c: abs(c - DEFAULT_LOWEST_CLOCK * top)))
        for name, v in (("--from-mhz", hi), ("--to-mhz", lo)):
            if not common[0] <= v <= top:
                raise CalibrationRefused(f"{name} {v:g} MHz is outside the supported SM clocks "
                                         f"of {label}: {common[0]}..{top} MHz")
        grp.steps = clock_plan(common, hi, lo, params.steps)
        if len(grp.steps) < 2:
            raise CalibrationRefused(f"{lo:g}..{hi:g} MHz holds fewer than 2 supported SM "
                                     f"clocks of {label}")
        grp.lo, grp.hi, grp.clock_floor = float(lo), float(hi), common[0]
    else:
        for g in gs:
            why = (levers.get("profiles") or {}).get(g.index, "not known to NVML")
            if why:
                return (f"GPU {g.index} has no workload power profiles: {why}; use --lever "
                        f"clocks or power")
        grp.steps = list(PROFILE_STEPS)
    start = levers.get("start") or {}
    for g in gs:
        grp.uuids[g.index] = g.uuid
        grp.names[g.index] = g.name
        grp.start[g.index] = start.get((setting, g.index),
                                       "unlocked" if grp.lever == "clocks" else "none")
        grp.price_sum += float(config.price_for_model(g.name))
    return None


def _range(gpus) -> str:
    """'697..700 W' (one GPU, or GPUs alike), else each GPU's range too."""
    spans = {(g.power_limit_min_watts, g.power_limit_max_watts) for g in gpus}
    lo = max(g.power_limit_min_watts for g in gpus)
    hi = min(g.power_limit_max_watts for g in gpus)
    text = f"{lo:g}..{hi:g} W" if lo <= hi else f"(empty: {lo:g} W min, {hi:g} W max)"
    if len(spans) > 1:
        text += " (" + ", ".join(f"GPU {g.index} {g.power_limit_min_watts:g}.."
                                 f"{g.power_limit_max_watts:g} W" for g in gpus) + ")"
    return text


def _pct(x) -> str:
    return "unknown" if x is None else f"{x:.0f}%"


def sample_of(snap, grp: Group, reading) -> Sample:
    """One cycle's Sample of a group (the calibration's window adds it after the warm-up)."""
    gs = [snap.gpu(i) for i in grp.gpus]
    energy = None
    if all(g.energy_joules is not None for g in gs):
        energy = sum(g.energy_joules for g in gs)
    power = sum(g.power_draw_watts for g in gs) if all(
        g.power_draw_watts is not None for g in gs) else None
    clocks = [g.sm_clock_mhz for g in gs if g.sm_clock_mhz is not None]
    acts = [a for a in (activity_of(g) for g in gs) if a is not None]
    reasons: List[str] = []
    for g in gs:
        for r in g.clock_event_reasons or ():
            if r not in reasons:
                reasons.append(r)
    return Sample(snap.monotonic, reading.time, reading.tokens_total, energy, power,
                  sum(clocks) / len(clocks) if clocks else None, tuple(reasons),
                  sum(acts) / len(acts) if acts else None)


def activity_of(g) -> Optional[float]:
    """What a GPU does, 0..1: its SM activity where GPM reports it (GpuReading.activity.sm),
    on a MIG GPU its instances', else GPU-Util."""
    return gpu_activity(g)


__all__ = ["CalibrationRefused", "sample_of", "Params", "params_from", "Group", "plan",
           "gpu_trouble", "step_plan", "default_warmup", "Sample", "Window", "step_row",
           "finish_rows", "recommend", "price_per_hour", "OWN_REASON", "choose_lever",
           "clock_plan", "activity_of"]
