"""Tarball drops as the sources see them: which top-level names are drops, where they go,
and how the staging and S3 sources plan, reconcile and delete them (no repository)."""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

import pytest

from cvmfs_syncd.batching import Pending
from cvmfs_syncd.config import S3Config, StagingConfig
from cvmfs_syncd.errors import UnsafeName
from cvmfs_syncd.ingest import DropRefusal
from cvmfs_syncd.metrics import Metrics
from cvmfs_syncd.model import Dirty, EntryType, Fingerprint, Op, OpKind
from cvmfs_syncd.planner import Plan
from cvmfs_syncd.sources.drops import (
    Drops,
    drop_path,
    ingest_limits,
    ingested_from,
    sharing_base,
    staged_drops,
    top_level_tarball,
)
from cvmfs_syncd.sources.index_records import IndexRecords
from cvmfs_syncd.sources.s3 import S3Input
from cvmfs_syncd.sources.staging import StagingInput
from cvmfs_syncd.state import State
from tests.sources.s3_support import FakeS3

REPO = "drops.example.org"
T0 = 1_800_000_000.0


def test_drops_are_top_level_tarballs_whose_base_is_free() -> None:
    """Collisions are refused whatever the order; a gone tarball still maps to its base
    (mirror mode deletes it); names in a directory are never drops."""
    drops = Drops.find(
        ["a.tgz", "b.tgz", "b.tar.gz", "c.tar", "c", "d.tar.xz", "e.tgz"],
        {"c", "e.tgz"},
        allow_reserved_names=False,
    )
    assert drops.bases == {"a.tgz": "a", "d.tar.xz": "d"}
    assert {n: r.reason for n, r in drops.refused.items()} == {
        "b.tar.gz": DropRefusal.SAME_BASE,
        "b.tgz": DropRefusal.SAME_BASE,
        "c.tar": DropRefusal.BASE_TAKEN,
    }
    assert drops.is_drop("a.tgz") and drops.is_drop("gone.tgz")
    assert not drops.is_drop("b.tgz") and not drops.is_drop("e.tgz")  # refused; a directory
    assert not drops.is_drop("x/a.tgz") and not drops.is_drop("plain.txt")
    assert top_level_tarball("x/a.tgz") is None and top_level_tarball("a.tar.bz2") == "a"


def test_paths_of_drops_and_what_an_ingest_wrote() -> None:
    """A drop goes to its base under the target; rows at and below it came from it."""
    assert drop_path("/sw", "pkg.tar.gz") == "sw/pkg"
    assert drop_path("/", "pkg.tgz") == "pkg"
    assert drop_path("/sw", "pkg.txt") is None
    with pytest.raises(UnsafeName):
        drop_path("/sw", "...tgz")
    assert ingested_from("/sw", "sw/pkg/a/b", "pkg.tgz")
    assert ingested_from("/sw", "sw/pkg", "pkg.tgz")
    assert not ingested_from("/sw", "sw/pkg.tgz", "pkg.tgz")  # published as a plain file
    assert not ingested_from("/sw", "sw/pkgx", "pkg.tgz")
    assert not ingested_from("/sw", "sw/pkg/a", "pkg/a")


def test_a_change_to_one_name_brings_back_the_tarballs_sharing_its_base() -> None:
    """Removing ``foo/`` or ``foo.tgz`` may end the refusal of ``foo.tar.gz``."""
    reported = {"foo.tar.gz": "refused", "bar.tgz": "refused", "foo/x": "fifo"}
    assert sharing_base("foo", reported) == ["foo.tar.gz"]
    assert reported == {"bar.tgz": "refused", "foo/x": "fifo"}
    reported["foo.tar.gz"] = "refused"
    assert sharing_base("foo.tgz", reported) == ["foo.tar.gz"]
    assert sharing_base("foo/x", reported) == []
    assert sharing_base("", reported) == []


