"""Input checks that run before anything is stored or sent (G7).

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

#: MQTT strings carry a two-byte length prefix (MQTT 3.1.1 §1.5.3).
MAX_STRING_BYTES = 65_535
#: Largest "remaining length" a fixed header can express (MQTT 3.1.1 §2.2.3).
MAX_REMAINING_LENGTH = 268_435_455

PayloadLike = bytes | bytearray | memoryview | str


def _utf8(value: str, what: str, error: type[InvalidTopic | InvalidTopicFilter]) -> bytes:
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
    encoded = _utf8(topic, "topic", InvalidTopic)
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
    _utf8(topic_filter, "topic filter", InvalidTopicFilter)
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
