"""gc's removal of old automatic tags (faults.md F1, F2), with a stub cvmfs_server.

The stub answers ``tag -lx``, ``tag -r`` and ``gc`` the way the real tool does: one
``tag -r`` whose names, joined, pass 131072 bytes fails with "Argument list too long", and
one name that does not exist makes the whole call remove nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from cvmfs_syncd import cli
from cvmfs_syncd.config import Config
from cvmfs_syncd.cvmfs.outcomes import CommandResult, classify, explain
from cvmfs_syncd.cvmfs.repo import load_layout
from cvmfs_syncd.cvmfs.server import CvmfsServer
from cvmfs_syncd.cvmfs.tags import Tag, TagListing
from cvmfs_syncd.maintenance import RepositoryMaintenance, Verdict
from cvmfs_syncd.maintenance.gc import STEP_PAUSE
from cvmfs_syncd.maintenance.policy import (
    MAX_TAG_CALL_BYTES,
    MAX_TAG_CALL_FAILURES,
    MAX_TAGS_PER_CALL,
    TagCleanup,
    missing_tags,
    next_tag_call,
    tag_call_done,
)
from cvmfs_syncd.metrics import Metrics
from cvmfs_syncd.state import State
from tests.fake_cvmfs.stratum0 import FakeStratum0
from tests.test_maintenance import REPO, Deferred, load_config, maintenance_toml, sample

DAY = 86400.0
NOW = 1_800_000_000.0
ARG_MAX = 131072
AUTO_TAGS = "cvmfs_syncd_automatic_tags"

# Of the stratum0 fixture only the server.conf is used (the commands go to the stub).
pytestmark = pytest.mark.stratum0(REPO, gc=True)


def _result(args: tuple[str, ...], code: int, stdout: str = "", stderr: str = "") -> CommandResult:
    outcome = classify(args[0], code, stdout, stderr)
    return CommandResult(
        argv=("cvmfs_server", *args),
        exit_code=code,
        stdout=stdout,
        stderr=stderr,
        duration_s=0.01,
        outcome=outcome,
        reason=explain(outcome, stdout, stderr),
    )


def auto_name(when: float) -> str:
    """The automatic tag name publish gives a revision made at ``when``."""
    return datetime.fromtimestamp(when, UTC).strftime("generic-%Y-%m-%dT%H:%M:%SZ")


class StubServer(CvmfsServer):
    """A repository's tag database and gc, answering like cvmfs_server 2.12."""

    def __init__(self, names: Iterable[str], ghosts: Iterable[str] = ()) -> None:
        super().__init__(("cvmfs_server",))
        self.tags: dict[str, float] = {}
        for name in names:
            stamp = datetime.strptime(name.split("-", 1)[1], "%Y-%m-%dT%H:%M:%SZ")
            self.tags[name] = stamp.replace(tzinfo=UTC).timestamp()
        #: Listed, but ``tag -r`` says they do not exist (removed meanwhile by someone else).
        self.ghosts = set(ghosts)
        self.calls: list[tuple[str, ...]] = []
        self.gc_runs = 0
        self.on_remove: Callable[[], None] = lambda: None
        #: stderr of every ``tag -r`` (exit 1) while set.
        self.broken = ""

    def tag_list(self, repo: str, *, timeout: float | None = None) -> TagListing:
        assert repo == REPO
        del timeout
        self.calls.append(("tag", "-lx"))
        tags = [
            Tag(name, "ab" * 20, 100, rev, datetime.fromtimestamp(when, UTC), "", "")
            for rev, (name, when) in enumerate(sorted(self.tags.items(), key=lambda t: t[1]))
        ]
        tags.append(
            Tag("trunk", "cd" * 20, 100, len(tags), datetime.fromtimestamp(NOW, UTC), "", "")
        )
        return TagListing(_result(("tag", "-lx", repo), 0), tuple(tags))

    def tag_remove(
        self, repo: str, names: Iterable[str], *, timeout: float | None = None
    ) -> CommandResult:
        del timeout
        call = tuple(names)
        self.calls.append(("tag", "-r", *call))
        self.on_remove()
        args = ("tag", *[a for n in call for a in ("-r", n)], "-f", repo)
        if self.broken:
            return _result(args, 1, stderr=self.broken)
        if len(" ".join(call).encode()) > ARG_MAX:
            return _result(
                args,
                1,
                stderr="/usr/bin/cvmfs_server: line 4216: eval: sh: Argument list too long\n",
            )
        absent = [n for n in call if n not in self.tags or n in self.ghosts]
        if absent:
            lines = "".join(f"tag '{n}' does not exist\n" for n in absent)
            return _result(args, 1, stderr=lines + "Did not remove anything\n")
        for name in call:
            del self.tags[name]
        return _result(args, 0)

    def gc(
        self,
        repo: str,
        *,
        keep_revisions: int | None = None,
        keep_since: datetime | None = None,
        dry_run: bool = False,
        timeout: float | None = None,
    ) -> CommandResult:
        del keep_revisions, keep_since, dry_run, timeout
        self.calls.append(("gc",))
        self.gc_runs += 1
        return _result(("gc", "-f", repo), 0, stdout="Running Garbage Collection\n")

    def removals(self) -> list[tuple[str, ...]]:
        """The names of every ``tag -r`` call."""
        return [call[2:] for call in self.calls if call[:2] == ("tag", "-r")]


