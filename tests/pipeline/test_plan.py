"""Pure planning decisions: how a file's content reaches the repository, deletion counts,
and the whole plan of a staging source from hand-built observations (no files)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from cvmfs_syncd.batching import Pending
from cvmfs_syncd.cvmfs.graft import GRAFT_NAME_MAX
from cvmfs_syncd.ingest import DropRefusal, RefusedDrop
from cvmfs_syncd.model import EntryType, Fingerprint, HoldReason, OpKind
from cvmfs_syncd.paths import reserved_name
from cvmfs_syncd.pipeline.plan import (
    COPY_ONLY,
    ContentPolicy,
    Fate,
    Planned,
    StagedObservation,
    StagingPolicy,
    StagingView,
    count_deleted,
    file_op_kind,
    plan_staged,
    replaces,
    same_staged,
    staged_verdict,
    writer_gone,
)
from cvmfs_syncd.planner import cut_to_caps

MIB = 1024 * 1024
WRITABLE = ContentPolicy(writable=True, small_limit=4 * MIB)


def test_small_files_are_prepared_large_ones_grafted_from_the_threshold() -> None:
    """Below the minimum chunk size: prepared; above it, graft_at decides."""
    kind = file_op_kind
    assert kind("a", 0, WRITABLE, prepare=True, graft_at=0) is OpKind.GRAFT
    assert kind("a", 4 * MIB - 1, WRITABLE, prepare=True, graft_at=0) is OpKind.GRAFT
    assert kind("a", 4 * MIB, WRITABLE, prepare=True, graft_at=0) is OpKind.COPY_FILE
    assert kind("a", 4 * MIB, WRITABLE, prepare=True, graft_at=8 * MIB) is OpKind.COPY_FILE
    assert kind("a", 8 * MIB, WRITABLE, prepare=True, graft_at=8 * MIB) is OpKind.GRAFT
    assert kind("a", 10, WRITABLE, prepare=False, graft_at=0) is OpKind.COPY_FILE
    assert kind("a", 10, WRITABLE, prepare=False, graft_at=5) is OpKind.GRAFT


def test_chunking_off_prepares_every_size() -> None:
    """Without chunking publish stores every file as one object: all are prepared."""
    unchunked = ContentPolicy(writable=True, small_limit=None)
    assert file_op_kind("a", 10**12, unchunked, prepare=True, graft_at=0) is OpKind.GRAFT


@given(
    name=st.text(min_size=1, max_size=300).filter(lambda n: "/" not in n and "\0" not in n),
    size=st.integers(min_value=0, max_value=2**40),
    prepare=st.booleans(),
    graft_at=st.integers(min_value=0, max_value=2**40),
)
def test_copy_only_and_long_names_always_copy(
    name: str, size: int, prepare: bool, graft_at: int
) -> None:
    """A host that cannot write objects, or a name with no room for .cvmfsgraft-, copies."""
    assert file_op_kind(name, size, COPY_ONLY, prepare=prepare, graft_at=graft_at) is (
        OpKind.COPY_FILE
    )
    long_name = name + "x" * (GRAFT_NAME_MAX + 1)
    kind = file_op_kind(long_name, size, WRITABLE, prepare=prepare, graft_at=graft_at)
    assert kind is OpKind.COPY_FILE


def test_each_live_path_counts_once() -> None:
    """nested (5 paths) deleted with every descendant hinted too, plus one file: 6."""
    tree = ["nested", "nested/deep", "nested/deep/x", "nested/deep/x/y", "nested/deep/x/y/z"]
    subtrees = [tree[i:] for i in range(len(tree))] + [["a"]]
    assert count_deleted(subtrees) == 6
    assert count_deleted([]) == 0


# --------------------------------------------------------------------------- staging

SOURCE = "drop"
NOW = 1000.0
MIRROR = StagingPolicy(SOURCE, mirror=True, settle_seconds=2.0)


def pending(rel: str, *, writing: bool = False, last_at: float = NOW - 5) -> Pending:
    return Pending(SOURCE, rel, first_at=NOW - 10, last_at=last_at, writing=writing)


def file_fp(size: int = 10, inode: int = 7, mtime_ns: int = 5 * 10**9) -> Fingerprint:
    return Fingerprint(EntryType.FILE, 0o644, size, mtime_ns, inode)


DIR_FP = Fingerprint(EntryType.DIRECTORY, 0o755)
LINK_FP = Fingerprint(EntryType.SYMLINK, 0o777, target="elsewhere")


def seen(rel: str, found: Fingerprint | None = None, **fields: Any) -> StagedObservation:
    """A staged entry that was looked at (by default a new file, settled, no writer)."""
    values: dict[str, Any] = {"repo_path": "t/" + rel, "found": found or file_fp()}
    if "/" in rel:
        values["marker"] = True
    values.update(fields)
    entry = values.pop("entry", None) or pending(rel)
    return StagedObservation(entry, **values)


def gone(rel: str, below: Sequence[str] = (), **fields: Any) -> StagedObservation:
    """A staged entry that vanished while this source has it live."""
    path = "t/" + rel
    return StagedObservation(
        pending(rel),
        repo_path=path,
        live=file_fp(),
        live_source=SOURCE,
        live_below=(path, *below),
        **fields,
    )


def under(rel: str, top: str) -> bool:
    """Whether ``rel`` is ``top`` or below it."""
    return rel == top or rel.startswith(top + "/")


def where(planned: Planned) -> dict[str, str]:
    """Where each entry went: ops (by op kind), deferred, waiting, guarded, refused, skipped."""
    plan = planned.plan
    found: dict[str, str] = {}

    def put(rel: str, bucket: str) -> None:
        assert rel not in found, f"{rel} is in {found[rel]} and {bucket}"
        found[rel] = bucket

    for op in plan.ops:
        put(plan.origin[op.repo_path].rel_path, op.kind.value)
    for op in plan.guarded:
        put(plan.origin[op.repo_path].rel_path, "guarded")
    for entry in plan.deferred:
        put(entry.rel_path, "deferred")
    for entry in plan.waiting_for_marker:
        put(entry.rel_path, "waiting")
    for aside in plan.set_aside:
        put(aside.rel_path, "refused")
    for _, rel in plan.skipped:
        put(rel, "skipped")
    return found


def test_a_file_waits_until_settled_then_goes() -> None:
    settling = plan_staged([seen("f", settle_at=NOW + 1.5)], MIRROR, NOW)
    assert where(settling) == {"f": "deferred"}
    assert settling.plan.deferred[0].not_before == NOW + 1.5
    settled = plan_staged([seen("f")], MIRROR, NOW)
    assert where(settled) == {"f": "copy"}
    op = settled.plan.ops[0]
    assert (op.repo_path, op.source, op.source_path, op.fingerprint) == (
        "t/f",
        SOURCE,
        "f",
        file_fp(),
    )


def test_a_writer_defers_a_settled_file_by_one_settle_period() -> None:
    held = plan_staged([seen("f", writers=True)], MIRROR, NOW)
    assert where(held) == {"f": "deferred"}
    assert held.plan.deferred[0].not_before == NOW + MIRROR.settle_seconds
    assert where(plan_staged([seen("f", writers=False)], MIRROR, NOW)) == {"f": "copy"}


def test_without_leases_a_file_seen_written_waits_sixty_quiet_seconds() -> None:
    """writers None: the kernel cannot say. A file seen closed goes once settled; one seen
    modified without a close goes after 60 s without events (or ten settle periods)."""
    closed = seen("f", entry=pending("f", writing=False, last_at=NOW - 1))
    assert where(plan_staged([closed], MIRROR, NOW)) == {"f": "copy"}
    for quiet, bucket in ((59.9, "deferred"), (60.0, "copy")):
        open_ = seen("f", entry=pending("f", writing=True, last_at=NOW - quiet))
        assert where(plan_staged([open_], MIRROR, NOW)) == {"f": bucket}
    slow = replace(MIRROR, settle_seconds=10.0)
    for quiet, bucket in ((99.0, "deferred"), (100.0, "copy")):
        open_ = seen("f", entry=pending("f", writing=True, last_at=NOW - quiet))
        assert where(plan_staged([open_], slow, NOW)) == {"f": bucket}
    # A definite answer from the kernel wins over the hint.
    open_ = seen("f", entry=pending("f", writing=True, last_at=NOW), writers=False)
    assert where(plan_staged([open_], MIRROR, NOW)) == {"f": "copy"}


def test_writer_gone_rule() -> None:
    entry = pending("f", writing=True, last_at=NOW - 30)
    assert writer_gone(entry, False, NOW, 2.0)
    assert not writer_gone(entry, True, NOW, 2.0)
    assert not writer_gone(entry, None, NOW, 2.0)
    assert writer_gone(entry, None, NOW + 30, 2.0)
    assert writer_gone(replace(entry, writing=False), None, NOW, 2.0)


MARKED = replace(MIRROR, ready_marker=".ready")


def test_entries_of_a_directory_without_its_marker_wait() -> None:
    planned = plan_staged(
        [
            seen("d", DIR_FP, marker=False),
            seen("d/a", marker=False),
            seen("d/.ready", marker=False),
            seen("top-file"),
        ],
        MARKED,
        NOW,
    )
    assert where(planned) == {"d": "waiting", "d/a": "waiting", "top-file": "copy"}
    assert planned.plan.atomic_groups == []


def test_a_marked_directory_goes_live_whole() -> None:
    planned = plan_staged(
        [seen("d", DIR_FP, marker=True), seen("d/a"), seen("d/sub", DIR_FP), seen("d/.ready")],
        MARKED,
        NOW,
    )
    assert where(planned) == {"d": "mkdir", "d/a": "copy", "d/sub": "mkdir"}
    assert planned.plan.atomic_groups == [["t/d/a", "t/d/sub"]]


def test_one_unsettled_file_defers_its_whole_marked_directory() -> None:
    planned = plan_staged(
        [
            seen("d/a"),
            seen("d/b", settle_at=NOW + 1),
            seen("d/c", writers=True),
            seen("e/x"),
            seen("loose", settle_at=NOW + 1),
        ],
        MARKED,
        NOW,
    )
    assert where(planned) == {
        "d/a": "deferred",
        "d/b": "deferred",
        "d/c": "deferred",
        "e/x": "copy",
        "loose": "deferred",
    }
    assert planned.plan.atomic_groups == [["t/e/x"]]
    after = {e.rel_path: e.not_before for e in planned.plan.deferred}
    assert after == {"d/a": NOW + 2, "d/b": NOW + 1, "d/c": NOW + 2, "loose": NOW + 1}
    assert "t/d/a" not in planned.plan.origin


def test_small_deletions_pass_the_guard() -> None:
    planned = plan_staged([gone("a"), gone("b")], MIRROR, NOW, StagingView(live_count=3))
    assert where(planned) == {"a": "delete", "b": "delete"}
    assert planned.plan.guard_kind is None
    assert sorted(planned.forget) == [(SOURCE, "a"), (SOURCE, "b")]


def test_a_deep_tree_counts_each_live_path_once() -> None:
    """A deleted directory with 5 live paths, each hinted with what is below it, and one
    file, of 13 live: 6 deletions (not 16), under the guard's minimum."""
    tree = ["n", "n/d", "n/d/x", "n/d/x/y", "n/d/x/y/z"]
    observations = [gone(rel, ["t/" + r for r in tree[i + 1 :]]) for i, rel in enumerate(tree)]
    observations.append(gone("a"))
    planned = plan_staged(observations, MIRROR, NOW, StagingView(live_count=13))
    assert not planned.plan.guarded
    assert len(planned.plan.ops) == 6
    # Five more files make 11 distinct paths of 13: held, and the reason counts 11.
    observations += [gone(f"f{i}") for i in range(5)]
    held = plan_staged(observations, MIRROR, NOW, StagingView(live_count=13))
    assert not held.plan.ops
    assert len(held.plan.guarded) == 11
    assert "delete 11 of 13 live paths" in held.plan.guard_reason
    assert held.plan.guard_kind is HoldReason.MASS_DELETE


