"""Tests for the file-system edge in cvmfs_syncd.fsops."""

from __future__ import annotations

import errno
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cvmfs_syncd import fsops
from cvmfs_syncd.fsops import CopyOutcome, Skipped
from cvmfs_syncd.model import EntryType, Fingerprint
from cvmfs_syncd.paths import TEMP_PREFIX, repo_path

_real_open = os.open


@pytest.fixture
def src(tmp_path: Path) -> Path:
    path = tmp_path / "staging"
    path.mkdir()
    return path


@pytest.fixture
def union(tmp_path: Path) -> Path:
    path = tmp_path / "union"
    path.mkdir()
    return path


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    path = tmp_path / "elsewhere"
    path.mkdir()
    (path / "secret").write_text("secret\n")
    return path


@pytest.fixture
def opened_inodes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[os.stat_result]]:
    """Record the fstat of every descriptor fsops opens."""
    seen: list[os.stat_result] = []

    def recording_open(path: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
        fd = _real_open(path, flags, mode, **kw)
        seen.append(os.fstat(fd))
        return fd

    monkeypatch.setattr(os, "open", recording_open)
    yield seen


def refuse_reading_fifos(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every way fsops copies bytes (copy_file_range, sendfile, pread) fail the test
    when its source is a FIFO."""

    def refuse(fd: int) -> None:
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            raise AssertionError("the FIFO must not be read")

    real_range, real_sendfile, real_pread = os.copy_file_range, os.sendfile, os.pread

    def copy_file_range(src: int, dst: int, count: int, *args: Any) -> int:
        refuse(src)
        return real_range(src, dst, count, *args)

    def sendfile(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        refuse(in_fd)
        return real_sendfile(out_fd, in_fd, offset, count)

    def pread(fd: int, length: int, offset: int) -> bytes:
        refuse(fd)
        return real_pread(fd, length, offset)

    monkeypatch.setattr(os, "copy_file_range", copy_file_range)
    monkeypatch.setattr(os, "sendfile", sendfile)
    monkeypatch.setattr(os, "pread", pread)


def _fp(root: Path, rel: str) -> Fingerprint:
    result = fsops.stat_entry(root, rel)
    assert isinstance(result, Fingerprint), result
    return result


def _temps(root: Path) -> list[str]:
    return [
        name
        for _, dirs, files in os.walk(root)
        for name in dirs + files
        if name.startswith(TEMP_PREFIX)
    ]


def _names(path: Path) -> list[str]:
    return sorted(child.name for child in path.iterdir())


def _walk(root: Path, **kw: Any) -> dict[str, Fingerprint | Skipped]:
    return dict(fsops.walk_staging(root, **kw))


# --- scanning -----------------------------------------------------------------------


def test_walk_reports_files_dirs_and_symlinks(src: Path) -> None:
    """A walk yields sorted entries, directories before their contents, with fingerprints."""
    (src / "d").mkdir(mode=0o750)
    (src / "d" / "f").write_bytes(b"12345")
    (src / "d").chmod(0o750)  # mkdir is subject to the umask
    (src / "l").symlink_to("d/f")
    entries = list(fsops.walk_staging(src))
    assert [rel for rel, _ in entries] == ["d", "d/f", "l"]
    d, f, link = (fp for _, fp in entries)
    assert isinstance(d, Fingerprint) and d.type is EntryType.DIRECTORY and d.mode == 0o750
    assert isinstance(f, Fingerprint) and f.type is EntryType.FILE and f.size == 5
    assert f.inode == (src / "d" / "f").stat().st_ino
    assert f.mtime_ns == (src / "d" / "f").stat().st_mtime_ns
    assert isinstance(link, Fingerprint) and link.type is EntryType.SYMLINK
    assert link.target == "d/f"
    assert fsops.stat_entry(src, "d/f") == f


def test_symlink_to_passwd_is_a_symlink(src: Path, union: Path) -> None:
    """A staged symlink to /etc/passwd is reported and published as that symlink, never read."""
    (src / "pw").symlink_to("/etc/passwd")
    link = _fp(src, "pw")
    assert link.type is EntryType.SYMLINK and link.target == "/etc/passwd"
    assert _walk(src) == {"pw": link}
    fsops.make_symlink(union, "pw", link.target, mtime_ns=link.mtime_ns)
    assert str((union / "pw").readlink()) == "/etc/passwd"
    assert os.lstat(union / "pw").st_mtime_ns == link.mtime_ns
    # Asking to copy it as if it were a file must not read through the link.
    forged = Fingerprint(EntryType.FILE, 0o644, link.size, link.mtime_ns, link.inode)
    assert fsops.copy_file(union, "copy", src, "pw", forged) is CopyOutcome.CHANGED
    assert not (union / "copy").exists()


def test_symlink_to_outside_directory_is_not_descended(src: Path, outside: Path) -> None:
    """A symlink to a directory is reported as a symlink and nothing below it is listed."""
    (src / "out").symlink_to(outside)
    entries = _walk(src)
    assert list(entries) == ["out"]
    assert fsops.stat_entry(src, "out/secret") is None


def test_directory_replaced_by_symlink_before_copy(
    src: Path, union: Path, outside: Path, opened_inodes: list[os.stat_result]
) -> None:
    """A directory swapped for a symlink between scan and copy gives CHANGED and reads nothing."""
    (src / "d").mkdir()
    (src / "d" / "secret").write_text("staged\n")
    expected = _fp(src, "d/secret")
    (src / "d" / "secret").unlink()
    (src / "d").rmdir()
    (src / "d").symlink_to(outside)
    outcome = fsops.copy_file(union, "d/secret", src, "d/secret", expected)
    assert outcome is CopyOutcome.CHANGED
    secret = (outside / "secret").stat()
    assert all(st.st_ino != secret.st_ino for st in opened_inodes)
    assert all(st.st_ino != outside.stat().st_ino for st in opened_inodes)
    assert not (union / "d").exists()


@pytest.mark.timeout(10)
def test_fifo_is_skipped_and_never_opened(
    src: Path, union: Path, opened_inodes: list[os.stat_result]
) -> None:
    """A FIFO with no writer is skipped by scans and copies without ever being opened."""
    os.mkfifo(src / "pipe")
    assert _walk(src) == {"pipe": Skipped("fifo", "named pipes are never read")}
    assert fsops.stat_entry(src, "pipe") == Skipped("fifo", "named pipes are never read")
    st = os.lstat(src / "pipe")
    forged = Fingerprint(EntryType.FILE, stat.S_IMODE(st.st_mode), 0, st.st_mtime_ns, st.st_ino)
    assert fsops.copy_file(union, "pipe", src, "pipe", forged) is CopyOutcome.CHANGED
    assert not any(stat.S_ISFIFO(s.st_mode) for s in opened_inodes)


@pytest.mark.timeout(10)
def test_fifo_swapped_in_after_type_check_does_not_block(
    src: Path, union: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A FIFO that replaces the file just before open() is opened non-blocking and not read."""
    (src / "f").write_text("data\n")
    expected = _fp(src, "f")

    def swapping_open(path: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
        if path == "f" and not flags & (os.O_WRONLY | os.O_DIRECTORY):
            (src / "f").unlink()
            os.mkfifo(src / "f")
        return _real_open(path, flags, mode, **kw)

    monkeypatch.setattr(os, "open", swapping_open)
    refuse_reading_fifos(monkeypatch)
    assert fsops.copy_file(union, "f", src, "f", expected) is CopyOutcome.CHANGED
    assert _names(union) == []


def test_socket_is_skipped(src: Path) -> None:
    """A Unix socket in staging is reported as Skipped('socket')."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(src / "sock"))
        result = fsops.stat_entry(src, "sock")
        assert isinstance(result, Skipped) and result.reason == "socket"
        assert _walk(src) == {"sock": result}


def test_device_is_skipped(src: Path) -> None:
    """A character device node is reported as Skipped('device')."""
    try:
        os.mknod(src / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("creating device nodes is not permitted here")
    result = fsops.stat_entry(src, "null")
    assert isinstance(result, Skipped) and result.reason == "device"


def test_walk_unreadable_directory_is_reported_and_walk_continues(
    src: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A directory that cannot be opened is Skipped('unreadable') and its siblings are listed."""
    for name in ("a", "b", "c"):
        (src / name).mkdir()
        (src / name / "f").write_text(name)

    def denying_open(path: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
        if path == "b":
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return _real_open(path, flags, mode, **kw)

    monkeypatch.setattr(os, "open", denying_open)
    entries = _walk(src)
    assert entries["b"] == Skipped("unreadable", "Permission denied")
    assert sorted(entries) == ["a", "a/f", "b", "c", "c/f"]


def test_walk_prune_depth_and_missing_root(src: Path) -> None:
    """prune drops subtrees, max_depth stops descent, and a missing root raises."""
    (src / "keep" / "deep" / "deeper").mkdir(parents=True)
    (src / "skip.tmp").mkdir()
    (src / "skip.tmp" / "x").write_text("x")
    entries = _walk(src, prune=lambda rel: rel.endswith(".tmp"), max_depth=2)
    assert list(entries) == ["keep", "keep/deep"]
    assert isinstance(entries["keep/deep"], Skipped)
    assert entries["keep/deep"].reason == "too-deep"
    with pytest.raises(FileNotFoundError):
        list(fsops.walk_staging(src / "missing"))


def test_walk_does_not_enter_other_file_systems(src: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A directory whose device differs from the root's is reported as a mount point."""
    (src / "mnt").mkdir()
    (src / "mnt" / "f").write_text("x")
    real_stat = os.stat

    def other_device(path: Any, *, dir_fd: int | None = None, follow_symlinks: bool = True) -> Any:
        st = real_stat(path, dir_fd=dir_fd, follow_symlinks=follow_symlinks)
        if path != "mnt" or dir_fd is None:
            return st
        fields = list(st)
        fields[stat.ST_DEV] = st.st_dev + 1
        return os.stat_result(fields)

    monkeypatch.setattr(os, "stat", other_device)
    assert _walk(src) == {"mnt": Skipped("mount-point", "a different file system is mounted here")}
    assert sorted(_walk(src, cross_mounts=True)) == ["mnt", "mnt/f"]


def test_stat_entry_missing_and_intermediate_symlink(src: Path, outside: Path) -> None:
    """Missing entries and entries reached only through a symlink are None."""
    assert fsops.stat_entry(src, "nope") is None
    (src / "link").symlink_to(outside)
    assert fsops.stat_entry(src, "link/secret") is None
    root = fsops.stat_entry(src, "")
    assert isinstance(root, Fingerprint) and root.type is EntryType.DIRECTORY
    with pytest.raises(ValueError, match=r"'\.\.'"):
        fsops.stat_entry(src, "../x")


def test_non_utf8_and_255_byte_names_round_trip(src: Path, union: Path) -> None:
    """Names that are not UTF-8 or are 255 bytes long are scanned and copied unchanged."""
    raw_names = [b"caf\xe9", b"x" * 255, "é".encode() * 127 + b"a"]
    for raw in raw_names:
        fd = os.open(os.fsencode(src) + b"/" + raw, os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, raw)
        os.close(fd)
    entries = _walk(src)
    assert sorted(os.fsencode(rel) for rel in entries) == sorted(raw_names)
    for rel, fp in entries.items():
        assert isinstance(fp, Fingerprint)
        dest = repo_path("/sub", rel)
        assert fsops.copy_file(union, dest, src, rel, fp) is CopyOutcome.COPIED
    copied = sorted(os.fsencode(path.name) for path in (union / "sub").iterdir())
    assert copied == sorted(raw_names)
    for raw in raw_names:
        assert (union / "sub" / os.fsdecode(raw)).read_bytes() == raw


# --- copying ------------------------------------------------------------------------


def test_copy_preserves_content_mtime_and_strips_special_bits(src: Path, union: Path) -> None:
    """setuid, setgid and sticky bits are stripped; content and mtime are kept."""
    (src / "tool").write_bytes(b"#!/bin/sh\n")
    (src / "tool").chmod(0o7755)
    os.utime(src / "tool", ns=(1_000_000_000_123, 1_600_000_000_123_456_789))
    expected = _fp(src, "tool")
    assert expected.mode == 0o7755
    assert fsops.copy_file(union, "bin/tool", src, "tool", expected) is CopyOutcome.COPIED
    st = (union / "bin" / "tool").stat()
    assert stat.S_IMODE(st.st_mode) == 0o755
    assert st.st_mtime_ns == 1_600_000_000_123_456_789
    assert (union / "bin" / "tool").read_bytes() == b"#!/bin/sh\n"
    assert stat.S_IMODE((union / "bin").stat().st_mode) == 0o755
    assert _temps(union) == []


def test_copy_empty_and_multi_chunk_files(src: Path, union: Path) -> None:
    """Empty files and files spanning many chunks are copied exactly."""
    (src / "empty").write_bytes(b"")
    data = os.urandom(100_003)
    (src / "big").write_bytes(data)
    calls: list[int] = []
    for name in ("empty", "big"):
        outcome = fsops.copy_file(
            union, name, src, name, _fp(src, name), chunk_size=4096, chunk_callback=calls.append
        )
        assert outcome is CopyOutcome.COPIED
    assert (union / "empty").read_bytes() == b""
    assert (union / "big").read_bytes() == data
    assert calls[-1] == len(data) and len(calls) == 25


@pytest.mark.parametrize("broken", ["copy_file_range", "sendfile"])
def test_copy_falls_back_when_kernel_copy_is_unsupported(
    src: Path, union: Path, monkeypatch: pytest.MonkeyPatch, broken: str
) -> None:
    """When copy_file_range or sendfile are unsupported the next method finishes the copy."""
    data = os.urandom(50_000)
    (src / "f").write_bytes(data)

    def unsupported(*_args: Any) -> int:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", unsupported)
    if broken == "sendfile":
        monkeypatch.setattr(os, "sendfile", unsupported)
    expected = _fp(src, "f")
    outcome = fsops.copy_file(union, "f", src, "f", expected, chunk_size=8192)
    assert outcome is CopyOutcome.COPIED
    assert (union / "f").read_bytes() == data


def test_file_changed_between_stat_and_copy(src: Path, union: Path) -> None:
    """A file rewritten after it was scanned is CHANGED and nothing is written."""
    (src / "f").write_text("v1")
    expected = _fp(src, "f")
    (src / "f").write_text("version 2")
    assert fsops.copy_file(union, "f", src, "f", expected) is CopyOutcome.CHANGED
    assert _names(union) == []


def test_file_changed_during_copy(src: Path, union: Path) -> None:
    """A file appended to while being copied is CHANGED; the old destination stays intact."""
    (src / "f").write_bytes(b"a" * 20_000)
    (union / "f").write_text("published before")
    expected = _fp(src, "f")

    def append(copied: int) -> None:
        if copied == 4096:
            with (src / "f").open("ab") as handle:
                handle.write(b"more")

    outcome = fsops.copy_file(
        union, "f", src, "f", expected, chunk_size=4096, chunk_callback=append
    )
    assert outcome is CopyOutcome.CHANGED
    assert (union / "f").read_text() == "published before"
    assert _temps(union) == []


def test_same_size_rewrite_with_mtime_reset_is_detected(src: Path, union: Path) -> None:
    """An in-place rewrite that restores size and mtime is still caught through ctime."""
    (src / "f").write_bytes(b"a" * 10_000)
    expected = _fp(src, "f")

    def rewrite(copied: int) -> None:
        if copied == 4096:
            with (src / "f").open("r+b") as handle:
                handle.write(b"b" * 100)
            os.utime(src / "f", ns=(expected.mtime_ns, expected.mtime_ns))

    outcome = fsops.copy_file(
        union, "f", src, "f", expected, chunk_size=4096, chunk_callback=rewrite
    )
    assert outcome is CopyOutcome.CHANGED
    assert _names(union) == []


def test_error_during_copy_leaves_no_temp(src: Path, union: Path) -> None:
    """An exception in the middle of copying removes the temporary file and re-raises."""
    (src / "f").write_bytes(b"x" * 10_000)

    def fail(_copied: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        fsops.copy_file(union, "d/f", src, "f", _fp(src, "f"), chunk_size=1000, chunk_callback=fail)
    assert _names(union / "d") == []


def test_vanished_file_and_directory(src: Path, union: Path) -> None:
    """A source deleted after scanning, or whose directory was deleted, is VANISHED."""
    (src / "d").mkdir()
    (src / "d" / "f").write_text("x")
    (src / "g").write_text("y")
    in_dir, top = _fp(src, "d/f"), _fp(src, "g")
    (src / "g").unlink()
    assert fsops.copy_file(union, "g", src, "g", top) is CopyOutcome.VANISHED
    (src / "d" / "f").unlink()
    (src / "d").rmdir()
    assert fsops.copy_file(union, "d/f", src, "d/f", in_dir) is CopyOutcome.VANISHED
    assert _names(union) == []


def test_unreadable_file(src: Path, union: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Permission denied opening the source gives UNREADABLE (simulated: tests run as root)."""
    (src / "f").write_text("x")
    expected = _fp(src, "f")

    def denying_open(path: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
        if path == "f" and not flags & os.O_WRONLY:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return _real_open(path, flags, mode, **kw)

    monkeypatch.setattr(os, "open", denying_open)
    assert fsops.copy_file(union, "f", src, "f", expected) is CopyOutcome.UNREADABLE
    assert _names(union) == []


def test_copy_replaces_destination_symlink_not_its_target(
    src: Path, union: Path, outside: Path
) -> None:
    """Copying onto a published symlink replaces the link; its target is untouched."""
    (union / "f").symlink_to(outside / "secret")
    (src / "f").write_text("new")
    assert fsops.copy_file(union, "f", src, "f", _fp(src, "f")) is CopyOutcome.COPIED
    assert not (union / "f").is_symlink()
    assert (union / "f").read_text() == "new"
    assert (outside / "secret").read_text() == "secret\n"


def test_copy_replaces_destination_directory(src: Path, union: Path, outside: Path) -> None:
    """A directory at the destination is removed (type change) without following its links."""
    (union / "f" / "sub").mkdir(parents=True)
    (union / "f" / "sub" / "link").symlink_to(outside)
    (src / "f").write_text("file now")
    assert fsops.copy_file(union, "f", src, "f", _fp(src, "f")) is CopyOutcome.COPIED
    assert (union / "f").read_text() == "file now"
    assert (outside / "secret").read_text() == "secret\n"


def test_union_symlink_component_is_never_written_through(
    src: Path, union: Path, outside: Path
) -> None:
    """A symlink 'a -> elsewhere' in the union dir is refused or replaced, never followed."""
    (union / "a").symlink_to(outside)
    (src / "f").write_text("x")
    expected = _fp(src, "f")
    with pytest.raises(NotADirectoryError, match="replace=True"):
        fsops.copy_file(union, "a/f", src, "f", expected)
    with pytest.raises(NotADirectoryError):
        fsops.make_dir(union, "a/b")
    with pytest.raises(NotADirectoryError):
        fsops.make_symlink(union, "a/l", "x")
    assert fsops.delete(union, "a/secret") is False
    assert _names(outside) == ["secret"]
    assert (outside / "secret").read_text() == "secret\n"

    assert fsops.copy_file(union, "a/f", src, "f", expected, replace=True) is CopyOutcome.COPIED
    assert not (union / "a").is_symlink()
    assert (union / "a" / "f").read_text() == "x"
    assert _names(outside) == ["secret"]


# --- other writes -------------------------------------------------------------------


def test_make_dir_modes_and_type_change(union: Path) -> None:
    """make_dir creates parents, applies the mode without special bits, replaces a file."""
    fsops.make_dir(union, "a/b", 0o2775)
    assert stat.S_IMODE((union / "a" / "b").stat().st_mode) == 0o775
    assert stat.S_IMODE((union / "a").stat().st_mode) == 0o755
    (union / "a" / "b" / "keep").write_text("x")
    fsops.make_dir(union, "a/b", 0o700)
    assert stat.S_IMODE((union / "a" / "b").stat().st_mode) == 0o700
    assert (union / "a" / "b" / "keep").exists()
    (union / "file").write_text("x")
    fsops.make_dir(union, "file")
    assert (union / "file").is_dir()
    fsops.make_dir(union, "")  # the root is left alone


def test_make_symlink_stores_target_verbatim(union: Path) -> None:
    """Symlink targets are stored as given and replace files and directories."""
    fsops.make_symlink(union, "rel", "../../../outside/$(VAR)")
    assert str((union / "rel").readlink()) == "../../../outside/$(VAR)"
    (union / "f").write_text("x")
    fsops.make_symlink(union, "f", "/etc/passwd")
    assert str((union / "f").readlink()) == "/etc/passwd"
    (union / "d" / "e").mkdir(parents=True)
    fsops.make_symlink(union, "d", "target")
    assert str((union / "d").readlink()) == "target"
    fsops.make_symlink(union, "d", "other")
    assert str((union / "d").readlink()) == "other"
    with pytest.raises(ValueError, match="empty"):
        fsops.make_symlink(union, "x", "")
    assert _temps(union) == []


def test_delete_tree_never_touches_link_targets(union: Path, outside: Path) -> None:
    """Deleting a tree removes links inside it, never what they point to."""
    (union / "t" / "sub").mkdir(parents=True)
    (union / "t" / "sub" / "f").write_text("x")
    (union / "t" / "dirlink").symlink_to(outside)
    (union / "t" / "sub" / "filelink").symlink_to(outside / "secret")
    (union / "top").symlink_to(outside)
    assert fsops.delete(union, "t") is True
    assert fsops.delete(union, "top") is True
    assert _names(union) == []
    assert _names(outside) == ["secret"]
    assert (outside / "secret").read_text() == "secret\n"
    assert fsops.delete(union, "t") is False
    assert fsops.delete(union, "missing/deeper") is False
    with pytest.raises(ValueError, match="root"):
        fsops.delete(union, "")


# --- inbox mode ---------------------------------------------------------------------


def test_remove_staged_only_when_unchanged(src: Path, outside: Path) -> None:
    """Staged entries are removed only while they still match the published fingerprint."""
    (src / "f").write_text("v1")
    (src / "g").write_text("v1")
    (src / "l").symlink_to(outside)
    (src / "d").mkdir()
    (src / "full").mkdir()
    (src / "full" / "x").write_text("x")
    f, g, link, d, full = (_fp(src, n) for n in ("f", "g", "l", "d", "full"))
    (src / "g").write_text("version 2")
    assert fsops.remove_staged(src, "f", f) is True
    assert fsops.remove_staged(src, "g", g) is False
    assert fsops.remove_staged(src, "l", link) is True
    assert fsops.remove_staged(src, "d", d) is True
    assert fsops.remove_staged(src, "full", full) is False
    assert fsops.remove_staged(src, "f", f) is False
    assert _names(src) == ["full", "g"]
    assert _names(outside) == ["secret"]


def test_remove_staged_keeps_version_renamed_in_at_the_last_moment(
    src: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A newer file renamed onto the name just before removal survives, under its name."""
    (src / "f").write_text("v1")
    expected = _fp(src, "f")
    real_rename = os.rename
    newer = src / "newer"
    newer.write_text("v2")

    def racing_rename(a: Any, b: Any, **kw: Any) -> None:
        if newer.exists():
            real_rename(newer, src / "f")
        real_rename(a, b, **kw)

    monkeypatch.setattr(os, "rename", racing_rename)
    assert fsops.remove_staged(src, "f", expected) is False
    assert _names(src) == ["f"]
    assert (src / "f").read_text() == "v2"


def test_remove_staged_does_not_follow_intermediate_symlinks(src: Path, outside: Path) -> None:
    """A path through a symlinked directory is never removed."""
    (src / "d").symlink_to(outside)
    st = (outside / "secret").stat()
    expected = Fingerprint(
        EntryType.FILE, stat.S_IMODE(st.st_mode), st.st_size, st.st_mtime_ns, st.st_ino
    )
    assert fsops.remove_staged(src, "d/secret", expected) is False
    assert (outside / "secret").exists()


def test_walk_subtree_never_follows_symlinked_components(src: Path, outside: Path) -> None:
    """A subtree walk yields root-relative paths and refuses a path through a symlink."""
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "f").write_text("x")
    (src / "a" / "out").symlink_to(outside)
    assert sorted(_walk(src, subdir="a")) == ["a/b", "a/b/f", "a/out"]
    assert sorted(_walk(src, subdir="a/b")) == ["a/b/f"]
    with pytest.raises(NotADirectoryError):
        _walk(src, subdir="a/out")
    with pytest.raises(FileNotFoundError):
        _walk(src, subdir="a/missing")
    with pytest.raises(ValueError, match=r"'\.\.'"):
        _walk(src, subdir="../elsewhere")


def test_non_utf8_symlink_target_round_trips(src: Path, union: Path) -> None:
    """A symlink target that is not UTF-8 is scanned and recreated byte for byte."""
    (src / "l").symlink_to(os.fsdecode(b"../caf\xe9/x"))
    link = _fp(src, "l")
    fsops.make_symlink(union, "l", link.target)
    assert os.fsencode((union / "l").readlink()) == b"../caf\xe9/x"
