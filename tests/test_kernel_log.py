"""Kernel log parsing and the watcher's restart semantics (no root needed: fake kmsg files, FIFOs
and a fake journal stand in for the real sources; tests/test_kmsg_root.py uses /dev/kmsg)."""
from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest

from gpucostd.clock import VirtualClock
from gpucostd.probes.kernel_log import (KernelFault, KernelLogWatcher, NvrmParser,
                                        normalize_bus_id)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "kernel" / "nvrm-lines.txt"

# Every fixture line, by a distinctive piece of it -> (xid, bus id) or None (no fault).
# The multi-line "fallen off the bus" message yields its fault on its last line.
EXPECTED = {
    "(PCI:0000:9b:00): 119": (119, "0000:9b:00.0"),
    "GPU at PCI:0000:9b:00: GPU-": None,
    "(PCI:0000:05:00): 79": (79, "0000:05:00.0"),
    "GPU 0000:29:00.0: GPU has fallen off the bus": (79, "0000:29:00.0"),
    "Xid (0000:03:00): 14": (14, "0000:03:00.0"),
    "(PCI:0009:01:00): 149": (149, "0009:01:00.0"),
    "(PCI:0019:01:00): 154": (154, "0019:01:00.0"),
    "(PCI:0018:01:00): 145": (145, "0018:01:00.0"),
    "(PCI:0000:38:00): 13": (13, "0000:38:00.0"),
    "(PCI:0000:2a:00): 79": (79, "0000:2a:00.0"),
    "The NVIDIA GPU 0000:b3:00.0": None,
    "(PCI ID: 10de:26b5) installed in this system has": None,
    "fallen off the bus and is not responding to commands": (79, "0000:b3:00.0"),
}
PROCESS_NAMES = {119: "nvidia-smi", 145: "ray::WorkerDict"}


def fixture_lines():
    return [line.rstrip("\n") for line in FIXTURES.read_text().splitlines() if line.strip()]


def expectation(line):
    hits = [v for k, v in EXPECTED.items() if k in line]
    assert len(hits) == 1, f"fixture line without exactly one expectation in this test: {line!r}"
    return hits[0]


def test_every_fixture_line_through_the_parser():
    lines = fixture_lines()
    parser = NvrmParser()
    seen = []
    for line in lines:
        faults = parser.feed(line)
        want = expectation(line)
        got = [(f.xid, f.pci_bus_id) for f in faults]
        assert got == ([want] if want else []), line
        for f in faults:
            assert isinstance(f, KernelFault)
            assert f.raw.endswith(line) and f.dedupe_key.startswith("fed:")
            assert f.process_name == PROCESS_NAMES.get(f.xid)
            assert f.message and "pid=" not in f.message and "name=" not in f.message
            seen.append(f)
    assert parser.flush(force=True) == []
    assert len({f.dedupe_key for f in seen}) == len(seen)
    multi = [f for f in seen if f.pci_bus_id == "0000:b3:00.0"][0]
    assert multi.raw.count("\n") == 2     # the three lines of the message


def test_every_fixture_line_through_the_watcher_feed(tmp_path):
    lines = fixture_lines()
    clock = VirtualClock()
    w = KernelLogWatcher("none", tmp_path, clock=clock)
    w.start()
    w.feed_lines(lines)
    got = [(f.xid, f.pci_bus_id) for f in w.poll()]
    want = [v for v in (expectation(line) for line in lines) if v]
    assert got == want
    assert w.source_in_use == "none" and w.error is None


def _record(seq, text, usec=None, flags="-"):
    usec = seq * 1000 if usec is None else usec
    return f"4,{seq},{usec},{flags};{text}\n"


