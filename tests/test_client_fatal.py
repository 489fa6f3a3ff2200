"""After a fatal store error the client stops: no more connections to the broker."""

from __future__ import annotations

import anyio
import pytest

from mqtt_persist import Backoff, PersistentClient, SessionFenced, StoreError
from tests.support.broker import MosquittoBroker
from tests.support.proxy import ProxyFactory
from tests.support.stores import BreakableStore

FAST = Backoff(initial=0.05, maximum=0.2, minimum=0.01)


@pytest.mark.parametrize(
    "error",
    [StoreError("disk gone"), SessionFenced("another process took the session over")],
    ids=["store-error", "fenced"],
)
async def test_a_fatal_store_error_stops_reconnecting(
    broker: MosquittoBroker, proxy_factory: ProxyFactory, error: StoreError
) -> None:
    """Regression: the supervisor kept opening TCP connections until the application exited."""
    proxy = await proxy_factory(broker)
    store = BreakableStore()
    async with PersistentClient(
        "127.0.0.1",
        proxy.port,
        client_id="fatal-store",
        store=store,
        backoff=FAST,
        connect_timeout=0.3,
    ) as client:
        await client.wait_connected(timeout=10)
        store.error = error
        with anyio.fail_after(10), pytest.raises(type(error)):
            await client.publish("t", b"x", qos=1)
        with anyio.fail_after(10), pytest.raises(type(error)):  # the error is surfaced
            await client.wait_connected()
        assert not client.is_connected
        # The bug opened a connection every connect_timeout + backoff (~0.5 s): 3 s would see
        # several; a client that stopped opens none.
        before = proxy.total_connections
        assert not await proxy.wait_total_connections(before + 1, timeout=3.0), (
            f"{proxy.total_connections - before} connections opened after the fatal error"
        )
