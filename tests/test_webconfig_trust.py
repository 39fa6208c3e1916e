"""The web config has the config's trust and robustness, through the real daemon: a root daemon
refuses a web.yml another user can change; an emptied, deep, huge-number or FIFO web.yml is
refused (at start: one line, no traceback; on change: the running one stays, an error is
logged) and never blocks an HTTP thread.

docs/reliability.md lists each fault with the test here that holds it.
"""
from __future__ import annotations

import os
import shutil
import time

import pytest

from conftest import wait_for
from test_webconfig import _client_ctx, _get, bcrypt_hash, pki  # noqa: F401 (pki: a fixture)

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI "
                                                                       "to make test certificates")
NOBODY = 65534


def _write_fifo(p):
    p.unlink()
    os.mkfifo(p)


CHANGES = {
    "empty": lambda p: p.write_text(""),
    "deep": lambda p: p.write_text("http_server_config:\n  headers: " + "[" * 2000 + "]" * 2000
                                   + "\n"),
    "number": lambda p: p.write_text("basic_auth_users:\n  prometheus: " + "9" * 5000 + "\n"),
    "fifo": _write_fifo,
    "big": lambda p: os.truncate(p, 300 << 20),       # sparse: refused by its size, unread
}
WORDS = {"empty": "the web config is empty", "deep": "nested too deeply",
         "number": "cannot be read", "fifo": "a FIFO, not a regular file",
         "big": "at most 262144 bytes are read",
         "nobody": "a user other than root can change this file"}


def _web_text(pki):
    return (f"tls_server_config:\n  cert_file: {pki}/server.crt\n  key_file: {pki}/server.key\n"
            f"basic_auth_users:\n  prometheus: '{bcrypt_hash('right')}'\n")


def _make_nobodys(p):
    os.chown(p, NOBODY, NOBODY)
    os.chmod(p, 0o666)


@pytest.mark.parametrize("kind", sorted(CHANGES) + ["nobody"])
def test_a_bad_web_config_change_is_refused_and_auth_stays(daemon_factory, tmp_path, pki, kind):
    if kind == "nobody" and os.geteuid() != 0:
        pytest.skip("needs root: the owner check is a root daemon's")
    web = tmp_path / "web.yml"
    web.write_text(_web_text(pki))
    d = daemon_factory(extra_config=f'web_config_file = "{web}"\n')
    d.start(wait=False)
    url, ctx = f"https://127.0.0.1:{d.port}", _client_ctx(pki)
    wait_for(lambda: _get(url + "/healthz", ctx)[0] == 200, 30, what="TLS /healthz 200")
    assert _get(url + "/metrics", ctx, "prometheus", "right")[0] == 200
    if kind == "nobody":
        _make_nobodys(web)
        web.write_text(web.read_text() + "# changed\n")
    else:
        CHANGES[kind](web)
    # looked at on requests, at most once a second: the refusal is logged above debug
    wait_for(lambda: _get(url + "/metrics", ctx)[0] == 401 and
             "web config change refused" in d.output(), 10, what="the change refused")
    line = next(ln for ln in d.output().splitlines() if "web config change refused" in ln)
    assert " ERROR " in line and WORDS[kind] in line, line
    for _ in range(3):         # TLS and basic auth stay; no request hangs or is cut off
        start = time.monotonic()
        assert _get(url + "/metrics", ctx, "prometheus", "right")[0] == 200
        assert _get(url + "/metrics", ctx, "prometheus", "wrong")[0] == 401
        assert _get(url + "/healthz", ctx)[0] == 200
        assert time.monotonic() - start < 3
    assert d.proc.poll() is None and "Traceback" not in d.output()


@pytest.mark.parametrize("kind", sorted(CHANGES) + ["nobody"])
def test_a_bad_web_config_at_start_is_one_line_and_exit_2(daemon_factory, tmp_path, pki, kind):
    if kind == "nobody" and os.geteuid() != 0:
        pytest.skip("needs root: the owner check is a root daemon's")
    web = tmp_path / "web.yml"
    web.write_text(_web_text(pki))
    if kind == "nobody":
        _make_nobodys(web)
    else:
        CHANGES[kind](web)
    d = daemon_factory(extra_config=f'web_config_file = "{web}"\n')
    d.start(wait=False)
    assert d.proc.wait(30) == 2           # a FIFO must not block the start: wait() fails it
    out = d.output()
    errors = [ln for ln in out.splitlines() if "cannot start" in ln]
    assert len(errors) == 1 and str(web) in errors[0] and WORDS[kind] in errors[0], out
    assert "Traceback" not in out
