"""The proof: ONE build of the .deb installed into clean Debian 12 and Debian 13 root filesystems,
each booted under systemd; the upgrade from the 0.1.0 package; the unit tests under Debian 13's
python3.13.

    sudo .venv/bin/python -m pytest -v -s tests/test_nspawn.py

1. packaging/build.sh builds the .deb from this tree once (shared with tests/test_packaging.py):
   gpucostd_<version>_all.deb, the same file for every architecture and Python.
2. Minimal Debian 12 (bookworm) and 13 (trixie) root filesystems are debootstrapped once each and
   cached in $GPUCOSTD_TEST_CACHE (default /var/cache/gpucostd-test/<suite>-rootfs); each run
   works on a fresh `cp -a` copy, so installs never accumulate.
3. In that copy (not booted yet) `apt-get install --download-only ./gpucostd_*.deb` fetches the
   dependencies (python3-psutil, python3-systemd, procps) from Debian's archive
   ($GPUCOSTD_DEBIAN_MIRROR) alone. A drop-in makes the unit run on the simulated node
   (`gpucostd run --simulate`; there is no GPU) with a 5 s watchdog.
4. The copy boots with `systemd-nspawn --boot --register=no --keep-unit --private-network`
   (a private network: port 9477 inside never meets the host's); everything else runs inside
   through `nsenter -t <container init> -a`: apt-get install (start on install), status text,
   `gpucostd status` as a non-root member of group gpucostd, /metrics, reload, broken reload,
   journal MESSAGE_IDs, SIGSTOP -> watchdog restart, stop -> settings restored, purge.
   test_01..test_12 run once per suite (bookworm, then trixie) on one container each.
5. Upgrade (bookworm, the only target 0.1.0 installed on): the 0.1.0 package is built from the
   git history (commit UPGRADE_FROM, cached as $GPUCOSTD_TEST_CACHE/gpucostd_0.1.0_amd64.deb),
   installed and configured; the new package installed over it keeps the modified
   /etc/gpucostd/gpucostd.toml, the stored events and the saved originals, and restarts the
   service.
6. Python 3.13: the unit tests whose outcome can differ by interpreter or by Debian's own
   libraries (PY313_TESTS, each named with what differs: TOML, YAML, ssl, ctypes, sqlite3,
   psutil, systemd, argparse, the daemon as a process) and an import of every module run in a
   trixie copy under Debian's python3.13 with Debian's python3-psutil, python3-systemd and
   python3-yaml (a venv with --system-site-packages; the pinned pure-Python dependencies and
   pytest are downloaded by the host's pip and installed offline).

Needs root, debootstrap, systemd-nspawn and nsenter; network access to the Debian mirror (and
PyPI, for 5 and 6) unless everything is cached. The rootfs caches and the 0.1.0 package are
built on first use (a few minutes) and reused afterwards. No test here gates on how long the
module takes (a loaded machine is not a broken package); the log lines say where time went.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import wait_for

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("GPUCOSTD_TEST_CACHE", "/var/cache/gpucostd-test"))
MIRROR = os.environ.get("GPUCOSTD_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SUITES = {"bookworm": "12", "trixie": "13"}
BASE_PACKAGES = "systemd,systemd-sysv,dbus"
# the unit tests under python3.13: Debian's interpreter, venv, psutil, systemd and yaml; procps for
# /bin/kill (test_systemd_unit verifies the unit's ExecReload)
PYTEST_PACKAGES = BASE_PACKAGES + \
    ",python3-venv,python3-psutil,python3-systemd,python3-yaml,procps"
UPGRADE_FROM = "8a41120"      # the last commit of version 0.1.0 (before the 0.2.0 layout)
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

pytestmark = [pytest.mark.root, pytest.mark.slow]


def _skip_reason():
    if os.geteuid() != 0:
        return "needs root: debootstrap, systemd-nspawn --boot and nsenter"
    for tool in ("debootstrap", "systemd-nspawn", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (Debian: apt-get install debootstrap systemd-container)"
    return None


if _skip_reason():
    pytest.skip(_skip_reason(), allow_module_level=True)

from test_packaging import built_packages  # noqa: E402  (same session cache of the build)

_T0 = time.monotonic()
_START: list = []             # when this module's first fixture started


def _mark_start():
    global _T0
    if not _START:
        _START.append(time.monotonic())
        _T0 = _START[0]


def _log(msg):
    print(f"[nspawn {time.monotonic() - _T0:6.1f} s] {msg}", flush=True)


def _stamped(target: Path, label: str) -> bool:
    stamp = target / "etc" / "gpucostd-test-rootfs"
    return stamp.exists() and \
        stamp.read_text().replace(" ", "").strip() == label.replace(" ", "")


def ensure_rootfs(suite: str, packages: str = BASE_PACKAGES, name: str = "",
                  user: str = "") -> Path:
    """The cached rootfs of `suite` (minbase + packages, and a user), made on first use: a
    rootfs with more than the base packages is derived from the suite's base rootfs with
    apt-get (faster than a second debootstrap)."""
    target = CACHE / (name or f"{suite}-rootfs")
    label = f"debootstrap {suite} minbase + {packages}" + (f"; user {user}" if user else "")
    if _stamped(target, label):
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    # pytest-xdist workers (and other runs) share the cache: one builds, the others wait
    with open(CACHE / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _stamped(target, label):
            return target
        return _make_rootfs(suite, packages, user, target, label)


def _make_rootfs(suite: str, packages: str, user: str, target: Path, label: str) -> Path:
    base = ensure_rootfs(suite) if packages != BASE_PACKAGES else None
    t0 = time.monotonic()
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    _log(f"{label} into {target} (cached for later runs)")
    if base is not None:
        subprocess.run(["cp", "-a", "--reflink=auto", str(base), str(tmp)], check=True)
        shutil.copy2("/etc/resolv.conf", tmp / "etc" / "resolv.conf")
        extra = sorted(set(packages.split(",")) - set(BASE_PACKAGES.split(",")))
        r = nspawn_run(tmp, "apt-get update -qq && apt-get install -y -qq "
                       "--no-install-recommends " + " ".join(extra) + " && apt-get clean",
                       timeout=900)
    else:
        r = subprocess.run(["debootstrap", "--variant=minbase", f"--include={packages}",
                            suite, str(tmp), MIRROR], capture_output=True, text=True,
                           timeout=900)
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        pytest.fail(f"{label} failed (mirror {MIRROR}; set GPUCOSTD_DEBIAN_MIRROR):"
                    f"\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    version = (tmp / "etc" / "debian_version").read_text()
    assert version.startswith(SUITES[suite] + "."), f"{suite} rootfs says Debian {version}"
    if user:
        subprocess.run(["chroot", str(tmp), "useradd", "--create-home", user], check=True)
    (tmp / "etc" / "gpucostd-test-rootfs").write_text(label + "\n")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    _log(f"cache filled in {time.monotonic() - t0:.0f} s")
    return target


def fresh_copy(cache: Path, prefix: str) -> Path:
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=str(CACHE)))
    subprocess.run(["cp", "-a", "--reflink=auto", str(cache), str(work / "rootfs")], check=True)
    shutil.copy2("/etc/resolv.conf", work / "rootfs" / "etc" / "resolv.conf")
    return work


def nspawn_run(rootfs: Path, script: str, timeout=300, extra=()):
    """A command in the (not booted) rootfs, with the host's network (downloads)."""
    return subprocess.run(
        ["systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "-D", str(rootfs),
         "--setenv=DEBIAN_FRONTEND=noninteractive", *extra, "sh", "-c", script],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


class Container:
    def __init__(self, rootfs: Path, log: Path):
        self.rootfs = rootfs
        self.log = log
        self.proc = None
        self.leader = None

    # -- lifecycle
    def boot(self, timeout=90):
        self._logf = open(self.log, "wb")
        self.proc = subprocess.Popen(
            ["systemd-nspawn", "--boot", "--register=no", "--keep-unit", "--private-network",
             "--quiet", "-D", str(self.rootfs), "--machine", "gpucostd-test"],
            stdin=subprocess.DEVNULL, stdout=self._logf, stderr=subprocess.STDOUT,
            start_new_session=True)

        def leader():
            if self.proc.poll() is not None:
                raise AssertionError(f"systemd-nspawn exited {self.proc.returncode}:\n"
                                     + self.log.read_text(errors="replace")[-3000:])
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
            for pid in children.split():
                if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                    return int(pid)
            return None
        self.leader = wait_for(leader, timeout=30, what="the container's init (systemd)")
        seen = []

        def booted():
            # "offline" while the container's manager cannot be reached yet (seen on a loaded
            # host with several containers booting at once): ask again until the deadline
            seen.append(self.sh("systemctl is-system-running --wait", timeout=timeout,
                                check=False).stdout.strip())
            return seen[-1] if seen[-1] not in ("", "offline", "initializing", "starting") \
                else None
        state = wait_for(booted, timeout=timeout, interval=0.5,
                         what="container boot (systemctl is-system-running)")
        assert state in ("running", "degraded"), state
        if state == "degraded":
            _log("boot degraded: " + self.sh("systemctl --failed --no-legend").stdout)

    def poweroff(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)      # nspawn asks the container's init to halt
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._logf.close()

    # -- commands inside
    def sh(self, script, timeout=120, check=True, user=None):
        argv = ["nsenter", "-t", str(self.leader), "-a", "env", "-i", f"PATH={CONTAINER_PATH}",
                "LANG=C.UTF-8", "HOME=/root", "DEBIAN_FRONTEND=noninteractive", "SYSTEMD_PAGER="]
        if user:
            argv += ["runuser", "-u", user, "--"]
        argv += ["sh", "-c", script]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"`{script}` exited {r.returncode}:\n{r.stdout}\n{r.stderr}\n"
                                 + self.journal_tail())
        return r

    def journal_tail(self, n=60):
        if self.leader is None:
            return ""
        r = subprocess.run(["nsenter", "-t", str(self.leader), "-a", "journalctl", "-u",
                            "gpucostd", "-n", str(n), "--no-pager", "-o", "short-monotonic"],
                           capture_output=True, text=True, timeout=30)
        return "--- journalctl -u gpucostd ---\n" + r.stdout

    def write(self, path, text):
        p = self.rootfs / path.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)

    def prop(self, name):
        return self.sh(f"systemctl show -p {name} --value gpucostd").stdout.strip()

    def cursor(self):
        r = self.sh("journalctl -u gpucostd -n 1 -o json --no-pager", check=False)
        lines = [json.loads(x) for x in r.stdout.splitlines() if x.strip()]
        return lines[-1]["__CURSOR"] if lines else None

    def journal(self, after=None):
        cmd = "journalctl -u gpucostd -o json --no-pager"
        if after:
            cmd += f" --after-cursor='{after}'"
        return [json.loads(x) for x in self.sh(cmd).stdout.splitlines() if x.strip()]


