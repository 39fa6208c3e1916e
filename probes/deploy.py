"""What a GPU inference host's deployment guide asks to check, read under a host root.

Read-only, like ``host.py``; every fact that cannot be read is None with the reason in
``errors``. Under ``root`` (``[daemon] host_root``; tests point it at fixture trees):

- ``persistenced``: a process named ``nvidia-persistenced`` (psutil, with ``psutil.PROCFS_PATH``
  at ``proc`` under the root: its name from ``proc/<pid>/stat`` and, as the kernel cuts names
  to 15 characters, from ``cmdline``), or its socket ``run/nvidia-persistenced/socket`` (the
  daemon runs as its own user; under the unit's ProtectProc=invisible other users' processes
  are hidden from /proc, the socket is not);
- ``kernel_module_version``: ``sys/module/nvidia/version``, else the version in
  ``proc/driver/nvidia/version`` ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.90.07 ...");
- ``container_runtimes`` / ``container_toolkit``: which of docker, containerd, podman, crio
  and of nvidia-ctk, nvidia-container-cli, nvidia-container-runtime(-hook) are installed in
  usr/bin, usr/local/bin, usr/sbin, bin, sbin;
- ``listening``: TCP sockets in LISTEN state from ``proc/net/tcp`` and ``tcp6`` (address, port),
  parsed here: psutil.net_connections() would give the same list but first maps every socket
  to its process by reading every ``/proc/<pid>/fd`` (59 ms of CPU for 119 processes measured
  on the development machine; 0.2% of a core at the 30 s verify interval, for pids this check
  does not use);
- ``firewall``: the ruleset text of ``nft list ruleset`` and ``iptables-save`` (commands run
  read-only through ``run``; None when neither could be read, e.g. without root);
- ``model_files``: for each configured model directory, the files (at most MAX_FILES, not
  following symlinks out) writable by group or others, with their mode.
"""
from __future__ import annotations

import ipaddress
import os
import stat
import subprocess
import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from gpucostd.probes.hostroot import HostRoot

BIN_DIRS = ("usr/bin", "usr/local/bin", "usr/sbin", "bin", "sbin")
RUNTIMES = ("docker", "containerd", "podman", "crio")
TOOLKIT = ("nvidia-ctk", "nvidia-container-cli", "nvidia-container-runtime",
           "nvidia-container-runtime-hook")
FIREWALL_COMMANDS = (("nft", "list", "ruleset"), ("iptables-save",), ("ip6tables-save",))
MAX_FILES = 20000
PERSISTENCED = "nvidia-persistenced"
PERSISTENCED_DIRS = ("run/nvidia-persistenced", "var/run/nvidia-persistenced")
# psutil reads /proc through one module-wide setting (PROCFS_PATH): a scan under another root
# holds this lock while it points psutil there
_PROCFS_LOCK = threading.Lock()
Runner = Callable[[Sequence[str]], Tuple[int, str]]


@dataclass(frozen=True)
class ModelDirFacts:
    path: str
    exists: bool
    files: int = 0                                  # files looked at
    loose: Tuple[Tuple[str, int], ...] = ()         # (path, mode) writable by group/others
    truncated: bool = False


@dataclass(frozen=True)
class DeployFacts:
    persistenced: Optional[bool]
    persistenced_pid: Optional[int]
    kernel_module_version: Optional[str]
    container_runtimes: Tuple[str, ...]
    container_toolkit: Tuple[str, ...]
    listening: Optional[Tuple[Tuple[str, int], ...]]     # (address, port)
    firewall: Optional[str]
    model_dirs: Tuple[ModelDirFacts, ...] = ()
    errors: Tuple[str, ...] = field(default=())


def _run(argv: Sequence[str]) -> Tuple[int, str]:
    try:
        p = subprocess.run(list(argv), capture_output=True, text=True, timeout=5,
                           stdin=subprocess.DEVNULL)
        return p.returncode, p.stdout
    except (OSError, subprocess.SubprocessError) as e:
        return 127, str(e)


def _ipv4(hexaddr: str) -> str:
    return str(ipaddress.IPv4Address(int(hexaddr, 16).to_bytes(4, "little")))


def _ipv6(hexaddr: str) -> str:
    raw = b"".join(int(hexaddr[i:i + 8], 16).to_bytes(4, "little") for i in range(0, 32, 8))
    return str(ipaddress.IPv6Address(raw))


def parse_proc_net_tcp(text: str, v6: bool) -> List[Tuple[str, int]]:
    """LISTEN sockets (state 0A) of /proc/net/tcp{,6} as (address, port)."""
    out = []
    for line in text.splitlines()[1:]:
        if " 0A " not in line:        # fast: a busy server has thousands of connected rows
            continue                  # (the state is the only column that can read "0A")
        parts = line.split()
        if len(parts) < 4 or parts[3] != "0A":
            continue
        addr, _, port = parts[1].partition(":")
        try:
            out.append((_ipv6(addr) if v6 else _ipv4(addr), int(port, 16)))
        except (ValueError, OverflowError):
            continue
    return out


