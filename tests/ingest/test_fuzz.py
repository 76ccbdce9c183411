"""Fuzzing member names, link targets and archive bytes: whatever an archive holds, a
Manifest never lets anything out of the base, and no input makes the check raise."""

from __future__ import annotations

import io
import os
import tarfile
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cvmfs_syncd.errors import UnsafeName
from cvmfs_syncd.ingest.check import check_archive
from cvmfs_syncd.ingest.emit import emit_plain_tar
from cvmfs_syncd.ingest.model import IngestLimits, Manifest, MemberKind, Refusal
from cvmfs_syncd.paths import check_component, reserved_name
from tests.ingest.archives import (
    Entry,
    Trickle,
    compress,
    directory,
    file,
    hardlink,
    symlink,
    tar_bytes,
)

_COMPONENT = st.sampled_from(
    ["a", "b", "l", ".", "..", "", ".cvmfscatalog", ".cvmfsx", "x" * 256, "caf\udce9", "é", "a\nb"]
)
_PATH = st.lists(_COMPONENT, min_size=1, max_size=4).map("/".join)
_NAME = st.one_of(_PATH, _PATH.map(lambda p: "/" + p), _PATH.map(lambda p: "./" + p))
_TARGET = st.one_of(
    st.lists(_COMPONENT, max_size=5).map("/".join),
    st.lists(_COMPONENT, max_size=3).map(lambda parts: "/" + "/".join(parts)),
)
_ENTRY = st.one_of(
    st.builds(file, _NAME, st.binary(max_size=700), st.sampled_from([0o644, 0o4755, 0o1777])),
    st.builds(directory, _NAME, st.sampled_from([0o755, 0o2700])),
    st.builds(symlink, _NAME, _TARGET),
    st.builds(hardlink, _NAME, _NAME),
)
_LIMITS = st.builds(
    IngestLimits,
    max_bytes=st.just(10_000),
    max_members=st.just(40),
    allow_absolute_symlinks=st.booleans(),
    allow_reserved_names=st.booleans(),
)


def _inside(base: str, path: str) -> bool:
    return path == base or path.startswith(base + "/")


def _assert_contained(found: Manifest, limits: IngestLimits) -> None:
    """Every path is safe, every hard link names an earlier file, and every symlink, made on
    a real file system, resolves inside the base (unless absolute targets are allowed)."""
    kinds: dict[str, MemberKind] = {}
    for member in found.members:
        assert not member.path.startswith("/")
        for part in member.path.split("/"):
            check_component(part)
            assert limits.allow_reserved_names or reserved_name(part) is None
        assert member.path not in kinds
        assert member.mode == member.mode & 0o777
        if member.kind is MemberKind.HARDLINK:
            assert member.link_target is not None
            assert kinds.get(member.link_target) is MemberKind.FILE
        kinds[member.path] = member.kind
    for path in kinds:
        parent = path.rpartition("/")[0]
        assert parent == "" or kinds.get(parent, MemberKind.DIRECTORY) is MemberKind.DIRECTORY
    links = [m for m in found.members if m.kind is MemberKind.SYMLINK]
    absolute = [m for m in links if (m.link_target or "").startswith("/")]
    assert limits.allow_absolute_symlinks or not absolute
    if absolute:
        return  # where relative targets lead through them is the file system's business
    with tempfile.TemporaryDirectory() as scratch:
        base = os.path.realpath(os.path.join(scratch, "base"))
        os.mkdir(base)
        for step in found.output_plan():
            member, where = step.member, os.path.join(base, step.member.path)
            if not step.write:
                continue
            if member.kind is MemberKind.DIRECTORY:
                os.mkdir(where)
            elif member.kind is MemberKind.SYMLINK:
                os.symlink(member.link_target or "", where)
            else:
                with open(where, "wb"):
                    pass
        for link in links:
            resolved = os.path.realpath(os.path.join(base, link.path))
            assert _inside(base, resolved), (link, resolved)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries=st.lists(_ENTRY, max_size=8), limits=_LIMITS)
def test_a_manifest_never_leaves_the_base(entries: list[Entry], limits: IngestLimits) -> None:
    """Whatever names and targets members have, a Manifest holds only safe relative paths,
    and its symlinks stay inside the base unless absolute targets are allowed; the tar
    written from it holds the same members."""
    try:
        data = tar_bytes(*entries)
    except (UnsafeName, ValueError, UnicodeError):
        return  # tarfile itself cannot write every name (a NUL, say)
    found = check_archive(Trickle(data), limits)
    assert isinstance(found, Manifest | Refusal)
    if isinstance(found, Refusal):
        return
    _assert_contained(found, limits)
    out = io.BytesIO()
    emit_plain_tar(Trickle(data), found, out)
    again = check_archive(io.BytesIO(out.getvalue()), limits)
    assert isinstance(again, Manifest), again
    written = [s.member for s in found.output_plan() if s.write]
    assert list(again.members) == written


_LINK_NAME = st.lists(st.sampled_from(["a", "l", "m"]), min_size=1, max_size=2).map("/".join)


@st.composite
def _linked_entries(draw: st.DrawFn) -> list[Entry]:
    """Symlinks whose targets go through each other's names and up and down the tree."""
    names = draw(st.lists(_LINK_NAME, min_size=1, max_size=4, unique=True))
    pieces = st.sampled_from([*names, "..", "..", ".", "a"])
    entries = [
        symlink(name, "/".join(draw(st.lists(pieces, min_size=1, max_size=4)))) for name in names
    ]
    return draw(st.permutations(entries))


@settings(max_examples=600, deadline=None)
@given(entries=_linked_entries())
def test_symlink_chains_never_escape(entries: list[Entry]) -> None:
    """Symlinks through symlinks, in any order, never resolve out of the base."""
    limits = IngestLimits()
    found = check_archive(Trickle(tar_bytes(*entries)), limits)
    if isinstance(found, Manifest):
        _assert_contained(found, limits)


_SEED = tar_bytes(
    directory("d"),
    file("d/a", b"a" * 900),
    symlink("d/l", "a"),
    hardlink("h", "d/a"),
    file("caf\udce9" + "n" * 150, b"c"),
)


@settings(max_examples=300, deadline=None)
@given(
    how=st.sampled_from(["none", "gzip", "xz", "bzip2"]),
    edits=st.lists(
        st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=255)), max_size=6
    ),
    cut=st.one_of(st.none(), st.integers(min_value=0)),
)
def test_damaged_bytes_never_make_the_check_raise(
    how: str, edits: list[tuple[int, int]], cut: int | None
) -> None:
    """Flipped bytes and cuts anywhere, compressed or not, give a Refusal or a Manifest that
    stays inside the base — never an exception."""
    data = bytearray(compress(_SEED, how))
    for position, value in edits:
        data[position % len(data)] = value
    if cut is not None:
        del data[cut % (len(data) + 1) :]
    limits = IngestLimits()
    found = check_archive(Trickle(bytes(data)), limits)
    assert isinstance(found, Manifest | Refusal)
    if isinstance(found, Manifest):
        _assert_contained(found, limits)


def test_the_seed_is_an_archive() -> None:
    """The archive the damage test starts from is accepted as it is."""
    assert isinstance(check_archive(Trickle(_SEED)), Manifest)
    assert tarfile.is_tarfile(io.BytesIO(_SEED))
