#!/usr/bin/env bash
# Set up a development environment in .venv on Debian 12 (or Ubuntu): the apt packages the
# Python dependencies build against, a virtualenv with gpucostd installed editable, and with
# --test everything the test suite uses (promtool, debootstrap, systemd-nspawn, lintian, rpm...).
# Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."

want_tests=0
[ "${1:-}" = "--test" ] && want_tests=1

SUDO=""
if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null && SUDO="sudo" || { echo "dev-env: need root or sudo for apt-get" >&2; exit 1; }
fi

pkgs=(python3 python3-venv python3-dev gcc pkg-config libsystemd-dev)
if [ "$want_tests" = 1 ]; then
    # iproute2: netns/veth tests; prometheus: promtool; debootstrap + systemd-container: the
    # package proof in a booted Debian 12; lintian, rpm, rpmlint, debhelper, fakeroot: packaging.
    pkgs+=(iproute2 prometheus debootstrap systemd-container lintian rpm rpmlint debhelper
           fakeroot dpkg-dev python3-pip systemd
           prometheus-node-exporter)   # the textfile collector test
fi
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "dev-env: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
if [ "$want_tests" = 1 ]; then
    # nvidia-nvml-dev: the real nvml.h, to check the simulator against.
    .venv/bin/python -m pip install -q -e '.[test,auth]' nvidia-nvml-dev
else
    .venv/bin/python -m pip install -q -e .
fi
echo "dev-env: ready (.venv)" >&2
