"""`gpucostd replay`: the daemon's own loop over a scenario on a virtual clock.

run_replay() builds the real Daemon (probes through the NVML gateway over the simulated NVML,
health, cost, events) on a VirtualClock and steps it as fast as the CPU allows, then returns the
final accounting: per GPU and reason throttled seconds, capacity-lost seconds and dollars, and
the events raised. Deterministic: the same scenario, config, duration and step give the same
result (no wall-clock time, host name or randomness in it).

A replay is a what-if: it never touches the real state directory (a temporary one is used),
never runs the configured hooks, and never sends its simulated events to the system journal.
"""
from __future__ import annotations

import logging
import math
import shutil
import tempfile
import textwrap
from typing import Any, Dict, List, Optional

from gpucostd.cost.model import rounded as _rounded, sorted_reasons as _sorted_reasons

LOG = logging.getLogger("gpucostd")
DEFAULT_DURATION = 3600.0
MAX_CYCLES = 50_000_000


def replay_config(config, state_dir: str):
    """The user's config with a private state dir, no hooks, no drains, no kernel log, no
    HTTP."""
    return config.updated(
        daemon={"state_dir": state_dir, "kernel_log": "none", "listen_address": ""},
        hooks={"on_critical": [], "on_recovered": [], "on_inefficient": [], "on_efficient": []},
        drain={"backend": "none"},
        events={"max_count": max(int(config.events.max_count), 10_000_000)})


def run_replay(scenario_spec: str, config=None, duration: Optional[float] = None,
               step: float = 1.0, on_cycle=None) -> Dict[str, Any]:
    """Replay `scenario_spec` ("builtin:NAME" or a path) for `duration` seconds of scenario
    time (default: the scenario's own duration, else one hour), one daemon cycle every `step`
    seconds (cycles at t = 0, step, 2*step, ..., duration). Raises ScenarioError for a bad
    scenario and ValueError for a bad duration/step.

    `on_cycle(daemon, snapshot)`, when given, is called after every cycle (tests use it to
    reload the config at a chosen time)."""
    from gpucostd.clock import VirtualClock
    from gpucostd.config import parse
    from gpucostd.loop import Daemon
    from gpucostd.sim.scenario import load_scenario

    scenario = load_scenario(scenario_spec)       # ScenarioError with file/line/key
    if config is None:
        config = parse("", None)
    if not (isinstance(step, (int, float)) and math.isfinite(step) and step > 0):
        raise ValueError(f"--step {step!r} must be a positive number of seconds")
    if duration is None:
        duration = scenario.duration or DEFAULT_DURATION
    if not (math.isfinite(duration) and duration >= 0):
        raise ValueError(f"--duration {duration!r} must be a non-negative number of seconds")
    ratio = duration / step                       # inf for 1e300 / 1e-6: no int() of it
    if not ratio < MAX_CYCLES:
        raise ValueError(f"--duration {duration:g} with --step {step:g} is {ratio + 1:.3g} "
                         f"cycles; use a larger --step or a shorter --duration (at most "
                         f"{MAX_CYCLES} cycles)")
    cycles = int(math.floor(ratio + 1e-9)) + 1

    tmp = tempfile.mkdtemp(prefix="gpucostd-replay-")
    clock = VirtualClock()
    start_wall = clock.time()
    daemon = None
    try:
        rconfig = replay_config(config, tmp)
        # simulated events stay out of the system journal
        daemon = Daemon(rconfig, clock=clock, simulate=scenario_spec, journal=False)
        daemon.start()
        snap = None
        for i in range(cycles):
            target = i * step
            now = clock.monotonic()
            if target > now:
                clock.advance(target - now)
            snap = daemon.step()
            if on_cycle is not None:
                on_cycle(daemon, snap)
        events = list(daemon.store.query())
        report = snap.cost if snap is not None else None
        result = _result(scenario_spec, scenario, rconfig, daemon, report, events,
                         duration, step, cycles, start_wall)
    finally:
        if daemon is not None:
            try:
                daemon.shutdown(system_shutdown=True)   # nothing real to restore
            except Exception as e:  # noqa: BLE001 - cleanup must not hide the result
                LOG.debug("replay shutdown: %s", e)
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def _result(spec, scenario, config, daemon, report, events, duration, step, cycles,
            start_wall) -> Dict[str, Any]:
    gpus: List[Dict[str, Any]] = []
    node_reasons: Dict[str, Dict[str, float]] = {}
    if report is not None:
        for g in report.gpus:
            reasons = {}
            for r, c in _sorted_reasons(g.reasons):
                reasons[r] = {"throttled_seconds": _rounded(c.throttled_seconds),
                              "capacity_lost_seconds": _rounded(c.capacity_lost_seconds),
                              "dollars": _rounded(c.dollars)}
                n = node_reasons.setdefault(r, {"throttled_seconds": 0.0,
                                                "capacity_lost_seconds": 0.0, "dollars": 0.0})
                n["throttled_seconds"] += c.throttled_seconds
                n["capacity_lost_seconds"] += c.capacity_lost_seconds
                n["dollars"] += c.dollars
            x = g.extra or {}
            gpus.append({"index": g.index, "uuid": g.uuid, "name": g.name,
                         "price_per_hour": g.price_per_hour, "source": g.source,
                         **{k: x.get(k) for k in _EFF_KEYS},
                         "throttled_seconds": _rounded(sum(c.throttled_seconds
                                                           for c in g.reasons.values())),
                         "capacity_lost_seconds": _rounded(g.capacity_lost_seconds),
                         "dollars": _rounded(g.dollars), "reasons": reasons})
    cap = sum(v["capacity_lost_seconds"] for v in node_reasons.values())
    usd = sum(v["dollars"] for v in node_reasons.values())
    top = None
    if node_reasons:
        top = max(sorted(node_reasons), key=lambda r: (node_reasons[r]["dollars"],
                                                       node_reasons[r]["capacity_lost_seconds"]))
        if node_reasons[top]["capacity_lost_seconds"] <= 0:
            top = None
    per_day = (usd * 86400.0 / duration) if duration > 0 else None
    eff = _efficiency(report, gpus, duration)
    by_code: Dict[str, int] = {}
    ev_list = []
    for e in events:
        by_code[e.code] = by_code.get(e.code, 0) + 1
        ev_list.append({"t": _rounded(e.time - start_wall, 3), "subject": e.subject,
                        "code": e.code, "severity": e.severity.name, "gpu": e.gpu,
                        "xid": e.xid, "message": e.message})
    return {
        "scenario": spec,
        "scenario_name": scenario.name,
        "duration_seconds": duration,
        "step_seconds": step,
        "cycles": cycles,
        "currency": config.cost.currency,
        "gpu_hour_usd": config.cost.gpu_hour_usd,
        "busy_utilization_percent": config.cost.busy_utilization_percent,
        "gpus": gpus,
        "node": {
            "cost_dollars_per_hour": _rounded(report.node_dollars_per_hour) if report else None,
            "throttled_seconds": _rounded(sum(v["throttled_seconds"]
                                              for v in node_reasons.values())),
            "capacity_lost_seconds": _rounded(cap),
            "capacity_lost_fraction": _rounded(cap / (duration * len(gpus)))
            if duration > 0 and gpus else None,
            "dollars": _rounded(usd),
            "dollars_per_day": _rounded(per_day),
            "dollars_per_30_days": _rounded(per_day * 30) if per_day is not None else None,
            "top_reason": top,
            "reasons": {r: {k: _rounded(v) for k, v in d.items()}
                        for r, d in sorted(node_reasons.items())},
            "efficiency": eff,
        },
        "events": {"count": len(events), "by_code": dict(sorted(by_code.items())),
                   "list": ev_list},
    }


