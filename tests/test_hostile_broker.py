"""A hostile broker (tests/support/hostile.py): malformed, oversized, out-of-order and fuzzed
packets after CONNACK, and a broker that never answers CONNECT.

Every case must end in a typed error or a clean reconnect: never a hang (each test runs under
``anyio.fail_after``), never an unhandled exception (the client's task group would raise it out
of ``async with``; nothing may be logged at ERROR), and never memory sized by a length the
broker chose beyond the client's ``max_packet_size``.
"""

from __future__ import annotations

import contextlib
import logging
import random
import tracemalloc
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mqtt_persist import Backoff, ConnectionLost, MemoryStore, PersistentClient
from mqtt_persist.errors import ProtocolError, ServerDisconnected
from mqtt_persist.protocol.codec import Decoder, encode
from mqtt_persist.protocol.packets import (
    ConnAck,
    Connect,
    ProtocolVersion,
    PubComp,
    Publish,
    PubRel,
    SubAck,
)
from mqtt_persist.session.machine import ConnectionState, Session, SessionConfig
from tests.support import hostile
from tests.support.fake_broker import FakeConnection, Script, ScriptedBroker
from tests.support.transports import Route
from tests.support.waiting import until

# No cap on connections a minute: the fuzzers open one per case, on purpose.
FAST = Backoff(initial=0.05, maximum=0.2, minimum=0.01, max_per_minute=0)
V311 = ProtocolVersion.V311
V5 = ProtocolVersion.V5
BOTH = pytest.mark.parametrize("protocol", [V311, V5], ids=["3.1.1", "5"])
LIMIT = 64 * 1024


