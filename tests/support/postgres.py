"""A PostgreSQL database of the test session's own, on the machine's server (127.0.0.1:5432).

:func:`shared_postgres_dsn` creates ONE database per test session (a unique name), lazily, and
drops it at interpreter exit; tests keep apart by schema (:func:`unique_schema`), which is what
a PostgresStore's ``schema`` is for. Tests that need a database to themselves use
:func:`private_database`. Where no PostgreSQL answers, tests skip with a message saying so,
and fail under CI (env CI set), like the broker fixtures.

``MQTT_PERSIST_PG_ADMIN`` overrides the admin DSN (default
``postgresql://postgres@127.0.0.1:5432/postgres``: the database every cluster has; it is only
used to create and drop the test databases).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from mqtt_persist.stores.postgres import PostgresStore

__all__ = [
    "ADMIN_DSN",
    "make",
    "postgres_or_skip",
    "private_database",
    "shared_postgres_dsn",
    "shared_postgres_url",
    "unique_schema",
]

ADMIN_DSN = os.environ.get("MQTT_PERSIST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")

_shared: str | None = None
_shared_name: str | None = None
_lock = threading.Lock()


def _dsn_for(database: str) -> str:
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(ADMIN_DSN)
    params["dbname"] = database
    return make_conninfo("", **params)


def postgres_or_skip() -> None:
    """End the test unless psycopg is installed and the admin DSN answers: ``pytest.fail``
    under CI (env CI set), else ``pytest.skip``, with a message that says what is missing."""
    try:
        import psycopg
    except ImportError:
        _unavailable("psycopg not installed (pip install mqtt-persist[postgres])")
    try:
        with psycopg.connect(ADMIN_DSN, connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        _unavailable(
            f"no PostgreSQL reachable at {ADMIN_DSN} ({str(exc).strip()}); start it with "
            "`pg_ctlcluster 15 main start` or set MQTT_PERSIST_PG_ADMIN"
        )


def _unavailable(message: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def _create(name: str, *, server_defaults: bool = False) -> str:
    import psycopg
    from psycopg import sql

    with psycopg.connect(ADMIN_DSN, autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        if not server_defaults:
            # Tests kill clients, never this server: a COMMIT in the server's WAL buffers
            # survives a client's SIGKILL alike, and not waiting for the WAL flush keeps the
            # suite quick. (The benchmarks keep the server's defaults: server_defaults=True.)
            conn.execute(
                sql.SQL("ALTER DATABASE {} SET synchronous_commit = off").format(
                    sql.Identifier(name)
                )
            )
    return _dsn_for(name)


def _drop(name: str) -> None:
    import psycopg
    from psycopg import sql

    with (
        contextlib.suppress(psycopg.Error),
        psycopg.connect(ADMIN_DSN, autocommit=True, connect_timeout=5) as conn,
    ):
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def _drop_shared() -> None:
    if _shared_name is not None:
        _drop(_shared_name)


def shared_postgres_dsn() -> str:
    """DSN of the one test database this test session shares, created on first use and
    dropped at interpreter exit. Skips (or fails under CI) when PostgreSQL is unreachable."""
    global _shared, _shared_name
    with _lock:
        if _shared is None:
            postgres_or_skip()
            name = f"mqtt_persist_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
            _shared = _create(name)
            _shared_name = name
            atexit.register(_drop_shared)
        return _shared


def shared_postgres_url() -> str:
    """:func:`shared_postgres_dsn` as a ``postgresql://`` URL (for ``store_from_url``)."""
    from urllib.parse import quote

    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(shared_postgres_dsn())
    user = quote(str(params.get("user", "postgres")))
    host, port = params.get("host", "127.0.0.1"), params.get("port", "5432")
    return f"postgresql://{user}@{host}:{port}/{params['dbname']}"


@contextlib.contextmanager
def private_database(*, server_defaults: bool = False) -> Iterator[str]:
    """A database of the caller's own (a unique name), dropped afterwards: its DSN.

    ``server_defaults``: keep the server's ``synchronous_commit`` (on), as benchmarks must;
    tests' databases do not wait for the WAL flush (see :func:`_create`).
    """
    postgres_or_skip()
    name = f"mqtt_persist_private_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    dsn = _create(name, server_defaults=server_defaults)
    try:
        yield dsn
    finally:
        _drop(name)


def unique_schema(path: Path) -> str:
    """A schema name for one test: readable (the directory's name) and unique (its full path)."""
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
    return f"t_{path.name[:40]}_{digest}".lower()


def make(path: Path, clock: Callable[[], float]) -> PostgresStore:
    """A PostgresStore on the shared database under a schema of its own: the conformance kind.

    The same ``path`` gives the same schema, so a "reopened" store sees the same sessions.
    """
    dsn = shared_postgres_dsn()  # skips (fails under CI) first if psycopg or the server is missing
    from mqtt_persist.stores.postgres import PostgresStore

    return PostgresStore(dsn, schema=unique_schema(path), clock=clock)
