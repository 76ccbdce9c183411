"""The one back-off of the daemon."""

from __future__ import annotations

from cvmfs_syncd.backoff import Backoff


def test_doubles_from_initial_up_to_maximum_and_resets() -> None:
    """initial, doubled per failure, capped; reset starts again at initial."""
    backoff = Backoff(0.5, 3.0)
    assert [backoff.next_delay() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    backoff.reset()
    assert backoff.next_delay() == 0.5
    assert backoff.delay(0) == backoff.delay(1) == 0.5
    assert Backoff(0.0, 0.0).next_delay() == 0.01  # never a busy loop
