"""Node-level kernel faults in the judge: NVSwitch SXids (fatal CRIT sticky, non-fatal WARN for
10 minutes, the Fabric Manager guide's no-impact and always-fatal codes), the driver's "API
mismatch", and MIG Xid lines on their GPU."""
from __future__ import annotations

from gpucostd.health.judge import XID_FINDING_TTL_SECONDS
from gpucostd.probes.kernel_log import NvrmParser
from gpucostd.snapshot import Severity

from test_health import boot, clock, gpu, make, step  # noqa: F401 (fixtures)


def faults(clock, *lines):
    p = NvrmParser(clock=clock)
    out = []
    for line in lines:
        out.extend(p.feed(line))
    return out


def node(r):
    return {f.code: f for f in r.findings if f.subject == "node"}


def test_sxid_fatal_is_sticky_crit_and_non_fatal_warn_expires(tmp_path, clock, boot):
    j = make(tmp_path, clock, boot)
    step(j, clock, [gpu(0)])
    r = step(j, clock, [gpu(0)], faults(
        clock, "nvidia-nvswitch0: SXid (PCI:0000:05:00.0): 20034, Fatal, Link 30 LTSSM Fault Up",
        "nvidia-nvswitch3: SXid (PCI:0000:07:00.0): 20001, Non-fatal, Link 2 TX replay",
        "nvidia-nvswitch3: SXid (PCI:0000:07:00.0): 11012, Non-fatal, single-bit ECC corrected",
        "nvidia-nvswitch1: SXid (PCI:0000:06:00.0): 23001, Fatal, Link 4 always fatal"))
    f = node(r)
    assert f["sxid_20034"].severity == Severity.CRIT and "sticky" in f["sxid_20034"].message
    assert "NVSwitch 0 (0000:05:00.0)" in f["sxid_20034"].message
    assert f["sxid_20001"].severity == Severity.WARN
    assert f["sxid_11012"].severity == Severity.OK           # corrected, no impact
    assert f["sxid_23001"].action.startswith("reboot")        # always fatal to the fabric
    assert r.node_health == Severity.CRIT and r.gpu_health[0] == Severity.OK
    evs = [e for e in r.events if e.code == "sxid"]
    assert len(evs) == 4 and all(e.subject == "node" and e.xid is None for e in evs)
    # 10 minutes later the non-fatal ones are gone, the fatal ones stay
    clock.advance(XID_FINDING_TTL_SECONDS + 1)
    f = node(step(j, clock, [gpu(0)]))
    assert set(f) == {"sxid_20034", "sxid_23001"}
    j.commit()
    # a restart keeps the sticky ones; ack clears one
    j2 = make(tmp_path, clock, boot)
    assert set(node(step(j2, clock, [gpu(0)]))) == {"sxid_20034", "sxid_23001"}
    assert [e.fields["cleared"] for e in j2.ack("node", "sxid_20034")] == ["sxid_20034"]
    assert set(node(step(j2, clock, [gpu(0)]))) == {"sxid_23001"}


# The SOE's reports as the driver prints them (NVSWITCH_PRINT_SXID with no severity word; open-gpu-
# kernel-modules src/common/nvswitch/kernel/ls10/soe_ls10.c): complete reports, judged fatal.
SOE_LINES = {
    26006: "nvidia-nvswitch2: SXid (PCI:0004:00:00.0): 26006, SOE HALTED",
    26007: "nvidia-nvswitch1: SXid (PCI:0004:00:00.0): 26007, SOE EXTERR",
    26008: "nvidia-nvswitch0: SXid (PCI:0004:00:00.0): 26008, SOE Watchdog error",
}


def test_soe_sxids_without_a_severity_word_are_sticky_crit_faults(tmp_path, clock, boot):
    found = faults(clock, *SOE_LINES.values())
    assert [(f.sxid, f.fatal, f.pci_bus_id) for f in found] == [
        (c, True, "0004:00:00.0") for c in SOE_LINES]
    assert found[2].message == "SOE Watchdog error" and found[2].switch == 0
    j = make(tmp_path, clock, boot)
    step(j, clock, [gpu(0)])
    r = step(j, clock, [gpu(0)], found)
    f = node(r)
    for code in SOE_LINES:
        got = f[f"sxid_{code}"]
        assert got.severity == Severity.CRIT and "sticky" in got.message
        assert got.action.startswith("reset the NVSwitch")
    assert "SOE watchdog fired" in f["sxid_26008"].message
    assert r.node_health == Severity.CRIT and r.gpu_health[0] == Severity.OK
    clock.advance(XID_FINDING_TTL_SECONDS + 1)
    assert {f"sxid_{c}" for c in SOE_LINES} <= set(node(step(j, clock, [gpu(0)])))


