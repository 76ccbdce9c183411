"""A gateway lease is a time budget: how much one batch may hold.

A lease cannot be renewed, and one that expires makes the publish fail with the transaction
left open (gateway.md 13-14).  So a batch is cut to what its place + publish is expected to
take within half of the lease's length.  The length is learned from the gateway (``expires``
of our lease right after the grant, minus the grant time), with the ``lease_seconds`` key as
the fallback until one was seen.  The expected time is a linear model, seconds per op and per
MiB, with starting rates from the real tool's figures, scaled by how long the batches of this
host actually took (an exponentially weighted ratio of measured to predicted).  Pure.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cvmfs_syncd.model import Op
from cvmfs_syncd.planner import op_weight

MIB = 1024 * 1024
#: Seconds per placed file and per MiB before anything was measured: the real tool's
#: publish of 10 000 small files (0.465 ms each), and a conservative 20 ms per MiB.
DEFAULT_SECONDS_PER_OP = 0.000465
DEFAULT_SECONDS_PER_MIB = 0.02
#: Seconds every place + publish takes whatever its size.
FIXED_SECONDS = 0.5
#: Weight of the newest measurement in the scale.
SMOOTHING = 0.3
#: Share of a lease a batch may fill.
LEASE_SHARE = 0.5


@dataclass(slots=True)
class PublishCost:
    """The expected place + publish time of a batch, and its calibration."""

    seconds_per_op: float = DEFAULT_SECONDS_PER_OP
    seconds_per_mib: float = DEFAULT_SECONDS_PER_MIB
    fixed_seconds: float = FIXED_SECONDS
    scale: float = 1.0

    def raw(self, ops: int, size: int) -> float:
        """The unscaled model: fixed + per op + per MiB."""
        return self.fixed_seconds + ops * self.seconds_per_op + size / MIB * self.seconds_per_mib

    def estimate(self, ops: int, size: int) -> float:
        """Expected seconds to place and publish ``ops`` ops of ``size`` bytes."""
        return self.raw(ops, size) * self.scale

    def outlasted(self) -> None:
        """A batch outlasted its lease: expect twice as long from now on, so that the next
        cut is about half as big (measurements bring the scale back down)."""
        self.scale *= 2

    def observe(self, ops: int, size: int, seconds: float) -> None:
        """Learn from a batch that took ``seconds`` to place and publish."""
        if seconds <= 0:
            return
        ratio = seconds / self.raw(ops, size)
        self.scale = (1 - SMOOTHING) * self.scale + SMOOTHING * ratio


def fits_lease(cost: PublishCost, lease_seconds: float) -> Callable[[int, int], bool]:
    """The test a batch of ``ops`` ops and ``size`` bytes must pass to be cut for one lease:
    its expected time within ``LEASE_SHARE`` of the lease."""
    budget = lease_seconds * LEASE_SHARE

    def fits(ops: int, size: int) -> bool:
        return cost.estimate(ops, size) <= budget

    return fits


def too_big(ops: Sequence[Op], cost: PublishCost, lease_seconds: float) -> list[Op]:
    """The ops that can never fit a lease: alone, their expected time exceeds the budget."""
    fits = fits_lease(cost, lease_seconds)
    return [op for op in ops if not fits(1, op_weight(op))]


def lease_length(granted_at: float, expires_at: float | None, fallback: float) -> float:
    """The length of the lease granted at ``granted_at``: from the gateway's ``expires``
    when it was read, else ``fallback`` (the ``lease_seconds`` key)."""
    if expires_at is None or expires_at <= granted_at:
        return fallback
    return expires_at - granted_at
