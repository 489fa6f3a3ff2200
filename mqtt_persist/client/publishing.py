"""What ``publish()`` and ``publish_many()`` check before the session takes a message.

Every check runs before anything reaches the session, so bad input is refused before anything
is stored. ``publish_many()`` runs them over the whole batch first, so one bad message refuses
the batch and stores none of it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from mqtt_persist.client.options import ClientOptions
from mqtt_persist.compat import check_publish
from mqtt_persist.errors import InvalidInput, PayloadTooLarge, QueueFull
from mqtt_persist.protocol.packets import MQTT_3_1_1, MQTT_5, NO_PROPERTIES, Properties
from mqtt_persist.session.machine import ConnectionState, Session
from mqtt_persist.validation import (
    coerce_payload,
    max_payload_for,
    publish_packet_size,
    validate_publish_properties,
    validate_qos,
    validate_topic,
)

#: A message ready for ``Session.publish``: topic, payload, properties without the Message
#: Expiry Interval, and the Unix time the interval ends (None: no expiry).
Prepared = tuple[str, bytes, Properties, float | None]

#: What ``publish_many()`` takes per message: ``(topic, payload)``.
BatchItem = tuple[str, bytes | bytearray | memoryview | str]


def prepare(
    options: ClientOptions,
    session: Session,
    topic: str,
    payload: bytes | bytearray | memoryview | str,
    qos: int,
    retain: bool,
    properties: Properties | None,
) -> Prepared:
    """Check one message; raises an :class:`InvalidInput` subclass saying what is wrong."""
    topic_bytes = validate_topic(topic)
    validate_qos(qos)
    check_publish(options.compat, topic, qos)
    limit = max_payload_for(len(topic_bytes), qos)
    if options.max_payload_size is not None:
        limit = min(limit, options.max_payload_size)
    data = coerce_payload(payload, limit=limit)
    if not isinstance(retain, bool):
        raise InvalidInput(f"retain must be a bool, not {type(retain).__name__}")
    props = NO_PROPERTIES
    expires_at = None
    if properties is not None and properties is not NO_PROPERTIES:
        if options.protocol == MQTT_3_1_1:
            raise InvalidInput("publish properties need MQTT 5, not protocol=V311")
        props, encoded, expiry = validate_publish_properties(properties, data)
        if expiry is not None:
            expires_at = time.time() + expiry
        check_fits(session, len(topic_bytes), len(data), qos, len(encoded), expiry)
    elif session.terms.max_packet_size is not None:
        check_fits(session, len(topic_bytes), len(data), qos, 0, None)
    return topic, data, props, expires_at


def prepare_batch(
    options: ClientOptions,
    session: Session,
    items: Iterable[BatchItem],
    qos: int,
    retain: bool,
    properties: Properties | None,
) -> list[Prepared]:
    """Check every message of a batch; the first bad one raises, naming its index."""
    validate_qos(qos)  # also for an empty batch
    prepared = []
    for index, item in enumerate(items):
        try:
            if not isinstance(item, tuple) or len(item) != 2:
                raise InvalidInput(f"expected a (topic, payload) pair, not {item!r:.80}")
            topic, payload = item
            prepared.append(prepare(options, session, topic, payload, qos, retain, properties))
        except InvalidInput as exc:
            exc.add_note(f"publish_many: message {index} of the batch; nothing was stored")
            raise
    return prepared


def check_batch_room(options: ClientOptions, session: Session, count: int) -> bool:
    """Whether ``count`` more messages fit the queue now (``max_queued``; always without it).

    Raises :class:`QueueFull` for ``queue_full="error"`` when they do not, and for a batch that
    could never fit; False means: wait for room (``"block"``). ``"drop_oldest"`` always fits:
    the session drops (and reports) the oldest messages to make room.
    """
    limit = options.max_queued
    if limit is None or options.queue_full == "drop_oldest":
        return True
    if count > limit:
        raise QueueFull(f"a batch of {count} messages can never fit max_queued={limit}; refused")
    if session.queued + count <= limit:
        return True
    if options.queue_full == "error":
        raise QueueFull(
            f"outgoing queue has room for {limit - session.queued} of the batch's {count} "
            "messages; batch refused"
        )
    return False


def check_fits(
    session: Session,
    topic_bytes: int,
    payload_bytes: int,
    qos: int,
    properties_bytes: int,
    expiry: int | None,
) -> None:
    """Refuse a message larger than the connected MQTT 5 broker's Maximum Packet Size."""
    terms = session.terms
    limit = terms.max_packet_size
    if limit is None or session.connection_state is ConnectionState.DISCONNECTED:
        return
    if expiry is not None:
        properties_bytes += 5  # the Message Expiry Interval each send adds
    v5 = terms.protocol_version == MQTT_5
    size = publish_packet_size(topic_bytes, payload_bytes, qos, properties_bytes if v5 else None)
    if size > limit:
        raise PayloadTooLarge(
            f"the PUBLISH would be {size} bytes; the broker takes {limit} at most "
            "(its CONNACK Maximum Packet Size)"
        )
