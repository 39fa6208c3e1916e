#!/usr/bin/env bash
# Set up a development environment in .venv on Debian 12 (or Ubuntu): the apt packages the
# Python dependencies build against, a virtualenv with gpucostd installed editable, and with
# --test everything the test suite uses (promtool, debootstrap, systemd-nspawn, lintian, rpm...).
# Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."

want_tests=0
[ "${1:-}" = "--test" ] && want_tests=1

# gcc, pkg-config, libsystemd-dev, python3-dev: systemd-python (the [systemd] extra) compiles.
pkgs=(python3 python3-venv python3-dev gcc pkg-config libsystemd-dev)
if [ "$want_tests" = 1 ]; then
    # iproute2: netns/veth tests; prometheus: promtool; debootstrap + systemd-container: the
    # package proof in booted Debian 12 and 13; lintian, rpm, rpmlint, debhelper, fakeroot:
    # packaging; procps: /bin/kill, the unit's ExecReload (systemd-analyze verify checks it);
    # git: the upgrade test builds the 0.1.0 package from the history.
    pkgs+=(iproute2 prometheus debootstrap systemd-container lintian rpm rpmlint debhelper
           fakeroot dpkg-dev python3-pip systemd procps git
           prometheus-node-exporter   # the textfile collector test
           slurm-wlm munge)            # the drain back end against a real slurmctld + slurmd
fi
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    # Root (or sudo) only when something is missing; sudo drops the environment, so
    # DEBIAN_FRONTEND goes on its command line.
    APT=(env DEBIAN_FRONTEND=noninteractive apt-get)
    if [ "$(id -u)" != 0 ]; then
        if ! command -v sudo >/dev/null; then
            echo "dev-env: missing apt packages: ${missing[*]}; install them as root" \
                 "(apt-get install ${missing[*]}) or install sudo, then run this again" >&2
            exit 1
        fi
        APT=(sudo "${APT[@]}")
    fi
    echo "dev-env: installing ${missing[*]}" >&2
    "${APT[@]}" update -qq
    "${APT[@]}" install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
# setuptools reports every editable install of a mapped layout (gpucostd -> daemon/) with an
# informational note ("Editable installation. Please be careful with folders ... named like
# your package"); there is no such folder here, so that one note, matched by its first words,
# is not printed. Every other build warning still shows.
export PYTHONWARNINGS="ignore:Editable installation"
# [systemd]: systemd-python (journal fields, kernel_log = "journal"); [test] has it too, plus
# pytest, hypothesis and nvidia-nvml-dev (the real nvml.h, to check the simulator against).
if [ "$want_tests" = 1 ]; then
    .venv/bin/python -m pip install -q -e '.[test,auth]'     # auth: bcrypt (web config tests)
else
    .venv/bin/python -m pip install -q -e '.[systemd]'
fi
echo "dev-env: ready (.venv)" >&2
