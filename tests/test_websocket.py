"""MQTT over WebSockets: the upgrade, its failures, and the framing.

The end-to-end and crash tests run over WebSockets as well (the ``transport`` fixture); here is
what only WebSockets have. The broker side is a WebSocket-to-TCP bridge of the tests' own in
front of mosquitto (tests/support/ws_bridge.py); the framing tests feed
:class:`~mqtt_persist.websocket.WebSocketStream` frames made by wsproto's server side, cut into
reads at chosen points.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import sys
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
from anyio.abc import ByteStream
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState as WsState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    Request,
    TextMessage,
)

from mqtt_persist import (
    Backoff,
    ConnectionLost,
    DeliveryOutcome,
    FileStore,
    InvalidInput,
    PersistentClient,
    ProtocolError,
    TLSError,
    WebSocketHandshakeFailed,
)
from mqtt_persist.cli.broker import BrokerAddress, parse_host
from mqtt_persist.protocol.codec import Decoder, encode
from mqtt_persist.protocol.packets import MQTT_3_1_1, PingReq, Publish
from mqtt_persist.transport import TcpStream, open_stream
from mqtt_persist.websocket import (
    WebSocketSettings,
    WebSocketStream,
    WebSocketUnavailable,
    websocket_handshake,
)
from tests.support.broker import MosquittoBroker, free_port
from tests.support.certs import make_pki
from tests.support.cli import run_cli
from tests.support.observer import PahoObserver, paho_publish_async
from tests.support.waiting import until
from tests.support.ws_bridge import ThreadedBridge, WsBridge, basic_auth

FAST = Backoff(initial=0.05, maximum=0.3, minimum=0.01)


def ws_client(bridge: WsBridge, client_id: str, **kwargs: object) -> PersistentClient:
    kwargs.setdefault("backoff", FAST)
    return PersistentClient(
        bridge.host, bridge.port, client_id=client_id, transport="websockets", **kwargs
    )  # type: ignore[arg-type]


# --- the upgrade, against the bridge and mosquitto ----------------------------------------------


@pytest.mark.broker
@pytest.mark.parametrize(("status", "path"), [(403, "/mqtt"), (404, "/elsewhere")])
async def test_refused_upgrade_is_a_typed_fatal_error_naming_url_and_status(
    broker: MosquittoBroker, status: int, path: str
) -> None:
    async with WsBridge(broker.host, broker.port) as bridge:
        if status == 403:
            bridge.refuse_status = 403
        async with ws_client(bridge, "ws-refused", websocket_path=path) as client:
            with pytest.raises(WebSocketHandshakeFailed) as info:
                await client.wait_connected(10)
            # The error stops the client: the supervisor has returned before it surfaced, so
            # there was one attempt and there will be no other (no retry storm).
            assert len(bridge.requests) == 1
        error = info.value
        assert error.status_code == status and error.fatal
        assert error.url == f"ws://127.0.0.1:{bridge.port}{path}"
        assert f"ws://127.0.0.1:{bridge.port}{path}" in str(error)
        assert f"HTTP {status}" in str(error)
        assert len(bridge.requests) == 1


@pytest.mark.broker
async def test_a_proxy_answering_503_is_retried_with_backoff_until_it_accepts(
    broker: MosquittoBroker,
) -> None:
    async with WsBridge(broker.host, broker.port) as bridge:
        bridge.refuse_status = 503
        async with ws_client(bridge, "ws-503") as client:
            await until(lambda: len(bridge.requests) >= 3, 10, "three refused attempts")
            assert not client.is_connected
            bridge.refuse_status = None
            await client.wait_connected(10)
            delivery = await client.publish("ws/503", b"in the end", qos=1)
            with anyio.fail_after(10):
                assert await delivery is DeliveryOutcome.ACKNOWLEDGED


@pytest.mark.broker
@pytest.mark.parametrize("chosen", ["mqttv3.1", ""])
async def test_a_server_that_picks_another_subprotocol_or_none_is_refused(
    broker: MosquittoBroker, chosen: str
) -> None:
    async with WsBridge(broker.host, broker.port) as bridge:
        bridge.answer_subprotocol = chosen
        async with ws_client(bridge, "ws-subprotocol") as client:
            with pytest.raises(WebSocketHandshakeFailed) as info:
                await client.wait_connected(10)
    assert info.value.status_code is None and info.value.fatal
    assert (chosen or "without the subprotocol 'mqtt'") in str(info.value)
    assert len(bridge.requests) == 1


@pytest.mark.broker
async def test_path_headers_and_subprotocol_reach_the_server_and_exit_closes_cleanly(
    broker: MosquittoBroker,
) -> None:
    auth = basic_auth("gateway", "s3cret")
    async with WsBridge(broker.host, broker.port, path="/broker/mqtt") as bridge:
        async with ws_client(
            bridge,
            "ws-headers",
            websocket_path="/broker/mqtt",
            websocket_headers={"Authorization": auth, "X-Tenant": "north"},
        ) as client:
            await client.wait_connected(10)
        # Leaving sent DISCONNECT, then a close frame with 1000 (normal closure).
        await until(lambda: bool(bridge.close_codes), 5, "the client's close frame")
    (request,) = bridge.requests
    assert request.path == "/broker/mqtt"
    assert request.subprotocols == ["mqtt"]
    assert request.headers["authorization"] == auth
    assert request.headers["x-tenant"] == "north"
    assert request.headers["host"] == f"127.0.0.1:{bridge.port}"
    assert bridge.close_codes == [1000]


@pytest.mark.broker
async def test_packets_split_over_frames_and_frames_split_over_reads_arrive_whole(
    broker: MosquittoBroker,
) -> None:
    async with WsBridge(broker.host, broker.port) as bridge:
        # Every frame carries at most 7 bytes (so each PUBLISH spans several frames) and
        # reaches the client 3 bytes at a time (reads end inside frame headers and payloads).
        bridge.max_frame, bridge.trickle = 7, 3
        payloads = [f"message-{i}-".encode() * (1 + i) for i in range(10)]
        async with ws_client(bridge, "ws-split") as client:
            await (await client.subscribe("ws/split", qos=2))
            await paho_publish_async(broker.host, broker.port, "ws/split", payloads, qos=2)
            got = []
            with anyio.fail_after(20):
                async for message in client.messages:
                    got.append(message.payload)
                    if len(got) == len(payloads):
                        break
    assert sorted(got) == sorted(payloads)


@pytest.mark.broker
async def test_cuts_inside_frames_lose_no_inbound_message_and_repeat_no_qos2(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    """The e2e tests cut the network under a publishing client (over WebSockets too); here
    the cuts land while the client is half way through a frame and a packet it receives, and
    the half must be thrown away with the connection, never glued to the next one's bytes."""
    total = 120
    payloads = [f"in-{i}".encode() for i in range(total)]
    async with WsBridge(broker.host, broker.port) as bridge:
        # Frames of 7 bytes, written 3 bytes at a time: a cut lands inside a frame.
        bridge.max_frame, bridge.trickle = 7, 3
        async with ws_client(bridge, "ws-cut-in", store=FileStore(tmp_path / "s")) as client:
            await (await client.subscribe("wscut/#", qos=2))
            await paho_publish_async(broker.host, broker.port, "wscut/in", payloads, qos=2)
            got: list[bytes] = []
            with anyio.fail_after(60):
                async for message in client.messages:
                    got.append(message.payload)
                    if len(got) % 25 == 10:
                        bridge.cut()
                    if set(got) >= set(payloads):
                        break
            assert client.stats.connections >= 4
    assert Counter(got).most_common(1)[0][1] == 1, "a QoS 2 message was delivered twice"


