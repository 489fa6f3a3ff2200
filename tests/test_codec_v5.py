"""Tests of the MQTT 5 side of the codec: every packet with properties and reason codes, round
trips split at every byte, the property rules (which packet, how often, which values), malformed
and misplaced input, the packet-size limit, the protocol-version choice per connection, the
public property helpers, a byte-for-byte cross-check against paho-mqtt 2.2's MQTT 5 packets
(its builders, its decoders, and a real paho client on a loopback socket), and a conversation
with a real mosquitto 2 in MQTT 5, observed by an independent paho client.

The property rules are written out here a second time, from the specification (MQTT 5 table
2-4 and the reason-code tables of §3), rather than read from the codec, so that a mistake in the
codec's tables shows up as a disagreement instead of being repeated by the tests.
"""

from __future__ import annotations

import itertools
import re
import socket
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from paho.mqtt import _packet as paho_packet
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties
from paho.mqtt.reasoncodes import ReasonCode as PahoReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from mqtt_persist.errors import MalformedPacket, PacketTooLarge
from mqtt_persist.protocol import (
    MAX_PACKET_SIZE,
    MQTT_5,
    NO_PROPERTIES,
    VALID_REASON_CODES,
    Auth,
    ConnAck,
    Connect,
    Decoder,
    Disconnect,
    Packet,
    PacketType,
    PingReq,
    PingResp,
    Properties,
    ProtocolVersion,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    ReasonCode,
    RetainHandling,
    SubAck,
    Subscribe,
    SubscriptionOptions,
    UnsubAck,
    Unsubscribe,
    Will,
    decode_properties,
    describe_reason_code,
    encode,
    encode_properties,
    is_failure,
)
from tests.test_codec import _PahoBuilder, _split_frame, mqtt_text, packet_ids, payloads

V5 = MQTT_5

# ---------------------------------------------------------------------------------------------
# The specification, written out independently of the codec
# ---------------------------------------------------------------------------------------------

#: MQTT 5 table 2-4: field -> (identifier, name, kind, where it may appear).
SPEC: dict[str, tuple[int, str, str, set[str]]] = {
    "payload_format_indicator": (0x01, "Payload Format Indicator", "bit", {"PUBLISH", "will"}),
    "message_expiry_interval": (0x02, "Message Expiry Interval", "u32", {"PUBLISH", "will"}),
    "content_type": (0x03, "Content Type", "str", {"PUBLISH", "will"}),
    "response_topic": (0x08, "Response Topic", "str", {"PUBLISH", "will"}),
    "correlation_data": (0x09, "Correlation Data", "bin", {"PUBLISH", "will"}),
    "subscription_identifiers": (0x0B, "Subscription Identifier", "vbi", {"PUBLISH", "SUBSCRIBE"}),
    "session_expiry_interval": (
        0x11,
        "Session Expiry Interval",
        "u32",
        {"CONNECT", "CONNACK", "DISCONNECT"},
    ),
    "assigned_client_identifier": (0x12, "Assigned Client Identifier", "str", {"CONNACK"}),
    "server_keep_alive": (0x13, "Server Keep Alive", "u16", {"CONNACK"}),
    "authentication_method": (0x15, "Authentication Method", "str", {"CONNECT", "CONNACK", "AUTH"}),
    "authentication_data": (0x16, "Authentication Data", "bin", {"CONNECT", "CONNACK", "AUTH"}),
    "request_problem_information": (0x17, "Request Problem Information", "flag", {"CONNECT"}),
    "will_delay_interval": (0x18, "Will Delay Interval", "u32", {"will"}),
    "request_response_information": (0x19, "Request Response Information", "flag", {"CONNECT"}),
    "response_information": (0x1A, "Response Information", "str", {"CONNACK"}),
    "server_reference": (0x1C, "Server Reference", "str", {"CONNACK", "DISCONNECT"}),
    "reason_string": (
        0x1F,
        "Reason String",
        "str",
        {"CONNACK", "PUBACK", "PUBREC", "PUBREL", "PUBCOMP", "SUBACK", "UNSUBACK"}
        | {"DISCONNECT", "AUTH"},
    ),
    "receive_maximum": (0x21, "Receive Maximum", "u16+", {"CONNECT", "CONNACK"}),
    "topic_alias_maximum": (0x22, "Topic Alias Maximum", "u16", {"CONNECT", "CONNACK"}),
    "topic_alias": (0x23, "Topic Alias", "u16+", {"PUBLISH"}),
    "maximum_qos": (0x24, "Maximum QoS", "bit", {"CONNACK"}),
    "retain_available": (0x25, "Retain Available", "flag", {"CONNACK"}),
    "user_properties": (
        0x26,
        "User Property",
        "pair",
        {"CONNECT", "CONNACK", "PUBLISH", "will", "PUBACK", "PUBREC", "PUBREL", "PUBCOMP"}
        | {"SUBSCRIBE", "SUBACK", "UNSUBSCRIBE", "UNSUBACK", "DISCONNECT", "AUTH"},
    ),
    "maximum_packet_size": (0x27, "Maximum Packet Size", "u32+", {"CONNECT", "CONNACK"}),
    "wildcard_subscription_available": (
        0x28,
        "Wildcard Subscription Available",
        "flag",
        {"CONNACK"},
    ),
    "subscription_identifier_available": (
        0x29,
        "Subscription Identifier Available",
        "flag",
        {"CONNACK"},
    ),
    "shared_subscription_available": (0x2A, "Shared Subscription Available", "flag", {"CONNACK"}),
}

#: The reason codes of §3.2.2.2, §3.4.2.1, ..., §3.15.2.1 (plus table 2-6 where it adds one).
REASON_CODES: dict[str, set[int]] = {
    "CONNACK": {0x00, *range(0x80, 0x8B), 0x8C, 0x90, 0x95, 0x97, 0x99, 0x9A, 0x9B, 0x9C, 0x9D}
    | {0x9F},
    "PUBACK": {0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99},
    "PUBREC": {0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99},
    "PUBREL": {0x00, 0x92},
    "PUBCOMP": {0x00, 0x92},
    "SUBACK": {0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2},
    "UNSUBACK": {0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91},
    "DISCONNECT": {0x00, 0x04, *range(0x80, 0x84), 0x87, 0x89, *range(0x8B, 0x91)}
    | {*range(0x93, 0xA3)},
    "AUTH": {0x00, 0x18, 0x19},
}


def test_reason_code_tables_match_the_specification() -> None:
    assert {t.name: set(codes) for t, codes in VALID_REASON_CODES.items()} == REASON_CODES


def test_properties_fields_are_the_specification_properties() -> None:
    assert list(Properties._fields) == list(SPEC)
    assert [spec[0] for spec in SPEC.values()] == sorted(spec[0] for spec in SPEC.values())


# ---------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------

_KIND_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "bit": st.integers(0, 1),
    "flag": st.booleans(),
    "u16": st.integers(0, 0xFFFF),
    "u16+": st.integers(1, 0xFFFF),
    "u32": st.integers(0, 0xFFFF_FFFF),
    "u32+": st.integers(1, 0xFFFF_FFFF),
    "vbi": st.integers(1, 268_435_455),
    "str": mqtt_text,
    "bin": st.binary(max_size=40),
    "pair": st.tuples(mqtt_text, mqtt_text),
}


def properties(context: str, *, paho_safe: bool = False) -> st.SearchStrategy[Properties]:
    """Valid properties for ``context`` (a packet type name or "will"), any subset of them.

    ``paho_safe`` keeps to the values paho-mqtt's own Properties accepts (it caps Maximum Packet
    Size at 268,435,455).
    """
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for field, (_ident, _name, kind, contexts) in SPEC.items():
        if context not in contexts:
            continue
        values = _KIND_VALUES[kind]
        if paho_safe and field == "maximum_packet_size":
            values = st.integers(1, 268_435_455)
        if field == "user_properties":
            optional[field] = st.lists(values, max_size=3).map(tuple)
        elif field == "subscription_identifiers":
            optional[field] = st.lists(values, max_size=3 if context == "PUBLISH" else 1).map(tuple)
        else:
            optional[field] = values

    def build(values: dict[str, Any]) -> Properties:
        if values.get("authentication_data") is not None:
            values.setdefault("authentication_method", "SCRAM-SHA-1")  # data needs a method
        return Properties(**values)

    return st.fixed_dictionaries({}, optional=optional).map(build)


def codes(packet: str) -> st.SearchStrategy[int]:
    return st.sampled_from(sorted(REASON_CODES[packet]))


subscription_options = st.builds(
    SubscriptionOptions,
    qos=st.integers(0, 2),
    no_local=st.booleans(),
    retain_as_published=st.booleans(),
    retain_handling=st.sampled_from(list(RetainHandling)),
)


@st.composite
def wills(draw: st.DrawFn) -> Will:
    return Will(
        draw(mqtt_text),
        draw(st.binary(max_size=60)),
        draw(st.integers(0, 2)),
        draw(st.booleans()),
        draw(properties("will")),
    )


@st.composite
def connects(draw: st.DrawFn) -> Connect:
    return Connect(
        client_id=draw(mqtt_text),
        clean_session=draw(st.booleans()),
        keepalive=draw(st.integers(0, 0xFFFF)),
        username=draw(st.none() | mqtt_text),
        password=draw(st.none() | st.binary(max_size=40)),  # MQTT 5: also without a username
        will=draw(st.none() | wills()),
        protocol_level=5,
        properties=draw(properties("CONNECT")),
    )


@st.composite
def connacks(draw: st.DrawFn) -> ConnAck:
    code = draw(codes("CONNACK"))
    return ConnAck(draw(st.booleans()) if code == 0 else False, code, draw(properties("CONNACK")))


@st.composite
def publishes(draw: st.DrawFn) -> Publish:
    qos = draw(st.integers(0, 2))
    props = draw(properties("PUBLISH"))
    topic = draw(mqtt_text)
    if not topic and props.topic_alias is None:
        props = props._replace(topic_alias=draw(st.integers(1, 0xFFFF)))
    return Publish(
        topic,
        draw(payloads),
        qos,
        draw(st.booleans()),
        draw(st.booleans()) if qos else False,
        draw(packet_ids) if qos else None,
        props,
    )


def acks(cls: Callable[..., Packet], name: str) -> st.SearchStrategy[Packet]:
    return st.builds(cls, packet_ids, codes(name), properties(name))


@st.composite
def auths(draw: st.DrawFn) -> Auth:
    code = draw(codes("AUTH"))
    props = draw(properties("AUTH"))
    if code or props:  # only the bare f0 00 may leave out the method
        props = props._replace(authentication_method=draw(mqtt_text))
    return Auth(code, props)