def test_staged_drops_read_the_top_level_without_following_links(tmp_path: Path) -> None:
    """Directories and symlinks are never tarballs; ignored names take no base."""
    (tmp_path / "a.tgz").write_bytes(b"")
    (tmp_path / "dir.tgz").mkdir()
    (tmp_path / "link.tgz").symlink_to("a.tgz")
    (tmp_path / "b.tgz").write_bytes(b"")
    (tmp_path / "b.tmp").write_bytes(b"")
    drops = staged_drops(tmp_path, ("*.tmp",), allow_reserved_names=False)
    assert drops.bases == {"a.tgz": "a", "b.tgz": "b"}
    assert drops.present == {"a.tgz", "dir.tgz", "link.tgz", "b.tgz"}
    assert staged_drops(tmp_path / "missing", (), allow_reserved_names=False) == Drops()


def test_a_sources_limits() -> None:
    """The ``max_ingest_*`` and name keys of a source become its IngestLimits."""
    config = S3Config(
        bucket="b",
        max_ingest_bytes=10,
        max_ingest_members=3,
        allow_absolute_symlinks=True,
        allow_reserved_names=True,
    )
    limits = ingest_limits(config)
    assert (limits.max_bytes, limits.max_members) == (10, 3)
    assert limits.allow_absolute_symlinks and limits.allow_reserved_names


# --------------------------------------------------------------------------- staging


def staging_source(state: State, root: Path, **config: object) -> StagingInput:
    values: dict[str, object] = {"path": root, "target": "/sw", "settle_seconds": 0.0}
    values["tarballs"] = "ingest"
    values.update(config)
    return StagingInput(REPO, StagingConfig(**values), state, Metrics())  # type: ignore[arg-type]


def plan_of(source: StagingInput | S3Input, hints: Sequence[Dirty], now: float) -> Plan:
    entries = [Pending(h.source, h.rel_path, h.at - 10, h.at - 10, from_scan=True) for h in hints]
    return source.plan(entries, now)


def record(state: State, op: Op, paths: Sequence[str]) -> None:
    """What the lane records after the ingest of ``op``."""
    assert op.kind is OpKind.INGEST
    state.apply_ingested(REPO, op, paths, 5)


def test_staged_tarball_is_ingested_at_its_base_and_then_settles(
    state: State, staging: Path
) -> None:
    """One INGEST op at the base; once recorded, a scan finds nothing to do; the tarball
    removed (mirror), one hint deletes the base counting everything below it."""
    (staging / "pkg.tar.gz").write_bytes(b"tarball")
    (staging / "plain").write_bytes(b"p")
    source = staging_source(state, staging)
    plan = plan_of(source, source.reconcile(T0), T0)
    by_path = {op.repo_path: op for op in plan.ops}
    assert {p: o.kind for p, o in by_path.items()} == {
        "sw/pkg": OpKind.INGEST,
        "sw/plain": OpKind.COPY_FILE,
    }
    ingest = by_path["sw/pkg"]
    assert ingest.source_path == "pkg.tar.gz"
    assert ingest.fingerprint is not None and ingest.fingerprint.size == 7
    record(state, ingest, [f"f{i}" for i in range(30)])
    state.apply_published(REPO, [by_path["sw/plain"]], 5)
    assert source.reconcile(T0 + 1) == []
    (staging / "pkg.tar.gz").unlink()
    hints = source.reconcile(T0 + 2)
    assert [h.rel_path for h in hints] == ["pkg.tar.gz"]
    deleted = plan_of(source, hints, T0 + 2)
    assert [(o.kind, o.repo_path) for o in deleted.guarded] == [(OpKind.DELETE, "sw/pkg")]
    assert "delete 31 of 32" in deleted.guard_reason


