"""plan: pure decisions about what a batch does with each observed input.

No I/O, no clock: every function takes what it needs (observations, the policy, ``now``)
and returns a decision, so it is tested without files, sleeps or a repository.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from cvmfs_syncd.cvmfs.graft import GRAFT_NAME_MAX
from cvmfs_syncd.model import OpKind


@dataclass(frozen=True, slots=True)
class ContentPolicy:
    """How a file's content reaches the repository.

    ``writable``: this host can write the repository's objects (False on a gateway
    publisher, with unsupported compression, extended attributes, or a zlib that differs
    from CernVM-FS's); ``small_limit``: files below it are one object when ``publish``
    stores them (``CVMFS_MIN_CHUNK_SIZE``; None when chunking is off).
    """

    writable: bool
    small_limit: int | None


#: A source that never writes objects itself (tests, gateway publishers): every file is copied.
COPY_ONLY = ContentPolicy(writable=False, small_limit=None)


def file_op_kind(
    name: str, size: int, policy: ContentPolicy, *, prepare: bool, graft_at: int
) -> OpKind:
    """Return GRAFT (objects written before the transaction) or COPY_FILE for one file.

    Prepared: files below ``small_limit``, whose object is exactly the one ``publish``
    would store (so deduplication holds). Grafted: files of ``graft_at`` bytes and more
    (fixed-size chunks instead of ``publish``'s content-defined ones). Everything else, and
    names too long to leave room for ``.cvmfsgraft-``, is copied into the transaction.
    """
    if not policy.writable or len(os.fsencode(name)) > GRAFT_NAME_MAX:
        return OpKind.COPY_FILE
    if prepare and (policy.small_limit is None or size < policy.small_limit):
        return OpKind.GRAFT
    if graft_at > 0 and size >= graft_at:
        return OpKind.GRAFT
    return OpKind.COPY_FILE


def count_deleted(subtrees: Iterable[Iterable[str]]) -> int:
    """Count the distinct live paths a batch removes, given the live subtree of each delete.

    A deleted directory's entries are deleted (and hinted) one by one as well as the
    directory itself: each live path counts once, however many of its ancestors go too.
    """
    seen: set[str] = set()
    for subtree in subtrees:
        seen.update(subtree)
    return len(seen)
