"""The shipped Xid catalog is valid data and lookup() says what the on-call engineer needs."""
from __future__ import annotations

import pytest

from gpucostd.health import xid
from gpucostd.snapshot import Severity

REQUIRED = (13, 31, 32, 38, 43, 44, 45, 48, 61, 62, 63, 64, 68, 69, 74, 79, 92, 94, 95, 109,
            119, 120, 121, 140, 143, 149, 154)
STICKY = (48, 79, 95, 119, 120)


def test_shipped_catalog_file_is_valid():
    # load_catalog validates every entry and raises CatalogError naming the entry otherwise
    entries = xid.load_catalog(xid.CATALOG_PATH)
    assert entries == dict(xid.catalog())


@pytest.mark.parametrize("code", REQUIRED)
def test_required_codes_are_covered(code):
    info = xid.lookup(code)
    assert info.known and info.xid == code
    assert info.name and info.source
    assert info.action in xid.ACTIONS
    assert info.severity in (Severity.OK, Severity.WARN, Severity.CRIT)


def test_sticky_set_is_exactly_the_documented_one():
    assert {code for code, info in xid.catalog().items() if info.sticky} == set(STICKY)


@pytest.mark.parametrize("code,severity,action", [
    (79, Severity.CRIT, "reboot"),
    (48, Severity.CRIT, "reset GPU"),
    (95, Severity.CRIT, "reset GPU"),
    (119, Severity.CRIT, "reset GPU"),
    (64, Severity.CRIT, "hardware inspection/RMA"),
    (63, Severity.WARN, "reset GPU"),
    (13, Severity.WARN, "check application"),
    (43, Severity.OK, "check application"),
    (45, Severity.OK, "none"),
])
def test_key_judgements(code, severity, action):
    info = xid.lookup(code)
    assert (info.severity, info.action) == (severity, action)


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
    recovered = xid.lookup(154, msg.format(0))
    assert (recovered.severity, recovered.action) == (Severity.OK, "none")
    assert xid.lookup(154).severity == Severity.CRIT


def test_nvlink5_nonfatal_is_warn():
    assert xid.lookup(145, "RLW_RXPIPE Nonfatal XC0 i0 Link 13").severity == Severity.WARN
    assert xid.lookup(149, "NETIR_LINK_EVT  Fatal   XC0 i0 Link 01").severity == Severity.CRIT


def test_lookup_is_cached():
    assert xid.catalog() is xid.catalog()


@pytest.mark.parametrize("text,needle", [
    ("[xid.13]\nname='x'\nseverity='bad'\naction='none'\nsticky=false\nsource='s'\n", "severity"),
    ("[xid.13]\nname='x'\nseverity='warn'\naction='pray'\nsticky=false\nsource='s'\n", "action"),
    ("[xid.13]\nname='x'\nseverity='warn'\naction='none'\nsource='s'\n", "missing sticky"),
    ("[xid.13]\nname='x'\nseverity='warn'\naction='none'\nsticky='no'\nsource='s'\n", "sticky"),
    ("[xid.abc]\nname='x'\nseverity='warn'\naction='none'\nsticky=false\nsource='s'\n", "Xid number"),
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
