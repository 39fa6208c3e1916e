"""Finds the inference servers running on this node: processes of known servers (by process
name and command line) and the TCP ports they listen on, on loopback or all addresses.

Read-only and local: psutil lists the processes (name, command line) and, for the known ones
only, their listening sockets. A port is only ever probed when its owner is a known server;
the probe (one GET of /metrics, gpucostd.probes.inference) is the caller's. Never raises for an
expected fault: a process that vanishes or cannot be read is skipped.

Known servers (``KNOWN``): vLLM, SGLang, trtllm-serve, Triton (tritonserver), TGI
(text-generation-launcher / -router), llama.cpp (llama-server, xllamacpp), Dynamo, NVIDIA NIM.
"""
from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

# (server, process names (the kernel's comm, cut to 15 characters), command-line pattern: a
# regular expression searched in the arguments joined by spaces)
KNOWN: Tuple[Tuple[str, Tuple[str, ...], Optional[str]], ...] = (
    ("vllm", ("vllm",), r"(?:^|[\s/])vllm(?:\s+serve\b|\.entrypoints\b)"),
    ("sglang", (), r"\bsglang\.launch_server\b|(?:^|[\s/])sglang\s+serve\b"),
    ("tensorrt-llm", ("trtllm-serve",), r"(?:^|[\s/])trtllm-serve(?:\s|$)"),
    ("triton", ("tritonserver",), r"(?:^|[\s/])tritonserver(?:\s|$)"),
    ("tgi", ("text-generation-launcher", "text-generation-router", "text-generation-server"),
     r"(?:^|[\s/])text-generation-(?:launcher|router)(?:\s|$)"),
    ("llama.cpp", ("llama-server",), r"(?:^|[\s/])llama-server(?:\s|$)|\bxllamacpp"),
    ("dynamo", ("dynamo-run",),
     r"\bdynamo\.(?:frontend|vllm|sglang|trtllm)\b|(?:^|[\s/])dynamo-run\b"),
    ("nim", ("nim_llm", "nim-llm"), r"\bnim_llm\b|(?:^|[\s/])nim-llm\b|/opt/nim/start[_-]server"),
)
_PATTERNS = [(s, names, re.compile(p) if p else None) for s, names, p in KNOWN]
# Where a server serves its exposition when not at /metrics: NIM for LLMs at /v1/metrics since
# 1.0 (NIM docs, "Observability"; Datadog's and Splunk's NIM checks scrape it there)
METRICS_PATH = {"nim": "/v1/metrics"}


@dataclass(frozen=True)
class Process:
    """One process as discovery sees it."""
    pid: int
    name: str
    cmdline: Tuple[str, ...]
    listening: Tuple[Tuple[str, int], ...] = ()      # (address, port) in LISTEN state
    error: Optional[str] = None     # why its sockets could not be read (then none are listed)


@dataclass(frozen=True)
class Candidate:
    """A port of a known server, with how it was found."""
    server: str            # the process's kind ("vllm", ...); the exposition names the server
    pid: int
    process: str           # its process name
    address: str           # the listening address ("0.0.0.0", "127.0.0.1", "::")
    port: int
    url: str               # where its /metrics is asked for

    @property
    def how(self) -> str:
        return f"process {self.process} (pid {self.pid}) listening on {self.address}:{self.port}"


def known_server(name: str, cmdline: Sequence[str]) -> Optional[str]:
    """Which known server a process is, from its name and command line (None: not one)."""
    line = " ".join(cmdline)
    base = os.path.basename(cmdline[0]) if cmdline else ""
    for server, names, pattern in _PATTERNS:
        for n in names:
            if name == n or base == n or (len(name) == 15 and n.startswith(name)):
                return server
        if pattern is not None and pattern.search(line):
            return server
    return None


def _local_url(address: str, port: int, path: str = "/metrics") -> Optional[str]:
    """The URL of a socket bound to loopback or all addresses (asked on loopback); None for a
    specific outside address (discovery reads local servers only)."""
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.version == 4:
        if ip.is_unspecified:
            return f"http://127.0.0.1:{port}{path}"
        return f"http://{ip}:{port}{path}" if ip.is_loopback else None
    if ip.is_unspecified or ip.is_loopback:
        return f"http://[::1]:{port}{path}"
    return None


def unreadable(processes: Iterable[Process]) -> List[str]:
    """A line per known server whose sockets could not be read."""
    out = []
    for p in sorted(processes, key=lambda p: p.pid):
        if p.error and known_server(p.name, p.cmdline):
            out.append(f"{known_server(p.name, p.cmdline)} process {p.name} (pid {p.pid}): "
                       f"{p.error}")
    return out


def candidates(processes: Iterable[Process]) -> List[Candidate]:
    """Every listening port of a known server, on loopback or all addresses, in (pid, port)
    order; one URL once (a server listening on 0.0.0.0 and :: is one endpoint)."""
    out: List[Candidate] = []
    seen = set()
    for p in sorted(processes, key=lambda p: p.pid):
        server = known_server(p.name, p.cmdline)
        if server is None:
            continue
        for address, port in sorted(set(p.listening), key=lambda a: (a[1], a[0])):
            url = _local_url(address, port, METRICS_PATH.get(server, "/metrics"))
            if url is None or port in seen:
                continue
            seen.add(port)
            out.append(Candidate(server, p.pid, p.name, address, port, url))
    return out


def psutil_processes(procfs: Optional[str] = None) -> List[Process]:
    """The processes of known servers, with their listening TCP sockets (psutil). Other
    processes are not looked at beyond their name and command line. `procfs`: another proc
    (psutil.PROCFS_PATH), for tests."""
    import psutil
    saved = psutil.PROCFS_PATH
    if procfs:
        psutil.PROCFS_PATH = procfs     # (a test's proc; the daemon never sets it)
    try:
        out: List[Process] = []
        for proc in psutil.process_iter():
            try:
                name = proc.name()
                cmdline = tuple(proc.cmdline())
            except (psutil.Error, OSError, ValueError):
                continue
            if known_server(name, cmdline) is None:
                continue
            try:
                conns = (proc.net_connections(kind="tcp") if hasattr(proc, "net_connections")
                         else proc.connections(kind="tcp"))
            except psutil.AccessDenied:
                out.append(Process(proc.pid, name, cmdline, (), (
                    "its sockets cannot be read (it runs as another user; reading them needs "
                    "CAP_SYS_PTRACE, which the shipped unit does not give): set [inference] "
                    "metrics_url or [[inference.endpoint]] for it")))
                continue
            except (psutil.Error, OSError, ValueError):
                continue
            listening = tuple((c.laddr.ip, c.laddr.port) for c in conns
                              if c.status == psutil.CONN_LISTEN and c.laddr)
            out.append(Process(proc.pid, name, cmdline, listening))
        return out
    finally:
        if procfs:
            psutil.PROCFS_PATH = saved


Lister = Callable[[], Iterable[Process]]

__all__ = ["KNOWN", "Process", "Candidate", "known_server", "candidates", "unreadable",
           "psutil_processes",
           "Lister"]
