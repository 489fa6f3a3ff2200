"""``publish_many()`` against a real mosquitto, observed by an outside paho subscriber.

The promise is ``publish()``'s for a whole batch: every message is in the store when the call
returns, with one commit for the batch; one Delivery per message, in order; bad input anywhere
in the batch refuses all of it before anything is stored.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mqtt_persist import (
    DeliveryOutcome,
    FileStore,
    InvalidInput,
    InvalidQoS,
    InvalidTopic,
    PayloadTooLarge,
    PersistentClient,
    QueueFull,
)
from mqtt_persist.session.state import MessageAdded
from tests.support.apply_recorder import ApplyRecorder
from tests.support.broker import MosquittoBroker
from tests.support.observer import PahoObserver

pytestmark = pytest.mark.broker


@pytest.mark.parametrize("qos", [1, 2])
async def test_a_batch_is_one_commit_and_arrives_whole_and_in_order(
    broker: MosquittoBroker, tmp_path: Path, qos: int
) -> None:
    store = FileStore(tmp_path / "sessions")
    recorder = ApplyRecorder(store)
    count = 300  # more than the in-flight window (100): part of the batch waits in the queue
    async with PahoObserver(broker.host, broker.port, "many/#", qos=qos) as observer:
        async with PersistentClient(
            broker.host, broker.port, client_id=f"many-{qos}", store=store
        ) as client:
            await client.wait_connected(10)
            await client.publish("many/first", b"before", qos=qos)
            calls_before = len(recorder.calls)
            readings = [(f"many/r{i % 3}", f"{i}".encode()) for i in range(count)]
            deliveries = await client.publish_many(readings, qos=qos)
            # Durable on return: every message of the batch was applied, by one apply.
            batch_calls = {
                index
                for index, ops in enumerate(recorder.calls)
                if any(type(op) is MessageAdded for op in ops)
            } - set(range(calls_before))
            assert len(batch_calls) == 1, f"the batch took {len(batch_calls)} commits"
            assert [d.seq for d in deliveries] == recorder.added_seqs()[-count:]
            assert [d.topic for d in deliveries] == [t for t, _ in readings]
            seqs = [d.seq for d in deliveries]
            assert seqs == sorted(set(seqs))
            outcomes = [await d for d in deliveries]
        assert outcomes == [DeliveryOutcome.ACKNOWLEDGED] * count
        assert await observer.await_count(count + 1, 20), observer.count()
    for r in range(3):
        sent = [str(i).encode() for i in range(r, count, 3)]
        assert sorted(observer.payloads(f"many/r{r}"), key=int) == sent
        assert len(observer.payloads(f"many/r{r}")) == len(sent), "a message arrived twice"


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (("many/+/x", b"wildcard"), InvalidTopic),
        (("many/ok", b"x" * 2000), PayloadTooLarge),
        (("many/ok",), InvalidInput),
    ],
)
async def test_one_bad_message_refuses_the_batch_and_stores_nothing(
    broker: MosquittoBroker, tmp_path: Path, bad: tuple[str, ...], error: type[Exception]
) -> None:
    store = FileStore(tmp_path / "sessions")
    recorder = ApplyRecorder(store)
    async with PahoObserver(broker.host, broker.port, "many/#") as observer:
        async with PersistentClient(
            broker.host, broker.port, client_id="many-bad", store=store, max_payload_size=1000
        ) as client:
            await client.wait_connected(10)
            batch = [("many/ok", b"1"), ("many/ok", b"2"), bad, ("many/ok", b"3")]
            with pytest.raises(error) as caught:
                await client.publish_many(batch, qos=1)  # type: ignore[arg-type]
            assert "message 2 of the batch" in "".join(caught.value.__notes__)
            with pytest.raises(InvalidQoS):
                await client.publish_many([("many/ok", b"q")], qos=3)
            assert recorder.added_seqs() == []
            assert client.stats.queued == 0 and client.stats.inflight == 0
            # Proven by a marker published after the refusals: it is the only arrival.
            await (await client.publish("many/marker", b"m", qos=1))
        assert await observer.await_count(1)
        assert [(m.topic, m.payload) for m in observer.messages] == [("many/marker", b"m")]


async def test_a_batch_that_does_not_fit_the_queue_is_refused_whole(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    store = FileStore(tmp_path / "sessions")
    recorder = ApplyRecorder(store)
    # Never connected (nobody listens on the port): every message stays queued.
    broker.stop()
    async with PersistentClient(
        broker.host,
        broker.port,
        client_id="many-full",
        store=store,
        max_queued=5,
        queue_full="error",
    ) as client:
        await client.publish_many([("many/q", b"a"), ("many/q", b"b"), ("many/q", b"c")], qos=1)
        with pytest.raises(QueueFull):
            await client.publish_many([("many/q", b"d"), ("many/q", b"e"), ("many/q", b"f")], qos=1)
        with pytest.raises(QueueFull):
            await client.publish_many([("many/q", b"x")] * 6, qos=1)
        assert client.stats.queued == 3
        assert len(recorder.added_seqs()) == 3
        assert await client.publish_many([], qos=1) == []
