"""Bad input is refused with a typed error before anything is stored or sent."""

from __future__ import annotations

import pytest

from mqtt_persist import (
    InvalidClientId,
    InvalidInput,
    InvalidQoS,
    InvalidTopic,
    InvalidTopicFilter,
    MemoryStore,
    PayloadTooLarge,
    PersistentClient,
)
from mqtt_persist.validation import (
    MAX_REMAINING_LENGTH,
    coerce_payload,
    max_payload_for,
    validate_client_id,
    validate_qos,
    validate_topic,
    validate_topic_filter,
)


@pytest.mark.parametrize(
    "topic",
    ["", "a/+/b", "a/#", "#", "+", "a\x00b", "x" * 65536, "\ud800", 5, b"bytes", None],
)
def test_bad_publish_topics(topic: object) -> None:
    with pytest.raises(InvalidTopic):
        validate_topic(topic)


@pytest.mark.parametrize("topic", ["a", "a/b/c", "/", "a//b", "ünïcödé/✓", "x" * 65535, "$SYS/x"])
def test_good_publish_topics(topic: str) -> None:
    assert validate_topic(topic) == topic.encode()


@pytest.mark.parametrize(
    "topic_filter", ["", "a/#/b", "a+", "a/b#", "#/a", "a/+b/c", "a\x00", "x" * 65536, 1]
)
def test_bad_filters(topic_filter: object) -> None:
    with pytest.raises(InvalidTopicFilter):
        validate_topic_filter(topic_filter)


@pytest.mark.parametrize("topic_filter", ["#", "+", "a/#", "a/+/b", "+/+", "/#", "a//+", "a"])
def test_good_filters(topic_filter: str) -> None:
    assert validate_topic_filter(topic_filter) == topic_filter


@pytest.mark.parametrize("qos", [-1, 3, 1.0, "1", None, True])
def test_bad_qos(qos: object) -> None:
    with pytest.raises(InvalidQoS):
        validate_qos(qos)


def test_payload_coercion_and_limits() -> None:
    assert coerce_payload("héllo", limit=100) == "héllo".encode()
    assert coerce_payload(bytearray(b"ab"), limit=100) == b"ab"
    assert coerce_payload(memoryview(b"ab"), limit=100) == b"ab"
    for bad in (None, 12, 1.5, ["x"], {"a": 1}):
        with pytest.raises(InvalidInput):
            coerce_payload(bad, limit=100)
    with pytest.raises(PayloadTooLarge, match="101 bytes"):
        coerce_payload(b"x" * 101, limit=100)
    assert max_payload_for(1, 1) == MAX_REMAINING_LENGTH - 5


def test_client_id_rules() -> None:
    with pytest.raises(InvalidClientId, match="clean_session=False"):
        validate_client_id("", clean_session=False)
    assert validate_client_id("", clean_session=True) == ""
    for bad in ("a\x00", "x" * 65536, 7):
        with pytest.raises(InvalidClientId):
            validate_client_id(bad, clean_session=True)


def test_client_constructor_refuses_bad_settings() -> None:
    with pytest.raises(InvalidClientId):
        PersistentClient("127.0.0.1", client_id="")
    with pytest.raises(InvalidInput):
        PersistentClient("127.0.0.1", client_id="x", max_inflight=0)
    with pytest.raises(InvalidInput):
        PersistentClient("127.0.0.1", client_id="x", queue_full="sometimes")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        PersistentClient("127.0.0.1", client_id="x", keepalive=70000)


async def test_refused_publish_stores_nothing() -> None:
    store = MemoryStore()
    # No broker listens on port 9 of 127.0.0.1: the client stays offline, which is fine here.
    async with PersistentClient(
        "127.0.0.1", 9, client_id="g7", store=store, max_payload_size=10
    ) as client:
        bad_calls = [
            client.publish("a/+", b"x", qos=1),
            client.publish("a\x00", b"x", qos=1),
            client.publish("", b"x", qos=1),
            client.publish("a", b"x", qos=3),
            client.publish("a", b"x" * 11, qos=1),
            client.publish("a", 123, qos=1),  # type: ignore[arg-type]
            client.subscribe("a/#/b", qos=1),
            client.subscribe("a", qos=5),
            client.unsubscribe("a+"),
        ]
        for call in bad_calls:
            with pytest.raises(InvalidInput):
                await call
        assert client.stats.queued == 0
        await client.publish("a", "ok", qos=1)
        assert client.stats.queued == 1
    state = await store.load("g7")
    assert state is not None
    assert [m.payload for m in state.messages.values()] == [b"ok"]
    assert state.subscriptions == {}
