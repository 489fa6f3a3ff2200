"""Handing what the session reports to the application, once its batch is committed.

The flusher calls :meth:`EventDispatcher.dispatch` with each batch's events after the batch's
store operations are durable, so nothing reaches the application before it would survive a
crash: a ``Delivery`` resolves, a ``subscribe()`` request completes, a received message is
queued for ``client.messages``, and ``wait_connected()`` wakes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from mqtt_persist.client.inbox import Inbox
from mqtt_persist.client.signals import Signal
from mqtt_persist.completion import Completion, Delivery, SubscribeRequest, UnsubscribeRequest
from mqtt_persist.log import ClientLogger
from mqtt_persist.message import Acknowledger, DeliveryOutcome, Message
from mqtt_persist.metrics import ClientMetrics
from mqtt_persist.session.events import (
    SUBSCRIPTION_SUPERSEDED,
    Anomaly,
    ConnectionReady,
    ConnectRefused,
    Event,
    MessageReceived,
    Notice,
    PublishCompleted,
    PublishRefused,
    SubscribeCompleted,
    UnsubscribeCompleted,
)


class EventDispatcher:
    """Resolves what callers wait for, from the session's events; one per client."""

    def __init__(
        self,
        log: ClientLogger,
        address: tuple[str, int],
        *,
        max_unread: int = 0,
        on_leave: Callable[[Message], None] = lambda message: None,
        acker: Acknowledger | None = None,
        ack_now: Callable[[Message], None] = lambda message: None,
        metrics: ClientMetrics | None = None,
    ) -> None:
        """``max_unread`` bounds the inbox; ``on_leave`` hears of every message that leaves
        it (read or dropped); ``acker`` is set on messages the application must acknowledge;
        ``ack_now`` acknowledges a message the application never sees (a ``request()``
        response); ``metrics`` hears of every received message."""
        self._log = log
        self._metrics = metrics
        self._address = address
        #: publish() handles by sequence number, until their flow ends.
        self.deliveries: dict[int, Delivery] = {}
        #: subscribe()/unsubscribe() handles by the session's request token.
        self.requests: dict[int, SubscribeRequest | UnsubscribeRequest] = {}
        #: Set while the connection is up and the session restored on the broker.
        self.ready = Signal()
        #: Successful connections (the first one included).
        self.connections = 0
        #: CONNACK's Session Present of the last successful connection (None before one).
        self.session_present: bool | None = None
        #: ``request()`` calls waiting for their response, by correlation data: the response
        #: topic and the waiter.
        self.responses: dict[bytes, tuple[str, Completion[Message]]] = {}
        # Never blocks the flusher (that would stall every publish): the session holds QoS 1/2
        # beyond ``max_unread`` unacknowledged, and the inbox drops the oldest QoS 0.
        self.inbox = Inbox(max_unread, on_leave)
        self._on_leave = on_leave
        self._acker = acker
        self._ack_now = ack_now

    def dispatch(self, events: Iterable[Event]) -> None:
        """Handle one committed batch's events, in order."""
        for event in events:
            match event:
                case PublishCompleted():
                    self._publish_completed(event)
                case MessageReceived(message=message):
                    if self._metrics is not None:
                        self._metrics.received(message.qos)
                    if message._ack_token and self._acker is not None:
                        # Frozen for the application; the session cannot know the client.
                        object.__setattr__(message, "_acker", self._acker)
                    if self.responses and self._answers_a_request(message):
                        # Never in the inbox: it left it at once (and is acknowledged).
                        self._on_leave(message)
                        self._ack_now(message)
                        continue
                    # After the client stopped, ``messages`` has ended: nobody would read it.
                    self.inbox.put(message)
                case SubscribeCompleted():
                    self._subscribe_completed(event)
                case UnsubscribeCompleted(token=token):
                    request = self.requests.pop(token, None)
                    if isinstance(request, UnsubscribeRequest):
                        request._set_result(None)
                case ConnectionReady():
                    self._connection_ready(event)
                case ConnectRefused():
                    # The connection supervisor ends the connection the moment the session
                    # refuses a CONNACK (connection.py); there is nothing left to resolve.
                    pass
                case PublishRefused():
                    self._publish_refused(event)
                case Notice(text=text):
                    self._log.warning("%s", text)
                case Anomaly(text=text):
                    self._log.warning("broker anomaly: %s", text)

    def _publish_completed(self, event: PublishCompleted) -> None:
        delivery = self.deliveries.pop(event.seq, None)
        outcome = event.outcome
        if outcome is DeliveryOutcome.DROPPED:
            self._log.warning(
                "queue full: dropped the oldest queued message (seq %d, topic %r)",
                event.seq,
                delivery.topic if delivery else "?",
            )
        elif outcome is DeliveryOutcome.IN_DOUBT:
            self._log.warning(
                "QoS 2 message seq %d is in doubt: the broker lost its session after PUBREC",
                event.seq,
            )
        elif outcome is DeliveryOutcome.EXPIRED:
            self._log.warning(
                "message seq %d (topic %r) expired before the broker took it; discarded",
                event.seq,
                delivery.topic if delivery else "?",
            )
        if delivery is not None:
            delivery._set_result(outcome)

    def _answers_a_request(self, message: Message) -> bool:
        """Hand a response to the ``request()`` waiting for its correlation data, if any.

        Only a message on the request's response topic answers it: the request itself carries
        the same correlation data, and a client subscribed to its own request topic receives it.
        """
        correlation = message.properties.correlation_data
        if correlation is None:
            return False
        pending = self.responses.get(correlation)
        if pending is None or pending[0] != message.topic:
            return False
        del self.responses[correlation]
        pending[1]._set_result(message)
        return True

    def _publish_refused(self, event: PublishRefused) -> None:
        delivery = self.deliveries.pop(event.seq, None)
        self._log.warning(
            "message seq %d (topic %r) refused, reason code 0x%02x: %s; discarded",
            event.seq,
            delivery.topic if delivery else "?",
            event.reason_code,
            event.reason_string or "no reason given",
        )
        if delivery is not None:
            delivery.reason_code = event.reason_code
            delivery.reason_string = event.reason_string
            delivery._set_result(DeliveryOutcome.REFUSED)

    def _subscribe_completed(self, event: SubscribeCompleted) -> None:
        request = self.requests.pop(event.token, None)
        if isinstance(request, SubscribeRequest):
            request._complete(event.return_codes)
        refused = [c for c in event.return_codes if 0x80 <= c < SUBSCRIPTION_SUPERSEDED]
        if refused:
            self._log.warning("broker refused %d subscription filter(s)", len(refused))

    def _connection_ready(self, event: ConnectionReady) -> None:
        self.connections += 1
        self.session_present = event.session_present
        if not event.session_present and (event.requeued or event.in_doubt):
            if event.clean_start:
                # Asked for: each connection of a clean-session client starts afresh.
                self._log.info(
                    "new clean session, as asked (clean_session=True): %d message(s) the "
                    "previous connection left unacknowledged are published again as new, %d "
                    "QoS 2 message(s) past PUBREC are reported in doubt",
                    event.requeued,
                    event.in_doubt,
                )
            else:
                self._log.warning(
                    "the broker answered CONNACK without our session (it restarted without "
                    "persistence, the session expired there, or this is another broker): %d "
                    "message(s) it had not acknowledged are published again as new, %d QoS 2 "
                    "message(s) past PUBREC are reported in doubt",
                    event.requeued,
                    event.in_doubt,
                )
        hostname, port = self._address
        self._log.info(
            "connected to %s:%d (session present: %s)", hostname, port, event.session_present
        )
        self.ready.set()

    def end_messages(self) -> None:
        """No more messages: every reader ends after those already queued."""
        self.inbox.close()

    def fail_pending(self, error: BaseException) -> None:
        """The client closed: every delivery and request still open raises ``error``."""
        for delivery in self.deliveries.values():
            delivery._set_exception(error)
        for request in self.requests.values():
            request._set_exception(error)
        for _, waiter in self.responses.values():
            waiter._set_exception(error)
        self.end_messages()
