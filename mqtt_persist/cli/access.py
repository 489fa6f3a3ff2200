"""How commands reach a stored session: find it, and hold its lease while they work on it.

Every command that reads a whole session or changes one takes the store's ownership lease
first, exactly as a client does: a session that a live client holds is refused with
:attr:`ExitCode.SESSION_HELD` and left as it was. (The stores' ``load`` takes the lease too, so
``show`` and ``export`` of a held session are refused as well.)

Only ``sessions import`` creates a store: every other ``sessions`` command refuses a file or
SQLite store that is not there (a mistyped ``--store`` would otherwise be created, empty, and
reported as holding no session).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from mqtt_persist.cli.exits import CliError, ExitCode
from mqtt_persist.errors import SessionLocked
from mqtt_persist.stores.base import SessionInfo, SessionStore
from mqtt_persist.stores.file import FileStore
from mqtt_persist.stores.sqlite import SQLiteStore

__all__ = ["find_session", "held_error", "holding", "opened"]


@asynccontextmanager
async def opened(store: SessionStore, *, create: bool = False) -> AsyncIterator[SessionStore]:
    """The store, opened for the block and closed after it (releasing any lease taken).

    Unless ``create``, a file or SQLite store that does not exist is refused with
    :attr:`ExitCode.USAGE` before anything is created. Redis and PostgreSQL stores are not
    checked: there is no file to look for, and their ``open`` writes the format key under the
    prefix, or creates the schema's tables, so a mistyped prefix or schema is still created.
    """
    if not create:
        _check_exists(store)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def _check_exists(store: SessionStore) -> None:
    if isinstance(store, FileStore):
        path, what = store.directory, "directory"
    elif isinstance(store, SQLiteStore):
        path, what = store.path, "database file"
    else:
        return
    if not path.exists():
        raise CliError(
            f"the store {path} does not exist (no such {what}); check --store", ExitCode.USAGE
        )


async def find_session(store: SessionStore, client_id: str) -> SessionInfo:
    """The session's :class:`SessionInfo`; :attr:`ExitCode.NO_SESSION` if absent or expired.

    An expired session is reported, not loaded: loading would remove it, and a command that
    only looks must not change anything (``sessions cleanup`` removes it).
    """
    for info in await store.list_sessions():
        if info.client_id == client_id:
            if info.expires_at is not None and info.expires_at <= time.time():
                raise CliError(
                    f"session {client_id!r} expired; `mqtt-persist sessions cleanup` removes it",
                    ExitCode.NO_SESSION,
                )
            return info
    raise CliError(f"no session {client_id!r} in this store", ExitCode.NO_SESSION)


@asynccontextmanager
async def holding(store: SessionStore, client_id: str) -> AsyncIterator[None]:
    """Hold ``client_id``'s lease for the block; exit code SESSION_HELD if a client has it."""
    try:
        await store.acquire(client_id)
    except SessionLocked as exc:
        raise held_error(exc) from None
    try:
        yield
    finally:
        await store.release(client_id)


def held_error(exc: SessionLocked) -> CliError:
    """The one-line refusal for a session a live client holds."""
    return CliError(f"{exc}: stop that client first", ExitCode.SESSION_HELD)
