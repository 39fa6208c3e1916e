"""Files the daemon reads and writes.

Writing: atomically and durably, so a crash or power cut leaves either the old or the new
content, never a torn file: write -> fsync -> rename over the old file -> fsync the directory.

Reading: one loader for every file the daemon reads (the config and its drop-ins, the web
config, the state files, scenarios): read_regular() opens with O_NONBLOCK (a FIFO put in a
file's place never blocks the open or the read), refuses anything but a regular file and
anything over a size cap before reading it, and says why in an UnreadableFile. read_json()
adds the parser's failures (nesting too deep, numbers too large or not finite, not UTF-8).
A state file that cannot be used is set aside (set_aside(): renamed to `<name>.bad`, kept,
logged) and the caller starts fresh; the loop turns each such notice into a
`state_file_reset` event.

And who may write them: the state and runtime directories are created with safe modes and
refused when another user controls them (check_private_dir); a root daemon asks
writable_by_others() about the files it trusts (the config, hook programs).
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import stat
import tempfile
import threading
from typing import Any, List, Optional, Sequence, Tuple

LOG = logging.getLogger("gpucostd")


def write_atomic(path: str, text: str, mode: int = 0o640) -> None:
    """Replace `path` with `text`. Raises OSError (the old file is then untouched)."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o750, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                               dir=directory)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass    # some filesystems cannot fsync a directory; the rename itself is done


# --------------------------------------------------------------------------- who may write
class UnsafePathError(OSError):
    """A directory or file that another user could change. str() says which, why and the fix."""


def _owner(uid: int) -> str:
    try:
        import pwd
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def _group(gid: int) -> str:
    try:
        import grp
        return f"{grp.getgrgid(gid).gr_name} (gid {gid})"
    except (ImportError, KeyError):
        return f"gid {gid}"


def _check_ancestors(path: str, uid: int, what: str) -> None:
    """Every directory above `path` (symlinks resolved) must belong to root or `uid` and be
    writable by nobody else, unless it is sticky (/tmp): then others cannot replace our entry."""
    current = os.path.dirname(os.path.realpath(path))
    while True:
        st = os.stat(current)
        if st.st_uid not in (0, uid):
            raise UnsafePathError(
                f"{what} {path}: the directory {current} above it belongs to "
                f"{_owner(st.st_uid)}, who could replace it; move {what} under a directory "
                f"owned by root or by you")
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise UnsafePathError(
                f"{what} {path}: the directory {current} above it is writable by others "
                f"(mode {st.st_mode & 0o7777:04o}), who could replace it; fix: "
                f"chmod go-w {current}")
        parent = os.path.dirname(current)
        if parent == current:
            return
        current = parent



def check_private_dir(path: str, uid: Optional[int] = None, what: str = "directory",
                      shared_ok: bool = False) -> None:
    """Refuse a directory another user controls: not a symlink, a directory, owned by `uid`
    (default: this process's), writable by nobody else; the same for the directories above
    it. `shared_ok`: a root-owned directory that is not writable by others, or is sticky
    (/tmp), is fine too (a socket in /run or /tmp). Raises UnsafePathError saying how to fix
    it."""
    uid = os.geteuid() if uid is None else uid
    st = os.lstat(path)
    if shared_ok and st.st_uid == 0 and stat.S_ISDIR(st.st_mode) and (
            not st.st_mode & 0o022 or st.st_mode & stat.S_ISVTX):
        _check_ancestors(path, uid, what)
        return
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePathError(
            f"{what} {path} is a symlink (to {os.readlink(path)}); another user may have put "
            f"it there. Fix: remove it (rm {path}) and let gpucostd create the directory, or "
            f"point the config at the real directory ({os.path.realpath(path)})")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePathError(f"{what} {path} exists and is not a directory; remove it or set "
                              f"another path in the config")
    if st.st_uid != uid:
        raise UnsafePathError(
            f"{what} {path} belongs to {_owner(st.st_uid)}, not to {_owner(uid)} who runs "
            f"gpucostd: that user could read or replace its files. Fix: if it is yours, "
            f"chown -R {uid} {path}; otherwise remove it (rm -r {path})")
    if st.st_mode & 0o022:
        raise UnsafePathError(
            f"{what} {path} is writable by its group or by everyone (mode "
            f"{st.st_mode & 0o7777:04o}): others could replace its files. Fix: "
            f"chmod go-w {path}")
    _check_ancestors(path, uid, what)


def ensure_private_dir(path: str, mode: int = 0o750, what: str = "directory",
                       shared_ok: bool = False) -> str:
    """Create `path` and any missing parents (each with `mode`, unlike os.makedirs, whose
    parents get the umask's default), then check_private_dir(). Returns the path."""
    path = os.path.abspath(path)
    missing = []
    current = path
    while not os.path.lexists(current):
        missing.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    if missing:
        # nothing is made inside a directory another user controls
        _check_ancestors(os.path.join(current, "x"), os.geteuid(), what)
    for directory in reversed(missing):
        try:
            os.mkdir(directory, mode)
        except FileExistsError:
            pass        # made by someone else meanwhile: the check below decides
    check_private_dir(path, what=what, shared_ok=shared_ok)
    return path


