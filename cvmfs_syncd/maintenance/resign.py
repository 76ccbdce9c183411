"""Re-signing a repository's whitelist before it expires.

A resign is due when the whitelist's own expiry line (read from the repository's
storage) comes within ``resign_before_expiry`` (:func:`~.policy.resign_due`). It never
goes through the lane, so a stuck or slow publish cannot starve it: it has its own
per-repository lock (``locks/<repo>.resign.lock``). It works during an open transaction
(h_resign 60), and a lane that meets an expired whitelist asks for it at once
(:meth:`Resign.request`). Without the master key on this host nothing can be signed:
that is reported, not attempted.
"""

from __future__ import annotations

import threading
from typing import Any

import structlog

from cvmfs_syncd.cvmfs.outcomes import Outcome
from cvmfs_syncd.errors import RepositoryConfigError
from cvmfs_syncd.maintenance.policy import ResignMode, iso, resign_due, resign_wanted
from cvmfs_syncd.maintenance.runs import TaskContext, TaskResult, Verdict, command_failed

log = structlog.get_logger(__name__)


class Resign:
    """The whitelist of one repository as last read, and signing it."""

    def __init__(self, ctx: TaskContext) -> None:
        self.ctx = ctx
        self.name = ctx.name
        self.runs = ctx.runs
        self.master_key = ctx.config.cvmfs.config_dir / "keys" / f"{ctx.name}.masterkey"
        self._lock = threading.Lock()
        self._expires_at: float | None = None
        self._created_at: float | None = None
        self._error = ""
        self._known = False
        self._key_present = False  # until read
        present = self.master_key.is_file()
        self.runs.set_enabled("resign", present)
        self.runs.metrics.master_key_present.labels(self.name).set(int(present))

    # -- the whitelist ---------------------------------------------------------------------

    def read(self) -> None:
        """Re-read the whitelist and look for the master key; set the metrics."""
        self._key_present = self.master_key.is_file()
        metrics = self.runs.metrics
        metrics.master_key_present.labels(self.name).set(int(self._key_present))
        try:
            whitelist = self.ctx.layout.whitelist()
        except RepositoryConfigError as exc:
            with self._lock:
                self._error = str(exc)
            log.warning("cannot read the whitelist", repository=self.name, error=str(exc))
        else:
            with self._lock:
                self._error = ""
                self._known = True
                self._expires_at = whitelist.expires_at
                self._created_at = whitelist.created_at
            # 0 says "unusable": an unreadable expiry line is as bad as an expired one.
            metrics.whitelist_expiry.labels(self.name).set(whitelist.expires_at or 0)
            if whitelist.created_at:
                self.runs.seen_success("resign", whitelist.created_at)
        self.runs.set_enabled("resign", self.master_key.is_file())

    @property
    def expires_at(self) -> float | None:
        """The whitelist's expiry as last read (None: unknown or unreadable)."""
        with self._lock:
            return self._expires_at

    def due(self, lead: float | None = None) -> bool:
        """Return whether the whitelist as last read must be re-signed now."""
        with self._lock:
            if self._error or not self._known:
                return False
            expires = self._expires_at
        if lead is None:
            lead = self.ctx.settings.resign_before_expiry_seconds
        return resign_due(expires, self.runs.clock(), lead)

    def expired(self) -> bool:
        """Return whether the whitelist as last read has expired."""
        return self.due(lead=0.0)

    # -- runs ------------------------------------------------------------------------------

    def check(self) -> TaskResult | None:
        """Re-sign when due (after :meth:`read`); return the run, or None.

        An unreadable whitelist (storage down) is a failed run, retried.
        """
        with self._lock:
            error = self._error
        if error:
            return self.runs.run("resign", lambda: self._unreadable(error), retry=self._retry)
        if not self.due():
            return None
        return self._run("due", ResignMode.DUE)

    def force(self, reason: str) -> TaskResult | None:
        """Re-sign the whitelist now, whatever its expiry."""
        return self._run(reason, ResignMode.FORCE)

    def request(self) -> None:
        """Re-sign at once because a command met an expired whitelist.

        Runs in a scheduler thread when there is one (the lane goes on with its back-off),
        else in the caller's. A resign that happened since the request is not repeated.
        """
        with self._lock:
            seen = self._created_at
        log.warning("whitelist expired: re-signing now", repository=self.name)
        self.runs.run_soon(
            "resign-now",
            lambda: self._run("whitelist expired", ResignMode.REQUESTED, seen),
            0.0,
        )

    def _run(self, reason: str, mode: ResignMode, seen: float | None = None) -> TaskResult | None:
        return self.runs.run("resign", lambda: self._sign(reason, mode, seen), retry=self._retry)

    def _retry(self) -> None:
        self.read()
        with self._lock:
            error = self._error
        if error:
            self.runs.run("resign", lambda: self._unreadable(error), retry=self._retry)
        elif self._run("retry", ResignMode.DUE) is None:
            # No longer due (someone signed meanwhile): the failure is over.
            self.runs.clear_failure("resign")

    def _unreadable(self, error: str) -> TaskResult:
        return TaskResult(
            "resign",
            Verdict.NOT_RUN_RETRY,
            f"cannot read the whitelist to see when it expires: {error}",
            "whitelist_unreadable",
        )

    def _sign(self, reason: str, mode: ResignMode, seen: float | None) -> TaskResult | None:
        lock = self.ctx.lock("resign")
        if not lock.acquire(timeout=self.ctx.timeout):
            return TaskResult(
                "resign", Verdict.NOT_RUN_RETRY, f"another resign holds {lock.path}", "locked"
            )
        try:
            # Decide again under the lock: another thread or process may have just signed.
            self.read()
            with self._lock:
                changed = self._created_at != seen
            if not resign_wanted(mode, due=self.due(), expired=self.expired(), changed=changed):
                if mode is ResignMode.REQUESTED:
                    log.info(
                        "whitelist re-signed meanwhile; not signing again", repository=self.name
                    )
                return None
            if not self._key_present:
                return TaskResult(
                    "resign",
                    Verdict.NOT_RUN,
                    f"the master key {self.master_key} is not on this host: the whitelist "
                    "cannot be re-signed here; run cvmfs_server resign where the key is kept",
                    "master_key_missing",
                )
            days = self.ctx.settings.resign_days
            log.info(
                "re-signing the whitelist",
                repository=self.name,
                reason=reason,
                expires_at=iso(self.expires_at),
                days=days,
            )
            result = self.ctx.server.resign(self.name, days=days, timeout=self.ctx.timeout)
            self.read()
            if result.ok:
                return TaskResult(
                    "resign",
                    Verdict.DONE,
                    f"whitelist re-signed, valid until {iso(self.expires_at)}",
                    result.outcome.value,
                )
            return command_failed(
                "resign", result, retry=result.outcome is not Outcome.NO_SUCH_REPOSITORY
            )
        finally:
            lock.release()

    # -- status ----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Return the whitelist and the master key for /status (JSON-ready)."""
        now = self.runs.clock()
        lead = self.ctx.settings.resign_before_expiry_seconds
        with self._lock:
            expires = self._expires_at
            return {
                "whitelist": {
                    "expires_at": expires,
                    "expires_in_seconds": None if expires is None else round(expires - now),
                    "resign_due_at": None if expires is None else expires - lead,
                    "error": self._error,
                },
                "master_key_present": self._key_present,
            }

    def problems(self) -> list[str]:
        """Return what about the whitelist needs an operator."""
        now = self.runs.clock()
        with self._lock:
            expires, error, known = self._expires_at, self._error, self._known
        if error:
            return [f"{self.name}: whitelist unreadable: {error}"]
        if not known:
            return []
        if expires is None:
            return [f"{self.name}: whitelist expiry unreadable (resign repairs it)"]
        if expires <= now:
            return [f"{self.name}: whitelist EXPIRED at {iso(expires)}"]
        lead = self.ctx.settings.resign_before_expiry_seconds
        if not self._key_present and now >= expires - lead:
            return [
                f"{self.name}: whitelist expires {iso(expires)} and the master key is not "
                "on this host"
            ]
        return []
