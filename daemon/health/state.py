"""Health state across restarts: ``<state_dir>/health.json`` and the host's boot id.

The judge keeps here what must outlive the process: sticky faults (latched findings), the
uncorrectable-ECC baseline, acknowledgements, the last health level of each subject and, per
GPU, which standing faults were already reported (``flags``). A new boot id clears all but the
health levels (a reboot resets the GPUs). A file edited by hand or written by another version
never breaks the judge: unusable records are dropped with a warning.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from gpucostd.statefile import UnreadableFile, read_json, set_aside, write_atomic

LOG = logging.getLogger("gpucostd")

FILE_NAME = "health.json"
FLAG_NAMES = ("lost", "remap_pending", "remap_failure", "retired_pending")

_NUMBER = (int, float)
_LATCHED_TYPES = {"since": _NUMBER, "last": _NUMBER, "count": int, "xid": int}
_BASELINE_TYPES = {"vu": int, "au": int, "reported": int, "since": _NUMBER}


@dataclass
class SavedHealth:
    """What health.json held, already validated. ``rebooted``: the boot id changed since it
    was written, so only ``health`` was kept (and the file should be written again)."""
    health: Dict[str, List[str]] = field(default_factory=dict)     # subject -> [sev, last]
    latched: Dict[str, Dict[str, Dict[str, Any]]] = field(default_factory=dict)
    ecc_base: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    acked: Dict[str, List[str]] = field(default_factory=dict)
    flags: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    rebooted: bool = False


def _valid_record(rec: Any, types: Dict[str, Any]) -> bool:
    """A record whose numeric fields are numbers (or absent/null)."""
    if not isinstance(rec, dict):
        return False
    for key, typ in types.items():
        v = rec.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, typ)):
            LOG.warning("health state: ignored a record with %s = %r (not a number)", key, v)
            return False
    return True


def read_boot_id(path: str) -> Optional[str]:
    try:
        with open(path, "r", encoding="ascii", errors="replace") as f:
            text = f.read().strip()
        return text or None
    except OSError:
        LOG.warning("cannot read the boot id from %s; sticky GPU faults are kept until a GPU "
                    "reset or ack", path)
        return None


def load(path: str, boot_id: Optional[str]) -> SavedHealth:
    """The saved state; an empty one when the file is absent or unreadable (logged)."""
    out = SavedHealth()
    try:
        data = read_json(path)
        if not isinstance(data, dict):
            raise UnreadableFile("not a JSON object")
    except FileNotFoundError:
        return out
    except UnreadableFile as e:
        set_aside(path, "health state", e, "starting without sticky faults")
        return out
    health = data.get("health") or {}
    if isinstance(health, dict):
        out.health = {str(k): [str(v[0]), str(v[1])] for k, v in health.items()
                      if isinstance(v, list) and len(v) == 2}
    old_boot = data.get("boot_id")
    if old_boot and boot_id and old_boot != boot_id:
        n = sum(len(v) for v in (data.get("latched") or {}).values() if isinstance(v, dict))
        if n:
            LOG.info("host rebooted since the last run: cleared %d sticky GPU faults", n)
        out.rebooted = True
        return out
    latched = data.get("latched") or {}
    if isinstance(latched, dict):
        out.latched = {str(s): {str(c): dict(r) for c, r in codes.items()
                                if _valid_record(r, _LATCHED_TYPES)}
                       for s, codes in latched.items() if isinstance(codes, dict)}
    base = data.get("ecc_baseline") or {}
    if isinstance(base, dict):
        out.ecc_base = {str(k): dict(v) for k, v in base.items()
                        if _valid_record(v, _BASELINE_TYPES)}
    acked = data.get("acked") or {}
    if isinstance(acked, dict):
        out.acked = {str(k): [str(c) for c in v] for k, v in acked.items()
                     if isinstance(v, list)}
    flags = data.get("flags") or {}
    if isinstance(flags, dict):
        for k, v in flags.items():
            if not isinstance(v, dict):
                continue
            rec: Dict[str, Any] = {n: bool(v.get(n)) for n in FLAG_NAMES}
            if not any(rec.values()):
                continue
            index = v.get("index")
            rec["index"] = index if isinstance(index, int) and not isinstance(
                index, bool) else None
            out.flags[str(k)] = rec
    return out


def save(path: str, boot_id: Optional[str], *, latched, ecc_base, acked, health,
         flags) -> bool:
    """Write the state atomically. False (logged) when it cannot be written."""
    data = {"version": 1, "boot_id": boot_id, "latched": latched, "ecc_baseline": ecc_base,
            "acked": acked, "health": health, "flags": flags}
    try:
        write_atomic(path, json.dumps(data, separators=(",", ":"), sort_keys=True))
        return True
    except (OSError, TypeError, ValueError) as e:
        LOG.error("cannot write health state %s: %s; sticky faults will not survive a "
                  "restart (check daemon.state_dir)", path, e)
        return False
