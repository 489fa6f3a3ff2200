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

# Not typing.TYPE_CHECKING: importing typing costs more than everything else here (see
# _SOURCES); type checkers take any TYPE_CHECKING as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    # For type checkers; at run time __getattr__ imports each name on first use.
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
    from mqtt_persist.stores.postgres import PostgresStore as PostgresStore
    from mqtt_persist.stores.redis import RedisStore as RedisStore
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

#: Where each exported name lives. Nothing is imported with the package: a name's module is
#: imported on first use (PEP 562), so ``import mqtt_persist`` costs nothing until then; the
#: command line relies on that to catch a Ctrl-C that comes while it imports the rest. (And
#: RedisStore needs redis-py, PostgresStore psycopg: optional extras.)
_SOURCES: dict[str, str] = {
    "Backoff": "mqtt_persist.backoff",
    "ClientStats": "mqtt_persist.client",
    "PersistentClient": "mqtt_persist.client",
    "Completion": "mqtt_persist.completion",
    "Delivery": "mqtt_persist.completion",
    "SubscribeRequest": "mqtt_persist.completion",
    "UnsubscribeRequest": "mqtt_persist.completion",
    "ClientClosed": "mqtt_persist.errors",
    "ClientIdAssigned": "mqtt_persist.errors",
    "ConnectionLost": "mqtt_persist.errors",
    "ConnectionRefused": "mqtt_persist.errors",
    "ConnectTimeout": "mqtt_persist.errors",
    "InvalidClientId": "mqtt_persist.errors",
    "InvalidInput": "mqtt_persist.errors",
    "InvalidQoS": "mqtt_persist.errors",
    "InvalidTopic": "mqtt_persist.errors",
    "InvalidTopicFilter": "mqtt_persist.errors",
    "KeepaliveTimeout": "mqtt_persist.errors",
    "MalformedPacket": "mqtt_persist.errors",
    "MqttPersistError": "mqtt_persist.errors",
    "PayloadTooLarge": "mqtt_persist.errors",
    "ProtocolError": "mqtt_persist.errors",
    "QueueFull": "mqtt_persist.errors",
    "ServerDisconnected": "mqtt_persist.errors",
    "SessionCorrupt": "mqtt_persist.errors",
    "SessionExpired": "mqtt_persist.errors",
    "SessionFenced": "mqtt_persist.errors",
    "SessionLocked": "mqtt_persist.errors",
    "StoreError": "mqtt_persist.errors",
    "SubscriptionRefused": "mqtt_persist.errors",
    "SubscriptionSuperseded": "mqtt_persist.errors",
    "TLSError": "mqtt_persist.errors",
    "UnsupportedByBroker": "mqtt_persist.errors",
    "UnsupportedFormatVersion": "mqtt_persist.errors",
    "WebSocketHandshakeFailed": "mqtt_persist.errors",
    "DeliveryOutcome": "mqtt_persist.message",
    "Message": "mqtt_persist.message",
    "Properties": "mqtt_persist.protocol.packets",
    "ProtocolVersion": "mqtt_persist.protocol.packets",
    "RetainHandling": "mqtt_persist.protocol.packets",
    "SubscriptionOptions": "mqtt_persist.protocol.packets",
    "Will": "mqtt_persist.protocol.packets",
    "ReasonCode": "mqtt_persist.protocol.reason_codes",
    "SetAsideMessage": "mqtt_persist.session.state",
    "StoredMessage": "mqtt_persist.session.state",
    "FileStore": "mqtt_persist.stores",
    "MemoryStore": "mqtt_persist.stores",
    "SessionInfo": "mqtt_persist.stores",
    "SessionStore": "mqtt_persist.stores",
    "SQLiteStore": "mqtt_persist.stores",
    "redact_url": "mqtt_persist.stores",
    "store_from_url": "mqtt_persist.stores",
    "tls_context": "mqtt_persist.tls",
    "PostgresStore": "mqtt_persist.stores.postgres",
    "RedisStore": "mqtt_persist.stores.redis",
}


def __getattr__(name: str) -> object:
    module = _SOURCES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: later lookups find it without __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
