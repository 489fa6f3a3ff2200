"""The SQLite store's write jobs: save, and applies gathered into one transaction.

Each gathered batch runs in its own ``SAVEPOINT`` (``_apply_gathered_job``); what each
operation does to the tables is ``operations.HANDLERS``.
"""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Sequence
from typing import Any

from mqtt_persist.session.state import Operation, SessionState
from mqtt_persist.stores._worker import Outcome
from mqtt_persist.stores.sqlite.core import SQLiteStoreCore
from mqtt_persist.stores.sqlite.operations import HANDLERS
from mqtt_persist.stores.sqlite.rows import (
    Meta,
    create_session,
    delete_data,
    session_id,
)
from mqtt_persist.stores.sqlite.schema import (
    DamagedFile,
    is_file_corruption,
    transaction,
)


class SQLiteWrites(SQLiteStoreCore):
    """The write jobs of a :class:`SQLiteStore` (run on its worker thread)."""

    def _save_job(self, state: SessionState) -> None:
        client_id = state.client_id
        self._leases.ensure(client_id)
        conn = self._db()
        now = self._clock()
        with transaction(conn):
            meta = self._meta_or_quarantine(conn, client_id)
            if isinstance(meta, Meta):
                sid = meta.sid
                delete_data(conn, sid)
            else:
                # No session, or one with unreadable metadata, now in quarantine: start anew.
                sid = create_session(conn, client_id, now)
            _apply_rules(conn, sid, state.to_operations())
            # Never lower last_seq: a new message must not reuse a number already handed out.
            conn.execute(
                "UPDATE sessions SET last_access = ?, last_seq = max(last_seq, ?) WHERE sid = ?",
                (now, state.last_seq, sid),
            )

    def _apply_gathered_job(self, calls: Sequence[tuple[Any, ...]]) -> list[Outcome]:
        """The applies ``(client_id, ops)`` queued together, in ONE transaction and ONE COMMIT.

        Each batch runs inside its own savepoint: one that fails (a bad row, a constraint, a
        lease held elsewhere) is rolled back to it and fails alone, and the others commit. A
        failure of the transaction itself (BEGIN, COMMIT, a damaged file, SQLite rolling the
        whole transaction back on a full disk or an I/O error) fails every batch in it. Each
        caller learns its own outcome once the COMMIT holding its batch returned.
        """
        outcomes: list[Outcome] = [(None, None)] * len(calls)
        try:
            conn = self._db()
            included: list[int] = []
            for i, (client_id, ops) in enumerate(calls):
                try:
                    # An empty batch is only an access, and only to a session that exists.
                    if ops or session_id(conn, client_id) is not None:
                        self._leases.ensure(client_id)
                        included.append(i)
                except Exception as exc:
                    if _damaged(exc):
                        raise
                    outcomes[i] = (None, self._batch_error(exc))
            if not included:
                return outcomes
            now = self._clock()
            with transaction(conn):
                for i in included:
                    client_id, ops = calls[i]
                    conn.execute("SAVEPOINT apply")
                    try:
                        _apply_batch(conn, client_id, ops, now)
                    except Exception as exc:
                        # A damaged file, or SQLite rolled the whole transaction back (a full
                        # disk, an I/O error): every batch fails.
                        if _damaged(exc) or not conn.in_transaction:
                            raise
                        conn.execute("ROLLBACK TO apply")
                        outcomes[i] = (None, self._batch_error(exc))
                    conn.execute("RELEASE apply")
        except Exception as exc:
            error = self._store_error(exc)
            for i, (_, failed) in enumerate(outcomes):
                if failed is None:
                    outcomes[i] = (None, _copy_error(error, exc))
        return outcomes

    def _batch_error(self, exc: Exception) -> Exception:
        """The store's error for one batch that failed on its own."""
        error = self._store_error(exc)
        if error is not exc:
            error.__cause__ = exc
        return error


def _apply_batch(
    conn: sqlite3.Connection, client_id: str, ops: Sequence[Operation], now: float
) -> None:
    """Inside a transaction: one apply's batch (creating the session), stamped ``now``."""
    if not ops:
        conn.execute("UPDATE sessions SET last_access = ? WHERE client_id = ?", (now, client_id))
        return
    sid = session_id(conn, client_id)
    if sid is None:
        sid = create_session(conn, client_id, now)
    else:
        conn.execute("UPDATE sessions SET last_access = ? WHERE sid = ?", (now, sid))
    _apply_rules(conn, sid, ops)


def _damaged(exc: Exception) -> bool:
    """Whether ``exc`` says the database file itself is damaged."""
    return isinstance(exc, DamagedFile) or (
        isinstance(exc, sqlite3.DatabaseError) and is_file_corruption(exc)
    )


def _copy_error(error: Exception, cause: BaseException) -> Exception:
    """A copy of ``error`` for one more caller (one instance raised in many tasks would
    collect all their tracebacks), made without calling its ``__init__``."""
    duplicate = type(error).__new__(type(error))
    duplicate.args = error.args
    duplicate.__dict__.update(error.__dict__)
    duplicate.__cause__ = cause
    return duplicate


def _apply_rules(conn: sqlite3.Connection, sid: int, ops: Sequence[Operation]) -> None:
    """Apply operations through :data:`~.operations.HANDLERS`, a run of one type at a time."""
    for op_type, group in itertools.groupby(ops, type):
        HANDLERS[op_type](conn, sid, list(group))
