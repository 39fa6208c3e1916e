"""Host facts and prerequisite checks over fixture trees of /proc and /sys (node_exporter's way).

Fixtures: tests/fixtures/host/{intel_iommu_on, amd_default_on, iommu_pt, disabled}/ each with
proc/cmdline, proc/sys/kernel/osrelease, proc/cpuinfo, sys/class/iommu, sys/kernel/iommu_groups.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from gpucostd.health.checks import (checks_severity, format_checks, run_checks, version_at_least,
                             version_tuple)
from gpucostd.config import parse
from gpucostd.probes.host import HostProbe, parse_cmdline
from gpucostd.snapshot import GpuReading, Setting, Severity

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "host"


def facts(name):
    return HostProbe(str(FIXTURES / name)).facts()


def checks_for(name, iommu="any", gpus=(), driver="550.54.15", cuda="12.4", settings=(),
               extra=""):
    cfg = parse(f'[checks]\niommu = "{iommu}"\n' + extra)
    return {r.name: r for r in run_checks(cfg, facts(name), gpus, driver, cuda, settings)}


# ------------------------------------------------------------------ host facts per fixture
@pytest.mark.parametrize("name, release, vendor, enabled, mode, groups", [
    ("intel_iommu_on", "6.8.0-45-generic", "intel", True, "on", 4),
    ("amd_default_on", "5.15.0-119-generic", "amd", True, "on", 3),
    ("iommu_pt", "6.5.0-1025-oracle", "intel", True, "passthrough", 2),
    ("disabled", "5.4.0-150-generic", "intel", False, "off", 0),
])
def test_host_facts_from_fixture_trees(name, release, vendor, enabled, mode, groups):
    f = facts(name)
    assert f.kernel_release == release
    assert f.cpu_vendor == vendor
    assert f.iommu_enabled is enabled
    assert f.iommu_mode == mode
    assert f.iommu_groups == groups
    assert f.errors == ()


def test_iommu_source_explains_the_verdict():
    assert "AMD enables the IOMMU by default" in facts("amd_default_on").iommu_source
    assert "intel_iommu=on" in facts("intel_iommu_on").iommu_source
    assert "iommu=pt" in facts("iommu_pt").iommu_source
    assert "Intel CPU without intel_iommu=on" in facts("disabled").iommu_source
    assert facts("intel_iommu_on").iommu_units == ("dmar0",)
    assert facts("amd_default_on").iommu_units == ("ivhd0",)


def test_nic_drivers_from_sysfs():
    f = facts("intel_iommu_on")
    nics = {n.name: n for n in f.nics}
    assert nics["ens1f0np0"].driver == "mlx5_core" and not nics["ens1f0np0"].virtual
    assert nics["veth0"].driver is None and nics["veth0"].virtual
    assert HostProbe(str(FIXTURES / "intel_iommu_on")).nic_driver("ens1f0np0") == "mlx5_core"
    assert HostProbe(str(FIXTURES / "intel_iommu_on")).nic_driver("nope0") is None


def test_missing_root_gives_none_with_reasons(tmp_path):
    f = HostProbe(str(tmp_path)).facts()
    assert f.kernel_release is None and f.cmdline is None
    assert f.iommu_enabled is None and f.iommu_mode is None
    assert any("osrelease" in e for e in f.errors)
    checks = {r.name: r for r in run_checks(parse(""), f, [], None, None, [])}
    assert checks["kernel"].status == "warn" and "cannot read" in checks["kernel"].message
    assert checks["driver"].status == "warn"
    assert checks["iommu"].status == "pass"          # "any" accepts unknown


def test_cmdline_parsing_stops_at_double_dash_and_takes_last_value():
    params = parse_cmdline("ro intel_iommu=off intel_iommu=on quiet -- iommu=pt")
    assert ("intel_iommu", "on") in params and ("iommu", "pt") not in params


# ------------------------------------------------------------------ IOMMU check
@pytest.mark.parametrize("name, want, status", [
    ("intel_iommu_on", "on", "pass"), ("intel_iommu_on", "passthrough", "fail"),
    ("intel_iommu_on", "off", "fail"), ("intel_iommu_on", "any", "pass"),
    ("amd_default_on", "on", "pass"), ("amd_default_on", "passthrough", "fail"),
    ("iommu_pt", "passthrough", "pass"), ("iommu_pt", "on", "fail"),
    ("disabled", "off", "pass"), ("disabled", "on", "fail"), ("disabled", "passthrough", "fail"),
])
def test_iommu_check(name, want, status):
    r = checks_for(name, iommu=want)["iommu"]
    assert r.status == status, r
    if status == "fail":
        assert r.fix


def test_iommu_fix_texts():
    fix = checks_for("disabled", iommu="passthrough")["iommu"].fix
    assert fix.startswith("add intel_iommu=on iommu=pt to GRUB_CMDLINE_LINUX in "
                          "/etc/default/grub, run update-grub, reboot")
    assert checks_for("amd_default_on", iommu="passthrough")["iommu"].fix.startswith(
        "add iommu=pt to GRUB_CMDLINE_LINUX")
    assert checks_for("iommu_pt", iommu="on")["iommu"].fix.startswith(
        "remove iommu=pt from GRUB_CMDLINE_LINUX")
    assert "intel_iommu=off" in checks_for("intel_iommu_on", iommu="off")["iommu"].fix
    assert "amd_iommu=off" in checks_for("amd_default_on", iommu="off")["iommu"].fix


def test_intel_flag_without_groups_points_at_firmware(tmp_path):
    root = tmp_path / "root"
    (root / "proc/sys/kernel").mkdir(parents=True)
    (root / "sys/kernel/iommu_groups").mkdir(parents=True)
    (root / "sys/class/iommu").mkdir(parents=True)
    (root / "proc/cmdline").write_text("ro intel_iommu=on\n")
    (root / "proc/sys/kernel/osrelease").write_text("6.8.0\n")
    (root / "proc/cpuinfo").write_text("vendor_id\t: GenuineIntel\n")
    f = HostProbe(str(root)).facts()
    assert f.iommu_enabled is False and "firmware" in f.iommu_source
    r = run_checks(parse('[checks]\niommu = "on"\n'), f, [], "550.1", "12.4", [])[3]
    assert r.status == "fail" and "VT-d" in r.fix and "firmware" in r.fix


# ------------------------------------------------------------------ kernel / driver / cuda
def test_versions_compare_numerically_per_component():
    assert version_tuple("6.8.0-45-generic") == (6, 8, 0)
    assert version_tuple("535.104.05") == (535, 104, 5)
    assert version_at_least("5.15", "5.4") is True      # 15 > 4, not string order
    assert version_at_least("5.4.0", "5.15") is False
    assert version_at_least("535.104.05", "535.104") is True
    assert version_at_least("535.86.10", "535.104") is False
    assert version_at_least("12.10", "12.2") is True
    assert version_at_least("junk", "1.0") is None


def test_kernel_check_per_fixture():
    assert checks_for("disabled")["kernel"].status == "fail"      # 5.4 < 5.15
    assert "upgrade the kernel" in checks_for("disabled")["kernel"].fix
    assert checks_for("amd_default_on")["kernel"].status == "pass"  # 5.15.0 == 5.15
    assert checks_for("intel_iommu_on")["kernel"].status == "pass"


def test_driver_and_cuda_checks():
    c = checks_for("intel_iommu_on", driver="535.86.10", cuda="12.1")
    assert c["driver"].status == "fail" and "535.104" in c["driver"].message
    assert c["cuda"].status == "fail" and "12.2" in c["cuda"].fix
    c = checks_for("intel_iommu_on", driver="535.104.05", cuda="12.2")
    assert c["driver"].status == "pass" and c["cuda"].status == "pass"
    c = checks_for("intel_iommu_on", driver=None, cuda=None)
    assert c["driver"].status == "warn" and "NVML not available" in c["driver"].message
    c = checks_for("intel_iommu_on", extra='min_driver = "550.90"\n', driver="550.54.15")
    assert c["driver"].status == "fail"


# ------------------------------------------------------------------ persistence / NIC
def test_persistence_check_warns_with_gpu_list():
    gpus = [GpuReading(0, persistence_mode=True), GpuReading(1, persistence_mode=False),
            GpuReading(2, persistence_mode=None), GpuReading(3, persistence_mode=False)]
    r = checks_for("intel_iommu_on", gpus=gpus)["persistence"]
    assert r.status == "warn" and "GPU 1, 3" in r.message and "persistence_mode = true" in r.fix
    r = checks_for("intel_iommu_on", gpus=[GpuReading(0, persistence_mode=True)])
    assert r["persistence"].status == "pass"


def test_nic_check_from_settings():
    ok = Setting("nic:eth0", "ring_rx", 4096, 4096, "tuning.nic.eth0")
    drift = Setting("nic:eth0", "ring_tx", 4096, 1024, "tuning.nic.eth0")
    bad = Setting("nic:eth3", "ring_rx", 256, None, "tuning.nic.eth3",
                  "eth3: driver veth does not support ring buffer changes")
    gpu = Setting("gpu:0", "power_limit_watts", 600, 700, "tuning.gpu")
    assert checks_for("intel_iommu_on", settings=[ok, gpu])["nic"].status == "pass"
    assert checks_for("intel_iommu_on", settings=[ok, drift])["nic"].status == "warn"
    r = checks_for("intel_iommu_on", settings=[ok, drift, bad])["nic"]
    assert r.status == "fail" and "driver veth does not support" in r.message
    assert checks_for("intel_iommu_on")["nic"].status == "pass"   # nothing configured


def test_all_checks_and_view_fit_100_columns():
    gpus = [GpuReading(0, persistence_mode=False)]
    results = run_checks(parse('[checks]\niommu = "passthrough"\n'), facts("disabled"), gpus,
                         "535.86.10", "12.1", [])
    assert [r.name for r in results] == ["kernel", "driver", "cuda", "iommu", "persistence",
                                         "nic"]
    assert checks_severity(results) == Severity.CRIT
    text = format_checks(results)
    assert all(len(line) <= 100 for line in text.splitlines()), text
    assert "FAIL  iommu" in text and "fix: add intel_iommu=on iommu=pt" in text
    assert checks_severity([r for r in results if r.status != "fail"]) == Severity.WARN


def test_odd_sysfs_content_never_crashes_and_stray_entries_are_not_groups(tmp_path):
    root = tmp_path / "root"
    for d in ("proc/sys/kernel", "sys/class/iommu/dmar0", "sys/class/net/eth9",
              "sys/kernel/iommu_groups/0", "sys/kernel/iommu_groups/1",
              "sys/kernel/iommu_groups/stale"):
        (root / d).mkdir(parents=True)
    (root / "proc/cmdline").write_bytes(b'ro quiet = "x\x00y iommu=pt\xff --\n')
    (root / "proc/sys/kernel/osrelease").write_text("")
    (root / "proc/cpuinfo").write_bytes(b"\x00\xfe garbage without a vendor line\n")
    (root / "sys/kernel/iommu_groups/0/type").write_text("identity\n")
    (root / "sys/kernel/iommu_groups/1/type").write_text("identity")
    (root / "sys/kernel/iommu_groups/stale/type").write_text("DMA\n")   # not a group
    (root / "sys/class/net/eth9/device").write_text("a file, not a link")
    f = HostProbe(str(root)).facts()
    assert f.kernel_release is None and f.cpu_vendor == "other"
    assert f.iommu_groups == 2 and f.iommu_mode == "passthrough"
    assert [n.name for n in f.nics] == ["eth9"] and f.nics[0].driver is None
    results = run_checks(parse(""), f, [], None, None, [])
    assert [r.status for r in results][:3] == ["warn", "warn", "warn"]
    assert all(len(line) <= 100 for line in format_checks(results).splitlines())
