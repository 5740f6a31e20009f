"""Container images for the local cluster's real node, built without Docker or a registry.

Three images, each written as a docker-archive tar (`manifest.json`, a config JSON, one tar per layer: what
`docker save` writes and `ctr -n k8s.io images import` reads):

- PAUSE_IMAGE: the static pause program from tools/nodetools, PID 1 of every pod sandbox.
- TENANT_IMAGE: busybox from Debian's busybox-static package, for tenant pods.
- OPERATOR_REPOSITORY:<tag>: the equivalent of the repository's Dockerfile. A Debian bookworm rootfs made by
  mmdebstrap from the host's apt sources (layer 1), the runtime dependencies exactly as locked in uv.lock
  (layer 2), the project wheel and the `gpuaas` command (layer 3). The tag is a hash of the inputs.

Archives are cached under `<cache>/images` (default `${GPUAAS_CACHE_DIR:-${XDG_CACHE_HOME:-~/.cache}/gpuaas}/images`),
named by a hash of their inputs, and written to a temporary file first, then renamed. The base and dependency
layers are cached on their own, so a source-only change rebuilds the small top layer and the archive.
Layers are written deterministically: sorted entries, fixed mtimes, numeric owners; the same inputs give the same
image ID.

`python -m gpuaas.k8s.localimages` builds all three and prints each reference, archive, size and build time.
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Literal

PAUSE_IMAGE = "gpuaas.local/pause:3.10"
TENANT_IMAGE = "gpuaas.local/tenant:1"
OPERATOR_REPOSITORY = "gpuaas.local/gpuaas"

# Every file in every layer gets this mtime, and every config this creation time (2000-01-01T00:00:00Z).
EPOCH = 946684800
CREATED = "2000-01-01T00:00:00Z"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SITE_PACKAGES = "opt/gpuaas/site-packages"  # inside the operator image, without the leading slash
OPERATOR_UID = 65532
# Part of every cache key: bump it when the way an image is put together changes.
RECIPE = "gpuaas-localimages/1"

DEBIAN_SUITE = "bookworm"
BASE_PACKAGES = ("python3", "ca-certificates")
# --variant=essential plus BASE_PACKAGES. The merged-usr hook satisfies init-system-helpers' dependency with
# usr-is-merged; without it apt picks usrmerge, which pulls in full perl (about 50 MB). Docs (but the copyright
# files), man pages, info pages and translations are never unpacked. SOURCE_DATE_EPOCH makes the tar reproducible
# and Debian's byte-compiled standard library hash-based (valid whatever the files' mtimes).
MMDEBSTRAP_OPTIONS = (
    "--variant=essential",
    "--format=tar",
    "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
    "--dpkgopt=path-exclude=/usr/share/doc/*",
    "--dpkgopt=path-include=/usr/share/doc/*/copyright",
    "--dpkgopt=path-exclude=/usr/share/man/*",
    "--dpkgopt=path-exclude=/usr/share/info/*",
    "--dpkgopt=path-exclude=/usr/share/locale/*",
    "--dpkgopt=path-exclude=/usr/share/lintian/*",
)
# The host's apt sources, first match wins; GPUAAS_APT_SOURCES names another file.
HOST_APT_SOURCES = (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list"))
OPERATOR_USER = f"gpuaas:x:{OPERATOR_UID}:{OPERATOR_UID}:gpuaas:/nonexistent:/usr/sbin/nologin\n"
OPERATOR_GROUP = f"gpuaas:x:{OPERATOR_UID}:\n"
# Runtime deps for CPython 3.11 (Debian bookworm's python3) on x86_64, wheels only, as locked.
WHEEL_PYTHON_VERSION = "3.11"
WHEEL_PLATFORM = "x86_64-manylinux_2_28"
OPERATOR_LABELS = (
    ("org.opencontainers.image.title", "gpuaas"),
    ("org.opencontainers.image.description", "GPU-as-a-Service control plane for Kubernetes"),
    ("org.opencontainers.image.licenses", "Apache-2.0"),
)
OPERATOR_PORTS = ("8080/tcp", "8081/tcp", "9443/tcp")  # metrics, health (kopf liveness), admission webhook
OPERATOR_SCRIPT = b"#!/usr/bin/python3\nimport sys\n\nfrom gpuaas.cli import main\n\nsys.exit(main())\n"
# How many operator archives (one per source state) the cache keeps.
KEEP_OPERATOR_ARCHIVES = 3

TENANT_PASSWD = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
TENANT_GROUP = b"root:x:0:\nnobody:x:65534:\n"
TENANT_REQUIRED_APPLETS = ("bin/sh", "bin/sleep", "bin/cat", "bin/ls", "usr/bin/env", "usr/bin/nproc", "bin/date")

EntryKind = Literal["file", "dir", "symlink", "hardlink"]
Content = bytes | Path | Callable[[], IO[bytes]]
Progress = Callable[[str], None]


class ImageBuildError(RuntimeError):
    """A step of an image build failed; the message carries the tool's captured output."""