@pytest.mark.broker
async def test_reconnect_false_behind_a_proxy_whose_broker_is_down_raises_its_502(
    broker: MosquittoBroker,
) -> None:
    broker.stop()
    async with WsBridge(broker.host, broker.port) as bridge:
        with pytest.raises(WebSocketHandshakeFailed) as info:
            async with ws_client(bridge, "ws-once", reconnect=False, connect_timeout=5):
                pass
    assert info.value.status_code == 502 and not info.value.fatal


# --- wss:// ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pki = make_pki(tmp_path_factory.mktemp("wss"))
    return {name: pki / name for name in ("ca.crt", "server.crt", "server.key")}


def server_tls(tls_files: dict[str, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls_files["server.crt"], tls_files["server.key"])
    return context


@pytest.mark.broker
async def test_wss_with_a_verified_certificate_carries_mqtt(
    broker: MosquittoBroker, tls_files: dict[str, Path]
) -> None:
    client_tls = ssl.create_default_context(cafile=str(tls_files["ca.crt"]))
    async with WsBridge(broker.host, broker.port, tls=server_tls(tls_files)) as bridge:
        async with ws_client(bridge, "wss-1", tls=client_tls) as client:
            await (await client.subscribe("wss/t", qos=1))
            delivery = await client.publish("wss/t", b"over tls", qos=1)
            with anyio.fail_after(10):
                assert await delivery is DeliveryOutcome.ACKNOWLEDGED
                async for message in client.messages:
                    assert message.payload == b"over tls"
                    break
        await until(lambda: bool(bridge.close_codes), 5, "the client's close frame")
    assert bridge.close_codes == [1000]
    assert len(bridge.requests) == 1


@pytest.mark.broker
async def test_wss_refuses_an_untrusted_certificate_and_names_the_wss_url(
    broker: MosquittoBroker, tls_files: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mqtt_persist")
    async with WsBridge(broker.host, broker.port, tls=server_tls(tls_files)) as bridge:
        async with ws_client(bridge, "wss-2", tls=ssl.create_default_context()) as client:
            # A certificate that does not verify stops the client (mqtt_persist.tls).
            with pytest.raises(TLSError) as refused:
                await client.wait_connected(10)
            assert not client.is_connected
        assert "unable to get local issuer certificate" in str(refused.value)
        assert bridge.requests == []  # nothing was sent before the certificate was checked
        assert f"wss://127.0.0.1:{bridge.port}/mqtt" in caplog.text
        bridge.refuse_status = 403
        client_tls = ssl.create_default_context(cafile=str(tls_files["ca.crt"]))
        async with ws_client(bridge, "wss-3", tls=client_tls) as client:
            with pytest.raises(WebSocketHandshakeFailed) as info:
                await client.wait_connected(10)
    assert info.value.url == f"wss://127.0.0.1:{bridge.port}/mqtt"


async def test_a_server_that_hangs_up_during_the_upgrade_is_a_named_connection_loss() -> None:
    async def hang_up(stream: ByteStream) -> None:
        await stream.receive()
        await stream.aclose()

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tasks:
        tasks.start_soon(listener.serve, hang_up)
        with pytest.raises(ConnectionLost, match=f"ws://127.0.0.1:{port}/mqtt closed"):
            async with PersistentClient(
                "127.0.0.1", port, client_id="hangup", transport="websockets", reconnect=False
            ):
                pass
        tasks.cancel_scope.cancel()


async def test_nothing_listening_names_the_ws_url() -> None:
    port = free_port()
    with pytest.raises(ConnectionLost, match=f"could not connect to ws://127.0.0.1:{port}/m"):
        async with PersistentClient(
            "127.0.0.1", port, client_id="nobody", transport="websockets",
            websocket_path="/m", reconnect=False, connect_timeout=2,
        ):  # fmt: skip
            pass


def test_without_wsproto_the_transport_is_refused_with_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "wsproto", None)
    with pytest.raises(WebSocketUnavailable, match=r"mqtt-persist\[websockets\]"):
        PersistentClient("127.0.0.1", client_id="c", transport="websockets")
    PersistentClient("127.0.0.1", client_id="c")  # TCP needs nothing more


# --- settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"transport": "udp"},
        {"websocket_path": "/mqtt2"},  # without transport="websockets"
        {"websocket_headers": {"X-Token": "t"}},
        {"transport": "websockets", "websocket_path": "mqtt"},
        {"transport": "websockets", "websocket_path": "/a b"},
        {"transport": "websockets", "websocket_headers": {"Bad Name": "x"}},
        {"transport": "websockets", "websocket_headers": {"X-Token": "a\r\nInjected: 1"}},
    ],
)
def test_bad_transport_settings_are_refused_at_construction(kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidInput):
        PersistentClient("127.0.0.1", client_id="c", **kwargs)  # type: ignore[arg-type]


