"""What a :class:`~mqtt_persist.PersistentClient` is configured with, checked once on creation.

Every setting is validated here, before the client touches a store or a socket, so a bad value
fails at ``PersistentClient(...)`` with a message naming it, never half way into a session.
"""

from __future__ import annotations

import math
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from mqtt_persist.backoff import Backoff
from mqtt_persist.compat import Compat, validate_compat
from mqtt_persist.errors import InvalidInput
from mqtt_persist.protocol.codec import MAX_PACKET_SIZE
from mqtt_persist.protocol.packets import MQTT_3_1_1, MQTT_5, ProtocolVersion, Will
from mqtt_persist.session.config import NEVER_EXPIRES
from mqtt_persist.session.machine import QueueFullPolicy, SessionConfig
from mqtt_persist.validation import (
    validate_client_id,
    validate_qos,
    validate_topic,
    validate_will_properties,
)
from mqtt_persist.websocket import WebSocketSettings, websocket_url

CorruptPolicy = Literal["raise", "start_clean"]
#: ``ProtocolVersion.V311``, ``ProtocolVersion.V5``, or ``"auto"``: MQTT 5, falling back to
#: 3.1.1 when the broker does not speak 5.
ProtocolChoice = ProtocolVersion | Literal["auto"]
#: How MQTT bytes travel: plain ``"tcp"`` (TLS with ``tls=``), or ``"websockets"``.
TransportChoice = Literal["tcp", "websockets"]