def test_the_guard_holds_deletions_only() -> None:
    observations = [gone(f"f{i}") for i in range(10)] + [seen("new")]
    planned = plan_staged(observations, MIRROR, NOW, StagingView(live_count=12))
    assert [o.repo_path for o in planned.plan.ops] == ["t/new"]
    assert {o.kind for o in planned.plan.guarded} == {OpKind.DELETE}
    assert len(planned.plan.guarded) == 10
    share = replace(MIRROR, max_delete_share=0.9)
    passed = plan_staged(observations, share, NOW, StagingView(live_count=12))
    assert not passed.plan.guarded
    assert len(passed.plan.ops) == 11


def test_a_missing_staging_path_holds_any_deletion() -> None:
    view = StagingView(root_problem="staging path /x is missing", live_count=1000)
    planned = plan_staged([gone("a")], MIRROR, NOW, view)
    assert where(planned) == {"a": "guarded"}
    assert planned.plan.guard_reason == "staging path /x is missing"
    assert planned.plan.guard_kind is HoldReason.STAGING_MISSING


# A directory t/p (4 live paths) replaced by a file, and the hints of the deletions below.
OLD_TREE = ("t/p", "t/p/a", "t/p/s", "t/p/s/b")


def dir_to_file(**fields: Any) -> list[StagedObservation]:
    """The new file p (as ``fields`` say) and the deletions of what was live below it."""
    new = seen("p", file_fp(), live=DIR_FP, live_source=SOURCE, live_below=OLD_TREE, **fields)
    return [new, gone("p/a"), gone("p/s", ["t/p/s/b"]), gone("p/s/b"), seen("q")]


