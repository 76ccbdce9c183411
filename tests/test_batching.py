"""Tests of the pure batching policy with an injected clock."""

from __future__ import annotations

from cvmfs_syncd.batching import BatchPolicy, PendingChanges, Settler
from cvmfs_syncd.model import Dirty, EntryType, Fingerprint

POLICY = BatchPolicy(
    quiet_seconds=5, max_batch_seconds=60, max_batch_files=100, max_batch_bytes=10**9
)


def _dirty(path: str, at: float, **kw: bool) -> Dirty:
    return Dirty("s", path, at, **kw)


def test_quiet_period_cuts_a_batch() -> None:
    """A batch is due once no change arrived for the quiet period."""
    pending = PendingChanges(POLICY)
    pending.add(_dirty("a", 100.0))
    assert pending.due(104.9) is None
    assert pending.next_deadline(101.0) == 105.0
    assert pending.due(105.0) == "quiet"


def test_constant_churn_cannot_starve_publishing() -> None:
    """Changes every second still produce a batch when the oldest is max_batch_seconds old."""
    pending = PendingChanges(POLICY)
    t = 0.0
    reason = None
    while reason is None and t < 1000:
        pending.add(_dirty(f"f{int(t)}", t))
        t += 1.0
        reason = pending.due(t)
    assert reason == "max-age"
    assert 59 <= t <= 61


def _drops_end_in_tar(source: str, path: str) -> bool:
    return source == "s" and path.endswith(".tar")


def test_complete_drops_alone_are_cut_at_once() -> None:
    """Only tarball drops pending, none still being written: due at once ("drop"), and the
    next deadline is now; a drop a watcher saw being written waits for its close."""
    pending = PendingChanges(POLICY, is_drop=_drops_end_in_tar)
    pending.add(_dirty("", 100.0))  # the source's top directory changes with every drop
    assert pending.due(100.0) is None
    pending.add(_dirty("a.tar", 100.0, closed=True))
    pending.add(_dirty("b.tar", 100.5, from_scan=True))
    assert pending.due(100.6) == "drop"
    assert pending.next_deadline(100.6) == 100.6
    pending.add(_dirty("c.tar", 101.0))  # modified, not closed yet
    assert pending.due(101.1) is None
    assert pending.next_deadline(101.1) == 106.0
    pending.add(_dirty("c.tar", 101.2, closed=True))
    assert pending.due(101.3) == "drop"


def test_a_drop_beside_other_changes_waits_for_the_quiet_period() -> None:
    """A plain change pending beside a drop keeps the quiet period; so does a drop of a
    source that has none (no ``is_drop``), and a deferred drop is not due before its time."""
    pending = PendingChanges(POLICY, is_drop=_drops_end_in_tar)
    pending.add(_dirty("a.tar", 100.0, closed=True))
    pending.add(_dirty("notes.txt", 100.0, closed=True))
    assert pending.due(104.9) is None
    assert pending.due(105.0) == "quiet"
    plain = PendingChanges(POLICY)
    plain.add(_dirty("a.tar", 100.0, closed=True))
    assert plain.due(104.9) is None
    deferred = PendingChanges(POLICY, is_drop=_drops_end_in_tar)
    entry = deferred.add(_dirty("a.tar", 100.0, closed=True))
    deferred.take()
    deferred.put_back(entry.deferred_until(102.0))
    assert deferred.due(101.0) is None
    assert deferred.next_deadline(101.0) == 102.0
    assert deferred.due(102.0) == "drop"


def test_file_cap_cuts_a_batch() -> None:
    """Reaching max_batch_files makes a batch due at once."""
    pending = PendingChanges(BatchPolicy(5, 60, 3, 10**9))
    for i in range(3):
        pending.add(_dirty(f"f{i}", 0.0))
    assert pending.due(0.0) == "max-files"


def test_held_and_deferred_entries_do_not_trigger() -> None:
    """Entries waiting for a marker or for settling do not make a batch due."""
    from dataclasses import replace

    pending = PendingChanges(POLICY)
    entry = pending.add(_dirty("a", 0.0))
    pending.take()
    pending.put_back(replace(entry, held=True))
    assert pending.due(1000.0) is None
    assert pending.next_deadline(1000.0) is None
    pending.take()
    pending.put_back(replace(entry, not_before=2000.0))
    assert pending.due(1000.0) is None
    assert pending.next_deadline(1000.0) == 2000.0


def test_new_event_releases_a_hold() -> None:
    """A watcher event on a held path (e.g. the marker arrived) makes it active again."""
    from dataclasses import replace

    pending = PendingChanges(POLICY)
    entry = pending.add(_dirty("a", 0.0))
    pending.take()
    pending.put_back(replace(entry, held=True))
    pending.add(_dirty("a", 10.0, closed=True))
    assert pending.due(15.0) == "quiet"


def test_close_after_write_clears_writing() -> None:
    """A modify marks a file as being written; a close-after-write clears it."""
    pending = PendingChanges(POLICY)
    assert pending.add(_dirty("a", 0.0)).writing
    assert not pending.add(_dirty("a", 1.0, closed=True)).writing
    assert not pending.add(_dirty("a", 2.0, from_scan=True)).writing


def _fp(mtime: float, size: int = 1, inode: int = 1) -> Fingerprint:
    return Fingerprint(EntryType.FILE, 0o644, size, int(mtime * 1e9), inode)


def test_settler_waits_for_a_stable_fingerprint() -> None:
    """A recently modified file settles only after settle_seconds without change."""
    settler = Settler()
    key = ("s", "a")
    assert settler.observe(key, _fp(100.0), 100.0, 2.0) == 102.0
    assert settler.observe(key, _fp(101.0, size=2), 101.0, 2.0) == 103.0
    assert settler.observe(key, _fp(101.0, size=2), 103.0, 2.0) == 0.0


def test_settler_takes_an_old_file_at_once() -> None:
    """A file moved in with an old modification time is settled on first sight."""
    settler = Settler()
    assert settler.observe(("s", "a"), _fp(10.0), 100.0, 2.0) == 0.0
