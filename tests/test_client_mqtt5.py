"""What MQTT 5 gives the client, against a real mosquitto, seen by an independent paho client.

The guarantees every protocol shares run over both in test_client_e2e.py and test_crash.py;
these are MQTT 5's own: properties both ways, the session's expiry, the broker's Receive Maximum
(the quota mosquitto silently enforces on 3.1.1), a message that expires while queued, the
broker's DISCONNECT reasons, the automatic fallback to 3.1.1 against brokers that do not speak 5,
and what a stored session does when it is continued under the other protocol.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from mqtt_persist import (
    Backoff,
    DeliveryOutcome,
    FileStore,
    InvalidInput,
    InvalidTopicFilter,
    MemoryStore,
    Message,
    PayloadTooLarge,
    PersistentClient,
    Properties,
    ProtocolVersion,
    RetainHandling,
    ServerDisconnected,
)
from mqtt_persist.protocol.codec import Decoder, encode
from mqtt_persist.protocol.packets import (
    MQTT_5,
    ConnAck,
    Connect,
    Disconnect,
    Packet,
    PubComp,
    Publish,
    PubRec,
    PubRel,
)
from tests.support.broker import BrokerFactory, MosquittoBroker
from tests.support.fake_broker import FakeConnection, ScriptedBroker
from tests.support.nats import NatsServer
from tests.support.observer import PahoObserver, paho_publish_async
from tests.support.proxy import ProxyFactory
from tests.support.rabbitmq import RabbitMQBroker
from tests.support.waiting import until

pytestmark = pytest.mark.broker

FAST = Backoff(initial=0.05, maximum=0.3, minimum=0.01)
V5 = ProtocolVersion.V5
V311 = ProtocolVersion.V311


def client_for(target: object, client_id: str, **kwargs: object) -> PersistentClient:
    kwargs.setdefault("backoff", FAST)
    kwargs.setdefault("protocol", V5)
    return PersistentClient(target.host, target.port, client_id=client_id, **kwargs)  # type: ignore[arg-type,attr-defined]


async def receive(client: PersistentClient, count: int, timeout: float = 10.0) -> list[Message]:
    messages: list[Message] = []
    with anyio.fail_after(timeout):
        async for message in client.messages:
            messages.append(message)
            if len(messages) == count:
                break
    return messages


# --- properties --------------------------------------------------------------------------------


async def test_user_properties_and_correlation_data_round_trip(broker: MosquittoBroker) -> None:
    props = Properties(
        payload_format_indicator=1,
        content_type="application/json",
        response_topic="rr/reply/dev-1",
        correlation_data=b"\x00\x01req-7",
        user_properties=(("trace", "t-1"), ("trace", "t-2"), ("unit", "°C")),
        message_expiry_interval=3600,
    )
    async with PahoObserver(broker.host, broker.port, "rr/out/#", protocol=5) as observer:
        async with client_for(broker, "props-1") as client:
            await (await client.subscribe("rr/in/#", qos=1))
            delivery = await client.publish("rr/out/x", '{"t": 21.5}', qos=1, properties=props)
            with anyio.fail_after(10):
                assert await delivery is DeliveryOutcome.ACKNOWLEDGED
            # ... and the other way: paho publishes with properties, our Message carries them.
            inbound = props._replace(message_expiry_interval=None)
            await paho_publish_async(
                broker.host, broker.port, "rr/in/y", [b"{}"], qos=1, properties=inbound
            )
            (message,) = await receive(client, 1)
        assert await observer.await_count(1)
    seen = observer.messages[0].properties
    assert seen.message_expiry_interval is not None and 3500 < seen.message_expiry_interval <= 3600
    assert seen._replace(message_expiry_interval=None) == inbound
    assert message.properties == inbound
    assert (message.topic, message.payload) == ("rr/in/y", b"{}")


async def test_properties_survive_a_restart_of_the_client(
    broker: MosquittoBroker, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    """Stored with the message (store format 2): sent after the next process connects."""
    proxy = await proxy_factory(broker)
    proxy.refuse(True)
    props = Properties(user_properties=(("batch", "42"),), correlation_data=b"c-42")
    store = tmp_path / "s"
    async with client_for(proxy, "props-restart", store=FileStore(store)) as client:
        await client.publish("keep/props", b"x", qos=2, properties=props)
    proxy.refuse(False)
    async with PahoObserver(broker.host, broker.port, "keep/#", protocol=5) as observer:
        async with client_for(proxy, "props-restart", store=FileStore(store)) as client:
            await client.drain(10)
        assert await observer.await_count(1)
    assert observer.messages[0].properties == props


async def test_subscription_options_and_identifier(broker: MosquittoBroker) -> None:
    await paho_publish_async(broker.host, broker.port, "opt/retained", [b"old"], retain=True)
    async with client_for(broker, "opts") as client:
        await (
            await client.subscribe(
                "opt/#",
                qos=1,
                no_local=True,
                retain_handling=RetainHandling.DO_NOT_SEND,
                subscription_identifier=7,
            )
        )
        await client.publish("opt/own", b"mine", qos=1)  # no local: never comes back
        await paho_publish_async(broker.host, broker.port, "opt/other", [b"theirs"], qos=1)
        (message,) = await receive(client, 1)
        with anyio.move_on_after(0.3):
            async for extra in client.messages:
                raise AssertionError(f"unexpected {extra}")
    assert message.payload == b"theirs"  # neither the retained one nor our own
    assert message.properties.subscription_identifiers == (7,)


async def test_bad_properties_and_options_are_refused_before_anything_is_stored(
    broker: MosquittoBroker,
) -> None:
    async with client_for(broker, "refuse-bad", protocol="auto") as client:
        bad = [
            Properties(topic_alias=3),
            Properties(subscription_identifiers=(1,)),
            Properties(message_expiry_interval=0),
            Properties(response_topic="a/+/b"),
            Properties(receive_maximum=5),  # not a PUBLISH property
        ]
        for props in bad:
            with pytest.raises(InvalidInput):
                await client.publish("t", b"x", qos=1, properties=props)
        with pytest.raises(InvalidInput, match="says the payload is UTF-8"):
            await client.publish(
                "t", b"\xff", qos=1, properties=Properties(payload_format_indicator=1)
            )
        with pytest.raises(InvalidTopicFilter):
            await client.subscribe("$share//t")
        with pytest.raises(InvalidInput, match="no_local"):
            await client.subscribe("$share/g/t", no_local=True)
        with pytest.raises(InvalidInput, match="subscription_identifier"):
            await client.subscribe("t", subscription_identifier=0)
        assert client.stats.queued == 0
    async with client_for(broker, "refuse-v311", protocol=V311) as client:
        with pytest.raises(InvalidInput, match="MQTT 5"):
            await client.publish("t", b"x", properties=Properties(content_type="a/b"))
        with pytest.raises(InvalidInput, match="MQTT 5"):
            await client.subscribe("t", no_local=True)


async def test_shared_subscription_splits_messages_between_two_clients(
    broker: MosquittoBroker,
) -> None:
    async with client_for(broker, "share-a") as a, client_for(broker, "share-b") as b:
        for client in (a, b):
            await (await client.subscribe("$share/workers/jobs/#", qos=1))
        await paho_publish_async(
            broker.host, broker.port, "jobs/x", [str(i).encode() for i in range(20)], qos=1
        )
        got: list[bytes] = []

        async def collect(client: PersistentClient) -> None:
            with anyio.move_on_after(2):
                async for message in client.messages:
                    got.append(message.payload)

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(collect, a)
            tasks.start_soon(collect, b)
    assert sorted(int(p) for p in got) == list(range(20))  # each exactly once, between the two


# --- the session's lifetime --------------------------------------------------------------------


async def test_session_expiry_keeps_the_session_before_it_and_not_after(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    store = tmp_path / "s"

    def client() -> PersistentClient:
        return client_for(broker, "expiring", store=FileStore(store), session_expiry=2)

    async with client() as c:
        await (await c.subscribe("exp/t", qos=1))
    await paho_publish_async(broker.host, broker.port, "exp/t", [b"kept"], qos=1)
    async with client() as c:  # within the interval: the broker kept the session
        (message,) = await receive(c, 1)
        assert c.session_present is True and message.payload == b"kept"
    await paho_publish_async(broker.host, broker.port, "exp/t", [b"too late"], qos=1)
    await asyncio.sleep(4)  # mosquitto 2.0 looks at expiries about once a second
    async with client() as c:  # past it: the broker's session is gone, and ours expired too
        await c.wait_connected(10)
        assert c.session_present is False and c.session_status == "expired"
        with anyio.move_on_after(0.5):
            async for message in c.messages:
                raise AssertionError(f"the expired session delivered {message}")


async def test_a_queued_message_whose_expiry_lapses_while_offline_is_not_sent(
    broker: MosquittoBroker,
    proxy_factory: ProxyFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="mqtt_persist")
    proxy = await proxy_factory(broker)
    proxy.refuse(True)
    async with PahoObserver(broker.host, broker.port, "ttl/#", protocol=5) as observer:
        async with client_for(proxy, "ttl", store=FileStore(tmp_path / "s")) as client:
            short = await client.publish(
                "ttl/t", b"short", qos=1, properties=Properties(message_expiry_interval=1)
            )
            long = await client.publish(
                "ttl/t", b"long", qos=2, properties=Properties(message_expiry_interval=600)
            )
            await asyncio.sleep(1.5)
            proxy.refuse(False)
            with anyio.fail_after(10):
                assert await short is DeliveryOutcome.EXPIRED
                assert await long is DeliveryOutcome.ACKNOWLEDGED
            assert client.stats.expired == 1
        assert await observer.await_count(1)
        await asyncio.sleep(0.3)
    assert [m.payload for m in observer.messages] == [b"long"]
    remaining = observer.messages[0].properties.message_expiry_interval
    assert remaining is not None and 590 < remaining < 600  # what was left of it, not 600
    assert "expired before the broker took it" in caplog.text


# --- the broker's limits -----------------------------------------------------------------------


@pytest.mark.slow
async def test_receive_maximum_of_a_small_quota_is_honoured_and_nothing_dropped(
    broker_factory: BrokerFactory, tmp_path: Path
) -> None:
    """mosquitto with max_inflight_messages 5 drops QoS 1/2 messages past that quota while
    still acknowledging them over 3.1.1 (787 of 2,000 lost with the 3.1.1 window); over MQTT 5
    it announces Receive Maximum 5, and keeping to it loses nothing."""
    broker = broker_factory(extra_config="max_inflight_messages 5\nmax_queued_messages 10000\n")
    total = 2000
    async with PahoObserver(broker.host, broker.port, "quota/#", qos=2) as observer:
        async with client_for(broker, "quota", store=FileStore(tmp_path / "s")) as client:
            await client.wait_connected(10)
            session = client._session
            assert session is not None and session.terms.send_window == 5
            peak = 0
            for start in range(0, total, 100):
                await asyncio.gather(
                    *(
                        client.publish(f"quota/q{1 + i % 2}", str(i).encode(), qos=1 + i % 2)
                        for i in range(start, start + 100)
                    )
                )
                peak = max(peak, session.inflight)
            await client.drain(60)
            assert client.stats.refused == 0 and peak <= 5
        assert await observer.await_count(total, 30), observer.count()
    payloads = Counter(int(p) for p in observer.payloads())
    assert set(payloads) == set(range(total))
    assert all(payloads[i] == 1 for i in range(1, total, 2)), "QoS 2 delivered twice"


async def test_3_1_1_with_a_qos2_window_below_the_quota_drops_nothing(
    broker_factory: BrokerFactory,
) -> None:
    """3.1.1 cannot learn the quota: max_inflight_qos2 must stay below it (the default 19 fits
    mosquitto's default 20); set to 4 against a quota of 5, nothing is dropped either."""
    broker = broker_factory(extra_config="max_inflight_messages 5\nmax_queued_messages 10000\n")
    total = 600
    async with PahoObserver(broker.host, broker.port, "q311/#", qos=2) as observer:
        async with client_for(broker, "q311", protocol=V311, max_inflight_qos2=4) as client:
            await client.wait_connected(10)
            await asyncio.gather(
                *(
                    client.publish(f"q311/q{1 + i % 2}", str(i).encode(), qos=1 + i % 2)
                    for i in range(total)
                )
            )
            await client.drain(60)
        assert await observer.await_count(total, 30), observer.count()
    assert {int(p) for p in observer.payloads()} == set(range(total))


async def test_a_message_over_the_brokers_maximum_packet_size(
    broker_factory: BrokerFactory, proxy_factory: ProxyFactory
) -> None:
    broker = broker_factory(extra_config="max_packet_size 2000\n")
    proxy = await proxy_factory(broker)
    proxy.refuse(True)
    async with client_for(proxy, "big") as client:
        queued = await client.publish("big/t", b"x" * 5000, qos=1)  # not known yet: queued
        small = await client.publish("big/t", b"ok", qos=1)
        proxy.refuse(False)
        with anyio.fail_after(10):
            assert await queued is DeliveryOutcome.REFUSED
            assert await small is DeliveryOutcome.ACKNOWLEDGED
        assert queued.reason_code == 0x95 and client.stats.refused == 1
        with pytest.raises(PayloadTooLarge, match="2000"):  # known now: refused at once
            await client.publish("big/t", b"x" * 5000, qos=1)
        assert client.is_connected  # never sent, so never disconnected for it


async def test_a_refusing_puback_resolves_the_delivery_with_its_reason(
    broker_factory: BrokerFactory, tmp_path: Path
) -> None:
    acl = tmp_path / "acl"
    acl.write_text("topic readwrite allowed/#\n")
    broker = broker_factory(extra_config=f"acl_file {acl}\n")
    async with client_for(broker, "acl-denied") as client:
        denied = await client.publish("secret/t", b"x", qos=1)
        allowed = await client.publish("allowed/t", b"y", qos=2)
        with anyio.fail_after(10):
            assert await denied is DeliveryOutcome.REFUSED
            assert await allowed is DeliveryOutcome.ACKNOWLEDGED
        assert denied.reason_code == 0x87  # not authorized: answered, so not retried
        assert client.stats.refused == 1 and client.stats.queued == client.stats.inflight == 0


# --- the broker's DISCONNECT -------------------------------------------------------------------
# mosquitto 2.0.11 sends a reasoned DISCONNECT only for a packet over its Maximum Packet Size,
# which this client never sends (CONNACK announces the limit); on a session takeover or its own
# shutdown it closes the connection without one (checked on this machine). So a scripted
# broker plays the DISCONNECTs here.


@pytest.mark.parametrize(
    ("code", "fatal"), [(0x8E, True), (0x8B, False)], ids=["taken-over", "shutting-down"]
)
async def test_a_broker_disconnect_reason_reaches_the_application_as_a_typed_error(
    code: int, fatal: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="mqtt_persist")

    async def script(conn: FakeConnection, index: int) -> None:
        assert (await conn.expect(Connect)).protocol_level == 5
        await conn.send(ConnAck(False, 0))
        if index == 0:
            await conn.send(Disconnect(code, Properties(reason_string="by the book")))
            await conn.receive(timeout=5)  # the client hangs up
            return
        await asyncio.sleep(10)

    async with (
        ScriptedBroker(script) as fake,
        PersistentClient(fake.host, fake.port, client_id="told", backoff=FAST) as client,
    ):
        if fatal:  # reconnecting would take the session back, and so on: the client stops
            with pytest.raises(ServerDisconnected) as caught, anyio.fail_after(10):
                async for _ in client.messages:
                    pass
            error = caught.value
            assert (error.reason_code, error.reason_string, error.fatal) == (
                code,
                "by the book",
                True,
            )
            assert "Session taken over" in str(error) and fake.connections == 1
        else:  # the broker may well come back: reconnect, and say why it went
            await until(lambda: fake.connections >= 2, 10, "a reconnect")
            await client.wait_connected(5)
            assert "Server shutting down" in caplog.text and "by the book" in caplog.text
    assert not fake.errors


# --- the protocol: fallback, and a stored session continued under the other one ----------------


@pytest.mark.nats
async def test_auto_falls_back_to_3_1_1_on_nats(nats_broker: NatsServer) -> None:
    """nats-server 2.9 answers an MQTT 5 CONNECT with a 3.1.1 CONNACK, return code 1."""
    async with client_for(nats_broker, "auto-nats", protocol="auto") as client:
        await client.wait_connected(15)
        assert client.protocol_version is V311
        delivery = await client.publish("auto/nats", b"x", qos=1)
        with anyio.fail_after(10):
            assert await delivery is DeliveryOutcome.ACKNOWLEDGED


@pytest.mark.rabbitmq
async def test_auto_falls_back_to_3_1_1_on_rabbitmq(shared_rabbitmq: RabbitMQBroker) -> None:
    """RabbitMQ 3.10 closes an MQTT 5 CONNECT's connection without answering."""
    async with client_for(shared_rabbitmq, "auto-rabbit-1", protocol="auto") as client:
        await client.wait_connected(15)
        assert client.protocol_version is V311
        delivery = await client.publish("auto/rabbit", b"x", qos=1)
        with anyio.fail_after(10):
            assert await delivery is DeliveryOutcome.ACKNOWLEDGED


async def test_auto_speaks_mqtt_5_to_mosquitto(broker: MosquittoBroker) -> None:
    async with client_for(broker, "auto-mosq", protocol="auto") as client:
        await client.wait_connected(10)
        assert client.protocol_version is V5


@pytest.mark.parametrize(
    ("first", "then"), [(V311, V5), (V5, V311)], ids=["311-then-5", "5-then-311"]
)
async def test_a_stored_session_continued_under_the_other_protocol(
    first: ProtocolVersion,
    then: ProtocolVersion,
    broker: MosquittoBroker,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The broker decides: mosquitto keeps a client's session across protocol levels, so the
    subscription and the messages queued for it survive the switch; the store records it."""
    caplog.set_level(logging.WARNING, logger="mqtt_persist")
    store = tmp_path / "s"
    async with client_for(broker, "switch", protocol=first, store=FileStore(store)) as client:
        await (await client.subscribe("switch/t", qos=1))
    await paho_publish_async(broker.host, broker.port, "switch/t", [b"while away"], qos=1)
    async with client_for(broker, "switch", protocol=then, store=FileStore(store)) as client:
        (message,) = await receive(client, 1)
        assert client.session_present is True and client.protocol_version is then
    assert message.payload == b"while away"
    assert "now continues with" in caplog.text
    async with FileStore(store) as s:
        state = await s.load("switch")
    assert state is not None and state.protocol_version == then


async def test_will_delay_and_will_properties(
    broker: MosquittoBroker, proxy_factory: ProxyFactory
) -> None:
    from mqtt_persist import Will

    proxy = await proxy_factory(broker)
    will = Will(
        "status/delayed",
        b"gone",
        qos=1,
        properties=Properties(will_delay_interval=1, content_type="text/plain"),
    )
    async with (
        PahoObserver(broker.host, broker.port, "status/#", protocol=5) as observer,
        client_for(proxy, "willing-5", will=will, session_expiry=60) as client,
    ):
        await client.wait_connected(10)
        proxy.cut()
        proxy.refuse(True)
        await until(lambda: not client.is_connected, 5, "the cut")
        await asyncio.sleep(0.5)
        assert observer.count() == 0  # the delay holds it back
        assert await observer.await_count(1, 5)
    assert observer.messages[0].properties.content_type == "text/plain"


# --- scripted: what mosquitto 2.0.11 does not do on demand -------------------------------------


async def test_the_brokers_granted_session_expiry_wins_and_the_store_follows() -> None:
    async def script(conn: FakeConnection, index: int) -> None:
        connect = await conn.expect(Connect)
        assert connect.properties.session_expiry_interval == 0xFFFFFFFF  # we asked: never
        await conn.send(ConnAck(False, 0, Properties(session_expiry_interval=600)))
        await asyncio.sleep(10)

    store = MemoryStore()
    async with (
        ScriptedBroker(script) as fake,
        PersistentClient(fake.host, fake.port, client_id="granted", store=store) as client,
    ):
        await client.publish("t", b"x", qos=1)  # something to store
        await until(lambda: client.session_expiry == 600.0, 5, "the granted expiry")
        (info,) = [i for i in await store.list_sessions() if i.client_id == "granted"]
        assert info.expires_at is not None
        assert 590 < info.expires_at - info.last_access <= 600


async def test_a_broker_exceeding_our_receive_maximum_is_told_so() -> None:
    told: list[Disconnect] = []

    async def script(conn: FakeConnection, index: int) -> None:
        connect = await conn.expect(Connect)
        await conn.send(ConnAck(False, 0))
        if index == 0:
            assert connect.properties.receive_maximum == 2
            for packet_id in (1, 2, 3):  # three QoS 2 flows open: one too many
                await conn.send(Publish("in/t", b"x", 2, packet_id=packet_id))
            while True:
                packet = await conn.receive()
                if isinstance(packet, Disconnect):
                    told.append(packet)
                    return
        await asyncio.sleep(10)

    async with (
        ScriptedBroker(script) as fake,
        PersistentClient(
            fake.host, fake.port, client_id="strict", receive_maximum=2, backoff=FAST
        ) as client,
    ):
        await until(lambda: fake.connections >= 2, 10, "a reconnect")
        await client.wait_connected(5)
    assert [d.reason_code for d in told] == [0x93]
    assert not fake.errors


async def test_a_request_the_requester_receives_itself_is_not_its_response(
    broker: MosquittoBroker,
) -> None:
    """A requester subscribed to its own request topic receives the request, which carries the
    same correlation data as the response: it is a message, not the answer."""
    async with (
        client_for(broker, "echo-responder") as responder,
        client_for(broker, "echo-requester") as requester,
    ):
        await (await responder.subscribe("echo/req", qos=1))
        await (await requester.subscribe("echo/#", qos=1))  # its requests and their replies

        async def serve() -> None:
            async for message in responder.messages:
                await responder.respond(message, b"pong")

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(serve)
            answer = await requester.request(
                "echo/req", b"ping", response_topic="echo/reply", timeout=10
            )
            (own,) = await receive(requester, 1)
            tasks.cancel_scope.cancel()
    assert (answer.topic, answer.payload) == ("echo/reply", b"pong")
    assert (own.topic, own.payload) == ("echo/req", b"ping")


async def test_request_and_respond_pair_up_by_correlation_data(broker: MosquittoBroker) -> None:
    async with (
        client_for(broker, "responder") as responder,
        client_for(broker, "requester") as requester,
    ):
        await (await responder.subscribe("svc/req", qos=1))
        await (await requester.subscribe("svc/reply/requester/#", qos=1))

        async def serve() -> None:
            async for message in responder.messages:
                await responder.respond(message, b"pong:" + message.payload)

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(serve)
            answers = [
                await requester.request(
                    "svc/req", str(i).encode(), response_topic="svc/reply/requester/1", timeout=10
                )
                for i in range(3)
            ]
            # A message on the response topic that answers no request stays in ``messages``.
            await paho_publish_async(broker.host, broker.port, "svc/reply/requester/1", [b"stray"])
            (stray,) = await receive(requester, 1)
            tasks.cancel_scope.cancel()
    assert [a.payload for a in answers] == [b"pong:0", b"pong:1", b"pong:2"]
    assert len({a.properties.correlation_data for a in answers}) == 3
    assert stray.payload == b"stray"
    with pytest.raises(InvalidInput, match="no response topic"):
        async with client_for(broker, "responder-2") as client:
            await client.respond(stray, b"x")


def _raw_v5(broker: MosquittoBroker) -> tuple[socket.socket, Callable[[], Packet]]:
    """An MQTT 5 connection to ``broker`` and a bounded read of its next packet."""
    sock = socket.create_connection((broker.host, broker.port), 5)
    decoder = Decoder(protocol_version=MQTT_5)
    pending: list[Packet] = []

    def receive() -> Packet:
        while not pending:
            data = sock.recv(65536)
            assert data, "the broker closed the connection"
            pending.extend(decoder.feed(data))
        return pending.pop(0)

    sock.sendall(
        encode(
            Connect(
                client_id="maxqos-fact",
                clean_session=False,
                keepalive=60,
                protocol_level=MQTT_5,
                properties=Properties(session_expiry_interval=3600),
            ),
            MQTT_5,
        )
    )
    return sock, receive


def test_mosquitto_restarted_with_max_qos_1_keeps_a_qos2_flow_and_pubcomps_any_id(
    persistent_broker: MosquittoBroker,
) -> None:
    """The facts behind releasing, not refusing nor resending, a QoS 2 flow in flight when the
    Maximum QoS drops (session/outbound.py): the session and its QoS 2 flow survive the
    restart, a resend is a protocol error to it (DISCONNECT 0x9B), and PUBREL gets PUBCOMP 0
    for an ID it never saw as for one it holds (so only 0x92 would say "never had it")."""
    sock, receive = _raw_v5(persistent_broker)
    with sock:
        assert isinstance(receive(), ConnAck)
        sock.sendall(encode(Publish("fact/t", b"x", 2, packet_id=5), MQTT_5))
        assert isinstance(receive(), PubRec)  # and never answered: lost, as far as we know
    persistent_broker.extra_config = "max_qos 1"
    persistent_broker.restart()
    sock, receive = _raw_v5(persistent_broker)
    with sock:
        connack = receive()
        assert isinstance(connack, ConnAck) and connack.session_present
        assert connack.properties.maximum_qos == 1
        sock.sendall(encode(PubRel(6), MQTT_5))  # an ID it never saw
        assert receive() == PubComp(6, 0)
        sock.sendall(encode(PubRel(5), MQTT_5))
        assert receive() == PubComp(5, 0)
        sock.sendall(encode(Publish("fact/t", b"y", 2, dup=True, packet_id=7), MQTT_5))
        answer = receive()
        assert isinstance(answer, Disconnect) and answer.reason_code == 0x9B