def test_a_replaced_directory_stays_live_while_its_file_settles() -> None:
    """The deletions below a directory replaced by a file wait with the file: one revision."""
    settling = plan_staged(dir_to_file(settle_at=NOW + 1), MIRROR, NOW)
    assert where(settling) == {
        "p": "deferred",
        "p/a": "deferred",
        "p/s": "deferred",
        "p/s/b": "deferred",
        "q": "copy",
    }
    assert {e.rel_path: e.not_before for e in settling.plan.deferred}["p/a"] == NOW + 1
    assert settling.forget == [(SOURCE, "p/a"), (SOURCE, "p/s"), (SOURCE, "p/s/b")]
    writing = plan_staged(dir_to_file(writers=True), MIRROR, NOW)
    assert {e.rel_path for e in writing.plan.deferred} == {"p", "p/a", "p/s", "p/s/b"}
    settled = plan_staged(dir_to_file(), MIRROR, NOW)
    assert where(settled) == {
        "p": "copy",
        "p/a": "delete",
        "p/s": "delete",
        "p/s/b": "delete",
        "q": "copy",
    }
    assert [sorted(g) for g in settled.plan.atomic_groups] == [sorted(OLD_TREE)]
    assert not settled.replaced_alone


def test_after_max_batch_seconds_the_deletion_goes_alone() -> None:
    """Seen 10 s ago: with max_batch_seconds 5 the deletions go without the file (which
    still settles) and are reported; with 10.5 they wait until then, not for the file."""
    alone = plan_staged(dir_to_file(settle_at=NOW + 1), replace(MIRROR, max_batch_seconds=5), NOW)
    assert where(alone) == {
        "p": "deferred",
        "p/a": "delete",
        "p/s": "delete",
        "p/s/b": "delete",
        "q": "copy",
    }
    assert alone.replaced_alone == ["p"]
    assert [sorted(g) for g in alone.plan.atomic_groups] == [sorted(OLD_TREE[1:])]
    soon = plan_staged(dir_to_file(settle_at=NOW + 1), replace(MIRROR, max_batch_seconds=10.5), NOW)
    assert {e.rel_path: e.not_before for e in soon.plan.deferred} == {
        "p": NOW + 1,
        "p/a": NOW + 0.5,
        "p/s": NOW + 0.5,
        "p/s/b": NOW + 0.5,
    }
    assert not soon.replaced_alone


