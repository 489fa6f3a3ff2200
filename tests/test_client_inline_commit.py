"""The inline commit: a durable ``publish()`` that finds the flusher idle commits from its own
task (``Flusher.commit_inline``), and the flusher task sends the batch afterwards.

What must hold, against a real mosquitto and an outside paho subscriber: the message is sent
only once its commit is durable (the write-ahead witness checks that packet by packet, in
``test_faults_write_ahead.py``); a caller cancelled during the commit raises only once the
commit ended, and its message is sent all the same; a failed commit stops the client as a
failed flusher pass does; a store whose ``apply`` was replaced alone keeps every commit on it;
a publisher whose commits take no ``await`` (``fsync=False``) still lets the loop run, and its
messages leave in order.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import anyio
import pytest

from mqtt_persist import (
    Backoff,
    DeliveryOutcome,
    FileStore,
    MemoryStore,
    PersistentClient,
    SessionStore,
    StoreError,
)
from mqtt_persist.client.inline_commit import pairs_apply
from mqtt_persist.session.state import MessageAdded, Operation
from tests.support.apply_recorder import ApplyRecorder
from tests.support.broker import MosquittoBroker
from tests.support.observer import PahoObserver
from tests.support.waiting import until

pytestmark = pytest.mark.broker

FAST = Backoff(initial=0.05, maximum=0.2, minimum=0.01)


@contextlib.asynccontextmanager
async def observed_client(
    broker: MosquittoBroker, client_id: str, store: SessionStore
) -> AsyncIterator[tuple[PahoObserver, PersistentClient]]:
    """A paho subscriber to ``inline/#`` and a client, connected, its own commits done."""
    async with (
        PahoObserver(broker.host, broker.port, "inline/#") as observer,
        PersistentClient(
            broker.host, broker.port, client_id=client_id, store=store, backoff=FAST
        ) as client,
    ):
        await client.wait_connected(10)
        await client.drain(10)
        yield observer, client


class DurableMemory(MemoryStore):
    """A MemoryStore that says it is durable: every QoS 1/2 publish waits for its commit."""

    durable = True


class HeldStore(DurableMemory):
    """Commits wait at a gate while it is closed, on both paths: ``apply`` in place, and
    ``begin_apply`` (the inline commit) by resolving ``durable`` once the gate opens. With
    ``begin=False``, ``begin_apply`` declines every batch, so each goes to ``apply``."""

    def __init__(self, *, begin: bool = True) -> None:
        super().__init__()
        self.begin = begin
        self.begun = 0
        self.applied = 0
        self.held = 0
        self.gate = asyncio.Event()
        self.gate.set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def apply(self, client_id: str, ops: Sequence[Operation]) -> None:
        self.applied += 1
        await self._wait()
        await super().apply(client_id, ops)

    def begin_apply(
        self, client_id: str, ops: Sequence[Operation], durable: asyncio.Future[None]
    ) -> bool:
        if not self.begin:
            return False
        self.begun += 1
        if self.gate.is_set():
            return super().begin_apply(client_id, ops, durable)

        async def later() -> None:
            await self._wait()
            super(HeldStore, self).begin_apply(client_id, ops, durable)

        task = asyncio.get_running_loop().create_task(later())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _wait(self) -> None:
        if self.gate.is_set():
            return
        self.held += 1
        try:
            await self.gate.wait()
        finally:
            self.held -= 1


@pytest.mark.parametrize("begin", [True, False], ids=["begin_apply", "apply"])
@pytest.mark.parametrize("flavour", ["asyncio", "anyio"])
async def test_a_publish_cancelled_during_its_inline_commit_is_sent_once_it_ended(
    broker: MosquittoBroker, flavour: str, begin: bool
) -> None:
    """The caller's cancellation lands once its commit ended, not before: the commit's outcome
    decides whether the message is sent, and a cancellation must not leave that unknown. With
    ``begin=False`` the store declines the inline start and the batch goes through ``apply``,
    which a native ``task.cancel()`` must not cut short either."""
    store = HeldStore(begin=begin)
    async with observed_client(broker, f"inline-cx-{flavour}", store) as (observer, client):
        store.begun = store.applied = 0  # the connection's own commits
        store.gate.clear()
        finished: list[object] = []
        scope = anyio.CancelScope()

        async def publish() -> None:
            with scope:
                finished.append(await client.publish("inline/t", b"first", qos=2))

        task = asyncio.ensure_future(publish())
        try:
            await until(lambda: store.held == 1, 5, "the inline commit to be held")
            assert (store.begun, store.applied) == ((1, 0) if begin else (0, 1))
            if flavour == "asyncio":
                task.cancel()
            else:
                scope.cancel()
            await asyncio.sleep(0.2)
            assert not task.done(), "the cancellation landed before the commit ended"
            assert observer.payloads() == [], "sent before its commit"
        finally:
            store.gate.set()  # else the caller waits for its commit for good
        with anyio.fail_after(5):
            if flavour == "asyncio":
                with pytest.raises(asyncio.CancelledError):
                    await task
            else:
                await task
        assert finished == [], "the cancelled publish returned"
        with anyio.fail_after(10):
            later = await client.publish("inline/t", b"later", qos=1)
            assert await later is DeliveryOutcome.ACKNOWLEDGED
            await client.drain(10)
        assert await observer.await_count(2)
    assert sorted(observer.payloads()) == [b"first", b"later"]


