"""The flusher: where the session's output is committed, then sent, then reported.

One task drains the session's outbox in a loop. Each pass takes everything the session
produced, commits its store operations with one ``store.apply`` (group commit: whatever
accumulated while the previous commit was under way rides along), and only then writes its
packets to the connection and resolves the callers waiting for it. Committing before writing is
the write-ahead rule every guarantee rests on (docs/architecture.md). When the session holds
only a prefix of a long queue in memory, the pass also reads the next messages back from the
store once everything before them is committed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import anyio

from mqtt_persist.client.connection import ConnectionSupervisor
from mqtt_persist.client.dispatch import EventDispatcher
from mqtt_persist.client.signals import CommitTicket, Signal
from mqtt_persist.errors import ClientClosed, MqttPersistError, StoreError
from mqtt_persist.log import ClientLogger
from mqtt_persist.metrics import ClientMetrics
from mqtt_persist.session.machine import Session
from mqtt_persist.session.state import MessageRemoved, Operation
from mqtt_persist.session.transitions import ConnectionState
from mqtt_persist.stores.base import SessionStore

#: How long acknowledged-message removals may wait for another commit to share its fsync.
DEFER_SECONDS = 0.05
_DEFER_MAX_OPS = 10_000


def _loop_clock() -> Callable[[], float]:
    """``anyio.current_time`` without its backend lookup per call on asyncio (the loop's own
    ``time``: 0.07 µs against 0.7 µs; every flusher pass reads it)."""
    try:
        return asyncio.get_running_loop().time
    except RuntimeError:
        return anyio.current_time


class Flusher:
    """Commits, sends and reports the session's output; runs as the client's flusher task."""

    def __init__(
        self,
        session: Session,
        store: SessionStore,
        *,
        client_id: str,
        durable: bool,
        connection: ConnectionSupervisor,
        dispatcher: EventDispatcher,
        log: ClientLogger,
        fail: Callable[[BaseException], None],
        wake: Signal,
        metrics: ClientMetrics | None = None,
    ) -> None:
        self._session = session
        self._store = store
        self._client_id = client_id
        self._durable = durable
        self._connection = connection
        self._dispatcher = dispatcher
        self._log = log
        self._fail = fail
        self._metrics = metrics
        #: Set when the session has output; publish() and the connection set it.
        self.wake = wake
        #: Set after every pass; drain() waits on it.
        self.flushed = Signal()
        #: Set when a pass left the queue with room; a blocked publish() waits on it.
        self.room = Signal()
        self.room.set()
        # Passes run in this task only (one at a time, so batches reach the wire in the order
        # they were committed); a closing client asks it for the last ones (finish()).
        self._busy = False
        self._finishing = False
        self._stopped = Signal()
        self._finish_error: Exception | None = None
        # The callers waiting for the commit of what the session produces next.
        self._next_commit: CommitTicket | None = None
        # A commit cancelled half way (the client closed): its callers are failed on close.
        self._abandoned: list[CommitTicket] = []
        # MessageRemoved operations waiting to ride along with the next commit (_can_defer).
        self._deferred_ops: list[Operation] = []
        self._deferred_since: float | None = None
        # Set while deferred removals wait for the deferral timer (deferral_timer()).
        self._timer_armed = Signal()
        # (generation, still connecting) of the last phase of a connection whose first packets
        # followed a commit: see _confirm_owner.
        self._owner_confirmed: tuple[int, bool] | None = None
        # anyio.current_time, looked up once (_loop_clock).
        self._clock: Callable[[], float] | None = None
        # The connection generation renewed for shed messages (renew it once).
        self._renewed = 0

    # --- what the client's public calls use --------------------------------------------------

    async def committed(self) -> None:
        """Wait until everything the session produced so far is committed."""
        ticket = self._next_commit
        if ticket is None:
            ticket = self._next_commit = CommitTicket()
        self.wake.set()
        # ticket.wait(), one coroutine frame less on the hot path of every durable publish.
        await ticket.done.wait()
        if ticket.error is not None:
            raise ticket.error

    @property
    def idle(self) -> bool:
        """No pass under way and no deferred operations: everything taken was committed."""
        return not self._busy and not self._deferred_ops

    def fail_waiting(self, error: BaseException) -> None:
        """Every caller still waiting for a commit raises ``error``.

        A :class:`ClientClosed` says, in place of the generic words, what the close did to the
        caller's message: a commit cut short may or may not have reached the store, and one
        that never started did not.
        """
        closed = isinstance(error, ClientClosed)
        for ticket in self._abandoned:
            ticket.resolve(
                ClientClosed(
                    "the client closed while this call's commit was under way: the message may "
                    "or may not be in the store (the next client with the same id and store "
                    "sends it if it is)"
                )
                if closed
                else error
            )
        self._abandoned.clear()
        if self._next_commit is not None:
            self._next_commit.resolve(
                ClientClosed(
                    "the client closed before this call's commit started: the message was not "
                    "stored"
                )
                if closed
                else error
            )
            self._next_commit = None

    # --- the task ----------------------------------------------------------------------------

    async def run(self) -> None:
        """The flusher task: a pass whenever there is work, until a store error stops it or
        :meth:`finish` asks for the last passes."""
        wake = self.wake
        try:
            while not self._finishing:
                if wake.is_set():  # under load it is
                    # Nothing else in a pass is sure to yield (a send that the kernel takes at
                    # once does not): let the reader and the publishers in between passes.
                    await anyio.lowlevel.checkpoint()
                else:
                    await wake.wait()
                wake.clear()
                if self._finishing:
                    break
                try:
                    await self._flush_once()
                except StoreError as exc:
                    self.fail_waiting(exc)
                    self._fail(exc)
                    await self._connection.drop()
                    return
                except Exception as exc:  # a bug; never leave callers hanging silently
                    self._log.exception("flusher failed")
                    error = MqttPersistError(f"internal error in the flusher: {exc!r}")
                    # No pass commits for them any more, as after a store error.
                    self.fail_waiting(error)
                    self._fail(error)
                    await self._connection.drop()
                    return
            try:
                await self._flush_all()
            except Exception as exc:  # finish() raises it in the closing client's task
                self._finish_error = exc
        finally:
            self._stopped.set()

    async def deferral_timer(self) -> None:
        """A task of its own: wakes the flusher once deferred removals are DEFER_SECONDS old.

        A sequential durable publisher starts a deferral for nearly every message; a timer
        armed only when none is pending serves them all with a wake-up every DEFER_SECONDS,
        where a cancel-scope deadline around each wait of the flusher cost ~6 µs a message
        (``anyio.CancelScope`` enter and exit, against ~2.5 µs for ``call_later`` before).
        """
        armed = self._timer_armed
        while True:
            await armed.wait()
            since = self._deferred_since
            if since is None:  # committed meanwhile
                armed.clear()
                continue
            delay = since + DEFER_SECONDS - anyio.current_time()
            if delay > 0:
                await anyio.sleep(delay)  # then look again: a later deferral may be pending
                continue
            armed.clear()
            self.wake.set()

    async def finish(self) -> None:
        """Commit and send everything left, deferred removals included (a closing client).

        The flusher task runs the last passes and ends; whatever they raise is raised here.
        If the task had stopped already (after an error), the passes run in the caller's task.
        """
        if self._stopped.is_set():
            await self._flush_all()
            return
        self._finishing = True
        self.wake.set()
        await self._stopped.wait()
        if self._finish_error is not None:
            raise self._finish_error

    async def _flush_all(self) -> None:
        session = self._session
        while session.has_output() or self._next_commit is not None or self._deferred_ops:
            await self._flush_once(force=True)

    # --- one pass ----------------------------------------------------------------------------

    async def _flush_once(self, *, force: bool = False) -> None:
        self._busy = True
        try:
            session = self._session
            clock = self._clock
            if clock is None:
                clock = self._clock = _loop_clock()
            now = clock()
            outbox = session.take(now)
            ticket, self._next_commit = self._next_commit, None
            ops = outbox.ops
            if self._deferred_ops:
                ops = self._deferred_ops + ops
                self._deferred_ops = []
            committed = False
            if ops and not force and ticket is None and self._can_defer(ops, now):
                self._deferred_ops = ops
            elif ops:
                self._deferred_since = None
                await self._commit(ops, ticket)
                committed = True
            if outbox.packets and self._owner_unconfirmed(outbox.generation, committed):
                await self._commit([], ticket)
            if ticket is not None:
                ticket.resolve()
            if outbox.packets:
                await self._connection.send(outbox.packets, outbox.generation)
            if outbox.events:
                self._dispatcher.dispatch(outbox.events)
            if session.wants_reconnect and self._renewed != outbox.generation:
                # Messages the broker sent past its flow control were let go (inbound_acks.py);
                # a new connection makes it send them again.
                self._renewed = outbox.generation
                self._log.info("renewing the connection: the broker resends the messages shed")
                await self._connection.renew(outbox.generation)
            # Everything taken so far is committed, which read_queued needs to see it.
            request = session.want_refill()
            if request is not None:
                try:
                    messages = await self._store.read_queued(self._client_id, *request)
                except StoreError:
                    raise
                except Exception as exc:
                    raise StoreError(f"store failed to read queued messages: {exc!r}") from exc
                session.refill(messages)
            if session.has_output():
                self.wake.set()
            elif not session.queue_is_full:
                self.room.set()
            self.flushed.set()
        finally:
            self._busy = False

    async def _commit(self, ops: list[Operation], ticket: CommitTicket | None) -> None:
        """``store.apply`` the batch; the callers waiting for it learn if it failed."""
        metrics = self._metrics
        try:
            if metrics is None:
                await self._store.apply(self._client_id, ops)
            else:
                started = time.perf_counter()
                await self._store.apply(self._client_id, ops)
                metrics.commit(time.perf_counter() - started, len(ops))
        except Exception as exc:
            error = (
                exc
                if isinstance(exc, StoreError)
                else StoreError(f"store failed to write the session journal: {exc!r}")
            )
            # These publish() calls were waiting for exactly this commit: they must learn
            # that their messages were not accepted, not wait forever.
            if ticket is not None:
                ticket.resolve(error)
            if error is exc:
                raise
            raise error from exc
        except BaseException:
            # Cancelled (the client is closing): the client's close fails these callers.
            if ticket is not None:
                self._abandoned.append(ticket)
            raise

    def _owner_unconfirmed(self, generation: int, committed: bool) -> bool:
        """Whether a pass must commit (an empty batch if need be) before its packets: before a
        connection's CONNECT and before its first packets after CONNACK.

        A shared store (Redis, PostgreSQL) checks the session's fencing token with every
        write, and these packets come with none: a CONNECT takes the client id's connection
        from whoever has it (the broker drops the other), and the first packets after CONNACK
        resend the open flows under their stored packet IDs. A former owner that wakes up after
        another process took the session over must do neither; this commit raises
        SessionFenced for it first, which stops the client before anything is sent. Two empty
        commits per connection cost nothing that matters, and other stores need not know.
        """
        phase = (generation, self._session.connection_state is ConnectionState.CONNECTING)
        if phase == self._owner_confirmed:
            return False
        self._owner_confirmed = phase
        return not committed

    def _can_defer(self, ops: list[Operation], now: float) -> bool:
        """Whether a batch may wait for the next commit instead of costing an fsync of its own.

        Only a batch of nothing but MessageRemoved qualifies: no packet depends on it, and
        losing it in a crash means a message the broker already acknowledged is sent once more
        after the restart (QoS 1: at least once allows it; QoS 2: it resumes with PUBREL, which
        the broker answers without delivering again). It waits at most DEFER_SECONDS, so a
        sequential publisher pays one fsync per message instead of two.
        """
        if not self._durable or len(ops) > _DEFER_MAX_OPS:
            return False
        if any(type(op) is not MessageRemoved for op in ops):
            return False
        if self._deferred_since is None:
            # The deferral timer wakes the flusher at the deadline if nothing else does.
            self._deferred_since = now
            self._timer_armed.set()
            return True
        return now - self._deferred_since < DEFER_SECONDS
