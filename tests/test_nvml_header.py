"""The simulator cannot drift from the real library: every simulated function is checked
against the real NVML header ``nvml.h`` from the PyPI package ``nvidia-nvml-dev`` (the wheel
ships it as nvidia/<cuXX>/include/nvml.h): the symbol exists and takes the same number of
arguments. The constants and struct layouts the simulator writes are checked too, and a full
gateway read on the simulator asks for no symbol the simulator lacks.

Skipped, with the reason, when nvidia-nvml-dev is not installed
(`pip install nvidia-nvml-dev`; the README's test command installs it)."""
from __future__ import annotations

import glob
import importlib.util
import os
import re
import sys
from typing import Dict, List, Optional

import pytest

from gpucostd.sim.nvml import (ENERGY_FIELDS, FIELD_VALUES, SYMBOLS, VIOLATION_FIELDS, FieldValue,
                              HEADER_CONSTANTS, PciInfo, SimulatedNode, Utilization, Value,
                              ViolationTime)


def find_header() -> Optional[str]:
    roots: List[str] = []
    spec = importlib.util.find_spec("nvidia")
    if spec is not None and spec.submodule_search_locations:
        roots.extend(spec.submodule_search_locations)
    for p in sys.path:
        roots.append(os.path.join(p, "nvidia"))
    for root in roots:
        hits = sorted(glob.glob(os.path.join(root, "*", "include", "nvml.h")))
        if hits:
            return hits[-1]
    return None


HEADER = find_header()
pytestmark = pytest.mark.skipif(
    HEADER is None,
    reason="nvml.h not found: install the PyPI package nvidia-nvml-dev "
           "(pip install nvidia-nvml-dev) to check the simulator against the real header")


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


def parse_declarations(text: str) -> Dict[str, List[int]]:
    """nvml function name -> argument counts of its declarations (`... DECLDIR nvmlX(...);`)."""
    decls: Dict[str, List[int]] = {}
    pat = re.compile(r"\bDECLDIR\s+(?:char\s*\*\s*)?(nvml\w+)\s*\(([^;{]*?)\)\s*;", re.S)
    for m in pat.finditer(_strip_comments(text)):
        args = m.group(2).strip()
        if args in ("", "void"):
            n = 0
        else:
            depth, n = 0, 1
            for ch in args:
                if ch == "(":
                    depth += 1
                elif ch == ")":
                    depth -= 1
                elif ch == "," and depth == 0:
                    n += 1
        decls.setdefault(m.group(1), []).append(n)
    return decls


def parse_constants(text: str) -> Dict[str, int]:
    consts: Dict[str, int] = {}
    body = _strip_comments(text)
    for m in re.finditer(r"^\s*#define\s+(NVML_\w+)\s+\(?(0x[0-9A-Fa-f]+|\d+)[uUlL]*\)?\s*$",
                         body, re.M):
        consts.setdefault(m.group(1), int(m.group(2), 0))
    for m in re.finditer(r"^\s*(NVML_\w+)\s*=\s*(0x[0-9A-Fa-f]+|\d+)\s*,?\s*$", body, re.M):
        consts.setdefault(m.group(1), int(m.group(2), 0))
    # aliases: #define NVML_FI_DEV_CLOCKS_EVENT_REASON_SW_POWER_CAP NVML_FI_DEV_PERF_POLICY_POWER
    for m in re.finditer(r"^\s*#define\s+(NVML_\w+)\s+\(?(NVML_\w+)\)?\s*$", body, re.M):
        if m.group(2) in consts:
            consts.setdefault(m.group(1), consts[m.group(2)])
    return consts


def parse_struct_fields(text: str, typedef: str) -> List[str]:
    body = _strip_comments(text)
    m = re.search(r"\{([^{}]*)\}\s*" + re.escape(typedef) + r"\s*;", body)
    assert m, f"{typedef} not found in nvml.h"
    names = []
    for decl in m.group(1).split(";"):
        decl = decl.strip()
        if not decl:
            continue
        fm = re.search(r"(\w+)\s*(\[[^\]]*\])?\s*$", decl)
        names.append(fm.group(1))
    return names


@pytest.fixture(scope="module")
def header_text() -> str:
    with open(HEADER, encoding="utf-8", errors="replace") as fh:
        return fh.read()


def test_header_parses(header_text):
    decls = parse_declarations(header_text)
    assert len(decls) > 300, f"only {len(decls)} declarations parsed from {HEADER}"
    assert decls["nvmlDeviceGetTemperatureThreshold"] == [3]


def test_every_simulated_symbol_is_declared_with_the_same_argument_count(header_text):
    decls = parse_declarations(header_text)
    problems = []
    for name, (_restype, argtypes) in sorted(SYMBOLS.items()):
        if name not in decls:
            problems.append(f"{name}: not declared in {HEADER}")
        elif len(argtypes) not in decls[name]:
            problems.append(f"{name}: simulator takes {len(argtypes)} argument(s), nvml.h "
                            f"declares {decls[name]}")
    assert not problems, "\n".join(problems)


