"""packaging/dev-env.sh, the README's first command, as a user without root runs it: it asks
for root (or sudo) only when an apt package is missing, says which, and keeps DEBIAN_FRONTEND
under sudo. apt-get, sudo, dpkg-query, id and python are stand-ins that record their calls;
nothing is installed."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOLS = ("bash", "env", "grep", "dirname", "cat", "mkdir", "chmod")


def _stub(path: Path, body: str) -> None:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)


@pytest.fixture
def tree(tmp_path):
    """A copy of dev-env.sh in a tree of its own, and a PATH of stand-ins only."""
    (tmp_path / "src" / "packaging").mkdir(parents=True)
    shutil.copy2(REPO / "packaging" / "dev-env.sh", tmp_path / "src" / "packaging")
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for tool in TOOLS:
        found = shutil.which(tool)
        if found is None:
            pytest.skip(f"{tool} not found")
        os.symlink(found, bin_ / tool)
    log = tmp_path / "calls.log"
    missing = tmp_path / "missing"
    missing.write_text("")
    _stub(bin_ / "id", 'echo 1000\n')
    _stub(bin_ / "dpkg-query", f'grep -qx "${{@: -1}}" {missing} || echo "install ok installed"\n')
    _stub(bin_ / "apt-get", f'echo "apt-get DEBIAN_FRONTEND=$DEBIAN_FRONTEND $*" >> {log}\n')
    # a venv that is a stub: `python -m venv .venv` makes .venv/bin/python, which records pip
    _stub(bin_ / "fakepython", f'mkdir -p .venv/bin; printf "#!/bin/bash\\necho pip \\"\\$*\\" '
                               f'>> {log}\\n" > .venv/bin/python; chmod +x .venv/bin/python\n')
    return {"src": tmp_path / "src", "bin": bin_, "log": log, "missing": missing}


def _run(tree, *args):
    env = {"PATH": str(tree["bin"]), "PYTHON": "fakepython", "HOME": str(tree["src"])}
    r = subprocess.run(["bash", str(tree["src"] / "packaging" / "dev-env.sh"), *args],
                       capture_output=True, text=True, env=env, timeout=60)
    calls = tree["log"].read_text().splitlines() if tree["log"].exists() else []
    return r, calls


def test_without_sudo_and_nothing_missing_it_sets_up_without_asking_for_root(tree):
    r, calls = _run(tree, "--test")
    assert r.returncode == 0, r.stderr
    assert "dev-env: ready" in r.stderr
    assert not [c for c in calls if c.startswith("apt-get")], calls
    assert any(c.startswith("pip") and "-e" in c for c in calls), calls


def test_without_sudo_it_names_the_missing_packages(tree):
    tree["missing"].write_text("promtool-never\nprometheus\nrpmlint\n")
    r, calls = _run(tree, "--test")
    assert r.returncode == 1
    assert "missing apt packages: prometheus rpmlint" in r.stderr, r.stderr
    assert "apt-get install prometheus rpmlint" in r.stderr, r.stderr
    assert calls == []


def test_under_sudo_debian_frontend_reaches_apt_get(tree):
    tree["missing"].write_text("gcc\n")
    _stub(tree["bin"] / "sudo", 'env -i PATH="$PATH" "$@"\n')      # sudo drops the environment
    r, calls = _run(tree)
    assert r.returncode == 0, r.stderr
    apt = [c for c in calls if c.startswith("apt-get")]
    assert apt == ["apt-get DEBIAN_FRONTEND=noninteractive update -qq",
                   "apt-get DEBIAN_FRONTEND=noninteractive install -y -qq "
                   "--no-install-recommends gcc"], calls