STRATEGIES: dict[str, st.SearchStrategy[Any]] = {
    "CONNECT": connects(),
    "CONNACK": connacks(),
    "PUBLISH": publishes(),
    "PUBACK": acks(PubAck, "PUBACK"),
    "PUBREC": acks(PubRec, "PUBREC"),
    "PUBREL": acks(PubRel, "PUBREL"),
    "PUBCOMP": acks(PubComp, "PUBCOMP"),
    "SUBSCRIBE": st.builds(
        Subscribe,
        packet_ids,
        st.lists(st.tuples(mqtt_text, subscription_options), min_size=1, max_size=6),
        properties("SUBSCRIBE"),
    ),
    "SUBACK": st.builds(
        SubAck, packet_ids, st.lists(codes("SUBACK"), min_size=1, max_size=8), properties("SUBACK")
    ),
    "UNSUBSCRIBE": st.builds(
        Unsubscribe,
        packet_ids,
        st.lists(mqtt_text, min_size=1, max_size=6),
        properties("UNSUBSCRIBE"),
    ),
    "UNSUBACK": st.builds(
        UnsubAck,
        packet_ids,
        st.lists(codes("UNSUBACK"), min_size=1, max_size=8),
        properties("UNSUBACK"),
    ),
    "PINGREQ": st.just(PingReq()),
    "PINGRESP": st.just(PingResp()),
    "DISCONNECT": st.builds(Disconnect, codes("DISCONNECT"), properties("DISCONNECT")),
    "AUTH": auths(),
}

#: Packets of one MQTT 5 connection; CONNECT is left out because it may switch the decoder.
any_packet: st.SearchStrategy[Packet] = st.one_of(
    *(strategy for kind, strategy in STRATEGIES.items() if kind != "CONNECT")
)


def test_every_packet_type_has_a_strategy() -> None:
    assert set(STRATEGIES) == {t.name for t in PacketType}


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", STRATEGIES)
# No deadline: a packet of a few hundred bytes is decoded once per cut, and the machine is
# shared; this test is about correctness, not time.
@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(data=st.data())
def test_round_trip_every_packet_type(kind: str, data: st.DataObject) -> None:
    packet = data.draw(STRATEGIES[kind])
    wire = encode(packet, protocol_version=V5)
    assert Decoder(protocol_version=V5).feed(wire) == [packet]
    # Split in two at every byte boundary, including inside the remaining length and inside
    # every property.
    for cut in range(1, len(wire)):
        decoder = Decoder(protocol_version=V5)
        assert decoder.feed(wire[:cut]) == []
        assert decoder.feed(wire[cut:]) == [packet]
        assert decoder.buffered == 0
    # And one byte at a time.
    decoder = Decoder(protocol_version=V5)
    out: list[Packet] = []
    for i in range(len(wire)):
        out += decoder.feed(wire[i : i + 1])
    assert out == [packet]


@given(
    packets=st.lists(any_packet, min_size=1, max_size=20),
    cuts=st.lists(st.integers(min_value=0), max_size=30),
)
def test_many_packets_in_random_chunks(packets: list[Packet], cuts: list[int]) -> None:
    wire = b"".join(encode(p, protocol_version=V5) for p in packets)
    assert Decoder(protocol_version=V5).feed(wire) == packets
    decoder = Decoder(protocol_version=V5)
    bounds = [0, *sorted(c % (len(wire) + 1) for c in cuts), len(wire)]
    out: list[Packet] = []
    for a, b in itertools.pairwise(bounds):
        out += decoder.feed(wire[a:b])
    assert out == packets and decoder.buffered == 0


@given(st.sampled_from(sorted(set(STRATEGIES) - {"AUTH"})), st.data())
def test_both_versions_agree_where_mqtt5_adds_nothing(kind: str, data: st.DataObject) -> None:
    """A packet without MQTT 5 content means the same in both versions (its bytes may differ:
    MQTT 5 adds property lengths)."""
    packet = data.draw(STRATEGIES[kind])
    if isinstance(packet, Connect):
        return  # CONNECT's layout follows its protocol level, tested separately
    stripped = _strip_v5(packet)
    assume(stripped is not None)
    assert stripped is not None
    decoded_v311 = Decoder().feed(encode(stripped))
    decoded_v5 = Decoder(protocol_version=V5).feed(encode(stripped, protocol_version=V5))
    assert decoded_v311 == [stripped]
    assert [_strip_v5(p) for p in decoded_v5] == [stripped]


def _strip_v5(packet: Packet) -> Packet | None:
    """``packet`` without its MQTT 5 content, or None if it has no 3.1.1 equivalent."""
    if isinstance(packet, Publish):
        if not packet.topic:
            return None
        return Publish(*(getattr(packet, f) for f in Publish.__slots__[:-1]))  # type: ignore[arg-type]
    if isinstance(packet, PubAck | PubRec | PubRel | PubComp):
        return type(packet)(packet.packet_id) if packet.reason_code == 0 else None
    if isinstance(packet, Subscribe):
        pairs = []
        for topic_filter, options in packet.subscriptions:
            if isinstance(options, SubscriptionOptions):
                if options != SubscriptionOptions(options.qos):
                    return None
                options = options.qos
            pairs.append((topic_filter, options))
        return Subscribe(packet.packet_id, pairs)
    if isinstance(packet, SubAck):
        if any(c not in (0, 1, 2, 0x80) for c in packet.return_codes):
            return None
        return SubAck(packet.packet_id, list(packet.return_codes))
    if isinstance(packet, Unsubscribe):
        return Unsubscribe(packet.packet_id, packet.filters)
    if isinstance(packet, UnsubAck):
        return None  # MQTT 5 requires its reason codes, 3.1.1 has none
    if isinstance(packet, ConnAck):
        return ConnAck(packet.session_present, 0) if packet.return_code == 0 else None
    if isinstance(packet, Disconnect):
        return Disconnect() if packet.reason_code == 0 else None
    return packet


def test_known_bytes() -> None:
    """MQTT 5 packets written out by hand from §3 of the specification."""
    cases: list[tuple[Packet, bytes]] = [
        (PubAck(1), b"\x40\x02\x00\x01"),  # success without properties: 2 bytes (§3.4.2.1)
        (PubAck(1, 0x10), b"\x40\x03\x00\x01\x10"),  # reason code, no property length
        (
            PubRec(2, 0x87, Properties(reason_string="no")),
            b"\x50\x09\x00\x02\x87\x05\x1f\x00\x02no",
        ),
        (PubRel(3, 0x92), b"\x62\x03\x00\x03\x92"),
        (PubComp(4), b"\x70\x02\x00\x04"),
        (Disconnect(), b"\xe0\x00"),
        (Disconnect(0x04), b"\xe0\x01\x04"),
        (
            Disconnect(0x8B, Properties(session_expiry_interval=0)),
            b"\xe0\x07\x8b\x05\x11\x00\x00\x00\x00",
        ),
        (Auth(), b"\xf0\x00"),
        (
            Auth(0x18, Properties(authentication_method="M")),
            b"\xf0\x06\x18\x04\x15\x00\x01M",
        ),
        (ConnAck(False, 0), b"\x20\x03\x00\x00\x00"),
        (ConnAck(True, 0, Properties(receive_maximum=5)), b"\x20\x06\x01\x00\x03\x21\x00\x05"),
        (ConnAck(False, 0x87), b"\x20\x03\x00\x87\x00"),
        (Publish("a/b", b"hi"), b"\x30\x08\x00\x03a/b\x00hi"),
        (Publish("a/b", b"hi", 1, True, True, 5), b"\x3b\x0a\x00\x03a/b\x00\x05\x00hi"),
        (
            Publish("", b"x", properties=Properties(topic_alias=7)),
            b"\x30\x07\x00\x00\x03\x23\x00\x07x",
        ),
        (
            Publish("t", b"", properties=Properties(subscription_identifiers=(1, 128))),
            b"\x30\x09\x00\x01t\x05\x0b\x01\x0b\x80\x01",
        ),
        (
            Publish("t", b"", properties=Properties(user_properties=(("k", "v"), ("k", "w")))),
            b"\x30\x12\x00\x01t\x0e\x26\x00\x01k\x00\x01v\x26\x00\x01k\x00\x01w",
        ),
        (
            Subscribe(10, [("a/b", SubscriptionOptions(1, True, True, 2))]),
            b"\x82\x09\x00\x0a\x00\x00\x03a/b\x2d",
        ),
        (
            Subscribe(
                10, [("a", SubscriptionOptions(2))], Properties(subscription_identifiers=(300,))
            ),
            b"\x82\x0a\x00\x0a\x03\x0b\xac\x02\x00\x01a\x02",
        ),
        (SubAck(10, [0, 1, 2, 0x80, 0xA2]), b"\x90\x08\x00\x0a\x00\x00\x01\x02\x80\xa2"),
        (Unsubscribe(10, ["a/b"]), b"\xa2\x08\x00\x0a\x00\x00\x03a/b"),
        (UnsubAck(10, [0x00, 0x11]), b"\xb0\x05\x00\x0a\x00\x00\x11"),
        (PingReq(), b"\xc0\x00"),
        (PingResp(), b"\xd0\x00"),
        (
            Connect("cid", keepalive=10, protocol_level=5),
            b"\x10\x10\x00\x04MQTT\x05\x02\x00\x0a\x00\x00\x03cid",
        ),
        (
            Connect(
                "c",
                False,
                60,
                None,
                b"p",
                Will("w", b"x", 2, True, Properties(will_delay_interval=9)),
                5,
                properties=Properties(session_expiry_interval=0xFFFFFFFF),
            ),
            b"\x10\x22\x00\x04MQTT\x05\x74\x00\x3c"
            b"\x05\x11\xff\xff\xff\xff\x00\x01c\x05\x18\x00\x00\x00\x09\x00\x01w\x00\x01x\x00\x01p",
        ),
    ]
    for packet, wire in cases:
        assert encode(packet, protocol_version=V5) == wire, packet
        assert Decoder(protocol_version=V5).feed(wire) == [packet], packet
    # A plain int is the requested QoS with default options.
    assert encode(Subscribe(10, [("a/b", 1)]), protocol_version=V5) == encode(
        Subscribe(10, [("a/b", SubscriptionOptions(1))]), protocol_version=V5
    )


def test_only_user_property_and_subscription_identifier_repeat() -> None:
    twice = (("k", "1"), ("k", "2"))
    for packet in (
        Subscribe(1, [("a", SubscriptionOptions(0))], Properties(user_properties=twice)),
        PubAck(1, 0x10, Properties(user_properties=twice)),
        Publish("t", b"", properties=Properties(subscription_identifiers=(1, 2, 3))),
    ):
        assert Decoder(protocol_version=V5).feed(encode(packet, protocol_version=V5)) == [packet]
    with pytest.raises(ValueError, match="at most one"):
        encode(Subscribe(1, [("a", 0)], Properties(subscription_identifiers=(1, 2))), V5)


def test_decoded_reason_codes_are_named() -> None:
    [ack] = Decoder(protocol_version=V5).feed(b"\x40\x03\x00\x01\x97")
    assert isinstance(ack, PubAck) and ack.reason_code is ReasonCode.QUOTA_EXCEEDED
    [suback] = Decoder(protocol_version=V5).feed(b"\x90\x05\x00\x01\x00\x01\x87")
    assert isinstance(suback, SubAck)
    assert suback.reason_codes == [ReasonCode.GRANTED_QOS_1, ReasonCode.NOT_AUTHORIZED]
    assert [type(c) for c in suback.return_codes] == [ReasonCode, ReasonCode]
    [connack] = Decoder(protocol_version=V5).feed(b"\x20\x03\x00\x86\x00")
    assert isinstance(connack, ConnAck)
    assert connack.reason_code is ReasonCode.BAD_USER_NAME_OR_PASSWORD