class DeployProbe(HostRoot):
    def __init__(self, root: str = "/", run: Optional[Runner] = None):
        super().__init__(root)
        # the firewall commands see the real host: under another root (fixture trees) they are
        # run only when the caller gives a runner
        self._run = run if run is not None else (_run if os.path.realpath(self.root) == "/"
                                                 else None)

    def read(self, model_dirs: Sequence[str] = ()) -> DeployFacts:
        errors: List[str] = []
        running, pid = self._persistenced(errors)
        bins = self._binaries()
        return DeployFacts(
            persistenced=running, persistenced_pid=pid,
            kernel_module_version=self._module_version(),
            container_runtimes=tuple(b for b in RUNTIMES if b in bins),
            container_toolkit=tuple(b for b in TOOLKIT if b in bins),
            listening=self._listening(errors), firewall=self._firewall(errors),
            model_dirs=tuple(self._model_dir(d) for d in model_dirs), errors=tuple(errors))

    def processes(self, name: str) -> Optional[List[int]]:
        """The pids of the processes called `name` under the root's proc (psutil), or None
        when proc cannot be listed. A name the kernel cut to 15 characters counts when
        psutil cannot read the full one (the process's cmdline empty or not readable)."""
        import psutil
        found: List[int] = []
        with _PROCFS_LOCK:
            saved = psutil.PROCFS_PATH
            psutil.PROCFS_PATH = self.path("proc")
            try:
                pids = psutil.pids()
                for pid in pids:
                    try:
                        got = psutil.Process(pid).name()
                    except (psutil.Error, OSError, ValueError):
                        continue          # gone, hidden or unreadable
                    if got == name or (len(got) == 15 and name.startswith(got)):
                        found.append(pid)
            finally:
                psutil.PROCFS_PATH = saved
        return sorted(found)

    def _persistenced(self, errors: List[str]) -> Tuple[Optional[bool], Optional[int]]:
        try:
            pids = self.processes(PERSISTENCED)
        except OSError as e:
            errors.append(f"cannot list {self.path('proc')}: {e.strerror or e}")
            return None, None
        if pids:
            return True, pids[0]
        for d in PERSISTENCED_DIRS:
            if os.path.exists(self.path(f"{d}/socket")):
                pid = (self.text(f"{d}/nvidia-persistenced.pid") or "").strip()
                return True, int(pid) if pid.isdigit() else None
        return False, None

    def _module_version(self) -> Optional[str]:
        v = self.text("sys/module/nvidia/version")
        if v and v.strip():
            return v.strip()
        text = self.text("proc/driver/nvidia/version") or ""
        for line in text.splitlines():
            if line.startswith("NVRM version:"):
                for word in line.split():
                    if word[:1].isdigit() and "." in word:
                        return word
        return None

    def _binaries(self) -> set:
        found = set()
        for d in BIN_DIRS:
            for name in RUNTIMES + TOOLKIT:
                p = os.path.join(self.path(d), name)
                if os.path.isfile(p) and os.access(p, os.X_OK):
                    found.add(name)
        return found

    def _listening(self, errors: List[str]) -> Optional[Tuple[Tuple[str, int], ...]]:
        out: List[Tuple[str, int]] = []
        read_any = False
        for name, v6 in (("proc/net/tcp", False), ("proc/net/tcp6", True)):
            text = self.text(name)
            if text is None:
                continue
            read_any = True
            out.extend(parse_proc_net_tcp(text, v6))
        if not read_any:
            errors.append(f"cannot read {self.path('proc/net/tcp')}")
            return None
        return tuple(sorted(set(out)))

    def _firewall(self, errors: List[str]) -> Optional[str]:
        if self._run is None:
            errors.append(f"firewall rules are not read under host_root {self.root}")
            return None
        texts = []
        for argv in FIREWALL_COMMANDS:
            rc, out = self._run(argv)
            if rc == 0:
                texts.append(out)
        if not texts:
            errors.append("cannot read firewall rules (nft list ruleset / iptables-save need "
                          "root and the nft or iptables tools)")
            return None
        return "\n".join(texts)

    def _model_dir(self, directory: str) -> ModelDirFacts:
        top = self.path(directory)
        if not os.path.isdir(top):
            return ModelDirFacts(directory, False)
        loose: List[Tuple[str, int]] = []
        n = 0
        truncated = False
        for base, dirs, files in os.walk(top, followlinks=False):
            dirs.sort()
            for name in sorted(files):
                n += 1
                if n > MAX_FILES:
                    truncated = True
                    break
                p = os.path.join(base, name)
                try:
                    st = os.lstat(p)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode) and st.st_mode & 0o022:
                    rel = os.path.join(directory, os.path.relpath(p, top))
                    loose.append((rel, stat.S_IMODE(st.st_mode)))
            if truncated:
                break
        return ModelDirFacts(directory, True, min(n, MAX_FILES), tuple(loose), truncated)


def facts_dict(f: Optional[DeployFacts]) -> Dict[str, object]:
    if f is None:
        return {}
    return {"persistenced": f.persistenced, "persistenced_pid": f.persistenced_pid,
            "kernel_module_version": f.kernel_module_version}
