"""Lifecycle and failure paths: what every waiter sees when the client stops for good, and
how it leaves ``async with`` from awkward states."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import anyio
import pytest

from mqtt_persist import (
    Backoff,
    ClientClosed,
    ConnectionLost,
    ConnectionRefused,
    MemoryStore,
    MqttPersistError,
    PersistentClient,
    SessionFenced,
    StoreError,
)
from mqtt_persist.protocol.packets import SubAck, Subscribe
from mqtt_persist.session.state import Operation, SubscriptionSet
from tests.support import hostile
from tests.support.broker import BrokerFactory, MosquittoBroker
from tests.support.fake_broker import FakeConnection, ScriptedBroker
from tests.support.stores import BreakableStore
from tests.support.waiting import until

FAST = Backoff(initial=0.05, maximum=0.2, minimum=0.01)
#: Nothing listens on the discard port: the client stays disconnected, backing off.
NOWHERE = 9


async def test_awaited_delivery_and_subscription_raise_a_fatal_store_error() -> None:
    """Regression: a Delivery or SubscribeRequest awaited after the store broke waited
    forever (only leaving ``async with`` failed them, and the block was waiting on them)."""
    store = BreakableStore()
    async with PersistentClient(
        "127.0.0.1", NOWHERE, client_id="fatal-waiters", store=store, backoff=FAST
    ) as client:
        delivery = await client.publish("t", b"1", qos=1)  # stored; no broker to take it
        request = await client.subscribe("s/#", qos=1)
        store.error = StoreError("disk gone")
        with anyio.fail_after(5), pytest.raises(StoreError):
            await client.publish("t", b"2", qos=1)
        with anyio.fail_after(2), pytest.raises(StoreError, match="disk gone"):
            await delivery
        with anyio.fail_after(2), pytest.raises(StoreError, match="disk gone"):
            await request


async def test_awaited_delivery_raises_a_fatal_refusal(broker_factory: BrokerFactory) -> None:
    """A refused CONNECT stops the client: a delivery waiting for the broker learns why."""
    broker = broker_factory(start=False, extra_config="allow_anonymous false\n")
    async with PersistentClient(
        "127.0.0.1", broker.port, client_id="refused-waiter", store=BreakableStore(), backoff=FAST
    ) as client:
        delivery = await client.publish("t", b"1", qos=1)
        broker.start()
        with anyio.fail_after(5), pytest.raises(ConnectionRefused):
            await delivery


async def test_fenced_before_connecting_without_reconnect_raises_fenced(
    broker: MosquittoBroker,
) -> None:
    """reconnect=False: a store that refuses the first commit makes entering raise the
    store's error, not whatever the dropped connection raised."""
    store = BreakableStore()
    store.error = SessionFenced("another process took the session over")
    with anyio.fail_after(5), pytest.raises(SessionFenced):
        async with PersistentClient(
            "127.0.0.1", broker.port, client_id="fenced-once", store=store, reconnect=False
        ):
            pass


class FailLaterStore(BreakableStore):
    """Commits raise ``error`` from the ``fail_at``-th one on."""

    def __init__(self, error: Exception, fail_at: int) -> None:
        super().__init__()
        self._later = error
        self._fail_at = fail_at
        self.applied = 0

    async def apply(self, client_id: str, ops: Sequence[Operation]) -> None:
        self.applied += 1
        if self.applied >= self._fail_at:
            self.error = self._later
        await super().apply(client_id, ops)


async def test_fenced_right_after_connack_without_reconnect_raises_fenced(
    broker: MosquittoBroker,
) -> None:
    """reconnect=False enters connected or not at all: fenced at the commit before the first
    packets after CONNACK (a stored subscription to restore), entering raises."""
    store = FailLaterStore(SessionFenced("another process took the session over"), 10**9)
    async with PersistentClient(
        "127.0.0.1", NOWHERE, client_id="fenced-late", store=store, backoff=FAST
    ) as client:
        await client.subscribe("s/#", qos=1)
    store.applied, store._fail_at = 0, 2  # the commit before CONNECT passes; the next fails
    with anyio.fail_after(5), pytest.raises(SessionFenced):
        async with PersistentClient(
            "127.0.0.1", broker.port, client_id="fenced-late", store=store, reconnect=False
        ) as client:
            pytest.fail(f"entered a stopped client (connected: {client.is_connected})")


class GatedStore(BreakableStore):
    """Commits wait for ``gate`` while it is armed; ``entered`` says one is waiting."""

    def __init__(self) -> None:
        super().__init__()
        self.gate: anyio.Event | None = None
        self.entered = anyio.Event()

    async def apply(self, client_id: str, ops: Sequence[Operation]) -> None:
        gate = self.gate
        if gate is not None:
            self.entered.set()
            await gate.wait()
        await super().apply(client_id, ops)


