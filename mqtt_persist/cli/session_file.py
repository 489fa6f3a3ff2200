"""The session export format: JSON Lines, version 1 (documented in docs/cli.md).

Line 1 is the header::

    {"format": "mqtt-persist-session", "version": 1, "client_id": "sensor-17",
     "protocol_version": 4, "session_expiry": null, "records": 5, "exported_at": 1717000000.5}

then exactly ``records`` lines, one record each, in this order: set-aside messages, messages
(ascending ``seq``; queued ones have ``packet_id`` null), inbound QoS 2 packet IDs,
subscriptions, pending unsubscribes. Payloads and MQTT 5 properties are base64. Every field is
always written and always required: a reader refuses a missing, unknown or mistyped field, a
line out of order, a duplicate, a count that does not match the header, another format
version, or message properties the client could not decode or would not send, naming the
line. A newer version of the format gets a new ``version`` number.

This module only encodes and decodes; ``transfer.py`` reads and writes stores with it. It needs
no click, so tools of your own can import it.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from mqtt_persist.errors import InvalidInput, MalformedPacket
from mqtt_persist.protocol.packets import PacketType
from mqtt_persist.protocol.properties import decode_properties
from mqtt_persist.session.state import (
    InboundReceived,
    MessageAdded,
    MessageReleased,
    MessageSetAside,
    Operation,
    PacketIdAssigned,
    SetAsideMessage,
    StoredMessage,
    StoredSubscription,
    SubscriptionRemoved,
    subscription_set,
    with_flow,
)
from mqtt_persist.stores.serialization import EncodeError, encode_operation
from mqtt_persist.validation import (
    validate_publish_properties,
    validate_topic,
    validate_topic_filter,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "FileFormatError",
    "Header",
    "InboundId",
    "PendingUnsubscribe",
    "Reader",
    "Record",
    "encode_header",
    "encode_record",
    "record_operations",
]

FORMAT_NAME = "mqtt-persist-session"
FORMAT_VERSION = 1

#: Largest sequence number the stores can keep (int64).
_MAX_SEQ = (1 << 63) - 1
_MAX_SUBSCRIPTION_ID = 268_435_455
#: MQTT 5 subscription option bits besides QoS: no local, retain as published, retain handling.
_OPTION_BITS = 0x04 | 0x08 | 0x30


class FileFormatError(InvalidInput):
    """A session file that is not valid version-1 JSON Lines; the message names the line."""


@dataclass(frozen=True, slots=True)
class Header:
    """The first line: whose session this is, and what to expect after it."""

    client_id: str
    #: 4 (MQTT 3.1.1), 5 (MQTT 5) or None (never connected).
    protocol_version: int | None
    #: The session's TTL in seconds after its last use; None: never expires.
    session_expiry: float | None
    #: How many record lines follow.
    records: int
    #: Unix time of the export (information only).
    exported_at: float


@dataclass(frozen=True, slots=True)
class InboundId:
    """The packet ID of an inbound QoS 2 flow delivered but not yet released."""

    packet_id: int


@dataclass(frozen=True, slots=True)
class PendingUnsubscribe:
    """A filter whose UNSUBSCRIBE the broker has not acknowledged yet."""

    topic_filter: str


Record = StoredMessage | SetAsideMessage | InboundId | StoredSubscription | PendingUnsubscribe

# --- writing ---------------------------------------------------------------------------------


def _line(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def encode_header(header: Header) -> bytes:
    """The header line (with its newline)."""
    return _line(
        {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "client_id": header.client_id,
            "protocol_version": header.protocol_version,
            "session_expiry": header.session_expiry,
            "records": header.records,
            "exported_at": header.exported_at,
        }
    )


def _message_fields(m: StoredMessage) -> dict[str, Any]:
    return {
        "seq": m.seq,
        "topic": m.topic,
        "qos": m.qos,
        "retain": m.retain,
        "payload": _b64(m.payload),
        "properties": _b64(m.properties),
        "expires_at": m.expires_at,
    }


def encode_record(record: Record) -> bytes:
    """One record line (with its newline)."""
    if isinstance(record, StoredMessage):
        fields = _message_fields(record)
        return _line(
            {
                "type": "message",
                **fields,
                "packet_id": record.packet_id,
                "released": record.released,
            }
        )
    if isinstance(record, SetAsideMessage):
        fields = _message_fields(record.message)
        return _line({"type": "set_aside", **fields, "reason": record.reason, "at": record.at})
    if isinstance(record, InboundId):
        return _line({"type": "inbound_qos2", "packet_id": record.packet_id})
    if isinstance(record, StoredSubscription):
        return _line(
            {
                "type": "subscription",
                "topic_filter": record.topic_filter,
                "qos": record.qos,
                "confirmed": record.confirmed,
                "options": record.options,
                "subscription_id": record.subscription_id,
            }
        )
    return _line({"type": "pending_unsubscribe", "topic_filter": record.topic_filter})


# --- what a record does to a store -----------------------------------------------------------


def record_operations(record: Record) -> list[Operation]:
    """The journal operations that store ``record`` (as the client itself would have)."""
    if isinstance(record, StoredMessage):
        ops: list[Operation] = [MessageAdded(with_flow(record))]
        if record.packet_id is not None:
            ops.append(PacketIdAssigned(record.seq, record.packet_id))
            if record.released:
                ops.append(MessageReleased(record.seq))
        return ops
    if isinstance(record, SetAsideMessage):
        message = record.message
        return [MessageAdded(message), MessageSetAside(message.seq, record.reason, record.at)]
    if isinstance(record, InboundId):
        return [InboundReceived(record.packet_id)]
    if isinstance(record, StoredSubscription):
        return [subscription_set(record)]
    return [SubscriptionRemoved(record.topic_filter, unsubscribe_pending=True)]


# --- reading ---------------------------------------------------------------------------------

_T = TypeVar("_T")

#: The order records come in: a record's rank may not be lower than the one before it.
_RANK = {
    "set_aside": 0,
    "message": 1,
    "inbound_qos2": 2,
    "subscription": 3,
    "pending_unsubscribe": 4,
}


class Reader:
    """Checks the lines of one session file, in order: :meth:`header`, then :meth:`record`.

    Memory stays flat however many messages the file holds: it keeps the last sequence number
    of each kind of message, the set-aside sequence numbers (few by nature) and the IDs and
    filters seen (bounded by MQTT: 65,535 packet IDs, the subscriptions of one session).
    """

    def __init__(self) -> None:
        self.line_number = 0
        self._header: Header | None = None
        self._records = 0
        self._rank = 0
        self._last_seq = {"message": 0, "set_aside": 0}
        self._set_aside: set[int] = set()
        self._inbound: set[int] = set()
        self._filters: set[str] = set()
        self._pending: set[str] = set()

    def _fail(self, message: str) -> FileFormatError:
        return FileFormatError(f"line {self.line_number}: {message}")

    def _document(self, line: bytes) -> dict[str, Any]:
        self.line_number += 1
        try:
            document = json.loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            raise self._fail(f"not JSON ({exc})") from None
        if not isinstance(document, dict):
            raise self._fail("not a JSON object")
        return document

    def header(self, line: bytes) -> Header:
        """Check the first line; :class:`FileFormatError` unless it is a version-1 header."""
        document = self._document(line)
        if document.get("format") != FORMAT_NAME:
            raise self._fail(f"not an mqtt-persist session file (no format {FORMAT_NAME!r})")
        if document.get("version") != FORMAT_VERSION:
            raise self._fail(
                f"format version {document.get('version')!r}; this mqtt-persist reads version "
                f"{FORMAT_VERSION}"
            )
        fields = _Fields(document, self._fail)
        client_id = fields.string("client_id")
        if not client_id:
            raise self._fail("client_id must not be empty")
        protocol_version = fields.optional("protocol_version", fields.integer)
        if protocol_version not in (None, 4, 5):
            raise self._fail(f"protocol_version must be 4, 5 or null, not {protocol_version}")
        expiry = fields.optional("session_expiry", fields.number)
        if expiry is not None and expiry <= 0:
            raise self._fail(f"session_expiry must be > 0 seconds or null, not {expiry}")
        records = fields.integer("records")
        if records < 0:
            raise self._fail(f"records must be >= 0, not {records}")
        header = Header(client_id, protocol_version, expiry, records, fields.number("exported_at"))
        fields.done({"format", "version"})
        self._header = header
        return header

    def record(self, line: bytes) -> Record:
        """Check the next record line and return it."""
        header = self._header
        if header is None:
            raise RuntimeError("read the header first")  # pragma: no cover - a caller's bug
        document = self._document(line)
        self._records += 1
        if self._records > header.records:
            raise self._fail(f"more records than the {header.records} the header announces")
        kind = document.get("type")
        rank = _RANK.get(kind) if isinstance(kind, str) else None
        if rank is None:
            raise self._fail(f"unknown record type {kind!r}")
        if rank < self._rank:
            raise self._fail(f"a {kind} record after the records that follow it in the format")
        self._rank = rank
        fields = _Fields(document, self._fail)
        record: Record
        if kind == "message":
            record = self._message(fields)
        elif kind == "set_aside":
            record = self._set_aside_message(fields)
        elif kind == "inbound_qos2":
            record = InboundId(fields.integer("packet_id"))
            _check_stored_packet_id(record.packet_id, self._fail)
            _unique(record.packet_id, self._inbound, "inbound QoS 2 packet ID", self._fail)
        elif kind == "subscription":
            record = self._subscription(fields)
        else:
            record = PendingUnsubscribe(_topic_filter(fields.string("topic_filter"), self._fail))
            _unique(record.topic_filter, self._pending, "pending unsubscribe", self._fail)
        fields.done({"type"})
        try:
            # What every store checks before it stores a batch (stores/_checks.py), here
            # before anything is deleted or written.
            for op in record_operations(record):
                encode_operation(op)
        except EncodeError as exc:
            raise self._fail(str(exc)) from None
        return record

    def finish(self) -> None:
        """After the last line: :class:`FileFormatError` unless every announced record came."""
        header = self._header
        if header is None:
            raise FileFormatError("the file is empty (no header line)")
        if self._records != header.records:
            raise FileFormatError(
                f"the header announces {header.records} records but the file has "
                f"{self._records} (is it truncated?)"
            )

    def _stored_message(self, fields: _Fields, kind: str) -> StoredMessage:
        seq = fields.integer("seq")
        if not 1 <= seq <= _MAX_SEQ:
            raise self._fail(f"seq must be in 1..{_MAX_SEQ}, not {seq}")
        if seq <= self._last_seq[kind]:
            raise self._fail(f"seq {seq} is not above the previous {kind} record's")
        self._last_seq[kind] = seq
        topic = fields.string("topic")
        try:
            validate_topic(topic)
        except InvalidInput as exc:
            raise self._fail(str(exc)) from None
        qos = fields.integer("qos")
        if qos not in (1, 2):
            raise self._fail(f"a stored message has QoS 1 or 2, not {qos}")
        payload = fields.base64("payload")
        retain = fields.boolean("retain")
        properties = fields.base64("properties")
        problem = _properties_problem(properties)
        if problem is not None:
            raise self._fail(f"'properties' of seq {seq} {problem}")
        return StoredMessage(
            seq,
            topic,
            payload,
            qos,
            retain,
            properties=properties,
            expires_at=fields.optional("expires_at", fields.number),
        )

    def _message(self, fields: _Fields) -> StoredMessage:
        message = self._stored_message(fields, "message")
        if message.seq in self._set_aside:
            raise self._fail(f"seq {message.seq} is also a set-aside message")
        packet_id = fields.optional("packet_id", fields.integer)
        released = fields.boolean("released")
        if packet_id is not None:
            _check_stored_packet_id(packet_id, self._fail)
        if released and (message.qos != 2 or packet_id is None):
            raise self._fail("only a QoS 2 message in flight (with a packet_id) can be released")
        return with_flow(message, packet_id, released)

    def _set_aside_message(self, fields: _Fields) -> SetAsideMessage:
        message = self._stored_message(fields, "set_aside")
        self._set_aside.add(message.seq)
        return SetAsideMessage(message, fields.string("reason"), fields.number("at"))

    def _subscription(self, fields: _Fields) -> StoredSubscription:
        topic_filter = _topic_filter(fields.string("topic_filter"), self._fail)
        _unique(topic_filter, self._filters, "subscription", self._fail)
        qos = fields.integer("qos")
        if qos not in (0, 1, 2):
            raise self._fail(f"a subscription's qos is 0, 1 or 2, not {qos}")
        options = fields.integer("options")
        if options & ~_OPTION_BITS or (options & 0x30) == 0x30:
            raise self._fail(f"options {options:#x} are not valid MQTT 5 subscription options")
        subscription_id = fields.optional("subscription_id", fields.integer)
        if subscription_id is not None and not 1 <= subscription_id <= _MAX_SUBSCRIPTION_ID:
            raise self._fail(f"subscription_id must be in 1..{_MAX_SUBSCRIPTION_ID} or null")
        return StoredSubscription(
            topic_filter, qos, fields.boolean("confirmed"), options, subscription_id
        )


class _Fields:
    """Typed access to one JSON object's fields, each required; :meth:`done` refuses extras."""

    def __init__(self, document: dict[str, Any], fail: Callable[[str], FileFormatError]) -> None:
        self._document = document
        self._fail = fail
        self._used: set[str] = set()

    def _get(self, name: str) -> Any:
        self._used.add(name)
        if name not in self._document:
            raise self._fail(f"missing field {name!r}")
        return self._document[name]

    def _typed(self, name: str, check: Callable[[Any], bool], what: str) -> Any:
        value = self._get(name)
        if not check(value):
            raise self._fail(f"{name!r} must be {what}, not {json.dumps(value)[:40]}")
        return value

    def string(self, name: str) -> str:
        value: str = self._typed(name, lambda v: isinstance(v, str), "a string")
        return value

    def integer(self, name: str) -> int:
        value: int = self._typed(
            name, lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"
        )
        return value

    def number(self, name: str) -> float:
        value = self._typed(
            name,
            lambda v: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v),
            "a number",
        )
        return float(value)

    def boolean(self, name: str) -> bool:
        value: bool = self._typed(name, lambda v: isinstance(v, bool), "true or false")
        return value

    def base64(self, name: str) -> bytes:
        text = self.string(name)
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise self._fail(f"{name!r} is not valid base64") from None

    def optional(self, name: str, read: Callable[[str], _T]) -> _T | None:
        self._used.add(name)
        if self._document.get(name, 0) is None:
            return None
        return read(name)

    def done(self, also: set[str]) -> None:
        extra = sorted(set(self._document) - self._used - also)
        if extra:
            raise self._fail(f"unknown field {extra[0]!r}")


