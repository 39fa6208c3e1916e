"""The Xid catalog: what an NVRM Xid means, how bad it is and what to do.

The facts live in ``xid_catalog.toml`` beside this module (shipped as package data): every Xid in
NVIDIA's catalog with NVIDIA's immediate and investigatory resolution buckets. Our severity,
action and stickiness come from the immediate bucket through one table, ``BUCKETS`` (shown in
docs/health.md); an entry may deviate only with a ``why``. The file is loaded once, validated
entry by entry, and cached. ``lookup(xid, message)`` never raises: a code missing from the
catalog is WARN with action "look up"; Xid 144-150 are decoded from the message
(xid_nvlink5.py) and Xid 154 takes the recovery action it names (recovery.py).
"""
from __future__ import annotations

import dataclasses
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Mapping, NamedTuple, Optional

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib

from gpucostd.health import xid_nvlink5
from gpucostd.health.recovery import recovery_action
from gpucostd.snapshot import Severity

CATALOG_PATH = Path(__file__).resolve().with_name("xid_catalog.toml")
XID_CATALOG_URL = "https://docs.nvidia.com/deploy/xid-errors/"
UNKNOWN_ACTION = "look up"
SEVERITIES: Mapping[str, Severity] = {
    "info": Severity.OK,
    "warn": Severity.WARN,
    "crit": Severity.CRIT,
}


class Bucket(NamedTuple):
    severity: str       # info | warn | crit
    action: str
    sticky: bool
    meaning: str        # NVIDIA's guidance, in our words (docs/health.md shows this table)


# NVIDIA's immediate resolution buckets -> gpucostd's judgement. The one table.
BUCKETS: Mapping[str, Bucket] = {
    "IGNORE": Bucket("info", "none", False,
                     "no action needed; shown and recorded, health stays OK"),
    "RESTART_APP": Bucket("warn", "restart the application", False,
                          "restart the application; no GPU reset or reboot needed"),
    "RESET_GPU": Bucket("crit", "reset GPU", True, "reset the GPU (a reboot also does)"),
    "RESTART_BM": Bucket("crit", "reboot", True, "restart the bare-metal host"),
    "RESTART_VM": Bucket("crit", "restart the VM", True,
                         "restart the VM that owns the GPU"),
    "CONTACT_SUPPORT": Bucket("warn", "contact support", False,
                              "not expected: contact your support organisation"),
    "CHECK_UVM": Bucket("warn", "reset GPU if UVM or vGPU is in use, otherwise none", False,
                        "with UVM or vGPU in use reset the GPU, otherwise ignore"),
    "UPDATE_SWFW": Bucket("warn", "update driver and firmware", False,
                          "update the driver and firmware (e.g. vGPU guest/host mismatch)"),
    "CHECK_MECHANICALS": Bucket("warn", "check seating, cables and power connectors", False,
                                "check how the board is seated and connected"),
    "WORKFLOW_XID_45": Bucket("info", "follow the other Xid", False,
                              "follow the Xid it came with; alone, restart Fabric Manager"),
    "WORKFLOW_XID_48": Bucket("crit", "reset GPU", True,
                              "reset the GPU; with Xid 63/64 drain and reset"),
    "WORKFLOW_NVLINK_ERR": Bucket("warn", "decode the NVLink error registers", False,
                                  "decode the registers bit by bit (NVIDIA's Xid 74 workflow); "
                                  "the driver's recovery action (Xid 154) says if a reset is due"),
    "WORKFLOW_NVLINK5_ERR": Bucket("warn", "decode intrInfo and errorStatus", False,
                                   "decoded from the line (intrInfo, errorStatus) with NVIDIA's "
                                   "XID 144-150 decode sheet; this is the fallback"),
    "XID_154": Bucket("crit", "follow the GPU recovery action", False,
                      "take the recovery action the line names (none, reset, reboot, drain)"),
}
_ENTRY_FIELDS = {"name": str, "mnemonic": str, "immediate": str, "investigatory": str,
                 "used": bool}
_OVERRIDES = {"severity": str, "action": str, "sticky": bool, "why": str}


class CatalogError(Exception):
    """The catalog file is missing or malformed; the message names the file, the entry and the fix."""


@dataclass(frozen=True)
class XidInfo:
    xid: int
    name: str
    severity: Severity
    action: str
    sticky: bool
    source: str                     # where the judgement comes from, in words
    known: bool = True
    mnemonic: str = ""
    immediate: str = ""             # NVIDIA's buckets ("" where the catalog has none)
    investigatory: str = ""
    used: bool = True
    why: str = ""                   # why this entry deviates from its bucket ("" when it does not)


def _source(immediate: str, investigatory: str, why: str) -> str:
    text = f"NVIDIA Xid catalog: immediate {immediate or '(none)'}, investigatory " \
           f"{investigatory or '(none)'}"
    return f"{text}; gpucostd: {why}" if why else text


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
        code = _key(path, key)
        result[code] = _entry(f"{path}: [xid.{key}]", code, entry)
    return result


