"""Build kubetask's container image without Docker or a registry, as an OCI archive that
`ctr images import` loads into a node's containerd.

Layers: a Debian root filesystem with Python (mmdebstrap, from Debian's packages; cached by its
package list), the user the chart's pods run as, kubetask's wheel with its dependencies,
installed for that Python by pip (cached by the sources the wheel is built from), and the
runtime sidecar's binary (cached by its sources). The same base layer with `sleep infinity` as its command is the
node's sandbox ("pause") image: CRI runs the sandbox image's own command, which must block.

Usage: python e2e/build_images.py  -> prints the directory holding the archives.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("KUBETASK_E2E_CACHE", Path.home() / ".cache" / "kubetask-e2e"))
SUITE = "bookworm"
# python3 is Debian bookworm's 3.11, the version kubetask is written for.
PACKAGES = ["python3", "ca-certificates", "procps", "iproute2"]
KUBETASK_IMAGE = "docker.io/kubetask/kubetask:dev"
PAUSE_IMAGE = "docker.io/kubetask/pause:dev"
SITE = "opt/kubetask"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def base_layer() -> Path:
    """The Debian root filesystem as an uncompressed tar (its own diff id)."""
    key = hashlib.sha256(f"{SUITE} {' '.join(PACKAGES)}".encode()).hexdigest()[:16]
    out = CACHE / "images" / f"base-{SUITE}-{key}.tar"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    subprocess.run(
        [
            "mmdebstrap",
            "--quiet",
            "--format=tar",
            "--variant=minbase",
            f"--include={','.join(PACKAGES)}",
            # The image needs no documentation, locales or apt lists.
            "--dpkgopt=path-exclude=/usr/share/{doc,man,locale,info}/*",
            "--customize-hook=rm -rf $1/var/lib/apt/lists/* $1/var/cache/apt/*",
            SUITE,
            str(partial),
        ],
        check=True,
    )
    partial.rename(out)
    return out


def users_layer(base: Path) -> Path:
    """The base's /etc/passwd and /etc/group with the user the chart's pods run as (10001, as
    operator/Dockerfile adds it): kopf, for one, looks its own user up."""
    out = base.with_name(f"users-{base.stem}.tar")
    if out.exists():
        return out
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(base) as tar:
        tree = Path(tmp)
        (tree / "etc").mkdir()
        for name, line in (
            ("passwd", "kubetask:x:10001:10001::/tmp:/usr/sbin/nologin"),
            ("group", "kubetask:x:10001:"),
        ):
            member = tar.extractfile(f"./etc/{name}")
            assert member is not None
            (tree / "etc" / name).write_bytes(member.read() + f"{line}\n".encode())
        partial = out.with_suffix(".partial")
        write_tar(tree, partial)
        partial.rename(out)
    return out


def source_key() -> str:
    """What the wheel is built from, so a cached layer is found without building the wheel."""
    h = hashlib.sha256()
    package = sorted(p for p in (ROOT / "operator" / "kubetask").rglob("*") if p.is_file())
    for path in [ROOT / "pyproject.toml", ROOT / "README.md", *package]:
        if "__pycache__" in path.parts:
            continue
        h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def app_layer() -> Path:
    """kubetask and its dependencies under /opt/kubetask, for the base layer's Python."""
    out = CACHE / "images" / f"app-{source_key()}.tar"
    if out.exists():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        dist = Path(tmp) / "dist"
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(ROOT)],
            check=True,
        )
        wheel = next(dist.glob("kubetask-*.whl"))
        for stale in out.parent.glob("app-*"):  # each source change makes one: keep the last
            stale.unlink()
        staging = Path(tmp) / "root"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-warn-conflicts",  # it checks the environment pip runs in, not the image
                "--target",
                str(staging / SITE),
                # bookworm's glibc is 2.36
                "--platform",
                "manylinux_2_28_x86_64",
                "--platform",
                "manylinux2014_x86_64",
                "--python-version",
                "3.11",
                "--implementation",
                "cp",
                "--only-binary=:all:",
                str(wheel),
            ],
            check=True,
        )
        partial = out.with_suffix(".partial")
        write_tar(staging, partial)
        partial.rename(out)
        return out