async def test_a_flusher_bug_fails_the_publish_waiting_for_the_next_commit(
    broker: MosquittoBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: an unexpected error in a flusher pass stopped the client, but a publish()
    waiting for the commit after that pass waited until the block was left."""
    store = GatedStore()
    async with PersistentClient(
        "127.0.0.1", broker.port, client_id="flusher-bug", store=store, backoff=FAST
    ) as client:
        await client.wait_connected(timeout=10)
        parts = client._parts
        assert parts is not None

        async def broken_send(*args: object) -> None:
            raise RuntimeError("a bug in sending")

        monkeypatch.setattr(parts.connection, "send", broken_send)
        gate = store.gate = anyio.Event()
        outcome: list[BaseException | None] = []

        async def publish(payload: bytes) -> None:
            try:
                await client.publish("t", payload, qos=1)
            except MqttPersistError as exc:
                outcome.append(exc)
            else:
                outcome.append(None)

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(publish, b"first")  # its commit waits at the gate
            with anyio.fail_after(5):
                await store.entered.wait()
            tasks.start_soon(publish, b"second")  # waits for the commit after it
            await until(lambda: parts.flusher._next_commit is not None, timeout=5)
            gate.set()  # the pass sends, the send raises, the flusher stops
            with anyio.fail_after(3):
                await until(lambda: len(outcome) == 2, timeout=3)
        # The first one's commit succeeded before the pass broke; the second never came.
        assert outcome[0] is None
        assert isinstance(outcome[1], MqttPersistError)


@pytest.mark.parametrize("call", ["drain", "wait_connected"])
async def test_a_wait_in_a_task_outside_the_block_ends_when_the_client_closes(call: str) -> None:
    """Regression: drain() and wait_connected() running in a task that outlives the block
    (an outer task group) waited for good once the client closed under them; a Delivery
    awaited there raises ClientClosed, and so do they now."""
    outcome: list[BaseException | None] = []

    async def wait(client: PersistentClient) -> None:
        try:
            await getattr(client, call)()
        except ClientClosed as exc:
            outcome.append(exc)
        else:
            outcome.append(None)

    with anyio.fail_after(5):
        async with (
            anyio.create_task_group() as tasks,
            PersistentClient(
                "127.0.0.1", NOWHERE, client_id="outside", backoff=FAST, exit_timeout=0
            ) as client,
        ):
            await client.publish("t", b"queued", qos=0)  # so that drain() has to wait
            tasks.start_soon(wait, client)
            await anyio.wait_all_tasks_blocked()
            assert not outcome
    assert len(outcome) == 1 and isinstance(outcome[0], ClientClosed), outcome
    assert not client.is_connected


async def test_every_waiter_raises_the_store_error_that_stops_the_client() -> None:
    """The store breaks under a commit while every kind of call waits: each raises the
    store's error promptly, and the block is left without another error."""
    store = GatedStore()
    async with PersistentClient(
        "127.0.0.1",
        NOWHERE,
        client_id="all-waiters",
        store=store,
        backoff=FAST,
        max_queued=1,
        queue_full="block",
    ) as client:
        delivery = await client.publish("t", b"queued", qos=1)  # the queue is full now
        gate = store.gate = anyio.Event()
        raised: dict[str, BaseException | None] = {}

        async def record(name: str, call: Callable[[], Awaitable[object]]) -> None:
            try:
                await call()
            except StoreError as exc:
                raised[name] = exc
            else:
                raised[name] = None

        async def read() -> None:
            async for _ in client.messages:
                pass

        async def awaited() -> None:
            await delivery

        calls: dict[str, Callable[[], Awaitable[object]]] = {
            "subscribe": lambda: client.subscribe("s", qos=1),  # its commit waits at the gate
            "blocked publish": lambda: client.publish("t", b"blocked", qos=1),
            "publish_many": lambda: client.publish_many([("t", b"m")], qos=1),
            "drain": client.drain,
            "wait_connected": client.wait_connected,
            "messages": read,
            "delivery": awaited,
        }
        async with anyio.create_task_group() as tasks:
            for name, call in calls.items():
                tasks.start_soon(record, name, call)
            with anyio.fail_after(5):
                await store.entered.wait()
            await anyio.wait_all_tasks_blocked()
            store.error = StoreError("disk gone")
            gate.set()
            with anyio.fail_after(3):
                await until(lambda: len(raised) == len(calls), timeout=3)
        assert {name: str(exc) for name, exc in raised.items()} == dict.fromkeys(calls, "disk gone")


async def test_the_exit_does_not_wait_through_the_connections_per_minute_cap(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Regression: while the supervisor waited for Backoff.max_per_minute (up to a minute),
    leaving waited the whole exit_timeout for a connection that was not coming, where a
    backoff delay ends that wait at once."""

    async def script(conn: FakeConnection, index: int) -> None:
        conn.close()  # accepted, then closed unanswered: a connection that got nowhere

    capped = Backoff(initial=0.01, maximum=0.02, minimum=0.01, max_per_minute=2)
    async with ScriptedBroker(script) as fake:
        with anyio.fail_after(5):
            async with PersistentClient(
                fake.host, fake.port, client_id="capped", backoff=capped, exit_timeout=10
            ) as client:
                await client.publish("t", b"x", qos=1)
                await until(lambda: "Backoff.max_per_minute" in caplog.text, timeout=4)
                leaving = anyio.current_time()
        assert anyio.current_time() - leaving < 1.0


async def test_a_client_entered_again_refuses_and_leaves_its_session_to_the_next() -> None:
    """A PersistentClient is entered once: entering it again raises ClientClosed before it
    touches the store (no second lease, nothing loaded over the session), every call on the
    closed client raises ClientClosed, and a new client restores what the first one left."""
    store = BreakableStore()
    client = PersistentClient("127.0.0.1", NOWHERE, client_id="twice", store=store, backoff=FAST)
    async with client:
        await client.publish("t", b"kept", qos=1)
    with anyio.fail_after(5):
        with pytest.raises(ClientClosed, match="only once"):
            async with client:
                pytest.fail("entered twice")
        for call in (
            lambda: client.publish("t", b"late", qos=1),
            lambda: client.subscribe("s"),
            client.drain,
            client.wait_connected,
        ):
            with pytest.raises(ClientClosed):
                await call()
        assert not client.is_connected
        async with PersistentClient(
            "127.0.0.1", NOWHERE, client_id="twice", store=store, backoff=FAST, exit_timeout=0
        ) as again:
            assert again.session_status == "restored"
            assert again.stats.queued == 1


class HoldsConfirmations(BreakableStore):
    """Commits of a confirmed subscription (the SUBACK's) wait for good once ``hold`` is set."""

    hold = False

    async def apply(self, client_id: str, ops: Sequence[Operation]) -> None:
        if self.hold and any(isinstance(op, SubscriptionSet) and op.confirmed for op in ops):
            await anyio.sleep_forever()
        await super().apply(client_id, ops)


async def test_reconnect_false_does_not_enter_a_client_whose_connection_was_lost() -> None:
    """Regression: the connection was READY (its restored subscription acknowledged) and lost
    while the commit that reports it waited; entering returned a stopped, disconnected client.
    Entering returns connected or raises."""
    store = HoldsConfirmations()
    async with PersistentClient(
        "127.0.0.1", NOWHERE, client_id="lost-early", store=store, backoff=FAST
    ) as client:
        await client.subscribe("s/#", qos=1)  # restored on the next connection

    async def script(conn: FakeConnection, index: int) -> None:
        await hostile.accept(conn)
        subscribe = await conn.expect(Subscribe)
        await conn.send(SubAck(subscribe.packet_id, [1]))
        conn.close()  # READY, and gone before the client could report it

    store.hold = True
    async with ScriptedBroker(script) as fake:
        with anyio.fail_after(5), pytest.raises(ConnectionLost):
            async with PersistentClient(
                fake.host,
                fake.port,
                client_id="lost-early",
                store=store,
                reconnect=False,
                connect_timeout=1,
            ) as client:
                pytest.fail(f"entered (connected: {client.is_connected}, stopped: {client._fatal})")


class StallingStore(MemoryStore):
    """A durable MemoryStore whose commits wait, once ``stall`` is set, until cancelled."""

    durable = True

    def __init__(self) -> None:
        super().__init__()
        self.stall = False
        self.stalled = anyio.Event()

    async def apply(self, client_id: str, ops: Sequence[Operation]) -> None:
        if self.stall:
            self.stalled.set()
            await anyio.sleep_forever()
        await super().apply(client_id, ops)


async def test_a_publish_whose_commit_the_close_cut_short_is_told_its_fate_is_unknown() -> None:
    """Closing cancels a commit that did not finish within connect_timeout. Its publish() gets
    ClientClosed saying the message may or may not be stored (not "stays in the store"); one
    whose commit never started is told it was not stored."""
    store = StallingStore()
    errors: dict[str, ClientClosed] = {}

    async def publish(client: PersistentClient, name: str) -> None:
        with pytest.raises(ClientClosed) as caught:
            await client.publish("t", name.encode(), qos=1)
        errors[name] = caught.value

    with anyio.fail_after(10):
        async with anyio.create_task_group() as outside, PersistentClient(
            "127.0.0.1", NOWHERE, client_id="cut-short", store=store, backoff=FAST,
            connect_timeout=0.3,
        ) as client:  # fmt: skip
            store.stall = True
            outside.start_soon(publish, client, "cut")
            await store.stalled.wait()
            outside.start_soon(publish, client, "never")
            await until(lambda: client._parts.flusher._next_commit is not None, 5, "queued")
    assert "may or may not be in the store" in str(errors["cut"]), errors["cut"]
    assert "was not stored" in str(errors["never"]), errors["never"]
