"""Exponential backoff for failed jobs (SPEC §4): ``retry_base_s`` doubling, capped, ``dead`` after
``max_attempts``.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff for failed jobs.

    Attributes:
        base_s: delay after the first failure (seconds).
        cap_s: the longest delay (seconds).
        max_attempts: attempts before a job is ``dead``.
    """

    base_s: float = 60.0
    cap_s: float = 6 * 3600.0
    max_attempts: int = 5

    def delay_s(self, attempts: int) -> float:
        """Delay after the ``attempts``-th failed attempt (1-based): base·2^(attempts-1), capped."""
        return float(min(self.cap_s, self.base_s * 2.0 ** max(0, attempts - 1)))

    def is_dead(self, attempts: int) -> bool:
        """True when ``attempts`` failed attempts exhaust the policy."""
        return attempts >= self.max_attempts
