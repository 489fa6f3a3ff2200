"""The client as it is today against RabbitMQ 3.10 and nats-server 2.9, seen by a paho observer.

What already works on both (issue 9): QoS 0/1 in both directions, persistent sessions that
collect messages while the client is away, publishes queued in a FileStore while the broker is
unreachable and sent by the next client process, and a broker crash in the middle of it all.
QoS 2 is left out on purpose: RabbitMQ downgrades it and nats-server 2.9 refuses it, which is
what tests/test_brokers_issue9.py is about. What each broker grants a QoS 2 *subscription* is
checked here, since it works.

The RabbitMQ node is shared by the whole session (a boot takes 10-15 s), so every test uses
client ids and topics of its own; every test gets its own nats-server.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Literal

import anyio
import pytest

from mqtt_persist import Backoff, DeliveryOutcome, FileStore, Message, PersistentClient
from tests.support.nats import NatsFactory
from tests.support.observer import PahoObserver, paho_publish_async
from tests.support.proxy import FaultProxy, ProxyFactory
from tests.support.rabbitmq import RabbitMQFactory
from tests.support.server_process import ServerProcess
from tests.support.waiting import until

FAST = Backoff(initial=0.05, maximum=0.3, minimum=0.01)
Kind = Literal["rabbitmq", "nats"]

MATRIX = [
    pytest.param("rabbitmq", marks=pytest.mark.rabbitmq),
    pytest.param("nats", marks=pytest.mark.nats),
]


@pytest.fixture(params=MATRIX)
def matrix_broker(request: pytest.FixtureRequest) -> ServerProcess:
    """The shared RabbitMQ node, or a nats-server of this test's own."""
    fixture = {"rabbitmq": "shared_rabbitmq", "nats": "nats_broker"}[request.param]
    server: ServerProcess = request.getfixturevalue(fixture)
    return server


