"""FileStore's write path: a record is written on the event loop and synced by AIO or a thread.

An ``apply`` appends one record of a few hundred bytes: about a microsecond as a ``pwrite``,
30-80 µs as a trip to a thread, 100-1000 µs as an ``fdatasync`` on the disks we measured. So
the store writes the record on the event loop (:meth:`OpenSession.append
<.session.OpenSession.append>`), hands it to a :class:`Syncer`, and the caller awaits the sync.
On Linux the syncer submits it through AIO and the loop completes it (:class:`LoopSyncs`: no
thread of ours wakes up); elsewhere, and for records written by worker jobs, its thread syncs.
Either way:

- **Group commit.** The syncer thread takes every record handed over so far, syncs each
  session's journal once, then settles those records (below) and resolves their callers. What
  is written while a sync runs waits for the next one: one sync covers every record written
  before it started. The event loop never waits for a sync; its callers do.
- **The index follows the disk.** A record's operations reach the session's index (what
  ``load`` and ``read_queued`` read, what a rewrite copies) only once the record is durable,
  on the syncer thread (:attr:`Commit.settle`): the index never shows what a power cut could
  take back, and it shows every record whose ``apply`` returned. Without fsync there is no
  syncer: the write is the commit, and the loop updates the index right after it.
- **No overlap with the worker.** The store writes on the loop only while no worker job for
  that session (or the whole store) is queued or running, and a worker job starts with
  :meth:`Syncer.settle`, which waits until the session's records are synced and settled. So
  the worker, the loop and the syncer never touch one session's file and index at once, and
  calls still reach the journal in the order they were made.
- **A failed sync is final for the process.** After an ``fdatasync`` error Linux may have
  dropped the dirty pages (and marked them clean): reading the file back would show data the
  disk does not hold, and a later successful sync proves nothing about the earlier records.
  The session's callers get :class:`~mqtt_persist.errors.StoreError`, and so does every later
  call for that journal in this process (:func:`failed_sync`), until it is deleted. A
  restarted process reads what the disk really holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import queue
import threading
import weakref
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from mqtt_persist.errors import StoreError
from mqtt_persist.stores.file import aio

if TYPE_CHECKING:
    from mqtt_persist.stores.file.session import OpenSession

__all__ = [
    "Commit",
    "Syncer",
    "failed_sync",
    "forget_failed_sync",
    "fresh",
    "mark_failed_sync",
]

logger = logging.getLogger(__name__)

# Journals whose sync failed in this process (see the module docstring). Touched from worker
# and syncer threads; one set operation at a time is atomic.
_FAILED_SYNCS: set[str] = set()


def mark_failed_sync(journal: str) -> None:
    """Remember, for the rest of the process, that a sync of ``journal`` failed."""
    _FAILED_SYNCS.add(journal)


def failed_sync(journal: str) -> StoreError | None:
    """The error for a journal whose sync failed in this process, or None."""
    if journal not in _FAILED_SYNCS:
        return None
    return StoreError(
        f"a sync of {journal} failed earlier in this process, so its data on disk is unknown; "
        "restart the process (it then reads what the disk holds) or delete the session"
    )


def forget_failed_sync(journal: str) -> None:
    """The journal is gone (deleted): a new one starts clean."""
    _FAILED_SYNCS.discard(journal)


def fresh(error: StoreError) -> StoreError:
    """A new exception saying what ``error`` says, to raise once more: one instance raised
    again and again (in many tasks) would collect all their tracebacks."""
    copy = StoreError(str(error))
    copy.__cause__ = error.__cause__
    return copy


class Commit:
    """A record written to a session's journal, waiting for a sync to make it durable."""

    __slots__ = ("future", "loop", "session", "settle")

    def __init__(
        self,
        session: OpenSession,
        settle: Callable[[], None],
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[None],
    ) -> None:
        self.session = session
        #: What the record does to the session's index; run once the record is durable.
        self.settle = settle
        #: The caller's loop and the future it awaits.
        self.loop = loop
        self.future = future