@dataclass(frozen=True)
class ImageArchive:
    reference: str  # e.g. "gpuaas.local/gpuaas:<tag>"
    path: Path  # docker-archive tar
    build_seconds: float  # 0.0 when it came from the cache
    size_bytes: int  # uncompressed sum of layers


@dataclass(frozen=True)
class LayerEntry:
    """One entry of a layer tar. `path` is relative to the image root ("usr/bin/env"), without a leading slash.

    `content` (files only) is bytes, a host file, or a callable that opens a stream of `size` bytes. `target` is a
    symlink's value, or the image path of the file a hardlink shares its data with.
    """

    path: str
    kind: EntryKind = "file"
    mode: int = 0o644
    content: Content = b""
    size: int | None = None
    target: str = ""
    uid: int = 0
    gid: int = 0
    xattrs: tuple[tuple[str, str], ...] = ()  # PAX records, e.g. ("SCHILY.xattr.security.capability", ...)


@dataclass(frozen=True)
class Layer:
    path: Path  # the layer tar (uncompressed)
    diff_id: str  # "sha256:<hex>" of the tar
    size: int

    @classmethod
    def of(cls, path: Path) -> Layer:
        return cls(path=path, diff_id=f"sha256:{file_sha256(path)}", size=path.stat().st_size)