def test_aliases_of_3_1_1_field_names() -> None:
    assert Connect("c", clean_session=False).clean_start is False
    assert ConnAck(False, 0x87).reason_code == 0x87
    assert SubAck(1, [0x80]).reason_codes == [0x80]


# ---------------------------------------------------------------------------------------------
# The public property helpers (for the store)
# ---------------------------------------------------------------------------------------------

CONTEXTS = [*(t.name for t in PacketType if t.name in {c for s in SPEC.values() for c in s[3]})]


@pytest.mark.parametrize("context", [*CONTEXTS, "will"])
@given(data=st.data())
def test_encode_decode_properties_round_trip_exactly(context: str, data: st.DataObject) -> None:
    props = data.draw(properties(context))
    where: Any = "will" if context == "will" else PacketType[context]
    raw = encode_properties(props, where)
    assert decode_properties(raw, where) == props
    assert encode_properties(decode_properties(raw, where), where) == raw
    assert encode_properties(props) == raw  # the packet type only adds the placement check
    # The same bytes are what a packet carries, after the length prefix.
    assert (raw == b"") == (not props)


def test_decode_properties_accepts_bytes_like_and_refuses_misplaced() -> None:
    raw = encode_properties(Properties(message_expiry_interval=60), PacketType.PUBLISH)
    assert raw == b"\x02\x00\x00\x00\x3c"
    assert decode_properties(bytearray(raw), PacketType.PUBLISH).message_expiry_interval == 60
    assert decode_properties(b"", PacketType.PUBLISH) is NO_PROPERTIES
    with pytest.raises(MalformedPacket, match="not allowed in SUBSCRIBE"):
        decode_properties(raw, PacketType.SUBSCRIBE)
    with pytest.raises(ValueError, match="not allowed in CONNECT"):
        encode_properties(Properties(message_expiry_interval=60), PacketType.CONNECT)
    with pytest.raises(MalformedPacket, match="truncated value"):
        decode_properties(raw[:-1], PacketType.PUBLISH)


def test_properties_value() -> None:
    assert not Properties() and not NO_PROPERTIES
    assert Properties(user_properties=(("a", "b"),))
    assert Properties(retain_available=False)  # False is a value, None is absence
    assert repr(Properties(topic_alias=3)) == "Properties(topic_alias=3)"
    assert repr(NO_PROPERTIES) == "Properties()"
    assert Properties(topic_alias=3)._replace(topic_alias=None) == NO_PROPERTIES
    assert hash(Properties(correlation_data=b"x")) == hash(Properties(correlation_data=b"x"))


def test_subscription_options_byte() -> None:
    options = SubscriptionOptions(2, True, False, RetainHandling.DO_NOT_SEND)
    assert options.to_byte() == 0b10_0_1_10
    assert SubscriptionOptions.from_byte(0b10_0_1_10) == options
    assert all(SubscriptionOptions.from_byte(b).to_byte() == b for b in range(0x30) if b & 3 != 3)
    for bad in (0x03, 0x30, 0x40, 0x80, 0x1FF):
        with pytest.raises(ValueError):
            SubscriptionOptions.from_byte(bad)


def test_reason_code_helpers() -> None:
    assert ReasonCode.SUCCESS is ReasonCode.NORMAL_DISCONNECTION is ReasonCode.GRANTED_QOS_0
    assert not ReasonCode.NO_MATCHING_SUBSCRIBERS.is_failure
    assert ReasonCode.UNSPECIFIED_ERROR.is_failure and ReasonCode.QUOTA_EXCEEDED.is_failure
    assert is_failure(0x80) and not is_failure(0x7F) and not is_failure(2)
    assert describe_reason_code(0x97, PacketType.PUBACK) == "Quota exceeded (0x97)"
    assert describe_reason_code(0, PacketType.DISCONNECT) == "Normal disconnection (0x00)"
    assert describe_reason_code(1, PacketType.SUBACK) == "Granted QoS 1 (0x01)"
    assert describe_reason_code(0x92, PacketType.PUBACK) == "reason code 0x92 (not valid in PUBACK)"
    assert describe_reason_code(0x30, PacketType.PUBACK) == "reason code 0x30 (not valid in PUBACK)"
    assert ProtocolVersion.V5 == V5 and ProtocolVersion.V311 == 4


# ---------------------------------------------------------------------------------------------
# Malformed and misplaced input
# ---------------------------------------------------------------------------------------------


def _publish_with_properties(block: bytes, topic: bytes = b"a") -> bytes:
    """A QoS 0 PUBLISH whose property block (length prefix included) is ``block``."""
    body = len(topic).to_bytes(2, "big") + topic + block + b"pl"
    return bytes((0x30, len(body))) + body


def _connect_v5(props: bytes = b"\x00", flags: int = 0x02, payload: bytes = b"\x00\x01c") -> bytes:
    body = b"\x00\x04MQTT\x05" + bytes((flags,)) + b"\x00\x0a" + props + payload
    return bytes((0x10, len(body))) + body


