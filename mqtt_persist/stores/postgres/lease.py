"""PostgresStore's leases: rows with a fencing token and an expiry in the server's time.

``leases(client_id, token, owner, expires_at)``: :meth:`PgLeases.acquire` inserts the row, or
takes it over when its lease lapsed (``expires_at`` passed, by the SERVER's clock), when its
owner is a process of this host that no longer runs (``_owners.owner_is_dead``), or when asked
to (``takeover=True``); every new owner gets a new token from the ``fencing_tokens`` sequence,
so tokens only grow. A background task renews every held lease each ``lease_ttl / 3`` (one
UPDATE for all of them, matching on the token); :meth:`PgLeases.release` deletes the row if the
token is still ours.

The token travels with every write: ``check_owner`` (see ``schema``) compares it with the row's
in the write's own transaction, so a former owner's write fails (``SessionFenced``) from the
moment a new owner took over, whatever the clocks say; so does a write after our lease lapsed
(``expires_at`` passed before a renewal extended it): a lapsed lease is never renewed, the store
must acquire again, so a paused owner never races a rival that saw the lapse.

An acquire cancelled after its statement went out deletes the row if it carries that attempt's
owner value (which names the moment it was made): the statement may have committed, or may
still be running (:meth:`PgLeases._abandon` waits for it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

from psycopg import AsyncConnection

from mqtt_persist.errors import SessionLocked
from mqtt_persist.stores._owners import describe_owner, owner_is_dead, owner_value
from mqtt_persist.stores._renewed_leases import RenewedLeases
from mqtt_persist.stores.postgres.operations import statement
from mqtt_persist.stores.postgres.rows import id_bytes

__all__ = ["PgLease", "PgLeases", "locked_error"]

logger = logging.getLogger(__name__)

#: The store's way to borrow a connection (errors already reported as StoreError).
Connect = Callable[[], AbstractAsyncContextManager[AsyncConnection[Any]]]


@dataclass(slots=True)
class PgLease:
    """A lease this store holds: its fencing token."""

    token: int
    #: A newer owner took it over (seen by a renewal or a refused write).
    lost: bool = False


class PgLeases(RenewedLeases[PgLease]):
    """The leases one PostgresStore holds, and the task that renews them."""

    owner_kind = "PostgresStore"

    def __init__(
        self, schema: str, lease_ttl: float, store_id: str, connect: Connect, name: str
    ) -> None:
        """Leases in ``schema``'s ``leases`` table, ``lease_ttl`` seconds each."""
        super().__init__(lease_ttl, name)
        self._schema = schema
        self._store_id = store_id
        self._connect = connect

    def token(self, client_id: str) -> int | None:
        """Our fencing token for ``client_id`` (None when we hold no lease)."""
        lease = self._held.get(client_id)
        return None if lease is None else lease.token

    async def acquire(self, client_id: str, *, takeover: bool) -> int:
        """Take the lease and return its token; SessionLocked naming the holder if refused."""
        self._check_free(client_id)
        cid = id_bytes(client_id)
        owner = owner_value(self._store_id).decode()
        sent = [False]  # a statement went out: cancelled now, the lease may be ours
        try:
            token = await self._take(client_id, cid, owner, takeover, sent)
        except BaseException as exc:
            if not isinstance(exc, Exception) and sent[0]:
                await self._undo_cancelled(client_id, lambda: self._abandon(cid, owner))
            raise
        self._hold(client_id, PgLease(token))
        return token

    async def _take(
        self, client_id: str, cid: bytes, owner: str, takeover: bool, sent: list[bool]
    ) -> int:
        """The round trips of :meth:`acquire`: the token of the lease taken."""
        expected: str | None = None
        for _ in range(5):
            async with self._connect() as conn:
                sent[0] = True
                cursor = await conn.execute(
                    statement(
                        self._schema,
                        "INSERT INTO {s}.leases AS l (client_id, token, owner, expires_at) "
                        "VALUES (%s, nextval(%s::regclass), %s, "
                        "clock_timestamp() + %s * interval '1 second') "
                        # The expiry is computed again here: the update may have waited for
                        # the row lock of the former owner's last write.
                        "ON CONFLICT (client_id) DO UPDATE SET token = EXCLUDED.token, "
                        "owner = EXCLUDED.owner, "
                        "expires_at = clock_timestamp() + %s * interval '1 second' "
                        "WHERE l.expires_at <= clock_timestamp() OR %s OR l.owner = %s "
                        "RETURNING token, (xmax <> 0)",
                    ),
                    (
                        cid,
                        self._sequence,
                        owner,
                        self._lease_ttl,
                        self._lease_ttl,
                        takeover,
                        expected,
                    ),
                )
                taken = await cursor.fetchone()
                if taken is None:
                    cursor = await conn.execute(
                        statement(
                            self._schema,
                            "SELECT owner, extract(epoch FROM expires_at - clock_timestamp()) "
                            "FROM {s}.leases WHERE client_id = %s",
                        ),
                        (cid,),
                    )
                    holder = await cursor.fetchone()
            if taken is not None:
                token, replaced = taken
                if replaced and expected is not None:
                    logger.warning(
                        "took over the lease of session %r from %s, which no longer runs",
                        client_id,
                        describe_owner(expected.encode()),
                    )
                elif replaced:
                    logger.info("took over the lease of session %r (token %d)", client_id, token)
                break
            if holder is None:
                continue  # released just now: try again
            holder_owner, left = holder
            if not owner_is_dead(holder_owner.encode()):
                raise SessionLocked(
                    f"session {client_id!r} is held by {describe_owner(holder_owner.encode())} "
                    f"(its lease runs for another {float(left):.1f} s unless renewed)"
                )
            expected = holder_owner
        else:
            raise SessionLocked(f"session {client_id!r}: its lease keeps changing hands")
        return int(token)

    async def _abandon(self, cid: bytes, owner: str) -> None:
        """Delete the lease if it holds ``owner``, the owner value of one acquire attempt.

        That attempt's statement may still be running on the server (psycopg closes a
        connection it could not cancel the query of, and a takeover may be waiting for the row
        lock of the former owner's write): an INSERT of the same key, locking the row ON
        CONFLICT, first waits for whatever else writes the row (an insert in progress, a lock
        holder), so the DELETE sees its outcome. Should no row exist, it inserts one with our
        owner value, which the DELETE removes in the same transaction.
        """
        async with self._connect() as conn, conn.transaction():
            await conn.execute(
                statement(
                    self._schema,
                    "INSERT INTO {s}.leases AS l (client_id, token, owner, expires_at) "
                    "VALUES (%s, 0, %s, clock_timestamp()) "
                    "ON CONFLICT (client_id) DO UPDATE SET owner = l.owner WHERE false",
                ),
                (cid, owner),
            )
            await conn.execute(
                statement(
                    self._schema, "DELETE FROM {s}.leases WHERE client_id = %s AND owner = %s"
                ),
                (cid, owner),
            )

    @property
    def _sequence(self) -> str:
        return statement(self._schema, "{s}.fencing_tokens").decode()

    async def _give_back(self, client_id: str, lease: PgLease) -> None:
        """Delete the row if the token is still ours."""
        async with self._connect() as conn:
            await conn.execute(
                statement(
                    self._schema, "DELETE FROM {s}.leases WHERE client_id = %s AND token = %s"
                ),
                (id_bytes(client_id), lease.token),
            )

    async def renew(self) -> None:
        """Extend every held lease by ``lease_ttl`` from now (server time); mark the fenced."""
        leases = [(cid, lease) for cid, lease in self._held.items() if not lease.lost]
        if not leases:
            return
        async with self._connect() as conn:
            cursor = await conn.execute(
                statement(
                    self._schema,
                    "UPDATE {s}.leases l SET expires_at = clock_timestamp() + %s * "
                    "interval '1 second' FROM unnest(%s::bytea[], %s::bigint[]) AS h(c, t) "
                    "WHERE l.client_id = h.c AND l.token = h.t "
                    "AND l.expires_at > clock_timestamp() RETURNING l.token",
                ),
                (self._lease_ttl, [id_bytes(c) for c, _ in leases], [x.token for _, x in leases]),
            )
            renewed = {token for (token,) in await cursor.fetchall()}
        for client_id, lease in leases:
            if lease.token not in renewed:
                self._taken_over(client_id, lease)


def locked_error(client_id: str, detail: str) -> SessionLocked:
    """The error of a write without a lease while another owner holds one."""
    return SessionLocked(f"session {client_id!r} is held by {describe_owner(detail.encode())}")
