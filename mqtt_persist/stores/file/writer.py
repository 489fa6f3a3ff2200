"""FileStore's write path: a record is written on the event loop and synced by a syncer thread.

An ``apply`` appends one record of a few hundred bytes: about a microsecond as a ``pwrite``,
30-80 µs as a trip to a thread, 100-1000 µs as an ``fdatasync`` on the disks we measured. So
the store writes the record on the event loop (:meth:`OpenSession.append
<.session.OpenSession.append>`), hands it to a :class:`Syncer`, and the caller awaits the sync:

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
import queue
import threading
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from mqtt_persist.errors import StoreError

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

    def submit(self, commit: Commit) -> None:
        """Hand over a written record; its future resolves once a sync covered it."""
        commits = self._commits
        if commits is None:
            commits = self._start()
        commit.session.submitted += 1  # only the submitting thread writes it
        commits.put(commit)

    def settle(self, session: OpenSession) -> None:
        """Block until every record submitted for ``session`` is synced and settled (or
        failed). Called by the worker thread before a job that touches the session."""
        with self._settled:
            while session.settled < session.submitted:
                self._settled.wait()

    def stop(self) -> None:
        """End the thread once the records submitted so far are settled (does not wait)."""
        with self._starting:
            commits, self._commits = self._commits, None
        if commits is not None:
            commits.put(None)

    def _start(self) -> queue.SimpleQueue[Commit | None]:
        with self._starting:
            commits = self._commits
            if commits is None:
                commits = self._commits = queue.SimpleQueue()
                thread = threading.Thread(
                    target=self._serve, args=(commits,), name=self._name, daemon=True
                )
                thread.start()
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
