"""The on-call view, CLI side: status JSON -> the text `gpucostd status` prints (every line fits
100 columns), and its exit code. Standard library only (os, sys, time; textwrap when a line
wraps): `gpucostd status` must start in about the time of the interpreter itself.
"""
from __future__ import annotations

import os
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only: importing typing costs the client start-up time
    from typing import Any, Dict, List, Optional

SCHEMA_VERSION = 1
WIDTH = 100
EXIT_CODES = {"OK": 0, "WARN": 1, "CRIT": 2, "UNKNOWN": 3}


class _Style:
    def __init__(self, colour: bool):
        self.colour = colour

    def sev(self, name: str) -> str:
        if not self.colour:
            return name
        code = {"OK": "32", "WARN": "33", "CRIT": "31;1", "UNKNOWN": "35"}.get(name, "0")
        return f"\033[{code}m{name}\033[0m"


def use_colour(stream=None) -> bool:
    stream = stream or sys.stdout
    return (hasattr(stream, "isatty") and stream.isatty() and not os.environ.get("NO_COLOR")
            and os.environ.get("TERM", "") != "dumb")


def _fmt(v: Any, spec: str = "{:.0f}", unit: str = "") -> str:
    return "-" if v is None else spec.format(v) + unit


def _ago(t: Optional[float], now: float) -> str:
    if t is None:
        return "?"
    d = max(0, now - t)
    if d < 120:
        return f"{d:.0f}s"
    if d < 7200:
        return f"{d / 60:.0f}m"
    if d < 172800:
        return f"{d / 3600:.0f}h"
    return f"{d / 86400:.0f}d"


def _duration(seconds: float) -> str:
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d{h}h" if d else f"{h}h{m}m" if h else f"{m}m{s}s")


def _clip(line: str) -> str:
    return line if len(line) <= WIDTH else line[:WIDTH - 1] + "…"


def _wrap(text: str, indent: str, more: str = "") -> List[str]:
    """Wrap a message to 100 columns (findings and fixes are never cut off) at spaces, keeping
    words and commands whole (gpucostd.wrap)."""
    from gpucostd import wrap
    return wrap(text, WIDTH, initial_indent=indent, subsequent_indent=more or indent + "  ") \
        or [indent]


_CONTROLS = {c: "?" for c in list(range(0x20)) + list(range(0x7f, 0xa0))}


def _printable(value: Any, depth: int = 0) -> Any:
    """Every string of the document with control characters (terminal escapes) replaced by
    "?"; deeper than 32 levels is cut off. (The daemon does the same; this side does not trust
    the other.)"""
    if depth > 32:
        return None
    if isinstance(value, str):
        return value.translate(_CONTROLS)
    if isinstance(value, dict):
        return {_printable(k, depth + 1): _printable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_printable(v, depth + 1) for v in value]
    return value


def render_status(data: Any, colour: bool = False, events: int = 5) -> str:
    """Human view of status JSON; every line fits 100 columns. Never raises: a document it
    cannot show (another version, damaged) gives a short note pointing at --json."""
    try:
        return _render_status(_printable(data), colour, events)
    except Exception as e:  # noqa: BLE001 - a view of someone else's document must not crash
        health = "UNKNOWN"
        try:
            if str(data["node"]["health"]) in EXIT_CODES:
                health = str(data["node"]["health"])
        except Exception:  # noqa: BLE001
            pass
        why = _printable(str(e))[:80]
        return "\n".join(_wrap(f"node {health}: the status document from the daemon cannot be "
                               f"shown ({type(e).__name__}: {why}); see `gpucostd status "
                               f"--json`", "")) + "\n"


