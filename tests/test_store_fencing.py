"""Ownership with fencing, the same model in every shared store (Redis, PostgreSQL).

A lease with a TTL that its owner renews; a takeover once it lapsed (or with takeover=True, or
at once from a dead process of this host); a fencing token that grows with every new owner and
is checked by every write in the same atomic step, so a former owner's write fails with
SessionFenced and stores nothing. A "pause" here is a blocked event loop (``time.sleep``): the
renewal cannot run, exactly as in a SIGSTOPped process; the process-level story with real
SIGSTOP/SIGCONT is tests/test_handoff.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from mqtt_persist.errors import SessionFenced, SessionLocked
from mqtt_persist.session.state import MessageAdded, SessionState
from mqtt_persist.stores.base import SessionStore
from tests.support.store_kill import start_holder, stop_holder
from tests.test_stores import msg

Make = Callable[..., Any]


@pytest.fixture(params=["redis", "postgres"])
async def make(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Make]:
    """``make(**kwargs)``: a store of the kind over this test's own namespace."""
    stores: list[Any] = []
    if request.param == "redis":
        from tests.support.redis_server import shared_redis_url, unique_prefix

        url, prefix = shared_redis_url(), unique_prefix(tmp_path)
        pytest.importorskip("redis")
        from mqtt_persist.stores.redis import RedisStore

        def build(**kwargs: Any) -> Any:
            return RedisStore(url, prefix=prefix, **kwargs)

        holder: tuple[list[str], dict[str, str]] = ([url], {"prefix": prefix})

    else:
        from tests.support.postgres import shared_postgres_dsn, unique_schema

        dsn, schema = shared_postgres_dsn(), unique_schema(tmp_path)
        from mqtt_persist.stores.postgres import PostgresStore

        def build(**kwargs: Any) -> Any:
            return PostgresStore(dsn, schema=schema, **kwargs)

        holder = ([dsn], {"schema": schema})

    def factory(**kwargs: Any) -> Any:
        store = build(**kwargs)
        stores.append(store)
        return store

    # How a lease-holding child process builds the same store.
    factory.holder = holder  # type: ignore[attr-defined]
    try:
        yield factory
    finally:
        for store in stores:
            await store.close()


def pause(seconds: float) -> None:
    """The event loop stands still, as in a SIGSTOPped process: no renewal runs."""
    time.sleep(seconds)


async def messages_of(store: SessionStore, client_id: str = "a") -> list[int]:
    state = await store.load(client_id)
    return [] if state is None else list(state.messages)


async def test_takeover_fences_every_write_of_the_former_owner(make: Make) -> None:
    old, new = make(), make()
    await old.acquire("a")
    await old.apply("a", [MessageAdded(msg(1))])
    with pytest.raises(SessionLocked, match=f"pid {os.getpid()}") as info:
        await new.acquire("a")
    assert not isinstance(info.value, SessionFenced)
    await new.acquire("a", takeover=True)
    assert new.fencing_token("a") > old.fencing_token("a")
    for write in (
        lambda: old.apply("a", [MessageAdded(msg(2))]),
        lambda: old.apply("a", []),
        lambda: old.load("a"),
        lambda: old.save(SessionState("a")),
        lambda: old.update_ttl("a", 5),
        lambda: old.delete("a"),
    ):
        with pytest.raises(SessionFenced, match="held by"):
            await write()
    assert old.fenced_writes == 6
    assert await messages_of(new) == [1]  # nothing of the fenced writes was stored
    await new.apply("a", [MessageAdded(msg(3))])
    assert await messages_of(new) == [1, 3]


async def test_a_paused_owner_is_fenced_once_another_took_over(make: Make) -> None:
    paused, other = make(lease_ttl=0.5), make(lease_ttl=0.5)
    await paused.acquire("a")
    await paused.apply("a", [MessageAdded(msg(1))])
    pause(0.8)  # past the lease: it lapsed by the server's clock
    await other.acquire("a")  # no takeover needed: the lease lapsed
    assert other.fencing_token("a") > paused.fencing_token("a")
    with pytest.raises(SessionFenced, match="held by"):
        await paused.apply("a", [MessageAdded(msg(2))])
    await other.apply("a", [MessageAdded(msg(3))])
    await other.release("a")
    # Released by the new owner: the old token is still not current.
    with pytest.raises(SessionFenced, match="no longer current"):
        await paused.apply("a", [MessageAdded(msg(2))])
    assert paused.fenced_writes == 2
    await paused.release("a")
    await paused.acquire("a")
    assert await messages_of(paused) == [1, 3]


