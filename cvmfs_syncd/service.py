"""The daemon's lifecycle: build lanes and sources from the config, run, reload, stop.

Signal handlers only record what arrived; the main loop acts on it, checks health, and
pings systemd's watchdog only while every lane and watcher is healthy.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import structlog

from cvmfs_syncd import config as config_mod
from cvmfs_syncd.config import Config, RepositoryConfig
from cvmfs_syncd.cvmfs.repo import RepositoryLayout, load_layout
from cvmfs_syncd.cvmfs.server import CvmfsServer
from cvmfs_syncd.cvmfs.storage import unreadable_objects
from cvmfs_syncd.errors import ConfigError, RepositoryConfigError
from cvmfs_syncd.lane import Lane
from cvmfs_syncd.metrics import Metrics, MetricsServer
from cvmfs_syncd.pipeline.plan import COPY_ONLY, ContentPolicy
from cvmfs_syncd.pipeline.prepare import Preparer
from cvmfs_syncd.planner import Input
from cvmfs_syncd.sources.staging import StagingInput
from cvmfs_syncd.state import State
from cvmfs_syncd.systemd import Notifier

if TYPE_CHECKING:  # imported where used: `cvmfs-syncd sync` needs neither
    from cvmfs_syncd.maintenance import RepositoryMaintenance
    from cvmfs_syncd.scheduler import MaintenanceScheduler

log = structlog.get_logger(__name__)

_TICK_SECONDS = 1.0


def make_server(config: Config) -> CvmfsServer:
    """Return the cvmfs adapter configured by ``[cvmfs]``, run from the state directory."""
    return CvmfsServer(
        config.cvmfs.server_command,
        config.cvmfs.swissknife_command,
        default_timeout=config.cvmfs.command_timeout_seconds,
        cwd=os.fspath(config.daemon.state_dir),
    )


def build_inputs(
    repo: RepositoryConfig,
    state: State,
    metrics: Metrics,
    content: ContentPolicy = COPY_ONLY,
) -> list[Input]:
    """Return the input sources of one repository."""
    inputs: list[Input] = [
        StagingInput(
            repo.name,
            staging,
            state,
            metrics,
            content=content,
            max_batch_seconds=repo.max_batch_seconds,
        )
        for staging in repo.staging
    ]
    if repo.s3:
        from cvmfs_syncd.sources.s3 import S3Input

        for s3 in repo.s3:
            inputs.append(S3Input(repo.name, s3, state, metrics, content=content))
    return inputs


def build_lane(
    config: Config,
    repo: RepositoryConfig,
    state: State,
    metrics: Metrics,
    server: CvmfsServer,
    clock: Callable[[], float] = time.time,
) -> Lane:
    """Return a (not started) lane for ``repo``; raise RepositoryConfigError."""
    layout = load_layout(config.cvmfs.config_dir, repo.name)
    preparer = Preparer(layout, state=state, workers=config.daemon.prepare_workers)
    if preparer.problem:
        log.warning(
            "file content goes through the transaction as copies",
            repository=repo.name,
            why=preparer.problem,
        )
    content = ContentPolicy(writable=not preparer.problem, small_limit=preparer.small_limit)
    _report_unreadable_objects(layout, metrics)
    inputs = build_inputs(repo, state, metrics, content)
    metrics.init_repository(repo.name, [i.name for i in inputs])
    return Lane(
        config,
        repo,
        layout=layout,
        server=server,
        state=state,
        metrics=metrics,
        inputs=inputs,
        preparer=preparer,
        clock=clock,
    )


def _report_unreadable_objects(layout: RepositoryLayout, metrics: Metrics) -> None:
    """Sample a local storage for objects clients cannot read (never chmods them)."""
    root = layout.local_storage
    if root is None:
        return
    seen, bad = unreadable_objects(root)
    metrics.unreadable_objects.labels(layout.name).set(len(bad))
    if bad:
        log.error(
            "objects in the repository's storage are not world-readable; clients get HTTP "
            "403 for them (written under a restrictive umask?). Fix with chmod o+r",
            repository=layout.name,
            unreadable=len(bad),
            sampled=seen,
            examples=bad[:5],
        )


def build_repository(
    config: Config,
    repo: RepositoryConfig,
    state: State,
    metrics: Metrics,
    server: CvmfsServer,
    scheduler: MaintenanceScheduler,
) -> tuple[Lane, RepositoryMaintenance]:
    """Return the (not started) lane of ``repo`` and its scheduled maintenance, tied
    together; raise RepositoryConfigError."""
    from cvmfs_syncd.maintenance import RepositoryMaintenance

    lane = build_lane(config, repo, state, metrics, server)
    maint = RepositoryMaintenance(
        config,
        repo,
        layout=lane.layout,
        server=server,
        metrics=metrics,
        state=state,
        lane=lane,
        scheduling=scheduler,
    )
    lane.on_start = maint.startup
    lane.on_whitelist_expired = maint.request_resign
    scheduler.add(maint)
    return lane, maint


class Service:
    """The running daemon."""

    def __init__(self, config: Config, *, notifier: Notifier | None = None) -> None:
        from cvmfs_syncd.scheduler import MaintenanceScheduler

        self.config = config
        self.notifier = notifier or Notifier.from_environment()
        self.state = State(config.daemon.state_dir)
        self.metrics = Metrics()
        self.server = make_server(config)
        self.lanes: dict[str, Lane] = {}
        self.broken: dict[str, str] = {}
        self.maintenance: dict[str, RepositoryMaintenance] = {}
        # Resign and check run in its workers (they must not wait for a lane): room for
        # both in every repository at once, plus the jobs that only queue gc in a lane.
        self.scheduler = MaintenanceScheduler(workers=2 * len(config.repositories) + 2)
        self.http: MetricsServer | None = None
        self._signals: list[int] = []
        self._wake = threading.Event()
        self._stopping = False
        self._unhealthy_reason = ""
        self._retiring: dict[str, Lane] = {}
        self.exit_code = 0

    # -- signals -------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        """Record SIGTERM, SIGINT and SIGHUP; the main loop acts on them."""
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._record_signal)

    def _record_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._signals.append(signum)
        self._wake.set()

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Start every lane, then the HTTP endpoint (so /status answers for every lane from
        its first answer on), then tell systemd READY."""
        self.scheduler.start()
        for repo in self.config.repositories:
            self._start_lane(repo)
        address = config_mod.parse_address(self.config.daemon.metrics_address)
        if address is not None:
            self.http = MetricsServer(
                address[0], address[1], self.metrics, self.status, self.health
            )
            self.http.start()
            log.info("metrics endpoint listening", address=f"{address[0]}:{self.http.address[1]}")
        self.notifier.ready(self._status_line())
        log.info("cvmfs-syncd ready", repositories=[r.name for r in self.config.repositories])

    def _start_lane(self, repo: RepositoryConfig) -> None:
        try:
            lane, maint = build_repository(
                self.config, repo, self.state, self.metrics, self.server, self.scheduler
            )
        except RepositoryConfigError as exc:
            self.broken[repo.name] = str(exc)
            log.error("repository cannot be served", repository=repo.name, error=str(exc))
            return
        self.broken.pop(repo.name, None)
        self.lanes[repo.name] = lane
        self.maintenance[repo.name] = maint
        lane.start()

    def run(self) -> int:
        """Run until SIGTERM/SIGINT; return the process exit code."""
        self.start()
        # Ping at least twice per watchdog interval (systemd's WatchdogSec).
        tick = min(_TICK_SECONDS, self.notifier.watchdog_interval() or _TICK_SECONDS)
        try:
            while True:
                self._wake.wait(tick)
                self._wake.clear()
                while self._signals:
                    signum = self._signals.pop(0)
                    if signum == signal.SIGHUP:
                        self.reload()
                    else:
                        log.info("stop requested", signal=signal.Signals(signum).name)
                        return self.stop()
                self.tick()
        finally:
            if self.http is not None:
                self.http.stop()

    def _replace_retired_lanes(self) -> None:
        """Start the lanes whose predecessors (stopped by a reload) have exited."""
        for name, lane in list(self._retiring.items()):
            if lane.is_alive():
                continue
            del self._retiring[name]
            log.info("repository lane stopped by reload", repository=name)
            wanted = {r.name: r for r in self.config.repositories}.get(name)
            if wanted is not None and name not in self.lanes:
                self._start_lane(wanted)
                log.info("repository lane started by reload", repository=name)

    def tick(self) -> None:
        """Health check; ping the watchdog only when healthy; refresh STATUS."""
        self._replace_retired_lanes()
        healthy, why = self.health()
        if healthy:
            self.notifier.watchdog()
        if why != self._unhealthy_reason:
            if why:
                log.error("unhealthy; watchdog pings stop", reason=why)
            else:
                log.info("healthy again; watchdog pings resume")
            self._unhealthy_reason = why
        self.notifier.status(self._status_line())

    def stop(self) -> int:
        """Stop taking changes, let in-flight publishes finish, stop; return the exit code."""
        self._stopping = True
        self.notifier.stopping()
        self.scheduler.pause()
        lanes = list(self.lanes.values()) + list(self._retiring.values())
        for lane in lanes:
            lane.request_stop()
        deadline = time.monotonic() + self.config.daemon.stop_timeout_seconds
        for lane in lanes:
            lane.join(timeout=max(0.1, deadline - time.monotonic()))
        idle = self.scheduler.wait_idle(max(0.1, deadline - time.monotonic()))
        if not idle:
            # A long check -i, most likely; the process exits when it ends.
            log.error("a maintenance task is still running after the stop timeout")
        self.scheduler.shutdown(wait=idle)
        code = 0
        for name, lane in [*self.lanes.items(), *self._retiring.items()]:
            if lane.is_alive():
                log.error("lane did not stop in time", repository=name)
                code = 1
            elif lane.exit_error:
                log.error("lane stopped with an error", repository=name, error=lane.exit_error)
                code = 1
        self.state.close()
        log.info("cvmfs-syncd stopped", exit_code=code)
        self.exit_code = code
        return code

    def reload(self) -> None:
        """Load and validate the config file again; apply it only if it is valid."""
        self.notifier.reloading()
        path = self.config.source_path
        try:
            new = config_mod.load(path)
        except ConfigError as exc:
            log.error(
                "reload refused: the new configuration is invalid; keeping the old one",
                errors=exc.problems,
            )
            self.notifier.ready(self._status_line())
            return
        if new.daemon != self.config.daemon or new.cvmfs != self.config.cvmfs:
            log.warning("[daemon] and [cvmfs] changes take effect at the next restart")
            new = Config(self.config.daemon, self.config.cvmfs, new.repositories, new.source_path)
        old = {r.name: r for r in self.config.repositories}
        fresh = {r.name: r for r in new.repositories}
        self.config = new
        for name, repo in old.items():
            if fresh.get(name) != repo:
                lane = self.lanes.pop(name, None)
                if lane is not None:
                    # Never join here: the main loop must keep pinging the watchdog while
                    # the lane finishes an in-flight publish. tick() starts the replacement
                    # once the old lane has exited, so two lanes never share a repository.
                    lane.request_stop()
                    self._retiring[name] = lane
                self.scheduler.remove(name)
                self.maintenance.pop(name, None)
                self.broken.pop(name, None)
                log.info("repository lane stopping for reload", repository=name)
        for name, repo in fresh.items():
            if old.get(name) != repo and name not in self._retiring:
                self._start_lane(repo)
                log.info("repository lane started by reload", repository=name)
        self._replace_retired_lanes()
        self.notifier.ready(self._status_line())
        log.info("configuration reloaded", repositories=sorted(fresh))

    # -- health and status ---------------------------------------------------------------

    def health(self) -> tuple[bool, str]:
        """Return (healthy, why not): lanes alive and making progress, watchers alive."""
        now = time.time()
        if not self.scheduler.running and not self._stopping:
            return False, "the maintenance scheduler is not running"
        for name, lane in self.lanes.items():
            if not lane.is_alive() and not self._stopping:
                return False, f"lane {name} is not running"
            status = lane.status()
            stalled = now - status.progress_at > self.config.daemon.stall_seconds
            if stalled and not lane.job_running:
                return False, f"lane {name} made no progress for {now - status.progress_at:.0f}s"
            for source in lane.inputs:
                if not source.alive():
                    return False, f"the watcher thread of {source.name} died"
        return True, ""

    def degraded(self) -> list[str]:
        """Return what is degraded (sources down, repositories that cannot be served)."""
        items = [f"{name}: {why}" for name, why in self.broken.items()]
        for lane in self.lanes.values():
            for source in lane.inputs:
                up, why = source.health()
                if not up:
                    items.append(f"{source.name}: {why}")
            held = lane.status().held
            if held:
                items.append(f"{lane.repo.name}: held: {held}")
        for maint in list(self.maintenance.values()):
            items += maint.problems()
        return items

    def _status_line(self) -> str:
        pending = sum(lane.status().pending for lane in self.lanes.values())
        last = [
            s.last_publish_at
            for s in (lane.status() for lane in self.lanes.values())
            if s.last_publish_at
        ]
        parts = [f"{len(self.lanes)} repositories", f"{pending} changes pending"]
        if last:
            parts.append("last publish " + time.strftime("%H:%M:%S", time.localtime(max(last))))
        degraded = self.degraded()
        if degraded:
            parts.append("degraded: " + "; ".join(degraded)[:200])
        return ", ".join(parts)

    def status(self, query: dict[str, str]) -> tuple[int, dict[str, Any]]:
        """Answer /status: lanes, and with ``path=`` whether that staged file is live."""
        body: dict[str, Any] = {
            "repositories": {name: _lane_json(lane) for name, lane in self.lanes.items()},
            "broken": dict(self.broken),
            "degraded": self.degraded(),
            "maintenance": {name: m.status() for name, m in list(self.maintenance.items())},
        }
        path = query.get("path")
        if path:
            answer = path_status(self.config, self.state, self.metrics, Path(path))
            body["path"] = answer
            return (200 if answer.get("live") else 404 if answer.get("unknown") else 202), body
        return 200, body


def _lane_json(lane: Lane) -> dict[str, Any]:
    data = asdict(lane.status())
    data["sources"] = {s.name: {"up": s.health()[0], "detail": s.health()[1]} for s in lane.inputs}
    data["set_aside"] = [
        {"source": s, "path": p, "reason": r}
        for s, p, r in lane.state.set_aside_list(lane.repo.name)
    ][:100]
    return data


def path_status(config: Config, state: State, metrics: Metrics, path: Path) -> dict[str, Any]:
    """Return whether the staged file at ``path`` is live with its current content."""
    for repo in config.repositories:
        for staging in repo.staging:
            source = StagingInput(repo.name, staging, state, metrics)
            answer = source.path_status(path)
            if answer is not None:
                return dict(answer)
    return {"live": False, "unknown": True, "reason": f"{path} is in no staging directory"}
