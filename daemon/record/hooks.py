"""Action hooks: run `[hooks] on_critical` / `on_recovered` when a GPU or the node enters or leaves
CRIT.

- The command is the configured argv list, run as is: never through a shell, and nothing from
  an event is ever put into argv. The event reaches the program only through environment
  variables (GPUCOSTD_SUBJECT, GPUCOSTD_GPU, GPUCOSTD_UUID, GPUCOSTD_CODE, GPUCOSTD_SEVERITY,
  GPUCOSTD_ACTION, GPUCOSTD_MESSAGE, GPUCOSTD_XID, GPUCOSTD_TIME, GPUCOSTD_HOSTNAME and a few
  more, see docs/health.md), so text from a kernel line (a process name such as
  ``$(touch /tmp/x); rm -rf /``) is data, not code — unless the hook script itself evals it.
- Hooks run one at a time, in order, in a background thread: the poll loop never waits.
- Each run is killed after ``[hooks] timeout_seconds`` (SIGTERM to its process group, SIGKILL
  two seconds later). Its stdout and stderr are logged line by line to the ``gpucostd`` logger
  (the journal under systemd): the first 200 lines, each cut to 1000 characters; the rest is
  read and dropped. A failing, hanging or missing program is a logged error and a
  ``hook_failed`` journal event, never a crash.

Trigger: a ``health_change`` event whose ``to`` is CRIT and whose ``from_known`` (the last
severity before any UNKNOWN) is not CRIT runs on_critical; one whose ``to`` is OK or WARN and
whose ``from_known`` is CRIT runs on_recovered. CRIT -> UNKNOWN -> CRIT runs nothing. A
``node_inefficient`` event (tokens per dollar below the floor for the whole window) runs
on_inefficient, a ``node_efficient`` event (back above it) on_efficient; their figures come as
GPUCOSTD_TOKENS_PER_DOLLAR, GPUCOSTD_MIN_TOKENS_PER_DOLLAR, ... (FIGURES).
"""
from __future__ import annotations

import logging
import os
import queue
import select
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from gpucostd.snapshot import Event, Severity, printable

LOG = logging.getLogger("gpucostd")

MAX_QUEUED = 256
MAX_OUTPUT_LINES = 200          # lines of a hook's output logged per run
MAX_LINE_CHARS = 1000
MAX_LINE_BYTES = 4 * MAX_LINE_CHARS   # read at most this much of one output line (UTF-8)
MAX_ENV_CHARS = 4096
KILL_GRACE_SECONDS = 2.0
OUTPUT_GRACE_SECONDS = 1.0      # read a finished hook's pipe this long, then close it
STOP_WAIT_SECONDS = 5.0         # at stop, wait this long for a running hook, then kill it
# variables a hook must not inherit from the daemon (it would talk to systemd as the daemon)
_DROP_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID",
             "LISTEN_FDNAMES")


@dataclass
class HookResult:
    hook: str                      # "on_critical" | "on_recovered"
    subject: str
    argv: Tuple[str, ...]
    returncode: Optional[int] = None
    timed_out: bool = False
    error: Optional[str] = None    # could not start, or why it failed
    output: List[str] = field(default_factory=list)
    started: float = 0.0
    duration: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None and not self.timed_out and self.returncode == 0


def _clean(value: Any) -> str:
    s = "" if value is None else str(value)
    s = s.replace("\x00", "")
    return s if len(s) <= MAX_ENV_CHARS else s[:MAX_ENV_CHARS]


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


# event fields passed to hooks as GPUCOSTD_<NAME> (the floor's figures)
FIGURES = ("tokens_per_dollar", "min_tokens_per_dollar", "window_seconds", "tokens_per_second",
           "cost_dollars_per_hour", "cost_per_million_tokens", "idle_ratio")
_FLOOR_HOOKS = {"node_inefficient": "on_inefficient", "node_efficient": "on_efficient"}


def hook_for(event: Event) -> Optional[str]:
    """Which hook an event triggers: "on_critical", "on_recovered", "on_inefficient",
    "on_efficient" or None."""
    if event.code in _FLOOR_HOOKS:
        return _FLOOR_HOOKS[event.code]
    if event.code != "health_change":
        return None
    fields: Mapping[str, Any] = event.fields or {}
    to = str(fields.get("to", event.severity.name if isinstance(event.severity, Severity)
                        else ""))
    before = str(fields.get("from_known", fields.get("from", "")))
    if to == "CRIT" and before != "CRIT":
        return "on_critical"
    if to in ("OK", "WARN") and before == "CRIT":
        return "on_recovered"
    return None


