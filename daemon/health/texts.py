"""Small text and value helpers of the health judge (titles, short messages, fault times)."""
from __future__ import annotations

from typing import Any

MESSAGE_MAX = 300         # findings are wrapped, never cut, by the status view: keep the fix


def _short(text: str, limit: int = MESSAGE_MAX) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _xid_title(xid: Any, name: str, parens: bool = False) -> str:
    """"Xid 13 Graphics Engine Exception" (or "Xid 13 (...)"); a name that already starts
    with "Xid 13" (an Xid missing from the catalog) is not prefixed twice."""
    prefix = f"Xid {xid}"
    if not name or name == prefix:
        return prefix
    if name.startswith(prefix + " "):
        return name
    return f"{prefix} ({name})" if parens else f"{prefix} {name}"


def _fmt_seconds(s: float) -> str:
    return f"{s / 60:g} min" if s >= 60 and s % 60 == 0 else f"{s:g} s"


def _expected(config: Any) -> int:
    return int(getattr(getattr(config, "health", None), "expected_gpu_count", 0) or 0)


def _fault_time(fault: Any, now: float) -> float:
    try:
        t = float(getattr(fault, "time", None))
        return now if t < 1e9 else t     # not a wall-clock time (e.g. seconds since boot)
    except (TypeError, ValueError):
        return now


def _mig(fault: Any) -> str:
    """"MIG GPU instance 5, compute instance 1" for a line that names them, else ""."""
    gi, ci = getattr(fault, "gpu_instance", None), getattr(fault, "compute_instance", None)
    parts = [f"MIG GPU instance {gi}" if isinstance(gi, int) else "",
             f"compute instance {ci}" if isinstance(ci, int) else ""]
    return ", ".join(p for p in parts if p)


# the names other modules import (the module itself keeps its short private ones)
shortened = _short
xid_title = _xid_title
fmt_seconds = _fmt_seconds
expected_gpus = _expected
fault_time = _fault_time
mig_text = _mig
