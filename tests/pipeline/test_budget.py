"""A gateway lease is a time budget: batches are cut to fill at most half of it."""

from __future__ import annotations

import pytest

from cvmfs_syncd.model import EntryType, Fingerprint, Op, OpKind
from cvmfs_syncd.pipeline.budget import (
    MIB,
    PublishCost,
    fits_lease,
    lease_length,
    too_big,
)
from cvmfs_syncd.planner import cut_to_caps


def _file(path: str, size: int) -> Op:
    fingerprint = Fingerprint(EntryType.FILE, mode=0o644, size=size, mtime_ns=1, inode=1)
    return Op(OpKind.COPY_FILE, path, "s", path, fingerprint)


def test_the_model_starts_from_the_real_tools_figures() -> None:
    """10 000 small files: about 0.5 s fixed plus 4.65 s, as the recorded publish took."""
    cost = PublishCost()
    assert cost.estimate(10_000, 0) == pytest.approx(0.5 + 4.65)
    assert cost.estimate(1, 100 * MIB) == pytest.approx(0.5 + 0.000465 + 2.0)


def test_measured_batches_scale_the_model() -> None:
    """A host whose batches take twice the model converges towards twice the estimate."""
    cost = PublishCost()
    for _ in range(30):
        cost.observe(1000, 10 * MIB, 2 * cost.raw(1000, 10 * MIB))
    assert cost.scale == pytest.approx(2.0, rel=0.01)
    before = cost.scale
    cost.observe(1000, 0, 0.0)  # nothing measured: no change
    assert cost.scale == before


def test_batches_are_cut_to_half_the_lease() -> None:
    """With a 30 s lease (p_gateway_*: max_lease_time 30) a batch is expected to take <= 15 s."""
    cost = PublishCost()
    ops = [_file(f"f{i:05d}", 1024) for i in range(50_000)]
    fits = fits_lease(cost, 30.0)
    taken, later = cut_to_caps(ops, [], 1_000_000, 1 << 40, fits)
    assert cost.estimate(len(taken), 1024 * len(taken)) <= 15.0
    assert not fits(len(taken) + 1, 1024 * (len(taken) + 1))
    assert len(taken) + len(later) == len(ops)


def test_an_atomic_group_stays_whole_and_one_op_always_goes() -> None:
    """The budget never splits a ready-marker directory, and a round always makes progress."""
    cost = PublishCost()
    group = [_file(f"job/f{i}", 1024) for i in range(40_000)]
    other = [_file("later", 1024)]
    taken, later = cut_to_caps(
        group + other, [[op.repo_path for op in group]], 1_000_000, 1 << 40, fits_lease(cost, 30)
    )
    assert {op.repo_path for op in group} <= {op.repo_path for op in taken}
    assert later == other
    taken, _ = cut_to_caps([_file("big", 10 * MIB)], [], 10, 1 << 40, fits_lease(cost, 0.1))
    assert len(taken) == 1


def test_a_file_that_alone_outlasts_the_budget_is_refused() -> None:
    """A 2 GiB file at 20 ms per MiB (41 s) cannot fit a 60 s lease's 30 s budget."""
    cost = PublishCost()
    big, small = _file("huge.iso", 2048 * MIB), _file("small", 10)
    assert too_big([big, small], cost, 60.0) == [big]
    assert too_big([big, small], cost, 120.0) == []


def test_the_lease_length_comes_from_the_gateway_else_the_setting() -> None:
    """``expires`` minus the grant time; the ``lease_seconds`` key until one was read."""
    assert lease_length(1000.0, 1030.0, 600.0) == 30.0
    assert lease_length(1000.0, None, 600.0) == 600.0
    assert lease_length(1000.0, 990.0, 600.0) == 600.0


def test_a_batch_that_outlasted_its_lease_makes_the_next_cut_smaller() -> None:
    """After "invalid lease" the same lease holds about half as many ops."""
    cost = PublishCost()
    ops = [_file(f"f{i:05d}", 1024) for i in range(100_000)]
    before, _ = cut_to_caps(ops, [], 1_000_000, 1 << 40, fits_lease(cost, 30.0))
    cost.outlasted()
    after, _ = cut_to_caps(ops, [], 1_000_000, 1 << 40, fits_lease(cost, 30.0))
    assert 0.4 * len(before) < len(after) < 0.6 * len(before)
