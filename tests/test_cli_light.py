"""`gpucostd status` is the on-call engineer's command: it must start in about the time of the
interpreter. Its client path imports neither the config (tomllib), the cost model, the snapshot
types (dataclasses), logging, argparse nor any hardware or exposition library -- counted against
what the same interpreter imports for `pass`, so the dev venv's own start-up is not blamed on
it -- and the argparse-free parsing of its common forms means exactly what argparse means."""
from __future__ import annotations

import subprocess
import sys

import pytest

from gpucostd import cli

FORBIDDEN = ("gpucostd.config", "tomllib", "tomli", "gpucostd.cost", "gpucostd.snapshot",
             "dataclasses", "logging", "inspect", "argparse", "typing", "pynvml", "pyroute2",
             "prometheus_client", "sqlite3", "gpucostd.views.statusview",
             "gpucostd.views.statusapi", "threading", "socketserver")


def _modules(code: str) -> set:
    r = subprocess.run([sys.executable, "-c", code + "; import sys; print(' '.join(sys.modules))"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return set(r.stdout.splitlines()[-1].split())


def _heavy(extra: set) -> list:
    return sorted(m for m in extra
                  if any(m == f or m.startswith(f + ".") for f in FORBIDDEN))


def test_status_imports_nothing_heavy(daemon_factory):
    d = daemon_factory().start()
    base = _modules("pass")
    extra = _modules("from gpucostd import cli; rc = cli.main(['status', '--socket', "
                     f"{d.socket!r}, '--events', '3']); print(); assert rc in (0, 1)") - base
    assert _heavy(extra) == [], _heavy(extra)
    assert "gpucostd.views.statustext" in extra and "gpucostd.views.statusclient" in extra


def test_a_config_without_socket_path_is_not_parsed(daemon_factory, tmp_path):
    d = daemon_factory().start()
    cfg = tmp_path / "other.toml"
    cfg.write_text("[cost]\ngpu_hour_usd = 2.0\n")
    base = _modules("pass")
    extra = _modules("from gpucostd import cli; rc = cli.main(['status', '--config', "
                     f"{str(cfg)!r}, '--socket', {d.socket!r}]); print()") - base
    assert _heavy(extra) == []
    # a config that names the socket is read (the daemon fixture's does): status still works
    r = d.cli("status", "--json")
    assert r.returncode in (0, 1) and '"schema": 1' in r.stdout


@pytest.mark.parametrize("argv", [
    ["status"], ["status", "--json"], ["status", "--socket", "/x.sock"],
    ["status", "--socket=/x.sock", "--events=2", "--json"],
    ["status", "--config", "/etc/g.toml", "--events", "0"],
])
def test_quick_status_parsing_means_what_argparse_means(argv):
    quick = cli._quick_status_args(argv)
    full = cli.build_parser().parse_args(argv)
    assert quick is not None
    for name in ("command", "json", "socket", "config", "events", "direct", "simulate"):
        assert getattr(quick, name) == getattr(full, name), name


@pytest.mark.parametrize("argv", [
    ["status", "--direct"], ["status", "--simulate"], ["status", "-h"], ["status", "--bogus"],
    ["status", "--events", "x"], ["status", "--socket"], ["status", "--json=1"],
    ["events"], [],
])
def test_every_other_form_goes_to_argparse(argv):
    assert cli._quick_status_args(argv) is None
