"""The SQLite store's read jobs: loading a session, paging through its queue, listing."""

from __future__ import annotations

from mqtt_persist.errors import (
    SessionCorrupt,
    SessionExpired,
    StoreError,
)
from mqtt_persist.session.state import SessionState, StoredMessage
from mqtt_persist.stores._expiry import session_info
from mqtt_persist.stores.base import SessionInfo
from mqtt_persist.stores.sqlite.core import SQLiteStoreCore
from mqtt_persist.stores.sqlite.rows import (
    INT64_MAX,
    INT64_MIN,
    SELECT_META,
    SELECT_QUEUED_AFTER,
    SELECT_QUEUED_FIRST,
    BadRow,
    delete_rows,
    fetch,
    list_metas,
    message_from_row,
    meta_from_row,
    read_state,
    session_id,
)
from mqtt_persist.stores.sqlite.schema import transaction


class SQLiteReads(SQLiteStoreCore):
    """The read jobs of a :class:`SQLiteStore` (run on its worker thread)."""

    def _load_job(self, client_id: str, queued_limit: int | None) -> SessionState | None:
        conn = self._db()
        if client_id not in self._leases:
            if session_id(conn, client_id) is None:
                return None
            self._leases.ensure(client_id)
        now = self._clock()
        result: SessionState | StoreError | None
        # One write transaction: the access time, an expiry or a quarantine all commit with it.
        with transaction(conn):
            meta = self._meta_or_quarantine(conn, client_id)
            if meta is None or isinstance(meta, SessionCorrupt):
                result = meta
            elif meta.expired(now):
                delete_rows(conn, meta.sid)
                result = SessionExpired(f"session {client_id!r} expired and was removed")
            else:
                try:
                    result = read_state(conn, client_id, meta, queued_limit)
                except BadRow as bad:
                    result = self._quarantine_session(conn, meta.sid, client_id, bad.reason)
                else:
                    conn.execute(
                        "UPDATE sessions SET last_access = ? WHERE sid = ?", (now, meta.sid)
                    )
        if isinstance(result, StoreError):
            raise result
        return result

    def _read_queued_job(self, client_id: str, after_seq: int, limit: int) -> list[StoredMessage]:
        conn = self._db()
        sid = session_id(conn, client_id)
        if sid is None or limit == 0 or after_seq >= INT64_MAX:
            return []
        self._leases.ensure(client_id)
        try:
            if after_seq < INT64_MIN:  # below every 64-bit integer SQLite can hold
                rows = fetch(conn, "messages", SELECT_QUEUED_FIRST, (sid, limit))
            else:
                rows = fetch(conn, "messages", SELECT_QUEUED_AFTER, (sid, after_seq, limit))
            return [message_from_row(row) for row in rows]
        except BadRow as bad:
            with transaction(conn):
                if session_id(conn, client_id) == sid:
                    error = self._quarantine_session(conn, sid, client_id, bad.reason)
                else:  # pragma: no cover - needs another writer between the two statements
                    error = SessionCorrupt(bad.reason, location=self._path)
            raise error from None

    def _exists_job(self, client_id: str) -> bool:
        row = self._db().execute(SELECT_META, (client_id,)).fetchone()
        if row is None:
            return False
        try:
            meta = meta_from_row(row)
        except BadRow:
            return True  # load() reports it (and quarantines it)
        return not meta.expired(self._clock())

    def _list_job(self) -> list[SessionInfo]:
        return [
            session_info(
                client_id,
                created_at=meta.created_at,
                last_access=meta.last_access,
                ttl=meta.ttl,
                inflight=meta.inflight,
                queued=meta.queued,
                set_aside=meta.set_aside,
            )
            for client_id, meta in list_metas(self._db(), self._path)
        ]