def old_names(count: int) -> list[str]:
    """``count`` automatic tags, a minute apart, all older than 30 days."""
    start = NOW - 40 * DAY
    return [auto_name(start + 60 * i) for i in range(count)]


@pytest.fixture
def config(tmp_path: Path, stratum0: FakeStratum0, staging: Path) -> Config:
    """gc scheduled, tags older than 7 days removed, at most 60 s of tag removal."""
    keys = maintenance_toml(
        gc_schedule='"0 3 * * 0"', auto_tag_keep='"7d"', tag_cleanup_seconds="60"
    )
    return load_config(tmp_path, stratum0, staging, keys)


Build = Callable[..., RepositoryMaintenance]


@pytest.fixture
def build(config: Config) -> Iterator[Build]:
    """RepositoryMaintenance of REPO with a stub server and a clock the test moves."""
    states: list[State] = []

    def make(
        server: StubServer,
        clock: Callable[[], float] = lambda: NOW,
        lane: Any = None,
        scheduling: Deferred | None = None,
    ) -> RepositoryMaintenance:
        states.append(State(config.daemon.state_dir))
        return RepositoryMaintenance(
            config,
            config.repositories[0],
            layout=load_layout(config.cvmfs.config_dir, REPO),
            server=server,
            metrics=Metrics(),
            state=states[-1],
            lane=lane,
            scheduling=scheduling,
            clock=clock,
        )

    yield make
    for state in states:
        state.close()


# -- the pure decision ----------------------------------------------------------------------


def test_names_of_29_bytes_go_100_per_call() -> None:
    """Automatic tag names (29 bytes) are bounded by the name count, not the bytes."""
    names = old_names(450)
    assert all(len(n) + 1 == 29 for n in names)  # 28 bytes and the space after it
    call = next_tag_call(TagCleanup(), names)
    assert call == tuple(names[:MAX_TAGS_PER_CALL])


def test_long_names_are_bounded_by_64_kib() -> None:
    """Long names fill a call up to 64 KiB joined by spaces, never beyond; one is always taken."""
    names = [f"n{i:04d}-" + "x" * 992 for i in range(100)]
    call = next_tag_call(TagCleanup(), names)
    assert len(" ".join(call).encode()) <= MAX_TAG_CALL_BYTES
    assert len(" ".join(names[: len(call) + 1]).encode()) > MAX_TAG_CALL_BYTES
    assert len(call) == 65
    huge = ["h" + "y" * (MAX_TAG_CALL_BYTES + 10)]
    assert next_tag_call(TagCleanup(), huge) == tuple(huge)


