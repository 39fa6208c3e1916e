"""NVLink5 Xids 144-150 (Blackwell): the verdict from the line's intrInfo and errorStatus.

NVIDIA's catalog buckets all seven as WORKFLOW_NVLINK5_ERR: the immediate action comes from its
"XID 144-150 Decode" sheet, matched on the two registers the line carries, e.g.

    NVRM: Xid (PCI:0009:01:00): 149, NETIR_LINK_EVT  Fatal   XC0 i0 Link 01 (0x021425c6 0x00000000 ...)
    NVRM: Xid (PCI:0018:01:00): 145, RLW_RXPIPE Nonfatal XC0 i0 Link 13 (0x0409a0c2 0x00000008 ...)

The first value in the parentheses is intrInfo, the second errorStatus. A decode row gives a
32-bit mask for intrInfo (MSB first, "-" = any bit) in two layouts, V1 (drivers before R575:
unit in bits 9:5) and V2 (R575 and later: unit in bits 6:0), and the errorStatus it applies to.
A row matches when intrInfo fits either mask and errorStatus is equal; where rows of the printed
sub-unit match they are preferred, and of several matches the worst verdict wins. Rows marked
"Action 2" (Xid 145 RLW_RXPIPE 0x1/0x2/0x4) are promoted to their second bucket when V1 bit 10
(V2 bit 7) of intrInfo is set, as NVIDIA's second mask says.

When no row matches (a newer driver, a line without registers), the printed word decides: a
"Fatal" line is CRIT "reset GPU", a "Nonfatal" one WARN (a non-fatal link event is not a reset).

ROWS below are NVIDIA's decode sheet as data (facts: Xid, unit, masks, errorStatus, immediate
bucket, action-2 bucket, investigatory bucket, severity column), from the catalog spreadsheet
https://docs.nvidia.com/Xid-Catalog.xlsx as of 2025-10-29 (see xid_catalog.toml).
"""
from __future__ import annotations

import re
from typing import List, NamedTuple, Optional, Tuple

