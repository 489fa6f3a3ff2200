"""A session store in PostgreSQL, for gateway fleets: one owner at a time, fenced.

Needs psycopg 3 (``pip install mqtt-persist[postgres]``) and PostgreSQL 12 or newer (tested
with 15). Every session lives in one schema (``mqtt_persist`` by default) that the store
creates and upgrades itself (``schema``); one row per message, so no operation rewrites a
session and a queue of 100,000 messages is read back in pages.

Durability and atomicity
    :meth:`PostgresStore.apply` sends the whole batch as ONE query of several statements,
    which PostgreSQL runs as one transaction: the fencing check, the session's access, and one
    set-based statement per run of operations of one type (``operations.HANDLERS``); one round
    trip, and the call returns once the server committed it. With
    the server's default ``synchronous_commit = on`` that is after its WAL was flushed: the
    batch survives a crash of the client, of the server and a power cut (``durable`` is True).
    A transaction is all or nothing, so a crash at any point leaves all of a batch or none.
    The client hands over one burst per ``apply`` (group commit), and applies of different
    sessions that arrive while a transaction is on its way share the next one (``group``).

Ownership and fencing
    See ``lease``: a lease per session with a fencing token that grows with every new owner,
    checked by ``check_owner`` first in EVERY writing transaction (apply, load, save,
    update_ttl, delete, quarantine), so a former owner's write fails with
    :class:`~mqtt_persist.errors.SessionFenced` once a new owner took over, and nothing of it
    is stored. Writes from a store that holds no lease are allowed only while nobody's lease
    is live (:class:`~mqtt_persist.errors.SessionLocked` otherwise). Lease times are the
    SERVER's clock; session expiry (``last_access + ttl``) is the store's ``clock``, as in
    every store. ``exists``, ``list_sessions`` and ``read_queued`` only read.

Damage
    A row that cannot be a stored value (a NULL where a value belongs, a QoS of 7, text that is
    not UTF-8, ...) makes :meth:`~PostgresStore.load` (or ``read_queued``) copy every row of
    the session into the ``quarantine*`` tables and delete the originals in one transaction,
    then raise :class:`~mqtt_persist.errors.SessionCorrupt` naming the schema, the table and
    the client id; nothing is ever deleted without a copy. A schema written by a newer format
    raises :class:`~mqtt_persist.errors.UnsupportedFormatVersion` and is left in place.

Credentials
    Nothing secret is stored (a session holds none). The DSN may carry a password: it is never
    logged nor put in an error message or the ``repr`` (see :attr:`PostgresStore.dsn`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from mqtt_persist.errors import (
    SessionCorrupt,
    SessionExpired,
    StoreError,
)
from mqtt_persist.session.state import MessageAdded, Operation, SessionState, StoredMessage
from mqtt_persist.stores._checks import (
    check_client_id,
    check_operations,
    check_queued_limit,
    check_read_limit,
)
from mqtt_persist.stores._expiry import session_info, ttl_from
from mqtt_persist.stores.base import SessionInfo
from mqtt_persist.stores.postgres.core import PostgresStoreCore, _script
from mqtt_persist.stores.postgres.operations import Statement, statements_of
from mqtt_persist.stores.postgres.rows import (
    INT64_MAX,
    INT64_MIN,
    BadRow,
    Meta,
    build_state,
    id_bytes,
    message_from_row,
    meta_from_row,
)
from mqtt_persist.stores.postgres.schema import prepare_schema

logger = logging.getLogger(__name__)

__all__ = ["PostgresStore"]


class PostgresStore(PostgresStoreCore):
    """A :class:`~mqtt_persist.stores.base.SessionStore` in PostgreSQL, shared between processes.

    See the module documentation for the guarantees. ``dsn`` is a libpq connection string or
    URL (``postgresql://user:password@host:5432/db``; a password may also come from
    ``PGPASSWORD`` or ``~/.pgpass``, as libpq reads them). ``schema`` is the PostgreSQL schema
    holding every table (several deployments can share a database under different schemas).
    ``clock`` returns Unix time in seconds and drives last access and expiry. ``lease_ttl``
    (seconds, server time) is how long a lease outlives an owner that stopped renewing it;
    leases are renewed every third of it. ``takeover=True`` makes :meth:`acquire` take a
    session over even from a live owner (which is fenced: its next write fails).
    ``max_connections`` bounds the store's connections (calls for different sessions run in
    parallel on them); ``connect_timeout`` bounds each connection attempt.
    """

    #: A committed batch survives the client process, and the server's crash (WAL).
    durable = True

    # --- SessionStore ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, and create or check (and upgrade) the schema. Idempotent; every other
        method opens implicitly.

        Raises :class:`~mqtt_persist.errors.UnsupportedFormatVersion` for a schema of a newer
        format (left in place) and :class:`~mqtt_persist.errors.StoreError` for a schema of
        other tables or a server that cannot be reached.
        """
        async with self._open_lock:
            if self._opened:
                return
            async with self._pool.connection() as conn:
                await prepare_schema(conn, self._schema)
            self._opened = True

    async def close(self) -> None:
        """Stop renewing, release every lease and close the connections. Idempotent; the
        store can be opened again. A lease that cannot be released is left to lapse."""
        await self._group.close()
        if self._opened:
            await self._leases.release_all()
        self._opened = False
        await self._pool.close()

    async def acquire(self, client_id: str, *, takeover: bool | None = None) -> None:
        """Take the lease of ``client_id``'s session; renewed in the background until released.

        Raises :class:`~mqtt_persist.errors.SessionLocked`, naming the holder, when another
        owner's lease is live (unless that owner is a dead process on this host, or
        ``takeover`` (default: the store's setting) is true: then it is taken over and its
        owner fenced), or when this store already holds it.
        """
        check_client_id(client_id)
        if not self._opened:
            await self.open()
        async with self._lock_for(client_id):
            await self._leases.acquire(
                client_id, takeover=self._takeover if takeover is None else takeover
            )

    async def release(self, client_id: str) -> None:
        """Give the lease back if it is still ours. Idempotent."""
        async with self._lock_for(client_id):
            if self._opened:
                await self._leases.release(client_id)

    async def load(self, client_id: str, *, queued_limit: int | None = None) -> SessionState | None:
        """The stored session, or None; an access (moves last access).

        With ``queued_limit`` only the in-flight messages and the lowest that many queued ones
        are read; ``queued_not_loaded`` counts the rest. Raises
        :class:`~mqtt_persist.errors.SessionExpired` (removed),
        :class:`~mqtt_persist.errors.SessionCorrupt` (quarantined),
        :class:`~mqtt_persist.errors.SessionLocked` (another owner holds the lease) and
        :class:`~mqtt_persist.errors.SessionFenced` (a newer owner took it over).
        """
        check_client_id(client_id)
        check_queued_limit(queued_limit)
        async with self._lock_for(client_id):
            result = await self._load(client_id, queued_limit)
        if isinstance(result, StoreError):
            raise result
        return result

    async def _load(
        self, client_id: str, queued_limit: int | None
    ) -> SessionState | StoreError | None:
        cid, token, now = id_bytes(client_id), self._leases.token(client_id), self._clock()
        async with self._connection() as conn:
            with self._owner_errors(client_id, token):
                # One transaction: the access, an expiry or a quarantine all commit with it.
                async with conn.transaction():
                    row, rows = await self._read_session(conn, client_id, token, queued_limit)
                    if row is None:
                        return None
                    try:
                        meta = meta_from_row(row)
                    except BadRow as bad:
                        return await self._quarantine(conn, client_id, bad.reason)
                    if meta.expired(now):
                        await self._delete_rows(conn, cid)
                        return SessionExpired(f"session {client_id!r} expired and was removed")
                    try:
                        state = build_state(client_id, meta, rows, full=queued_limit is None)
                    except BadRow as bad:
                        return await self._quarantine(conn, client_id, bad.reason)
                    await conn.execute(self._q.touch, (now, cid))
                    return state

    async def read_queued(self, client_id: str, after_seq: int, limit: int) -> list[StoredMessage]:
        """Queued messages with ``seq > after_seq``, ascending, at most ``limit``: one range
        read of the session's messages in seq order. Only reads (a damaged row is quarantined
        unless another owner holds the session). An unknown session gives []."""
        check_client_id(client_id)
        check_read_limit(limit)
        if limit == 0 or after_seq >= INT64_MAX:
            return []
        cid = id_bytes(client_id)
        async with self._lock_for(client_id):
            async with self._connection() as conn:
                if after_seq < INT64_MIN:
                    cursor = await conn.execute(self._q.queued_first, (cid, limit))
                else:
                    cursor = await conn.execute(self._q.queued_after, (cid, after_seq, limit))
                rows = await cursor.fetchall()
            try:
                return [message_from_row(row) for row in rows]
            except BadRow as bad:
                error = await self._quarantine_unless_held(client_id, bad.reason)
        raise error

    async def _quarantine_unless_held(self, client_id: str, reason: str) -> SessionCorrupt:
        token = self._leases.token(client_id)
        try:
            async with self._connection() as conn:
                with self._owner_errors(client_id, token):
                    async with conn.transaction():
                        await conn.execute(self._q.check_owner, (id_bytes(client_id), token))
                        return await self._quarantine(conn, client_id, reason)
        except StoreError as exc:
            return SessionCorrupt(f"{reason}; not moved aside: {exc}", location=self._where())

    async def save(self, state: SessionState) -> None:
        """Replace the stored session with this snapshot, in one transaction.

        Keeps ``created_at`` and the TTL; ``last_seq`` never decreases. Damaged stored data is
        quarantined, then replaced.
        """
        client_id = state.client_id
        check_client_id(client_id)
        snapshot = state.copy()
        ops = snapshot.to_operations()
        check_operations(ops)  # refuse what cannot be stored, up front
        cid, q = id_bytes(client_id), self._q
        async with self._lock_for(client_id):
            token, now = self._leases.token(client_id), self._clock()
            async with self._connection() as conn:
                with self._owner_errors(client_id, token):
                    async with conn.transaction():
                        await conn.execute(q.check_owner, (cid, token))
                        meta = await self._locked_meta(conn, client_id)
                        if isinstance(meta, Meta):
                            await self._delete_data(conn, cid)
                            await conn.execute(q.clear_protocol, (cid,))
                        else:
                            await conn.execute(q.create_session, (cid, now, now))
                        await conn.execute(_script(conn, statements_of(self._schema, cid, ops)))
                        await conn.execute(q.saved, (now, snapshot.last_seq, cid))

    async def apply(self, client_id: str, ops: Sequence[Operation]) -> None:
        """Apply ``ops`` in ONE transaction; durable when it returns.

        Creates the session if there is none. An empty batch only counts as an access (of a
        session that exists), after the same ownership check. Expiry is not checked: the
        caller holds the session. Raises
        :class:`~mqtt_persist.stores.serialization.EncodeError` (nothing applied) for an
        operation that cannot be stored, :class:`~mqtt_persist.errors.SessionFenced` when a
        newer owner took the session over and :class:`~mqtt_persist.errors.SessionLocked` when
        this store holds no lease while another owner does.
        """
        check_client_id(client_id)
        batch = list(ops)
        check_operations(batch)
        top = max((op.message.seq for op in batch if type(op) is MessageAdded), default=None)
        cid, q = id_bytes(client_id), self._q
        async with self._lock_for(client_id):
            token, now = self._leases.token(client_id), self._clock()
            statements: list[Statement] = [(q.check_owner, (cid, token))]
            if not batch:
                statements.append((q.touch, (now, cid)))
            else:
                statements.append((q.touch_or_create, (cid, now, now, top, top)))
                statements += statements_of(self._schema, cid, batch)
            with self._owner_errors(client_id, token):
                # With other sessions' applies, in one query, one transaction (``group``).
                await self._group.commit(statements)

    async def delete(self, client_id: str) -> None:
        """Remove the session's rows (quarantined ones stay; an acquired lease stays held).

        Idempotent. Raises :class:`~mqtt_persist.errors.SessionLocked` when another owner holds
        the lease.
        """
        check_client_id(client_id)
        cid = id_bytes(client_id)
        async with self._lock_for(client_id):
            token = self._leases.token(client_id)
            async with self._connection() as conn:
                with self._owner_errors(client_id, token):
                    async with conn.transaction():
                        await conn.execute(self._q.check_owner, (cid, token))
                        await self._delete_rows(conn, cid)

    async def exists(self, client_id: str) -> bool:
        """True when a non-expired session is stored (reads only).

        A session with damaged metadata counts as existing: :meth:`load` reports it.
        """
        check_client_id(client_id)
        async with self._connection() as conn:
            cursor = await conn.execute(self._q.meta_read, (id_bytes(client_id),))
            row = await cursor.fetchone()
        if row is None:
            return False
        try:
            meta = meta_from_row(row)
        except BadRow:
            return True
        return not meta.expired(self._clock())

    async def list_sessions(self) -> list[SessionInfo]:
        """Every stored session, expired ones included (reads only; damaged rows are skipped)."""
        async with self._connection() as conn:
            cursor = await conn.execute(self._q.list)
            rows = await cursor.fetchall()
        infos: list[SessionInfo] = []
        for raw_id, *rest in rows:
            try:
                client_id = raw_id.decode("utf-8")
                meta = meta_from_row(rest[:5])
            except (BadRow, UnicodeDecodeError) as exc:
                logger.warning(
                    "skipping damaged session row %r in %s: %s", raw_id, self._where(), exc
                )
                continue
            inflight, queued, aside = rest[5:]
            infos.append(
                session_info(
                    client_id,
                    created_at=meta.created_at,
                    last_access=meta.last_access,
                    ttl=meta.ttl,
                    inflight=inflight,
                    queued=queued,
                    set_aside=aside,
                )
            )
        return infos

    async def update_ttl(self, client_id: str, seconds: float | None) -> None:
        """Expire the session ``seconds`` after its last access (None or 0: never); an access.

        Creates an empty session when none is stored (an expired one counts as none).
        """
        check_client_id(client_id)
        ttl = ttl_from(seconds)
        cid, q = id_bytes(client_id), self._q
        async with self._lock_for(client_id):
            token, now = self._leases.token(client_id), self._clock()
            async with self._connection() as conn:
                with self._owner_errors(client_id, token):
                    async with conn.transaction():
                        await conn.execute(q.check_owner, (cid, token))
                        meta = await self._locked_meta(conn, client_id)
                        if isinstance(meta, Meta) and meta.expired(now):
                            # An expired session counts as none: the TTL applies to a new one.
                            await self._delete_rows(conn, cid)
                            meta = None
                        if not isinstance(meta, Meta):
                            await conn.execute(q.create_session, (cid, now, now))
                        await conn.execute(q.set_ttl, (ttl, now, cid))

    async def cleanup_expired(self) -> int:
        """Remove every expired session nobody holds a live lease on; returns how many.

        One transaction: the expired sessions are locked (those another transaction holds are
        skipped), checked, and removed with their lapsed lease rows, so a former owner that
        wakes up later is fenced instead of writing into an empty session.
        """
        now = self._clock()
        q = self._q
        async with self._connection() as conn, conn.transaction():
            cursor = await conn.execute(q.expired, (now,))
            removed = 0
            for raw_id, *rest in await cursor.fetchall():
                try:
                    meta = meta_from_row(rest)
                except BadRow:
                    continue  # load reports (and quarantines) it; cleanup never deletes it
                if meta.expired(now):
                    await self._delete_rows(conn, raw_id)
                    await conn.execute(q.drop_lapsed_lease, (raw_id,))
                    removed += 1
        return removed
