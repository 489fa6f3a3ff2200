"""What the client says when things are not what they look like (issue 9 item 4, issue 12).

* A subscribe superseded by an unsubscribe of the same filter before its SUBACK raises
  ``SubscriptionSuperseded``, not ``SubscriptionRefused`` (the broker refused nothing), against
  mosquitto.
* A clean-session client that reconnects is told it got the fresh session it asked for, not
  that the broker lost its session; a persistent one whose broker forgot it is told which
  broker behaviours cause that.
"""

from __future__ import annotations

import asyncio
import logging

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
from mqtt_persist.protocol.packets import ConnAck, Connect, PubAck, Publish
from tests.support.broker import MosquittoBroker
from tests.support.fake_broker import FakeConnection, ScriptedBroker

FAST = Backoff(initial=0.05, maximum=0.2, minimum=0.01)


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
