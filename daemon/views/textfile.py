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

Only in the real directory. The textfile directory's parent often belongs to another user
(Debian's /var/lib/prometheus belongs to prometheus), who could swap the directory for a symlink
to /etc and have root write and delete files there. So every write and the removal walk the path
from / one component at a time with O_NOFOLLOW (a symlink anywhere on the way is refused and
said) and create, rename and unlink relative to the directory's descriptor; the temporary file
is created O_EXCL | O_NOFOLLOW.
"""
from __future__ import annotations

import errno
import itertools
import logging
import os
from typing import Callable, Optional

LOG = logging.getLogger("gpucostd")
MIN_PERIOD = 5.0      # seconds between writes (node_exporter is scraped every 15 s or more)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_SEQ = itertools.count()


def open_real_dir(path: str) -> int:
    """A descriptor of the directory `path` (absolute), reached from / one component at a
    time without following a symlink. OSError says which component is not a real directory."""
    fd = os.open("/", _DIR_FLAGS)
    walked = ""
    try:
        for part in [p for p in path.split("/") if p and p != "."]:
            walked += "/" + part
            if part == "..":
                raise OSError(errno.EINVAL, f"{walked} contains '..'")
            try:
                nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise OSError(e.errno, f"{walked} is a symbolic link or not a directory "
                                           f"(only the real directory is written; point "
                                           f"export.textfile_path at it)") from None
                raise
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


def write_in_real_dir(path: str, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` with `data`: a temporary file in the same real directory, fsync, rename,
    all relative to the directory's descriptor. Raises OSError (the old file is then kept)."""
    dfd = open_real_dir(os.path.dirname(path))
    name = os.path.basename(path)
    tmp = f".{name}.{os.getpid()}.{next(_SEQ)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     mode, dir_fd=dfd)
        try:
            try:
                os.fchmod(fd, mode)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=dfd)
            except OSError:
                pass
            raise
        try:
            os.fsync(dfd)
        except OSError:
            pass    # some filesystems cannot fsync a directory; the rename itself is done
    finally:
        os.close(dfd)


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
            # never creates the directory: one we made (0750) node_exporter could not read
            write_in_real_dir(path, body, mode=0o644)
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
            dfd = open_real_dir(os.path.dirname(self._path))
            try:
                os.unlink(os.path.basename(self._path), dir_fd=dfd)
            finally:
                os.close(dfd)
        except FileNotFoundError:
            pass
        except OSError as e:
            LOG.warning("cannot remove the textfile %s: %s", self._path, e.strerror or e)