def test_staged_collisions_are_refused_and_planned_again_when_they_end(
    state: State, staging: Path
) -> None:
    """``pkg.tgz`` beside ``pkg.tar.gz``: both set aside; once one goes, a watch event
    brings the other back and it is ingested."""
    (staging / "pkg.tgz").write_bytes(b"one")
    (staging / "pkg.tar.gz").write_bytes(b"two")
    source = staging_source(state, staging)
    plan = plan_of(source, source.reconcile(T0), T0)
    assert plan.ops == []
    assert {a.rel_path: a.refusal for a in plan.set_aside} == {
        "pkg.tgz": "same-base",
        "pkg.tar.gz": "same-base",
    }
    assert source.reconcile(T0 + 1) == []  # reported once
    submitted: list[Dirty] = []
    source._submit = submitted.append
    (staging / "pkg.tgz").unlink()
    assert source._same_base("pkg.tgz") == ["pkg.tar.gz"]
    plan = plan_of(source, [Dirty(source.name, "pkg.tar.gz", T0 + 2)], T0 + 2)
    assert [(o.kind, o.repo_path) for o in plan.ops] == [(OpKind.INGEST, "sw/pkg")]


def test_a_directory_named_like_a_tarballs_base_keeps_its_name(state: State, staging: Path) -> None:
    """``pkg/`` beside ``pkg.tgz``: the directory is published, the tarball refused."""
    (staging / "pkg").mkdir()
    (staging / "pkg" / "x").write_bytes(b"x")
    (staging / "pkg.tgz").write_bytes(b"t")
    source = staging_source(state, staging)
    plan = plan_of(source, source.reconcile(T0), T0)
    assert {o.repo_path: o.kind for o in plan.ops} == {
        "sw/pkg": OpKind.MAKE_DIR,
        "sw/pkg/x": OpKind.COPY_FILE,
    }
    assert [(a.rel_path, a.refusal) for a in plan.set_aside] == [("pkg.tgz", "base-taken")]


def test_files_mode_publishes_a_tarball_as_a_file(state: State, staging: Path) -> None:
    """The default: a tarball is an ordinary file."""
    (staging / "pkg.tgz").write_bytes(b"t")
    source = staging_source(state, staging, tarballs="files")
    plan = plan_of(source, source.reconcile(T0), T0)
    assert [(o.kind, o.repo_path) for o in plan.ops] == [(OpKind.COPY_FILE, "sw/pkg.tgz")]


def test_path_status_of_a_staged_tarball_looks_at_its_base(state: State, staging: Path) -> None:
    """``wait`` on a tarball: live once its base records this version."""
    tar = staging / "pkg.tgz"
    tar.write_bytes(b"t")
    source = staging_source(state, staging)
    assert source.path_status(tar) == {
        "repository": REPO,
        "path": "/sw/pkg",
        "source": source.name,
        "live": False,
        "reason": "pending",
    }
    st = tar.stat()
    mode = stat.S_IMODE(st.st_mode)
    fp = Fingerprint(EntryType.FILE, mode, st.st_size, st.st_mtime_ns, st.st_ino)
    record(state, Op(OpKind.INGEST, "sw/pkg", source.name, "pkg.tgz", fp), [])
    assert source.path_status(tar)["live"] is True  # type: ignore[index]
    os.chmod(tar, mode ^ 0o004)
    assert source.path_status(tar)["live"] is False  # type: ignore[index]


# --------------------------------------------------------------------------- S3


def s3_source(state: State, fake: FakeS3, **config: object) -> S3Input:
    values: dict[str, object] = {"bucket": "ci", "prefix": "builds/", "target": "/ci"}
    values.update(poll_seconds=1.0, tarballs="ingest")
    values.update(config)
    return S3Input(
        REPO,
        S3Config(**values),  # type: ignore[arg-type]
        state,
        Metrics(),
        client_factory=lambda _config: fake,  # type: ignore[arg-type,return-value]
    )