class Syncer:
    """A long-lived thread that syncs written records, as many per ``fdatasync`` as it can.

    :meth:`submit` may be called from any thread, right after the record was written, but
    for one session from one thread at a time (the store sees to that: see the module
    docstring). The thread starts with the first commit and ends with :meth:`stop`; a commit
    submitted after that starts a new one.
    """

    def __init__(self, name: str) -> None:
        """``name`` names the thread (seen in debuggers and thread dumps)."""
        self._name = name
        # The thread's queue of commits (None ends it); a SimpleQueue because its get()
        # blocks in C: the thread lets go of the GIL right after resolving a round's callers,
        # when their loop wakes up and wants it (measured: tens of µs per commit on 2 vCPUs).
        self._commits: queue.SimpleQueue[Commit | None] | None = None
        self._starting = threading.Lock()
        # Guards the settled counts of the sessions; notified whenever a round is settled.
        self._settled = threading.Condition(threading.Lock())
        # The event loops whose appends are synced through AIO (see LoopSyncs), and whether
        # AIO was found unusable here (then every record goes to the thread).
        self._loops: dict[asyncio.AbstractEventLoop, LoopSyncs] = {}
        self._no_aio = False
        # Held while the AIO of loops not running is drained (and of closed ones closed): the
        # worker (in settle) and the loop meeting its first record (in _loop_syncs) may both.
        self._retiring = threading.Lock()

    def submit(self, commit: Commit) -> None:
        """Hand over a written record; its future resolves once a sync covered it.

        On the record's own event loop the sync goes through AIO where it can (:class:`LoopSyncs`),
        unless records of the session still wait for the thread (one path at a time keeps
        them in order); elsewhere, and where AIO is unavailable, to the syncer thread.
        """
        session = commit.session
        session.submitted += 1  # only the submitting thread writes it
        try:
            syncs = None if session.threaded else self._loop_syncs(commit.loop)
            # A loop whose AIO was refused still takes the records of a session with a sync
            # in flight there: they go to the thread once it completed, in order.
            if syncs is not None and (not syncs.refused or syncs.busy(session)):
                syncs.submit(commit)
            else:
                self.submit_threaded(commit)
        except BaseException:
            # Never handed over (no thread could start): nobody will settle it, and settle()
            # must not wait for it.
            session.submitted -= 1
            raise

    def submit_threaded(self, commit: Commit) -> None:
        """Hand a record already counted in ``submitted`` to the syncer thread."""
        commits = self._commits
        if commits is None:
            commits = self._start()
        commit.session.threaded += 1
        commits.put(commit)

    def mark_settled(self, commits: list[Commit]) -> None:
        """Count records as settled and wake whoever waits in :meth:`settle`."""
        with self._settled:
            for commit in commits:
                commit.session.settled += 1
            self._settled.notify_all()

    def settle(self, session: OpenSession) -> None:
        """Block until every record submitted for ``session`` is synced and settled (or
        failed). Called by the worker thread before a job that touches the session."""
        while True:
            with self._settled:
                if session.settled >= session.submitted:
                    return
            # Records synced through AIO are settled by their loop: one that was closed, or
            # is not running (the store moved on to another), will not, so settle them here,
            # before waiting (waiting first cost such a job half a second). The rest are
            # settled by a running loop or the thread, which notify.
            self._retire_idle_loops()
            with self._settled:
                if session.settled < session.submitted:
                    self._settled.wait(0.5)

    def stop(self) -> None:
        """End the thread once the records submitted so far are settled (does not wait), and
        the AIO of every loop (called once they are all settled)."""
        with self._starting:
            commits, self._commits = self._commits, None
        if commits is not None:
            commits.put(None)
        with self._retiring:
            loops, self._loops = self._loops, {}
        for loop, syncs in loops.items():
            try:
                loop.call_soon_threadsafe(syncs.close)
            except RuntimeError:  # the loop is closed: nothing watches the eventfd any more
                syncs.close()

    def _loop_syncs(self, loop: asyncio.AbstractEventLoop) -> LoopSyncs | None:
        if self._no_aio:
            return None
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            return None
        if running is not loop:
            return None
        syncs = self._loops.get(loop)
        if syncs is None:
            # The store moved on from an earlier loop, maybe left (closed or not) with records
            # in flight: settle them before this loop's records can overtake them in the index.
            self._retire_idle_loops()
            context = aio.open_context()
            if context is None:
                self._no_aio = True
                return None
            syncs = self._loops[loop] = LoopSyncs(loop, context, self)
        return syncs

    def _retire_idle_loops(self) -> None:
        """Settle the records that loops not running left in flight (blocking: those loops
        will not reap them, or not soon) and close the AIO of the closed ones."""
        with self._retiring:
            for loop, syncs in list(self._loops.items()):
                if loop.is_closed():
                    syncs.drain()
                    syncs.close()
                    del self._loops[loop]
                elif not loop.is_running():
                    syncs.drain()  # it may run again: its AIO stays

    def _start(self) -> queue.SimpleQueue[Commit | None]:
        with self._starting:
            commits = self._commits
            if commits is None:
                commits = queue.SimpleQueue()
                thread = threading.Thread(
                    target=self._serve, args=(commits,), name=self._name, daemon=True
                )
                thread.start()
                # Only now: a queue whose thread never started would take commits for good.
                self._commits = commits
            return commits

    def _serve(self, commits: queue.SimpleQueue[Commit | None]) -> None:
        helpers = _Helpers(self._name)
        try:
            self._serve_rounds(commits, helpers)
        finally:
            helpers.shutdown()

    def _serve_rounds(self, commits: queue.SimpleQueue[Commit | None], helpers: _Helpers) -> None:
        while (first := commits.get()) is not None:
            # One round: what was submitted before it started. The rest waits for the next.
            batch = [first]
            stopping = False
            while not commits.empty():  # only this thread takes from the queue
                following = commits.get_nowait()
                if following is None:
                    stopping = True
                    break
                batch.append(following)
            try:
                outcomes = _sync_and_settle(batch, helpers.sync_all)
            except BaseException as exc:  # a bug; never leave a caller (or settle()) hanging
                error = StoreError(f"syncing the session journals failed: {exc!r}")
                for commit in batch:
                    commit.session.broken = True
                outcomes = [(commit, error) for commit in batch]
            with self._settled:
                for commit in batch:
                    commit.session.settled += 1
                    commit.session.threaded -= 1
                self._settled.notify_all()
            # Last, then straight back to get(): the callers' loop wants the GIL next.
            _resolve_callers(outcomes)
            if stopping:
                return


