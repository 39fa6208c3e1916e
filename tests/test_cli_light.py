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


def test_a_config_naming_the_socket_finds_it_without_the_validated_config(daemon_factory,
                                                                         tmp_path):
    d = daemon_factory().start()
    cfg = tmp_path / "named.toml"
    cfg.write_text(f'# the status socket\n[daemon]\nsocket_path = "{d.socket}"  # here\n'
                   '[cost]\ngpu_hour_usd = 2.0\n')
    base = _modules("pass")
    extra = _modules("from gpucostd import cli; rc = cli.main(['status', '--config', "
                     f"{str(cfg)!r}, '--json']); print(); assert rc in (0, 1), rc") - base
    assert _heavy(extra) == [], _heavy(extra)


def test_socket_path_as_the_validated_config_reads_it(tmp_path):
    """The light reader agrees with the validated config on every form it reads, a drop-in
    wins over the main file, and a form it does not read goes to the validated config."""
    from gpucostd import config
    main = tmp_path / "gpucostd.toml"
    dropins = tmp_path / "gpucostd.d"
    forms = {
        '[daemon]\nsocket_path = "/run/a.sock"\n': "/run/a.sock",
        "[daemon]\ninterval_seconds = 2\nsocket_path = '/run/b.sock' # literal\n": "/run/b.sock",
        'daemon.socket_path = "/run/c.sock"\n[cost]\ngpu_hour_usd = 1.0\n': "/run/c.sock",
        '[ "daemon" ]\n"socket_path" = "/run/d.sock"\n': "/run/d.sock",
        '[daemon]\nsocket_path = "/run/e\\u0041.sock"\n': "/run/eA.sock",      # an escape
        'daemon = { socket_path = "/run/f.sock" }\n': "/run/f.sock",         # inline table
        '[daemon]\n# socket_path = "/run/x.sock"\n[cost]\n': None,          # a comment
    }
    for text, want in forms.items():
        main.write_text(text)
        args = cli._quick_status_args(["status", "--config", str(main)])
        expected = config.load(str(main)).daemon.socket_path
        assert expected == (want or config.default_socket_path()), text
        assert cli._socket_path(args) == expected, text
    main.write_text('[daemon]\nsocket_path = "/run/main.sock"\n')
    dropins.mkdir()
    (dropins / "10-sock.toml").write_text('[daemon]\nsocket_path = "/run/dropin.sock"\n')
    (dropins / "20-other.toml").write_text('[cost]\ngpu_hour_usd = 3.0\n')
    args = cli._quick_status_args(["status", "--config", str(main)])
    assert cli._socket_path(args) == config.load(str(main)).daemon.socket_path \
        == "/run/dropin.sock"
    assert cli._named_socket(str(main)) == (True, "/run/dropin.sock")   # no validated config


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
