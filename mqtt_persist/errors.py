"""One exception hierarchy: everything this library raises derives from MqttPersistError."""

from __future__ import annotations


class MqttPersistError(Exception):
    """Base class of every error raised by mqtt_persist."""


class InvalidInput(MqttPersistError, ValueError):
    """An argument was refused before anything was stored or sent ("bad input is refused")."""


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


class UnsupportedByBroker(InvalidInput):
    """The broker named by ``compat=`` is known to refuse this (for example nats-server: QoS 2
    publishes, topics with '.' or a space); refused before anything is stored."""


class ProtocolError(MqttPersistError):
    """The peer sent bytes that are not valid MQTT; the connection is closed.

    ``reason_code`` is the MQTT 5 reason code the client's DISCONNECT gives for it (MQTT 5
    connections tell the broker why they end: 0x81 malformed packet, 0x82 protocol error,
    0x93 receive maximum exceeded, ...).
    """

    #: The DISCONNECT reason code when the raiser gives none.
    default_reason_code = 0x82

    def __init__(self, *args: object, reason_code: int | None = None) -> None:
        super().__init__(*args)
        self._reason_code = reason_code

    @property
    def reason_code(self) -> int:
        """The MQTT 5 reason code for the DISCONNECT that ends the connection."""
        return self._reason_code if self._reason_code is not None else self.default_reason_code


class MalformedPacket(ProtocolError):
    """A packet could not be decoded (bad length, bad flags, bad UTF-8, truncated fields)."""

    default_reason_code = 0x81


class PacketTooLarge(MalformedPacket):
    """A packet announced more bytes than the decoder's ``max_packet_size``.

    Raised from the fixed header alone, before any of the body is buffered; ``size`` is the
    whole packet's announced size, ``limit`` the decoder's maximum.
    """

    default_reason_code = 0x95

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"packet of {size} bytes exceeds the maximum packet size {limit}")
        self.size = size
        self.limit = limit


class ConnectionRefused(MqttPersistError):
    """The broker answered CONNECT with a non-zero return code (MQTT 5: reason code).

    ``return_code`` is the 3.1.1 return code or the MQTT 5 reason code (>= 0x80);
    ``reason_string`` the broker's MQTT 5 Reason String, if it sent one.
    """

    def __init__(self, return_code: int, message: str, *, reason_string: str | None = None) -> None:
        code = (
            f"reason code 0x{return_code:02x}"
            if return_code >= 0x80
            else f"return code {return_code}"
        )
        detail = f"broker refused the connection: {message} ({code})"
        if reason_string:
            detail += f": {reason_string}"
        super().__init__(detail)
        self.return_code = return_code
        self.reason_string = reason_string

    @property
    def reason_code(self) -> int:
        """MQTT 5's name for ``return_code``."""
        return self.return_code


class ClientClosed(MqttPersistError):
    """The client was used outside its ``async with`` block or after it was closed."""


class QueueFull(MqttPersistError):
    """The outgoing queue is full and ``queue_full="error"`` was configured."""


class SubscriptionRefused(MqttPersistError):
    """The broker answered a SUBSCRIBE with a failure code (0x80; MQTT 5: any from 0x80).

    ``reason_codes`` maps each refused filter to the code the broker gave it.
    """

    def __init__(self, message: str, *, reason_codes: dict[str, int] | None = None) -> None:
        super().__init__(message)
        self.reason_codes: dict[str, int] = dict(reason_codes or {})


class SubscriptionSuperseded(MqttPersistError):
    """A ``subscribe()`` was replaced by a later ``unsubscribe()`` or ``subscribe()`` of the same
    filter before the broker answered it: the broker did not refuse anything, the application
    changed its mind. What the session wants now is the later call's.

    ``filters`` are the filters of the call that were superseded.
    """

    def __init__(self, message: str, *, filters: list[str] | None = None) -> None:
        super().__init__(message)
        self.filters: list[str] = list(filters or [])


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


class ConnectTimeout(MqttPersistError, TimeoutError):
    """``wait_connected(timeout)`` ran out: the broker it tried, how long, and why it failed.

    A :class:`TimeoutError` too, so code written for the bare ``TimeoutError`` it replaced
    still catches it. ``host`` and ``port`` name the broker, ``waited`` the seconds waited,
    ``attempts`` the connection attempts that ended meanwhile, and ``last_error`` the last of
    them (for example ``"connection refused"``), or None when no attempt had ended yet.
    """

    def __init__(
        self, host: str, port: int, waited: float, attempts: int, last_error: str | None
    ) -> None:
        why = f"last error: {last_error}" if last_error else "no connection attempt ended yet"
        tries = f"{attempts} attempt{'' if attempts == 1 else 's'}; " if attempts else ""
        super().__init__(f"could not connect to {host}:{port} within {waited:g}s ({tries}{why})")
        self.host = host
        self.port = port
        self.waited = waited
        self.attempts = attempts
        self.last_error = last_error


