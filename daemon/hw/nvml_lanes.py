"""Worker lanes of the NVML gateway (gpucostd.hw.nvml): one thread per GPU (and one for the
node) that runs its NVML calls one at a time, so a GPU whose calls hang delays nobody else; a
lane whose caller gave up on a call is *stuck* until that call returns.

A cycle's device reads go to one thread while no GPU is slow (``Batch``): handing each GPU's
read to its own thread costs more CPU than the reads themselves (a wake-up and a GIL hand-off
per GPU per cycle). Each read is still claimed on its GPU's lane (one call per GPU at a time,
the same stuck and recovery rules), and a read the batch has not started when the caller stops
waiting for it (``Batch.scatter``) goes to its GPU's own thread, so a hung GPU holds up the
others for at most that moment, never for the deadline."""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Callable, Optional

log = logging.getLogger("gpucostd.nvml")


def _now() -> float:
    # deadlines are real time whatever the clock: a stuck call blocks a real thread
    return time.monotonic()


class _Job:
    __slots__ = ("fn", "done", "result", "exc", "abandoned", "started")

    def __init__(self, fn: Callable[[], Any]):
        self.fn = fn
        self.done = threading.Event()
        self.result: Any = None
        self.exc: Optional[BaseException] = None
        self.abandoned = False
        self.started = False          # a batch began it (Batch): its lane must not run it


class _Lane:
    """One worker thread that runs the NVML calls of one GPU (or of the node), one at a
    time."""

    def __init__(self, name: str):
        self.name = name
        self.lock = threading.Lock()
        self.queue: "queue.SimpleQueue[Optional[_Job]]" = queue.SimpleQueue()
        self.pending = 0
        self.current: Optional[str] = None      # NVML function running now (for messages)
        self.stuck_since: Optional[float] = None
        self.stuck_call: Optional[str] = None
        self.running = threading.Lock()          # held while a job of this lane runs
        self.thread = threading.Thread(target=self._run, name=f"gpucostd-nvml-{name}",
                                       daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            self.run_job(job)

    def run_job(self, job: _Job) -> None:
        """Run one job of this lane (on its thread, or on a batch's for a claimed one)."""
        with self.running:
            with self.lock:
                skip = job.abandoned
            if not skip:
                try:
                    job.result = job.fn()
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    job.exc = exc
            with self.lock:
                self.pending -= 1
                job.done.set()
                self.current = None
                if self.pending == 0 and self.stuck_since is not None:
                    log.info("%s: the stuck NVML call %s returned; calling it again",
                             self.name, self.stuck_call)
                    self.stuck_since = None
                    self.stuck_call = None

    def claim(self, fn: Callable[[], Any]) -> Optional[_Job]:
        """A job of this lane that a batch will run (counted as pending here); None when the
        lane is stuck or busy (the caller submits to it instead)."""
        with self.lock:
            if self.stuck_since is not None or self.pending:
                return None
            self.pending += 1
            return _Job(fn)

    def submit(self, fn: Callable[[], Any]) -> Optional[_Job]:
        """Queue fn; None when the lane is stuck (the caller reports a timeout)."""
        with self.lock:
            if self.stuck_since is not None:
                return None
            job = _Job(fn)
            self.pending += 1
        self.queue.put(job)
        return job

    def give_up(self, job: _Job) -> bool:
        """The caller's deadline passed: mark the lane stuck unless the job finished in the
        meantime. Returns True if the job is abandoned."""
        with self.lock:
            if job.done.is_set():
                return False
            job.abandoned = True
            if self.stuck_since is None:
                self.stuck_since = _now()
                self.stuck_call = self.current or "an NVML call"
            return True

    def stop(self) -> None:
        self.queue.put(None)

class Batch:
    """Claimed jobs of several lanes run one after another on one thread (the batch lane)."""

    def __init__(self, jobs: "list[tuple[_Lane, _Job]]"):
        self.jobs = jobs
        self.lock = threading.Lock()
        self.scattered = False

    def run(self) -> None:
        for lane, job in self.jobs:
            with self.lock:
                if self.scattered and not job.started:
                    continue                    # its own lane runs it
                job.started = True
            lane.run_job(job)

    def scatter(self) -> None:
        """Hand every job the batch has not started to its own lane's thread."""
        with self.lock:
            if self.scattered:
                return
            self.scattered = True
            rest = [(lane, job) for lane, job in self.jobs if not job.started]
        for lane, job in rest:
            lane.queue.put(job)


# public names for the modules split from this one's user (they import them under their
# old local names)
Job = _Job
Lane = _Lane
now = _now
