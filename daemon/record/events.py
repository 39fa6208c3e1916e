"""The event store: every fault, state change and ack, in SQLite (stdlib), across restarts.

File: ``<state_dir>/events.sqlite``, WAL journal, ``synchronous=NORMAL``.

Durability. In WAL mode each commit appends the transaction's pages to ``events.sqlite-wal`` with
write(2) before ``commit()`` returns; ``synchronous=NORMAL`` only skips the fsync(2) of the WAL at
each commit (it still fsyncs at checkpoints). Data handed to the kernel by write(2) lives in the
page cache, which belongs to the kernel, not to the process: a SIGKILL, an OOM kill or a crash of
the daemon cannot lose it, and the next open replays the WAL. So every event that ``append()``
returned with an id survives the process being killed. What NORMAL gives up is the last few
transactions on a power cut or kernel panic (the WAL tail not yet on disk), which is the price of
not paying one fsync per event in the poll loop during an Xid flood. (``synchronous="FULL"`` can be
passed for power-loss durability at that cost.)

Robustness. A database that SQLite cannot read (garbage, truncated, "file is not a database",
"database disk image is malformed") is moved aside to ``events.sqlite.corrupt-<UTC timestamp>``
with a logged warning and a fresh one is started. Any other SQLite or OS error at runtime is logged
(once per distinct message) and the event is kept in memory; it is written at the next append or
query, so it is still listed and never lost while the daemon lives. The store never raises to its
caller.

Bounds. Events older than ``max_age_days`` and all but the newest ``max_count`` are deleted at
open and then every ``PRUNE_EVERY`` appends. Xid totals (for the
``gpucostd_gpu_xid_errors_total`` counter) live in their own table, so pruning never makes the
counter go backwards. Dedupe keys (kernel lines already recorded) are kept for ``max_age_days``,
the newest ``max_count`` of them.

Thread safety: the writer's connection under one lock (the loop appends, prunes); queries read
through a second connection under their own lock (WAL lets a reader and the writer run at once),
so a status API thread reading 5,000 events never holds up the loop's appends.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from gpucostd.snapshot import Event, Severity


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection):
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        try:
            db.execute("ROLLBACK")
        except sqlite3.Error:
            pass
        raise
    db.execute("COMMIT")

LOG = logging.getLogger("gpucostd")

DB_NAME = "events.sqlite"
PRUNE_EVERY = 256            # appends between two prunes
REOPEN_EVERY_SECONDS = 30.0  # retry opening an unusable database this often
WAL_LIMIT_BYTES = 4 << 20    # journal_size_limit: the WAL is truncated to this at checkpoints
MAX_PENDING = 100000         # events kept in memory while the database cannot be written

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    subject TEXT NOT NULL,
    code TEXT NOT NULL,
    severity INTEGER NOT NULL,
    action TEXT NOT NULL,
    message TEXT NOT NULL,
    gpu INTEGER,
    uuid TEXT,
    xid INTEGER,
    fields TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS events_time ON events(time);
CREATE TABLE IF NOT EXISTS dedupe (
    key TEXT PRIMARY KEY,
    time REAL NOT NULL,
    event_id INTEGER
);
CREATE INDEX IF NOT EXISTS dedupe_time ON dedupe(time);
CREATE TABLE IF NOT EXISTS xid_totals (
    gpu INTEGER NOT NULL,      -- -1: not mapped to a GPU (the node)
    xid INTEGER NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (gpu, xid)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""
SCHEMA_VERSION = "1"

_COLUMNS = "id, time, subject, code, severity, action, message, gpu, uuid, xid, fields"


def _is_corruption(exc: BaseException) -> bool:
    """SQLITE_CORRUPT / SQLITE_NOTADB (bare DatabaseError in Python's mapping), not a locked,
    read-only or full database (OperationalError)."""
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    text = str(exc).lower()
    if any(s in text for s in ("malformed", "not a database", "encrypted", "corrupt")):
        return True
    return type(exc) is sqlite3.DatabaseError


def _json_default(value: Any) -> Any:
    if isinstance(value, Severity):
        return value.name
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


def _severity(value: Any) -> Severity:
    try:
        return Severity(int(value))
    except (TypeError, ValueError):
        return Severity.UNKNOWN


def _row_to_event(row: Sequence[Any]) -> Event:
    id_, t, subject, code, sev, action, message, gpu, uuid, xid, fields = row
    try:
        data = json.loads(fields) if fields else {}
        if not isinstance(data, dict):
            data = {"value": data}
    except ValueError:
        data = {"unparsed": fields}
    return Event(time=float(t), subject=subject, code=code, severity=_severity(sev),
                 action=action, message=message, gpu=gpu, uuid=uuid, xid=xid, fields=data,
                 id=int(id_))


class EventStore:
    """Events in ``<state_dir>/events.sqlite``; see the module docstring for the guarantees."""

    def __init__(self, state_dir: str, max_age_days: float = 30.0, max_count: int = 100000,
                 *, synchronous: str = "NORMAL", clock: Any = None,
                 prune_every: int = PRUNE_EVERY):
        self.state_dir = str(state_dir)
        self.path = os.path.join(self.state_dir, DB_NAME)
        self.max_age_days = float(max_age_days)
        self.max_count = int(max_count)
        if synchronous.upper() not in ("NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"synchronous={synchronous!r}: use NORMAL, FULL or EXTRA")
        self.synchronous = synchronous.upper()
        self._time: Callable[[], float] = clock.time if clock is not None else time.time
        self._clock = clock
        self._prune_every = max(1, int(prune_every))
        self._lock = threading.RLock()
        self._db: Optional[sqlite3.Connection] = None
        # queries read through a second connection under their own lock (WAL: a reader and the
        # writer do not block each other), so a large `events` request never holds up the loop
        self._read_lock = threading.Lock()
        self._reader: Optional[sqlite3.Connection] = None
        self._generation = 0          # bumped at every open: the reader follows the writer
        self._reader_generation = -1
        self._pending: List[Tuple[Event, Optional[str]]] = []   # not yet written (errors)
        self._pending_keys: Dict[str, Event] = {}
        self._mem_ids = 0            # negative ids for events held only in memory
        self._since_prune = 0
        self._next_open = 0.0
        self._last_error: Optional[str] = None
        self.error: Optional[str] = None      # last runtime problem, for status views
        self.moved_aside: List[str] = []      # corrupt files moved aside by this instance
        with self._lock:
            self._open()

    # ------------------------------------------------------------------ opening
    def _open(self) -> bool:
        """Open (or create) the database; move a corrupt one aside. Never raises."""
        self._next_open = time.monotonic() + REOPEN_EVERY_SECONDS
        try:
            os.makedirs(self.state_dir, mode=0o750, exist_ok=True)
        except OSError as e:
            self._report(f"cannot create the state directory {self.state_dir}: {e.strerror}; "
                         f"events are kept in memory until it is writable (check "
                         f"daemon.state_dir and its permissions)")
            return False
        for attempt in (1, 2):
            try:
                self._db = self._connect()
                self._generation += 1
                self.error = None
                self._prune_locked()
                return True
            except sqlite3.Error as e:
                self._close_quietly()
                if attempt == 1 and _is_corruption(e):
                    self._move_aside(str(e))
                    continue
                self._report(f"cannot open the event database {self.path}: {e}; events are "
                             f"kept in memory and retried (check disk space and permissions)")
                return False
            except OSError as e:
                self._close_quietly()
                self._report(f"cannot open the event database {self.path}: {e}; events are "
                             f"kept in memory and retried")
                return False
        return False

    def _private_file(self) -> None:
        """events.sqlite is 0640 like every other state file: created so before SQLite opens
        it (SQLite gives its -wal and -shm files the database file's mode), and narrowed when
        an older version left it 0644."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
            os.close(fd)
            return
        except FileExistsError:
            pass
        for path in (self.path, self.path + "-wal", self.path + "-shm"):
            try:
                st = os.stat(path)
                if st.st_mode & 0o137:
                    os.chmod(path, st.st_mode & 0o640)
            except OSError:
                pass        # absent, or not ours to change: SQLite reports what matters

    def _connect(self) -> sqlite3.Connection:
        self._private_file()
        db = sqlite3.connect(self.path, timeout=5.0, isolation_level=None,
                             check_same_thread=False)
        try:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()
            if not mode or str(mode[0]).lower() != "wal":
                LOG.warning("event database %s: WAL mode refused (%s); using %s", self.path,
                            mode, mode[0] if mode else "default")
            db.execute(f"PRAGMA synchronous={self.synchronous}")
            # after each checkpoint the WAL is cut back to this size (it would otherwise stay
            # as large as the largest burst of writes ever was)
            db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT_BYTES}")
            db.execute("PRAGMA foreign_keys=OFF")
            check = db.execute("PRAGMA quick_check").fetchone()
            if not check or check[0] != "ok":
                raise sqlite3.DatabaseError(f"database disk image is malformed ({check[0]})"
                                            if check else "database disk image is malformed")
            db.executescript(_SCHEMA)
            db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES('schema', ?)",
                       (SCHEMA_VERSION,))
        except BaseException:
            db.close()
            raise
        return db

    def _move_aside(self, why: str) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = f"{self.path}.corrupt-{stamp}"
        n = 1
        while os.path.exists(target):
            n += 1
            target = f"{self.path}.corrupt-{stamp}-{n}"
        try:
            os.replace(self.path, target)
        except FileNotFoundError:
            pass
        except OSError as e:
            LOG.error("event database %s is unreadable (%s) and cannot be moved aside: %s; "
                      "remove it by hand", self.path, why, e.strerror)
            return
        for suffix in ("-wal", "-shm"):
            try:
                os.replace(self.path + suffix, target + suffix)
            except OSError:
                pass
        self.moved_aside.append(target)
        LOG.warning("event database %s was unreadable (%s); moved it aside to %s and started "
                    "a fresh one (the old events are in that file)", self.path, why, target)

    def _close_quietly(self) -> None:
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
        self._db = None

    def _report(self, message: str) -> None:
        self.error = message
        if message != self._last_error:
            LOG.error("%s", message)
        self._last_error = message

    def _usable(self) -> bool:
        if self._db is not None:
            return True
        if time.monotonic() >= self._next_open:
            return self._open()
        return False

    def _runtime_error(self, e: BaseException, doing: str) -> bool:
        """A SQLite error at runtime: corruption -> move aside and reopen (returns True when a
        fresh database is open); otherwise log it once and keep going."""
        if _is_corruption(e):
            self._close_quietly()
            self._move_aside(str(e))
            return self._open()
        self._report(f"event database {self.path}: {doing} failed: {e}; the events are kept "
                     f"in memory and written when it works again")
        return False

    # ------------------------------------------------------------------ writing
    def append(self, event: Event, dedupe_key: Optional[str] = None) -> Optional[Event]:
        """Store one event. Returns the stored copy (with id), or None when `dedupe_key` (default:
        ``event.fields["dedupe_key"]``; empty means none) was recorded before. When the database cannot be written
        the event is kept in memory (returned with a negative id) and written later."""
        key = dedupe_key
        if not key and event.fields:
            k = event.fields.get("dedupe_key")
            key = str(k) if k else None
        key = key or None              # "" means no key (KernelFault's default)
        with self._lock:
            if key is not None and key in self._pending_keys:
                return None
            if self._pending and self._usable():
                self._flush_pending()
            if self._db is None or self._pending:
                return self._keep(event, key)
            for attempt in (1, 2):
                try:
                    stored = self._insert(event, key)
                except sqlite3.Error as e:
                    fresh = self._runtime_error(e, "writing an event")
                    if fresh and attempt == 1:
                        continue          # a corrupt file was moved aside: write to the new one
                    return self._keep(event, key)
                if stored is not None:
                    self._maybe_prune()
                return stored
            return self._keep(event, key)

    def seen(self, dedupe_key: Optional[str]) -> bool:
        """True when an event with this dedupe key was stored before (in the database, or held
        in memory while it cannot be written), so ``append(..., dedupe_key)`` would return None.
        One primary-key lookup. An empty key is never seen; when the database cannot be read the
        answer is False (the caller then handles the fault again rather than dropping it), and
        a key older than ``max_age_days`` may have been pruned."""
        if not dedupe_key:
            return False
        key = str(dedupe_key)
        with self._lock:
            if key in self._pending_keys:
                return True
            if not self._usable():
                return False
            db = self._db
            assert db is not None
            try:
                return db.execute("SELECT 1 FROM dedupe WHERE key = ?", (key,)).fetchone() \
                    is not None
            except sqlite3.Error as e:
                self._runtime_error(e, "looking up a dedupe key")
                return False

    def _insert(self, event: Event, key: Optional[str]) -> Optional[Event]:
        db = self._db
        assert db is not None
        fields = json.dumps(dict(event.fields or {}), default=_json_default,
                            separators=(",", ":"), sort_keys=True)
        with _transaction(db):
            if key is not None and db.execute("SELECT 1 FROM dedupe WHERE key = ?",
                                              (key,)).fetchone():
                return None
            cur = db.execute(
                "INSERT INTO events(time, subject, code, severity, action, message, gpu, uuid, "
                "xid, fields) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (float(event.time), str(event.subject), str(event.code), int(event.severity),
                 str(event.action), str(event.message), event.gpu, event.uuid, event.xid,
                 fields))
            new_id = int(cur.lastrowid)
            if key is not None:
                db.execute("INSERT INTO dedupe(key, time, event_id) VALUES (?,?,?)",
                           (key, float(event.time), new_id))
            if event.xid is not None:
                db.execute("INSERT INTO xid_totals(gpu, xid, count) VALUES (?,?,1) "
                           "ON CONFLICT(gpu, xid) DO UPDATE SET count = count + 1",
                           (-1 if event.gpu is None else int(event.gpu), int(event.xid)))
        self.error = None
        self._last_error = None
        return _replace_id(event, new_id)

    def _keep(self, event: Event, key: Optional[str]) -> Event:
        if len(self._pending) >= MAX_PENDING:
            dropped, dkey = self._pending.pop(0)
            if dkey is not None:
                self._pending_keys.pop(dkey, None)
            LOG.error("event database unusable and %d events waiting: dropped the oldest (%s %s)",
                      MAX_PENDING, dropped.subject, dropped.code)
        self._mem_ids -= 1
        kept = _replace_id(event, self._mem_ids)
        self._pending.append((kept, key))
        if key is not None:
            self._pending_keys[key] = kept
        return kept

    def _flush_pending(self) -> None:
        reopened = 0
        while self._pending and self._db is not None:
            event, key = self._pending[0]
            try:
                self._insert(_replace_id(event, None), key)
            except sqlite3.Error as e:
                reopened += 1
                if not self._runtime_error(e, "writing kept events") or reopened > 2:
                    return
                continue
            self._pending.pop(0)
            if key is not None:
                self._pending_keys.pop(key, None)
        if not self._pending:
            LOG.info("event database %s writable again; kept events written", self.path)

    # ------------------------------------------------------------------ pruning
    def _maybe_prune(self) -> None:
        self._since_prune += 1
        if self._since_prune >= self._prune_every:
            self.prune()

    def prune(self) -> int:
        """Delete events beyond the age and count bounds. Returns how many were deleted."""
        with self._lock:
            if self._db is None:
                return 0
            try:
                n = self._prune_locked()
            except sqlite3.Error as e:
                self._runtime_error(e, "pruning")
                return 0
            self.checkpoint()
            return n

    def _age_offset(self, db: sqlite3.Connection) -> float:
        """Seconds by which the wall clock was stepped since the events were kept (meta
        "clock": a clock.stamp() and the offset so far). Age is measured in the clock frame the
        kept events were stored in: a clock set 40 days forward (then a restart) deletes
        nothing that was not already old; the offset is dropped once no event older than the
        step is left. 0 on a virtual clock (replay) and across a reboot (a step then looks
        like time passing)."""
        from gpucostd.clock import RealClock, stamp, step_since
        clock = self._clock or RealClock()
        if getattr(clock, "virtual", False):
            return 0.0
        row = db.execute("SELECT value FROM meta WHERE key = 'clock'").fetchone()
        try:
            saved = json.loads(row[0]) if row else {}
            offset, since = float(saved.get("offset", 0.0)), saved.get("step_at")
        except (ValueError, TypeError, AttributeError):
            saved, offset, since = {}, 0.0, None
        step = step_since(saved, clock)
        now = clock.time()
        if step:
            offset, since = offset + step, now
            LOG.warning("event store: the wall clock was stepped by %+.0f s; events are aged "
                        "by the time that passed, not by the jump", step)
        elif offset and since is not None:
            oldest = db.execute("SELECT MIN(time) FROM events").fetchone()[0]
            if oldest is None or oldest >= float(since) - 1.0:
                offset, since = 0.0, None          # nothing from before the step is left
        if not (offset == offset and abs(offset) < 1e12):     # NaN or absurd: start again
            offset, since = 0.0, None
        db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES('clock', ?)",
                   (json.dumps(dict(stamp(clock), offset=offset, step_at=since)),))
        return offset

    def _prune_locked(self) -> int:
        db = self._db
        assert db is not None
        self._since_prune = 0
        with _transaction(db):
            cutoff = self._time() - self._age_offset(db) - self.max_age_days * 86400.0
            n = db.execute("DELETE FROM events WHERE time < ?", (cutoff,)).rowcount
            row = db.execute("SELECT id FROM events ORDER BY id DESC LIMIT 1 OFFSET ?",
                             (self.max_count,)).fetchone()
            if row is not None:
                n += db.execute("DELETE FROM events WHERE id <= ?", (row[0],)).rowcount
            db.execute("DELETE FROM dedupe WHERE time < ?", (cutoff,))
            # and by count too: an Xid flood must not grow the key table for max_age_days
            # (only recent keys matter: lines read again after a crash or restart)
            row = db.execute("SELECT rowid FROM dedupe ORDER BY rowid DESC LIMIT 1 OFFSET ?",
                             (self.max_count,)).fetchone()
            if row is not None:
                db.execute("DELETE FROM dedupe WHERE rowid <= ?", (row[0],))
        return max(0, n)

    # ------------------------------------------------------------------ reading
    def query(self, since: Optional[float] = None, until: Optional[float] = None,
              limit: Optional[int] = None, subject: Optional[str] = None) -> List[Event]:
        """Events with since <= time <= until (wall seconds), oldest first. With `limit`, the
        newest `limit` of them (still oldest first), like `tail`."""
        where, args = [], []
        if since is not None:
            where.append("time >= ?")
            args.append(float(since))
        if until is not None:
            where.append("time <= ?")
            args.append(float(until))
        if subject is not None:
            where.append("subject = ?")
            args.append(subject)
        sql = f"SELECT {_COLUMNS} FROM events"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY time DESC, id DESC"
        if limit is not None:
            sql += f" LIMIT {max(0, int(limit))}"
        with self._lock:
            if self._pending and self._usable():
                self._flush_pending()
            generation = self._generation if self._db is not None else None
            kept = [e for e, _ in self._pending
                    if (since is None or e.time >= since) and (until is None or e.time <= until)
                    and (subject is None or e.subject == subject)]
        rows: List[Event] = []
        if generation is not None:
            try:
                rows = [_row_to_event(r) for r in self._read(sql, args, generation)]
            except sqlite3.Error as e:
                with self._lock:
                    self._runtime_error(e, "reading events")
        out = sorted(rows + kept, key=lambda e: (e.time, e.id if e.id and e.id > 0 else 1 << 62))
        if limit is not None:
            out = out[-int(limit):] if int(limit) > 0 else []
        return out

    def _read(self, sql: str, args: Sequence[Any], generation: int) -> List[Any]:
        with self._read_lock:
            if self._reader is None or self._reader_generation != generation:
                if self._reader is not None:
                    self._reader.close()
                self._reader = None
                from urllib.parse import quote      # mode=rw: never creates a missing file
                self._reader = sqlite3.connect(f"file:{quote(self.path)}?mode=rw", uri=True,
                                               timeout=5.0, isolation_level=None,
                                               check_same_thread=False)
                self._reader_generation = generation
            return self._reader.execute(sql, args).fetchall()

    def recent(self, n: int) -> List[Event]:
        """The newest `n` events, newest last."""
        return self.query(limit=n)

    def count(self) -> int:
        with self._lock:
            n = len(self._pending)
            if self._db is not None:
                try:
                    n += int(self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0])
                except sqlite3.Error as e:
                    self._runtime_error(e, "counting events")
            return n

    def xid_totals(self) -> Dict[Tuple[Optional[int], int], int]:
        """{(gpu index or None, xid): count} of every Xid event ever stored (not pruned)."""
        out: Dict[Tuple[Optional[int], int], int] = {}
        with self._lock:
            if self._db is not None:
                try:
                    for gpu, xid, count in self._db.execute(
                            "SELECT gpu, xid, count FROM xid_totals"):
                        out[(None if gpu < 0 else int(gpu), int(xid))] = int(count)
                except sqlite3.Error as e:
                    self._runtime_error(e, "reading Xid totals")
            for e, _ in self._pending:
                if e.xid is not None:
                    k = (e.gpu, int(e.xid))
                    out[k] = out.get(k, 0) + 1
        return out

    @property
    def pending(self) -> int:
        """Events held in memory because the database could not be written."""
        return len(self._pending)

    def retry(self, reopen_now: bool = False) -> int:
        """Write the events held in memory if the database works again (the loop calls this
        every cycle, so they reach the disk when space returns, not at the next event).
        `reopen_now`: try to open an unusable database now rather than at the next retry
        time (the caller saw the directory become writable). Returns how many are held."""
        with self._lock:
            if reopen_now and self._db is None:
                self._next_open = 0.0
            if self._pending and self._usable():
                self._flush_pending()
                if not self._pending:
                    self.checkpoint()
            return len(self._pending)

    def reopen(self) -> None:
        """The state directory was removed or replaced under us: writes to the open (unlinked)
        file would be lost, so open the database at its path again."""
        with self._lock:
            self._close_quietly()
            self._open()

    def checkpoint(self) -> None:
        """Copy the WAL into the database and truncate it: the WAL never keeps the space a
        prune freed (on a small filesystem it would refill it)."""
        with self._lock:
            if self._db is None:
                return
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            except sqlite3.Error as e:
                LOG.debug("event database checkpoint: %s", e)

    def close(self) -> None:
        with self._lock:
            if self._pending and self._db is not None:
                self._flush_pending()
            if self._pending:
                LOG.error("event database %s unusable at exit: %d events were not stored",
                          self.path, len(self._pending))
            self._close_quietly()
        with self._read_lock:
            if self._reader is not None:
                try:
                    self._reader.close()
                except sqlite3.Error:
                    pass
                self._reader = None

    def __enter__(self) -> "EventStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _replace_id(event: Event, new_id: Optional[int]) -> Event:
    import dataclasses
    return dataclasses.replace(event, id=new_id)


__all__ = ["EventStore", "DB_NAME"]
