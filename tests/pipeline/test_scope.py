"""One lease per batch: a gateway publisher's batch holds only ops under its lease path."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from cvmfs_syncd.cvmfs.outcomes import parse_missing_scope
from cvmfs_syncd.model import Op, OpKind
from cvmfs_syncd.pipeline.scope import cut_to_scope, parent_scope, under

TARGETS = {"a": "sw/a", "b": "sw/b", "root": "", "nested": "sw/a/inner"}


def _op(source: str, rel: str) -> Op:
    target = TARGETS[source]
    return Op(OpKind.COPY_FILE, f"{target}/{rel}" if target else rel, source, rel)


def test_scope_is_the_first_sources_target_and_siblings_wait() -> None:
    """Ops of a sibling target wait; ops of a target inside the lease come along."""
    ops = [_op("a", "x"), _op("b", "y"), _op("nested", "z"), _op("a", "d/w")]
    scope, taken, later = cut_to_scope(ops, TARGETS)
    assert scope == "sw/a"
    assert [op.repo_path for op in taken] == ["sw/a/x", "sw/a/inner/z", "sw/a/d/w"]
    assert [op.repo_path for op in later] == ["sw/b/y"]


def test_a_root_target_leases_the_whole_repository() -> None:
    """Target "/" is the whole repository: every op fits its lease."""
    ops = [_op("root", "top"), _op("b", "y")]
    assert cut_to_scope(ops, TARGETS) == ("", ops, [])
    assert cut_to_scope([], TARGETS) == ("", [], [])


def test_prefix_is_not_containment() -> None:
    """``sw/ab`` is not under ``sw/a``: the lease would drop it silently (gateway.md 3)."""
    assert under("sw/a/x", "sw/a")
    assert under("sw/a", "sw/a")
    assert not under("sw/ab", "sw/a")
    assert under("anything", "")


_names = st.sampled_from(["x", "y", "d/e", "sw", "a", "ab"])


@given(st.lists(st.tuples(st.sampled_from(sorted(TARGETS)), _names), min_size=1, max_size=30))
def test_no_op_ever_lies_outside_the_lease(specs: list[tuple[str, str]]) -> None:
    """Whatever the mix: taken ops are all under the scope, nothing is lost or duplicated,
    and the first op always goes (so every round makes progress)."""
    ops = [_op(source, rel) for source, rel in specs]
    scope, taken, later = cut_to_scope(ops, TARGETS)
    assert all(under(op.repo_path, scope) for op in taken)
    assert not any(under(op.repo_path, scope) for op in later)
    assert sorted(map(repr, taken + later)) == sorted(map(repr, ops))
    assert taken[0] == ops[0]


def test_the_missing_component_gives_the_parent_to_lease() -> None:
    """The tool names the first missing component (gateway.md 1): lease its parent."""
    text = "CernVM-FS transaction error: cannot open transaction on non-existing path /sw\n"
    assert parse_missing_scope(text) == "sw"
    assert parent_scope("sw") == ""
    deeper = "cannot open transaction on non-existing path /sw/a/new"
    assert parse_missing_scope(deeper) == "sw/a/new"
    assert parent_scope("sw/a/new") == "sw/a"
    assert parse_missing_scope("lease path busy") is None
