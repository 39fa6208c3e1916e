"""`gpucostd calibrate`'s output (pure: no time but a given one, no I/O): the drop-in --apply
writes, the report's summary for /metrics and status, the progress line, the tables and
recommendations for people, and the note that a power limit does not bind. The maths it
formats is gpucostd.calibration.maths."""
from __future__ import annotations

import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from gpucostd.calibration.maths import (LEVER_SETTINGS, LEVER_UNITS, NO_EFFECT, Group,
                                        setting_of)


def kept_overrides(previous: Mapping[str, Any], groups: Sequence[Group]
                   ) -> List[Tuple[str, Any]]:
    """(match, {setting: value}) of an earlier calibrated.toml (parsed) for GPUs this
    calibration did not step: a calibration of GPUs 2-3 keeps what one of GPUs 0-1 applied."""
    indexes = {str(i) for g in groups for i in g.gpus}
    uuids = {str(u).lower() for g in groups for u in g.uuids.values() if u}
    out: List[Tuple[str, int]] = []
    entries = ((previous.get("tuning") or {}).get("gpu") or {}).get("override") or []
    for e in entries if isinstance(entries, list) else ():
        if not isinstance(e, dict) or not isinstance(e.get("match"), str):
            continue
        settings = {k: e[k] for k in LEVER_SETTINGS.values() if k in e}
        if not settings:
            continue
        kind, _, value = e["match"].partition(":")
        if (kind == "index" and value in indexes) or (kind == "uuid" and value.lower() in uuids):
            continue
        out.append((e["match"], settings))
    return out


def setting_line(key: str, value: Any) -> str:
    """One TOML line of a drop-in."""
    if isinstance(value, (list, tuple)):
        return f"{key} = [{', '.join(str(int(v)) for v in value)}]"
    if isinstance(value, str):
        return f'{key} = "{value}"'
    return f"{key} = {int(value)}"


def lever_setting(grp: Group, value: Any) -> Tuple[str, Any]:
    """(config key, value) that puts a group's recommended step in force."""
    if grp.lever == "clocks":
        return "locked_sm_clocks_mhz", [int(grp.clock_floor or value), int(value)]
    if grp.lever == "profile":
        return "power_profile", str(value)
    return "power_limit_watts", int(value)