def _render_status(data: Dict[str, Any], colour: bool = False, events: int = 5) -> str:
    """Human view of status JSON; every line fits 100 columns."""
    st = _Style(colour)
    node, daemon = data["node"], data["daemon"]
    now = data.get("time") or time.time()
    sim = f" sim:{daemon['simulated_scenario']}" if daemon.get("simulated_scenario") else ""
    lines = [_clip(
        f"{data['host']}  node {st.sev(node['health'])}  {node['gpu_count']} GPUs  "
        f"driver {node.get('driver_version') or '?'}  CUDA {node.get('cuda_version') or '?'}  "
        f"up {_duration(daemon.get('uptime_seconds') or 0)}{sim}")]
    if not node.get("nvml_available"):
        lines.extend(_wrap(f"NVML unavailable: {node.get('nvml_error') or 'unknown reason'}",
                           "  "))
    cal = data.get("calibration")
    if isinstance(cal, dict):
        held = [(k, f"{v} W") for k, v in (cal.get("limits") or {}).items()]
        held += [(k, f"{v} MHz") for k, v in (cal.get("clocks") or {}).items()]
        limits = ", ".join(f"GPU {k} {v}" for k, v in sorted(held, key=lambda x: int(x[0])))
        what = "SM-clock" if cal.get("clocks") and not cal.get("limits") else "power-limit"
        lines.extend(_wrap(f"{what} calibration {cal.get('state')}: step {cal.get('step')}/"
                           f"{cal.get('steps')}" + (f", {limits}" if limits else "")
                           + (f", {cal['remaining_seconds']:.0f} s left"
                              if cal.get("remaining_seconds") is not None else "")
                           + " (gpucostd calibrate; enforcement of these limits held)", "  "))
    if data["gpus"]:
        lines.append(f"{'GPU':>3} {'MODEL':<15} {'HEALTH':<7} {'TEMP':>5} {'POWER/LIMIT':>11} "
                     f"{'SM MHz/MAX':>11}  {'UTIL':>4} {'SM/TC/MEM':>10}  THROTTLE / REASON")
    for g in data["gpus"]:
        power = f"{_fmt(g['power_draw_watts'])}/{_fmt(g['power_limit_watts'], unit='W')}"
        clock = f"{_fmt(g['sm_clock_mhz'])}/{_fmt(g['sm_clock_max_mhz'])}"
        reasons = ",".join(g.get("throttle_reasons") or []) or "-"
        if g["state"] != "ok":
            reasons = f"{g['state']}: {g.get('error') or ''}".strip()
        health = g["health"]
        pad = " " * max(0, 7 - len(health))
        lines.append(_clip(
            f"{g['index']:>3} {(g.get('model') or '?')[:15]:<15} {st.sev(health)}{pad} "
            f"{_fmt(g['temperature_celsius'], unit='C'):>5} {power:>11} {clock:>11}  "
            f"{_fmt(g['utilization_percent'], unit='%'):>4} {_activity(g):>10}  {reasons}"))
        lines.extend(mig_lines(g))
        for f in g.get("findings") or []:
            if f["severity"] != "OK":
                lines.extend(_wrap(f"{f['severity']}: {f['message']} (since "
                                   f"{_ago(f.get('since'), now)}) -> {f['action']}", "      "))
    if any(g.get("activity") for g in data["gpus"]):
        lines.append(_clip("  UTIL: time any kernel ran (GPU-Util); SM/TC/MEM: % of SMs, tensor "
                           "pipes, DRAM bandwidth busy (GPM)"))
    if any(g.get("mig_instances") for g in data["gpus"]):
        lines.append(_clip("  MIG instance GPU/GI/CI: power, clocks and temperature are its GPU's, "
                           "shared by all its instances"))
    node_findings = [f for f in node.get("findings") or [] if f["severity"] != "OK"]
    if node_findings:
        lines.append("Node:")
        for f in node_findings:
            lines.extend(_wrap(f"{f['severity']}: {f['message']} -> {f['action']}", "  "))
    out_of_sync = [s for s in data.get("settings") or [] if not s["in_sync"]]
    if out_of_sync:
        lines.append("Settings out of sync:")
        for s in out_of_sync:
            why = s.get("error") or f"actual {s['actual']}, desired {s['desired']}"
            lines.extend(_wrap(f"{s['subject']} {s['name']}: {why}", "  "))
    failed = [c for c in data.get("checks") or [] if c["status"] != "pass"]
    if failed:
        lines.append("Host checks:")
        for c in failed:
            fix = f" -> {c['fix']}" if c.get("fix") else ""
            lines.extend(_wrap(f"{c['status'].upper()} {c['name']}: {c['message']}{fix}", "  "))
    lines.extend(_clip(line) for line in cost_lines(data.get("cost"), data.get("cost_text")))
    lines.extend(discovery_lines(data.get("inference_discovery")))
    lines.extend(drain_lines(data.get("drain"), now))
    evs = (data.get("events") or [])[:events]
    if evs:
        lines.append("Recent events:")
        for e in evs:
            stamp = time.strftime("%m-%d %H:%M:%S", time.localtime(e["time"]))
            lines.append(_clip(f"  {stamp} {e['severity']:<4} {e['subject']:<7} {e['message']}"))
    return "\n".join(lines) + "\n"