ROWS = (
    "144|SAW_MVB|------000000----------0000100001|------000000-------------0000001|0x00000001|IGNORE||CONTACT_SUPPORT|Non-fatal",
    "144|SAW_MVB|------000000----------0000100001|------000000-------------0000001|0x00000002|RESET_GPU||CONTACT_SUPPORT|Fatal",
    "144|SAW_MVB|------000000----------0000100001|------000000-------------0000001|0x00000004|IGNORE||IGNORE|Non-fatal",
    "144|SAW_MVB|------000000----------0000100001|------000000-------------0000001|0x00000008|IGNORE||CONTACT_SUPPORT|Non-fatal",
    "144|SAW_MVB|------000000----------0000100001|------000000-------------0000001|0x00000010|RESET_GPU||CONTACT_SUPPORT|Fatal",
    "144|SAW_MVB|------000000----------0000100001|------000000-------------0000001|0x00000020|IGNORE||IGNORE|Non-fatal",
    "145|RLW_CTRL|------000000----------0001100010|------000000-------------0000011|0x80000000|IGNORE||CONTACT_SUPPORT|Non-fatal",
    "145|RLW_REMAP|------000000----------0010000010|------000000-------------0000100|0x00000001|XID_154_EVAL||CONTACT_SUPPORT|Non-fatal",
    "145|RLW_REMAP|------000000----------0010000010|------000000-------------0000100|0x00000002|XID_154_EVAL||CONTACT_SUPPORT|Non-fatal",
    "145|RLW_REMAP|------000000----------0010000010|------000000-------------0000100|0x00000004|XID_154_EVAL||CHECK_NVLINK_FAILURE_FLOW|Non-fatal",
    "145|RLW_REMAP|------000000----------0010000010|------000000-------------0000100|0x00000008|XID_154_EVAL||CHECK_NVLINK_FAILURE_FLOW|Non-fatal",
    "145|RLW_REMAP|------000000----------0010000010|------000000-------------0000100|0x00000010|XID_154_EVAL||CHECK_NVLINK_FAILURE_FLOW|Non-fatal",
    "145|RLW_REMAP|------000000----------0010000010|------000000-------------0000100|0x00000020|XID_154_EVAL||CHECK_NVLINK_FAILURE_FLOW|Non-fatal",
    "145|RLW_REMAP|------000000----------0010000010|------000000-------------0000100|0x00000040|RESET_GPU||CONTACT_SUPPORT|Fatal",
    "145|RLW_REMAP|------000000----------0010000010|------000000-------------0000100|0x00000080|RESET_GPU||CONTACT_SUPPORT|Fatal",
    "145|RLW_REMAP|------000000----------0010000010|------000000-------------0000100|0x00000100|IGNORE||IGNORE|Non-fatal",
    "145|RLW_REMAP|------000000----------0010000010|------000000-------------0000100|0x00000200|IGNORE||IGNORE|Non-fatal",
    "145|RLW_REMAP|------000000----------0010000010|------000000-------------0000100|0x80000000|IGNORE||CONTACT_SUPPORT|Non-fatal",
    "145|RLW_RSPCOL|------000000----------0010100010|------000000-------------0000101|0x00000001|IGNORE||IGNORE|Non-fatal",
    "145|RLW_RSPCOL|------000000----------0010100010|------000000-------------0000101|0x00000002|RESET_GPU||CONTACT_SUPPORT|Fatal",
    "145|RLW_RSPCOL|------000000----------0010100010|------000000-------------0000101|0x80000000|IGNORE||CONTACT_SUPPORT|Non-fatal",
    "145|RLW_RXPIPE|------000000---------00011000010|------000000------------00000110|0x00000001|IGNORE|RESET_GPU|CONTACT_SUPPORT|Non-fatal*",
    "145|RLW_RXPIPE|------000000---------00011000010|------000000------------00000110|0x00000002|IGNORE|RESET_GPU|CONTACT_SUPPORT|Non-fatal*",
    "145|RLW_RXPIPE|------000000---------00011000010|------000000------------00000110|0x00000004|IGNORE|RESET_GPU|CONTACT_SUPPORT|Non-fatal*",
    "145|RLW_RXPIPE|------000000----------0011000010|------000000-------------0000110|0x00000008|IGNORE||CONTACT_SUPPORT|Non-fatal",
    "145|RLW_RXPIPE|------000000----------0011000010|------000000-------------0000110|0x80000000|IGNORE||CONTACT_SUPPORT|Non-fatal",
    "145|RLW_SRC_TRACK|------000000----------0011100010|------000000-------------0000111|0x00000001|RESET_GPU||CONTACT_SUPPORT|Fatal",
    "145|RLW_SRC_TRACK|------000000----------0011100010|------000000-------------0000111|0x00000002|IGNORE||IGNORE|Non-fatal",
    "145|RLW_SRC_TRACK|------000000----------0011100010|------000000-------------0000111|0x00000004|XID_154_EVAL||IGNORE|Non-fatal",
    "145|RLW_SRC_TRACK|------000000----------0011100010|------000000-------------0000111|0x00000008|XID_154_EVAL||IGNORE|Non-fatal",
    "145|RLW_SRC_TRACK|------000000----------0011100010|------000000-------------0000111|0x00000010|RESET_GPU||CONTACT_SUPPORT|Fatal",
    "145|RLW_SRC_TRACK|------000000----------0011100010|------000000-------------0000111|0x00000020|RESET_GPU||CONTACT_SUPPORT|Fatal",
    "145|RLW_SRC_TRACK|------000000----------0011100010|------000000-------------0000111|0x80000000|IGNORE||CONTACT_SUPPORT|Non-fatal",
    "145|RLW_TAGSTATE|------000000----------0100000010|------000000-------------0001000|0x00000001|IGNORE||IGNORE|Non-fatal",
    "145|RLW_TAGSTATE|------000000----------0100000010|------000000-------------0001000|0x00000002|RESET_GPU||CONTACT_SUPPORT|Fatal",
    "145|RLW_TAGSTATE|------000000----------0100000010|------000000-------------0001000|0x00010000|IGNORE||IGNORE|Non-fatal",
    "145|RLW_TAGSTATE|------000000----------0100000010|------000000-------------0001000|0x00020000|RESET_GPU||CONTACT_SUPPORT|Fatal",
    "145|RLW_TAGSTATE|------000000----------0100000010|------000000-------------0001000|0x00100000|RESET_GPU||CONTACT_SUPPORT|Fatal",
    "145|RLW_TAGSTATE|------000000----------0100000010|------000000-------------0001000|0x80000000|IGNORE||CONTACT_SUPPORT|Non-fatal",
    "146|TLW_CTRL|------000000----------0100100011|------000000-------------0001001|0x00000001|IGNORE||IGNORE|Non-fatal",
    "146|TLW_CTRL|------000000----------0100100011|------000000-------------0001001|0x00000002|IGNORE||CONTACT_SUPPORT|Non-fatal",
    "146|TLW_CTRL|------000000----------0100100011|------000000-------------0001001|0x00000004|RESET_GPU||CONTACT_SUPPORT|Fatal",
    "146|TLW_CTRL|------000000----------0100100011|------000000-------------0001001|0x80000000|IGNORE||CONTACT_SUPPORT|Non-fatal",
    "146|TLW_RX/TLW_RX_PIPE0|------000000----------0101000011|------000000-------------0001010|0x00000001|IGNORE||IGNORE|Non-fatal",
    "146|TLW_RX/TLW_RX_PIPE0|------000000----------0101000011|------000000-------------0001010|0x00000002|IGNORE||CONTACT_SUPPORT|Non-fatal",
    "146|TLW_RX/TLW_RX_PIPE0|------000000----------0101000011|------000000-------------0001010|0x00000004|RESET_GPU||CONTACT_SUPPORT|Fatal",
    "146|TLW_RX/TLW_RX_PIPE0|------000000----------0101000011|------000000-------------0001010|0x80000000|IGNORE||CONTACT_SUPPORT|Non-fatal",
    "146|TLW_RX/TLW_RX_PIPE1|------000000----------0101000011|------000000-------------0001011|0x00000001|IGNORE||IGNORE|Non-fatal",
    "146|TLW_RX/TLW_RX_PIPE1|------000000----------0101000011|------000000-------------0001011|0x00000002|IGNORE||CONTACT_SUPPORT|Non-fatal",
    "146|TLW_RX/TLW_RX_PIPE1|------000000----------0101000011|------000000-------------0001011|0x00000004|RESET_GPU||CONTACT_SUPPORT|Fatal",
    "146|TLW_RX/TLW_RX_PIPE1|------000000----------0101000011|------000000-------------0001011|0x80000000|IGNORE||CONTACT_SUPPORT|Non-fatal",
    "146|TLW_TX/TLW_TX_PIPE0|------000000----------0101100011|------000000-------------0001100|0x00000001|IGNORE||IGNORE|Non-fatal",
    "146|TLW_TX/TLW_TX_PIPE0|------000000----------0101100011|------000000-------------0001100|0x00000002|IGNORE||CONTACT_SUPPORT|Non-fatal",
    "146|TLW_TX/TLW_TX_PIPE0|------000000----------0101100011|------000000-------------0001100|0x00000004|RESET_GPU||CONTACT_SUPPORT|Fatal",
    "146|TLW_TX/TLW_TX_PIPE0|------000000----------0101100011|------000000-------------0001100|0x80000000|IGNORE||CONTACT_SUPPORT|Non-fatal",
    "146|TLW_TX/TLW_TX_PIPE1|------000000----------0101100011|------000000-------------0001101|0x00000001|IGNORE||IGNORE|Non-fatal",
    "146|TLW_TX/TLW_TX_PIPE1|------000000----------0101100011|------000000-------------0001101|0x00000002|IGNORE||CONTACT_SUPPORT|Non-fatal",
    "146|TLW_TX/TLW_TX_PIPE1|------000000----------0101100011|------000000-------------0001101|0x00000004|RESET_GPU||CONTACT_SUPPORT|Fatal",
    "146|TLW_TX/TLW_TX_PIPE1|------000000----------0101100011|------000000-------------0001101|0x80000000|IGNORE||CONTACT_SUPPORT|Non-fatal",
    "147|TREX|------000000----------0110000100|------000000-------------0001110|0x00000001|IGNORE||CONTACT_SUPPORT|Non-fatal",
    "147|TREX|------000000----------0110000100|------000000-------------0001110|0x80000000|IGNORE||CONTACT_SUPPORT|Non-fatal",
    "148|NVLPW_CTRL/NVLPW|------000000----------0000000101|------000000-------------0001111|0x80000000|IGNORE||CONTACT_SUPPORT|Non-fatal",
    "149|NETIR/NETIR_INT|------000000----------0000000110|------000000-------------0011000|0x00000000|RESET_GPU||SYMPATHETIC_REPORT_SOLO|Link Fatal",
    "149|NETIR_BER_EVENT|------000000----------1000100110|------000000-------------0010011|0x00000000|IGNORE||INVESTIGATE_LINK_SI_AND_CABLES|Non-fatal",
    "149|NETIR_BER_EVENT|------000000----------1000100110|------000000-------------0010011|0x00000001|IGNORE||INVESTIGATE_LINK_SI_AND_CABLES|Non-fatal",
    "149|NETIR_BER_EVENT|------000000----------1000100110|------000000-------------0010011|0x00000002|IGNORE||INVESTIGATE_LINK_SI_AND_CABLES|Non-fatal",
    "149|NETIR_BER_EVENT|------000000----------1000100110|------000000-------------0010011|0x00000003|IGNORE||INVESTIGATE_LINK_SI_AND_CABLES|Non-fatal",
    "149|NETIR_LINK_EVT/NETIR_LINK_DOWN|------000000----------0111000110|------000000-------------0010001|0x00000000|RESET_GPU||SYMPATHETIC_REPORT_SOLO|Link Fatal",
    "149|NETIR_LINK_EVT/NETIR_LINK_DOWN|------000001----------0111000110|------000001-------------0010001|0x00000000|RESET_GPU||REPORT_ISSUE (if seen >1 per day)|Link Fatal",
    "149|NETIR_LINK_EVT/NETIR_LINK_DOWN|------000010----------0111000110|------000010-------------0010001|0x00000000|RESET_GPU||INVESTIGATE_LINK_SI|Link Fatal",
    "149|NETIR_LINK_EVT/NETIR_LINK_DOWN|------000100----------0111000110|------000100-------------0010001|0x00000000|RESET_GPU||INVESTIGATE_LINK_SI|Link Fatal",
    "149|NETIR_LINK_EVT/NETIR_LINK_DOWN|------001010----------0111000110|------001010-------------0010001|0x00000000|RESET_GPU||INVESTIGATE_LINK_SI|Link Fatal",
    "149|NETIR_LINK_EVT/NETIR_LINK_DOWN|------001111----------0111000110|------001111-------------0010001|0x00000000|RESET_GPU||INVESTIGATE_SW_USER|Link Fatal",
    "149|NETIR_LINK_EVT/NETIR_LINK_DOWN|------010000----------0111000110|------010000-------------0010001|0x00000000|RESET_GPU||INVESTIGATE_SW_USER_LINK_SI|Link Fatal",
    "149|NETIR_LINK_EVT/NETIR_LINK_DOWN|------010001----------0111000110|------010001-------------0010001|0x00000000|RESET_GPU||INVESTIGATE_SW_USER|Link Fatal",
    "149|NETIR_LINK_EVT/NETIR_LINK_DOWN|------010010----------0111000110|------010010-------------0010001|0x00000000|RESET_GPU||INVESTIGATE_SW_USER_LINK_SI|Link Fatal",
    "149|NETIR_LINK_EVT/NETIR_LINK_DOWN|------010101----------0111000110|------010101-------------0010001|0x00000000|RESET_GPU||INVESTIGATE_PEER_DEVICE|Link Fatal",
    "149|NETIR_LINK_EVT/NETIR_LINK_DOWN|------010110----------0111000110|------010110-------------0010001|0x00000000|RESET_GPU||INVESTIGATE_SW_USER|Link Fatal",
    "149|NETIR_LINK_EVT/NETIR_LINK_DOWN|------100000----------0111000110|------100000-------------0010001|0x00000000|RESET_GPU||INVESTIGATE_PEER_DEVICE|Link Fatal",
    "149|NETIR_LINK_EVT/NETIR_LINK_DOWN|------100001----------0111000110|------100001-------------0010001|0x00000000|RESET_GPU||INVESTIGATE_PEER_DEVICE|Link Fatal",
    "149|NETIR_LINK_EVT/NETIR_LINK_DOWN|------100010----------0111000110|------100010-------------0010001|0x00000000|RESET_GPU||INVESTIGATE_PEER_DEVICE|Link Fatal",
    "149|NETIR_LINK_EVT/NETIR_LINK_DOWN|------100011----------0111000110|------100011-------------0010001|0x00000000|RESET_GPU||INVESTIGATE_PEER_DEVICE|Link Fatal",
    "149|NETIR_LINK_EVT/NETIR_LINK_DOWN|------100100----------0111000110|------100100-------------0010001|0x00000000|RESET_GPU||INVESTIGATE_PEER_DEVICE|Link Fatal",
    "149|NETIR_LINK_EVT/NETIR_LINK_DOWN|------100101----------0111000110|------100101-------------0010001|0x00000000|RESET_GPU||INVESTIGATE_PEER_DEVICE|Link Fatal",
    "149|NETIR_LINK_EVT/NETIR_LINK_DOWN|------100110----------0111000110|------100110-------------0010001|0x00000000|IGNORE||INVESTIGATE_SW/USER|Link Fatal",
    "149|NETIR_LINK_EVT/NETIR_LINK_DOWN|------101000----------0111000110|------101000-------------0010001|0x00000000|IGNORE||INVESTIGATE_HOST|Fatal",
    "149|NETIR_LINK_EVT/NETIR_LINK_DOWN|------101010----------0111000110|------101010-------------0010001|0x00000000|RESET_GPU||INVESTIGATE_LINK_SI_AND_CABLES|Link Fatal?",
    "149|NETIR_LINK_EVT/NETIR_LINK_DOWN|------101011----------0111000110|------101011-------------0010001|0x00000000|RESET_GPU||INVESTIGATE_LINK_SI_AND_CABLES|Link Fatal?",
    "149|NETIR_MFDE_EVENT|------000000----------1001000110|------000000-------------0010100|0x00000001|RESET_GPU||CONTACT_SUPPORT|Fatal**",
    "149|NETIR_MFDE_EVENT|------000000----------1001000110|------000000-------------0010100|0x00000003|IGNORE||IGNORE|Non-fatal",
    "149|NETIR_MFDE_EVENT|------000000----------1001000110|------000000-------------0010100|0x00000004|RESET_GPU||CONTACT_SUPPORT|Fatal**",
    "149|NETIR_MFDE_EVENT|------000000----------1001000110|------000000-------------0010100|0x00000005|RESET_GPU||CONTACT_SUPPORT|Fatal**",
    "149|NETIR_MFDE_EVENT|------000000----------1001000110|------000000-------------0010100|0x00000007|RESET_GPU||CONTACT_SUPPORT|Fatal**",
    "150|MSE_WATCHDOG|------000000----------0000000000|------000000-------------0000000|0x00000000|RESET_GPU||CONTACT_SUPPORT|Fatal",
    "150|MSE Degraded|------000000----------0000000000|------000000-------------0000000|0x00000000/0xFFFFFFFF|RESET_GPU||CONTACT_SUPPORT|Fatal",
)

