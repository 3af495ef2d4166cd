"""Token accounting without a tokenizer: a calibrated bytes-per-token estimate and the daily budget.

SPEC §6.2: the input budget is estimated as bytes/4 and calibrated over time from the prompt
tokens the server reports (no tokenizer that downloads a vocabulary at run time). SPEC §9:
``daily_token_budget`` (0 = unlimited) caps the tokens spent per UTC day; the spent amount comes
from the store's ``usage`` table.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from typing import Protocol

import structlog

from memd.clock import Clock, iso_utc
from memd.errors import BudgetExhausted

log = structlog.get_logger(__name__)

#: Bounds of a plausible bytes-per-token ratio (dense code and CJK text ~1.5-2, English prose ~4,
#: long runs of whitespace or repeated output higher).
MIN_BYTES_PER_TOKEN = 1.5
MAX_BYTES_PER_TOKEN = 8.0
#: Weight of one new observation in the moving average.
EMA_ALPHA = 0.2
#: Observations of requests smaller than this are ignored (fixed per-message overhead dominates).
MIN_OBSERVED_BYTES = 512


class TokenEstimator:
    """Estimates tokens from UTF-8 bytes, calibrated from server-reported prompt tokens.

    Args:
        bytes_per_token: the starting ratio (4.0 per SPEC §6.2); clamped to [1.5, 8].
        samples: how many observations shaped the ratio so far (persisted with it).
    """

    def __init__(self, bytes_per_token: float = 4.0, samples: int = 0) -> None:
        self.bytes_per_token = _clamp(bytes_per_token)
        self.samples = samples

    def estimate(self, text_bytes: int) -> int:
        """Estimated tokens for ``text_bytes`` bytes of UTF-8 text (rounded up; 0 for 0 bytes)."""
        if text_bytes <= 0:
            return 0
        return math.ceil(text_bytes / self.bytes_per_token)

    def observe(self, text_bytes: int, prompt_tokens: int) -> None:
        """Fold one measurement into the ratio.

        Args:
            text_bytes: UTF-8 bytes of everything the request sent as text (system + user).
            prompt_tokens: the prompt tokens the server reported for that request.

        The first observation replaces the starting ratio; later ones move it by an exponential
        moving average (weight 0.2). Requests under 512 bytes or without a token count are
        ignored. The ratio stays within [1.5, 8].
        """
        if text_bytes < MIN_OBSERVED_BYTES or prompt_tokens <= 0:
            return
        ratio = _clamp(text_bytes / prompt_tokens)
        if self.samples == 0:
            self.bytes_per_token = ratio
        else:
            self.bytes_per_token = _clamp((1 - EMA_ALPHA) * self.bytes_per_token + EMA_ALPHA * ratio)
        self.samples += 1

    def to_json(self) -> str:
        """Serialise for the store's meta table: ``{"bytes_per_token": float, "samples": int}``."""
        return json.dumps({"bytes_per_token": round(self.bytes_per_token, 4), "samples": self.samples})

    @classmethod
    def from_json(cls, text: str | None) -> TokenEstimator:
        """Restore from :meth:`to_json` output; ``None`` or unreadable text gives the default
        estimator (and one ``token_estimator_reset`` warning for unreadable text)."""
        if not text:
            return cls()
        try:
            data = json.loads(text)
            ratio = float(data["bytes_per_token"])
            samples = int(data.get("samples", 0))
            if not math.isfinite(ratio) or samples < 0:
                raise ValueError("out of range")
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("token_estimator_reset", reason=type(exc).__name__)
            return cls()
        return cls(ratio, samples)

    def __repr__(self) -> str:
        return f"TokenEstimator(bytes_per_token={self.bytes_per_token:.3f}, samples={self.samples})"


def _clamp(ratio: float) -> float:
    return min(MAX_BYTES_PER_TOKEN, max(MIN_BYTES_PER_TOKEN, ratio))


class UsageSource(Protocol):
    """Where spent tokens are counted (the store's ``usage`` table)."""

    async def tokens_since(self, since: float) -> int:
        """Input + output tokens of every request recorded at or after epoch seconds ``since``."""
        ...


def utc_day_start(ts_s: float) -> float:
    """Epoch seconds of the UTC midnight that starts the day containing ``ts_s``."""
    day = datetime.fromtimestamp(ts_s, tz=UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return day.timestamp()


def next_utc_midnight(ts_s: float) -> float:
    """Epoch seconds of the next UTC midnight after ``ts_s``."""
    day = datetime.fromtimestamp(utc_day_start(ts_s), tz=UTC)
    return (day + timedelta(days=1)).timestamp()


class DailyBudget:
    """The ``daily_token_budget`` governor: tokens spent since UTC midnight against a limit.

    Args:
        limit_tokens: tokens per UTC day; 0 = unlimited.
        usage_source: counts tokens spent since a time (``Store.tokens_since``).
        clock: the time source.
    """

    def __init__(self, limit_tokens: int, usage_source: UsageSource, clock: Clock) -> None:
        self.limit_tokens = limit_tokens
        self._usage = usage_source
        self._clock = clock

    async def remaining(self) -> int | None:
        """Tokens left today (never negative), or ``None`` when unlimited."""
        if self.limit_tokens <= 0:
            return None
        spent = await self._usage.tokens_since(utc_day_start(self._clock.now()))
        return max(0, self.limit_tokens - spent)

    async def check(self) -> None:
        """Return when model work may proceed.

        Raises:
            BudgetExhausted: today's spending reached the limit; ``resume_at`` is the next UTC
                midnight (epoch seconds).
        """
        left = await self.remaining()
        if left is None or left > 0:
            return
        resume_at = next_utc_midnight(self._clock.now())
        raise BudgetExhausted(
            f"daily token budget of {self.limit_tokens} tokens is spent; resumes at {iso_utc(resume_at)}",
            resume_at=resume_at,
        )