def test_s3_tarball_key_is_ingested_and_its_members_never_hinted(state: State) -> None:
    """A stable tarball key is one INGEST op; what its ingest recorded settles the next
    reconciliation; the key deleted, one hint deletes the base with all below it."""
    fake = FakeS3()
    fake.put("builds/pkg.tgz", b"tarball")
    fake.put("builds/keep", b"k")
    source = s3_source(state, fake)
    source.poll(T0)
    plan = plan_of(source, source.reconcile(T0 + 2), T0 + 2)
    ops = {op.repo_path: op for op in plan.ops}
    assert {p: o.kind for p, o in ops.items()} == {
        "ci/pkg": OpKind.INGEST,
        "ci/keep": OpKind.COPY_FILE,
    }
    assert ops["ci/pkg"].source_path == "builds/pkg.tgz"
    record(state, ops["ci/pkg"], ["a", "d", "d/b"])
    state.apply_published(REPO, [ops["ci/keep"]], 5)
    assert source.reconcile(T0 + 3) == []
    del fake.objects["builds/pkg.tgz"]
    hints = source.reconcile(T0 + 4)
    assert [h.rel_path for h in hints] == ["pkg.tgz"]
    plan = plan_of(source, hints, T0 + 4)
    assert [(o.kind, o.repo_path) for o in plan.ops] == [(OpKind.DELETE, "ci/pkg")]


def test_s3_refused_tarballs_are_set_aside_once(state: State) -> None:
    """Two tarballs with one base: each is set aside (by key) and not hinted again."""
    fake = FakeS3()
    fake.put("builds/pkg.tgz", b"1")
    fake.put("builds/pkg.tar.gz", b"2")
    source = s3_source(state, fake)
    source.poll(T0)
    hints = source.reconcile(T0 + 2)
    plan = plan_of(source, hints, T0 + 2)
    assert plan.ops == []
    refused = {a.rel_path: a.refusal for a in plan.set_aside}
    assert refused == {"builds/pkg.tgz": "same-base", "builds/pkg.tar.gz": "same-base"}
    for aside in plan.set_aside:
        state.set_aside(REPO, aside.source, aside.rel_path, aside.reason, None)
    assert source.reconcile(T0 + 3) == []
    del fake.objects["builds/pkg.tgz"]
    hints = source.reconcile(T0 + 4)
    assert [h.rel_path for h in hints] == ["pkg.tar.gz"]
    plan = plan_of(source, hints, T0 + 4)
    assert [(o.kind, o.repo_path) for o in plan.ops] == [(OpKind.INGEST, "ci/pkg")]


def test_the_rows_an_ingest_wrote_settle_a_scan_together() -> None:
    """Several index rows with the tarball's source path: a run of the tree that ends with
    it never settles on the first of them alone (the rest would look deleted)."""
    rows = b"pkg.tgz\0K\0" * 3
    index = IndexRecords(iter([b"a\0k\0", rows + b"z\0k\0"]))
    assert index.settles(b"a\0k\0")
    assert not index.settles(b"pkg.tgz\0K\0")
    assert not index.settles(b"pkg.tgz\0K\0z\0k\0")
    assert index.head() == b"pkg.tgz"
    assert index.pop(b"pkg.tgz") == b"K"
    assert index.settles(b"z\0k\0")
    assert index.head() is None


def test_a_lone_tarball_settles_after_its_ingest(state: State, staging: Path) -> None:
    """The tarball alone in staging, recorded with its paths: a scan finds nothing."""
    (staging / "pkg.tgz").write_bytes(b"t")
    source = staging_source(state, staging)
    [op] = plan_of(source, source.reconcile(T0), T0).ops
    record(state, op, ["a", "b"])
    assert source.reconcile(T0 + 1) == []


def test_removing_a_refused_tarball_never_deletes_the_directory_that_took_its_base(
    state: State, staging: Path
) -> None:
    """``pkg/`` is live, ``pkg.tgz`` beside it was refused; ``pkg.tgz`` removed: nothing
    of ``pkg/`` is deleted (it was never the tarball's)."""
    (staging / "pkg").mkdir()
    (staging / "pkg" / "x").write_bytes(b"x")
    (staging / "pkg.tgz").write_bytes(b"t")
    source = staging_source(state, staging)
    plan = plan_of(source, source.reconcile(T0), T0)
    state.apply_published(REPO, plan.ops, 5)
    (staging / "pkg.tgz").unlink()
    plan = plan_of(source, [Dirty(source.name, "pkg.tgz", T0 + 1, closed=True)], T0 + 1)
    assert (plan.ops, plan.guarded) == ([], [])
    assert source.reconcile(T0 + 2) == []