def test_every_fixture_line_through_the_kmsg_reader(tmp_path):
    lines = fixture_lines()
    kmsg = tmp_path / "kmsg"
    boot = tmp_path / "boot_id"
    boot.write_text("boot-a\n")
    records = []
    multi = [line for line in lines if "NVRM: The NVIDIA GPU" in line or "(PCI ID:" in line
             or "not responding to commands" in line]
    seq = 0
    for line in lines:
        if line in multi:
            continue
        seq += 1
        records.append(_record(seq, line.strip()))
    # /dev/kmsg carries the multi-line message as one record, newlines escaped as \x0a
    seq += 1
    records.append(_record(seq, "\\x0a".join(x.strip() for x in multi)))
    records.append(" SUBSYSTEM=pci\n DEVICE=+pci:0000:b3:00.0\n")
    kmsg.write_text("".join(records))
    w = KernelLogWatcher("kmsg", tmp_path / "state", kmsg_path=str(kmsg), boot_id_path=str(boot))
    w.start()
    try:
        want = sorted(v for v in (expectation(line) for line in lines) if v)
        faults = _poll_until(w, len(want))
        assert sorted((f.xid, f.pci_bus_id) for f in faults) == want
        assert all(f.dedupe_key.startswith("kmsg:boot-a:") for f in faults)
        assert w.source_in_use == "kmsg" and w.error is None
    finally:
        w.stop()


NOT_FAULTS = [
    # an SXid's follow-up lines (the first line of an SXid is a SwitchFault: test_kernel_forms.py)
    "nvidia-nvswitch2: SXid (PCI:0000:07:00.0): 20034, Severity 1 Engine instance 60 Sub-engine instance 00",
    "SXid (PCI:0000:84:00.0): 12028, Data {0x000001c0, 0x00bd5c8a}",
    "[   12.345678] NVRM: loading NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023",
    "NVRM: GPU at PCI:0000:9b:00: GPU-509665ad-b600-ac93-3616-d754b23d636d",
    "NVRM: GPU Board Serial Number: 1654922006253",
    "nvidia 0000:01:00.0: enabling device (0000 -> 0003)",
    "NVRM: Xid (PCI:zz:yy): 79, GPU has fallen off the bus.",
    "NVRM: Xid (PCI:0000:01:00): , nothing",
    "NVRM: os_pci_init_handle: invalid context!",
    "Xid (PCI:0000:01:00): 79, GPU has fallen off the bus.",          # no NVRM: not the driver
    " NVRM=Xid (PCI:0000:01:00): 79",                                  # kmsg KEY=value line
    "",
    "\x00\x01\x02NVRM\xff",
]


@pytest.mark.parametrize("line", NOT_FAULTS)
def test_lines_that_are_not_faults(line):
    p = NvrmParser()
    assert p.feed(line) == []
    assert p.feed(line.encode("utf-8", "surrogateescape")) == []
    assert p.flush(force=True) == []


def test_driver_load_message_about_an_unsupported_gpu_is_not_a_fault():
    p = NvrmParser()
    lines = ["NVRM: The NVIDIA GPU 0000:01:00.0 (PCI ID: 10de:1c82)",
             "NVRM: installed in this system is not supported by the",
             "NVRM: NVIDIA 470.xx driver release."]
    assert [f for line in lines for f in p.feed(line)] == []
    assert p.flush(force=True) == []


def test_fallen_off_first_line_alone_is_emitted_when_the_rest_never_comes():
    clock = VirtualClock()
    p = NvrmParser(clock=clock)
    assert p.feed("NVRM: The NVIDIA GPU 0000:b3:00.0") == []
    assert p.flush() == []                       # not yet: the follow-up may still come
    clock.advance(p.pending_seconds + 0.1)
    (f,) = p.flush()
    assert (f.xid, f.pci_bus_id) == (79, "0000:b3:00.0")
    # ... or within a few other NVRM lines
    p.feed("NVRM: The NVIDIA GPU 0000:c3:00.0")
    out = []
    for i in range(3):
        out += p.feed(f"NVRM: Xid (PCI:0000:0{i}:00): 13, pid=1, name=x, boom")
    assert [(f.xid, f.pci_bus_id) for f in out] == [(13, "0000:00:00.0"), (13, "0000:01:00.0"),
                                                    (79, "0000:c3:00.0"), (13, "0000:02:00.0")]


def test_one_fall_logged_in_two_forms_is_one_fault():
    p = NvrmParser()
    a = p.feed("NVRM: Xid (PCI:0000:2b:00): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus.")
    b = p.feed("NVRM: GPU 0000:2b:00.0: GPU has fallen off the bus.")
    assert len(a) == 1 and b == []
    # but repeated Xid lines are separate kernel events (the store dedupes by key)
    assert len(p.feed("NVRM: Xid (PCI:0000:2b:00): 79, GPU has fallen off the bus.")) == 1


