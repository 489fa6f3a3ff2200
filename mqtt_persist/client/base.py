"""What the parts of :class:`PersistentClient` share: its attributes, the running parts, and
the few helpers every API mixin uses (``_require_open``, ``_fail``, ``_track``).

The public API is split by job into mixins (``lifecycle.py``, ``publish_api.py``,
``subscribe_api.py``, ``receive_api.py``, ``poison_api.py``); each inherits :class:`ClientBase`,
so the attributes they use are declared once, here, and set by ``PersistentClient.__init__``.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from dataclasses import dataclass

from anyio.abc import TaskGroup

from mqtt_persist.client.connection import ConnectionSupervisor
from mqtt_persist.client.dispatch import EventDispatcher
from mqtt_persist.client.flusher import Flusher
from mqtt_persist.client.options import ClientOptions
from mqtt_persist.client.storage import SessionStatus, SessionStorage
from mqtt_persist.completion import Delivery
from mqtt_persist.errors import ClientClosed
from mqtt_persist.log import ClientLogger
from mqtt_persist.metrics import ClientMetrics
from mqtt_persist.session.machine import Session
from mqtt_persist.stores.base import SessionStore


@dataclass(frozen=True, slots=True)
class Running:
    """What exists while the client is entered: the session and the parts that drive it."""

    session: Session
    dispatcher: EventDispatcher
    connection: ConnectionSupervisor
    flusher: Flusher


class ClientBase:
    """The state every part of the client's API reads; set by ``PersistentClient.__init__``."""

    hostname: str
    port: int
    client_id: str
    clean_session: bool
    reconnect: bool
    session_expiry: float | None
    session_status: SessionStatus
    store: SessionStore
    _options: ClientOptions
    _log: ClientLogger
    _metrics: ClientMetrics | None
    _storage: SessionStorage
    _session: Session | None
    _parts: Running | None
    _task_group: TaskGroup | None
    _exit_stack: AsyncExitStack | None
    _fatal: BaseException | None
    _entered: bool
    _closing: bool

    async def _track(self, parts: Running, seq: int, topic: str, qos: int) -> Delivery:
        """The delivery of the message ``seq`` just accepted, once it is stored."""
        if self._metrics is not None:
            self._metrics.published(qos)
        delivery = Delivery(seq, topic, qos)
        parts.dispatcher.deliveries[seq] = delivery
        flusher = parts.flusher
        if qos and self._storage.durable:
            if flusher.can_commit_inline():
                await flusher.commit_inline()
            else:
                flusher.wake.set()
                await flusher.committed()
        else:
            flusher.wake.set()
        return delivery

    def _require_open(self) -> Running:
        if self._fatal is not None:
            raise self._fatal
        if self._parts is None or self._closing:
            raise ClientClosed("use the client inside 'async with PersistentClient(...)'")
        return self._parts

    def _fail(self, error: BaseException) -> None:
        """A fatal error: the client stops and every waiter learns why."""
        if self._fatal is None:
            self._fatal = error
            self._log.error("client stopped: %s", error)
        parts = self._parts
        if parts is not None:
            # Nothing resolves a delivery, a subscribe request or a request() after this (no
            # more connections): their waiters learn why now, not when the block is left,
            # which never comes while the block waits on one of them.
            parts.dispatcher.fail_pending(self._fatal)
            parts.flusher.room.set()
            parts.dispatcher.ready.set()  # wake wait_connected, which re-checks _fatal
            parts.flusher.flushed.set()