def test_header_values_stay_out_of_reprs() -> None:
    client = PersistentClient(
        "127.0.0.1", client_id="c", transport="websockets",
        websocket_headers={"Authorization": "Bearer tok-4711"},
    )  # fmt: skip
    options = client._options
    assert "tok-4711" not in repr(options) + repr(options.websocket)
    assert options.websocket is not None
    assert options.websocket.headers == (("Authorization", "Bearer tok-4711"),)


# --- the framing, byte by byte -----------------------------------------------------------------


class ScriptedStream(ByteStream):
    """Hands out the chunks fed to it as reads and records writes; wsproto's server side
    reads the writes."""

    def __init__(self) -> None:
        self.server = WSConnection(ConnectionType.SERVER)
        self.reads: list[bytes] = []
        self.written: list[bytes] = []
        #: After the fed chunks: the connection is closed.
        self.eof = False
        self._fed = anyio.Event()

    def feed(self, *chunks: bytes) -> None:
        self.reads.extend(chunks)
        self._fed.set()

    async def receive(self, max_bytes: int = 65536) -> bytes:
        while not self.reads:
            if self.eof:
                raise anyio.EndOfStream
            await self._fed.wait()
            self._fed = anyio.Event()
        return self.reads.pop(0)

    async def send(self, item: bytes) -> None:
        self.written.append(item)
        self.server.receive_data(item)

    async def send_eof(self) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        pass

    def server_events(self) -> list[object]:
        return list(self.server.events())


