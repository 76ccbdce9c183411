"""Tests for the pure path policy in cvmfs_syncd.paths."""

from __future__ import annotations

import os
import random
from pathlib import PurePosixPath

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cvmfs_syncd.config import DEFAULT_IGNORE
from cvmfs_syncd.paths import (
    KeyRefusal,
    KeyRefused,
    is_ignored,
    repo_path,
    reserved_name,
    resolve_key_collisions,
    s3_key_to_rel_path,
    split_repo_path,
)

TARGETS = ("/", "/ci", "/ci/", "/a/b/c", "//x//y")

# Components that exercise every rule, mixed with arbitrary text and undecodable bytes.
_COMPONENT = st.one_of(
    st.sampled_from(["", ".", "..", "a", ".cvmfscatalog", "x" * 255, "x" * 256, "\0", "é" * 128]),
    st.text(max_size=12),
    st.binary(max_size=300).map(os.fsdecode),
)
_PATH = st.lists(_COMPONENT, max_size=6).map("/".join)
_KEY_COMPONENT = st.one_of(
    st.sampled_from(["", ".", "..", "a", "b", ".cvmfsdirtab", "\x7f", "\ud800", "y" * 256]),
    st.text(max_size=12),
)
_KEY = st.one_of(st.lists(_KEY_COMPONENT, max_size=6).map("/".join), st.text(max_size=40))


def _assert_safe_components(path: str) -> None:
    for part in path.split("/"):
        assert part not in ("", ".", "..")
        assert "\0" not in part
        assert len(os.fsencode(part)) <= 255


def _assert_inside(target: str, result: str) -> None:
    base = PurePosixPath("/" + "/".join(p for p in target.split("/") if p))
    joined = PurePosixPath("/" + result)
    assert joined == base or base in joined.parents
    assert ".." not in joined.parts


# --- is_ignored ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["x.tmp", "big.part", ".notes.txt.swp", ".data.bin.A1b2C3", ".x.000000", "a/b/c.tmp"],
)
def test_temporary_names_are_ignored(name: str) -> None:
    """Default globs and rsync's in-progress pattern mark names as temporary."""
    assert is_ignored(name, DEFAULT_IGNORE)


@pytest.mark.parametrize(
    "name", ["data.bin", "data.bin.A1b2C3", ".data.bin.A1b2C", "..A1b2C3", ".x.A1b2C3d", "tmp"]
)
def test_ordinary_names_are_not_ignored(name: str) -> None:
    """Names that only resemble temporaries are published."""
    assert not is_ignored(name, DEFAULT_IGNORE)


def test_rsync_and_own_temporaries_are_ignored_without_patterns() -> None:
    """The rsync pattern and the daemon's own temporary names apply even with no globs."""
    assert is_ignored(".report.pdf.Xy12Zq", ())
    assert is_ignored(".cvmfs-syncd.0123abcd.tmp", ())
    assert not is_ignored("x.tmp", ())


def test_globs_are_case_sensitive() -> None:
    """Globs match case-sensitively, like the file system."""
    assert not is_ignored("X.TMP", ("*.tmp",))


# --- reserved_name ------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        ".cvmfscatalog",
        ".cvmfsdirtab",
        ".cvmfsautocatalog",
        ".cvmfsgraft-data.root",
        ".cvmfspublished",
        ".cvmfs",
    ],
)
def test_reserved_names_have_a_reason(name: str) -> None:
    """Every CVMFS control name yields a reason that names it."""
    reason = reserved_name(name)
    assert reason is not None
    assert ".cvmfs" in reason


@pytest.mark.parametrize("name", ["cvmfscatalog", ".CVMFSCATALOG", "x.cvmfscatalog", ".cvmf"])
def test_similar_names_are_not_reserved(name: str) -> None:
    """Only names starting with exactly '.cvmfs' are reserved."""
    assert reserved_name(name) is None


# --- repo_path ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "rel", "expected"),
    [
        ("/", "a/b", "a/b"),
        ("/ci", "a", "ci/a"),
        ("/ci/", "a", "ci/a"),
        ("/", "", ""),
        ("/ci", "", "ci"),
        ("/", os.fsdecode(b"caf\xe9"), os.fsdecode(b"caf\xe9")),
        ("/", "x" * 255, "x" * 255),
    ],
)
def test_repo_path_joins(target: str, rel: str, expected: str) -> None:
    """Relative paths are joined under the target without a leading slash."""
    assert repo_path(target, rel) == expected