MALFORMED: list[tuple[str, bytes, str]] = [
    # Framing.
    ("type 0", b"\x00\x00", "reserved packet type 0"),
    ("AUTH flags", b"\xf1\x00", "AUTH with fixed-header flags 0b0001"),
    ("non-minimal remaining length", b"\xc0\x80\x00", "shortest form (MQTT-1.5.5-1)"),
    ("non-minimal 3-byte length", b"\x30\x80\x80\x00", "shortest form"),
    ("remaining length 5 bytes", b"\x30\x80\x80\x80\x80\x01", "more than 4 bytes"),
    ("PUBLISH QoS 3", b"\x36\x06\x00\x01a\x00\x01\x00", "QoS 3"),
    # PUBLISH properties.
    ("PUBLISH without property length", b"\x30\x03\x00\x01a", "PUBLISH: missing property length"),
    (
        "PUBLISH property length past end",
        _publish_with_properties(b"\x09\x02"),
        "property length 9 runs",
    ),
    (
        "PUBLISH property length 4 GB claimed",
        _publish_with_properties(b"\xff\xff\xff\x7f"),
        "runs 268435",
    ),
    (
        "PUBLISH empty topic without alias",
        _publish_with_properties(b"\x00", topic=b""),
        "empty topic and no Topic Alias",
    ),
    (
        "PUBLISH topic alias 0",
        _publish_with_properties(b"\x03\x23\x00\x00"),
        "Topic Alias: value 0",
    ),
    (
        "PUBLISH subscription identifier 0",
        _publish_with_properties(b"\x02\x0b\x00"),
        "Subscription Identifier: value 0",
    ),
    (
        "PUBLISH non-minimal subscription identifier",
        _publish_with_properties(b"\x03\x0b\x81\x00"),
        "shortest form",
    ),
    (
        "PUBLISH subscription identifier cut",
        _publish_with_properties(b"\x02\x0b\x81"),
        "truncated variable byte integer",
    ),
    (
        "PUBLISH Session Expiry (CONNECT's)",
        _publish_with_properties(b"\x05\x11\x00\x00\x00\x01"),
        "Session Expiry Interval (0x11) is not allowed in PUBLISH",
    ),
    (
        "PUBLISH Will Delay (will's)",
        _publish_with_properties(b"\x05\x18\x00\x00\x00\x01"),
        "Will Delay Interval (0x18) is not allowed in PUBLISH",
    ),
    (
        "PUBLISH Reason String",
        _publish_with_properties(b"\x04\x1f\x00\x01x"),
        "Reason String (0x1f) is not allowed in PUBLISH",
    ),
    (
        "PUBLISH duplicate Message Expiry",
        _publish_with_properties(b"\x0a\x02\x00\x00\x00\x01\x02\x00\x00\x00\x02"),
        "Message Expiry Interval appears more than once",
    ),
    (
        "PUBLISH duplicate Topic Alias",
        _publish_with_properties(b"\x06\x23\x00\x01\x23\x00\x01"),
        "Topic Alias appears more than once",
    ),
    (
        "PUBLISH duplicate Content Type",
        _publish_with_properties(b"\x08\x03\x00\x01a\x03\x00\x01b"),
        "Content Type appears more than once",
    ),
    (
        "PUBLISH Payload Format Indicator 2",
        _publish_with_properties(b"\x02\x01\x02"),
        "Payload Format Indicator: value 2, must be 0 or 1",
    ),
    (
        "PUBLISH unknown property 0x04",
        _publish_with_properties(b"\x02\x04\x00"),
        "unknown property identifier 0x04",
    ),
    (
        "PUBLISH two-byte property identifier",
        _publish_with_properties(b"\x02\x81\x01"),
        "unknown property identifier 0x81",
    ),
    (
        "PUBLISH truncated four-byte value",
        _publish_with_properties(b"\x04\x02\x00\x00\x00"),
        "Message Expiry Interval: truncated value",
    ),
    (
        "PUBLISH truncated two-byte value",
        _publish_with_properties(b"\x02\x23\x00"),
        "Topic Alias: truncated value",
    ),
    (
        "PUBLISH string past the property block",
        _publish_with_properties(b"\x03\x03\x00\x05"),
        "Content Type: string length runs",
    ),
    (
        "PUBLISH correlation data past the property block",
        _publish_with_properties(b"\x04\x09\x00\x05x"),
        "Correlation Data: length runs",
    ),
    (
        "PUBLISH user property without value",
        _publish_with_properties(b"\x04\x26\x00\x01k"),
        "User Property value: truncated length prefix",
    ),
    (
        "PUBLISH user property invalid UTF-8",
        _publish_with_properties(b"\x07\x26\x00\x01\xff\x00\x00"),
        "User Property name: invalid UTF-8",
    ),
    (
        "PUBLISH NUL in response topic",
        _publish_with_properties(b"\x04\x08\x00\x01\x00"),
        "Response Topic: contains U+0000",
    ),
    (
        "PUBLISH flag property without value",
        _publish_with_properties(b"\x01\x01"),
        "Payload Format Indicator: truncated value",
    ),
    # CONNECT.
    ("CONNECT without properties", b"\x10\x0a\x00\x04MQTT\x05\x02\x00\x0a", "missing property"),
    (
        "CONNECT Receive Maximum 0",
        _connect_v5(b"\x03\x21\x00\x00"),
        "Receive Maximum: value 0, must be at least 1",
    ),
    (
        "CONNECT Maximum Packet Size 0",
        _connect_v5(b"\x05\x27\x00\x00\x00\x00"),
        "Maximum Packet Size: value 0, must be at least 1",
    ),
    (
        "CONNECT Request Problem Information 2",
        _connect_v5(b"\x02\x17\x02"),
        "Request Problem Information: value 2, must be 0 or 1",
    ),
    (
        "CONNECT Request Response Information 9",
        _connect_v5(b"\x02\x19\x09"),
        "Request Response Information: value 9",
    ),
    (
        "CONNECT authentication data without method",
        _connect_v5(b"\x04\x16\x00\x01x"),
        "Authentication Data without an Authentication Method",
    ),
    (
        "CONNECT Topic Alias",
        _connect_v5(b"\x03\x23\x00\x01"),
        "Topic Alias (0x23) is not allowed in CONNECT",
    ),
    (
        "CONNECT Will Delay among the connect properties",
        _connect_v5(b"\x05\x18\x00\x00\x00\x01"),
        "Will Delay Interval (0x18) is not allowed in CONNECT",
    ),
    (
        "CONNECT duplicate Session Expiry",
        _connect_v5(b"\x0a\x11\x00\x00\x00\x01\x11\x00\x00\x00\x02"),
        "Session Expiry Interval appears more than once",
    ),
    (
        "CONNECT Session Expiry in the will properties",
        _connect_v5(flags=0x06, payload=b"\x00\x01c\x05\x11\x00\x00\x00\x01\x00\x01w\x00\x00"),
        "Session Expiry Interval (0x11) is not allowed in will properties",
    ),
    (
        "CONNECT will without will properties",
        _connect_v5(flags=0x06, payload=b"\x00\x01c"),
        "CONNECT will: missing property length",
    ),
    ("CONNECT reserved flag", _connect_v5(flags=0x03), "reserved connect flag"),
    ("CONNECT trailing bytes", _connect_v5(payload=b"\x00\x01cX"), "1 unexpected bytes"),
    # CONNACK.
    ("CONNACK too short", b"\x20\x01\x00", "must be at least 3"),
    ("CONNACK reserved flag", b"\x20\x03\x02\x00\x00", "reserved acknowledge flag"),
    ("CONNACK 3.1.1 acceptance", b"\x20\x02\x00\x00", "only a 3.1.1 refusal"),
    ("CONNACK 3.1.1 code 6", b"\x20\x02\x00\x06", "only a 3.1.1 refusal"),
    (
        "CONNACK reason code 0x01",
        b"\x20\x03\x00\x01\x00",
        "CONNACK with reason code 0x01, which MQTT 5 does not define",
    ),
    ("CONNACK reason code 0x10", b"\x20\x03\x00\x10\x00", "CONNACK with reason code 0x10"),
    ("CONNACK Maximum QoS 2", b"\x20\x05\x00\x00\x02\x24\x02", "Maximum QoS: value 2"),
    ("CONNACK Retain Available 2", b"\x20\x05\x00\x00\x02\x25\x02", "Retain Available: value 2"),
    ("CONNACK Receive Maximum 0", b"\x20\x06\x00\x00\x03\x21\x00\x00", "Receive Maximum: value 0"),
    (
        "CONNACK Subscription Identifier",
        b"\x20\x05\x00\x00\x02\x0b\x01",
        "Subscription Identifier (0x0b) is not allowed in CONNACK",
    ),
    (
        "CONNACK Will Delay",
        b"\x20\x08\x00\x00\x05\x18\x00\x00\x00\x01",
        "Will Delay Interval (0x18) is not allowed in CONNACK",
    ),
    (
        "CONNACK trailing byte",
        b"\x20\x04\x00\x00\x00\x00",
        "1 unexpected bytes after the properties",
    ),
    # PUBACK, PUBREC, PUBREL, PUBCOMP.
    ("PUBACK short", b"\x40\x01\x00", "truncated packet identifier"),
    ("PUBACK packet id 0", b"\x40\x02\x00\x00", "packet identifier 0"),
    ("PUBACK packet id 0 with code", b"\x40\x03\x00\x00\x10", "packet identifier 0"),
    ("PUBACK reason code 0x92", b"\x40\x03\x00\x01\x92", "PUBACK with reason code 0x92"),
    ("PUBREC reason code 0x01", b"\x50\x03\x00\x01\x01", "PUBREC with reason code 0x01"),
    ("PUBREL reason code 0x10", b"\x62\x03\x00\x01\x10", "PUBREL with reason code 0x10"),
    ("PUBCOMP reason code 0x80", b"\x70\x03\x00\x01\x80", "PUBCOMP with reason code 0x80"),
    (
        "PUBACK Content Type",
        b"\x40\x08\x00\x01\x00\x04\x03\x00\x01a",
        "Content Type (0x03) is not allowed in PUBACK",
    ),
    (
        "PUBREL duplicate Reason String",
        b"\x62\x0c\x00\x01\x00\x08\x1f\x00\x01a\x1f\x00\x01b",
        "Reason String appears more than once",
    ),
    ("PUBACK trailing byte", b"\x40\x05\x00\x01\x00\x00\x00", "1 unexpected bytes"),
    ("PUBCOMP property length past end", b"\x70\x05\x00\x01\x00\x09\x1f", "property length 9"),
    # SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK.
    ("SUBSCRIBE without property length", b"\x82\x02\x00\x01", "missing property length"),
    ("SUBSCRIBE no filters", b"\x82\x03\x00\x01\x00", "no topic filters"),
    ("SUBSCRIBE no options byte", b"\x82\x06\x00\x01\x00\x00\x01a", "without subscription options"),
    ("SUBSCRIBE reserved bits", b"\x82\x07\x00\x01\x00\x00\x01a\x40", "reserved bits"),
    ("SUBSCRIBE QoS 3", b"\x82\x07\x00\x01\x00\x00\x01a\x03", "requests QoS 3"),
    ("SUBSCRIBE retain handling 3", b"\x82\x07\x00\x01\x00\x00\x01a\x30", "retain handling 3"),
    ("SUBSCRIBE packet id 0", b"\x82\x07\x00\x00\x00\x00\x01a\x00", "packet identifier 0"),
    (
        "SUBSCRIBE two subscription identifiers",
        b"\x82\x0b\x00\x01\x04\x0b\x01\x0b\x02\x00\x01a\x00",
        "Subscription Identifier appears more than once",
    ),
    (
        "SUBSCRIBE subscription identifier 0",
        b"\x82\x09\x00\x01\x02\x0b\x00\x00\x01a\x00",
        "Subscription Identifier: value 0",
    ),
    (
        "SUBSCRIBE Reason String",
        b"\x82\x0b\x00\x01\x04\x1f\x00\x01x\x00\x01a\x00",
        "Reason String (0x1f) is not allowed in SUBSCRIBE",
    ),
    ("SUBACK no reason codes", b"\x90\x03\x00\x01\x00", "SUBACK with no reason codes"),
    ("SUBACK reason code 0x03", b"\x90\x04\x00\x01\x00\x03", "SUBACK with reason code 0x03"),
    ("SUBACK reason code 0x11", b"\x90\x04\x00\x01\x00\x11", "SUBACK with reason code 0x11"),
    ("UNSUBSCRIBE no filters", b"\xa2\x03\x00\x01\x00", "no topic filters"),
    (
        "UNSUBSCRIBE Subscription Identifier",
        b"\xa2\x08\x00\x01\x02\x0b\x01\x00\x01a",
        "Subscription Identifier (0x0b) is not allowed in UNSUBSCRIBE",
    ),
    ("UNSUBACK no reason codes", b"\xb0\x03\x00\x01\x00", "UNSUBACK with no reason codes"),
    ("UNSUBACK reason code 0x01", b"\xb0\x04\x00\x01\x00\x01", "UNSUBACK with reason code 0x01"),
    # DISCONNECT, AUTH, PING.
    ("DISCONNECT reason code 0x01", b"\xe0\x01\x01", "DISCONNECT with reason code 0x01"),
    ("DISCONNECT reason code 0x84", b"\xe0\x01\x84", "DISCONNECT with reason code 0x84"),
    (
        "DISCONNECT Receive Maximum",
        b"\xe0\x05\x00\x03\x21\x00\x01",
        "Receive Maximum (0x21) is not allowed in DISCONNECT",
    ),
    ("DISCONNECT trailing byte", b"\xe0\x03\x00\x00\x00", "1 unexpected bytes"),
    ("AUTH reason code 0x01", b"\xf0\x02\x01\x00", "AUTH with reason code 0x01"),
    ("AUTH without method", b"\xf0\x02\x18\x00", "AUTH without an Authentication Method"),
    ("AUTH reason code alone", b"\xf0\x01\x18", "AUTH: missing property length"),
    (
        "AUTH data without method",
        b"\xf0\x06\x18\x04\x16\x00\x01x",
        "Authentication Data without an Authentication Method",
    ),
    (
        "AUTH Session Expiry",
        b"\xf0\x0b\x18\x09\x15\x00\x01M\x11\x00\x00\x00\x01",
        "Session Expiry Interval (0x11) is not allowed in AUTH",
    ),
    ("PINGREQ trailing", b"\xc0\x01\x00", "PINGREQ with remaining length 1"),
    ("PINGRESP trailing", b"\xd0\x01\x00", "PINGRESP with remaining length 1"),
]