@dataclass(frozen=True)
class ImageConfig:
    """The container config of an image (the `config` object of the image config JSON)."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = (f"PATH={DEFAULT_PATH}",)
    user: str = ""
    working_dir: str = ""
    exposed_ports: tuple[str, ...] = ()  # "8080/tcp"
    labels: tuple[tuple[str, str], ...] = ()


def _quiet(_: str) -> None:
    return None


# ----------------------------------------------------------------------------------------------------------------
# Layer tars and docker archives (pure: files in, files out)


def file_sha256(path: Path) -> str:
    with path.open("rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def _sort_key(path: str) -> list[str]:
    # Component-wise: a directory comes before everything in it, and the order is GNU tar's --sort=name.
    return path.split("/")


def _check_path(path: str) -> None:
    parts = path.split("/")
    if not path or path.startswith("/") or any(part in {"", ".", ".."} for part in parts):
        raise ValueError(f"bad layer path {path!r}: relative, normalized, without a trailing slash")


def _relink(by_path: dict[str, LayerEntry]) -> None:
    """Let the first path of each hardlink group (in layer order) carry the data, so extraction finds it."""
    groups: dict[str, list[str]] = {}
    for entry in by_path.values():
        if entry.kind == "hardlink":
            source = by_path.get(entry.target)
            if source is None or source.kind != "file":
                raise ValueError(f"hardlink {entry.path} -> {entry.target}: the target is not a file in the layer")
            groups.setdefault(entry.target, []).append(entry.path)
    for target, links in groups.items():
        first = min([target, *links], key=_sort_key)
        if first == target:
            continue
        source = by_path[target]
        by_path[first] = replace(source, path=first)
        for path in [target, *links]:
            if path != first:
                by_path[path] = replace(by_path[path], kind="hardlink", target=first, content=b"", size=None)


def order_entries(entries: Iterable[LayerEntry]) -> list[LayerEntry]:
    """Entries in layer order, with the missing parent directories (0755, root) added."""
    by_path: dict[str, LayerEntry] = {}
    for entry in entries:
        _check_path(entry.path)
        if entry.path in by_path:
            raise ValueError(f"duplicate layer path {entry.path}")
        by_path[entry.path] = entry
    for path in list(by_path):
        parent = path.rpartition("/")[0]
        while parent and parent not in by_path:
            by_path[parent] = LayerEntry(parent, kind="dir", mode=0o755)
            parent = parent.rpartition("/")[0]
    _relink(by_path)
    return sorted(by_path.values(), key=lambda entry: _sort_key(entry.path))


def _open_content(entry: LayerEntry) -> tuple[IO[bytes], int]:
    content = entry.content
    if isinstance(content, bytes):
        return io.BytesIO(content), len(content)
    if isinstance(content, Path):
        stream = content.open("rb")
        return stream, os.fstat(stream.fileno()).st_size
    if entry.size is None:
        raise ValueError(f"{entry.path}: a streamed file needs its size")
    return content(), entry.size


def _tar_info(name: str, mode: int, uid: int = 0, gid: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mtime = EPOCH
    info.mode = mode & 0o7777
    info.uid, info.gid = uid, gid
    info.uname = info.gname = ""
    return info


_TAR_TYPES = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE}


def write_layer(entries: Iterable[LayerEntry], out: Path) -> Layer:
    """Write a layer tar: entries sorted, parents first, mtime EPOCH, numeric owners, no user or group names."""
    with out.open("wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in order_entries(entries):
            info = _tar_info(entry.path, entry.mode, entry.uid, entry.gid)
            info.pax_headers = dict(entry.xattrs)
            if entry.kind != "file":
                info.type = _TAR_TYPES[entry.kind]
                info.linkname = entry.target
                tar.addfile(info)
                continue
            stream, info.size = _open_content(entry)
            with stream:
                tar.addfile(info, stream)
    return Layer.of(out)


def tree_entries(root: Path, prefix: str, skip: Callable[[str], bool] = lambda _: False) -> list[LayerEntry]:
    """The files, directories and symlinks under a host directory, placed under `prefix` in the image.

    Owners become root; modes are normalized (0755 for directories and executables, else 0644), so the result
    depends only on the tree's contents. `skip` gets each path relative to `root` and drops it (and what is under it).
    """
    entries: list[LayerEntry] = []
    for directory, dirnames, filenames in os.walk(root):
        relative_dir = Path(directory).relative_to(root)
        for name in sorted([*dirnames, *filenames]):
            relative = (relative_dir / name).as_posix()
            full = Path(directory, name)
            info = full.lstat()
            if skip(relative):
                if name in dirnames:
                    dirnames.remove(name)
                continue
            path = f"{prefix}/{relative}" if prefix else relative
            if stat.S_ISLNK(info.st_mode):
                entries.append(LayerEntry(path, kind="symlink", mode=0o777, target=os.readlink(full)))
            elif stat.S_ISDIR(info.st_mode):
                entries.append(LayerEntry(path, kind="dir", mode=0o755))
            elif stat.S_ISREG(info.st_mode):
                mode = 0o755 if info.st_mode & 0o111 else 0o644
                entries.append(LayerEntry(path, mode=mode, content=full))
            else:
                raise ValueError(f"{full}: not a file, directory or symlink")
    return entries


def config_json(config: ImageConfig, diff_ids: Sequence[str], history: Sequence[str]) -> bytes:
    """The image config JSON, canonical (sorted keys, no spaces); its sha256 is the image ID."""
    if len(history) != len(diff_ids):
        raise ValueError("one history line per layer")
    container: dict[str, object] = {"Env": list(config.env)}
    if config.entrypoint:
        container["Entrypoint"] = list(config.entrypoint)
    if config.cmd:
        container["Cmd"] = list(config.cmd)
    if config.user:
        container["User"] = config.user
    if config.working_dir:
        container["WorkingDir"] = config.working_dir
    if config.exposed_ports:
        container["ExposedPorts"] = {port: {} for port in config.exposed_ports}
    if config.labels:
        container["Labels"] = dict(config.labels)
    document = {
        "architecture": "amd64",
        "os": "linux",
        "created": CREATED,
        "config": container,
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "history": [{"created": CREATED, "created_by": line} for line in history],
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def write_docker_archive(
    out: Path, reference: str, layers: Sequence[Layer], config: ImageConfig, history: Sequence[str]
) -> str:
    """Write a docker-archive tar (`docker save` layout) of the layers and config; returns the image ID."""
    diff_ids = [layer.diff_id for layer in layers]
    config_bytes = config_json(config, diff_ids, history)
    image_id = hashlib.sha256(config_bytes).hexdigest()
    layer_names = [f"{layer.diff_id.removeprefix('sha256:')}/layer.tar" for layer in layers]
    manifest = [{"Config": f"{image_id}.json", "RepoTags": [reference], "Layers": layer_names}]
    manifest_bytes = json.dumps(manifest, separators=(",", ":")).encode()
    with out.open("wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        written: set[str] = set()
        for layer, name in zip(layers, layer_names, strict=True):
            if name in written:  # the same layer twice: one blob
                continue
            written.add(name)
            directory = _tar_info(name.partition("/")[0], 0o755)
            directory.type = tarfile.DIRTYPE
            tar.addfile(directory)
            info = _tar_info(name, 0o644)
            info.size = layer.size
            with layer.path.open("rb") as stream:
                tar.addfile(info, stream)
        for name, data in ((f"{image_id}.json", config_bytes), ("manifest.json", manifest_bytes)):
            info = _tar_info(name, 0o644)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return f"sha256:{image_id}"


def archive_layer_bytes(archive: Path) -> int:
    """The uncompressed size of an archive's layers, read from its tar headers."""
    with tarfile.open(archive, mode="r:") as tar:
        manifest_file = tar.extractfile("manifest.json")
        if manifest_file is None:
            raise ImageBuildError(f"{archive}: no manifest.json")
        layer_names = set(json.load(manifest_file)[0]["Layers"])
        return sum(member.size for member in tar.getmembers() if member.name in layer_names)


