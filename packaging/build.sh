#!/bin/sh
# Build the gpucostd packages from the source tree:
#
#     packaging/build.sh            # as root on Debian 12 or 13 (or Ubuntu), from any directory
#
# Produces dist/gpucostd_<version>_all.deb and dist/gpucostd-<version>.noarch.rpm (one of each
# for every architecture and every Python 3.9+ of the targets), then runs
# lintian and rpmlint on them (failing on errors). Installs its own build tools with apt-get
# when they are missing. Work files go to build/pkg (removed and recreated on every run).
#
# Environment:
#   GPUCOSTD_SKIP_LINT=1   skip lintian/rpmlint (tests run them separately)
#   PIP_* variables        passed to pip (e.g. PIP_INDEX_URL for a local mirror)
set -eu

say() { printf 'build.sh: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
[ -f pyproject.toml ] && [ -d daemon ] || die "$ROOT does not look like the gpucostd source tree"

# --------------------------------------------------------------------------- build tools
# Nothing is compiled: the packages are architecture- and interpreter-independent (Debian
# "Architecture: all", RPM "noarch"). The build host's python3 only runs pip; any 3.9+ does.
PY=/usr/bin/python3
NEEDED="debhelper dpkg-dev fakeroot rpm lintian rpmlint python3 python3-venv"
missing=""
for p in $NEEDED; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    [ "$(id -u)" = 0 ] || die "missing build tools:$missing; run as root or: sudo apt-get install$missing"
    say "installing build tools:$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
[ -x "$PY" ] || die "$PY not found"
PYVER=$($PY -c 'import sys; print("%d.%d" % sys.version_info[:2])')

VERSION=$(sed -n 's/^version = "\([^"]*\)"$/\1/p' pyproject.toml | head -1)
[ -n "$VERSION" ] || die "no version = \"...\" line in pyproject.toml"
PKGVERSION=$(sed -n 's/^__version__ = "\([^"]*\)"$/\1/p' daemon/__init__.py)
[ "$VERSION" = "$PKGVERSION" ] || die "pyproject.toml says $VERSION, daemon/__init__.py $PKGVERSION"
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}
export SOURCE_DATE_EPOCH
say "gpucostd $VERSION (all / noarch; build host python $PYVER)"

B="$ROOT/build/pkg"
# One build at a time per tree (test runs may start it concurrently): wait for the other one.
mkdir -p "$ROOT/build"
exec 9>"$ROOT/build/.pkg.lock"
flock 9
rm -rf "$B"
mkdir -p "$B" "$ROOT/dist"

# --------------------------------------------------------------------------- private Python tree
# Only pure-Python wheels (tag py3-none-any) of the pinned dependencies, resolved for the
# oldest supported Python (3.9), go into the package's /usr/lib/gpucostd; psutil,
# systemd-python and PyYAML come from the distribution (python3-psutil, python3-systemd,
# python3-yaml / python3-pyyaml), built there for its own python3. A throwaway venv of the system interpreter gives a pip that may install;
# everything lands in --target, never in the venv or the system.
$PY -m venv "$B/venv"
PIP="$B/venv/bin/python -m pip --disable-pip-version-check --no-input --no-cache-dir"
PURE="--no-deps --no-compile --only-binary=:all: --implementation py --abi none --platform any
--python-version 3.9"
LIB="$B/common/usr/lib/gpucostd"
mkdir -p "$LIB"
say "installing the pinned pure-Python dependencies (packaging/requirements.lock)"
# shellcheck disable=SC2086
$PIP install --quiet $PURE --target "$LIB" -r packaging/requirements.lock

