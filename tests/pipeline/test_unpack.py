"""Unpacking a checked tarball into a transaction's union directory, and reading what is
live under a base (a plain directory stands in for the union directory)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from cvmfs_syncd.ingest import (
    ArchiveChanged,
    ArchiveStreamError,
    Compression,
    Manifest,
    already_live,
    check_archive,
)
from cvmfs_syncd.model import EntryType
from cvmfs_syncd.pipeline.unpack import live_tree, unpack
from tests.ingest import archives
from tests.ingest.archives import Trickle
from tests.support import staging_tree

BIG = bytes(range(256)) * 8192  # 2 MiB: several pieces, and more than a pipe holds

ARCHIVE = (
    archives.directory("bin", mode=0o750),
    archives.file("bin/tool", b"#!/bin/sh\n", mode=0o4755),
    archives.file("share/data/big.bin", BIG),
    archives.hardlink("share/data/again.bin", "share/data/big.bin"),
    archives.symlink("latest", "share"),
    archives.file("\udcff-not-utf8.txt", b"bytes"),
)


def _checked(data: bytes) -> Manifest:
    manifest = check_archive(io.BytesIO(data))
    assert isinstance(manifest, Manifest)
    return manifest


def _unpack(union: Path, data: bytes, manifest: Manifest, **kw: object) -> None:
    values: dict[str, object] = {
        "compression": None,
        "deletes": (),
        "catalog": True,
        "heartbeat": lambda: None,
    }
    values.update(kw)
    unpack(Trickle(data), manifest, union, "sw/pkg", **values)  # type: ignore[arg-type]


def test_the_checked_members_are_placed_under_the_base(tmp_path: Path) -> None:
    """Every member lands under the base as checked: modes without setuid, a hard link
    as a copy, symlinks verbatim, names as archived, a nested catalog at the base; and
    what is live then equals the archive."""
    data = archives.compress(archives.tar_bytes(*ARCHIVE), "gzip")
    manifest = check_archive(io.BytesIO(data))
    assert isinstance(manifest, Manifest)
    _unpack(tmp_path, data, manifest, compression=Compression.GZIP)
    tree = staging_tree(tmp_path / "sw" / "pkg")
    assert tree == {
        ".cvmfscatalog": ("file", 0o644, b""),
        "bin": ("dir", 0o750, b""),
        "bin/tool": ("file", 0o755, b"#!/bin/sh\n"),
        "share": ("dir", 0o755, b""),
        "share/data": ("dir", 0o755, b""),
        "share/data/big.bin": ("file", 0o644, BIG),
        "share/data/again.bin": ("file", 0o644, BIG),
        "latest": ("symlink", 0o777, b"share"),
        "\udcff-not-utf8.txt": ("file", 0o644, b"bytes"),
    }
    assert (tmp_path / "sw" / "pkg" / "bin" / "tool").stat().st_mtime == archives.MTIME
    live = live_tree(tmp_path, "sw/pkg", lambda: None)
    assert live[""].type is EntryType.DIRECTORY
    assert already_live(manifest, live)


def test_a_new_version_replaces_the_old_whatever_the_types(tmp_path: Path) -> None:
    """Deletions first, then paths whose type changed are replaced (a file by a
    directory, a directory by a file, a file base by a directory)."""
    base = tmp_path / "sw" / "pkg"
    (base / "was-dir").mkdir(parents=True)
    (base / "was-dir" / "inside").write_bytes(b"x")
    (base / "was-file").write_bytes(b"x")
    (base / "gone").write_bytes(b"x")
    data = archives.tar_bytes(
        archives.file("was-dir", b"now a file"), archives.file("was-file/inside", b"now a dir")
    )
    _unpack(tmp_path, data, _checked(data), deletes=("sw/pkg/gone",), catalog=False)
    assert staging_tree(base) == {
        "was-dir": ("file", 0o644, b"now a file"),
        "was-file": ("dir", 0o755, b""),
        "was-file/inside": ("file", 0o644, b"now a dir"),
    }
    other = tmp_path / "sw" / "other"
    other.write_bytes(b"a file where the base goes")
    unpack(
        Trickle(data),
        _checked(data),
        tmp_path,
        "sw/other",
        compression=None,
        deletes=(),
        catalog=False,
        heartbeat=lambda: None,
    )
    assert staging_tree(other) == {
        "was-dir": ("file", 0o644, b"now a file"),
        "was-file": ("dir", 0o755, b""),
        "was-file/inside": ("file", 0o644, b"now a dir"),
    }


def test_an_archive_that_changed_since_the_check_is_refused(tmp_path: Path) -> None:
    """The second read differs from the Manifest: ArchiveChanged, whatever was written
    left for the transaction's abort."""
    data = archives.tar_bytes(*ARCHIVE)
    changed = archives.tar_bytes(*ARCHIVE[:-1], archives.file("\udcff-not-utf8.txt", b"other"))
    with pytest.raises(ArchiveChanged):
        _unpack(tmp_path, changed, _checked(data))
    assert not (tmp_path / "sw" / "pkg" / ".cvmfscatalog").exists()


def test_a_stream_that_fails_while_unpacking_raises_its_error(tmp_path: Path) -> None:
    """A broken connection on the second read is an ArchiveStreamError, not damage."""
    data = archives.tar_bytes(*ARCHIVE)
    manifest = _checked(data)
    values: dict[str, object] = {"deletes": (), "catalog": True, "heartbeat": lambda: None}
    with pytest.raises(ArchiveStreamError):
        unpack(
            Trickle(data, fail_after=len(data) // 2),
            manifest,
            tmp_path,
            "sw/pkg",
            compression=None,
            **values,  # type: ignore[arg-type]
        )


def test_what_is_live_under_a_base(tmp_path: Path) -> None:
    """Nothing, a file, or a directory tree read without following its symlinks."""
    assert live_tree(tmp_path, "sw/pkg", lambda: None) == {}
    (tmp_path / "sw").mkdir()
    (tmp_path / "sw" / "pkg").write_bytes(b"12345")
    file_base = live_tree(tmp_path, "sw/pkg", lambda: None)
    assert list(file_base) == [""] and file_base[""].size == 5
    (tmp_path / "sw" / "pkg").unlink()
    (tmp_path / "sw" / "pkg" / "d").mkdir(parents=True)
    (tmp_path / "sw" / "pkg" / "d" / "link").symlink_to("/etc")
    beats: list[None] = []
    live = live_tree(tmp_path, "sw/pkg", lambda: beats.append(None))
    assert {p: e.type for p, e in live.items()} == {
        "": EntryType.DIRECTORY,
        "d": EntryType.DIRECTORY,
        "d/link": EntryType.SYMLINK,
    }
    assert live["d/link"].target == "/etc"
    assert len(beats) == 2
