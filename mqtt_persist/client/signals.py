"""Wake-ups between the client's tasks, on anyio.

``anyio.Event`` is set once and never cleared. The client needs flags that are set and cleared
over and over ("there is work for the flusher", "the queue has room"), and it needs one event
that many ``publish()`` calls wait on together ("the next commit is done"); both are built here
on an event that is set once: ``asyncio.Event`` when asyncio runs the loop, ``anyio.Event``
otherwise (``mqtt_persist._events.new_event``).

Both sit on the hot path of a durable ``publish()`` (wake the flusher, wait for its commit), so
both create an ``anyio.Event`` only when a task really has to sleep: creating one costs ~1.3 µs
against ~0.16 µs for an ``asyncio.Event`` (anyio 4.16 looks the backend up and initialises the
event twice). Measured: CPU per sequential QoS 1 ``publish()`` waiting for a commit that costs
nothing (``benchmarks/client_micro.py --offline --stores commit``; min of 7 runs of 20,000 on
the 2-core VM): the single class before the split 13.2 µs; this split 18.4 µs; the same split
with asyncio.Event in place of these two 15.7 µs; a first anyio version that swapped in a fresh
event on every ``clear()``, locked each flush with ``anyio.Lock`` and wrapped each deferred wait
in a cancel scope 22.6 µs. A real durable commit costs hundreds of µs (FileStore's fsync), and
with ``gather`` one commit serves many publishes (+0.4 µs there), so the remaining ~3 µs of
anyio was first kept, for one concurrency library. Issue 7 (less CPU per message) took it back:
the same measurement, one run of 20,000 at a time alternating old and new, 20.8 → 17.9 µs
(median of 3), and the stream (``transport.py``) is asyncio's on asyncio anyway. Against a real
broker a sequential publisher's message costs two flusher passes (its commit, then its PUBACK's
removal), and the same benchmark shows ~10-14 µs more CPU per message with the ``commit``
store, while msg/s of old and new stay within each other's run-to-run spread on the shared VM.
"""

from __future__ import annotations

from mqtt_persist._events import Event, new_event


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
        self._event: Event | None = None

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
            event = self._event = new_event()
        await event.wait()


class CommitTicket:
    """The ``publish()``/``subscribe()`` calls waiting for one commit, sharing one event.

    The hot path of a durable publish is: change the session, wait for the flusher's commit,
    return. Every call that arrives before the flusher takes the session's output waits for
    the same commit, so one event per commit serves them all (the client used to create a
    future per call). :meth:`resolve` sets ``done``; with an error, each waiter raises it.
    """

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        #: Set when the commit ended; a waiter then checks ``error``.
        self.done = new_event()
        self.error: BaseException | None = None

    @property
    def resolved(self) -> bool:
        """Whether the commit ended (successfully or not)."""
        return self.done.is_set()

    def resolve(self, error: BaseException | None = None) -> None:
        """The commit ended: wake every waiter, who raises ``error`` if there is one."""
        if not self.done.is_set():
            self.error = error
            self.done.set()

    async def wait(self) -> None:
        """Wait for the commit; raises its error if it failed."""
        await self.done.wait()
        if self.error is not None:
            raise self.error