async def open_scripted(
    answer: bytes | None = None, *, with_accept: tuple[object, ...] = ()
) -> tuple[ScriptedStream, WebSocketStream]:
    """A WebSocketStream over a ScriptedStream, after a handshake the server side accepted
    (or answered with ``answer``, raw HTTP); ``with_accept``: events whose frames come in the
    same read as the accept."""
    raw = ScriptedStream()
    result: list[WebSocketStream | Exception] = []

    async def handshake() -> None:
        settings = WebSocketSettings()
        try:
            result.append(await websocket_handshake(raw, "broker.example", 443, settings, tls=True))
        except Exception as exc:
            result.append(exc)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(handshake)
            while not raw.written:
                await anyio.lowlevel.checkpoint()
            (request,) = [e for e in raw.server_events() if isinstance(e, Request)]
            assert request.host == "broker.example"  # 443 is wss's own port: no ":443"
            assert request.subprotocols == ["mqtt"]
            accept = raw.server.send(AcceptConnection(subprotocol="mqtt"))
            raw.feed(answer or accept + frames(raw, *with_accept))
    if isinstance(result[0], Exception):
        raise result[0]
    return raw, result[0]


def frames(raw: ScriptedStream, *events: object) -> bytes:
    return b"".join(raw.server.send(event) for event in events)  # type: ignore[arg-type]


async def read_packets(stream: WebSocketStream, count: int) -> list[object]:
    decoder = Decoder(protocol_version=MQTT_3_1_1)
    packets: list[object] = []
    while len(packets) < count:
        packets.extend(decoder.feed(await stream.receive()))
    return packets


async def test_several_packets_in_one_frame_and_one_packet_over_frames_and_reads() -> None:
    raw, stream = await open_scripted()
    first = encode(Publish("a/b", b"one", qos=0), MQTT_3_1_1)
    second = encode(Publish("a/b", b"two" * 50, qos=0), MQTT_3_1_1)
    third = encode(Publish("c", b"three" * 20, qos=0), MQTT_3_1_1)
    data = frames(
        raw,
        BytesMessage(first + second),  # two packets, one frame
        BytesMessage(third[:5], message_finished=False),  # one packet over three frames,
        BytesMessage(third[5:9], message_finished=False),  # sent as one fragmented message
        BytesMessage(third[9:]),
    )
    raw.feed(*(data[i : i + 2] for i in range(0, len(data), 2)))  # reads of 2 bytes
    packets = await read_packets(stream, 3)
    assert [p.payload for p in packets] == [b"one", b"two" * 50, b"three" * 20]  # type: ignore[attr-defined]


async def test_pings_are_answered_and_writes_are_binary_frames() -> None:
    raw, stream = await open_scripted()
    raw.server_events()
    publish = encode(Publish("t", b"x", qos=0), MQTT_3_1_1)
    raw.feed(frames(raw, Ping(b"are you there"), BytesMessage(publish)))
    await read_packets(stream, 1)
    assert [e for e in raw.server_events() if isinstance(e, Pong)] == [Pong(b"are you there")]
    await stream.send(encode(PingReq(), MQTT_3_1_1) * 2)
    (message,) = raw.server_events()
    assert isinstance(message, BytesMessage)
    assert message.data == encode(PingReq(), MQTT_3_1_1) * 2


