"""Health: readings and kernel faults in, OK/WARN/CRIT per GPU and node (with findings) out.

``HealthJudge.judge(gpus, kernel_faults, now)`` runs once per poll cycle and returns a
``HealthReport``: the health of each GPU and of the node, the findings behind it (what, since
when, recommended action) and the events to record (each kernel fault, health changes, new
uncorrectable ECC errors, remap pending/failure appearing, a GPU lost, a GPU reset).

Rules, thresholds and the lifetime of each finding are documented in docs/health.md; thresholds
come from ``[health]`` in the config. Sticky faults (Xid 48, 79, 95, 119, 120 — the catalog's
``sticky`` flag — and a row-remap failure) and the uncorrectable-ECC baseline are kept in
``<state_dir>/health.json`` together with the host's boot id, so they survive a daemon restart
and are cleared by a reboot (new boot id), by a GPU reset (volatile ECC counters drop, or the GPU
comes back from LOST) or by ``ack(gpu, code)``. The same file keeps, per GPU UUID, which standing
faults were already reported (lost, remap pending, remap failure, retired pages pending), so a
daemon restart does not report them again as new events; a reset or a new boot id clears them.

Cost: judge() keeps small per-GPU state (slowdown intervals, corrected-ECC samples only when the
count changes) and writes health.json only when sticky state, the ECC baseline, a health level or
a reported flag changes; for 8 GPUs it takes well
under a millisecond (see docs/health.md for the measurement).
"""
from __future__ import annotations

import collections
import functools
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional, Sequence, Tuple

from gpucostd.health import recovery, state, switches
from gpucostd.health.gpu_rules import (ACTION_RESET, ACTION_RMA,  # noqa: F401 (re-exported)
                                       CORRECTED_ECC_WINDOW_SECONDS, SLOWDOWN_HOLD_SECONDS,
                                       GpuRules)
from gpucostd.health.inventory import Inventory
from gpucostd.health.mig import MigWatch
from gpucostd.health.texts import (MESSAGE_MAX, expected_gpus as _expected,  # noqa: F401
                                   fault_time as _fault_time, fmt_seconds as _fmt_seconds,
                                   mig_text as _mig, shortened as _short, xid_title as _xid_title)
from gpucostd.health.state import FILE_NAME as STATE_FILE, FLAG_NAMES
from gpucostd.probes.kernel_log import normalize_bus_id as _kernel_bus_id
from gpucostd.snapshot import (Event, Finding, GpuReading, GpuState, HW_SLOWDOWN_REASONS,
                               Severity, worst)

LOG = logging.getLogger("gpucostd")

BOOT_ID_RELPATH = "proc/sys/kernel/random/boot_id"
XID_FINDING_TTL_SECONDS = 600.0      # a non-sticky Xid finding lasts this long after its last line
STICKY_XIDS = frozenset({48, 79, 95, 119, 120})   # also sticky if the catalog says so
LOST_XIDS = frozenset({79})                        # fallen off the bus: always CRIT

ACTION_REBOOT = "reset GPU or reboot; hardware inspection if it recurs"


# --------------------------------------------------------------------------- helpers
@functools.lru_cache(maxsize=512)
def _bus_id(text: str) -> Optional[str]:
    return _kernel_bus_id(text.strip())


def normalize_bus_id(text: Any) -> Optional[str]:
    """NVML's "00000000:9B:00.0", the kernel's "0000:9b:00" or "PCI:0000:9b:00" -> "0000:9b:00.0"
    (the kernel log watcher's normalization, cached). None for anything that is not a PCI
    address."""
    return _bus_id(text) if isinstance(text, str) and text else None


def _subject(gpu: Optional[int]) -> str:
    return "node" if gpu is None else f"gpu:{gpu}"


def _sev(name: Any, default: Severity = Severity.WARN) -> Severity:
    try:
        return Severity[str(name)]
    except KeyError:
        return default


