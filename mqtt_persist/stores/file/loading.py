"""The file store's read jobs: loading a session and reading queued messages back.

Opening a journal repairs a torn tail (``core.FileStoreCore._session``); the payloads are read
back with positioned reads (``readback``).
"""

from __future__ import annotations

from mqtt_persist.errors import SessionExpired
from mqtt_persist.session.state import SessionState, StoredMessage
from mqtt_persist.stores._expiry import is_expired
from mqtt_persist.stores.file.core import FileStoreCore
from mqtt_persist.stores.file.index import Entry
from mqtt_persist.stores.file.journal import (
    Damaged,
    read_and_parse,
    recorded_access,
)
from mqtt_persist.stores.file.readback import read_messages
from mqtt_persist.stores.file.session import OpenSession


class FileLoading(FileStoreCore):
    """The read jobs of a :class:`FileStore` (run on its worker thread)."""

    def _load_job(self, client_id: str, queued_limit: int | None) -> SessionState | None:
        if client_id not in self._sessions and not self._has_journal(client_id):
            return None
        session = self._session(client_id)
        if session.fd is None:
            return None
        now = self._clock()
        if session.expired(now):
            self._remove_journal(client_id)
            raise SessionExpired(f"session {client_id!r} expired and was removed")
        session.last_access = now
        index = session.index
        queued = index.queued_after(None, queued_limit)
        entries = sorted(queued + index.inflight_entries()) if index.inflight else queued
        aside = self._read(session, index.set_aside_entries())
        return index.to_state(self._read(session, entries), len(queued), aside)

    def _read_queued_job(self, client_id: str, after_seq: int, limit: int) -> list[StoredMessage]:
        if client_id not in self._sessions and not self._has_journal(client_id):
            return []
        session = self._session(client_id)
        if session.fd is None:
            return []
        session.last_access = self._clock()
        return self._read(session, session.index.queued_after(after_seq, limit))

    def _read(self, session: OpenSession, entries: list[Entry]) -> list[StoredMessage]:
        """The messages of ``entries``, read back from the session's journal."""
        if not entries:
            return []
        assert session.fd is not None
        return read_messages(session.fd, session.size, entries)

    def _exists_job(self, client_id: str) -> bool:
        session = self._sessions.get(client_id)
        if session is not None:
            return session.fd is not None and not session.expired(self._clock())
        result = read_and_parse(self._paths(client_id).journal, False)
        if result is None:
            return False
        if isinstance(result, Damaged):
            return True  # load() reports it (and quarantines it)
        return not is_expired(recorded_access(result), result.ttl, self._clock())
