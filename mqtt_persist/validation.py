"""Input checks that run before anything is stored or sent ("bad input is refused").

Every check raises a subclass of :class:`~mqtt_persist.errors.InvalidInput` whose message names
the offending value, so a caller learns what was wrong without reading the MQTT specification.
"""

from __future__ import annotations

from mqtt_persist.errors import (
    InvalidClientId,
    InvalidInput,
    InvalidQoS,
    InvalidTopic,
    InvalidTopicFilter,
    PayloadTooLarge,
)
from mqtt_persist.protocol.packets import PacketType, Properties
from mqtt_persist.protocol.properties import encode_properties

#: MQTT strings carry a two-byte length prefix (MQTT 3.1.1 §1.5.3).
MAX_STRING_BYTES = 65_535
#: Largest "remaining length" a fixed header can express (MQTT 3.1.1 §2.2.3).
MAX_REMAINING_LENGTH = 268_435_455

PayloadLike = bytes | bytearray | memoryview | str


def _encoded_name(value: str, what: str, error: type[InvalidTopic | InvalidTopicFilter]) -> bytes:
    try:
        encoded = value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise error(f"{what} {value!r} is not valid UTF-8: {exc.reason}") from None
    if not encoded:
        raise error(f"{what} must not be empty")
    if len(encoded) > MAX_STRING_BYTES:
        raise error(f"{what} is {len(encoded)} bytes long; MQTT allows at most {MAX_STRING_BYTES}")
    if "\x00" in value:
        raise error(f"{what} {value!r} contains U+0000 (NUL), which MQTT forbids")
    return encoded


def validate_topic(topic: object) -> bytes:
    """Check a topic name for PUBLISH; returns its UTF-8 encoding."""
    if not isinstance(topic, str):
        raise InvalidTopic(f"topic must be a str, not {type(topic).__name__}")
    encoded = _encoded_name(topic, "topic", InvalidTopic)
    if "+" in topic or "#" in topic:
        raise InvalidTopic(
            f"topic {topic!r} contains a wildcard ('+' or '#'); wildcards are only allowed in "
            "subscription filters"
        )
    return encoded


def validate_topic_filter(topic_filter: object) -> str:
    """Check a subscription filter (MQTT 3.1.1 §4.7.1)."""
    if not isinstance(topic_filter, str):
        raise InvalidTopicFilter(f"topic filter must be a str, not {type(topic_filter).__name__}")
    _encoded_name(topic_filter, "topic filter", InvalidTopicFilter)
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            raise InvalidTopicFilter(
                f"topic filter {topic_filter!r}: '#' must be the last level and stand alone"
            )
        if "+" in level and level != "+":
            raise InvalidTopicFilter(
                f"topic filter {topic_filter!r}: '+' must occupy a whole level"
            )
    if is_shared_subscription(topic_filter):
        validate_shared_subscription(topic_filter)
    return topic_filter


def validate_qos(qos: object) -> int:
    """Check a QoS level: the int 0, 1 or 2."""
    if isinstance(qos, bool) or not isinstance(qos, int) or not 0 <= qos <= 2:
        raise InvalidQoS(f"qos must be 0, 1 or 2, not {qos!r}")
    return qos


def coerce_payload(payload: object, *, limit: int) -> bytes:
    """Turn a payload into bytes (str is encoded as UTF-8) and enforce the size limit."""
    if isinstance(payload, bytes):
        data = payload
    elif isinstance(payload, str):
        data = payload.encode("utf-8")
    elif isinstance(payload, bytearray | memoryview):
        data = bytes(payload)
    else:
        raise InvalidInput(
            f"payload must be bytes, bytearray, memoryview or str, not {type(payload).__name__}"
        )
    if len(data) > limit:
        raise PayloadTooLarge(f"payload is {len(data)} bytes; the limit is {limit}")
    return data


def max_payload_for(topic_bytes: int, qos: int) -> int:
    """The largest payload the protocol can carry for a topic of this length at this QoS."""
    return MAX_REMAINING_LENGTH - 2 - topic_bytes - (2 if qos else 0)


def validate_client_id(client_id: object, *, clean_session: bool) -> str:
    """A persistent session needs a non-empty client id; MQTT strings cap its length."""
    if not isinstance(client_id, str):
        raise InvalidClientId(f"client_id must be a str, not {type(client_id).__name__}")
    if not client_id and not clean_session:
        raise InvalidClientId(
            "client_id must not be empty with clean_session=False: the broker and the store "
            "find a persistent session by its client id"
        )
    try:
        encoded = client_id.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidClientId(f"client_id {client_id!r} is not valid UTF-8: {exc.reason}") from None
    if len(encoded) > MAX_STRING_BYTES:
        raise InvalidClientId(f"client_id is {len(encoded)} bytes; MQTT allows {MAX_STRING_BYTES}")
    if "\x00" in client_id:
        raise InvalidClientId("client_id must not contain U+0000 (NUL)")
    return client_id


