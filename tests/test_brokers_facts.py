"""What each broker of the matrix answers on the wire, checked packet by packet.

These are the measured facts behind docs/brokers.md (mosquitto 2.0.11, RabbitMQ 3.10 with
rabbitmq_mqtt, nats-server 2.9 with JetStream), kept as tests so that the document, and the
issue 9 regression tests built on them, notice when an installed broker starts behaving
differently. They talk to the brokers with a raw client (tests/support/raw_mqtt.py), not with
mqtt_persist, because the point is what the broker does, whatever a client makes of it.
"""

from __future__ import annotations

import socket
import uuid
from dataclasses import dataclass
from typing import Literal

import pytest

from mqtt_persist.protocol.packets import ConnAck, PubAck, Publish, PubRec, SubAck, Subscribe
from tests.support.raw_mqtt import CLOSED, Answer, RawMqtt

Broker = Literal["mosquitto", "rabbitmq", "nats"]


@dataclass(frozen=True)
class Expected:
    """One broker's measured answers."""

    mqtt31: bool  # accepts protocol level 3 ("MQIsdp")
    mqtt5: str  # "connack v5", "closed", or "refused rc=1" (a 3.1.1 CONNACK saying no)
    qos2_publish_answer: str  # "PubRec", "PubAck" or "closed"
    qos2_subscription_granted: int
    dot_topic_arrives_as: str | None  # None: the broker closes the publisher's connection
    space_topic_accepted: bool
    retained_on_wildcard: bool
    hash_matches_dollar_topics: bool
    hash_sees_internal_traffic: bool  # a '#' subscriber gets the broker's own JetStream API calls
    outbound_window: int  # unacknowledged QoS 1 messages sent to one subscriber
    redelivers_unacked_on_reconnect: bool


EXPECTED: dict[Broker, Expected] = {
    "mosquitto": Expected(
        mqtt31=True,
        mqtt5="connack v5",
        qos2_publish_answer="PubRec",
        qos2_subscription_granted=2,
        dot_topic_arrives_as="x/a.b",
        space_topic_accepted=True,
        retained_on_wildcard=True,
        hash_matches_dollar_topics=False,
        hash_sees_internal_traffic=False,
        outbound_window=20,
        redelivers_unacked_on_reconnect=True,
    ),
    "rabbitmq": Expected(
        mqtt31=True,
        mqtt5="closed",
        qos2_publish_answer="PubAck",
        qos2_subscription_granted=1,
        dot_topic_arrives_as="x/a/b",  # '.' is RabbitMQ's routing-key separator
        space_topic_accepted=True,
        retained_on_wildcard=False,
        hash_matches_dollar_topics=True,
        hash_sees_internal_traffic=False,
        outbound_window=10,  # mqtt.prefetch
        redelivers_unacked_on_reconnect=True,
    ),
    "nats": Expected(
        mqtt31=False,
        mqtt5="refused rc=1",
        qos2_publish_answer="closed",
        qos2_subscription_granted=1,
        dot_topic_arrives_as=None,
        space_topic_accepted=False,
        retained_on_wildcard=True,
        hash_matches_dollar_topics=True,
        hash_sees_internal_traffic=True,
        outbound_window=50,  # every one of the 50 sent (max_ack_pending is 1024)
        redelivers_unacked_on_reconnect=False,  # only once ack_wait (30 s) has passed
    ),
}


@pytest.fixture(
    params=[
        pytest.param("mosquitto", marks=pytest.mark.broker),
        pytest.param("rabbitmq", marks=pytest.mark.rabbitmq),
        pytest.param("nats", marks=pytest.mark.nats),
    ]
)
def target(request: pytest.FixtureRequest) -> tuple[Broker, str, int]:
    """``(kind, host, port)`` of a running broker of each kind."""
    kind: Broker = request.param
    fixture = {"mosquitto": "broker", "rabbitmq": "shared_rabbitmq", "nats": "nats_broker"}[kind]
    server = request.getfixturevalue(fixture)
    return kind, server.host, server.port


def unique() -> str:
    # No '.', no space: valid on every broker of the matrix.
    return uuid.uuid4().hex[:10]


def connected(host: str, port: int, name: str, *, clean_session: bool = True) -> RawMqtt:
    client = RawMqtt(host, port)
    answer = client.connect(f"{name}-{unique()}", clean_session=clean_session)
    assert isinstance(answer, ConnAck) and answer.return_code == 0, answer
    return client


