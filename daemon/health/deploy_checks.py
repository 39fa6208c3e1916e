"""Host checks from the deployment guides of GPU inference fleets (pure, over probes/deploy.py's
facts): nvidia-persistenced, driver / kernel-module mismatch, NVIDIA Container Toolkit, serving
ports open to the network without a firewall rule, model weights writable by others.

Each result is a CheckResult (pass | warn | fail) with the fix. ``firewall_restricts(ruleset,
port)`` walks nftables (``nft list ruleset``) and iptables (``iptables-save``) rules in order, as
the kernel does, for a new TCP connection from the network (its docstring has the rules); what
it cannot weigh never counts as protection, so a doubt ends as "open", never as "restricted".
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


def firewall_restricts(ruleset: str, port: int) -> Optional[str]:
    """Why a new TCP connection from the network to `port` is refused by this ruleset (in words),
    or None when one can get through, or when the ruleset does not say.

    The rules are walked as the kernel does, first match wins: the iptables INPUT chain (for a
    port Docker publishes, DOCKER-USER, since Docker's DNAT sends it past INPUT) and every
    nftables base chain on the input hook (a packet must pass each of them). A rule that matches
    only loopback, established or invalid traffic, another protocol or other ports does not
    apply; one that accepts the port from anywhere, or on a named interface, opens it; one that
    accepts it only from given sources narrows it; a drop or reject that applies to everyone,
    or a chain policy of drop at the end, closes it. Jumps and gotos into user chains are
    followed. What the reading cannot tell (a match it does not know) never counts as closing.
    """
    chains, policies, dnat = _parse_rulesets(ruleset)
    reasons = []
    for base in [c for c in policies if c[0] == "nft"] + [("ipt", "filter", "INPUT")]:
        if base[0] == "ipt" and base not in chains and base not in policies:
            continue
        if base[0] == "ipt" and port in dnat:
            base = ("ipt", "filter", "DOCKER-USER")
        verdict, why = _walk(chains, base, port, "all", 0)
        if verdict is None and policies.get(base) in ("drop", "reject"):
            verdict, why = _DROP, f"{_name(base)} drops by default (policy {policies[base]})"
        if verdict == _DROP:
            reasons.append(why)
    return "; ".join(reasons) if reasons else None


_ACCEPT, _DROP, _RETURN = "accept", "drop", "return"
_NFT_CHAIN = re.compile(r"chain\s+(\S+)\s*\{")
_NFT_TABLE = re.compile(r"table\s+(\S+(?:\s+\S+)?)\s*\{")
_NFT_BASE = re.compile(r"type\s+filter\s+hook\s+input\b.*?policy\s+(\w+)")
# matches that keep a rule away from a new TCP connection arriving from the network
_NOT_FOR_US = re.compile(
    r'\biifname\s+"?lo"?(\s|$)|\biif\s+"?lo"?(\s|$)|(^|\s)-i\s+lo(\s|$)|\bct\s+status\b'
    r"|\b(udp|icmp|icmpv6|sctp)\b(?!.*\btcp\b)|\bip6?\s+protocol\s+(?!tcp)"
    r"|\bmeta\s+l4proto\s+(?!tcp)")
_STATE = re.compile(r"\bct\s+state\s+(\{[^}]*\}|\S+)|--c?t?state\s+(\S+)")
_SOURCED = re.compile(r"\bsaddr\b|(^|\s)!?\s*-s\s|--source\b|--src-range\b|--match-set\s+\S+\s+src")
_KNOWN = re.compile(
    r"^(-A\s+\S+|-p\s+tcp|-m\s+(tcp|multiport|comment|conntrack|state)|--comment\s+(\"[^\"]*\"|\S+)"
    r"|(--dports?|dport)\s+(\{[^}]*\}|[0-9][0-9:,\- ]*)|tcp|counter(\s+packets\s+\d+\s+bytes\s+\d+)?"
    r"|--ctstate\s+\S+|--state\s+\S+|ct\s+state\s+\S+|comment\s+\"[^\"]*\""
    r"|log(\s+prefix\s+\"[^\"]*\")?|meta\s+l4proto\s+tcp|ip6?\s+protocol\s+tcp)\s*")


def _name(chain) -> str:
    kind, table, name = chain
    return f"nftables {table} chain {name}" if kind == "nft" else f"iptables {name} chain"


def _parse_rulesets(text: str):
    """{chain: [rule lines]}, {base chain: policy}, {ports Docker DNATs} from nft / iptables-save
    text. Chains are keyed (kind, table, name)."""
    chains, policies, dnat = {}, {}, set()
    table, chain, ipt_table = None, None, None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            ipt_table = line[1:].strip()
            continue
        if line.startswith(":"):  # an iptables chain header (the filter table when unnamed)
            parts = line[1:].split()
            if (ipt_table or "filter") == "filter" and len(parts) > 1 and parts[1] != "-":
                policies[("ipt", "filter", parts[0])] = parts[1].lower()
            continue
        if line.startswith("-A ") and len(line.split()) > 1:
            name, in_table = line.split()[1], ipt_table or "filter"
            if in_table == "nat" and "DNAT" in line:
                dnat |= {p for m in _PORTS_RE.finditer(line) for p in _ports(m.group(1))}
            chains.setdefault(("ipt", in_table, name), []).append(line)
            continue
        if line == "COMMIT":
            ipt_table = None
            continue
        m = _NFT_TABLE.match(line)
        if m:
            table, chain = m.group(1), None
            continue
        m = _NFT_CHAIN.match(line)
        if m and table is not None:
            chain = ("nft", table, m.group(1))
            chains.setdefault(chain, [])
            continue
        if chain is None or line == "}":
            chain = None if line == "}" else chain
            continue
        m = _NFT_BASE.search(line)
        if m:
            policies[chain] = m.group(1).lower()
        elif not line.startswith(("type ", "policy ")):
            chains[chain].append(line)
    return chains, policies, dnat


def _verdict(line: str):
    """(verdict, target chain) of one rule: accept / drop / jump / goto / return / None."""
    m = re.search(r"-[jg]\s+(\S+)", line)
    if m:
        target = m.group(1)
        if target in ("ACCEPT",):
            return _ACCEPT, None
        if target in ("DROP", "REJECT"):
            return _DROP, None
        if target == "RETURN":
            return _RETURN, None
        if target in ("LOG", "NFLOG", "MARK", "CONNMARK", "TRACE"):
            return None, None
        return ("goto" if re.search(r"-g\s", line) else "jump"), target
    m = re.search(r"\b(accept|drop|reject|return|jump\s+(\S+)|goto\s+(\S+))\b", line)
    if not m:
        return None, None
    word = m.group(1).split()[0]
    if word in ("jump", "goto"):
        return word, (m.group(2) or m.group(3))
    return {"accept": _ACCEPT, "drop": _DROP, "reject": _DROP, "return": _RETURN}[word], None


def _applies(line: str, port: int) -> Optional[str]:
    """None when the rule cannot match a new TCP connection to `port` from the network; else
    "all" (it matches every such connection), "sources" (only from given source addresses) or
    "some" (under a condition this reading does not weigh, e.g. an input interface)."""
    if _NOT_FOR_US.search(line):
        return None
    ports = [m.group(1) for m in _PORTS_RE.finditer(line)]
    if ports and not any(port in _ports(p) for p in ports):
        return None
    for m in _STATE.finditer(line):
        states = (m.group(1) or m.group(2) or "").lower()
        if "new" not in re.split(r"[{},\s]+", states):
            return None
    if _SOURCED.search(line):
        return "sources"
    body = re.sub(r"\s*(-[jg]\s+\S+.*|\b(accept|drop|reject(\s+with\s+.*)?|return|jump\s+\S+"
                  r"|goto\s+\S+))\s*$", "", line)
    rest = body
    while rest:
        m = _KNOWN.match(rest)
        if not m or not m.group(0):
            return "some"
        rest = rest[m.end():]
    return "all"


def _walk(chains, chain, port: int, ctx: str, depth: int):
    """(verdict, why) for the first rule of `chain` that decides, or (None, "") to fall through.
    `ctx` is the scope the walk was entered under ("all", "some", "sources"): under a narrower
    one an accept still opens the port where it is not limited to given sources, but no drop
    closes it for everyone. A conditional RETURN or goto narrows the rest of the chain too."""
    if depth > 16:
        return None, ""
    kind, table, _ = chain
    narrowed = False
    for line in chains.get(chain, []):
        scope = _applies(line, port)
        if scope is None:
            continue
        eff = "sources" if "sources" in (ctx, scope) else "some" if "some" in (ctx, scope) \
            else "all"
        verdict, target = _verdict(line)
        if verdict in ("jump", "goto"):
            got, why = _walk(chains, (kind, table, target), port, eff, depth + 1)
            if got in (_ACCEPT, _DROP):
                return got, why
            if verdict == "goto":
                if scope == "all":
                    return None, ""
                narrowed = True
            continue
        if verdict == _RETURN:
            if scope == "all":
                return None, ""
            narrowed = True
        elif verdict == _ACCEPT and eff != "sources":
            return _ACCEPT, ""
        elif verdict == _DROP and eff == "all" and not narrowed:
            return _DROP, f"{_name(chain)} refuses port {port}: {line[:120]}"
    return None, ""


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
