"""Tests of the pure planning policy: caps, ordering, the mass-deletion guard."""

from __future__ import annotations

from cvmfs_syncd.model import EntryType, Fingerprint, Op, OpKind
from cvmfs_syncd.planner import cut_to_caps, deletion_guard, order_ops


def _file(path: str, size: int = 10) -> Op:
    return Op(OpKind.COPY_FILE, path, "s", path, Fingerprint(EntryType.FILE, 0o644, size))


def test_order_deletes_first_then_dirs_then_files() -> None:
    """Deletions (deepest first) precede directory creation (shallowest first) and files."""
    ops = [
        _file("d/f"),
        Op(OpKind.MAKE_DIR, "d/e", "s", "d/e", Fingerprint(EntryType.DIRECTORY)),
        Op(OpKind.DELETE, "x", "s", "x"),
        Op(OpKind.MAKE_DIR, "d", "s", "d", Fingerprint(EntryType.DIRECTORY)),
        Op(OpKind.DELETE, "x/y/z", "s", "x/y/z"),
    ]
    assert [o.repo_path for o in order_ops(ops)] == ["x/y/z", "x", "d", "d/e", "d/f"]


def test_caps_split_a_batch() -> None:
    """Ops beyond the file-count cap wait for the next batch."""
    ops = [_file(f"f{i}") for i in range(5)]
    now, later = cut_to_caps(ops, [], max_files=2, max_bytes=10**9)
    assert len(now) == 2
    assert len(later) == 3


def test_byte_cap_still_takes_one_huge_file() -> None:
    """A single file above the byte cap is still published on its own."""
    now, later = cut_to_caps([_file("big", 10**12), _file("small")], [], 100, max_bytes=100)
    assert [o.repo_path for o in now] == ["big"]
    assert [o.repo_path for o in later] == ["small"]


def test_atomic_groups_ignore_caps() -> None:
    """A ready-marker directory is published whole, even above the caps."""
    ops = [_file(f"g/f{i}") for i in range(5)] + [_file("loose")]
    now, later = cut_to_caps(ops, [[f"g/f{i}" for i in range(5)]], max_files=2, max_bytes=10**9)
    assert {o.repo_path for o in now} == {f"g/f{i}" for i in range(5)}
    assert [o.repo_path for o in later] == ["loose"]


def test_deletion_guard() -> None:
    """More than the allowed share of live paths deleted holds the batch; small ones pass."""
    assert deletion_guard(60, 100, 0.5)
    assert not deletion_guard(50, 100, 0.5)
    assert not deletion_guard(5, 5, 0.5)
    assert "release" in deletion_guard(100, 100, 0.5)
