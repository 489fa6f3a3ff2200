"""Manual acknowledgement against a real mosquitto, across SIGKILL (issue 11).

A child process (tests/support/ack_child.py) runs ``PersistentClient(..., ack="manual")`` on a
durable store and acknowledges only some messages; paho publishes them. After the child got
everything and acknowledged what it acknowledges, it is SIGKILLed and started again: every
message it had not acknowledged arrives again, and no QoS 2 message it had acknowledged does,
including those whose PUBREC was still held back behind an unacknowledged earlier message
(MQTT sends acknowledgements in arrival order, so those never reached the broker).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pytest

from mqtt_persist import PersistentClient
from tests.support.broker import MosquittoBroker
from tests.support.children import spawn_ready
from tests.support.observer import paho_publish_async
from tests.support.stores import DURABLE_KINDS, store_spec
from tests.support.waiting import until

pytestmark = pytest.mark.broker


@dataclass(eq=False)
class AckChild:
    process: asyncio.subprocess.Process
    got: list[tuple[str, int, int]] = field(default_factory=list)
    acked: list[str] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    async def read(self) -> None:
        assert self.process.stdout is not None
        async for raw in self.process.stdout:
            word, _, rest = raw.decode().strip().partition(" ")
            if word == "GOT":
                payload, qos, dup = rest.split()
                self.got.append((payload, int(qos), int(dup)))
            elif word == "ACKED":
                self.acked.append(rest)

    def payloads(self) -> list[str]:
        return [p for p, _, _ in self.got]

    async def stop(self, *, kill: bool) -> None:
        process = self.process
        if kill:
            process.kill()
        elif process.stdin is not None:
            process.stdin.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), 30)
        if process.returncode is None:
            process.kill()
            await process.wait()
        if self.reader is not None:
            await self.reader


async def spawn(broker: MosquittoBroker, spec: str, client_id: str, mode: str) -> AckChild:
    process = await spawn_ready(
        sys.executable, "-m", "tests.support.ack_child", broker.host, str(broker.port), spec,
        client_id, "app/#", mode, what="ack child",
    )  # fmt: skip
    child = AckChild(process)
    child.reader = asyncio.create_task(child.read())
    return child


def _spec(kind: str, tmp_path: Path) -> str:
    redis_url = None
    if kind == "redis":
        from tests.support.redis_server import shared_redis_url

        redis_url = shared_redis_url()
    return store_spec(kind, tmp_path, redis_url=redis_url)


# No store operation is new: a QoS 2 ID is stored at the application's ack with the same
# InboundReceived as before, so each durable store kind of the crash tests is exercised.
@pytest.mark.parametrize("kind", DURABLE_KINDS)
async def test_unacknowledged_messages_come_again_acknowledged_qos2_never(
    kind: str, broker: MosquittoBroker, tmp_path: Path
) -> None:
    spec = _spec(kind, tmp_path)
    client_id = "ack-app"
    child = await spawn(broker, spec, client_id, "some")
    # Arrival order on one connection: an unacknowledged message early on holds back the
    # PUBREC/PUBACK of everything after it, acknowledged or not.
    qos2 = ["ack-a0", "keep-b1", "ack-a2", "keep-b3", "ack-a4"]
    qos1 = ["ack-q5", "keep-q6"]
    await paho_publish_async(broker.host, broker.port, "app/2", [p.encode() for p in qos2], 2)
    await paho_publish_async(broker.host, broker.port, "app/1", [p.encode() for p in qos1], 1)
    acked_qos2 = {"ack-a0", "ack-a2", "ack-a4"}
    await until(
        lambda: set(child.payloads()) >= set(qos2 + qos1) and set(child.acked) >= {"ack-q5"},
        30,
        "the child got every message and acknowledged the ack-* ones",
    )
    assert set(child.acked) >= acked_qos2
    await child.stop(kill=True)

    again = await spawn(broker, spec, client_id, "all")
    try:
        # A marker published after the rest: once it arrived, whatever was coming came.
        await paho_publish_async(broker.host, broker.port, "app/2", [b"ack-end"], 2)
        await until(lambda: "ack-end" in again.payloads(), 30, "the marker")
        redelivered = again.payloads()
        # Never acknowledged: delivered again, flagged as a resend.
        for payload in ("keep-b1", "keep-b3", "keep-q6"):
            assert payload in redelivered, (payload, redelivered)
        assert all(dup == 1 for p, _, dup in again.got if p.startswith("keep")), again.got
        # Acknowledged at QoS 2: never again, even those whose PUBREC never left.
        assert not acked_qos2 & set(redelivered), redelivered
        await until(lambda: "ack-end" in again.acked, 30, "the marker acknowledged")
    finally:
        await again.stop(kill=False)
    # All acknowledged now: a third run gets nothing old.
    third = await spawn(broker, spec, client_id, "all")
    try:
        await paho_publish_async(broker.host, broker.port, "app/2", [b"ack-last"], 2)
        await until(lambda: "ack-last" in third.payloads(), 30, "the last marker")
        assert third.payloads() == ["ack-last"], third.got
    finally:
        await third.stop(kill=False)


async def test_processing_acks_on_success_only_and_acks_leave_in_order(
    broker: MosquittoBroker,
) -> None:
    async with PersistentClient(
        broker.host, broker.port, client_id="ack-inproc", ack="manual"
    ) as client:
        await client.subscribe("inproc/t", qos=1)
        await client.wait_connected(10)
        await paho_publish_async(broker.host, broker.port, "inproc/t", [b"1", b"2"], 1)
        messages = client.messages
        m1 = await anext(messages)
        m2 = await anext(messages)
        assert m1.needs_ack and m2.needs_ack
        with pytest.raises(RuntimeError):
            async with m1.processing():
                raise RuntimeError("processing failed")
        await client.ack(m2)
        # m2 is acknowledged by the application, but its PUBACK waits for m1's.
        assert client.stats.unacknowledged == 2
        async with m1.processing():
            pass
        await until(lambda: client.stats.unacknowledged == 0, 10, "both PUBACKs sent")
        await m1.ack()  # twice: nothing happens


async def test_manual_mode_acknowledges_request_responses_itself(broker: MosquittoBroker) -> None:
    # A response goes to the request() waiting for it, never to ``messages``: nobody could
    # acknowledge it, and it would hold back every later acknowledgement.
    async with (
        PersistentClient(broker.host, broker.port, client_id="ack-responder") as responder,
        PersistentClient(
            broker.host, broker.port, client_id="ack-requester", ack="manual"
        ) as requester,
    ):
        await (await responder.subscribe("svc/req", qos=1))
        await (await requester.subscribe("svc/reply/#", qos=1))

        async def serve() -> None:
            async for message in responder.messages:
                await responder.respond(message, b"pong", qos=1)

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(serve)
            answer = await requester.request(
                "svc/req", b"ping", response_topic="svc/reply/1", qos=1, timeout=10
            )
            tasks.cancel_scope.cancel()
        assert answer.payload == b"pong"
        await until(lambda: requester.stats.unacknowledged == 0, 10, "the response's PUBACK")
        assert requester.stats.unread == 0
