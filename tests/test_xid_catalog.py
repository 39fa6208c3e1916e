"""The shipped Xid catalog is NVIDIA's catalog as data, and lookup() says what the on-call
engineer needs (bucket table, deviations with reasons, NVLink5 decode, Xid 154)."""
from __future__ import annotations

from pathlib import Path

import pytest

from gpucostd.health import xid
from gpucostd.snapshot import Severity

NVIDIA = Path(__file__).resolve().parent / "fixtures" / "xid" / "nvidia_catalog.tsv"


def nvidia_rows():
    rows = {}
    for line in NVIDIA.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        code, mnemonic, immediate, investigatory, status = (line.split("\t") + [""] * 5)[:5]
        rows[int(code)] = (mnemonic, immediate, investigatory, status)
    return rows


def test_fixture_has_provenance_and_nvidias_whole_list():
    text = NVIDIA.read_text()
    assert text.startswith("# source: NVIDIA") and "analyzing-xid-catalog" in text
    rows = nvidia_rows()
    assert sorted(rows) == list(range(1, 173))
    assert sum(1 for r in rows.values() if r[3] == "used") > 100


def test_shipped_catalog_file_is_valid():
    # load_catalog validates every entry and raises CatalogError naming the entry otherwise
    entries = xid.load_catalog(xid.CATALOG_PATH)
    assert entries == dict(xid.catalog())


def test_catalog_has_every_xid_nvidia_lists_as_used_with_nvidias_buckets():
    cat = xid.catalog()
    missing = [c for c, r in nvidia_rows().items() if r[3] == "used" and c not in cat]
    assert not missing, f"Xids NVIDIA lists as used are missing from the catalog: {missing}"
    wrong = [(c, (cat[c].immediate, cat[c].investigatory), r[1:3])
             for c, r in nvidia_rows().items()
             if c in cat and (cat[c].immediate, cat[c].investigatory) != r[1:3]]
    assert not wrong, f"buckets differ from NVIDIA's: {wrong}"
    assert all(cat[c].used == (r[3] == "used") and cat[c].mnemonic == r[0]
               for c, r in nvidia_rows().items() if c in cat)


def test_the_check_fails_on_a_catalog_missing_a_used_xid(tmp_path):
    text = xid.CATALOG_PATH.read_text()
    start = text.index("[xid.79]")
    end = text.index("[xid.80]")
    short = tmp_path / "short.toml"
    short.write_text(text[:start] + text[end:])
    cat = xid.load_catalog(short)
    used = {c for c, r in nvidia_rows().items() if r[3] == "used"}
    assert used - set(cat) == {79}


def test_judgement_follows_the_bucket_table_unless_the_entry_says_why():
    for code, info in xid.catalog().items():
        bucket = xid.BUCKETS.get(info.immediate)
        derived = None if bucket is None else (xid.SEVERITIES[bucket.severity], bucket.action,
                                               bucket.sticky)
        if (info.severity, info.action, info.sticky) != derived:
            assert len(info.why) > 20, f"Xid {code} deviates from {info.immediate} without why"
            assert info.why in info.source
        else:
            assert not info.why, f"Xid {code} has a why but does not deviate"


def test_every_immediate_bucket_in_nvidias_list_is_in_the_table():
    used = {r[1] for r in nvidia_rows().values() if r[1]}
    assert used <= set(xid.BUCKETS)


@pytest.mark.parametrize("code,severity,action,sticky", [
    (79, Severity.CRIT, "reboot", True),             # RESTART_BM
    (48, Severity.CRIT, "reset GPU", True),          # WORKFLOW_XID_48
    (95, Severity.CRIT, "reset GPU", True),          # RESET_GPU
    (119, Severity.CRIT, "reset GPU", True),
    (46, Severity.CRIT, "reset GPU", True),
    (109, Severity.CRIT, "reset GPU", True),         # was "check application" before
    (64, Severity.CRIT, "reset GPU", True),
    (38, Severity.OK, "none", False),                # IGNORE (was "reset GPU" before)
    (44, Severity.OK, "none", False),
    (63, Severity.OK, "none", False),                # the remap_pending rule asks for the reset
    (13, Severity.WARN, "restart the application", False),
    (43, Severity.OK, "none", False),
    (45, Severity.OK, "follow the other Xid", False),
    (151, Severity.CRIT, "restart the VM", True),
    (54, Severity.WARN, "check seating, cables and power connectors", False),
    (78, Severity.WARN, "update driver and firmware", False),
    (157, Severity.WARN, "contact support", False),  # deviation, with why
    (167, Severity.CRIT, "reset GPU", True),         # no bucket: our judgement, with why
])
def test_key_judgements(code, severity, action, sticky):
    info = xid.lookup(code)
    assert (info.severity, info.action, info.sticky) == (severity, action, sticky)


def test_unknown_code_is_warn_with_look_up_and_where():
    info = xid.lookup(9999)
    assert not info.known
    assert info.severity == Severity.WARN
    assert info.action == "look up"
    assert "NVIDIA's Xid catalog" in info.source and xid.XID_CATALOG_URL in info.source
    assert xid.lookup("not a number").action == "look up"


