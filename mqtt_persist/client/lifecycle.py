"""Entering and leaving the client: open the store, build and start the running parts, settle
and shut down (``__aenter__``/``__aexit__``)."""

from __future__ import annotations

from contextlib import AsyncExitStack
from types import TracebackType
from typing import Self

import anyio

from mqtt_persist.client.base import Running
from mqtt_persist.client.connection import ConnectionSupervisor, describe_connect_error
from mqtt_persist.client.dispatch import EventDispatcher
from mqtt_persist.client.exit import settle_before_exit
from mqtt_persist.client.flusher import Flusher
from mqtt_persist.client.receive_api import ReceiveAPI, ack_now, message_left
from mqtt_persist.client.signals import Signal
from mqtt_persist.errors import ClientClosed, ConnectionLost, StoreError
from mqtt_persist.session.machine import ConnectionState, Session


class LifecycleAPI(ReceiveAPI):
    """``async with``: the store, the task group and the tasks in it (the client hands itself
    to received messages as their acknowledger, hence :class:`ReceiveAPI`)."""

    async def __aenter__(self) -> Self:
        if self._entered:
            raise ClientClosed("a PersistentClient can be entered only once; create a new one")
        self._entered = True
        options = self._options
        try:
            state = await self._storage.open()
        finally:
            self.session_status = self._storage.status
        async with AsyncExitStack() as stack:
            # Unwound in reverse on close: the task group ends first, then every caller still
            # waiting learns why, then the lease is released.
            stack.push_async_callback(self._release_store)
            session = Session(options.session_config(), state)
            self._session = session
            if self.session_status == "restored" and state is not None:
                self._log.info(
                    "restored session: %d queued, %d in flight, %d subscriptions",
                    session.queued,
                    session.inflight,
                    len(state.subscriptions),
                )
            parts = self._parts = self._build(session)
            stack.callback(self._abandon_pending, parts)
            tasks = await stack.enter_async_context(anyio.create_task_group())
            self._task_group = tasks
            name = f"[{options.client_id}]"
            tasks.start_soon(parts.flusher.run, name=f"mqtt_persist flusher {name}")
            tasks.start_soon(
                parts.flusher.deferral_timer, name=f"mqtt_persist deferral timer {name}"
            )
            if options.cleanup_interval is not None:
                tasks.start_soon(
                    self._storage.cleanup_loop,
                    options.cleanup_interval,
                    name=f"mqtt_persist store cleanup {name}",
                )
            if options.reconnect:
                tasks.start_soon(parts.connection.supervise, name=f"mqtt_persist connection {name}")
            self._exit_stack = stack.pop_all()
        if not options.reconnect:
            try:
                await tasks.start(
                    parts.connection.run_single_connection, name=f"mqtt_persist connection {name}"
                )
                # The connection is READY; the client says so (is_connected, protocol_version)
                # once the flusher dispatched it, a pass later. Enter returns connected. A
                # connection lost meanwhile fails the client, which sets ready too: then
                # entering raises why.
                await parts.dispatcher.ready.wait()
                if self._fatal is not None:
                    raise self._fatal
            except BaseException as exc:
                await self._shutdown(graceful=False)
                fatal = self._fatal
                if fatal is not None and fatal is not exc and isinstance(exc, Exception):
                    # The flusher stopped the client (a broken store, a fenced session) and
                    # dropped the connection: the drop is what reached us, the store is why.
                    raise fatal from exc
                if isinstance(exc, OSError | TimeoutError):
                    raise ConnectionLost(
                        f"could not connect to {options.broker_address}: "
                        f"{describe_connect_error(exc)}"
                    ) from exc
                raise
        return self

    def _build(self, session: Session) -> Running:
        """The parts that run inside the task group, wired to each other and to this client."""
        options = self._options
        wake = Signal()
        dispatcher = EventDispatcher(
            self._log,
            (options.hostname, options.port),
            max_unread=options.max_unread_messages or 0,
            on_leave=lambda message: message_left(session, wake),
            acker=self if options.ack == "manual" else None,
            ack_now=lambda message: ack_now(session, wake, message),
            metrics=self._metrics,
        )
        connection = ConnectionSupervisor(
            session,
            options,
            log=self._log,
            ready=dispatcher.ready,
            wake_flusher=wake.set,
            fail=self._fail,
            # A fatal error (a broken store, a fenced session) ends the client, and with it
            # the reconnecting: a connection nothing can commit for would only time out.
            closing=lambda: self._closing or self._fatal is not None,
            on_granted_expiry=self._follow_granted_expiry,
        )
        flusher = Flusher(
            session,
            self.store,
            client_id=options.client_id,
            durable=self._storage.durable,
            connection=connection,
            dispatcher=dispatcher,
            log=self._log,
            fail=self._fail,
            wake=wake,
            metrics=self._metrics,
        )
        return Running(session, dispatcher, connection, flusher)

    async def _follow_granted_expiry(self, granted: int) -> None:
        """MQTT 5: the broker's Session Expiry Interval wins; the stored session follows it.

        0 (the broker keeps no session) is not followed: the store's session still holds the
        messages this client accepted, and those must survive a restart all the same.
        """
        if granted == 0 or self._options.clean_session:
            return
        seconds = None if granted == 0xFFFFFFFF else float(granted)
        if seconds == self.session_expiry:
            return
        self.session_expiry = seconds
        try:
            await self.store.update_ttl(self.client_id, seconds)
        except Exception as exc:  # the session itself is unharmed; only its expiry lags
            self._log.warning("could not store the broker's session expiry: %r", exc)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        parts = self._parts
        try:
            if (
                parts is not None
                and not self._closing
                and (exc is None or isinstance(exc, Exception))
            ):
                await settle_before_exit(
                    parts.session,
                    parts.flusher,
                    parts.dispatcher,
                    parts.connection,
                    timeout=self._options.exit_timeout,
                    failed=lambda: self._fatal is not None,
                    log=self._log,
                )
        finally:
            # Cancelled while waiting for the broker (a timeout around the whole block): the
            # client still closes, or its tasks, task group and lease would outlive the block.
            await self._shutdown(graceful=True)

    async def _shutdown(self, *, graceful: bool) -> None:
        parts, stack, tasks = self._parts, self._exit_stack, self._task_group
        if parts is None or stack is None or tasks is None or self._closing:
            return
        self._closing = True
        session = parts.session
        try:
            # Commit what the session holds even after a fatal connection error (a refused
            # CONNECT, say); only a broken store makes that pointless.
            if graceful and not isinstance(self._fatal, StoreError):
                with anyio.move_on_after(self._options.connect_timeout, shield=True):
                    if session.connection_state is not ConnectionState.DISCONNECTED:
                        session.disconnect()
                    await parts.flusher.finish()
        finally:
            await parts.connection.drop()
            tasks.cancel_scope.cancel()
            await stack.aclose()

    def _abandon_pending(self, parts: Running) -> None:
        """The tasks ended: every caller still waiting learns why."""
        parts.session.connection_lost()
        error = self._fatal or ClientClosed(
            "the client closed before this completed; unacknowledged messages stay in the "
            "store and are sent by the next client with the same id and store"
        )
        parts.flusher.fail_waiting(error)
        parts.dispatcher.fail_pending(error)
        parts.flusher.room.set()
        # wait_connected() and drain() in a task outside the block: they re-check and raise.
        parts.dispatcher.ready.set()
        parts.flusher.flushed.set()

    async def _release_store(self) -> None:
        await self._storage.close()
        session = self._session
        if session is not None:
            self._log.info(
                "closed: %d queued and %d in flight left in the store",
                session.queued,
                session.inflight,
            )
