"""Shared fixtures: real mosquitto brokers on free ports and fault-injecting proxies.

Every broker runs from its own directory under ``tmp_path`` and is stopped at teardown
(SIGTERM, then SIGKILL if it hangs); an atexit hook in tests.support.broker kills any
survivor. Nothing here ever talks to the system mosquitto on port 1883.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.broker import BrokerFactory, MosquittoBroker, find_mosquitto
from tests.support.proxy import FaultProxy, ProxyFactory


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
    """``await proxy_factory(broker)`` -> a started FaultProxy to it, closed at teardown."""
    proxies: list[FaultProxy] = []

    async def make(target: MosquittoBroker | tuple[str, int]) -> FaultProxy:
        host, port = (target.host, target.port) if isinstance(target, MosquittoBroker) else target
        proxy = FaultProxy(host, port)
        await proxy.start()
        proxies.append(proxy)
        return proxy

    try:
        yield make
    finally:
        for proxy in reversed(proxies):
            await proxy.close()
