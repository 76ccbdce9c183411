"""The reconciliation scan as a merge of the staging tree and the index, both in byte order,
checked against the plain comparison it replaces (every live entry in a dict)."""

from __future__ import annotations

import functools
import itertools
import os
import sqlite3
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cvmfs_syncd import fsops
from cvmfs_syncd.config import SourceMode, StagingConfig
from cvmfs_syncd.metrics import Metrics
from cvmfs_syncd.model import Dirty, EntryType, Fingerprint, Op, OpKind
from cvmfs_syncd.paths import repo_path
from cvmfs_syncd.sources.index_records import read_ahead
from cvmfs_syncd.sources.staging import StagingInput
from cvmfs_syncd.sources.staging_merge import StagingMerge
from cvmfs_syncd.state import State

#: Names whose order differs between "component by component" and "whole path bytes"
#: ("." and "-" sort before "/"), names that are not UTF-8, an rsync temporary name
#: (ignored) and the ready marker.
_NAMES = [
    b"a",
    b"a.b",
    b"a-b",
    b"a0",
    b"b",
    b"\xff",
    b"caf\xe9",
    b"caf\xc3\xa9",
    b".a.Xy12Zq",
    b"READY",
]

_paths = st.lists(st.lists(st.sampled_from(_NAMES), min_size=1, max_size=3), max_size=14)
_kinds = st.sampled_from(["file", "dir", "symlink", "fifo"])
_live = st.sampled_from(["none", "same", "changed", "inode", "stale-target"])


def _naive(source: StagingInput, now: float) -> list[Dirty]:
    """What reconcile returned before it was a merge: the whole index in a dict."""
    target = repo_path(source.config.target, "")
    live = {
        e.source_path: e for e in source.state.published_under(source.repo, target, source.name)
    }
    hints: list[Dirty] = []
    if not source.root.is_dir():
        if source.config.mode == "mirror":
            hints += [Dirty(source.name, rel, now, from_scan=True) for rel in live if rel]
        return hints
    seen: set[str] = set()
    for rel, found in list(fsops.walk_staging(source.root)):
        seen.add(rel)
        if StagingMerge(source, target, now).differs(rel, found, live.get(rel)):
            hints.append(Dirty(source.name, rel, now, from_scan=True))
    if source.config.mode == "mirror":
        hints += [
            Dirty(source.name, rel, now, from_scan=True) for rel in live if rel and rel not in seen
        ]
    return hints


def _build(root: Path, paths: list[list[bytes]], kinds: list[str]) -> None:
    for parts, kind in zip(paths, kinds, strict=False):
        where = os.fsencode(root)
        ok = True
        for part in parts[:-1]:
            where = os.path.join(where, part)
            if not os.path.lexists(where):
                os.mkdir(where)
            elif not os.path.isdir(where) or os.path.islink(where):
                ok = False
                break
        full = os.path.join(where, parts[-1])
        if not ok or os.path.lexists(full):
            continue
        if kind == "file":
            with open(full, "wb") as handle:
                handle.write(b"x" * len(parts))
        elif kind == "dir":
            os.mkdir(full)
        elif kind == "symlink":
            os.symlink(b"../" + parts[-1], full)
        else:
            os.mkfifo(full)


def _index(
    source: StagingInput, choices: list[str], extra: list[list[bytes]], fp_mode: int
) -> None:
    """Publish a mix of the staged entries (equal, changed...) and paths not staged."""
    ops = []
    walked = list(fsops.walk_staging(source.root))
    for (rel, found), choice in zip(walked, choices, strict=False):
        if not isinstance(found, Fingerprint) or choice == "none":
            continue
        fp = found
        if choice == "changed":
            fp = Fingerprint(
                found.type, found.mode ^ 0o1, found.size, found.mtime_ns, found.inode, found.target
            )
        elif choice == "inode":
            fp = Fingerprint(
                found.type, found.mode, found.size, found.mtime_ns, found.inode + 1, found.target
            )
        elif choice == "stale-target":
            # published under an older target: the same source path twice in the index
            old = Fingerprint(EntryType.FILE, 0o600, 1, 1, 1)
            ops.append(Op(OpKind.COPY_FILE, repo_path("/", rel), source.name, rel, old))
        ops.append(Op(OpKind.COPY_FILE, repo_path(source.config.target, rel), source.name, rel, fp))
    for parts in extra:
        rel = os.fsdecode(b"/".join(parts))
        fp = Fingerprint(EntryType.FILE, fp_mode, 1, 2, 3)
        ops.append(Op(OpKind.COPY_FILE, repo_path(source.config.target, rel), source.name, rel, fp))
    source.state.apply_published(source.repo, ops, 1)


