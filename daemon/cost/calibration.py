"""The maths of `gpucostd calibrate` (pure: no time, no I/O): the step plan, one step's
measurement window with its warm-up excluded, the table's figures and the recommendation.

A calibration steps the power limit of a GPU group (the GPUs of one inference endpoint) from
the top of its range down to the bottom and holds each step for a dwell time. The first
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
step's, the one with the most tokens per dollar (ties go to the lower limit); and, over all
steps, the one with the most tokens per joule.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

# Throttle reasons a calibration may cause; any other throttle reason aborts it.
OWN_REASON = "SwPowerCap"


def step_plan(hi: float, lo: float, steps: int) -> List[int]:
    """Whole-watt limits from `hi` down to `lo` in `steps` evenly spaced steps (both ends
    included; duplicates after rounding dropped). ValueError for a bad range."""
    if not (math.isfinite(hi) and math.isfinite(lo)) or hi < lo:
        raise ValueError(f"the range {lo:g}..{hi:g} W is empty; --from must be above --to")
    if steps < 1:
        raise ValueError(f"--steps {steps} must be at least 1")
    hi_w, lo_w = int(math.floor(hi)), int(math.ceil(lo))
    if steps == 1 or hi_w <= lo_w:
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


def step_row(limit: int, window: Window, gpu_hour_usd_sum: float, energy_usd_per_kwh: float,
             pue: float) -> Dict[str, Any]:
    """One line of the table (percent of the best step is filled in by finish_rows)."""
    tps = window.tokens_per_second()
    w = window.watts()
    usd_h = price_per_hour(gpu_hour_usd_sum, w, energy_usd_per_kwh, pue)
    tpd = tps * 3600.0 / usd_h if tps is not None and usd_h else None
    return {
        "power_limit_watts": int(limit),
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
                r["power_limit_watts"] < best["power_limit_watts"]):
            best = r
    return best


def recommend(rows: List[Dict[str, Any]], min_throughput: float) -> Dict[str, Any]:
    """{"tokens_per_dollar": row or None, "tokens_per_joule": row or None, "why": text}.

    tokens_per_dollar: the most tokens per dollar among steps at or above `min_throughput`
    (0..1) of the best step's tokens/s; tokens_per_joule: the most tokens per joule of all."""
    best = finish_rows(rows)
    out: Dict[str, Any] = {"tokens_per_dollar": None, "tokens_per_joule": None, "why": None}
    if best is None:
        out["why"] = "no step measured a token rate"
        return out
    eligible = [r for r in rows if r.get("tokens_per_second") is not None and
                r["tokens_per_second"] >= min_throughput * best * (1 - 1e-9)]
    out["tokens_per_joule"] = _argmax(rows, "tokens_per_joule")
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


