"""A cancellation that a driver swallowed, raised after all.

Python 3.11's ``asyncio.wait_for`` (CPython gh-86296, rewritten in 3.12) returns the result of
the call it waits for when the task is cancelled just as that call finishes: the
CancelledError is lost. redis-py wraps every send in it (``Connection.send_packed_command``,
whenever ``socket_timeout`` is set, as it is by default), so a caller's ``asyncio.timeout``
that expired during a Redis call (it cancels once, never again) did not fire: the call
completed as if nobody had asked it to stop, and an acquire kept the lease.
:func:`keep_cancellation` wraps such calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

__all__ = ["keep_cancellation"]

T = TypeVar("T")


async def keep_cancellation(call: Awaitable[T]) -> T:
    """Await ``call``; raise CancelledError if the task was cancelled meanwhile and ``call``
    returned anyway (it swallowed the cancellation).

    A cancellation requested while ``call`` ran and not undone (``Task.uncancel``) shows in
    ``Task.cancelling()``. It is either still to be delivered (at the next suspension: the
    ``sleep(0)`` below delivers it) or was lost on the way: then it is raised here, and the
    caller's cleanup for a cancelled call (e.g. taking back a lease) runs as it would have.
    """
    task = asyncio.current_task()
    before = 0 if task is None else task.cancelling()
    result = await call
    if task is not None and task.cancelling() > before:
        await asyncio.sleep(0)
        raise asyncio.CancelledError
    return result