def runtime_layer() -> Path:
    """kt-runtime, the runtime sidecar's static binary (`runtime-sidecar/build.sh`), at
    /usr/local/bin: the sidecar of every executor pod runs it from this image."""
    built = subprocess.run(
        ["bash", str(ROOT / "runtime-sidecar" / "build.sh")],
        check=True,
        capture_output=True,
        text=True,
    )
    binary = Path(built.stdout.strip().splitlines()[-1])
    out = CACHE / "images" / f"runtime-{binary.name}.tar"
    if out.exists():
        return out
    for stale in out.parent.glob("runtime-*"):
        stale.unlink()
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp)
        (tree / "usr" / "local" / "bin").mkdir(parents=True)
        shutil.copy(binary, tree / "usr" / "local" / "bin" / "kt-runtime")
        partial = out.with_suffix(".partial")
        write_tar(tree, partial)
        partial.rename(out)
    return out


def write_tar(tree: Path, out: Path) -> None:
    """A reproducible tar of `tree`: sorted, owned by root, no timestamps."""

    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        info.mtime = 0
        return info

    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(tree.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(tree)), recursive=False, filter=clean)


class Blobs:
    """An OCI image layout being written: blobs by digest, manifests in its index."""

    def __init__(self, tar: tarfile.TarFile) -> None:
        self.tar = tar
        self.written: set[str] = set()
        self.manifests: list[dict[str, object]] = []

    def add_bytes(self, data: bytes, media_type: str) -> dict[str, object]:
        digest = hashlib.sha256(data).hexdigest()
        if digest not in self.written:
            info = tarfile.TarInfo(f"blobs/sha256/{digest}")
            info.size = len(data)
            self.tar.addfile(info, io.BytesIO(data))
            self.written.add(digest)
        return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}

    def add_layer(self, layer: Path) -> tuple[dict[str, object], str]:
        """A gzipped layer blob (the archive stays small) and its diff id."""
        compressed = layer.with_suffix(".tar.gz")
        if not compressed.exists():
            with (
                layer.open("rb") as src,
                gzip.open(compressed.with_suffix(".partial"), "wb", 1) as dst,
            ):
                shutil.copyfileobj(src, dst, 1 << 20)
            compressed.with_suffix(".partial").rename(compressed)
        digest = sha256_file(compressed)
        if digest not in self.written:
            self.tar.add(compressed, arcname=f"blobs/sha256/{digest}")
            self.written.add(digest)
        descriptor = {
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": f"sha256:{digest}",
            "size": compressed.stat().st_size,
        }
        return descriptor, f"sha256:{sha256_file(layer)}"

    def add_image(self, name: str, layers: list[Path], config: dict[str, object]) -> None:
        descriptors, diff_ids = zip(*(self.add_layer(layer) for layer in layers), strict=True)
        image_config = {
            "architecture": "amd64",
            "os": "linux",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        }
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": self.add_bytes(
                json.dumps(image_config).encode(), "application/vnd.oci.image.config.v1+json"
            ),
            "layers": list(descriptors),
        }
        descriptor = self.add_bytes(
            json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json"
        )
        descriptor["platform"] = {"architecture": "amd64", "os": "linux"}
        descriptor["annotations"] = {
            "io.containerd.image.name": name,
            "org.opencontainers.image.ref.name": name.rsplit(":", 1)[1],
        }
        self.manifests.append(descriptor)

    def finish(self) -> None:
        index = {"schemaVersion": 2, "manifests": self.manifests}
        for name, data in (
            ("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode()),
            ("index.json", json.dumps(index).encode()),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            self.tar.addfile(info, io.BytesIO(data))


def build() -> Path:
    base, app, runtime = base_layer(), app_layer(), runtime_layer()
    recipe = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:8]
    out_dir = CACHE / "images" / f"oci-{app.stem}-{runtime.stem}-{base.stem}-{recipe}"
    archive = out_dir / "images.tar"
    if archive.exists():
        return out_dir
    for stale in out_dir.parent.glob("oci-*"):  # archives of older layers
        shutil.rmtree(stale)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = "/opt/kubetask/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    with tarfile.open(archive.with_suffix(".partial"), "w") as tar:
        blobs = Blobs(tar)
        blobs.add_image(
            KUBETASK_IMAGE,
            [base, users_layer(base), app, runtime],
            {
                "Env": [f"PATH={path}", f"PYTHONPATH=/{SITE}", "PYTHONUNBUFFERED=1"],
                "Entrypoint": ["python3", "-m", "kubetask"],
                "WorkingDir": "/",
            },
        )
        blobs.add_image(
            PAUSE_IMAGE, [base], {"Env": [f"PATH={path}"], "Cmd": ["sleep", "infinity"]}
        )
        blobs.finish()
    archive.with_suffix(".partial").rename(archive)
    return out_dir


if __name__ == "__main__":
    print(build())
