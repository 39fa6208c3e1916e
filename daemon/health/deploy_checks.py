"""Host checks from the deployment guides of GPU inference fleets (pure, over probes/deploy.py's
facts): nvidia-persistenced, driver / kernel-module mismatch, NVIDIA Container Toolkit, serving
ports open to the network without a firewall rule, model weights writable by others.

Each result is a CheckResult (pass | warn | fail) with the fix. ``firewall_restricts(ruleset,
port)`` reads nftables (``nft list ruleset``) and iptables (``iptables-save``) text: the port is
restricted when the input hook/INPUT chain drops by default and no rule accepts the port from
anywhere, or when a rule for the port drops or rejects it, or accepts it only from given source
addresses. Docker-published ports are DNATed before the INPUT chain; restrict them in the
DOCKER-USER chain (its rules count too).
"""
from __future__ import annotations

import ipaddress
import re
from typing import Any, List, Optional, Sequence, Set

from gpucostd.snapshot import CheckResult

PERSISTENCED_FIX = ("systemctl enable --now nvidia-persistenced (NVIDIA recommends the daemon; "
                    "legacy persistence mode, nvidia-smi -pm 1, is near end of life)")
_PORTS_RE = re.compile(r"(?:--dports?|\bdport)\s+(\{[^}]*\}|[0-9][0-9:,\- ]*)")


def _ports(spec: str) -> Set[int]:
    out: Set[int] = set()
    for part in re.split(r"[,\s{}]+", spec):
        m = re.fullmatch(r"(\d+)(?:[-:](\d+))?", part)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
            if hi - lo <= 65535:
                out.update(range(lo, hi + 1))
    return out


def _mentions(line: str, port: int) -> bool:
    return any(port in _ports(m.group(1)) for m in _PORTS_RE.finditer(line))


def firewall_restricts(ruleset: str, port: int) -> Optional[str]:
    """Why `port` is restricted by this ruleset (in words), or None when nothing restricts it."""
    default_deny, open_rule, limited = None, False, None
    hook = None
    for raw in ruleset.splitlines():
        line = raw.strip()
        if re.match(r"chain\s+\S+\s*\{", line):
            hook = None
        m = re.search(r"type\s+filter\s+hook\s+(\w+)", line)
        if m:
            hook = m.group(1)
            if hook == "input" and re.search(r"policy\s+drop", line):
                default_deny = "nftables input policy drop"
            continue
        if line.startswith(":INPUT ") and line.split()[1] in ("DROP", "REJECT"):
            default_deny = "iptables INPUT policy DROP"
            continue
        ipt = line.startswith("-A ")
        chain = line.split()[1] if ipt and len(line.split()) > 1 else None
        if ipt and chain not in ("INPUT", "DOCKER-USER"):
            continue
        if not ipt and hook not in ("input", "forward"):
            continue
        if not _mentions(line, port):
            continue
        verdict = ("drop" if re.search(r"\b(drop|reject)\b|-j\s+(DROP|REJECT)", line)
                   else "accept" if re.search(r"\baccept\b|-j\s+ACCEPT", line) else None)
        sourced = bool(re.search(r"\bsaddr\b|\s-s\s|--source\b|--src-range\b", line))
        if verdict == "drop":
            return f"a rule drops or rejects port {port}: {line[:120]}"
        if verdict == "accept" and sourced:
            limited = f"a rule accepts port {port} only from given sources: {line[:120]}"
        elif verdict == "accept":
            open_rule = True
    if default_deny and not open_rule:
        return limited or f"{default_deny}, and no rule accepts port {port} from anywhere"
    if limited and not open_rule:
        return limited
    return None


