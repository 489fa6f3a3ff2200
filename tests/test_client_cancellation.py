"""Cancelling the client's public calls: a timeout or a cancelled task group around a call
must leave the client consistent.

A cancelled ``publish()`` has either not accepted its message or accepted it for good (it
arrives, once); the other callers sharing its commit are neither woken with the cancellation
nor left hanging; later calls work; leaving the client still closes it. Each test cancels
with asyncio's own cancellation (``asyncio.wait_for``, ``task.cancel()``) and with an anyio
cancel scope, which keeps cancelling every later await inside it until it is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Literal

import anyio
import pytest

from mqtt_persist import (
    Backoff,
    DeliveryOutcome,
    FileStore,
    MemoryStore,
    PersistentClient,
    SessionStore,
)
from mqtt_persist.log import LOGGER_NAME
from mqtt_persist.protocol.packets import ProtocolVersion
from mqtt_persist.session.state import Operation
from tests.support.broker import BrokerFactory
from tests.support.observer import PahoObserver, paho_publish_async
from tests.support.proxy import ProxyFactory
from tests.support.waiting import until

FAST = Backoff(initial=0.05, maximum=0.2, minimum=0.01)

Flavour = Literal["asyncio", "anyio"]
FLAVOURS = pytest.mark.parametrize("flavour", ["asyncio", "anyio"])
STORES = pytest.mark.parametrize("store_kind", ["file", "memory"])


def make_store(kind: str, path: Path) -> SessionStore:
    return FileStore(path) if kind == "file" else MemoryStore()


class CommitGate:
    """Holds the store's commits while closed, so a test can cancel a caller that waits for
    one: ``store.apply`` waits at the gate before it writes."""

    def __init__(self, store: SessionStore) -> None:
        self.waiting = 0
        self._open = asyncio.Event()
        self._open.set()
        original = store.apply

        async def apply(client_id: str, ops: Sequence[Operation]) -> None:
            if not self._open.is_set():
                self.waiting += 1
                try:
                    await self._open.wait()
                finally:
                    self.waiting -= 1
            await original(client_id, ops)

        store.apply = apply  # type: ignore[method-assign]

    def close(self) -> None:
        self._open.clear()

    def open(self) -> None:
        self._open.set()


class Caller:
    """One call of the client in a task of its own, cancellable either way: ``task.cancel()``
    (asyncio) or its own anyio cancel scope."""

    def __init__(self, flavour: Flavour, call: Callable[[], Awaitable[object]]) -> None:
        self.flavour = flavour
        self.started = False
        self.result: object = None
        self.done = False
        self._call = call
        self._scope: anyio.CancelScope | None = None
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        self.started = True
        if self.flavour == "asyncio":
            self.result = await self._call()
            self.done = True
        else:
            with anyio.CancelScope() as self._scope:
                self.result = await self._call()
                self.done = True

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    def cancel(self) -> None:
        assert self._task is not None and not self._task.done()
        if self.flavour == "asyncio":
            self._task.cancel()
        else:
            assert self._scope is not None
            self._scope.cancel()

    async def outcome(self) -> object:
        """The call's result; ``CANCELLED`` if it was cancelled."""
        assert self._task is not None
        with anyio.fail_after(10):
            try:
                await asyncio.shield(self._task)
            except asyncio.CancelledError:
                if not self._task.cancelled():
                    raise
                return CANCELLED
        return self.result if self.done else CANCELLED


CANCELLED = object()


async def cancel_once_waiting(
    flavour: Flavour, call: Callable[[], Awaitable[object]], waiting: Callable[[], bool]
) -> None:
    """Run ``call`` in a task of its own and cancel it once ``waiting()`` says it is stuck
    where the test wants it: with ``task.cancel()`` (asyncio) or by cancelling the cancel
    scope of the task group it runs in (anyio). Raises if ``call`` finished instead."""
    finished: list[object] = []

    async def run() -> None:
        finished.append(await call())

    if flavour == "asyncio":
        task = asyncio.ensure_future(run())
        await until(lambda: waiting() or task.done(), 5, "the call to wait")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    else:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(run)
            await until(lambda: waiting() or bool(finished), 5, "the call to wait")
            tasks.cancel_scope.cancel()
    assert not finished, "the call returned before it could be cancelled"


