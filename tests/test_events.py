"""Event store (durability, dedupe, bounds, corruption, threads) and journal sending."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time


from gpucostd.record import journal
from gpucostd.record.events import EventStore
from gpucostd.snapshot import Event, Severity

NOW = time.time()


def ev(i=0, t=None, code="xid", gpu=3, xid=79, **kw):
    return Event(NOW + i if t is None else t, f"gpu:{gpu}" if gpu is not None else "node", code,
                 Severity.CRIT, "reset GPU", f"event {i}", gpu=gpu, uuid="GPU-abc", xid=xid,
                 fields=kw or {"pci_bus_id": "0000:9b:00.0"})


def test_append_assigns_ids_and_survives_reopen(tmp_path):
    s = EventStore(str(tmp_path))
    a = s.append(ev(0))
    b = s.append(ev(1, code="health_change", xid=None, to="CRIT"))
    assert a.id is not None and b.id > a.id
    s.close()
    s2 = EventStore(str(tmp_path))
    got = s2.query()
    assert [e.id for e in got] == [a.id, b.id]
    assert got[0].severity == Severity.CRIT and got[0].fields == {"pci_bus_id": "0000:9b:00.0"}
    assert got[1].fields == {"to": "CRIT"} and got[0].gpu == 3 and got[0].uuid == "GPU-abc"
    assert (tmp_path / "events.sqlite").exists()


def test_sigkilled_writer_loses_nothing_it_reported(tmp_path):
    code = textwrap.dedent(f"""\
        import sys, time
        from gpucostd.record.events import EventStore
        from gpucostd.snapshot import Event, Severity
        s = EventStore({str(tmp_path)!r})
        for i in range(5):
            e = s.append(Event({NOW} + i, "gpu:1", "xid", Severity.CRIT, "reboot",
                               "killed writer %d" % i, gpu=1, xid=79), dedupe_key="k%d" % i)
            print(e.id, flush=True)
        time.sleep(120)
        """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        ids = [int(proc.stdout.readline()) for _ in range(5)]
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    s = EventStore(str(tmp_path))
    got = s.query()
    assert [e.id for e in got] == ids
    assert [e.message for e in got] == [f"killed writer {i}" for i in range(5)]
    assert s.xid_totals() == {(1, 79): 5}
    assert s.append(ev(9), dedupe_key="k3") is None      # dedupe keys survived too


def test_dedupe(tmp_path):
    s = EventStore(str(tmp_path))
    assert s.append(ev(0), dedupe_key="kmsg:boot:17") is not None
    assert s.append(ev(1), dedupe_key="kmsg:boot:17") is None
    assert s.append(ev(2, dedupe_key="kmsg:boot:18")) is not None      # key from fields
    assert s.append(ev(3, dedupe_key="kmsg:boot:18")) is None
    assert s.append(ev(4), dedupe_key="") is not None                  # empty: no key
    assert s.append(ev(5), dedupe_key="") is not None
    assert len(s.query()) == 4
    s.close()
    assert EventStore(str(tmp_path)).append(ev(6), dedupe_key="kmsg:boot:17") is None


def test_seen_reports_stored_dedupe_keys(tmp_path):
    s = EventStore(str(tmp_path))
    assert not s.seen("kmsg:boot:17") and not s.seen("") and not s.seen(None)
    s.append(ev(0), dedupe_key="kmsg:boot:17")
    s.append(ev(1, dedupe_key="kmsg:boot:18"))                        # key from fields
    s.append(ev(2), dedupe_key="")
    assert s.seen("kmsg:boot:17") and s.seen("kmsg:boot:18")
    assert not s.seen("kmsg:boot:19") and not s.seen("")
    s.close()
    s = EventStore(str(tmp_path))                                     # survives a restart
    assert s.seen("kmsg:boot:17") and not s.seen("kmsg:boot:19")
    s.close()


def test_seen_counts_events_held_in_memory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    s = EventStore(str(blocker / "state"))                            # database unusable
    assert not s.seen("journal:cursor-1")
    assert s.append(ev(0), dedupe_key="journal:cursor-1").id < 0      # kept in memory
    assert s.seen("journal:cursor-1") and not s.seen("journal:cursor-2")


def test_seen_is_safe_beside_a_writer(tmp_path):
    s = EventStore(str(tmp_path))
    errors = []

    def writer():
        try:
            for i in range(200):
                s.append(ev(i), dedupe_key=f"k{i}")
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    t = threading.Thread(target=writer)
    t.start()
    try:
        while t.is_alive():
            s.seen("k0")
    finally:
        t.join(10)
    assert errors == [] and all(s.seen(f"k{i}") for i in range(200))


def test_query_filters_and_recent(tmp_path):
    s = EventStore(str(tmp_path))
    for i in range(10):
        s.append(ev(i, gpu=i % 2))
    assert [e.message for e in s.recent(3)] == ["event 7", "event 8", "event 9"]
    assert [e.message for e in s.query(since=NOW + 5)] == [f"event {i}" for i in range(5, 10)]
    assert [e.message for e in s.query(since=NOW + 2, until=NOW + 4)] == [
        "event 2", "event 3", "event 4"]
    assert [e.message for e in s.query(limit=2)] == ["event 8", "event 9"]
    assert [e.message for e in s.query(subject="gpu:1", limit=2)] == ["event 7", "event 9"]
    assert s.xid_totals() == {(0, 79): 5, (1, 79): 5}


def test_pruning_by_count_and_age_keeps_xid_totals(tmp_path):
    s = EventStore(str(tmp_path), max_age_days=1, max_count=100, prune_every=10)
    old = s.append(ev(0, t=NOW - 3 * 86400))
    for i in range(150):
        s.append(ev(i + 1, gpu=None, xid=13))
    s.prune()
    got = s.query()
    assert len(got) == 100 and old.id not in {e.id for e in got}
    assert got[-1].message == "event 150"
    assert s.count() == 100
    totals = s.xid_totals()
    assert totals[(None, 13)] == 150 and totals[(3, 79)] == 1     # a counter never goes back


def test_corrupt_database_is_moved_aside(tmp_path, caplog):
    db = tmp_path / "events.sqlite"
    db.write_bytes(b"this is not a database, just garbage\x00" * 200)
    with caplog.at_level(logging.WARNING, logger="gpucostd"):
        s = EventStore(str(tmp_path))
    aside = [p for p in os.listdir(tmp_path) if p.startswith("events.sqlite.corrupt-")]
    assert len(aside) == 1
    assert (tmp_path / aside[0]).read_bytes().startswith(b"this is not a database")
    assert "moved it aside" in caplog.text and "Traceback" not in caplog.text
    assert s.append(ev(0)).id is not None and len(s.query()) == 1


def test_corruption_at_runtime_is_survived(tmp_path, caplog, monkeypatch):
    import sqlite3
    s = EventStore(str(tmp_path))
    s.append(ev(0))
    real = s._insert
    calls = []

    def corrupt_once(event, key):
        calls.append(1)
        if len(calls) == 1:
            raise sqlite3.DatabaseError("database disk image is malformed")
        return real(event, key)
    monkeypatch.setattr(s, "_insert", corrupt_once)
    with caplog.at_level(logging.WARNING, logger="gpucostd"):
        stored = s.append(ev(1))
    assert stored is not None and stored.id > 0            # written to the fresh database
    assert [e.message for e in s.query()] == ["event 1"]
    assert any(p.startswith("events.sqlite.corrupt-") for p in os.listdir(tmp_path))
    assert "moved it aside" in caplog.text


def test_locked_database_keeps_the_event_and_retries(tmp_path, caplog, monkeypatch):
    import sqlite3
    s = EventStore(str(tmp_path))
    real = s._insert
    fail = [True]

    def locked(event, key):
        if fail[0]:
            raise sqlite3.OperationalError("database is locked")
        return real(event, key)
    monkeypatch.setattr(s, "_insert", locked)
    with caplog.at_level(logging.ERROR, logger="gpucostd"):
        kept = s.append(ev(0))
    assert kept is not None and kept.id < 0 and s.pending == 1
    assert "database is locked" in caplog.text
    fail[0] = False
    assert s.append(ev(1)).id > 0 and s.pending == 0
    assert [e.message for e in s.query()] == ["event 0", "event 1"]
    assert all(e.id > 0 for e in s.query())


def test_unwritable_state_dir_keeps_events_in_memory(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with caplog.at_level(logging.ERROR, logger="gpucostd"):
        s = EventStore(str(blocker / "state"))
        e = s.append(ev(0))
    assert e is not None and e.id < 0                   # kept, with a memory-only id
    assert s.pending == 1 and [x.message for x in s.query()] == ["event 0"]
    assert s.xid_totals() == {(3, 79): 1}
    assert "kept in memory" in caplog.text


def test_concurrent_reader_and_writer(tmp_path):
    s = EventStore(str(tmp_path))
    errors = []
    stop = threading.Event()

    def reader():
        try:
            while not stop.is_set():
                s.recent(20)
                s.xid_totals()
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(300):
            assert s.append(ev(i)) is not None
    finally:
        stop.set()
        t.join(10)
    assert errors == [] and s.count() == 300


# --------------------------------------------------------------------------- journal
def test_message_ids_are_stable_128_bit_and_unique():
    ids = list(journal.MESSAGE_IDS.values())
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert journal.message_id("xid") == "b423b3f884274c40a3490bb23442c194"
    assert journal.message_id("health_change") == "6de1eb59fcff40608904d0864131b359"
    unknown = journal.message_id("some_new_code")
    assert unknown == journal.message_id("some_new_code") and len(unknown) == 32


def test_send_event_to_journal_fields():
    sent = []
    e = Event(NOW, "gpu:3", "xid", Severity.CRIT, "reboot", "Xid 79 fallen\noff the bus",
              gpu=3, uuid="GPU-abc", xid=79, fields={"pci_bus_id": "0000:9b:00.0"}, id=12)
    journal.send_event(e, sender=lambda msg, **f: sent.append((msg, f)))
    (msg, f), = sent
    assert msg == "gpu:3 CRIT xid: Xid 79 fallen off the bus (action: reboot)"
    assert f["MESSAGE_ID"] == journal.MESSAGE_IDS["xid"] and f["PRIORITY"] == "2"
    assert (f["GPU"], f["UUID"], f["XID"], f["SEVERITY"]) == ("3", "GPU-abc", "79", "CRIT")
    assert f["GPUCOSTD_PCI_BUS_ID"] == "0000:9b:00.0" and f["EVENT_ID"] == "12"
    s = Event(NOW, "gpu:0", "drift", Severity.WARN, "none", "power limit drifted",
              gpu=0, fields={"setting": "power_limit_watts"})
    journal.send_event(s, sender=lambda msg, **f: sent.append((msg, f)))
    assert sent[-1][1]["SETTING"] == "power_limit_watts" and sent[-1][1]["PRIORITY"] == "4"


def test_send_event_without_systemd_logs_one_line(monkeypatch, caplog):
    monkeypatch.setattr(journal, "_journal", lambda: None)
    with caplog.at_level(logging.INFO, logger="gpucostd"):
        journal.send_event(ev(0))
        journal.log_startup("0.1.0", NOW, config_path="/etc/gpucostd/gpucostd.toml",
                            gpu_count=8)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "gpu:3 CRIT xid: event 0 (action: reset GPU)"
    assert lines[1].startswith("node OK startup: gpucostd 0.1.0 started, 8 GPUs")
    assert caplog.records[0].levelno == logging.ERROR


def test_broken_journal_falls_back_to_the_log(caplog):
    def boom(msg, **f):
        raise OSError("journal socket gone")
    with caplog.at_level(logging.INFO, logger="gpucostd"):
        journal.send_event(ev(0), sender=boom)
    assert "journal unavailable" in caplog.text and "event 0" in caplog.text


def test_pruning_follows_the_store_clock(tmp_path):
    """Replay stores events at virtual dates; the store prunes by its own clock, not today's."""
    from gpucostd.clock import VirtualClock
    from gpucostd.record.events import EventStore
    from gpucostd.snapshot import Event, Severity
    clock = VirtualClock(start_wall=1_000_000_000.0)      # 2001
    store = EventStore(str(tmp_path), max_age_days=1, max_count=1000, clock=clock)
    store.append(Event(clock.time(), "node", "startup", Severity.OK, "none", "virtual"))
    store.prune()
    assert [e.message for e in store.query()] == ["virtual"]
    clock.advance(2 * 86400)
    store.prune()
    assert store.query() == []
    store.close()


