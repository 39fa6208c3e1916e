"""Packaging: the default config, the pinned dependencies, the Prometheus rules, and the .deb and
.rpm that `packaging/build.sh` builds (contents, dependencies, maintainer scripts, lintian and
rpmlint without errors)."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
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
_BUILD_FAILED: list = []
# pytest-xdist workers of one run share this id: the first worker that needs the packages
# builds them, the others (test_nspawn's containers, test_image) wait on the lock and reuse them
_RUN_ID = os.environ.get("PYTEST_XDIST_TESTRUNUID")


@contextlib.contextmanager
def build_lock():
    """One packaging/build.sh at a time on this tree (it recreates build/pkg and dist/)."""
    tag = hashlib.sha256(str(REPO).encode()).hexdigest()[:12]
    with open(os.path.join(tempfile.gettempdir(), f"gpucostd-build-{tag}.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def built_packages() -> Dict[str, Path]:
    """Run packaging/build.sh once per test session; return {"deb": path, "rpm": path}.

    Shared with tests/test_nspawn.py (imported from there), so the proof installs the package
    built from this very tree. The build log is attached to the failure message."""
    if _BUILT:
        return _BUILT
    if _BUILD_FAILED:
        pytest.fail("packaging/build.sh failed earlier in this session:\n" + _BUILD_FAILED[0])
    reason = build_skip_reason()
    if reason:
        pytest.skip(reason)
    version = _version()
    # one package of each kind for every architecture and Python: Architecture all, noarch
    deb = DIST / f"gpucostd_{version}_all.deb"
    rpm = DIST / f"gpucostd-{version}.noarch.rpm"
    stamp = DIST / ".built-by-run"
    with build_lock():
        if _RUN_ID and deb.is_file() and rpm.is_file() and stamp.is_file() and \
                stamp.read_text() == _RUN_ID:
            _BUILT.update(deb=deb, rpm=rpm)       # another worker of this run built them
            return _BUILT
        env = dict(os.environ, GPUCOSTD_SKIP_LINT="1")   # lint is asserted by its own tests
        t0 = time.monotonic()
        r = subprocess.run([str(PACKAGING / "build.sh")], cwd=str(REPO), env=env,
                           capture_output=True, text=True, timeout=900)
        problem = None
        if r.returncode != 0:
            problem = f"packaging/build.sh failed:\n{r.stdout}\n{r.stderr}"
        elif not deb.is_file() or not rpm.is_file():
            problem = f"{deb.name} or {rpm.name} not built:\n{r.stderr}"
        if problem:
            _BUILD_FAILED.append(problem)
            pytest.fail(problem)
        if _RUN_ID:
            stamp.write_text(_RUN_ID)
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


def _pins() -> Dict[str, str]:
    pins = {}
    for line in (PACKAGING / "requirements.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9_.-]+)==([0-9][0-9A-Za-z.]*)", line)
            assert m, f"requirements.lock: {line!r} is not an exact pin name==version"
            pins[m.group(1).lower()] = m.group(2)
    return pins


# from the distribution, never bundled: the packages Depend/Require python3-psutil,
# python3-systemd (compiled there for the distribution's own python3) and PyYAML (python3-yaml,
# python3-pyyaml: in every target's base archive, with libyaml's C loader)
DISTRO_PROVIDED = {"psutil", "systemd-python", "pyyaml"}


def test_man_page_synopsis_lists_every_command_and_option():
    """`man gpucostd` shows every command of the CLI with every option it takes."""
    import argparse
    from gpucostd.cli import build_parser
    man = (PACKAGING / "gpucostd.8").read_text()
    synopsis = man.split(".SH SYNOPSIS\n")[1].split(".SH ")[0].replace("\\-", "-")
    entries = {}
    for block in synopsis.split(".br\n"):
        head = block.split("\n")[0]
        assert head.startswith(".B gpucostd "), block
        entries[head[len(".B gpucostd "):]] = block

    def subparsers(parser):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                return action.choices
        return {}
    commands = {}
    for name, sub in subparsers(build_parser()).items():
        nested = subparsers(sub)
        for inner, parser in (nested.items() if nested else [("", sub)]):
            commands[f"{name} {inner}".strip()] = parser
    assert set(entries) == set(commands), (sorted(entries), sorted(commands))
    for name, parser in commands.items():
        for action in parser._actions:
            longs = [o for o in action.option_strings if o.startswith("--") and o != "--help"]
            if longs:
                assert longs[0] in entries[name], f"{longs[0]} of `gpucostd {name}` not in the man page"


def test_requirements_lock_pins_every_bundled_dependency():
    with open(REPO / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    deps = project["dependencies"]
    names = {re.split(r"[<>=;! ]", d, 1)[0].lower() for d in deps}
    pins = _pins()
    assert set(pins) == names - DISTRO_PROVIDED, "bundle exactly the non-distribution deps"
    assert not set(pins) & DISTRO_PROVIDED
    major, minor = (int(x) for x in pins["pyroute2"].split(".")[:2])
    assert (major, minor) >= (0, 7), "pyroute2 >= 0.7.11 has ethtool ring support"
    # systemd-python compiles against libsystemd: an extra for pip, never a hard dependency
    assert "systemd-python" not in names
    assert any(d.startswith("systemd-python") for d in project["optional-dependencies"]["systemd"])


def test_python_versions_declared_without_a_cap():
    with open(REPO / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    assert project["requires-python"] == ">=3.9"        # no upper bound that refuses 3.13+
    declared = {c.rsplit(" ", 1)[1] for c in project["classifiers"]
                if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)}
    assert declared == {"3.9", "3.10", "3.11", "3.12", "3.13"}
    assert isinstance(project["license"], str)           # SPDX string, not the deprecated table
    from gpucostd import __version__
    assert project["version"] == __version__


def test_bundled_dependencies_are_pure_python_wheels(tmp_path):
    """Every pin resolves to a py3-none-any wheel for Python 3.9 (what build.sh installs)."""
    if os.environ.get("GPUCOSTD_OFFLINE") == "1":
        pytest.skip("GPUCOSTD_OFFLINE=1: no PyPI")
    r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        "--only-binary=:all:", "--implementation", "py", "--abi", "none",
                        "--platform", "any", "--python-version", "3.9", "-d", str(tmp_path),
                        "-r", str(PACKAGING / "requirements.lock")],
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and ("Network" in r.stderr or "connection" in r.stderr.lower()):
        pytest.skip("PyPI unreachable: " + r.stderr.strip().splitlines()[-1])
    assert r.returncode == 0, r.stderr
    wheels = sorted(p.name for p in tmp_path.iterdir())
    assert len(wheels) == len(_pins()) and all(w.endswith("-py3-none-any.whl") for w in wheels)


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
ALLOWED_TOP = re.compile(r"(gpucostd|pynvml\.py|pyroute2|prometheus_client|tomli|"
                         r"[A-Za-z0-9_.]+-[0-9][0-9A-Za-z.]*\.dist-info)$")
COMPILED = re.compile(r"\.(so|pyd|pyc|a|o)(\.[0-9.]+)?$")


def _private_tree(paths):
    """Top-level entries under /usr/lib/gpucostd, and every compiled file in the payload."""
    top, compiled = set(), []
    for path in paths:
        path = path.lstrip(".")
        if path.startswith("/usr/lib/gpucostd/"):
            rest = path[len("/usr/lib/gpucostd/"):].strip("/")
            if rest:
                top.add(rest.split("/", 1)[0])
        if COMPILED.search(path):
            compiled.append(path)
    return top, compiled


@pytest.mark.slow
def test_deb_is_architecture_and_interpreter_independent():
    deb = built_packages()["deb"]
    assert deb.name.endswith("_all.deb")
    assert run("dpkg-deb", "-f", str(deb), "Architecture").stdout.strip() == "all"
    files = run("dpkg-deb", "-c", str(deb)).stdout
    for path in ("./usr/bin/gpucostd", "./usr/lib/systemd/system/gpucostd.service",
                 "./usr/lib/sysusers.d/gpucostd.conf", "./etc/gpucostd/gpucostd.toml",
                 "./usr/lib/gpucostd/gpucostd/cli.py", "./usr/lib/gpucostd/pynvml.py",
                 "./usr/lib/gpucostd/pyroute2/", "./usr/lib/gpucostd/tomli/",
                 "./usr/lib/gpucostd/prometheus_client/", "./usr/share/man/man8/gpucostd.8.gz",
                 "./usr/lib/gpucostd/gpucostd/sim/scenarios/h100x8.toml",
                 "./usr/lib/gpucostd/gpucostd/health/xid_catalog.toml"):
        assert f" {path}" in files, f"{path} missing from {deb.name}"
    paths = [line.split()[5] for line in files.splitlines()]
    top, compiled = _private_tree(paths)
    assert not compiled, f"compiled files in {deb.name}: {compiled[:5]}"
    assert "__pycache__" not in files
    strays = sorted(t for t in top if not ALLOWED_TOP.match(t))
    assert not strays, f"unexpected top-level entries in /usr/lib/gpucostd: {strays}"
    assert "example.py" not in top                          # nvidia-ml-py's stray example
    assert not {"psutil", "systemd"} & top, "psutil/systemd come from the distribution"
    assert not re.search(r" \./usr/lib/gpucostd/bin/", files)
    info = run("dpkg-deb", "-f", str(deb), "Depends").stdout.strip()
    deps = [" ".join(d.split()) for d in info.split(",")]
    assert deps[:5] == ["python3 (>= 3.9)", "python3-psutil (>= 5.8)",
                        "python3-systemd (>= 234)", "procps", "python3-yaml (>= 5.4)"], deps
    assert not any("<<" in d or "python3.1" in d for d in deps), deps   # no interpreter pin
    # only what Debian and Ubuntu carry in main (procps: /bin/kill of the unit's ExecReload)
    names = {n for d in deps for n in re.findall(r"(?:^|\| )([a-z0-9][a-z0-9+.-]*)", d)}
    assert names <= {"python3", "python3-psutil", "python3-systemd", "procps", "python3-yaml",
                     "systemd", "systemd-standalone-sysusers", "systemd-sysusers"}, deps
    # bcrypt (basic_auth_users of a web config) is wanted, not required: Debian 13's Python
    # has no crypt module to fall back on, and apt installs Recommends by default
    assert run("dpkg-deb", "-f", str(deb), "Recommends").stdout.split() == ["python3-bcrypt"]
    ctl = subprocess.run(f"dpkg-deb -I '{deb}' conffiles", shell=True, capture_output=True,
                         text=True).stdout
    assert "/etc/gpucostd/gpucostd.toml" in ctl
    launcher = subprocess.run(f"dpkg-deb --fsys-tarfile '{deb}' | tar -xO ./usr/bin/gpucostd",
                              shell=True, capture_output=True, text=True).stdout
    assert launcher.startswith("#!/usr/bin/python3 -I\n")


@pytest.mark.slow
def test_packages_ship_the_documents_the_unit_and_readme_point_to():
    """The unit's Documentation= and the README's docs/ links name files the packages install
    as they are (not gzipped); the unit lives under /usr/lib/systemd/system (Debian 13 keeps its
    units there; under /lib its purge warns that the directory is not empty)."""
    unit = (REPO / "systemd" / "gpucostd.service").read_text()
    docs = re.search(r"^Documentation=(.*)$", unit, re.M).group(1).split()
    assert "man:gpucostd(8)" in docs
    wanted = ["/usr/share/man/man8/gpucostd.8.gz"]
    wanted += [d[len("file://"):] for d in docs if d.startswith("file://")]
    linked = sorted(set(re.findall(r"\]\((docs/[a-z-]+\.md)", (REPO / "README.md").read_text())))
    assert linked, "the README links no docs/*.md"
    wanted += [f"/usr/share/doc/gpucostd/{d}" for d in linked]
    packages = built_packages()
    deb_files = {line.split()[5][1:].rstrip("/")
                 for line in run("dpkg-deb", "-c", str(packages["deb"])).stdout.splitlines()}
    assert not [p for p in deb_files if p.startswith("/lib/")], "nothing under /lib"
    assert "/usr/lib/systemd/system/gpucostd.service" in deb_files
    missing = [p for p in wanted if p not in deb_files]
    assert not missing, f"named by the unit or the README but not in the .deb: {missing}"
    if shutil.which("rpm"):
        rpm_files = set(run("rpm", "-qpl", str(packages["rpm"])).stdout.split())
        missing = [p for p in wanted if p not in rpm_files]
        assert not missing, f"named by the unit or the README but not in the .rpm: {missing}"


@pytest.mark.slow
def test_private_tree_compiles_on_every_supported_python(tmp_path):
    """The payload is plain source for 3.9 to 3.13: each interpreter found here (pyenv,
    /usr/bin) byte-compiles all of /usr/lib/gpucostd. Versions not found are reported."""
    deb = built_packages()["deb"]
    subprocess.run(f"dpkg-deb -x '{deb}' '{tmp_path}'", shell=True, check=True)
    tree = tmp_path / "usr" / "lib" / "gpucostd"
    found, missing = {}, []
    for minor in range(9, 14):
        exe = shutil.which(f"python3.{minor}")
        if exe is None or "/shims/" in exe:        # a pyenv shim runs only its selected version
            pyenv = sorted(Path(os.path.expanduser("~/.pyenv/versions")).glob(f"3.{minor}.*"))
            exe = str(pyenv[-1] / "bin" / "python3") if pyenv else None
        if exe is None:
            missing.append(f"3.{minor}")
            continue
        r = subprocess.run([exe, "-c", "import compileall, sys; sys.exit(not compileall."
                            f"compile_dir({str(tree)!r}, quiet=2, legacy=False, "
                            "force=True))"], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"{exe}: {r.stdout}{r.stderr}"
        found[f"3.{minor}"] = exe
    print(f"compiled with {sorted(found)}; not found here: {missing}")
    if not found:
        pytest.skip("no Python 3.9..3.13 interpreter found")


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


def rhel_names():
    """{"el9": {"names": {name: version}, "files": {...}}, "el10": ...} from the fixture."""
    out: Dict[str, Dict[str, dict]] = {}
    text = (REPO / "tests" / "fixtures" / "rhel_package_names.txt").read_text()
    for line in text.splitlines():
        line = line.split("#", 1)[0].split()
        if not line:
            continue
        rel = out.setdefault(line[0], {"names": {}, "files": {}})
        if line[1] == "file":
            rel["files"][line[2]] = True
        else:
            rel["names"][line[1]] = line[2]
    return out


def _vtuple(v):
    return tuple(int(x) for x in re.findall(r"\d+", v))


@pytest.mark.slow
def test_rpm_is_noarch_with_unit_binary_config_and_scriptlets():
    if shutil.which("rpm") is None:
        pytest.skip("rpm not installed (apt-get install rpm)")
    rpm = built_packages()["rpm"]
    assert rpm.name.endswith(".noarch.rpm")
    assert run("rpm", "-qp", "--qf", "%{ARCH}", str(rpm)).stdout == "noarch"
    files = run("rpm", "-qpl", str(rpm)).stdout.splitlines()
    for path in ("/usr/bin/gpucostd", "/usr/lib/systemd/system/gpucostd.service",
                 "/etc/gpucostd/gpucostd.toml", "/usr/lib/sysusers.d/gpucostd.conf",
                 "/usr/lib/gpucostd/gpucostd/cli.py", "/usr/lib/gpucostd/tomli/__init__.py"):
        assert path in files, f"{path} missing from {rpm.name}"
    top, compiled = _private_tree(files)
    assert not compiled, f"compiled files in {rpm.name}: {compiled[:5]}"
    assert not [t for t in top if not ALLOWED_TOP.match(t)], top
    config = run("rpm", "-qpc", str(rpm)).stdout.split()
    assert config == ["/etc/gpucostd/gpucostd.toml"]
    # %config(noreplace)
    dump = run("rpm", "-qp", "--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}\n]", str(rpm)).stdout
    assert re.search(r"^/etc/gpucostd/gpucostd.toml cn$", dump, re.M), dump
    scripts = run("rpm", "-qp", "--scripts", str(rpm)).stdout
    assert "groupadd -r gpucostd" in scripts.split("postinstall")[0]           # %pre
    assert "/usr/bin/python3 -m compileall" in scripts                       # %post, any 3.x
    assert "python3." not in scripts                                         # no version pin
    assert "systemctl --no-reload preset gpucostd.service" in scripts or \
        "systemd-update-helper install-system-units gpucostd.service" in scripts  # %systemd_post
    assert "disable --now gpucostd.service" in scripts or \
        "remove-system-units gpucostd.service" in scripts                    # %systemd_preun
    assert "try-restart gpucostd.service" in scripts or \
        "mark-restart-system-units gpucostd.service" in scripts              # postun_with_restart
    launcher = subprocess.run(f"rpm2cpio '{rpm}' | cpio -i --quiet --to-stdout ./usr/bin/gpucostd",
                              shell=True, capture_output=True, text=True).stdout
    assert launcher.startswith("#!/usr/bin/python3 -I\n")


@pytest.mark.slow
def test_rpm_requires_only_what_rhel_9_and_10_carry():
    """Every Requires of the built .rpm is a package name (or file) that RHEL 9 and RHEL 10
    ship in BaseOS/AppStream, per tests/fixtures/rhel_package_names.txt (sources inside), and
    every version floor is met by the oldest release's version there."""
    if shutil.which("rpm") is None:
        pytest.skip("rpm not installed (apt-get install rpm)")
    rpm = built_packages()["rpm"]
    known = rhel_names()
    assert set(known) == {"el9", "el10"}
    requires = run("rpm", "-qpR", str(rpm)).stdout.splitlines()
    seen = set()
    for req in requires:
        req = req.strip()
        if not req or req.startswith("rpmlib(") or req.startswith("config(gpucostd)"):
            continue
        name, _, floor = req.partition(" >= ")
        seen.add(name)
        for rel, have in known.items():
            if name.startswith("/"):
                assert name in have["files"], f"{rel} has no {name} (Requires: {req})"
                continue
            assert name in have["names"], f"{rel} carries no package {name} (Requires: {req})"
            if floor:
                assert _vtuple(have["names"][name]) >= _vtuple(floor), \
                    f"{rel} ships {name} {have['names'][name]}, below the floor in {req!r}"
    assert {"python3", "python3-psutil", "python3-systemd", "python3-pyyaml",
            "systemd"} <= seen, requires
    assert not any(r.startswith("python3.") or "python(abi)" in r for r in requires), requires
    # python3-bcrypt is EPEL-only on RHEL: a weak dependency, never a Requires
    assert run("rpm", "-qp", "--recommends", str(rpm)).stdout.split() == ["python3-bcrypt"]
    assert "python3-bcrypt" not in seen


@pytest.mark.slow
def test_rpmlint_reports_no_errors():
    if shutil.which("rpmlint") is None:
        pytest.skip("rpmlint not installed (apt-get install rpmlint)")
    rpm = built_packages()["rpm"]
    r = run("rpmlint", "--ignore-unused-rpmlintrc", "-r", str(PACKAGING / "rpm" / "rpmlintrc"),
            str(rpm))
    assert r.returncode == 0, r.stdout + r.stderr
    assert " 0 errors" in r.stdout, r.stdout
    readme = (PACKAGING / "README.md").read_text()
    for line in r.stdout.splitlines():
        m = re.match(r"\S+: W: (\S+)", line)
        if m:
            assert m.group(1) in readme, \
                f"rpmlint warning {m.group(1)} is not explained in packaging/README.md"
