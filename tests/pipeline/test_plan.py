"""Pure planning decisions: how a file's content reaches the repository, deletion counts."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from cvmfs_syncd.cvmfs.graft import GRAFT_NAME_MAX
from cvmfs_syncd.model import OpKind
from cvmfs_syncd.pipeline.plan import COPY_ONLY, ContentPolicy, count_deleted, file_op_kind

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