def subscribed(host: str, port: int, topic_filter: str, qos: int = 1) -> RawMqtt:
    client = connected(host, port, "sub")
    client.send(Subscribe(1, [(topic_filter, qos)]))
    # nats-server may deliver messages before the SUBACK (retained ones, or its own internal
    # traffic to a '#' subscriber); they are put back for the test to see.
    early: list[Answer] = []
    while not isinstance(answer := client.receive(), SubAck):
        assert isinstance(answer, Publish), answer
        early.append(answer)
    client.unread(early)
    return client


def published(answers: list[Answer]) -> list[Publish]:
    return [p for p in answers if isinstance(p, Publish)]


def kind_of(answer: Answer) -> str:
    return answer if isinstance(answer, str) else type(answer).__name__


# --- protocol versions ---------------------------------------------------------------------


def test_mqtt_3_1_connect(target: tuple[Broker, str, int]) -> None:
    kind, host, port = target
    with RawMqtt(host, port) as client:
        answer = client.connect(f"v3-{unique()}", protocol_level=3)
    accepted = isinstance(answer, ConnAck) and answer.return_code == 0
    assert accepted is EXPECTED[kind].mqtt31, answer


def test_mqtt_5_connect(target: tuple[Broker, str, int]) -> None:
    """A well-formed MQTT 5 CONNECT (our codec speaks 3.1.1 only, so it is spelled out)."""
    kind, host, port = target
    client_id = f"v5-{unique()}".encode()
    # protocol name, level 5, clean start, keepalive 60, no properties, client id
    body = b"\x00\x04MQTT\x05\x02\x00\x3c\x00" + len(client_id).to_bytes(2, "big") + client_id
    with socket.create_connection((host, port), 5) as sock:
        sock.settimeout(5)
        sock.sendall(bytes([0x10, len(body)]) + body)
        try:
            reply = sock.recv(64)
        except ConnectionResetError:
            reply = b""
    if not reply:
        seen = "closed"
    elif reply[:2] == b"\x20\x02":  # a 3.1.1-shaped CONNACK: flags, return code
        seen = f"refused rc={reply[3]}"
    else:
        assert reply[0] == 0x20 and reply[3] == 0, reply  # CONNACK, reason code 0 (success)
        seen = "connack v5"
    assert seen == EXPECTED[kind].mqtt5


# --- QoS 2 -------------------------------------------------------------------------------


def test_answer_to_a_qos2_publish(target: tuple[Broker, str, int]) -> None:
    kind, host, port = target
    with connected(host, port, "q2") as client:
        client.publish(f"facts/{unique()}/q2", b"x", qos=2, packet_id=7)
        answer = client.receive()
    assert kind_of(answer) == EXPECTED[kind].qos2_publish_answer
    if isinstance(answer, PubAck | PubRec):
        assert answer.packet_id == 7


def test_qos2_subscription_is_granted_as(target: tuple[Broker, str, int]) -> None:
    kind, host, port = target
    with connected(host, port, "s2") as client:
        suback = client.subscribe((f"facts/{unique()}/#", 2))
    assert isinstance(suback, SubAck)
    assert suback.return_codes == [EXPECTED[kind].qos2_subscription_granted]


# --- topics --------------------------------------------------------------------------------


def test_topic_with_a_dot(target: tuple[Broker, str, int]) -> None:
    kind, host, port = target
    base = f"facts/{unique()}"
    with subscribed(host, port, f"{base}/#") as sub, connected(host, port, "dot") as pub:
        pub.publish(f"{base}/x/a.b", b"dot", qos=1)
        answer = pub.receive()
        expected = EXPECTED[kind].dot_topic_arrives_as
        arrived = [p.topic for p in published(sub.receive_all(at_least=int(bool(expected))))]
    if expected is None:
        assert (answer, arrived) == (CLOSED, [])
    else:
        assert isinstance(answer, PubAck)
        assert arrived == [f"{base}/{expected}"]


def test_topic_with_a_space(target: tuple[Broker, str, int]) -> None:
    kind, host, port = target
    base = f"facts/{unique()}"
    with subscribed(host, port, f"{base}/#") as sub, connected(host, port, "space") as pub:
        pub.publish(f"{base}/a b", b"space", qos=1)
        answer = pub.receive()
        accepted = EXPECTED[kind].space_topic_accepted
        arrived = [p.topic for p in published(sub.receive_all(at_least=int(accepted)))]
    if accepted:
        assert isinstance(answer, PubAck) and arrived == [f"{base}/a b"]
    else:
        assert (answer, arrived) == (CLOSED, [])


