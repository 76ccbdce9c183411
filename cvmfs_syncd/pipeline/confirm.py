"""Whether a batch went live: never mistaking another publisher's revision for ours.

Every publish carries the batch's tag (the one in its commands' environment,
``<daemon id>:<batch id>``) in its message, which becomes the description of the revision's
automatic tag.  A revision past the batch's base revision is proof enough on a repository only
this host publishes to: our open transaction kept every other writer out.  Behind a repository
gateway it is not: every other publisher's commit moves the revision too (gateway.md 9 and 10).
There the batch counts as live only when the repository's history (``tag -lx``, which works on
a publisher) holds a revision past the base whose description names the batch.
"""

from __future__ import annotations

from typing import Protocol

from cvmfs_syncd.cvmfs.arguments import MESSAGE_MAX
from cvmfs_syncd.cvmfs.repo import RepositoryLayout
from cvmfs_syncd.cvmfs.server import CvmfsServer
from cvmfs_syncd.cvmfs.tags import TagListing

BATCH_WORD = "batch="
"""How a publish message names its batch: ``batch=<command tag>``."""


def publish_message(summary: str, command_tag: str) -> str:
    """The publish message of a batch: its tag first (so that clipping never loses it), then
    its summary, within the tool's message limit."""
    message = f"{BATCH_WORD}{command_tag} {summary}"
    return message[:MESSAGE_MAX].rstrip()


def names_batch(description: str, command_tag: str) -> bool:
    """Whether a tag description (a publish message) names the batch ``command_tag``."""
    return f"{BATCH_WORD}{command_tag}" in description.split()


def revision_of_batch(listing: TagListing, command_tag: str, base_revision: int) -> int | None:
    """The newest revision past ``base_revision`` whose tag names the batch, if any."""
    found = [
        tag.revision
        for tag in listing.tags
        if tag.revision > base_revision and names_batch(tag.description, command_tag)
    ]
    return max(found) if found else None


class Confirming(Protocol):
    """What the confirmation reads from a lane."""

    server: CvmfsServer
    layout: RepositoryLayout

    def revision(self) -> int | None:
        """The repository's published revision (None if unreadable)."""

    def command_tag(self, batch_id: int) -> str:
        """The tag of the batch's commands."""


def live_revision(lane: Confirming, batch_id: int, base_revision: int | None) -> int | None:
    """The revision that made batch ``batch_id`` live, or None when it cannot be shown live.

    ``base_revision`` is the revision the batch's transaction was opened on.  Without a
    gateway, any revision past it is ours.  Behind a gateway, only one the history ties to the
    batch; a history that cannot be read proves nothing (None).
    """
    revision = lane.revision()
    if base_revision is None or revision is None or revision <= base_revision:
        return None
    if lane.layout.gateway_url is None:
        return revision
    repo = lane.layout.name
    return revision_of_batch(lane.server.tag_list(repo), lane.command_tag(batch_id), base_revision)
