"""mqtt_persist: an asyncio MQTT client whose session survives crashes, outages and restarts.

Quick start::

    from mqtt_persist import FileStore, PersistentClient

    async with PersistentClient("127.0.0.1", client_id="sensor-17",
                                store=FileStore("./mqtt_sessions")) as client:
        await client.subscribe("persistent/test", qos=1)
        delivery = await client.publish("persistent/test", b"hello", qos=1)
        await delivery  # optional: the broker acknowledged it
        async for message in client.messages:
            print(message.topic, message.payload)
"""

from mqtt_persist.backoff import Backoff
from mqtt_persist.client import ClientStats, PersistentClient
from mqtt_persist.completion import Completion, Delivery, SubscribeRequest, UnsubscribeRequest
from mqtt_persist.errors import (
    ClientClosed,
    ClientIdAssigned,
    ConnectionLost,
    ConnectionRefused,
    ConnectTimeout,
    InvalidClientId,
    InvalidInput,
    InvalidQoS,
    InvalidTopic,
    InvalidTopicFilter,
    KeepaliveTimeout,
    MalformedPacket,
    MqttPersistError,
    PayloadTooLarge,
    ProtocolError,
    QueueFull,
    ServerDisconnected,
    SessionCorrupt,
    SessionExpired,
    SessionFenced,
    SessionLocked,
    StoreError,
    SubscriptionRefused,
    SubscriptionSuperseded,
    TLSError,
    UnsupportedByBroker,
    UnsupportedFormatVersion,
    WebSocketHandshakeFailed,
)
from mqtt_persist.message import DeliveryOutcome, Message
from mqtt_persist.protocol.packets import (
    Properties,
    ProtocolVersion,
    RetainHandling,
    SubscriptionOptions,
    Will,
)
from mqtt_persist.protocol.reason_codes import ReasonCode
from mqtt_persist.session.state import SetAsideMessage, StoredMessage
from mqtt_persist.stores import (
    FileStore,
    MemoryStore,
    SessionInfo,
    SessionStore,
    SQLiteStore,
    redact_url,
    store_from_url,
)
from mqtt_persist.tls import tls_context

__version__ = "0.1.0"

__all__ = [
    "Backoff",
    "ClientClosed",
    "ClientIdAssigned",
    "ClientStats",
    "Completion",
    "ConnectTimeout",
    "ConnectionLost",
    "ConnectionRefused",
    "Delivery",
    "DeliveryOutcome",
    "FileStore",
    "InvalidClientId",
    "InvalidInput",
    "InvalidQoS",
    "InvalidTopic",
    "InvalidTopicFilter",
    "KeepaliveTimeout",
    "MalformedPacket",
    "MemoryStore",
    "Message",
    "MqttPersistError",
    "PayloadTooLarge",
    "PersistentClient",
    "PostgresStore",
    "Properties",
    "ProtocolError",
    "ProtocolVersion",
    "QueueFull",
    "ReasonCode",
    "RedisStore",
    "RetainHandling",
    "SQLiteStore",
    "ServerDisconnected",
    "SessionCorrupt",
    "SessionExpired",
    "SessionFenced",
    "SessionInfo",
    "SessionLocked",
    "SessionStore",
    "SetAsideMessage",
    "StoreError",
    "StoredMessage",
    "SubscribeRequest",
    "SubscriptionOptions",
    "SubscriptionRefused",
    "SubscriptionSuperseded",
    "TLSError",
    "UnsubscribeRequest",
    "UnsupportedByBroker",
    "UnsupportedFormatVersion",
    "WebSocketHandshakeFailed",
    "Will",
    "__version__",
    "redact_url",
    "store_from_url",
    "tls_context",
]

import typing as _typing

if _typing.TYPE_CHECKING:
    # For type checkers only; at run time __getattr__ below imports them on first use.
    from mqtt_persist.stores.postgres import PostgresStore as PostgresStore
    from mqtt_persist.stores.redis import RedisStore as RedisStore


def __getattr__(name: str) -> object:
    # RedisStore needs redis-py, an optional extra: imported on first use (as in
    # mqtt_persist.stores), so that ``import mqtt_persist`` never requires redis-py.
    if name == "RedisStore":
        from mqtt_persist.stores.redis import RedisStore

        return RedisStore
    if name == "PostgresStore":  # psycopg, likewise
        from mqtt_persist.stores.postgres import PostgresStore

        return PostgresStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