#: Who acknowledges received QoS 1/2 messages to the broker: the client on hand-out
#: (``"auto"``) or the application (``"manual"``, ``PersistentClient.ack``).
AckMode = Literal["auto", "manual"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientOptions:
    """The settings of one client; see :class:`~mqtt_persist.PersistentClient` for each one.

    Constructing it validates every field and raises an
    :class:`~mqtt_persist.errors.InvalidInput` subclass naming the first bad one.
    """

    hostname: str
    port: int = 1883
    client_id: str
    clean_session: bool = False
    keepalive: int = 60
    username: str | None = None
    #: Never in repr(): a repr ends up in tracebacks and debug lines.
    password: str | bytes | None = field(default=None, repr=False)
    tls: ssl.SSLContext | None = None
    reconnect: bool = True
    max_inflight: int = 100
    max_inflight_qos2: int = 19
    max_queued: int | None = None
    queue_full: QueueFullPolicy = "block"
    max_payload_size: int | None = None
    will: Will | None = None
    backoff: Backoff = field(default_factory=Backoff)
    connect_timeout: float = 10.0
    queue_memory_limit: int = 1000
    #: None (or 0, as given to the client): the stored session never expires.
    session_expiry: float | None = None
    cleanup_interval: float | None = 300.0
    on_corrupt: CorruptPolicy = "raise"
    protocol: ProtocolChoice = "auto"
    receive_maximum: int | None = None
    max_packet_size: int | None = None
    topic_alias_maximum: int = 16
    #: The stdlib logger the client writes through (``logger.name`` of the client's argument).
    logger_name: str = "mqtt_persist"
    #: Poison messages: prompt broker hang-ups in a row that set a message aside (0: never).
    poison_after: int = 3
    #: A broker whose known refusals are checked before a publish is stored (compat.py).
    compat: Compat | None = None
    #: Seconds leaving ``async with`` waits for pending requests and acknowledgements (0: none).
    exit_timeout: float = 5.0
    # --- transport="websockets" (mqtt_persist/websocket.py) ---
    transport: TransportChoice = "tcp"
    websocket_path: str = "/mqtt"
    # Left out of the repr: a header may carry a credential (an auth token for a proxy).
    websocket_headers: Mapping[str, str] | Sequence[tuple[str, str]] | None = field(
        default=None, repr=False
    )
    ack: AckMode = "auto"
    max_unread_messages: int | None = None

    def __post_init__(self) -> None:
        validate_client_id(self.client_id, clean_session=self.clean_session)
        keepalive = self.keepalive
        if not isinstance(keepalive, int) or not 0 <= keepalive <= 65535:
            raise InvalidInput(f"keepalive must be an int in 0..65535 seconds, not {keepalive!r}")
        max_inflight = self.max_inflight
        if not isinstance(max_inflight, int) or not 1 <= max_inflight <= 65535:
            raise InvalidInput(f"max_inflight must be in 1..65535, not {max_inflight!r}")
        qos2 = self.max_inflight_qos2
        if not isinstance(qos2, int) or not 1 <= qos2 <= max_inflight:
            raise InvalidInput(f"max_inflight_qos2 must be in 1..max_inflight, not {qos2!r}")
        max_queued = self.max_queued
        if max_queued is not None and (not isinstance(max_queued, int) or max_queued < 1):
            raise InvalidInput(f"max_queued must be a positive int or None, not {max_queued!r}")
        if self.queue_full not in ("block", "drop_oldest", "error"):
            raise InvalidInput(
                f"queue_full must be 'block', 'drop_oldest' or 'error', not {self.queue_full!r}"
            )
        if self.max_payload_size is not None and self.max_payload_size < 0:
            raise InvalidInput("max_payload_size must not be negative")
        protocol = self.protocol
        if protocol != "auto" and protocol not in (MQTT_3_1_1, MQTT_5):
            raise InvalidInput(
                "protocol must be ProtocolVersion.V311, ProtocolVersion.V5 or 'auto', "
                f"not {protocol!r}"
            )
        if self.will is not None:
            validate_topic(self.will.topic)
            validate_qos(self.will.qos)
            if self.will.properties and protocol == MQTT_3_1_1:
                raise InvalidInput("will properties need MQTT 5, not protocol=ProtocolVersion.V311")
            validate_will_properties(self.will.properties)
        receive_maximum = self.receive_maximum
        if receive_maximum is not None and (
            not isinstance(receive_maximum, int) or not 1 <= receive_maximum <= 65535
        ):
            raise InvalidInput(
                f"receive_maximum must be in 1..65535 or None, not {receive_maximum!r}"
            )
        packet_size = self.max_packet_size
        if packet_size is not None and (
            not isinstance(packet_size, int) or not 64 <= packet_size <= MAX_PACKET_SIZE
        ):
            raise InvalidInput(
                f"max_packet_size must be in 64..{MAX_PACKET_SIZE} bytes or None, "
                f"not {packet_size!r}"
            )
        aliases = self.topic_alias_maximum
        if not isinstance(aliases, int) or not 0 <= aliases <= 65535:
            raise InvalidInput(f"topic_alias_maximum must be in 0..65535, not {aliases!r}")
        limit = self.queue_memory_limit
        if not isinstance(limit, int) or limit < 0:
            raise InvalidInput(
                f"queue_memory_limit must be an int >= 0 (0: all in memory), not {limit!r}"
            )
        expiry = self.session_expiry
        if expiry is not None and expiry < 0:
            raise InvalidInput(f"session_expiry must be >= 0 seconds, not {expiry!r}")
        interval = self.cleanup_interval
        if interval is not None and interval <= 0:
            raise InvalidInput(f"cleanup_interval must be > 0 or None, not {interval!r}")
        validate_compat(self.compat)
        poison = self.poison_after
        if not isinstance(poison, int) or poison < 0:
            raise InvalidInput(f"poison_after must be an int >= 0 (0: never), not {poison!r}")
        exit_timeout = self.exit_timeout
        if (
            isinstance(exit_timeout, bool)
            or not isinstance(exit_timeout, int | float)
            or not 0 <= exit_timeout < math.inf
        ):
            raise InvalidInput(f"exit_timeout must be >= 0 seconds, not {exit_timeout!r}")
        if self.ack not in ("auto", "manual"):
            raise InvalidInput(f"ack must be 'auto' or 'manual', not {self.ack!r}")
        unread = self.max_unread_messages
        if unread is not None and (
            isinstance(unread, bool) or not isinstance(unread, int) or unread < 1
        ):
            raise InvalidInput(
                f"max_unread_messages must be a positive int or None, not {unread!r}"
            )
        if self.on_corrupt not in ("raise", "start_clean"):
            raise InvalidInput(
                f"on_corrupt must be 'raise' or 'start_clean', not {self.on_corrupt!r}"
            )
        if self.transport not in ("tcp", "websockets"):
            raise InvalidInput(f"transport must be 'tcp' or 'websockets', not {self.transport!r}")
        if self.transport == "tcp" and (self.websocket_headers or self.websocket_path != "/mqtt"):
            raise InvalidInput("websocket_path and websocket_headers need transport='websockets'")
        self.websocket  # noqa: B018 (validates the WebSocket settings)

    @property
    def websocket(self) -> WebSocketSettings | None:
        """The WebSocket upgrade's settings, or None for plain TCP/TLS."""
        if self.transport != "websockets":
            return None
        return WebSocketSettings.of(self.websocket_path, self.websocket_headers)

    @property
    def broker_address(self) -> str:
        """``host:port``, or the ``ws://``/``wss://`` URL, for messages."""
        websocket = self.websocket
        if websocket is None:
            return f"{self.hostname}:{self.port}"
        return websocket_url(self.hostname, self.port, websocket.path, tls=self.tls is not None)

    @property
    def expires_after(self) -> float | None:
        """Seconds after its last use at which the stored session expires; None: never."""
        # 0 has always meant "never" here, like None: an expiry of zero would expire at once.
        return self.session_expiry or None

    @property
    def session_expiry_interval(self) -> int:
        """The MQTT 5 Session Expiry Interval CONNECT asks for.

        A clean session ends with its connection (0); a persistent one lives as long as
        ``session_expiry`` says, and for ever (0xFFFFFFFF) when that is None or 0, which is
        what a 3.1.1 broker does with a persistent session.
        """
        if self.clean_session:
            return 0
        expires_after = self.expires_after
        if expires_after is None:
            return NEVER_EXPIRES
        return min(NEVER_EXPIRES - 1, max(1, math.ceil(expires_after)))

    @property
    def announced_receive_maximum(self) -> int | None:
        """MQTT 5 Receive Maximum for CONNECT: ``receive_maximum``, else, with
        ``max_unread_messages``, that bound, so the broker holds back what we would hold."""
        if self.receive_maximum is not None or self.max_unread_messages is None:
            return self.receive_maximum
        return min(self.max_unread_messages, 65535)

    @property
    def first_protocol(self) -> int:
        """The protocol the first connection attempt speaks."""
        return MQTT_3_1_1 if self.protocol == MQTT_3_1_1 else MQTT_5

    def session_config(self) -> SessionConfig:
        """The part of the settings the sans-IO session machine needs."""
        password = self.password
        return SessionConfig(
            client_id=self.client_id,
            clean_session=self.clean_session,
            keepalive=self.keepalive,
            username=self.username,
            password=password.encode() if isinstance(password, str) else password,
            will=self.will,
            max_inflight=self.max_inflight,
            max_inflight_qos2=self.max_inflight_qos2,
            max_queued=self.max_queued or 0,
            queue_full=self.queue_full,
            queue_memory_limit=self.queue_memory_limit,
            protocol_version=self.first_protocol,
            session_expiry_interval=self.session_expiry_interval,
            receive_maximum=self.announced_receive_maximum,
            max_packet_size=self.max_packet_size,
            topic_alias_maximum=self.topic_alias_maximum,
            poison_after=self.poison_after,
            manual_ack=self.ack == "manual",
            max_unread=self.max_unread_messages or 0,
            reconnects=self.reconnect,
        )