def _reading_error(g: GpuReading) -> Optional[str]:
    """The reading's error without its own "GPU <n>: " / "GPU <n> is unresponsive: " prefix
    (the finding names the GPU)."""
    err = g.error
    if not err:
        return err
    for prefix in (f"GPU {g.index}:", f"GPU {g.index} is unresponsive:"):
        if err.startswith(prefix):
            err = err[len(prefix):].lstrip()
            break
    return err or None


@dataclass(frozen=True)
class HealthReport:
    gpu_health: Dict[int, Severity]
    node_health: Severity
    findings: Tuple[Finding, ...]
    events: List[Event] = field(default_factory=list)
    extra: Dict[str, Any] = field(default_factory=dict)    # status details (GPU inventory)




class _Track:
    """What the judge remembers about one GPU between cycles. The flags that decide whether a
    standing fault was already reported (state LOST, remap pending/failure, retired pages
    pending) are also saved in health.json (``flags``), see HealthJudge._sync_flags."""

    __slots__ = ("uuid", "state", "slow_intervals", "slow_total", "slow_last_t", "slow_last_active",
                 "slow_seen_at", "slow_seen_names", "ecc_samples", "vol_corr", "vol_unc", "remap_pending", "remap_failure",
                 "retired_pending", "flag_key", "flag_values", "recovery")

    def __init__(self) -> None:
        self.uuid: Optional[str] = None
        self.state: Optional[GpuState] = None
        self.slow_intervals: Deque[List[float]] = collections.deque()   # [start, end] active
        self.slow_total = 0.0                     # sum of the intervals' lengths
        self.slow_last_t: Optional[float] = None
        self.slow_last_active = False
        self.slow_seen_at: Optional[float] = None  # last time a HW slowdown reason was active
        self.slow_seen_names = ""
        self.ecc_samples: Deque[Tuple[float, int]] = collections.deque()  # (mono, corrected)
        self.vol_corr: Optional[int] = None
        self.vol_unc: Optional[int] = None
        self.remap_pending: Optional[bool] = None
        self.remap_failure: Optional[bool] = None
        self.retired_pending: Optional[bool] = None
        self.flag_key: Optional[str] = None          # key of its entry in HealthJudge._flags
        self.flag_values: Tuple[bool, ...] = (False, False, False, False)   # as saved
        self.recovery: Optional[int] = None          # NVML recovery action, last read

    def flags(self) -> Tuple[bool, ...]:
        """(lost, remap_pending, remap_failure, retired_pending) as last reported."""
        return (self.state == GpuState.LOST, bool(self.remap_pending),
                bool(self.remap_failure), bool(self.retired_pending))


def _default_lookup(xid: int, message: Optional[str] = None):
    from gpucostd.health.xid import lookup
    return lookup(xid, message)