# ----------------------------------------------------------------------------------------------------------------
# Cache and tools


def default_cache() -> Path:
    """`${GPUAAS_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/gpuaas}/images`, as tools/build.sh places its cache."""
    root = os.environ.get("GPUAAS_CACHE_DIR") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpuaas"
    )
    return Path(root) / "images"


def _key(*parts: str | bytes) -> str:
    digest = hashlib.sha256()
    for part in (RECIPE, *parts):
        data = part.encode() if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.hexdigest()


@contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """A temporary path beside `path`, renamed onto it when the block succeeds and removed when it fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(descriptor)
    temporary = Path(name)
    try:
        yield temporary
        temporary.chmod(0o644)
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)


def _run(command: Sequence[str | Path], what: str, **kwargs: object) -> str:
    """Run a tool with its output captured; a failure raises ImageBuildError with the output's tail."""
    try:
        result = subprocess.run(
            [str(part) for part in command],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            check=False,
            **kwargs,  # type: ignore[call-overload]
        )
    except FileNotFoundError as error:
        raise ImageBuildError(f"{what}: {error.filename} is not installed") from error
    if result.returncode != 0:
        tail = "\n".join(str(result.stdout).splitlines()[-40:])
        raise ImageBuildError(f"{what} failed (exit {result.returncode}): {' '.join(map(str, command))}\n{tail}")
    return str(result.stdout)


def _cached(reference: str, archive: Path, build: Callable[[Path, Path], None], on_progress: Progress) -> ImageArchive:
    """The archive from the cache, or built by `build(workdir, out)` into a temporary file and renamed."""
    if archive.is_file():
        on_progress(f"{reference}: cached {archive.name}")
        return ImageArchive(reference, archive, 0.0, archive_layer_bytes(archive))
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gpuaas-image-") as work, _atomic(archive) as out:
        build(Path(work), out)
    seconds = time.monotonic() - started
    size = archive_layer_bytes(archive)
    on_progress(f"{reference}: built in {seconds:.1f} s, {size / 1e6:.1f} MB")
    return ImageArchive(reference, archive, seconds, size)


def _cached_layer(path: Path, build: Callable[[Path, Path], Layer]) -> tuple[Layer, bool]:
    """A layer from the cache, or built by `build(workdir, out)`; the flag says whether it was built."""
    if path.is_file():
        return Layer.of(path), False
    with tempfile.TemporaryDirectory(prefix="gpuaas-layer-") as work, _atomic(path) as out:
        build(Path(work), out)
    return Layer.of(path), True


# ----------------------------------------------------------------------------------------------------------------
# pause


def build_pause_image(pause_binary: Path, cache: Path | None = None, on_progress: Progress = _quiet) -> ImageArchive:
    """One layer with the static `/pause`; runs as 65535:65535, as the upstream pause image does."""
    images = cache or default_cache()
    archive = images / f"pause-{_key('pause', PAUSE_IMAGE, file_sha256(pause_binary))[:16]}.tar"

    def build(work: Path, out: Path) -> None:
        layer = write_layer([LayerEntry("pause", mode=0o755, content=pause_binary)], work / "layer.tar")
        config = ImageConfig(entrypoint=("/pause",), user="65535:65535")
        write_docker_archive(out, PAUSE_IMAGE, [layer], config, ["gpuaas localimages: /pause (tools/nodetools)"])

    return _cached(PAUSE_IMAGE, archive, build, on_progress)


# ----------------------------------------------------------------------------------------------------------------
# tenant (busybox)


def _apt_candidate(package: str) -> tuple[str, str]:
    """(version, sha256 of the .deb) of the package apt would download, from the host's package lists."""
    output = _run(["apt-cache", "show", "--no-all-versions", package], f"apt-cache show {package}")
    fields = dict(line.split(": ", 1) for line in output.splitlines() if ": " in line and not line.startswith(" "))
    if "SHA256" not in fields:
        raise ImageBuildError(f"apt knows no {package} (run apt-get update)")
    return fields["Version"], fields["SHA256"]


