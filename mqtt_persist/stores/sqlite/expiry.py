"""The SQLite store's removal and expiry jobs: delete, TTL updates and cleanup."""

from __future__ import annotations

from collections.abc import Sequence

from mqtt_persist.stores._leases import remove_expired
from mqtt_persist.stores.sqlite.core import SQLiteStoreCore
from mqtt_persist.stores.sqlite.rows import (
    SELECT_META,
    BadRow,
    Meta,
    create_session,
    delete_rows,
    list_metas,
    meta_from_row,
    session_id,
)
from mqtt_persist.stores.sqlite.schema import transaction


class SQLiteExpiry(SQLiteStoreCore):
    """Delete, TTL and expired-session cleanup of a :class:`SQLiteStore` (worker-thread jobs)."""

    def _delete_job(self, client_id: str) -> None:
        conn = self._db()
        if client_id not in self._leases and session_id(conn, client_id) is None:
            return
        with self._leases.during(client_id), transaction(conn):
            sid = session_id(conn, client_id)
            if sid is not None:
                delete_rows(conn, sid)

    def _update_ttl_job(self, client_id: str, ttl: float | None) -> None:
        self._leases.ensure(client_id)
        conn = self._db()
        now = self._clock()
        with transaction(conn):
            meta = self._meta_or_quarantine(conn, client_id)
            if isinstance(meta, Meta) and meta.expired(now):
                # An expired session counts as none: the TTL applies to a new, empty one.
                delete_rows(conn, meta.sid)
                meta = None
            sid = meta.sid if isinstance(meta, Meta) else create_session(conn, client_id, now)
            conn.execute(
                "UPDATE sessions SET ttl = ?, last_access = ? WHERE sid = ?", (ttl, now, sid)
            )

    def _cleanup_job(self) -> int:
        conn = self._db()
        now = self._clock()
        expired = [
            client_id for client_id, meta in list_metas(self._db(), self._path) if meta.expired(now)
        ]

        def remove(client_ids: Sequence[str]) -> int:
            removed = 0
            with transaction(conn):
                for client_id in client_ids:
                    # Again under the write lock: its owner may have touched it since.
                    row = conn.execute(SELECT_META, (client_id,)).fetchone()
                    if row is None:
                        continue
                    try:
                        meta = meta_from_row(row)
                    except BadRow:
                        continue
                    if meta.expired(now):
                        delete_rows(conn, meta.sid)
                        removed += 1
            return removed

        return remove_expired(self._leases, expired, remove)