def validate_will_properties(properties: object) -> Properties:
    """Check a will's MQTT 5 properties (will delay, message expiry, content type, ...)."""
    if not isinstance(properties, Properties):
        raise InvalidInput(f"will properties must be a Properties, not {type(properties).__name__}")
    try:
        encode_properties(properties, "will")
    except ValueError as exc:
        raise InvalidInput(f"will {exc}") from None
    return properties


def validate_publish_properties(
    properties: object, payload: bytes
) -> tuple[Properties, bytes, int | None]:
    """Check MQTT 5 PUBLISH properties; returns them without the Message Expiry Interval, their
    encoding (what a store keeps), and that interval (seconds, or None).

    Refused: a property PUBLISH may not carry; a Topic Alias (the client sets those up per
    connection itself, never in the store) or a Subscription Identifier (only the broker sends
    those); a Message Expiry Interval of 0 (leave it out for a message that never expires); a
    Response Topic that is not a valid topic name; a Payload Format Indicator of 1 (UTF-8 text)
    on a payload that is not valid UTF-8, which the broker may answer by disconnecting.
    """
    if not isinstance(properties, Properties):
        raise InvalidInput(f"properties must be a Properties, not {type(properties).__name__}")
    try:
        encode_properties(properties, PacketType.PUBLISH)
    except ValueError as exc:
        raise InvalidInput(f"publish {exc}") from None
    if properties.topic_alias is not None:
        raise InvalidInput(
            "publish properties must not set topic_alias: topic aliases belong to one "
            "connection, and the client manages them"
        )
    if properties.subscription_identifiers:
        raise InvalidInput(
            "publish properties must not set subscription_identifiers: only a broker sends "
            "them (MQTT 5 §3.3.4)"
        )
    expiry = properties.message_expiry_interval
    if expiry == 0:
        raise InvalidInput(
            "message_expiry_interval must be at least 1 second; leave it None for a message "
            "that never expires"
        )
    if properties.response_topic is not None:
        try:
            validate_topic(properties.response_topic)
        except InvalidTopic as exc:
            raise InvalidInput(f"response_topic: {exc}") from None
    if properties.payload_format_indicator == 1:
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidInput(
                f"payload_format_indicator=1 says the payload is UTF-8 text, but it is not: "
                f"{exc.reason} at byte {exc.start}"
            ) from None
    if expiry is not None:
        properties = properties._replace(message_expiry_interval=None)
    return properties, encode_properties(properties, PacketType.PUBLISH), expiry


def _vbi_length(n: int) -> int:
    return 1 if n < 128 else 2 if n < 16_384 else 3 if n < 2_097_152 else 4


def publish_packet_size(
    topic_bytes: int, payload_bytes: int, qos: int, properties_bytes: int | None
) -> int:
    """The size of a whole PUBLISH packet (MQTT 5 when ``properties_bytes`` is not None:
    the length of the encoded property list), as a Maximum Packet Size measures it."""
    body = 2 + topic_bytes + (2 if qos else 0) + payload_bytes
    if properties_bytes is not None:
        body += _vbi_length(properties_bytes) + properties_bytes
    return 1 + _vbi_length(body) + body


#: ``$share/{ShareName}/{filter}`` (MQTT 5 §4.8.2).
SHARED_PREFIX = "$share/"


def is_shared_subscription(topic_filter: str) -> bool:
    """Whether the filter names a shared subscription."""
    return topic_filter.startswith(SHARED_PREFIX)


def validate_shared_subscription(topic_filter: str) -> None:
    """Check a ``$share/group/filter``: a non-empty group without ``/``, ``+`` or ``#``, then a
    valid, non-empty filter (the whole was already checked as a filter)."""
    group, slash, inner = topic_filter[len(SHARED_PREFIX) :].partition("/")
    if not group or "+" in group or "#" in group:
        raise InvalidTopicFilter(
            f"shared subscription {topic_filter!r}: the share name after '$share/' must be "
            "non-empty and must not contain '+' or '#'"
        )
    if not slash or not inner:
        raise InvalidTopicFilter(
            f"shared subscription {topic_filter!r} needs a topic filter after the share name: "
            "'$share/<group>/<filter>'"
        )
