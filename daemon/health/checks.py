"""Host prerequisite checks: kernel, driver, CUDA, IOMMU, persistence mode, NIC settings (and the
deployment-guide checks of deploy_checks.py).

Pure functions over data the probes and tuners already read (no I/O here). Each result has a
status (pass | warn | fail), a message saying what was found and a fix saying what to do.
Versions compare numerically per component, so "5.15" is newer than "5.4" (15 > 4) and
"535.104.05" meets a minimum of "535.104".
"""
from __future__ import annotations

import re
from typing import Any, Iterable, List, Optional, Sequence, Tuple

from gpucostd import wrap
from gpucostd.snapshot import CheckResult, Severity

WIDTH = 100
GRUB_FILE = "GRUB_CMDLINE_LINUX in /etc/default/grub"
GRUB_TAIL = ("run update-grub, reboot (RHEL and friends: grub2-mkconfig -o /boot/grub2/grub.cfg "
             "instead of update-grub)")


def grub_fix(add: str = "", remove: str = "") -> str:
    """`add intel_iommu=on iommu=pt to GRUB_CMDLINE_LINUX in /etc/default/grub, run update-grub,
    reboot` and friends."""
    if add and remove:
        return f"in {GRUB_FILE} remove {remove} and add {add}, {GRUB_TAIL}"
    if remove:
        return f"remove {remove} from {GRUB_FILE}, {GRUB_TAIL}"
    return f"add {add} to {GRUB_FILE}, {GRUB_TAIL}"


def version_tuple(text: Optional[str]) -> Optional[Tuple[int, ...]]:
    """Leading numeric components: "6.8.0-45-generic" -> (6, 8, 0); "535.104.05" ->
    (535, 104, 5); None when there is no leading number."""
    if not text:
        return None
    m = re.match(r"\s*v?(\d+(?:\.\d+)*)", str(text))
    if not m:
        return None
    return tuple(int(p) for p in m.group(1).split("."))


def version_at_least(have: str, need: str) -> Optional[bool]:
    a, b = version_tuple(have), version_tuple(need)
    if a is None or b is None:
        return None
    n = max(len(a), len(b))
    return a + (0,) * (n - len(a)) >= b + (0,) * (n - len(b))


def _get(obj: Any, name: str, default=None):
    if obj is None:
        return default
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _version_check(name: str, what: str, have: Optional[str], need: str, fix: str,
                   unknown: str, unknown_fix: str) -> CheckResult:
    if have is None:
        return CheckResult(name, "warn", f"{what} unknown: {unknown}", unknown_fix)
    ok = version_at_least(have, need)
    if ok is None:
        return CheckResult(name, "warn", f"{what} {have!r} is not a version number",
                           unknown_fix)
    if ok:
        return CheckResult(name, "pass", f"{what} {have} >= {need}")
    return CheckResult(name, "fail", f"{what} {have} is older than the minimum {need}", fix)


def _iommu_fix(want: str, vendor: Optional[str], facts: Any) -> str:
    mode = _get(facts, "iommu_mode")
    groups = _get(facts, "iommu_groups") or 0
    src = _get(facts, "iommu_source", "") or ""
    firmware = "VT-d" if vendor == "intel" else "AMD-Vi" if vendor == "amd" else "VT-d/AMD-Vi"
    if want in ("on", "passthrough") and mode == "off" and not groups and "firmware" in src:
        return f"enable {firmware} in the firmware (BIOS/UEFI) setup, then reboot"
    if vendor == "intel":
        on_flag = "intel_iommu=on"
    elif vendor == "amd":
        on_flag = ""          # AMD: on by default
    else:
        on_flag = "intel_iommu=on (Intel CPUs)"
    if want == "on":
        if mode == "passthrough":
            return grub_fix(remove="iommu=pt")
        if vendor == "amd":
            return grub_fix(remove="amd_iommu=off and iommu=off")
        return grub_fix(add=on_flag)
    if want == "passthrough":
        return grub_fix(add=" ".join(f for f in (on_flag, "iommu=pt") if f))
    if want == "off":
        off_flag = {"amd": "amd_iommu=off", "intel": "intel_iommu=off"}.get(vendor or "",
                                                                           "iommu=off")
        return grub_fix(add=off_flag, remove="intel_iommu=on and iommu=pt" if vendor != "amd"
                        else "iommu=pt")
    return ""


def _iommu_check(want: str, facts: Any) -> CheckResult:
    if facts is None:
        return CheckResult("iommu", "warn", "IOMMU state unknown: host facts not read",
                           "check daemon.host_root and the logs")
    mode = _get(facts, "iommu_mode")
    source = _get(facts, "iommu_source", "") or ""
    vendor = _get(facts, "cpu_vendor")
    if mode is None:
        status = "pass" if want == "any" else "warn"
        return CheckResult("iommu", status, f"IOMMU state unknown ({source})",
                           "" if want == "any" else "check that /sys is mounted")
    found = f"IOMMU {mode} ({source})"
    if want == "any" or want == mode:
        return CheckResult("iommu", "pass", found + ("" if want == "any" else " as required"))
    return CheckResult("iommu", "fail", f"{found}; checks.iommu wants {want}",
                       _iommu_fix(want, vendor, facts))


def _gpu_list(indexes: Sequence[int]) -> str:
    return ", ".join(str(i) for i in indexes)


