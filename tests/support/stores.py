"""Stores for the fault tests and the fault matrix, by kind, in-process or as a child's spec.

``kind`` is one of :data:`KINDS`. A child process gets a *spec* string (``file:DIR``,
``sqlite:PATH``, ``redis:URL#PREFIX``, ``postgres:DSN#SCHEMA``) that :func:`store_from_spec`
turns back into a store.
Stores are imported from ``mqtt_persist`` / ``mqtt_persist.stores`` only, never from a module
inside the package, so the tests survive a reshuffle of the stores' internals.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path

from mqtt_persist import FileStore, MemoryStore, SessionStore
from mqtt_persist.session.state import Operation
from mqtt_persist.stores import SQLiteStore

__all__ = [
    "DURABLE_KINDS",
    "KINDS",
    "MATRIX_DURABLE_KINDS",
    "MATRIX_KINDS",
    "BreakableStore",
    "make_store",
    "store_from_spec",
    "store_spec",
]

KINDS = ("memory", "file", "sqlite", "redis")
#: The kinds whose commits survive the process (a child killed with SIGKILL keeps its session).
DURABLE_KINDS = ("file", "sqlite", "redis")
#: The fault matrix (benchmarks/fault_matrix.py) adds PostgreSQL. The suite's own fault tests
#: keep to KINDS for time; PostgreSQL's crash and handoff tests are test_crash.py and
#: test_handoff.py, its conformance runs in test_stores.py.
MATRIX_KINDS = (*KINDS, "postgres")
MATRIX_DURABLE_KINDS = (*DURABLE_KINDS, "postgres")


def store_spec(kind: str, workdir: Path, *, redis_url: str | None = None, name: str = "s") -> str:
    """The spec of a durable store of ``kind`` under ``workdir`` (Redis: key prefix from it;
    PostgreSQL: a schema named after it in the test session's shared database)."""
    if kind == "file":
        return f"file:{workdir / name}"
    if kind == "sqlite":
        return f"sqlite:{workdir / (name + '.db')}"
    if kind == "redis":
        if redis_url is None:
            raise ValueError("a redis store needs redis_url")
        from tests.support.redis_server import unique_prefix

        return f"redis:{redis_url}#{unique_prefix(workdir / name)}"
    if kind == "postgres":
        # The test session's shared database, a schema of this store's own.
        from tests.support.postgres import shared_postgres_dsn, unique_schema

        return f"postgres:{shared_postgres_dsn()}#{unique_schema(workdir / name)}"
    raise ValueError(f"no spec for a {kind!r} store (memory lives in one process only)")


def store_from_spec(spec: str, **redis_kwargs: float) -> SessionStore:
    """The store a :func:`store_spec` string names."""
    kind, _, where = spec.partition(":")
    if kind == "file":
        return FileStore(where)
    if kind == "sqlite":
        return SQLiteStore(where)
    if kind == "redis":
        from mqtt_persist.stores import RedisStore

        url, _, prefix = where.partition("#")
        return RedisStore(url, prefix=prefix or "mqtt_persist", **redis_kwargs)  # type: ignore[arg-type]
    if kind == "postgres":
        from mqtt_persist.stores import PostgresStore

        dsn, _, schema = where.rpartition("#")
        return PostgresStore(dsn, schema=schema or "mqtt_persist")
    raise ValueError(f"unknown store spec {spec!r}")


def make_store(
    kind: str, workdir: Path, *, redis_url: str | None = None, name: str = "s"
) -> SessionStore:
    """A new store of ``kind``; ``memory`` gives a MemoryStore (survives only this process)."""
    if kind == "memory":
        return MemoryStore()
    os.makedirs(workdir, exist_ok=True)
    return store_from_spec(store_spec(kind, workdir, redis_url=redis_url, name=name))


class BreakableStore(MemoryStore):
    """A durable MemoryStore whose commits raise ``error`` once it is set."""

    durable = True

    def __init__(self) -> None:
        super().__init__()
        self.error: Exception | None = None

    async def apply(self, client_id: str, ops: Sequence[Operation]) -> None:
        if self.error is not None:
            raise self.error
        await super().apply(client_id, ops)

    def begin_apply(
        self, client_id: str, ops: Sequence[Operation], durable: asyncio.Future[None]
    ) -> bool:
        # The inline commit fails the same way: its caller gets the error from ``durable``.
        if self.error is not None:
            durable.set_exception(self.error)
            return True
        return super().begin_apply(client_id, ops, durable)
