"""The client's parts on their own: options, wake-ups, the CONNACK deadline, refusals, deferral.

The split of ``PersistentClient`` into modules (options, signals, connection, flusher) made a
few behaviours explicit that the end-to-end tests only cover in passing; these pin them down,
against a scripted broker where the broker's side must be exact.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import anyio
import pytest

from mqtt_persist import (
    Backoff,
    ConnectionLost,
    InvalidClientId,
    InvalidInput,
    MemoryStore,
    PersistentClient,
)
from mqtt_persist.client.options import ClientOptions
from mqtt_persist.client.signals import CommitTicket, Signal
from mqtt_persist.protocol.packets import ConnAck, Connect, ProtocolVersion, PubAck, Publish
from mqtt_persist.session.state import MessageAdded, MessageRemoved, Operation
from tests.support.fake_broker import FakeConnection, ScriptedBroker
from tests.support.waiting import until

FAST = Backoff(initial=0.05, maximum=0.2, minimum=0.01)
V311 = ProtocolVersion.V311


# --- options -----------------------------------------------------------------------------------


def test_options_refuse_each_bad_setting_with_a_message_naming_it() -> None:
    cases: list[tuple[dict[str, object], str]] = [
        ({"keepalive": 70000}, "keepalive must be an int in 0..65535"),
        ({"max_inflight": 0}, "max_inflight must be in 1..65535"),
        ({"max_inflight_qos2": 101}, "max_inflight_qos2 must be in 1..max_inflight"),
        ({"max_queued": 0}, "max_queued must be a positive int or None"),
        ({"queue_full": "sometimes"}, "queue_full must be 'block', 'drop_oldest' or 'error'"),
        ({"max_payload_size": -1}, "max_payload_size must not be negative"),
        ({"queue_memory_limit": -1}, "queue_memory_limit must be an int >= 0"),
        ({"session_expiry": -1.0}, "session_expiry must be >= 0 seconds"),
        ({"cleanup_interval": 0}, "cleanup_interval must be > 0 or None"),
        ({"on_corrupt": "ignore"}, "on_corrupt must be 'raise' or 'start_clean'"),
    ]
    for bad, message in cases:
        with pytest.raises(InvalidInput, match=message.replace(".", r"\.")):
            ClientOptions(hostname="h", client_id="x", **bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidInput, match=message.replace(".", r"\.")):
            PersistentClient("h", client_id="x", **bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidClientId):
        ClientOptions(hostname="h", client_id="")


def test_options_give_the_session_its_config() -> None:
    options = ClientOptions(
        hostname="h", client_id="x", password="pw", max_queued=None, session_expiry=0
    )
    config = options.session_config()
    assert config.password == b"pw"
    assert config.max_queued == 0  # the session's "unbounded"
    assert options.expires_after is None  # 0 means never, like None
    client = PersistentClient("h", client_id="x", session_expiry=0)
    assert client.session_expiry is None


# --- wake-ups ----------------------------------------------------------------------------------


async def test_signal_clears_without_orphaning_a_waiter() -> None:
    signal = Signal()
    woken: list[str] = []

    async def waiter(name: str) -> None:
        await signal.wait()
        woken.append(name)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(waiter, "before")
        await anyio.sleep(0.01)
        signal.clear()  # not set: the waiting task must still wake on the next set()
        signal.set()
        signal.clear()  # set: the task already woken stays woken
        await anyio.sleep(0.01)
        assert woken == ["before"]
        tasks.start_soon(waiter, "after")
        await anyio.sleep(0.01)
        assert woken == ["before"]  # cleared: the new waiter waits for the next set()
        signal.set()
    assert woken == ["before", "after"]
    assert signal.is_set()


async def test_commit_ticket_fails_every_waiter_with_the_commit_error() -> None:
    ticket = CommitTicket()
    errors: list[BaseException] = []

    async def waiter() -> None:
        try:
            await ticket.wait()
        except OSError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tasks:
        for _ in range(3):
            tasks.start_soon(waiter)
        await anyio.sleep(0.01)
        error = OSError("disk full")
        ticket.resolve(error)
        ticket.resolve(None)  # the first resolution stands
    assert errors == [error, error, error]
    assert ticket.resolved


# --- the connection ----------------------------------------------------------------------------


async def _silent_after_connect(conn: FakeConnection, index: int) -> None:
    await conn.expect(Connect)
    await asyncio.sleep(10)  # never a CONNACK


async def test_missing_connack_is_a_deadline_and_reconnect_false_raises_connection_lost() -> None:
    """Regression: the CONNACK timeout used to surface as a bare anyio.ClosedResourceError."""
    async with ScriptedBroker(_silent_after_connect) as fake:
        with anyio.fail_after(10), pytest.raises(ConnectionLost, match=r"no CONNACK within 0\.3s"):
            async with PersistentClient(
                fake.host, fake.port, client_id="no-connack", reconnect=False, connect_timeout=0.3
            ):
                pass
    assert not fake.errors


async def test_missing_connack_ends_the_connection_and_the_client_reconnects(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="mqtt_persist")
    async with (
        ScriptedBroker(_silent_after_connect) as fake,
        PersistentClient(
            fake.host, fake.port, client_id="no-connack-2", connect_timeout=0.2, backoff=FAST
        ),
    ):
        await until(lambda: fake.connections >= 2, 10, "a reconnect after the CONNACK deadline")
    assert "no CONNACK within 0.2s" in caplog.text


async def test_server_unavailable_is_retried_and_not_fatal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="mqtt_persist")

    async def script(conn: FakeConnection, index: int) -> None:
        await conn.expect(Connect)
        await conn.send(ConnAck(False, 3 if index == 0 else 0))
        await asyncio.sleep(10)

    async with (
        ScriptedBroker(script) as fake,
        PersistentClient(
            fake.host, fake.port, client_id="busy-broker", backoff=FAST, protocol=V311
        ) as client,
    ):
        await client.wait_connected(10)
        assert client.stats.connections == 1
    assert "server unavailable (return code 3); retrying" in caplog.text
    assert not fake.errors


# --- the flusher -------------------------------------------------------------------------------


class RecordingStore(MemoryStore):
    """A durable-looking MemoryStore that records every committed batch."""

    durable = True

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[Operation]] = []

    async def apply(self, client_id: str, ops: Sequence[Operation]) -> None:
        self.batches.append(list(ops))
        await super().apply(client_id, ops)


async def test_a_deferred_removal_is_committed_without_further_activity() -> None:
    """An acknowledged message's removal alone waits for company, but not for ever."""

    async def script(conn: FakeConnection, index: int) -> None:
        await conn.expect(Connect)
        await conn.send(ConnAck(False, 0))
        publish = await conn.expect(Publish)
        assert publish.packet_id is not None
        await conn.send(PubAck(publish.packet_id))
        await asyncio.sleep(10)

    store = RecordingStore()
    async with (
        ScriptedBroker(script) as fake,
        PersistentClient(
            fake.host, fake.port, client_id="deferred", store=store, backoff=FAST
        ) as client,
    ):
        await client.wait_connected(10)
        delivery = await client.publish("t", b"x", qos=1)
        with anyio.fail_after(5):
            await delivery
        await until(
            lambda: any(type(op) is MessageRemoved for b in store.batches for op in b),
            5,
            "the deferred removal to be committed",
        )
    added = [i for i, b in enumerate(store.batches) if any(type(o) is MessageAdded for o in b)]
    removed = [i for i, b in enumerate(store.batches) if any(type(o) is MessageRemoved for o in b)]
    assert len(added) == 1 and len(removed) == 1 and removed[0] > added[0]
    assert all(type(op) is MessageRemoved for op in store.batches[removed[0]])
    assert not fake.errors


