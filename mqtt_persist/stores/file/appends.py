"""The file store's write path: a batch planned as one record, appended or compacted.

``apply`` appends on the event loop when it may (``core.FileStoreCore._writable_here``), otherwise
as a job; a batch that would grow the journal too far compacts it instead (``snapshot``);
``save`` rewrites the journal from a state.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from functools import partial
from typing import NamedTuple

from mqtt_persist.errors import SessionCorrupt, StoreError
from mqtt_persist.session.state import Operation, SessionState
from mqtt_persist.stores.file import snapshot
from mqtt_persist.stores.file.core import FileStoreCore
from mqtt_persist.stores.file.journal import (
    RECORD,
    encode_body,
    encode_record,
    reader,
)
from mqtt_persist.stores.file.session import OpenSession
from mqtt_persist.stores.file.writer import (
    Commit,
    fresh,
)


class _Planned(NamedTuple):
    """A batch encoded as the record an append would write."""

    record: bytes
    #: Where the batch's first operation lies once the record is appended.
    ops_offset: int
    now: float
    #: Whether the record carries the last access time.
    record_access: bool
    #: False: the journal must be rewritten instead (there is none yet, or it is to be compacted).
    fits: bool


class FileAppends(FileStoreCore):
    """The write path of a :class:`FileStore`."""

    def _plan(self, session: OpenSession, encoded: list[bytes], now: float) -> _Planned:
        """The record a batch of these encoded operations becomes, appended to ``session``."""
        record_access = now - session.persisted_access >= self._access_write_interval
        ops_bytes = b"".join(encoded)
        body = encode_body(ops_bytes, last_access=now if record_access else None)
        record = encode_record(body)
        ops_offset = session.size + RECORD.size + len(body) - len(ops_bytes)
        limit = max(self._compact_threshold, 4 * session.snapshot_size)
        fits = session.fd is not None and session.size + len(record) <= limit
        return _Planned(record, ops_offset, now, record_access, fits)

    def _append(
        self,
        session: OpenSession,
        ops: Sequence[Operation],
        encoded: list[bytes],
        planned: _Planned,
        committed: asyncio.Future[None] | None,
    ) -> bool:
        """Write the planned record (on the loop or the worker thread); True: ``committed``
        resolves once it is durable (and in the index). Without fsync it is done already."""
        session.append(planned.record)
        session.last_access = planned.now
        if planned.record_access:
            session.persisted_access = planned.now
        if committed is None:
            session.index.apply_batch(ops, encoded, planned.ops_offset)  # the write was the commit
            return False
        # A tuple: the operations are read again after the caller may have stopped waiting.
        settle = partial(session.index.apply_batch, tuple(ops), encoded, planned.ops_offset)
        try:
            self._syncer.submit(Commit(session, settle, committed.get_loop(), committed))
        except BaseException as exc:
            # Written but never to be synced or indexed (no thread could start): cut off
            # again, so a failed apply leaves nothing, as a failed write does. The session's
            # size and access times still count the record: the next call reads the file again.
            session.cut_last(len(planned.record))
            session.broken = True
            if isinstance(exc, Exception):
                raise StoreError(
                    f"no thread to sync the record for {session.paths.journal} ({exc}); "
                    "nothing of it was stored"
                ) from exc
            raise
        return True

    def _append_here(
        self,
        client_id: str,
        ops: Sequence[Operation],
        encoded: list[bytes],
        committed: asyncio.Future[None] | None,
    ) -> bool:
        """Append a non-empty batch on the event loop if it may (``_writable_here``) and the
        record fits; False: it must be a job. ``committed`` as for :meth:`_append`."""
        session = self._writable_here(client_id)
        if session is None:
            return False
        planned = self._plan(session, encoded, self._clock())
        if not planned.fits:
            return False
        self._append(session, ops, encoded, planned, committed)
        return True

    def _save_job(self, state: SessionState) -> None:
        client_id = state.client_id
        try:
            session = self._session(client_id)
        except SessionCorrupt:
            # The damaged journal was moved aside; the snapshot replaces it anyway.
            session = self._session(client_id)
        source = snapshot.state_source(state)
        session.rewrite(source, snapshot.meta_of(state), state.last_seq, self._clock())

    def _apply_job(
        self,
        client_id: str,
        ops: Sequence[Operation],
        encoded: list[bytes],
        committed: asyncio.Future[None] | None,
    ) -> bool:
        """An apply the loop could not do; True: ``committed`` resolves once it is durable."""
        if not ops:
            if (session := self._sessions.get(client_id)) is not None:
                if session.sync_error is not None:
                    raise fresh(session.sync_error)
                session.last_access = self._clock()
            return False
        session = self._session(client_id)
        planned = self._plan(session, encoded, self._clock())
        if planned.fits:
            return self._append(session, ops, encoded, planned, committed)
        # Compact instead of appending: replay the batch onto the index as if the record
        # followed the journal, and stream the result from both into a new file (durable when
        # the rewrite returns).
        record = planned.record
        index = session.index
        index.apply_batch(ops, encoded, planned.ops_offset)
        read = reader(session.fd, session.size, record)
        try:
            source = snapshot.index_source(read, session.size + len(record), index)
            session.rewrite(source, index.meta, index.last_seq, planned.now)
        except BaseException:
            if session.index is index:
                # The index holds a batch the journal does not (a copy would have cost
                # another index): forget the session, so it is read from the file again.
                self._forget(session)
            raise
        return False