def test_retained_message_on_a_wildcard_subscription(target: tuple[Broker, str, int]) -> None:
    kind, host, port = target
    base = f"facts/{unique()}"
    with connected(host, port, "ret") as pub:
        pub.send(Publish(f"{base}/r", b"kept", qos=1, retain=True, packet_id=1))
        assert isinstance(pub.receive(), PubAck)
    with subscribed(host, port, f"{base}/r") as exact, subscribed(host, port, f"{base}/+") as wild:
        on_wildcard = EXPECTED[kind].retained_on_wildcard
        exact_got = [(p.payload, p.retain) for p in published(exact.receive_all(at_least=1))]
        wild_got = [
            (p.payload, p.retain) for p in published(wild.receive_all(at_least=int(on_wildcard)))
        ]
    assert exact_got == [(b"kept", True)]
    assert wild_got == ([(b"kept", True)] if on_wildcard else [])
    with connected(host, port, "unret") as pub:  # a shared broker keeps retained messages
        pub.send(Publish(f"{base}/r", b"", qos=1, retain=True, packet_id=1))
        pub.receive()


def test_hash_and_dollar_topics(target: tuple[Broker, str, int]) -> None:
    """MQTT 3.1.1 §4.7.2: '#' must not match topics starting with '$'; '$x/#' must."""
    kind, host, port = target
    topic = f"${unique()}/x"
    with (
        subscribed(host, port, "#") as everything,
        subscribed(host, port, f"{topic.split('/')[0]}/#") as dollar,
        connected(host, port, "dollar") as pub,
    ):
        pub.publish(topic, b"d", qos=1)
        assert isinstance(pub.receive(), PubAck)
        via_dollar = [p.topic for p in published(dollar.receive_all(at_least=1))]
        via_hash = [p.topic for p in published(everything.receive_all())]
    assert via_dollar == [topic]
    mine = [t for t in via_hash if t == topic]
    assert mine == ([topic] if EXPECTED[kind].hash_matches_dollar_topics else [])
    # Creating the '$x/#' subscription above was a JetStream API call on nats-server.
    internal = [t for t in via_hash if t.startswith("$JS/API/")]
    assert bool(internal) is EXPECTED[kind].hash_sees_internal_traffic, internal


# --- flow control and sessions ---------------------------------------------------------------


def test_unacknowledged_messages_sent_to_one_subscriber(target: tuple[Broker, str, int]) -> None:
    """How many QoS 1 messages a broker sends a subscriber that acknowledges none of them."""
    kind, host, port = target
    base = f"facts/{unique()}"
    with subscribed(host, port, f"{base}/#") as sub, connected(host, port, "window") as pub:
        for i in range(50):
            pub.publish(f"{base}/w", str(i).encode(), qos=1, packet_id=i + 1)
        acks = [a for a in pub.receive_all(at_least=50) if isinstance(a, PubAck)]
        window = EXPECTED[kind].outbound_window
        held = published(sub.receive_all(quiet=0.5, at_least=window))
    assert len(acks) == 50  # the publisher's side is never held back
    assert len(held) == window


def test_unacknowledged_message_on_session_resume(target: tuple[Broker, str, int]) -> None:
    """MQTT 3.1.1 §4.4: a resumed session re-sends unacknowledged PUBLISH packets (DUP=1)."""
    kind, host, port = target
    base = f"facts/{unique()}"
    client_id = f"resume-{unique()}"
    first = RawMqtt(host, port)
    assert isinstance(first.connect(client_id, clean_session=False), ConnAck)
    assert isinstance(first.subscribe((f"{base}/#", 1)), SubAck)
    with connected(host, port, "resume-pub") as pub:
        pub.publish(f"{base}/m", b"unacked", qos=1)
        assert isinstance(pub.receive(), PubAck)
    assert [p.payload for p in published(first.receive_all(at_least=1))] == [b"unacked"]
    first.drop()  # vanish without acknowledging it
    with RawMqtt(host, port) as again:
        answer = again.connect(client_id, clean_session=False)
        assert isinstance(answer, ConnAck) and answer.session_present
        expected = [(b"unacked", True)] if EXPECTED[kind].redelivers_unacked_on_reconnect else []
        packets = again.receive_all(quiet=0.5, at_least=len(expected))
        resent = [(p.payload, p.dup) for p in published(packets)]
    assert resent == expected
    with RawMqtt(host, port) as cleanup:  # end the persistent session on a shared broker
        cleanup.connect(client_id, clean_session=True)
