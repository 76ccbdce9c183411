"""Observing one pending entry of a staging directory, as far as its decision needs.

The decision itself is pure (:func:`cvmfs_syncd.pipeline.plan.plan_staged`); this module
gathers what it needs, in the decision's order and stopping where the decision is made:
the name, the ready marker, the staged entry with its index and set-aside records, then
for a changed file the settle time and the writer check.
:class:`~cvmfs_syncd.sources.staging.StagingInput` observes each pending entry here when
it plans.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from cvmfs_syncd import fsops
from cvmfs_syncd.batching import Pending
from cvmfs_syncd.errors import UnsafeName
from cvmfs_syncd.model import EntryType, Fingerprint
from cvmfs_syncd.pipeline.plan import (
    Fate,
    StagedObservation,
    StagingPolicy,
    replaces,
    staged_content_verdict,
    staged_name_verdict,
)
from cvmfs_syncd.sources.drops import Drops, ingested_from
from cvmfs_syncd.sources.staged import Lookup

if TYPE_CHECKING:
    from cvmfs_syncd.sources.staging import StagingInput


def observe(
    source: StagingInput,
    entry: Pending,
    policy: StagingPolicy,
    now: float,
    markers: dict[str, bool],
    lookup: Lookup,
    drops: Drops | None,
) -> StagedObservation:
    """Look at one pending entry as far as the decision about it needs.

    In the decision's order, stopping where it is made: the name, the ready marker
    (``markers`` caches it per top-level directory), the staged entry with its index
    and set-aside records, then for a changed file the settle time and, once settled,
    the writer check; for a deletion or a replacement (:func:`replaces`), what is below.
    """
    rel = entry.rel_path
    obs = StagedObservation(entry, reported=source.reported.get(rel, ""))
    if drops is not None:
        obs = replace(obs, drop=drops.is_drop(rel), refused_drop=drops.refused.get(rel))
    try:
        obs = replace(obs, repo_path=source.mapped(rel, drops))
    except UnsafeName as exc:
        obs = replace(obs, unmappable=str(exc))
    if staged_name_verdict(obs, policy) is not None:
        return obs
    marker = policy.ready_marker
    top, _, inner = rel.partition("/")
    if marker and (inner or (source.root / top).is_dir()):
        if top not in markers:
            markers[top] = (source.root / top / marker).exists()
        obs = replace(obs, marker=markers[top])
        if not markers[top]:
            return obs
    found = source.stat(rel)
    live = lookup.live.get(obs.repo_path)
    obs = replace(
        obs,
        found=found if isinstance(found, Fingerprint) else None,
        skipped=found.reason if isinstance(found, fsops.Skipped) else "",
        live=live.fingerprint if live is not None else None,
        live_source=live.source if live is not None else "",
        live_elsewhere=live is not None
        and live.source_path != rel
        and (obs.drop or ingested_from(source.config.target, obs.repo_path, live.source_path)),
    )
    if isinstance(found, Fingerprint):
        aside = lookup.aside.get(rel)
        if aside is not None:
            obs = replace(obs, set_aside=True, aside=aside[1])
    fate = staged_content_verdict(obs, policy).fate
    if fate is Fate.DELETE or (fate is Fate.CHANGED and replaces(obs)):
        below = source.state.published_under(source.repo, obs.repo_path, source.name)
        obs = replace(obs, live_below=tuple(e.path for e in below))
    if fate is not Fate.CHANGED or obs.found is None or obs.found.type is not EntryType.FILE:
        return obs
    settle_at = source.settler.observe(entry.key, obs.found, now, policy.settle_seconds)
    if settle_at:
        return replace(obs, settle_at=settle_at)
    return replace(obs, writers=fsops.has_writers(source.root, rel, obs.found))
