"""The PostgreSQL store's core: configuration, connections, the fenced write and the shared reads.

Connections come from the pool (``connection``); every write runs inside
``PostgresStoreCore._owner_errors``, which maps the fencing check's refusals to typed errors;
applies of many sessions commit together (``group``); a damaged session is quarantined
(``_quarantine``). ``store.PostgresStore`` is the facade; the guarantees are in ``store``'s
module documentation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import psycopg
from psycopg import AsyncConnection

from mqtt_persist.errors import (
    InvalidInput,
    SessionCorrupt,
)
from mqtt_persist.stores._owners import fenced_error
from mqtt_persist.stores._quarantine import quarantine_stamp
from mqtt_persist.stores.base import StoreContext
from mqtt_persist.stores.postgres.connection import Pool, redact
from mqtt_persist.stores.postgres.group import GroupCommit
from mqtt_persist.stores.postgres.lease import PgLeases, locked_error
from mqtt_persist.stores.postgres.operations import Statement
from mqtt_persist.stores.postgres.rows import (
    BadRow,
    Meta,
    Queries,
    SessionRows,
    id_bytes,
    meta_from_row,
)
from mqtt_persist.stores.postgres.schema import FENCED, LOCKED

logger = logging.getLogger(__name__)


class PostgresStoreCore(StoreContext):
    """Configuration, connections, the fenced write and shared reads of a :class:`PostgresStore`."""

    def __init__(
        self,
        dsn: str = "postgresql://127.0.0.1:5432/postgres",
        *,
        schema: str = "mqtt_persist",
        clock: Callable[[], float] = time.time,
        lease_ttl: float = 15.0,
        takeover: bool = False,
        max_connections: int = 4,
        connect_timeout: float = 10.0,
    ) -> None:
        """Configure the store; nothing connects before :meth:`open` (or the first call)."""
        if not isinstance(schema, str) or not schema or "\x00" in schema or len(schema) > 63:
            raise InvalidInput(f"schema must be a PostgreSQL identifier, not {schema!r}")
        if not (isinstance(lease_ttl, int | float) and math.isfinite(lease_ttl) and lease_ttl > 0):
            raise InvalidInput(f"lease_ttl must be a positive number of seconds, not {lease_ttl!r}")
        if type(max_connections) is not int or max_connections < 1:
            raise InvalidInput(f"max_connections must be an int >= 1, not {max_connections!r}")
        self._safe_dsn = redact(dsn)
        self._schema = schema
        self._clock = clock
        self._lease_ttl = float(lease_ttl)
        self._takeover = takeover
        # A transaction left idle by a paused process ends well before its lease lapses.
        idle_ms = max(500, int(lease_ttl * 1000 / 2))
        self._pool = Pool(
            dsn, max_connections, idle_timeout_ms=idle_ms, connect_timeout=connect_timeout
        )
        self._q = Queries(schema)
        self._group = GroupCommit(self._commit_applies)
        self._leases = PgLeases(schema, self._lease_ttl, uuid.uuid4().hex, self._connection, schema)
        self._locks: dict[str, asyncio.Lock] = {}
        self._open_lock = asyncio.Lock()
        self._opened = False
        #: Writes refused because a newer owner took the session over (SessionFenced).
        self.fenced_writes = 0

    def __repr__(self) -> str:
        """Shows the DSN without its password."""
        return f"PostgresStore({self._safe_dsn!r}, schema={self._schema!r})"

    @property
    def dsn(self) -> str:
        """The DSN with any password replaced by ``***`` (safe to log)."""
        return self._safe_dsn

    @property
    def schema(self) -> str:
        """The PostgreSQL schema holding this store's tables."""
        return self._schema

    def fencing_token(self, client_id: str) -> int | None:
        """The fencing token of the lease this store holds on ``client_id`` (None: none)."""
        return self._leases.token(client_id)

    # --- plumbing -------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[AsyncConnection[Any]]:
        if not self._opened:
            await self.open()
        async with self._pool.connection() as conn:
            yield conn

    def _lock_for(self, client_id: str) -> asyncio.Lock:
        # Calls for one session run in call order, as one client issues them (a batch after the
        # one it follows), even though they may run on different connections.
        lock = self._locks.get(client_id)
        if lock is None:
            lock = self._locks[client_id] = asyncio.Lock()
        return lock

    @contextlib.contextmanager
    def _owner_errors(self, client_id: str, token: int | None) -> Iterator[None]:
        """``check_owner``'s refusals as SessionFenced / SessionLocked."""
        try:
            yield
        except psycopg.Error as exc:
            if exc.sqlstate == FENCED:
                self._leases.mark_lost(client_id)
                self.fenced_writes += 1
                detail, hint = exc.diag.message_detail or "", exc.diag.message_hint or ""
                raise fenced_error(
                    client_id, str(token), hint, detail.encode(), self._lease_ttl
                ) from None
            if exc.sqlstate == LOCKED:
                raise locked_error(client_id, exc.diag.message_detail or "") from None
            raise self._pool.error(exc, "a query") from None

    async def _commit_applies(self, applies: Sequence[list[Statement]]) -> None:
        """The applies' statements as ONE query: one transaction, one round trip (see
        ``operations``: why not a pipeline). Raises the driver's error as it is: the caller
        tells a fencing refusal from a failure."""
        error: psycopg.Error | None = None
        async with self._connection() as conn:
            try:
                await conn.execute(_script(conn, [st for apply in applies for st in apply]))
            except psycopg.Error as exc:
                error = exc  # raised below, outside the pool (which would make it a StoreError)
        if error is not None:
            raise error

    def _where(self) -> str:
        return f"PostgreSQL {self._safe_dsn}, schema {self._schema}"

    async def _quarantine(
        self, conn: AsyncConnection[Any], client_id: str, reason: str
    ) -> SessionCorrupt:
        """Inside the caller's transaction: move every row of the session to quarantine*."""
        q, cid = self._q, id_bytes(client_id)
        stamp = quarantine_stamp()
        cursor = await conn.execute(q.quarantine, (stamp, reason, cid))
        row = await cursor.fetchone()
        if row is None:  # data without a sessions row
            cursor = await conn.execute(q.quarantine_bare, (stamp, reason, cid))
            row = await cursor.fetchone()
            assert row is not None
        (qid,) = row
        for statement in q.quarantine_data:
            await conn.execute(statement, (qid, cid))
        await self._delete_rows(conn, cid)
        where = f"{self._schema}.quarantine* tables, qid {qid}"
        logger.error(
            "session %r in %s: %s; moved to the %s", client_id, self._where(), reason, where
        )
        return SessionCorrupt(
            f"session {client_id!r}: {reason}", location=self._where(), quarantined_to=where
        )

    async def _delete_rows(self, conn: AsyncConnection[Any], cid: bytes) -> None:
        await conn.execute(self._q.delete_session, (cid,))
        await self._delete_data(conn, cid)

    async def _delete_data(self, conn: AsyncConnection[Any], cid: bytes) -> None:
        for statement in self._q.delete_data:
            await conn.execute(statement, (cid,))

    async def _locked_meta(
        self, conn: AsyncConnection[Any], client_id: str
    ) -> Meta | SessionCorrupt | None:
        """Inside a transaction: the session row (locked), None, or the error of a quarantine."""
        cursor = await conn.execute(self._q.meta, (id_bytes(client_id),))
        row = await cursor.fetchone()
        if row is None:
            return None
        try:
            return meta_from_row(row)
        except BadRow as bad:
            return await self._quarantine(conn, client_id, bad.reason)

    async def _read_session(
        self,
        conn: AsyncConnection[Any],
        client_id: str,
        token: int | None,
        queued_limit: int | None,
    ) -> tuple[Any, SessionRows]:
        """Inside a transaction: the fencing check, the session row (locked) and every row a
        load needs (none but the first two when there is no session)."""
        q, cid = self._q, id_bytes(client_id)

        async def rows(statement: bytes, params: tuple[object, ...]) -> list[Any]:
            cursor = await conn.execute(statement, params)
            return await cursor.fetchall()

        await conn.execute(q.check_owner, (cid, token))
        meta = await rows(q.meta, (cid,))
        if not meta:
            return None, SessionRows([], 0, [], [], [], [])
        queued_total = 0
        if queued_limit is None:
            messages = await rows(q.all_messages, (cid,))
        else:
            messages = await rows(q.inflight, (cid,))
            messages += await rows(q.queued_first, (cid, queued_limit))
            [(_, queued_total)] = await rows(q.counts, (cid,))
        inbound, subscriptions, pending, set_aside = [
            await rows(statement, (cid,)) for statement in q.session_reads
        ]
        return meta[0], SessionRows(
            messages, queued_total, inbound, subscriptions, pending, set_aside
        )


def _script(conn: AsyncConnection[Any], statements: Sequence[Statement]) -> bytes:
    """The statements as one query, their values bound on the client side by psycopg's quoting
    (the connection's encoding and settings): PostgreSQL runs it as one transaction."""
    cursor = psycopg.AsyncClientCursor(conn)
    return ";\n".join([cursor.mogrify(text, params) for text, params in statements]).encode()
