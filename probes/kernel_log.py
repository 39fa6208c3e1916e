"""Kernel log watcher: NVRM Xid, "fallen off the bus" and NVSwitch SXid lines from /dev/kmsg or
the journal.

Pieces (the first two live in ``kernel_parser.py`` and are re-exported here):
- ``normalize_bus_id(text)``: any PCI address form ("PCI:0000:9b:00", "0000:03:00",
  "0000:29:00.0", NVML's "00000000:9B:00.0") -> "0000:9b:00.0", so kernel lines match NVML.
- ``NvrmParser``: stateful, line at a time, never raises; returns ``KernelFault``s (GPU Xids,
  with the MIG GPU / compute instance where the line names one) and ``SwitchFault``s (NVSwitch
  SXids).
- ``KernelLogWatcher``: a reader thread on /dev/kmsg (or the journal) feeding the parser; the loop
  calls ``poll()`` each cycle and ``commit()`` after it has stored what poll returned. The read
  position (kmsg: boot id + sequence number; journal: cursor) is persisted in the state dir, so a
  restart neither replays old lines as new nor misses lines written while the daemon was down.

Cost per unrelated kernel line is two substring tests ("NVRM" or "SXid" in line, ``wanted()``);
those lines are dropped at once, so a flood of other kernel messages cannot hold an NVRM line back.
"""
from __future__ import annotations

import collections
import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import select
import stat
import threading
import time as _time
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional, Tuple, Union

from gpucostd.statefile import read_json, set_aside, write_atomic
from gpucostd.probes.kernel_parser import (FALLEN_OFF_XID, MAX_LINE, DriverMismatch,  # noqa: F401
                                           KernelFault, NvrmParser, SwitchFault,
                                           normalize_bus_id, wanted)

log = logging.getLogger("gpucostd.kernel_log")

BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
STATE_FILE = "kernel_log.json"
SOURCES = ("auto", "kmsg", "journal", "none")
KMSG_READ_SIZE = 16384    # one read(2) of /dev/kmsg returns one record, EINVAL if it is longer

# ---------------------------------------------------------------------------------------------
# State persistence


def _write_atomic(path: str, data: Dict[str, Any]) -> None:
    write_atomic(path, json.dumps(data, sort_keys=True))


def _unescape_kmsg(text: str) -> str:
    # /dev/kmsg escapes control characters (embedded newlines of multi-line records) as \xNN
    return re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), text)


# ---------------------------------------------------------------------------------------------
# The watcher