def test_a_replacing_directory_waits_for_its_content() -> None:
    """A file replaced by a directory: the directory goes with its content, once settled."""

    def file_to_dir(**fields: Any) -> list[StagedObservation]:
        return [
            seen("p", DIR_FP, live=file_fp(), live_source=SOURCE, live_below=("t/p",)),
            seen("p/a"),
            seen("p/s", DIR_FP),
            seen("p/s/b", **fields),
        ]

    settling = plan_staged(file_to_dir(settle_at=NOW + 1), MIRROR, NOW)
    assert set(where(settling).values()) == {"deferred"}
    assert {e.not_before for e in settling.plan.deferred} == {NOW + 1}
    settled = plan_staged(file_to_dir(), MIRROR, NOW)
    assert where(settled) == {"p": "mkdir", "p/a": "copy", "p/s": "mkdir", "p/s/b": "copy"}
    assert [sorted(g) for g in settled.plan.atomic_groups] == [sorted(OLD_TREE)]


def test_symlinks_replace_and_are_replaced_by_the_same_rule() -> None:
    """A link needs no settling: it goes at once with the deletions below the directory it
    replaces. A file or directory replacing a link waits like any other replacement."""
    dir_to_link = [
        seen("p", LINK_FP, live=DIR_FP, live_source=SOURCE, live_below=("t/p", "t/p/a")),
        gone("p/a"),
    ]
    planned = plan_staged(dir_to_link, MIRROR, NOW)
    assert where(planned) == {"p": "symlink", "p/a": "delete"}
    assert [sorted(g) for g in planned.plan.atomic_groups] == [["t/p", "t/p/a"]]
    link_to_file = seen("p", live=LINK_FP, live_source=SOURCE, settle_at=NOW + 1)
    assert where(plan_staged([link_to_file], MIRROR, NOW)) == {"p": "deferred"}
    link_to_dir = [
        seen("p", DIR_FP, live=LINK_FP, live_source=SOURCE, live_below=("t/p",)),
        seen("p/a", settle_at=NOW + 1),
    ]
    assert where(plan_staged(link_to_dir, MIRROR, NOW)) == {"p": "deferred", "p/a": "deferred"}
    file_to_link = seen("p", LINK_FP, live=file_fp(), live_source=SOURCE, live_below=("t/p",))
    planned = plan_staged([file_to_link], MIRROR, NOW)
    assert where(planned) == {"p": "symlink"}
    assert planned.plan.atomic_groups == [["t/p"]]