def test_process_name_with_shell_metacharacters_is_kept_verbatim():
    p = NvrmParser()
    (f,) = p.feed("NVRM: Xid (PCI:0000:01:00): 13, pid=42, name=$(rm -rf /);`x`, Graphics Exception")
    assert f.process_name == "$(rm -rf /);`x`" and f.message == "Graphics Exception"


@pytest.mark.parametrize("text,want", [
    ("PCI:0000:9b:00", "0000:9b:00.0"),
    ("0000:03:00", "0000:03:00.0"),
    ("0000:29:00.0", "0000:29:00.0"),
    ("00000000:9B:00.0", "0000:9b:00.0"),
    ("00000009:01:00.1", "0009:01:00.1"),
    ("9b:00.0", "0000:9b:00.0"),
    ("GPU-123", None), ("", None), (None, None), ("0000:9b:00.9", None),
])
def test_normalize_bus_id(text, want):
    assert normalize_bus_id(text) == want


def test_fuzz_random_input_never_raises():
    rnd = random.Random(1234)
    p = NvrmParser()
    pieces = ["NVRM:", " Xid ", "(PCI:", "0000:", "9b:", "00", ")", ": ", "79", ",", " pid=",
              "name=", "The NVIDIA GPU ", "fallen off the bus", "\\x0a", "\n", "\x00", "é", "💥"]
    for _ in range(3000):
        if rnd.random() < 0.5:
            line = bytes(rnd.getrandbits(8) for _ in range(rnd.randint(0, 300)))
            if rnd.random() < 0.5:
                line = b"NVRM: Xid (" + line
        else:
            line = "".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 30)))
        for f in p.feed(line):
            assert isinstance(f.xid, int) and normalize_bus_id(f.pci_bus_id) == f.pci_bus_id
    p.flush(force=True)


def test_huge_lines():
    p = NvrmParser()
    junk = "x" * 5_000_000
    t0 = time.perf_counter()
    assert p.feed(junk) == []
    assert p.feed("NVRM:" + junk) == []
    assert p.feed("NVRM: Xid (PCI:0000:01:00): 13, " + junk)[0].xid == 13
    assert p.feed(junk + "NVRM: Xid (PCI:0000:01:00): 13, boom") == []   # beyond what we read
    assert time.perf_counter() - t0 < 2.0


# --------------------------------------------------------------------------------------------
# the watcher on a fake kmsg file: restart semantics


def _poll_until(w, n, timeout=2.0):
    deadline = time.monotonic() + timeout
    got = []
    while len(got) < n and time.monotonic() < deadline:
        w.wait(max(0.0, deadline - time.monotonic()))
        got += w.poll()
    return got


class FakeKmsg:
    def __init__(self, tmp_path):
        self.path = tmp_path / "kmsg"
        self.boot = tmp_path / "boot_id"
        self.state = tmp_path / "state"
        self.seq = 0
        self.new_boot("boot-1")

    def new_boot(self, boot_id):
        self.boot.write_text(boot_id + "\n")
        self.path.write_text("")
        self.seq = 0

    def write(self, text):
        self.seq += 1
        with open(self.path, "a") as f:
            f.write(_record(self.seq, text))
        return self.seq

    def watcher(self, **kw):
        w = KernelLogWatcher("kmsg", self.state, kmsg_path=str(self.path),
                             boot_id_path=str(self.boot), **kw)
        w.start()
        return w


def xid_line(n, xid=13, bus="0000:01:00"):
    return f"NVRM: Xid (PCI:{bus}): {xid}, pid=1, name=app, fault number {n}"


def test_restart_neither_replays_nor_misses(tmp_path):
    k = FakeKmsg(tmp_path)
    k.write("unrelated")
    k.write(xid_line(1))
    k.write("unrelated")
    w = k.watcher()
    (f1,) = _poll_until(w, 1)
    assert f1.message.endswith("fault number 1") and f1.dedupe_key == "kmsg:boot-1:2"
    w.commit()
    w.stop()
    state = json.loads((k.state / "kernel_log.json").read_text())
    assert state["kmsg"] == {"boot_id": "boot-1", "seq": 3}

    k.write(xid_line(2))                      # written while the watcher was down
    w = k.watcher()
    (f2,) = _poll_until(w, 1)
    assert f2.message.endswith("fault number 2")
    k.write(xid_line(3))
    (f3,) = _poll_until(w, 1)
    assert f3.message.endswith("fault number 3")
    assert w.poll() == []
    w.commit()
    w.stop()