def writable_by_others(path: str, st: Optional[os.stat_result] = None
                       ) -> Optional[Tuple[str, str]]:
    """For a root process: whether a file (a config, a hook program) could be changed by a user
    other than root. None, or (kind, why with the fix): kind "group" when only a non-root group
    may write the file itself, "other" for anything worse (another owner, everyone, a directory
    above it that others control)."""
    st = os.stat(path) if st is None else st
    if st.st_uid != 0:
        return "other", f"{path} belongs to {_owner(st.st_uid)}; fix: chown root {path}"
    if st.st_mode & 0o002:
        return "other", (f"{path} is writable by everyone (mode {st.st_mode & 0o7777:04o}); "
                         f"fix: chmod o-w {path}")
    try:
        _check_ancestors(path, 0, "file")
    except UnsafePathError as e:
        return "other", str(e)
    if st.st_mode & 0o020 and st.st_gid != 0:
        return "group", (f"{path} is writable by group {_group(st.st_gid)}; fix: "
                         f"chmod g-w {path}")
    return None


# --------------------------------------------------------------------------- is it usable
MIN_FREE_BYTES = 1 << 20      # below this the state directory counts as full


def dir_identity(path: str) -> Optional[Tuple[int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def state_dir_problem(path: str, identity: Optional[Tuple[int, int]] = None,
                      min_free: int = MIN_FREE_BYTES) -> Optional[Tuple[str, str]]:
    """Why the state directory cannot take writes now, or None: (kind, message) with kind one
    of "vanished", "replaced", "read-only", "full", "unwritable". A few cheap system calls."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "vanished", f"state directory {path} vanished (removed while running)"
    except OSError as e:
        return "unwritable", f"state directory {path}: {e.strerror or e}"
    if identity is not None and (st.st_dev, st.st_ino) != identity:
        return "replaced", f"state directory {path} was replaced by another directory"
    try:
        vfs = os.statvfs(path)
    except OSError as e:
        return "unwritable", f"state directory {path}: {e.strerror or e}"
    if vfs.f_flag & getattr(os, "ST_RDONLY", 1):
        return "read-only", f"state directory {path} is on a read-only filesystem"
    free = vfs.f_bavail * vfs.f_frsize
    if free < min_free:
        return "full", f"state directory {path} is full ({free} bytes free)"
    if not os.access(path, os.W_OK | os.X_OK):
        return "unwritable", f"state directory {path} is not writable by the daemon"
    return None


# --------------------------------------------------------------------------- reading
MAX_STATE_BYTES = 16 << 20    # a state file far larger than this is not ours
MAX_EPOCH = 253402300799.0    # 9999-12-31T23:59:59Z: a saved time past it is corrupt
_MAX_INT_DIGITS = 40


class UnreadableFile(ValueError):
    """A file that exists but cannot be used: str() says why (without the path)."""


def _kind(mode: int) -> str:
    return ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else
            "a socket" if stat.S_ISSOCK(mode) else "a device")


def read_regular(path: str, limit: int, follow: bool = True
                 ) -> Tuple[bytes, os.stat_result]:
    """The bytes of a regular file of at most `limit` bytes, and its stat. The open never
    blocks (O_NONBLOCK: a FIFO without a writer opens at once and is then refused by type);
    the size is checked before reading and again while reading (a file that grows). With
    follow=False a symlink is refused. Raises FileNotFoundError when the file is absent and
    UnreadableFile for anything else."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | \
        getattr(os, "O_CLOEXEC", 0) | (0 if follow else getattr(os, "O_NOFOLLOW", 0))
    try:
        fd = os.open(path, flags)
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(path) from None
    except OSError as e:
        if not follow and os.path.islink(path):
            raise UnreadableFile("is a symlink, not a regular file") from None
        raise UnreadableFile(f"cannot open: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnreadableFile(f"is {_kind(st.st_mode)}, not a regular file")
        if st.st_size > limit:
            raise UnreadableFile(f"is {st.st_size} bytes; at most {limit} bytes are read")
        chunks, size = [], 0
        while size <= limit:
            try:
                chunk = os.read(fd, min(1 << 16, limit + 1 - size))
            except OSError as e:
                raise UnreadableFile(f"cannot read: {e.strerror or e}") from None
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise UnreadableFile(f"grew past {limit} bytes while being read")
        return b"".join(chunks), st
    finally:
        os.close(fd)


def _json_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text)} digits")
    return int(text)


def _json_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"the number {text[:20]} is out of range")
    return v