def _download_deb(package: str, sha256: str, directory: Path) -> Path:
    # As root, apt drops to _apt to download and warns that it cannot write into a private temp dir: stay root.
    _run(
        ["apt-get", "download", "-qq", "-o", "APT::Sandbox::User=root", package],
        f"apt-get download {package}",
        cwd=directory,
    )
    debs = sorted(directory.glob(f"{package}_*.deb"))
    if len(debs) != 1 or file_sha256(debs[0]) != sha256:
        raise ImageBuildError(f"apt-get download {package}: expected one .deb with sha256 {sha256}, got {debs}")
    return debs[0]


def busybox_entries(busybox: Path, applets: Iterable[str]) -> list[LayerEntry]:
    """`/bin/busybox`, a symlink per applet at its usual place (`busybox --list-full`), and a minimal /etc."""
    entries = [LayerEntry("bin/busybox", mode=0o755, content=busybox)]
    links = sorted({applet.strip() for applet in applets if "/" in applet.strip()} - {"bin/busybox"})
    entries += [LayerEntry(link, kind="symlink", mode=0o777, target="/bin/busybox") for link in links]
    directories = {"bin": 0o755, "dev": 0o755, "etc": 0o755, "home": 0o755, "proc": 0o555, "root": 0o700}
    directories |= {"sbin": 0o755, "sys": 0o555, "tmp": 0o1777, "usr/bin": 0o755, "usr/sbin": 0o755}
    directories |= {"var": 0o755, "var/tmp": 0o1777}
    entries += [LayerEntry(path, kind="dir", mode=mode) for path, mode in directories.items()]
    entries += [LayerEntry("etc/passwd", content=TENANT_PASSWD), LayerEntry("etc/group", content=TENANT_GROUP)]
    return entries


def build_tenant_image(cache: Path | None = None, on_progress: Progress = _quiet) -> ImageArchive:
    """busybox (Debian's busybox-static) with every applet, /tmp, root and nobody; `sh` by default."""
    images = cache or default_cache()
    version, deb_sha256 = _apt_candidate("busybox-static")
    archive = images / f"tenant-{_key('tenant', TENANT_IMAGE, deb_sha256)[:16]}.tar"

    def build(work: Path, out: Path) -> None:
        on_progress(f"{TENANT_IMAGE}: busybox-static {version} from apt")
        deb = _download_deb("busybox-static", deb_sha256, work)
        tree = work / "deb"
        _run(["dpkg-deb", "-x", deb, tree], "dpkg-deb -x busybox-static")
        busybox = tree / "bin" / "busybox"
        applets = _run([busybox, "--list-full"], "busybox --list-full").splitlines()
        missing = set(TENANT_REQUIRED_APPLETS) - set(applets)
        if missing:
            raise ImageBuildError(f"busybox-static {version} lacks {sorted(missing)}")
        entries = busybox_entries(busybox, applets)
        copyright_file = tree / "usr/share/doc/busybox-static/copyright"
        entries.append(LayerEntry("usr/share/doc/busybox-static/copyright", content=copyright_file))
        layer = write_layer(entries, work / "layer.tar")
        history = [f"gpuaas localimages: busybox-static {version}, {len(applets)} applets"]
        write_docker_archive(out, TENANT_IMAGE, [layer], ImageConfig(cmd=("sh",)), history)

    return _cached(TENANT_IMAGE, archive, build, on_progress)


# ----------------------------------------------------------------------------------------------------------------
# operator


def host_apt_sources() -> Path:
    """The host's Debian apt sources file (deb822 or one-line), handed to mmdebstrap as its mirror."""
    explicit = os.environ.get("GPUAAS_APT_SOURCES")
    candidates = [Path(explicit)] if explicit else list(HOST_APT_SOURCES)
    for path in candidates:
        if path.is_file() and any(
            DEBIAN_SUITE in line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")
        ):
            return path
    raise ImageBuildError(f"no apt sources for Debian {DEBIAN_SUITE} in {[str(p) for p in candidates]}")


def _base_key(sources: Path) -> str:
    recipe = [DEBIAN_SUITE, *BASE_PACKAGES, *MMDEBSTRAP_OPTIONS, OPERATOR_USER, OPERATOR_GROUP, str(EPOCH)]
    return _key("debian-base", *recipe, sources.read_bytes())


def _drop_from_base(path: str) -> bool:
    """Runtime-provided or build-time leftovers: /dev's nodes, the host's hostname and resolv.conf, *-old."""
    if path.startswith(("dev/", "proc/", "sys/", "run/", "tmp/")):
        return True
    if path in {"etc/hostname", "etc/resolv.conf"}:
        return True
    return path.startswith(("var/cache/debconf/", "var/lib/dpkg/")) and path.endswith("-old")


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo) -> IO[bytes]:
    stream = tar.extractfile(member)
    if stream is None:
        raise ImageBuildError(f"{member.name}: no data in the rootfs tar")
    return stream