DROPIN = """\
# tests/test_nspawn.py: no GPU in the container; run on the simulated 8 x H100 node, with a
# short watchdog so the SIGSTOP test does not wait 30 s.
[Service]
ExecStart=
ExecStart=/usr/bin/gpucostd run --simulate
WatchdogSec=5
TimeoutAbortSec=5
"""


def _mirror_unreachable(suite="bookworm"):
    import urllib.request
    url = f"{MIRROR}/dists/{suite}/InRelease"
    try:
        with urllib.request.urlopen(url, timeout=15) as r:
            r.read(64)
        return None
    except OSError as e:
        return (f"Debian mirror unreachable ({url}: {e}); the proof resolves the package's "
                f"dependencies from Debian's archive (set GPUCOSTD_DEBIAN_MIRROR to a reachable "
                f"mirror)")


def booted(suite: str, debs, prefix: str):
    """A fresh copy of the suite's cached rootfs with `debs` in /root and their dependencies
    in apt's cache (downloaded now, on the host's network), booted with a private network."""
    reason = _mirror_unreachable(suite)
    if reason:
        pytest.skip(reason)
    work = fresh_copy(ensure_rootfs(suite), prefix)
    rootfs = work / "rootfs"
    _log(f"fresh {suite} rootfs copy in {rootfs}")
    for deb in debs:
        shutil.copy2(deb, rootfs / "root" / deb.name)
    c = Container(rootfs, work / "nspawn.log")
    # Dependencies from Debian's archive only: resolve and download them now (host network),
    # install later inside the booted container (private network) from apt's cache.
    script = "apt-get update -qq" + "".join(
        f" && apt-get install -y -qq --download-only /root/{deb.name}" for deb in debs)
    r = nspawn_run(rootfs, script)
    if r.returncode != 0:
        shutil.rmtree(work, ignore_errors=True)
        raise AssertionError(f"downloading the dependencies failed:\n{r.stdout}\n{r.stderr}")
    _log(f"dependencies of {', '.join(d.name for d in debs)} downloaded from {MIRROR}")
    c.write("/etc/systemd/system/gpucostd.service.d/10-simulate.conf", DROPIN)
    c.work = work
    c.suite = suite
    try:
        c.boot()
    except BaseException:
        c.poweroff()
        shutil.rmtree(work, ignore_errors=True)
        raise
    _log(f"{suite} container booted")
    return c