# ---------------------------------------------------------------------- text
def _f(x: Any, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _wrap(text: str, width: int) -> List[str]:
    import textwrap
    indent = " " * (len(text) - len(text.lstrip(" ")) + 2)
    return textwrap.wrap(text, width, subsequent_indent=indent, break_on_hyphens=False,
                         break_long_words=False) or [""]


def format_report(report: Dict[str, Any], width: int = 100) -> str:
    """The calibration's tables and recommendations for people (fits `width` columns)."""
    lines: List[str] = []
    state = report.get("state")
    where = "simulated node " + str(report.get("scenario")) if report.get("scenario") else \
        str(report.get("host") or "this node")
    lines.extend(_wrap(f"Power-limit calibration on {where}: {state}"
                       + (f" ({report['reason']})" if report.get("reason") else ""), width))
    p = report.get("params") or {}
    if p:
        lines.append(f"  {p.get('steps')} steps, dwell {p.get('dwell_seconds'):g} s "
                     f"(warm-up {p.get('warmup_seconds'):g} s excluded), min throughput "
                     f"{p.get('min_throughput', 0) * 100:g}% of the best step, "
                     f"{'applied' if report.get('applied') else 'limits restored'}")
    cur = report.get("currency") or "USD"
    sym = "$" if cur == "USD" else cur + " "
    for g in report.get("groups") or ():
        lines.append("")
        gpus = ", ".join(str(i) for i in g["gpus"])
        lines.append(f"GPUs {gpus}" + (f" ({g['endpoint']})" if g.get("endpoint") else "")
                     + f": limits {g['steps_watts'][0]}..{g['steps_watts'][-1]} W, was "
                     + "/".join(f"{w:g}" for w in g.get("start_limits_watts") or []) + " W")
        lines.append(f"  {'LIMIT W':>7} {'DRAWN W':>8} {'MHz':>5} {'tokens/s':>10} "
                     f"{'% best':>6} {'tok/J':>7} {'tok/' + sym.strip():>10} "
                     f"{sym.strip() + '/M tok':>9}  NOTE")
        rec = g.get("recommendation") or {}
        rd = (rec.get("tokens_per_dollar") or {}).get("power_limit_watts")
        rj = (rec.get("tokens_per_joule") or {}).get("power_limit_watts")
        for r in g.get("rows") or ():
            ratio = r.get("throughput_ratio")
            note = []
            if r["power_limit_watts"] == rd:
                note.append("<- tokens/$")
            if r["power_limit_watts"] == rj:
                note.append("<- tokens/J")
            lines.append(f"  {r['power_limit_watts']:>7} {_f(r.get('power_watts'), '.1f'):>8} "
                         f"{_f(r.get('sm_clock_mhz'), '.0f'):>5} "
                         f"{_f(r.get('tokens_per_second'), ',.1f'):>10} "
                         f"{_f(None if ratio is None else ratio * 100, '.1f'):>6} "
                         f"{_f(r.get('tokens_per_joule'), '.3f'):>7} "
                         f"{_f(r.get('tokens_per_dollar'), ',.0f'):>10} "
                         f"{_f(r.get('dollars_per_million_tokens'), '.3f'):>9}  "
                         + " ".join(note))
        d, j = rec.get("tokens_per_dollar"), rec.get("tokens_per_joule")
        if d:
            lines.append(f"  Recommended: {d['power_limit_watts']} W: the most tokens per "
                         f"dollar ({_f(d.get('tokens_per_dollar'), ',.0f')}) at "
                         f"{_f((d.get('throughput_ratio') or 0) * 100, '.1f')}% of the best "
                         f"throughput")
        elif rec.get("why"):
            lines.extend(_wrap(f"  No tokens-per-dollar recommendation: {rec['why']}", width))
        if j:
            lines.append(f"  Most tokens per joule: {j['power_limit_watts']} W "
                         f"({_f(j.get('tokens_per_joule'), '.3f')} tokens/J, "
                         f"{_f((j.get('throughput_ratio') or 0) * 100, '.1f')}% of the best "
                         f"throughput)")
    if report.get("dropin"):
        lines.append("")
        lines.extend(_wrap(f"Applied: {report['dropin']} (the daemon enforces it; remove the "
                           f"file and reload to undo)", width))
        enforced = report.get("enforced_after_apply")
        if enforced:
            lines.append("  the simulated daemon then enforces: " + ", ".join(
                f"GPU {k} {_f(v, '.0f')} W" for k, v in sorted(enforced.items())))
    if report.get("notes"):
        lines.append("")
    for note in report.get("notes") or ():
        lines.extend(_wrap(note, width))
    for err in report.get("restore_errors") or ():
        lines.extend(_wrap("NOT RESTORED: " + err, width))
    return "\n".join(line if len(line) <= width else line[:width - 1] + "…"
                     for line in lines) + "\n"


__all__ = ["step_plan", "default_warmup", "Sample", "Window", "step_row", "finish_rows",
           "recommend", "format_report", "price_per_hour", "OWN_REASON"]
