"""Tests of the sans-IO MQTT 3.1.1 codec: round trips, chunking, malformed input, and a cross-check
against paho-mqtt (its bytes on a real loopback socket, its packet builders and its decoders)."""

from __future__ import annotations

import itertools
import re
import socket
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

import paho.mqtt.client as paho
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from paho.mqtt import _packet as paho_packet
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from mqtt_persist.errors import MalformedPacket
from mqtt_persist.protocol import (
    MAX_PACKET_SIZE,
    SUBACK_FAILURE,
    ConnAck,
    Connect,
    Decoder,
    Disconnect,
    Packet,
    PingReq,
    PingResp,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    SubAck,
    Subscribe,
    UnsubAck,
    Unsubscribe,
    Will,
    encode,
)

# ---------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------

#: MQTT UTF-8 strings: any Unicode scalar value except U+0000 (surrogates are not encodable).
mqtt_text = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), max_size=40)
packet_ids = st.integers(min_value=1, max_value=0xFFFF)
qos_levels = st.integers(min_value=0, max_value=2)
#: Payloads that cross the one-byte / two-byte remaining-length boundary now and then.
payloads = st.one_of(st.binary(max_size=40), st.binary(min_size=100, max_size=400))


@st.composite
def publishes(draw: st.DrawFn) -> Publish:
    qos = draw(qos_levels)
    return Publish(
        topic=draw(mqtt_text),
        payload=draw(payloads),
        qos=qos,
        retain=draw(st.booleans()),
        dup=draw(st.booleans()) if qos else False,
        packet_id=draw(packet_ids) if qos else None,
    )


@st.composite
def connects(draw: st.DrawFn) -> Connect:
    username = draw(st.none() | mqtt_text)
    password = draw(st.none() | st.binary(max_size=40)) if username is not None else None
    will = draw(st.none() | st.builds(Will, mqtt_text, st.binary(max_size=60), qos_levels))
    name, level = draw(st.sampled_from([("MQTT", 4), ("MQIsdp", 3), ("MQTT", 0x84)]))
    return Connect(
        client_id=draw(mqtt_text),
        clean_session=draw(st.booleans()),
        keepalive=draw(st.integers(min_value=0, max_value=0xFFFF)),
        username=username,
        password=password,
        will=will,
        protocol_level=level,
        protocol_name=name,
    )


@st.composite
def connacks(draw: st.DrawFn) -> ConnAck:
    return_code = draw(st.integers(min_value=0, max_value=255))
    return ConnAck(draw(st.booleans()) if return_code == 0 else False, return_code)


STRATEGIES: dict[str, st.SearchStrategy[Any]] = {
    "CONNECT": connects(),
    "CONNACK": connacks(),
    "PUBLISH": publishes(),
    "PUBACK": st.builds(PubAck, packet_ids),
    "PUBREC": st.builds(PubRec, packet_ids),
    "PUBREL": st.builds(PubRel, packet_ids),
    "PUBCOMP": st.builds(PubComp, packet_ids),
    "SUBSCRIBE": st.builds(
        Subscribe, packet_ids, st.lists(st.tuples(mqtt_text, qos_levels), min_size=1, max_size=8)
    ),
    "SUBACK": st.builds(
        SubAck, packet_ids, st.lists(st.sampled_from([0, 1, 2, SUBACK_FAILURE]), min_size=1)
    ),
    "UNSUBSCRIBE": st.builds(Unsubscribe, packet_ids, st.lists(mqtt_text, min_size=1, max_size=8)),
    "UNSUBACK": st.builds(UnsubAck, packet_ids),
    "PINGREQ": st.just(PingReq()),
    "PINGRESP": st.just(PingResp()),
    "DISCONNECT": st.just(Disconnect()),
}

any_packet: st.SearchStrategy[Packet] = st.one_of(*STRATEGIES.values())


def feed_chunks(decoder: Decoder, data: bytes, cuts: list[int]) -> list[Packet]:
    """Feed ``data`` split at the (unsorted, possibly repeated) offsets ``cuts``."""
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    out: list[Packet] = []
    for a, b in itertools.pairwise(bounds):
        out += decoder.feed(data[a:b])
    return out


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", STRATEGIES)
@given(data=st.data())
def test_round_trip_every_packet_type(kind: str, data: st.DataObject) -> None:
    packet = data.draw(STRATEGIES[kind])
    wire = encode(packet)
    assert Decoder().feed(wire) == [packet]
    # Byte at a time: every split, including inside the remaining length.
    decoder = Decoder()
    out: list[Packet] = []
    for i in range(len(wire)):
        out += decoder.feed(wire[i : i + 1])
    assert out == [packet]
    assert decoder.buffered == 0


@given(
    packets=st.lists(any_packet, min_size=1, max_size=25),
    cuts=st.lists(st.integers(min_value=0), max_size=30),
)
def test_many_packets_in_random_chunks(packets: list[Packet], cuts: list[int]) -> None:
    wire = b"".join(encode(p) for p in packets)
    assert Decoder().feed(wire) == packets  # coalesced in one read
    decoder = Decoder()
    assert feed_chunks(decoder, wire, cuts) == packets
    assert decoder.buffered == 0


