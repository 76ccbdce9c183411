"""One exponential back-off for every retry in the daemon."""

from __future__ import annotations


class Backoff:
    """Exponential back-off: ``initial`` seconds, doubled per failure, at most ``maximum``."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.initial = max(initial, 0.01)
        self.maximum = max(maximum, self.initial)
        self.failures = 0

    def delay(self, failures: int) -> float:
        """Return the wait after ``failures`` consecutive failures (at least one)."""
        return float(min(self.initial * (2.0 ** (max(1, failures) - 1)), self.maximum))

    def next_delay(self) -> float:
        """Count a failure and return how long to wait before the next attempt."""
        self.failures += 1
        return self.delay(self.failures)

    def reset(self) -> None:
        """Forget past failures."""
        self.failures = 0
