"""Packaging: the default config, the pinned dependencies, the Prometheus rules, and the .deb and
.rpm that `packaging/build.sh` builds (contents, dependencies, maintainer scripts, lintian and
rpmlint without errors)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Optional

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGING = REPO / "packaging"
DIST = REPO / "dist"

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _version() -> str:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["version"]


def _arch(cmd) -> Optional[str]:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


BUILD_TOOLS = ("dpkg-buildpackage", "dh", "rpmbuild", "lintian", "rpmlint")


def build_skip_reason() -> Optional[str]:
    """Why packaging/build.sh cannot run here, or None."""
    if not Path("/usr/bin/dpkg").exists() or not Path("/usr/bin/python3").exists():
        return "building the packages needs a Debian host (dpkg, /usr/bin/python3)"
    missing = [t for t in BUILD_TOOLS if shutil.which(t) is None]
    if missing and os.geteuid() != 0:
        return (f"build tools missing ({', '.join(missing)}) and not root, so packaging/build.sh "
                f"cannot apt-get install them; run as root or install them")
    return None


_BUILT: Dict[str, Path] = {}


def built_packages() -> Dict[str, Path]:
    """Run packaging/build.sh once per test session; return {"deb": path, "rpm": path}.

    Shared with tests/test_nspawn.py (imported from there), so the proof installs the package
    built from this very tree. The build log is attached to the failure message."""
    if _BUILT:
        return _BUILT
    reason = build_skip_reason()
    if reason:
        pytest.skip(reason)
    env = dict(os.environ, GPUCOSTD_SKIP_LINT="1")   # lint is asserted by its own tests
    t0 = time.monotonic()
    r = subprocess.run([str(PACKAGING / "build.sh")], cwd=str(REPO), env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"packaging/build.sh failed:\n{r.stdout}\n{r.stderr}"
    version = _version()
    deb = DIST / f"gpucostd_{version}_{_arch(['dpkg', '--print-architecture'])}.deb"
    rpm = DIST / f"gpucostd-{version}.{_arch(['rpm', '--eval', '%{_arch}'])}.rpm"
    assert deb.is_file(), f"{deb} not built:\n{r.stderr}"
    assert rpm.is_file(), f"{rpm} not built:\n{r.stderr}"
    _BUILT.update(deb=deb, rpm=rpm)
    print(f"packaging/build.sh took {time.monotonic() - t0:.0f} s")
    return _BUILT


def run(*argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=300, **kw)


# --------------------------------------------------------------------------- source-level checks
def test_default_config_only_monitors():
    from gpucostd import config
    text = (PACKAGING / "gpucostd.toml").read_text()
    shipped = config.parse(text, "packaging/gpucostd.toml")
    defaults = config.parse("", None)
    as_root = defaults.as_dict()
    as_root["daemon"]["socket_path"] = config.DEFAULT_SOCKET   # the one explicit key
    as_root["daemon"]["state_dir"] = shipped.as_dict()["daemon"]["state_dir"]
    assert shipped.as_dict() == as_root
    assert shipped.daemon.socket_path == "/run/gpucostd/gpucostd.sock"
    assert not shipped.gpu_settings_for(0, "GPU-x", "NVIDIA H100 80GB HBM3")[0]
    assert not shipped.gpu_overrides and not dict(shipped.nic_tuning)


def test_default_config_documents_valid_keys():
    """Every commented example in the shipped config is valid when uncommented (no typo'd keys
    for admins to copy)."""
    from gpucostd import config
    text = (PACKAGING / "gpucostd.toml").read_text()
    uncommented = re.sub(r"(?m)^#(?=[a-z\[\"])", "", text)
    cfg = config.parse(uncommented, "uncommented gpucostd.toml")
    assert cfg.gpu_settings_for(0, None, "x")[0]["power_limit_watts"] == 600
    assert "eth0" in cfg.nic_tuning


def test_requirements_lock_pins_every_runtime_dependency():
    with open(REPO / "pyproject.toml", "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    wanted = {re.split(r"[<>=;! ]", d, 1)[0].lower() for d in deps if "python_version <" not in d}
    pins = {}
    for line in (PACKAGING / "requirements.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9_.-]+)==([0-9][0-9A-Za-z.]*)", line)
            assert m, f"requirements.lock: {line!r} is not an exact pin name==version"
            pins[m.group(1).lower()] = m.group(2)
    assert set(pins) == wanted
    major, minor = (int(x) for x in pins["pyroute2"].split(".")[:2])
    assert (major, minor) >= (0, 7), "pyroute2 >= 0.7.11 has ethtool ring support"


def test_launcher_is_isolated_and_uses_the_private_tree():
    text = (PACKAGING / "gpucostd.launcher").read_text()
    assert text.startswith("#!@PYTHON@ -I\n")
    assert 'sys.path.insert(0, "/usr/lib/gpucostd")' in text
    assert "from gpucostd.cli import main" in text


def test_prometheus_rules_pass_promtool():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian: apt-get install prometheus)")
    rules = PACKAGING / "prometheus" / "gpucostd-rules.yml"
    r = run(promtool, "check", "rules", str(rules))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout
    r = run(promtool, "test", "rules", "gpucostd-rules.test.yml", cwd=str(rules.parent))
    assert r.returncode == 0, "alert rule unit tests failed:\n" + r.stdout + r.stderr
    text = rules.read_text()
    for name in ("gpucostd_gpu_health == 2", "gpucostd_node_health == 1", "for: 10m",
                 "gpucostd_node_throttle_cost_dollars_per_hour", 'up{job="gpucostd"} == 0'):
        assert name in text


# --------------------------------------------------------------------------- built packages
@pytest.mark.slow
def test_deb_contents_and_dependencies():
    deb = built_packages()["deb"]
    files = run("dpkg-deb", "-c", str(deb)).stdout
    for path in ("./usr/bin/gpucostd", "./lib/systemd/system/gpucostd.service",
                 "./usr/lib/sysusers.d/gpucostd.conf", "./etc/gpucostd/gpucostd.toml",
                 "./usr/lib/gpucostd/gpucostd/cli.py", "./usr/lib/gpucostd/pynvml.py",
                 "./usr/lib/gpucostd/pyroute2/", "./usr/lib/gpucostd/psutil/",
                 "./usr/lib/gpucostd/systemd/journal.py",
                 "./usr/lib/gpucostd/prometheus_client/", "./usr/share/man/man8/gpucostd.8.gz"):
        assert f" {path}" in files, f"{path} missing from {deb.name}"
    assert "__pycache__" not in files and ".pyc" not in files
    assert not re.search(r" \./usr/lib/gpucostd/bin/", files)
    info = run("dpkg-deb", "-f", str(deb), "Depends").stdout.strip()
    deps = [d.strip() for d in info.split(",")]
    assert "python3 (>= 3.11)" in deps and "python3 (<< 3.12)" in deps
    names = {re.split(r"[ (|]", d, 1)[0] for d in deps}
    # only what Debian itself provides: no python3-* library packages
    # (procps: /bin/kill of the unit's ExecReload; not in a minimal Debian)
    assert names <= {"python3", "libc6", "libsystemd0", "systemd", "procps"}, deps
    ctl = subprocess.run(f"dpkg-deb -I '{deb}' conffiles", shell=True, capture_output=True,
                         text=True).stdout
    assert "/etc/gpucostd/gpucostd.toml" in ctl
    launcher = subprocess.run(f"dpkg-deb --fsys-tarfile '{deb}' | tar -xO ./usr/bin/gpucostd",
                              shell=True, capture_output=True, text=True).stdout
    assert launcher.startswith("#!/usr/bin/python3 -I\n")


@pytest.mark.slow
def test_deb_maintainer_scripts_use_debian_systemd_helpers():
    deb = built_packages()["deb"]
    scripts = {name: subprocess.run(f"dpkg-deb -I '{deb}' {name}", shell=True,
                                    capture_output=True, text=True).stdout
               for name in ("postinst", "prerm", "postrm")}
    assert "deb-systemd-helper enable 'gpucostd.service'" in scripts["postinst"]
    assert "deb-systemd-invoke $_dh_action 'gpucostd.service'" in scripts["postinst"]
    assert "_dh_action=restart" in scripts["postinst"]               # restart on upgrade
    assert "systemd-sysusers" in scripts["postinst"] and "gpucostd.conf" in scripts["postinst"]
    # the group exists before the service starts (socket chown)
    assert scripts["postinst"].index("systemd-sysusers") < scripts["postinst"].index(
        "deb-systemd-invoke")
    assert "deb-systemd-invoke stop 'gpucostd.service'" in scripts["prerm"]
    assert "deb-systemd-helper purge 'gpucostd.service'" in scripts["postrm"]
    assert "rm -rf /var/lib/gpucostd" in scripts["postrm"]
    assert "groupdel gpucostd" in scripts["postrm"]


@pytest.mark.slow
def test_lintian_reports_no_errors():
    if shutil.which("lintian") is None:
        pytest.skip("lintian not installed (apt-get install lintian)")
    deb = built_packages()["deb"]
    r = run("lintian", "--fail-on", "error", str(deb))
    assert r.returncode == 0, r.stdout + r.stderr
    errors = [line for line in r.stdout.splitlines() if line.startswith("E:")]
    assert not errors, errors
    # every warning left is explained in packaging/README.md
    readme = (PACKAGING / "README.md").read_text()
    for line in r.stdout.splitlines():
        if line.startswith("W:"):
            tag = line.split()[2]
            assert tag in readme, f"lintian warning {tag} is not explained in packaging/README.md"


@pytest.mark.slow
def test_rpm_lists_unit_binary_config_and_scriptlets():
    if shutil.which("rpm") is None:
        pytest.skip("rpm not installed (apt-get install rpm)")
    rpm = built_packages()["rpm"]
    files = run("rpm", "-qpl", str(rpm)).stdout.splitlines()
    for path in ("/usr/bin/gpucostd", "/usr/lib/systemd/system/gpucostd.service",
                 "/etc/gpucostd/gpucostd.toml", "/usr/lib/sysusers.d/gpucostd.conf",
                 "/usr/lib/gpucostd/gpucostd/cli.py"):
        assert path in files, f"{path} missing from {rpm.name}"
    config = run("rpm", "-qpc", str(rpm)).stdout.split()
    assert config == ["/etc/gpucostd/gpucostd.toml"]
    # %config(noreplace)
    dump = run("rpm", "-qp", "--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}\n]", str(rpm)).stdout
    assert re.search(r"^/etc/gpucostd/gpucostd.toml cn$", dump, re.M), dump
    scripts = run("rpm", "-qp", "--scripts", str(rpm)).stdout
    assert "groupadd -r gpucostd" in scripts.split("postinstall")[0]           # %pre
    assert "systemctl --no-reload preset gpucostd.service" in scripts or \
        "systemd-update-helper install-system-units gpucostd.service" in scripts  # %systemd_post
    assert "disable --now gpucostd.service" in scripts or \
        "remove-system-units gpucostd.service" in scripts                    # %systemd_preun
    assert "try-restart gpucostd.service" in scripts or \
        "mark-restart-system-units gpucostd.service" in scripts              # postun_with_restart
    requires = run("rpm", "-qpR", str(rpm)).stdout
    assert "python3.11" in requires


@pytest.mark.slow
def test_rpmlint_reports_no_errors():
    if shutil.which("rpmlint") is None:
        pytest.skip("rpmlint not installed (apt-get install rpmlint)")
    rpm = built_packages()["rpm"]
    r = run("rpmlint", "-r", str(PACKAGING / "rpm" / "rpmlintrc"), str(rpm))
    assert r.returncode == 0, r.stdout + r.stderr
    assert " 0 errors" in r.stdout, r.stdout
    readme = (PACKAGING / "README.md").read_text()
    for line in r.stdout.splitlines():
        m = re.match(r"\S+: W: (\S+)", line)
        if m:
            assert m.group(1) in readme, \
                f"rpmlint warning {m.group(1)} is not explained in packaging/README.md"