def _no_errors_logged(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [r.getMessage() for r in bad]


async def survive(
    script: Script,
    caplog: pytest.LogCaptureFixture,
    *,
    protocol: ProtocolVersion = V311,
    **options: Any,
) -> str:
    """Run a client against ``script``; it must come back through a second, well-behaved
    connection. Returns the client's log."""
    caplog.set_level(logging.DEBUG, logger="mqtt_persist")
    with anyio.fail_after(30):
        async with (
            ScriptedBroker(script) as fake,
            PersistentClient(
                fake.host, fake.port, client_id="hostile", backoff=FAST, protocol=protocol,
                **options,
            ) as client,
        ):  # fmt: skip
            await until(lambda: fake.connections >= 2, 20, "a reconnect")
            await client.wait_connected(10)
    assert not fake.errors, fake.errors
    _no_errors_logged(caplog)
    return caplog.text


# --- oversized -----------------------------------------------------------------------------------


@BOTH
async def test_a_256_mb_remaining_length_is_refused_before_buffering(
    protocol: ProtocolVersion, caplog: pytest.LogCaptureFixture
) -> None:
    # The broker announces a 256 MB PUBLISH and streams 16 MB of it. A client that buffers
    # what the header announced (or what arrives, up to it) holds megabytes; one that checks
    # its maximum packet size hangs up after 5 bytes.
    script = hostile.flood_after_header(b"\x30" + hostile.HUGE_REMAINING_LENGTH, total=16 << 20)
    tracemalloc.start()
    try:
        log = await survive(script, caplog, protocol=protocol, max_packet_size=LIMIT)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"peak {peak} bytes while the broker streamed an oversized packet"
    assert "exceeds the maximum packet size 65536" in log


async def test_mqtt5_connect_announces_the_maximum_packet_size() -> None:
    seen: list[Connect] = []

    async def script(conn: FakeConnection, index: int) -> None:
        seen.append(await hostile.accept(conn))
        await hostile.behave(conn)

    with anyio.fail_after(20):
        async with (
            ScriptedBroker(script) as fake,
            PersistentClient(
                fake.host, fake.port, client_id="announce", protocol=V5, max_packet_size=LIMIT
            ) as client,
        ):
            await client.wait_connected(10)
    assert seen[0].properties.maximum_packet_size == LIMIT


async def test_a_packet_at_the_limit_still_arrives(caplog: pytest.LogCaptureFixture) -> None:
    topic = "big/t"
    payload = b"x" * (LIMIT - 1 - 3 - 2 - len(topic))  # first byte, 3 length bytes, topic
    assert len(encode(Publish(topic, payload), V311)) == LIMIT

    async def script(conn: FakeConnection, index: int) -> None:
        await hostile.accept(conn)
        await conn.send(Publish(topic, payload))
        await hostile.behave(conn)

    with anyio.fail_after(20):
        async with (
            ScriptedBroker(script) as fake,
            PersistentClient(
                fake.host, fake.port, client_id="at-limit", protocol=V311, max_packet_size=LIMIT
            ) as client,
        ):
            async for message in client.messages:
                assert message.payload == payload
                break
    assert fake.connections == 1


# --- malformed -----------------------------------------------------------------------------------


#: name -> (bytes after CONNACK, what the client must say when it drops the connection)
MALFORMED_V311 = {
    "reserved type 0": (b"\x00\x00", "reserved packet type 0"),
    "reserved type 15": (b"\xf0\x00", "reserved packet type 15"),
    "PUBACK with flags": (b"\x41\x02\x00\x01", "PUBACK with fixed-header flags"),
    "PUBLISH with QoS 3": (b"\x36\x05\x00\x01t\x00\x01", "PUBLISH with QoS 3"),
    "PUBREL without its flags": (b"\x60\x02\x00\x01", "PUBREL with fixed-header flags"),
    "SUBACK with flags": (b"\x91\x03\x00\x01\x00", "SUBACK with fixed-header flags"),
    "remaining length over 4 bytes": (b"\x30\xff\xff\xff\xff\x01", "more than 4 bytes"),
    "PINGRESP with a body": (b"\xd0\x01\x00", "PINGRESP with remaining length 1"),
    "packet id 0": (b"\x40\x02\x00\x00", "packet identifier 0"),
    "topic length past the end": (b"\x30\x04\x00\x09ab", "runs 7 bytes past the packet end"),
    "topic not UTF-8": (b"\x30\x04\x00\x02\xff\xfe", "invalid UTF-8"),
}


MALFORMED_V5 = {
    "property length past the end": (b"\x30\x06\x00\x01t\x09\x26\x00", "property length 9"),
    "property flood: Topic Alias twice": (
        b"\x30\x0b\x00\x01t\x06\x23\x00\x01\x23\x00\x01\x00",
        "Topic Alias appears more than once",
    ),
    "unknown property": (b"\x30\x06\x00\x01t\x02\x7f\x00", "unknown property identifier"),
    "AUTH with a bad reason code": (b"\xf0\x02\x55\x00", "AUTH with reason code 0x55"),
    "reason code not defined for PUBACK": (b"\x40\x03\x00\x01\x01", "PUBACK with reason code"),
}


MALFORMED = [
    *(pytest.param(V311, *case, id=f"3.1.1: {name}") for name, case in MALFORMED_V311.items()),
    *(pytest.param(V5, *case, id=f"5: {name}") for name, case in MALFORMED_V5.items()),
]


@pytest.mark.parametrize(("protocol", "data", "why"), MALFORMED)
async def test_malformed_packets_end_the_connection_and_the_client_reconnects(
    protocol: ProtocolVersion, data: bytes, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    log = await survive(hostile.hostile(data), caplog, protocol=protocol)
    assert why in log.split("lost: ", 1)[1]


async def test_a_protocol_error_while_the_flusher_waits_to_write_does_not_wedge_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # MQTT 5 tells the broker why it hangs up on a protocol error (a DISCONNECT with a reason
    # code). That write must not race the flusher's: here the broker stops reading, so the
    # flusher waits in send() for the socket to drain when the malformed packet arrives. A
    # second writer on the stream took the flusher's wake-up and left it waiting forever: no
    # pass ran again, not even on the next connection.
    caplog.set_level(logging.DEBUG, logger="mqtt_persist")
    flooded = anyio.Event()

    async def script(conn: FakeConnection, index: int) -> None:
        await hostile.accept(conn)
        if index:
            await hostile.behave(conn)
            return
        await flooded.wait()  # reading nothing meanwhile: the client's socket buffer fills
        await conn.send_raw(b"\x30\x06\x00\x01t\x02\x7f\x00")  # an unknown property
        await anyio.sleep(1.5)  # longer than the client waits for its goodbye to be written
        await hostile.until_client_leaves(conn)

    with anyio.fail_after(30):
        async with (
            ScriptedBroker(script) as fake,
            PersistentClient(
                fake.host, fake.port, client_id="wedge", backoff=FAST, protocol=V5
            ) as client,
        ):  # fmt: skip
            await client.wait_connected(10)
            for _ in range(64):  # 16 MB at QoS 0: far more than the socket buffers hold
                await client.publish("bulk", b"x" * (256 << 10))
            await anyio.sleep(0.5)  # the flusher is now waiting for the socket
            flooded.set()
            await until(lambda: fake.connections >= 2, 20, "a reconnect")
            with anyio.fail_after(10):
                delivery = await client.publish("after", b"1", qos=1)
                await delivery
    assert not fake.errors, fake.errors
    _no_errors_logged(caplog)
    assert "unknown property identifier" in caplog.text


async def test_the_keepalive_ends_a_connection_whose_broker_stopped_reading_under_a_send(
    transport: Route, caplog: pytest.LogCaptureFixture
) -> None:
    # The keepalive task closes the stream under the flusher's send that waits for the socket
    # to drain (over WebSockets, after its close frame waited for that send): the send must
    # wake and fail, and the client connect again; a send left waiting would stop every pass.
    caplog.set_level(logging.DEBUG, logger="mqtt_persist")

    async def script(conn: FakeConnection, index: int) -> None:
        await hostile.accept(conn)
        if index:
            await hostile.behave(conn)
            return
        await anyio.sleep(30)  # reading nothing: the client's socket buffer fills

    with anyio.fail_after(20):
        async with (
            ScriptedBroker(script) as fake,
            PersistentClient(
                **transport.client_kwargs(fake), client_id="stalled", backoff=FAST, keepalive=1
            ) as client,
        ):  # fmt: skip
            await client.wait_connected(10)
            for _ in range(64):  # 16 MB at QoS 0: far more than the socket buffers hold
                await client.publish("bulk", b"x" * (256 << 10))
            await until(lambda: fake.connections >= 2, 10, "a reconnect")
            with anyio.fail_after(10):
                delivery = await client.publish("after", b"1", qos=1)
                await delivery
    assert not fake.errors, fake.errors
    _no_errors_logged(caplog)
    assert "no answer from the broker" in caplog.text


async def test_a_flood_of_user_properties_within_the_limit_is_decoded_in_bounded_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # 12,000 user properties in one 60 KB PUBLISH: legal, so delivered.
    pair = b"\x26\x00\x01k\x00\x00"  # User Property ("k", "")
    props = pair * 12_000
    body = b"\x00\x03f/t" + _vbi(len(props)) + props + b"x"
    data = b"\x30" + _vbi(len(body)) + body

    async def script(conn: FakeConnection, index: int) -> None:
        await hostile.accept(conn)
        await conn.send_raw(data)
        await hostile.behave(conn)

    with anyio.fail_after(20):
        async with (
            ScriptedBroker(script) as fake,
            PersistentClient(fake.host, fake.port, client_id="flood", protocol=V5) as client,
        ):
            async for message in client.messages:
                assert len(message.properties.user_properties) == 12_000
                break
    _no_errors_logged(caplog)


def _vbi(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


@BOTH
async def test_a_truncated_frame_then_close_is_a_lost_connection(
    protocol: ProtocolVersion, caplog: pytest.LogCaptureFixture
) -> None:
    log = await survive(
        hostile.hostile(b"\x30\x20\x00\x05ab", then_close=True), caplog, protocol=protocol
    )
    assert "the broker closed the connection" in log


async def test_a_truncated_frame_then_silence_ends_by_keepalive(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = await survive(hostile.hostile(b"\x30\x20\x00\x05ab"), caplog, keepalive=1)
    assert "lost: no answer from the broker" in log


# --- out of order --------------------------------------------------------------------------------


@BOTH
async def test_connack_twice_is_a_protocol_error(
    protocol: ProtocolVersion, caplog: pytest.LogCaptureFixture
) -> None:
    log = await survive(hostile.hostile(ConnAck(False, 0)), caplog, protocol=protocol)
    assert "lost: a broker must not send CONNACK" in log


async def test_connect_from_the_broker_is_a_protocol_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = await survive(hostile.hostile(Connect(client_id="evil")), caplog)
    assert "lost: a broker must not send CONNECT" in log


@BOTH
async def test_suback_and_pubrel_for_unknown_ids_and_an_unsubscribed_topic_are_survived(
    protocol: ProtocolVersion, caplog: pytest.LogCaptureFixture
) -> None:
    # None of these breaks the protocol: a broker may finish a flow we already closed, and may
    # deliver on a subscription from an earlier session. The connection stays up; PUBREL is
    # answered with PUBCOMP; nothing is delivered twice and nothing crashes.
    caplog.set_level(logging.DEBUG, logger="mqtt_persist")
    answers: list[object] = []

    async def script(conn: FakeConnection, index: int) -> None:
        await hostile.accept(conn)
        await conn.send(SubAck(4242, [1]), PubRel(777), Publish("never/subscribed", b"hi"))
        answers.append(await conn.expect(PubComp))
        await hostile.behave(conn)

    store = MemoryStore()
    with anyio.fail_after(20):
        async with (
            ScriptedBroker(script) as fake,
            PersistentClient(
                fake.host, fake.port, client_id="odd", store=store, protocol=protocol
            ) as client,
        ):
            async for message in client.messages:
                assert message.topic == "never/subscribed"
                break
            await until(lambda: bool(answers), 10, "PUBCOMP for the unknown PUBREL")
            assert client.is_connected
    assert answers == [PubComp(777)]
    assert fake.connections == 1 and not fake.errors
    assert "SUBACK for packet ID 4242, which no SUBSCRIBE" in caplog.text
    _no_errors_logged(caplog)


# --- CONNECT never answered ----------------------------------------------------------------------


async def test_a_broker_that_never_answers_connect_times_out_and_is_retried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="mqtt_persist")
    with anyio.fail_after(30):
        async with (
            ScriptedBroker(hostile.silent()) as fake,
            PersistentClient(
                fake.host, fake.port, client_id="silent", backoff=FAST, connect_timeout=0.5,
                protocol=V311,
            ) as client,
        ):  # fmt: skip
            await until(lambda: fake.connections >= 2, 20, "a second attempt")
            assert not client.is_connected
    assert "no CONNACK within 0.5s" in caplog.text
    _no_errors_logged(caplog)


async def test_without_reconnect_an_unanswered_connect_is_a_typed_error() -> None:
    with anyio.fail_after(30):
        async with ScriptedBroker(hostile.silent()) as fake:
            client = PersistentClient(
                fake.host, fake.port, client_id="silent1", reconnect=False, connect_timeout=0.5
            )
            with pytest.raises(ConnectionLost, match=r"no CONNACK within 0\.5s"):
                async with client:
                    pass


# --- fuzzing -------------------------------------------------------------------------------------


@BOTH
async def test_fuzzed_server_streams_end_in_a_typed_error_or_nothing(
    protocol: ProtocolVersion, caplog: pytest.LogCaptureFixture
) -> None:
    # One client, one mutated stream per connection; every connection must end the ordinary
    # way (a typed error logged, or the broker closing) and the client must keep reconnecting.
    cases = hostile.fuzz_cases(protocol, seed=int(protocol) * 1000 + 10, count=40)
    caplog.set_level(logging.DEBUG, logger="mqtt_persist")
    with anyio.fail_after(120):
        async with (
            ScriptedBroker(hostile.fuzzing(cases)) as fake,
            PersistentClient(
                fake.host, fake.port, client_id="fuzz", backoff=FAST, protocol=protocol,
                max_packet_size=LIMIT, connect_timeout=2,
            ) as client,
        ):  # fmt: skip
            await until(lambda: fake.connections > len(cases), 100, "every fuzz case")
            await client.wait_connected(10)
    assert not fake.errors, fake.errors
    _no_errors_logged(caplog)


# --- fuzzing the sans-IO core: many more cases than sockets allow ---------------------------------


def _connected_session(protocol: int) -> Session:
    """A session with a subscription, QoS 1 and 2 messages in flight, after CONNACK."""
    session = Session(SessionConfig(client_id="fuzz", protocol_version=protocol))
    session.subscribe([("fuzz/#", 2)])
    for qos in (1, 2, 1, 2):
        session.publish("out/t", b"m", qos, False)
    session.connect(0.0, protocol)
    session.take(0.0)
    session.receive(ConnAck(False, 0))
    session.take(0.0)
    return session


def _drive(session: Session, decoder: Decoder, data: bytes, cut: int) -> None:
    """Feed ``data`` in two reads into decoder and session, as the connection's reader does."""
    for chunk in (data[:cut], data[cut:]):
        for packet in decoder.feed(chunk):
            session.receive(packet)
            if session.connection_state is ConnectionState.DISCONNECTED:
                return
        session.take(1.0)
        session.tick(2.0)


@BOTH
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rng=st.randoms(use_true_random=False), cut=st.integers(0, 64))
def test_mutated_server_streams_raise_only_protocol_errors(
    protocol: ProtocolVersion, rng: random.Random, cut: int
) -> None:
    data = hostile.mutate(hostile.valid_server_stream(protocol, rng), rng)
    session = _connected_session(protocol)
    # Typed errors are allowed: the connection reader ends the connection over them.
    with contextlib.suppress(ProtocolError, ServerDisconnected):
        _drive(session, Decoder(max_packet_size=LIMIT, protocol_version=protocol), data, cut)


@BOTH
@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200), cut=st.integers(0, 200))
def test_random_bytes_after_connack_raise_only_protocol_errors(
    protocol: ProtocolVersion, data: bytes, cut: int
) -> None:
    session = _connected_session(protocol)
    with contextlib.suppress(ProtocolError, ServerDisconnected):
        _drive(session, Decoder(max_packet_size=LIMIT, protocol_version=protocol), data, cut)
