"""The Xid catalog: what an NVRM Xid means, how bad it is and what to do.

The facts live in ``xid_catalog.toml`` beside this module (shipped as package data). It is
loaded once, validated entry by entry, and cached. ``lookup(xid)`` never raises for a code that
is missing from the catalog: unknown codes are WARN with action "look up".
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib

from gpucostd.snapshot import Severity

CATALOG_PATH = Path(__file__).resolve().with_name("xid_catalog.toml")
XID_CATALOG_URL = "https://docs.nvidia.com/deploy/xid-errors/"

ACTIONS = ("none", "check application", "reset GPU", "reboot", "hardware inspection/RMA")
UNKNOWN_ACTION = "look up"
SEVERITIES: Mapping[str, Severity] = {
    "info": Severity.OK,
    "warn": Severity.WARN,
    "crit": Severity.CRIT,
}
_FIELDS = {"name": str, "severity": str, "action": str, "sticky": bool, "source": str}


class CatalogError(Exception):
    """The catalog file is missing or malformed; the message names the file, the entry and the fix."""


@dataclass(frozen=True)
class XidInfo:
    xid: int
    name: str
    severity: Severity
    action: str
    sticky: bool
    source: str
    known: bool = True


def load_catalog(path: Optional[Path] = None) -> Dict[int, XidInfo]:
    """Read and validate a catalog file. Raises CatalogError (never anything else)."""
    path = Path(path) if path is not None else CATALOG_PATH
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise CatalogError(f"{path}: cannot read the Xid catalog: {e.strerror or e}; "
                           f"reinstall gpucostd (the file is package data)") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise CatalogError(f"{path}: not valid TOML: {e}") from None
    table = raw.get("xid")
    if not isinstance(table, dict) or not table:
        raise CatalogError(f"{path}: no [xid.N] entries found")
    unknown_top = sorted(set(raw) - {"xid"})
    if unknown_top:
        raise CatalogError(f"{path}: unexpected top-level keys {unknown_top}; only [xid.N] tables")
    result: Dict[int, XidInfo] = {}
    for key, entry in table.items():
        where = f"{path}: [xid.{key}]"
        if not re.fullmatch(r"[0-9]{1,4}", str(key)):
            raise CatalogError(f"{where}: the key must be the Xid number (digits)")
        xid = int(key)
        if not isinstance(entry, dict):
            raise CatalogError(f"{where}: must be a table with {', '.join(_FIELDS)}")
        missing = [f for f in _FIELDS if f not in entry]
        if missing:
            raise CatalogError(f"{where}: missing {', '.join(missing)}")
        extra = sorted(set(entry) - set(_FIELDS))
        if extra:
            raise CatalogError(f"{where}: unknown keys {extra}; allowed: {', '.join(_FIELDS)}")
        for f, typ in _FIELDS.items():
            if not isinstance(entry[f], typ):
                raise CatalogError(f"{where}: {f} must be a {typ.__name__}, got {entry[f]!r}")
        if entry["severity"] not in SEVERITIES:
            raise CatalogError(f"{where}: severity = {entry['severity']!r}; "
                               f"allowed: {', '.join(SEVERITIES)}")
        if entry["action"] not in ACTIONS:
            raise CatalogError(f"{where}: action = {entry['action']!r}; "
                               f"allowed: {', '.join(ACTIONS)}")
        if not entry["name"].strip() or not entry["source"].strip():
            raise CatalogError(f"{where}: name and source must not be empty")
        result[xid] = XidInfo(xid=xid, name=entry["name"].strip(),
                              severity=SEVERITIES[entry["severity"]], action=entry["action"],
                              sticky=entry["sticky"], source=entry["source"].strip())
    return result


_lock = threading.Lock()
_cache: Optional[Dict[int, XidInfo]] = None


def catalog() -> Mapping[int, XidInfo]:
    """The shipped catalog, loaded once (raises CatalogError if the shipped file is broken)."""
    global _cache
    if _cache is None:
        with _lock:
            if _cache is None:
                _cache = load_catalog()
    return _cache


def unknown(xid: int) -> XidInfo:
    return XidInfo(xid=xid, name=f"Xid {xid} (not in gpucostd's catalog)", severity=Severity.WARN,
                   action=UNKNOWN_ACTION, sticky=False,
                   source=f"unknown to gpucostd: look it up in NVIDIA's Xid catalog, {XID_CATALOG_URL}",
                   known=False)


# Xid 154 states the recovery the driver wants: "... changed from 0x4 (Drain and Reset) to 0x1 (...)".
_RECOVERY_TO = re.compile(r"\bto\s+0x([0-9a-fA-F]+)")
_RECOVERY_ACTIONS = {
    0: (Severity.OK, "none"),
    1: (Severity.CRIT, "reset GPU"),
    2: (Severity.CRIT, "reboot"),
    3: (Severity.CRIT, "reset GPU"),   # drain peer-to-peer traffic, then reset
    4: (Severity.CRIT, "reset GPU"),   # drain and reset
}
_NVLINK5 = range(144, 150)


def lookup(xid: int, message: Optional[str] = None) -> XidInfo:
    """Catalog entry for `xid`; WARN / "look up" for codes not in the catalog.

    `message` (the text after the Xid in the kernel line) refines two families where the
    driver says more than the number: Xid 154 names the recovery action it wants, and the
    NVLink5 Xids 144-149 say "Fatal" or "Nonfatal".
    """
    try:
        xid = int(xid)
    except (TypeError, ValueError):
        return unknown(-1)
    info = catalog().get(xid)
    if info is None:
        return unknown(xid)
    if message:
        if xid == 154:
            m = _RECOVERY_TO.search(message)
            if m:
                refined = _RECOVERY_ACTIONS.get(int(m.group(1), 16))
                if refined is not None:
                    return _replace(info, severity=refined[0], action=refined[1])
        elif xid in _NVLINK5 and re.search(r"\bNon-?fatal\b", message, re.IGNORECASE):
            return _replace(info, severity=Severity.WARN)
    return info


def _replace(info: XidInfo, **changes: Any) -> XidInfo:
    import dataclasses
    return dataclasses.replace(info, **changes)
