"""Local images: deterministic layer tars and docker archives (manifest.json, config, diff_ids), and the caches."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest

from gpuaas.k8s import localimages
from gpuaas.k8s.localimages import (
    EPOCH,
    ImageConfig,
    Layer,
    LayerEntry,
    base_entries,
    busybox_entries,
    order_entries,
    tree_entries,
    write_docker_archive,
    write_layer,
)


def read_archive(path: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, bytes]]:
    """(manifest entry, config, blobs by name) of a docker archive."""
    with tarfile.open(path) as tar:
        blobs = {}
        for member in tar.getmembers():
            stream = tar.extractfile(member)
            if stream is not None:
                blobs[member.name] = stream.read()
    (manifest,) = json.loads(blobs["manifest.json"])
    return manifest, json.loads(blobs[manifest["Config"]]), blobs


def layer_members(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return tar.getmembers()


def sample_layers(tmp_path: Path) -> list[Layer]:
    host_file = tmp_path / "tool"
    host_file.write_bytes(b"#!/bin/sh\necho tool\n")
    first = write_layer(
        [
            LayerEntry("usr/local/bin/tool", mode=0o755, content=host_file),
            LayerEntry("tmp", kind="dir", mode=0o1777),
            LayerEntry("etc/passwd", content=b"root:x:0:0::/root:/bin/sh\n"),
        ],
        tmp_path / "first.tar",
    )
    second = write_layer(
        [LayerEntry("bin/sh", kind="symlink", mode=0o777, target="/bin/busybox")], tmp_path / "second.tar"
    )
    return [first, second]


CONFIG = ImageConfig(
    entrypoint=("gpuaas",),
    cmd=("run",),
    env=("PATH=/usr/bin:/bin", "PYTHONUNBUFFERED=1"),
    user="65532:65532",
    exposed_ports=("8080/tcp", "9443/tcp"),
    labels=(("org.opencontainers.image.title", "gpuaas"),),
)


def test_archive_manifest_and_config_name_the_layers_by_their_sha256(tmp_path: Path) -> None:
    layers = sample_layers(tmp_path)
    image_id = write_docker_archive(tmp_path / "image.tar", "gpuaas.local/x:1", layers, CONFIG, ["one", "two"])
    manifest, config, blobs = read_archive(tmp_path / "image.tar")

    assert manifest["RepoTags"] == ["gpuaas.local/x:1"]
    layer_data = [blobs[name] for name in manifest["Layers"]]
    digests = [f"sha256:{hashlib.sha256(data).hexdigest()}" for data in layer_data]
    assert config["rootfs"] == {"type": "layers", "diff_ids": digests}
    assert digests == [layer.diff_id for layer in layers]
    assert layer_data == [layer.path.read_bytes() for layer in layers]
    assert [name.split("/")[0] for name in manifest["Layers"]] == [d.removeprefix("sha256:") for d in digests]
    config_bytes = blobs[manifest["Config"]]
    assert image_id == f"sha256:{hashlib.sha256(config_bytes).hexdigest()}"
    assert manifest["Config"] == f"{image_id.removeprefix('sha256:')}.json"
    assert [entry["created_by"] for entry in config["history"]] == ["one", "two"]
    assert localimages.archive_layer_bytes(tmp_path / "image.tar") == sum(layer.size for layer in layers)


def test_config_carries_user_entrypoint_cmd_env_ports_labels(tmp_path: Path) -> None:
    write_docker_archive(tmp_path / "image.tar", "gpuaas.local/x:1", sample_layers(tmp_path), CONFIG, ["a", "b"])
    _, config, _ = read_archive(tmp_path / "image.tar")

    assert (config["architecture"], config["os"]) == ("amd64", "linux")
    assert config["config"] == {
        "User": "65532:65532",
        "Entrypoint": ["gpuaas"],
        "Cmd": ["run"],
        "Env": ["PATH=/usr/bin:/bin", "PYTHONUNBUFFERED=1"],
        "ExposedPorts": {"8080/tcp": {}, "9443/tcp": {}},
        "Labels": {"org.opencontainers.image.title": "gpuaas"},
    }


def test_empty_fields_are_left_out_and_history_must_match_layers() -> None:
    minimal = json.loads(localimages.config_json(ImageConfig(cmd=("sh",)), ["sha256:00"], ["x"]))
    assert set(minimal["config"]) == {"Cmd", "Env"}
    with pytest.raises(ValueError, match="history"):
        localimages.config_json(ImageConfig(), ["sha256:00", "sha256:11"], ["x"])


def test_same_inputs_give_the_same_bytes_whatever_the_host_files_times_and_modes(tmp_path: Path) -> None:
    ids = []
    for run, (mtime, mode) in enumerate([(1_000_000, 0o700), (2_000_000, 0o755)]):
        work = tmp_path / str(run)
        tree = work / "tree" / "pkg"
        tree.mkdir(parents=True)
        (tree / "mod.py").write_text("x = 1\n")
        (tree / "run").write_text("#!/bin/sh\n")
        (tree / "run").chmod(mode)
        for path in (tree / "mod.py", tree / "run", tree):
            os.utime(path, (mtime, mtime))
        layer = write_layer(tree_entries(work / "tree", "opt/site"), work / "layer.tar")
        ids.append(write_docker_archive(work / "image.tar", "gpuaas.local/x:1", [layer], CONFIG, ["x"]))
    assert ids[0] == ids[1]
    assert (tmp_path / "0" / "image.tar").read_bytes() == (tmp_path / "1" / "image.tar").read_bytes()


def test_layer_is_sorted_parents_first_with_fixed_times_and_numeric_owners(tmp_path: Path) -> None:
    layer = write_layer(
        [
            LayerEntry("usr/bin/b", content=b"b"),
            LayerEntry("usr/bin-x", content=b"x"),
            LayerEntry("tmp", kind="dir", mode=0o1777),
            LayerEntry("etc/shadow", mode=0o640, gid=42, content=b"s"),
            LayerEntry("usr/bin/a", kind="symlink", mode=0o777, target="b"),
        ],
        tmp_path / "layer.tar",
    )
    members = layer_members(layer.path.read_bytes())
    names = [member.name for member in members]
    assert names == ["etc", "etc/shadow", "tmp", "usr", "usr/bin", "usr/bin/a", "usr/bin/b", "usr/bin-x"]
    assert {member.mtime for member in members} == {EPOCH}
    assert {(member.uname, member.gname) for member in members} == {("", "")}
    by_name = {member.name: member for member in members}
    assert by_name["tmp"].isdir()
    assert by_name["tmp"].mode == 0o1777
    assert by_name["usr"].isdir()
    assert by_name["usr"].mode == 0o755
    assert (by_name["etc/shadow"].mode, by_name["etc/shadow"].uid, by_name["etc/shadow"].gid) == (0o640, 0, 42)
    assert by_name["usr/bin/a"].issym()
    assert by_name["usr/bin/a"].linkname == "b"
    assert layer.diff_id == f"sha256:{hashlib.sha256(layer.path.read_bytes()).hexdigest()}"


def test_hardlink_data_moves_to_the_path_written_first() -> None:
    entries = order_entries(
        [
            LayerEntry("usr/bin/perl5.36", mode=0o755, content=b"perl"),
            LayerEntry("usr/bin/perl", kind="hardlink", target="usr/bin/perl5.36"),
        ]
    )
    by_path = {entry.path: entry for entry in entries}
    assert by_path["usr/bin/perl"].kind == "file"
    assert by_path["usr/bin/perl"].content == b"perl"
    assert by_path["usr/bin/perl5.36"].kind == "hardlink"
    assert by_path["usr/bin/perl5.36"].target == "usr/bin/perl"


@pytest.mark.parametrize("path", ["/etc/passwd", "etc/", "a/../b", "./a", ""])
def test_bad_paths_are_refused(path: str) -> None:
    with pytest.raises(ValueError, match="bad layer path"):
        order_entries([LayerEntry(path)])


def test_duplicates_and_dangling_hardlinks_are_refused() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        order_entries([LayerEntry("a"), LayerEntry("a")])
    with pytest.raises(ValueError, match="not a file"):
        order_entries([LayerEntry("a", kind="hardlink", target="b")])


def test_tree_entries_normalize_modes_and_skip(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text("x = 1\n")
    (tmp_path / "pkg" / "mod.py").chmod(0o600)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "script").write_text("#!/bin/sh\n")
    (tmp_path / "link").symlink_to("pkg/mod.py")
    entries = tree_entries(tmp_path, "opt/site", skip=lambda relative: relative == "bin")
    summary = {(entry.path, entry.kind, entry.mode, entry.target) for entry in entries}
    assert summary == {
        ("opt/site/pkg", "dir", 0o755, ""),
        ("opt/site/pkg/mod.py", "file", 0o644, ""),
        ("opt/site/link", "symlink", 0o777, "pkg/mod.py"),
    }


def test_busybox_entries_link_every_applet_and_make_a_minimal_etc(tmp_path: Path) -> None:
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"\x7fELF")
    applets = ["bin/sh", "bin/sleep", "usr/bin/env", "usr/bin/wget", "bin/busybox", "linuxrc", ""]
    layer = write_layer(busybox_entries(busybox, applets), tmp_path / "layer.tar")
    by_name = {member.name: member for member in layer_members(layer.path.read_bytes())}

    assert by_name["bin/busybox"].isreg()
    assert by_name["bin/busybox"].mode == 0o755
    links = {name for name, member in by_name.items() if member.issym()}
    assert links == {"bin/sh", "bin/sleep", "usr/bin/env", "usr/bin/wget"}
    assert {by_name[name].linkname for name in links} == {"/bin/busybox"}
    assert by_name["tmp"].mode == 0o1777
    assert by_name["root"].mode == 0o700
    with tarfile.open(layer.path) as tar:
        passwd = tar.extractfile("etc/passwd")
        assert passwd is not None
        users = [line.split(":")[:3] for line in passwd.read().decode().splitlines()]
    assert users == [["root", "x", "0"], ["nobody", "x", "65534"]]


def rootfs_tar(path: Path) -> None:
    with tarfile.open(path, "w") as tar:

        def add(name: str, kind: bytes, data: bytes = b"", **fields: Any) -> None:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.size = len(data)
            for key, value in fields.items():
                setattr(info, key, value)
            tar.addfile(info, io.BytesIO(data) if data else None)

        add("./", tarfile.DIRTYPE, mode=0o755)
        add("./dev/", tarfile.DIRTYPE, mode=0o755)
        add("./dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3)
        add("./etc/", tarfile.DIRTYPE, mode=0o755)
        add("./etc/passwd", tarfile.REGTYPE, b"root:x:0:0:root:/root:/bin/bash\n", mode=0o644)
        add("./etc/hostname", tarfile.REGTYPE, b"builder\n")
        add("./etc/shadow", tarfile.REGTYPE, b"root:*::\n", mode=0o640, gid=42)
        add("./usr/bin/perl5.36", tarfile.REGTYPE, b"perl", mode=0o755)
        add("./usr/bin/perl", tarfile.LNKTYPE, linkname="./usr/bin/perl5.36")
        add("./bin", tarfile.SYMTYPE, linkname="usr/bin")
        add("./var/lib/dpkg/status-old", tarfile.REGTYPE, b"old")


def test_base_entries_keep_owners_drop_devices_and_append_to_passwd(tmp_path: Path) -> None:
    rootfs_tar(tmp_path / "rootfs.tar")
    with tarfile.open(tmp_path / "rootfs.tar") as rootfs:
        entries = base_entries(rootfs, {"etc/passwd": b"gpuaas:x:65532:65532::/nonexistent:/usr/sbin/nologin\n"})
        layer = write_layer(entries, tmp_path / "layer.tar")
    with tarfile.open(layer.path) as tar:
        by_name = {member.name: member for member in tar.getmembers()}
        passwd = tar.extractfile("etc/passwd")
        assert passwd is not None
        assert passwd.read().decode().splitlines()[-1].startswith("gpuaas:x:65532:65532:")
        perl = tar.extractfile("usr/bin/perl")
        assert perl is not None
        assert perl.read() == b"perl"
    files = {"etc/passwd", "etc/shadow", "usr/bin/perl", "usr/bin/perl5.36", "bin"}
    assert set(by_name) == {"dev", "etc", "usr", "usr/bin"} | files  # no dev/null, etc/hostname, *-old
    assert by_name["etc/shadow"].gid == 42
    assert by_name["etc/shadow"].mode == 0o640
    assert by_name["bin"].issym()
    assert by_name["bin"].linkname == "usr/bin"
    assert by_name["usr/bin/perl5.36"].islnk()
    assert by_name["usr/bin/perl5.36"].linkname == "usr/bin/perl"


def test_default_cache_follows_build_sh(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("GPUAAS_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert localimages.default_cache() == tmp_path / "xdg" / "gpuaas" / "images"
    monkeypatch.setenv("GPUAAS_CACHE_DIR", str(tmp_path / "explicit"))
    assert localimages.default_cache() == tmp_path / "explicit" / "images"


def test_pause_image_is_built_once_then_reused(tmp_path: Path) -> None:
    binary = tmp_path / "pause"
    binary.write_bytes(b"\x7fELF static pause")
    lines: list[str] = []
    built = localimages.build_pause_image(binary, tmp_path / "cache", on_progress=lines.append)
    again = localimages.build_pause_image(binary, tmp_path / "cache", on_progress=lines.append)

    assert built.reference == localimages.PAUSE_IMAGE
    assert built.path == again.path
    assert built.build_seconds > 0
    assert again.build_seconds == 0.0
    assert built.size_bytes == again.size_bytes > len(b"\x7fELF static pause")
    assert [path.name for path in (tmp_path / "cache").iterdir()] == [built.path.name]  # no temporary left
    manifest, config, blobs = read_archive(built.path)
    assert config["config"]["Entrypoint"] == ["/pause"]
    (member,) = [m for m in layer_members(blobs[manifest["Layers"][0]]) if m.isreg()]
    assert (member.name, member.mode, member.size) == ("pause", 0o755, len(b"\x7fELF static pause"))
    assert "cached" in lines[-1]

    binary.write_bytes(b"\x7fELF another pause")
    assert localimages.build_pause_image(binary, tmp_path / "cache").path != built.path


def test_operator_reference_hashes_the_sources(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    sources = tmp_path / "debian.sources"
    sources.write_text("Types: deb\nURIs: http://mirror.invalid/debian\nSuites: bookworm\nComponents: main\n")
    monkeypatch.setenv("GPUAAS_APT_SOURCES", str(sources))
    repo = tmp_path / "repo"
    (repo / "operator" / "src" / "gpuaas" / "__pycache__").mkdir(parents=True)
    for name in ("uv.lock", "pyproject.toml", "README.md", "operator/src/gpuaas/cli.py"):
        (repo / name).write_text(name)
    first = localimages.operator_image_reference(repo)
    assert first.startswith(f"{localimages.OPERATOR_REPOSITORY}:")
    assert len(first.rpartition(":")[2]) == 12

    (repo / "operator" / "src" / "gpuaas" / "__pycache__" / "cli.cpython-311.pyc").write_bytes(b"pyc")
    assert localimages.operator_image_reference(repo) == first
    (repo / "operator" / "src" / "gpuaas" / "cli.py").write_text("changed")
    assert localimages.operator_image_reference(repo) != first
    sources.write_text(sources.read_text().replace("main", "main contrib"))
    assert localimages.operator_image_reference(repo) != first


def test_sources_without_the_suite_are_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    sources = tmp_path / "sources.list"
    sources.write_text(
        "# deb http://mirror.invalid/debian bookworm main\ndeb http://mirror.invalid/debian trixie main\n"
    )
    monkeypatch.setenv("GPUAAS_APT_SOURCES", str(sources))
    with pytest.raises(localimages.ImageBuildError, match="bookworm"):
        localimages.host_apt_sources()


def test_tidy_site_drops_what_names_the_build_and_rewrites_record(tmp_path: Path) -> None:
    site = tmp_path / "site"
    dist_info = site / "pkg-1.0.dist-info"
    dist_info.mkdir(parents=True)
    (site / "bin").mkdir()
    (site / "bin" / "pkg").write_text("#!/work/.venv/bin/python\n")
    (site / ".lock").write_text("")
    (site / "pkg.py").write_text("x = 1\n")
    (dist_info / "direct_url.json").write_text('{"url": "file:///tmp/random/pkg.whl"}')
    (dist_info / "uv_cache.json").write_text('{"timestamp": 1}')
    (dist_info / "RECORD").write_text(
        "bin/pkg,sha256=a,10\npkg.py,sha256=b,6\npkg-1.0.dist-info/direct_url.json,sha256=c,30\n"
        "pkg-1.0.dist-info/uv_cache.json,sha256=d,16\npkg-1.0.dist-info/RECORD,,\n"
    )
    localimages.tidy_site(site)
    assert sorted(path.relative_to(site).as_posix() for path in site.rglob("*")) == [
        "pkg-1.0.dist-info",
        "pkg-1.0.dist-info/RECORD",
        "pkg.py",
    ]
    assert (dist_info / "RECORD").read_text() == "pkg.py,sha256=b,6\npkg-1.0.dist-info/RECORD,,\n"
