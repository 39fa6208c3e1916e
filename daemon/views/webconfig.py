"""`[daemon] web_config_file`: the Prometheus exporter-toolkit web config (TLS, basic auth).

The file format is the one every Prometheus exporter reads with `--web.config.file`
(github.com/prometheus/exporter-toolkit, docs/web-configuration.md), so a site's existing file
carries over:

    tls_server_config:
      cert_file: /etc/gpucostd/tls/node.crt      # relative paths: from the file's directory
      key_file: /etc/gpucostd/tls/node.key
      client_auth_type: RequireAndVerifyClientCert   # default NoClientCert
      client_ca_file: /etc/gpucostd/tls/ca.crt
      client_allowed_sans: [prometheus.example.org]
      min_version: TLS12                          # default TLS12; max_version default TLS13
    http_server_config:
      headers: {X-Content-Type-Options: nosniff}  # (block form too)
    basic_auth_users:
      prometheus: $2y$10$...                      # bcrypt: htpasswd -nBC 10 "" | tr -d ':\\n'

What differs, and why: `cipher_suites`, `curve_preferences`, `prefer_server_cipher_suites`,
`http2` and `rate_limit` are accepted and not applied (Go names with no OpenSSL equivalent;
OpenSSL's defaults apply), with a warning; `RequireAnyClientCert` is refused (Python's ssl
cannot demand a certificate without verifying it; use RequireAndVerifyClientCert). /healthz is
served without basic auth (kubelet and systemd probes), /metrics and / need it.

YAML: read with PyYAML's safe loader (the libyaml one where built with it), which also refuses
a key given twice; its errors (syntax, tabs, several documents, nesting past 1000 levels,
numbers Python cannot hold) become `path:line: what`. The file itself is read by the daemon's
one loader (gpucostd.statefile.read_regular): a regular file of at most 256 KiB, opened without
blocking (a FIFO is refused, never waited on). A root daemon refuses a file that a user other
than root can change, as it does the config (a group-writable one is a warning). An empty file
is refused: it would silently turn TLS and basic auth off (remove `web_config_file` for that).

bcrypt: the `bcrypt` module where installed (Debian/Ubuntu: python3-bcrypt), else the C
library's crypt(3) through Python's `crypt` module (Python <= 3.12; glibc's libxcrypt knows
$2b$/$2y$). Where neither is there (RHEL 9 without EPEL on Python 3.13+, a bare venv), a file
with basic_auth_users is refused at start with that fix in the message.

The file (and the certificate files) are checked for changes at most once a second on a
request and re-read when they change; a new file that does not load is refused with a logged
error and the previous one stays in force.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import ssl
import tempfile
import threading
import time
import warnings
from typing import Any, Dict, List, Optional, Tuple

from gpucostd.config import FileError

LOG = logging.getLogger("gpucostd")


class WebConfigError(FileError):
    """A web config file that cannot be used: str() is `path:line: message`."""


# --------------------------------------------------------------------------- YAML
MAX_BYTES = 256 * 1024          # a web config with inline PEM is a few KiB
_YAML_MISSING = ("reading the web config needs PyYAML (Debian/Ubuntu: apt install python3-yaml;"
                 " RHEL: dnf install python3-pyyaml; pip install PyYAML)")


def _loader():
    """PyYAML's safe loader (the C one where built with libyaml: faster, and it refuses nesting
    past 1000 levels itself) that also refuses a key given twice in one mapping."""
    import yaml
    base = getattr(yaml, "CSafeLoader", None) or yaml.SafeLoader

    class Loader(base):  # type: ignore[valid-type,misc]
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                except TypeError:       # an unhashable key: SafeConstructor says so below
                    break
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)
    return yaml, Loader


def _yaml_error(e: BaseException, text: str, path: str) -> WebConfigError:
    """A PyYAML (or parser) failure as `path:line: what`, in the words of the old messages."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    line = mark.line + 1 if mark is not None else None
    if isinstance(e, RecursionError) or "maximum nesting depth" in str(e):
        return WebConfigError(f"the YAML is nested too deeply (at most {MAX_DEPTH} levels)",
                              path, line)
    if isinstance(e, (ValueError, OverflowError)) and not hasattr(e, "problem"):
        return WebConfigError(f"a value cannot be read: {str(e)[:120]}", path, line)
    problem = str(getattr(e, "problem", None) or e).strip()
    lines = text.splitlines()
    if line and line <= len(lines) and "cannot start any token" in problem and \
            "\t" in lines[line - 1][:len(lines[line - 1]) - len(lines[line - 1].lstrip())]:
        problem = "tabs are not allowed for indentation in YAML"
    elif "expected a single document" in str(getattr(e, "context", None)):
        problem = "only one YAML document is allowed"
    elif getattr(e, "context", None):
        problem = f"{e.context}: {problem}"
    return WebConfigError(f"not valid YAML: {problem[:160]}", path, line)