def test_other_complete_reports_without_a_word_io_failure_and_cable_controller(
        tmp_path, clock, boot):
    # soe/io paths (IO failure: a register read of 0xBADF....) and cci_ls10.c of the same source
    found = faults(clock, "nvidia-nvswitch1: SXid (PCI:0005:00:00.0): 10007, IO failure",
                   "nvidia-nvswitch1: SXid (PCI:0005:00:00.0): 27002, Failed to init CCI(0)",
                   "nvidia-nvswitch1: SXid (PCI:0005:00:00.0): 27005, Module 3 access error")
    assert [(f.sxid, f.fatal) for f in found] == [(10007, True), (27002, False), (27005, False)]
    j = make(tmp_path, clock, boot)
    step(j, clock, [gpu(0)])
    f = node(step(j, clock, [gpu(0)], found))
    assert f["sxid_10007"].severity == Severity.CRIT and "sticky" in f["sxid_10007"].message
    assert "IO failure" in f["sxid_10007"].message
    assert f["sxid_27005"].severity == Severity.WARN
    assert f["sxid_27005"].action.startswith("check and reseat the OSFP modules")
    assert "OSFP module access error" in f["sxid_27005"].message


def test_sxid_follow_up_lines_without_a_word_stay_uncounted(clock):
    # the second and third lines of one report (other codes) carry no word: not counted again
    assert faults(clock, "nvidia-nvswitch3: SXid (PCI:0000:05:00.0): 12028, Severity 0 Engine "
                         "instance 32 Sub-engine instance 00",
                  "nvidia-nvswitch3: SXid (PCI:0000:05:00.0): 12028, Data {0x00000000, "
                  "0x00000000}") == []


def test_api_mismatch_is_a_node_crit_once(tmp_path, clock, boot):
    j = make(tmp_path, clock, boot)
    lines = ("NVRM: API mismatch: the client has the version 535.171.04, but",
             "NVRM: this kernel module has the version 535.161.07.  Please",
             "NVRM: make sure that this kernel module and all NVIDIA driver",
             "NVRM: components have the same version.")
    r = step(j, clock, [gpu(0)], faults(clock, *lines))
    f = node(r)["driver_mismatch"]
    assert f.severity == Severity.CRIT and "535.171.04" in f.message and "535.161.07" in f.message
    assert "reboot" in f.action
    (ev,) = [e for e in r.events if e.code == "driver_mismatch"]
    assert ev.fields["module_version"] == "535.161.07"
    r = step(j, clock, [gpu(0)], faults(clock, *lines))      # every client prints it again
    assert "driver_mismatch" in node(r) and not [e for e in r.events
                                                 if e.code == "driver_mismatch"]
    assert [e.fields["cleared"] for e in j.ack("node", "driver_mismatch")] == ["driver_mismatch"]


def test_mig_xid_lands_on_its_gpu_and_names_the_instance(tmp_path, clock, boot):
    j = make(tmp_path, clock, boot)
    step(j, clock, [gpu(0), gpu(1)])
    r = step(j, clock, [gpu(0), gpu(1)], faults(
        clock, "NVRM: Xid (PCI:0000:43:00 GPU-I:05 GPU-CI:01): 13, pid=12, name=python3, "
               "Graphics SM Warp Exception"))
    (f,) = [f for f in r.findings if f.code == "xid_13"]
    assert f.subject == "gpu:1" and "MIG GPU instance 5, compute instance 1" in f.message
    (ev,) = [e for e in r.events if e.code == "xid"]
    assert ev.gpu == 1 and "(MIG GPU instance 5, compute instance 1)" in ev.message
    assert (ev.fields["gpu_instance"], ev.fields["compute_instance"]) == (5, 1)
