"""Replacing a base's previous content with a new archive: deletions, type changes, and
whether one ``ingest`` call can do it."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cvmfs_syncd.ingest.replace import ingest_argument_safe, plan_replacement
from cvmfs_syncd.model import EntryType

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