def unique(prefix: str) -> str:
    """A client id or topic level no other test uses ('.' and ' ' are not allowed on NATS)."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def client_for(
    target: ServerProcess | FaultProxy, client_id: str, **kwargs: object
) -> PersistentClient:
    kwargs.setdefault("backoff", FAST)
    return PersistentClient(target.host, target.port, client_id=client_id, **kwargs)  # type: ignore[arg-type]


async def receive(client: PersistentClient, count: int, timeout: float = 15.0) -> list[Message]:
    messages: list[Message] = []
    with anyio.fail_after(timeout):
        async for message in client.messages:
            messages.append(message)
            if len(messages) == count:
                break
    return messages


async def test_qos0_and_qos1_publishes_reach_an_outside_subscriber(
    matrix_broker: ServerProcess,
) -> None:
    topic = unique("e2e-out")
    async with PahoObserver(matrix_broker.host, matrix_broker.port, f"{topic}/#") as observer:
        async with client_for(matrix_broker, unique("pub"), clean_session=True) as client:
            await client.wait_connected(15)
            q0 = await client.publish(f"{topic}/q0", b"zero", qos=0)
            q1 = [await client.publish(f"{topic}/q1", str(i).encode(), qos=1) for i in range(20)]
            with anyio.fail_after(15):
                outcomes = [await d for d in [q0, *q1]]
        assert outcomes == [DeliveryOutcome.SENT] + [DeliveryOutcome.ACKNOWLEDGED] * 20
        assert await observer.await_count(21, 15), observer.messages
    assert observer.payloads(f"{topic}/q0") == [b"zero"]
    assert observer.payloads(f"{topic}/q1") == [str(i).encode() for i in range(20)]
    assert {m.qos for m in observer.messages if m.topic == f"{topic}/q1"} == {1}


async def test_subscriptions_receive_from_another_publisher(matrix_broker: ServerProcess) -> None:
    topic = unique("e2e-in")
    async with client_for(matrix_broker, unique("sub"), clean_session=True) as client:
        assert await (await client.subscribe(f"{topic}/q0", qos=0)) == (0,)
        assert await (await client.subscribe(f"{topic}/q1/+", qos=1)) == (1,)
        # Neither broker does QoS 2 for subscribers: both grant QoS 1 instead, as MQTT allows.
        assert await (await client.subscribe(f"{topic}/q2", qos=2)) == (1,)
        host, port = matrix_broker.address
        await paho_publish_async(host, port, f"{topic}/q0", [b"a"], qos=0)
        await paho_publish_async(host, port, f"{topic}/q1/x", [b"b", b"c"], qos=1)
        await paho_publish_async(host, port, f"{topic}/q2", [b"d"], qos=1)
        got = await receive(client, 4)
    assert sorted((m.topic, m.payload, m.qos) for m in got) == [
        (f"{topic}/q0", b"a", 0),
        (f"{topic}/q1/x", b"b", 1),
        (f"{topic}/q1/x", b"c", 1),
        (f"{topic}/q2", b"d", 1),
    ]


async def test_persistent_session_collects_messages_while_offline(
    matrix_broker: ServerProcess, tmp_path: Path
) -> None:
    topic, client_id = unique("e2e-session"), unique("persistent")
    store = FileStore(tmp_path / "sessions")
    async with client_for(matrix_broker, client_id, store=store) as client:
        assert await (await client.subscribe(f"{topic}/#", qos=1)) == (1,)
    # The client is gone; its session on the broker keeps collecting QoS 1 messages.
    payloads = [f"offline-{i}".encode() for i in range(5)]
    host, port = matrix_broker.address
    await paho_publish_async(host, port, f"{topic}/news", payloads, qos=1)
    async with client_for(matrix_broker, client_id, store=store) as client:
        got = await receive(client, len(payloads))
        assert client.session_status == "restored"
    assert [m.payload for m in got] == payloads


async def test_publishes_queued_while_unreachable_are_sent_by_the_next_process(
    matrix_broker: ServerProcess, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    """Offline queueing through a FileStore, across a restart of the client."""
    topic, client_id = unique("e2e-queue"), unique("queued")
    proxy = await proxy_factory(matrix_broker.address)
    proxy.refuse(True)
    store_dir = tmp_path / "sessions"
    async with PahoObserver(matrix_broker.host, matrix_broker.port, f"{topic}/#") as observer:
        async with client_for(proxy, client_id, store=FileStore(store_dir)) as client:
            for i in range(30):
                await client.publish(f"{topic}/q1", str(i).encode(), qos=1)
            assert client.stats.queued == 30 and not client.is_connected
        # A new client (as after a process restart) on the same store sends what was queued.
        proxy.refuse(False)
        async with client_for(proxy, client_id, store=FileStore(store_dir)) as client:
            assert client.session_status == "restored"
            await client.drain(timeout=20)
        assert await observer.await_count(30, 15), observer.count()
    assert observer.payloads(f"{topic}/q1") == [str(i).encode() for i in range(30)]


# --- the broker crashes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind",
    [
        pytest.param("rabbitmq", marks=[pytest.mark.rabbitmq, pytest.mark.slow]),
        pytest.param("nats", marks=pytest.mark.nats),
    ],
)
async def test_broker_crash_loses_neither_session_nor_queued_publishes(
    kind: Kind,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    """SIGKILL the broker, publish while it is down, start it again: everything arrives.

    Both brokers keep persistent sessions on disk (RabbitMQ durable queues, NATS JetStream),
    so the client's subscription and an outside observer's session outlive the crash.
    """
    factory: RabbitMQFactory | NatsFactory = request.getfixturevalue(f"{kind}_factory")
    server = factory()
    topic = unique("e2e-crash")
    host, port = server.address
    # A persistent observer: the broker keeps what arrives for it while it reconnects.
    observer = PahoObserver(host, port, f"{topic}/out", qos=1, clean_session=False)
    async with (
        observer,
        client_for(server, unique("crash"), store=FileStore(tmp_path / "s")) as client,
    ):
        assert await (await client.subscribe(f"{topic}/in", qos=1)) == (1,)
        first = await client.publish(f"{topic}/out", b"before", qos=1)
        with anyio.fail_after(15):
            assert await first is DeliveryOutcome.ACKNOWLEDGED
        server.kill()
        await until(lambda: not client.is_connected, 10, "the client to notice the crash")
        during = [
            await client.publish(f"{topic}/out", f"down-{i}".encode(), qos=1) for i in range(5)
        ]
        await anyio.to_thread.run_sync(server.start)
        with anyio.fail_after(30):
            assert [await d for d in during] == [DeliveryOutcome.ACKNOWLEDGED] * 5
        # The client's own subscription survived too (kept by the broker or restored by it).
        await paho_publish_async(host, port, f"{topic}/in", [b"after"], qos=1)
        got = await receive(client, 1, timeout=20)
        assert [m.payload for m in got] == [b"after"]
        expected = [b"before"] + [f"down-{i}".encode() for i in range(5)]
        assert await observer.await_until(lambda: set(observer.payloads()) >= set(expected), 30)
    # QoS 1 is at least once: an acknowledgement the crash swallowed may bring a message twice.
    # Where "before" lands is the broker's business: NATS may hand it to the observer only after
    # its restart, behind newer messages. What the client sent in one connection stays in order.
    arrived = list(dict.fromkeys(observer.payloads()))
    assert sorted(arrived) == sorted(expected)
    assert [p for p in arrived if p != b"before"] == expected[1:]
