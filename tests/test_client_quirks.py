"""What the client says when things are not what they look like (issue 9 item 4, issue 12).

* A subscribe superseded by an unsubscribe of the same filter before its SUBACK raises
  ``SubscriptionSuperseded``, not ``SubscriptionRefused`` (the broker refused nothing), against
  mosquitto.
* A clean-session client that reconnects is told it got the fresh session it asked for, not
  that the broker lost its session; a persistent one whose broker forgot it is told which
  broker behaviours cause that.
* Backoff (issue 9 item 3): a CONNACK alone does not reset the reconnect delay, a connection
  that stayed up and heard from the broker does; attempts per minute are capped.
* ``protocol="auto"`` falls back to 3.1.1 for good only on evidence.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket

import anyio
import pytest

from mqtt_persist import (
    Backoff,
    DeliveryOutcome,
    PersistentClient,
    ProtocolVersion,
    SubscriptionRefused,
    SubscriptionSuperseded,
)
from mqtt_persist.backoff import AttemptBudget
from mqtt_persist.protocol.packets import ConnAck, Connect, PubAck, Publish
from tests.support.broker import MosquittoBroker
from tests.support.fake_broker import FakeConnection, ScriptedBroker
from tests.support.waiting import until

FAST = Backoff(initial=0.05, maximum=0.2, minimum=0.01)
V311 = ProtocolVersion.V311
V5 = ProtocolVersion.V5


async def test_a_subscribe_superseded_by_an_unsubscribe_is_not_reported_refused(
    broker: MosquittoBroker, caplog: pytest.LogCaptureFixture
) -> None:
    async with PersistentClient(broker.host, broker.port, client_id="superseded") as client:
        await client.wait_connected(10)
        subscribed = await client.subscribe("quirks/superseded/#", qos=1)
        unsubscribed = await client.unsubscribe("quirks/superseded/#")
        with anyio.fail_after(10):
            await unsubscribed
            with pytest.raises(SubscriptionSuperseded, match="quirks/superseded/#") as caught:
                await subscribed
        assert not isinstance(caught.value, SubscriptionRefused)
        assert caught.value.filters == ["quirks/superseded/#"]
    assert "refused" not in caplog.text


async def test_a_later_subscribe_of_the_same_filter_gets_its_own_answer(
    broker: MosquittoBroker,
) -> None:
    async with PersistentClient(broker.host, broker.port, client_id="resubscribed") as client:
        await client.wait_connected(10)
        first = await client.subscribe("quirks/twice", qos=0)
        second = await client.subscribe("quirks/twice", qos=2)
        with anyio.fail_after(10):
            # Both SUBSCRIBEs went out: each is answered by its own SUBACK.
            assert await first == (0,)
            assert await second == (2,)


def _one_message_then_drop(session_present: bool) -> object:
    """A broker that takes a QoS 1 message without acknowledging it, hangs up, and on the next
    connection answers CONNACK without the session (``session_present``) and acknowledges."""

    async def script(conn: FakeConnection, index: int) -> None:
        await conn.expect(Connect)
        await conn.send(ConnAck(session_present and index > 0, 0))
        publish = await conn.expect(Publish)
        if index == 0:
            conn.close()
            return
        await conn.send(PubAck(publish.packet_id))  # type: ignore[arg-type]
        await asyncio.sleep(10)

    return script


@pytest.mark.parametrize("clean_session", [True, False])
async def test_a_session_not_present_is_described_by_what_the_client_asked_for(
    clean_session: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mqtt_persist")
    async with (
        ScriptedBroker(_one_message_then_drop(False)) as fake,  # type: ignore[arg-type]
        PersistentClient(
            fake.host,
            fake.port,
            client_id="truthful",
            clean_session=clean_session,
            backoff=FAST,
            protocol=ProtocolVersion.V311,
        ) as client,
    ):
        delivery = await client.publish("t", b"x", qos=1)
        with anyio.fail_after(10):
            assert await delivery == DeliveryOutcome.ACKNOWLEDGED
    assert client.stats.requeued == 1
    if clean_session:
        assert "new clean session, as asked" in caplog.text
        assert "without our session" not in caplog.text
    else:
        assert "the broker answered CONNACK without our session" in caplog.text
        assert "restarted without persistence" in caplog.text
    assert "lost the session" not in caplog.text


# --- backoff that means it -----------------------------------------------------------------------


def test_attempt_budget_caps_attempts_per_minute() -> None:
    budget = AttemptBudget(3)
    for t in (0.0, 1.0, 2.0):
        assert budget.wait(t) == 0
        budget.started(t)
    assert budget.wait(3.0) == 57.0  # the first of the three leaves the window at 60 s
    assert budget.wait(60.0) == 0
    unlimited = AttemptBudget(0)
    for t in range(100):
        unlimited.started(float(t))
    assert unlimited.wait(100.0) == 0


@pytest.mark.parametrize(
    "bad", [{"reset_after": -1.0}, {"max_per_minute": -1}, {"max_per_minute": 1.5}]
)
def test_backoff_refuses_bad_settings(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Backoff(**bad)  # type: ignore[arg-type]


def _attempts(caplog: pytest.LogCaptureFixture) -> list[int]:
    return [int(m) for m in re.findall(r"reconnecting in [\d.]+s \(attempt (\d+)\)", caplog.text)]


async def test_a_connack_alone_does_not_reset_the_backoff(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A broker that accepts and hangs up at once (nats-server on a PUBLISH it will not take)
    is reconnected to with growing delays, not the first delay every time."""
    caplog.set_level(logging.DEBUG, logger="mqtt_persist")

    async def script(conn: FakeConnection, index: int) -> None:
        await conn.expect(Connect)
        await conn.send(ConnAck(False, 0))  # and close at once

    backoff = Backoff(initial=0.01, maximum=0.05, minimum=0.001)
    async with (
        ScriptedBroker(script) as fake,
        PersistentClient(
            fake.host, fake.port, client_id="no-reset", backoff=backoff, protocol=V311
        ) as client,
    ):
        await until(lambda: fake.connections >= 5, 10, "five connections")
        assert client.stats.connections >= 4
    attempts = _attempts(caplog)
    assert attempts[:4] == [1, 2, 3, 4], attempts


