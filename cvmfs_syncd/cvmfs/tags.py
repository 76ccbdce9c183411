"""A repository's tag database as ``cvmfs_server tag -lx`` lists it."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from cvmfs_syncd.cvmfs.outcomes import CommandResult
from cvmfs_syncd.errors import CvmfsCommandError

UNDO_TAGS = frozenset({"trunk", "trunk-previous"})
"""The tags ``publish`` maintains itself; ``tag -r`` refuses to remove them."""

_AUTO_TAG = re.compile(r"^generic(?:_\d+)?-\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


@dataclass(frozen=True, slots=True)
class Tag:
    """One entry of a repository's tag database (``cvmfs_server tag -lx``)."""

    name: str
    root_hash: str
    size_bytes: int
    revision: int
    timestamp: datetime
    branch: str
    description: str

    @property
    def is_undo_tag(self) -> bool:
        """Whether this is ``trunk``/``trunk-previous``, which cannot be removed."""
        return self.name in UNDO_TAGS

    @property
    def is_auto_tag(self) -> bool:
        """Whether ``publish`` created this tag automatically (``generic[_N]-<UTC time>``)."""
        return _AUTO_TAG.match(self.name) is not None


_TAG_LINE = re.compile(
    r"^(?P<name>\S+) (?P<hash>[0-9a-f]+(?:-[a-z0-9]+)?) (?P<size>\d+) (?P<revision>\d+)"
    r" (?P<timestamp>\d+) \((?P<branch>[^)]*)\)(?: (?P<description>.*))?$"
)


def parse_tag_listing(stdout: str) -> tuple[Tag, ...]:
    """Given the stdout of ``cvmfs_server tag -lx``, return its tags in listed order.

    Each line is ``name root_hash size revision unix_time (branch) description``;
    the branch ``(default)`` becomes ``""``.  Raise :class:`CvmfsCommandError` on a
    line that does not have this form.  Pure.
    """
    tags: list[Tag] = []
    for line in stdout.splitlines():
        if not line.strip():
            continue
        match = _TAG_LINE.match(line)
        if match is None:
            raise CvmfsCommandError(f"unexpected line in the tag listing: {line!r}")
        branch = match["branch"]
        tags.append(
            Tag(
                name=match["name"],
                root_hash=match["hash"],
                size_bytes=int(match["size"]),
                revision=int(match["revision"]),
                timestamp=datetime.fromtimestamp(int(match["timestamp"]), tz=UTC),
                branch="" if branch == "default" else branch,
                description=(match["description"] or "").strip(),
            )
        )
    return tuple(tags)


@dataclass(frozen=True, slots=True)
class TagListing:
    """The result of listing tags: the command's result and, when it succeeded, the tags.

    Iterating over a listing iterates over its tags (none when the command failed).
    """

    result: CommandResult
    tags: tuple[Tag, ...]

    @property
    def ok(self) -> bool:
        """Whether the listing command succeeded."""
        return self.result.ok

    def __iter__(self) -> Iterator[Tag]:
        return iter(self.tags)

    def __len__(self) -> int:
        return len(self.tags)