def test_constants_match_the_header(header_text):
    consts = parse_constants(header_text)
    problems = [f"{name}: simulator {value}, nvml.h {consts.get(name)}"
                for name, value in HEADER_CONSTANTS.items() if consts.get(name) != value]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("cls,typedef", [
    (PciInfo, "nvmlPciInfo_t"), (Utilization, "nvmlUtilization_t"),
    (ViolationTime, "nvmlViolationTime_t"), (FieldValue, "nvmlFieldValue_t"),
    (Value, "nvmlValue_t")])
def test_struct_layouts_match_the_header(header_text, cls, typedef):
    assert [f[0] for f in cls._fields_] == parse_struct_fields(header_text, typedef)


def test_a_full_gateway_read_uses_only_simulated_symbols():
    from gpucostd.clock import VirtualClock
    from gpucostd.hw.nvml import NvmlGateway
    from gpucostd.probes.gpu import GpuProbe
    node = SimulatedNode("builtin:h100x8", VirtualClock())
    gw = NvmlGateway(library=node.library, clock=node.clock)
    try:
        assert gw.ensure_initialized(), gw.error
        GpuProbe(gw).read()
        gw.set_power_limit(0, 600)
        gw.set_persistence_mode(0, True)
        gw.get_power_limit(0)
        gw.get_persistence_mode(0)
        gw.get_power_limit_constraints(0)
        gw.get_default_power_limit(0)
    finally:
        gw.shutdown()
    assert node.missing == set(), f"the gateway asked for unsimulated symbols: {node.missing}"
    assert set(node.calls) <= set(SYMBOLS)


def test_the_alias_form_of_a_define_is_parsed():
    consts = parse_constants("#define NVML_A 74\n#define NVML_B NVML_A //!< same counter\n")
    assert consts == {"NVML_A": 74, "NVML_B": 74}


def test_gateway_field_ids_match_the_header(header_text):
    """Every field id the gateway asks nvmlDeviceGetFieldValues for is the value of the
    NVML_FI_* macro it names, and below NVML_FI_MAX of this header."""
    from gpucostd.hw.nvml_fields import FIELDS
    consts = parse_constants(header_text)
    problems = [f"{f.reading}: {f.nvml_name} = {f.field_id} in the gateway, "
                f"{consts.get(f.nvml_name)} in nvml.h"
                for f in FIELDS if consts.get(f.nvml_name) != f.field_id]
    assert not problems, "\n".join(problems)
    assert all(0 < f.field_id < consts["NVML_FI_MAX"] for f in FIELDS)


def test_every_gateway_field_is_simulated_with_the_same_name():
    from gpucostd.hw.nvml_fields import FIELDS
    simulated = {fid: spec[0] for fid, spec in FIELD_VALUES.items()}
    simulated.update({fid: spec[0] for fid, spec in VIOLATION_FIELDS.items()})
    simulated.update({fid: spec[0] for fid, spec in ENERGY_FIELDS.items()})
    assert {f.field_id: f.nvml_name for f in FIELDS} == \
        {fid: name for fid, name in simulated.items() if fid in {f.field_id for f in FIELDS}}
    missing = [f.nvml_name for f in FIELDS if f.field_id not in simulated]
    assert not missing, f"the simulator does not answer {missing}"


def test_the_deprecated_violation_call_is_marked_so_in_the_header(header_text):
    """The reason for the field values: nvml.h deprecates nvmlDeviceGetViolationStatus and
    names the replacement field of every policy the gateway still reads the old way."""
    from gpucostd.hw.nvml_fields import FIELDS, VIOLATION_PREFIX
    from gpucostd.snapshot import VIOLATION_POLICIES
    m = re.search(r"@deprecated(.*?)\*/\s*DEPRECATED\([\d.]+\)\s*nvmlReturn_t\s+DECLDIR\s+"
                  r"nvmlDeviceGetViolationStatus", header_text, re.S)
    assert m, "nvmlDeviceGetViolationStatus is no longer marked deprecated: re-check the table"
    translations = dict(re.findall(r"(NVML_PERF_POLICY_\w+)\s*->\s*(NVML_FI_\w+)", m.group(1)))
    consts = parse_constants(header_text)
    policy_names = {v: k for k, v in consts.items() if k.startswith("NVML_PERF_POLICY_")}
    by_reading = {f.reading: f.nvml_name for f in FIELDS}
    for key, policy in VIOLATION_POLICIES:
        if policy is None or key == "thermal":   # thermal: split into SW and HW fields
            continue
        replacement = translations[policy_names[policy]]
        assert consts[by_reading[VIOLATION_PREFIX + key]] == consts[replacement], key