MAX_DEPTH = 100       # an exporter-toolkit web config is 4 levels deep


def _check_depth(doc: Any, path: str) -> Any:
    """Refuse a document nested deeper than MAX_DEPTH. Python 3.13 with a libyaml that sets no
    limit of its own constructs a 2000-deep list without a RecursionError, so the depth is
    measured here (iteratively; an alias seen before is not walked again)."""
    seen, stack = set(), [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise WebConfigError(f"the YAML is nested too deeply (at most {MAX_DEPTH} levels)",
                                 path)
        if isinstance(node, (dict, list)) and id(node) not in seen:
            seen.add(id(node))
            items = node.values() if isinstance(node, dict) else node
            stack.extend((v, depth + 1) for v in items)
    return doc


def _check_flow_depth(text: str, path: str) -> None:
    """Refuse flow collections (`[`, `{`) opened more than MAX_DEPTH deep, before PyYAML sees
    them: one libyaml stops at 1000 levels, another (Debian 13's) reads on and reports only a
    syntax error at the end. Quoted strings and comments are skipped."""
    depth, quote = 0, ""
    for no, line in enumerate(text.splitlines(), 1):
        for ch in line:
            if quote:
                quote = "" if ch == quote else quote
            elif ch in "'\"":
                quote = ch
            elif ch == "#":
                break
            elif ch in "[{":
                depth += 1
                if depth > MAX_DEPTH:
                    raise WebConfigError(f"the YAML is nested too deeply (at most {MAX_DEPTH} "
                                         f"levels)", path, no)
            elif ch in "]}":
                depth = max(0, depth - 1)


def _load(text: str, path: str, many: bool) -> List[Any]:
    """The document(s) of `text`, each depth-checked; every failure a WebConfigError."""
    _check_flow_depth(text, path)
    try:
        yaml, loader = _loader()
    except ImportError:
        raise WebConfigError(_YAML_MISSING, path) from None
    try:
        docs = yaml.load_all(text, Loader=loader) if many else [yaml.load(text, Loader=loader)]
        return [_check_depth(d, path) for d in docs]
    except (yaml.YAMLError, RecursionError, ValueError, OverflowError, TypeError) as e:
        raise _yaml_error(e, text, path) from None


def parse_yaml(text: str, path: str) -> Any:
    """One YAML document, read with PyYAML's safe loader (no tags that build objects; aliases
    resolve to shared values, never to copies). Raises WebConfigError with the line."""
    return _load(text, path, many=False)[0]


def parse_yaml_documents(text: str, path: str) -> List[Any]:
    """Several `---`-separated documents (Kubernetes manifests); empty ones are left out."""
    return [d for d in _load(text, path, many=True) if d is not None]


# --------------------------------------------------------------------------- bcrypt
_HASH = re.compile(r"^\$2[aby]\$(0[4-9]|[12]\d|3[01])\$[./A-Za-z0-9]{53}$")


def _bcrypt_backend():
    """A function (password bytes, hash bytes) -> bool, and its name; (None, why) if none."""
    try:
        import bcrypt  # noqa: F401 - optional dependency (pyproject: auth extra)

        def check(pw: bytes, hashed: bytes) -> bool:
            try:
                return bcrypt.checkpw(pw, hashed)
            except ValueError:          # bcrypt >= 5 refuses passwords over 72 bytes
                return False
        return check, "bcrypt"
    except ImportError:
        pass
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import crypt as _crypt
        probe = "$2b$04$" + "a" * 53
        if _crypt.crypt("x", probe) in (None, "", "*0", "*1"):
            raise ImportError("crypt(3) without bcrypt")

        def check(pw: bytes, hashed: bytes) -> bool:
            try:
                got = _crypt.crypt(pw.decode("utf-8"), hashed.decode("ascii"))
            except (UnicodeDecodeError, ValueError, OSError):
                return False
            return got is not None and hmac.compare_digest(got.encode(), hashed)
        return check, "crypt(3)"
    except ImportError:
        return None, ("basic_auth_users needs the Python bcrypt module (Debian/Ubuntu: apt "
                      "install python3-bcrypt; RHEL: python3-bcrypt from EPEL; pip install "
                      "bcrypt), or Python <= 3.12 with a crypt(3) that knows bcrypt")


# --------------------------------------------------------------------------- the config
MAX_PENDING_CHECKS = 4      # bcrypt checks running or queued (about 0.1 s each at cost 10)
PER_CLIENT_CHECKS = 2       # of them from one client address (1 of those a suspect one)
_TLS_VERSIONS = {"TLS10": ssl.TLSVersion.TLSv1, "TLS11": ssl.TLSVersion.TLSv1_1,
                 "TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
_CLIENT_AUTH = ("NoClientCert", "RequestClientCert", "RequireAnyClientCert",
                "VerifyClientCertIfGiven", "RequireAndVerifyClientCert")
_TLS_KEYS = {"cert", "key", "client_ca", "cert_file", "key_file", "client_auth_type",
             "client_ca_file", "client_allowed_sans", "min_version", "max_version",
             "cipher_suites", "prefer_server_cipher_suites", "curve_preferences"}
_NOT_APPLIED = {"cipher_suites", "prefer_server_cipher_suites", "curve_preferences"}
_HTTP_KEYS = {"http2", "headers"}
_TOP_KEYS = {"tls_server_config", "http_server_config", "basic_auth_users", "rate_limit"}
_HEADERS = ("Content-Security-Policy", "X-Frame-Options", "X-Content-Type-Options",
            "X-XSS-Protection", "Strict-Transport-Security")


class WebConfig:
    """One loaded web config: an SSL context (or None), users, extra headers."""

    def __init__(self, ssl_context: Optional[ssl.SSLContext], users: Dict[str, bytes],
                 headers: Dict[str, str], allowed_sans: Tuple[str, ...], files: Tuple[str, ...],
                 checker=None):
        self.ssl_context = ssl_context
        self.users = users
        self.headers = headers
        self.allowed_sans = allowed_sans
        self.files = files
        self._check = checker
        self._ok: Dict[bytes, bool] = {}            # successful checks, keyed by a digest
        self._bad: Dict[bytes, bool] = {}           # recent failed ones (a flood repeats them)
        self._lock = threading.Lock()               # one bcrypt at a time: bounded CPU
        self._pending = threading.BoundedSemaphore(MAX_PENDING_CHECKS)
        self._clients: Dict[str, List[int]] = {}    # checks running or queued per address
        self._clients_lock = threading.Lock()
        self._dummy = next(iter(users.values()), b"")
        self.refused_checks = 0                     # answered 429: the queue was full

    def check_password(self, user: str, password: str, client: str = "",
                       suspect: bool = False) -> Optional[bool]:
        """Whether the password is right; None when the check queue has no place for it (the
        caller answers 429 at once instead of holding a connection slot behind it). The queue
        holds MAX_PENDING_CHECKS checks, running or waiting; PER_CLIENT_CHECKS of them from one
        client address, and of those one `suspect` check (its connection failed a check
        before or was turned away). So a flood from another host cannot take the scraper's
        places, and a keep-alive flood from the scraper's own host leaves a place for a
        connection's first request. Known answers (a right password, a wrong one seen lately)
        need no bcrypt at all."""
        hashed = self.users.get(user)
        pw = password.encode("utf-8")
        key = hashlib.sha256(user.encode() + b"\0" + pw + b"\0" + (hashed or b"")).digest()
        if hashed is not None and key in self._ok:
            return True
        if key in self._bad:
            return False
        kind = 1 if suspect else 0
        with self._clients_lock:
            held = self._clients.setdefault(client, [0, 0])     # [fresh, suspect] checks
            if held[0] + held[1] >= PER_CLIENT_CHECKS or (suspect and held[1] >= 1) or \
                    not self._pending.acquire(blocking=False):
                if held == [0, 0]:
                    del self._clients[client]
                self.refused_checks += 1
                return None
            held[kind] += 1
        try:
            with self._lock:
                ok = self._check(pw, hashed if hashed is not None else self._dummy)
        finally:
            with self._clients_lock:
                self._pending.release()
                held[kind] -= 1
                if held == [0, 0]:
                    self._clients.pop(client, None)
        ok = bool(ok) and hashed is not None
        cache = self._ok if ok else self._bad
        if len(cache) >= 256:
            cache.clear()
        cache[key] = True
        return ok

    def san_allowed(self, peercert: Optional[dict]) -> bool:
        if not self.allowed_sans:
            return True
        sans = {v for _, v in (peercert or {}).get("subjectAltName", ())}
        return bool(sans & set(self.allowed_sans))


def load(path: str) -> WebConfig:
    """Read and check a web config file. Raises WebConfigError (what, where, the fix)."""
    text = _read(path)
    doc = parse_yaml(text, path)
    if doc is None:
        raise WebConfigError("the web config is empty: it would turn TLS and basic auth off; "
                             "write the settings into it, or remove [daemon] web_config_file "
                             "to serve plain HTTP without auth", path)
    if not isinstance(doc, dict):
        raise WebConfigError("the web config must be a mapping (tls_server_config, "
                             "http_server_config, basic_auth_users)", path, 1)
    loc = _Locator(text)

    def err(key, msg):
        return WebConfigError(msg, path, loc.find(key))
    for key in doc:
        if key not in _TOP_KEYS:
            raise err(key, f"unknown key {key!r}; known: " + ", ".join(sorted(_TOP_KEYS)))
    if doc.get("rate_limit"):
        LOG.warning("%s: rate_limit is not applied by gpucostd (the server caps connections "
                    "and request time instead)", path)
    base = os.path.dirname(os.path.abspath(path))
    files = [os.path.abspath(path)]
    ctx, sans = _tls(doc.get("tls_server_config"), base, err, files, path)
    headers = _headers(doc.get("http_server_config"), err)
    users = doc.get("basic_auth_users") or {}
    if not isinstance(users, dict):
        raise err("basic_auth_users", "basic_auth_users must map user names to bcrypt hashes")
    hashed: Dict[str, bytes] = {}
    for user, h in users.items():
        if not isinstance(h, str) or not _HASH.match(h):
            raise err(str(user), f"basic_auth_users.{user}: not a bcrypt hash ($2y$10$... of 60 "
                                 f"characters); make one with: htpasswd -nBC 10 \"\" | tr -d "
                                 f"':\\n'")
        hashed[str(user)] = h.encode("ascii")
    checker = None
    if hashed:
        checker, why = _bcrypt_backend()
        if checker is None:
            raise err("basic_auth_users", why)
    return WebConfig(ctx, hashed, headers, sans, tuple(files), checker)


def _read(path: str) -> str:
    """The file's text through the one loader; a root daemon refuses one others can change."""
    from gpucostd.statefile import UnreadableFile, read_regular, writable_by_others
    try:
        blob, st = read_regular(path, MAX_BYTES)
    except FileNotFoundError:
        raise WebConfigError("no such file (daemon.web_config_file)", path) from None
    except UnreadableFile as e:
        raise WebConfigError(f"the web config {e} (daemon.web_config_file)", path) from None
    if os.geteuid() == 0:
        problem = writable_by_others(path, st)
        if problem is not None and problem[0] != "group":
            raise WebConfigError(f"refused: a user other than root can change this file and so "
                                 f"turn TLS and basic auth off ({problem[1]})", path)
        if problem is not None:
            LOG.warning("web config %s; its members can turn TLS and basic auth off",
                        problem[1])
    try:
        return blob.decode("utf-8")
    except UnicodeDecodeError as e:
        raise WebConfigError(f"not UTF-8 text (byte {e.start})", path) from None


def _tls(tls, base, err, files, path):
    if tls is None:
        return None, ()
    if not isinstance(tls, dict):
        raise err("tls_server_config", "tls_server_config must be a mapping")
    for key in tls:
        if key not in _TLS_KEYS:
            raise err(key, f"unknown key tls_server_config.{key}; known: "
                           + ", ".join(sorted(_TLS_KEYS)))
        if key in _NOT_APPLIED and tls[key] not in (None, [], ""):
            LOG.warning("%s: tls_server_config.%s is not applied (OpenSSL's defaults are used)",
                        path, key)

    def file_of(key):
        v = tls.get(key)
        if v in (None, ""):
            return None
        if not isinstance(v, str):
            raise err(key, f"tls_server_config.{key} must be a file name")
        full = v if os.path.isabs(v) else os.path.join(base, v)
        if not os.path.isfile(full):
            raise err(key, f"tls_server_config.{key}: {full} does not exist")
        files.append(full)
        return full
    cert, key = file_of("cert_file"), file_of("key_file")
    tmp = []
    try:
        if cert is None and tls.get("cert"):
            cert = _inline(tls["cert"], tmp)
        if key is None and tls.get("key"):
            key = _inline(tls["key"], tmp)
        if cert is None or key is None:
            raise err("tls_server_config", "tls_server_config needs cert_file and key_file "
                                           "(or inline cert and key)")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            ctx.load_cert_chain(cert, key)
        except (ssl.SSLError, OSError) as e:
            raise err("cert_file", f"cannot load the certificate and key: {e}") from None
    finally:
        for t in tmp:
            os.unlink(t)
    for k, attr, default in (("min_version", "minimum_version", "TLS12"),
                             ("max_version", "maximum_version", "TLS13")):
        v = tls.get(k) or default
        if v not in _TLS_VERSIONS:
            raise err(k, f"tls_server_config.{k} = {v!r}; one of " + ", ".join(_TLS_VERSIONS))
        setattr(ctx, attr, _TLS_VERSIONS[v])
    auth = tls.get("client_auth_type") or "NoClientCert"
    if auth not in _CLIENT_AUTH:
        raise err("client_auth_type", f"tls_server_config.client_auth_type = {auth!r}; one of "
                                      + ", ".join(_CLIENT_AUTH))
    if auth == "RequireAnyClientCert":
        raise err("client_auth_type", "client_auth_type RequireAnyClientCert is not supported "
                                      "(Python cannot require a certificate without verifying "
                                      "it); use RequireAndVerifyClientCert with client_ca_file")
    ca = file_of("client_ca_file")
    if auth != "NoClientCert":
        if ca is None and not tls.get("client_ca"):
            if auth in ("VerifyClientCertIfGiven", "RequireAndVerifyClientCert"):
                raise err("client_auth_type", f"client_auth_type {auth} needs client_ca_file")
        else:
            try:
                if ca is not None:
                    ctx.load_verify_locations(cafile=ca)
                else:
                    ctx.load_verify_locations(cadata=tls["client_ca"])
            except (ssl.SSLError, OSError) as e:
                raise err("client_ca_file", f"cannot load the client CA: {e}") from None
            ctx.verify_mode = ssl.CERT_REQUIRED if auth == "RequireAndVerifyClientCert" \
                else ssl.CERT_OPTIONAL
    elif ca is not None:
        raise err("client_ca_file", "client_ca_file is set but client_auth_type is NoClientCert;"
                                    " set client_auth_type: RequireAndVerifyClientCert")
    sans = tls.get("client_allowed_sans") or []
    if not isinstance(sans, list) or not all(isinstance(s, str) for s in sans):
        raise err("client_allowed_sans", "tls_server_config.client_allowed_sans must be a list "
                                         "of names")
    if sans and ctx.verify_mode != ssl.CERT_REQUIRED:
        raise err("client_allowed_sans", "client_allowed_sans needs client_auth_type "
                                         "RequireAndVerifyClientCert")
    return ctx, tuple(str(s) for s in sans)


def _inline(pem: str, tmp: list) -> str:
    fd, name = tempfile.mkstemp(prefix="gpucostd-web-", suffix=".pem")
    tmp.append(name)
    with os.fdopen(fd, "w") as f:
        f.write(pem)
    return name


def _headers(http, err) -> Dict[str, str]:
    if http is None:
        return {}
    if not isinstance(http, dict):
        raise err("http_server_config", "http_server_config must be a mapping")
    for key in http:
        if key not in _HTTP_KEYS:
            raise err(key, f"unknown key http_server_config.{key}; known: headers, http2")
    headers = http.get("headers") or {}
    if not isinstance(headers, dict):
        raise err("headers", "http_server_config.headers must be a mapping")
    out = {}
    for name, value in headers.items():
        if name not in _HEADERS:
            raise err(str(name), f"header {name!r} cannot be set; allowed: " + ", ".join(_HEADERS))
        if value not in (None, ""):
            if not isinstance(value, str) or "\n" in value or "\r" in value:
                raise err(str(name), f"header {name}: the value must be one line of text")
            out[name] = value
    return out


class _Locator:
    def __init__(self, text: str):
        self.lines = text.splitlines()

    def find(self, key: str) -> Optional[int]:
        pat = re.compile(r"^\s*['\"]?" + re.escape(str(key)) + r"['\"]?\s*:")
        for n, line in enumerate(self.lines, 1):
            if pat.match(line):
                return n
        return None


# --------------------------------------------------------------------------- watching
class WebConfigWatcher:
    """The current web config; re-read when the file or a certificate file changes."""

    def __init__(self, path: str, check_every: float = 1.0):
        self.path = path
        self.check_every = check_every
        self._config = load(path)               # at start an error is fatal (raises)
        self._stamp = self._stamps(self._config.files)
        self._checked = time.monotonic()
        self._lock = threading.Lock()
        self._bad: Optional[Tuple] = None
        self.reloads = 0

    @staticmethod
    def _stamps(files) -> Tuple:
        out = []
        for f in files:
            try:
                st = os.stat(f)
                out.append((f, st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                out.append((f, None))
        return tuple(out)

    def current(self) -> WebConfig:
        now = time.monotonic()
        if now - self._checked < self.check_every:
            return self._config
        with self._lock:
            if now - self._checked < self.check_every:
                return self._config
            self._checked = now
            stamp = self._stamps(self._config.files)
            if stamp == self._stamp:
                return self._config
            try:
                new = load(self.path)
            except Exception as e:  # noqa: BLE001 - WebConfigError, or a bug: keep serving
                if not isinstance(e, WebConfigError):
                    e = WebConfigError(f"cannot be used ({type(e).__name__}: {str(e)[:120]})",
                                       self.path)
                if stamp != self._bad:
                    LOG.error("web config change refused, the previous one stays: %s", e)
                    self._bad = stamp
                return self._config
            self._config, self._stamp, self._bad = new, self._stamps(new.files), None
            self.reloads += 1
            LOG.info("web config %s reloaded", self.path)
            return self._config