def test_faults_read_but_not_yet_stored_are_pending_until_commit(tmp_path):
    """What the status socket shows before the cycle that judges a fault: pending() holds it
    from the moment the reader queued it until the loop stored it (commit)."""
    from conftest import wait_for
    from gpucostd.views.statusview import with_pending_faults
    k = FakeKmsg(tmp_path)
    w = k.watcher()
    try:
        assert w.pending() == []
        k.write(xid_line(7, xid=43, bus="0000:9b:00"))
        wait_for(lambda: len(w.pending()) == 1, 10, what="the fault pending")
        (f,) = w.poll()
        assert w.pending() == [f]          # polled, not stored yet: still shown
        doc = {"gpus": [{"index": 3, "pci_bus_id": "00000000:9B:00.0"}],
               "events": [{"id": 1, "message": "older"}]}
        shown = with_pending_faults(doc, w.pending())
        first = shown["events"][0]
        assert first["fields"]["pending"] is True and first["xid"] == 43
        assert first["subject"] == "gpu:3" and "fault number 7" in first["message"]
        assert first["severity"] == "UNKNOWN" and shown["events"][1]["message"] == "older"
        assert len(doc["events"]) == 1             # the cached document is not changed
        w.commit()
        assert w.pending() == [] and with_pending_faults(doc, []) is doc
    finally:
        w.stop()


def test_crash_between_poll_and_commit_returns_the_same_fault_with_the_same_key(tmp_path):
    k = FakeKmsg(tmp_path)
    k.write(xid_line(1))
    w = k.watcher()
    (a,) = _poll_until(w, 1)
    w.stop()                                   # no commit: as if the daemon was killed
    w = k.watcher()
    (b,) = _poll_until(w, 1)
    assert a.dedupe_key == b.dedupe_key        # the event store drops the second one
    w.stop()


def test_new_boot_reads_the_buffer_from_the_start(tmp_path):
    k = FakeKmsg(tmp_path)
    for i in range(5):
        k.write(xid_line(i))
    w = k.watcher()
    assert len(_poll_until(w, 5)) == 5
    w.commit()
    w.stop()
    k.new_boot("boot-2")                       # sequence numbers restart at 1
    k.write(xid_line(10))
    w = k.watcher()
    (f,) = _poll_until(w, 1)
    assert f.dedupe_key == "kmsg:boot-2:1" and f.message.endswith("fault number 10")
    w.stop()


def test_corrupt_state_file_reads_from_start_without_crashing(tmp_path, caplog):
    k = FakeKmsg(tmp_path)
    k.state.mkdir()
    (k.state / "kernel_log.json").write_text("{not json")
    k.write(xid_line(1))
    w = k.watcher()
    assert len(_poll_until(w, 1)) == 1
    w.commit()
    w.stop()
    assert json.loads((k.state / "kernel_log.json").read_text())["kmsg"]["seq"] == 1
    assert "unreadable kernel log position" in caplog.text


def test_commit_covers_unrelated_lines_read_after_the_last_fault(tmp_path):
    k = FakeKmsg(tmp_path)
    k.write(xid_line(1))
    for _ in range(50):
        k.write("unrelated")
    w = k.watcher()
    assert len(_poll_until(w, 1)) == 1
    deadline = time.monotonic() + 2
    while w.lines_read < 51 and time.monotonic() < deadline:
        time.sleep(0.01)
    w.poll()
    w.commit()
    w.stop()
    assert json.loads((k.state / "kernel_log.json").read_text())["kmsg"]["seq"] == 51


def test_stop_is_prompt(tmp_path):
    k = FakeKmsg(tmp_path)
    w = k.watcher()
    assert w.running
    t0 = time.monotonic()
    w.stop()
    assert time.monotonic() - t0 < 1.0 and not w.running