def base_entries(rootfs: tarfile.TarFile, extra: dict[str, bytes]) -> list[LayerEntry]:
    """A rootfs tar's entries as layer entries (owners, modes and xattrs kept; devices dropped).

    `extra` appends bytes to files (the operator's user and group in /etc/passwd and /etc/group).
    """
    entries: list[LayerEntry] = []
    for member in rootfs.getmembers():
        path = member.name.removeprefix("./").rstrip("/")
        if not path or path == "." or _drop_from_base(path):
            continue
        xattrs = tuple(sorted((k, v) for k, v in member.pax_headers.items() if k.startswith("SCHILY.xattr.")))
        entry = LayerEntry(path, mode=member.mode, uid=member.uid, gid=member.gid, xattrs=xattrs)
        if member.isdir():
            entries.append(replace(entry, kind="dir"))
        elif member.issym():
            entries.append(replace(entry, kind="symlink", target=member.linkname))
        elif member.islnk():
            entries.append(replace(entry, kind="hardlink", target=member.linkname.removeprefix("./")))
        elif member.isreg() and path in extra:
            entries.append(replace(entry, content=_extract(rootfs, member).read() + extra[path]))
        elif member.isreg():
            entries.append(replace(entry, content=functools.partial(_extract, rootfs, member), size=member.size))
    return entries


def _build_base(sources: Path, on_progress: Progress) -> Callable[[Path, Path], Layer]:
    def build(work: Path, out: Path) -> Layer:
        on_progress(f"base: mmdebstrap {DEBIAN_SUITE} ({', '.join(BASE_PACKAGES)}) from {sources}")
        started = time.monotonic()
        rootfs = work / "rootfs.tar"
        command: list[str | Path] = ["mmdebstrap", *MMDEBSTRAP_OPTIONS, f"--include={','.join(BASE_PACKAGES)}"]
        env = {**os.environ, "SOURCE_DATE_EPOCH": str(EPOCH)}
        _run([*command, DEBIAN_SUITE, rootfs, sources], "mmdebstrap", env=env)
        on_progress(f"base: mmdebstrap done in {time.monotonic() - started:.0f} s; writing the layer")
        with tarfile.open(rootfs, mode="r:") as tar:
            extra = {"etc/passwd": OPERATOR_USER.encode(), "etc/group": OPERATOR_GROUP.encode()}
            return write_layer(base_entries(tar, extra), out)

    return build


def find_uv(repo: Path) -> Path:
    """The uv the Makefile pins (.tools/uv/bin/uv), else uv on PATH."""
    pinned = repo / ".tools" / "uv" / "bin" / "uv"
    found = pinned if pinned.is_file() else shutil.which("uv")
    if found is None:
        raise ImageBuildError(f"uv not found: run `make -C {repo} .tools/uv/bin/uv`")
    return Path(found)


def find_python311() -> Path:
    """A CPython 3.11 on the host, to byte-compile for the image's (bytecode differs between minor versions)."""
    if sys.version_info[:2] == (3, 11):
        return Path(sys.executable)
    found = shutil.which("python3.11")
    if found is None:
        raise ImageBuildError("byte-compiling for Debian bookworm's python3 needs a python3.11 on the host")
    return Path(found)


def _pyc_magic(python: Path) -> str:
    code = "import importlib.util, sys; sys.stdout.write(importlib.util.MAGIC_NUMBER.hex())"
    return _run([python, "-c", code], "python3.11 magic").strip()


def _base_pyc_magic(base: Layer) -> str:
    with tarfile.open(base.path, mode="r:") as tar:
        stream = _extract(tar, tar.getmember("usr/lib/python3.11/__pycache__/os.cpython-311.pyc"))
        return stream.read(4).hex()


def _compile(python: Path, tree: Path) -> None:
    """Byte-compile a site dir as it will sit in the image, hash-based (no mtimes checked), reproducibly."""
    command: list[str | Path] = [python, "-m", "compileall", "-q", "-j", "0", "--invalidation-mode", "unchecked-hash"]
    command += ["-s", tree, "-p", f"/{SITE_PACKAGES}", tree]
    _run(command, "compileall", env={**os.environ, "PYTHONHASHSEED": "0"})