async def test_a_text_frame_is_a_protocol_error() -> None:
    raw, stream = await open_scripted()
    raw.feed(frames(raw, TextMessage("hello")))
    with pytest.raises(ProtocolError, match="text frame"):
        await stream.receive()


async def test_the_server_closing_ends_the_stream_after_answering_its_close() -> None:
    raw, stream = await open_scripted()
    raw.server_events()
    publish = encode(Publish("t", b"last", qos=0), MQTT_3_1_1)
    raw.feed(frames(raw, BytesMessage(publish), CloseConnection(code=1001)))
    assert (await read_packets(stream, 1))[0].payload == b"last"  # type: ignore[attr-defined]
    with pytest.raises(anyio.EndOfStream):
        await stream.receive()
    assert [e.code for e in raw.server_events() if isinstance(e, CloseConnection)] == [1001]
    with pytest.raises(anyio.ClosedResourceError):
        await stream.send(publish)


async def test_frames_in_the_same_read_as_the_accept_are_not_left_behind() -> None:
    publish = encode(Publish("t", b"early", qos=0), MQTT_3_1_1)
    raw, stream = await open_scripted(with_accept=(Ping(b"hi"), BytesMessage(publish)))
    with anyio.fail_after(5):
        assert (await read_packets(stream, 1))[0].payload == b"early"  # type: ignore[attr-defined]
    assert [e for e in raw.server_events() if isinstance(e, Pong)] == [Pong(b"hi")]


async def test_a_refusal_whose_body_runs_until_the_connection_closes() -> None:
    raw = ScriptedStream()
    raw.feed(b"HTTP/1.1 403 Forbidden\r\nConnection: close\r\n\r\nno entry")
    raw.eof = True
    with pytest.raises(WebSocketHandshakeFailed) as info:
        await websocket_handshake(raw, "b", 8080, WebSocketSettings(), tls=False)
    assert (info.value.status_code, info.value.reason) == (403, "no entry")


async def test_a_refusal_with_a_body_names_status_and_body() -> None:
    answer = b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 13\r\n\r\nbad   token\r\n"
    with pytest.raises(WebSocketHandshakeFailed) as info:
        await open_scripted(answer)
    assert info.value.status_code == 401 and info.value.fatal
    assert str(info.value) == (
        "WebSocket handshake with wss://broker.example:443/mqtt failed: HTTP 401: bad token"
    )


# --- one stream, a reader and a writer: against a real socket ---------------------------------


_Accepted = tuple[WSConnection, asyncio.StreamReader, asyncio.StreamWriter]