def test_unreadable_sources_fall_back_and_say_why(tmp_path):
    missing = str(tmp_path / "no-kmsg")
    w = KernelLogWatcher("kmsg", tmp_path, kmsg_path=missing)
    w.start()
    assert w.source_in_use == "none" and missing in w.error
    w.stop()

    def broken_journal():
        raise OSError("journal files not found")
    w = KernelLogWatcher("auto", tmp_path, kmsg_path=missing, journal_factory=broken_journal)
    w.start()
    assert w.source_in_use == "none"
    assert missing in w.error and "journal files not found" in w.error
    w.feed_lines([xid_line(1)])               # the simulator still works without a source
    assert len(w.poll()) == 1
    w.stop()

    w = KernelLogWatcher("none", tmp_path)
    w.start()
    assert (w.source_in_use, w.error, w.running) == ("none", None, False)

    with pytest.raises(ValueError):
        KernelLogWatcher("syslog", tmp_path)


# --------------------------------------------------------------------------------------------
# the journal source (fake systemd.journal.Reader)


class FakeJournal:
    """Just enough of systemd.journal.Reader: entries with __CURSOR, seek_cursor lands on the
    entry with that cursor (as sd_journal does)."""

    def __init__(self, entries):
        self.entries = entries
        self.pos = 0
        self.matches = []

    def add_match(self, **kw):
        self.matches.append(kw)

    def this_boot(self):
        pass

    def seek_head(self):
        self.pos = 0

    def seek_cursor(self, cursor):
        for i, e in enumerate(self.entries):
            if e["__CURSOR"] == cursor:
                self.pos = i
                return
        raise OSError("no such cursor")

    def get_next(self):
        if self.pos < len(self.entries):
            self.pos += 1
            return dict(self.entries[self.pos - 1])
        return {}

    def wait(self, timeout):
        time.sleep(min(timeout, 0.02))

    def close(self):
        pass


def test_journal_source_resumes_by_cursor(tmp_path):
    entries = [{"__CURSOR": f"s=abc;i={i}", "MESSAGE": xid_line(i) if i % 2 else "other",
                "__REALTIME_TIMESTAMP": 1_700_000_000_000_000 + i} for i in range(6)]
    journal = FakeJournal(entries[:4])
    w = KernelLogWatcher("auto", tmp_path, kmsg_path=str(tmp_path / "none"),
                         journal_factory=lambda: journal)
    w.start()
    assert w.source_in_use == "journal" and {"_TRANSPORT": "kernel"} in journal.matches
    got = _poll_until(w, 2)
    assert [f.dedupe_key for f in got] == ["s=abc;i=1", "s=abc;i=3"]
    assert got[0].time == pytest.approx(1_700_000_000.000001)
    w.commit()
    w.stop()
    journal = FakeJournal(entries)             # two more entries written while down
    w = KernelLogWatcher("journal", tmp_path, journal_factory=lambda: journal)
    w.start()
    got = _poll_until(w, 1)
    assert [f.dedupe_key for f in got] == ["s=abc;i=5"]
    w.stop()


def test_journal_multi_line_message_is_one_fault(tmp_path):
    msg = ("NVRM: The NVIDIA GPU 0000:b3:00.0\nNVRM: (PCI ID: 10de:26b5) installed in this system "
           "has\nNVRM: fallen off the bus and is not responding to commands.")
    journal = FakeJournal([{"__CURSOR": "c1", "MESSAGE": msg}])
    w = KernelLogWatcher("journal", tmp_path, journal_factory=lambda: journal)
    w.start()
    (f,) = _poll_until(w, 1)
    assert (f.xid, f.pci_bus_id, f.dedupe_key) == (79, "0000:b3:00.0", "c1")
    w.stop()


# --------------------------------------------------------------------------------------------
# floods


def test_flood_through_feed_lines_does_not_delay_the_nvrm_line(tmp_path):
    w = KernelLogWatcher("none", tmp_path)
    w.start()
    flood = [f"usb 1-1: device descriptor read/64, error -71 ({i})" for i in range(20000)]
    t0 = time.monotonic()
    w.feed_lines(flood + [xid_line(1)])
    (f,) = w.poll()
    assert time.monotonic() - t0 < 1.0 and f.xid == 13