def dropin_text(groups: Sequence[Group], recs: Dict[int, Any], config, now: float,
                kept: Sequence[Tuple[str, Any]] = ()) -> str:
    """[[tuning.gpu.override]] per GPU with its recommended limit. The match is the one an
    override in the config already uses for that GPU (so the two merge), else its UUID.
    `kept`: (match, watts) of earlier calibrations of other GPUs, written again."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now))
    lines = [f"# Written by `gpucostd calibrate --apply` at {stamp}: the settings with the",
             "# most tokens per dollar (docs/tuning.md, \"Calibration\"). Read after",
             "# gpucostd.toml; delete this file and reload (systemctl reload gpucostd) to undo.",
             ""]
    for grp in groups:
        for i in grp.gpus:
            uuid = grp.uuids.get(i)
            match = f"uuid:{uuid}" if uuid else f"index:{i}"
            for o in config.gpu_overrides:
                if o.kind in ("index", "uuid") and o.matches(i, uuid, grp.names.get(i)):
                    match = o.match
            lines += ["[[tuning.gpu.override]]", f'match = "{match}"   # GPU {i}'
                      + (f" ({grp.url}" + (f" and {len(grp.urls) - 1} more: MIG" if
                                            len(grp.urls) > 1 else "") + ")" if grp.url else ""),
                      setting_line(*lever_setting(grp, recs[i])), ""]
    for match, settings in kept:
        lines += ["[[tuning.gpu.override]]", f'match = "{match}"   # an earlier calibration']
        lines += [setting_line(k, v) for k, v in settings.items()] + [""]
    return "\n".join(lines)


def summary(report: Dict[str, Any]) -> Dict[str, Any]:
    rec = recommended(report)
    clocks = recommended(report, "locked_sm_clock_mhz", "mhz")
    return {"id": report.get("id"), "state": report.get("state"),
            "finished_at": report.get("finished_at"), "recommended": rec,
            "applied": rec if report.get("applied") else {}, "dropin": report.get("dropin"),
            "recommended_clocks": clocks,
            "applied_clocks": clocks if report.get("applied") else {}}


def recommended(report: Dict[str, Any], key: str = "power_limit_watts",
                name: str = "watts") -> Dict[str, Dict[str, Any]]:
    """{gpu: {name: value, "uuid": ...}} of the groups whose tokens-per-dollar step set `key`
    (the power limit; "locked_sm_clock_mhz" for the clock lever)."""
    out = {}
    for g in report.get("groups") or ():
        rec = ((g.get("recommendation") or {}).get("tokens_per_dollar") or {})
        w = rec.get(key)
        if w is None:
            continue
        for i in g.get("gpus") or ():
            out[str(i)] = {name: w, "uuid": (g.get("uuids") or {}).get(str(i))}
    return out


# ---------------------------------------------------------------------- text
def progress_line(p: Dict[str, Any]) -> str:
    """The one progress line of a terminal (99 columns) from Calibration.progress()."""
    held = [(k, f"{v} W") for k, v in (p.get("limits") or {}).items()]
    held += [(k, f"{v} MHz") for k, v in (p.get("clocks") or {}).items()]
    held += [(k, str(v)) for k, v in (p.get("profiles") or {}).items()]
    where = ", ".join(f"GPU {k} {v}" for k, v in sorted(held, key=lambda x: int(x[0])))
    left = p.get("remaining_seconds")
    text = (f"calibrating: step {p.get('step')}/{p.get('steps')} {where}"
            + (f", {left:.0f} s left" if left is not None else ""))
    return text[:99].ljust(99)


def _f(x: Any, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _wrap(text: str, width: int) -> List[str]:
    import textwrap
    indent = " " * (len(text) - len(text.lstrip(" ")) + 2)
    return textwrap.wrap(text, width, subsequent_indent=indent, break_on_hyphens=False,
                         break_long_words=False) or [""]


_HEADS = {"power": "LIMIT W", "clocks": "MAX MHz", "profile": "PROFILE"}


def _step_text(lever: str, value: Any) -> str:
    if lever == "clocks":
        return f"SM clock locked at {value} MHz at most"
    if lever == "profile":
        return f"profile {value}"
    return f"{value} W"


def _was(lever: str, starts: Sequence[Any]) -> str:
    if lever == "power":
        return "/".join(f"{w:g}" for w in starts if isinstance(w, (int, float))) + " W"
    texts = []
    for v in starts:
        t = f"{v[0]}..{v[1]} MHz" if isinstance(v, (list, tuple)) else str(v)
        if t not in texts:
            texts.append(t)
    return "/".join(texts)


def _group_lines(g: Dict[str, Any], p: Dict[str, Any], sym: str, width: int) -> List[str]:
    """One group's heading, table and recommendation."""
    lines: List[str] = []
    lever = g.get("lever") or "power"
    unit = LEVER_UNITS[lever]
    steps = g.get("steps") or g.get("steps_watts") or []
    gpus = ", ".join(str(i) for i in g["gpus"])
    what = {"power": "power limits", "clocks": "locked SM clocks", "profile": "profiles"}[lever]
    span = (f"{steps[0]}..{steps[-1]}{(' ' + unit) if unit else ''}" if steps and lever != "profile"
            else ", ".join(map(str, steps)))
    more = len(g.get("endpoints") or ()) - 1        # a MIG GPU: one endpoint per instance
    lines.extend(_wrap(f"GPUs {gpus}" + (f" ({g['endpoint']}" + (
        f" and {more} more: MIG" if more > 0 else "") + ")" if g.get("endpoint") else "")
                       + f": {what} {span}"
                       + (f" ({len(steps)} steps)" if len(steps) != p.get("steps") and
                          lever != "profile" else "")
                       + ", was " + _was(lever, g.get("start") or
                                         g.get("start_limits_watts") or []), width))
    if g.get("lever_why"):
        lines.extend(_wrap(f"  lever: {lever}: {g['lever_why']}", width))
    lines.append(f"  {_HEADS[lever]:>7} {'DRAWN W':>8} {'MHz':>5} {'ACT%':>4} {'tokens/s':>10} "
                 f"{'% best':>6} {'tok/J':>7} {'tok/' + sym.strip():>10} "
                 f"{sym.strip() + '/M tok':>9}  NOTE")
    rec = g.get("recommendation") or {}
    rd = setting_of(rec.get("tokens_per_dollar") or {})
    rj = setting_of(rec.get("tokens_per_joule") or {})
    for r in g.get("rows") or ():
        ratio = r.get("throughput_ratio")
        act = r.get("activity")
        note = []
        if setting_of(r) == rd:
            note.append("<- tok/$")
        if setting_of(r) == rj:
            note.append("<- tok/J")
        lines.append(f"  {str(setting_of(r))[:7]:>7} {_f(r.get('power_watts'), '.1f'):>8} "
                     f"{_f(r.get('sm_clock_mhz'), '.0f'):>5} "
                     f"{_f(None if act is None else act * 100, '.0f'):>4} "
                     f"{_f(r.get('tokens_per_second'), ',.1f'):>10} "
                     f"{_f(None if ratio is None else ratio * 100, '.1f'):>6} "
                     f"{_f(r.get('tokens_per_joule'), '.3f'):>7} "
                     f"{_f(r.get('tokens_per_dollar'), ',.0f'):>10} "
                     f"{_f(r.get('dollars_per_million_tokens'), '.3f'):>9}  "
                     + " ".join(note))
    d, j = rec.get("tokens_per_dollar"), rec.get("tokens_per_joule")
    if d:
        lines.extend(_wrap(f"  Recommended: {_step_text(lever, setting_of(d))}: the most tokens "
                           f"per dollar ({_f(d.get('tokens_per_dollar'), ',.0f')}) at "
                           f"{_f((d.get('throughput_ratio') or 0) * 100, '.1f')}% of the best "
                           f"throughput", width))
    elif rec.get("why"):
        lines.extend(_wrap(f"  No tokens-per-dollar recommendation: {rec['why']}", width))
    jf, gain = rec.get("tokens_per_joule_at_floor"), rec.get("joule_gain")
    if jf and gain and setting_of(jf) != setting_of(j or {}):
        lines.extend(_wrap(f"  Most tokens per joule at {p.get('min_throughput', 0) * 100:g}% "
                           f"of the best throughput or more: {_step_text(lever, setting_of(jf))} "
                           f"({_f(jf.get('tokens_per_joule'), '.3f')} tokens/J, "
                           f"{gain * 100:+.1f}% over the first step, "
                           f"{_f((jf.get('throughput_ratio') or 0) * 100, '.1f')}% of the best "
                           f"throughput)", width))
    if j:
        lines.extend(_wrap(f"  Most tokens per joule: {_step_text(lever, setting_of(j))} "
                           f"({_f(j.get('tokens_per_joule'), '.3f')} tokens/J, "
                           f"{_f((j.get('throughput_ratio') or 0) * 100, '.1f')}% of the best "
                           f"throughput)", width))
    for note in g.get("notes") or ():
        lines.extend(_wrap("  " + note, width))
    return lines


