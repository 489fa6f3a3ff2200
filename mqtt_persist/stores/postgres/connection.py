"""PostgresStore's connections: a small pool, the settings every connection gets, safe DSNs.

A store opens at most ``max_connections`` connections, lazily, and lends each to one call at a
time; a connection that a call left in an unknown state (cancelled mid-query, failed, inside a
transaction) is closed rather than lent again. Every connection is in autocommit mode (an
``apply`` is one query, which PostgreSQL runs as one transaction; the other writes use explicit
transactions) and gets ``idle_in_transaction_session_timeout``: a process paused (SIGSTOP, a
debugger) inside one of its transactions holds that transaction's row locks, which would block
a new owner's takeover; PostgreSQL ends such a transaction after the timeout.
``application_name`` names the process (``mqtt_persist pid N``) unless the DSN sets one, so
``pg_stat_activity`` shows who is connected.

The DSN's password is never logged nor put in an error message or a ``repr``: :func:`redact`
gives the DSN without it, :func:`scrub` removes it from a driver's message.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import AsyncConnection
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus

from mqtt_persist.errors import StoreError

__all__ = ["Pool", "dsn_password", "redact", "scrub"]

_KEY_VALUE_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def dsn_password(dsn: str) -> str | None:
    """The password a DSN carries, if any (to scrub it from messages)."""
    try:
        return conninfo_to_dict(dsn).get("password") or None  # type: ignore[return-value]
    except psycopg.Error:
        return None


def redact(dsn: str) -> str:
    """The DSN without its password (``postgresql://user:***@host/db``), safe to log."""
    if "://" in dsn:
        try:
            parts = urlsplit(dsn)
            if parts.password is None:
                return _KEY_VALUE_PASSWORD.sub(r"\1***", dsn)  # ?password=... in the query
            host = parts.hostname or ""
            if ":" in host:
                host = f"[{host}]"
            if parts.port is not None:
                host += f":{parts.port}"
            netloc = f"{parts.username or ''}:***@{host}"
            return _KEY_VALUE_PASSWORD.sub(r"\1***", urlunsplit(parts._replace(netloc=netloc)))
        except ValueError:
            return "<unparseable PostgreSQL URL>"
    return _KEY_VALUE_PASSWORD.sub(r"\1***", dsn)


def scrub(message: str, password: str | None) -> str:
    """``message`` with every occurrence of ``password`` replaced by ``***``."""
    return message.replace(password, "***") if password else message


class Pool:
    """At most ``size`` connections to one server, lent to one caller at a time."""

    def __init__(
        self, dsn: str, size: int, *, idle_timeout_ms: int, connect_timeout: float
    ) -> None:
        """Connections to ``dsn``; transactions idle longer than ``idle_timeout_ms`` end."""
        self._dsn = dsn
        self._size = size
        self._idle_timeout_ms = idle_timeout_ms
        self._connect_timeout = connect_timeout
        self._password = dsn_password(dsn)
        self._safe = redact(dsn)
        params = conninfo_to_dict(dsn) if "://" in dsn or "=" in dsn else {}
        self._application_name = (
            None if "application_name" in params else f"mqtt_persist pid {os.getpid()}"
        )
        self._idle: list[AsyncConnection[Any]] = []
        self._open = 0
        self._available = asyncio.Condition()

    def error(self, exc: BaseException, doing: str) -> StoreError:
        """A driver's failure as the store's, without the password."""
        return StoreError(
            f"PostgreSQL at {self._safe} failed {doing}: {scrub(str(exc), self._password)}"
        )

    async def _new(self) -> AsyncConnection[Any]:
        kwargs: dict[str, Any] = {"autocommit": True}
        if self._application_name is not None:
            kwargs["application_name"] = self._application_name
        # Not asyncio.wait_for: on Python 3.11 it returns the connection when the caller is
        # cancelled just as connecting ends, and the caller's asyncio.timeout never fires.
        async with asyncio.timeout(self._connect_timeout):
            conn = await AsyncConnection.connect(self._dsn, **kwargs)
        try:
            await conn.execute(
                f"SET idle_in_transaction_session_timeout = {int(self._idle_timeout_ms)}"
            )
            # Every query of the store reads one session by its key. Before a table has
            # statistics (a freshly filled queue, until autovacuum's first ANALYZE) the planner
            # took "the first 1000 queued messages" for two rows and read all 100,000 into a
            # bitmap and a sort (43 ms); without bitmap scans it walks the key in order and
            # stops after 1000.
            await conn.execute("SET enable_bitmapscan = off")
        except BaseException:
            await conn.close()
            raise
        return conn

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[AsyncConnection[Any]]:
        """Borrow a connection (opening one if none is idle and the pool has room).

        Driver errors raised inside the block come out as :class:`StoreError`.
        """
        conn = await self._take()
        reusable = False
        try:
            try:
                yield conn
            except psycopg.Error as exc:
                raise self.error(exc, "a query") from None
            reusable = not conn.closed and conn.info.transaction_status is TransactionStatus.IDLE
        finally:
            await self._give_back(conn, reusable)

    async def _take(self) -> AsyncConnection[Any]:
        async with self._available:
            while not self._idle and self._open >= self._size:
                await self._available.wait()
            if self._idle:
                return self._idle.pop()
            self._open += 1
        try:
            return await self._new()
        except BaseException as exc:
            async with self._available:
                self._open -= 1
                self._available.notify()
            if isinstance(exc, psycopg.Error | OSError | TimeoutError):
                raise self.error(exc, "to connect") from None
            raise

    async def _give_back(self, conn: AsyncConnection[Any], reusable: bool) -> None:
        if not reusable:
            with contextlib.suppress(Exception):
                await conn.close()
        async with self._available:
            if reusable:
                self._idle.append(conn)
            else:
                self._open -= 1
            self._available.notify()

    async def close(self) -> None:
        """Close every idle connection (borrowed ones are closed when given back)."""
        async with self._available:
            idle, self._idle = self._idle, []
            self._open -= len(idle)
        for conn in idle:
            with contextlib.suppress(Exception):
                await conn.close()