def test_flood_through_a_pipe_does_not_delay_the_nvrm_line(tmp_path):
    fifo = tmp_path / "kmsg.fifo"
    os.mkfifo(fifo)
    boot = tmp_path / "boot_id"
    boot.write_text("b\n")
    w = KernelLogWatcher("kmsg", tmp_path / "state", kmsg_path=str(fifo), boot_id_path=str(boot))
    w.start()
    written = {}
    try:
        fd = os.open(fifo, os.O_WRONLY)
        try:
            flood = "".join(_record(i, f"eth0: link flapped, unrelated line {i} " + "y" * 80)
                            for i in range(1, 20001))
            data = flood.encode()
            while data:                        # a blocking write: the reader must keep up
                n = os.write(fd, data)
                data = data[n:]
            written["t"] = time.monotonic()
            os.write(fd, _record(20001, xid_line(1)).encode())
            assert w.wait(1.0), "NVRM line not seen within 1 s of being written after a flood"
            seen_after = time.monotonic() - written["t"]
            (f,) = w.poll()
            assert f.dedupe_key == "kmsg:b:20001"
            assert seen_after < 1.0
        finally:
            os.close(fd)
    finally:
        w.stop()


def test_on_fault_callback_and_poll_before_start(tmp_path):
    calls = []
    w = KernelLogWatcher("none", tmp_path, on_fault=lambda: calls.append(1))
    assert w.poll() == []                      # safe before start()
    w.commit()
    w.feed_lines(["unrelated", xid_line(1)])
    assert calls == [1] and w.wait(0) and len(w.poll()) == 1 and not w.wait(0)


def test_multi_line_fed_message_and_late_flush_in_poll(tmp_path):
    clock = VirtualClock()
    w = KernelLogWatcher("none", tmp_path, clock=clock)
    w.start()
    w.feed_lines(["NVRM: The NVIDIA GPU 0000:b3:00.0\nNVRM: (PCI ID: 10de:26b5) installed in "
                  "this system has\nNVRM: fallen off the bus and is not responding to commands."])
    (f,) = w.poll()
    assert (f.xid, f.pci_bus_id, f.time) == (79, "0000:b3:00.0", clock.time())
    w.feed_lines(["NVRM: The NVIDIA GPU 0000:b4:00.0"])   # the rest never comes
    assert w.poll() == []
    clock.advance(5)
    assert [(f.xid, f.pci_bus_id) for f in w.poll()] == [(79, "0000:b4:00.0")]


def test_queue_is_bounded_and_says_so(tmp_path):
    w = KernelLogWatcher("none", tmp_path, max_queue=10)
    w.feed_lines([xid_line(i) for i in range(15)])
    got = w.poll()
    assert len(got) == 10 and got[-1].message.endswith("fault number 14")
    assert w.dropped == 5 and "dropped" in w.error


def test_first_line_alone_is_emitted_while_other_lines_keep_coming(tmp_path):
    # "The NVIDIA GPU <bus>" whose follow-up lines never come, then a steady trickle of other
    # kernel lines: the reader never goes idle, yet the fault must not wait for the trickle to stop
    import threading
    fifo = tmp_path / "kmsg.fifo"
    os.mkfifo(fifo)
    boot = tmp_path / "boot_id"
    boot.write_text("b\n")
    w = KernelLogWatcher("kmsg", tmp_path / "state", kmsg_path=str(fifo), boot_id_path=str(boot))
    w._parser.pending_seconds = 0.3
    w.start()
    stop = threading.Event()

    def trickle(fd):
        seq = 2
        while not stop.is_set():
            os.write(fd, _record(seq, f"eth0: link flapped ({seq})").encode())
            seq += 1
            stop.wait(0.05)

    fd = os.open(fifo, os.O_WRONLY)
    writer = threading.Thread(target=trickle, args=(fd,), daemon=True)
    try:
        os.write(fd, _record(1, "NVRM: The NVIDIA GPU 0000:b3:00.0").encode())
        t0 = time.monotonic()
        writer.start()
        got = _poll_until(w, 1, timeout=1.5)
        assert [(f.xid, f.pci_bus_id, f.dedupe_key) for f in got] == [(79, "0000:b3:00.0",
                                                                       "kmsg:b:1")]
        assert time.monotonic() - t0 < 1.5
    finally:
        stop.set()
        writer.join(2)
        os.close(fd)
        w.stop()


