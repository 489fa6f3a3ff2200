"""The one way a store runs blocking work off the event loop: its own long-lived thread.

FileStore and SQLiteStore each own one :class:`Worker`. A public method of those stores is ONE
job on it (FileStore's ``apply`` only when it cannot write on the loop: see ``file/writer``):
the job does the whole call (reads, writes, COMMIT) synchronously, so

- the event loop never blocks on the disk;
- calls reach the medium in the order they were made (one thread, one FIFO queue), which is
  what lets a store keep its in-memory view (FileStore's index, SQLite's connection) without
  locks: only the worker thread touches it while a job runs;
- a caller cancelled while it waits either never started its job (nothing happened) or its job
  runs to the end regardless (everything happened): never half a batch.

Jobs submitted with :meth:`Worker.run_gathered` are *gathered*: when the thread takes one, it
also takes every job of the same gathering function queued right behind it (those that arrived
while the previous job ran) and runs them as one call. SQLiteStore gathers its applies this way
into one transaction, one COMMIT (group commit across calls and sessions).

Why a thread of our own rather than aiofiles, the loop's default executor or
``anyio.to_thread``: measured side by side (docs/stores.md, "Blocking work"), one hop costs the
same or less, and a thread that lives as long as the store can gather the work of several
calls, which a shared pool cannot offer.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from mqtt_persist.errors import StoreError

__all__ = ["Gather", "Outcome", "Worker"]

_T = TypeVar("_T")

#: What one job ended with: its result, or the exception it raised.
Outcome = tuple[Any, BaseException | None]

#: Runs the arguments of several gathered jobs at once; returns one outcome per job, in order.
Gather = Callable[[Sequence[tuple[Any, ...]]], list[Outcome]]


class _Job:
    """A queued job: the caller's loop and future, the function and its arguments.

    ``gather`` marks a gathered job (``fn`` is then unused); ``done`` runs on the worker thread
    once the job finished or was skipped, even if its caller was cancelled or its loop closed.
    (An asyncio future resolved with call_soon_threadsafe: measured a third cheaper per hop
    than a concurrent.futures.Future wrapped for asyncio.)
    """

    __slots__ = ("args", "done", "fn", "future", "gather", "loop")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[Any],
        fn: Callable[..., Any] | None,
        args: tuple[Any, ...],
        gather: Gather | None = None,
        done: Callable[[], object] | None = None,
    ) -> None:
        self.loop = loop
        self.future = future
        self.fn = fn
        self.args = args
        self.gather = gather
        self.done = done


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

    async def run(
        self, fn: Callable[..., _T], *args: Any, done: Callable[[], object] | None = None
    ) -> _T:
        """Run ``fn(*args)`` on the thread and return its result (or raise its exception).

        ``done`` (if given) runs once the job has finished, or was skipped because this
        caller was cancelled before it started: unlike the caller, it always learns when the
        thread is through with the job, even once this loop is closed. It runs on the thread
        (on this loop only if the job never reached it), before the caller resumes.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()
        self._submit(_Job(loop, future, fn, args, None, done))
        return await future

    async def run_gathered(
        self, gather: Gather, *args: Any, done: Callable[[], object] | None = None
    ) -> Any:
        """Run ``args`` through ``gather`` together with the gathered jobs queued next to it.

        The thread calls ``gather`` with the arguments of this job and of every job of the
        same ``gather`` queued right behind it, and resolves each caller with its own outcome.
        ``done`` as in :meth:`run`.
        """
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.start_gathered(future, gather, *args, done=done)
        return await future

    def start_gathered(
        self,
        future: asyncio.Future[Any],
        gather: Gather,
        *args: Any,
        done: Callable[[], object] | None = None,
    ) -> None:
        """:meth:`run_gathered` without waiting: ``future`` (of the running loop) gets the
        outcome. Raises only if the job could not be queued (no thread could start)."""
        self._submit(_Job(future.get_loop(), future, None, args, gather, done))

    async def stop(
        self, last: Callable[[], object] | None = None, *, done: Callable[[], object] | None = None
    ) -> None:
        """Run ``last`` as the final job (after every job submitted before), then end the thread.

        The final job runs even if the caller is cancelled meanwhile; ``done`` as in :meth:`run`.
        """
        jobs, self._queue = self._queue, None
        if jobs is None:
            if done is not None:
                done()
            return
        loop = asyncio.get_running_loop()
        finished: asyncio.Future[object] = loop.create_future()
        jobs.put(_Job(loop, finished, last or _nothing, (), None, done))
        jobs.put(None)
        await asyncio.shield(finished)

    def _submit(self, job: _Job) -> None:
        try:
            jobs = self._queue
            if jobs is None:
                jobs = self._start()
            jobs.put(job)
        except BaseException:
            if job.done is not None:
                job.done()  # it never reached the thread: the thread is through with it
            raise

    def _start(self) -> queue.SimpleQueue[_Job | None]:
        jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        thread = threading.Thread(
            target=_serve, args=(jobs, self._thread), name=self._name, daemon=True
        )
        try:
            thread.start()
        except RuntimeError as exc:  # "can't start new thread": out of threads or memory
            raise StoreError(f"could not start the store's worker thread ({exc})") from exc
        # Only once it runs: the next thread joins this one, and an unstarted one cannot be.
        self._thread = thread
        self._queue = jobs
        return jobs


def _nothing() -> None:
    return None


def _serve(jobs: queue.SimpleQueue[_Job | None], previous: threading.Thread | None) -> None:
    if previous is not None:
        previous.join()  # the jobs of a stopped thread all come first
    # A job taken from the queue while gathering, not gathered: it runs next.
    held: list[_Job | None] = []
    while True:
        job = held.pop() if held else jobs.get()
        if job is None:
            return
        if job.gather is None:
            _run_one(job)
            continue
        group = [job]
        while True:
            try:
                following = jobs.get_nowait()
            except queue.Empty:
                break
            # ==, not is: a bound method is a new object every time it is looked up.
            if following is None or following.gather != job.gather:
                held.append(following)
                break
            group.append(following)
        _run_group(job.gather, group)


def _run_one(job: _Job) -> None:
    if job.future.cancelled():
        # Its caller was cancelled before it started: it never happens.
        _report(job, None, None)
        return
    assert job.fn is not None
    try:
        outcome: Outcome = (job.fn(*job.args), None)
    except BaseException as exc:
        outcome = (None, exc)
    _report(job, *outcome)


def _run_group(gather: Gather, group: list[_Job]) -> None:
    live: list[_Job] = []
    for job in group:
        if job.future.cancelled():
            _report(job, None, None)  # never happens, as in _run_one
        else:
            live.append(job)
    if not live:
        return
    try:
        outcomes = gather([job.args for job in live])
        if len(outcomes) != len(live):
            raise RuntimeError(f"{len(outcomes)} outcomes for {len(live)} gathered jobs")
    except BaseException as exc:
        outcomes = [(None, exc)] * len(live)
    for job, outcome in zip(live, outcomes, strict=True):
        _report(job, *outcome)


def _report(job: _Job, result: Any, error: BaseException | None) -> None:
    if job.done is not None:
        # Here, not on the caller's loop: that loop may close before it would run it (one
        # loop after another), and the store would wait for this job for good.
        job.done()
    # RuntimeError: the caller's loop is closed, nobody is left to tell.
    with contextlib.suppress(RuntimeError):
        job.loop.call_soon_threadsafe(_resolve, job.future, result, error)


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    # On the caller's loop. A caller cancelled while the job ran gets nothing: the job's
    # effects stand, as they would had it finished first.
    if future.cancelled():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)
