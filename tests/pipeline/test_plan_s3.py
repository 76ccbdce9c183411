"""The plan of an S3 source from hand-built observations of a listing (no bucket)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from cvmfs_syncd.batching import Pending
from cvmfs_syncd.ingest import DropRefusal, RefusedDrop
from cvmfs_syncd.model import EntryType, Fingerprint, HoldReason, OpKind
from cvmfs_syncd.pipeline.plan import ContentPolicy, Planned
from cvmfs_syncd.pipeline.plan_s3 import (
    LISTED_DIRECTORY,
    Listed,
    ListedObservation,
    ListingPolicy,
    ListingView,
    listed_ready,
    plan_listed,
)

SOURCE = "ci"
NOW = 5000.0
MIB = 1024 * 1024
POLICY = ListingPolicy(
    SOURCE, poll_seconds=10.0, where="s3://bucket/builds/", full_prefix="builds/"
)
VIEW = ListingView(usable=True, listed_at=NOW - 2)


def fp(size: int = 10, etag: str = '"e1"') -> Fingerprint:
    return Fingerprint(EntryType.FILE, 0o644, size, 10**9, etag=etag)


def entry(rel: str) -> Pending:
    return Pending(SOURCE, rel, NOW - 10, NOW - 5)


def obj(rel: str, size: int = 10, **fields: Any) -> ListedObservation:
    """A path provided by a listed object (stable unless said otherwise)."""
    stable = fields.pop("stable", True)
    stale = fields.pop("stale", False)
    if "/" in rel:
        fields.setdefault("marker", False)
    listed = Listed("builds/" + rel, fp(size), stable=stable, stale=stale)
    return ListedObservation(entry(rel), repo_path="ci/" + rel, listed=listed, **fields)


def directory(rel: str, **fields: Any) -> ListedObservation:
    return ListedObservation(entry(rel), repo_path="ci/" + rel, directory=True, **fields)


def vanished(rel: str, source: str = SOURCE) -> ListedObservation:
    return ListedObservation(
        entry(rel),
        repo_path="ci/" + rel,
        live=fp(),
        live_source=source,
        live_source_path="builds/" + rel,
    )


def where(planned: Planned) -> dict[str, str]:
    """Where each entry went (asserting that none went to two places)."""
    plan = planned.plan
    found: dict[str, str] = {}
    buckets = [
        *((plan.origin[o.repo_path].rel_path, o.kind.value) for o in plan.ops),
        *((plan.origin[o.repo_path].rel_path, "guarded") for o in plan.guarded),
        *((e.rel_path, "deferred") for e in plan.deferred),
        *((e.rel_path, "waiting") for e in plan.waiting_for_marker),
    ]
    for rel, bucket in buckets:
        assert rel not in found, f"{rel} is in {found[rel]} and {bucket}"
        found[rel] = bucket
    assert not plan.set_aside
    assert not plan.skipped
    return found


def test_nothing_is_planned_while_the_source_is_down_or_backing_off() -> None:
    observations = [ListedObservation(entry("a")), ListedObservation(entry("b"))]
    down = plan_listed(observations, ListingView(usable=False), POLICY, NOW)
    assert where(down) == {"a": "deferred", "b": "deferred"}
    assert {e.not_before for e in down.plan.deferred} == {NOW + 10}
    backing_off = replace(VIEW, retry_at=NOW + 100)
    later = plan_listed(observations, backing_off, POLICY, NOW)
    assert {e.not_before for e in later.plan.deferred} == {NOW + 100}
    slow = replace(POLICY, poll_seconds=300.0)
    capped = plan_listed(observations, ListingView(usable=False), slow, NOW)
    assert {e.not_before for e in capped.plan.deferred} == {NOW + 30}


def test_an_object_goes_once_stable_and_not_found_stale() -> None:
    planned = plan_listed(
        [obj("a"), obj("b", stable=False), obj("c", stale=True)], VIEW, POLICY, NOW
    )
    assert where(planned) == {"a": "copy", "b": "deferred", "c": "deferred"}
    assert {e.not_before for e in planned.plan.deferred} == {NOW + 8}  # the next listing
    op = planned.plan.ops[0]
    assert (op.repo_path, op.source, op.source_path, op.fingerprint) == (
        "ci/a",
        SOURCE,
        "builds/a",
        fp(),
    )
    old_listing = replace(VIEW, listed_at=NOW - 100)
    soon = plan_listed([obj("b", stable=False)], old_listing, POLICY, NOW)
    assert soon.plan.deferred[0].not_before == NOW + 1


def test_op_kinds_follow_the_copy_threshold() -> None:
    writable = replace(POLICY, content=ContentPolicy(writable=True, small_limit=4 * MIB))
    observations = [obj("small", 10), obj("medium", 2 * MIB), obj("large", 4 * MIB)]
    planned = plan_listed(observations, VIEW, writable, NOW)
    assert where(planned) == {"small": "graft", "medium": "graft", "large": "graft"}
    unprepared = replace(writable, prepare=False)
    planned = plan_listed(observations, VIEW, unprepared, NOW)
    assert where(planned) == {"small": "copy", "medium": "graft", "large": "graft"}
    assert where(plan_listed(observations, VIEW, POLICY, NOW)) == {
        "small": "copy",
        "medium": "copy",
        "large": "copy",
    }


MARKED = replace(POLICY, ready_marker=".ready")


def test_a_directory_waits_for_its_marker_then_goes_whole_unstable_or_not() -> None:
    observations = [directory("d"), obj("d/a", stable=False), obj("d/b"), obj("top")]
    waiting = plan_listed(observations, VIEW, MARKED, NOW)
    assert where(waiting) == {"d": "waiting", "d/a": "waiting", "d/b": "waiting", "top": "copy"}
    marked = [replace(o, marker=True, dir_ready=o.directory) for o in observations]
    planned = plan_listed(marked, VIEW, MARKED, NOW)
    assert where(planned) == {"d": "mkdir", "d/a": "copy", "d/b": "copy", "top": "copy"}
    assert planned.plan.atomic_groups == [["ci/d", "ci/d/a", "ci/d/b"]]
    mkdir = next(o for o in planned.plan.ops if o.kind is OpKind.MAKE_DIR)
    assert (mkdir.source_path, mkdir.fingerprint) == ("builds/d/", LISTED_DIRECTORY)


def test_directories_wait_for_a_ready_object_below() -> None:
    observations = [
        directory("d"),
        directory("e", dir_ready=True),
        directory("f", dir_ready=True, live=LISTED_DIRECTORY, live_source="other"),
    ]
    planned = plan_listed(observations, VIEW, POLICY, NOW)
    assert where(planned) == {"d": "deferred", "e": "mkdir"}
    assert planned.plan.atomic_groups == []


def test_listed_ready() -> None:
    assert listed_ready("a", True, False, ".ready")
    assert not listed_ready("a", False, True, ".ready")
    assert listed_ready("d/a", False, True, ".ready")
    assert not listed_ready("d/a", True, False, ".ready")
    assert listed_ready("d/a", True, False, "")


def test_unchanged_set_aside_and_unmapped_paths_are_left_alone() -> None:
    observations = [
        obj("same", live=fp(), live_source=SOURCE),
        obj("theirs", live=fp(), live_source="other"),
        obj("aside", set_aside=True, aside=fp()),
        obj("aside-old", set_aside=True, aside=fp(etag='"e0"')),
        ListedObservation(entry("a//b"), unmappable="empty component"),
        ListedObservation(entry("")),
        ListedObservation(entry("nothing"), repo_path="ci/nothing"),
    ]
    planned = plan_listed(observations, VIEW, POLICY, NOW)
    assert where(planned) == {"theirs": "copy", "aside-old": "copy"}
    assert planned.clear_set_aside == ["builds/aside-old"]
    assert planned.forget == []


def test_deletions_and_their_guard() -> None:
    few = [vanished("a"), vanished("b"), vanished("c", source="other")]
    planned = plan_listed(few, replace(VIEW, live_count=3), POLICY, NOW)
    assert where(planned) == {"a": "delete", "b": "delete"}
    assert planned.plan.ops[0].source_path == "builds/a"
    inbox = replace(POLICY, mirror=False)
    assert where(plan_listed(few, VIEW, inbox, NOW)) == {}
    many = [vanished(f"f{i}") for i in range(10)] + [obj("new")]
    held = plan_listed(many, replace(VIEW, live_count=12), POLICY, NOW)
    assert where(held)["new"] == "copy"
    assert len(held.plan.guarded) == 10
    assert "delete 10 of 12 live paths" in held.plan.guard_reason
    assert held.plan.guard_kind is HoldReason.MASS_DELETE


def test_an_empty_listing_holds_even_one_deletion() -> None:
    view = replace(VIEW, empty=True, live_count=1000)
    planned = plan_listed([vanished("a")], view, POLICY, NOW)
    assert where(planned) == {"a": "guarded"}
    assert planned.plan.guard_reason.startswith(
        "the listing of s3://bucket/builds/ is empty while 1000 paths from it are live"
    )
    assert planned.plan.guard_kind is HoldReason.MASS_DELETE
    nothing_live = plan_listed([vanished("a")], replace(view, live_count=0), POLICY, NOW)
    assert where(nothing_live) == {"a": "delete"}


_RELS = st.sampled_from(["a", "b", "d", "d/x", "d/y", "e", "e/z", ""])


@st.composite
def listed_observation(draw: st.DrawFn, rel: str) -> ListedObservation:
    listed = draw(
        st.one_of(
            st.none(),
            st.builds(
                Listed,
                st.just("builds/" + rel),
                st.builds(fp, st.integers(0, 8 * MIB), st.sampled_from(['"e1"', '"e2"'])),
                st.booleans(),
                st.booleans(),
            ),
        )
    )
    live = draw(st.sampled_from([None, fp(), LISTED_DIRECTORY]))
    return ListedObservation(
        entry(rel),
        repo_path="ci/" + rel if rel else "ci",
        unmappable=draw(st.sampled_from(["", "", "", "bad"])),
        listed=listed,
        directory=draw(st.booleans()),
        dir_ready=draw(st.booleans()),
        marker=draw(st.booleans()),
        live=live,
        live_source=draw(st.sampled_from([SOURCE, "other"])) if live else "",
        set_aside=draw(st.booleans()),
        aside=draw(st.sampled_from([None, fp(), fp(etag='"e2"')])),
    )


@settings(max_examples=200)
@given(
    observations=st.lists(_RELS, unique=True).flatmap(
        lambda rels: st.tuples(*(listed_observation(r) for r in rels))
    ),
    marker=st.sampled_from(["", ".ready"]),
    mirror=st.booleans(),
    view=st.builds(
        ListingView,
        usable=st.booleans(),
        listed_at=st.just(NOW - 3),
        retry_at=st.sampled_from([0.0, NOW + 5]),
        empty=st.booleans(),
        live_count=st.integers(0, 20),
    ),
)
def test_every_listed_entry_ends_up_in_at_most_one_place(
    observations: tuple[ListedObservation, ...], marker: str, mirror: bool, view: ListingView
) -> None:
    """ops, deferred, waiting, guarded, or nothing to do: never two of them."""
    policy = replace(POLICY, ready_marker=marker, mirror=mirror)
    if marker:  # with a marker, an object below is ready only once the marker is listed
        observations = tuple(replace(o, dir_ready=o.dir_ready and o.marker) for o in observations)
    planned = plan_listed(observations, view, policy, NOW)
    placed = where(planned)
    if not view.usable or view.retry_at > NOW:
        assert placed == {o.entry.rel_path: "deferred" for o in observations}
        return
    for obs in observations:
        rel = obs.entry.rel_path
        if not rel or obs.unmappable:
            assert rel not in placed
        elif obs.listed is not None and rel in placed:
            assert placed[rel] in ("copy", "graft", "deferred", "waiting")
    assert all(op.kind is OpKind.DELETE for op in planned.plan.guarded)
    by_rel = {o.entry.rel_path: o for o in observations}
    for op in planned.plan.ops:
        rel = planned.plan.origin[op.repo_path].rel_path
        if marker and "/" in rel and op.kind is not OpKind.DELETE:
            assert by_rel[rel].marker  # nothing of a marked directory before its marker


# --------------------------------------------------------------------------- tarball drops


def drop(rel: str = "pkg.tgz", **fields: Any) -> ListedObservation:
    """A listed top-level tarball of an ingest source (its path is the base)."""
    listed = Listed("builds/" + rel, fp(4096, '"t1"'), stable=fields.pop("stable", True))
    base = "ci/" + rel.split(".", maxsplit=1)[0]
    return ListedObservation(entry(rel), repo_path=base, listed=listed, drop=True, **fields)


def test_a_stable_tarball_drop_is_one_ingest_op_at_its_base() -> None:
    """Stable, a drop is ingested at its base with the object's key and version; before,
    it waits for the next listing; live already, nothing is done."""
    planned = plan_listed([drop()], VIEW, POLICY, NOW)
    assert where(planned) == {"pkg.tgz": "ingest"}
    op = planned.plan.ops[0]
    assert (op.repo_path, op.source_path, op.fingerprint) == (
        "ci/pkg",
        "builds/pkg.tgz",
        fp(4096, '"t1"'),
    )
    assert where(plan_listed([drop(stable=False)], VIEW, POLICY, NOW)) == {"pkg.tgz": "deferred"}
    live = drop(live=fp(4096, '"t1"'), live_source=SOURCE, live_source_path="builds/pkg.tgz")
    assert where(plan_listed([live], VIEW, POLICY, NOW)) == {}


def test_a_refused_tarball_key_is_set_aside() -> None:
    """A tarball whose base is taken is set aside under its key, with the refusal code."""
    refused = RefusedDrop("pkg.tgz", DropRefusal.SAME_BASE, "'pkg.tar.gz' too")
    planned = plan_listed([obj("pkg.tgz", refused_drop=refused)], VIEW, POLICY, NOW)
    assert planned.plan.ops == []
    [aside] = planned.plan.set_aside
    assert (aside.rel_path, aside.refusal) == ("builds/pkg.tgz", "same-base")
    assert aside.reason.startswith("tarball refused (same-base)")


def test_a_gone_tarball_deletes_its_base_behind_the_guard() -> None:
    """Mirror mode: the key gone, its base is deleted, counted with all below it."""
    gone = ListedObservation(
        entry("pkg.tgz"),
        repo_path="ci/pkg",
        drop=True,
        live=fp(4096, '"t1"'),
        live_source=SOURCE,
        live_source_path="builds/pkg.tgz",
        live_below=30,
    )
    many = plan_listed([gone], replace(VIEW, live_count=1000), POLICY, NOW)
    assert where(many) == {"pkg.tgz": "delete"}
    assert many.plan.ops[0].repo_path == "ci/pkg"
    few = plan_listed([gone], replace(VIEW, live_count=40), POLICY, NOW)
    assert where(few) == {"pkg.tgz": "guarded"}
    assert "delete 30 of 40" in few.plan.guard_reason


def test_paths_under_an_ingested_base_wait_for_the_ingest() -> None:
    """Objects gone from under a base a tarball now takes wait for its ingest; a path
    another tarball published is not this entry's to delete."""
    planned = plan_listed(
        [vanished("pkg/a"), vanished("other"), drop(), obj("pkgx")], VIEW, POLICY, NOW
    )
    assert where(planned) == {
        "pkg.tgz": "ingest",
        "pkg/a": "deferred",
        "other": "delete",
        "pkgx": "copy",
    }
    member = replace(vanished("pkg/a"), live_elsewhere=True)
    assert where(plan_listed([member], VIEW, POLICY, NOW)) == {}
