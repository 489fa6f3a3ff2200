"""An in-process session store: survives a client restart, not a process restart.

Give the same :class:`MemoryStore` object to a new client (in the same process) and it restores
the session the previous client left. Nothing is written anywhere, so a crash or a process exit
loses everything; use :class:`~mqtt_persist.stores.file.FileStore` for that.
"""

from __future__ import annotations

import asyncio
import time
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mqtt_persist.errors import SessionExpired, SessionLocked
from mqtt_persist.session.state import (
    Operation,
    SessionState,
    SetAsideMessage,
    StoredMessage,
    with_flow,
)
from mqtt_persist.stores._checks import check_operations, check_queued_limit, check_read_limit
from mqtt_persist.stores._expiry import is_expired, session_info, ttl_from
from mqtt_persist.stores.base import SessionInfo, StoreContext

__all__ = ["MemoryStore"]


@dataclass(slots=True)
class _Entry:
    state: SessionState
    created_at: float
    last_access: float
    #: Seconds after ``last_access`` at which the session expires; None: never.
    ttl: float | None = None

    def expired(self, now: float) -> bool:
        return is_expired(self.last_access, self.ttl, now)


class MemoryStore(StoreContext):
    """A :class:`~mqtt_persist.stores.base.SessionStore` that keeps sessions in a dict.

    Every method completes without yielding to the event loop, so concurrent tasks are
    serialized by asyncio itself and need no lock. The store keeps its own copies:
    :meth:`apply` replays operations (immutable values) onto a state no caller can reach, and
    :meth:`load` returns a new state (sharing only the immutable messages). Holding everything
    in memory is what this store is for, so ``load(queued_limit=...)`` and :meth:`read_queued`
    only shape what a caller gets back; they save the caller memory, not the store.

    Leases are per store object: a second :meth:`acquire` of the same client id raises
    :class:`~mqtt_persist.errors.SessionLocked` until :meth:`release` (or :meth:`close`).
    :meth:`close` releases leases but keeps the data, so a closed store can be re-opened by the
    next client. ``clock`` (seconds, like :func:`time.time`) drives last access and expiry.
    """

    #: Nothing survives the process, so the client need not wait for :meth:`apply`.
    durable = False

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        """Create an empty store; ``clock`` returns the current Unix time in seconds."""
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._leases: set[str] = set()

    async def open(self) -> None:
        """Nothing to prepare. Idempotent."""

    async def close(self) -> None:
        """Release every lease; the sessions stay for the next client. Idempotent."""
        self._leases.clear()

    async def acquire(self, client_id: str) -> None:
        """Take the lease of ``client_id``; :class:`SessionLocked` if this store already has."""
        if client_id in self._leases:
            raise SessionLocked(f"session {client_id!r} is already held by a client of this store")
        self._leases.add(client_id)

    async def release(self, client_id: str) -> None:
        """Give the lease back. Idempotent."""
        self._leases.discard(client_id)

    def _live_entry(self, client_id: str) -> _Entry | None:
        """The entry, or None; an expired entry is removed and reported as SessionExpired."""
        entry = self._entries.get(client_id)
        if entry is not None and entry.expired(self._clock()):
            del self._entries[client_id]
            raise SessionExpired(f"session {client_id!r} expired and was removed")
        return entry

    async def load(self, client_id: str, *, queued_limit: int | None = None) -> SessionState | None:
        """A copy of the stored session, or None; updates its last access.

        With ``queued_limit``, only the first ``queued_limit`` queued messages (lowest sequence
        numbers) are in the copy, and ``queued_not_loaded`` counts the others.
        """
        check_queued_limit(queued_limit)
        entry = self._live_entry(client_id)
        if entry is None:
            return None
        entry.last_access = self._clock()
        state = entry.state
        if queued_limit is None:
            return state.copy()
        messages: dict[int, StoredMessage] = {}
        queued = loaded = 0
        for seq, message in state.messages.items():
            if message.packet_id is None:
                queued += 1
                if loaded >= queued_limit:
                    continue
                loaded += 1
            messages[seq] = message
        return SessionState(
            client_id,
            messages,
            set(state.inbound_qos2),
            dict(state.subscriptions),
            set(state.pending_unsubscribes),
            last_seq=state.last_seq,
            queued_not_loaded=queued - loaded,
            set_aside=dict(state.set_aside),
            protocol_version=state.protocol_version,
        )

    async def read_queued(self, client_id: str, after_seq: int, limit: int) -> list[StoredMessage]:
        """Queued messages with ``seq > after_seq``, ascending, at most ``limit``.

        Like :meth:`apply` (and unlike :meth:`load`) this does not check expiry: the caller
        holds the session. It counts as an access.
        """
        check_read_limit(limit)
        entry = self._entries.get(client_id)
        if entry is None or limit == 0:
            return []
        entry.last_access = self._clock()
        messages = entry.state.messages
        # The state keeps its messages in ascending order (save() sorts a snapshot's), so a
        # bisection over the keys skips what the caller already has.
        seqs = list(messages)
        found: list[StoredMessage] = []
        for seq in seqs[bisect_right(seqs, after_seq) :]:
            message = messages[seq]
            if message.packet_id is None:
                found.append(message)
                if len(found) >= limit:
                    break
        return found

    async def save(self, state: SessionState) -> None:
        """Replace the stored session with a copy of ``state`` (keeps created_at and TTL).

        The copy holds exactly ``state``'s messages: queued messages a ``load`` with
        ``queued_limit`` left out of ``state`` are not kept.
        """
        now = self._clock()
        stored = state.copy()
        stored.messages = dict(sorted(stored.messages.items()))
        # As a replay of the snapshot keeps them: by their own number, out of the flow.
        stored.set_aside = {
            a.message.seq: SetAsideMessage(with_flow(a.message), a.reason, a.at)
            for a in sorted(state.set_aside.values(), key=lambda a: a.message.seq)
        }
        stored.queued_not_loaded = 0
        stored.last_seq = max(
            stored.last_seq, next(reversed(stored.messages), 0), next(reversed(stored.set_aside), 0)
        )
        entry = self._entries.get(state.client_id)
        if entry is None:
            self._entries[state.client_id] = _Entry(stored, now, now)
        else:
            entry.state = stored
            entry.last_access = now

    async def apply(self, client_id: str, ops: Sequence[Operation]) -> None:
        """Replay ``ops`` onto the stored session, creating it if there is none.

        An empty batch only counts as an access. Like every store, ``apply`` does not check
        expiry: the caller holds the session.
        """
        self._apply_now(client_id, ops)

    def begin_apply(
        self, client_id: str, ops: Sequence[Operation], durable: asyncio.Future[None]
    ) -> bool:
        """:meth:`apply` without an ``await``: applied, and ``durable`` resolved, on return
        (:class:`~mqtt_persist.stores.base.StartsCommits`)."""
        self._apply_now(client_id, ops)
        durable.set_result(None)
        return True

    def _apply_now(self, client_id: str, ops: Sequence[Operation]) -> None:
        # The same check as every store, on the whole batch before the state is touched, so a
        # bad one applies nothing.
        check_operations(ops)
        now = self._clock()
        entry = self._entries.get(client_id)
        if entry is None:
            if not ops:
                return
            entry = self._entries[client_id] = _Entry(SessionState(client_id), now, now)
        state = entry.state
        for op in ops:
            state.apply(op)
        entry.last_access = now

    async def delete(self, client_id: str) -> None:
        """Remove the stored session (the lease, if held, stays held). Idempotent."""
        self._entries.pop(client_id, None)

    async def exists(self, client_id: str) -> bool:
        """True when a non-expired session is stored."""
        entry = self._entries.get(client_id)
        return entry is not None and not entry.expired(self._clock())

    async def list_sessions(self) -> list[SessionInfo]:
        """Every stored session, expired ones included."""
        infos = []
        for client_id, entry in self._entries.items():
            inflight = sum(1 for m in entry.state.messages.values() if m.packet_id is not None)
            infos.append(
                session_info(
                    client_id,
                    created_at=entry.created_at,
                    last_access=entry.last_access,
                    ttl=entry.ttl,
                    inflight=inflight,
                    queued=len(entry.state.messages) - inflight,
                    set_aside=len(entry.state.set_aside),
                )
            )
        return infos

    async def update_ttl(self, client_id: str, seconds: float | None) -> None:
        """Expire the session ``seconds`` after its last access (None or 0: never).

        Creates an empty session when none is stored (an expired one counts as none), so the
        expiry is in force from now on even before the first operation is applied.
        """
        ttl = ttl_from(seconds)
        now = self._clock()
        entry = self._entries.get(client_id)
        if entry is None or entry.expired(now):
            entry = self._entries[client_id] = _Entry(SessionState(client_id), now, now)
        entry.ttl = ttl

    async def cleanup_expired(self) -> int:
        """Remove every expired session not held by a lease; returns how many were removed."""
        now = self._clock()
        expired = [
            client_id
            for client_id, entry in self._entries.items()
            if client_id not in self._leases and entry.expired(now)
        ]
        for client_id in expired:
            del self._entries[client_id]
        return len(expired)
