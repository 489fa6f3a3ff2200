"""Shared fixtures: real mosquitto brokers on free ports and fault-injecting proxies.

Every broker runs from its own directory under ``tmp_path`` and is stopped at teardown
(SIGTERM, then SIGKILL if it hangs); an atexit hook in tests.support.broker kills any
survivor. Nothing here ever talks to the system mosquitto on port 1883.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mqtt_persist.protocol.packets import ProtocolVersion
from tests.support.broker import BrokerFactory, MosquittoBroker, find_mosquitto
from tests.support.nats import NatsFactory, NatsServer, nats_server_path
from tests.support.proxy import FaultProxy, ProxyFactory
from tests.support.rabbitmq import RabbitMQBroker, RabbitMQFactory, rabbitmq_paths
from tests.support.tmpfs import MountNotPermitted, Tmpfs
from tests.support.transports import Route


@pytest.fixture(scope="session")
def mosquitto_path() -> str:
    """Path of the mosquitto binary; fails under CI (env CI set) and skips elsewhere if absent."""
    path = find_mosquitto()
    if path is None:
        message = "mosquitto not found (apt-get install mosquitto, or set $MOSQUITTO)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(
    params=[ProtocolVersion.V311, ProtocolVersion.V5], ids=lambda v: {4: "v311", 5: "v5"}[v]
)
def protocol(request: pytest.FixtureRequest) -> ProtocolVersion:
    """Each protocol the client speaks: a test taking it runs once over MQTT 3.1.1, once over 5."""
    version: ProtocolVersion = request.param
    return version


@pytest.fixture(params=["tcp", "websockets"])
async def transport(request: pytest.FixtureRequest) -> AsyncIterator[Route]:
    """Each transport: a test taking it runs once over TCP and once over WebSockets, through a
    WebSocket-to-TCP bridge of the test's own (tests/support/ws_bridge.py) in front of its
    broker or proxy: ``client(**transport.client_kwargs(broker), ...)``."""
    route = Route(request.param)
    try:
        yield route
    finally:
        await route.close()


@pytest.fixture
def broker_factory(mosquitto_path: str, tmp_path: Path) -> Iterator[BrokerFactory]:
    """``broker_factory(persistence=..., extra_config=..., config_file=..., start=True)``.

    Each broker gets its own ``tmp_path/broker-N`` directory (pass ``workdir=`` to choose);
    all of them are stopped at teardown.
    """
    brokers: list[MosquittoBroker] = []

    def make(*, start: bool = True, **kwargs: Any) -> MosquittoBroker:
        workdir = kwargs.pop("workdir", None) or tmp_path / f"broker-{len(brokers)}"
        broker = MosquittoBroker(workdir, **kwargs)
        broker.binary = mosquitto_path
        brokers.append(broker)
        if start:
            broker.start()
        return broker

    try:
        yield make
    finally:
        for broker in reversed(brokers):
            try:
                broker.stop(timeout=5.0)  # escalates to SIGKILL itself if SIGTERM hangs
            except Exception:
                broker.kill()


@pytest.fixture
def broker(broker_factory: BrokerFactory) -> MosquittoBroker:
    """A started, non-persistent mosquitto on a free 127.0.0.1 port."""
    return broker_factory()


@pytest.fixture
def persistent_broker(broker_factory: BrokerFactory) -> MosquittoBroker:
    """A started mosquitto with ``persistence true`` and ``autosave_interval 1``.

    ``persistent_broker.restart()`` (SIGTERM) keeps sessions and queued messages;
    ``restart(hard=True)`` (SIGKILL) keeps only what the last autosave wrote.
    """
    return broker_factory(persistence=True)


@pytest.fixture
async def proxy_factory() -> AsyncIterator[ProxyFactory]:
    """``await proxy_factory(broker)`` -> a started FaultProxy to it, closed at teardown.

    ``mqtt=True`` gives a proxy that reads the streams as MQTT packets (records, drops,
    listens; see tests/support/proxy.py).
    """
    proxies: list[FaultProxy] = []

    async def make(target: MosquittoBroker | tuple[str, int], *, mqtt: bool = False) -> FaultProxy:
        host, port = (target.host, target.port) if isinstance(target, MosquittoBroker) else target
        proxy = FaultProxy(host, port, mqtt=mqtt)
        await proxy.start()
        proxies.append(proxy)
        return proxy

    try:
        yield make
    finally:
        for proxy in reversed(proxies):
            await proxy.close()


# --- the broker matrix: RabbitMQ (rabbitmq_mqtt) and nats-server (JetStream + MQTT) -----------
# Private instances on free 127.0.0.1 ports with their own files, never the machine's services;
# see tests/support/rabbitmq.py and tests/support/nats.py. A missing binary skips the test, or
# fails it under CI (env CI set).


@pytest.fixture(scope="session")
def shared_rabbitmq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitMQBroker]:
    """One RabbitMQ node for the whole session, started on first use (a boot takes 10-15 s).

    For tests that never stop or restart it: give every client id and topic a unique part
    (the node keeps persistent sessions and retained messages from earlier tests).
    """
    script, epmd = rabbitmq_paths()
    node = RabbitMQBroker(tmp_path_factory.mktemp("rabbitmq-shared"), script=script, epmd=epmd)
    node.start()
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture
def rabbitmq_factory(tmp_path: Path) -> Iterator[RabbitMQFactory]:
    """``rabbitmq_factory(start=True, **RabbitMQBroker kwargs)``: a node this test owns.

    For tests that stop, kill or restart the broker; each node gets ``tmp_path/rabbitmq-N``
    and all are stopped at teardown.
    """
    script, epmd = rabbitmq_paths()
    nodes: list[RabbitMQBroker] = []

    def make(*, start: bool = True, **kwargs: Any) -> RabbitMQBroker:
        workdir = kwargs.pop("workdir", None) or tmp_path / f"rabbitmq-{len(nodes)}"
        node = RabbitMQBroker(workdir, script=script, epmd=epmd, **kwargs)
        nodes.append(node)
        if start:
            node.start()
        return node

    try:
        yield make
    finally:
        for node in reversed(nodes):
            node.stop()  # escalates to SIGKILL itself, and stops the node's epmd


@pytest.fixture
def nats_factory(tmp_path: Path) -> Iterator[NatsFactory]:
    """``nats_factory(start=True, **NatsServer kwargs)``: servers in ``tmp_path/nats-N``."""
    binary = nats_server_path()
    servers: list[NatsServer] = []

    def make(*, start: bool = True, **kwargs: Any) -> NatsServer:
        workdir = kwargs.pop("workdir", None) or tmp_path / f"nats-{len(servers)}"
        server = NatsServer(workdir, binary=binary, **kwargs)
        servers.append(server)
        if start:
            server.start()
        return server

    try:
        yield make
    finally:
        for server in reversed(servers):
            server.stop()


@pytest.fixture
def nats_broker(nats_factory: NatsFactory) -> NatsServer:
    """A started nats-server of this test's own (it starts in about 0.1 s)."""
    return nats_factory()


