"""The proof: the freshly built .deb installed into a clean Debian 12 booted under systemd.

    sudo .venv/bin/python -m pytest -v -s tests/test_nspawn.py

1. packaging/build.sh builds the .deb from this tree (shared with tests/test_packaging.py).
2. A minimal Debian 12 (bookworm) root filesystem is debootstrapped once and cached in
   $GPUCOSTD_ROOTFS_CACHE (default /var/cache/gpucostd-test/bookworm-rootfs); each run works on
   a fresh `cp -a` copy, so installs never accumulate.
3. In that copy (not booted yet) `apt-get install --download-only ./gpucostd_*.deb` fetches the
   dependencies from Debian's archive ($GPUCOSTD_DEBIAN_MIRROR) alone. A drop-in makes the unit
   run on the simulated node (`gpucostd run --simulate`; there is no GPU) with a 5 s watchdog.
4. The copy boots with `systemd-nspawn --boot --register=no --keep-unit --private-network`
   (a private network: port 9477 inside never meets the host's); everything else runs inside
   through `nsenter -t <container init> -a`: apt-get install (start on install), status text,
   `gpucostd status` as a non-root member of group gpucostd, /metrics, reload, broken reload,
   journal MESSAGE_IDs, SIGSTOP -> watchdog restart, stop -> settings restored, purge.

The tests in this module run in order on one container. Needs root, debootstrap, systemd-nspawn
and nsenter; network access to the Debian mirror unless the rootfs is cached AND the packages
were downloaded before (they are fetched on every run).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import wait_for

REPO = Path(__file__).resolve().parents[1]
ROOTFS_CACHE = Path(os.environ.get("GPUCOSTD_ROOTFS_CACHE",
                                   "/var/cache/gpucostd-test/bookworm-rootfs"))
MIRROR = os.environ.get("GPUCOSTD_DEBIAN_MIRROR", "http://deb.debian.org/debian")
BUDGET_SECONDS = 600          # the whole proof, build included, on a 2-core machine
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


def _log(msg):
    print(f"[nspawn {time.monotonic() - _T0:6.1f} s] {msg}", flush=True)


def ensure_rootfs() -> Path:
    """The cached bookworm rootfs, debootstrapped on first use (about a minute)."""
    stamp = ROOTFS_CACHE / "etc" / "gpucostd-test-rootfs"
    if stamp.exists():
        return ROOTFS_CACHE
    if ROOTFS_CACHE.exists() and (ROOTFS_CACHE / "usr/bin/systemctl").exists() \
            and (ROOTFS_CACHE / "etc/debian_version").read_text().startswith("12."):
        stamp.write_text("debootstrap bookworm minbase + systemd, systemd-sysv, dbus\n")
        return ROOTFS_CACHE
    ROOTFS_CACHE.parent.mkdir(parents=True, exist_ok=True)
    tmp = ROOTFS_CACHE.with_name(ROOTFS_CACHE.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    _log(f"debootstrap bookworm into {ROOTFS_CACHE} (cached for later runs)")
    r = subprocess.run(["debootstrap", "--variant=minbase", "--include=systemd,systemd-sysv,dbus",
                        "bookworm", str(tmp), MIRROR], capture_output=True, text=True,
                       timeout=900)
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        pytest.fail(f"debootstrap failed (mirror {MIRROR}; set GPUCOSTD_DEBIAN_MIRROR):\n"
                    f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    (tmp / "etc" / "gpucostd-test-rootfs").write_text(
        "debootstrap bookworm minbase + systemd, systemd-sysv, dbus\n")
    tmp.rename(ROOTFS_CACHE)
    return ROOTFS_CACHE


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
        state = wait_for(lambda: self.sh("systemctl is-system-running --wait", timeout=timeout,
                                         check=False).stdout.strip() or None,
                         timeout=timeout, what="container boot")
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


def _mirror_unreachable():
    import urllib.request
    url = f"{MIRROR}/dists/bookworm/InRelease"
    try:
        with urllib.request.urlopen(url, timeout=15) as r:
            r.read(64)
        return None
    except OSError as e:
        return (f"Debian mirror unreachable ({url}: {e}); the proof resolves the package's "
                f"dependencies from Debian's archive (set GPUCOSTD_DEBIAN_MIRROR to a reachable "
                f"mirror)")


@pytest.fixture(scope="module")
def box():
    global _T0
    _T0 = time.monotonic()
    reason = _mirror_unreachable()
    if reason:
        pytest.skip(reason)
    deb = built_packages()["deb"]
    _log(f"built {deb.name}")
    cache = ensure_rootfs()
    work = Path(tempfile.mkdtemp(prefix="gpucostd-nspawn-", dir=str(cache.parent)))
    rootfs = work / "rootfs"
    subprocess.run(["cp", "-a", "--reflink=auto", str(cache), str(rootfs)], check=True)
    _log(f"fresh rootfs copy in {rootfs}")
    shutil.copy2(deb, rootfs / "root" / deb.name)
    c = Container(rootfs, work / "nspawn.log")
    c.deb = deb.name
    # Dependencies from Debian's archive only: resolve and download them now (host network),
    # install later inside the booted container (private network) from apt's cache.
    shutil.copy2("/etc/resolv.conf", rootfs / "etc" / "resolv.conf")
    r = subprocess.run(
        ["systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "-D", str(rootfs),
         "--setenv=DEBIAN_FRONTEND=noninteractive", "sh", "-c",
         f"apt-get update -qq && apt-get install -y -qq --download-only /root/{deb.name}"],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"downloading the dependencies failed:\n{r.stdout}\n{r.stderr}"
    _log("dependencies downloaded from " + MIRROR)
    c.write("/etc/systemd/system/gpucostd.service.d/10-simulate.conf", DROPIN)
    try:
        c.boot()
        _log("container booted")
        yield c
    finally:
        c.poweroff()
        shutil.rmtree(work, ignore_errors=True)
        _log("container gone")


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
    r = box.sh("systemd-analyze verify /lib/systemd/system/gpucostd.service", check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert box.sh("stat -c '%a %U %G' /run/gpucostd/gpucostd.sock").stdout.strip() == \
        "660 root gpucostd"
    # it really runs under the hardened unit (the simulator's ctypes callbacks included)
    assert box.prop("MemoryDenyWriteExecute") == "yes"
    assert box.prop("ProtectSystem") == "strict"
    assert box.prop("Type") == "notify"


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


def test_12_purge_removes_service_state_group_and_files(box):
    ids = gpucostd_journal_ids()
    wait_for(lambda: "GPUs" in box.prop("StatusText"), timeout=30, what="service ready")
    cursor = box.cursor()
    box.sh("apt-get purge -y gpucostd", timeout=180)
    # remove stopped it, and the stop restored the tuned settings
    restored = [e for e in box.journal(after=cursor)
                if e.get("MESSAGE_ID") == ids["setting_restored"]]
    assert len(restored) == 8, box.journal_tail()
    r = box.sh("systemctl list-unit-files gpucostd.service --no-legend", check=False)
    assert "gpucostd" not in r.stdout
    assert box.sh("getent group gpucostd", check=False).returncode == 2
    for path in ("/var/lib/gpucostd", "/run/gpucostd", "/usr/lib/gpucostd", "/usr/bin/gpucostd",
                 "/lib/systemd/system/gpucostd.service", "/usr/lib/sysusers.d/gpucostd.conf",
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


def test_13_whole_proof_within_budget(box):
    elapsed = time.monotonic() - _T0
    _log(f"whole proof (build + rootfs + boot + checks): {elapsed:.0f} s on {os.cpu_count()} CPUs")
    assert elapsed < BUDGET_SECONDS