@pytest.mark.parametrize(
    ("wire", "message"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_malformed_packets_are_refused(wire: bytes, message: str) -> None:
    decoder = Decoder(protocol_version=V5)
    with pytest.raises(MalformedPacket, match=re.escape(message)):
        decoder.feed(wire)
    with pytest.raises(MalformedPacket, match="already failed"):
        decoder.feed(b"\xc0\x00")
    # One byte at a time, and after a valid packet in the same read.
    decoder = Decoder(protocol_version=V5)
    with pytest.raises(MalformedPacket, match=re.escape(message)):
        for i in range(len(wire)):
            decoder.feed(wire[i : i + 1])
    with pytest.raises(MalformedPacket, match=re.escape(message)):
        Decoder(protocol_version=V5).feed(encode(PubAck(1, 0x10), protocol_version=V5) + wire)


def test_malformed_wire_bytes_are_well_formed_around_the_defect() -> None:
    """The hand-made packets above frame correctly (right remaining length), so each is refused
    for the reason its name gives, not for a framing slip of the test."""
    for name, wire, _message in MALFORMED:
        if wire[0] in (0x00, 0xF1) or wire[1] & 0x80:
            continue
        assert wire[1] == len(wire) - 2, name


def test_a_3_1_1_refusal_of_an_mqtt5_connect_is_decoded() -> None:
    """A 3.1.1-only broker answers an MQTT 5 CONNECT with the 3.1.1 CONNACK "unacceptable
    protocol version" (MQTT-3.1.2-2): no property length. The client must see it as a refusal
    with that return code, to fall back, not as a malformed packet."""
    for code in range(1, 6):
        assert Decoder(protocol_version=V5).feed(bytes((0x20, 2, 0, code))) == [
            ConnAck(False, code)
        ]


def test_lenient_where_strictness_hides_the_real_error() -> None:
    # As in 3.1.1: Session Present on a refusal is left for the session to report as a refusal.
    assert Decoder(protocol_version=V5).feed(b"\x20\x03\x01\x87\x00") == [ConnAck(True, 0x87)]


# ---------------------------------------------------------------------------------------------
# The encoder refuses what must not be sent
# ---------------------------------------------------------------------------------------------

ENCODE_REFUSED_V5: list[tuple[str, Any, str]] = [
    ("PUBACK code 0x92", PubAck(1, 0x92), "PUBACK reason code must be one of"),
    ("PUBACK code 0x92 with props", PubAck(1, 0x92, Properties(reason_string="x")), "PUBACK"),
    ("PUBREL code 0x10", PubRel(1, 0x10), "PUBREL reason code"),
    ("PUBCOMP id 0", PubComp(0), "1..65535"),
    ("PUBACK id None", PubAck(None, 0x10), "1..65535"),  # type: ignore[arg-type]
    ("CONNACK code 1", ConnAck(False, 1), "CONNACK reason code"),
    ("CONNACK refusal with session", ConnAck(True, 0x87), "session_present"),
    ("SUBACK code 3", SubAck(1, [3]), "SUBACK reason code"),
    ("SUBACK empty", SubAck(1, []), "at least one reason code"),
    ("UNSUBACK empty", UnsubAck(1), "at least one reason code"),
    ("UNSUBACK code 1", UnsubAck(1, [1]), "UNSUBACK reason code"),
    ("DISCONNECT code 1", Disconnect(1), "DISCONNECT reason code"),
    ("AUTH code 0x18 without method", Auth(0x18), "needs an Authentication Method"),
    ("AUTH reason string without method", Auth(0, Properties(reason_string="r")), "Method"),
    ("AUTH code 0x87", Auth(0x87), "AUTH reason code"),
    ("empty topic without alias", Publish("", b""), "needs a Topic Alias"),
    (
        "empty topic, properties, no alias",
        Publish("", b"", properties=Properties(content_type="x")),
        "needs a Topic Alias",
    ),
    (
        "PUBLISH Session Expiry",
        Publish("t", b"", properties=Properties(session_expiry_interval=1)),
        "Session Expiry Interval is not allowed in PUBLISH",
    ),
    (
        "PUBLISH Topic Alias 0",
        Publish("t", b"", properties=Properties(topic_alias=0)),
        "Topic Alias must be an int in 1..65535",
    ),
    (
        "PUBLISH subscription identifier 0",
        Publish("t", b"", properties=Properties(subscription_identifiers=(0,))),
        "in 1..268435455",
    ),
    (
        "PUBLISH subscription identifier too large",
        Publish("t", b"", properties=Properties(subscription_identifiers=(268_435_456,))),
        "in 1..268435455",
    ),
    (
        "PUBLISH subscription identifiers not a tuple",
        Publish("t", b"", properties=Properties(subscription_identifiers=5)),  # type: ignore[arg-type]
        "must be a tuple",
    ),
    (
        "PUBLISH Payload Format Indicator 2",
        Publish("t", b"", properties=Properties(payload_format_indicator=2)),
        "in 0..1",
    ),
    (
        "PUBLISH Message Expiry 2**32",
        Publish("t", b"", properties=Properties(message_expiry_interval=1 << 32)),
        "in 0..4294967295",
    ),
    (
        "PUBLISH Message Expiry negative",
        Publish("t", b"", properties=Properties(message_expiry_interval=-1)),
        "in 0..4294967295",
    ),
    (
        "PUBLISH Message Expiry as str",
        Publish("t", b"", properties=Properties(message_expiry_interval="1")),  # type: ignore[arg-type]
        "must be an int",
    ),
    (
        "PUBLISH user property not a pair",
        Publish("t", b"", properties=Properties(user_properties=(("a",),))),  # type: ignore[arg-type]
        "(name, value) pair",
    ),
    (
        "PUBLISH user property with NUL",
        Publish("t", b"", properties=Properties(user_properties=(("a", "b\x00"),))),
        "User Property value contains U+0000",
    ),
    (
        "PUBLISH content type as bytes",
        Publish("t", b"", properties=Properties(content_type=b"x")),  # type: ignore[arg-type]
        "must be a str",
    ),
    (
        "PUBLISH correlation data as str",
        Publish("t", b"", properties=Properties(correlation_data="x")),  # type: ignore[arg-type]
        "must be bytes",
    ),
    (
        "PUBLISH correlation data too long",
        Publish("t", b"", properties=Properties(correlation_data=b"x" * 65_536)),
        "at most 65535",
    ),
    (
        "PUBLISH properties not Properties",
        Publish("t", b"", properties={"topic_alias": 1}),  # type: ignore[arg-type]
        "must be a Properties",
    ),
    (
        "SUBSCRIBE two subscription identifiers",
        Subscribe(1, [("a", 0)], Properties(subscription_identifiers=(1, 2))),
        "at most one",
    ),
    ("SUBSCRIBE qos 3", Subscribe(1, [("a", 3)]), "qos must be 0, 1 or 2"),
    (
        "SUBSCRIBE options qos 3",
        Subscribe(1, [("a", SubscriptionOptions(qos=3))]),
        "subscription qos must be 0, 1 or 2",
    ),
    (
        "SUBSCRIBE retain handling 3",
        Subscribe(1, [("a", SubscriptionOptions(retain_handling=3))]),
        "retain_handling must be 0, 1 or 2",
    ),
    ("SUBSCRIBE empty", Subscribe(1, []), "at least one topic filter"),
    ("UNSUBSCRIBE empty", Unsubscribe(1, []), "at least one topic filter"),
    (
        "CONNECT Receive Maximum 0",
        Connect("c", protocol_level=5, properties=Properties(receive_maximum=0)),
        "Receive Maximum must be an int in 1..65535",
    ),
    (
        "CONNECT Maximum Packet Size 0",
        Connect("c", protocol_level=5, properties=Properties(maximum_packet_size=0)),
        "Maximum Packet Size must be an int in 1..4294967295",
    ),
    (
        "CONNECT authentication data without method",
        Connect("c", protocol_level=5, properties=Properties(authentication_data=b"x")),
        "Authentication Data without an Authentication Method",
    ),
    (
        "CONNECT Topic Alias",
        Connect("c", protocol_level=5, properties=Properties(topic_alias=1)),
        "Topic Alias is not allowed in CONNECT",
    ),
    (
        "CONNECT will with Topic Alias",
        Connect("c", will=Will("w", b"", properties=Properties(topic_alias=1)), protocol_level=5),
        "Topic Alias is not allowed in will properties",
    ),
    ("CONNECT level 4", Connect("c"), "an MQTT 5 CONNECT needs protocol_level 5"),
    ("CONNECT keepalive", Connect("c", keepalive=-1, protocol_level=5), "keepalive"),
    (
        "DISCONNECT Topic Alias Maximum",
        Disconnect(0, Properties(topic_alias_maximum=1)),
        "Topic Alias Maximum is not allowed in DISCONNECT",
    ),
    (
        "CONNACK Will Delay",
        ConnAck(False, 0, Properties(will_delay_interval=1)),
        "Will Delay Interval is not allowed in CONNACK",
    ),
    (
        "CONNACK Maximum QoS 2",
        ConnAck(False, 0, Properties(maximum_qos=2)),
        "Maximum QoS must be an int in 0..1",
    ),
    (
        "UNSUBACK Subscription Identifier",
        UnsubAck(1, [0], Properties(subscription_identifiers=(1,))),
        "Subscription Identifier is not allowed in UNSUBACK",
    ),
]


@pytest.mark.parametrize(
    ("packet", "message"),
    [e[1:] for e in ENCODE_REFUSED_V5],
    ids=[e[0] for e in ENCODE_REFUSED_V5],
)
def test_encoder_refuses_what_must_not_be_sent(packet: Any, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        encode(packet, protocol_version=V5)


ENCODE_REFUSED_V311: list[tuple[str, Any]] = [
    ("PUBLISH properties", Publish("t", b"", properties=Properties(message_expiry_interval=1))),
    ("PUBACK reason code", PubAck(1, 0x10)),
    ("PUBACK properties", PubAck(1, 0, Properties(reason_string="x"))),
    ("PUBREC reason code", PubRec(1, 0x80)),
    ("PUBREL properties", PubRel(1, 0, Properties(reason_string="x"))),
    ("PUBCOMP reason code", PubComp(1, 0x92)),
    ("SUBSCRIBE properties", Subscribe(1, [("a", 0)], Properties(subscription_identifiers=(1,)))),
    ("SUBSCRIBE no local", Subscribe(1, [("a", SubscriptionOptions(1, no_local=True))])),
    ("SUBSCRIBE retain handling", Subscribe(1, [("a", SubscriptionOptions(retain_handling=2))])),
    ("SUBACK properties", SubAck(1, [0], Properties(reason_string="x"))),
    ("UNSUBSCRIBE properties", Unsubscribe(1, ["a"], Properties(user_properties=(("a", "b"),)))),
    ("UNSUBACK reason codes", UnsubAck(1, [0])),
    ("CONNACK properties", ConnAck(False, 0, Properties(receive_maximum=1))),
    ("CONNECT properties", Connect("c", properties=Properties(session_expiry_interval=1))),
    ("will properties", Connect("c", will=Will("w", b"", properties=Properties(content_type="x")))),
    ("DISCONNECT reason code", Disconnect(0x04)),
    ("DISCONNECT properties", Disconnect(0, Properties(reason_string="x"))),
    ("AUTH", Auth()),
]


@pytest.mark.parametrize(
    "packet", [e[1] for e in ENCODE_REFUSED_V311], ids=[e[0] for e in ENCODE_REFUSED_V311]
)
def test_the_3_1_1_encoder_refuses_mqtt5_content(packet: Any) -> None:
    """Rather than drop a reason code or a property silently, 3.1.1 refuses to send it."""
    with pytest.raises(ValueError, match="need MQTT 5"):
        encode(packet)


def test_the_3_1_1_encoder_takes_options_that_are_only_a_qos() -> None:
    packet = Subscribe(1, [("a", SubscriptionOptions(2)), ("b", 1)])
    assert encode(packet) == encode(Subscribe(1, [("a", 2), ("b", 1)]))
    # An empty Properties that is not the shared NO_PROPERTIES object is still no properties.
    assert encode(PubAck(1, 0, Properties())) == b"\x40\x02\x00\x01"
    assert encode(Publish("t", b"", properties=Properties())) == encode(Publish("t", b""))


def test_connect_and_protocol_version_must_agree() -> None:
    with pytest.raises(ValueError, match="must be encoded with protocol_version=5"):
        encode(Connect("c", protocol_level=5))
    with pytest.raises(ValueError, match="needs protocol_level 5"):
        encode(Connect("c", protocol_level=4), protocol_version=V5)
    for bad in (0, 2, 6, "5"):
        with pytest.raises(ValueError, match="protocol_version must be 3, 4 or 5"):
            encode(PingReq(), protocol_version=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="protocol_version must be 3, 4 or 5"):
            Decoder(protocol_version=bad)  # type: ignore[arg-type]
    assert encode(PubAck(1), protocol_version=3) == encode(PubAck(1))


def test_password_without_username_is_mqtt5_only() -> None:
    packet = Connect("c", password=b"secret", protocol_level=5)
    assert Decoder(protocol_version=V5).feed(encode(packet, protocol_version=V5)) == [packet]
    with pytest.raises(ValueError, match="password without a username"):
        encode(Connect("c", password=b"secret"))


# ---------------------------------------------------------------------------------------------
# The protocol version is chosen per connection; CONNECT chooses it on the server side
# ---------------------------------------------------------------------------------------------


def test_a_server_decoder_takes_the_version_from_connect() -> None:
    connect = Connect("c", protocol_level=5, properties=Properties(receive_maximum=10))
    publish = Publish(
        "t", b"x", 1, packet_id=1, properties=Properties(user_properties=(("a", "b"),))
    )
    ack = PubAck(1, 0x10)
    wire = encode(connect, protocol_version=V5) + b"".join(
        encode(p, protocol_version=V5) for p in (publish, ack)
    )
    decoder = Decoder()  # a broker does not know the version before CONNECT
    assert decoder.protocol_version == 4
    assert decoder.feed(wire) == [connect, publish, ack]  # the rest of the same read too
    assert decoder.protocol_version == V5
    # Byte at a time as well.
    decoder = Decoder()
    out: list[Packet] = []
    for i in range(len(wire)):
        out += decoder.feed(wire[i : i + 1])
    assert out == [connect, publish, ack]


@pytest.mark.parametrize(("level", "version"), [(4, 4), (3, 3), (0x84, 4), (0x85, 5), (6, 4)])
def test_a_decoder_adopts_any_connect_level(level: int, version: int) -> None:
    name = "MQIsdp" if level == 3 else "MQTT"
    connect = Connect("c", protocol_level=level, protocol_name=name)
    wire = encode(connect, protocol_version=5 if version == 5 else 4)
    follow = encode(Disconnect(), protocol_version=version)
    decoder = Decoder(protocol_version=V5)
    assert decoder.feed(wire + follow) == [connect, Disconnect()]
    assert decoder.protocol_version == version


def test_the_same_bytes_mean_different_things_per_version() -> None:
    # Three bytes: a 3.1.1 PUBLISH with topic "a" and payload "x" is, in MQTT 5, a PUBLISH
    # whose property length byte is "x" (0x78), running past the end.
    wire = b"\x30\x04\x00\x01ax"
    assert Decoder().feed(wire) == [Publish("a", b"x")]
    with pytest.raises(MalformedPacket, match="property length 120 runs"):
        Decoder(protocol_version=V5).feed(wire)
    # AUTH is a packet in MQTT 5 and a reserved type in 3.1.1.
    assert Decoder(protocol_version=V5).feed(b"\xf0\x00") == [Auth()]
    with pytest.raises(MalformedPacket, match="AUTH exists only in MQTT 5"):
        Decoder().feed(b"\xf0\x00")


# ---------------------------------------------------------------------------------------------
# Hostile input: sizes and counts chosen by the peer
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [4, 5])
def test_packet_too_large_is_refused_from_the_fixed_header(version: int) -> None:
    decoder = Decoder(max_packet_size=1000, protocol_version=version)
    assert decoder.feed(b"\x30\xe6") == []  # length not complete yet
    with pytest.raises(PacketTooLarge, match="packet of 1001 bytes exceeds") as info:
        decoder.feed(b"\x07")  # remaining length 998: 1 + 2 + 998 bytes; no body was sent
    assert (info.value.size, info.value.limit) == (1001, 1000)
    assert isinstance(info.value, MalformedPacket)
    with pytest.raises(MalformedPacket, match="already failed"):
        decoder.feed(b"\xc0\x00")
    # Exactly the limit is accepted.
    packet = Publish("t", b"x" * 5)
    wire = encode(packet, protocol_version=version)
    assert Decoder(max_packet_size=len(wire), protocol_version=version).feed(wire) == [packet]
    with pytest.raises(PacketTooLarge):
        Decoder(max_packet_size=len(wire) - 1, protocol_version=version).feed(wire[:2])


@pytest.mark.parametrize("version", [4, 5])
def test_an_announced_size_allocates_nothing(version: int) -> None:
    """The default limit is the protocol maximum, yet a peer announcing a 256 MB packet makes
    the decoder hold only the bytes that really arrived."""
    decoder = Decoder(protocol_version=version)
    assert decoder.max_packet_size == MAX_PACKET_SIZE
    header = b"\x30\xff\xff\xff\x7f" + b"\x00\x01a"  # remaining length 268,435,455
    tracemalloc.start()
    try:
        assert decoder.feed(header) == []
        for _ in range(64):
            assert decoder.feed(b"\x00" * 16_384) == []  # 1 MB of body
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert decoder.buffered == len(header) + 64 * 16_384
    assert peak < 8 * (1 << 20)  # a few copies of what arrived, nothing near 256 MB


def test_a_property_flood_costs_only_its_own_bytes() -> None:
    # 20,000 empty user properties (5 bytes each) in one PUBLISH: decoded, bounded by the
    # packet's size, which max_packet_size bounds.
    block = b"\x26\x00\x00\x00\x00" * 20_000
    props_len = len(block)
    vbi = bytes((props_len & 0x7F | 0x80, (props_len >> 7) & 0x7F | 0x80, props_len >> 14))
    body = b"\x00\x01t" + vbi + block + b"payload"
    rl = len(body)
    wire = b"\x30" + bytes((rl & 0x7F | 0x80, (rl >> 7) & 0x7F | 0x80, rl >> 14)) + body
    [packet] = Decoder(protocol_version=V5).feed(wire)
    assert isinstance(packet, Publish)
    assert len(packet.properties.user_properties) == 20_000 and packet.payload == b"payload"
    with pytest.raises(PacketTooLarge):
        Decoder(max_packet_size=64 * 1024, protocol_version=V5).feed(wire[:4])


# ---------------------------------------------------------------------------------------------
# Fuzzing: any bytes -> packets or MalformedPacket; whatever is accepted re-encodes the same
# ---------------------------------------------------------------------------------------------


def _reencode(packets: list[Packet]) -> None:
    version = V5
    for packet in packets:
        if (
            isinstance(packet, ConnAck)
            and packet.return_code
            and (packet.session_present or packet.return_code < 0x80)
        ):
            version = V5
            continue  # decoded leniently (see above), refused by the encoder on purpose
        if isinstance(packet, Connect):
            version = V5 if packet.protocol_level & 0x7F == 5 else 4
            assert Decoder().feed(encode(packet, protocol_version=version)) == [packet]
            continue
        assert Decoder(protocol_version=version).feed(encode(packet, protocol_version=version)) == [
            packet
        ]


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(data=st.binary(max_size=300), cuts=st.lists(st.integers(min_value=0), max_size=20))
def test_arbitrary_bytes_decode_or_raise_malformed(data: bytes, cuts: list[int]) -> None:
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    decoder = Decoder(max_packet_size=1 << 16, protocol_version=V5)
    out: list[Packet] = []
    try:
        for a, b in itertools.pairwise(bounds):
            out += decoder.feed(data[a:b])
    except MalformedPacket:
        return
    _reencode(out)


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    packets=st.lists(any_packet, min_size=1, max_size=4),
    mutations=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1),
)
def test_mutated_packets_decode_or_raise_malformed(
    packets: list[Packet], mutations: list[tuple[int, int]]
) -> None:
    wire = bytearray(b"".join(encode(p, protocol_version=V5) for p in packets))
    for where, value in mutations:
        wire[where % len(wire)] = value
    try:
        out = Decoder(protocol_version=V5).feed(bytes(wire))
    except MalformedPacket:
        return
    _reencode(out)


