"""One lease per batch: what a gateway publisher may place in one path-scoped transaction.

Behind a repository gateway every transaction is a lease on a path (``transaction R/path``),
and whatever the publisher writes outside that path is silently dropped at publish while
publish still succeeds (gateway.md 3).  So a batch is cut to the ops under one source
target, the lease is taken on that target, and nothing outside it is ever placed.  A target
that does not exist yet cannot be leased (exit 2, gateway.md 1): the lease then goes to the
nearest existing parent, which :func:`parent_scope` derives from the tool's message.  Pure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from cvmfs_syncd.model import Op


def under(path: str, scope: str) -> bool:
    """Whether repository path ``path`` lies in the lease on ``scope`` (``""``: all of it)."""
    return not scope or path == scope or path.startswith(scope + "/")


def cut_to_scope(ops: Sequence[Op], targets: Mapping[str, str]) -> tuple[str, list[Op], list[Op]]:
    """Return the lease path of the next batch, its ops, and the ops left for later.

    ``targets`` maps a source name to its target (a repository path, ``""`` for the root).
    The lease is the target of the first op's source; every op under it goes in (also of
    another source whose target lies inside it), every other op waits for a later batch.
    """
    if not ops:
        return "", [], []
    scope = targets.get(ops[0].source, "")
    taken = [op for op in ops if under(op.repo_path, scope)]
    later = [op for op in ops if not under(op.repo_path, scope)]
    return scope, taken, later


def parent_scope(missing: str) -> str:
    """The lease path to use when the tool says ``missing`` (its first missing component)
    does not exist: the parent of that component, which does."""
    return missing.rpartition("/")[0]