class _Helpers:
    """Threads that sync the other sessions of a round while the syncer syncs the first.

    Measured on ext4 (2 vCPUs): ten journals written, then synced one after the other, cost
    about what ten syncs of one journal cost (148 µs per record); synced at the same time,
    the file system commits them together (80 µs per record). So a round with several
    sessions (a gateway's) syncs them concurrently; the helpers start when first needed.
    """

    #: At most this many syncs run at once (the syncer's own included).
    MAX_CONCURRENT = 8

    def __init__(self, name: str) -> None:
        self._name = name
        self._pool: ThreadPoolExecutor | None = None

    def sync_all(self, sessions: list[OpenSession]) -> list[StoreError | None]:
        """``make_durable`` of every session, concurrently; their errors (or None), in order."""
        if len(sessions) == 1:
            return [sessions[0].make_durable()]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                self.MAX_CONCURRENT - 1, thread_name_prefix=self._name + "-helper"
            )
        others = [self._pool.submit(session.make_durable) for session in sessions[1:]]
        return [sessions[0].make_durable(), *(other.result() for other in others)]

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)


def _sync_and_settle(
    commits: list[Commit], sync_all: Callable[[list[OpenSession]], list[StoreError | None]]
) -> list[tuple[Commit, StoreError | None]]:
    """One sync per session, all at once, then each record settled in order."""
    sessions = list({id(commit.session): commit.session for commit in commits}.values())
    synced = dict(zip(map(id, sessions), sync_all(sessions), strict=True))
    return _settle_records(commits, synced)


def _settle_records(
    commits: list[Commit], synced: dict[int, StoreError | None]
) -> list[tuple[Commit, StoreError | None]]:
    """Each synced record's operations into its session's index, in order; the outcomes.
    ``synced``: the sync's error (or None) by ``id`` of the session."""
    outcomes: list[tuple[Commit, StoreError | None]] = []
    for commit in commits:
        session = commit.session
        error = synced[id(session)]
        if error is None:
            try:
                commit.settle()
            except Exception as exc:  # a bug: the index no longer matches the journal
                session.broken = True
                error = StoreError(f"{session.paths.journal}: index update failed: {exc!r}")
        outcomes.append((commit, error))
    return outcomes


def _resolve_callers(outcomes: list[tuple[Commit, StoreError | None]]) -> None:
    # One wake-up per loop for the whole round, not one per caller.
    loop = outcomes[0][0].loop
    by_loop = {loop: outcomes}
    if any(commit.loop is not loop for commit, _ in outcomes):
        by_loop = defaultdict(list)
        for outcome in outcomes:
            by_loop[outcome[0].loop].append(outcome)
    for loop, mine in by_loop.items():
        # RuntimeError: the caller's loop is closed, nobody is left to tell.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_resolve_on_loop, mine)