# The package itself, as a wheel built from a clean copy of the source tree.
mkdir -p "$B/src" "$B/wheel"
cp -a pyproject.toml daemon probes tuners "$B/src/"
if [ -f README.md ]; then cp README.md "$B/src/"; else echo "gpucostd" > "$B/src/README.md"; fi
find "$B/src" -name __pycache__ -prune -exec rm -rf {} +
say "building and installing gpucostd $VERSION into /usr/lib/gpucostd"
$PIP wheel --quiet --no-deps -w "$B/wheel" "$B/src" >/dev/null
# shellcheck disable=SC2086
$PIP install --quiet $PURE --upgrade --target "$LIB" "$B/wheel"/gpucostd-"$VERSION"-py3-none-any.whl

# Console scripts that pip wrote are replaced by our launcher; nvidia-ml-py's wheel carries a
# stray top-level example.py that is not part of pynvml.
rm -rf "$LIB/bin" "$LIB/example.py"
find "$LIB" -name __pycache__ -prune -exec rm -rf {} +
find "$LIB" -name RECORD -path '*.dist-info/*' -delete   # pip RECORDs list build paths
# Library modules are imported, never run: drop their "#!/usr/bin/python" lines (lintian:
# unusual-interpreter) so nothing in the tree points at an interpreter the package doesn't use.
find "$LIB" -name '*.py' ! -perm -u+x -exec sed -i '1{/^#!/d}' {} +
# What may be in the tree, and nothing else: no compiled code, no stray top-level module.
for entry in "$LIB"/*; do
    name=$(basename "$entry")
    case "$name" in
        gpucostd|pynvml.py|pyroute2|prometheus_client|tomli|*.dist-info) ;;
        *) die "unexpected top-level entry /usr/lib/gpucostd/$name (add it here only on purpose)" ;;
    esac
done
compiled=$(find "$LIB" -type f \( -name '*.so' -o -name '*.so.*' -o -name '*.pyd' -o -name '*.pyc' \) | head -3)
[ -z "$compiled" ] || die "compiled files in the private tree: $compiled"
for mod in gpucostd pynvml.py pyroute2 prometheus_client tomli; do
    [ -e "$LIB/$mod" ] || die "$mod missing from the private tree"
done
$PY -I -B -c "import sys; sys.path.insert(0, '$LIB'); import gpucostd.cli, pynvml, pyroute2, \
prometheus_client, tomli" || die "the private tree does not import with $PY"

# Shared payload: the default config (monitoring only) and the man page.
install -D -m 0644 packaging/gpucostd.toml "$B/common/etc/gpucostd/gpucostd.toml"
DOCREADME=README.md; [ -f "$DOCREADME" ] || DOCREADME=packaging/README.md

launcher() {  # launcher PYTHON DEST
    install -d "$(dirname "$2")"
    sed "s|@PYTHON@|$1|" packaging/gpucostd.launcher > "$2"
    chmod 0755 "$2"
}

# --------------------------------------------------------------------------- .deb
D="$B/deb/gpucostd-$VERSION"
mkdir -p "$D"
cp -a packaging/debian "$D/debian"
cp systemd/gpucostd.service "$D/debian/gpucostd.service"
cp systemd/gpucostd.sysusers "$D/debian/gpucostd.sysusers"
mkdir -p "$D/stage" "$D/stage-doc"
cp -a "$B/common/." "$D/stage/"
launcher /usr/bin/python3 "$D/stage/usr/bin/gpucostd"
cp packaging/gpucostd.8 "$D/stage-doc/gpucostd.8"
cp "$DOCREADME" "$D/stage-doc/README.md"
mkdir -p "$D/stage-doc/docs"
cp docs/*.md "$D/stage-doc/docs/"           # what the README links to
printf 'stage-doc/README.md\nstage-doc/docs\n' > "$D/debian/gpucostd.docs"
CHDATE=$(date -u -R -d "@$SOURCE_DATE_EPOCH")
cat > "$D/debian/changelog" <<EOF
gpucostd ($VERSION) unstable; urgency=medium

  * Built from the source tree by packaging/build.sh.

 -- gpucostd maintainers <gpucostd@example.org>  $CHDATE
EOF
say "building the .deb (dpkg-buildpackage)"
(cd "$D" && dpkg-buildpackage -b -us -uc --no-check-builddeps >"$B/deb/build.log" 2>&1) \
    || { tail -40 "$B/deb/build.log" >&2; die "dpkg-buildpackage failed (log: $B/deb/build.log)"; }
DEB="gpucostd_${VERSION}_all.deb"
cp "$B/deb/$DEB" "$ROOT/dist/$DEB"

# --------------------------------------------------------------------------- .rpm
R="$B/rpm"
S="$R/stage"
mkdir -p "$S/_docs" "$R/SOURCES" "$R/SPECS"
cp -a "$B/common/." "$S/"
# RHEL 9: /usr/bin/python3 is 3.9, RHEL 10: 3.12 (the interpreter python3-psutil and
# python3-systemd are built for; the extra python3.11/3.12 streams of RHEL 9 are not used).
launcher /usr/bin/python3 "$S/usr/bin/gpucostd"
install -D -m 0644 systemd/gpucostd.service "$S/usr/lib/systemd/system/gpucostd.service"
install -D -m 0644 systemd/gpucostd.sysusers "$S/usr/lib/sysusers.d/gpucostd.conf"
install -D -m 0644 packaging/gpucostd.8 "$S/usr/share/man/man8/gpucostd.8"
gzip -9n "$S/usr/share/man/man8/gpucostd.8"
cp "$DOCREADME" "$S/_docs/README.md"
mkdir -p "$S/_docs/docs"
cp docs/*.md "$S/_docs/docs/"
cp packaging/debian/copyright "$S/_docs/COPYRIGHT"
tar --sort=name --mtime="@$SOURCE_DATE_EPOCH" --owner=0 --group=0 --numeric-owner \
    -C "$S" -czf "$R/SOURCES/gpucostd-$VERSION-stage.tar.gz" .
cp packaging/rpm/gpucostd.spec "$R/SPECS/"
set -- --define "_topdir $R" --define "pkg_version $VERSION" \
    --define "_build_name_fmt %%{NAME}-%%{VERSION}.%%{ARCH}.rpm" \
    --define "packager gpucostd maintainers <gpucostd@example.org>"
# Source1: systemd's scriptlet macros for an rpm that lacks them (Debian's); the spec loads it.
cp packaging/rpm/macros.systemd-fallback "$R/SOURCES/"
say "building the .rpm (rpmbuild)"
rpmbuild -bb --nodeps "$@" "$R/SPECS/gpucostd.spec" >"$R/build.log" 2>&1 \
    || { tail -40 "$R/build.log" >&2; die "rpmbuild failed (log: $R/build.log)"; }
RPM="gpucostd-$VERSION.noarch.rpm"
# A macro left unexpanded in a scriptlet would run as a shell command on the target: refuse.
if rpm -qp --scripts "$R/RPMS/$RPM" | grep -n '%[a-z_{]' >&2; then
    die "unexpanded macros in the .rpm's scriptlets (above): this rpm lacks systemd's macros"
fi
cp "$R/RPMS/$RPM" "$ROOT/dist/$RPM"

# --------------------------------------------------------------------------- lint
if [ "${GPUCOSTD_SKIP_LINT:-0}" != 1 ]; then
    say "lintian dist/$DEB"
    lintian --fail-on error "dist/$DEB" || die "lintian reports errors"
    say "rpmlint dist/$RPM"
    # packaging/rpm/rpmlintrc filters no-signature (packages are signed by the release key at
    # publication, rpmsign --addsign, never by this build) and two rpmlint 2.7 errors it explains.
    # Some filters are for one rpmlint only (2.4 on Debian 12, 2.7 on Debian 13): an unused
    # one is not an error.
    rpmlint --ignore-unused-rpmlintrc -r packaging/rpm/rpmlintrc "dist/$RPM" \
        || die "rpmlint reports errors"
fi
say "built dist/$DEB and dist/$RPM"