@settings(max_examples=120, deadline=None)
@given(
    paths=_paths,
    kinds=st.lists(_kinds, min_size=14, max_size=14),
    choices=st.lists(_live, min_size=40, max_size=40),
    extra=_paths,
    mode=st.sampled_from(["mirror", "inbox"]),
    marker=st.sampled_from(["", "READY"]),
    reported=st.sets(st.integers(0, 39), max_size=4),
    aside=st.sets(st.integers(0, 39), max_size=4),
    fp_mode=st.sampled_from([0o644, 0o600]),
)
def test_the_merge_finds_exactly_what_a_dict_comparison_finds(
    paths: list[list[bytes]],
    kinds: list[str],
    choices: list[str],
    extra: list[list[bytes]],
    mode: SourceMode,
    marker: str,
    reported: set[int],
    aside: set[int],
    fp_mode: int,
) -> None:
    """Same hints, as many times each, for any tree, index, marker, mode and history."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "staging"
        root.mkdir()
        _build(root, paths, kinds)
        state = State(Path(tmp) / "state")
        try:
            config = StagingConfig(path=root, target="/sw", mode=mode, ready_marker=marker)
            source = StagingInput("r", config, state, Metrics())
            _index(source, choices, extra, fp_mode)
            walked = list(fsops.walk_staging(root))
            for i, (rel, found) in enumerate(walked):
                if i in reported:
                    source.reported[rel] = "refused"
                if i in aside and isinstance(found, Fingerprint):
                    state.set_aside("r", source.name, rel, "refused", found)
            merged = source.reconcile(1.0)
            assert Counter(merged) == Counter(_naive(source, 1.0))
        finally:
            state.close()


def test_names_that_sort_differently_by_component_and_by_bytes(tmp_path: Path) -> None:
    """ "a", "a.b", "a/b", "a-b": the scan yields byte order, and nothing live is hinted."""
    root = tmp_path / "staging"
    for d in ("a", "a/b", "a-b"):
        (root / d).mkdir(parents=True)
    for f in ("a.b", "a/b/c", "a/b.c", "a-b/x", "a0"):
        (root / f).write_text("x")
    scanned = [rel for rel, _ in fsops.scan_staging(root)]
    assert scanned == sorted(scanned)
    assert scanned == [b"a", b"a-b", b"a-b/x", b"a.b", b"a/b", b"a/b.c", b"a/b/c", b"a0"]
    state = State(tmp_path / "state")
    source = StagingInput("r", StagingConfig(path=root, target="/sw"), state, Metrics())
    first = source.reconcile(1.0)
    assert sorted(d.rel_path for d in first) == sorted(os.fsdecode(r) for r in scanned)
    ops = [
        Op(OpKind.COPY_FILE, repo_path("/sw", rel), source.name, rel, found)
        for rel, found in fsops.walk_staging(root)
        if isinstance(found, Fingerprint)
    ]
    state.apply_published("r", ops, 1)
    assert source.reconcile(2.0) == []
    (root / "a/b/c").unlink()
    (root / "a.b").chmod(0o600)
    assert [d.rel_path for d in source.reconcile(3.0)] == ["a.b", "a/b/c"]
    state.close()


def test_scan_reports_special_files_and_never_follows_symlinks(tmp_path: Path) -> None:
    """FIFOs come as Skipped, symlinks as symlinks (their targets are not entered)."""
    root = tmp_path / "staging"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("s")
    (root / "link").symlink_to(outside)
    os.mkfifo(root / "pipe")
    found = dict(fsops.scan_staging(root))
    assert set(found) == {b"link", b"pipe"}
    link = found[b"link"]
    assert isinstance(link, Fingerprint)
    assert (link.type, link.target) == (EntryType.SYMLINK, os.fspath(outside))
    assert found[b"pipe"] == fsops.Skipped("fifo", "named pipes are never read")


def test_a_failed_scan_hints_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tree that cannot be read to the end must not look like deletions in mirror mode."""
    root = tmp_path / "staging"
    root.mkdir()
    (root / "a").write_text("x")
    state = State(tmp_path / "state")
    source = StagingInput("r", StagingConfig(path=root, target="/sw"), state, Metrics())
    fp = Fingerprint(EntryType.FILE, 0o644, 1, 2, 3)
    state.apply_published("r", [Op(OpKind.COPY_FILE, "sw/z", source.name, "z", fp)], 1)

    scan = fsops.scan_staging_runs

    def broken(*args: Any, **kwargs: Any) -> object:
        yield from itertools.islice(scan(*args, **kwargs), 1)  # the run holding "a"
        raise OSError(5, "I/O error")

    monkeypatch.setattr(fsops, "scan_staging_runs", broken)
    assert source.reconcile(1.0) == []
    state.close()


