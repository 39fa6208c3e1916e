"""Kernel log line parser: NVRM Xid, "fallen off the bus" and NVSwitch SXid lines -> faults.

The parser half of the kernel log watcher (``kernel_log.py`` reads /dev/kmsg or the journal and
feeds it): pure, line at a time, never raises. Data types: ``KernelFault`` (a GPU Xid; on MIG
with the GPU and compute instance) and ``SwitchFault`` (an NVSwitch SXid, a node-level fault).
Formats it reads, with real lines from public reports: tests/fixtures/kernel/nvrm-real.txt.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import time as _time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

log = logging.getLogger("gpucostd.kernel_log")

MAX_LINE = 16384          # longest line the parser looks at (a kmsg record is at most 8 KiB)
FALLEN_OFF_XID = 79

# ---------------------------------------------------------------------------------------------
# PCI bus ids

_BUS_ID_RE = re.compile(
    r"^\s*(?:PCI:)?(?:(?P<dom>[0-9a-fA-F]{1,8}):)?(?P<bus>[0-9a-fA-F]{1,2}):"
    r"(?P<dev>[0-9a-fA-F]{1,2})(?:\.(?P<fn>[0-7]))?\s*$", re.I)


def normalize_bus_id(text: Optional[str]) -> Optional[str]:
    """"PCI:0000:9B:00" / "0000:03:00" / "0000:29:00.0" / "00000000:9B:00.0" -> "0000:9b:00.0".

    Domain as 4 hex digits (NVML pads it to 8), lower case, function 0 when absent.
    None when `text` is not a PCI address.
    """
    if not text or not isinstance(text, str):
        return None
    m = _BUS_ID_RE.match(text)
    if not m:
        return None
    dom = int(m.group("dom") or "0", 16)
    return "%04x:%02x:%02x.%d" % (dom, int(m.group("bus"), 16), int(m.group("dev"), 16),
                                  int(m.group("fn") or "0"))


# ---------------------------------------------------------------------------------------------
# Faults and the parser


@dataclass(frozen=True)
class KernelFault:
    time: float                    # wall clock, seconds since the epoch
    pci_bus_id: str                # normalized, "0000:9b:00.0"
    xid: int                       # 79 for the "fallen off the bus" messages without an Xid
    message: str                   # text after the Xid (pid=/name= taken out)
    raw: str                       # the kernel line(s) as read, joined with "\n"
    process_name: Optional[str] = None
    dedupe_key: str = ""           # kmsg:<boot_id>:<seq>[:<usec>] | journal cursor | fed:...
    previous_boot: bool = False    # read from the journal of an earlier boot of this host
    gpu_instance: Optional[int] = None       # MIG: "GPU-I:05" in the parentheses
    compute_instance: Optional[int] = None   # MIG: "GPU-CI:01"


@dataclass(frozen=True)
class SwitchFault:
    """An NVSwitch SXid: ``nvidia-nvswitch3: SXid (PCI:0000:05:00.0): 12028, Non-fatal, Link 32
    egress non-posted PRIV error (First)``. A node-level fault (the switch is no GPU)."""
    time: float
    pci_bus_id: str                # the switch's, normalized
    sxid: int
    fatal: bool                    # the driver's word: "Fatal" (True) or "Non-fatal"
    message: str                   # text after the Fatal/Non-fatal word ("Link 32 ...")
    raw: str
    switch: Optional[int] = None   # N of nvidia-nvswitchN
    link: Optional[int] = None
    dedupe_key: str = ""
    previous_boot: bool = False


@dataclass(frozen=True)
class DriverMismatch:
    """The kernel's "NVRM: API mismatch: the client has the version 535.171.04, but / NVRM: this
    kernel module has the version 535.161.07." (two lines): the user-space driver libraries and
    the loaded kernel module differ (a driver upgrade without a reboot). A node-level fault."""
    time: float
    client_version: str
    module_version: str
    raw: str
    dedupe_key: str = ""
    previous_boot: bool = False
    process_name: Optional[str] = None   # newer drivers name the client


def wanted(text: Union[str, bytes]) -> bool:
    """Whether a kernel line may hold a fault the parser reads (cheap pre-filter)."""
    if isinstance(text, (bytes, bytearray)):
        return b"NVRM" in text or b"SXid" in text
    return "NVRM" in text or "SXid" in text


_BUS = r"(?:PCI:)?[0-9a-fA-F]{1,8}:[0-9a-fA-F]{1,2}:[0-9a-fA-F]{1,2}(?:\.[0-7])?"
_XID_RE = re.compile(r"NVRM:\s*Xid\s*\(\s*(?P<bus>" + _BUS + r")"
                     r"(?:\s+GPU-I:\s*(?P<gi>[0-9]{1,3}))?(?:\s+GPU-CI:\s*(?P<ci>[0-9]{1,3}))?"
                     r"\s*\)\s*:?\s*(?P<xid>[0-9]{1,6})"
                     r"(?![0-9])\s*,?\s*(?P<rest>.*)", re.S)
_FELL_RE = re.compile(r"NVRM:\s*GPU\s+(?:at\s+)?(?P<bus>" + _BUS + r")\s*:?\s*(?:GPU\s+)?"
                      r"has\s+fallen\s+off\s+the\s+bus", re.I)
_THE_GPU_RE = re.compile(r"NVRM:\s*The\s+NVIDIA\s+GPU\s+(?P<bus>" + _BUS + r")(?P<rest>.*)", re.S)
_PID_NAME_RE = re.compile(r"^pid=(?:'[^']*'|[^,\s]*)\s*(?:,\s*name=(?P<name>.*?)(?:,\s*|\s*$))?")
_KMSG_DICT_RE = re.compile(r"^ [A-Za-z0-9_.-]+=")
# nvidia-nvswitchN: SXid (PCI:dddd:bb:dd.f): CODE, Fatal|Non-fatal, text. Follow-up lines of the
# same event ("CODE, Severity 1 Engine instance ...", "CODE, Data {...}") carry no such word and
# are not counted again.
_SXID_RE = re.compile(r"(?:nvidia-nvswitch(?P<sw>[0-9]{1,3})\s*:\s*)?SXid\s*\(\s*(?P<bus>" + _BUS
                      + r")\s*\)\s*:?\s*(?P<code>[0-9]{1,6})\s*,\s*(?P<word>Fatal|Non-?fatal)\b"
                      r"\s*,?\s*(?P<rest>.*)", re.S | re.I)
# NVSwitch reports the driver prints as one complete line with no Fatal/Non-fatal word
# (NVSWITCH_PRINT_SXID called directly, not through the error-report path that adds the word):
# the SOE, the switch's management falcon, failing. Codes and texts from NVIDIA's
# open-gpu-kernel-modules, src/common/nvswitch (NVSWITCH_ERR_HW_SOE_* in ctrl_dev_nvswitch.h:
# 26002 SOE init failed, 26004 SOE reset timeout, 26006 SOE HALTED, 26007 SOE EXTERR, 26008 SOE
# Watchdog error; printed by soe_ls10.c / soe_lr10.c) and a few more (below). Judged by
# gpucostd.health.switches.WITHOUT_WORD.
# code -> fatal (the switch's SOE or its PCIe link gone: True; its cable controller: False)
SXID_WITHOUT_WORD: Dict[int, bool] = {
    26002: True, 26004: True, 26006: True, 26007: True, 26008: True,
    10007: True,                 # "IO failure" (a register read of 0xBADF....)
    27002: False, 27005: False,  # "Failed to init CCI(0)", "Module N access error"
}
_SXID_BARE_RE = re.compile(r"(?:nvidia-nvswitch(?P<sw>[0-9]{1,3})\s*:\s*)?SXid\s*\(\s*(?P<bus>"
                           + _BUS + r")\s*\)\s*:?\s*(?P<code>[0-9]{1,6})\s*,\s*(?P<rest>.*)",
                           re.S | re.I)
_LINK_RE = re.compile(r"\bLink\s+(-?[0-9]{1,4})\b")
# "NVRM: API mismatch: the client has the version X, but / NVRM: this kernel module has the
# version Y." (older drivers), or "NVRM: API mismatch: the client 'name' (pid N) / NVRM: has the
# version X, but this kernel module has / NVRM: the version Y." (newer); syslog may join the lines
# with "#012". Up to MISMATCH_LINES lines are joined until both versions are there.
_MISMATCH_RE = re.compile(
    r"API mismatch:\s*the client(?:\s+'(?P<name>[^']*)'\s*\(pid\s+(?P<pid>\d+)\))?.*?has the "
    r"version\s+(?P<client>[0-9][0-9.\-]*[0-9]),?\s+but.*?this kernel module has.*?the version\s+"
    r"(?P<module>[0-9][0-9.\-]*[0-9])", re.S)
MISMATCH_LINES = 5
_FALLEN_TEXT = "fallen off the bus"


@dataclass
class _Pending:
    bus: str
    time: float
    mono: float
    key: str
    raw: List[str]
    lines_since: int = 0


class NvrmParser:
    """Turns kernel log lines into KernelFaults and SwitchFaults; one instance per stream (it keeps the state of
    the multi-line "fallen off the bus" message). ``feed`` never raises.

    Recognised:
    - ``NVRM: Xid (PCI:0000:9b:00): 119, pid=..., name=..., text`` with or without ``PCI:``,
      extra spaces, any prefix before ``NVRM:`` (dmesg ``[ts]``, ``kern  :warn  : <iso>``,
      syslog/journal prefixes, the raw /dev/kmsg ``4,1227,123,c;`` record header);
    - the MIG form ``NVRM: Xid (PCI:0000:01:00 GPU-I:05 GPU-CI:01): 94, ...``: the fault names the
      GPU instance and compute instance (``gpu_instance``, ``compute_instance``);
    - ``nvidia-nvswitch3: SXid (PCI:0000:05:00.0): 12028, Non-fatal, Link 32 ...``: a
      ``SwitchFault`` (the follow-up lines of the same SXid, ``Severity ...`` / ``Data {...}``,
      carry no Fatal/Non-fatal word and yield nothing);
    - ``NVRM: GPU 0000:29:00.0: GPU has fallen off the bus.`` (and ``GPU at ... has fallen``): Xid 79;
    - ``NVRM: The NVIDIA GPU 0000:b3:00.0`` / ``NVRM: (PCI ID: ...) installed in this system has`` /
      ``NVRM: fallen off the bus and is not responding to commands.``: Xid 79, emitted once when
      the third line arrives; if it does not come within `pending_lines` further NVRM lines or
      `pending_seconds` (see ``flush``), the fault is emitted from the first line alone.
    The same GPU falling off the bus is usually logged in two or three of these forms within a
    second; a second form for the same bus within `dup_window` seconds is not reported again.
    Everything else ("GPU at PCI:... GPU-<uuid>", driver load messages, kmsg
    ``KEY=value`` continuation lines, junk) yields nothing.
    """

    def __init__(self, clock: Any = None, pending_lines: int = 3, pending_seconds: float = 2.0,
                 dup_window: float = 10.0):
        self._clock = clock
        self._pending: Optional[_Pending] = None
        self._pending_lines = pending_lines
        self.pending_seconds = pending_seconds
        self._dup_window = dup_window
        self._last79: Dict[str, Tuple[float, str]] = {}   # bus -> (time, form)
        self._mismatch: Optional[List[str]] = None   # lines of an "API mismatch" message
        self._seq = 0
        # fed lines are not read again after a restart: a key of one parser must never match
        # one of an earlier run (the simulator replays the same lines from its start)
        self._run = os.urandom(4).hex()

    # -- public

    @property
    def has_pending(self) -> bool:
        return self._pending is not None

    def feed(self, line: Union[str, bytes], *, time: Optional[float] = None,
             dedupe_key: Optional[str] = None) -> List[KernelFault]:
        """Parse one line. `time` (wall) defaults to now; `dedupe_key` defaults to
        ``fed:<random id of this parser>:<sha1 of the line, 16 hex>:<line number in it>``."""
        try:
            return self._feed(line, time, dedupe_key)
        except Exception:  # bad input must never take the watcher down
            log.debug("unparseable kernel line ignored", exc_info=True)
            return []

    def flush(self, force: bool = False) -> List[KernelFault]:
        """Emit a pending multi-line "fallen off the bus" whose follow-up lines never came
        (older than `pending_seconds`, or any age with `force`)."""
        p = self._pending
        if p is None:
            return []
        if not force and self._mono() - p.mono < self.pending_seconds:
            return []
        self._pending = None
        return self._emit79(p.bus, p.time, "", "\n".join(p.raw), p.key, "multi")

    # -- internals

    def _now(self) -> float:
        return self._clock.time() if self._clock is not None else _time.time()

    def _mono(self) -> float:
        return self._clock.monotonic() if self._clock is not None else _time.monotonic()

    def _feed(self, line: Union[str, bytes], t: Optional[float], key: Optional[str]) -> List[KernelFault]:
        self._seq += 1
        if isinstance(line, (bytes, bytearray)):
            if not wanted(line):
                return []
            line = bytes(line[:MAX_LINE]).decode("utf-8", "replace")
        elif not isinstance(line, str):
            return []
        if not wanted(line):
            return []
        if len(line) > MAX_LINE:
            line = line[:MAX_LINE]
        line = line.rstrip("\r\n").replace("\x00", "")
        if _KMSG_DICT_RE.match(line):
            return []
        if t is None:
            t = self._now()
        if key is None:
            key = "fed:%s:%s:%d" % (self._run, hashlib.sha1(line.encode("utf-8", "replace"))
                                    .hexdigest()[:16], self._seq)
        at = line.find("NVRM:")
        if at < 0:
            return self._sxid(line, t, key)
        body = line[at:]
        out: List[Any] = []

        # the multi-line message in progress
        p = self._pending
        if p is not None:
            if _FALLEN_TEXT in body and not _THE_GPU_RE.search(body):
                p.raw.append(line)
                self._pending = None
                return self._emit79(p.bus, p.time, "", "\n".join(p.raw), p.key, "multi")
            if "not supported" in body or "requires use of" in body:
                self._pending = None            # a driver load message, not a fault
                return []
            if "(PCI ID:" in body and "installed in this system" in body:
                p.raw.append(line)              # the expected second line
                return []
            p.lines_since += 1
            if p.lines_since >= self._pending_lines:
                out.extend(self.flush(force=True))

        if "API mismatch" in body:
            self._mismatch = []
        if self._mismatch is not None:
            self._mismatch.append(line)
            text = " ".join(x[x.find("NVRM:") + 5:] for x in self._mismatch).replace("#012", " ")
            m = _MISMATCH_RE.search(text)
            if m:
                raw, self._mismatch = "\n".join(self._mismatch), None
                out.append(DriverMismatch(time=t, client_version=m.group("client"),
                                          module_version=m.group("module"), raw=raw,
                                          dedupe_key=key, process_name=m.group("name")))
            elif len(self._mismatch) >= MISMATCH_LINES:
                self._mismatch = None
            return out

        m = _XID_RE.search(body)
        if m:
            bus = normalize_bus_id(m.group("bus"))
            if bus is None:
                return out
            xid = int(m.group("xid"))
            gi = int(m.group("gi")) if m.group("gi") is not None else None
            ci = int(m.group("ci")) if m.group("ci") is not None else None
            rest = m.group("rest").strip()
            name = None
            pm = _PID_NAME_RE.match(rest)
            if pm:
                name = pm.group("name")
                if name is not None:
                    name = name.strip() or None
                    if name in ("<unknown>", "'<unknown>'"):
                        name = None
                rest = rest[pm.end():].lstrip(" ,").strip() or rest
            if xid == FALLEN_OFF_XID:
                out.extend(self._emit79(bus, t, rest, line, key, "xid", name))
            else:
                out.append(KernelFault(time=t, pci_bus_id=bus, xid=xid, message=rest, raw=line,
                                       process_name=name, dedupe_key=key, gpu_instance=gi,
                                       compute_instance=ci))
            return out

        m = _FELL_RE.search(body)
        if m:
            bus = normalize_bus_id(m.group("bus"))
            if bus is not None:
                out.extend(self._emit79(bus, t, "GPU has fallen off the bus.", line, key, "single"))
            return out

        m = _THE_GPU_RE.search(body)
        if m:
            bus = normalize_bus_id(m.group("bus"))
            rest = m.group("rest")
            if bus is None:
                return out
            if _FALLEN_TEXT in rest:            # the whole message on one line (journal, joined)
                out.extend(self._emit79(bus, t, "", line, key, "multi"))
            elif not rest.strip():              # "The NVIDIA GPU 0000:b3:00.0" and nothing else
                if self._pending is not None:
                    out.extend(self.flush(force=True))
                self._pending = _Pending(bus=bus, time=t, mono=self._mono(), key=key, raw=[line])
            # "(PCI ID: ...)" on the first line: a driver load message ("not supported" ...)
        return out

    @staticmethod
    def _sxid(line: str, t: float, key: str) -> List[Any]:
        m = _SXID_RE.search(line)
        fatal = m is not None and m.group("word").lower() == "fatal"
        if m is None:
            # a complete report without a severity word (the SOE's), judged as fatal; other
            # lines without the word are follow-ups of a report already counted
            m = _SXID_BARE_RE.search(line)
            if m is None or int(m.group("code")) not in SXID_WITHOUT_WORD:
                return []
            fatal = SXID_WITHOUT_WORD[int(m.group("code"))]
        bus = normalize_bus_id(m.group("bus"))
        if bus is None:
            return []
        rest = m.group("rest").strip()
        link = _LINK_RE.search(rest)
        return [SwitchFault(time=t, pci_bus_id=bus, sxid=int(m.group("code")),
                            fatal=fatal, message=rest,
                            raw=line, switch=int(m.group("sw")) if m.group("sw") else None,
                            link=int(link.group(1)) if link else None, dedupe_key=key)]

    def _emit79(self, bus: str, t: float, message: str, raw: str, key: str, form: str,
                name: Optional[str] = None) -> List[KernelFault]:
        last = self._last79.get(bus)
        if last is not None and last[1] != form and abs(t - last[0]) <= self._dup_window:
            return []   # the same event, logged again in another form
        if len(self._last79) > 4096:
            self._last79.clear()
        self._last79[bus] = (t, form)
        return [KernelFault(time=t, pci_bus_id=bus, xid=FALLEN_OFF_XID,
                            message=message or "GPU has fallen off the bus and is not responding "
                                               "to commands.",
                            raw=raw, process_name=name, dedupe_key=key)]