_LINE_RE = re.compile(
    r"(?P<unit>[A-Za-z0-9_]+(?:/[A-Za-z0-9_]+)?)\s+(?P<word>Non-?fatal|Fatal)\b"
    r"(?:\s+XC(?P<xc>[01]))?(?:\s+i(?P<inj>[01]))?(?:\s+Link\s+(?P<link>-?\d+))?"
    r"(?:\s*\(\s*(?P<intr>0x[0-9a-fA-F]+)\s+(?P<status>0x[0-9a-fA-F]+))?", re.I)

# bucket -> (severity name, action, sticky); severity names as in xid.SEVERITIES
DECODED = {
    "IGNORE": ("info", "none", False),
    "RESET_GPU": ("crit", "reset GPU", True),
    "XID_154_EVAL": ("warn", "restart the application (follow Xid 154 if one came with it)",
                     False),
}
_RANK = {"info": 0, "warn": 1, "crit": 2}


class Rule(NamedTuple):
    xid: int
    units: Tuple[str, ...]
    v1: Tuple[int, int]          # (care mask, value)
    v2: Tuple[int, int]
    statuses: Tuple[int, ...]
    immediate: str
    action2: str
    investigatory: str
    severity: str


class Decoded(NamedTuple):
    unit: str
    fatal: Optional[bool]        # the printed word; None when absent
    link: Optional[int]
    intr_info: Optional[int]
    error_status: Optional[int]
    rule: Optional[Rule]         # the matched decode row
    bucket: str                  # the immediate bucket that applies ("" when undecoded)
    severity: str                # info | warn | crit
    action: str
    sticky: bool