def test_xid_154_action_comes_from_the_message():
    msg = "GPU recovery action changed from 0x4 (Drain and Reset) to 0x{} (...)"
    assert xid.lookup(154, msg.format(1)).action == "reset GPU"
    assert xid.lookup(154, msg.format(2)).action == "reboot"
    assert xid.lookup(154, msg.format(4)).action == "drain and reset GPU"
    recovered = xid.lookup(154, msg.format(0))
    assert (recovered.severity, recovered.action) == (Severity.OK, "none")
    assert xid.lookup(154).severity == Severity.CRIT
    # the label varies between drivers ("OS Reboot"): the number decides
    assert xid.lookup(154, "changed from 0x0 (None) to 0x2 (OS Reboot)").action == "reboot"


@pytest.mark.parametrize("code,message,severity,action", [
    # real lines (tests/fixtures/kernel/nvrm-real.txt): a non-fatal link event is no reset
    (145, "RLW_RXPIPE Nonfatal XC0 i0 Link 13 (0x0409a0c2 0x00000008 0x00000001 0x00000000 "
          "0x00100000 0x00000004)", Severity.OK, "none"),
    (149, "NETIR_LINK_EVT  Fatal   XC0 i0 Link 01 (0x021425c6 0x00000000 0x00000000 "
          "0x00000000 0x00000000 0x00000000)", Severity.CRIT, "reset GPU"),
    (149, "NETIR_LINK_EVT Fatal XC0 i0 Link 08 (0x004505c6 0x00000000 0x00000000)",
     Severity.CRIT, "reset GPU"),
    # NETIR_BER_EVENT: IGNORE whatever the status
    (149, "NETIR_BER_EVENT Nonfatal XC0 i0 Link 03 (0x00086226 0x00000002)",
     Severity.OK, "none"),
    # 145 RLW_RXPIPE status 0x1: action 1 IGNORE, promoted to RESET_GPU when V1 bit 10 is set
    (145, "RLW_RXPIPE Nonfatal XC0 i0 Link 2 (0x000000c2 0x00000001)", Severity.OK, "none"),
    (145, "RLW_RXPIPE Nonfatal XC0 i0 Link 2 (0x000004c2 0x00000001)", Severity.CRIT,
     "reset GPU"),
    # 144 SAW_MVB status 0x2: RESET_GPU
    (144, "SAW_MVB Fatal XC0 i0 Link 5 (0x00000021 0x00000002)", Severity.CRIT, "reset GPU"),
    # V2 layout (R575+): SAW_MVB unit 1 in bits 6:0
    (144, "SAW_MVB Nonfatal XC0 i0 Link 5 (0x00000001 0x00000004)", Severity.OK, "none"),
    # no row: the printed word decides
    (146, "TLW_CTRL Nonfatal XC0 i0 Link 5 (0x00000263 0x00000040)", Severity.WARN,
     "look the registers up in NVIDIA's XID 144-150 decode sheet"),
    (146, "TLW_CTRL Fatal XC0 i0 Link 5", Severity.CRIT, "reset GPU"),
])
def test_nvlink5_decode(code, message, severity, action):
    info = xid.lookup(code, message)
    assert (info.severity, info.action) == (severity, action), info.source


def test_nvlink5_without_unit_and_word_falls_back_to_the_bucket():
    info = xid.lookup(147, "something else entirely")
    assert info.severity == Severity.WARN and info.immediate == "WORKFLOW_NVLINK5_ERR"


def test_lookup_is_cached():
    assert xid.catalog() is xid.catalog()


ENTRY = "[xid.13]\nname='x'\nmnemonic='M'\nimmediate='RESTART_APP'\ninvestigatory=''\nused=true\n"


@pytest.mark.parametrize("text,needle", [
    (ENTRY + "severity='bad'\nwhy='because it is so'\n", "severity"),
    (ENTRY + "severity='crit'\n", "no why"),
    (ENTRY + "why='no reason'\n", "nothing deviates"),
    (ENTRY.replace("RESTART_APP", "PRAY"), "not in the bucket table"),
    (ENTRY.replace("RESTART_APP", ""), "must all be given"),
    (ENTRY.replace("used=true\n", ""), "missing used"),
    (ENTRY.replace("used=true", "used='yes'"), "used"),
    (ENTRY + "colour='red'\n", "unknown keys"),
    (ENTRY.replace("xid.13", "xid.abc"), "Xid number"),
    ("[xid.13\n", "not valid TOML"),
    ("", "no [xid.N]"),
])
def test_broken_catalog_is_a_clear_error(tmp_path, text, needle):
    bad = tmp_path / "xid_catalog.toml"
    bad.write_text(text)
    with pytest.raises(xid.CatalogError) as e:
        xid.load_catalog(bad)
    assert str(bad) in str(e.value) and needle in str(e.value)


def test_missing_catalog_file_says_how_to_fix(tmp_path):
    with pytest.raises(xid.CatalogError, match="reinstall"):
        xid.load_catalog(tmp_path / "nope.toml")


def test_docs_show_the_bucket_table_as_the_code_has_it():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "health.md").read_text()
    for name, b in xid.BUCKETS.items():
        sev = xid.SEVERITIES[b.severity].name
        assert f"| `{name}` | {b.meaning} | {sev} | {b.action} |" in doc, name
    for code, info in xid.catalog().items():
        if info.why:
            assert f"| {code} | " in doc and info.why in doc, code