def _persistence_check(gpus: Sequence[Any]) -> CheckResult:
    if not gpus:
        return CheckResult("persistence", "warn", "no GPU readings (NVML not available?)",
                           "check that the NVIDIA driver is loaded (nvidia-smi)")
    off = [g.index for g in gpus if _get(g, "persistence_mode") is False]
    unknown = [g.index for g in gpus if _get(g, "persistence_mode") is None]
    fix = ("enable nvidia-persistenced (systemctl enable --now nvidia-persistenced; NVIDIA's "
           "recommended way), or set [tuning.gpu] persistence_mode = true (legacy mode)")
    if off:
        return CheckResult("persistence", "warn",
                           f"persistence mode is off on GPU {_gpu_list(off)}: the driver "
                           f"tears down and re-initialises the GPU between jobs", fix)
    if unknown and len(unknown) == len(gpus):
        return CheckResult("persistence", "warn", "persistence mode unknown on every GPU",
                           "check NVML (nvidia-smi -q | grep Persistence)")
    extra = f" (unknown on GPU {_gpu_list(unknown)})" if unknown else ""
    return CheckResult("persistence", "pass", f"persistence mode on for all GPUs{extra}")


def _nic_check(config: Any, settings: Sequence[Any]) -> CheckResult:
    nic = [s for s in settings or () if str(_get(s, "subject", "")).startswith("nic:")]
    configured = list(getattr(config, "nic_tuning", {}) or {}) if config is not None else []
    if not nic:
        if configured:
            return CheckResult("nic", "warn", "NIC settings configured for "
                               f"{', '.join(configured)} but not verified yet",
                               "run gpucostd plan to see them")
        return CheckResult("nic", "pass", "no NIC settings configured ([tuning.nic.IFNAME])")
    errors = [s for s in nic if _get(s, "error")]
    drift = [s for s in nic if not _get(s, "error") and s.desired != s.actual]
    if errors:
        msg = "; ".join(str(s.error) for s in errors[:3])
        if len(errors) > 3:
            msg += f"; and {len(errors) - 3} more"
        tables = ", ".join(sorted({f"[tuning.{s.subject.replace(':', '.', 1)}]"
                                   for s in errors}))
        return CheckResult("nic", "fail", msg,
                           f"correct {tables} in the config (interface name, ring sizes) or "
                           f"the NIC it names")
    if drift:
        parts = ", ".join(f"{s.subject[4:]} {s.name} {s.actual} (want {s.desired})"
                          for s in drift[:4])
        return CheckResult("nic", "warn", f"NIC settings out of sync: {parts}",
                           "run gpucostd apply, or set [tuning] enforce = true")
    return CheckResult("nic", "pass", f"{len(nic)} NIC setting{'s' if len(nic) != 1 else ''} "
                       f"in sync")


def run_checks(config: Any, facts: Any, gpus: Iterable[Any], driver_version: Optional[str],
               cuda_version: Optional[str], settings: Iterable[Any], deploy: Any = None,
               nvml_error: Optional[str] = None) -> List[CheckResult]:
    """All host checks, in a fixed order: kernel, driver, cuda, iommu, persistence, nic, and
    with `deploy` (probes.deploy.DeployFacts) persistenced, driver_match, toolkit, open_ports,
    model_files (deploy_checks.py; the last three only when [checks] asks for them)."""
    checks = config.checks
    gpus = list(gpus or ())
    settings = list(settings or ())
    results = []
    results.append(_version_check(
        "kernel", "kernel", _get(facts, "kernel_release"), checks.min_kernel,
        f"upgrade the kernel to {checks.min_kernel} or newer (e.g. the distribution's HWE "
        f"kernel) and reboot",
        "cannot read /proc/sys/kernel/osrelease", "check daemon.host_root"))
    results.append(_version_check(
        "driver", "NVIDIA driver", driver_version, checks.min_driver,
        f"install NVIDIA driver {checks.min_driver} or newer (e.g. the distribution's "
        f"nvidia-driver package), then reboot or reload the nvidia modules",
        "NVML not available", "load the NVIDIA driver and check that nvidia-smi works"))
    results.append(_version_check(
        "cuda", "CUDA (driver)", cuda_version, checks.min_cuda,
        f"install an NVIDIA driver that supports CUDA {checks.min_cuda} or newer",
        "NVML not available", "load the NVIDIA driver and check that nvidia-smi works"))
    results.append(_iommu_check(checks.iommu, facts))
    results.append(_persistence_check(gpus))
    results.append(_nic_check(config, settings))
    if deploy is not None:
        from gpucostd.health.deploy_checks import deploy_checks
        results.extend(deploy_checks(config, deploy, gpus, driver_version, nvml_error))
    return results


def checks_severity(results: Iterable[CheckResult]) -> Severity:
    """Worst status as a Severity (fail -> CRIT, warn -> WARN); for `gpucostd check` exit."""
    sev = Severity.OK
    for r in results:
        if r.status == "fail":
            return Severity.CRIT
        if r.status == "warn":
            sev = Severity.WARN
    return sev


def format_checks(results: Iterable[CheckResult], width: int = WIDTH) -> str:
    """People's view: one line per check, its fix indented below; fits `width` columns."""
    lines: List[str] = []
    for r in results:
        head = f"{r.status.upper():<5} {r.name:<12} "
        body = wrap(r.message, width - len(head)) or [""]
        lines.append(head + body[0])
        lines.extend(" " * len(head) + b for b in body[1:])
        if r.fix and r.status != "pass":
            fix = wrap("fix: " + r.fix, width - len(head) - 2)
            lines.extend(" " * (len(head) + 2) + f if i else " " * len(head) + f
                         for i, f in enumerate(fix))
    return "\n".join(lines) + ("\n" if lines else "")