@settings(max_examples=60, deadline=None)
@given(
    paths=_paths,
    kinds=st.lists(_kinds, min_size=14, max_size=14),
    choices=st.lists(_live, min_size=40, max_size=40),
    extra=_paths,
    mode=st.sampled_from(["mirror", "inbox"]),
    page=st.sampled_from([1, 2, 3, 7]),
)
def test_the_merge_is_the_same_whatever_the_index_page_size(
    paths: list[list[bytes]],
    kinds: list[str],
    choices: list[str],
    extra: list[list[bytes]],
    mode: SourceMode,
    page: int,
) -> None:
    """Runs of the tree compared across the boundaries of small index pages."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "staging"
        root.mkdir()
        _build(root, paths, kinds)
        state = State(Path(tmp) / "state")
        try:
            config = StagingConfig(path=root, target="/sw", mode=mode)
            source = StagingInput("r", config, state, Metrics())
            _index(source, choices, extra, 0o644)
            pages = state.scan_pages
            state.scan_pages = functools.partial(pages, page=page)  # type: ignore[method-assign]
            merged = source.reconcile(1.0)
            assert Counter(merged) == Counter(_naive(source, 1.0))
        finally:
            state.close()


def test_runs_hold_compact_records_in_byte_order(tmp_path: Path) -> None:
    """Records: path, key; a file's key is its fingerprint, a directory's its mode, and
    anything else has an empty key and its description in ``found``."""
    root = tmp_path / "staging"
    (root / "d").mkdir(parents=True)
    (root / "d").chmod(0o750)
    (root / "d/f").write_text("abc")
    (root / "d/f").chmod(0o644)
    (root / "d.x").write_text("")
    os.symlink("f", root / "d/l")
    os.mkfifo(root / "p")
    (root / os.fsdecode(b"\xff")).write_text("")
    (root / "\u00e9").write_text("")
    runs = list(fsops.scan_staging_runs(root))
    records = b"".join(r for r, _ in runs).split(b"\0")[:-1]
    rels = records[0::2]
    assert rels == [b"d", b"d.x", b"d/f", b"d/l", b"p", "\u00e9".encode(), b"\xff"]
    keys = dict(zip(rels, records[1::2], strict=True))
    f = os.lstat(root / "d/f")
    assert keys[b"d/f"] == b"f420 3 %d %d" % (f.st_mtime_ns, f.st_ino)
    assert fsops.file_fingerprint(keys[b"d/f"]) == fsops.fingerprint_of(f)
    assert keys[b"d"] == b"d488"
    assert keys[b"d/l"] == keys[b"p"] == b""
    found = {rel: what for _, run_found in runs for rel, what in run_found.items()}
    assert set(found) == {b"d", b"d/l", b"p"}
    assert found[b"p"] == fsops.Skipped("fifo", "named pipes are never read")
    assert [r for r, _ in fsops.scan_staging(root)] == rels


def test_read_ahead_hands_over_errors_and_stops_when_left() -> None:
    """An error reading the index comes out in the scan; a scan that stops early leaves
    no reader behind."""

    def failing() -> Iterator[bytes]:
        yield b"a\0-\0"
        raise sqlite3.OperationalError("disk I/O error")

    pages = read_ahead(failing())
    assert next(pages) == b"a\0-\0"
    with pytest.raises(sqlite3.OperationalError):
        next(pages)

    read: list[int] = []

    def endless() -> Iterator[bytes]:
        for i in itertools.count():
            read.append(i)
            yield b"%d\0-\0" % i

    before = threading.active_count()
    pages = read_ahead(endless(), depth=2)
    assert next(pages) == b"0\0-\0"
    pages.close()
    assert threading.active_count() == before
    assert len(read) <= 5