async def test_a_connection_that_stayed_up_and_made_progress_resets_the_backoff(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="mqtt_persist")

    async def script(conn: FakeConnection, index: int) -> None:
        await conn.expect(Connect)
        await conn.send(ConnAck(False, 0))
        if index == 2:  # up for a while, and the broker acknowledges a message
            publish = await conn.expect(Publish)
            await conn.send(PubAck(publish.packet_id))  # type: ignore[arg-type]
            await asyncio.sleep(0.5)
        elif index == 3:  # up as long, but nothing from the broker after CONNACK
            await asyncio.sleep(0.5)
        elif index >= 5:
            await asyncio.sleep(10)

    backoff = Backoff(initial=0.01, maximum=0.05, minimum=0.001, reset_after=0.3)
    async with (
        ScriptedBroker(script) as fake,
        PersistentClient(
            fake.host, fake.port, client_id="reset", backoff=backoff, protocol=V311
        ) as client,
    ):
        await client.publish("t", b"x", qos=1)
        await until(lambda: fake.connections >= 6, 15, "six connections")
    # After connections 0, 1: attempts 1, 2. Connection 2 was stable: 1 again. Connection 3
    # stayed up as long but heard nothing: 2. Connection 4 hung up at once: 3.
    assert _attempts(caplog)[:5] == [1, 2, 1, 2, 3], _attempts(caplog)


async def test_reconnects_per_minute_are_capped(caplog: pytest.LogCaptureFixture) -> None:
    async def script(conn: FakeConnection, index: int) -> None:
        await conn.expect(Connect)
        await conn.send(ConnAck(False, 0))

    backoff = Backoff(initial=0.01, maximum=0.01, minimum=0.001, max_per_minute=3)
    async with (
        ScriptedBroker(script) as fake,
        PersistentClient(fake.host, fake.port, client_id="capped", backoff=backoff, protocol=V311),
    ):
        await until(
            lambda: "connections opened to the broker in the last minute" in caplog.text, 10, "cap"
        )
        await anyio.sleep(1.0)
        assert fake.connections == 3


