"""The one way a store runs blocking work off the event loop: its own long-lived thread.

FileStore and SQLiteStore each own one :class:`Worker`. Every public method of those stores is
ONE job on it: the job does the whole call (reads, writes, fsync, COMMIT) synchronously, so

- the event loop never blocks on the disk;
- calls reach the medium in the order they were made (one thread, one FIFO queue), which is
  what lets a store keep its in-memory view (FileStore's index, SQLite's connection) without
  locks: only the worker thread ever touches it;
- a caller cancelled while it waits either never started its job (nothing happened) or its job
  runs to the end regardless (everything happened): never half a batch.

Why a thread of our own rather than aiofiles, the loop's default executor or
``anyio.to_thread``: measured side by side (docs/stores.md, "Blocking work"), one hop costs the
same or less, and a thread that lives as long as the store is where a writer can later gather
the appends of several calls into one fsync (group commit across calls), which a shared pool
cannot offer.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["Worker"]

_T = TypeVar("_T")

#: A queued job: the caller's loop and future, the function and its arguments. None ends the
#: thread. (An asyncio future resolved with call_soon_threadsafe: measured a third cheaper per
#: hop than a concurrent.futures.Future wrapped for asyncio.)
_Job = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]


class Worker:
    """One long-lived thread running jobs one at a time, in the order they were submitted.

    The thread starts with the first job and ends with :meth:`stop`; a job submitted after
    that starts a new thread, which first waits for the old one to finish, so two threads
    never run jobs of one store at once.
    """

    def __init__(self, name: str) -> None:
        """``name`` names the thread (seen in debuggers and thread dumps)."""
        self._name = name
        self._queue: queue.SimpleQueue[_Job | None] | None = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        """True between the first job and :meth:`stop`."""
        return self._queue is not None

    async def run(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run ``fn(*args)`` on the thread and return its result (or raise its exception)."""
        jobs = self._queue
        if jobs is None:
            jobs = self._start()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()
        jobs.put((loop, future, fn, args))
        return await future

    async def stop(self, last: Callable[[], object] | None = None) -> None:
        """Run ``last`` as the final job (after every job submitted before), then end the thread.

        The final job runs even if the caller is cancelled meanwhile.
        """
        jobs, self._queue = self._queue, None
        if jobs is None:
            return
        loop = asyncio.get_running_loop()
        done: asyncio.Future[object] = loop.create_future()
        jobs.put((loop, done, last or _nothing, ()))
        jobs.put(None)
        await asyncio.shield(done)

    def _start(self) -> queue.SimpleQueue[_Job | None]:
        jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        previous = self._thread
        self._thread = threading.Thread(
            target=_serve, args=(jobs, previous), name=self._name, daemon=True
        )
        self._thread.start()
        self._queue = jobs
        return jobs


def _nothing() -> None:
    return None


def _serve(jobs: queue.SimpleQueue[_Job | None], previous: threading.Thread | None) -> None:
    if previous is not None:
        previous.join()  # the jobs of a stopped thread all come first
    while (item := jobs.get()) is not None:
        loop, future, fn, args = item
        if future.cancelled():
            continue  # its caller was cancelled before it started: it never happens
        try:
            outcome: tuple[Any, BaseException | None] = (fn(*args), None)
        except BaseException as exc:
            outcome = (None, exc)
        # RuntimeError: the caller's loop is closed, nobody is left to tell.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_resolve, future, *outcome)


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    # On the caller's loop. A caller cancelled while the job ran gets nothing: the job's
    # effects stand, as they would had it finished first.
    if future.cancelled():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)