def test_the_guard_counts_the_replaced_subtree() -> None:
    """A directory of 10 live paths replaced by a file deletes 10 of 12, whether or not the
    paths below were hinted; the guard then holds the replacement whole."""
    big = tuple(["t/p"] + [f"t/p/f{i}" for i in range(9)])
    new = seen("p", file_fp(), live=DIR_FP, live_source=SOURCE, live_below=big)
    for observations in ([new], [new, *(gone(f"p/f{i}") for i in range(9))]):
        held = plan_staged(observations, MIRROR, NOW, StagingView(live_count=12))
        assert "delete 10 of 12 live paths" in held.plan.guard_reason
        assert not held.plan.ops
        assert set(where(held).values()) == {"guarded"}
        assert {o.kind for o in held.plan.guarded} <= {OpKind.COPY_FILE, OpKind.DELETE}
    passed = plan_staged([new], MIRROR, NOW, StagingView(live_count=30))
    assert where(passed) == {"p": "copy"}
    missing = plan_staged([new], MIRROR, NOW, StagingView("staging path /x is missing", 30))
    assert where(missing) == {"p": "guarded"}
    assert missing.plan.guard_kind is HoldReason.STAGING_MISSING


def test_the_caps_never_split_a_replacement() -> None:
    """Cut to one file per batch, a settled replacement still goes whole, deletions (deepest
    first) before the entry that replaces them; the unrelated file waits."""
    settled = plan_staged(dir_to_file(), MIRROR, NOW)
    taken, later = cut_to_caps(settled.plan.ops, settled.plan.atomic_groups, 1, 10**9)
    assert [(o.kind.value, o.repo_path) for o in taken] == [
        ("delete", "t/p/s/b"),
        ("delete", "t/p/a"),
        ("delete", "t/p/s"),
        ("copy", "t/p"),
    ]
    assert [o.repo_path for o in later] == ["t/q"]


def test_inbox_mode_never_deletes() -> None:
    inbox = replace(MIRROR, mirror=False)
    planned = plan_staged([gone("a")], inbox, NOW, StagingView(root_problem="gone"))
    assert where(planned) == {}
    assert planned.forget == [(SOURCE, "a")]


def test_op_kinds() -> None:
    policy = replace(MIRROR, content=WRITABLE, graft_at=64 * MIB)
    observations = [
        seen("small", file_fp(size=10)),
        seen("medium", file_fp(size=8 * MIB)),
        seen("large", file_fp(size=64 * MIB)),
        seen("dir", DIR_FP),
        seen("link", LINK_FP),
        seen("n" * 250, file_fp(size=10)),
    ]
    planned = plan_staged(observations, policy, NOW)
    assert where(planned) == {
        "small": "graft",
        "medium": "copy",
        "large": "graft",
        "dir": "mkdir",
        "link": "symlink",
        "n" * 250: "copy",
    }
    unprepared = plan_staged(observations[:1], replace(policy, prepare=False), NOW)
    assert where(unprepared) == {"small": "copy"}