def _activity(g: Dict[str, Any]) -> str:
    """The SM/TC/MEM column: SM, tensor and DRAM activity in percent (GPM); "n/a" where the
    GPU has no GPM (UTIL is then all there is), "-" before the first pair of samples."""
    act = g.get("activity")
    if not act:
        return "n/a" if g.get("gpm_supported") is False else "-"
    return "/".join(_fmt(None if act.get(k) is None else 100 * act[k])
                    for k in ("sm", "tensor", "dram")) + "%"


def mig_lines(g: Dict[str, Any]) -> List[str]:
    """One line per MIG instance under its GPU: key, profile, share of the GPU, memory, SM/TC/MEM
    activity (GPM), MIG UUID; a GPU in MIG mode without instances says so."""
    insts = g.get("mig_instances") or []
    if not insts:
        return ["    MIG on, no instances"] if g.get("mig_mode") else []
    out = []
    for m in insts:
        used, total = m.get("memory_used_bytes"), m.get("memory_total_bytes")
        mem = (f"{_fmt(None if used is None else used / 2 ** 30, '{:.1f}')}/"
               f"{_fmt(None if total is None else total / 2 ** 30, '{:.1f}')} GiB")
        act = _activity({"activity": m.get("activity"),
                         "gpm_supported": g.get("gpm_supported")})
        share = f"{m.get('slices')}/{m.get('gpu_slices')}"
        out.append(_clip(f"  mig {m.get('key') or '?':<8} {(m.get('profile') or '?')[:11]:<11} "
                         f"{share:>3} {mem:>13} {act:>10}  {m.get('uuid') or ''}"))
    return out


def discovery_lines(disc: Any) -> List[str]:
    """The inference servers discovery found, and how (status JSON "inference_discovery")."""
    if not isinstance(disc, dict) or not disc.get("enabled"):
        return []
    found = disc.get("endpoints") or []
    lines = [f"Discovered inference servers: {len(found)}"
             + (f" ({disc['error']})" if disc.get("error") else "")]
    for e in found:
        lines.extend(_wrap(f"{e.get('server')} at {e.get('url')}: {e.get('how')}", "  "))
    for sk in disc.get("skipped") or []:
        lines.extend(_wrap(f"not read: {sk.get('url')} ({sk.get('how')}): {sk.get('why')}",
                           "  "))
    for note in disc.get("notes") or []:
        lines.extend(_wrap(f"not seen: {note}", "  "))
    return lines


def drain_lines(drain: Any, now: float) -> List[str]:
    """One line for the drain back end (status JSON "drain"): its state and last action."""
    if not isinstance(drain, dict) or drain.get("backend") in (None, "none"):
        return []
    state = {"free": "not drained", "ours": "drained by gpucostd",
             "others": "drained by someone else"}.get(drain.get("state"), "state unknown")
    line = (f"Drain ({drain['backend']}{' node ' + drain['node'] if drain.get('node') else ''}"
            f"{', dry run' if drain.get('dry_run') else ''}): {state}")
    if drain.get("reason"):
        line += f" ({drain['reason']})"
    if drain.get("last_action"):
        line += (f"; last {drain['last_action']} {drain.get('last_result')} "
                 f"{_ago(drain.get('last_time'), now)} ago")
    return _wrap(line, "", "  ")


def cost_lines(cost: Optional[Dict[str, Any]], text: Optional[List[str]] = None) -> List[str]:
    """Cost section of the status view: the lines the daemon rendered (status JSON
    "cost_text"), else rendered here from CostReport.to_json() (an older daemon)."""
    if text is not None:
        return list(text)
    if not cost:
        return []
    from gpucostd.cost.report import status_lines_from_json
    return status_lines_from_json(cost)


def exit_code(data: Any) -> int:
    try:
        return EXIT_CODES.get(data["node"]["health"], 3)
    except (KeyError, TypeError, IndexError):
        return 3