def no_errors_logged(caplog: pytest.LogCaptureFixture) -> None:
    errors = [
        r for r in caplog.records if r.name.startswith(LOGGER_NAME) and r.levelno >= logging.ERROR
    ]
    assert not errors, [r.getMessage() for r in errors]


# --- leaving the client ----------------------------------------------------------------------


@FLAVOURS
async def test_exit_cancelled_while_settling_still_closes_the_client(
    flavour: Flavour,
    broker_factory: BrokerFactory,
    proxy_factory: ProxyFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Leaving the client waits up to exit_timeout for the broker (settle_before_exit); a
    cancellation during that wait must still close the client (its tasks end, the lease is
    released), not leave its task group running behind the caller's back."""
    broker = broker_factory()
    proxy = await proxy_factory(broker, mqtt=True)
    # The broker's PUBCOMP never arrives: the exit waits for it, exit_timeout long.
    lost = proxy.drop_packets("down", "PUBCOMP")
    store = tmp_path / "store"
    body_done = False

    async def use_client() -> None:
        nonlocal body_done
        async with PersistentClient(
            "127.0.0.1",
            proxy.port,
            client_id="cx-exit",
            store=FileStore(store),
            backoff=FAST,
            exit_timeout=30,
        ) as client:
            await client.wait_connected(5)
            await client.publish("cx/exit", b"once", qos=2)
            body_done = True

    async with PahoObserver(broker.host, broker.port, "cx/#") as observer:
        await cancel_once_waiting(flavour, use_client, lambda: body_done)
        lost.remove()
        # The lease was released: the next client takes the session over and ends the flow.
        async with PersistentClient(
            "127.0.0.1", proxy.port, client_id="cx-exit", store=FileStore(store), backoff=FAST
        ) as client:
            await client.wait_connected(5)
            await client.drain(5)
            assert await observer.await_count(1)
        assert observer.payloads() == [b"once"]
    no_errors_logged(caplog)


# --- receiving -------------------------------------------------------------------------------


@FLAVOURS
async def test_messages_iterator_survives_a_timed_out_wait(
    flavour: Flavour, broker_factory: BrokerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A timeout around one step of ``client.messages`` (``wait_for(anext(it), t)``, or a
    cancel scope around it) ends that wait, not the iteration: the same iterator yields the
    next message, and nothing that arrived is skipped."""
    broker = broker_factory()
    async with PersistentClient(
        broker.host, broker.port, client_id="cx-iter", backoff=FAST
    ) as client:
        await client.subscribe("cx/iter", qos=1)
        await client.wait_connected(5)
        incoming = aiter(client.messages)
        if flavour == "asyncio":
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(anext(incoming), 0.05)
        else:
            with anyio.move_on_after(0.05) as waiting:
                await anext(incoming)
            assert waiting.cancelled_caught
        await client.publish("cx/iter", b"after", qos=1)
        with anyio.fail_after(5):
            message = await anext(incoming)
        assert message.payload == b"after"
        # Still closable like the async generator it used to be.
        async with contextlib.aclosing(incoming):  # type: ignore[type-var]
            pass
        with pytest.raises(StopAsyncIteration):
            await anext(incoming)
    no_errors_logged(caplog)


# --- publishing ------------------------------------------------------------------------------


@FLAVOURS
async def test_publish_cancelled_while_waiting_for_its_commit(
    flavour: Flavour,
    broker_factory: BrokerFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Durable publish() calls wait for the flusher's commit, several of them on one shared
    CommitTicket. Cancelling one caller waiting for the commit under way and one waiting for
    the next: their messages were accepted (the session took them before the wait), so they
    arrive once; the callers sharing those commits return normally; the client goes on."""
    broker = broker_factory()
    store = FileStore(tmp_path / "store")
    gate = CommitGate(store)
    async with (
        PahoObserver(broker.host, broker.port, "cx/#") as observer,
        PersistentClient(
            broker.host, broker.port, client_id="cx-pub", store=store, backoff=FAST
        ) as client,
    ):
        await client.wait_connected(5)
        gate.close()
        # Started one after the other without a yield: both join the same commit.
        under_way = Caller(flavour, lambda: client.publish("cx/p", b"c1", qos=2))
        sharing_under_way = Caller(flavour, lambda: client.publish("cx/p", b"c2", qos=2))
        under_way.start()
        sharing_under_way.start()
        await until(lambda: gate.waiting == 1, 5, "the first commit to reach the store")
        # The flusher is held in that commit: these two wait for the next one, together.
        waits_next = Caller(flavour, lambda: client.publish("cx/p", b"n1", qos=2))
        sharing_next = Caller(
            flavour, lambda: client.publish_many([("cx/p", b"n2"), ("cx/p", b"n3")], qos=2)
        )
        waits_next.start()
        sharing_next.start()
        await until(lambda: waits_next.started and sharing_next.started, 5, "the callers")
        under_way.cancel()
        waits_next.cancel()
        assert await under_way.outcome() is CANCELLED
        assert await waits_next.outcome() is CANCELLED
        gate.open()
        delivery = await sharing_under_way.outcome()
        deliveries = await sharing_next.outcome()
        with anyio.fail_after(10):
            assert await delivery is DeliveryOutcome.ACKNOWLEDGED  # type: ignore[misc]
            for each in deliveries:  # type: ignore[attr-defined]
                assert await each is DeliveryOutcome.ACKNOWLEDGED
            later = await client.publish("cx/p", b"later", qos=2)
            assert await later is DeliveryOutcome.ACKNOWLEDGED
            await client.drain(10)
        assert await observer.await_count(6)
    assert Counter(observer.payloads()) == Counter([b"c1", b"c2", b"n1", b"n2", b"n3", b"later"])
    no_errors_logged(caplog)


@FLAVOURS
@STORES
async def test_publish_cancelled_while_the_queue_is_full(
    flavour: Flavour,
    store_kind: str,
    broker_factory: BrokerFactory,
    proxy_factory: ProxyFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With queue_full="block" a publish() waits for room before it stores anything: a
    cancelled one leaves nothing behind, and the publisher still waiting gets the room."""
    broker = broker_factory()
    proxy = await proxy_factory(broker)
    proxy.refuse(True)  # offline: the queue fills up
    async with (
        PahoObserver(broker.host, broker.port, "cx/#") as observer,
        PersistentClient(
            "127.0.0.1",
            proxy.port,
            client_id="cx-full",
            store=make_store(store_kind, tmp_path),
            backoff=FAST,
            max_queued=1,
            queue_full="block",
        ) as client,
    ):
        first = await client.publish("cx/q", b"first", qos=1)
        cancelled = Caller(flavour, lambda: client.publish("cx/q", b"cancelled", qos=1))
        waiting = Caller(flavour, lambda: client.publish("cx/q", b"waiting", qos=1))
        cancelled.start()
        waiting.start()
        await until(lambda: cancelled.started and waiting.started, 5, "the publishers")
        cancelled.cancel()
        assert await cancelled.outcome() is CANCELLED
        assert client.stats.queued == 1
        proxy.refuse(False)
        with anyio.fail_after(10):
            assert await first is DeliveryOutcome.ACKNOWLEDGED
            delivery = await waiting.outcome()
            assert await delivery is DeliveryOutcome.ACKNOWLEDGED  # type: ignore[misc]
            later = await client.publish("cx/q", b"later", qos=1)
            assert await later is DeliveryOutcome.ACKNOWLEDGED
            await client.drain(10)
        assert await observer.await_count(3)
    assert sorted(observer.payloads()) == [b"first", b"later", b"waiting"]
    no_errors_logged(caplog)


@FLAVOURS
async def test_awaiting_a_delivery_cancelled_beside_another_waiter(
    flavour: Flavour,
    broker_factory: BrokerFactory,
    proxy_factory: ProxyFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``await delivery`` waits for the broker; cancelling one waiter (a timeout around it)
    leaves the delivery pending for the others, and it can be awaited again."""
    broker = broker_factory()
    proxy = await proxy_factory(broker)
    proxy.refuse(True)
    async with PersistentClient(
        "127.0.0.1", proxy.port, client_id="cx-delivery", backoff=FAST
    ) as client:
        delivery = await client.publish("cx/d", b"x", qos=1)
        cancelled = Caller(flavour, lambda: delivery)
        other = Caller(flavour, lambda: delivery)
        cancelled.start()
        other.start()
        await until(lambda: cancelled.started and other.started, 5, "the waiters")
        cancelled.cancel()
        assert await cancelled.outcome() is CANCELLED
        assert delivery.outcome is None and not other.done
        proxy.refuse(False)
        with anyio.fail_after(10):
            assert await other.outcome() is DeliveryOutcome.ACKNOWLEDGED
            assert await delivery is DeliveryOutcome.ACKNOWLEDGED
    no_errors_logged(caplog)


# --- entering the client ---------------------------------------------------------------------


@FLAVOURS
async def test_enter_cancelled_while_loading_releases_the_session(
    flavour: Flavour,
    broker_factory: BrokerFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A timeout around ``async with PersistentClient(...)`` that fires while the stored
    session is being loaded must give the lease back: the next client of the session (a retry)
    gets it, instead of SessionLocked."""
    broker = broker_factory()
    store = FileStore(tmp_path / "store")
    loading = False
    hold = asyncio.Event()
    original = store.load

    async def slow_load(client_id: str, **kwargs: int | None) -> object:
        nonlocal loading
        loading = True
        await hold.wait()
        return await original(client_id, **kwargs)

    store.load = slow_load  # type: ignore[assignment, method-assign]

    async def enter() -> None:
        async with PersistentClient(
            broker.host, broker.port, client_id="cx-enter", store=store, backoff=FAST
        ):
            pass

    await cancel_once_waiting(flavour, enter, lambda: loading)
    store.load = original  # type: ignore[method-assign]
    async with PersistentClient(
        broker.host, broker.port, client_id="cx-enter", store=store, backoff=FAST
    ) as client:
        await client.wait_connected(5)
    no_errors_logged(caplog)


@FLAVOURS
async def test_enter_cancelled_while_the_lease_is_taken_releases_it(
    flavour: Flavour,
    broker_factory: BrokerFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Cancelled while the store's worker thread takes the lease (a slow ``flock``): the job
    finishes without its caller and the lease is taken. The client gives it back, so a retry
    in this process is not refused with "already acquired by this store"."""
    broker = broker_factory()
    store = FileStore(tmp_path / "store")
    leases = store._leases
    taking = threading.Event()
    go_on = threading.Event()
    original = leases.acquire

    def slow_acquire(client_id: str) -> None:
        taking.set()
        go_on.wait(5)  # on the worker thread, past the point where a cancel could skip it
        original(client_id)

    leases.acquire = slow_acquire  # type: ignore[method-assign]

    async def enter() -> None:
        async with PersistentClient(
            broker.host, broker.port, client_id="cx-lease", store=store, backoff=FAST
        ):
            pass

    def waiting() -> bool:
        if taking.is_set() and not go_on.is_set():
            # Let the job finish just after the cancel: the client's release queues behind it.
            asyncio.get_running_loop().call_later(0.2, go_on.set)
        return taking.is_set()

    try:
        await cancel_once_waiting(flavour, enter, waiting)
    finally:
        go_on.set()
    leases.acquire = original  # type: ignore[method-assign]
    with anyio.fail_after(10):
        async with PersistentClient(
            broker.host, broker.port, client_id="cx-lease", store=store, backoff=FAST
        ) as client:
            await client.wait_connected(5)
    no_errors_logged(caplog)


@FLAVOURS
@pytest.mark.parametrize("kind", ["redis", "postgres"])
async def test_enter_cancelled_after_a_shared_store_granted_the_lease_leaves_none(
    flavour: Flavour,
    kind: str,
    broker_factory: BrokerFactory,
    tmp_path: Path,
) -> None:
    """Cancelled after the server wrote the lease but before the reply came back: the store
    takes it back, so a restarted client (a new store, the same id) starts at once instead
    of being refused for lease_ttl (60 s here)."""
    from tests.test_store_fencing import reply_lost_after_the_server_acted

    broker = broker_factory()

    def new_store() -> SessionStore:
        if kind == "redis":
            from mqtt_persist.stores.redis import RedisStore
            from tests.support.redis_server import shared_redis_url, unique_prefix

            return RedisStore(shared_redis_url(), prefix=unique_prefix(tmp_path), lease_ttl=60)
        from mqtt_persist.stores.postgres import PostgresStore
        from tests.support.postgres import shared_postgres_dsn, unique_schema

        return PostgresStore(shared_postgres_dsn(), schema=unique_schema(tmp_path), lease_ttl=60)

    store = new_store()
    await store.open()
    hanging = reply_lost_after_the_server_acted(store)

    async def enter() -> None:
        async with PersistentClient(
            broker.host, broker.port, client_id="cx-shared", store=store, backoff=FAST
        ):
            pass

    try:
        await cancel_once_waiting(flavour, enter, hanging.is_set)
    finally:
        await store.close()
    restarted = new_store()
    with anyio.fail_after(10):
        async with PersistentClient(
            broker.host, broker.port, client_id="cx-shared", store=restarted, backoff=FAST
        ) as client:
            await client.wait_connected(5)
    await restarted.close()


# --- subscribing -----------------------------------------------------------------------------


@FLAVOURS
@STORES
async def test_subscribe_and_unsubscribe_cancelled_while_waiting_for_the_commit(
    flavour: Flavour,
    store_kind: str,
    broker_factory: BrokerFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """subscribe()/unsubscribe() change the session, then wait for the commit (with any
    store). Cancelled in that wait, the change was made and still reaches the broker; later
    calls work, and leaving the client does not wait for an answer that never comes."""
    broker = broker_factory()
    store = make_store(store_kind, tmp_path / "store")
    gate = CommitGate(store)
    async with PersistentClient(
        broker.host, broker.port, client_id="cx-sub", store=store, backoff=FAST
    ) as client:
        await client.wait_connected(5)
        await client.subscribe("cx/gone", qos=1)
        gate.close()
        subscribing = Caller(flavour, lambda: client.subscribe("cx/kept", qos=1))
        unsubscribing = Caller(flavour, lambda: client.unsubscribe("cx/gone"))
        subscribing.start()
        unsubscribing.start()
        await until(lambda: gate.waiting == 1, 5, "the commit to reach the store")
        subscribing.cancel()
        unsubscribing.cancel()
        assert await subscribing.outcome() is CANCELLED
        assert await unsubscribing.outcome() is CANCELLED
        gate.open()
        with anyio.fail_after(10):
            later = await client.subscribe("cx/later", qos=1)
            assert await later == (1,)
            # In this order from one publisher: had the unsubscribe not reached the broker,
            # "gone" would arrive before "kept".
            for topic in ("cx/gone", "cx/kept", "cx/later"):
                await client.publish(topic, topic.encode(), qos=1)
            incoming = aiter(client.messages)
            assert (await anext(incoming)).topic == "cx/kept"
            assert (await anext(incoming)).topic == "cx/later"
            await client.drain(10)
    no_errors_logged(caplog)


# --- acknowledging received messages ---------------------------------------------------------


@FLAVOURS
async def test_manual_ack_cancelled_while_waiting_for_the_commit(
    flavour: Flavour,
    broker_factory: BrokerFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A durable QoS 2 ack() waits for the commit that records the message as received.
    Cancelled in that wait, the ack still happened: the next message is acknowledged after
    it (acks go out in arrival order), and neither comes again to the next client."""
    broker = broker_factory()
    path = tmp_path / "store"

    def client_of(store: SessionStore) -> PersistentClient:
        return PersistentClient(
            broker.host,
            broker.port,
            client_id="cx-ack",
            store=store,
            backoff=FAST,
            ack="manual",
        )

    store = FileStore(path)
    gate = CommitGate(store)
    async with client_of(store) as client:
        await client.subscribe("cx/in", qos=2)
        await client.wait_connected(5)
        await paho_publish_async(broker.host, broker.port, "cx/in", [b"1", b"2"], qos=2)
        incoming = aiter(client.messages)
        with anyio.fail_after(10):
            first = await anext(incoming)
            second = await anext(incoming)
        gate.close()
        acking = Caller(flavour, first.ack)
        acking.start()
        await until(lambda: gate.waiting == 1, 5, "the ack's commit to reach the store")
        acking.cancel()
        assert await acking.outcome() is CANCELLED
        gate.open()
        with anyio.fail_after(10):
            async with second.processing():
                pass
            await client.drain(10)
    async with client_of(FileStore(path)) as client:
        await client.wait_connected(5)
        await paho_publish_async(broker.host, broker.port, "cx/in", [b"3"], qos=2)
        with anyio.fail_after(10):
            message = await anext(aiter(client.messages))
            # The broker sends what it still holds for the session before anything new.
            assert message.payload == b"3"
            await message.ack()
    no_errors_logged(caplog)


# --- waiting for the connection and for the broker -------------------------------------------


@FLAVOURS
@STORES
async def test_wait_connected_and_drain_cancelled_beside_other_waiters(
    flavour: Flavour,
    store_kind: str,
    broker_factory: BrokerFactory,
    proxy_factory: ProxyFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """wait_connected() and drain() waiters share the client's wake-ups (Signal): cancelling
    one leaves the others waiting and woken as before, and the same calls work later."""
    broker = broker_factory()
    proxy = await proxy_factory(broker)
    proxy.refuse(True)
    async with (
        PahoObserver(broker.host, broker.port, "cx/#") as observer,
        PersistentClient(
            "127.0.0.1",
            proxy.port,
            client_id="cx-wait",
            store=make_store(store_kind, tmp_path),
            backoff=FAST,
        ) as client,
    ):
        delivery = await client.publish("cx/w", b"queued", qos=1)
        cancelled_connect = Caller(flavour, client.wait_connected)
        other_connect = Caller(flavour, client.wait_connected)
        cancelled_drain = Caller(flavour, client.drain)
        other_drain = Caller(flavour, client.drain)
        callers = (cancelled_connect, other_connect, cancelled_drain, other_drain)
        for caller in callers:
            caller.start()
        await until(lambda: all(c.started for c in callers), 5, "the waiters")
        cancelled_connect.cancel()
        cancelled_drain.cancel()
        assert await cancelled_connect.outcome() is CANCELLED
        assert await cancelled_drain.outcome() is CANCELLED
        assert not other_connect.done and not other_drain.done
        proxy.refuse(False)
        with anyio.fail_after(10):
            assert await other_connect.outcome() is None
            assert await other_drain.outcome() is None
            assert await delivery is DeliveryOutcome.ACKNOWLEDGED
            await client.wait_connected(5)
            later = await client.publish("cx/w", b"later", qos=1)
            await client.drain(5)
            assert later.outcome is DeliveryOutcome.ACKNOWLEDGED
        assert await observer.await_count(2)
    assert sorted(observer.payloads()) == [b"later", b"queued"]
    no_errors_logged(caplog)


# --- request / response (MQTT 5) -------------------------------------------------------------


@FLAVOURS
async def test_request_cancelled_while_waiting_for_its_response(
    flavour: Flavour, broker_factory: BrokerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A request() cancelled while it waits for the response: the request went out (it was
    published), its late response arrives in client.messages like any message, and the next
    request gets its own response."""
    broker = broker_factory()

    def client_for(client_id: str) -> PersistentClient:
        return PersistentClient(
            broker.host,
            broker.port,
            client_id=client_id,
            backoff=FAST,
            protocol=ProtocolVersion.V5,
        )

    async with client_for("cx-responder") as responder, client_for("cx-requester") as client:
        with anyio.fail_after(10):
            await (await responder.subscribe("cx/req", qos=1))
            await (await client.subscribe("cx/resp", qos=1))
        requests = aiter(responder.messages)
        asking = Caller(flavour, lambda: client.request("cx/req", b"q1", response_topic="cx/resp"))
        asking.start()
        with anyio.fail_after(10):
            request = await anext(requests)  # published: now waiting for the response
        assert request.payload == b"q1"
        asking.cancel()
        assert await asking.outcome() is CANCELLED
        with anyio.fail_after(10):
            await responder.respond(request, b"late")
            late = await anext(aiter(client.messages))
            assert (late.topic, late.payload) == ("cx/resp", b"late")

            async def serve() -> None:
                await responder.respond(await anext(requests), b"answer")

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(serve)
                answer = await client.request("cx/req", b"q2", response_topic="cx/resp")
            assert answer.payload == b"answer"
            await client.drain(5)
    no_errors_logged(caplog)


@FLAVOURS
async def test_processing_block_cancelled_leaves_the_message_to_acknowledge(
    flavour: Flavour, broker_factory: BrokerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """``async with message.processing():`` cancelled inside the block does not acknowledge
    (the block did not succeed): the message can still be acknowledged afterwards, which
    releases the acknowledgements of the messages after it."""
    broker = broker_factory()
    shared_store = MemoryStore()

    def client_of() -> PersistentClient:
        return PersistentClient(
            broker.host,
            broker.port,
            client_id="cx-proc",
            store=shared_store,
            backoff=FAST,
            ack="manual",
        )

    async with client_of() as client:
        await client.subscribe("cx/proc", qos=1)
        await client.wait_connected(5)
        await paho_publish_async(broker.host, broker.port, "cx/proc", [b"1", b"2"], qos=1)
        incoming = aiter(client.messages)
        with anyio.fail_after(10):
            first = await anext(incoming)
            second = await anext(incoming)
        inside = False

        async def process() -> None:
            nonlocal inside
            async with first.processing():
                inside = True
                await anyio.sleep_forever()

        await cancel_once_waiting(flavour, process, lambda: inside)
        with anyio.fail_after(10):
            await second.ack()
            await first.ack()
            await client.drain(10)
    async with client_of() as client:
        await client.wait_connected(5)
        await paho_publish_async(broker.host, broker.port, "cx/proc", [b"3"], qos=1)
        with anyio.fail_after(10):
            message = await anext(aiter(client.messages))
            assert message.payload == b"3"  # 1 and 2 were acknowledged: not sent again
            await message.ack()
    no_errors_logged(caplog)


@FLAVOURS
async def test_enter_cancelled_while_connecting_without_reconnect(
    flavour: Flavour,
    broker_factory: BrokerFactory,
    proxy_factory: ProxyFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With reconnect=False entering waits for the connection: cancelled there (a broker
    that does not answer CONNECT), the client is shut down and its lease given back, so a
    retry enters and connects."""
    broker = broker_factory()
    proxy = await proxy_factory(broker)
    proxy.stall(True, "down")  # CONNECT goes up, CONNACK never comes back
    store = tmp_path / "store"

    def client_of() -> PersistentClient:
        return PersistentClient(
            "127.0.0.1",
            proxy.port,
            client_id="cx-connect",
            store=FileStore(store),
            reconnect=False,
            connect_timeout=30,
        )

    async def enter() -> None:
        async with client_of():
            pass

    await cancel_once_waiting(flavour, enter, lambda: proxy.total_connections >= 1)
    proxy.stall(False)
    async with client_of() as client:
        await client.wait_connected(5)
        with anyio.fail_after(10):
            delivery = await client.publish("cx/c", b"x", qos=1)
            assert await delivery is DeliveryOutcome.ACKNOWLEDGED
    no_errors_logged(caplog)