def test_a_missing_name_is_dropped_and_the_call_retried_once_then_halved() -> None:
    """`tag 'X' does not exist`: X is skipped and the same call goes again; a second failure
    halves the call; a single failing name is skipped; a success restores 100 names."""
    names = old_names(300)
    output = f"tag '{names[3]}' does not exist\nDid not remove anything\n"
    assert missing_tags(output) == {names[3]}
    first = next_tag_call(TagCleanup(), names)
    state = tag_call_done(TagCleanup(), first, ok=False, missing=missing_tags(output))
    assert state.skip == {names[3]}
    assert state.retried
    assert state.limit == MAX_TAGS_PER_CALL
    retry = next_tag_call(state, names)
    assert names[3] not in retry
    assert len(retry) == MAX_TAGS_PER_CALL
    state = tag_call_done(state, retry, ok=False, missing={names[7]})
    assert state.limit == 50
    assert names[7] in state.skip
    assert not state.retried
    state = tag_call_done(state, next_tag_call(state, names), ok=False)
    assert state.limit == 25
    state = tag_call_done(state, next_tag_call(state, names), ok=True)
    assert (state.limit, state.failures, state.removed) == (MAX_TAGS_PER_CALL, 0, 25)
    lone = tag_call_done(TagCleanup(limit=1), (names[0],), ok=False)
    assert names[0] in lone.skip
    assert lone.limit == 1


def test_cleanup_stops_after_failures_in_a_row() -> None:
    """A tool that fails every call ends the cleanup after MAX_TAG_CALL_FAILURES calls."""
    names = old_names(1000)
    state = TagCleanup()
    calls = 0
    while not state.stopped:
        state = tag_call_done(state, next_tag_call(state, names), ok=False)
        calls += 1
    assert calls == MAX_TAG_CALL_FAILURES
    assert "failed in a row" in state.stopped


# -- gc with the stub server ----------------------------------------------------------------


def test_ten_thousand_old_tags_are_all_removed_in_small_calls_then_gc_runs(
    build: Build,
) -> None:
    """10 000 old tags (one call of them would exceed the argument limit) all go, 100 per
    call, the tags are listed before every call, recent ones stay, and gc runs."""
    recent = [auto_name(NOW - DAY + i) for i in range(3)]
    server = StubServer(old_names(10_000) + recent)
    assert len(" ".join(old_names(10_000)).encode()) > ARG_MAX
    maint = build(server)
    result = maint.gc_locked()
    assert result is not None
    assert result.ok, result.message
    assert "removed 10000 automatic tags" in result.message
    removals = server.removals()
    assert len(removals) == 100
    assert max(len(call) for call in removals) == MAX_TAGS_PER_CALL
    assert sorted(server.tags) == sorted(recent)
    kinds = [call[1] if call[0] == "tag" else call[0] for call in server.calls]
    assert kinds[:4] == ["-lx", "-r", "-lx", "-r"]
    assert kinds[-1] == "gc"
    assert server.gc_runs == 1
    assert sample(maint.metrics, AUTO_TAGS) == 0


def test_a_tag_that_does_not_exist_is_dropped_and_the_call_retried(build: Build) -> None:
    """One listed tag that `tag -r` says does not exist fails its call; the call is retried
    without it and every other old tag is removed; gc runs; the ghost is reported left."""
    names = old_names(250)
    ghost = names[42]
    server = StubServer(names, ghosts=[ghost])
    maint = build(server)
    result = maint.gc_locked()
    assert result is not None
    assert result.ok, result.message
    removals = server.removals()
    assert ghost in removals[0]
    assert removals[1] == tuple(n for n in names[:101] if n != ghost)
    assert all(ghost not in call for call in removals[1:])
    assert list(server.tags) == [ghost]
    assert server.gc_runs == 1
    assert "1 old automatic tags left" in result.message
    assert sample(maint.metrics, AUTO_TAGS) == 1