def test_kmsg_read_errors_epipe_and_einval_skip_a_record_without_stalling(tmp_path):
    import errno
    w = KernelLogWatcher("kmsg", tmp_path / "state", kmsg_path=str(tmp_path / "none"))
    w._boot_id = "b"
    script = [_record(1, xid_line(1)).encode(), OSError(errno.EINVAL, "Invalid argument"),
              _record(3, xid_line(3)).encode(), BrokenPipeError(errno.EPIPE, "Broken pipe"),
              _record(9, xid_line(9)).encode(), BlockingIOError()]

    def read(fd, size):
        step = script.pop(0)
        if isinstance(step, BaseException):
            raise step
        return step

    t0 = time.monotonic()
    assert w._read_records(-1, read=read) is True
    assert time.monotonic() - t0 < 0.5                  # no back-off on these
    assert [f.dedupe_key for f in w.poll()] == ["kmsg:b:1", "kmsg:b:3", "kmsg:b:9"]
    assert w.overwritten == 2 and w.error is None


def test_journal_flood_is_read_without_pausing_between_batches(tmp_path):
    class SlowWaitJournal(FakeJournal):
        def wait(self, timeout):
            time.sleep(timeout)                 # like sd_journal_wait with nothing new

    entries = [{"__CURSOR": f"s=f;i={i}", "MESSAGE": f"eth0: unrelated {i}"}
               for i in range(40000)]
    entries.append({"__CURSOR": "s=f;i=nvrm", "MESSAGE": xid_line(1)})
    w = KernelLogWatcher("journal", tmp_path, journal_factory=lambda: SlowWaitJournal(entries))
    t0 = time.monotonic()
    w.start()
    try:
        got = _poll_until(w, 1, timeout=2.0)
        assert [f.dedupe_key for f in got] == ["s=f;i=nvrm"]
        assert time.monotonic() - t0 < 0.5, "the reader paused between batches of a flood"
    finally:
        w.stop()


def test_journal_faults_of_an_earlier_boot_are_marked(tmp_path):
    import uuid
    boot = tmp_path / "boot_id"
    boot.write_text("11111111-2222-3333-4444-555555555555\n")
    entries = [{"__CURSOR": "c1", "MESSAGE": xid_line(1, xid=79),
                "_BOOT_ID": uuid.UUID("99999999-2222-3333-4444-555555555555")},
               {"__CURSOR": "c2", "MESSAGE": xid_line(2, xid=79),
                "_BOOT_ID": uuid.UUID("11111111-2222-3333-4444-555555555555")},
               {"__CURSOR": "c3", "MESSAGE": xid_line(3, xid=13),
                "_BOOT_ID": "111111112222333344445555555555555"[:32]},
               {"__CURSOR": "c4", "MESSAGE": xid_line(4, xid=13)}]
    w = KernelLogWatcher("journal", tmp_path, boot_id_path=str(boot),
                         journal_factory=lambda: FakeJournal(entries))
    w.start()
    try:
        got = _poll_until(w, 4)
    finally:
        w.stop()
    assert [(f.dedupe_key, f.previous_boot) for f in got] == [
        ("c1", True), ("c2", False), ("c3", False), ("c4", False)]


def test_state_file_with_wrong_shapes_reads_from_start_without_crashing(tmp_path):
    k = FakeKmsg(tmp_path)
    k.state.mkdir()
    (k.state / "kernel_log.json").write_text('{"kmsg": [1, 2], "journal": "cursor"}')
    k.write(xid_line(1))
    w = k.watcher()
    try:
        assert w.source_in_use == "kmsg" and len(_poll_until(w, 1)) == 1
        w.commit()
    finally:
        w.stop()
    assert json.loads((k.state / "kernel_log.json").read_text())["kmsg"]["seq"] == 1
    entries = [{"__CURSOR": "c1", "MESSAGE": xid_line(1)}]
    j = KernelLogWatcher("journal", k.state, journal_factory=lambda: FakeJournal(entries))
    (k.state / "kernel_log.json").write_text('{"journal": ["not", "a", "cursor"]}')
    j.start()
    try:
        assert j.source_in_use == "journal" and len(_poll_until(j, 1)) == 1
    finally:
        j.stop()