async def test_a_lapsed_lease_is_refused_until_acquired_again(make: Make) -> None:
    store, rival = make(lease_ttl=0.3), make(lease_ttl=0.3)
    await store.acquire("a")
    first = store.fencing_token("a")
    pause(0.6)
    # Nobody took over, yet the owner may not go on: a rival may be taking over right now.
    with pytest.raises(SessionFenced, match="expired"):
        await store.apply("a", [MessageAdded(msg(1))])
    await rival.acquire("a")  # and the lapsed lease was not renewed behind its back
    await rival.release("a")
    await store.acquire("a")
    assert store.fencing_token("a") > first
    await store.apply("a", [MessageAdded(msg(1))])
    assert await messages_of(store) == [1]


async def test_renewal_keeps_the_lease_live(make: Make) -> None:
    holder, other = make(lease_ttl=1.0), make(lease_ttl=1.0)
    await holder.acquire("a")
    await asyncio.sleep(2.5)  # the loop runs: renewed every third of the TTL
    with pytest.raises(SessionLocked):
        await other.acquire("a")
    await holder.apply("a", [MessageAdded(msg(1))])
    await holder.release("a")
    await other.acquire("a")


async def test_tokens_grow_with_every_owner(make: Make) -> None:
    stores = [make(), make()]
    tokens = []
    for n in range(6):
        store = stores[n % 2]
        await store.acquire("a")
        tokens.append(store.fencing_token("a"))
        await store.release("a")
        assert store.fencing_token("a") is None
    assert tokens == sorted(set(tokens))


async def test_writes_without_a_lease_wait_for_a_live_one(make: Make) -> None:
    holder, tool = make(), make()
    await tool.apply("a", [MessageAdded(msg(1))])  # nobody holds it: a tool may write
    await holder.acquire("a")
    with pytest.raises(SessionLocked) as info:
        await tool.apply("a", [MessageAdded(msg(2))])
    assert not isinstance(info.value, SessionFenced)
    assert await tool.exists("a")  # reading needs no lease
    await holder.release("a")
    await tool.apply("a", [MessageAdded(msg(2))])
    assert await messages_of(tool) == [1, 2]


async def test_a_killed_holder_on_this_host_is_taken_over_at_once(make: Make) -> None:
    probe = make()
    args, kwargs = make.holder  # type: ignore[attr-defined]
    child = start_holder(type(probe), "a", *args, **kwargs)
    try:
        with pytest.raises(SessionLocked, match=f"pid {child.pid} "):
            await probe.acquire("a")
    finally:
        stop_holder(child, kill=True)
    began = time.monotonic()
    await probe.acquire("a")  # the default lease_ttl is 15 s: no waiting for it
    assert time.monotonic() - began < 5.0
    await probe.apply("a", [MessageAdded(msg(1))])


@pytest.mark.broker
async def test_a_fenced_publish_is_neither_stored_nor_sent(make: Make, broker: Any) -> None:
    """The client side: a write refused as fenced fails publish(), stops the client and drops
    its connection; the message reaches neither the store nor the broker."""
    from mqtt_persist import PersistentClient
    from tests.support.observer import PahoObserver, paho_publish_async

    async with PahoObserver(broker.host, broker.port, "fence/#", qos=1) as observer:
        async with PersistentClient(
            broker.host, broker.port, client_id="fenced", store=make()
        ) as client:
            await client.wait_connected(10)
            await (await client.publish("fence/t", b"before", qos=1))
            rival = make()
            await rival.acquire("fenced", takeover=True)
            with pytest.raises(SessionFenced):
                await client.publish("fence/t", b"after", qos=1)
            assert not client.is_connected
            with pytest.raises(SessionFenced):  # the client stopped: nothing more is accepted
                await client.publish("fence/t", b"later", qos=1)
        # Published after the client stopped: had "after" been sent, it would arrive first.
        await paho_publish_async(broker.host, broker.port, "fence/t", [b"sentinel"], qos=1)
        assert await observer.await_until(lambda: b"sentinel" in observer.payloads(), 10)
        assert observer.payloads() == [b"before", b"sentinel"]
        state = await rival.load("fenced")
        assert state is None or all(m.payload == b"before" for m in state.messages.values())


