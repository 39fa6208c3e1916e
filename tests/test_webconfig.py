"""[daemon] web_config_file: the exporter-toolkit web config (TLS, client certificates, basic
auth with bcrypt hashes), through the real daemon; the file is re-read when it changes."""
from __future__ import annotations

import base64
import shutil
import socket
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import wait_for
from gpucostd.views import webconfig
from gpucostd.views.webconfig import WebConfigError, load, parse_yaml

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI "
                                                                       "to make test certificates")


def bcrypt_hash(password: str) -> str:
    check, why = webconfig._bcrypt_backend()
    if check is None:
        pytest.skip(why)
    try:
        import bcrypt
        return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    except ImportError:
        import crypt
        return crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl."""
    d = tmp_path_factory.mktemp("pki")
    # The extensions a strict verifier asks for (Python 3.13's create_default_context sets
    # VERIFY_X509_STRICT): a CA with a critical basicConstraints and a keyUsage, leaves with an
    # authority key identifier. Without them every TLS request of these tests fails on 3.13.
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
             "ca.crt", "-days", "2", "-subj", "/CN=gpucostd test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             "-addext", "subjectKeyIdentifier=hash", cwd=d)
    for name, san, usage in (("server", "IP:127.0.0.1,DNS:localhost", "serverAuth"),
                             ("client", "DNS:prometheus", "clientAuth")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                 f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        (d / f"{name}.ext").write_text(
            f"subjectAltName={san}\nbasicConstraints=critical,CA:FALSE\n"
            f"keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage={usage}\n"
            "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile",
                 f"{name}.ext", cwd=d)
    return d


def _client_ctx(pki: Path, cert=False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    if cert:
        ctx.load_cert_chain(str(pki / "client.crt"), str(pki / "client.key"))
    return ctx


def _get(url, ctx=None, user=None, password=None):
    req = urllib.request.Request(url)
    if user is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        req.add_header("Authorization", "Basic " + token)
    try:
        with urllib.request.urlopen(req, timeout=5, context=ctx) as r:
            return r.status, r.read().decode(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), dict(e.headers)


# ---------------------------------------------------------------- the file format
def test_the_yaml_subset_of_real_web_config_files():
    doc = parse_yaml(
        "# from a site\n---\ntls_server_config:\n  cert_file: node.crt   # relative\n"
        "  key_file: \"node.key\"\n  client_allowed_sans:\n  - prometheus\n  - 'b''c'\n"
        "  cipher_suites: [TLS_AES_128_GCM_SHA256, TLS_AES_256_GCM_SHA384]\n"
        "http_server_config:\n  headers: {X-Frame-Options: deny}\n"
        "basic_auth_users:\n  alice: $2y$10$X0h1gDsPszWURQaxFh.zoubFi6DXncSjhoQNJgRrnGs7Esim\n"
        "  cert: |\n    -----BEGIN-----\n    abc\n    -----END-----\n", "w.yml")
    assert doc["tls_server_config"]["client_allowed_sans"] == ["prometheus", "b'c"]
    assert doc["tls_server_config"]["key_file"] == "node.key"
    assert doc["http_server_config"]["headers"] == {"X-Frame-Options": "deny"}
    assert doc["basic_auth_users"]["cert"] == "-----BEGIN-----\nabc\n-----END-----\n"
    assert doc["basic_auth_users"]["alice"].startswith("$2y$10$")


@pytest.mark.parametrize("text, line, words", [
    ("basic_auth_users:\n  a: x\n  a: y\n", 3, "duplicate key"),
    ("a: [1, 2\n", 2, "not valid YAML"),
    ("http_server_config:\n  headers: " + "[" * 2000 + "\n", 2, "nested too deeply"),
    ("tls_server_config:\n\tcert_file: a\n", 2, "tabs"),
    ("a: 1\n---\nb: 2\n", 2, "one YAML document"),
    ("basic_auth_users:\n  alice: secret\n", 2, "not a bcrypt hash"),
    ("tls_config:\n  cert_file: a\n", 1, "unknown key"),
    ("http_server_config:\n  headers:\n    Content-Type: x\n", 3, "cannot be set"),
])
def test_bad_files_get_the_line_and_the_fix(tmp_path, text, line, words):
    p = tmp_path / "web.yml"
    p.write_text(text)
    with pytest.raises(WebConfigError) as e:
        load(str(p))
    assert str(e.value).startswith(f"{p}:{line}: ") and words in str(e.value), str(e.value)


def test_tls_settings_that_cannot_be_honoured_are_refused(tmp_path, pki):
    base = f"tls_server_config:\n  cert_file: {pki}/server.crt\n  key_file: {pki}/server.key\n"
    for extra, words in (("  client_auth_type: RequireAnyClientCert\n", "not supported"),
                         (f"  client_ca_file: {pki}/ca.crt\n", "NoClientCert"),
                         ("  client_auth_type: RequireAndVerifyClientCert\n", "client_ca_file"),
                         ("  min_version: SSL3\n", "TLS12"),
                         ("  cert_file: nope.crt\n", "duplicate")):
        p = tmp_path / "web.yml"
        p.write_text(base + extra)
        with pytest.raises(WebConfigError) as e:
            load(str(p))
        assert words in str(e.value), str(e.value)
    p.write_text("tls_server_config:\n  cert_file: missing.crt\n  key_file: missing.key\n")
    with pytest.raises(WebConfigError) as e:
        load(str(p))
    assert f"{tmp_path}/missing.crt does not exist" in str(e.value)   # relative to the file


def test_without_a_bcrypt_implementation_basic_auth_is_refused_with_the_fix(tmp_path,
                                                                            monkeypatch):
    monkeypatch.setattr(webconfig, "_bcrypt_backend",
                        lambda: (None, "basic_auth_users needs the Python bcrypt module "
                                       "(Debian/Ubuntu: apt install python3-bcrypt)"))
    p = tmp_path / "web.yml"
    p.write_text("basic_auth_users:\n  alice: $2y$10$" + "a" * 53 + "\n")
    with pytest.raises(WebConfigError) as e:
        load(str(p))
    assert "python3-bcrypt" in str(e.value) and str(e.value).startswith(f"{p}:1: ")


def test_a_password_is_checked_against_its_bcrypt_hash(tmp_path):
    h = bcrypt_hash("s3cret")
    p = tmp_path / "web.yml"
    p.write_text(f"basic_auth_users:\n  prometheus: '{h}'\n")
    cfg = load(str(p))
    assert cfg.check_password("prometheus", "s3cret") is True
    assert cfg.check_password("prometheus", "s3cret") is True          # cached
    assert cfg.check_password("prometheus", "wrong") is False
    assert cfg.check_password("nobody", "s3cret") is False
    assert cfg.check_password("prometheus", "x" * 100) is False        # > 72 bytes


# ---------------------------------------------------------------- through the daemon
@pytest.fixture
def tls_daemon(daemon_factory, tmp_path, pki):
    web = tmp_path / "web.yml"
    web.write_text(f"tls_server_config:\n  cert_file: {pki}/server.crt\n"
                   f"  key_file: {pki}/server.key\n"
                   f"http_server_config:\n  headers:\n    X-Content-Type-Options: nosniff\n"
                   f"basic_auth_users:\n  prometheus: '{bcrypt_hash('right')}'\n")
    d = daemon_factory(extra_config=f'web_config_file = "{web}"\n')   # in [daemon]
    url = f"https://127.0.0.1:{d.port}"
    d.start(wait=False)
    ctx = _client_ctx(pki)
    wait_for(lambda: _get(url + "/healthz", ctx)[0] == 200, 30, what="TLS /healthz 200")
    return d, url, ctx, web


def test_tls_and_basic_auth(tls_daemon):
    d, url, ctx, _ = tls_daemon
    code, body, headers = _get(url + "/metrics", ctx, "prometheus", "right")
    assert code == 200 and "gpucostd_gpu_info{" in body
    assert headers.get("X-Content-Type-Options") == "nosniff"
    code, _, headers = _get(url + "/metrics", ctx, "prometheus", "wrong")
    assert code == 401 and headers.get("WWW-Authenticate", "").startswith("Basic")
    assert _get(url + "/metrics", ctx)[0] == 401
    assert _get(url + "/", ctx, "nobody", "right")[0] == 401
    assert _get(url + "/healthz", ctx)[0] == 200          # probes need no password
    assert "running: metrics on 127.0.0.1" in d.output() and "(TLS) (basic auth)" in d.output()


def test_with_tls_set_plain_http_is_not_served(tls_daemon):
    d, _, _, _ = tls_daemon
    with socket.create_connection(("127.0.0.1", d.port), timeout=5) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        got = b""
        try:
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                got += chunk
        except OSError:
            pass
    assert b"HTTP/1.1 200" not in got and b"ok:" not in got


def test_the_file_is_reread_when_it_changes_and_a_bad_change_is_refused(tls_daemon, pki):
    d, url, ctx, web = tls_daemon
    assert _get(url + "/metrics", ctx, "prometheus", "right")[0] == 200
    text = web.read_text()
    new = text.split("basic_auth_users:")[0] + \
        f"basic_auth_users:\n  prometheus: '{bcrypt_hash('rotated')}'\n"
    web.write_text(new)
    wait_for(lambda: _get(url + "/metrics", ctx, "prometheus", "rotated")[0] == 200, 10,
             what="the new password accepted")
    assert _get(url + "/metrics", ctx, "prometheus", "right")[0] == 401
    web.write_text(new + "bogus_key: 1\n")                   # invalid: the previous one stays
    # the file is looked at on requests, at most once a second
    wait_for(lambda: _get(url + "/metrics", ctx, "prometheus", "rotated")[0] == 200 and
             "web config change refused" in d.output(), 10, what="refusal logged")
    assert _get(url + "/metrics", ctx, "prometheus", "rotated")[0] == 200
    assert d.proc.poll() is None


def test_client_certificates_required_and_verified(daemon_factory, tmp_path, pki):
    web = tmp_path / "web.yml"
    web.write_text(f"tls_server_config:\n  cert_file: {pki}/server.crt\n"
                   f"  key_file: {pki}/server.key\n"
                   f"  client_auth_type: RequireAndVerifyClientCert\n"
                   f"  client_ca_file: {pki}/ca.crt\n"
                   f"  client_allowed_sans: [prometheus]\n")
    d = daemon_factory()
    d.write_config(f'web_config_file = "{web}"\n')
    d.start(wait=False)
    url = f"https://127.0.0.1:{d.port}/metrics"
    with_cert = _client_ctx(pki, cert=True)
    wait_for(lambda: _get(url, with_cert)[0] == 200, 30, what="mTLS scrape")
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        _get(url, _client_ctx(pki))


def test_a_bad_web_config_stops_the_start_with_exit_2(daemon_factory, tmp_path):
    web = tmp_path / "web.yml"
    web.write_text("tls_server_config:\n  cert_file: /nonexistent.crt\n  key_file: /x.key\n")
    d = daemon_factory()
    d.write_config(f'web_config_file = "{web}"\n')
    d.start(wait=False)
    assert d.proc.wait(30) == 2
    assert f"{web}:2: tls_server_config.cert_file: /nonexistent.crt does not exist" in d.output()
    assert "Traceback" not in d.output()


def test_a_client_trickling_its_tls_handshake_is_cut_off_at_the_deadline(tmp_path, pki):
    import time
    from gpucostd.views.httpserver import MetricsServer, Published
    from gpucostd.views.webconfig import WebConfigWatcher
    web = tmp_path / "web.yml"
    web.write_text(f"tls_server_config:\n  cert_file: {pki}/server.crt\n"
                   f"  key_file: {pki}/server.key\n")
    p = Published(time.monotonic, renderer=lambda s: b"m 1\n")
    p.publish_snapshot(1, time.monotonic())
    srv = MetricsServer("127.0.0.1:0", p, web=WebConfigWatcher(str(web)), request_deadline=1.0)
    srv.start()
    try:
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
        s.sendall(b"\x16\x03\x01\x40\x00")         # a TLS record header: 16 KiB follow...
        start = time.monotonic()
        closed = None
        while time.monotonic() - start < 8:
            s.settimeout(0.2)
            try:
                if s.recv(100) == b"":
                    closed = time.monotonic() - start
                    break
            except socket.timeout:
                s.sendall(b"\x00")                 # ...one byte now and then
            except OSError:
                closed = time.monotonic() - start
                break
        s.close()
        assert closed is not None and closed < 6.0, closed
        # and a real client still gets through
        ctx = _client_ctx(pki)
        assert _get(f"https://127.0.0.1:{srv.port}/metrics", ctx)[0] == 200
    finally:
        srv.stop()


def test_without_the_bcrypt_module_crypt3_checks_the_hash(tmp_path, monkeypatch):
    """RHEL 9 without EPEL: no python3-bcrypt, Python's crypt module over libxcrypt."""
    import sys
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        crypt = pytest.importorskip("crypt", reason="Python 3.13+ has no crypt module")
    h = crypt.crypt("s3cret", crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))
    if not h or not h.startswith("$2"):
        pytest.skip("this C library's crypt(3) has no bcrypt")
    monkeypatch.setitem(sys.modules, "bcrypt", None)          # import bcrypt -> ImportError
    check, name = webconfig._bcrypt_backend()
    assert name == "crypt(3)"
    p = tmp_path / "web.yml"
    p.write_text(f"basic_auth_users:\n  prometheus: '{h}'\n")
    cfg = load(str(p))
    assert cfg.check_password("prometheus", "s3cret") is True
    assert cfg.check_password("prometheus", "S3cret") is False