_EFF_KEYS = ("energy_joules", "energy_dollars", "paid_seconds", "idle_seconds", "idle_dollars",
             "underused_seconds", "underused_dollars")


def _efficiency(report, gpus: List[Dict[str, Any]], duration: float) -> Dict[str, Any]:
    """Tokens, energy and idle capacity over the whole replay: totals, and tokens per dollar
    as tokens made / money paid (GPU-hours of the paid time plus energy)."""
    tot = {k: sum(g.get(k) or 0.0 for g in gpus) for k in _EFF_KEYS}
    paid_gpu = sum((g.get("paid_seconds") or 0.0) * g["price_per_hour"] / 3600.0 for g in gpus)
    spent = paid_gpu + tot["energy_dollars"]
    tk = getattr(report, "tokens", None)
    made = getattr(tk, "tokens_total", None)
    out = {k: _rounded(v) for k, v in tot.items()}
    out.update({
        "tokens": _rounded(made),
        "tokens_per_second": _rounded(made / duration) if made is not None and duration > 0
        else None,
        "dollars_paid": _rounded(spent),
        "tokens_per_dollar": _rounded(made / spent) if made and spent > 0 else None,
        "cost_per_million_tokens": _rounded(spent / made * 1e6) if made and spent > 0 else None,
        "tokens_per_joule": _rounded(made / tot["energy_joules"])
        if made and tot["energy_joules"] > 0 else None,
        "idle_ratio": _rounded((tot["idle_seconds"] + tot["underused_seconds"])
                               / tot["paid_seconds"]) if tot["paid_seconds"] > 0 else None,
    })
    return out