def test_unsafe_and_reserved_names_are_refused_once() -> None:
    observations = [
        StagedObservation(pending("a/../b"), unmappable="'..' is not allowed"),
        seen(".cvmfscatalog"),
        seen("d/.cvmfsgraft-x"),
    ]
    planned = plan_staged(observations, MIRROR, NOW)
    assert where(planned) == {
        "a/../b": "refused",
        ".cvmfscatalog": "refused",
        "d/.cvmfsgraft-x": "refused",
    }
    reasons = {a.rel_path: a.reason for a in planned.plan.set_aside}
    assert reasons["a/../b"] == "unsafe name: '..' is not allowed"
    assert reasons[".cvmfscatalog"] == reserved_name(".cvmfscatalog")
    assert planned.reported == reasons
    again = [replace(o, reported=reasons[o.entry.rel_path]) for o in observations]
    assert where(plan_staged(again, MIRROR, NOW)) == {}
    allowed = plan_staged(observations[1:], replace(MIRROR, allow_reserved_names=True), NOW)
    assert where(allowed) == {".cvmfscatalog": "copy", "d/.cvmfsgraft-x": "copy"}


def test_skipped_ignored_and_root_entries() -> None:
    policy = replace(MIRROR, ignore=("*.tmp",))
    observations = [
        StagedObservation(pending("fifo"), repo_path="t/fifo", skipped="fifo"),
        seen("x.tmp"),
        seen(".x.abc123"),
        StagedObservation(pending(""), repo_path="t"),
    ]
    planned = plan_staged(observations, policy, NOW)
    assert where(planned) == {"fifo": "skipped"}
    assert planned.plan.skipped == [("fifo", "fifo")]
    assert planned.reported == {"fifo": "fifo"}
    assert where(plan_staged([replace(observations[0], reported="fifo")], policy, NOW)) == {}


def test_unchanged_and_set_aside_versions_are_left_alone() -> None:
    fp = file_fp()
    observations = [
        seen("same", fp, live=fp, live_source=SOURCE),
        seen("theirs", fp, live=fp, live_source="other"),
        seen("new-inode", fp, live=replace(fp, inode=8), live_source=SOURCE),
        seen("aside", fp, set_aside=True, aside=fp),
        seen("aside-old", fp, set_aside=True, aside=replace(fp, size=1)),
        seen("refused-no-fp", fp, set_aside=True, aside=None),
        seen("dir", replace(DIR_FP), live=replace(DIR_FP, size=4096), live_source=SOURCE),
    ]
    planned = plan_staged(observations, MIRROR, NOW)
    assert where(planned) == {
        "theirs": "copy",
        "new-inode": "copy",
        "aside-old": "copy",
        "refused-no-fp": "copy",
    }
    assert sorted(planned.clear_set_aside) == ["aside-old", "refused-no-fp"]
    assert sorted(planned.forget) == [(SOURCE, "dir"), (SOURCE, "same")]


def test_same_staged_compares_directories_by_mode() -> None:
    assert same_staged(DIR_FP, replace(DIR_FP, mtime_ns=1))
    assert not same_staged(DIR_FP, replace(DIR_FP, mode=0o700))
    assert not same_staged(DIR_FP, file_fp())
    assert not same_staged(file_fp(), file_fp(inode=1))
    assert same_staged(LINK_FP, replace(LINK_FP, inode=3))


_RELS = st.sampled_from(
    ["a", "b", "d", "d/x", "d/y", "d/.ready", "e/z", "x.tmp", ".cvmfsdirtab", "e", ""]
)
_PRESENT = st.one_of(
    st.builds(file_fp, size=st.integers(0, 10 * MIB), inode=st.integers(1, 3)),
    st.just(DIR_FP),
    st.just(LINK_FP),
)
_FOUND = st.none() | _PRESENT


@st.composite
def staged_observation(draw: st.DrawFn, rel: str) -> StagedObservation:
    found = draw(_FOUND)
    live = draw(_FOUND)
    entry = Pending(
        SOURCE,
        rel,
        first_at=NOW - 100,
        last_at=draw(st.floats(NOW - 100, NOW)),
        writing=draw(st.booleans()),
    )
    return StagedObservation(
        entry,
        repo_path="t/" + rel if rel else "t",
        unmappable=draw(st.sampled_from(["", "", "", "bad"])),
        reported=draw(st.sampled_from(["", "fifo", "unsafe name: bad"])),
        marker=draw(st.sampled_from([True, True, None, False])),
        found=found,
        skipped=draw(st.sampled_from(["", "", "fifo"])) if found is None else "",
        live=live,
        live_source=draw(st.sampled_from([SOURCE, "other"])) if live else "",
        live_below=tuple(draw(st.lists(st.sampled_from(["t/p", "t/q", "t/" + rel])))),
        set_aside=draw(st.booleans()),
        aside=draw(_FOUND),
        settle_at=draw(st.sampled_from([0.0, NOW + 1])),
        writers=draw(st.sampled_from([None, True, False])),
    )


