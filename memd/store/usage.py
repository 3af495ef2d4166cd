"""The usage repository: one row per model request (table ``usage``), feeding budgets and status.

It is the :class:`~memd.llm.client.UsageSink` the model client records to, and the
:class:`~memd.llm.budget.UsageSource` the daily budget reads.
"""

from __future__ import annotations

from memd.store.db import Repository


class UsageRepository(Repository):
    """Model usage. See :class:`~memd.store.db.Repository`."""

    async def record_usage(
        self, phase: str, model: str, input_tokens: int, output_tokens: int, cached_tokens: int
    ) -> None:
        """Record one model request's token usage at now.

        Args:
            phase: ``extract`` or ``consolidate`` (``doctor`` for probes).
            model: the model name.
            input_tokens, output_tokens: as reported by the endpoint.
            cached_tokens: the part of ``input_tokens`` served from the prompt cache.
        """
        now = self._clock.now()
        async with self._db.write("record_usage") as tx:
            await tx.execute(
                """
                INSERT INTO usage (at, phase, model, input_tokens, output_tokens, cached_tokens)
                VALUES (?, ?, ?, ?, ?, ?)
                """,
                (now, phase, model, input_tokens, output_tokens, cached_tokens),
            )

    async def tokens_since(self, since: float) -> int:
        """Return input + output tokens of the requests at or after ``since`` (epoch s)."""
        async with self._db.read("tokens_since") as tx:
            return await tx.scalar(
                "SELECT COALESCE(SUM(input_tokens + output_tokens), 0) FROM usage WHERE at >= ?", (since,)
            )
