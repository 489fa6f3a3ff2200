"""The fault suite's own tools: MQTT framing (tests/support/wire.py) and the proxy's packet
features (tests/support/proxy.py), checked against paho-mqtt and a real mosquitto.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.support.broker import MosquittoBroker
from tests.support.observer import PahoObserver, paho_publish_async
from tests.support.proxy import ProxyFactory
from tests.support.waiting import until
from tests.support.wire import PUBACK, PUBLISH, Framer, WirePacket, parse

# --- framing ------------------------------------------------------------------------------------


def _publish(topic: bytes, payload: bytes, qos: int, packet_id: int) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic
    if qos:
        body += packet_id.to_bytes(2, "big")
    body += payload
    length, n = b"", len(body)
    while True:
        byte, n = n % 128, n // 128
        length += bytes([byte | (0x80 if n else 0)])
        if not n:
            break
    return bytes([0x30 | qos << 1]) + length + body


def test_framer_splits_packets_whatever_the_chunks() -> None:
    packets = [_publish(b"a/b", b"x" * size, 1, i + 1) for i, size in enumerate((0, 5, 200, 20000))]
    stream = b"".join(packets) + bytes([0x40, 2, 0, 9])  # and a PUBACK
    for chunk in (1, 2, 3, 127, 4096, len(stream)):
        framer = Framer()
        out = [p for i in range(0, len(stream), chunk) for p in framer.feed(stream[i : i + chunk])]
        assert out == [*packets, bytes([0x40, 2, 0, 9])], chunk
        assert not framer.broken


def test_parse_reads_publish_and_acknowledgements() -> None:
    p = parse(_publish(b"t/1", b"hello", 2, 513), link=3, direction="up", index=7)
    assert (p.type, p.qos, p.packet_id, p.topic, p.payload, p.dup) == (
        PUBLISH, 2, 513, "t/1", b"hello", False
    )  # fmt: skip
    assert (p.link, p.direction, p.index) == (3, "up", 7)
    ack = parse(bytes([0x40, 2, 1, 2]), link=1, direction="down", index=0)
    assert (ack.type, ack.packet_id) == (PUBACK, 258)
    dup = parse(bytes([0x3A]) + _publish(b"t", b"", 1, 1)[1:], link=1, direction="up", index=0)
    assert dup.dup and dup.qos == 1


def test_framer_passes_a_stream_that_is_not_mqtt_through() -> None:
    framer = Framer()
    assert list(framer.feed(bytes([0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]))) == [
        bytes([0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01])
    ]
    assert framer.broken
    assert list(framer.feed(b"more")) == [b"more"]


# --- the proxy, MQTT-aware ----------------------------------------------------------------------


@pytest.mark.broker
async def test_proxy_records_what_paho_sends_and_drops_chosen_packets(
    broker: MosquittoBroker, proxy_factory: ProxyFactory
) -> None:
    proxy = await proxy_factory(broker, mqtt=True)
    seen: list[WirePacket] = []
    proxy.on_packet(seen.append)
    async with PahoObserver(broker.host, broker.port, "rec/#", qos=1) as observer:
        await paho_publish_async(proxy.host, proxy.port, "rec/a", [b"one", b"two"], qos=1)
        assert await observer.await_count(2)
        publishes = [p for p in proxy.packets if p.type == PUBLISH]
        assert [(p.topic, p.payload, p.qos) for p in publishes] == [
            ("rec/a", b"one", 1), ("rec/a", b"two", 1)
        ]  # fmt: skip
        assert seen == proxy.packets
        acks = [p for p in proxy.packets if p.type == PUBACK and p.direction == "down"]
        assert [a.packet_id for a in acks] == [p.packet_id for p in publishes]
        # Drop the broker's PUBACKs: paho's publish then never completes.
        rule = proxy.drop_packets("down", "PUBACK")
        with pytest.raises(TimeoutError):
            await paho_publish_async(proxy.host, proxy.port, "rec/b", [b"three"], qos=1, timeout=1)
        assert rule.hits == 1
        assert await observer.await_count(3)  # the broker had it: only its answer was lost
        rule.remove()
        await paho_publish_async(proxy.host, proxy.port, "rec/c", [b"four"], qos=1)
        assert rule.hits == 1


@pytest.mark.broker
async def test_proxy_listener_can_cut_before_a_packet_is_forwarded(
    broker: MosquittoBroker, proxy_factory: ProxyFactory
) -> None:
    proxy = await proxy_factory(broker, mqtt=True)

    def cut_on_publish(packet: WirePacket) -> None:
        if packet.type == PUBLISH and packet.payload == b"never":
            proxy.cut()

    proxy.on_packet(cut_on_publish)
    async with PahoObserver(broker.host, broker.port, "cut/#", qos=1) as observer:
        with pytest.raises((TimeoutError, ConnectionError)):
            await paho_publish_async(proxy.host, proxy.port, "cut/a", [b"never"], timeout=1)
        await paho_publish_async(broker.host, broker.port, "cut/b", [b"marker"])
        assert await observer.await_count(1)
        assert observer.payloads() == [b"marker"]


@pytest.mark.broker
async def test_proxy_stalls_one_direction_or_only_open_connections(
    broker: MosquittoBroker, proxy_factory: ProxyFactory
) -> None:
    proxy = await proxy_factory(broker, mqtt=True)
    async with PahoObserver(proxy.host, proxy.port, "st/#", qos=1) as observer:
        first = proxy.open_links
        proxy.stall(True, "down")
        await paho_publish_async(broker.host, broker.port, "st/a", [b"held"])
        await proxy.settle()  # the held bytes count as handled: settle does not wait for them
        assert observer.count() == 0 and proxy.stalled
        proxy.stall(False, "down")
        assert await observer.await_count(1)
        # Only the connection open now is held; a new one flows.
        proxy.stall(True, only_open=True)
        async with PahoObserver(proxy.host, proxy.port, "st/#", qos=1) as second:
            await paho_publish_async(broker.host, broker.port, "st/b", [b"new flows"])
            assert await second.await_count(1)
            await proxy.settle()
            assert observer.count() == 1
            assert proxy.cut(first) == 1
        await until(lambda: observer.connects >= 2 and observer.subacks >= 2, 10)
        assert not proxy.stalled


async def test_settle_returns_only_when_the_proxy_has_read_everything() -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
        writer.close()

    from tests.support.proxy import FaultProxy

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    async with FaultProxy("127.0.0.1", server.sockets[0].getsockname()[1], mqtt=True) as proxy:
        _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        assert await proxy.wait_connections(1)
        packets = [_publish(b"s", b"%d" % i, 1, i + 1) for i in range(200)]
        writer.write(b"".join(packets))  # written to the socket before settle() is called
        await proxy.settle()
        assert len([p for p in proxy.packets if p.direction == "up"]) == 200
        await proxy.settle()
        assert len([p for p in proxy.packets if p.direction == "down"]) == 200
        writer.close()
    server.close()
    await server.wait_closed()
