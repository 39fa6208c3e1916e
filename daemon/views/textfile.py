"""The exposition as a file, for sites whose Prometheus scrapes only node_exporter.

`[export] textfile_path` names a `*.prom` file in node_exporter's textfile directory
(`--collector.textfile.directory`). The daemon writes the same bytes /metrics serves (from the
same per-snapshot cache: nothing is rendered twice) at most every MIN_PERIOD seconds: a
temporary file in the same directory, fsync, then rename over the old one, so node_exporter
never reads half a file. The temporary name starts with a dot and does not end in .prom, so the
collector ignores it. The write runs in the loop's thread: with the textfile on, a cycle every
5 s renders (or, when a scrape is rendering the same snapshot at that moment, waits for that
render, a few milliseconds). At a clean stop the file is removed: a stopped daemon must not leave
node_exporter serving its last values as current (after a crash, gpucostd_snapshot_timestamp_seconds
and node_textfile_mtime_seconds show the age).
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Optional

from gpucostd.statefile import write_atomic

LOG = logging.getLogger("gpucostd")
MIN_PERIOD = 5.0      # seconds between writes (node_exporter is scraped every 15 s or more)


class TextfileWriter:
    def __init__(self, exposition: Callable[[], Optional[bytes]],
                 min_period: float = MIN_PERIOD):
        self._exposition = exposition
        self.min_period = min_period
        self._last: Optional[float] = None
        self._path = ""
        self._error: Optional[str] = None
        self.writes = 0

    def update(self, path: str, now: float) -> None:
        """Called once per cycle with the configured path (empty: off) and monotonic time."""
        if path != self._path:
            self.remove()
            self._path, self._last = path, None
        if not path or (self._last is not None and now - self._last < self.min_period):
            return
        body = self._exposition()
        if body is None:
            return
        self._last = now
        try:
            if not os.path.isdir(os.path.dirname(path)):
                # never create it: a directory we made (0750) node_exporter could not read
                raise FileNotFoundError(2, "the directory does not exist")
            write_atomic(path, body.decode("utf-8"), mode=0o644)
        except OSError as e:
            msg = f"cannot write the textfile {path}: {e.strerror or e}"
            if msg != self._error:            # once per distinct error, not once per cycle
                LOG.warning("%s (export.textfile_path; is the directory there and writable?)",
                            msg)
            self._error = msg
            return
        if self._error is not None:
            LOG.info("textfile %s written again", path)
        self._error = None
        self.writes += 1

    def remove(self) -> None:
        if not self._path:
            return
        try:
            os.unlink(self._path)
        except FileNotFoundError:
            pass
        except OSError as e:
            LOG.warning("cannot remove the textfile %s: %s", self._path, e.strerror or e)
