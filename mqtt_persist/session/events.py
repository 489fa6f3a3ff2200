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
class PublishRefused:
    """The flow of the message with this sequence number ended without the broker taking it.

    Either the broker answered with a failure reason code (MQTT 5 PUBACK/PUBREC >= 0x80), or
    the message can never be sent to this broker (larger than its Maximum Packet Size, a QoS
    or a retain flag it does not support): MQTT 5 §3.1.2.11.4 says to discard such a message
    as if it had been sent. Either way it is answered, so it is neither retried nor kept.
    """

    seq: int
    reason_code: int
    reason_string: str | None = None


#: In :class:`SubscribeCompleted`, not an MQTT code: the filter's subscribe was superseded by a
#: later ``unsubscribe`` or ``subscribe`` of the same filter before its SUBACK.
SUBSCRIPTION_SUPERSEDED = 0x100


@dataclass(frozen=True, slots=True)
class SubscribeCompleted:
    """Every filter of a ``subscribe`` request got its SUBACK return code (0x80: refused), or
    :data:`SUBSCRIPTION_SUPERSEDED`."""

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
    #: The client asked for a fresh session (``clean_session``, MQTT 5 Clean Start): a missing
    #: session is what it asked for, not something the broker lost.
    clean_start: bool = False


@dataclass(frozen=True, slots=True)
class ConnectRefused:
    """CONNACK carried a non-zero return code; the shell closes the connection."""

    return_code: int
    #: MQTT 5: the broker's Reason String, if it gave one.
    reason_string: str | None = None


@dataclass(frozen=True, slots=True)
class Notice:
    """Something the application should know that is not a fault (logged as a warning).

    For example: a message published with MQTT 5 properties leaves over an MQTT 3.1.1
    connection without them, or the broker granted a shorter session expiry than asked for.
    """

    text: str


@dataclass(frozen=True, slots=True)
class Anomaly:
    """The broker did something odd but harmless (e.g. acknowledged an unknown packet ID)."""

    text: str


Event = (
    MessageReceived
    | PublishCompleted
    | PublishRefused
    | SubscribeCompleted
    | UnsubscribeCompleted
    | ConnectionReady
    | ConnectRefused
    | Notice
    | Anomaly
)
