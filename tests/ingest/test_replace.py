"""Replacing a base's previous content with a new archive: deletions, type changes, and
whether one ``ingest`` call can do it."""

from __future__ import annotations

import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cvmfs_syncd.ingest import IngestLimits, Manifest, check_archive
from cvmfs_syncd.ingest.replace import (
    CATALOG_MARKER,
    already_live,
    ingest_argument_safe,
    live_types,
    plan_replacement,
)
from cvmfs_syncd.model import EntryType, Fingerprint
from tests.ingest import archives

F, D, L = EntryType.FILE, EntryType.DIRECTORY, EntryType.SYMLINK


def test_first_version() -> None:
    """Nothing live: nothing to delete, one ingest call."""
    plan = plan_replacement("sw/foo", {"a": F, "d": D, "d/x": F}, {})
    assert (plan.deletes, plan.type_changes, plan.unsafe_arguments) == ((), (), ())
    assert plan.fits_one_ingest(gateway=False) and plan.fits_one_ingest(gateway=True)


def test_deletes_are_top_most() -> None:
    """What the new archive lacks is deleted, a gone directory once for all it held."""
    live = {
        "a": F,
        "b": F,
        "old": D,
        "old/x": F,
        "old/sub": D,
        "old/sub/y": L,
        "keep": D,
        "keep/gone": F,
        "keep/stay": F,
    }
    new = {"a": F, "keep": D, "keep/stay": F, "new": F}
    plan = plan_replacement("sw/foo", new, live)
    assert plan.deletes == ("sw/foo/b", "sw/foo/keep/gone", "sw/foo/old")
    assert plan.type_changes == ()
    assert not plan.needs_transaction
    assert plan.fits_one_ingest(gateway=False)
    assert not plan.fits_one_ingest(gateway=True)


@pytest.mark.parametrize(
    ("live", "new"),
    [
        ({"x": D, "x/y": F}, {"x": F}),
        ({"x": F}, {"x": D}),
        ({"x": L}, {"x": F}),
        ({"x": F}, {"x": L}),
    ],
)
def test_type_changes_need_a_transaction(
    live: dict[str, EntryType], new: dict[str, EntryType]
) -> None:
    """A path that changes type (file, directory, symlink) is listed and needs a
    transaction."""
    plan = plan_replacement("base", new, live)
    assert plan.type_changes == ("base/x",)
    assert plan.needs_transaction
    assert not plan.fits_one_ingest(gateway=False)


def test_the_base_itself_must_be_a_directory() -> None:
    """A base that is live as a file (published before the tarball arrived) is a type
    change of the base."""
    plan = plan_replacement("sw/foo", {"a": F}, {"": F})
    assert plan.type_changes == ("sw/foo",)
    assert plan.deletes == ()


@pytest.mark.parametrize(
    ("path", "safe"),
    [
        ("sw/foo-1.2_3+x@y%z=w,v", True),
        ("with space", False),
        ("dollar$HOME", False),
        ("semi;colon", False),
        ("back\\slash", False),
        ("co:lon", False),
        ("glob*", False),
        ("brace{a,b}", False),
        ("caf\u00e9", False),
        ("new\nline", False),
        ("a//b", False),
        ("", False),
    ],
)
def test_command_line_safety(path: str, safe: bool) -> None:
    """Only names the script's unquoted shell word leaves unchanged pass."""
    assert ingest_argument_safe(path) is safe


def test_unsafe_arguments_need_a_transaction() -> None:
    """A base or deletion the command line would garble falls back to a transaction."""
    plan = plan_replacement("sw/x", {"a": F}, {"a": F, "b c": F, "d": F})
    assert plan.unsafe_arguments == ("sw/x/b c",)
    assert plan.needs_transaction
    assert plan_replacement("sw/my tool", {"a": F}, {}).unsafe_arguments == ("sw/my tool",)
    assert plan_replacement("sw/x", {}, {"$(id)": F}).unsafe_arguments == ("sw/x/$(id)",)


_PARTS = st.sampled_from(["a", "b", "c"])
_TREE = st.dictionaries(
    st.lists(_PARTS, min_size=1, max_size=3).map("/".join), st.sampled_from([F, D, L]), max_size=12
)


def _closed(tree: dict[str, EntryType]) -> dict[str, EntryType]:
    """Make every parent of a path a directory, as a real tree has them."""
    closed = dict(tree)
    for path in tree:
        parts = path.split("/")
        for depth in range(1, len(parts)):
            closed["/".join(parts[:depth])] = D
    return closed


