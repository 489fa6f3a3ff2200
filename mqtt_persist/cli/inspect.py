"""What ``sessions list`` and ``sessions show`` report, as plain data (JSON-ready dicts).

One description of a stored session, used for both outputs: ``--json`` prints these dicts,
the tables are drawn from them, so the two never disagree.
"""

from __future__ import annotations

from typing import Any

from mqtt_persist.cli.access import find_session, holding
from mqtt_persist.cli.exits import CliError, ExitCode
from mqtt_persist.session.state import SetAsideMessage, StoredMessage, StoredSubscription
from mqtt_persist.stores.base import SessionInfo, SessionStore

__all__ = ["PAGE", "describe_info", "describe_session", "flow_state", "protocol_name"]

#: Queued messages read from the store at a time: memory stays flat for any queue length.
PAGE = 1000


def flow_state(message: StoredMessage) -> str:
    """Where a message's QoS flow stands: what the client waits for from the broker."""
    if message.packet_id is None:
        return "queued"
    if message.qos == 1:
        return "awaiting PUBACK"
    return "awaiting PUBCOMP" if message.released else "awaiting PUBREC"


def protocol_name(version: int | None) -> str:
    """``MQTT 3.1.1``, ``MQTT 5`` or ``not connected yet``."""
    if version is None:
        return "not connected yet"
    return {4: "MQTT 3.1.1", 5: "MQTT 5"}.get(version, f"protocol level {version}")


def describe_info(info: SessionInfo, now: float) -> dict[str, Any]:
    """One row of ``sessions list``."""
    return {
        "client_id": info.client_id,
        "queued": info.queued,
        "inflight": info.inflight,
        "set_aside": info.set_aside,
        "created_at": info.created_at,
        "last_access": info.last_access,
        "expires_at": info.expires_at,
        "expired": info.expires_at is not None and info.expires_at <= now,
    }


def _message_row(message: StoredMessage) -> dict[str, Any]:
    return {
        "seq": message.seq,
        "topic": message.topic,
        "qos": message.qos,
        "retain": message.retain,
        "size": len(message.payload),
        "packet_id": message.packet_id,
        "state": flow_state(message),
        "expires_at": message.expires_at,
    }


def _set_aside(aside: SetAsideMessage) -> dict[str, Any]:
    message = aside.message
    return {
        "seq": message.seq,
        "topic": message.topic,
        "qos": message.qos,
        "retain": message.retain,
        "size": len(message.payload),
        "reason": aside.reason,
        "at": aside.at,
    }


def _subscription(sub: StoredSubscription) -> dict[str, Any]:
    return {
        "topic_filter": sub.topic_filter,
        "qos": sub.qos,
        "confirmed": sub.confirmed,
        "options": sub.options,
        "no_local": bool(sub.options & 0x04),
        "retain_as_published": bool(sub.options & 0x08),
        "retain_handling": (sub.options >> 4) & 0x03,
        "subscription_id": sub.subscription_id,
    }


async def describe_session(
    store: SessionStore, client_id: str, *, queued_shown: int | None
) -> dict[str, Any]:
    """Everything ``sessions show`` reports about one session.

    Reads the queue in pages of :data:`PAGE` to count its bytes, keeping the first
    ``queued_shown`` messages (None: all), so a long queue never sits in memory whole.
    """
    info = await find_session(store, client_id)
    async with holding(store, client_id):
        state = await store.load(client_id, queued_limit=0)
        if state is None:
            raise CliError(f"no session {client_id!r} in this store", ExitCode.NO_SESSION)
        inflight = list(state.messages.values())
        queued: list[dict[str, Any]] = []
        queued_count = queued_bytes = 0
        after = 0
        while True:
            page = await store.read_queued(client_id, after, PAGE)
            for message in page:
                queued_count += 1
                queued_bytes += len(message.payload)
                if queued_shown is None or len(queued) < queued_shown:
                    queued.append(_message_row(message))
            if len(page) < PAGE:
                break
            after = page[-1].seq
    set_aside = sorted(state.set_aside.values(), key=lambda a: a.message.seq)
    inflight_bytes = sum(len(m.payload) for m in inflight)
    set_aside_bytes = sum(len(a.message.payload) for a in set_aside)
    return {
        "client_id": client_id,
        "protocol_version": state.protocol_version,
        "created_at": info.created_at,
        "last_access": info.last_access,
        "expires_at": info.expires_at,
        "queued_count": queued_count,
        "inflight_count": len(inflight),
        "set_aside_count": len(set_aside),
        "payload_bytes": queued_bytes + inflight_bytes + set_aside_bytes,
        "inflight": [_message_row(m) for m in inflight],
        "queued": queued,
        "set_aside": [_set_aside(a) for a in set_aside],
        "inbound_qos2": sorted(state.inbound_qos2),
        "subscriptions": [
            _subscription(s) for s in sorted(state.subscriptions.values(), key=_filter_key)
        ],
        "pending_unsubscribes": sorted(state.pending_unsubscribes),
    }


def _filter_key(sub: StoredSubscription) -> str:
    return sub.topic_filter