# ---------------------------------------------------------------------------------------------
# Cross-check against paho-mqtt 2.2 (MQTT 5)
# ---------------------------------------------------------------------------------------------

_PAHO_TYPES = {
    "will": PacketTypes.WILLMESSAGE,
    **{t.name: getattr(PacketTypes, t.name) for t in PacketType if t.name in CONTEXTS},
}


def to_paho(props: Properties, context: str) -> PahoProperties:
    out = PahoProperties(_PAHO_TYPES[context])
    for field, value in zip(Properties._fields, props, strict=True):
        if value is None or value == ():
            continue
        name = SPEC[field][1].replace(" ", "")
        setattr(
            out,
            name,
            list(value) if field in ("user_properties", "subscription_identifiers") else value,
        )
    return out


def from_paho(props: PahoProperties | None) -> Properties:
    if props is None:
        return NO_PROPERTIES
    values: dict[str, Any] = {}
    for field, (_ident, name, kind, _contexts) in SPEC.items():
        value = getattr(props, name.replace(" ", ""), None)
        if value is None:
            continue
        if field in ("user_properties", "subscription_identifiers"):
            value = tuple(tuple(v) if field == "user_properties" else v for v in value)
        elif kind == "flag":
            value = bool(value)
        elif kind == "bin":
            value = bytes(value)
        values[field] = value
    return Properties(**values)


