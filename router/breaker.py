"""A circuit breaker for one upstream replica: closed, open, half-open.

* **closed**: requests pass; a failed attempt counts, a successful one resets the count.
* **open**, after ``failures`` consecutive failures: the replica is skipped (no connection is
  attempted) for ``cooldown_s``.
* **half-open**, once the cooldown is over: the next request that asks is let through as the
  one trial, while the others keep skipping the replica. The trial's success closes the
  breaker; its failure opens it for another ``cooldown_s``. A trial that ends with neither
  (the client went away) leaves the breaker half-open for the next request to try.

The breaker is not thread-safe: it lives on the gateway's event loop, and changes state only
between awaits.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Literal

__all__ = ["BreakerState", "CircuitBreaker"]

logger = logging.getLogger(__name__)

BreakerState = Literal["closed", "half_open", "open"]


class CircuitBreaker:
    """One replica's breaker; ``on_change(state)`` is called on every transition."""

    def __init__(
        self,
        failures: int,
        cooldown_s: float,
        *,
        name: str = "",
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[BreakerState], None] | None = None,
    ) -> None:
        if failures < 1:
            raise ValueError(f"failures must be at least 1, got {failures}")
        self.failures = failures
        self.cooldown_s = cooldown_s
        self.name = name
        self._clock = clock
        self._on_change = on_change
        self._state: BreakerState = "closed"
        self._count = 0  # consecutive failures while closed
        self._open_until = 0.0
        self._trial = False  # half-open: the trial attempt is under way

    @property
    def state(self) -> BreakerState:
        """The current state; ``open`` until a request takes the trial after the cooldown."""
        return self._state

    def retry_in(self) -> float:
        """Seconds until an open breaker lets a trial through (0 when it would now)."""
        if self._state != "open":
            return 0.0
        return max(0.0, self._open_until - self._clock())

    def allows(self) -> bool:
        """Whether :meth:`acquire` would let a request through now (without taking the trial)."""
        if self._state == "closed":
            return True
        if self._state == "half_open":
            return not self._trial
        return self._clock() >= self._open_until

    def acquire(self) -> bool:
        """Let one attempt through, or refuse it; past the cooldown, the first caller becomes
        the half-open trial (see :meth:`holds_trial`)."""
        if not self.allows():
            return False
        if self._state != "closed":
            self._trial = True
            self._set("half_open")
        return True

    def holds_trial(self) -> bool:
        """Right after a successful :meth:`acquire`: whether that attempt is the trial."""
        return self._state == "half_open"

    def succeeded(self) -> None:
        """An attempt got its answer: close a half-open breaker, reset the count of a closed one
        (a late success while open changes nothing: the trial decides)."""
        if self._state == "half_open":
            self._count = 0
            self._trial = False
            self._set("closed")
        elif self._state == "closed":
            self._count = 0

    def failed(self) -> None:
        """An attempt failed: count it; open the breaker at ``failures`` in a row, or at once
        when it was half-open."""
        if self._state == "open":
            return
        if self._state == "closed":
            self._count += 1
            if self._count < self.failures:
                return
        self._count = 0
        self._trial = False
        self._open_until = self._clock() + self.cooldown_s
        self._set("open")

    def abandoned(self, trial: bool) -> None:
        """An attempt ended with no verdict (cancelled); a trial goes back to the next request."""
        if trial and self._state == "half_open":
            self._trial = False

    def _set(self, state: BreakerState) -> None:
        if state == self._state:
            return
        self._state = state
        log = logger.warning if state == "open" else logger.info
        log("circuit breaker %s is now %s", self.name or "(replica)", state)
        if self._on_change is not None:
            self._on_change(state)