def _key(path: Path, key: str) -> int:
    if not re.fullmatch(r"[0-9]{1,4}", str(key)):
        raise CatalogError(f"{path}: [xid.{key}]: the key must be the Xid number (digits)")
    return int(key)


def _entry(where: str, xid: int, entry: object) -> XidInfo:
    if not isinstance(entry, dict):
        raise CatalogError(f"{where}: must be a table with {', '.join(_ENTRY_FIELDS)}")
    missing = [f for f in _ENTRY_FIELDS if f not in entry]
    if missing:
        raise CatalogError(f"{where}: missing {', '.join(missing)}")
    allowed = {**_ENTRY_FIELDS, **_OVERRIDES}
    extra = sorted(set(entry) - set(allowed))
    if extra:
        raise CatalogError(f"{where}: unknown keys {extra}; allowed: {', '.join(allowed)}")
    for f, typ in allowed.items():
        if f in entry and not isinstance(entry[f], typ):
            raise CatalogError(f"{where}: {f} must be a {typ.__name__}, got {entry[f]!r}")
    if not entry["name"].strip() or not entry["mnemonic"].strip():
        raise CatalogError(f"{where}: name and mnemonic must not be empty")
    imm, inv = entry["immediate"].strip(), entry["investigatory"].strip()
    bucket = BUCKETS.get(imm)
    if imm and bucket is None:
        raise CatalogError(f"{where}: immediate = {imm!r} is not in the bucket table; "
                           f"known: {', '.join(BUCKETS)} (add it to xid.BUCKETS and "
                           f"docs/health.md)")
    overrides = {f: entry[f] for f in ("severity", "action", "sticky") if f in entry}
    why = entry.get("why", "").strip()
    if overrides and not why:
        raise CatalogError(f"{where}: sets {', '.join(overrides)} but no why; an entry that "
                           f"deviates from its bucket must say why")
    if bucket is None and set(overrides) != {"severity", "action", "sticky"}:
        raise CatalogError(f"{where}: no immediate bucket, so severity, action and sticky "
                           f"must all be given (with why)")
    if why and not overrides:
        raise CatalogError(f"{where}: why given but nothing deviates from the bucket")
    severity = overrides.get("severity", bucket.severity if bucket else "warn")
    if severity not in SEVERITIES:
        raise CatalogError(f"{where}: severity = {severity!r}; allowed: {', '.join(SEVERITIES)}")
    action = str(overrides.get("action", bucket.action if bucket else UNKNOWN_ACTION)).strip()
    if not action:
        raise CatalogError(f"{where}: action must not be empty")
    sticky = bool(overrides.get("sticky", bucket.sticky if bucket else False))
    return XidInfo(xid=xid, name=entry["name"].strip(), severity=SEVERITIES[severity],
                   action=action, sticky=sticky, source=_source(imm, inv, why),
                   mnemonic=entry["mnemonic"].strip(), immediate=imm, investigatory=inv,
                   used=entry["used"], why=why)


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


# Xid 154 names the recovery the driver wants: "... changed from 0x4 (Drain and Reset) to 0x1 (...)".
# The hex value is parsed, not the label (labels vary between drivers).
_RECOVERY_TO = re.compile(r"\bto\s+0x([0-9a-fA-F]+)")
NVLINK5_XIDS = range(144, 151)


def lookup(xid: int, message: Optional[str] = None) -> XidInfo:
    """Catalog entry for `xid`; WARN / "look up" for codes not in the catalog.

    `message` (the text after the Xid in the kernel line) refines two families where the
    driver says more than the number: Xid 154 names the recovery action it wants, and the
    NVLink5 Xids 144-150 carry intrInfo and errorStatus (and the word Fatal or Nonfatal).
    """
    try:
        xid = int(xid)
    except (TypeError, ValueError):
        return unknown(-1)
    info = catalog().get(xid)
    if info is None:
        return unknown(xid)
    if not message:
        return info
    if xid == 154:
        m = _RECOVERY_TO.search(message)
        if m:
            ra = recovery_action(int(m.group(1), 16))
            if ra is not None:
                return dataclasses.replace(
                    info, severity=ra.severity, action=ra.action,
                    source=info.source + f"; the line names recovery action {ra.value} "
                                         f"({ra.name})")
    elif xid in NVLINK5_XIDS:
        d = xid_nvlink5.decode(xid, message)
        if d is not None:
            if d.rule is not None:
                how = (f"NVIDIA's XID 144-150 decode: {'/'.join(d.rule.units)} errorStatus "
                       f"0x{d.error_status:08x} -> {d.bucket} ({d.rule.severity}), "
                       f"investigatory {d.rule.investigatory or '(none)'}")
            else:
                how = ("no decode row matches the registers; judged by the printed word "
                       f"{'Fatal' if d.fatal else 'Nonfatal'}")
            return dataclasses.replace(info, severity=SEVERITIES[d.severity], action=d.action,
                                       sticky=d.sticky, source=info.source + "; " + how)
    return info