def _vbi(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


@pytest.mark.parametrize("context", [*CONTEXTS, "will"])
@given(data=st.data())
def test_paho_packs_our_properties_byte_for_byte(context: str, data: st.DataObject) -> None:
    props = data.draw(properties(context, paho_safe=True))
    where: Any = "will" if context == "will" else PacketType[context]
    ours = encode_properties(props, where)
    packed = to_paho(props, context).pack()
    assert packed == _vbi(len(ours)) + ours
    # And paho reads our bytes back to the same values.
    theirs = PahoProperties(_PAHO_TYPES[context])
    theirs.unpack(packed)
    assert from_paho(theirs) == props


V5P = MQTTProtocolVersion.MQTTv5


def _paho_accepts(props: Properties) -> bool:
    """paho caps Maximum Packet Size at 268,435,455; the specification allows up to 2**32-1."""
    return (props.maximum_packet_size or 0) <= 268_435_455


@given(publishes())
def test_paho_publish_bytes_match_ours(packet: Publish) -> None:
    builder = _PahoBuilder(paho.MQTTv5)
    builder.client._send_publish(
        packet.packet_id or 0,
        packet.topic.encode(),
        packet.payload,
        packet.qos,
        packet.retain,
        packet.dup,
        properties=to_paho(packet.properties, "PUBLISH") if packet.properties else None,
    )
    wire = builder.take()
    builder.close()
    assert encode(packet, protocol_version=V5) == wire
    assert Decoder(protocol_version=V5).feed(wire) == [packet]
    # paho's decoder reads ours.
    header, body = _split_frame(wire)
    got = paho_packet.decode_publish(header, body, V5P)
    assert (got.topic, bytes(got.payload)) == (packet.topic.encode(), packet.payload)
    assert (got.qos, got.retain, got.dup, got.mid) == (
        packet.qos,
        packet.retain,
        packet.dup,
        packet.packet_id or 0,
    )
    assert from_paho(got.properties) == packet.properties


@given(STRATEGIES["SUBSCRIBE"], STRATEGIES["UNSUBSCRIBE"])
def test_paho_subscribe_and_unsubscribe_bytes_match_ours(
    sub: Subscribe, unsub: Unsubscribe
) -> None:
    builder = _PahoBuilder(paho.MQTTv5)
    topics = []
    for topic_filter, options in sub.subscriptions:
        assert isinstance(options, SubscriptionOptions)
        topics.append(
            (
                topic_filter.encode(),
                SubscribeOptions(
                    options.qos,
                    options.no_local,
                    options.retain_as_published,
                    options.retain_handling,
                ),
            )
        )
    props = to_paho(sub.properties, "SUBSCRIBE") if sub.properties else None
    _, mid = builder.client._send_subscribe(False, topics, props)
    sub.packet_id = mid
    wire = builder.take()
    assert encode(sub, protocol_version=V5) == wire
    assert Decoder(protocol_version=V5).feed(wire) == [sub]
    props = to_paho(unsub.properties, "UNSUBSCRIBE") if unsub.properties else None
    _, mid = builder.client._send_unsubscribe(False, [f.encode() for f in unsub.filters], props)
    unsub.packet_id = mid
    wire = builder.take()
    builder.close()
    assert encode(unsub, protocol_version=V5) == wire
    assert Decoder(protocol_version=V5).feed(wire) == [unsub]


@given(connects())
def test_paho_connect_bytes_match_ours(packet: Connect) -> None:
    assume(_paho_accepts(packet.properties))
    assume(packet.client_id)  # paho invents an id for an empty one
    assume(packet.will is None or packet.will.topic)  # paho refuses an empty will topic
    if packet.username is None:
        packet.password = None  # paho sends a password only together with a username
    builder = _PahoBuilder(paho.MQTTv5, client_id=packet.client_id)
    builder.client._clean_start = packet.clean_session
    builder.client._connect_properties = (
        to_paho(packet.properties, "CONNECT") if packet.properties else None
    )
    if packet.username is not None:
        builder.client.username_pw_set(packet.username)
        builder.client._password = packet.password
    if packet.will is not None:
        w = packet.will
        will_props = to_paho(w.properties, "will") if w.properties else None
        builder.client.will_set(w.topic, w.payload, w.qos, w.retain, will_props)
    builder.client._send_connect(packet.keepalive)
    wire = builder.take()
    builder.close()
    assert encode(packet, protocol_version=V5) == wire
    assert Decoder().feed(wire) == [packet]  # a server-side decoder, switched by the level


@given(STRATEGIES["DISCONNECT"])
def test_paho_disconnect_bytes_match_ours(packet: Disconnect) -> None:
    assume(packet.reason_code != 0 or packet.properties)  # paho writes e0 01 00 for "0 given"
    builder = _PahoBuilder(paho.MQTTv5)
    code = PahoReasonCode(PacketTypes.DISCONNECT, identifier=packet.reason_code)
    props = to_paho(packet.properties, "DISCONNECT") if packet.properties else None
    builder.client._send_disconnect(code, props)
    wire = builder.take()
    builder.close()
    assert encode(packet, protocol_version=V5) == wire
    assert Decoder(protocol_version=V5).feed(wire) == [packet]


@given(
    st.one_of(
        STRATEGIES["CONNACK"],
        STRATEGIES["SUBACK"],
        STRATEGIES["UNSUBACK"],
        STRATEGIES["PUBACK"],
        STRATEGIES["PUBREC"],
        STRATEGIES["PUBREL"],
        STRATEGIES["PUBCOMP"],
        STRATEGIES["DISCONNECT"],
    )
)
def test_paho_decodes_our_acknowledgements(packet: Any) -> None:
    assume(_paho_accepts(packet.properties))
    # paho's CONNACK table lacks 0x99 (Payload format invalid), which §3.2.2.2 lists.
    assume(not (isinstance(packet, ConnAck) and packet.return_code == 0x99))
    header, body = _split_frame(encode(packet, protocol_version=V5))
    if isinstance(packet, ConnAck):
        got = paho_packet.decode_connack(header, body, V5P)
        assert (got.flags, got.reason.value) == (int(packet.session_present), packet.return_code)
        assert from_paho(got.properties) == packet.properties
    elif isinstance(packet, SubAck | UnsubAck):
        decode = (
            paho_packet.decode_suback if isinstance(packet, SubAck) else paho_packet.decode_unsuback
        )
        got = decode(header, body, V5P)
        assert got.mid == packet.packet_id
        assert [c.value for c in got.reason_codes] == list(
            packet.return_codes if isinstance(packet, SubAck) else packet.reason_codes
        )
        assert from_paho(got.properties) == packet.properties
    elif isinstance(packet, Disconnect):
        got = paho_packet.decode_disconnect(header, body, V5P)
        assert (got.reason.value if got.reason else 0) == packet.reason_code
        assert from_paho(got.properties) == packet.properties
    else:
        decode = getattr(paho_packet, f"decode_{type(packet).__name__.lower()}")
        got = decode(header, body, V5P)
        assert (got.mid, got.reason.value) == (packet.packet_id, packet.reason_code)
        assert from_paho(got.properties) == packet.properties


class _LoopbackPeer:
    """A paho MQTT 5 client connected to a socket this test plays the broker on (127.0.0.1).

    Single-threaded: paho is driven with ``loop()`` between our reads, so nothing races. The
    decoder starts as a broker's does, in 3.1.1, and must switch on paho's CONNECT.
    """

    def __init__(self, client: paho.Client, **connect: Any) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(5)
        self.client = client
        self.decoder = Decoder()
        client.connect("127.0.0.1", self.listener.getsockname()[1], keepalive=17, **connect)
        self.conn, _ = self.listener.accept()
        self.conn.settimeout(0.01)

    def expect(self, count: int) -> list[Packet]:
        packets: list[Packet] = []
        raw = b""
        deadline = time.monotonic() + 5
        while len(packets) < count:
            assert time.monotonic() < deadline, f"got {packets}, wanted {count} packets"
            self.client.loop(timeout=0.01)
            try:
                data = self.conn.recv(1 << 16)
            except TimeoutError:
                continue
            assert data, "paho closed the connection"
            raw += data
            packets += self.decoder.feed(data)
        assert len(packets) == count and self.decoder.buffered == 0
        # Byte-identical to paho's.
        assert b"".join(encode(p, protocol_version=V5) for p in packets) == raw
        return packets

    def send(self, *packets: Packet) -> None:
        self.conn.sendall(b"".join(encode(p, protocol_version=V5) for p in packets))

    def pump_until(self, condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 5
        while not condition():
            assert time.monotonic() < deadline
            self.client.loop(timeout=0.01)

    def close(self) -> None:
        self.client._sock_close()
        self.conn.close()
        self.listener.close()


def _paho_props(context: str, **values: Any) -> PahoProperties:
    props = PahoProperties(_PAHO_TYPES[context])
    for name, value in values.items():
        setattr(props, name, value)
    return props


def test_paho_mqtt5_client_over_loopback_socket() -> None:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="codec-v5", protocol=paho.MQTTv5)
    client.username_pw_set("alice", "s3cr3t")
    client.will_set(
        "clients/codec/status",
        b"offline",
        qos=1,
        retain=True,
        properties=_paho_props(
            "will", WillDelayInterval=30, MessageExpiryInterval=600, ContentType="text/plain"
        ),
    )
    events: list[tuple[Any, ...]] = []
    client.on_connect = lambda c, u, flags, rc, props: events.append(
        ("connect", rc.value, from_paho(props))
    )
    client.on_publish = lambda c, u, mid, rc, props: events.append(("publish", mid, rc.value))
    client.on_subscribe = lambda c, u, mid, rcs, props: events.append(
        ("suback", mid, [rc.value for rc in rcs], from_paho(props))
    )
    client.on_unsubscribe = lambda c, u, mid, rcs, props: events.append(
        ("unsuback", mid, [rc.value for rc in rcs])
    )
    client.on_message = lambda c, u, m: events.append(
        ("message", m.topic, m.payload, m.qos, from_paho(m.properties))
    )
    client.on_disconnect = lambda c, u, flags, rc, props: events.append(
        ("disconnect", rc.value, from_paho(props))
    )
    connect_props = _paho_props(
        "CONNECT",
        SessionExpiryInterval=3600,
        ReceiveMaximum=10,
        MaximumPacketSize=100_000,
        TopicAliasMaximum=5,
        UserProperty=[("fleet", "a"), ("fleet", "b")],
    )
    peer = _LoopbackPeer(client, clean_start=False, properties=connect_props)
    try:
        # CONNECT: Clean Start 0, Session Expiry, Receive Maximum, Maximum Packet Size, Topic
        # Alias Maximum, will properties, credentials. Our broker-side decoder switches to 5.
        assert peer.expect(1) == [
            Connect(
                "codec-v5",
                clean_session=False,
                keepalive=17,
                username="alice",
                password=b"s3cr3t",
                will=Will(
                    "clients/codec/status",
                    b"offline",
                    1,
                    True,
                    Properties(
                        message_expiry_interval=600,
                        content_type="text/plain",
                        will_delay_interval=30,
                    ),
                ),
                protocol_level=5,
                properties=Properties(
                    session_expiry_interval=3600,
                    receive_maximum=10,
                    topic_alias_maximum=5,
                    user_properties=(("fleet", "a"), ("fleet", "b")),
                    maximum_packet_size=100_000,
                ),
            )
        ]
        assert peer.decoder.protocol_version == V5
        connack_props = Properties(
            session_expiry_interval=600,
            assigned_client_identifier="assigned-1",
            server_keep_alive=30,
            reason_string="welcome",
            receive_maximum=5,
            topic_alias_maximum=3,
            maximum_qos=1,
            retain_available=True,
            maximum_packet_size=65_536,
            wildcard_subscription_available=True,
            subscription_identifier_available=True,
            shared_subscription_available=False,
        )
        peer.send(ConnAck(True, ReasonCode.SUCCESS, connack_props))
        peer.pump_until(client.is_connected)
        assert events.pop() == ("connect", 0, connack_props)

        # Client -> server PUBLISH with properties, QoS 1 and 2; failure and success codes back.
        pub_props = _paho_props(
            "PUBLISH",
            PayloadFormatIndicator=1,
            MessageExpiryInterval=120,
            ContentType="application/json",
            ResponseTopic="reply/to/me",
            CorrelationData=b"\x00\x01req-7",
            UserProperty=[("trace", "abc")],
        )
        i1 = client.publish("sensors/1", b'{"t": 21}', qos=1, properties=pub_props)
        i2 = client.publish("sensors/2", b"two", qos=2)
        expected_props = Properties(
            payload_format_indicator=1,
            message_expiry_interval=120,
            content_type="application/json",
            response_topic="reply/to/me",
            correlation_data=b"\x00\x01req-7",
            user_properties=(("trace", "abc"),),
        )
        assert peer.expect(2) == [
            Publish("sensors/1", b'{"t": 21}', 1, False, False, i1.mid, expected_props),
            Publish("sensors/2", b"two", 2, False, False, i2.mid),
        ]
        peer.send(
            PubAck(i1.mid, ReasonCode.QUOTA_EXCEEDED, Properties(reason_string="slow down")),
            PubRec(i2.mid, ReasonCode.NO_MATCHING_SUBSCRIBERS),
        )
        assert peer.expect(1) == [PubRel(i2.mid)]
        peer.send(PubComp(i2.mid))
        peer.pump_until(lambda: len(events) == 2)
        assert sorted(events) == [("publish", i1.mid, 0x97), ("publish", i2.mid, 0x00)]
        events.clear()

        # SUBSCRIBE with every option and a subscription identifier; per-filter reason codes.
        _, sub_mid = client.subscribe(
            [
                (
                    "a/+",
                    SubscribeOptions(qos=1, noLocal=True, retainAsPublished=True, retainHandling=2),
                ),
                ("b/#", SubscribeOptions(qos=2)),
            ],
            properties=_paho_props("SUBSCRIBE", SubscriptionIdentifier=7),
        )
        assert sub_mid is not None
        assert peer.expect(1) == [
            Subscribe(
                sub_mid,
                [
                    ("a/+", SubscriptionOptions(1, True, True, RetainHandling.DO_NOT_SEND)),
                    ("b/#", SubscriptionOptions(2)),
                ],
                Properties(subscription_identifiers=(7,)),
            )
        ]
        suback_props = Properties(reason_string="partly", user_properties=(("k", "v"),))
        peer.send(
            SubAck(sub_mid, [ReasonCode.GRANTED_QOS_1, ReasonCode.NOT_AUTHORIZED], suback_props)
        )
        peer.pump_until(lambda: bool(events))
        assert events.pop() == ("suback", sub_mid, [0x01, 0x87], suback_props)

        _, unsub_mid = client.unsubscribe(["a/+", "c"])
        assert unsub_mid is not None
        assert peer.expect(1) == [Unsubscribe(unsub_mid, ["a/+", "c"])]
        peer.send(UnsubAck(unsub_mid, [ReasonCode.SUCCESS, ReasonCode.NO_SUBSCRIPTION_EXISTED]))
        peer.pump_until(lambda: bool(events))
        assert events.pop() == ("unsuback", unsub_mid, [0x00, 0x11])

        # Server -> client PUBLISH with subscription identifiers and properties.
        inbound = Properties(
            message_expiry_interval=30,
            subscription_identifiers=(7, 9),
            user_properties=(("from", "server"),),
        )
        peer.send(
            Publish("a/x", b"one", 1, packet_id=11, properties=inbound),
            Publish("b/y", b"two", 2, packet_id=12),
        )
        assert peer.expect(2) == [PubAck(11), PubRec(12)]
        peer.send(PubRel(12))
        assert peer.expect(1) == [PubComp(12)]
        peer.pump_until(lambda: len(events) == 2)
        assert events == [
            ("message", "a/x", b"one", 1, inbound),
            ("message", "b/y", b"two", 2, NO_PROPERTIES),
        ]
        events.clear()

        # PINGREQ, then a DISCONNECT with a reason code and properties from the client.
        client._send_pingreq()
        assert peer.expect(1) == [PingReq()]
        peer.send(PingResp())
        client.disconnect(
            reasoncode=PahoReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message"),
            properties=_paho_props("DISCONNECT", SessionExpiryInterval=0),
        )
        assert peer.expect(1) == [
            Disconnect(
                ReasonCode.DISCONNECT_WITH_WILL_MESSAGE,
                Properties(session_expiry_interval=0),
            )
        ]
    finally:
        peer.close()


def test_paho_reads_a_server_disconnect_with_reason() -> None:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="codec-v5-2", protocol=paho.MQTTv5)
    events: list[tuple[Any, ...]] = []
    client.on_disconnect = lambda c, u, flags, rc, props: events.append(
        ("disconnect", rc.value, from_paho(props))
    )
    peer = _LoopbackPeer(client)
    try:
        [connect] = peer.expect(1)
        assert isinstance(connect, Connect) and connect.protocol_level == 5
        peer.send(ConnAck(False, 0))
        peer.pump_until(client.is_connected)
        reason = Properties(reason_string="maintenance", server_reference="other:1883")
        peer.send(Disconnect(ReasonCode.SERVER_SHUTTING_DOWN, reason))
        peer.pump_until(lambda: bool(events))
        assert events == [("disconnect", 0x8B, reason)]
    finally:
        peer.close()