def binding_note(rows: Sequence[Dict[str, Any]], n_gpus: int = 1) -> Optional[str]:
    """After a power sweep: whether the limit bound. Over the limits (per GPU) above the most
    a GPU drew in any step (the group's watts / `n_gpus`), tokens/s and watts changing less
    than NO_EFFECT means the limit did not bind there."""
    rs = [r for r in rows if r.get("tokens_per_second") and r.get("power_watts")]
    if len(rs) < 2:
        return None
    drawn = max(r["power_watts"] for r in rs) / max(1, n_gpus)
    above = [r for r in rs if setting_of(r) >= drawn * (1 + NO_EFFECT)]
    if len(above) < 2:
        return None
    tps = [r["tokens_per_second"] for r in above]
    watts = [r["power_watts"] for r in above]
    dt = (max(tps) - min(tps)) / max(tps)
    dw = (max(watts) - min(watts)) / max(watts)
    if dt < NO_EFFECT and dw < NO_EFFECT:
        return (f"The power limit does not bind: from {setting_of(above[0])} W down to "
                f"{setting_of(above[-1])} W (all above the {drawn:.0f} W a GPU draws) tokens/s "
                f"change "
                f"{dt * 100:.1f}% and watts {dw * 100:.1f}%; sweep the SM clock instead "
                f"(--lever clocks, or --lever auto)")
    return None


def format_report(report: Dict[str, Any], width: int = 100) -> str:
    """The calibration's tables and recommendations for people (fits `width` columns)."""
    lines: List[str] = []
    state = report.get("state")
    where = "simulated node " + str(report.get("scenario")) if report.get("scenario") else \
        str(report.get("host") or "this node")
    levers = sorted({g.get("lever") or "power" for g in report.get("groups") or ()})
    kind = {"power": "Power-limit", "clocks": "SM-clock", "profile": "Power-profile"}
    title = " and ".join(kind[x] for x in levers) if levers else "Power-limit"
    lines.extend(_wrap(f"{title} calibration on {where}: {state}"
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
        lines.extend(_group_lines(g, p, sym, width))
    if report.get("dropin") or report.get("dropin_text"):
        lines.append("")
        if report.get("dropin"):
            lines.extend(_wrap(f"Applied: {report['dropin']} (the daemon enforces it; remove "
                               f"the file and reload to undo)", width))
        enforced = report.get("enforced_after_apply")
        if enforced:
            lines.append("  the simulated daemon then enforces: " + ", ".join(
                f"GPU {k} {_f(v, '.0f') + ' W' if not isinstance(v, str) else v}"
                for k, v in sorted(enforced.items())))
    if report.get("notes"):
        lines.append("")
    for note in report.get("notes") or ():
        lines.extend(_wrap(note, width))
    for err in report.get("restore_errors") or ():
        lines.extend(_wrap("NOT RESTORED: " + err, width))
    return "\n".join((line if len(line) <= width else line[:width - 1] + "…").rstrip()
                     for line in lines) + "\n"
