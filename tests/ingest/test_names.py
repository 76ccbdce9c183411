"""Which top-level names are tarball drops, their bases, and which drops are refused."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cvmfs_syncd.ingest.names import (
    ARCHIVE_SUFFIXES,
    Compression,
    DropRefusal,
    find_drops,
    tarball_base,
    tarball_compression,
)


@pytest.mark.parametrize(
    ("name", "base", "compression"),
    [
        ("foo.tar", "foo", Compression.NONE),
        ("foo.tar.gz", "foo", Compression.GZIP),
        ("foo.tgz", "foo", Compression.GZIP),
        ("foo.tar.xz", "foo", Compression.XZ),
        ("foo.tar.bz2", "foo", Compression.BZIP2),
        ("v1.2.3.tar.gz", "v1.2.3", Compression.GZIP),
        ("foo.tar.tar", "foo.tar", Compression.NONE),
        (".hidden.tgz", ".hidden", Compression.GZIP),
    ],
)
def test_tarball_suffixes(name: str, base: str, compression: Compression) -> None:
    """Each suffix of the table gives the name without it and the compression it means;
    the longest suffix wins (``x.tar.gz`` is ``x``, not ``x.tar``)."""
    assert tarball_base(name) == base
    assert tarball_compression(name) is compression


@pytest.mark.parametrize(
    "name",
    [".tar", ".tgz", "foo", "foo.gz", "foo.zip", "FOO.TGZ", "foo.tar.zst", "foo.tar.gz.part", ""],
)
def test_not_tarballs(name: str) -> None:
    """Names without a known suffix, with nothing before it, or in another case, are
    ordinary entries."""
    assert tarball_base(name) is None
    assert tarball_compression(name) is None


def test_the_table_covers_the_formats() -> None:
    """Every compression has at least one suffix, and no suffix is listed twice."""
    suffixes = [suffix for suffix, _ in ARCHIVE_SUFFIXES]
    assert len(suffixes) == len(set(suffixes))
    assert {compression for _, compression in ARCHIVE_SUFFIXES} == set(Compression)


def test_drops_and_plain_names() -> None:
    """Tarballs become drops under their base; other names are in neither result."""
    drops, refused = find_drops(["a.tgz", "b.tar", "readme.txt", "lib"], directories={"lib"})
    assert drops == {"a.tgz": "a", "b.tar": "b"}
    assert refused == []


def test_two_tarballs_with_one_base_are_both_refused() -> None:
    """``foo.tgz`` beside ``foo.tar.gz``: neither is preferred, both are refused and each
    names the other."""
    drops, refused = find_drops(["foo.tar.gz", "foo.tgz", "bar.tgz"])
    assert drops == {"bar.tgz": "bar"}
    assert [(r.name, r.reason) for r in refused] == [
        ("foo.tar.gz", DropRefusal.SAME_BASE),
        ("foo.tgz", DropRefusal.SAME_BASE),
    ]
    assert "'foo.tgz'" in refused[0].detail
    assert "'foo.tar.gz'" in refused[1].detail


@pytest.mark.parametrize("other_is_directory", [True, False])
def test_a_plain_entry_keeps_its_name(other_is_directory: bool) -> None:
    """A directory or file ``foo`` beside ``foo.tgz`` stays; the tarball is refused."""
    directories = {"foo"} if other_is_directory else set()
    drops, refused = find_drops(["foo", "foo.tgz"], directories)
    assert drops == {}
    assert [(r.name, r.reason) for r in refused] == [("foo.tgz", DropRefusal.BASE_TAKEN)]


def test_a_directory_with_a_tarball_name_is_no_tarball() -> None:
    """A directory ``x.tar`` is staged content: no drop, and it occupies the name ``x.tar``
    (a tarball ``x.tar.tar`` would be published there)."""
    drops, refused = find_drops(["x.tar", "x.tar.tar"], directories={"x.tar"})
    assert drops == {}
    assert [(r.name, r.reason) for r in refused] == [("x.tar.tar", DropRefusal.BASE_TAKEN)]


@pytest.mark.parametrize(
    "name", ["..tar", "...tgz", ".cvmfscatalog.tgz", ".cvmfs.tar", "x" * 256 + ".tar"]
)
def test_unsafe_bases(name: str) -> None:
    """A base that is ``.``, ``..``, a reserved name or too long is refused."""
    drops, refused = find_drops([name])
    assert drops == {}
    assert [r.reason for r in refused] == [DropRefusal.UNSAFE_BASE]


def test_reserved_bases_when_allowed() -> None:
    """With ``allow_reserved_names`` a reserved base is published like any other."""
    drops, _ = find_drops([".cvmfscatalog.tgz"], allow_reserved_names=True)
    assert drops == {".cvmfscatalog.tgz": ".cvmfscatalog"}


_NAMES = st.lists(
    st.sampled_from(
        ["a", "a.tar", "a.tgz", "a.tar.gz", "b.tar.xz", "b", "..tar", "c.tar.bz2", "c.tgz"]
    ),
    max_size=8,
)


@settings(max_examples=200, deadline=None)
@given(names=_NAMES, order=st.randoms(use_true_random=False), dirs=st.sets(st.just("b")))
def test_result_depends_on_the_set_of_names(
    names: list[str], order: random.Random, dirs: set[str]
) -> None:
    """Listing order and repetitions never change the result, every tarball is either a
    drop or refused, and no two drops share a base."""
    shuffled = list(names) * 2
    order.shuffle(shuffled)
    assert find_drops(names, dirs) == find_drops(shuffled, dirs)
    drops, refused = find_drops(names, dirs)
    tarballs = {n for n in names if n not in dirs and tarball_base(n) is not None}
    assert set(drops) | {r.name for r in refused} == tarballs
    assert len(set(drops.values())) == len(drops)
    plain = {n for n in names if n not in tarballs}
    assert not set(drops.values()) & plain