def _hp(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def _loopback(addr: str) -> bool:
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def persistenced_check(deploy: Any, gpus: Sequence[Any]) -> CheckResult:
    if deploy is None or deploy.persistenced is None:
        return CheckResult("persistenced", "warn", "cannot tell whether nvidia-persistenced runs "
                           "(process list not readable)", "check daemon.host_root and /proc")
    if deploy.persistenced:
        pid = deploy.persistenced_pid
        return CheckResult("persistenced", "pass", "nvidia-persistenced is running"
                           + (f" (pid {pid})" if pid else " (its socket is there)"))
    on = [g.index for g in gpus if getattr(g, "persistence_mode", None)]
    how = (f"; legacy persistence mode is on for GPU {', '.join(map(str, on))}" if on else "")
    return CheckResult("persistenced", "warn", f"nvidia-persistenced is not running{how}",
                       PERSISTENCED_FIX)


def driver_mismatch_check(nvml_driver: Optional[str], deploy: Any,
                          nvml_error: Optional[str]) -> CheckResult:
    module = getattr(deploy, "kernel_module_version", None)
    if nvml_error and "mismatch" in nvml_error.lower():
        return CheckResult("driver_match", "fail",
                           f"NVML cannot talk to the kernel module: {nvml_error[:160]}"
                           + (f" (kernel module {module})" if module else ""),
                           "reboot, or unload and reload the nvidia kernel modules, so the "
                           "loaded module matches the installed driver libraries")
    if module and nvml_driver and module != nvml_driver:
        return CheckResult("driver_match", "fail",
                           f"loaded kernel module {module} differs from the user-space driver "
                           f"{nvml_driver} (NVML)",
                           "reboot (or reload the nvidia modules) after a driver upgrade")
    if module and nvml_driver:
        return CheckResult("driver_match", "pass",
                           f"kernel module and user-space driver are both {module}")
    return CheckResult("driver_match", "pass", "no NVIDIA kernel module version readable "
                       "(/sys/module/nvidia/version); NVML reports no mismatch")


def container_toolkit_check(mode: str, deploy: Any) -> Optional[CheckResult]:
    if mode == "off":
        return None
    runtimes = tuple(getattr(deploy, "container_runtimes", ()) or ())
    toolkit = tuple(getattr(deploy, "container_toolkit", ()) or ())
    fix = ("install the NVIDIA Container Toolkit (nvidia-container-toolkit) and run "
           "nvidia-ctk runtime configure --runtime=" + (runtimes[0] if runtimes else "docker"))
    if toolkit:
        return CheckResult("toolkit", "pass",
                           f"NVIDIA Container Toolkit installed ({', '.join(toolkit)})")
    if mode == "required":
        return CheckResult("toolkit", "fail", "NVIDIA Container Toolkit not found "
                           "(checks.container_toolkit = \"required\")", fix)
    if runtimes:
        return CheckResult("toolkit", "warn",
                           f"container runtime {', '.join(runtimes)} installed but no NVIDIA "
                           f"Container Toolkit: containers cannot use the GPUs", fix)
    return CheckResult("toolkit", "pass", "no container runtime installed")


def serving_ports_check(ports: Sequence[int], deploy: Any) -> Optional[CheckResult]:
    if not ports:
        return None
    listening = getattr(deploy, "listening", None)
    if listening is None:
        return CheckResult("open_ports", "warn", "cannot read the listening sockets "
                           "(/proc/net/tcp)", "check daemon.host_root")
    exposed = sorted({(a, p) for a, p in listening if p in ports and not _loopback(a)},
                     key=lambda x: (x[1], x[0]))
    if not exposed:
        return CheckResult("open_ports", "pass",
                           f"no serving port ({', '.join(map(str, ports))}) listens beyond "
                           f"loopback")
    ruleset = getattr(deploy, "firewall", None)
    where = ", ".join(_hp(a, p) for a, p in exposed)
    if ruleset is None:
        return CheckResult("open_ports", "warn",
                           f"{where} open to the network; firewall rules not readable (run "
                           f"the check as root)", "sudo gpucostd check")
    open_ = [(a, p) for a, p in exposed if firewall_restricts(ruleset, p) is None]
    if not open_:
        return CheckResult("open_ports", "pass",
                           f"{where} listen beyond loopback, restricted by the firewall")
    port = open_[0][1]
    return CheckResult("open_ports", "fail",
                       f"{', '.join(_hp(a, p) for a, p in open_)} open to the network with no "
                       f"firewall rule restricting it",
                       f"bind the server to 127.0.0.1 behind a proxy, or allow only trusted "
                       f"sources, e.g. nft add rule inet filter input tcp dport {port} ip "
                       f"saddr 10.0.0.0/8 accept, then drop the rest of port {port}")


def model_dirs_check(dirs: Sequence[str], deploy: Any) -> Optional[CheckResult]:
    if not dirs:
        return None
    facts = {d.path: d for d in getattr(deploy, "model_dirs", ()) or ()}
    missing = [d for d in dirs if d not in facts or not facts[d].exists]
    loose: List[str] = []
    total = 0
    for d in dirs:
        f = facts.get(d)
        if f is not None and f.exists:
            total += f.files
            loose.extend(f"{p} ({m:04o})" for p, m in f.loose)
    if loose:
        more = f" and {len(loose) - 3} more" if len(loose) > 3 else ""
        return CheckResult("model_files", "fail",
                           f"{len(loose)} model file(s) writable by others than their owner: "
                           f"{', '.join(loose[:3])}{more}",
                           f"chmod 0400 the weight files (chmod -R go-w,a-x+X "
                           f"{' '.join(dirs)} at least)")
    if missing:
        return CheckResult("model_files", "warn", f"model directory not found: "
                           f"{', '.join(missing)}", "correct [checks] model_dirs")
    return CheckResult("model_files", "pass", f"{total} model file(s) in {', '.join(dirs)}, "
                       f"none writable by group or others")


def deploy_checks(config: Any, deploy: Any, gpus: Sequence[Any], nvml_driver: Optional[str],
                  nvml_error: Optional[str]) -> List[CheckResult]:
    checks = config.checks
    out = [persistenced_check(deploy, gpus), driver_mismatch_check(nvml_driver, deploy,
                                                                    nvml_error)]
    for r in (container_toolkit_check(checks.container_toolkit, deploy),
              serving_ports_check(list(checks.serving_ports), deploy),
              model_dirs_check(list(checks.model_dirs), deploy)):
        if r is not None:
            out.append(r)
    return out
