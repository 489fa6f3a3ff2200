"""The write-ahead rule, checked directly instead of through a crash's timing (issue 10).

Every packet the client writes must leave after the store operations that protect it were
committed: a QoS 1/2 PUBLISH after its MessageAdded and PacketIdAssigned, a PUBREL after its
MessageReleased, a PUBREC after its InboundReceived; and the application must not see an
inbound QoS 2 message before its InboundReceived was committed. The store is wrapped in a gate
that holds every batch uncommitted while the proxy reads everything the client has written
(tests/support/witness.py): a client that broke the rule would be caught writing a protected
packet while its batch is certainly not committed, on a fast machine or a slow one.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from mqtt_persist import Backoff, DeliveryOutcome, Message, PersistentClient
from tests.support.broker import MosquittoBroker
from tests.support.observer import PahoObserver, paho_publish_async
from tests.support.proxy import ProxyFactory
from tests.support.stores import make_store
from tests.support.tally import qos_of, topic_of
from tests.support.waiting import until
from tests.support.witness import GatedStore, WriteAheadWitness

pytestmark = pytest.mark.broker

N = 40
SEQUENTIAL = 10


@pytest.mark.parametrize("inline", [False, True], ids=["apply", "inline"])
@pytest.mark.parametrize("kind", ["memory", "file", "sqlite"])
async def test_no_protected_packet_leaves_and_no_qos2_message_is_seen_before_its_commit(
    kind: str, inline: bool, broker: MosquittoBroker, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    """With ``inline``, the store offers ``begin_apply``: a publisher that finds the flusher
    idle commits from its own task, and the flusher task sends the batch later."""
    proxy = await proxy_factory(broker, mqtt=True)
    store = GatedStore(make_store(kind, tmp_path), inline=inline)
    witness = WriteAheadWitness(store, proxy)
    gatekeeper = asyncio.create_task(witness.run())
    received: list[Message] = []
    try:
        async with (
            PahoObserver(broker.host, broker.port, "wa/out/#") as observer,
            PersistentClient(
                proxy.host, proxy.port, client_id=f"wa-{kind}", store=store,
                backoff=Backoff(initial=0.05, maximum=0.3, minimum=0.01),
            ) as client,
        ):  # fmt: skip
            await client.subscribe("wa/in", qos=2)
            await client.wait_connected(10)

            async def consume() -> None:
                async for message in client.messages:
                    witness.delivered(message)
                    received.append(message)

            consumer = asyncio.create_task(consume())
            inbound = asyncio.create_task(
                paho_publish_async(
                    broker.host, broker.port, "wa/in", [b"in-%d" % i for i in range(N)], qos=2,
                    timeout=60,
                )
            )  # fmt: skip
            deliveries = await asyncio.gather(
                *(client.publish(topic_of("wa/out", i), str(i), qos=qos_of(i)) for i in range(N))
            )
            # One at a time: with ``inline`` each is committed from this task.
            for i in range(N, N + SEQUENTIAL):
                deliveries.append(
                    await client.publish(topic_of("wa/out", i), str(i), qos=qos_of(i))
                )
            await inbound
            outcomes = await asyncio.wait_for(asyncio.gather(*deliveries), 60)
            await until(lambda: len(received) >= N, 30, "every inbound message")
            assert await observer.await_numbers(set(range(N + SEQUENTIAL)), 30)
            consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await consumer
    finally:
        await witness.stop(gatekeeper)
    assert witness.violations == []
    assert all(o is DeliveryOutcome.ACKNOWLEDGED for o in outcomes)
    if inline and store.durable:  # a MemoryStore's publish() waits for no commit
        assert store.begun >= SEQUENTIAL, "the publishers never committed inline"
    else:
        assert store.begun == 0
    # The witness really looked: every packet kind was checked as it reached the proxy, and
    # every protecting operation was held uncommitted at least once while the proxy settled.
    assert witness.checked["PUBLISH"] >= N
    assert witness.checked["PUBREL"] >= N // 2
    assert witness.checked["PUBREC"] >= N
    assert witness.checked["application"] >= N
    for op in ("MessageAdded", "PacketIdAssigned", "MessageReleased", "InboundReceived"):
        assert witness.held[op] >= 1, f"no batch with {op} was held: nothing checked for it"
