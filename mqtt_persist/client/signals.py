"""Wake-ups between the client's tasks, on anyio.

``anyio.Event`` is set once and never cleared. The client needs flags that are set and cleared
over and over ("there is work for the flusher", "the queue has room"), and it needs one event
that many ``publish()`` calls wait on together ("the next commit is done"); both are built here
on ``anyio.Event`` so the client uses one concurrency library throughout.

Both sit on the hot path of a durable ``publish()`` (set the flusher's flag, wait for the
commit), so both create an ``anyio.Event`` only when a task really has to sleep: one costs
about 1.3 µs to create against 0.16 µs for an ``asyncio.Event`` (CPython 3.11, anyio 4.16, on
the 2-core VM), and a first version that swapped in a fresh event on every ``clear()`` and used
``anyio.Lock`` in the flusher made an offline QoS 1 publish with a durable store cost 22.6 µs
of CPU instead of 14.4 µs (benchmarks/client_micro.py has the end-to-end figures).
"""

from __future__ import annotations

import anyio


class Signal:
    """A flag that can be set, cleared and waited for, like ``asyncio.Event``.

    The flag is a plain bool; an ``anyio.Event`` exists only while somebody waits for the flag
    to be set, and ``set()`` wakes and drops it. So setting a set flag (every ``publish()`` wakes
    the flusher) and clearing it cost no allocation, and a waiter is never orphaned: whoever
    waits after a ``clear()`` waits for the next ``set()``, whoever the last ``set()`` woke
    stays woken.
    """

    __slots__ = ("_event", "_flag")

    def __init__(self) -> None:
        self._flag = False
        self._event: anyio.Event | None = None

    def set(self) -> None:
        """Set the flag and wake everyone waiting for it."""
        if self._flag:
            return
        self._flag = True
        event = self._event
        if event is not None:
            self._event = None
            event.set()

    def is_set(self) -> bool:
        """Whether ``set()`` was called since the last ``clear()``."""
        return self._flag

    def clear(self) -> None:
        """Make the next ``wait()`` wait for a new ``set()``."""
        self._flag = False

    async def wait(self) -> None:
        """Return once the flag is set; at once, without yielding, if it is set already.

        ``anyio.Event.wait()`` yields to the event loop even when the event is set; the
        flusher waits on a flag that is set most of the time under load, and (like
        ``asyncio.Event``) returning at once saves it a loop iteration per pass.
        """
        if self._flag:
            return
        event = self._event
        if event is None:
            event = self._event = anyio.Event()
        await event.wait()


class CommitTicket:
    """The ``publish()``/``subscribe()`` calls waiting for one commit, sharing one event.

    The hot path of a durable publish is: change the session, wait for the flusher's commit,
    return. Every call that arrives before the flusher takes the session's output waits for
    the same commit, so one event per commit serves them all (the client used to create a
    future per call). ``resolve()`` wakes them; with an error, each of them raises it.
    """

    __slots__ = ("_done", "error")

    def __init__(self) -> None:
        self._done = anyio.Event()
        self.error: BaseException | None = None

    @property
    def resolved(self) -> bool:
        """Whether the commit ended (successfully or not)."""
        return self._done.is_set()

    def resolve(self, error: BaseException | None = None) -> None:
        """The commit ended: wake every waiter, who raises ``error`` if there is one."""
        if not self._done.is_set():
            self.error = error
            self._done.set()

    async def wait(self) -> None:
        """Wait for the commit; raises its error if it failed."""
        await self._done.wait()
        if self.error is not None:
            raise self.error