class _StallingServer:
    """A WebSocket server on 127.0.0.1 (wsproto's server side on a real socket) whose
    connection the test drives by hand; it reads only when told to, so the client's writes
    back up as behind a server that stopped reading."""

    def __init__(self) -> None:
        self.accepted: asyncio.Queue[_Accepted] = asyncio.Queue()
        self.port = 0

    async def __aenter__(self) -> _StallingServer:
        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            ws = WSConnection(ConnectionType.SERVER)
            while not any(isinstance(e, Request) for e in ws.events()):
                ws.receive_data(await reader.read(65536))
            writer.write(ws.send(AcceptConnection(subprotocol="mqtt")))
            await self.accepted.put((ws, reader, writer))

        self._server = await asyncio.start_server(accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._server.close()
        await self._server.wait_closed()


async def _stalled_client(server: _StallingServer) -> tuple[WebSocketStream, *_Accepted]:
    stream = await open_stream(
        "127.0.0.1", server.port, tls=None, timeout=5, websocket=WebSocketSettings()
    )
    assert isinstance(stream, WebSocketStream)
    ws, reader, writer = await asyncio.wait_for(server.accepted.get(), 5)
    return stream, ws, reader, writer


async def _events_until(
    ws: WSConnection, reader: asyncio.StreamReader, done: Callable[[list[object]], bool]
) -> list[object]:
    events: list[object] = []
    with anyio.fail_after(10):
        while not done(events):
            data = await reader.read(1 << 20)
            assert data, "the client closed the connection"
            ws.receive_data(data)
            events.extend(ws.events())
    return events


_BLOCK = b"z" * (1 << 20)
_BLOCKS = 16  # far more than the socket buffers hold: the send waits for the server to read


async def _until_the_send_waits(stream: WebSocketStream) -> None:
    tcp = stream._stream
    assert isinstance(tcp, TcpStream)
    # Paused: the kernel's buffers are full and a send is under way (it holds the lock).
    await until(lambda: tcp._protocol.writing_paused, 5, "the send to wait for the server")
    assert stream._send_lock.locked()


async def _send_blocks(stream: WebSocketStream, *, until_closed: bool = False) -> None:
    try:
        for _ in range(_BLOCKS):
            await stream.send(_BLOCK)
    except (anyio.ClosedResourceError, anyio.BrokenResourceError):
        if not until_closed:
            raise


async def test_a_ping_while_a_send_waits_does_not_stop_the_reading() -> None:
    # The pong used to wait for the send under way, and the reader with it: a server that
    # waits for us to read before it reads again (a relay with backpressure both ways) then
    # waited for ever. The pong goes out right after that send instead.
    async with _StallingServer() as server, anyio.create_task_group() as tasks:
        stream, ws, reader, writer = await _stalled_client(server)
        tasks.start_soon(_send_blocks, stream)
        await _until_the_send_waits(stream)
        writer.write(ws.send(Ping(b"there?")) + ws.send(BytesMessage(b"mqtt bytes")))
        with anyio.fail_after(3):
            assert await stream.receive() == b"mqtt bytes"
        events = await _events_until(
            ws,
            reader,
            lambda e: (
                sum(len(x.data) for x in e if isinstance(x, BytesMessage)) == len(_BLOCK) * _BLOCKS
            ),
        )
        assert b"".join(e.data for e in events if isinstance(e, BytesMessage)) == _BLOCK * _BLOCKS
        assert [e for e in events if isinstance(e, Pong)] == [Pong(b"there?")]
        writer.close()
    await stream.aclose()


async def test_a_ping_after_a_send_gave_up_waiting_does_not_stop_the_reading() -> None:
    # No send is under way, but what a cancelled one wrote still fills the socket's buffers
    # (as does a send that ended with the kernel's buffer full). The reader used to write the
    # pong itself and wait for the server to read it, reading nothing meanwhile: a deadlock
    # with a server that waits for us to read first. The pong waits for the next writer.
    async with _StallingServer() as server:
        stream, ws, reader, writer = await _stalled_client(server)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(stream.send, _BLOCK * _BLOCKS)
            await _until_the_send_waits(stream)
            tasks.cancel_scope.cancel()
        assert not stream._send_lock.locked()
        writer.write(ws.send(Ping(b"there?")) + ws.send(BytesMessage(b"mqtt bytes")))
        with anyio.fail_after(3):
            assert await stream.receive() == b"mqtt bytes"
        writer.write(ws.send(Ping(b"again?")) + ws.send(BytesMessage(b"more")))
        with anyio.fail_after(3):
            assert await stream.receive() == b"more"
        # The server reads again: the cancelled send's frame, then with the next send the
        # answer to the last ping (RFC 6455 5.5.3: earlier ones need none).
        events = await _events_until(
            ws,
            reader,
            lambda e: (
                sum(len(x.data) for x in e if isinstance(x, BytesMessage)) == len(_BLOCK) * _BLOCKS
            ),
        )
        with anyio.fail_after(3):
            await stream.send(b"next")
        events += await _events_until(
            ws, reader, lambda e: any(isinstance(x, BytesMessage) for x in e)
        )
        assert [e for e in events if isinstance(e, Pong)] == [Pong(b"again?")]
        assert events[-1] == BytesMessage(b"next")
        writer.close()
    await stream.aclose()


async def test_over_tcp_the_reader_hands_its_pong_to_the_transport_without_waiting() -> None:
    async with _StallingServer() as server:
        stream, ws, reader, writer = await _stalled_client(server)
        writer.write(ws.send(Ping(b"there?")) + ws.send(BytesMessage(b"mqtt bytes")))
        with anyio.fail_after(3):
            assert await stream.receive() == b"mqtt bytes"
        # Written by the reader, with no send of ours to carry it.
        events = await _events_until(ws, reader, lambda e: bool(e))
        assert events == [Pong(b"there?")]
        writer.close()
    await stream.aclose()


async def test_the_servers_close_while_a_send_waits_ends_the_reading() -> None:
    async with _StallingServer() as server, anyio.create_task_group() as tasks:
        stream, ws, reader, writer = await _stalled_client(server)
        tasks.start_soon(partial(_send_blocks, stream, until_closed=True))
        await _until_the_send_waits(stream)
        writer.write(ws.send(CloseConnection(code=1001)))
        with anyio.fail_after(3), pytest.raises(anyio.EndOfStream):
            await stream.receive()
        # The supervisor closes the stream at once: the answer still goes out after the send
        # under way, once the server reads again.
        tasks.start_soon(stream.aclose)
        events = await _events_until(
            ws, reader, lambda e: any(isinstance(x, CloseConnection) for x in e)
        )
        assert isinstance(events[-1], CloseConnection)
        writer.close()


async def test_a_ping_after_our_close_frame_is_not_an_unexpected_error() -> None:
    # aclose() from another task (the keepalive giving up, say) marks the close frame sent
    # before it is written; a ping read meanwhile made receive() raise wsproto's
    # LocalProtocolError, which no caller expects (the supervisor let it end the client).
    async with _StallingServer() as server:
        stream, ws, _reader, writer = await _stalled_client(server)
        outcome: list[BaseException] = []

        async def read() -> None:
            try:
                await stream.receive()
            except Exception as exc:
                outcome.append(exc)

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(read)
                tasks.start_soon(partial(_send_blocks, stream, until_closed=True))
                await _until_the_send_waits(stream)  # and so will the close frame behind it
                tasks.start_soon(stream.aclose)
                await until(lambda: stream._ws.state is not WsState.OPEN, 3, "the close frame")
                writer.write(ws.send(Ping(b"still there?")))
                await until(lambda: bool(outcome), 4, "the reader to end")
                tasks.cancel_scope.cancel()
        # aclose() gave up on the close frame and closed the stream under the reader.
        assert isinstance(outcome[0], anyio.ClosedResourceError), outcome
        writer.close()


# --- the command line --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("broker.lan", BrokerAddress("broker.lan")),
        ("mqtt://b:1884", BrokerAddress("b", 1884)),
        ("mqtts://b", BrokerAddress("b", 8883, tls=True)),
        ("ws://b:8080", BrokerAddress("b", 8080, "websockets")),
        (
            "wss://b/gw/mqtt?tenant=n",
            BrokerAddress("b", 443, "websockets", True, "/gw/mqtt?tenant=n"),
        ),
        ("WS://[::1]:9001/m", BrokerAddress("::1", 9001, "websockets", False, "/m")),
    ],
)
def test_host_takes_a_broker_url(value: str, expected: BrokerAddress) -> None:
    assert parse_host(value) == expected