@pytest.mark.parametrize(
    ("target", "rel", "message"),
    [
        ("/", "../x", "'..'"),
        ("/", "a/../b", "'..'"),
        ("/", "a//b", "''"),
        ("/", "./a", "'.'"),
        ("/", "a/", "''"),
        ("/", "/etc/passwd", "absolute"),
        ("/", "a\0b", "NUL"),
        ("/", "x" * 256, "256 bytes"),
        ("/", "é" * 128, "256 bytes"),
        ("/", "\ud800", "cannot be encoded"),
        ("ci", "a", "absolute"),
        ("/../etc", "a", "'..'"),
    ],
)
def test_repo_path_refuses(target: str, rel: str, message: str) -> None:
    """Unsafe paths raise ValueError saying what is wrong."""
    with pytest.raises(ValueError) as info:
        repo_path(target, rel)
    assert message in str(info.value)


def test_split_repo_path() -> None:
    """Repository paths split into checked components; the root is empty."""
    assert split_repo_path("") == []
    assert split_repo_path("a/b") == ["a", "b"]
    with pytest.raises(ValueError, match="relative"):
        split_repo_path("/a")


@settings(max_examples=500, deadline=None)
@given(target=st.sampled_from(TARGETS), rel=st.one_of(_PATH, st.text(max_size=60)))
def test_repo_path_result_is_safe_or_refused(target: str, rel: str) -> None:
    """Any rel path is refused or becomes a path of safe components inside the target."""
    try:
        result = repo_path(target, rel)
    except ValueError:
        return
    if result:
        _assert_safe_components(result)
    _assert_inside(target, result)


@settings(max_examples=300, deadline=None)
@given(
    target=st.sampled_from(TARGETS),
    raw=st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=4),
)
def test_repo_path_of_byte_names(target: str, raw: list[bytes]) -> None:
    """Names decoded from arbitrary bytes round-trip through os.fsencode when accepted."""
    rel = "/".join(os.fsdecode(part) for part in raw)
    try:
        result = repo_path(target, rel)
    except ValueError:
        assert any(b"/" in p or b"\0" in p or len(p) > 255 or p in (b".", b"..") for p in raw)
        return
    _assert_safe_components(result)
    _assert_inside(target, result)
    assert os.fsencode(result).endswith(b"/".join(raw))


# --- S3 keys ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "prefix", "expected"),
    [
        ("a/b.txt", "", "a/b.txt"),
        ("data/a/b.txt", "data", "a/b.txt"),
        ("data/a/b.txt", "data/", "a/b.txt"),
        ("data/é.txt", "data/", "é.txt"),
    ],
)
def test_s3_key_maps(key: str, prefix: str, expected: str) -> None:
    """Keys under the prefix map to the rest of the key, unchanged."""
    assert s3_key_to_rel_path(key, prefix) == expected


@pytest.mark.parametrize(
    ("key", "prefix", "reason"),
    [
        ("data2/x", "data", KeyRefusal.OUTSIDE_PREFIX),
        ("data/", "data", KeyRefusal.DIRECTORY_MARKER),
        ("data/sub/", "data", KeyRefusal.DIRECTORY_MARKER),
        ("/a", "", KeyRefusal.ABSOLUTE),
        ("data//a", "data", KeyRefusal.ABSOLUTE),
        ("a//b", "", KeyRefusal.EMPTY_SEGMENT),
        ("a/../b", "", KeyRefusal.DOT_SEGMENT),
        ("./a", "", KeyRefusal.DOT_SEGMENT),
        ("a\0b", "", KeyRefusal.NUL),
        ("a\ud800b", "", KeyRefusal.NOT_UTF8),
        ("a\nb", "", KeyRefusal.CONTROL_CHARACTER),
        ("a\x7fb", "", KeyRefusal.CONTROL_CHARACTER),
        ("a/" * 600, "", KeyRefusal.KEY_TOO_LONG),
        ("y" * 256, "", KeyRefusal.NAME_TOO_LONG),
        ("a/.cvmfscatalog", "", KeyRefusal.RESERVED_NAME),
        (".cvmfsgraft-x/y", "", KeyRefusal.RESERVED_NAME),
    ],
)
def test_s3_key_refused(key: str, prefix: str, reason: KeyRefusal) -> None:
    """Unsafe keys are refused with a stable reason code."""
    with pytest.raises(KeyRefused) as info:
        s3_key_to_rel_path(key, prefix)
    assert info.value.reason is reason
    assert info.value.ignorable == (reason is KeyRefusal.DIRECTORY_MARKER)