@settings(max_examples=300, deadline=None)
@given(live=_TREE.map(_closed), new=_TREE.map(_closed))
def test_deletes_cover_exactly_what_goes(
    live: dict[str, EntryType], new: dict[str, EntryType]
) -> None:
    """The deletions and what lies below them are exactly the live paths the new archive
    lacks, none of them below another, and type changes are exactly the shared paths whose
    type differs."""
    plan = plan_replacement("b", new, live)
    deleted = [d.removeprefix("b/") for d in plan.deletes]
    covered = {p for p in live if any(p == d or p.startswith(d + "/") for d in deleted)}
    assert covered == {p for p in live if p not in new}
    assert not any(d.startswith(e + "/") for d in deleted for e in deleted)
    changed = {p for p in live if p in new and live[p] != new[p]}
    assert {c.removeprefix("b/") for c in plan.type_changes} == changed


# -------------------------------------------------------------- what is live already


def _manifest(*entries: archives.Entry) -> Manifest:
    checked = check_archive(io.BytesIO(archives.tar_bytes(*entries)))
    assert isinstance(checked, Manifest)
    return checked


def _dir() -> Fingerprint:
    return Fingerprint(D, 0o755)


def _file(size: int) -> Fingerprint:
    return Fingerprint(F, 0o644, size)


def _link(target: str) -> Fingerprint:
    return Fingerprint(L, 0o777, target=target)


ARCHIVE = (
    archives.file("pkg/a.txt", b"aaaa"),
    archives.hardlink("pkg/b.txt", "pkg/a.txt"),
    archives.symlink("latest", "pkg"),
    archives.directory("empty"),
)

LIVE = {
    "": _dir(),
    "pkg": _dir(),
    "pkg/a.txt": _file(4),
    "pkg/b.txt": _file(4),
    "latest": _link("pkg"),
    "empty": _dir(),
}


def test_the_live_tree_equal_to_the_archive_is_already_live() -> None:
    """Types, sizes (a hard link has its target's) and link targets equal: already live;
    modes and the base's catalog marker do not matter."""
    manifest = _manifest(*ARCHIVE)
    assert already_live(manifest, LIVE)
    assert already_live(manifest, {**LIVE, "pkg/a.txt": Fingerprint(F, 0o600, 4, 99)})
    assert already_live(manifest, {**LIVE, CATALOG_MARKER: _file(0)})


@pytest.mark.parametrize(
    "live",
    [
        {},  # nothing live
        {**LIVE, "": _file(0)},  # the base is no directory
        {k: v for k, v in LIVE.items() if k != "empty"},  # a path missing
        {**LIVE, "extra": _file(1)},  # a path too many
        {**LIVE, "pkg/a.txt": _file(5)},  # another size
        {**LIVE, "pkg/b.txt": _file(0)},  # the hard link's size
        {**LIVE, "latest": _link("elsewhere")},  # another target
        {**LIVE, "empty": _file(0)},  # another type
        {**LIVE, "pkg/sub/" + CATALOG_MARKER: _file(0)},  # a marker below the base counts
    ],
)
def test_any_difference_is_not_live(live: dict[str, Fingerprint]) -> None:
    """Anything but the archive's tree under the base means it is not live yet."""
    assert not already_live(_manifest(*ARCHIVE), live)


def test_live_types_keep_the_catalog_marker_out_of_the_replacement() -> None:
    """The marker ``ingest -c`` left is never deleted by the next version, unless the
    archive has one of its own."""
    live = {**LIVE, CATALOG_MARKER: _file(0)}
    types = live_types(_manifest(*ARCHIVE), live)
    assert CATALOG_MARKER not in types
    assert types["latest"] is L and types[""] is D
    plan = plan_replacement("sw/foo", _manifest(archives.file("pkg/a.txt")).entries(), types)
    assert plan.deletes == ("sw/foo/empty", "sw/foo/latest", "sw/foo/pkg/b.txt")
    reserved = IngestLimits(allow_reserved_names=True)
    own = check_archive(io.BytesIO(archives.tar_bytes(archives.file(CATALOG_MARKER))), reserved)
    assert isinstance(own, Manifest)
    assert live_types(own, live)[CATALOG_MARKER] is F