# --------------------------------------------------------------------------- the judge
class HealthJudge(GpuRules):
    """Turns readings and kernel faults into health. Thread-safe (ack comes from the status API
    thread); see the module docstring."""

    def __init__(self, config, clock, state_dir: str, boot_id_path: Optional[str] = None,
                 xid_lookup: Optional[Callable[..., Any]] = None, save_on_judge: bool = True):
        self.config = config
        self.clock = clock
        # The daemon passes False and calls commit() after it has stored the cycle's events:
        # a crash in between must not leave health.json saying "reported" for events that
        # were never stored.
        self.save_on_judge = save_on_judge
        self.state_dir = str(state_dir)
        self.state_path = os.path.join(self.state_dir, STATE_FILE)
        root = getattr(getattr(config, "daemon", None), "host_root", "/") or "/"
        self.boot_id_path = boot_id_path or os.path.join(root, BOOT_ID_RELPATH)
        self._lookup = xid_lookup or _default_lookup
        self._lock = threading.RLock()
        self._tracks: Dict[int, _Track] = {}
        self._bus_map: Dict[str, Tuple[int, Optional[str]]] = {}
        self._since: Dict[Tuple[str, str], float] = {}
        # latched state (persisted): subject -> code -> record
        self._latched: Dict[str, Dict[str, Dict[str, Any]]] = {}
        self._ecc_base: Dict[str, Dict[str, Any]] = {}        # per GPU key
        self._acked: Dict[str, List[str]] = {}                # subject -> codes acked
        self._health: Dict[str, List[str]] = {}               # subject -> [severity, last known]
        # standing faults already reported (persisted): GPU key (uuid, or "index:N" when the
        # uuid was never read) -> {"lost", "remap_pending", "remap_failure",
        # "retired_pending": bool, "index": int}; only GPUs with at least one flag set
        self._flags: Dict[str, Dict[str, Any]] = {}
        self._dirty = False
        self.boot_id = self._read_boot_id()
        self._load()
        # the node's GPUs, kept across reboots in their own file (inventory.py)
        self.inventory = Inventory(self.state_dir, _expected(config))
        self._last_gpus: Tuple[GpuReading, ...] = ()
        self.mig = MigWatch()              # the MIG layouts: instances named, come and gone

    # ------------------------------------------------------------------ persistence
    def _read_boot_id(self) -> Optional[str]:
        return state.read_boot_id(self.boot_id_path)

    def _load(self) -> None:
        saved = state.load(self.state_path, self.boot_id)
        self._health = saved.health
        self._latched, self._ecc_base = saved.latched, saved.ecc_base
        self._acked, self._flags = saved.acked, saved.flags
        if saved.rebooted:
            self._dirty = True

    def _save(self) -> None:
        self.inventory.save()
        if not self._dirty:
            return
        state.save(self.state_path, self.boot_id, latched=self._latched,
                   ecc_base=self._ecc_base, acked=self._acked, health=self._health,
                   flags=self._flags)
        self._dirty = False   # on a write error: retried at the next change, not every cycle

    def reconfigure(self, config) -> None:
        with self._lock:
            self.config = config
            self.inventory.expected_count = _expected(config)

    # ------------------------------------------------------------------ the cycle
    def judge(self, gpus: Sequence[GpuReading], kernel_faults: Iterable[Any] = (),
              now: Optional[float] = None, nvml_error: Optional[str] = None) -> HealthReport:
        with self._lock:
            return self._judge(tuple(gpus or ()), list(kernel_faults or ()),
                               self.clock.time() if now is None else float(now), nvml_error)

    def _judge(self, gpus: Tuple[GpuReading, ...], faults: List[Any], now: float,
               nvml_error: Optional[str]) -> HealthReport:
        cfg = self.config.health
        mono = self.clock.monotonic()
        events: List[Event] = []
        findings: List[Finding] = []

        for g in gpus:
            bus = normalize_bus_id(g.pci_bus_id)
            if bus is not None:
                self._bus_map[bus] = (g.index, g.uuid)

        for g in gpus:           # resets first: they clear latched faults
            self._detect_reset(g, now, events)
        self.mig.observe(gpus, now, events)

        for fault in faults:
            ev = self._fault_event(fault, now)
            if ev is not None:
                events.append(ev)

        self._expire_xids(now)

        gpu_health: Dict[int, Severity] = {}
        for g in gpus:
            gf = self._gpu_findings(g, cfg, now, mono, events)
            findings.extend(gf)
            sev = worst(f.severity for f in gf)
            if g.state == GpuState.UNKNOWN and sev != Severity.CRIT:
                sev = Severity.UNKNOWN
            gpu_health[g.index] = sev
            self._health_change(_subject(g.index), sev, gf, now, events, g.index, g.uuid)

        node_findings = self._latched_findings("node", None, None)
        # latched faults of a GPU that NVML no longer lists (or cannot list), or lists under
        # another index (the GPUs after it renumbered): they still count, for the node
        uuid_at = {_subject(g.index): g.uuid or self._tracks[g.index].uuid for g in gpus}
        for subject in [s for s in self._latched if s != "node"]:
            if subject in uuid_at:
                gone = self._latched_findings(subject, None, uuid_at[subject], foreign=True)
                who = f"the GPU formerly at index {subject[4:]}, not read this cycle"
            else:
                gone = self._latched_findings(subject, None, None)
                who = f"GPU {subject[4:]}, not read this cycle"
            node_findings.extend(
                Finding("node", f.code, f.severity, f.action, _short(f"{who}: {f.message}"),
                        since=f.since) for f in gone)
        self._last_gpus = gpus
        node_findings.extend(self.inventory.judge(gpus, now, events))
        if nvml_error:
            node_findings.append(Finding("node", "nvml_unavailable", Severity.UNKNOWN,
                                         "check the NVIDIA driver and libnvidia-ml",
                                         _short(f"NVML unavailable: {nvml_error}"),
                                         since=self._since_of("node", "nvml_unavailable", now)))
        findings.extend(node_findings)
        node = worst(list(gpu_health.values()) + [f.severity for f in node_findings])
        node_cause = [f for f in findings if f.severity == node] or node_findings
        self._health_change("node", node, node_cause, now, events, None, None)
        self.mig.judge_instances(findings, self._latched)

        live = {(f.subject, f.code) for f in findings}
        for key in [k for k in self._since if k not in live]:
            del self._since[key]
        if self.save_on_judge:
            self._save()
        return HealthReport(gpu_health, node, tuple(findings), events,
                            {"gpu_inventory": self.inventory.to_json(), "mig_health": {
                                k: v.name for k, v in self.mig.instance_health.items()}})

    def commit(self) -> None:
        """Save what judge()/ack() changed (when save_on_judge is False)."""
        with self._lock:
            self._save()

    # ------------------------------------------------------------------ kernel faults
    def _fault_event(self, fault: Any, now: float) -> Optional[Event]:
        if getattr(fault, "sxid", None) is not None:     # an NVSwitch SXid: the node's
            ev = switches.sxid_event(fault, _fault_time(fault, now),
                                     self._latched.setdefault("node", {}))
            self._dirty = self._dirty or bool(ev.fields.get("sticky"))
            return ev
        if getattr(fault, "client_version", None) is not None:   # NVRM: API mismatch
            self._dirty = True
            return switches.mismatch_event(fault, _fault_time(fault, now),
                                           self._latched.setdefault("node", {}))
        try:
            xid = int(getattr(fault, "xid"))
        except (TypeError, ValueError, AttributeError):
            LOG.warning("ignored a kernel fault without an Xid number: %r", fault)
            return None
        message = str(getattr(fault, "message", "") or "")
        try:
            info = self._lookup(xid, message)
        except Exception as e:  # noqa: BLE001 - a broken catalog must not stop health
            LOG.error("Xid catalog lookup failed for Xid %d: %s", xid, e)
            info = None
        name = getattr(info, "name", f"Xid {xid}")
        severity = getattr(info, "severity", Severity.WARN)
        action = getattr(info, "action", "look up")
        sticky = bool(getattr(info, "sticky", False)) or xid in STICKY_XIDS
        if xid in LOST_XIDS:
            severity = Severity.CRIT
        t = _fault_time(fault, now)
        bus = normalize_bus_id(getattr(fault, "pci_bus_id", None))
        gpu, uuid = self._bus_map.get(bus, (None, None)) if bus else (None, None)
        subject = _subject(gpu)
        where = f"GPU {gpu}" if gpu is not None else f"unknown GPU {bus or '(no PCI id)'}"
        mig, mig_fields = self.mig.describe(gpu, fault)
        mig = mig or _mig(fault)
        if mig:
            where += f" ({mig})"
        text = f"{_xid_title(xid, name, parens=True)} on {where}"
        if message:
            text += f": {message}"
        fields: Dict[str, Any] = {"xid_name": name, "sticky": sticky}
        for k in ("dedupe_key", "process_name"):
            v = getattr(fault, k, None)
            if v:
                fields[k] = str(v)
        if bus:
            fields["pci_bus_id"] = bus
        for k in ("gpu_instance", "compute_instance"):
            if isinstance(getattr(fault, k, None), int):
                fields[k] = getattr(fault, k)
        fields.update(mig_fields)
        raw = getattr(fault, "raw", None)
        if raw:
            fields["raw"] = str(raw)[:2000]
        if getattr(fault, "previous_boot", False) is True:
            # read from the journal of an earlier boot: history, cleared by that reboot
            fields["previous_boot"] = True
            return Event(t, subject, "xid", severity, action,
                         _short(text + " (before the last reboot)", 300), gpu=gpu, uuid=uuid,
                         xid=xid, fields=fields)
        code = f"xid_{xid}"
        codes = self._latched.setdefault(subject, {})
        rec = codes.get(code)
        if rec is None:
            rec = codes[code] = {"xid": xid, "since": t, "count": 0, "gpu": gpu, "uuid": uuid}
        rec.update({"last": t, "severity": severity.name, "action": action, "name": name,
                    "sticky": sticky, "bus": bus, "detail": message[:300],
                    "process": fields.get("process_name"), "mig": mig or None})
        rec["count"] = int(rec.get("count", 0)) + 1
        if mig_fields:
            keys = rec.get("instances")
            keys = rec["instances"] = ([k for k in keys if isinstance(k, str)]
                                       if isinstance(keys, list) else [])
            if mig_fields["mig_instance"] not in keys:
                keys.append(mig_fields["mig_instance"])
        if sticky:
            self._dirty = True
        return Event(t, subject, "xid", severity, action, _short(text, 300), gpu=gpu, uuid=uuid,
                     xid=xid, fields=fields)

    def _expire_xids(self, now: float) -> None:
        for subject, codes in self._latched.items():
            for code in [c for c, r in codes.items() if (code_is_xid(c) or switches.code_is_sxid(c))
                         and not r.get("sticky")
                         and now - float(r.get("last", now)) > XID_FINDING_TTL_SECONDS]:
                del codes[code]

    def _latched_findings(self, subject: str, gpu: Optional[int], uuid: Optional[str],
                          foreign: bool = False) -> List[Finding]:
        """The latched faults of `subject` recorded for the GPU `uuid` (or for any GPU when
        `uuid` is None); with `foreign`, only those recorded for another GPU at this index."""
        out: List[Finding] = []
        codes = self._latched.get(subject)
        if not codes:
            return out
        for code, r in codes.items():
            if bool(r.get("uuid") and uuid and r["uuid"] != uuid) != foreign:
                continue
            if code_is_xid(code):
                count = int(r.get("count", 1))
                msg = _xid_title(r.get("xid"), str(r.get("name", "")))
                if isinstance(r.get("instances"), list) and len(r["instances"]) > 1:
                    msg += " on MIG instances " + ", ".join(r["instances"])
                elif r.get("mig"):
                    msg += f" on {r['mig']}"
                if count > 1:
                    msg += f" (x{count})"
                if r.get("sticky"):
                    msg += ", sticky"
            else:
                msg = str(r.get("message", code))
            out.append(Finding(subject, code, _sev(r.get("severity")), str(r.get("action", "")),
                               _short(msg), since=r.get("since"), gpu=gpu))
        return out

    # ------------------------------------------------------------------ GPU resets
    def _detect_reset(self, g: GpuReading, now: float, events: List[Event]) -> None:
        tr = self._tracks.get(g.index)
        if tr is None or (tr.uuid and g.uuid and tr.uuid != g.uuid):
            # first sight, or another GPU at this index (renumbered after one vanished): what
            # we knew of the old one says nothing about a reset of this one
            tr = self._tracks[g.index] = self._new_track(g)
        why = None
        if tr.state == GpuState.LOST and g.state == GpuState.OK:
            why = "it answers again after being lost"
        elif g.state == GpuState.OK:
            base = self._ecc_base.get(self._gpu_key(g))
            vc, vu = g.ecc_volatile_corrected, g.ecc_volatile_uncorrected
            dropped = (
                (vc is not None and tr.vol_corr is not None and vc < tr.vol_corr)
                or (vu is not None and tr.vol_unc is not None and vu < tr.vol_unc)
                # across a daemon restart: below the persisted uncorrectable baseline
                or (vu is not None and base is not None and base.get("vu") is not None
                    and vu < base["vu"]))
            if dropped:
                why = "its volatile ECC counters dropped"
            elif tr.recovery in recovery.RESET_VALUES and g.gpu_recovery_action == 0:
                why = "NVML's recovery action went from reset to none"
        if g.ecc_volatile_corrected is not None:
            tr.vol_corr = g.ecc_volatile_corrected
        if g.ecc_volatile_uncorrected is not None:
            tr.vol_unc = g.ecc_volatile_uncorrected
        if why is None:
            return
        subject = _subject(g.index)
        cleared = sorted(self._latched.pop(subject, {}).keys())
        self._acked.pop(subject, None)
        self._ecc_base.pop(self._gpu_key(g), None)
        tr.ecc_samples.clear()
        # a reset clears the reported flags: a fault still standing after it is reported again
        tr.remap_failure = None
        tr.remap_pending = None
        tr.retired_pending = None
        self._dirty = True
        msg = f"GPU {g.index} was reset ({why})"
        if cleared:
            msg += "; cleared " + ", ".join(cleared)
        LOG.info("%s", msg)
        events.append(Event(now, subject, "gpu_reset", Severity.OK, "none", msg, gpu=g.index,
                            uuid=g.uuid, fields={"cleared": ",".join(cleared), "reason": why}))

    @staticmethod
    def _gpu_key(g: GpuReading) -> str:
        return g.uuid or f"index:{g.index}"

    # ------------------------------------------------------------------ reported flags
    def _new_track(self, g: GpuReading) -> _Track:
        """A track for a GPU seen for the first time by this process, seeded with the flags
        saved by the previous run on this boot, so a restart does not report a standing fault
        (lost GPU, remap pending/failure, retired pages pending) again as new, and a GPU lost
        before the restart that answers now is recognised as reset."""
        tr = _Track()
        key, rec = self._find_flags(g)
        if rec is None:
            return tr
        tr.flag_key = key
        tr.flag_values = tuple(bool(rec.get(n)) for n in FLAG_NAMES)
        lost, pending, failure, retired = tr.flag_values
        tr.state = GpuState.LOST if lost else None
        tr.remap_pending = True if pending else None
        tr.remap_failure = True if failure else None
        tr.retired_pending = True if retired else None
        if not key.startswith("index:"):
            tr.uuid = key           # a lost GPU's reading may not carry its uuid
        return tr

    def _find_flags(self, g: GpuReading) -> Tuple[Optional[str], Optional[Dict[str, Any]]]:
        if g.uuid:
            rec = self._flags.get(g.uuid)
            if rec is not None:
                return g.uuid, rec
        key = f"index:{g.index}"         # recorded while the GPU's uuid was unknown
        rec = self._flags.get(key)
        if rec is not None:
            return key, rec
        if not g.uuid:                   # a reading without uuid (lost): match by index
            for k, r in self._flags.items():
                if r.get("index") == g.index:
                    return k, r
        return None, None

    def _sync_flags(self, g: GpuReading, tr: _Track) -> None:
        """Save the reported flags when they changed (not every cycle)."""
        values = tr.flags()
        key = tr.uuid or f"index:{g.index}"
        if values == tr.flag_values and (key == tr.flag_key or not any(values)):
            return
        if tr.flag_key is not None:
            self._flags.pop(tr.flag_key, None)
        if any(values):
            rec: Dict[str, Any] = dict(zip(FLAG_NAMES, values))
            rec["index"] = g.index
            self._flags[key] = rec
            tr.flag_key = key
        else:
            tr.flag_key = None
        tr.flag_values = values
        self._dirty = True

    # ------------------------------------------------------------------ per-GPU rules
    def _since_of(self, subject: str, code: str, now: float) -> float:
        key = (subject, code)
        t = self._since.get(key)
        if t is None:
            t = self._since[key] = now
        return t

    def _gpu_findings(self, g: GpuReading, cfg, now: float, mono: float,
                      events: List[Event]) -> List[Finding]:
        tr = self._tracks[g.index]
        out = self._gpu_rules(g, tr, cfg, now, mono, events)
        self._sync_flags(g, tr)
        return out

    def _gpu_rules(self, g: GpuReading, tr: _Track, cfg, now: float, mono: float,
                   events: List[Event]) -> List[Finding]:
        subject = _subject(g.index)
        out: List[Finding] = []

        def add(code: str, sev: Severity, action: str, msg: str, since: Optional[float] = None):
            out.append(Finding(subject, code, sev, action, _short(msg),
                               since=since if since is not None else
                               self._since_of(subject, code, now), gpu=g.index))

        if g.uuid:
            tr.uuid = g.uuid
        prev_state = tr.state
        if not (g.state == GpuState.UNKNOWN and prev_state == GpuState.LOST):
            tr.state = g.state      # UNKNOWN is "cannot tell": a lost GPU stays lost until seen
        error = _reading_error(g)
        if g.state == GpuState.LOST:
            add("gpu_lost", Severity.CRIT, ACTION_REBOOT,
                f"GPU lost (fallen off the bus){': ' + error if error else ''}")
            if prev_state != GpuState.LOST:
                events.append(Event(now, subject, "gpu_lost", Severity.CRIT, ACTION_REBOOT,
                                    _short(f"GPU {g.index} is lost: "
                                           f"{error or 'NVML reports GPU_IS_LOST'}", 300),
                                    gpu=g.index, uuid=g.uuid or tr.uuid))
        elif g.state == GpuState.UNRESPONSIVE:
            add("gpu_unresponsive", Severity.CRIT, "reset GPU (reboot if the reset fails)",
                f"GPU not responding: {error or 'an NVML call overran its deadline'}")
        elif g.state == GpuState.UNKNOWN:
            add("gpu_unknown", Severity.UNKNOWN, "check the NVIDIA driver and libnvidia-ml",
                f"cannot read the GPU: {error or 'NVML unavailable'}")

        out.extend(self._latched_findings(subject, g.index, g.uuid or tr.uuid))
        found, ev = recovery.judge_recovery(g.index, g.uuid, g.gpu_recovery_action,
                                            tr.recovery, now)
        if found:
            add(*found)
        if ev:
            events.append(ev)
        if g.gpu_recovery_action is not None:
            tr.recovery = g.gpu_recovery_action
        if g.state != GpuState.OK:
            tr.slow_last_t = None        # time we did not observe
            return out

        found = self.mig.mode_finding(g)
        if found:
            add(*found)
        self._rule_slowdown(g, tr, cfg, mono, add)
        reasons = g.clock_event_reasons or ()
        if "SwPowerCap" in reasons:
            sev = Severity.WARN if cfg.sw_power_cap == "warn" else Severity.OK
            add("sw_power_cap", sev, "none" if sev == Severity.OK else
                "check the power limit and cooling", "SW power cap active: clocks held at the "
                "power limit")
        self._rule_temperature(g, cfg, add)
        self._rule_ecc(g, tr, cfg, now, mono, add, events)
        self._rule_memory(g, tr, now, add, events)
        self._rule_pcie(g, cfg, add)
        return out

    def _health_change(self, subject: str, sev: Severity, findings: Sequence[Finding],
                       now: float, events: List[Event], gpu: Optional[int],
                       uuid: Optional[str]) -> None:
        prev = self._health.get(subject)
        prev_sev = _sev(prev[0], Severity.OK) if prev else Severity.OK
        known = _sev(prev[1], Severity.OK) if prev else Severity.OK
        if prev is not None and prev_sev == sev:
            return
        new_known = known if sev == Severity.UNKNOWN else sev
        self._health[subject] = [sev.name, new_known.name]
        self._dirty = True
        if prev is None and sev == Severity.OK:
            return                            # first sight of a healthy subject: no event
        top = sorted((f for f in findings if f.severity == sev),
                     key=lambda f: f.code) if sev != Severity.OK else []
        who = "node" if subject == "node" else f"GPU {gpu}"
        if top:
            cause = top[0]
            what = cause.message
            if subject == "node" and cause.gpu is not None:
                what = f"GPU {cause.gpu}: {what}"
            msg = f"{who} {prev_sev.name} -> {sev.name}: {what}"
            action = cause.action
        else:
            cause = None
            msg = f"{who} {prev_sev.name} -> {sev.name}"
            action = "none"
        fields: Dict[str, Any] = {"from": prev_sev.name, "to": sev.name,
                                  "from_known": known.name,
                                  "findings": ",".join(sorted({f.code for f in top}))}
        if cause is not None:
            fields["cause"] = cause.code
            m = re.match(r"xid_(\d+)$", cause.code)
            if m:
                fields["xid"] = int(m.group(1))   # not Event.xid: that counts as an Xid
        if subject == "node" and cause is not None and cause.gpu is not None:
            fields["cause_gpu"] = cause.gpu
        if cause is not None:
            rec = self._latched.get(cause.subject, {}).get(cause.code)
            if rec is not None:                     # the kernel line's text, for hooks
                for k in ("detail", "process"):
                    if rec.get(k):
                        fields[k] = rec[k]
        events.append(Event(now, subject, "health_change", sev, action, _short(msg, 300),
                            gpu=gpu, uuid=uuid, fields=fields))

    # ------------------------------------------------------------------ ack
    def ack(self, gpu: Optional[Any], code: Optional[str] = None) -> List[Event]:
        """Clear latched faults of one GPU (index) or of the node (None or "node"): all of them,
        or only `code` ("xid_79", "79", "remap_failure", "ecc_uncorrected"). Returns one "ack"
        event per cleared fault (empty when nothing matched)."""
        with self._lock:
            if gpu is None or str(gpu).lower() == "node":
                index: Optional[int] = None
            else:
                index = int(str(gpu).split(":")[-1])
            subject = _subject(index)
            want = _normalize_code(code) if code else None
            now = self.clock.time()
            cleared: List[str] = []
            if index is None and want == "gpu_missing":
                # the operator accepts the GPUs visible now as the node's
                dropped = self.inventory.accept(self._last_gpus, now)
                if self.save_on_judge:
                    self.inventory.save()
                return [Event(now, "node", "ack", Severity.OK, "none",
                              f"accepted {len(self._last_gpus)} GPUs as the node's"
                              + (f"; no longer expected: {', '.join(dropped)}" if dropped
                                 else ""), fields={"cleared": "gpu_missing",
                                                   "dropped": ",".join(dropped)})]
            codes = self._latched.get(subject, {})
            for c in list(codes):
                if want is None or c == want:
                    del codes[c]
                    cleared.append(c)
                    if c == "remap_failure":
                        self._acked.setdefault(subject, []).append(c)
            if index is not None and want in (None, "ecc_uncorrected"):
                tr = self._tracks.get(index)
                key = tr.uuid if tr is not None and tr.uuid else f"index:{index}"
                base = self._ecc_base.get(key)
                if base is not None and int(base.get("reported", 0)) > 0:
                    # the current counts become the new baseline at the next cycle
                    del self._ecc_base[key]
                    cleared.append("ecc_uncorrected")
            if cleared:
                self._dirty = True
                if self.save_on_judge:
                    self._save()
            uuid = self._tracks[index].uuid if index is not None and index in self._tracks \
                else None
            who = "the node" if index is None else f"GPU {index}"
            return [Event(now, subject, "ack", Severity.OK, "none",
                          f"acknowledged {c} on {who}", gpu=index, uuid=uuid,
                          fields={"cleared": c}) for c in cleared]

def code_is_xid(code: str) -> bool:
    return code.startswith("xid_")


def _normalize_code(code: str) -> str:
    c = str(code).strip().lower()
    m = re.fullmatch(r"(?:xid[_ ]?)?(\d+)", c)
    return f"xid_{int(m.group(1))}" if m else c


__all__ = ["HealthJudge", "HealthReport", "normalize_bus_id",
           "XID_FINDING_TTL_SECONDS", "STICKY_XIDS"]
