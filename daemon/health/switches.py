"""Node-level kernel faults: NVSwitch SXids, and the driver's API mismatch (end of the file).

An SXid line (``nvidia-nvswitch3: SXid (PCI:0000:05:00.0): 12028, Non-fatal, Link 32 ...``)
concerns a switch of the NVLink fabric, not one GPU, so it is judged for the node. The driver's
own word decides the severity: "Fatal" is CRIT, "Non-fatal" WARN (the reports printed with no
word, the SOE's, an IO failure, the cable controller's, have theirs in WITHOUT_WORD), except the codes NVIDIA's
Fabric Manager user guide lists as corrected single-bit ECC errors "with no impact" (OK, shown
and counted). Codes the guide calls always fatal to the whole fabric ask for a reboot. A fatal
SXid is sticky (until the host reboots or ``gpucostd ack node sxid_N``); a non-fatal one lasts
10 minutes after its last line, like a non-sticky Xid.

Source: NVIDIA Fabric Manager user guide (https://docs.nvidia.com/hgx-platforms/fabric-manager-user-guide/),
"Runtime NVSwitch errors", tables of non-fatal, fatal and always-fatal SXids (v2.3, March 2025).
NVIDIA's Xid introduction says SXids apply to Hopper and earlier NVSwitch systems.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

from gpucostd.snapshot import Event, Severity

GUIDE = "https://docs.nvidia.com/hgx-platforms/fabric-manager-user-guide/"
# Fabric Manager guide, non-fatal table: single-bit ECC errors, corrected, no impact
NO_IMPACT = frozenset({11012, 11021, 11022, 11023, 12021, 12023, 15008, 15011, 19049, 19055,
                       19057, 19059, 19062, 19065, 19068, 19071, 24001, 24002, 24003, 22013})
# Fabric Manager guide, "always fatal" table: the whole fabric is affected
ALWAYS_FATAL = frozenset({12020, 22003, 22011} | set(range(23001, 23018)))

# Complete reports the driver prints with no Fatal/Non-fatal word (NVSWITCH_PRINT_SXID called
# directly; NVIDIA open-gpu-kernel-modules, src/common/nvswitch: ctrl_dev_nvswitch.h for the
# codes, soe_ls10.c / soe_lr10.c / cci_ls10.c / intr and io paths for the lines). The switch's
# SOE (its management falcon) failing leaves it unmanaged (thermal, link training, error
# reporting): CRIT, sticky. A register read that comes back 0xBADF.... is the switch gone from
# the bus: CRIT, sticky. The CCI (the cable controller of the OSFP optics on NVLink switch
# trays) failing: WARN, the links on those cables are at risk.
ACTION_SOE = ("reset the NVSwitch (reboot the node, or reset all NVSwitches and GPUs and restart "
              "Fabric Manager); report it to NVIDIA with nvidia-bug-report.sh if it recurs")
ACTION_IO = ("the NVSwitch does not answer on PCIe: reboot the node; if it recurs, have the "
             "switch tray inspected")
ACTION_CCI = "check and reseat the OSFP modules and cables of the switch tray; watch its links"
# code -> (meaning, severity, action, sticky)
WITHOUT_WORD = {
    26002: ("SOE init failed", Severity.CRIT, ACTION_SOE, True),
    26004: ("SOE reset timeout", Severity.CRIT, ACTION_SOE, True),
    26006: ("SOE halted", Severity.CRIT, ACTION_SOE, True),
    26007: ("SOE external bus error (EXTERR)", Severity.CRIT, ACTION_SOE, True),
    26008: ("SOE watchdog fired", Severity.CRIT, ACTION_SOE, True),
    10007: ("switch IO failure (register reads return 0xBADF)", Severity.CRIT, ACTION_IO, True),
    27002: ("cable controller (CCI) init failed", Severity.WARN, ACTION_CCI, False),
    27005: ("OSFP module access error", Severity.WARN, ACTION_CCI, False),
}
SOE = {k: v[0] for k, v in WITHOUT_WORD.items() if 26000 <= k < 27000}

ACTION_REBOOT = "reboot (or reset all NVSwitches and GPUs, then restart Fabric Manager)"
ACTION_FATAL = ("reset the GPUs and NVSwitches of the affected NVLink partition (restart the "
                "VM that owns them); reboot if it recurs")
ACTION_NONFATAL = "watch it; see the Fabric Manager guide for this SXid's impact"


def judge_sxid(sxid: int, fatal: bool) -> Tuple[Severity, str, bool]:
    """(severity, action, sticky) of one SXid line."""
    if sxid in ALWAYS_FATAL:
        return Severity.CRIT, ACTION_REBOOT, True
    if sxid in WITHOUT_WORD:
        _meaning, severity, action, sticky = WITHOUT_WORD[sxid]
        return severity, action, sticky
    if fatal:
        return Severity.CRIT, ACTION_FATAL, True
    if sxid in NO_IMPACT:
        return Severity.OK, "none", False
    return Severity.WARN, ACTION_NONFATAL, False


def sxid_event(fault: Any, t: float, latched: Dict[str, Dict[str, Any]]) -> Event:
    """The event of one SXid fault; records it in `latched` (the node's latched codes)."""
    sxid = int(fault.sxid)
    fatal = bool(fault.fatal)
    severity, action, sticky = judge_sxid(sxid, fatal)
    bus = str(getattr(fault, "pci_bus_id", "") or "")
    switch: Optional[int] = getattr(fault, "switch", None)
    who = f"NVSwitch {switch} ({bus})" if switch is not None else f"NVSwitch {bus}"
    word = WITHOUT_WORD[sxid][0] if sxid in WITHOUT_WORD else ("Fatal" if fatal else
                                                                 "Non-fatal")
    message = str(getattr(fault, "message", "") or "")
    text = f"SXid {sxid} ({word}) on {who}" + (f": {message}" if message else "")
    fields: Dict[str, Any] = {"sxid": sxid, "fatal": fatal, "pci_bus_id": bus, "sticky": sticky}
    for k in ("switch", "link", "dedupe_key", "raw"):
        v = getattr(fault, k, None)
        if v is not None and v != "":
            fields[k] = v if k != "raw" else str(v)[:2000]
    if getattr(fault, "previous_boot", False) is True:
        fields["previous_boot"] = True
        return Event(t, "node", "sxid", severity, action, (text + " (before the last reboot)")[:300],
                     fields=fields)
    code = f"sxid_{sxid}"
    rec = latched.get(code)
    if rec is None:
        rec = latched[code] = {"sxid": sxid, "since": t, "count": 0}
    rec["count"] = int(rec.get("count", 0)) + 1
    count = rec["count"]
    rec.update({"last": t, "severity": severity.name, "action": action, "sticky": sticky,
                "bus": bus, "detail": message[:300],
                "message": f"SXid {sxid} ({word}) on {who}" + (f" (x{count})" if count > 1
                                                                 else "")
                           + (", sticky" if sticky else "")})
    return Event(t, "node", "sxid", severity, action, text[:300], fields=fields)


def code_is_sxid(code: str) -> bool:
    return code.startswith("sxid_")


# ------------------------------------------------------------------ driver / module mismatch
MISMATCH_ACTION = ("reboot, or unload and reload the nvidia kernel modules, so the module "
                   "matches the installed driver libraries")


def mismatch_event(fault: Any, t: float, latched: Dict[str, Dict[str, Any]]) -> Optional[Event]:
    """The kernel's "NVRM: API mismatch" (two lines, probes.kernel_parser.DriverMismatch): a
    node CRIT `driver_mismatch`, sticky until reboot or `gpucostd ack node driver_mismatch`.
    Repeats (every NVML client that starts prints it again) count, but are one event."""
    client, module = str(fault.client_version), str(fault.module_version)
    text = (f"NVIDIA driver mismatch: user-space libraries {client}, loaded kernel module "
            f"{module}")
    fields = {"client_version": client, "module_version": module,
              "raw": str(getattr(fault, "raw", ""))[:2000]}
    if getattr(fault, "dedupe_key", ""):
        fields["dedupe_key"] = fault.dedupe_key
    if getattr(fault, "previous_boot", False) is True:
        fields["previous_boot"] = True
        return Event(t, "node", "driver_mismatch", Severity.CRIT, MISMATCH_ACTION,
                     text + " (before the last reboot)", fields=fields)
    rec = latched.get("driver_mismatch")
    if rec is not None and rec.get("detail") == f"{client}/{module}":
        rec["count"] = int(rec.get("count", 1)) + 1
        rec["last"] = t
        return None
    latched["driver_mismatch"] = {"since": t, "last": t, "count": 1, "severity": "CRIT",
                                  "action": MISMATCH_ACTION, "sticky": True,
                                  "detail": f"{client}/{module}", "message": text}
    return Event(t, "node", "driver_mismatch", Severity.CRIT, MISMATCH_ACTION, text,
                 fields=fields)