@given(
    packets=st.lists(any_packet, min_size=1, max_size=5),
    kind=st.sampled_from([bytearray, memoryview]),
)
def test_feed_accepts_bytes_like(packets: list[Packet], kind: Callable[[bytes], Any]) -> None:
    wire = b"".join(encode(p) for p in packets)
    decoder = Decoder()
    half = len(wire) // 2
    assert decoder.feed(kind(wire[:half])) + decoder.feed(kind(wire[half:])) == packets
    for packet in decoder.feed(kind(wire)):
        if isinstance(packet, Publish):
            assert type(packet.payload) is bytes


@pytest.mark.parametrize(
    ("remaining_length", "length_bytes"),
    [(127, 1), (128, 2), (16_383, 2), (16_384, 3), (2_097_151, 3), (2_097_152, 4)],
)
def test_remaining_length_boundaries(remaining_length: int, length_bytes: int) -> None:
    # QoS 0 PUBLISH with topic "t": remaining length = 2 + 1 + len(payload).
    packet = Publish("t", b"x" * (remaining_length - 3))
    wire = encode(packet)
    assert len(wire) == 1 + length_bytes + remaining_length
    assert wire[length_bytes] < 128 and all(b >= 128 for b in wire[1:length_bytes])
    assert Decoder().feed(wire) == [packet]
    # Split inside the length bytes and in the middle of the body.
    decoder = Decoder()
    assert decoder.feed(wire[:2]) == []
    assert decoder.feed(wire[2 : len(wire) // 2]) == []
    assert decoder.feed(wire[len(wire) // 2 :]) == [packet]


def _trickle(size: int) -> float:
    """Seconds to decode one PUBLISH of ``size`` bytes (+ a PUBACK) fed 256 bytes at a time."""
    packet = Publish("big/blob", b"\xa5" * size, qos=1, packet_id=9)
    wire = encode(packet) + encode(PubAck(9))
    decoder = Decoder()
    out: list[Packet] = []
    started = time.perf_counter()
    for i in range(0, len(wire), 256):
        out += decoder.feed(wire[i : i + 256])
    elapsed = time.perf_counter() - started
    assert out == [packet, PubAck(9)]
    return elapsed


def test_large_packet_trickling_in_is_not_quadratic() -> None:
    # Ten times the bytes must cost about ten times the time (linear buffering), not a hundred
    # (re-copying the buffer on every read: ~32 GB moved for 4 MB). Compared side by side, best
    # of three each, so a loaded machine slows both alike; 30x leaves room for noise.
    small = min(_trickle(400_000) for _ in range(3))
    large = min(_trickle(4_000_000) for _ in range(3))
    assert large < 30 * small + 0.05, (large, small)


def test_max_string_length() -> None:
    topic = "é" * 32_767 + "a"  # 65,535 UTF-8 bytes
    packet = Subscribe(1, [(topic, 1)])
    assert Decoder().feed(encode(packet)) == [packet]
    with pytest.raises(ValueError, match="65535"):
        encode(Subscribe(1, [(topic + "a", 1)]))


def test_known_bytes() -> None:
    """A few packets written out by hand from MQTT 3.1.1 §3."""
    cases: list[tuple[Packet, bytes]] = [
        (PingReq(), b"\xc0\x00"),
        (PingResp(), b"\xd0\x00"),
        (Disconnect(), b"\xe0\x00"),
        (ConnAck(True, 0), b"\x20\x02\x01\x00"),
        (PubAck(0x1234), b"\x40\x02\x12\x34"),
        (PubRec(1), b"\x50\x02\x00\x01"),
        (PubRel(1), b"\x62\x02\x00\x01"),
        (PubComp(1), b"\x70\x02\x00\x01"),
        (UnsubAck(7), b"\xb0\x02\x00\x07"),
        (SubAck(10, [0, 1, 2, 0x80]), b"\x90\x06\x00\x0a\x00\x01\x02\x80"),
        (Subscribe(10, [("a/b", 1)]), b"\x82\x08\x00\x0a\x00\x03a/b\x01"),
        (Unsubscribe(10, ["a/b"]), b"\xa2\x07\x00\x0a\x00\x03a/b"),
        (Publish("a/b", b"hi"), b"\x30\x07\x00\x03a/bhi"),
        (Publish("a/b", b"hi", 1, True, True, 5), b"\x3b\x09\x00\x03a/b\x00\x05hi"),
        (Publish("a/b", b"", 2, packet_id=0xFFFF), b"\x34\x07\x00\x03a/b\xff\xff"),
        (
            Connect("cid", keepalive=10),
            b"\x10\x0f\x00\x04MQTT\x04\x02\x00\x0a\x00\x03cid",
        ),
        (
            Connect("c", False, 60, "u", b"p", Will("w", b"x", 2, True)),
            b"\x10\x19\x00\x04MQTT\x04\xf4\x00\x3c\x00\x01c\x00\x01w\x00\x01x\x00\x01u\x00\x01p",
        ),
    ]
    for packet, wire in cases:
        assert encode(packet) == wire, packet
        assert Decoder().feed(wire) == [packet]


# ---------------------------------------------------------------------------------------------
# Malformed input
# ---------------------------------------------------------------------------------------------

MALFORMED: list[tuple[str, bytes, str]] = [
    ("type 0", b"\x00\x00", "reserved packet type 0"),
    ("type 15 (AUTH)", b"\xf0\x00", "reserved packet type 15"),
    ("PUBREL flags 0", b"\x60\x02\x00\x01", "PUBREL with fixed-header flags 0b0000"),
    ("SUBSCRIBE flags 0", b"\x80\x06\x00\x01\x00\x01a\x00", "SUBSCRIBE with fixed-header flags"),
    ("UNSUBSCRIBE flags 0", b"\xa0\x05\x00\x01\x00\x01a", "UNSUBSCRIBE with fixed-header"),
    ("SUBSCRIBE dup bit", b"\x8a\x06\x00\x01\x00\x01a\x00", "SUBSCRIBE with fixed-header flags"),
    ("PUBACK flags 2", b"\x42\x02\x00\x01", "PUBACK with fixed-header flags 0b0010"),
    ("CONNECT flags 1", b"\x11\x00", "CONNECT with fixed-header flags"),
    ("PINGREQ flags", b"\xc8\x00", "PINGREQ with fixed-header flags"),
    ("remaining length 5 bytes", b"\x30\x80\x80\x80\x80\x01", "more than 4 bytes"),
    ("PUBLISH QoS 3", b"\x36\x05\x00\x01a\x00\x01", "QoS 3"),
    ("QoS 0 PUBLISH with DUP", b"\x38\x03\x00\x01a", "DUP"),
    ("QoS 1 PUBLISH packet id 0", b"\x32\x05\x00\x01a\x00\x00", "packet identifier 0"),
    ("QoS 2 PUBLISH packet id 0", b"\x34\x05\x00\x01a\x00\x00", "packet identifier 0"),
    ("PUBLISH without topic length", b"\x30\x01\x00", "truncated topic length"),
    ("PUBLISH topic past end", b"\x30\x04\x00\x05ab", "past the packet end"),
    ("QoS 1 PUBLISH without id", b"\x32\x04\x00\x01a\x00", "truncated packet identifier"),
    ("PUBLISH invalid UTF-8", b"\x30\x04\x00\x02\xc3\x28", "invalid UTF-8"),
    ("PUBLISH UTF-16 surrogate", b"\x30\x05\x00\x03\xed\xa0\x80", "invalid UTF-8"),
    ("PUBLISH overlong UTF-8", b"\x30\x04\x00\x02\xc0\xaf", "invalid UTF-8"),
    ("PUBLISH NUL in topic", b"\x30\x05\x00\x03a\x00b", "U+0000"),
    ("CONNACK reserved flag", b"\x20\x02\x02\x00", "reserved acknowledge flag"),
    ("CONNACK too long", b"\x20\x03\x00\x00\x00", "remaining length 3, must be 2"),
    ("CONNACK too short", b"\x20\x01\x00", "remaining length 1, must be 2"),
    ("SUBACK code 3", b"\x90\x03\x00\x01\x03", "SUBACK return code 0x03"),
    ("SUBACK code 0x81", b"\x90\x03\x00\x01\x81", "SUBACK return code 0x81"),
    ("SUBACK empty", b"\x90\x02\x00\x01", "no return codes"),
    ("SUBACK truncated id", b"\x90\x01\x00", "truncated packet identifier"),
    ("SUBSCRIBE empty", b"\x82\x02\x00\x01", "no topic filters"),
    ("SUBSCRIBE QoS 3", b"\x82\x06\x00\x01\x00\x01a\x03", "requested QoS 3"),
    ("SUBSCRIBE reserved QoS bits", b"\x82\x06\x00\x01\x00\x01a\x41", "reserved bits"),
    ("SUBSCRIBE filter without QoS", b"\x82\x05\x00\x01\x00\x01a", "without requested QoS"),
    ("SUBSCRIBE packet id 0", b"\x82\x06\x00\x00\x00\x01a\x00", "packet identifier 0"),
    ("SUBSCRIBE NUL in filter", b"\x82\x06\x00\x01\x00\x01\x00\x00", "U+0000"),
    ("UNSUBSCRIBE empty", b"\xa2\x02\x00\x01", "no topic filters"),
    ("UNSUBSCRIBE truncated filter", b"\xa2\x05\x00\x01\x00\x02a", "past the packet end"),
    ("UNSUBSCRIBE half a length", b"\xa2\x03\x00\x01\x00", "truncated length prefix"),
    ("PUBACK trailing byte", b"\x40\x03\x00\x01\x00", "PUBACK with remaining length 3"),
    ("PUBACK short", b"\x40\x01\x00", "PUBACK with remaining length 1"),
    ("PUBACK packet id 0", b"\x40\x02\x00\x00", "packet identifier 0"),
    ("PUBREC packet id 0", b"\x50\x02\x00\x00", "packet identifier 0"),
    ("PUBREL trailing byte", b"\x62\x03\x00\x01\x00", "PUBREL with remaining length 3"),
    ("PUBCOMP trailing", b"\x70\x04\x00\x01\x00\x00", "PUBCOMP with remaining length 4"),
    ("UNSUBACK trailing", b"\xb0\x03\x00\x01\x00", "UNSUBACK with remaining length 3"),
    ("PINGREQ trailing", b"\xc0\x01\x00", "PINGREQ with remaining length 1"),
    ("PINGRESP trailing", b"\xd0\x01\x00", "PINGRESP with remaining length 1"),
    ("DISCONNECT trailing", b"\xe0\x01\x00", "DISCONNECT with remaining length 1"),
    ("CONNECT empty", b"\x10\x00", "CONNECT protocol name: truncated"),
    ("CONNECT truncated header", b"\x10\x07\x00\x04MQTT\x04", "truncated variable header"),
    (
        "CONNECT reserved flag",
        b"\x10\x0f\x00\x04MQTT\x04\x03\x00\x0a\x00\x03cid",
        "reserved connect flag",
    ),
    (
        "CONNECT will qos without will",
        b"\x10\x0f\x00\x04MQTT\x04\x0a\x00\x0a\x00\x03cid",
        "no will flag",
    ),
    (
        "CONNECT will retain without will",
        b"\x10\x0f\x00\x04MQTT\x04\x22\x00\x0a\x00\x03cid",
        "no will flag",
    ),
    (
        "CONNECT will QoS 3",
        b"\x10\x15\x00\x04MQTT\x04\x1e\x00\x0a\x00\x03cid\x00\x01w\x00\x01x",
        "will QoS 3",
    ),
    (
        "CONNECT password without username",
        b"\x10\x12\x00\x04MQTT\x04\x42\x00\x0a\x00\x03cid\x00\x01p",
        "password but no username",
    ),
    (
        "CONNECT missing username",
        b"\x10\x0f\x00\x04MQTT\x04\x82\x00\x0a\x00\x03cid",
        "CONNECT username: truncated",
    ),
    (
        "CONNECT missing will payload",
        b"\x10\x12\x00\x04MQTT\x04\x06\x00\x0a\x00\x03cid\x00\x01w",
        "CONNECT will payload: truncated",
    ),
    (
        "CONNECT trailing bytes",
        b"\x10\x10\x00\x04MQTT\x04\x02\x00\x0a\x00\x03cidX",
        "1 unexpected bytes",
    ),
    (
        "CONNECT invalid UTF-8 client id",
        b"\x10\x0e\x00\x04MQTT\x04\x02\x00\x0a\x00\x02\xff\xfe",
        "client id: invalid UTF-8",
    ),
]


@pytest.mark.parametrize(
    ("wire", "message"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_malformed_packets_are_refused(wire: bytes, message: str) -> None:
    decoder = Decoder()
    with pytest.raises(MalformedPacket, match=re.escape(message)):
        decoder.feed(wire)
    # The decoder is dead from then on, even for valid bytes.
    with pytest.raises(MalformedPacket, match="already failed"):
        decoder.feed(encode(PingReq()))
    # The same bytes one at a time are refused too, and with the same reason.
    decoder = Decoder()
    with pytest.raises(MalformedPacket, match=re.escape(message)):
        for i in range(len(wire)):
            decoder.feed(wire[i : i + 1])
    # And after a valid packet in the same read (the packets before it are lost with it).
    with pytest.raises(MalformedPacket, match=re.escape(message)):
        Decoder().feed(encode(PubAck(1)) + wire)


def test_header_errors_are_raised_before_the_body_arrives() -> None:
    with pytest.raises(MalformedPacket, match="reserved packet type 0"):
        Decoder().feed(b"\x00")  # first byte alone
    with pytest.raises(MalformedPacket, match="PUBREL with fixed-header flags"):
        Decoder().feed(b"\x60")
    with pytest.raises(MalformedPacket, match="more than 4 bytes"):
        Decoder().feed(b"\x30\xff\xff\xff\xff")  # no fifth length byte needed to know


def test_non_minimal_remaining_length_is_accepted() -> None:
    # MQTT 3.1.1 (unlike 5.0) does not require the shortest encoding.
    assert Decoder().feed(b"\xc0\x80\x00") == [PingReq()]
    assert Decoder().feed(b"\x40\x82\x80\x00\x00\x01") == [PubAck(1)]


def test_lenient_where_strictness_hides_the_real_error() -> None:
    # A reserved CONNACK return code, and Session Present set on a refusal: the session layer
    # reports these as a refused connection, which says more than "malformed packet".
    assert Decoder().feed(b"\x20\x02\x00\x06") == [ConnAck(False, 6)]
    assert Decoder().feed(b"\x20\x02\x01\x05") == [ConnAck(True, 5)]


def test_surrogate_escaped_text_is_not_produced() -> None:
    # Python's UTF-8 codec is strict: CESU-8 and 4-byte sequences beyond U+10FFFF are refused.
    for raw in (b"\xed\xb0\x80", b"\xf4\x90\x80\x80", b"\xf8\x88\x80\x80\x80"):
        wire = bytes((0x30, 2 + len(raw), 0, len(raw))) + raw
        with pytest.raises(MalformedPacket, match="invalid UTF-8"):
            Decoder().feed(wire)


# ---------------------------------------------------------------------------------------------
# Maximum packet size
# ---------------------------------------------------------------------------------------------


def test_max_packet_size_refused_as_soon_as_the_header_is_complete() -> None:
    decoder = Decoder(max_packet_size=1000)
    assert decoder.feed(b"\x30") == []
    assert decoder.feed(b"\xe6") == []  # length not complete yet
    with pytest.raises(MalformedPacket, match="packet of 1001 bytes exceeds the maximum"):
        decoder.feed(b"\x07")  # remaining length 998 is now known; no body was sent
    # The limit counts the whole packet: first byte, length bytes and body.
    exact = encode(Publish("t", b"x" * 6))  # 1 + 1 + 2 + 1 + 6 = 11 bytes
    assert len(exact) == 11
    assert Decoder(max_packet_size=11).feed(exact) == [Publish("t", b"x" * 6)]
    with pytest.raises(MalformedPacket, match="exceeds the maximum packet size 10"):
        Decoder(max_packet_size=10).feed(exact[:2])


def test_default_max_packet_size_is_the_protocol_maximum() -> None:
    decoder = Decoder()
    assert decoder.max_packet_size == MAX_PACKET_SIZE == 268_435_460
    # The largest legal header is accepted (and only waits for its body).
    assert decoder.feed(b"\x30\xff\xff\xff\x7f\x00\x01a") == []
    assert decoder.buffered == 8
    with pytest.raises(ValueError, match="max_packet_size"):
        Decoder(max_packet_size=1)


# ---------------------------------------------------------------------------------------------
# Fuzzing: any bytes, any chunking -> packets or MalformedPacket, nothing else, and it ends.
# ---------------------------------------------------------------------------------------------


def _feed_all(decoder: Decoder, chunks: Iterator[bytes]) -> list[Packet] | MalformedPacket:
    out: list[Packet] = []
    for chunk in chunks:
        try:
            out += decoder.feed(chunk)
        except MalformedPacket as exc:
            with pytest.raises(MalformedPacket):
                decoder.feed(b"\xc0\x00")
            return exc
    return out


def _check_reencodes(packets: list[Packet]) -> None:
    """Whatever the decoder accepts, the encoder can send again, and it decodes the same."""
    for packet in packets:
        if isinstance(packet, ConnAck) and packet.session_present and packet.return_code:
            continue  # decoded leniently, refused by the encoder on purpose
        assert Decoder().feed(encode(packet)) == [packet]


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=300), cuts=st.lists(st.integers(min_value=0), max_size=20))
def test_arbitrary_bytes_decode_or_raise_malformed(data: bytes, cuts: list[int]) -> None:
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    chunks = (data[a:b] for a, b in itertools.pairwise(bounds))
    result = _feed_all(Decoder(max_packet_size=1 << 16), chunks)
    if not isinstance(result, MalformedPacket):
        _check_reencodes(result)


@given(
    packets=st.lists(any_packet, min_size=1, max_size=4),
    mutations=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1),
    cuts=st.lists(st.integers(min_value=0), max_size=10),
)
def test_mutated_packets_decode_or_raise_malformed(
    packets: list[Packet], mutations: list[tuple[int, int]], cuts: list[int]
) -> None:
    wire = bytearray(b"".join(encode(p) for p in packets))
    for where, value in mutations:
        wire[where % len(wire)] = value
    data = bytes(wire)
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    chunks = (data[a:b] for a, b in itertools.pairwise(bounds))
    result = _feed_all(Decoder(), chunks)
    if not isinstance(result, MalformedPacket):
        _check_reencodes(result)


# ---------------------------------------------------------------------------------------------
# The encoder refuses what must not be sent
# ---------------------------------------------------------------------------------------------


class _HugePayload(bytes):
    """Claims the largest size MQTT can frame, plus one, without allocating 256 MB."""

    def __len__(self) -> int:
        return 268_435_455 - 2 - 1 + 1


ENCODE_REFUSED: list[tuple[str, Any, str]] = [
    ("QoS 1 without id", Publish("t", b"", qos=1), "packet_id in 1..65535"),
    ("QoS 2 id 0", Publish("t", b"", qos=2, packet_id=0), "packet_id in 1..65535"),
    ("QoS 1 id 65536", Publish("t", b"", qos=1, packet_id=65536), "packet_id in 1..65535"),
    ("QoS 0 with id", Publish("t", b"", packet_id=1), "QoS 0 PUBLISH has no packet id"),
    ("QoS 0 with dup", Publish("t", b"", dup=True), "DUP"),
    ("QoS 3", Publish("t", b"", qos=3, packet_id=1), "qos must be 0, 1 or 2"),
    ("QoS -1", Publish("t", b"", qos=-1, packet_id=1), "qos must be 0, 1 or 2"),
    ("NUL in topic", Publish("a\x00b", b""), "U+0000"),
    ("lone surrogate", Publish("a\udc80", b""), "utf-8"),
    ("topic too long", Publish("a" * 65_536, b""), "65535"),
    ("body too large", Publish("t", _HugePayload()), "remaining length 268435456"),
    ("PUBACK id 0", PubAck(0), "1..65535"),
    ("PUBACK id None", PubAck(None), "1..65535"),  # type: ignore[arg-type]
    ("PUBREC id 65536", PubRec(65_536), "1..65535"),
    ("PUBREL id -1", PubRel(-1), "1..65535"),
    ("PUBCOMP id 0", PubComp(0), "1..65535"),
    ("UNSUBACK id 0", UnsubAck(0), "1..65535"),
    ("SUBSCRIBE empty", Subscribe(1, []), "at least one topic filter"),
    ("SUBSCRIBE qos 3", Subscribe(1, [("a", 3)]), "qos must be 0, 1 or 2"),
    ("SUBSCRIBE id 0", Subscribe(0, [("a", 0)]), "1..65535"),
    ("SUBSCRIBE NUL", Subscribe(1, [("a\x00", 0)]), "U+0000"),
    ("UNSUBSCRIBE empty", Unsubscribe(1, []), "at least one topic filter"),
    ("SUBACK empty", SubAck(1, []), "at least one return code"),
    ("SUBACK code 3", SubAck(1, [3]), "0, 1, 2 or 0x80"),
    ("CONNACK code 256", ConnAck(False, 256), "0..255"),
    ("CONNACK refusal with session", ConnAck(True, 5), "session_present"),
    ("CONNECT password only", Connect("c", password=b"p"), "password without a username"),
    ("CONNECT keepalive", Connect("c", keepalive=65_536), "keepalive"),
    ("CONNECT level", Connect("c", protocol_level=256), "protocol_level"),
    ("CONNECT will qos", Connect("c", will=Will("w", b"", qos=3)), "will qos"),
    ("CONNECT long password", Connect("c", username="u", password=b"p" * 65_536), "65535"),
    ("CONNECT long will payload", Connect("c", will=Will("w", b"p" * 65_536)), "65535"),
    ("CONNECT NUL client id", Connect("c\x00"), "U+0000"),
]


@pytest.mark.parametrize(
    ("packet", "message"), [e[1:] for e in ENCODE_REFUSED], ids=[e[0] for e in ENCODE_REFUSED]
)
def test_encoder_refuses_what_must_not_be_sent(packet: Any, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        encode(packet)


def test_encode_rejects_non_packets_and_accepts_subclasses() -> None:
    with pytest.raises(TypeError):
        encode(object())  # type: ignore[arg-type]

    class MyAck(PubAck):
        __slots__ = ()

    assert encode(MyAck(3)) == b"\x40\x02\x00\x03"


# ---------------------------------------------------------------------------------------------
# Cross-check against paho-mqtt 2.x
# ---------------------------------------------------------------------------------------------


def _split_frame(wire: bytes) -> tuple[int, bytes]:
    """(first byte, body) of one encoded packet."""
    i = 1
    while wire[i] & 0x80:
        i += 1
    return wire[0], wire[i + 1 :]


@given(publishes())
def test_paho_decodes_our_publish(packet: Publish) -> None:
    assume(packet.topic)  # paho refuses empty topics on MQTT 3, as the spec says (§4.7.3)
    header, body = _split_frame(encode(packet))
    got = paho_packet.decode_publish(header, body, MQTTProtocolVersion.MQTTv311)
    assert got.topic == packet.topic.encode()
    assert bytes(got.payload) == packet.payload
    assert (got.qos, got.retain, got.dup) == (packet.qos, packet.retain, packet.dup)
    assert got.mid == (packet.packet_id or 0)


@given(st.one_of(STRATEGIES["SUBACK"], STRATEGIES["UNSUBACK"], connacks()))
def test_paho_decodes_our_acks(packet: SubAck | UnsubAck | ConnAck) -> None:
    header, body = _split_frame(encode(packet))
    v311 = MQTTProtocolVersion.MQTTv311
    if isinstance(packet, SubAck):
        suback = paho_packet.decode_suback(header, body, v311)
        assert (suback.mid, list(suback.granted_qos)) == (packet.packet_id, packet.return_codes)
    elif isinstance(packet, UnsubAck):
        assert paho_packet.decode_unsuback(header, body, v311).mid == packet.packet_id
    else:
        connack = paho_packet.decode_connack(header, body, v311)
        assert (connack.flags, connack.rc) == (int(packet.session_present), packet.return_code)


@given(packet_ids, st.sampled_from(["PUBACK", "PUBREC", "PUBREL", "PUBCOMP"]))
def test_paho_decodes_our_id_acks(packet_id: int, kind: str) -> None:
    classes: dict[str, Callable[[int], Packet]] = {
        "PUBACK": PubAck,
        "PUBREC": PubRec,
        "PUBREL": PubRel,
        "PUBCOMP": PubComp,
    }
    cls = classes[kind]
    decode = getattr(paho_packet, f"decode_{kind.lower()}")
    header, body = _split_frame(encode(cls(packet_id)))
    assert decode(header, body, MQTTProtocolVersion.MQTTv311).mid == packet_id


class _PahoBuilder:
    """paho's own packet builders, with the bytes captured instead of written to a socket."""

    def __init__(self, protocol: MQTTProtocolVersion = paho.MQTTv311, **kwargs: Any) -> None:
        self.client = paho.Client(CallbackAPIVersion.VERSION2, protocol=protocol, **kwargs)
        self.sent: list[bytes] = []
        self.client._sock = object()  # type: ignore[assignment]  # _send_publish checks it
        self.client._packet_queue = self._capture  # type: ignore[method-assign,assignment]

    def _capture(self, command: int, packet: bytes | bytearray, *args: Any) -> int:
        self.sent.append(bytes(packet))
        return 0

    def take(self) -> bytes:
        assert len(self.sent) == 1
        return self.sent.pop()

    def close(self) -> None:
        self.client._sock = None


@given(publishes())
def test_paho_publish_bytes_match_ours(packet: Publish) -> None:
    builder = _PahoBuilder()
    mid = packet.packet_id or 0
    builder.client._send_publish(
        mid, packet.topic.encode(), packet.payload, packet.qos, packet.retain, packet.dup
    )
    wire = builder.take()
    builder.close()
    assert Decoder().feed(wire) == [packet]
    assert encode(packet) == wire


@given(STRATEGIES["SUBSCRIBE"], STRATEGIES["UNSUBSCRIBE"])
def test_paho_subscribe_and_unsubscribe_bytes_match_ours(
    sub: Subscribe, unsub: Unsubscribe
) -> None:
    builder = _PahoBuilder()
    _, mid = builder.client._send_subscribe(False, [(t.encode(), q) for t, q in sub.subscriptions])
    sub.packet_id = mid
    wire = builder.take()
    assert Decoder().feed(wire) == [sub]
    assert encode(sub) == wire
    _, mid = builder.client._send_unsubscribe(False, [t.encode() for t in unsub.filters])
    unsub.packet_id = mid
    wire = builder.take()
    assert Decoder().feed(wire) == [unsub]
    assert encode(unsub) == wire
    builder.close()


@given(connects())
def test_paho_connect_bytes_match_ours(packet: Connect) -> None:
    assume(packet.protocol_level in (3, 4))
    assume(packet.client_id)  # paho invents one for an empty id on 3.1, and refuses some on 3.1.1
    assume(packet.will is None or packet.will.topic)  # paho refuses an empty will topic
    protocol = paho.MQTTv311 if packet.protocol_level == 4 else paho.MQTTv31
    builder = _PahoBuilder(protocol, client_id=packet.client_id, clean_session=packet.clean_session)
    if packet.username is not None:
        builder.client.username_pw_set(packet.username)
        builder.client._password = packet.password  # any bytes, not only valid UTF-8
    if packet.will is not None:
        w = packet.will
        builder.client.will_set(w.topic, w.payload, w.qos, w.retain)
    builder.client._send_connect(packet.keepalive)
    wire = builder.take()
    builder.close()
    assert Decoder().feed(wire) == [packet]
    assert encode(packet) == wire


class _LoopbackPeer:
    """A paho client connected to a socket this test plays the broker on, on 127.0.0.1 only.

    Single-threaded: paho is driven with ``loop()`` between our reads, so nothing races.
    """

    def __init__(self, client: paho.Client) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(5)
        self.client = client
        self.decoder = Decoder()
        client.connect("127.0.0.1", self.listener.getsockname()[1], keepalive=17)
        self.conn, _ = self.listener.accept()
        self.conn.settimeout(0.01)

    def expect(self, count: int) -> tuple[list[Packet], bytes]:
        """Pump paho and read until ``count`` packets arrived; return them and their bytes."""
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
        assert b"".join(encode(p) for p in packets) == raw  # byte-identical to paho's
        return packets, raw

    def send(self, *packets: Packet) -> None:
        self.conn.sendall(b"".join(encode(p) for p in packets))

    def pump_until(self, condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 5
        while not condition():
            assert time.monotonic() < deadline
            self.client.loop(timeout=0.01)

    def close(self) -> None:
        self.client._sock_close()
        self.conn.close()
        self.listener.close()


def test_paho_over_loopback_socket() -> None:
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id="codec-cross-check", protocol=paho.MQTTv311
    )
    client.username_pw_set("alice", "s3cr3t")
    client.will_set("clients/codec/status", b"offline", qos=1, retain=True)
    events: list[tuple[Any, ...]] = []
    client.on_connect = lambda c, u, flags, rc, props: events.append(("connect", rc.value))
    client.on_subscribe = lambda c, u, mid, rcs, props: events.append(
        ("suback", mid, [rc.value for rc in rcs])
    )
    client.on_unsubscribe = lambda c, u, mid, rcs, props: events.append(("unsuback", mid))
    client.on_message = lambda c, u, m: events.append(
        ("message", m.topic, m.payload, m.qos, m.retain)
    )
    peer = _LoopbackPeer(client)
    try:
        # CONNECT, in spec order, with will and credentials.
        assert peer.expect(1)[0] == [
            Connect(
                "codec-cross-check",
                clean_session=True,
                keepalive=17,
                username="alice",
                password=b"s3cr3t",
                will=Will("clients/codec/status", b"offline", 1, True),
            )
        ]
        peer.send(ConnAck(False, 0))
        peer.pump_until(client.is_connected)
        assert events.pop() == ("connect", 0)

        # Client → server PUBLISH at every QoS, a Unicode topic, and a 3-byte remaining length.
        big = bytes(range(256)) * 80
        i0 = client.publish("a/b", b"", qos=0)
        i1 = client.publish("température/ü/😀", b"x" * 64, qos=1, retain=True)
        i2 = client.publish("big", big, qos=2)
        packets, raw = peer.expect(3)
        assert packets == [
            Publish("a/b", b"", 0, False, False, None),
            Publish("température/ü/😀", b"x" * 64, 1, True, False, i1.mid),
            Publish("big", big, 2, False, False, i2.mid),
        ]
        assert raw[0] == 0x30 and i0.is_published()

        # Server acknowledges; paho answers the PUBREC with a PUBREL (flags 0b0010).
        peer.send(PubAck(i1.mid), PubRec(i2.mid))
        packets, raw = peer.expect(1)
        assert packets == [PubRel(i2.mid)] and raw[0] == 0x62
        peer.send(PubComp(i2.mid))
        peer.pump_until(lambda: i1.is_published() and i2.is_published())

        # SUBSCRIBE / SUBACK (paho must understand the failure code) / UNSUBSCRIBE / UNSUBACK.
        _, sub_mid = client.subscribe([("a/+", 0), ("b/#", 1), ("c/d", 2)])
        assert sub_mid is not None
        assert peer.expect(1)[0] == [Subscribe(sub_mid, [("a/+", 0), ("b/#", 1), ("c/d", 2)])]
        peer.send(SubAck(sub_mid, [0, 1, SUBACK_FAILURE]))
        peer.pump_until(lambda: bool(events))
        assert events.pop() == ("suback", sub_mid, [0, 1, 0x80])
        _, unsub_mid = client.unsubscribe(["a/+", "b/#"])
        assert unsub_mid is not None
        assert peer.expect(1)[0] == [Unsubscribe(unsub_mid, ["a/+", "b/#"])]
        peer.send(UnsubAck(unsub_mid))
        peer.pump_until(lambda: bool(events))
        assert events.pop() == ("unsuback", unsub_mid)

        # Server → client PUBLISH at every QoS, coalesced in one write; paho acknowledges.
        peer.send(
            Publish("in/q0", b"zero"),
            Publish("in/q1", b"one", 1, packet_id=7),
            Publish("in/q2", b"two" * 100, 2, retain=True, packet_id=8),
        )
        assert peer.expect(2)[0] == [PubAck(7), PubRec(8)]
        peer.send(PubRel(8))
        assert peer.expect(1)[0] == [PubComp(8)]
        peer.pump_until(lambda: len(events) == 3)
        assert events == [
            ("message", "in/q0", b"zero", 0, False),
            ("message", "in/q1", b"one", 1, False),
            ("message", "in/q2", b"two" * 100, 2, True),
        ]

        # PINGREQ (paho sends it on keepalive; triggered directly here) and DISCONNECT.
        client._send_pingreq()
        assert peer.expect(1) == ([PingReq()], b"\xc0\x00")
        peer.send(PingResp())
        client.disconnect()
        assert peer.expect(1) == ([Disconnect()], b"\xe0\x00")
    finally:
        peer.close()


@pytest.mark.parametrize(
    ("protocol", "expected"),
    [
        (paho.MQTTv311, Connect("persistent-1", clean_session=False, keepalive=17)),
        (
            paho.MQTTv31,
            Connect(
                "old-client",
                clean_session=False,
                keepalive=17,
                username="bob",
                protocol_level=3,
                protocol_name="MQIsdp",
            ),
        ),
    ],
    ids=["3.1.1 persistent session", "3.1 username only"],
)
def test_paho_connect_variants_over_loopback(
    protocol: MQTTProtocolVersion, expected: Connect
) -> None:
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=expected.client_id,
        clean_session=expected.clean_session,
        protocol=protocol,
    )
    if expected.username is not None:
        client.username_pw_set(expected.username)
    peer = _LoopbackPeer(client)
    try:
        assert peer.expect(1)[0] == [expected]
        peer.send(ConnAck(True, 0))
        peer.pump_until(client.is_connected)
    finally:
        peer.close()


def test_struct_fast_path_matches_slow_path() -> None:
    """The < 128 fast path and the general path must frame identically around the boundary."""
    for size in range(118, 130):
        packet = Publish("t", b"x" * size, 1, packet_id=1)
        wire = encode(packet)
        body_len = 2 + 1 + 2 + size
        header = bytes((0x32,)) + (
            bytes((body_len,)) if body_len < 128 else bytes((body_len & 0x7F | 0x80, body_len >> 7))
        )
        assert wire == header + struct.pack("!H", 1) + b"t" + struct.pack("!H", 1) + b"x" * size