def _money(x: Optional[float], currency: str) -> str:
    if x is None:
        return "-"
    if currency == "USD":
        return f"${x:,.2f}" if abs(x) >= 1 else f"${x:.4f}"
    return (f"{x:,.2f}" if abs(x) >= 1 else f"{x:.4f}") + f" {currency}"


def _dur(s: float) -> str:
    if s >= 86400 and s % 3600 == 0:
        return f"{s / 86400:g} d" if s % 86400 == 0 else f"{s / 3600:g} h"
    if s >= 3600 and s % 60 == 0:
        return f"{s / 3600:g} h"
    return f"{s:g} s"


def format_replay(result: Dict[str, Any], max_events: int = 10) -> str:
    """The replay's final accounting for people (100 columns)."""
    cur = result["currency"]
    priced = any(g["price_per_hour"] > 0 for g in result["gpus"])
    lines = [f"Replay of {result['scenario']}: {_dur(result['duration_seconds'])} of scenario "
             f"time, step {result['step_seconds']:g} s, {result['cycles']} cycles"]
    hdr = f"{'GPU':>3}  {'reason':<22}{'throttled s':>13}{'capacity lost s':>17}"
    if priced:
        hdr += f"{'cost':>13}"
    lines.append(hdr)
    any_row = False
    for g in result["gpus"]:
        idx = str(g["index"])
        for r, c in g["reasons"].items():
            if not c["throttled_seconds"] and not c["capacity_lost_seconds"]:
                continue
            line = (f"{idx:>3}  {r:<22}{c['throttled_seconds']:>13.1f}"
                    f"{c['capacity_lost_seconds']:>17.2f}")
            if priced:
                line += f"{_money(c['dollars'], cur):>13}"
            lines.append(line)
            idx = ""
            any_row = True
    if not any_row:
        lines.append("     (no throttling)")
    node = result["node"]
    frac = node.get("capacity_lost_fraction")
    total = (f"Node: {node['capacity_lost_seconds']:.1f} GPU-s of capacity lost"
             + (f" ({frac * 100:.2f}% of the node)" if frac is not None else ""))
    if priced:
        total += (f", {_money(node['dollars'], cur)}; at this rate "
                  f"{_money(node['dollars_per_day'], cur)}/day, "
                  f"{_money(node['dollars_per_30_days'], cur)}/30 days")
    # the figures people read this for: wrapped at a word boundary, never cut
    lines.extend(textwrap.wrap(total, 100, subsequent_indent="      ", break_long_words=False,
                               break_on_hyphens=False))
    if node.get("top_reason"):
        lines.append(f"Top reason: {node['top_reason']}")
    eff = node.get("efficiency") or {}
    if eff.get("tokens"):
        t = f"Tokens: {eff['tokens']:,.0f} ({eff['tokens_per_second']:,.0f}/s)"
        if eff.get("tokens_per_dollar"):
            t += (f", {eff['tokens_per_dollar']:,.0f} per {'$' if cur == 'USD' else cur}, "
                  f"{_money(eff['cost_per_million_tokens'], cur)} per million")
        if eff.get("tokens_per_joule"):
            t += f", {eff['tokens_per_joule']:.2f} per J"
        lines.append(t)
    if eff.get("paid_seconds"):
        e = f"Energy: {(eff.get('energy_joules') or 0) / 3.6e6:,.2f} kWh"
        if eff.get("energy_dollars"):
            e += f" ({_money(eff['energy_dollars'], cur)})"
        unused = (eff.get("idle_seconds") or 0) + (eff.get("underused_seconds") or 0)
        e += f"; unused {unused / 3600:,.2f} GPU-h ({(eff.get('idle_ratio') or 0) * 100:.1f}%)"
        if priced:
            e += (f" = idle {_money(eff.get('idle_dollars'), cur)} + underused "
                  f"{_money(eff.get('underused_dollars'), cur)}")
        lines.append(e)
    if not priced:
        lines.append("No price set ([cost] gpu_hour_usd): capacity only.")
    ev = result["events"]
    counts = ", ".join(f"{k} {v}" for k, v in ev["by_code"].items())
    lines.append(f"Events raised: {ev['count']}" + (f" ({counts})" if counts else ""))
    shown = [e for e in ev["list"] if e["code"] != "startup"][:max_events]
    for e in shown:
        lines.append(f"  t={e['t']:>9.1f}s {e['severity']:<4} {e['subject']:<7} {e['message']}")
    rest = len([e for e in ev["list"] if e["code"] != "startup"]) - len(shown)
    if rest > 0:
        lines.append(f"  ... {rest} more (--json lists them all)")
    lines.append("Note: an under-loaded GPU pays for throttling in latency rather than "
                 "throughput.")
    return "\n".join(line if len(line) <= 100 else line[:99] + "…" for line in lines) + "\n"


__all__ = ["run_replay", "format_replay"]