def test_dedupe_keys_are_bounded_by_count_too(tmp_path):
    import sqlite3
    s = EventStore(str(tmp_path), max_age_days=30, max_count=50, prune_every=10)
    for i in range(500):                       # an Xid flood, all within the age bound
        s.append(ev(i, gpu=None, xid=13), dedupe_key=f"kmsg:b:{i}")
    s.prune()
    assert s.seen("kmsg:b:499") and s.append(ev(999), dedupe_key="kmsg:b:499") is None
    s.close()
    with sqlite3.connect(str(tmp_path / "events.sqlite")) as db:
        assert db.execute("SELECT COUNT(*) FROM dedupe").fetchone()[0] <= 50
    assert EventStore(str(tmp_path)).xid_totals()[(None, 13)] == 500


def test_database_files_are_0640_like_the_other_state_files(tmp_path):
    """events.sqlite (and its -wal/-shm files) are not world-readable, whatever the umask; a
    0644 file an older version created is narrowed on open."""
    old = os.umask(0o022)
    try:
        s = EventStore(str(tmp_path))
        s.append(ev(0))
        modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()
                 if p.name.startswith("events.sqlite")}
        s.close()
        assert modes["events.sqlite"] == 0o640, modes
        assert all(m == 0o640 for m in modes.values()), modes
        (tmp_path / "events.sqlite").chmod(0o644)          # as gpucostd 0.1.0 left it
        s = EventStore(str(tmp_path))
        assert [e.message for e in s.query()] == ["event 0"]
        s.close()
        assert (tmp_path / "events.sqlite").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)