def test_fed_lines_of_a_new_run_are_not_duplicates_of_the_last_run(tmp_path):
    # the simulator replays its timeline from the start after a daemon restart: the same lines
    # are new faults, and the event store must not drop them as already recorded
    from gpucostd.record.events import EventStore
    store = EventStore(str(tmp_path))
    stored = []
    for _ in range(2):                         # two daemon runs
        w = KernelLogWatcher("none", tmp_path)
        w.start()
        w.feed_lines([xid_line(1), xid_line(1)])
        for f in w.poll():
            assert not store.seen(f.dedupe_key)
            stored.append(store.append(_xid_event(f), f.dedupe_key))
        w.stop()
    assert len(stored) == 4 and all(e is not None for e in stored)


def _xid_event(f):
    from gpucostd.snapshot import Event, Severity
    return Event(f.time, "node", "xid", Severity.WARN, "look up", f.message, xid=f.xid)


def test_without_a_boot_id_kmsg_keys_still_differ_between_boots(tmp_path):
    kmsg = tmp_path / "kmsg"
    keys = []
    for usec in (5_000_000, 7_000_000, 7_000_000):     # boot A, boot B, B read again
        kmsg.write_text(_record(1, xid_line(1), usec=usec))
        w = KernelLogWatcher("kmsg", None, kmsg_path=str(kmsg),
                             boot_id_path=str(tmp_path / "no-boot-id"))
        w.start()
        try:
            (f,) = _poll_until(w, 1)
        finally:
            w.stop()
        keys.append(f.dedupe_key)
    assert keys[0] != keys[1] and keys[1] == keys[2]
    assert keys[1].startswith("kmsg:unknown:1")


# ------------------------------------------------------------------ never on a GPU node's kernel log
def test_a_loaded_nvidia_driver_refuses_kmsg_writes_with_a_reason(tmp_path):
    """The root tests that write to /dev/kmsg (Xid-shaped lines, a flood) skip on a host with an
    NVIDIA driver: its kernel log is watched, and a test Xid would page whoever watches it."""
    from conftest import nvidia_driver_loaded
    assert nvidia_driver_loaded(str(tmp_path)) is None
    (tmp_path / "sys" / "module" / "nvidia").mkdir(parents=True)
    reason = nvidia_driver_loaded(str(tmp_path))
    assert reason and "/sys/module/nvidia" in reason and "NVIDIA driver is loaded" in reason
    (tmp_path / "sys" / "module" / "nvidia").rmdir()
    (tmp_path / "proc" / "driver" / "nvidia").mkdir(parents=True)
    assert "/proc/driver/nvidia" in nvidia_driver_loaded(str(tmp_path))


def test_every_test_that_writes_to_kmsg_goes_through_the_guard():
    """A test function that writes to /dev/kmsg takes the writable_kmsg fixture (or asks
    kmsg_write_refusal() itself), so it skips where an NVIDIA driver is loaded."""
    import ast
    import re
    tests = Path(__file__).resolve().parent
    unguarded = []
    for path in sorted(tests.glob("*.py")):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if fn.name in ("write_kmsg", "kmsg_write_refusal", "writable_kmsg"):
                continue
            src = ast.get_source_segment(path.read_text(), fn) or ""
            writes = "write_kmsg(" in src or re.search(
                r'open\(\s*("/dev/kmsg"|KMSG)\s*,[^)]*O_(WRONLY|RDWR)', src)
            guarded = ("writable_kmsg" in [a.arg for a in fn.args.args]
                       or "kmsg_write_refusal()" in src)
            if writes and not guarded:
                unguarded.append(f"{path.name}::{fn.name}")
    assert not unguarded, f"writes to /dev/kmsg without the GPU-node guard: {unguarded}"


def test_a_pending_fault_shows_no_terminal_escape_from_its_kernel_text():
    """A fault shown before its cycle carries the kernel's own text: the control characters
    anyone who can write to the log could put there are replaced, as in stored events."""
    import json
    from types import SimpleNamespace
    from gpucostd.views.statusview import with_pending_faults
    evil = "NVRM: Xid (PCI:0000:9b:00): 13, pid=1, name=\x1b]0;owned\x07\x9b2J evil"
    fault = SimpleNamespace(pci_bus_id="0000:9b:00\x1b[2J", xid=13, sxid=None, time=1.0,
                            message=evil, raw=evil)
    shown = with_pending_faults({"gpus": [], "events": []}, [fault])
    text = json.dumps(shown, ensure_ascii=False)
    assert "evil" in text and not any(c in text for c in "\x1b\x07\x9b"), text