async def test_a_commit_begin_apply_refuses_stops_the_client(broker: MosquittoBroker) -> None:
    """``begin_apply`` raising at once (not through ``durable``) is a failed commit: the caller
    gets a StoreError (a foreign exception wrapped), and the client stops as after a failed
    flusher pass, without sending the batch."""

    class Refusing(DurableMemory):
        refuse = False

        def begin_apply(
            self, client_id: str, ops: Sequence[Operation], durable: asyncio.Future[None]
        ) -> bool:
            if self.refuse:
                raise OSError(28, "No space left on device")
            return super().begin_apply(client_id, ops, durable)

    store = Refusing()
    async with observed_client(broker, "inline-refused", store) as (observer, client):
        store.refuse = True
        with anyio.fail_after(5), pytest.raises(StoreError, match="No space left"):
            await client.publish("inline/t", b"refused", qos=1)
        with anyio.fail_after(5), pytest.raises(StoreError):
            await client.wait_connected()
        with pytest.raises(StoreError):
            await client.publish("inline/t", b"after", qos=1)
        await asyncio.sleep(0.3)
        assert observer.payloads() == []


def test_begin_apply_is_used_only_where_it_belongs_with_apply() -> None:
    """A subclass or an instance wrapper that replaces ``apply`` alone (to count or check
    commits) keeps every commit on it; replacing both, or neither, uses ``begin_apply``."""

    class CountsApply(MemoryStore):
        async def apply(self, client_id: str, ops: Sequence[Operation]) -> None:
            await super().apply(client_id, ops)

    class ReplacesBoth(CountsApply):
        def begin_apply(
            self, client_id: str, ops: Sequence[Operation], durable: asyncio.Future[None]
        ) -> bool:
            return super().begin_apply(client_id, ops, durable)

    assert pairs_apply(MemoryStore())
    assert not pairs_apply(CountsApply())
    assert pairs_apply(ReplacesBoth())
    wrapped = MemoryStore()
    wrapped.apply = CountsApply().apply  # type: ignore[method-assign]
    assert not pairs_apply(wrapped)
    recorded = MemoryStore()
    ApplyRecorder(recorded)  # replaces both on the instance
    assert pairs_apply(recorded)


async def test_a_publisher_that_never_waits_lets_the_loop_run(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    """With ``fsync=False`` an inline commit takes no ``await``: the publisher still yields
    every few messages, so the flusher sends (in one write) and other tasks run; the messages
    arrive complete and in order."""
    count = 400
    store = FileStore(tmp_path / "sessions", fsync=False)
    recorder = ApplyRecorder(store)
    turns = 0
    stop = asyncio.Event()

    async def other_task() -> None:
        nonlocal turns
        while not stop.is_set():
            turns += 1
            await asyncio.sleep(0)

    async with observed_client(broker, "inline-nofsync", store) as (observer, client):
        other = asyncio.ensure_future(other_task())
        await asyncio.sleep(0)
        turns = 0
        for i in range(count):
            await client.publish("inline/seq", b"%d" % i, qos=1)
        during = turns
        stop.set()
        await other
        await client.drain(20)
        assert await observer.await_count(count, 20)
    assert recorder.begun >= count // 2, f"only {recorder.begun} inline commits"
    assert during >= count // 16, f"the other task ran {during} times during {count} publishes"
    assert observer.payloads("inline/seq") == [b"%d" % i for i in range(count)]


async def test_concurrent_publishers_share_the_flushers_commits(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    """Publishes started together (``gather``) must not pay a commit for whoever came first
    plus one for the rest: once a commit served several callers, publishes wait for the
    flusher's commits; a publisher alone again (one caller per commit) commits inline."""
    store = FileStore(tmp_path / "sessions")
    recorder = ApplyRecorder(store)
    async with observed_client(broker, "inline-gather", store) as (observer, client):
        for round_ in range(5):
            before = len(recorder.calls)
            await asyncio.gather(
                *(client.publish("inline/g", b"%d" % (round_ * 100 + i), qos=1) for i in range(100))
            )
            adding = [
                ops
                for ops in recorder.calls[before:]
                if any(type(op) is MessageAdded for op in ops)
            ]
            if round_:
                # A PUBACK's pass may take the outbox between two of the hundred: two at most.
                assert len(adding) <= 2, f"round {round_}: {len(adding)} commits for one gather"
        assert recorder.begun <= 1, f"{recorder.begun} inline commits among gathered publishes"
        begun = recorder.begun
        for i in range(20):
            await client.publish("inline/g", b"s%d" % i, qos=1)
        assert recorder.begun >= begun + 15, "a lone publisher did not commit inline again"
        await client.drain(20)
        assert await observer.await_count(520, 20)