def _properties_problem(data: bytes) -> str | None:
    """What is wrong with a stored message's encoded MQTT 5 properties, or None.

    The stores keep them as bytes, and the client decodes them only when it sends the message:
    a file must not put there what it could not decode or would have refused to publish.
    """
    if not data:
        return None
    try:
        properties = decode_properties(data, PacketType.PUBLISH)
    except MalformedPacket as exc:
        # The decoder's messages start with what it decodes ("properties").
        detail = str(exc).removeprefix("properties").lstrip(": ")
        return f"are not valid MQTT 5 PUBLISH properties: {detail}"
    if properties.message_expiry_interval is not None:
        # The client keeps the expiry in expires_at and computes the interval at each send;
        # one stored here would be resent unchanged, never counting down.
        return "must not carry a Message Expiry Interval: 'expires_at' holds the expiry"
    try:
        # Topic Alias, Subscription Identifier, a Response Topic MQTT refuses, as for a
        # publish. The payload is not given: a Payload Format Indicator that does not match
        # it is no protocol error (a broker may refuse the message), and stores may hold such
        # messages, which an export must be able to move.
        validate_publish_properties(properties, b"")
    except InvalidInput as exc:
        return f"are refused: {exc}"
    return None


def _check_stored_packet_id(packet_id: int, fail: Callable[[str], FileFormatError]) -> None:
    if not 1 <= packet_id <= 65535:
        raise fail(f"a packet ID is in 1..65535, not {packet_id}")


def _topic_filter(value: str, fail: Callable[[str], FileFormatError]) -> str:
    try:
        validate_topic_filter(value)
    except InvalidInput as exc:
        raise fail(str(exc)) from None
    return value


def _unique(value: _T, seen: set[_T], what: str, fail: Callable[[str], FileFormatError]) -> None:
    if value in seen:
        raise fail(f"duplicate {what} {value!r}")
    seen.add(value)