class KeepaliveTimeout(ConnectionLost):
    """The broker did not answer a PINGREQ in time; the connection is treated as dead."""


class TLSError(ConnectionLost):
    """TLS refused the connection in a way connecting again cannot fix: the broker's
    certificate did not verify (unknown CA, host name mismatch, expired, ...), the broker
    refused ours (a TLS alert), or the handshake failed (say, TLS to a plain-TCP port).

    The client stops at the first such failure instead of retrying (see :mod:`mqtt_persist.tls`):
    ``wait_connected()`` and ``client.messages`` raise it, and so does entering the client with
    ``reconnect=False``. ``reason`` is OpenSSL's reason (for a certificate, its verification
    message, e.g. "unable to get local issuer certificate" or "Hostname mismatch, certificate
    is not valid for 'x'."); ``verify_code`` the X.509 verification code, or None when the
    failure was not about the broker's certificate.
    """

    def __init__(self, message: str, *, reason: str, verify_code: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.verify_code = verify_code


class ServerDisconnected(ConnectionLost):
    """The broker ended the connection with an MQTT 5 DISCONNECT and said why.

    ``reason_code`` is its reason code (e.g. 0x8E session taken over, 0x8B server shutting
    down), ``reason_string`` its Reason String and ``server_reference`` the other server it
    named, if any. The client reconnects after most reasons (logging this error) and stops
    after those that reconnecting cannot fix (see :data:`FATAL_DISCONNECT_REASONS`), raising
    it from ``client.messages`` and ``wait_connected()``; with ``reconnect=False`` it is raised
    whatever the reason.
    """

    def __init__(
        self,
        reason_code: int,
        description: str,
        *,
        reason_string: str | None = None,
        server_reference: str | None = None,
    ) -> None:
        detail = f"the broker disconnected: {description}"
        if reason_string:
            detail += f": {reason_string}"
        if server_reference:
            detail += f" (server reference {server_reference!r})"
        super().__init__(detail)
        self.reason_code = reason_code
        self.reason_string = reason_string
        self.server_reference = server_reference

    @property
    def fatal(self) -> bool:
        """Whether reconnecting cannot help, so the client stops."""
        return self.reason_code in FATAL_DISCONNECT_REASONS


#: DISCONNECT reason codes after which the client stops instead of reconnecting: another
#: connection took the session over (reconnecting would take it back, and so on, for ever),
#: the client is banned or not authorised, or its authentication method is refused.
FATAL_DISCONNECT_REASONS = frozenset({0x87, 0x8A, 0x8C, 0x8E})


class ClientIdAssigned(MqttPersistError):
    """The broker assigned the client another identifier, which a persistent session cannot use.

    The stored session is found by its client id at the broker and in the store alike; a
    broker that replaces the id would strand both. ``assigned`` is the id it assigned.
    """

    def __init__(self, requested: str, assigned: str) -> None:
        super().__init__(
            f"the broker assigned the client identifier {assigned!r} in place of {requested!r}; "
            "a persistent session needs a stable client id that the broker accepts as it is"
        )
        self.requested = requested
        self.assigned = assigned


class WebSocketHandshakeFailed(MqttPersistError):
    """The WebSocket upgrade to ``url`` failed (``transport="websockets"``).

    ``status_code`` is the HTTP status the server answered with instead of 101 (None when it
    accepted the upgrade but broke the protocol, e.g. chose another subprotocol than
    ``mqtt``). The client stops on a fatal failure (:attr:`fatal`): a 4xx answer other than
    408 or 429 (wrong path, refused credentials: the same request gets the same answer), or a
    broken handshake; it reconnects with backoff after the others (a 502/503 from a proxy whose
    broker is down).
    """

    def __init__(self, url: str, reason: str, *, status_code: int | None = None) -> None:
        status = f"HTTP {status_code}: " if status_code is not None else ""
        super().__init__(f"WebSocket handshake with {url} failed: {status}{reason}")
        self.url = url
        self.status_code = status_code
        self.reason = reason

    @property
    def fatal(self) -> bool:
        """Whether trying the same request again cannot help, so the client stops."""
        code = self.status_code
        return code is None or (400 <= code < 500 and code not in (408, 429))
