#!/usr/bin/env python3
"""Pack a root filesystem directory as a one-layer OCI image layout (no registry, no daemon).

    oci-pack.py ROOTFS OUTDIR --ref gpucostd:0.1.0 [--entrypoint /usr/bin/gpucostd] [--cmd run]
                [--port 9477]

Writes OUTDIR/oci-layout, OUTDIR/index.json and OUTDIR/blobs/sha256/* (OCI image-spec 1.0: the
layer a gzipped tar of ROOTFS, the image config, the manifest), and OUTDIR.tar (the same layout
as one archive: `podman load -i OUTDIR.tar`, `skopeo copy oci-archive:OUTDIR.tar ...`).
Reproducible: entries sorted, mtimes clamped to SOURCE_DATE_EPOCH, gzip without a timestamp.
/dev, /proc, /sys and /run contents are left out (the runtime provides them).
Also: `oci-pack.py --unpack OUTDIR DEST` extracts the image's filesystem (the tests run it).
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import sys
import tarfile
import tempfile

SKIP = ("dev/", "proc/", "sys/", "run/")


def _blob(out: str, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    path = os.path.join(out, "blobs", "sha256", digest)
    with open(path, "wb") as f:
        f.write(data)
    return "sha256:" + digest


def _layer(rootfs: str, out: str, epoch: int):
    def norm(info: tarfile.TarInfo):
        name = info.name[2:] if info.name.startswith("./") else info.name
        if any(name.startswith(s) and name != s.rstrip("/") for s in SKIP):
            return None
        info.mtime = min(info.mtime, epoch)
        info.uname = info.gname = ""
        return info
    with tempfile.TemporaryFile() as raw:
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for entry in sorted(os.listdir(rootfs)):
                tar.add(os.path.join(rootfs, entry), arcname="./" + entry, filter=norm)
        raw.seek(0)
        diff = hashlib.sha256()
        packed = tempfile.TemporaryFile()
        with gzip.GzipFile(fileobj=packed, mode="wb", mtime=0, compresslevel=6) as gz:
            for chunk in iter(lambda: raw.read(1 << 20), b""):
                diff.update(chunk)
                gz.write(chunk)
        packed.seek(0)
        digest = hashlib.sha256()
        tmp = os.path.join(out, "blobs", "sha256", ".layer.tmp")
        size = 0
        with open(tmp, "wb") as f:
            for chunk in iter(lambda: packed.read(1 << 20), b""):
                digest.update(chunk)
                size += len(chunk)
                f.write(chunk)
        packed.close()
        os.replace(tmp, os.path.join(out, "blobs", "sha256", digest.hexdigest()))
    return "sha256:" + digest.hexdigest(), size, "sha256:" + diff.hexdigest()


def pack(rootfs, out, ref, entrypoint, cmd, port, epoch):
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(os.path.join(out, "blobs", "sha256"))
    layer, layer_size, diff_id = _layer(rootfs, out, epoch)
    created = "%s" % __import__("datetime").datetime.fromtimestamp(
        epoch, __import__("datetime").timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    config = {
        "created": created, "architecture": {"x86_64": "amd64", "aarch64": "arm64"}.get(
            os.uname().machine, os.uname().machine), "os": "linux",
        "config": {"Entrypoint": [entrypoint], "Cmd": cmd,
                   "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                   "ExposedPorts": {f"{port}/tcp": {}}, "WorkingDir": "/",
                   "StopSignal": "SIGTERM",
                   "Labels": {"org.opencontainers.image.title": "gpucostd"}},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": created, "created_by": "packaging/kubernetes/build-image.sh"}],
    }
    cbytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    cdigest = _blob(out, cbytes)
    manifest = {
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cdigest,
                   "size": len(cbytes)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": layer, "size": layer_size}],
    }
    mbytes = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    mdigest = _blob(out, mbytes)
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                            "digest": mdigest, "size": len(mbytes),
                            "annotations": {"org.opencontainers.image.ref.name":
                                            ref.rpartition(":")[2]}}]}
    with open(os.path.join(out, "index.json"), "w") as f:
        json.dump(index, f, sort_keys=True)
    with open(os.path.join(out, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    with tarfile.open(out.rstrip("/") + ".tar", "w") as tar:
        for name in ("oci-layout", "index.json", "blobs"):
            tar.add(os.path.join(out, name), arcname=name)
    return mdigest


def unpack(layout, dest):
    """Extract the filesystem of the image in an OCI layout (checking every digest)."""
    def read(digest):
        algo, _, hexd = digest.partition(":")
        with open(os.path.join(layout, "blobs", algo, hexd), "rb") as f:
            data = f.read()
        if hashlib.sha256(data).hexdigest() != hexd:
            raise SystemExit(f"oci-pack: blob {digest} does not match its digest")
        return data
    index = json.load(open(os.path.join(layout, "index.json")))
    manifest = json.loads(read(index["manifests"][0]["digest"]))
    os.makedirs(dest, exist_ok=True)
    for layer in manifest["layers"]:
        path = os.path.join(layout, "blobs", "sha256", layer["digest"].partition(":")[2])
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        if "sha256:" + h.hexdigest() != layer["digest"]:
            raise SystemExit(f"oci-pack: layer {layer['digest']} does not match its digest")
        with tarfile.open(path, "r:gz") as tar:
            kw = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}
            tar.extractall(dest, **kw)   # our own image, built by pack()
    return json.loads(read(manifest["config"]["digest"]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("rootfs")
    p.add_argument("out")
    p.add_argument("--ref", default="gpucostd:latest")
    p.add_argument("--entrypoint", default="/usr/bin/gpucostd")
    p.add_argument("--cmd", nargs="*", default=["run"])
    p.add_argument("--port", type=int, default=9477)
    p.add_argument("--unpack", action="store_true", help="ROOTFS is a layout, OUT the target")
    a = p.parse_args(argv)
    if a.unpack:
        unpack(a.rootfs, a.out)
        return 0
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "0") or 0)
    print(pack(a.rootfs, a.out, a.ref, a.entrypoint, a.cmd, a.port, epoch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