def tidy_site(site: Path) -> None:
    """Leave what the image needs, reproducibly: no console scripts (host shebangs; /usr/local/bin/gpuaas is
    written instead), no uv lock file, no direct_url.json (it names the temporary wheel) or uv_cache.json (a
    timestamp); each RECORD lists only the files left."""
    shutil.rmtree(site / "bin", ignore_errors=True)
    (site / ".lock").unlink(missing_ok=True)
    for dist_info in sorted(site.glob("*.dist-info")):
        for name in ("direct_url.json", "uv_cache.json"):
            (dist_info / name).unlink(missing_ok=True)
        record = dist_info / "RECORD"
        if record.is_file():
            rows = [row for row in csv.reader(record.read_text().splitlines()) if row and (site / row[0]).exists()]
            with record.open("w", newline="") as stream:
                csv.writer(stream, lineterminator="\n").writerows(rows)


def _uv_install(uv: Path, python: Path, target: Path, requirements: Sequence[str | Path], what: str) -> None:
    command: list[str | Path] = [uv, "pip", "install", "--quiet", "--target", target, "--python", python]
    command += ["--python-version", WHEEL_PYTHON_VERSION, "--python-platform", WHEEL_PLATFORM]
    command += ["--no-deps", "--link-mode", "copy", "--only-binary", ":all:", *requirements]
    _run(command, what, env={**os.environ, "UV_PYTHON_DOWNLOADS": "never", "UV_NO_PROGRESS": "1"})


def _build_deps(
    uv: Path, python: Path, requirements: str, base: Layer, on_progress: Progress
) -> Callable[[Path, Path], Layer]:
    def build(work: Path, out: Path) -> Layer:
        if (magic := _pyc_magic(python)) != (base_magic := _base_pyc_magic(base)):
            raise ImageBuildError(f"{python} writes bytecode {magic}, the image's python3 reads {base_magic}")
        count = sum(1 for line in requirements.splitlines() if "==" in line)
        on_progress(f"deps: installing {count} locked packages for CPython {WHEEL_PYTHON_VERSION} {WHEEL_PLATFORM}")
        (work / "requirements.txt").write_text(requirements)
        site = work / "site"
        _uv_install(uv, python, site, ["--require-hashes", "-r", work / "requirements.txt"], "uv pip install (deps)")
        tidy_site(site)
        on_progress("deps: byte-compiling")
        _compile(python, site)
        return write_layer(tree_entries(site, SITE_PACKAGES), out)

    return build


def _build_app(repo: Path, uv: Path, python: Path, work: Path) -> Layer:
    dist = work / "dist"
    _run([uv, "build", "--wheel", "--quiet", "--out-dir", dist, repo], "uv build --wheel", cwd=repo)
    wheels = sorted(dist.glob("gpuaas-*.whl"))
    if len(wheels) != 1:
        raise ImageBuildError(f"uv build --wheel made {wheels}")
    site = work / "site"
    _uv_install(uv, python, site, [wheels[0]], "uv pip install (gpuaas wheel)")
    tidy_site(site)
    _compile(python, site)
    entries = tree_entries(site, SITE_PACKAGES)
    entries.append(LayerEntry("usr/local/bin/gpuaas", mode=0o755, content=OPERATOR_SCRIPT))
    return write_layer(entries, work / "app.tar")


def _source_files(repo: Path) -> list[Path]:
    tree = [
        path
        for path in (repo / "operator" / "src").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    ]
    return [repo / "uv.lock", repo / "pyproject.toml", repo / "README.md", *sorted(tree)]


def operator_image_reference(repo: Path) -> str:
    """`gpuaas.local/gpuaas:<tag>`: the tag hashes uv.lock, pyproject.toml, README.md, operator/src and the base recipe
    (including the host's apt sources). Cheap: reads the files, builds nothing."""
    parts: list[str | bytes] = ["operator", _base_key(host_apt_sources())]
    for path in _source_files(repo):
        parts += [path.relative_to(repo).as_posix(), str(path.stat().st_mode & 0o111), path.read_bytes()]
    return f"{OPERATOR_REPOSITORY}:{_key(*parts)[:12]}"


def _operator_version(repo: Path) -> str:
    with (repo / "pyproject.toml").open("rb") as stream:
        return str(tomllib.load(stream)["project"]["version"])


def _prune(images: Path, keep: Path) -> None:
    os.utime(keep)  # the newest use counts
    archives = sorted(images.glob("gpuaas-*.tar"), key=lambda path: path.stat().st_mtime, reverse=True)
    for old in [path for path in archives if path != keep][KEEP_OPERATOR_ARCHIVES - 1 :]:
        old.unlink(missing_ok=True)


