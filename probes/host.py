"""Host facts from procfs and sysfs under a configurable root (tests point it at fixture trees).

Read-only. Every fact that cannot be read is None, with the reason in ``HostFacts.errors``.

IOMMU: the kernel's own answer wins over the command line.
- ``/sys/kernel/iommu_groups/N`` exist  -> the IOMMU is enabled (devices are being grouped);
  ``/sys/kernel/iommu_groups/N/type`` = ``identity`` on every group, or ``iommu=pt`` /
  ``iommu.passthrough=1`` on the command line -> passthrough mode.
- no groups -> off. The source says why: ``intel_iommu=off`` / ``amd_iommu=off`` /
  ``iommu=off`` on the command line; an Intel CPU without ``intel_iommu=on`` (the usual kernel
  default is off on Intel); or ``..._iommu=on`` given but the firmware has VT-d / AMD-Vi off.
- AMD CPUs enable the IOMMU by default when the firmware has AMD-Vi on (groups exist, no flag).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from gpucostd.probes.hostroot import HostRoot


@dataclass(frozen=True)
class NicInfo:
    name: str
    driver: Optional[str]          # None for virtual devices without a device link
    pci_bus_id: Optional[str] = None
    virtual: bool = False


@dataclass(frozen=True)
class HostFacts:
    kernel_release: Optional[str]
    cmdline: Optional[str]
    iommu_enabled: Optional[bool]
    iommu_mode: Optional[str]      # "on" | "passthrough" | "off" (None: cannot tell)
    iommu_groups: Optional[int]
    iommu_source: str              # why we believe iommu_mode, in words
    cpu_vendor: Optional[str]      # "intel" | "amd" | "other"
    iommu_units: Tuple[str, ...] = ()         # /sys/class/iommu entries (dmar0, ivhd0, ...)
    cmdline_params: Tuple[Tuple[str, str], ...] = ()
    nics: Tuple[NicInfo, ...] = ()
    errors: Tuple[str, ...] = ()
    root: str = "/"

    def param(self, name: str) -> Optional[str]:
        """Last value of a kernel command line parameter ("" for a bare flag), or None."""
        return last_param(self.cmdline_params, name)

    def as_dict(self) -> Dict[str, object]:
        return {
            "kernel_release": self.kernel_release, "cmdline": self.cmdline,
            "iommu_enabled": self.iommu_enabled, "iommu_mode": self.iommu_mode,
            "iommu_groups": self.iommu_groups, "iommu_source": self.iommu_source,
            "cpu_vendor": self.cpu_vendor, "iommu_units": list(self.iommu_units),
            "nics": [{"name": n.name, "driver": n.driver, "pci_bus_id": n.pci_bus_id,
                      "virtual": n.virtual} for n in self.nics],
            "errors": list(self.errors),
        }


def parse_cmdline(text: str) -> Tuple[Tuple[str, str], ...]:
    """Kernel parameters before a bare ``--`` (what follows belongs to init)."""
    out: List[Tuple[str, str]] = []
    for word in text.split():
        if word == "--":
            break
        k, _, v = word.partition("=")
        out.append((k, v.strip('"')))
    return tuple(out)


def last_param(params: Tuple[Tuple[str, str], ...], name: str) -> Optional[str]:
    """The value of the last `name` on the command line (the kernel's rule), or None."""
    value = None
    for k, v in params:
        if k == name:
            value = v
    return value


_ON = ("on", "1", "y", "yes", "force", "force_enable")
_OFF = ("off", "0", "n", "no")


class HostProbe(HostRoot):

    # ------------------------------------------------------------------ facts
    def facts(self) -> HostFacts:
        errors: List[str] = []
        release = self.text("proc/sys/kernel/osrelease", errors)
        release = release.strip() if release else None
        cmdline = self.text("proc/cmdline", errors)
        cmdline = cmdline.strip() if cmdline is not None else None
        params = parse_cmdline(cmdline or "")
        vendor = self.cpu_vendor(errors)
        units = tuple(self.listdir("sys/class/iommu") or ())
        group_names = self.listdir("sys/kernel/iommu_groups")
        if group_names is not None:
            group_names = [g for g in group_names if g.isdigit()]
        groups = None if group_names is None else len(group_names)
        types = []
        for g in group_names or ():
            t = self.text(f"sys/kernel/iommu_groups/{g}/type", [])
            if t:
                types.append(t.strip())
        enabled, mode, source = judge_iommu(params, vendor, groups, units, types)
        return HostFacts(kernel_release=release, cmdline=cmdline, iommu_enabled=enabled,
                         iommu_mode=mode, iommu_groups=groups, iommu_source=source,
                         cpu_vendor=vendor, iommu_units=units, cmdline_params=params,
                         nics=self.nics(), errors=tuple(errors), root=self.root)

    def cpu_vendor(self, errors: Optional[List[str]] = None) -> Optional[str]:
        text = self.text("proc/cpuinfo", errors if errors is not None else [])
        if text is None:
            return None
        m = re.search(r"^vendor_id\s*:\s*(\S+)", text, re.M)
        if m:
            v = m.group(1)
            return {"GenuineIntel": "intel", "AuthenticAMD": "amd", "HygonGenuine": "amd"}.get(
                v, "other")
        return "other" if text.strip() else None

    def nic_driver(self, ifname: str) -> Optional[str]:
        """Driver of a NIC from /sys/class/net/IF/device/driver (None for virtual devices)."""
        try:
            return os.path.basename(os.readlink(self.path(f"sys/class/net/{ifname}/device/driver")))
        except OSError:
            return None

    def nics(self) -> Tuple[NicInfo, ...]:
        out = []
        for name in self.listdir("sys/class/net") or ():
            if name == "lo":
                continue
            dev = self.path(f"sys/class/net/{name}/device")
            virtual = not os.path.exists(dev)
            bus = None
            if not virtual:
                try:
                    target = os.path.basename(os.path.realpath(dev))
                    if re.fullmatch(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]", target):
                        bus = target
                except OSError:
                    pass
            out.append(NicInfo(name, self.nic_driver(name), bus, virtual))
        return tuple(out)


def judge_iommu(params: Tuple[Tuple[str, str], ...], vendor: Optional[str],
                groups: Optional[int], units: Tuple[str, ...], types: List[str]
                ) -> Tuple[Optional[bool], Optional[str], str]:
    """(enabled, mode, source) from the command line and what sysfs shows."""
    intel = last_param(params, "intel_iommu")
    amd = last_param(params, "amd_iommu")
    generic = last_param(params, "iommu")
    passthrough_param = last_param(params, "iommu.passthrough")
    intel_opts = set((intel or "").split(","))
    amd_opts = set((amd or "").split(","))
    pt = generic == "pt" or (passthrough_param or "").lower() in ("1", "y", "on")
    if generic == "nopt" or (passthrough_param or "").lower() in ("0", "n", "off"):
        pt = False
    flags = " ".join(f"{k}={v}" for k, v in params
                     if k in ("intel_iommu", "amd_iommu", "iommu", "iommu.passthrough"))
    flag_text = f"kernel command line: {flags}" if flags else "no IOMMU flags on the kernel " \
                                                               "command line"
    if groups is None and not units:
        # sysfs not there at all: only the command line can tell
        if intel_opts & set(_OFF) or amd_opts & {"off"} or generic == "off":
            return False, "off", f"{flag_text} (no /sys/kernel/iommu_groups to confirm)"
        return None, None, f"cannot read /sys/kernel/iommu_groups; {flag_text}"

    if groups:
        identity = bool(types) and all(t == "identity" for t in types)
        mode = "passthrough" if (pt or identity) else "on"
        why = [f"{groups} IOMMU group{'s' if groups != 1 else ''} in /sys/kernel/iommu_groups"]
        if identity and not pt:
            why.append("every group has type identity (passthrough)")
        if flags:
            why.append(flag_text)
        elif vendor == "amd":
            why.append("AMD enables the IOMMU by default")
        return True, mode, "; ".join(why)

    # no groups: the IOMMU is off; say why
    if vendor == "intel" and intel_opts & set(_OFF):
        why = "intel_iommu=off on the kernel command line"
    elif vendor == "amd" and "off" in amd_opts:
        why = "amd_iommu=off on the kernel command line"
    elif generic == "off":
        why = "iommu=off on the kernel command line"
    elif (vendor == "intel" and intel_opts & set(_ON)) or (vendor == "amd" and amd):
        name = "VT-d" if vendor == "intel" else "AMD-Vi"
        why = (f"{flag_text}, but the kernel found no IOMMU (no groups): {name} is probably "
               f"off in the firmware setup")
    elif vendor == "intel":
        why = "Intel CPU without intel_iommu=on on the kernel command line (kernel default off)"
    elif vendor == "amd":
        why = "AMD CPU but no IOMMU groups: AMD-Vi is probably off in the firmware setup"
    else:
        why = f"no IOMMU groups in /sys/kernel/iommu_groups; {flag_text}"
    return False, "off", why