def test_time_bound_stops_tag_removal_and_gc_still_runs(build: Build) -> None:
    """tag_cleanup_seconds (60) passes after a few calls: removal stops, gc runs, the run
    succeeds, and the gauge says how many old tags are left."""
    now = [NOW]
    server = StubServer(old_names(2000))

    def slow() -> None:
        now[0] += 25.0  # each call takes 25 s of the injected clock

    server.on_remove = slow
    maint = build(server, clock=lambda: now[0])
    result = maint.gc_locked()
    assert result is not None
    assert result.verdict is Verdict.DONE, result.message
    assert len(server.removals()) == 3  # at 0, 25 and 50 s; at 75 s the bound has passed
    assert server.gc_runs == 1
    assert len(server.tags) == 1700
    assert sample(maint.metrics, AUTO_TAGS) == 1700
    assert "1700 old automatic tags left (tag cleanup stopped after 60s)" in result.message
    assert maint.status()["gc"]["last_outcome"] == "ok"


def test_cli_gc_exits_0_when_gc_succeeded_with_tags_left(
    config: Config, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`cvmfs-syncd gc` exits 0 when cvmfs_server gc succeeded although every tag removal
    failed (the cleanup gives up after a few calls), and prints what is left."""
    now = time.time()
    server = StubServer([auto_name(now - 30 * DAY + i) for i in range(500)])
    server.broken = "failed to init environment\nDid not remove anything\n"
    monkeypatch.setattr("cvmfs_syncd.service.make_server", lambda _config: server)
    code = cli.main(["gc", "--config", config.source_path, REPO])
    out = capsys.readouterr().out
    assert code == cli.EXIT_OK, out
    assert server.gc_runs == 1
    assert len(server.removals()) == MAX_TAG_CALL_FAILURES
    assert len(server.tags) == 500
    assert "500 old automatic tags left" in out
    assert "failed in a row" in out


def test_each_tag_call_is_its_own_lane_job(build: Build) -> None:
    """In the daemon every tag call is a separate lane job, the next queued through the
    scheduler after a pause, so that the lane can publish a batch in between."""

    class Lane:
        def __init__(self) -> None:
            self.jobs: list[tuple[str, Callable[[], Any], Future[Any]]] = []

        def is_alive(self) -> bool:
            return True

        def run_job(self, name: str, fn: Callable[[], Any]) -> Future[Any]:
            future: Future[Any] = Future()
            self.jobs.append((name, fn, future))
            return future

        def run_next(self) -> None:
            _, fn, future = self.jobs.pop(0)
            assert future.set_running_or_notify_cancel()
            future.set_result(fn())

    lane = Lane()
    scheduler = Deferred()
    server = StubServer(old_names(250))
    maint = build(server, lane=lane, scheduling=scheduler)
    maint.submit_gc()
    maint.submit_gc()  # coalesced
    assert len(lane.jobs) == 1
    removals_per_job = []
    for _ in range(10):
        before = len(server.removals())
        lane.run_next()
        removals_per_job.append(len(server.removals()) - before)
        assert lane.jobs == []  # nothing queued behind the job while the lane drains
        if not scheduler.runs:
            break
        task, step, delay = scheduler.runs.pop()
        assert (task, delay) == ("gc", STEP_PAUSE)
        assert maint.status()["gc"]["queued"]
        maint.submit_gc()  # a scheduled gc meanwhile joins the run in progress
        step()
        assert len(lane.jobs) == 1
    assert removals_per_job == [1, 1, 1, 0]
    assert server.gc_runs == 1
    assert server.tags == {}
    status = maint.status()["gc"]
    assert status["last_outcome"] == "ok"
    assert not status["queued"]
    assert not status["running"]
