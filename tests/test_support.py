"""The test infrastructure itself, against a real mosquitto, observed with paho."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.broker import BrokerFactory, BrokerStartError, MosquittoBroker, free_port
from tests.support.observer import Observed, PahoObserver, paho_publish, paho_publish_async
from tests.support.proxy import FaultProxy, ProxyFactory

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKER_CONF = REPO / "docker" / "mosquitto" / "mosquitto.conf"


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


async def async_wait_until(predicate: Callable[[], bool], limit: float = 5.0) -> bool:
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


# --- MosquittoBroker ---------------------------------------------------------------------


@pytest.mark.broker
def test_broker_start_stop_kill_restart_same_port(broker_factory: BrokerFactory) -> None:
    b = broker_factory()
    port, first_pid = b.port, b.pid
    assert b.running and first_pid is not None
    assert b.url == f"mqtt://127.0.0.1:{port}"
    assert port != 1883 and port_open(port)
    assert "set_tcp_nodelay true" in b.config_path.read_text()

    b.stop()
    assert not b.running and b.pid is None
    assert not process_exists(first_pid)
    assert not port_open(port)

    b.start()
    assert b.running and b.port == port and port_open(port)
    second_pid = b.pid
    assert second_pid is not None
    b.kill()
    assert not b.running and not process_exists(second_pid)
    assert not port_open(port)
    b.stop()  # stopping a stopped broker is a no-op

    b.start()
    b.restart()
    assert b.running and b.port == port and b.pid not in (first_pid, second_pid)
    b.restart(hard=True)
    assert b.running and b.port == port
    with PahoObserver(b.host, b.port, "alive") as obs:
        paho_publish(b.host, b.port, "alive", [b"yes"])
        assert obs.wait_for(1, timeout=5)
    log = b.log_text()
    assert log.count(f"Opening ipv4 listen socket on port {port}") == b.starts == 5
    assert "terminating" in log  # the SIGTERM stops were clean


@pytest.mark.broker
def test_broker_fixture_is_running_and_isolated(broker: MosquittoBroker, tmp_path: Path) -> None:
    assert broker.running and broker.workdir.is_relative_to(tmp_path)
    assert broker.config_path.exists() and broker.log_path.exists()
    assert "persistence false" in broker.config_path.read_text()


@pytest.mark.broker
def test_broker_start_failure_raises_with_log_tail(broker_factory: BrokerFactory) -> None:
    with pytest.raises(BrokerStartError, match="no_such_option"):
        broker_factory(extra_config="no_such_option 42")


@pytest.mark.broker
def test_broker_port_in_use_is_reported(broker_factory: BrokerFactory) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        b = broker_factory(port=port, start=False)
        with pytest.raises(BrokerStartError, match="exited"):
            b.start()
        assert not b.running


@pytest.mark.broker
def test_persistent_broker_keeps_queued_qos1_across_restart(
    persistent_broker: MosquittoBroker,
) -> None:
    b = persistent_broker
    client_id = f"offline-sub-{b.port}"
    with PahoObserver(b.host, b.port, "dev/1/cmd", qos=1, client_id=client_id, clean_session=False):
        pass  # subscribed, then gone offline: the session stays on the broker
    paho_publish(b.host, b.port, "dev/1/cmd", [b"reboot"], qos=1)

    b.restart()  # SIGTERM: mosquitto writes mosquitto.db on the way out

    assert (b.data_dir / "mosquitto.db").exists()
    with PahoObserver(
        b.host, b.port, "dev/1/cmd", qos=1, client_id=client_id, clean_session=False
    ) as obs:
        assert obs.session_present is True
        assert obs.wait_for(1, timeout=5), b.log_text()
        assert obs.messages[0] == Observed("dev/1/cmd", b"reboot", 1, False, False)


@pytest.mark.broker
def test_non_persistent_broker_forgets_sessions_on_restart(broker: MosquittoBroker) -> None:
    client_id = f"offline-sub-{broker.port}"
    with PahoObserver(
        broker.host, broker.port, "x", qos=1, client_id=client_id, clean_session=False
    ):
        pass
    paho_publish(broker.host, broker.port, "x", [b"lost"], qos=1)
    broker.restart()
    with PahoObserver(
        broker.host, broker.port, "x", qos=1, client_id=client_id, clean_session=False
    ) as obs:
        assert obs.session_present is False
        # A marker published now arrives; had the broker kept the queued message, mosquitto
        # would have delivered it first, on reconnect.
        paho_publish(broker.host, broker.port, "x", [b"marker"], qos=1)
        assert obs.wait_for(1, timeout=10)
        assert obs.payloads() == [b"marker"]


# --- PahoObserver / paho_publish -----------------------------------------------------------


@pytest.mark.broker
def test_observer_counts_paho_publish(broker: MosquittoBroker) -> None:
    with PahoObserver(broker.host, broker.port, ["obs/#", "other"], qos=2) as obs:
        assert obs.granted == [2, 2]
        paho_publish(broker.host, broker.port, "obs/a", [b"%d" % i for i in range(50)], qos=1)
        paho_publish(broker.host, broker.port, "obs/b", [b"x", b"y"], qos=2)
        paho_publish(broker.host, broker.port, "obs/c", [b"zero"], qos=0)
        paho_publish(broker.host, broker.port, "nope", [b"ignored"], qos=1)
        assert obs.wait_for(53, timeout=5)
        assert obs.payloads("obs/a") == [b"%d" % i for i in range(50)]
        assert obs.payloads("obs/b") == [b"x", b"y"]
        # Only per-topic order holds: paho hands a QoS 2 message over on PUBREL, so obs/b may
        # be recorded after the QoS 0 obs/c that was published later.
        assert [m for m in obs.messages if m.topic == "obs/c"] == [
            Observed("obs/c", b"zero", 0, False, False)
        ]
        assert {m.qos for m in obs.messages if m.topic == "obs/b"} == {2}
        # "nope" matches no filter: a marker published after it arrives, and nothing else did.
        paho_publish(broker.host, broker.port, "other", [b"marker"], qos=1)
        assert obs.wait_for(54, timeout=5)
        assert obs.count() == 54 and obs.messages[-1].payload == b"marker"
        assert not [m for m in obs.messages if m.topic == "nope"]


@pytest.mark.broker
def test_observer_sees_retained_flag(broker: MosquittoBroker) -> None:
    paho_publish(broker.host, broker.port, "ret", [b"kept"], qos=1, retain=True)
    with PahoObserver(broker.host, broker.port, "ret", qos=1) as obs:
        assert obs.wait_for(1, timeout=5)
        assert obs.messages == [Observed("ret", b"kept", 1, True, False)]


@pytest.mark.broker
async def test_observer_async_context_does_not_block_loop(broker: MosquittoBroker) -> None:
    async with PahoObserver(broker.host, broker.port, "a/#") as obs:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.005)

        task = asyncio.create_task(ticker())
        try:
            await paho_publish_async(broker.host, broker.port, "a/1", [b"1", b"2", b"3"])
            assert await obs.await_count(3, timeout=5)
            assert not await obs.await_count(4, timeout=0.1)
        finally:
            task.cancel()
        assert ticks > 5  # the loop kept running while we waited
        assert obs.payloads() == [b"1", b"2", b"3"]


@pytest.mark.broker
def test_observer_connect_failure_raises(broker_factory: BrokerFactory) -> None:
    b = broker_factory(start=False)
    with pytest.raises(OSError), PahoObserver(b.host, b.port, "t", connect_timeout=2):
        pass


# --- FaultProxy -----------------------------------------------------------------------------


@pytest.fixture
async def proxied(
    broker: MosquittoBroker, proxy_factory: ProxyFactory
) -> AsyncIterator[tuple[MosquittoBroker, FaultProxy]]:
    yield broker, await proxy_factory(broker)


@pytest.mark.broker
async def test_proxy_forwards_both_ways(proxied: tuple[MosquittoBroker, FaultProxy]) -> None:
    broker, proxy = proxied
    async with PahoObserver(proxy.host, proxy.port, "p/#") as obs:
        assert proxy.connections == 1 and proxy.total_connections == 1
        await paho_publish_async(proxy.host, proxy.port, "p/via-proxy", [b"up"])
        await paho_publish_async(broker.host, broker.port, "p/direct", [b"down"])
        assert await obs.await_count(2, timeout=5)
        assert sorted(obs.payloads()) == [b"down", b"up"]
        assert proxy.total_connections == 2
    assert await async_wait_until(lambda: proxy.connections == 0)


@pytest.mark.broker
async def test_proxy_cut_disconnects_client(proxied: tuple[MosquittoBroker, FaultProxy]) -> None:
    broker, proxy = proxied
    async with PahoObserver(proxy.host, proxy.port, "c/#", qos=1) as obs:
        assert await proxy.wait_connections(1, timeout=5)
        assert proxy.cut() == 1
        assert proxy.connections == 0
        assert await obs.await_until(lambda: obs.disconnects >= 1, timeout=5)
        # paho reconnects by itself (1 s back-off) and the observer subscribes again.
        assert await proxy.wait_connections(1, timeout=5)
        assert await obs.await_until(lambda: obs.connects >= 2 and obs.connected, timeout=5)
        assert await obs.await_until(lambda: len(obs.granted) == 1, timeout=5)
        await paho_publish_async(broker.host, broker.port, "c/after", [b"again"])
        assert await obs.await_count(1, timeout=5)
        assert proxy.total_connections == 2


@pytest.mark.broker
async def test_proxy_refuse_makes_connect_fail(
    proxied: tuple[MosquittoBroker, FaultProxy],
) -> None:
    _, proxy = proxied
    proxy.refuse(True)
    with pytest.raises(OSError):
        async with PahoObserver(proxy.host, proxy.port, "r", connect_timeout=3):
            pass
    assert proxy.refused_connections >= 1 and proxy.connections == 0
    with pytest.raises(OSError):
        await paho_publish_async(proxy.host, proxy.port, "r", [b"no"], timeout=3)

    proxy.refuse(False)
    async with PahoObserver(proxy.host, proxy.port, "r") as obs:
        await paho_publish_async(proxy.host, proxy.port, "r", [b"yes"])
        assert await obs.await_count(1, timeout=5)


@pytest.mark.broker
async def test_proxy_stall_holds_then_delivers(
    proxied: tuple[MosquittoBroker, FaultProxy],
) -> None:
    broker, proxy = proxied
    async with PahoObserver(proxy.host, proxy.port, "s/#", qos=1) as obs:
        proxy.stall(True)
        assert proxy.stalled
        payloads = [b"m%d" % i for i in range(5)]
        await paho_publish_async(broker.host, broker.port, "s/t", payloads, qos=1)
        assert not await obs.await_count(1, timeout=0.3)  # held, connection still open
        assert proxy.connections == 1 and obs.disconnects == 0
        proxy.stall(False)
        assert await obs.await_count(5, timeout=5)
        assert obs.payloads() == payloads
        assert obs.disconnects == 0


@pytest.mark.broker
async def test_proxy_drop_after_cuts_mqtt_connection(
    proxied: tuple[MosquittoBroker, FaultProxy],
) -> None:
    broker, proxy = proxied
    # Armed with no open connection: the next one. 10 bytes is part of the CONNECT packet.
    proxy.drop_after(10, "up")
    with pytest.raises(OSError):
        async with PahoObserver(proxy.host, proxy.port, "d", connect_timeout=3):
            pass
    assert proxy.connections == 0

    async with PahoObserver(proxy.host, proxy.port, "d", qos=1) as obs:
        # Armed with an open connection: that one. 3 bytes is part of the next PUBLISH.
        proxy.drop_after(3, "down")
        await paho_publish_async(broker.host, broker.port, "d", [b"payload"], qos=1)
        assert await obs.await_until(lambda: obs.disconnects >= 1, timeout=5)
        assert obs.count() == 0  # the PUBLISH never arrived whole


class ByteServer:
    """A plain TCP server that sends ``send`` to each client and records what it receives."""

    def __init__(self, send: bytes) -> None:
        self.send = send
        self.received = bytearray()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def __aenter__(self) -> ByteServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        writer.write(self.send)
        try:
            while data := await reader.read(4096):
                self.received.extend(data)
        except ConnectionError:
            pass
        finally:
            writer.transport.abort()
            self._tasks.discard(task)


async def _read_all(reader: asyncio.StreamReader) -> bytes:
    out = bytearray()
    try:
        while data := await reader.read(4096):
            out.extend(data)
    except ConnectionError:
        pass
    return bytes(out)


@pytest.mark.parametrize("n", [0, 1, 7, 499])
async def test_proxy_drop_after_exact_byte_counts(n: int) -> None:
    async with ByteServer(b"D" * 500) as server, FaultProxy("127.0.0.1", server.port) as proxy:
        received = server.received
        # down: the client gets exactly n bytes of the 500 the server sends, then EOF/reset
        proxy.drop_after(n, "down")
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        got = await asyncio.wait_for(_read_all(reader), 5)
        assert got == b"D" * n
        writer.close()

        # up: the server gets exactly n bytes of the 2000 the client sends
        received.clear()
        proxy.drop_after(n, "up")
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"U" * 2000)
        await asyncio.wait_for(_read_all(reader), 5)
        assert await async_wait_until(lambda: len(received) >= n, limit=5)
        await asyncio.sleep(0.02)
        assert bytes(received) == b"U" * n
        writer.close()
        # one-shot: the next connection is not cut
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        assert await asyncio.wait_for(reader.readexactly(500), 5) == b"D" * 500
        writer.close()
        assert proxy.total_connections == 3


async def test_proxy_close_cancels_everything() -> None:
    async with ByteServer(b"hello") as server:
        proxy = FaultProxy("127.0.0.1", server.port)
        await proxy.start()
        streams = [await asyncio.open_connection("127.0.0.1", proxy.port) for _ in range(3)]
        assert await proxy.wait_connections(3, timeout=5)
        proxy.stall(True)  # pumps parked in a stall must be cancelled too
        await proxy.close()
        assert proxy.connections == 0 and not proxy._tasks
        for reader, writer in streams:
            await asyncio.wait_for(_read_all(reader), 5)
            writer.close()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", proxy.port)
        # start() again listens on the same port
        port = proxy.port
        async with proxy:
            assert proxy.port == port
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            assert await asyncio.wait_for(reader.readexactly(5), 5) == b"hello"
            writer.close()
        assert not proxy._tasks


async def test_proxy_to_dead_target_closes_client() -> None:
    async with FaultProxy("127.0.0.1", free_port()) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        assert await asyncio.wait_for(_read_all(reader), 5) == b""
        writer.close()
        assert await async_wait_until(lambda: proxy.connections == 0)


# --- docker-compose and its mosquitto.conf -------------------------------------------------


@pytest.mark.broker
def test_docker_compose_config_is_valid(broker_factory: BrokerFactory) -> None:
    b = broker_factory(config_file=DOCKER_CONF)
    config = b.config_path.read_text()
    assert f"listener {b.port} 127.0.0.1" in config
    assert f"persistence_location {b.data_dir}/" in config
    assert re.search(r"^max_queued_messages 10000$", config, re.M)
    # the container paths survive only inside "# [replaced]" comments
    assert all(ln.startswith("#") for ln in config.splitlines() if "/mosquitto/data" in ln)
    with PahoObserver(b.host, b.port, "compose/#", qos=1) as obs:
        paho_publish(b.host, b.port, "compose/check", [b"round", b"trip"], qos=1)
        assert obs.wait_for(2, timeout=5)
        assert obs.payloads() == [b"round", b"trip"]
    log = b.log_text()
    assert "Error" not in log and "Unknown configuration" not in log, log
    b.stop()
    assert (b.data_dir / "mosquitto.db").exists()  # persistence true took effect


def test_docker_compose_mounts_that_config() -> None:
    text = COMPOSE_FILE.read_text()
    try:
        import yaml  # type: ignore[import-untyped]
    except ImportError:
        yaml = None
    if yaml is not None:
        doc = yaml.safe_load(text)
        service = doc["services"]["mosquitto"]
        assert service["image"] == "eclipse-mosquitto:2"
        assert "1883:1883" in [str(p) for p in service["ports"]]
        volumes = [str(v) for v in service["volumes"]]
        named = [v.split(":")[0] for v in volumes if v.split(":")[1] == "/mosquitto/data"]
        assert named and named[0] in (doc.get("volumes") or {})
    else:
        assert re.search(r"^services:\s*$", text, re.M)
        assert re.search(r"^  mosquitto:\s*$", text, re.M)
        assert re.search(r"^\s+image:\s*['\"]?eclipse-mosquitto:2['\"]?\s*$", text, re.M)
        assert re.search(r"^\s+-\s*['\"]?1883:1883['\"]?\s*$", text, re.M)
        volumes = re.findall(r"^\s+-\s*['\"]?([^'\"\s#]+)['\"]?\s*$", text, re.M)
        named = [v.split(":")[0] for v in volumes if v.split(":")[1:2] == ["/mosquitto/data"]]
        assert named and re.search(rf"^volumes:\s*\n(?:\s+.*\n)*?\s+{named[0]}:", text, re.M)
    mount = next(v for v in volumes if ":/mosquitto/config/mosquitto.conf" in v)
    host_path = mount.split(":")[0]
    assert (REPO / host_path).resolve() == DOCKER_CONF.resolve()
    assert host_path.startswith("./")


def test_user_config_with_two_listeners_is_rejected(tmp_path: Path) -> None:
    conf = tmp_path / "two.conf"
    conf.write_text("listener 1883\nlistener 8883\n")
    with pytest.raises(ValueError, match="more than one listener"):
        MosquittoBroker(tmp_path / "b", config_file=conf).config_text()


def test_user_config_rewrite_keeps_listener_scoped_options(tmp_path: Path) -> None:
    conf = tmp_path / "user.conf"
    conf.write_text(
        "# mine\nuser mosquitto\nlistener 1883 0.0.0.0\nmax_connections 5\n"
        "log_dest file /mosquitto/log/mosquitto.log\npersistence_location /somewhere/\n"
    )
    b = MosquittoBroker(tmp_path / "b", port=12345, config_file=conf, persistence=True)
    lines = [ln for ln in b.config_text().splitlines() if ln and not ln.startswith("#")]
    assert lines.index("listener 12345 127.0.0.1") < lines.index("max_connections 5")
    assert "user root" in lines and "user mosquitto" not in lines
    assert f"persistence_location {b.data_dir}/" in lines
    assert not any("/somewhere/" in ln or "log_dest file" in ln for ln in lines)
    assert "persistence true" in lines and "autosave_interval 1" in lines
