"""Receiving: ``messages``, the manual-ack API (``ack``), and what reading a message releases."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio

from mqtt_persist.client.base import ClientBase
from mqtt_persist.client.inbox import Inbox
from mqtt_persist.client.signals import Signal
from mqtt_persist.errors import InvalidInput
from mqtt_persist.message import Message
from mqtt_persist.session.machine import Session


class ReceiveAPI(ClientBase):
    """Received messages, and their acknowledgement with ``ack="manual"``."""

    @property
    def messages(self) -> AsyncIterator[Message]:
        """Received messages, in arrival order; ends when the client closes.

        Raises the client's fatal error (for example a refused connection) if one ends it.
        A timeout or cancellation around one step (``asyncio.wait_for(anext(it), t)``) ends
        that wait only: the same iterator goes on with the next message.
        """
        return _Messages(self)

    async def ack(self, message: Message) -> None:
        """Acknowledge a received message (``ack="manual"``); returns once that is durable.

        The broker gets the PUBACK (QoS 1) or PUBREC (QoS 2) once every message that arrived
        before this one was acknowledged too: MQTT requires acknowledgements in arrival order,
        so one message left unacknowledged holds back those after it (and, through the
        broker's in-flight limit, further deliveries). A QoS 2 message is recorded in the
        store before this returns and is never delivered again, also after a crash. A message
        not acknowledged when the process dies is delivered again by the broker (at least
        once). Acknowledging twice, a QoS 0 message, or in the automatic mode does nothing;
        after the broker lost the session (CONNACK without it) there is nobody left to tell.
        """
        token = message._ack_token
        if not token or message._acker is None:
            return
        if message._acker is not self:
            raise InvalidInput("this message was received by another client")
        parts = self._require_open()
        session = parts.session
        session.ack(token)
        if session.has_output():
            parts.flusher.wake.set()
            if message.qos == 2 and self._storage.durable:
                await parts.flusher.committed()


def message_left(session: Session, wake: Signal) -> None:
    """A message left the inbox: with ``max_unread_messages``, held ones may follow."""
    session.message_read()
    if session.has_output() or session.wants_reconnect:
        wake.set()


def ack_now(session: Session, wake: Signal, message: Message) -> None:
    token = message._ack_token
    if token:
        session.ack(token)
        wake.set()


class _Messages:
    """The iterator behind :attr:`ReceiveAPI.messages`.

    Not an async generator: an exception thrown into a generator's ``await`` (the
    cancellation of a timed-out ``anext()``) ends the generator, and every later ``anext()``
    raised ``StopAsyncIteration`` as if the client had closed.
    """

    __slots__ = ("_client", "_closed", "_inbox")

    def __init__(self, client: ReceiveAPI) -> None:
        self._client = client
        # Looked up on the first step (as the generator did): once iterating, the messages
        # waiting are read to the end even while the client closes or after a fatal error.
        self._inbox: Inbox | None = None
        self._closed = False

    def __aiter__(self) -> _Messages:
        return self

    async def aclose(self) -> None:
        """Stop iterating (what ``aclose()`` of the former async generator did, so
        ``contextlib.aclosing(client.messages)`` keeps working); the messages stay queued."""
        self._closed = True

    async def __anext__(self) -> Message:
        if self._closed:
            raise StopAsyncIteration
        client = self._client
        incoming = self._inbox
        if incoming is None:
            incoming = self._inbox = client._require_open().dispatcher.inbox
        try:
            # Like asyncio.Queue.get(): no trip through the event loop while messages are
            # waiting.
            return incoming.get_nowait()
        except anyio.WouldBlock:
            try:
                return await incoming.get()
            except anyio.EndOfStream:
                pass
        except anyio.EndOfStream:
            pass
        if client._fatal is not None:
            raise client._fatal
        raise StopAsyncIteration
