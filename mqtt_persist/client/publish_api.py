"""Publishing: ``publish``, ``publish_many``, and MQTT 5 ``request``/``respond``."""

from __future__ import annotations

import uuid
from collections.abc import Iterable

import anyio

from mqtt_persist.client.base import ClientBase
from mqtt_persist.client.publishing import check_batch_room, prepare, prepare_batch
from mqtt_persist.completion import Completion, Delivery
from mqtt_persist.errors import InvalidInput, QueueFull
from mqtt_persist.message import Message
from mqtt_persist.protocol.packets import NO_PROPERTIES, Properties
from mqtt_persist.validation import validate_topic


class PublishAPI(ClientBase):
    """Messages from the application into the session."""

    async def publish(
        self,
        topic: str,
        payload: bytes | bytearray | memoryview | str = b"",
        qos: int = 0,
        retain: bool = False,
        *,
        properties: Properties | None = None,
    ) -> Delivery:
        """Put a message in the session and return its :class:`Delivery`.

        For QoS 1/2 it returns once the message is durable in the store, before any byte of it
        is written to the connection (write-ahead). It does not wait for the broker and never
        raises because the broker is unreachable; ``await`` the delivery to wait for the broker's
        acknowledgement. Cancelled while its commit is under way, it raises the cancellation
        once that commit ended (at most one sync later); if the commit succeeded, the message
        is stored and will be sent. Bad input raises an
        :class:`~mqtt_persist.errors.InvalidInput` subclass before anything is stored. With a
        full queue it waits (``queue_full="block"``), raises
        :class:`~mqtt_persist.errors.QueueFull` (``"error"``) or drops the oldest queued message
        (``"drop_oldest"``, counted in :attr:`stats` and logged).

        ``properties`` (MQTT 5) are the message's PUBLISH properties: user properties, content
        type, payload format indicator, response topic, correlation data and message expiry
        interval, e.g. ``Properties(user_properties=(("k", "v"),), message_expiry_interval=60)``.
        They are stored with the message. The expiry runs from this call: every (re)send
        carries what is left of it, and a message that expires before it reached the broker
        is discarded, counted in :attr:`stats` and logged, and its delivery resolves
        ``EXPIRED``. With ``protocol=ProtocolVersion.V311`` properties are refused; with
        ``"auto"`` against a 3.1.1-only broker they are not sent (logged once a connection),
        while the expiry is still kept here. A message the connected MQTT 5 broker announced
        it cannot take (over its Maximum Packet Size) raises
        :class:`~mqtt_persist.errors.PayloadTooLarge`; one found out later resolves
        ``REFUSED``. A PUBACK/PUBREC with a failure reason code resolves ``REFUSED`` too, with
        ``delivery.reason_code``.
        """
        parts = self._require_open()
        session, flusher = parts.session, parts.flusher
        options = self._options
        topic, data, props, expires_at = prepare(
            options, session, topic, payload, qos, retain, properties
        )
        if options.max_queued is not None:  # else the queue is never full
            while session.queue_is_full and options.queue_full == "block":
                flusher.room.clear()
                await flusher.room.wait()
                session = self._require_open().session
            if session.queue_is_full and options.queue_full == "error":
                raise QueueFull(
                    f"outgoing queue is full ({options.max_queued} messages waiting); "
                    "message refused"
                )
        seq = session.publish(topic, data, qos, retain, props, expires_at)
        return await self._track(parts, seq, topic, qos)

    async def publish_many(
        self,
        messages: Iterable[tuple[str, bytes | bytearray | memoryview | str]],
        qos: int = 0,
        retain: bool = False,
        *,
        properties: Properties | None = None,
    ) -> list[Delivery]:
        """Publish a batch of ``(topic, payload)`` messages; one :class:`Delivery` each, in order.

        The promise is :meth:`publish`'s, for the whole batch: at QoS 1/2 it returns once every
        message is durable in the store, with one commit for the batch (a gateway forwarding
        a buffer of readings pays one fsync, not one per reading). ``qos``, ``retain`` and
        ``properties`` apply to every message. Every message is checked before any is stored:
        the first bad one raises its :class:`~mqtt_persist.errors.InvalidInput` subclass (a
        note names its index) and nothing of the batch is stored. The batch enters the queue
        whole: with ``max_queued`` it waits until it fits (``queue_full="block"``), raises
        :class:`~mqtt_persist.errors.QueueFull` (``"error"``, or a batch larger than
        ``max_queued``), or drops the oldest queued messages (``"drop_oldest"``). Messages
        leave in the batch's order, after everything published before.
        """
        parts = self._require_open()
        session, flusher = parts.session, parts.flusher
        options = self._options
        batch = prepare_batch(options, session, messages, qos, retain, properties)
        while not check_batch_room(options, session, len(batch)):
            flusher.room.clear()
            await flusher.room.wait()
            session = self._require_open().session
        deliveries = parts.dispatcher.deliveries
        result = []
        # No await from the first message to the last: the batch lands in one outbox, so
        # the flusher commits it (with the packet IDs of those entering the window) at once.
        for topic, data, props, expires_at in batch:
            seq = session.publish(topic, data, qos, retain, props, expires_at)
            delivery = deliveries[seq] = Delivery(seq, topic, qos)
            result.append(delivery)
            if self._metrics is not None:
                self._metrics.published(qos)
        if result:
            flusher.wake.set()
            if qos and self._storage.durable:
                await flusher.committed()
        return result

    # --- request / response (MQTT 5) --------------------------------------------------------

    async def request(
        self,
        topic: str,
        payload: bytes | bytearray | memoryview | str = b"",
        qos: int = 1,
        *,
        response_topic: str,
        properties: Properties | None = None,
        timeout: float | None = None,
    ) -> Message:
        """Publish a request and wait for its response (MQTT 5 request/response, §4.10).

        The request carries ``response_topic`` and a fresh Correlation Data; the first message
        that arrives on ``response_topic`` with that correlation data is the response (the
        request itself, should this client be subscribed to its topic, is a message): it is
        returned here and does not appear in :attr:`messages`. Subscribe to ``response_topic``
        first (a subscription is stored and restored like any other). The request itself is
        published as :meth:`publish` publishes, so it is durable at QoS 1/2; the wait is not:
        after a restart, or once ``timeout`` (seconds) raised :class:`TimeoutError`, a late
        response arrives in :attr:`messages` like any message. The responder answers with
        :meth:`respond`.
        """
        validate_topic(response_topic)
        correlation = uuid.uuid4().bytes
        props = (properties or NO_PROPERTIES)._replace(
            response_topic=response_topic, correlation_data=correlation
        )
        waiter: Completion[Message] = Completion()
        responses = self._require_open().dispatcher.responses
        responses[correlation] = (response_topic, waiter)
        try:
            await self.publish(topic, payload, qos, properties=props)
            with anyio.fail_after(timeout):
                return await waiter
        finally:
            responses.pop(correlation, None)

    async def respond(
        self,
        request: Message,
        payload: bytes | bytearray | memoryview | str = b"",
        qos: int = 1,
        *,
        properties: Properties | None = None,
    ) -> Delivery:
        """Publish the response to a received request: to its Response Topic, with its
        Correlation Data. :class:`InvalidInput` if the message names no response topic."""
        response_topic = request.properties.response_topic
        if response_topic is None:
            raise InvalidInput(f"the message on {request.topic!r} names no response topic")
        props = properties or NO_PROPERTIES
        if request.properties.correlation_data is not None:
            props = props._replace(correlation_data=request.properties.correlation_data)
        return await self.publish(response_topic, payload, qos, properties=props)
