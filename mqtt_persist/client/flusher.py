"""The flusher: where the session's output is committed, then sent, then reported.

One task drains the session's outbox in a loop. Each pass takes everything the session
produced, commits its store operations with one ``store.apply`` (group commit: whatever
accumulated while the previous commit was under way rides along), and only then writes its
packets to the connection and resolves the callers waiting for it. Committing before writing is
the write-ahead rule every guarantee rests on (docs/architecture.md). When the session holds
only a prefix of a long queue in memory, the pass also reads the next messages back from the
store once everything before them is committed.

A durable ``publish()`` that finds the flusher with nothing under way runs the commit itself
(:meth:`Flusher.commit_inline`): it takes the session's output and starts its commit from its
own task, and leaves sending to the flusher task, which sends each committed batch in commit
order. A one-at-a-time publisher so pays no hop to another task and back before its commit, and
its packets go out while its next message is being synced.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from functools import partial

import anyio

from mqtt_persist.client.connection import ConnectionSupervisor
from mqtt_persist.client.dispatch import EventDispatcher
from mqtt_persist.client.inline_commit import CommitFuture, outcome_into, pairs_apply
from mqtt_persist.client.signals import CommitTicket, Signal
from mqtt_persist.errors import ClientClosed, MqttPersistError, StoreError
from mqtt_persist.log import ClientLogger
from mqtt_persist.metrics import ClientMetrics
from mqtt_persist.protocol.packets import Packet
from mqtt_persist.session.events import Event
from mqtt_persist.session.machine import Session
from mqtt_persist.session.output import Outbox
from mqtt_persist.session.state import MessageRemoved, Operation
from mqtt_persist.session.transitions import ConnectionState
from mqtt_persist.stores.base import SessionStore, StartsCommits

#: How long acknowledged-message removals may wait for another commit to share its fsync.
DEFER_SECONDS = 0.05
_DEFER_MAX_OPS = 10_000
#: Inline commits that took no await (fsync=False) before their publisher yields to the other
#: tasks: the flusher sends their batches in one write. One write per message was a third of
#: the CPU of such a publisher (a loopback send costs ~20 µs); the window (20 by default)
#: still refills.
_YIELD_EVERY = 8


def _loop_clock() -> Callable[[], float]:
    """``anyio.current_time`` without its backend lookup per call on asyncio (the loop's own
    ``time``: 0.07 µs against 0.7 µs; every flusher pass reads it)."""
    try:
        return asyncio.get_running_loop().time
    except RuntimeError:
        return anyio.current_time


#: A committed batch waiting for the flusher task: its packets, their connection, its events.
_Committed = tuple[Sequence[Packet], int, Sequence[Event]]


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
        # Inline commits (commit_inline): the store's begin_apply, looked up on first use
        # (False: none, or not on asyncio); whether one is under way, and when it ends; the
        # batches committed and not yet sent, in commit order; a failed one's error.
        self._begin_apply: Callable[..., bool] | bool | None = None
        self._inline_committing = False
        self._inline_ended = Signal()
        self._to_send: deque[_Committed] = deque()
        self._inline_error: StoreError | None = None
        self._inline_failed = False  # set for good once one failed
        self._applying: asyncio.Task[None] | None = None
        # Inline commits in a row that took no await (_YIELD_EVERY).
        self._unyielded = 0
        # Callers waiting for the next commit, and whether the last commit served several:
        # then publishers come concurrently, and inline commits would split their batches.
        self._ticket_callers = 0
        self._concurrent = False

    # --- what the client's public calls use --------------------------------------------------

    async def committed(self) -> None:
        """Wait until everything the session produced so far is committed."""
        ticket = self._next_commit
        if ticket is None:
            ticket = self._next_commit = CommitTicket()
        self._ticket_callers += 1
        self.wake.set()
        # ticket.wait(), one coroutine frame less on the hot path of every durable publish.
        await ticket.done.wait()
        if ticket.error is not None:
            raise ticket.error

    @property
    def idle(self) -> bool:
        """No pass or commit under way, no deferred operations, nothing committed left unsent."""
        return (
            not self._busy
            and not self._deferred_ops
            and not self._inline_committing
            and not self._to_send
        )

    def can_commit_inline(self) -> bool:
        """Whether a durable ``publish()`` may commit from its own task now
        (:meth:`commit_inline`): on asyncio, with a store that starts commits without an
        ``await``, while no pass or other commit is under way and no caller waits for one,
        and while publishers come one at a time (the last commit served one caller)."""
        begin = self._begin_apply
        if begin is None:
            begin = self._begin_apply = self._find_begin_apply()
        return (
            begin is not False
            and not self._busy
            and not self._inline_committing
            and self._next_commit is None
            and not self._concurrent
            and not self._finishing
            and not self._inline_failed
            and not self._stopped.is_set()
        )

    def _find_begin_apply(self) -> Callable[..., bool] | bool:
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # trio: the commit futures are asyncio's
            return False
        store = self._store
        if not isinstance(store, StartsCommits) or not pairs_apply(store):
            return False
        return store.begin_apply

    async def commit_inline(self) -> None:
        """Commit what the session produced, from the calling task; sending is left to the
        flusher task. Only when :meth:`can_commit_inline`.

        Returns once the batch is durable; raises the store's error (which also stops the
        client, as a failed pass does). Cancelled while the commit is under way, the caller
        raises ``CancelledError`` once it ended (at most one sync later), and a durable batch
        is sent all the same: no commit is left half done with nobody to finish it.
        """
        session = self._session
        clock = self._clock
        if clock is None:
            clock = self._clock = _loop_clock()
        outbox = session.take(clock())
        ops = outbox.ops
        if self._deferred_ops:
            ops = self._deferred_ops + ops
            self._deferred_ops = []
        self._deferred_since = None
        begin = self._begin_apply
        assert callable(begin)
        durable = CommitFuture()
        metrics = self._metrics
        started = time.perf_counter() if metrics is not None else 0.0
        self._inline_committing = True
        self._inline_ended.clear()
        waited = False
        interrupted: BaseException | None = None
        try:
            if not begin(self._client_id, ops, durable):
                # The store needs apply() for this batch (rare: a compaction, a new session).
                # In a task of its own, which no cancellation of this one reaches (a native
                # task.cancel() goes through an anyio shield): a commit cut short would leave
                # the batch's fate unknown.
                applying = asyncio.get_running_loop().create_task(
                    self._store.apply(self._client_id, ops)
                )
                self._applying = applying  # a reference, or the task may be collected
                applying.add_done_callback(partial(outcome_into, durable))
            if not durable.done():
                waited = True
                await durable
        except Exception as exc:
            if not durable.done():
                durable.set_exception(exc)
        except BaseException as exc:  # a cancellation lands once the commit ended
            interrupted = exc
            if not durable.done():  # raised by begin_apply itself
                durable.set_exception(StoreError(f"the commit was interrupted: {exc!r}"))
        error = self._inline_settled(outbox, durable)
        if metrics is not None and error is None:
            metrics.commit(time.perf_counter() - started, len(ops))
        if interrupted is not None:
            raise interrupted
        if error is not None:
            raise error
        if waited:
            self._unyielded = 0
            return
        self._unyielded += 1
        if self._unyielded >= _YIELD_EVERY:
            # The commits took no await (fsync=False, a memory store): let the flusher task
            # send what they made durable (in one write) and the reader take the broker's
            # acknowledgements, or nothing would happen until this task waits for something.
            self._unyielded = 0
            await anyio.lowlevel.checkpoint()

    def _inline_settled(self, outbox: Outbox, durable: asyncio.Future[None]) -> StoreError | None:
        """The inline commit ended: queue its batch for sending, or hand its error to the
        flusher task (which stops the client); returns that error."""
        self._inline_committing = False
        self._inline_ended.set()
        self.wake.set()
        if self._next_commit is not None:
            # Callers came while it ran (a gather): one commit for all of them is cheaper
            # than one of their own for whoever comes first. The flusher's commits decide
            # when inline commits pay again (one caller per commit).
            self._concurrent = True
        exc = durable.exception()
        if exc is not None:
            error = (
                exc
                if isinstance(exc, StoreError)
                else StoreError(f"store failed to write the session journal: {exc!r}")
            )
            # Stopped now, as a failed pass stops it: nothing after this is accepted. The
            # flusher task drops the connection when it sees the error.
            self._inline_error = error
            self._inline_failed = True
            self.fail_waiting(error)
            self._fail(error)
            return error
        if outbox.packets:
            self._owner_unconfirmed(outbox.generation, True)  # this commit confirmed it
        if outbox.packets or outbox.events:
            self._to_send.append((outbox.packets, outbox.generation, outbox.events))
        return None

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
        while (
            session.has_output()
            or self._next_commit is not None
            or self._deferred_ops
            or self._inline_committing
            or self._to_send
        ):
            await self._flush_once(force=True)

    # --- one pass ----------------------------------------------------------------------------

    async def _flush_once(self, *, force: bool = False) -> None:
        self._busy = True
        try:
            self._raise_inline_error()
            if self._to_send:
                await self._send_committed()
            if self._inline_committing:
                if not force:
                    return  # its end wakes this task again
                await self._inline_ended.wait()
                self._raise_inline_error()
                await self._send_committed()
            session = self._session
            clock = self._clock
            if clock is None:
                clock = self._clock = _loop_clock()
            now = clock()
            outbox = session.take(now)
            ticket, self._next_commit = self._next_commit, None
            if ticket is not None:
                # One caller: a one-at-a-time publisher, whose next commit may be inline.
                self._concurrent = self._ticket_callers > 1
                self._ticket_callers = 0
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

    def _raise_inline_error(self) -> None:
        """An inline commit failed: this task ends as after its own failed commit (once)."""
        error = self._inline_error
        if error is not None:
            self._inline_error = None
            raise error

    async def _send_committed(self) -> None:
        """Send the batches inline commits made durable, in commit order, and report their
        events (a pass's own packets follow them)."""
        to_send = self._to_send
        while to_send:
            packets, generation, events = to_send.popleft()
            if to_send and to_send[0][1] == generation:
                # Batches of one connection in one write (one syscall, not one each).
                packets = list(packets)
                events = list(events)
                while to_send and to_send[0][1] == generation:
                    more_packets, _, more_events = to_send.popleft()
                    packets += more_packets
                    events += more_events
            if packets:
                await self._connection.send(packets, generation)
            if events:
                self._dispatcher.dispatch(events)

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