async def test_refused_tcp_connects_do_not_count_against_the_cap(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A broker that is down costs nothing per attempt: the delays pace those, and the cap
    must not add a minute's wait once it is back."""
    caplog.set_level(logging.DEBUG, logger="mqtt_persist")
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    backoff = Backoff(initial=0.01, maximum=0.01, minimum=0.001, max_per_minute=3)
    async with PersistentClient("127.0.0.1", port, client_id="refused-tcp", backoff=backoff):
        await until(lambda: len(_attempts(caplog)) >= 10, 10, "ten attempts")
    assert "connections opened to the broker" not in caplog.text


async def test_connections_cut_after_carrying_traffic_do_not_count_against_the_cap(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A flaky network cuts connections that were working: the broker acknowledged a message
    on each before the cut. That is not a broker refusing us, and the cap must not stall it."""

    async def script(conn: FakeConnection, index: int) -> None:
        await conn.expect(Connect)
        await conn.send(ConnAck(index > 0, 0))
        publish = await conn.expect(Publish)
        await conn.send(PubAck(publish.packet_id))  # type: ignore[arg-type]
        # ...and the link dies.

    backoff = Backoff(initial=0.01, maximum=0.01, minimum=0.001, max_per_minute=3)
    async with (
        ScriptedBroker(script) as fake,
        PersistentClient(
            fake.host, fake.port, client_id="cut", backoff=backoff, protocol=V311,
            exit_timeout=0,
        ) as client,
    ):  # fmt: skip
        for i in range(8):
            await client.publish("t", str(i).encode(), qos=1)
        await until(lambda: fake.connections >= 8, 10, "eight connections, each acknowledging")
    assert "connections opened to the broker in the last minute" not in caplog.text


# --- protocol="auto": fall back to 3.1.1 on evidence, not on any close ----------------------------


def _versions(close_311_first: bool) -> tuple[list[int], object]:
    """A broker that closes an MQTT 5 CONNECT unanswered; 3.1.1 is closed unanswered too on the
    first try when ``close_311_first`` (a broker going down, say), and accepted otherwise."""
    seen: list[int] = []

    async def script(conn: FakeConnection, index: int) -> None:
        await conn.expect(Connect)
        seen.append(conn.protocol_version)
        if conn.protocol_version == 5:
            return  # close without CONNACK
        if close_311_first and seen.count(4) == 1:
            return
        await conn.send(ConnAck(False, 0))
        if len(seen) < 6:
            return  # hang up: the client reconnects
        await asyncio.sleep(10)

    return seen, script


async def test_auto_keeps_3_1_1_once_the_broker_closed_5_and_accepted_3_1_1() -> None:
    seen, script = _versions(close_311_first=False)
    async with (
        ScriptedBroker(script) as fake,  # type: ignore[arg-type]
        PersistentClient(fake.host, fake.port, client_id="auto-keep", backoff=FAST) as client,
    ):
        await until(lambda: len(seen) >= 6, 10, "six connections")
        assert client.protocol_version is V311
    # Two unanswered MQTT 5 CONNECTs in a row, then 3.1.1 accepted: 3.1.1 for good.
    assert seen[:6] == [5, 5, 4, 4, 4, 4]


async def test_auto_tries_5_again_when_3_1_1_was_not_accepted_either() -> None:
    """A close before CONNACK followed by a failed 3.1.1 attempt says nothing about the
    protocol: the client goes back to MQTT 5 (formerly: 3.1.1 for the client's lifetime)."""
    seen, script = _versions(close_311_first=True)
    async with (
        ScriptedBroker(script) as fake,  # type: ignore[arg-type]
        PersistentClient(fake.host, fake.port, client_id="auto-retry", backoff=FAST),
    ):
        await until(lambda: len(seen) >= 6, 10, "six connections")
    assert seen[:6] == [5, 5, 4, 5, 5, 4]


async def test_auto_keeps_mqtt_5_after_one_connect_cut_unanswered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One MQTT 5 CONNECT closed unanswered (a network cut on the CONNECT, a broker going
    down) is not evidence against MQTT 5: the client tries 5 again and stays on it (formerly it
    probed 3.1.1, which this broker accepts too, and kept 3.1.1 for its lifetime)."""
    caplog.set_level(logging.INFO, logger="mqtt_persist")
    seen: list[int] = []

    async def script(conn: FakeConnection, index: int) -> None:
        await conn.expect(Connect)
        seen.append(conn.protocol_version)
        if index == 0:
            return  # the cut: closed without CONNACK
        await conn.send(ConnAck(False, 0))
        await asyncio.sleep(10)

    async with (
        ScriptedBroker(script) as fake,
        PersistentClient(fake.host, fake.port, client_id="auto-cut", backoff=FAST) as client,
    ):
        await client.wait_connected(10)
        assert client.protocol_version is V5
    assert seen == [5, 5]
    assert "trying MQTT 5 once more" in caplog.text
    assert "trying MQTT 3.1.1" not in caplog.text


async def test_auto_without_reconnect_probes_3_1_1_after_two_unanswered_connects() -> None:
    """reconnect=False gets the same three attempts, in ``__aenter__``: 5, 5, then 3.1.1."""
    seen: list[int] = []

    async def script(conn: FakeConnection, index: int) -> None:
        await conn.expect(Connect)
        seen.append(conn.protocol_version)
        if conn.protocol_version == 5:
            return  # RabbitMQ 3.10 closes an MQTT 5 CONNECT without an answer
        await conn.send(ConnAck(False, 0))
        await asyncio.sleep(10)

    async with (
        ScriptedBroker(script) as fake,
        PersistentClient(fake.host, fake.port, client_id="auto-once", reconnect=False) as client,
    ):
        assert client.is_connected  # enter returns connected: no wait needed
        assert client.protocol_version is V311
    assert seen == [5, 5, 4]
