"""Cancelling the client's public calls: a timeout or a cancelled task group around a call
must leave the client consistent.

A cancelled ``publish()`` has either not accepted its message or accepted it for good (it
arrives, once); the other callers sharing its commit are neither woken with the cancellation
nor left hanging; later calls work; leaving the client still closes it. Each test cancels
with asyncio's own cancellation (``asyncio.wait_for``, ``task.cancel()``) and with an anyio
cancel scope, which keeps cancelling every later await inside it until it is left.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Literal

import anyio
import pytest

from mqtt_persist import Backoff, FileStore, PersistentClient
from mqtt_persist.log import LOGGER_NAME
from tests.support.broker import BrokerFactory
from tests.support.observer import PahoObserver
from tests.support.proxy import ProxyFactory
from tests.support.waiting import until

FAST = Backoff(initial=0.05, maximum=0.2, minimum=0.01)

Flavour = Literal["asyncio", "anyio"]
FLAVOURS = pytest.mark.parametrize("flavour", ["asyncio", "anyio"])


async def cancel_once_waiting(
    flavour: Flavour, call: Callable[[], Awaitable[object]], waiting: Callable[[], bool]
) -> None:
    """Run ``call`` in a task of its own and cancel it once ``waiting()`` says it is stuck
    where the test wants it: with ``task.cancel()`` (asyncio) or by cancelling the cancel
    scope of the task group it runs in (anyio). Raises if ``call`` finished instead."""
    finished: list[object] = []

    async def run() -> None:
        finished.append(await call())

    if flavour == "asyncio":
        task = asyncio.ensure_future(run())
        await until(lambda: waiting() or task.done(), 5, "the call to wait")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    else:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(run)
            await until(lambda: waiting() or bool(finished), 5, "the call to wait")
            tasks.cancel_scope.cancel()
    assert not finished, "the call returned before it could be cancelled"


def no_errors_logged(caplog: pytest.LogCaptureFixture) -> None:
    errors = [
        r for r in caplog.records if r.name.startswith(LOGGER_NAME) and r.levelno >= logging.ERROR
    ]
    assert not errors, [r.getMessage() for r in errors]


# --- leaving the client ----------------------------------------------------------------------


@FLAVOURS
async def test_exit_cancelled_while_settling_still_closes_the_client(
    flavour: Flavour,
    broker_factory: BrokerFactory,
    proxy_factory: ProxyFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Leaving the client waits up to exit_timeout for the broker (settle_before_exit); a
    cancellation during that wait must still close the client (its tasks end, the lease is
    released), not leave its task group running behind the caller's back."""
    broker = broker_factory()
    proxy = await proxy_factory(broker, mqtt=True)
    # The broker's PUBCOMP never arrives: the exit waits for it, exit_timeout long.
    lost = proxy.drop_packets("down", "PUBCOMP")
    store = tmp_path / "store"
    body_done = False

    async def use_client() -> None:
        nonlocal body_done
        async with PersistentClient(
            "127.0.0.1",
            proxy.port,
            client_id="cx-exit",
            store=FileStore(store),
            backoff=FAST,
            exit_timeout=30,
        ) as client:
            await client.wait_connected(5)
            await client.publish("cx/exit", b"once", qos=2)
            body_done = True

    async with PahoObserver(broker.host, broker.port, "cx/#") as observer:
        await cancel_once_waiting(flavour, use_client, lambda: body_done)
        lost.remove()
        # The lease was released: the next client takes the session over and ends the flow.
        async with PersistentClient(
            "127.0.0.1", proxy.port, client_id="cx-exit", store=FileStore(store), backoff=FAST
        ) as client:
            await client.wait_connected(5)
            await client.drain(5)
            assert await observer.await_count(1)
        assert observer.payloads() == [b"once"]
    no_errors_logged(caplog)


# --- receiving -------------------------------------------------------------------------------


@FLAVOURS
async def test_messages_iterator_survives_a_timed_out_wait(
    flavour: Flavour, broker_factory: BrokerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A timeout around one step of ``client.messages`` (``wait_for(anext(it), t)``, or a
    cancel scope around it) ends that wait, not the iteration: the same iterator yields the
    next message, and nothing that arrived is skipped."""
    broker = broker_factory()
    async with PersistentClient(
        broker.host, broker.port, client_id="cx-iter", backoff=FAST
    ) as client:
        await client.subscribe("cx/iter", qos=1)
        await client.wait_connected(5)
        incoming = aiter(client.messages)
        if flavour == "asyncio":
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(anext(incoming), 0.05)
        else:
            with anyio.move_on_after(0.05) as waiting:
                await anext(incoming)
            assert waiting.cancelled_caught
        await client.publish("cx/iter", b"after", qos=1)
        with anyio.fail_after(5):
            message = await anext(incoming)
        assert message.payload == b"after"
    no_errors_logged(caplog)
