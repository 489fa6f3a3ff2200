"""How a client gives up and how it leaves: the connect timeout's message, the graceful exit."""

from __future__ import annotations

import time

import anyio
import pytest

from mqtt_persist import (
    Backoff,
    ClientClosed,
    ConnectionLost,
    ConnectTimeout,
    InvalidInput,
    MemoryStore,
    MqttPersistError,
    PersistentClient,
)
from tests.support.broker import MosquittoBroker, free_port
from tests.support.observer import paho_publish_async

FAST = Backoff(initial=0.05, maximum=0.2, minimum=0.01)


async def test_a_connect_timeout_names_the_broker_the_time_and_the_last_error() -> None:
    """Regression: a bare TimeoutError with no message."""
    port = free_port()  # nothing listens there
    async with PersistentClient("127.0.0.1", port, client_id="nobody-home", backoff=FAST) as client:
        with pytest.raises(ConnectTimeout) as caught:
            await client.wait_connected(timeout=0.5)
    error = caught.value
    assert isinstance(error, TimeoutError) and isinstance(error, MqttPersistError)
    assert (error.host, error.port, error.waited) == ("127.0.0.1", port, 0.5)
    assert error.attempts >= 1 and error.last_error == "connection refused"
    assert str(error).startswith(f"could not connect to 127.0.0.1:{port} within 0.5s (")
    assert str(error).endswith("last error: connection refused)")


async def test_reconnect_false_names_the_broker_and_why() -> None:
    port = free_port()
    with pytest.raises(ConnectionLost) as caught:
        async with PersistentClient("127.0.0.1", port, client_id="once", reconnect=False):
            pass
    assert str(caught.value) == f"could not connect to 127.0.0.1:{port}: connection refused"


async def test_a_connect_timeout_before_any_attempt_ended_says_so() -> None:
    error = ConnectTimeout("broker.example", 8883, 2.0, 0, None)
    assert str(error) == (
        "could not connect to broker.example:8883 within 2s (no connection attempt ended yet)"
    )


# --- the graceful exit ---------------------------------------------------------------------------


async def test_leaving_right_after_subscribe_waits_for_the_broker(broker: MosquittoBroker) -> None:
    """Regression: the client closed before the SUBSCRIBE was sent, so the broker queued
    nothing for the persistent session until the next start."""
    store = MemoryStore()
    async with PersistentClient(
        broker.host, broker.port, client_id="leaves-at-once", store=store
    ) as client:
        request = await client.subscribe("exit/t", qos=1)  # not even connected yet
    assert request.done(), "the exit waited for the SUBACK"
    await paho_publish_async(broker.host, broker.port, "exit/t", [b"while away"], qos=1)
    async with PersistentClient(
        broker.host, broker.port, client_id="leaves-at-once", store=store
    ) as client:
        with anyio.fail_after(10):
            message = await anext(aiter(client.messages))
    assert message.payload == b"while away"


async def test_leaving_waits_for_the_acknowledgements(broker: MosquittoBroker) -> None:
    async with PersistentClient(broker.host, broker.port, client_id="acks-on-exit") as client:
        await client.wait_connected(timeout=10)
        deliveries = [await client.publish("exit/acks", b"%d" % i, qos=2) for i in range(50)]
    assert all(d.done() for d in deliveries)
    assert client.stats.queued == client.stats.inflight == 0


async def test_exit_timeout_zero_leaves_at_once(broker: MosquittoBroker) -> None:
    async with PersistentClient(
        broker.host, broker.port, client_id="no-wait", exit_timeout=0
    ) as client:
        request = await client.subscribe("exit/t", qos=1)  # not even connected yet
    with pytest.raises(ClientClosed):  # closed before the broker could answer
        request.result()


async def test_the_exit_does_not_wait_for_a_broker_that_is_not_there() -> None:
    """Pending work and no broker: the exit waits for the attempt under way, not the backoff."""
    async with PersistentClient(
        "127.0.0.1",
        free_port(),
        client_id="offline",
        backoff=Backoff(initial=60, maximum=60),
        exit_timeout=60,
    ) as client:
        await client.publish("t", b"x", qos=1)
        started = time.monotonic()
    # The refused connect ends the wait (in milliseconds); exit_timeout is only the bound.
    assert time.monotonic() - started < 30
    assert client.stats.queued == 1


def test_exit_timeout_is_checked() -> None:
    for bad in (-1, float("inf"), "5", True):
        with pytest.raises(InvalidInput, match="exit_timeout"):
            PersistentClient("h", client_id="c", exit_timeout=bad)  # type: ignore[arg-type]