@pytest.fixture(scope="module", params=list(SUITES))
def box(request):
    _mark_start()
    _start_py313_if_selected(request)
    deb = built_packages()["deb"]
    _log(f"built {deb.name}")
    c = booted(request.param, [deb], f"gpucostd-nspawn-{request.param}-")
    c.deb = deb.name
    try:
        yield c
    finally:
        c.poweroff()
        shutil.rmtree(c.work, ignore_errors=True)
        _log(f"{c.suite} container gone")


def gpucostd_journal_ids():
    from gpucostd.record.journal import MESSAGE_IDS
    return MESSAGE_IDS


# --------------------------------------------------------------------------- the proof, in order
def test_01_install_enables_and_starts_the_service(box):
    r = box.sh(f"apt-get install -y /root/{box.deb}", timeout=300)
    _log("installed: " + r.stdout.splitlines()[-1] if r.stdout else "installed")
    # (dependencies come from apt's cache: the container has no network)
    # postinst started it (Type=notify: `start` returned after READY=1)
    assert box.sh("systemctl is-active gpucostd", check=False).stdout.strip() == "active"
    assert box.sh("systemctl is-enabled gpucostd").stdout.strip() == "enabled"
    assert box.sh("getent group gpucostd").stdout.startswith("gpucostd:x:")
    # the unit as shipped (ExecStart=/usr/bin/gpucostd exists now) passes verify
    # (--man=no: minbase has no man; the man page the unit's Documentation= names is checked)
    r = box.sh("systemd-analyze verify --man=no /usr/lib/systemd/system/gpucostd.service",
               check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    # (Debian 12's systemd names it by /lib, a link to usr/lib on a merged /usr)
    fragment = box.sh(f"readlink -f {box.prop('FragmentPath')}").stdout.strip()
    assert fragment == "/usr/lib/systemd/system/gpucostd.service", fragment
    for doc in shlex.split(box.prop("Documentation")):
        path = "/usr/share/man/man8/gpucostd.8.gz" if doc == "man:gpucostd(8)" else \
            doc[len("file://"):]
        assert box.sh(f"test -f {path}", check=False).returncode == 0, f"{doc}: {path} absent"
    assert box.sh("stat -c '%a %U %G' /run/gpucostd/gpucostd.sock").stdout.strip() == \
        "660 root gpucostd"
    # it really runs under the hardened unit (the simulator's ctypes callbacks included)
    assert box.prop("MemoryDenyWriteExecute") == "yes"
    assert box.prop("ProtectSystem") == "strict"
    assert box.prop("Type") == "notify"
    # the same _all.deb, on this suite's own python3 with Debian's psutil and systemd modules
    py = box.sh("python3 -c 'import sys; print(\"%d.%d\" % sys.version_info[:2])'").stdout.strip()
    _log(f"Debian {SUITES[box.suite]} python3 is {py}")
    assert py == {"bookworm": "3.11", "trixie": "3.13"}[box.suite]
    assert box.sh("dpkg-query -W -f='${Status}' python3-psutil python3-systemd").stdout.count(
        "install ok installed") == 2
    assert box.sh("find /usr/lib/gpucostd -name '*.so*' | wc -l").stdout.strip() == "0"


def test_02_admin_config_tunes_power_limit(box):
    shipped = (REPO / "packaging" / "gpucostd.toml").read_text()
    assert box.sh("cat /etc/gpucostd/gpucostd.toml").stdout == shipped
    box.config = shipped + "\n[tuning.gpu]\npower_limit_watts = 500\n"
    box.write("/etc/gpucostd/gpucostd.toml", box.config)
    box.sh("gpucostd config check /etc/gpucostd/gpucostd.toml")
    box.sh("systemctl restart gpucostd", timeout=90)
    assert box.prop("ActiveState") == "active"


def test_03_status_text_shows_the_summary(box):
    text = wait_for(lambda: "GPUs" in box.prop("StatusText") and box.prop("StatusText"),
                    timeout=30, what="StatusText with the summary")
    _log(f"StatusText={text}")
    assert "8 GPUs" in text


def test_04_status_for_a_gpucostd_group_member(box):
    box.sh("useradd --no-create-home --groups gpucostd oncall")
    assert "gpucostd" in box.sh("id -nG oncall").stdout.split()
    r = box.sh("gpucostd status", user="oncall", check=False)
    assert r.returncode in (0, 1, 2), f"exit {r.returncode}:\n{r.stdout}\n{r.stderr}"
    assert "8 GPUs" in r.stdout.splitlines()[0]
    assert all(len(line) <= 100 for line in r.stdout.splitlines())
    # not a member: refused by the socket's mode, so UNKNOWN (3)
    box.sh("useradd --no-create-home visitor")
    assert box.sh("gpucostd status", user="visitor", check=False).returncode == 3


METRICS = ("python3 -c \"import urllib.request; "
           "print(urllib.request.urlopen('http://127.0.0.1:9477/metrics', timeout=5)"
           ".read().decode())\"")


def test_05_metrics_answer_inside_the_container(box):
    text = box.sh(METRICS).stdout
    assert "gpucostd_build_info" in text
    assert text.count("gpucostd_gpu_info{") == 8

    def limit_500():
        body = box.sh(METRICS).stdout
        for line in body.splitlines():
            if line.startswith("gpucostd_gpu_power_limit_watts{") and 'gpu="0"' in line:
                return float(line.rsplit(" ", 1)[1]) == 500.0
        return False
    wait_for(limit_500, timeout=30, interval=0.5, what="GPU 0 power limit 500 W in /metrics")


def test_06_reload_keeps_it_active(box):
    pid = box.prop("MainPID")
    box.sh("systemctl reload gpucostd", timeout=60)
    assert box.prop("ActiveState") == "active"
    assert box.prop("MainPID") == pid


def test_07_broken_config_reload_keeps_it_active_and_logs(box):
    pid = box.prop("MainPID")
    cursor = box.cursor()
    box.write("/etc/gpucostd/gpucostd.toml", box.config + "\n[nonsense_section]\nx = 1\n")
    box.sh("systemctl reload gpucostd", timeout=60, check=False)
    assert box.prop("ActiveState") == "active"
    assert box.prop("MainPID") == pid

    def logged():
        return [e for e in box.journal(after=cursor) if "nonsense_section" in e.get("MESSAGE", "")]
    lines = wait_for(logged, timeout=20, what="the config error in the journal")
    _log("reload refused: " + lines[0]["MESSAGE"])
    box.write("/etc/gpucostd/gpucostd.toml", box.config)
    box.sh("systemctl reload gpucostd", timeout=60)
    assert box.prop("ActiveState") == "active"


def test_08_journal_has_startup_and_event_lines_with_message_ids(box):
    ids = gpucostd_journal_ids()
    entries = box.journal()
    found = {e.get("MESSAGE_ID") for e in entries}
    assert ids["startup"] in found, "no startup line with its MESSAGE_ID"
    assert ids["setting_applied"] in found, "no setting_applied event (500 W) with its MESSAGE_ID"
    r = box.sh(f"journalctl -u gpucostd MESSAGE_ID={ids['setting_applied']} -o cat --no-pager")
    assert "500" in r.stdout


def test_09_sigstop_makes_the_watchdog_restart_it(box):
    pid = box.prop("MainPID")
    restarts = int(box.prop("NRestarts"))
    box.sh(f"kill -STOP {pid}")

    def restarted():
        new = box.prop("MainPID")
        return new not in ("0", pid) and box.prop("ActiveState") == "active" and new
    new = wait_for(restarted, timeout=60, interval=0.5, what="watchdog restart (new MainPID)")
    _log(f"watchdog restarted gpucostd: MainPID {pid} -> {new}")
    assert int(box.prop("NRestarts")) == restarts + 1
    assert "Watchdog timeout" in box.sh("journalctl -u gpucostd --no-pager -o cat").stdout
    # and it comes back up fully: ready, tuned again
    wait_for(lambda: "GPUs" in box.prop("StatusText"), timeout=30, what="status after restart")


def test_10_stop_restores_tuned_settings(box):
    """The simulated GPUs live inside the daemon process, so the restore is proven by the
    daemon's own record: the setting_restored journal event (old 500 W -> original 700 W) and
    the saved originals emptied in /var/lib/gpucostd/originals.json."""
    ids = gpucostd_journal_ids()
    wait_for(lambda: "500" in box.sh(METRICS).stdout, timeout=30, what="500 W applied again")
    cursor = box.cursor()
    box.sh("systemctl stop gpucostd", timeout=60)
    assert box.prop("ActiveState") in ("inactive", "deactivating")
    restored = [e for e in box.journal(after=cursor) if e.get("MESSAGE_ID") ==
                ids["setting_restored"]]
    assert restored, "no setting_restored event on stop:\n" + box.journal_tail()
    _log("restored: " + restored[0]["MESSAGE"])
    assert len(restored) == 8 and all("700" in e["MESSAGE"] for e in restored)
    originals = box.sh("cat /var/lib/gpucostd/originals.json 2>/dev/null || echo '{}'").stdout
    assert "power_limit" not in originals, originals
    box.sh("systemctl start gpucostd", timeout=90)


def test_11_reinstall_restarts_the_service(box):
    """What an upgrade does: postinst `configure <old-version>` restarts the service."""
    pid = box.prop("MainPID")
    box.sh(f"dpkg -i /root/{box.deb}", timeout=180)
    assert box.prop("ActiveState") == "active"
    new = box.prop("MainPID")
    assert new not in ("0", pid), "the service was not restarted by the upgrade"
    # the admin's modified conffile is kept as is
    assert box.sh("cat /etc/gpucostd/gpucostd.toml").stdout == box.config


def test_11b_a_taken_port_fails_the_start_at_once_with_the_port_in_the_journal(box):
    """Port 9477 held by another process: `systemctl start` fails at once (not after the 90 s
    start timeout) and the journal names the address and the config key."""
    box.sh("systemctl stop gpucostd", timeout=60)
    box.sh("systemd-run --unit=squat9477 python3 -c \"import socket, time; s = socket.socket(); "
           "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "   # past TIME_WAITs
           "s.bind(('0.0.0.0', 9477)); s.listen(); time.sleep(600)\"")
    try:
        wait_for(lambda: box.sh("python3 -c \"import socket; socket.create_connection("
                                "('127.0.0.1', 9477), 2)\"", check=False).returncode == 0,
                 timeout=20, what="the squatter listening on 9477")
        cursor = box.cursor()
        t0 = time.monotonic()
        r = box.sh("systemctl start gpucostd", timeout=60, check=False)
        took = time.monotonic() - t0
        assert r.returncode != 0, "the start succeeded on a taken port"
        assert took < 30, f"systemctl start took {took:.0f} s (a hang until the start timeout?)"

        def said():
            return [e["MESSAGE"] for e in box.journal(after=cursor)
                    if "cannot listen on 0.0.0.0:9477" in e.get("MESSAGE", "")]
        lines = wait_for(said, timeout=20, what="the port error in the journal")
        _log(f"taken port, start failed after {took:.1f} s: {lines[0]}")
        assert "Address already in use ([daemon] listen_address)" in lines[0]
    finally:
        box.sh("systemctl stop squat9477", check=False)
        box.sh("systemctl stop gpucostd; systemctl reset-failed gpucostd; "
               "systemctl start gpucostd", timeout=120, check=False)
    assert box.prop("ActiveState") == "active"


def test_12_purge_removes_service_state_group_and_files(box):
    ids = gpucostd_journal_ids()
    wait_for(lambda: "GPUs" in box.prop("StatusText"), timeout=30, what="service ready")
    cursor = box.cursor()
    r = box.sh("apt-get purge -y gpucostd 2>&1", timeout=180)
    assert "not empty" not in r.stdout, r.stdout        # e.g. /lib/systemd/system on Debian 13
    # remove stopped it, and the stop restored the tuned settings
    restored = [e for e in box.journal(after=cursor)
                if e.get("MESSAGE_ID") == ids["setting_restored"]]
    assert len(restored) == 8, box.journal_tail()
    r = box.sh("systemctl list-unit-files gpucostd.service --no-legend", check=False)
    assert "gpucostd" not in r.stdout
    assert box.sh("getent group gpucostd", check=False).returncode == 2
    for path in ("/var/lib/gpucostd", "/run/gpucostd", "/usr/lib/gpucostd", "/usr/bin/gpucostd",
                 "/lib/systemd/system/gpucostd.service", "/usr/lib/systemd/system/gpucostd.service",
                 "/usr/lib/sysusers.d/gpucostd.conf",
                 "/etc/systemd/system/multi-user.target.wants/gpucostd.service"):
        assert box.sh(f"test -e {path}", check=False).returncode != 0, f"{path} left behind"
    left = box.sh("find / -xdev \\( -path /proc -o -path /sys \\) -prune -o -name '*gpucostd*' "
                  "-print", check=False).stdout.split()
    expected = {f"/root/{box.deb}",                       # the file we installed from
                "/etc/systemd/system/gpucostd.service.d",  # the test's own drop-in
                "/etc/systemd/system/gpucostd.service.d/10-simulate.conf",
                "/etc/gpucostd-test-rootfs"}
    # dpkg keeps nothing else; the admin's MODIFIED config is all that may stay
    left = [p for p in left if p not in expected and not p.startswith("/var/lib/apt/lists/")]
    _log(f"left after purge: {left}")
    assert set(left) <= {"/etc/gpucostd", "/etc/gpucostd/gpucostd.toml"}, left


# --------------------------------------------------------------------------- upgrade from 0.1.0
def old_package() -> Path:
    """The 0.1.0 .deb, built once from the git history (commit UPGRADE_FROM) with that
    commit's own packaging/build.sh, and cached."""
    cached = sorted(CACHE.glob(f"gpucostd_0.1.0_*-{UPGRADE_FROM}.deb"))
    if cached:
        return cached[0]
    r = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", "-q",
                        f"{UPGRADE_FROM}^{{commit}}"], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"commit {UPGRADE_FROM} (gpucostd 0.1.0) is not in this checkout's history "
                    f"(a shallow clone?): the upgrade test builds the 0.1.0 package from it")
    pyproject = subprocess.run(["git", "-C", str(REPO), "show", f"{UPGRADE_FROM}:pyproject.toml"],
                               capture_output=True, text=True, check=True).stdout
    assert 'version = "0.1.0"' in pyproject, f"{UPGRADE_FROM} is not version 0.1.0"
    t0 = time.monotonic()
    CACHE.mkdir(parents=True, exist_ok=True)
    src = Path(tempfile.mkdtemp(prefix="gpucostd-0.1.0-src-", dir=str(CACHE)))
    try:
        subprocess.run(f"git -C '{REPO}' archive {UPGRADE_FROM} | tar -x -C '{src}'",
                       shell=True, check=True)
        stamp = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%ct",
                                UPGRADE_FROM], capture_output=True, text=True).stdout.strip()
        _log(f"building the 0.1.0 package from {UPGRADE_FROM} (cached for later runs)")
        env = dict(os.environ, GPUCOSTD_SKIP_LINT="1", SOURCE_DATE_EPOCH=stamp)
        r = subprocess.run(["sh", str(src / "packaging" / "build.sh")], cwd=str(src), env=env,
                           capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"building 0.1.0 failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        built = sorted((src / "dist").glob("gpucostd_0.1.0_*.deb"))
        assert built, f"no 0.1.0 .deb in {src / 'dist'}"
        target = CACHE / built[0].name.replace(".deb", f"-{UPGRADE_FROM}.deb")
        shutil.copy2(built[0], target)
    finally:
        shutil.rmtree(src, ignore_errors=True)
    _log(f"cache filled in {time.monotonic() - t0:.0f} s")
    return target


@pytest.fixture()
def upbox():
    _mark_start()
    new = built_packages()["deb"]
    old = old_package()
    c = booted("bookworm", [old, new], "gpucostd-upgrade-")
    c.old, c.new = old.name, new.name
    try:
        yield c
    finally:
        c.poweroff()
        shutil.rmtree(c.work, ignore_errors=True)
        _log("upgrade container gone")


def _events(box):
    text = box.sh("gpucostd events --json --since 1d").stdout
    data = json.loads(text)
    return {e["id"]: (e["code"], e["subject"], e["message"]) for e in data}


def _originals(box):
    text = box.sh("cat /var/lib/gpucostd/originals.json").stdout
    return json.loads(text)["originals"]


def test_20_upgrade_from_0_1_0_keeps_config_events_originals_and_restarts(upbox):
    box = upbox
    box.sh(f"apt-get install -y /root/{box.old}", timeout=300)
    assert box.sh("dpkg-query -W -f='${Version}' gpucostd").stdout == "0.1.0"
    assert box.prop("ActiveState") == "active"
    # the admin's changes: a tuned power limit whose originals stay saved across stops
    shipped = box.sh("cat /etc/gpucostd/gpucostd.toml").stdout
    assert re.search(r"(?m)^\[tuning\]$", shipped), "the 0.1.0 config has a [tuning] table"
    box.config = re.sub(r"(?m)^\[tuning\]$", "[tuning]\nrestore_on_stop = false", shipped,
                        count=1) + "\n[tuning.gpu]\npower_limit_watts = 500\n"
    box.write("/etc/gpucostd/gpucostd.toml", box.config)
    box.sh("systemctl restart gpucostd", timeout=90)

    def applied():
        ev = _events(box)
        return len([v for v in ev.values() if v[0] == "setting_applied"]) >= 8 and ev
    before = wait_for(applied, timeout=60, interval=0.5, what="0.1.0 applied 500 W on 8 GPUs")
    originals = _originals(box)
    assert len(originals) == 8 and all(o["power_limit_watts"]["value"] == 700.0
                                       for o in originals.values()), originals
    pid = box.prop("MainPID")
    started = box.prop("ActiveEnterTimestampMonotonic")
    _log(f"0.1.0 running (MainPID {pid}) with {len(before)} events and 8 saved originals")

    # the shipped default changed since 0.1.0 and the admin's copy is modified: dpkg would ask;
    # unattended upgrades answer "keep mine" (confdef, else confold), as here
    box.sh("apt-get install -y -o Dpkg::Options::=--force-confdef "
           f"-o Dpkg::Options::=--force-confold /root/{box.new}", timeout=300)
    assert box.sh("dpkg-query -W -f='${Version} ${Architecture}' gpucostd").stdout == "0.2.0 all"
    # restarted by the upgrade, on the new code
    wait_for(lambda: box.prop("ActiveState") == "active", timeout=60, what="active after upgrade")
    assert box.prop("MainPID") not in ("0", pid)
    assert box.prop("ActiveEnterTimestampMonotonic") != started
    wait_for(lambda: "GPUs" in box.prop("StatusText"), timeout=30, what="0.2.0 ready")
    status = json.loads(box.sh("gpucostd status --json", check=False).stdout)
    assert status["daemon"]["version"] == "0.2.0"
    # the modified conffile is kept as is; the new default lies beside it
    assert box.sh("cat /etc/gpucostd/gpucostd.toml").stdout == box.config
    new_default = (REPO / "packaging" / "gpucostd.toml").read_text()
    if new_default != shipped:
        assert box.sh("cat /etc/gpucostd/gpucostd.toml.dpkg-dist").stdout == new_default
    # every stored event is still there, unchanged; the new daemon added its own
    after = _events(box)
    assert {k: after.get(k) for k in before} == before
    assert len(after) > len(before)
    # the saved originals are the 0.1.0 ones (values and times), not re-read from the GPUs
    assert _originals(box) == originals
    # 0.1.0's compiled, bundled psutil/systemd are gone; Debian's are used
    assert box.sh("find /usr/lib/gpucostd -name '*.so*' -o -name psutil -o -name systemd "
                  "| wc -l").stdout.strip() == "0"
    # and the event database is 0640 like the other state files
    assert box.sh("stat -c %a /var/lib/gpucostd/events.sqlite").stdout.strip() == "640"
    _log(f"upgraded to 0.2.0: {len(before)} events and 8 originals kept, service restarted")


# --------------------------------------------------------------------------- python3.13
# What the Python 3.13 run runs: the tests whose outcome can differ by interpreter or by
# Debian's own libraries, named by what differs. gpucostd is pure Python; what changes between
# 3.9 and 3.13 (and between PyPI's wheels and Debian's packages) is the standard library and
# those libraries, so every place the code meets one of them is here. The rest of the suite
# (the physics, the cost maths, the judges, the end-to-end process tests) runs the same Python
# paths again on data: it proves the logic, which the host's 3.11 run proves once for every
# version. Every module is also imported under 3.13 (PY313_IMPORT_ALL), so a syntax, typing or
# import-time difference anywhere fails here even in a module no selected test reaches.
PY313_TESTS = (
    # TOML: tomllib (3.11+) in place of tomli; the config's dataclasses and typing; errors
    # with file and line; the scenario files; the Xid catalog as TOML data
    "test_core_config.py", "test_config_dropins.py", "test_scenario.py", "test_xid_catalog.py",
    # YAML (Debian's python3-yaml: the web config's nesting difference was found here), ssl
    # (trixie's OpenSSL 3.5), basic auth without the crypt module (removed in 3.13); the
    # Kubernetes manifests read by the same YAML loader
    "test_webconfig.py", "test_kubernetes.py",
    # http.server / socketserver parsing of bad requests and the status socket's JSON
    "test_core_bad_input.py", "test_http.py",
    # ctypes: pynvml's marshalling over the simulated library, its structs and field values
    # (the MIG structs and handles included)
    "test_simnvml.py", "test_nvml_gateway.py", "test_nvml_fields.py", "test_gpm.py",
    "test_mig.py",
    # TOML subtables ([drain.slurm]) and the drain worker thread; http.client + ssl of the
    # Kubernetes back end (skipped there without openssl to make its certificate)
    "test_drain.py", "test_drain_kubernetes.py",
    # sqlite3 (trixie's SQLite) and Debian's python3-systemd journal
    "test_events.py",
    # Debian's python3-psutil (7.0) over the fixture trees
    "test_deploy_checks.py", "test_discovery.py", "test_host_checks.py",
    # argparse's output and what `status` imports (3.13's import graph)
    "test_cli_output.py", "test_cli_light.py",
    # the loaders: os.open flags, json, stat on this kernel
    "test_file_loader.py",
    # trixie's systemd-analyze on the unit; an install without systemd-python
    "test_systemd_unit.py", "test_without_systemd.py",
    # the daemon as a process under 3.13: signals, threads, sockets, sd_notify, the whole loop
    "test_core_daemon.py",
    # the parser of the whole package under 3.13 (ast), and the parts' typed contract
    "test_layering.py", "test_parts.py",
)
# every module of the package imported once (a module no selected test imports included)
PY313_IMPORT_ALL = (
    "import importlib, pkgutil, gpucostd, gpucostd.probes, gpucostd.tuners; "
    "pkgs = (gpucostd, gpucostd.probes, gpucostd.tuners); "
    "names = [m.name for p in pkgs for m in pkgutil.walk_packages(p.__path__, p.__name__ + '.')"
    " if not m.name.endswith('__main__')]; "
    "[importlib.import_module(n) for n in names]; print('IMPORTED', len(names), 'modules')")


class Py313Suite:
    """A named selection of the unit tests (PY313_TESTS: those whose outcome can differ by
    interpreter or by Debian's libraries) in a Debian 13 copy under Debian's python3.13 with
    Debian's own python3-psutil, python3-systemd and python3-yaml (a venv with
    --system-site-packages), and every module imported once. The pinned pure-Python
    dependencies, pytest and nvidia-nvml-dev are downloaded by the host's pip (its index, mirror
    and certificate settings) into $GPUCOSTD_TEST_CACHE/wheelhouse-py313 and installed offline
    in the container. Started in the background as soon as the module begins (the boot proofs
    mostly wait), at nice 19 and the idle I/O class so that it does not compete with the host's
    run; test_30 collects it."""

    USER = "tester"

    def __init__(self):
        self.proc = None
        self.skip = None
        self.work = None
        self.t0 = 0.0

    @staticmethod
    def test_extra():
        """The [test] extra of pyproject.toml, less systemd-python (Debian's python3-systemd
        is the one under test)."""
        from test_packaging import tomllib
        with open(REPO / "pyproject.toml", "rb") as f:
            extras = tomllib.load(f)["project"]["optional-dependencies"]
        extra = extras["test"] + extras.get("auth", [])     # as dev-env.sh: .[test,auth]
        return [d for d in extra if not d.lower().startswith("systemd-python")]

    def start(self):
        if self.proc is not None or self.skip is not None:
            return
        self.skip = _mirror_unreachable("trixie")
        if self.skip:
            return
        user = self.USER
        cache = ensure_rootfs("trixie", PYTEST_PACKAGES, "trixie-pytest-rootfs", user=user)
        wheels = CACHE / "wheelhouse-py313"
        wheels.mkdir(parents=True, exist_ok=True)
        r = subprocess.run([sys.executable, "-m", "pip", "download", "-q",
                            "--disable-pip-version-check", "--only-binary=:all:",
                            "--python-version", "3.13", "-d", str(wheels),
                            "-r", str(REPO / "packaging" / "requirements.lock"),
                            *self.test_extra(), "setuptools>=77"],
                           capture_output=True, text=True, timeout=600)
        if r.returncode != 0 and not any(wheels.glob("pytest-*.whl")):
            self.skip = ("cannot download the wheels for python3.13 from PyPI: "
                         + (r.stderr.strip().splitlines() or ["?"])[-1])
            return
        self.work = fresh_copy(cache, "gpucostd-py313-")
        rootfs = self.work / "rootfs"
        entry = [line.split(":") for line in (rootfs / "etc/passwd").read_text().splitlines()
                 if line.startswith(user + ":")][0]
        uid, gid = int(entry[2]), int(entry[3])
        home = rootfs / "home" / user
        src = home / "src"
        src.mkdir(parents=True)
        subprocess.run(f"git -C '{REPO}' ls-files -z -co --exclude-standard | "
                       f"tar -C '{REPO}' --null -T - -cf - | tar -C '{src}' -xf -",
                       shell=True, check=True)
        venv = f"/home/{user}/venv"
        pip = (f"{venv}/bin/python -m pip install -q --disable-pip-version-check --no-index "
               f"--find-links /wheels")
        (home / "run-tests.sh").write_text(
            "set -e\ncd ~/src\n"
            f"python3 -m venv --system-site-packages {venv}\n"
            f"{venv}/bin/python -c 'import sys, psutil, systemd.journal as j; "
            f"print(\"PYINFO\", sys.version.split()[0], psutil.__version__, j.__file__)'\n"
            f"{pip} -r packaging/requirements.lock {' '.join(repr(x) for x in self.test_extra())}"
            f"\n{pip} -e .\n"
            f"{venv}/bin/python -c {shlex.quote(PY313_IMPORT_ALL)}\n"
            f"exec {venv}/bin/python -m pytest -q -ra -p no:cacheprovider "
            f"{' '.join('tests/' + t for t in PY313_TESTS)}\n")
        for path in [home, *home.rglob("*")]:
            os.lchown(path, uid, gid)
        self.log = self.work / "pytest.log"
        self._logf = open(self.log, "wb")
        # as root only to give systemd-analyze its /run/systemd (the container is not booted);
        # the tests themselves run as the unprivileged user
        self.t0 = time.monotonic()
        # at the lowest CPU and I/O priority: it runs beside the host's own run of the same
        # tests (pytest-xdist workers) and takes only the time they leave idle
        self.proc = subprocess.Popen(
            ["nice", "-n", "19", "ionice", "-c", "3",
             "systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "-D", str(rootfs),
             f"--bind-ro={wheels}:/wheels", "sh", "-c",
             f"mkdir -p /run/systemd && exec runuser -u {user} -- "
             f"env HOME=/home/{user} sh /home/{user}/run-tests.sh"],
            stdin=subprocess.DEVNULL, stdout=self._logf, stderr=subprocess.STDOUT,
            start_new_session=True)
        _log("python3.13 unit tests started in a trixie copy (background)")

    def result(self, timeout=900):
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        self._logf.close()
        return self.proc.returncode, self.log.read_text(errors="replace")

    def cleanup(self):
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        if self.work is not None:
            shutil.rmtree(self.work, ignore_errors=True)


PY313 = Py313Suite()


def _start_py313_if_selected(request):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return      # pytest-xdist: test_30 runs on a worker of its own and starts it there
    if any(item.name.startswith("test_30_") for item in request.session.items):
        PY313.start()


def test_30_unit_tests_pass_under_debian_13_python313():
    _mark_start()
    try:
        PY313.start()
        if PY313.skip:
            pytest.skip(PY313.skip)
        rc, out = PY313.result()
        info = re.search(r"PYINFO (\S+) (\S+) (\S+)", out)
        assert info, out[-3000:]
        _log(f"trixie: python {info.group(1)}, psutil {info.group(2)}, {info.group(3)}; "
             f"venv + unit tests took {time.monotonic() - PY313.t0:.0f} s")
        assert info.group(1).startswith("3.13.")
        assert info.group(3).startswith("/usr/lib/python3/dist-packages/systemd/")
        imported = re.search(r"IMPORTED (\d+) modules", out)
        assert imported and int(imported.group(1)) > 50, \
            "every module imported under python3.13:\n" + out[-6000:]
        summary = [line for line in out.splitlines() if re.search(r"\d+ passed", line)]
        assert rc == 0 and summary, "unit tests under python3.13:\n" + out[-6000:]
        assert " failed" not in summary[-1] and " error" not in summary[-1], summary[-1]
        _log("python3.13: " + re.sub(r"\x1b\[[0-9;]*m", "", summary[-1]).strip("= "))
    finally:
        PY313.cleanup()


# --------------------------------------------------------------------------- build on Debian 13
BUILD_PACKAGES = BASE_PACKAGES + ",debhelper,dpkg-dev,fakeroot,rpm,lintian,rpmlint,python3," \
    "python3-venv,git"


def _rpm_view(rootfs: Path, rpm: str) -> str:
    """What an rpm says about a package file, read by the rootfs's own rpm."""
    r = nspawn_run(rootfs, f"rpm -qpl {rpm} | grep -v '^/usr/lib/gpucostd/' && echo ---- && "
                   f"rpm -qp --scripts {rpm} && echo ---- && rpm -qpR {rpm} | sort && "
                   f"echo ---- && rpm -qpc {rpm}")
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_40_build_sh_on_debian_13_builds_both_packages():
    """packaging/build.sh, as a user runs it, in a Debian 13 root filesystem (rpm 4.20, rpmlint
    2.7, lintian and debhelper of trixie): both packages build and pass lint, and rpm 4.20 reads
    the .rpm built there and the one built here on Debian 12 (rpm 4.18) alike: the same files,
    the unit under /usr/lib/systemd/system, scriptlets with systemctl and no unexpanded macro.
    The pinned wheels come from the host's pip (the container's pip has no index)."""
    _mark_start()
    reason = _mirror_unreachable("trixie")
    if reason:
        pytest.skip(reason)
    host_rpm = built_packages()["rpm"]
    work = fresh_copy(ensure_rootfs("trixie", BUILD_PACKAGES, "trixie-build-rootfs"),
                      "gpucostd-build-trixie-")
    rootfs = work / "rootfs"
    try:
        wheels = rootfs / "wheels"
        r = subprocess.run([sys.executable, "-m", "pip", "download", "-q",
                            "--disable-pip-version-check", "--no-deps", "--only-binary=:all:",
                            "--implementation", "py", "--abi", "none", "--platform", "any",
                            "--python-version", "3.9", "-d", str(wheels), "-r", str(REPO / "packaging/requirements.lock"),
                            "setuptools>=77"], capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            pytest.skip(f"cannot download the pinned wheels from PyPI: {r.stderr[-500:]}")
        files = subprocess.run(["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard",
                                "-z"], capture_output=True, check=True).stdout
        (rootfs / "src").mkdir()
        subprocess.run(["tar", "--null", "-T", "-", "-cf", str(work / "src.tar")], cwd=REPO,
                       input=files, check=True)
        subprocess.run(["tar", "-C", str(rootfs / "src"), "-xf", str(work / "src.tar")],
                       check=True)
        shutil.copy2(host_rpm, rootfs / "root" / host_rpm.name)
        t0 = time.monotonic()
        r = nspawn_run(rootfs, "rpm --version && cd /src && sh packaging/build.sh",
                       timeout=900, extra=("--setenv=PIP_NO_INDEX=1",
                                           "--setenv=PIP_FIND_LINKS=/wheels"))
        _log(f"build.sh on Debian 13: exit {r.returncode} after {time.monotonic() - t0:.0f} s"
             f" ({r.stdout.splitlines()[0] if r.stdout else ''})")
        assert r.returncode == 0, f"build.sh on Debian 13:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
        assert "RPM version 4.20" in r.stdout, r.stdout[:200]
        assert "build.sh: built dist/" in r.stdout + r.stderr
        here = _rpm_view(rootfs, f"/root/{host_rpm.name}")
        there = _rpm_view(rootfs, f"/src/dist/{host_rpm.name}")
        assert here == there, f"Debian 12's .rpm:\n{here}\nDebian 13's .rpm:\n{there}"
        listing, scripts, requires, config = there.split("----\n")
        assert "/usr/lib/systemd/system/gpucostd.service" in listing.split()
        assert "/usr/share/doc/gpucostd/README.md" in listing.split()
        assert "systemctl" in scripts and "%" not in scripts, scripts
        assert config.split() == ["/etc/gpucostd/gpucostd.toml"]
        debs = subprocess.run(["dpkg-deb", "-c", str(built_packages()["deb"])],
                              capture_output=True, text=True).stdout
        trixie_deb = rootfs / "src" / "dist" / built_packages()["deb"].name
        trixie_debs = subprocess.run(["dpkg-deb", "-c", str(trixie_deb)], capture_output=True,
                                     text=True).stdout

        def names(listing):
            return sorted(line.split()[5] for line in listing.splitlines())
        assert names(debs) == names(trixie_debs), "the .deb differs between Debian 12 and 13"
    finally:
        shutil.rmtree(work, ignore_errors=True)