def _mask(text: str) -> Tuple[int, int]:
    care = value = 0
    for ch in text.strip():
        care <<= 1
        value <<= 1
        if ch in "01":
            care |= 1
            value |= ch == "1"
    return care, value


def _rules() -> List[Rule]:
    out = []
    for row in ROWS:
        xid, unit, m1, m2, status, imm, a2, inv, sev = row.split("|")
        out.append(Rule(int(xid), tuple(u.strip().upper() for u in unit.split("/")),
                        _mask(m1), _mask(m2), tuple(int(s, 16) for s in status.split("/")),
                        imm, a2, inv, sev))
    return out


RULES = _rules()
_ACTION2_BIT = (1 << 10, 1 << 7)      # V1, V2: the bit NVIDIA's "decode for action 2" adds


def _fits(mask: Tuple[int, int], value: int) -> bool:
    return value & mask[0] == mask[1]


def _match(rule: Rule, intr: int) -> Optional[str]:
    """The bucket `rule` gives for `intr`, or None when it does not match."""
    for (care, val), bit in zip((rule.v1, rule.v2), _ACTION2_BIT):
        if _fits((care, val), intr):
            return rule.immediate
        if rule.action2 and care & bit and not val & bit and _fits((care, val | bit), intr):
            return rule.action2
    return None