@settings(max_examples=300)
@given(
    observations=st.lists(_RELS, unique=True).flatmap(
        lambda rels: st.tuples(*(staged_observation(r) for r in rels))
    ),
    marker=st.sampled_from(["", ".ready"]),
    mirror=st.booleans(),
    live_count=st.integers(0, 20),
    root_problem=st.sampled_from(["", "missing"]),
    max_batch_seconds=st.sampled_from([60.0, 1000.0]),
)
def test_every_staged_entry_ends_up_in_exactly_one_place(
    observations: tuple[StagedObservation, ...],
    marker: str,
    mirror: bool,
    live_count: int,
    root_problem: str,
    max_batch_seconds: float,
) -> None:
    """ops, deferred, waiting, guarded, refused, skipped, or nothing to do — exactly one."""
    # A staged file with staged entries below it is a world no single look at a tree
    # gives (it takes a race between two observations): its plan is not this test's subject.
    files = {o.entry.rel_path for o in observations if o.found and o.found.type.value != "dir"}
    assume(not any(o.found and o.entry.rel_path.rpartition("/")[0] in files for o in observations))
    policy = replace(
        MIRROR,
        ready_marker=marker,
        mirror=mirror,
        ignore=("*.tmp",),
        max_batch_seconds=max_batch_seconds,
    )
    planned = plan_staged(observations, policy, NOW, StagingView(root_problem, live_count))
    placed = where(planned)  # asserts that no entry is in two places
    assert len(planned.plan.origin) == len(planned.plan.ops) + len(planned.plan.guarded)
    for obs in observations:
        verdict = staged_verdict(obs, policy)
        nothing = verdict.fate in (Fate.IGNORED, Fate.GONE, Fate.ASIDE, Fate.UNCHANGED) or (
            verdict.fate in (Fate.REFUSED, Fate.SKIPPED) and verdict.reason == obs.reported
        )
        assert (obs.entry.rel_path not in placed) == nothing, (verdict, placed)
    for op in planned.plan.ops + planned.plan.guarded:
        assert (op.kind is OpKind.DELETE) == (op.fingerprint is None)
    # What the guard holds besides deletions are whole replacements.
    grouped = {path for group in planned.plan.atomic_groups for path in group}
    for op in planned.plan.guarded:
        assert op.kind is OpKind.DELETE or op.repo_path in grouped
    for group in planned.plan.atomic_groups:
        assert set(group) <= {op.repo_path for op in planned.plan.ops + planned.plan.guarded}
        assert set(group) & {o.repo_path for o in planned.plan.ops} in (set(), set(group))
    # Nothing of a replacement goes while part of it waits, until max_batch_seconds have
    # passed since the change was first seen (100 s before NOW here).
    for obs in observations:
        if staged_verdict(obs, policy).fate is not Fate.CHANGED or not replaces(obs):
            continue
        rel = obs.entry.rel_path
        waits = any(under(e.rel_path, rel) for e in planned.plan.deferred)
        goes = [o for o in planned.plan.ops + planned.plan.guarded if under(o.source_path, rel)]
        if waits and goes:
            assert max_batch_seconds <= 100
            assert rel in planned.replaced_alone
    if marker:  # a marked directory goes whole: nothing of it published while some waits
        waiting = {e.rel_path.partition("/")[0] for e in planned.plan.deferred if "/" in e.rel_path}
        published = {
            op.source_path.partition("/")[0]
            for op in planned.plan.ops
            if "/" in op.source_path and op.kind is not OpKind.DELETE
        }
        assert not waiting & published


# --------------------------------------------------------------------------- tarball drops

TARBALL = file_fp(size=4096, inode=70)


def tarball(rel: str = "pkg.tgz", found: Fingerprint = TARBALL, **fields: Any) -> StagedObservation:
    """A top-level tarball drop of an ingest source (its path is the base)."""
    values: dict[str, Any] = {"drop": True, "repo_path": "t/" + rel.split(".", maxsplit=1)[0]}
    values.update(fields)
    return seen(rel, found, **values)


def test_a_settled_tarball_drop_is_one_ingest_op_at_its_base() -> None:
    """Settled and without a writer, a drop is ingested at its base; before, it waits."""
    planned = plan_staged([tarball()], MIRROR, NOW)
    assert where(planned) == {"pkg.tgz": "ingest"}
    op = planned.plan.ops[0]
    assert (op.repo_path, op.source_path, op.fingerprint) == ("t/pkg", "pkg.tgz", TARBALL)
    assert where(plan_staged([tarball(settle_at=NOW + 1)], MIRROR, NOW)) == {"pkg.tgz": "deferred"}
    assert where(plan_staged([tarball(writers=True)], MIRROR, NOW)) == {"pkg.tgz": "deferred"}