def test_s3_reserved_names_can_be_allowed() -> None:
    """allow_reserved_names lets a key map onto a CVMFS control name."""
    assert s3_key_to_rel_path("a/.cvmfscatalog", "", allow_reserved_names=True) == (
        "a/.cvmfscatalog"
    )


@settings(max_examples=500, deadline=None)
@given(key=_KEY, prefix=st.sampled_from(["", "p", "p/", "p/q"]), target=st.sampled_from(TARGETS))
def test_s3_key_is_safe_or_refused(key: str, prefix: str, target: str) -> None:
    """Any key is refused or maps to a non-reserved, safe path that stays inside the target."""
    try:
        rel = s3_key_to_rel_path(key, prefix)
    except KeyRefused as refusal:
        assert refusal.key == key
        return
    _assert_safe_components(rel)
    assert all(reserved_name(part) is None for part in rel.split("/"))
    rel.encode("utf-8")  # valid UTF-8: must not raise
    _assert_inside(target, repo_path(target, rel))


def test_collisions_directory_beats_file() -> None:
    """A key that is also a directory of other keys loses to them."""
    winners, losers = resolve_key_collisions(["x", "x/y", "x/y/z", "w"])
    assert winners == {"x/y/z": "x/y/z", "w": "w"}
    assert [(k, r.reason) for k, r in losers] == [
        ("x", KeyRefusal.FILE_DIRECTORY_CONFLICT),
        ("x/y", KeyRefusal.FILE_DIRECTORY_CONFLICT),
    ]


def test_collisions_ignore_refused_keys_for_conflicts() -> None:
    """A refused key below a file does not make that file lose."""
    winners, losers = resolve_key_collisions(["x", "x/.cvmfscatalog", "x/", "d/"])
    assert winners == {"x": "x"}
    reasons = {k: r.reason for k, r in losers}
    assert reasons == {
        "x/.cvmfscatalog": KeyRefusal.RESERVED_NAME,
        "x/": KeyRefusal.DIRECTORY_MARKER,
        "d/": KeyRefusal.DIRECTORY_MARKER,
    }


def test_collisions_with_prefix_and_duplicates() -> None:
    """Keys are mapped below the prefix and duplicates count once."""
    winners, losers = resolve_key_collisions(["p/a", "p/a", "q/b"], "p")
    assert winners == {"a": "p/a"}
    assert [(k, r.reason) for k, r in losers] == [("q/b", KeyRefusal.OUTSIDE_PREFIX)]


@settings(max_examples=300, deadline=None)
@given(keys=st.lists(_KEY, max_size=20), seed=st.integers(0, 2**32))
def test_collision_resolution_is_order_independent(keys: list[str], seed: int) -> None:
    """The outcome depends only on the set of keys, never on their listing order."""
    shuffled = list(keys) + keys[: len(keys) // 2]
    random.Random(seed).shuffle(shuffled)
    first = resolve_key_collisions(keys)
    second = resolve_key_collisions(shuffled)
    assert first == second
    winners, losers = first
    assert set(winners.values()).isdisjoint(k for k, _ in losers)
    assert set(winners.values()) | {k for k, _ in losers} == set(keys)
    paths = set(winners)
    for rel in paths:
        _assert_safe_components(rel)
        parts = rel.split("/")
        assert not any("/".join(parts[:i]) in paths for i in range(1, len(parts)))


def test_an_unsafe_name_has_an_error_type_of_its_own() -> None:
    """Refusing an input catches UnsafeName, never a programming error's ValueError."""
    from cvmfs_syncd.errors import UnsafeName
    from cvmfs_syncd.paths import repo_path

    with pytest.raises(UnsafeName, match="must be relative"):
        repo_path("/sw", "/etc/passwd")
    with pytest.raises(UnsafeName):
        repo_path("/sw", "a/../../etc")
    assert issubclass(UnsafeName, ValueError)