async def test_a_connection_confirms_ownership_before_connect_and_before_resending() -> None:
    """The flusher commits (an empty batch here) before a connection's CONNECT and before its
    first packets after CONNACK: a shared store's fencing check then runs before the client
    takes the client id's connection or resends an open flow (docs/stores.md, fencing)."""
    store = RecordingStore()
    seen: list[tuple[str, list[list[Operation]]]] = []

    async def script(conn: FakeConnection, index: int) -> None:
        await conn.expect(Connect)
        seen.append(("CONNECT", [list(b) for b in store.batches]))
        if index == 0:
            await conn.send(ConnAck(False, 0))
            await conn.expect(Publish)
            return  # the connection ends with the message in flight
        await conn.send(ConnAck(True, 0))
        before_resend = len(store.batches)
        resent = await conn.expect(Publish)
        assert resent.dup
        seen.append(("resend", [list(b) for b in store.batches[before_resend:]]))
        await conn.send(PubAck(resent.packet_id or 0))
        await asyncio.sleep(10)

    async with (
        ScriptedBroker(script) as fake,
        PersistentClient(fake.host, fake.port, client_id="owner", store=store, backoff=FAST) as c,
    ):
        await c.wait_connected(10)
        delivery = await c.publish("t", b"x", qos=1)
        with anyio.fail_after(10):
            await delivery
    first_connect, second_connect, resend = seen
    assert first_connect[1][-1:] == [[]]  # before the first CONNECT: the check
    assert second_connect[1][-1] == []  # before the reconnect's CONNECT
    assert resend[1] == [[]]  # after CONNACK, before the resent PUBLISH
    assert not fake.errors