def _resolve_on_loop(outcomes: list[tuple[Commit, StoreError | None]]) -> None:
    # On the callers' loop. A caller cancelled while its record was synced gets nothing: the
    # record stands, as it would had the sync finished first.
    for commit, error in outcomes:
        future = commit.future
        if future.done():
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(fresh(error))


class LoopSyncs:
    """The syncs of the records one event loop wrote, through Linux AIO (:mod:`.aio`).

    Per session at most one ``fdatasync`` is in flight; the records written meanwhile wait
    and share the next one (group commit, as on the thread). The completion arrives on an
    eventfd the loop watches: the loop settles the records and resolves their callers itself,
    so no thread of ours wakes up for a sync. If the kernel refuses a submit (a file system
    without AIO fsync), those records and every later one go to the syncer thread.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, context: aio.AioContext, syncer: Syncer):
        self._loop = loop
        self._context = context
        self._syncer = syncer
        self._tokens = itertools.count(1)
        # In flight, by token: the session and the records its sync covers.
        self._flights: dict[int, tuple[OpenSession, list[Commit]]] = {}
        # Sessions with a sync in flight (by id), and the records waiting for the next one.
        self._waiting: dict[int, list[Commit]] = {}
        # Held while submitting or completing: another thread drains a loop that is not
        # running (Syncer._retire_idle_loops), and that loop may start running meanwhile.
        self._lock = threading.Lock()
        self.refused = False
        self._closed = False
        # The context is closed by close(), which Syncer.stop queues on the loop (the loop must
        # stop watching the eventfd first). A loop closed before it ran that drops the callback
        # and its reader, and with them this object: then the finalizer closes the context.
        self._release = weakref.finalize(self, context.close)
        self._release.atexit = False
        loop.add_reader(context.eventfd, self._on_ready)

    def busy(self, session: OpenSession) -> bool:
        """Whether a sync of ``session`` is in flight here."""
        return id(session) in self._waiting

    def submit(self, commit: Commit) -> None:
        """Sync a record written on this loop (called on the loop)."""
        with self._lock:
            waiting = self._waiting.get(id(commit.session))
            if waiting is not None:
                waiting.append(commit)
            else:
                self._start(commit.session, [commit])

    def _start(self, session: OpenSession, commits: list[Commit]) -> None:
        if session.sync_error is not None or session.fd is None:
            error = session.sync_error or StoreError(f"{session.paths.journal} is not open")
            self._finish(commits, {id(session): error})
            return
        if not self.refused:
            token = next(self._tokens)
            try:
                self._context.submit_fdatasync(session.fd, token)
            except OSError as exc:
                if exc.errno != errno.EAGAIN:
                    logger.debug("AIO fsync refused (%s); syncing on a thread instead", exc)
                    self.refused = True
                # EAGAIN: every slot of the context is in flight (a few hundred sessions
                # syncing at once). These records go to the thread, later ones try AIO again.
            else:
                self._flights[token] = (session, commits)
                self._waiting[id(session)] = []
                return
        for commit in commits:
            self._syncer.submit_threaded(commit)

    def _on_ready(self) -> None:
        with self._lock:
            self._complete(self._context.reap())

    def _complete(self, done: list[tuple[int, int]]) -> None:
        for token, result in done:
            flight = self._flights.pop(token, None)
            if flight is None:
                continue
            session, commits = flight
            error = None
            if result < 0:
                error = session.sync_failed(OSError(-result, os.strerror(-result)))
            self._finish(commits, {id(session): error})
            waiting = self._waiting.pop(id(session), [])
            if waiting:
                self._start(session, waiting)

    def _finish(self, commits: list[Commit], synced: dict[int, StoreError | None]) -> None:
        outcomes = _settle_records(commits, synced)
        self._syncer.mark_settled(commits)
        try:
            here = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            here = False
        if here:
            _resolve_on_loop(outcomes)
        else:  # drained elsewhere; RuntimeError: the loop is closed, nobody is left to tell
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(_resolve_on_loop, outcomes)

    def drain(self) -> None:
        """Settle everything in flight, blocking: for a loop that is closed or not running."""
        with self._lock:
            while self._flights:
                self._complete(self._context.reap(wait=True))

    def close(self) -> None:
        """Stop watching the eventfd and destroy the context (nothing may be in flight)."""
        if self._closed:
            return
        self._closed = True
        if not self._loop.is_closed():
            with contextlib.suppress(RuntimeError, ValueError):
                self._loop.remove_reader(self._context.eventfd)
        self._release()
