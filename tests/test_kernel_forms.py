"""Kernel line forms from real hosts (tests/fixtures/kernel/nvrm-real.txt, each with its source):
MIG lines name the GPU and compute instance, NVSwitch SXid lines become SwitchFaults, PCI domains
other than 0000 and syslog/dmesg prefixes parse, the multi-line "fallen off the bus" is one Xid 79."""
from __future__ import annotations

from pathlib import Path

import pytest

from gpucostd.probes.kernel_log import DriverMismatch, KernelFault, NvrmParser, SwitchFault

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "kernel" / "nvrm-real.txt"

# distinctive piece of a line -> what feeding it yields (None: nothing)
EXPECTED = {
    "GPU-I:05): 94": ("xid", 94, "0000:01:00.0", 5, None),
    "(PCI:0000:01:00): 94": ("xid", 94, "0000:01:00.0", None, None),
    "GPU-I:01 GPU-CI:02): 13": ("xid", 13, "0000:3b:00.0", 1, 2),
    "(PCI:0000:dc:00): 45": ("xid", 45, "0000:dc:00.0", None, None),
    "RmInitAdapter failed": None,
    "(PCI:0019:01:00): 149": ("xid", 149, "0019:01:00.0", None, None),
    "(PCI:0000:00:00): 149": ("xid", 149, "0000:00:00.0", None, None),
    "The NVIDIA GPU 0000:b3:00.0": None,
    "(PCI ID: 10de:26b5)": None,
    "not responding to commands": ("xid", 79, "0000:b3:00.0", None, None),
    "probe routine failed": None,
    "12028, Non-fatal": ("sxid", 12028, "0000:05:00.0", 3, False),
    "20034, Fatal": ("sxid", 20034, "0000:00:00.0", 0, True),
    "20034, Severity 1": None,
    "12028, Data {": None,
    # API mismatch: the fault comes with the line that completes both versions
    "client has the version 367.44, but": None,
    "module has the version 367.35": ("mismatch", "367.44", "367.35", None),
    "   NVRM: make sure that this kernel module": None,
    "   NVRM: components have the same version.": None,
    "535.54.03, but#012": ("mismatch", "535.54.03", "530.30.02", None),
    "client 'nvidia-powerd' (pid 849)": None,
    "has the version 570.133.07, but": None,
    "the version 575.51.02.": ("mismatch", "570.133.07", "575.51.02", "nvidia-powerd"),
    "   NVRM: kernel module and all NVIDIA driver components": None,
    "   NVRM: have the same version.": None,
}


def fixture_lines():
    out = []
    for line in FIXTURE.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            out.append(line)
    return out


def describe(f):
    if isinstance(f, DriverMismatch):
        return ("mismatch", f.client_version, f.module_version, f.process_name)
    if isinstance(f, SwitchFault):
        return ("sxid", f.sxid, f.pci_bus_id, f.switch, f.fatal)
    assert isinstance(f, KernelFault)
    return ("xid", f.xid, f.pci_bus_id, f.gpu_instance, f.compute_instance)


def test_fixture_names_a_source_for_every_group():
    groups = FIXTURE.read_text().split("\n\n")[1:]
    assert groups and all("# source:" in g for g in groups)


def test_every_real_line_yields_what_it_should():
    lines = fixture_lines()
    covered = set()
    p = NvrmParser()
    for line in lines:
        keys = [k for k in EXPECTED if k in line]
        assert len(keys) == 1, (line, keys)
        covered.add(keys[0])
        got = [describe(f) for f in p.feed(line)]
        want = EXPECTED[keys[0]]
        assert got == ([want] if want else []), line
    assert covered == set(EXPECTED)


def test_mig_line_keeps_the_message_and_process():
    (f,) = NvrmParser().feed("NVRM: Xid (PCI:0000:3b:00 GPU-I:01 GPU-CI:02): 13, pid=2291, "
                             "name=python3, Graphics SM Warp Exception")
    assert (f.process_name, f.message) == ("python3", "Graphics SM Warp Exception")
    (f,) = NvrmParser().feed("NVRM: Xid (PCI:0000:01:00 GPU-I:05): 94, pid=7194, Contained: "
                             "CE User Channel (0x9). RST: No, D-RST: No")
    assert f.message.startswith("Contained: CE User Channel")


def test_sxid_line_parts():
    (f,) = NvrmParser().feed("kernel: [123.456789] nvidia-nvswitch0: SXid (PCI:0000:c3:00.0): "
                             "20009, Non-fatal, Link 28 RX Short Error Rate")
    assert (f.sxid, f.fatal, f.switch, f.link, f.pci_bus_id) == (20009, False, 0, 28,
                                                                  "0000:c3:00.0")
    assert f.message == "Link 28 RX Short Error Rate"
    assert f.dedupe_key


@pytest.mark.parametrize("line", [
    "nvidia-nvswitch0: SXid (PCI:zz:00.0): 20034, Fatal, Link 30",
    "nvidia-nvswitch0: SXid (PCI:0000:00:00.0): , Fatal",
    "nvidia-nvswitch3: SXid (PCI:0000:c1:00.0): garbled, Fatal",
    "SXid" * 5000,
])
def test_bad_sxid_lines_yield_nothing(line):
    assert NvrmParser().feed(line) == []