def test_a_tarball_equal_to_its_live_base_or_set_aside_is_left_alone() -> None:
    """The index records the tarball at its base: unchanged, nothing to do; a version set
    aside stays aside until it changes."""
    assert where(plan_staged([tarball(live=TARBALL, live_source=SOURCE)], MIRROR, NOW)) == {}
    aside = plan_staged([tarball(set_aside=True, aside=TARBALL)], MIRROR, NOW)
    assert where(aside) == {}
    changed = plan_staged([tarball(set_aside=True, aside=file_fp(size=1))], MIRROR, NOW)
    assert where(changed) == {"pkg.tgz": "ingest"}
    assert changed.clear_set_aside == ["pkg.tgz"]


def test_a_refused_tarball_is_set_aside_with_its_refusal() -> None:
    """A tarball that find_drops refuses is set aside, its code kept for the metric."""
    refused = RefusedDrop("pkg.tgz", DropRefusal.BASE_TAKEN, "the top-level entry 'pkg'")
    planned = plan_staged(
        [seen("pkg.tgz", TARBALL, repo_path="t/pkg.tgz", refused_drop=refused)], MIRROR, NOW
    )
    assert where(planned) == {"pkg.tgz": "refused"}
    aside = planned.plan.set_aside[0]
    assert aside.refusal == "base-taken"
    assert aside.reason.startswith("tarball refused (base-taken): ")
    again = seen("pkg.tgz", TARBALL, refused_drop=refused, reported=aside.reason)
    assert where(plan_staged([again], MIRROR, NOW)) == {}  # reported once


def test_a_gone_tarball_deletes_its_base_counting_everything_below() -> None:
    """Mirror mode: the tarball removed, its base goes with all it holds, behind the
    deletion guard, which counts the base's live paths (not 1)."""
    below = tuple(f"t/pkg/f{i}" for i in range(20))
    removed = StagedObservation(
        pending("pkg.tgz"),
        repo_path="t/pkg",
        drop=True,
        live=TARBALL,
        live_source=SOURCE,
        live_below=("t/pkg", *below),
    )
    small = plan_staged([removed], MIRROR, NOW, StagingView(live_count=200))
    assert where(small) == {"pkg.tgz": "delete"}
    assert small.plan.ops[0].repo_path == "t/pkg"
    held = plan_staged([removed], MIRROR, NOW, StagingView(live_count=25))
    assert where(held) == {"pkg.tgz": "guarded"}
    assert "delete 21 of 25" in held.plan.guard_reason
    inbox = replace(MIRROR, mirror=False)
    assert where(plan_staged([removed], inbox, NOW)) == {}


def test_a_base_live_from_another_input_is_not_this_entrys() -> None:
    """What another input published (a tarball's members, a plain directory under a new
    tarball's base) is never deleted or kept as this entry's own."""
    member = gone("pkg/a", live_elsewhere=True)
    assert where(plan_staged([member], MIRROR, NOW)) == {}
    other = tarball(live=DIR_FP, live_source=SOURCE, live_elsewhere=True)
    assert where(plan_staged([other], MIRROR, NOW)) == {"pkg.tgz": "ingest"}
    assert not replaces(other)  # the ingest replaces its base itself


def test_what_else_happens_under_an_ingested_base_waits_for_the_ingest() -> None:
    """A directory gone from where a tarball now goes: its deletions wait (the ingest
    replaces it), other paths are planned as usual."""
    planned = plan_staged(
        [tarball(), gone("pkg"), gone("pkg/x"), gone("other"), seen("pkgx")], MIRROR, NOW
    )
    assert where(planned) == {
        "pkg.tgz": "ingest",
        "pkg": "deferred",
        "pkg/x": "deferred",
        "other": "delete",
        "pkgx": "copy",
    }
    assert {e.not_before for e in planned.plan.deferred} == {NOW + MIRROR.settle_seconds}


def test_a_drop_that_is_no_file_any_more_waits() -> None:
    """Replaced by a directory since the top level was listed: looked at again later."""
    assert where(plan_staged([tarball(found=DIR_FP)], MIRROR, NOW)) == {"pkg.tgz": "deferred"}
