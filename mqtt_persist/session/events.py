"""What the session state machine tells the I/O shell besides packets and store operations."""

from __future__ import annotations

from dataclasses import dataclass

from mqtt_persist.message import DeliveryOutcome, Message


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """Hand this message to the application (after the batch's store operations committed)."""

    message: Message


@dataclass(frozen=True, slots=True)
class PublishCompleted:
    """The flow of the message with this sequence number ended."""

    seq: int
    outcome: DeliveryOutcome


@dataclass(frozen=True, slots=True)
class SubscribeCompleted:
    """Every filter of a ``subscribe`` request got its SUBACK return code (0x80: refused)."""

    token: int
    return_codes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class UnsubscribeCompleted:
    """The broker no longer holds the filters of this ``unsubscribe`` request."""

    token: int


@dataclass(frozen=True, slots=True)
class ConnectionReady:
    """CONNACK accepted and, when the broker had lost the session, every filter re-subscribed."""

    session_present: bool
    #: Messages that had reached the broker's lost session and are now published again.
    requeued: int
    #: QoS 2 messages past PUBREC when the broker lost the session (reported IN_DOUBT).
    in_doubt: int


@dataclass(frozen=True, slots=True)
class ConnectRefused:
    """CONNACK carried a non-zero return code; the shell closes the connection."""

    return_code: int


@dataclass(frozen=True, slots=True)
class Anomaly:
    """The broker did something odd but harmless (e.g. acknowledged an unknown packet ID)."""

    text: str


Event = (
    MessageReceived
    | PublishCompleted
    | SubscribeCompleted
    | UnsubscribeCompleted
    | ConnectionReady
    | ConnectRefused
    | Anomaly
)
