"""The messages waiting in ``client.messages``: a FIFO with a bound, shared by every reader.

The session decides which messages are handed out (and holds QoS 1/2 beyond ``max_unread``
unacknowledged, see ``session/inbound_acks.py``); QoS 0 messages have no flow control to push
back on, so the inbox bounds them itself: a QoS 0 message arriving while ``limit`` messages
wait drops the oldest QoS 0 message waiting (or itself, if none is), counted in ``dropped``.
So the inbox never holds more than ``limit`` messages (``peak`` proves it).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import anyio

from mqtt_persist.client.signals import Signal
from mqtt_persist.message import Message


class Inbox:
    """Received messages, committed and waiting for a reader."""

    __slots__ = ("_closed", "_items", "_on_leave", "_ready", "dropped", "limit", "peak")

    def __init__(self, limit: int, on_leave: Callable[[Message], None]) -> None:
        #: Messages waiting, at most (0: no bound).
        self.limit = limit
        #: QoS 0 messages dropped because ``limit`` messages were waiting.
        self.dropped = 0
        #: The most messages that ever waited at once.
        self.peak = 0
        # Called when a message leaves the inbox, read or dropped: the session makes room.
        self._on_leave = on_leave
        self._items: deque[Message] = deque()
        self._ready = Signal()
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    def put(self, message: Message) -> None:
        """Queue a message; at the bound, a QoS 0 message makes room by dropping the oldest one."""
        if self._closed:
            return
        items = self._items
        if self.limit and len(items) >= self.limit and message.qos == 0:
            victim = message
            for index, waiting in enumerate(items):
                if waiting.qos == 0:
                    victim = waiting
                    del items[index]
                    items.append(message)
                    break
            self.dropped += 1
            self._on_leave(victim)
        else:
            items.append(message)
        if len(items) > self.peak:
            self.peak = len(items)
        self._ready.set()

    def get_nowait(self) -> Message:
        """The next message; ``anyio.WouldBlock`` if none waits, ``anyio.EndOfStream`` at the
        end."""
        items = self._items
        if items:
            message = items.popleft()
            self._on_leave(message)
            return message
        if self._closed:
            raise anyio.EndOfStream
        raise anyio.WouldBlock

    async def get(self) -> Message:
        """Wait for the next message; ``anyio.EndOfStream`` once closed and empty."""
        while True:
            try:
                return self.get_nowait()
            except anyio.WouldBlock:
                self._ready.clear()
                await self._ready.wait()

    def close(self) -> None:
        """No more messages: readers take those waiting, then end."""
        self._closed = True
        self._ready.set()