def _json_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def parse_json(blob: bytes) -> Any:
    """JSON from bytes; every parser failure (not UTF-8, syntax, nesting too deep, numbers
    out of range, NaN/Infinity) is an UnreadableFile that says which."""
    try:
        return json.loads(blob.decode("utf-8"), parse_int=_json_int, parse_float=_json_float,
                          parse_constant=_json_constant)
    except UnicodeDecodeError as e:
        raise UnreadableFile(f"not UTF-8 text (byte {e.start})") from None
    except RecursionError:
        raise UnreadableFile("nested too deeply") from None
    except ValueError as e:               # json.JSONDecodeError is a ValueError
        raise UnreadableFile(f"not valid JSON: {str(e)[:120]}") from None


def read_json(path: str, limit: int = MAX_STATE_BYTES, follow: bool = True) -> Any:
    """read_regular + parse_json. Raises FileNotFoundError or UnreadableFile."""
    return parse_json(read_regular(path, limit, follow)[0])


def plausible_epoch(value: Any) -> bool:
    """A saved wall-clock time: a number from 1970 to 9999 (1e300 would overflow every date
    conversion downstream)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and
            math.isfinite(value) and 0 <= value <= MAX_EPOCH)


_notices: List[Tuple[str, str]] = []      # (path of the file, message)
_notices_lock = threading.Lock()


def move_aside(path: str) -> Tuple[Optional[str], str]:
    """Rename an unusable file to `<path>.bad` (`.bad.1`, ... when an earlier one is kept: none
    is overwritten). Returns (the new name or None, a clause saying where it is)."""
    bad, n = path + ".bad", 0
    while os.path.lexists(bad):
        n += 1
        bad = f"{path}.bad.{n}"
    try:
        os.replace(path, bad)
    except OSError as e:
        return None, f"it could not be moved aside ({e.strerror or e})"
    return bad, f"the old file is kept as {bad}"


def set_aside(path: str, what: str, why: Any, fresh: str) -> str:
    """A state file that cannot be used: moved aside, logged at warning, queued as a notice
    for a `state_file_reset` event. Returns the message: `path: unreadable <what> (<why>);
    <fresh>; <where it is kept>`."""
    _, kept = move_aside(path)
    msg = f"{path}: unreadable {what} ({str(why)[:160]}); {fresh}; {kept}"
    LOG.warning("%s", msg)
    notice(path, msg)
    return msg


def notice(path: str, msg: str) -> None:
    """Queue `msg` about the state file `path` for the next `take_notices(dir)`."""
    with _notices_lock:
        _notices.append((path, msg))
        del _notices[:-20]          # one-shot commands never drain them: stay bounded


def take_notices(state_dir: str) -> List[str]:
    """The files under `state_dir` set aside since the last call (the loop makes events of
    them). Notices about other directories stay queued for their own daemon: a process
    that runs several (tests, replay beside a daemon) keeps each one's to itself."""
    prefix = os.path.join(os.path.abspath(state_dir), "")
    with _notices_lock:
        out = [m for p, m in _notices if os.path.abspath(p).startswith(prefix)]
        _notices[:] = [(p, m) for p, m in _notices
                       if not os.path.abspath(p).startswith(prefix)]
    return out
# --------------------------------------------------------------------------- hook programs
# A hook's argv[0] is always checked; when it is an interpreter, so is every later argument that
# names an existing file (the script it will run): ["/bin/sh", "/home/x/drain.sh"] is as
# untrusted as ["/home/x/drain.sh"]. Hooks run with cwd "/", so a relative name is under "/".
_INTERPRETER = re.compile(r"(?:[a-z]*sh|busybox|env|python[0-9.]*|pypy[0-9.]*|perl[0-9.]*|"
                          r"ruby[0-9.]*|node(?:js)?|lua[0-9.]*|luajit|php[0-9.]*|[gmn]?awk|"
                          r"tclsh[0-9.]*|wish[0-9.]*|Rscript|pwsh|expect|guile[0-9.]*|"
                          r"osascript|java|deno|bun)")


def hook_files(argv: Sequence[str]) -> List[str]:
    """The files a hook's argv runs: its program and, for an interpreter, its scripts."""
    if not argv:
        return []
    out = [argv[0]]
    if _INTERPRETER.fullmatch(os.path.basename(argv[0])):
        for arg in argv[1:]:
            if not arg or arg.startswith("-"):
                continue
            path = arg if os.path.isabs(arg) else os.path.join("/", arg)
            if os.path.isfile(path):
                out.append(path)
    return out


def untrusted_hook(argv: Sequence[str]) -> Optional[str]:
    """For a root process: why a hook must not run (a user other than root, its group included,
    could change its program or, for an interpreter, a script it runs), or None. A missing
    program is left to the runner's clear error."""
    for path in hook_files(argv):
        try:
            problem = writable_by_others(path)
        except OSError:
            continue
        if problem is not None:
            return problem[1]
    return None
