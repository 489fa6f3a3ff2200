"""One exception hierarchy: everything this library raises derives from MqttPersistError."""

from __future__ import annotations


class MqttPersistError(Exception):
    """Base class of every error raised by mqtt_persist."""


class InvalidInput(MqttPersistError, ValueError):
    """An argument was refused before anything was stored or sent (G7)."""


class InvalidTopic(InvalidInput):
    """A publish topic is empty, too long, not UTF-8, or contains a wildcard or NUL."""


class InvalidTopicFilter(InvalidInput):
    """A subscription filter is malformed (e.g. ``a/#/b`` or ``a+``)."""


class InvalidQoS(InvalidInput):
    """A QoS outside 0..2."""


class PayloadTooLarge(InvalidInput):
    """A payload over the configured or protocol limit."""


class InvalidClientId(InvalidInput):
    """A client id that cannot carry a persistent session (empty with clean_session=False)."""


class ProtocolError(MqttPersistError):
    """The peer sent bytes that are not valid MQTT; the connection is closed."""


class MalformedPacket(ProtocolError):
    """A packet could not be decoded (bad length, bad flags, bad UTF-8, truncated fields)."""


class PacketTooLarge(MalformedPacket):
    """A packet announced more bytes than the decoder's ``max_packet_size``.

    Raised from the fixed header alone, before any of the body is buffered; ``size`` is the
    whole packet's announced size, ``limit`` the decoder's maximum.
    """

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"packet of {size} bytes exceeds the maximum packet size {limit}")
        self.size = size
        self.limit = limit


class ConnectionRefused(MqttPersistError):
    """The broker answered CONNECT with a non-zero return code."""

    def __init__(self, return_code: int, message: str) -> None:
        super().__init__(f"broker refused the connection: {message} (return code {return_code})")
        self.return_code = return_code


class ClientClosed(MqttPersistError):
    """The client was used outside its ``async with`` block or after it was closed."""


class QueueFull(MqttPersistError):
    """The outgoing queue is full and ``queue_full="error"`` was configured."""


class SubscriptionRefused(MqttPersistError):
    """The broker answered a SUBSCRIBE with the failure return code 0x80."""


class StoreError(MqttPersistError):
    """A session store failed to read or write."""


class SessionCorrupt(StoreError):
    """Stored session data could not be read; it was moved aside (quarantined), not deleted."""

    def __init__(self, message: str, *, location: str, quarantined_to: str | None = None) -> None:
        detail = f"{message} (in {location}"
        detail += f"; moved to {quarantined_to})" if quarantined_to else ")"
        super().__init__(detail)
        self.location = location
        self.quarantined_to = quarantined_to


class UnsupportedFormatVersion(SessionCorrupt):
    """Stored data was written by a newer format version than this library understands."""


class SessionLocked(StoreError):
    """Another process holds the ownership lease of this client id's stored session."""


class SessionFenced(SessionLocked):
    """This store's lease is no longer valid: it lapsed, or a newer owner took the session over
    (this store's fencing token is no longer current).

    Raised by a shared store (Redis, PostgreSQL) for a write of a former owner, typically a
    process that was paused past its lease while another one took the session over. Nothing of
    that write was stored; the client stops and sends nothing it could not store.
    """


class SessionExpired(StoreError):
    """The stored session passed its expiry and was not restored."""


class ConnectionLost(MqttPersistError):
    """The connection to the broker ended unexpectedly (only raised with ``reconnect=False``)."""


class KeepaliveTimeout(ConnectionLost):
    """The broker did not answer a PINGREQ in time; the connection is treated as dead."""