class KernelLogWatcher:
    """Watches the kernel log for NVRM faults in a background thread.

    source: "auto" (kmsg when readable, else the journal, else none), "kmsg", "journal", "none".
    state_dir: where the read position is kept (None: not persisted).
    clock: gives .time() for fed lines (the simulator's clock); the real clock otherwise.
    kmsg_path: /dev/kmsg; for tests also a regular file or FIFO holding records in the same
      "prio,seq,usec,flags;message" form, one per line.
    on_fault: called (from the reader thread) after new faults were queued, e.g. clock.wake.

    poll() returns what was read since the last poll; commit() persists the position of all that
    poll returned (call it after storing the events). stop() does not commit.
    """

    def __init__(self, source: str = "auto", state_dir: Optional[str] = None, clock: Any = None,
                 kmsg_path: str = "/dev/kmsg", *, boot_id_path: str = BOOT_ID_PATH,
                 journal_factory: Optional[Callable[[], Any]] = None,
                 on_fault: Optional[Callable[[], None]] = None, max_queue: int = 100_000):
        if source not in SOURCES:
            raise ValueError(f"kernel log source {source!r}: allowed {', '.join(SOURCES)}")
        self.source = source
        self.state_dir = os.fspath(state_dir) if state_dir is not None else None
        self._clock = clock
        self.kmsg_path = kmsg_path
        self.boot_id_path = boot_id_path
        self._journal_factory = journal_factory
        self._on_fault = on_fault
        self._max_queue = max_queue
        self.source_in_use = "none"
        self.error: Optional[str] = None
        self.dropped = 0               # faults dropped because nobody polled (queue full)
        self.overwritten = 0           # kmsg EPIPE/EINVAL: records lost (ring wrapped, too long)
        self.lines_lost = 0            # records never read: gaps in the kmsg sequence numbers
        self.last_loss_time: Optional[float] = None     # wall time of the last gap seen
        self._last_seq: Optional[int] = None
        self.lines_read = 0
        self._queue: Deque[KernelFault] = collections.deque()
        self._available = threading.Event()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._parser = NvrmParser(clock=None)
        self._fed_parser = NvrmParser(clock=clock)
        self._fed_lock = threading.Lock()
        self._fd: Optional[int] = None
        self._journal: Any = None
        self._boot_id = "unknown"
        self._skip_seq = -1
        self._read_pos: Optional[Dict[str, Any]] = None     # last record read
        self._safe_pos: Optional[Dict[str, Any]] = None     # read and fully handed to the queue
        self._polled_pos: Optional[Dict[str, Any]] = None   # returned by poll()
        self._inflight: List[KernelFault] = []    # returned by poll(), not yet committed
        self._wake: Optional[Tuple[int, int]] = None   # pipe: stop() wakes the kmsg reader
        self._state: Dict[str, Any] = {}
        self._started = False

    # -- lifecycle

    def start(self) -> None:
        """Choose and open the source, start the reader thread. Never raises for an unreadable
        source: source_in_use becomes "none" and error says why and how to fix it."""
        if self._started:
            return
        self._started = True
        self._state = self._load_state()
        reasons: List[str] = []
        chosen = "none"
        if self.source in ("auto", "kmsg"):
            why = self._open_kmsg()
            if why is None:
                chosen = "kmsg"
            else:
                reasons.append(why)
        if chosen == "none" and self.source in ("auto", "journal"):
            why = self._open_journal()
            if why is None:
                chosen = "journal"
            else:
                reasons.append(why)
        self.source_in_use = chosen
        if chosen == "none":
            if self.source == "none":
                self.error = None
            else:
                self.error = "kernel log not watched: " + "; ".join(reasons)
                log.warning("%s", self.error)
            return
        if reasons:
            log.info("kernel log: using the journal (%s)", "; ".join(reasons))
        target = self._run_kmsg if chosen == "kmsg" else self._run_journal
        self._thread = threading.Thread(target=self._guarded(target), name="gpucostd-kernel-log",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 1.0) -> None:
        self._stop.set()
        wake = self._wake
        if wake is not None:              # the kmsg reader sleeps in poll() until this byte
            try:
                os.write(wake[1], b"x")
            except OSError:
                pass
        t = self._thread
        if t is not None:
            t.join(timeout)
        if t is not None and t.is_alive():
            log.warning("kernel log reader did not stop within %.1f s", timeout)
            return                      # it closes its source itself when it ends
        self._thread = None
        self._close_source()

    def _close_source(self) -> None:
        wake, self._wake = self._wake, None
        for end in wake or ():
            try:
                os.close(end)
            except OSError:
                pass
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
        j, self._journal = self._journal, None
        if j is not None:
            try:
                j.close()
            except Exception:
                pass

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the loop's side

    def poll(self) -> List[KernelFault]:
        """Faults read since the last poll (never blocks)."""
        pos = self._safe_pos           # read before draining: everything up to pos is queued
        with self._fed_lock:
            fed = self._fed_parser.flush()
        for f in fed:
            self._put(f)
        out: List[KernelFault] = []
        q = self._queue
        while True:
            try:
                out.append(q.popleft())
            except IndexError:
                break
        self._available.clear()
        if q:
            self._available.set()
        if pos is not None:
            self._polled_pos = pos
        self._inflight = out
        return out

    def pending(self) -> List[KernelFault]:
        """Faults read from the log that the loop has not yet judged and stored: those it
        polled this cycle (until commit) and those still queued. Any thread (the status
        socket shows them at once, before the cycle that judges them)."""
        out = list(self._inflight)
        for _ in range(3):          # the reader thread may append while this copies
            try:
                return out + list(self._queue)
            except RuntimeError:
                continue
        return out

    def wait(self, timeout: float) -> bool:
        """Block up to `timeout` seconds until a fault is waiting; True if one is."""
        return self._available.wait(timeout)

    def commit(self) -> None:
        """Persist the read position of everything poll() has returned so far."""
        self._inflight = []              # stored now: the snapshot shows them
        pos = self._polled_pos
        if pos is None or self.state_dir is None:
            return
        src = pos["source"]
        entry = {k: v for k, v in pos.items() if k != "source"}
        if self._state.get(src) == entry:
            return
        self._state[src] = entry
        try:
            _write_atomic(os.path.join(self.state_dir, STATE_FILE), self._state)
        except OSError as e:
            self.error = (f"cannot save the kernel log position in {self.state_dir}: "
                          f"{e.strerror or e}; check the state directory's permissions")
            log.warning("%s", self.error)

    def feed_lines(self, lines: Iterable[Union[str, bytes]]) -> int:
        """Inject lines (the simulator's kernel lines) through the same parser; returns the
        number of faults queued."""
        n = 0
        with self._fed_lock:
            for line in lines:
                parts = line.splitlines() if isinstance(line, (str, bytes)) else [line]
                for part in parts:
                    for f in self._fed_parser.feed(part):
                        self._put(f)
                        n += 1
        if n:
            self._notify()
        return n

    # -- internals: queue

    def _put(self, fault: KernelFault) -> None:
        if len(self._queue) >= self._max_queue:
            try:
                self._queue.popleft()
                self.dropped += 1
                self.error = (f"{self.dropped} kernel faults dropped: more than {self._max_queue} "
                              f"were waiting and nobody called poll()")
            except IndexError:
                pass
        self._queue.append(fault)

    def _notify(self) -> None:
        self._available.set()
        cb = self._on_fault
        if cb is not None:
            try:
                cb()
            except Exception:
                log.debug("on_fault callback failed", exc_info=True)

    def _read_failed(self, what: str) -> None:
        if self.error != what:
            self.error = what
            log.warning("kernel log: %s", what)
        self._stop.wait(1.0)

    def _guarded(self, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except Exception as e:  # the reader must not die silently
                self.error = f"kernel log reader ({self.source_in_use}) stopped: {e}"
                log.error("%s", self.error)
            finally:
                if self._stop.is_set():
                    self._close_source()
        return run

    # -- internals: state

    def _load_state(self) -> Dict[str, Any]:
        if self.state_dir is None:
            return {}
        path = os.path.join(self.state_dir, STATE_FILE)
        try:
            data = read_json(path)
            if isinstance(data, dict):
                # one entry per source, each an object; anything else is dropped (read from start)
                return {k: v for k, v in data.items() if isinstance(v, dict)}
            raise ValueError("not a JSON object")
        except FileNotFoundError:
            return {}
        except ValueError as e:                 # UnreadableFile
            set_aside(path, "kernel log position", e,
                      "reading the kernel log from the start of this boot")
            return {}

    # -- internals: kmsg

    def _read_boot_id(self) -> str:
        try:
            with open(self.boot_id_path) as f:
                return f.read().strip() or "unknown"
        except OSError:
            return "unknown"

    def _open_kmsg(self) -> Optional[str]:
        try:
            fd = os.open(self.kmsg_path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            hint = ""
            if e.errno in (errno.EACCES, errno.EPERM):
                hint = (" (run gpucostd as root or with CAP_SYSLOG, or set [daemon] kernel_log = "
                        "\"journal\")")
            return f"cannot read {self.kmsg_path}: {e.strerror or e}{hint}"
        self._fd = fd
        self._records = stat.S_ISCHR(os.fstat(fd).st_mode)
        self._boot_id = self._read_boot_id()
        saved = self._state.get("kmsg") or {}
        if (saved.get("boot_id") == self._boot_id and self._boot_id != "unknown"
                and isinstance(saved.get("seq"), int)):
            self._skip_seq = saved["seq"]
        else:
            self._skip_seq = -1      # new boot (or first start): the whole buffer is new
        return None

    def _record_time(self, usec: int) -> float:
        now = self._clock.time() if self._clock is not None else _time.time()
        age = _time.monotonic() - usec / 1e6
        return now - age if age > 0 else now

    def _handle_record(self, rec: bytes) -> bool:
        """One kmsg record "prio,seq,usec,flags[,...];message\\n[ KEY=value\\n...]".
        Returns True when faults were queued."""
        self.lines_read += 1
        semi = rec.find(b";")
        if semi < 0:
            return False
        head = rec[:semi].split(b",", 4)
        try:
            seq = int(head[1])
            usec = int(head[2])
        except (IndexError, ValueError):
            return False
        if seq <= self._skip_seq:
            return False
        if self._last_seq is not None and seq > self._last_seq + 1:
            # the kernel overwrote (or skipped, when too long) the records in between before
            # we read them: Xid lines may be among them
            self.lines_lost += seq - self._last_seq - 1
            self.last_loss_time = self._clock.time() if self._clock is not None else _time.time()
        self._last_seq = seq
        queued = False
        body = rec[semi + 1:]
        if wanted(body):
            nl = body.find(b"\n")
            msg = body if nl < 0 else body[:nl]
            if wanted(msg):
                text = msg[:MAX_LINE].decode("utf-8", "replace")
                if "\\x" in text:
                    text = _unescape_kmsg(text)
                t = self._record_time(usec)
                key = f"kmsg:{self._boot_id}:{seq}"
                if self._boot_id == "unknown":
                    # sequence numbers restart at every boot: the record's time since boot
                    # keeps the key of a new boot's record apart from an old one's
                    key += f":{usec}"
                used = 0
                for line in text.split("\n"):
                    for f in self._parser.feed(line, time=t, dedupe_key=key):
                        if f.dedupe_key == key:
                            used += 1
                            if used > 1:
                                f = dataclasses.replace(f, dedupe_key=f"{key}:{used}")
                        self._put(f)
                        queued = True
        self._read_pos = {"source": "kmsg", "boot_id": self._boot_id, "seq": seq}
        if not self._parser.has_pending:
            self._safe_pos = self._read_pos
        return queued

    def _idle(self) -> bool:
        """Nothing to read: emit a multi-line fault whose follow-up never came."""
        faults = self._parser.flush()
        for f in faults:
            self._put(f)
        if faults and self._read_pos is not None:
            self._safe_pos = self._read_pos
        return bool(faults)

    def _run_kmsg(self) -> None:
        fd = self._fd
        assert fd is not None
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        wake = None
        if self._records:            # /dev/kmsg: sleep until a record comes or stop() writes
            try:
                wake = self._wake = os.pipe()
                poller.register(wake[0], select.POLLIN)
            except OSError:
                wake = None          # no pipe: look for stop() every 0.2 s
        buf = b""
        while not self._stop.is_set():
            # a multi-line fault waits at most 0.2 s for its follow-up lines (_idle)
            ready = poller.poll(200 if wake is None or self._parser.has_pending else None)
            if not ready or (wake is not None and all(f == wake[0] for f, _ev in ready)):
                queued = False
            elif self._records:
                queued = self._read_records(fd)
            else:                               # regular file or FIFO: records one per line
                try:
                    data = os.read(fd, 1 << 16)
                except (BlockingIOError, InterruptedError):
                    data = None
                except OSError as e:
                    self._read_failed(f"reading {self.kmsg_path}: {e.strerror or e}")
                    data = None
                if not data:
                    self._stop.wait(0.05)       # EOF: wait for more, like tail -f
                    queued = False
                else:
                    buf += data
                    *lines, buf = buf.split(b"\n")
                    queued = False
                    for line in lines:
                        if line and line[:1] != b" ":   # not a kmsg KEY=value continuation
                            queued |= self._handle_record(line)
                    if len(buf) > MAX_LINE * 4:
                        buf = b""               # a "line" this long is junk
            # a multi-line fault whose follow-up never came, also while other lines flood in
            queued |= self._idle()
            if queued:
                self._notify()

    def _read_records(self, fd: int, read: Callable[[int, int], bytes] = os.read) -> bool:
        """Read the /dev/kmsg records waiting (one per read); True when faults were queued.
        Bounded, so stop() is seen within the second."""
        queued = False
        for _ in range(10000):
            if self._stop.is_set():
                break
            try:
                rec = read(fd, KMSG_READ_SIZE)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno == errno.EPIPE:
                    # the ring buffer wrapped past our position; the next read continues at
                    # the oldest record still there
                    self._skipped("records were overwritten before gpucostd read them (ring "
                                  "buffer wrapped); some lines were missed")
                    continue
                if e.errno == errno.EINVAL:
                    # a record longer than our buffer: the kernel has already moved past it
                    self._skipped(f"a record longer than {KMSG_READ_SIZE} bytes was skipped")
                    continue
                self._read_failed(f"reading {self.kmsg_path}: {e.strerror or e}")
                break
            if not rec:
                break
            queued |= self._handle_record(rec)
        return queued

    def _skipped(self, why: str) -> None:
        self.overwritten += 1
        if self.overwritten == 1:
            log.warning("kernel log: %s", why)

    # -- internals: journal

    def _earlier_boot(self, entry_boot: Any) -> bool:
        """True for a journal entry of an earlier boot (read after a restart that spanned a
        reboot: the fault is history, the reboot has cleared it)."""
        now = _boot_key(self._boot_id if self._boot_id != "unknown" else "")
        then = _boot_key(entry_boot)
        return bool(now and then and now != then)

    def _open_journal(self) -> Optional[str]:
        try:
            if self._journal_factory is not None:
                j = self._journal_factory()
            else:
                try:
                    from systemd import journal  # lazy: only the daemon needs it
                except ImportError:
                    return ("the journal cannot be read: the Python systemd module is not "
                            "installed (install python3-systemd or systemd-python)")
                j = journal.Reader()
            j.add_match(_TRANSPORT="kernel")
            cursor = (self._state.get("journal") or {}).get("cursor")
            skip_cursor = None
            if cursor:
                try:
                    j.seek_cursor(cursor)
                    skip_cursor = cursor
                except Exception:
                    log.warning("kernel log: saved journal cursor is no longer valid; reading "
                                "this boot's kernel messages from the start")
                    cursor = None
            if not cursor:
                j.this_boot()
                j.seek_head()
        except Exception as e:
            return f"cannot open the journal: {e}"
        self._journal = j
        self._skip_cursor = skip_cursor
        self._boot_id = self._read_boot_id()
        return None

    def _run_journal(self) -> None:
        j = self._journal
        skip = self._skip_cursor
        while not self._stop.is_set():
            queued = False
            drained = True
            for _ in range(10000):
                drained = False
                if self._stop.is_set():
                    break
                try:
                    entry = j.get_next()
                except Exception as e:          # a corrupt journal file: say so, keep going
                    self._read_failed(f"reading the journal: {e}")
                    entry = None
                if not entry:
                    drained = True
                    break
                cursor = entry.get("__CURSOR")
                if skip is not None:
                    s, skip = skip, None
                    if cursor == s:
                        continue                # seek_cursor lands on the entry already handled
                self.lines_read += 1
                msg = entry.get("MESSAGE")
                if isinstance(msg, (bytes, bytearray)):
                    msg = bytes(msg).decode("utf-8", "replace")
                if isinstance(msg, str) and wanted(msg):
                    t = _journal_time(entry.get("__REALTIME_TIMESTAMP"))
                    key = str(cursor) if cursor else None
                    earlier = self._earlier_boot(entry.get("_BOOT_ID"))
                    for line in msg.split("\n"):
                        for f in self._parser.feed(line, time=t, dedupe_key=key):
                            if earlier:
                                f = dataclasses.replace(f, previous_boot=True)
                            self._put(f)
                            queued = True
                if cursor:
                    self._read_pos = {"source": "journal", "cursor": cursor}
                    if not self._parser.has_pending:
                        self._safe_pos = self._read_pos
            queued |= self._idle()
            if queued:
                self._notify()
            if drained:                         # more entries waiting: read on at once
                try:
                    j.wait(0.2)
                except Exception:
                    self._stop.wait(0.2)


def _boot_key(value: Any) -> str:
    """A boot id as 32 lower-case hex digits (the journal gives a UUID or its hex, the kernel
    a dashed string); "" when there is none."""
    if isinstance(getattr(value, "hex", None), str):       # uuid.UUID
        value = value.hex
    elif isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("ascii", "replace")
    return str(value or "").replace("-", "").strip().lower()


def _journal_time(value: Any) -> Optional[float]:
    if value is None:
        return None
    try:
        if hasattr(value, "timestamp"):
            return float(value.timestamp())
        return float(value) / 1e6      # raw microseconds
    except (TypeError, ValueError, OverflowError):
        return None
