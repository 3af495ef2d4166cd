"""The leases repository: named leases with monotonic fencing tokens (SPEC §5).

Acquire = one upsert that succeeds only if the row is free or expired and bumps the fencing token;
renew = update where owner and fencing token match (0 rows ⇒ the lease was lost ⇒ stop the work);
release = expire it, keep the row. Expiry only makes a lease *takeable*: an expired lease that
nobody took over can still be renewed or used by its holder (no one else can have run, since a
takeover bumps the fencing token). A released lease has no owner, so its old token is refused.
"""

from __future__ import annotations

from memd.store.db import Repository, Transaction
from memd.store.records import LeaseRecord


async def holds(tx: Transaction, name: str, owner: str, fencing_token: int) -> bool:
    """Whether ``(owner, fencing_token)`` holds the lease ``name``, inside ``tx`` (fencing check)."""
    row = await tx.one(
        "SELECT 1 FROM leases WHERE name = ? AND owner = ? AND fencing_token = ?", (name, owner, fencing_token)
    )
    return row is not None


class LeaseRepository(Repository):
    """Leases. See :class:`~memd.store.db.Repository`."""

    async def acquire(self, name: str, owner: str, ttl_s: float) -> int | None:
        """Take the lease ``name`` for ``ttl_s`` seconds if it is free, released or expired.

        One upsert: a new row starts at fencing token 1; an existing row is taken only when its
        owner is ``NULL`` (released) or ``expires_at`` ≤ now, and its token is bumped (monotonic
        across owners, never reset). A lease its owner still holds is *not* re-acquired (use
        :meth:`renew`).

        Returns:
            The new fencing token, or ``None`` when someone else holds the lease.
        """
        now = self._clock.now()
        async with self._db.write("acquire_lease") as tx:
            row = await tx.one(
                """
                INSERT INTO leases (name, owner, fencing_token, expires_at, heartbeat_at)
                VALUES (:name, :owner, 1, :expires, :now)
                ON CONFLICT(name) DO UPDATE SET
                    owner = excluded.owner, fencing_token = leases.fencing_token + 1,
                    expires_at = excluded.expires_at, heartbeat_at = excluded.heartbeat_at
                WHERE leases.owner IS NULL OR leases.expires_at <= :now
                RETURNING fencing_token
                """,
                {"name": name, "owner": owner, "expires": now + ttl_s, "now": now},
            )
        return int(row["fencing_token"]) if row else None

    async def renew(self, name: str, owner: str, fencing_token: int, ttl_s: float) -> bool:
        """Extend the lease to now + ``ttl_s`` if ``(owner, fencing_token)`` still holds it.

        Returns:
            ``False`` when the lease was lost (taken over or released): stop the guarded work.
        """
        now = self._clock.now()
        async with self._db.write("renew_lease") as tx:
            rows = await tx.rows(
                """
                UPDATE leases SET expires_at = :expires, heartbeat_at = :now
                WHERE name = :name AND owner = :owner AND fencing_token = :token
                RETURNING 1
                """,
                {"expires": now + ttl_s, "now": now, "name": name, "owner": owner, "token": fencing_token},
            )
        return bool(rows)

    async def release(self, name: str, owner: str, fencing_token: int) -> bool:
        """Release the lease held by ``(owner, fencing_token)``: owner cleared, expired now, row
        and token kept (the next holder gets ``fencing_token + 1``).

        Returns:
            ``False`` when ``(owner, fencing_token)`` no longer held it (nothing changed).
        """
        now = self._clock.now()
        async with self._db.write("release_lease") as tx:
            rows = await tx.rows(
                """
                UPDATE leases SET owner = NULL, expires_at = :now
                WHERE name = :name AND owner = :owner AND fencing_token = :token
                RETURNING 1
                """,
                {"now": now, "name": name, "owner": owner, "token": fencing_token},
            )
        return bool(rows)

    async def check(self, name: str, owner: str, fencing_token: int) -> bool:
        """Return whether ``(owner, fencing_token)`` still holds the lease ``name`` (fencing check)."""
        async with self._db.read("check_lease") as tx:
            return await holds(tx, name, owner, fencing_token)

    async def get(self, name: str) -> LeaseRecord | None:
        """Return the lease row ``name``, or ``None`` if it was never acquired."""
        async with self._db.read("get_lease") as tx:
            row = await tx.one("SELECT * FROM leases WHERE name = ?", (name,))
        return LeaseRecord.from_row(row) if row else None

    async def list_all(self) -> list[LeaseRecord]:
        """Return every lease row (held, expired or released), by name."""
        async with self._db.read("list_leases") as tx:
            rows = await tx.rows("SELECT * FROM leases ORDER BY name")
        return [LeaseRecord.from_row(row) for row in rows]