def reply_lost_after_the_server_acted(store: Any) -> asyncio.Event:
    """Make ``store``'s next lease round trip reach the server and then hang, as when the
    caller is cancelled after the request went out and before the reply came back. The
    event is set once it hangs."""
    hanging = asyncio.Event()
    leases = store._leases
    if hasattr(leases, "_run"):  # RedisStore: every lease script goes through _run
        run = leases._run

        async def hanging_run(script: Any, keys: Any, args: Any) -> Any:
            leases._run = run  # only this round trip hangs
            await run(script, keys, args)
            hanging.set()
            await asyncio.Event().wait()

        leases._run = hanging_run
    else:  # PostgresStore: the statement is executed on a borrowed connection
        connect = leases._connect

        class Hanging:
            def __init__(self, conn: Any) -> None:
                self._conn = conn

            async def execute(self, *args: Any, **kwargs: Any) -> Any:
                await self._conn.execute(*args, **kwargs)
                hanging.set()
                await asyncio.Event().wait()

        @contextlib.asynccontextmanager
        async def hanging_connect() -> Any:
            leases._connect = connect  # only this round trip hangs
            async with connect() as conn:
                yield Hanging(conn)

        leases._connect = hanging_connect
    return hanging


async def test_an_acquire_cancelled_after_the_server_granted_it_leaves_no_lease(
    make: Make,
) -> None:
    """The lease was written but the reply never arrived: the cancelled acquire takes it back,
    so a restarted client (another store) gets the session at once, not after lease_ttl."""
    cancelled, other = make(lease_ttl=60.0), make(lease_ttl=60.0)
    await cancelled.open()
    reply_lost_after_the_server_acted(cancelled)
    with anyio.move_on_after(0.5) as scope:
        await cancelled.acquire("a")
    assert scope.cancelled_caught
    assert cancelled.fencing_token("a") is None
    await other.acquire("a")  # SessionLocked for 60 s before the fix
    await other.apply("a", [MessageAdded(msg(1))])


@pytest.mark.parametrize("cancel", ["anyio", "asyncio"])
async def test_an_acquire_cancelled_at_any_point_leaves_no_lease(make: Make, cancel: str) -> None:
    """Cancelled anywhere in its round trip (tiny timeouts, growing), an acquire either got the
    lease (and knows it) or left none: another store can always take it at once."""
    other = make(lease_ttl=60.0)
    got = lost = 0
    for step in range(40):
        store = make(lease_ttl=60.0)
        await store.open()
        delay = step * 0.00025
        if cancel == "anyio":
            with anyio.move_on_after(delay):
                await store.acquire("a")
        else:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await store.acquire("a")
        if store.fencing_token("a") is not None:
            got += 1
            await store.release("a")
        else:
            lost += 1
        await other.acquire("a")  # SessionLocked: the cancelled acquire left a lease
        await other.release("a")
        await store.close()
    assert lost, "no acquire was cancelled: the delays are too long for this machine"
    assert got + lost == 40


@pytest.mark.parametrize("opened", [True, False], ids=["opened", "connecting"])
async def test_an_asyncio_timeout_around_acquire_fires_or_was_not_due(
    make: Make, opened: bool
) -> None:
    """``asyncio.timeout`` (it cancels once, never again) around acquire, tiny and growing:
    either it fires (TimeoutError, and the cancelled acquire left no lease) or acquire
    finished before the deadline (the timeout never expired). Python 3.11's
    ``asyncio.wait_for``, which redis-py wraps around every send and PostgresStore wrapped
    around connecting, returns the finished call's result when the cancellation arrives as
    the call ends: the timeout expired, never raised, and the store held the lease."""
    other = make(lease_ttl=60.0)
    task = asyncio.current_task()
    assert task is not None
    timed_out = 0
    for step in range(40):
        store = make(lease_ttl=60.0)
        if opened:
            await store.open()
        delay = step * 0.00015
        try:
            async with asyncio.timeout(delay) as cm:
                await store.acquire("a")
        except TimeoutError:
            timed_out += 1
            assert store.fencing_token("a") is None
        else:
            assert not cm.expired(), f"a {delay * 1000:.2f} ms timeout expired and did not fire"
            assert store.fencing_token("a") is not None
            await store.release("a")
        assert task.cancelling() == 0
        await other.acquire("a")  # SessionLocked: the cancelled acquire left a lease
        await other.release("a")
        await store.close()
    assert timed_out, "no acquire timed out: the delays are too long for this machine"
