"""The sans-IO session: durable state, its journal operations, and the state machine."""

from mqtt_persist.session.machine import ConnectionState, Outbox, Session, SessionConfig
from mqtt_persist.session.state import Operation, SessionState, StoredMessage, StoredSubscription

__all__ = [
    "ConnectionState",
    "Operation",
    "Outbox",
    "Session",
    "SessionConfig",
    "SessionState",
    "StoredMessage",
    "StoredSubscription",
]
