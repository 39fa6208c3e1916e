"""Reads under a host root: "/" on a host, a fixture tree in tests ([daemon] host_root).

The one place the probes turn a root-relative name into a path and read it: a file that cannot
be read is None (with the reason appended to `errors` when the caller keeps them)."""
from __future__ import annotations

import os
from typing import List, Optional


class HostRoot:
    def __init__(self, root: str = "/"):
        self.root = root or "/"

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *[p.lstrip("/") for p in parts])

    def text(self, rel: str, errors: Optional[List[str]] = None) -> Optional[str]:
        """The file's text (undecodable bytes replaced), or None when it cannot be read."""
        p = self.path(rel)
        try:
            with open(p, "r", encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError as e:
            if errors is not None:
                errors.append(f"cannot read {p}: {e.strerror or e}")
            return None

    def listdir(self, rel: str) -> Optional[List[str]]:
        """The sorted names in a directory (hidden ones left out), or None."""
        try:
            return sorted(n for n in os.listdir(self.path(rel)) if not n.startswith("."))
        except OSError:
            return None