def build_operator_image(repo: Path, cache: Path | None = None, on_progress: Progress = _quiet) -> ImageArchive:
    """The Dockerfile's image, without Docker: Debian bookworm + locked deps + the wheel, user 65532."""
    images = cache or default_cache()
    sources = host_apt_sources()
    reference = operator_image_reference(repo)
    archive = images / f"gpuaas-{reference.rpartition(':')[2]}.tar"

    def build(work: Path, out: Path) -> None:
        base_key = _base_key(sources)[:16]
        base, built = _cached_layer(images / "layers" / f"debian-{base_key}.tar", _build_base(sources, on_progress))
        on_progress(f"base: {'built' if built else 'cached'}, {base.size / 1e6:.0f} MB")
        uv = find_uv(repo)
        python = find_python311()
        export: list[str | Path] = [
            uv,
            "export",
            "--frozen",
            "--no-dev",
            "--no-emit-project",
            "--format",
            "requirements-txt",
        ]
        requirements = _run([*export, "--quiet"], "uv export", cwd=repo)
        deps_path = images / "layers" / f"deps-{_key('deps', WHEEL_PLATFORM, requirements)[:16]}.tar"
        deps, built = _cached_layer(deps_path, _build_deps(uv, python, requirements, base, on_progress))
        on_progress(f"deps: {'built' if built else 'cached'}, {deps.size / 1e6:.0f} MB")
        on_progress("app: uv build --wheel, install, byte-compile")
        app = _build_app(repo, uv, python, work)
        version = _operator_version(repo)
        config = ImageConfig(
            entrypoint=("gpuaas",),
            cmd=("run",),
            env=(
                f"PATH={DEFAULT_PATH}",
                "PYTHONDONTWRITEBYTECODE=1",
                "PYTHONUNBUFFERED=1",
                f"PYTHONPATH=/{SITE_PACKAGES}",
            ),
            user=f"{OPERATOR_UID}:{OPERATOR_UID}",
            exposed_ports=OPERATOR_PORTS,
            labels=(*OPERATOR_LABELS, ("org.opencontainers.image.version", version)),
        )
        history = [
            f"gpuaas localimages: mmdebstrap --variant=essential {DEBIAN_SUITE} {' '.join(BASE_PACKAGES)}; user gpuaas",
            f"gpuaas localimages: uv.lock runtime dependencies in /{SITE_PACKAGES}",
            f"gpuaas localimages: gpuaas {version} wheel, /usr/local/bin/gpuaas",
        ]
        on_progress(f"{reference}: writing the archive")
        write_docker_archive(out, reference, [base, deps, app], config, history)

    result = _cached(reference, archive, build, on_progress)
    _prune(images, keep=archive)
    return result


# ----------------------------------------------------------------------------------------------------------------
# command line


def _find_repo() -> Path:
    explicit = os.environ.get("GPUAAS_REPO")
    starts = [Path(explicit)] if explicit else [Path.cwd().resolve(), Path(__file__).resolve()]
    for start in starts:
        for directory in [start, *start.parents]:
            if (directory / "tools" / "build.sh").is_file() and (directory / "uv.lock").is_file():
                return directory
    raise ImageBuildError("cannot find the gpuaas checkout (tools/build.sh); set GPUAAS_REPO")


def _nodetools_dir(repo: Path) -> Path:
    """tools/build.sh nodetools: prints the cache dir of the pause and fake-device-plugin binaries on stdout."""
    script = repo / "tools" / "build.sh"
    result = subprocess.run(["bash", str(script), "nodetools"], stdout=subprocess.PIPE, text=True, check=False)
    if result.returncode != 0:
        raise ImageBuildError(f"tools/build.sh nodetools failed (exit {result.returncode}), see its log above")
    return Path(result.stdout.split()[-1])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpuaas.k8s.localimages", description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=None, help=f"default: {default_cache()}")
    parser.add_argument("--pause-binary", type=Path, help="default: built by `tools/build.sh nodetools`")
    parser.add_argument("--only", choices=("pause", "tenant", "operator"), action="append")
    args = parser.parse_args(argv)
    only = set(args.only or ("pause", "tenant", "operator"))

    def progress(line: str) -> None:
        print(f"[images {time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)

    repo = _find_repo()
    results: list[ImageArchive] = []
    try:
        if "pause" in only:
            pause = args.pause_binary
            if pause is None:
                pause = _nodetools_dir(repo) / "pause"
            results.append(build_pause_image(pause, args.cache, progress))
        if "tenant" in only:
            results.append(build_tenant_image(args.cache, progress))
        if "operator" in only:
            results.append(build_operator_image(repo, args.cache, progress))
    except ImageBuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for image in results:
        print(f"{image.reference}\t{image.path}\t{image.size_bytes / 1e6:.1f} MB\t{image.build_seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
