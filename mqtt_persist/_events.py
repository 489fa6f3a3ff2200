"""A set-once event that costs what asyncio's costs when asyncio runs the loop.

The client makes events on its hot paths: a commit's ticket and the flusher's wake-up
(``client/signals.py``), and a :class:`~mqtt_persist.completion.Delivery` that somebody awaits.
``anyio.Event`` costs ~1.3 µs to create and looks its backend up on every call; an
``asyncio.Event`` ~0.16 µs (measured in ``client/signals.py``'s docstring). Both are set once,
waited for, and cancelled through the waiting task like anything else, so asyncio's is used
wherever asyncio runs the loop, anyio's elsewhere (trio).
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import anyio

__all__ = ["Event", "new_event"]


class Event(Protocol):
    """What both ``anyio.Event`` and ``asyncio.Event`` offer."""

    def set(self) -> None: ...
    def is_set(self) -> bool: ...
    async def wait(self) -> object: ...


def new_event() -> Event:
    """An ``asyncio.Event`` where asyncio runs the loop, else an ``anyio.Event``."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return anyio.Event()
    return asyncio.Event()
