"""Awaitable handles for things the broker finishes later: deliveries and subscriptions.

A handle creates its event only when somebody awaits it. Most deliveries are never awaited
(fire-and-forget publishing at tens of thousands per second), and an event or a future per
message would cost time and memory for nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Generator
from typing import Any, Generic, TypeVar

from mqtt_persist._events import Event, new_event
from mqtt_persist.errors import SubscriptionRefused, SubscriptionSuperseded
from mqtt_persist.message import DeliveryOutcome
from mqtt_persist.protocol.packets import SUBACK_FAILURE, PacketType
from mqtt_persist.protocol.reason_codes import describe_reason_code
from mqtt_persist.session.events import SUBSCRIPTION_SUPERSEDED

T = TypeVar("T")

_PENDING: Any = object()


class Completion(Generic[T]):
    """Something that completes once, with a value or an error; ``await`` it for the value."""

    __slots__ = ("_done", "_error", "_value")

    def __init__(self) -> None:
        self._value: T = _PENDING
        self._error: BaseException | None = None
        # Created by the first waiter; every waiter shares it.
        self._done: Event | None = None

    def done(self) -> bool:
        """True once the value or the error is known."""
        return self._value is not _PENDING or self._error is not None

    def result(self) -> T:
        """The value; raises the error, or ``asyncio.InvalidStateError`` while pending."""
        if self._error is not None:
            raise self._error
        if self._value is _PENDING:
            # The documented error since the first release, kept for callers that catch it.
            raise asyncio.InvalidStateError("not completed yet")
        return self._value

    def _set_result(self, value: T) -> None:
        if self.done():
            return
        self._value = value
        self._wake()

    def _set_exception(self, error: BaseException) -> None:
        if self.done():
            return
        self._error = error
        self._wake()

    def _wake(self) -> None:
        if self._done is not None:
            self._done.set()

    async def _wait(self) -> T:
        if not self.done():
            if self._done is None:
                self._done = new_event()
            await self._done.wait()
        return self.result()

    def __await__(self) -> Generator[Any, None, T]:
        return self._wait().__await__()


class Delivery(Completion[DeliveryOutcome]):
    """The delivery of one published message; ``await`` it for its :class:`DeliveryOutcome`.

    Awaiting it never raises because the broker is unreachable: it waits, across reconnects,
    until the broker acknowledged the message. It raises :class:`~mqtt_persist.errors.ClientClosed`
    if the client closes first, and the client's fatal error (a broken store, a refused
    connection) if one stops it (either way the message stays in the store and goes out after
    the next connect of a client with the same id and store).
    """

    __slots__ = ("qos", "reason_code", "reason_string", "seq", "topic")

    def __init__(self, seq: int, topic: str, qos: int) -> None:
        super().__init__()
        self.seq = seq
        self.topic = topic
        self.qos = qos
        #: With :attr:`DeliveryOutcome.REFUSED`: the MQTT 5 reason code (e.g. 0x87 not
        #: authorized, 0x97 quota exceeded, 0x95 packet too large); else None.
        self.reason_code: int | None = None
        #: With :attr:`DeliveryOutcome.REFUSED`: the broker's Reason String, or our own words
        #: when the message exceeded what the broker announced it takes.
        self.reason_string: str | None = None

    @property
    def outcome(self) -> DeliveryOutcome | None:
        """The outcome once known, else None."""
        return self._value if self._value is not _PENDING else None

    def __repr__(self) -> str:
        state = self.outcome.value if self.outcome else ("failed" if self._error else "pending")
        return f"<Delivery seq={self.seq} topic={self.topic!r} qos={self.qos} {state}>"


class SubscribeRequest(Completion[tuple[int, ...]]):
    """A subscribe call; ``await`` it for the QoS the broker granted per filter.

    Raises :class:`~mqtt_persist.errors.SubscriptionRefused` if the broker refused any filter
    (return code 0x80, or any MQTT 5 reason code from 0x80 on); refused filters are removed
    from the stored session. Raises :class:`~mqtt_persist.errors.SubscriptionSuperseded` if a
    later ``unsubscribe()`` or ``subscribe()`` of a filter replaced this one before the broker
    answered it (nothing was refused; the later call says what the session wants).
    """

    __slots__ = ("filters",)

    def __init__(self, filters: list[str]) -> None:
        super().__init__()
        self.filters = filters

    def _complete(self, return_codes: tuple[int, ...]) -> None:
        refused = [
            (f, code)
            for f, code in zip(self.filters, return_codes, strict=True)
            if SUBACK_FAILURE <= code < SUBSCRIPTION_SUPERSEDED
        ]
        superseded = [
            f
            for f, code in zip(self.filters, return_codes, strict=True)
            if code == SUBSCRIPTION_SUPERSEDED
        ]
        if superseded and not refused:
            self._set_exception(
                SubscriptionSuperseded(
                    "a later unsubscribe() or subscribe() replaced the subscription to "
                    f"{', '.join(map(repr, superseded))} before the broker answered it",
                    filters=superseded,
                )
            )
        elif refused:
            described = ", ".join(
                f"{f!r} ({describe_reason_code(code, PacketType.SUBACK)})" for f, code in refused
            )
            self._set_exception(
                SubscriptionRefused(
                    f"the broker refused the subscription to {described}",
                    reason_codes={f: code for f, code in refused},
                )
            )
        else:
            self._set_result(return_codes)


class UnsubscribeRequest(Completion[None]):
    """An unsubscribe call; ``await`` it to know the broker dropped the filters."""

    __slots__ = ("filters",)

    def __init__(self, filters: list[str]) -> None:
        super().__init__()
        self.filters = filters
