"""Receiving: ``messages``, the manual-ack API (``ack``), and what reading a message releases."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio

from mqtt_persist.client.base import ClientBase
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
        """
        return self._iterate_messages()

    async def _iterate_messages(self) -> AsyncIterator[Message]:
        incoming = self._require_open().dispatcher.inbox
        while True:
            try:
                # Like asyncio.Queue.get(): no trip through the event loop while messages
                # are waiting.
                message = incoming.get_nowait()
            except anyio.WouldBlock:
                try:
                    message = await incoming.get()
                except anyio.EndOfStream:
                    break
            except anyio.EndOfStream:
                break
            yield message
        if self._fatal is not None:
            raise self._fatal

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
