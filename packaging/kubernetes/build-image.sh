#!/bin/sh
# Build the gpucostd container image without a registry or a container engine:
#
#     packaging/kubernetes/build-image.sh [DEB]        # as root on Debian 12
#
# 1. a Debian 12 minbase root filesystem with python3 and the package's dependencies, from
#    debootstrap, cached in $GPUCOSTD_IMAGE_BASE (default /var/cache/gpucostd-image/bookworm-base);
# 2. the .deb (DEB, else dist/gpucostd_<version>_{all,<arch>}.deb, built by packaging/build.sh
#    when missing) installed into a copy of it with dpkg inside systemd-nspawn (apt fetches a
#    dependency the cached base lacks; no service is started);
# 3. packed by oci-pack.py (ours, stdlib only) as an OCI image layout build/image/gpucostd-oci
#    and the archive build/image/gpucostd-oci.tar: `podman load -i build/image/gpucostd-oci.tar`,
#    or `skopeo copy oci-archive:build/image/gpucostd-oci.tar docker://REGISTRY/gpucostd:TAG`.
# A rebuild is skipped when the .deb and the base are unchanged (build/image/SOURCE).
set -eu
say() { printf 'build-image.sh: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
[ "$(id -u)" = 0 ] || die "needs root (debootstrap, systemd-nspawn)"
command -v systemd-nspawn >/dev/null || die "systemd-nspawn missing: apt-get install systemd-container"
VERSION=$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
ARCH=$(dpkg --print-architecture)
find_deb() { ls dist/gpucostd_"${VERSION}"_all.deb dist/gpucostd_"${VERSION}"_"${ARCH}".deb 2>/dev/null | head -n1; }
DEB=${1:-$(find_deb)}
if [ -z "$DEB" ] || [ ! -f "$DEB" ]; then
    say "no dist/gpucostd_${VERSION}_*.deb: building it with packaging/build.sh"
    GPUCOSTD_SKIP_LINT=1 packaging/build.sh
    DEB=$(find_deb)
    [ -n "$DEB" ] || die "packaging/build.sh left no dist/gpucostd_${VERSION}_*.deb"
fi
BASE=${GPUCOSTD_IMAGE_BASE:-/var/cache/gpucostd-image/bookworm-base}
MIRROR=${GPUCOSTD_DEBIAN_MIRROR:-http://deb.debian.org/debian}
# what the .deb depends on, preinstalled so dpkg -i needs no network (python3-yaml: the web
# config; python3-bcrypt: basic auth; debootstrap resolves no virtual packages, so its
# python3-cffi-backend is named)
INCLUDE=python3,python3-psutil,python3-systemd,python3-yaml,procps,systemd-standalone-sysusers,python3-bcrypt,python3-cffi-backend,ca-certificates
if [ ! -f "$BASE/etc/debian_version" ]; then
    command -v debootstrap >/dev/null || die "debootstrap missing: apt-get install debootstrap"
    say "debootstrap bookworm minbase into $BASE (cached for later builds)"
    rm -rf "$BASE.tmp"
    mkdir -p "$(dirname "$BASE")"
    debootstrap --variant=minbase --include=$INCLUDE bookworm "$BASE.tmp" "$MIRROR" >&2
    mv "$BASE.tmp" "$BASE"
fi
W=build/image
mkdir -p "$W"
SOURCE="deb $(sha256sum "$DEB" | cut -d' ' -f1) base $(cat "$BASE/etc/debian_version") $(sha256sum packaging/kubernetes/oci-pack.py | cut -d' ' -f1)"
if [ -f "$W/SOURCE" ] && [ "$(cat "$W/SOURCE")" = "$SOURCE" ] && [ -f "$W/gpucostd-oci/index.json" ]; then
    say "image up to date: $W/gpucostd-oci"
    exit 0
fi
rm -rf "$W/rootfs" "$W/SOURCE"
cp -a "$BASE" "$W/rootfs"
cp "$DEB" "$W/rootfs/var/tmp/gpucostd.deb"
printf '#!/bin/sh\nexit 101\n' > "$W/rootfs/usr/sbin/policy-rc.d"   # start no service
chmod 755 "$W/rootfs/usr/sbin/policy-rc.d"
# apt resolves what the base lacks (a dependency added since the base was cached) from the mirror
systemd-nspawn --quiet --register=no --keep-unit --pipe -D "$W/rootfs" sh -ec '
    export DEBIAN_FRONTEND=noninteractive
    dpkg -i /var/tmp/gpucostd.deb || {
        apt-get update -qq && apt-get install -f -y -qq --no-install-recommends; }
    dpkg-query -W -f="\${Status}" gpucostd | grep -q "install ok installed"
    apt-get clean' >&2 || die "installing the .deb failed in the image"
rm -f "$W/rootfs/var/tmp/gpucostd.deb" "$W/rootfs/usr/sbin/policy-rc.d"
rm -rf "$W/rootfs/var/cache/apt/"*.bin "$W/rootfs/var/lib/apt/lists/"* "$W/rootfs/var/log/"*.log
# the image's own writable paths are mounts (the DaemonSet's volumes); create the mount points
mkdir -p "$W/rootfs/var/lib/gpucostd" "$W/rootfs/run/gpucostd" "$W/rootfs/etc/gpucostd"
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)} \
    python3 packaging/kubernetes/oci-pack.py "$W/rootfs" "$W/gpucostd-oci" \
    --ref "gpucostd:$VERSION" --entrypoint /usr/bin/gpucostd --cmd run --port 9477 >/dev/null
echo "$SOURCE" > "$W/SOURCE"
rm -rf "$W/rootfs"
say "built $W/gpucostd-oci and $W/gpucostd-oci.tar (gpucostd:$VERSION, $(du -sh "$W/gpucostd-oci.tar" | cut -f1))"