@pytest.mark.parametrize("value", ["http://b", "ws://", "mqtt://b/path", "ws://b:99999"])
def test_host_refuses_other_urls(value: str) -> None:
    with pytest.raises(InvalidInput):
        parse_host(value)


@pytest.mark.broker
def test_pub_over_a_ws_url_with_a_header_that_is_never_printed(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    token = "Bearer tok-98765-secret"
    with (
        PahoObserver(broker.host, broker.port, "cli/ws", qos=1) as observer,
        ThreadedBridge(broker.host, broker.port, path="/gw") as threaded,
    ):
        url = f"ws://127.0.0.1:{threaded.port}/gw"
        result = run_cli(
            "--debug", "pub", "--store", f"sqlite://{tmp_path / 'p.db'}", "-i", "cli-ws",
            "-t", "cli/ws", "-m", "framed", "--host", url, "--wait-ack",
            "--ws-header", f"Authorization: {token}", "--ws-header", "X-Tenant: north",
        )  # fmt: skip
        assert result.code == 0, result
        assert observer.wait_for(1)
        (request,) = threaded.bridge.requests
    assert observer.payloads() == [b"framed"]
    assert request.path == "/gw"
    assert (request.headers["authorization"], request.headers["x-tenant"]) == (token, "north")
    assert url in result.out
    assert "tok-98765" not in result.out + result.err
