"""Session stores: where a client's session lives between runs.

:class:`SessionStore` is the contract; :class:`MemoryStore` keeps sessions for the life of the
process, :class:`FileStore` in crash-safe journal files, :class:`SQLiteStore` in one SQLite
database, :class:`RedisStore` in Redis and :class:`PostgresStore` in PostgreSQL (each imported
on first use: redis-py and psycopg are optional).
:func:`store_from_url` builds any of them from a URL such as ``sqlite:///var/lib/app/s.db``.
"""

from mqtt_persist.stores.base import SessionInfo, SessionStore
from mqtt_persist.stores.file import FileStore
from mqtt_persist.stores.memory import MemoryStore
from mqtt_persist.stores.sqlite import SQLiteStore
from mqtt_persist.stores.urls import redact_url, store_from_url

__all__ = [
    "FileStore",
    "MemoryStore",
    "PostgresStore",
    "RedisStore",
    "SQLiteStore",
    "SessionInfo",
    "SessionStore",
    "redact_url",
    "store_from_url",
]

import typing as _typing

if _typing.TYPE_CHECKING:
    # For type checkers only; at run time __getattr__ below imports them on first use.
    from mqtt_persist.stores.postgres import PostgresStore as PostgresStore
    from mqtt_persist.stores.redis import RedisStore as RedisStore


def __getattr__(name: str) -> object:
    # RedisStore needs redis-py and PostgresStore psycopg, optional extras: each is imported on
    # first use, so that ``import mqtt_persist`` requires neither.
    if name == "RedisStore":
        from mqtt_persist.stores.redis import RedisStore

        return RedisStore
    if name == "PostgresStore":
        from mqtt_persist.stores.postgres import PostgresStore

        return PostgresStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