def hook_environment(event: Event, hook: str, hostname: str,
                     base: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """The environment a hook runs with: the daemon's (minus systemd's notify/socket variables)
    plus the event as GPUCOSTD_* variables."""
    env = {k: v for k, v in (os.environ if base is None else base).items()
           if k not in _DROP_ENV and not k.startswith("GPUCOSTD_")}
    fields: Mapping[str, Any] = event.fields or {}
    xid = event.xid if event.xid is not None else fields.get("xid")
    sev = event.severity.name if isinstance(event.severity, Severity) else str(event.severity)
    env.update({
        "GPUCOSTD_HOOK": hook,
        "GPUCOSTD_SUBJECT": _clean(event.subject),
        "GPUCOSTD_GPU": _clean(event.gpu),
        "GPUCOSTD_UUID": _clean(event.uuid),
        "GPUCOSTD_CODE": _clean(event.code),
        "GPUCOSTD_CAUSE": _clean(fields.get("cause")),
        "GPUCOSTD_SEVERITY": sev,
        "GPUCOSTD_FROM": _clean(fields.get("from")),
        "GPUCOSTD_TO": _clean(fields.get("to", sev)),
        "GPUCOSTD_ACTION": _clean(event.action),
        "GPUCOSTD_MESSAGE": _clean(event.message),
        "GPUCOSTD_DETAIL": _clean(fields.get("detail")),
        "GPUCOSTD_PROCESS": _clean(fields.get("process") or fields.get("process_name")),
        "GPUCOSTD_XID": _clean(xid),
        "GPUCOSTD_TIME": _iso(float(event.time)),
        "GPUCOSTD_TIME_EPOCH": f"{float(event.time):.3f}",
        "GPUCOSTD_EVENT_ID": _clean(event.id),
        "GPUCOSTD_HOSTNAME": _clean(hostname),
    })
    for name in FIGURES:
        if fields.get(name) is not None:
            env["GPUCOSTD_" + name.upper()] = _clean(fields[name])
    return env


def _untrusted(argv: Sequence[str]) -> Optional[str]:
    """For a root daemon: why a hook must not run (a non-root user could change its program or,
    for an interpreter such as /bin/sh, the script it runs; its group included), or None. A
    missing program is left to Popen's clear error."""
    if os.geteuid() != 0:
        return None
    from gpucostd.statefile import untrusted_hook
    return untrusted_hook(argv)


class HookRunner:
    """Runs the configured hooks for health_change events, in a background thread."""

    def __init__(self, config, hostname: Optional[str] = None,
                 on_failure: Optional[Callable[[Event], None]] = None,
                 clock: Any = None):
        self.config = config
        self.hostname = hostname or socket.gethostname()
        self.on_failure = on_failure
        self._time = clock.time if clock is not None else time.time
        self._queue: "queue.Queue[Optional[Tuple[str, Tuple[str, ...], Event, float]]]" = \
            queue.Queue(MAX_QUEUED)
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._busy = 0
        self._stopping = False
        self._running: Optional[subprocess.Popen] = None    # the hook process running now
        self.results: List[HookResult] = []     # the last 50 runs (status, tests)

    def reconfigure(self, config) -> None:
        self.config = config

    # ------------------------------------------------------------------ the loop's side
    def on_events(self, events: Sequence[Event]) -> None:
        """Queue the hooks these events trigger; returns at once."""
        for event in events or ():
            try:
                hook = hook_for(event)
            except Exception:  # noqa: BLE001 - an odd event must not break the loop
                LOG.exception("hooks: cannot read event %r", event)
                continue
            if hook is None:
                continue
            argv = tuple(getattr(self.config.hooks, hook, ()) or ())
            if not argv:
                continue
            timeout = float(self.config.hooks.timeout_seconds)
            self._submit(hook, argv, event, timeout)

    def _submit(self, hook: str, argv: Tuple[str, ...], event: Event, timeout: float) -> None:
        with self._lock:
            if self._stopping:
                LOG.error("hooks: %s for %s not run: the daemon is stopping", hook, event.subject)
                return
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._worker, name="gpucostd-hooks",
                                                daemon=True)
                self._thread.start()
            try:
                self._queue.put_nowait((hook, argv, event, timeout))
                self._busy += 1
            except queue.Full:
                LOG.error("hooks: %d hooks already waiting; %s for %s dropped (are the hooks "
                          "hanging? see [hooks] timeout_seconds)", MAX_QUEUED, hook,
                          event.subject)

    def _worker(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            hook, argv, event, timeout = item
            try:
                result = self.run(hook, argv, event, timeout)
                self.results.append(result)
                del self.results[:-50]
            except Exception:  # noqa: BLE001 - the hook thread must survive anything
                LOG.exception("hooks: internal error running %s", hook)
            finally:
                with self._lock:
                    self._busy -= 1
                    self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every queued hook has finished (tests, shutdown). True if idle."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._busy > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def stop(self, timeout: Optional[float] = None) -> None:
        """Let queued hooks finish (up to `timeout`, default min(timeout_seconds, 5) s), then
        stop the thread. A hook still running then is killed (SIGTERM to its process group,
        SIGKILL two seconds later): nothing the daemon started outlives it."""
        if timeout is None:
            timeout = min(float(self.config.hooks.timeout_seconds), STOP_WAIT_SECONDS)
        if not self.wait_idle(timeout):
            with self._lock:
                proc = self._running
            if proc is not None:
                LOG.warning("hooks: %s still running at shutdown; killing it", proc.args[0]
                            if isinstance(proc.args, (list, tuple)) else proc.args)
                self._terminate(proc, then_wait=2.0)
        with self._lock:
            self._stopping = True
            thread = self._thread
        if thread is not None and thread.is_alive():
            try:
                self._queue.put_nowait(None)
            except queue.Full:
                pass

    def _terminate(self, proc: subprocess.Popen, then_wait: float) -> None:
        """SIGTERM to the hook's process group, SIGKILL KILL_GRACE_SECONDS later if it is still
        there, then wait up to `then_wait` s for it to be gone."""
        self._kill(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=KILL_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            self._kill(proc, signal.SIGKILL)
            try:
                proc.wait(timeout=then_wait)
            except subprocess.TimeoutExpired:
                pass

    # ------------------------------------------------------------------ one run
    def run(self, hook: str, argv: Sequence[str], event: Event, timeout: float) -> HookResult:
        """Run one hook now (in the calling thread) and log what happened."""
        argv = tuple(str(a) for a in argv)
        res = HookResult(hook, event.subject, argv, started=self._time())
        env = hook_environment(event, hook, self.hostname)
        t0 = time.monotonic()
        label = f"hook {hook} ({event.subject})"
        refused = _untrusted(argv)
        if refused:
            res.error = (f"refused to run {' '.join(argv)[:200]}: a user other than root can "
                         f"change what it runs ({refused})")
            return self._finish(res, label, t0, event)
        try:
            proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                    close_fds=True, start_new_session=True, cwd="/",
                                    shell=False)
        except OSError as e:
            res.error = (f"cannot run {argv[0]}: {e.strerror or e}; fix [hooks] {hook} in the "
                         f"config (an absolute path to an executable file)")
            return self._finish(res, label, t0, event)
        done = threading.Event()
        reader = threading.Thread(target=self._read_output, args=(proc, label, res, done),
                                  name="gpucostd-hook-output", daemon=True)
        reader.start()
        with self._lock:
            self._running = proc
        try:
            res.returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            res.timed_out = True
            self._terminate(proc, then_wait=5.0)
            res.returncode = proc.returncode
            res.error = f"killed after {timeout:g} s ([hooks] timeout_seconds)"
        else:
            # the hook is done; anything it left behind in its group goes too
            self._kill(proc, signal.SIGKILL, quiet=True)
        if proc.returncode is not None:
            self._reap_group(proc.pid)
        with self._lock:
            self._running = None
        # A process that left the hook's group (setsid, a double fork) may still hold the pipe
        # open: the reader gives up on it OUTPUT_GRACE_SECONDS after the hook ended and closes
        # its end, so no thread and no pipe is left behind.
        done.set()
        reader.join(timeout=OUTPUT_GRACE_SECONDS + 2.0)
        if not res.timed_out and res.returncode not in (0, None):
            res.error = f"exited with status {res.returncode}"
        return self._finish(res, label, t0, event)

    @staticmethod
    def _kill(proc: subprocess.Popen, sig: int, quiet: bool = False) -> None:
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        except OSError as e:
            if not quiet:
                LOG.warning("hooks: cannot signal process group %d: %s", proc.pid, e)

    @staticmethod
    def _reap_group(pgid: int, timeout: float = 1.0) -> None:
        """Reap the processes of the hook's (killed) group that became our children: when the
        daemon is PID 1 of a container or a child subreaper, orphans are reparented to it, and
        nobody else would collect them (zombies would pile up with every hook run)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                pid, _ = os.waitpid(-pgid, os.WNOHANG)
            except OSError:             # ChildProcessError: none of them is our child
                return
            if pid == 0:                # ours, not dead yet (SIGKILL is on its way)
                if time.monotonic() >= deadline:
                    return
                time.sleep(0.01)

    @staticmethod
    def _read_output(proc: subprocess.Popen, label: str, res: HookResult,
                     done: Optional[threading.Event] = None) -> None:
        """Log the first MAX_OUTPUT_LINES lines (each cut to MAX_LINE_CHARS) and drain the rest.
        Holds at most MAX_LINE_BYTES of one line: a hook that writes gigabytes without a newline
        costs no memory. Once the hook has ended (`done`), reads on for OUTPUT_GRACE_SECONDS at
        most and then closes the pipe: a process the hook left behind (its own session, a
        double fork) that still holds the pipe costs no thread and no descriptor."""
        stream = proc.stdout
        if stream is None:
            return
        fd = stream.fileno()
        state = {"n": 0}

        def emit(raw: bytes) -> None:
            state["n"] += 1
            n = state["n"]
            if n <= MAX_OUTPUT_LINES:
                line = raw.decode("utf-8", "replace").rstrip("\r")[:MAX_LINE_CHARS]
                line = printable(line)
                res.output.append(line)
                LOG.info("%s: %s", label, line)
            elif n == MAX_OUTPUT_LINES + 1:
                LOG.info("%s: (more output not logged)", label)

        buf = b""
        skipping = False        # in the rest of a line longer than MAX_LINE_BYTES
        done_at: Optional[float] = None
        try:
            while True:
                if done is not None and done.is_set():
                    if done_at is None:
                        done_at = time.monotonic()
                    elif time.monotonic() - done_at > OUTPUT_GRACE_SECONDS:
                        break
                ready, _, _ = select.select([fd], [], [], 0.1)
                if not ready:
                    continue
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    break
                buf += chunk
                while True:
                    nl = buf.find(b"\n")
                    if nl < 0:
                        if len(buf) >= MAX_LINE_BYTES:
                            if not skipping:
                                emit(buf[:MAX_LINE_BYTES])
                            skipping, buf = True, b""
                        break
                    line, buf = buf[:nl], buf[nl + 1:]
                    if skipping:
                        skipping = False
                    else:
                        emit(line)
            if buf and not skipping:
                emit(buf)
        except (OSError, ValueError):
            pass
        finally:
            try:
                stream.close()
            except OSError:
                pass

    def _finish(self, res: HookResult, label: str, t0: float, event: Event) -> HookResult:
        res.duration = time.monotonic() - t0
        if res.ok:
            LOG.info("%s: %s finished in %.1f s", label, res.argv[0], res.duration)
            return res
        failed = Event(self._time(), event.subject, "hook_failed", Severity.WARN,
                       f"fix the {res.hook} hook", f"{label} failed: {res.error}",
                       gpu=event.gpu, uuid=event.uuid,
                       fields={"hook": res.hook, "program": res.argv[0] if res.argv else "",
                               "returncode": res.returncode, "timed_out": res.timed_out})
        try:   # one error line, with the hook_failed MESSAGE_ID when it goes to the journal
            from gpucostd.record.journal import journal_fields
            jf = {k: v for k, v in journal_fields(failed).items()
                  if k not in ("PRIORITY", "SYSLOG_IDENTIFIER")}
        except Exception:  # noqa: BLE001
            jf = {}
        LOG.error("%s failed: %s", label, res.error, extra={"journal_fields": jf})
        if self.on_failure is not None:
            try:
                self.on_failure(failed)
            except Exception:  # noqa: BLE001
                LOG.exception("hooks: on_failure callback failed")
        return res


__all__ = ["HookRunner", "HookResult", "hook_for", "hook_environment"]