def decode(xid: int, message: str) -> Optional[Decoded]:
    """The verdict for an NVLink5 Xid line's text (after the Xid number); None when the text
    has no "<unit> Fatal|Nonfatal" part to go on."""
    m = _LINE_RE.search(message or "")
    if m is None:
        return None
    unit = m.group("unit").upper()
    fatal = not m.group("word").lower().startswith("non")
    link = int(m.group("link")) if m.group("link") else None
    intr = int(m.group("intr"), 16) if m.group("intr") else None
    status = int(m.group("status"), 16) if m.group("status") else None
    found: List[Tuple[Rule, str]] = []
    if intr is not None and status is not None:
        for rule in RULES:
            if rule.xid != xid or status not in rule.statuses:
                continue
            bucket = _match(rule, intr)
            if bucket is not None:
                found.append((rule, bucket))
        named = [f for f in found if unit in f[0].units]
        found = named or found
    best: Optional[Tuple[Rule, str]] = None
    for rule, bucket in found:
        if bucket in DECODED and (best is None or _RANK[DECODED[bucket][0]] >
                                  _RANK[DECODED[best[1]][0]]):
            best = (rule, bucket)
    if best is not None:
        sev, action, sticky = DECODED[best[1]]
        return Decoded(unit, fatal, link, intr, status, best[0], best[1], sev, action, sticky)
    if fatal:
        return Decoded(unit, fatal, link, intr, status, None, "", "crit", "reset GPU", True)
    return Decoded(unit, fatal, link, intr, status, None, "", "warn",
                   "look the registers up in NVIDIA's XID 144-150 decode sheet", False)