# ---------------------------------------------------------------------------------------------
# Against a real broker: our codec on a raw socket to mosquitto 2, observed by paho (MQTT 5)
# ---------------------------------------------------------------------------------------------


class _RawClient:
    """Our codec speaking MQTT 5 on a plain socket, nothing else: no session logic."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=5)
        self.decoder = Decoder(protocol_version=V5)

    def send(self, *packets: Packet) -> None:
        self.sock.sendall(b"".join(encode(p, protocol_version=V5) for p in packets))

    def expect(self, count: int) -> list[Packet]:
        packets: list[Packet] = []
        while len(packets) < count:
            data = self.sock.recv(1 << 16)
            assert data, f"the broker closed the connection after {packets}"
            packets += self.decoder.feed(data)
        assert len(packets) == count, packets
        return packets

    def close(self) -> None:
        self.sock.close()


class _PahoObserver5:
    """An independent paho MQTT 5 client that records what it receives, with properties."""

    def __init__(self, host: str, port: int, *filters: str) -> None:
        self.messages: list[tuple[str, bytes, int, Properties]] = []
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id="codec-observer", protocol=paho.MQTTv5
        )
        self.client.on_message = lambda c, u, m: self.messages.append(
            (m.topic, m.payload, m.qos, from_paho(m.properties))
        )
        subscribed: list[int] = []
        self.client.on_subscribe = lambda c, u, mid, rcs, props: subscribed.append(mid)
        self.client.connect(host, port)
        self.client.loop_start()
        _, mid = self.client.subscribe([(f, SubscribeOptions(qos=1)) for f in filters])
        self.wait(lambda: mid in subscribed)

    def wait(self, condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 10
        while not condition():
            assert time.monotonic() < deadline, f"observer saw {self.messages}"
            time.sleep(0.01)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.broker
def test_an_mqtt5_conversation_with_mosquitto(broker_factory: Any) -> None:
    broker = broker_factory(
        extra_config="max_inflight_messages 5\nmax_packet_size 20000\nmax_keepalive 30\n"
    )
    observer = _PahoObserver5(broker.host, broker.port, "codec/out/#", "clients/will")
    raw = _RawClient(broker.host, broker.port)
    try:
        # CONNECT with an empty client id, Clean Start, Session Expiry, Receive Maximum,
        # Maximum Packet Size, Topic Alias Maximum and a will with properties.
        will = Will("clients/will", b"gone", 1, False, Properties(content_type="text/plain"))
        raw.send(
            Connect(
                "",
                clean_session=True,
                keepalive=60,
                will=will,
                protocol_level=5,
                properties=Properties(
                    session_expiry_interval=300,
                    receive_maximum=7,
                    maximum_packet_size=100_000,
                    topic_alias_maximum=4,
                    request_problem_information=True,
                ),
            )
        )
        [connack] = raw.expect(1)
        assert isinstance(connack, ConnAck) and connack.reason_code is ReasonCode.SUCCESS
        props = connack.properties
        assert props.receive_maximum == 5  # max_inflight_messages, announced (issue 8)
        assert props.maximum_packet_size == 20_000
        assert props.server_keep_alive == 30  # our 60 exceeded max_keepalive
        assert props.assigned_client_identifier and props.assigned_client_identifier.startswith(
            "auto-"
        )

        # SUBSCRIBE with options and a subscription identifier.
        raw.send(
            Subscribe(
                1,
                [("codec/in/#", SubscriptionOptions(1, no_local=True))],
                Properties(subscription_identifiers=(42,)),
            )
        )
        assert raw.expect(1) == [SubAck(1, [ReasonCode.GRANTED_QOS_1])]

        # paho publishes to us: the properties arrive, with our subscription identifier.
        sent = _paho_props(
            "PUBLISH",
            ContentType="application/json",
            ResponseTopic="codec/out/reply",
            CorrelationData=b"\x00req",
            UserProperty=[("trace", "t-1")],
        )
        observer.client.publish("codec/in/x", b"{}", qos=1, properties=sent).wait_for_publish(5)
        [inbound] = raw.expect(1)
        assert isinstance(inbound, Publish) and inbound.qos == 1 and inbound.packet_id
        assert (inbound.topic, inbound.payload) == ("codec/in/x", b"{}")
        assert inbound.properties == Properties(
            content_type="application/json",
            response_topic="codec/out/reply",
            correlation_data=b"\x00req",
            subscription_identifiers=(42,),
            user_properties=(("trace", "t-1"),),
        )
        raw.send(PubAck(inbound.packet_id))

        # We publish with properties: mosquitto acknowledges, paho receives them.
        out_props = Properties(
            payload_format_indicator=1,
            message_expiry_interval=3600,
            correlation_data=b"\x00req",
            user_properties=(("a", "1"), ("a", "2")),
        )
        raw.send(Publish("codec/out/1", b"answer", 1, packet_id=2, properties=out_props))
        assert raw.expect(1) == [PubAck(2)]
        observer.wait(lambda: len(observer.messages) == 1)
        topic, payload, qos, got = observer.messages[0]
        assert (topic, payload, qos) == ("codec/out/1", b"answer", 1)
        assert got.message_expiry_interval is not None and got.message_expiry_interval <= 3600
        assert got._replace(message_expiry_interval=3600) == out_props

        # A reason code that is not plain success: nobody subscribed.
        raw.send(Publish("nobody/here", b"x", 1, packet_id=3))
        assert raw.expect(1) == [PubAck(3, ReasonCode.NO_MATCHING_SUBSCRIBERS)]

        # A topic alias set, then used with an empty topic.
        raw.send(
            Publish("codec/out/alias", b"a1", properties=Properties(topic_alias=1)),
            Publish("", b"a2", properties=Properties(topic_alias=1)),
        )
        observer.wait(lambda: len(observer.messages) == 3)
        assert [m[:2] for m in observer.messages[1:]] == [
            ("codec/out/alias", b"a1"),
            ("codec/out/alias", b"a2"),
        ]

        # No Local: our own publication on a filter we subscribed to does not come back.
        raw.send(Publish("codec/in/self", b"mine", 1, packet_id=4), PingReq())
        assert raw.expect(2) == [PubAck(4), PingResp()]

        # A packet over the broker's Maximum Packet Size: DISCONNECT with reason 0x95, and,
        # the disconnection not being a normal one, the will with its properties.
        raw.send(Publish("codec/out/big", b"x" * 20_000))
        assert raw.expect(1) == [Disconnect(ReasonCode.PACKET_TOO_LARGE)]
        observer.wait(lambda: len(observer.messages) == 4)
        assert observer.messages[3] == (
            "clients/will",
            b"gone",
            1,
            Properties(content_type="text/plain"),
        )
    finally:
        raw.close()
        observer.close()
