"""Files in the state directory: written atomically and durably, so a crash or power cut leaves
either the old or the new content, never a torn file.

write -> fsync -> rename over the old file -> fsync the directory.
"""
from __future__ import annotations

import os
import tempfile


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