# --- the fault suite's soak runs (issue 10): minutes each, so not part of the default run ------


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak",
        action="store_true",
        default=False,
        help="also run the tests marked soak (minutes each; benchmarks/fault_matrix.py runs them)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "soak: a fault soak of a minute or more; runs only with --soak or -m soak"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--soak") or "soak" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="soak test: run with --soak (or benchmarks/fault_matrix.py)")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tmpfs_factory(tmp_path: Path) -> Iterator[Callable[[int], Tmpfs]]:
    """``tmpfs_factory(size_bytes)`` -> a mounted :class:`Tmpfs` under ``tmp_path``.

    Unmounted at teardown. Where this process may not mount (no root / CAP_SYS_ADMIN) the test
    is skipped saying so, or fails under CI (env CI set): never a silent pass.
    """
    mounts: list[Tmpfs] = []

    def make(size: int) -> Tmpfs:
        fs = Tmpfs(tmp_path / f"tmpfs-{len(mounts)}", size)
        try:
            fs.mount()
        except MountNotPermitted as exc:
            if os.environ.get("CI"):
                pytest.fail(f"{exc} (the disk-full tests need a tmpfs they can mount)")
            pytest.skip(f"{exc}: the disk-full and read-only tests need to mount a tmpfs")
        mounts.append(fs)
        return fs

    try:
        yield make
    finally:
        for fs in reversed(mounts):
            fs.__exit__(None, None, None)
