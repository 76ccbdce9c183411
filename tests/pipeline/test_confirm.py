"""A batch counts as live only when a revision is shown to be ours: past its base and, behind
a gateway, named by the history (gateway.md 9-10: other publishers move the revision too)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from cvmfs_syncd.cvmfs.outcomes import CommandResult, Outcome
from cvmfs_syncd.cvmfs.repo import RepositoryLayout
from cvmfs_syncd.cvmfs.server import CvmfsServer
from cvmfs_syncd.cvmfs.tags import Tag, TagListing
from cvmfs_syncd.pipeline.confirm import (
    live_revision,
    names_batch,
    publish_message,
    revision_of_batch,
)

TAG = "0123456789ab:42"
LOCAL = "local,/srv/cvmfs/r/data/txn,/srv/cvmfs/r"
GATEWAY = "gw,/srv/cvmfs/r/data/txn,http://gateway:4929/api/v1"


def _tag(name: str, revision: int, description: str) -> Tag:
    when = datetime(2026, 12, 3, tzinfo=UTC)
    return Tag(name, "ab" * 20, 4096, revision, when, "default", description)


def _listing(*tags: Tag, ok: bool = True) -> TagListing:
    result = CommandResult(
        argv=("cvmfs_server", "tag", "-lx", "r"),
        exit_code=0 if ok else 1,
        stdout="",
        stderr="",
        duration_s=0.1,
        outcome=Outcome.OK if ok else Outcome.FAILED,
    )
    return TagListing(result=result, tags=tags if ok else ())


class _Server(CvmfsServer):
    def __init__(self, listing: TagListing) -> None:
        super().__init__(("cvmfs_server",))
        self.listing = listing
        self.calls = 0

    def tag_list(self, repo: str, *, timeout: float | None = None) -> TagListing:
        del repo, timeout
        self.calls += 1
        return self.listing


class _Lane:
    def __init__(self, upstream: str, revision: int | None, listing: TagListing) -> None:
        self.layout = RepositoryLayout(
            "r", Path("/cvmfs/r"), Path("/var/spool/cvmfs/r"), "", upstream, {}
        )
        self.fake = _Server(listing)
        self.server: CvmfsServer = self.fake
        self._revision = revision

    def revision(self) -> int | None:
        return self._revision

    def command_tag(self, batch_id: int) -> str:
        return f"0123456789ab:{batch_id}"


def test_the_message_names_the_batch_first_and_fits_the_limit() -> None:
    """The batch word comes first, so clipping a long summary never drops it."""
    message = publish_message("cvmfs-syncd quiet: " + "x" * 400, TAG)
    assert message.startswith(f"batch={TAG} cvmfs-syncd quiet: ")
    assert len(message) <= 200
    assert names_batch(message, TAG)
    assert not names_batch(message, "0123456789ab:4")
    assert not names_batch(f"batch={TAG}0 other", TAG)


def test_history_ties_a_revision_to_the_batch() -> None:
    """Only a revision past the base whose description names the batch counts."""
    listing = _listing(
        _tag("generic-b", 12, "batch=ffff00000000:42 another host"),
        _tag("generic-a", 11, f"batch={TAG} cvmfs-syncd quiet: 1 copy"),
        _tag("trunk", 12, "current HEAD"),
    )
    assert revision_of_batch(listing, TAG, 10) == 11
    assert revision_of_batch(listing, TAG, 11) is None
    assert revision_of_batch(_listing(ok=False), TAG, 10) is None


@pytest.mark.parametrize(
    ("base", "revision", "live"),
    [(3, 4, 4), (3, 3, None), (3, 2, None), (None, 4, None), (3, None, None)],
)
def test_without_a_gateway_any_newer_revision_is_ours(
    base: int | None, revision: int | None, live: int | None
) -> None:
    """Our open transaction kept every other writer out: no history is read."""
    lane = _Lane(LOCAL, revision, _listing())
    assert live_revision(lane, 42, base) == live
    assert lane.fake.calls == 0


def test_behind_a_gateway_another_publishers_revision_is_not_ours() -> None:
    """The revision moved past the base, but only by another publisher's commit."""
    other = _tag("generic-x", 8, "batch=ffff00000000:7 cvmfs-syncd quiet: 2 copy")
    lane = _Lane(GATEWAY, 8, _listing(other))
    assert live_revision(lane, 42, 7) is None
    ours = _tag("generic-y", 9, f"batch={TAG} cvmfs-syncd quiet: 1 copy")
    lane = _Lane(GATEWAY, 10, _listing(other, ours))
    assert live_revision(lane, 42, 7) == 9


def test_behind_a_gateway_an_unreadable_history_proves_nothing() -> None:
    """A failed ``tag -lx`` is not taken as proof either way."""
    lane = _Lane(GATEWAY, 9, _listing(ok=False))
    assert live_revision(lane, 42, 7) is None
