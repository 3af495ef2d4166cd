"""The meta repository: small values the daemon persists across restarts (table ``meta``).

Keys in use: ``extractor`` (the running daemon's choice and why), ``model_pause`` (why model work
is paused), ``token_estimator`` (the calibrated bytes-per-token estimate), ``last_fault`` (the
newest fault the daemon survived, JSON).
"""

from __future__ import annotations

from memd.store.db import Database


class MetaRepository:
    """Key/value settings. Built by :class:`~memd.store.store.Store`; see :class:`Database` for errors.

    Args:
        db: the database.
    """

    def __init__(self, db: Database) -> None:
        self._db = db

    async def get(self, key: str) -> str | None:
        """Return the value for ``key``, or ``None``."""
        async with self._db.read("get_meta") as tx:
            row = await tx.one("SELECT value FROM meta WHERE key = ?", (key,))
        return str(row["value"]) if row else None

    async def set(self, key: str, value: str | None) -> None:
        """Set the value for ``key``; ``None`` deletes it."""
        async with self._db.write("set_meta") as tx:
            if value is None:
                await tx.execute("DELETE FROM meta WHERE key = ?", (key,))
            else:
                await tx.execute(
                    "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (key, value),
                )
