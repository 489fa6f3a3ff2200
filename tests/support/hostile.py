"""A hostile broker: scripts for :class:`~tests.support.fake_broker.ScriptedBroker` that accept
CONNECT and then feed the client malformed, oversized, out-of-order or fuzzed bytes.

Each script misbehaves on its first connection only and plays a well-behaved broker on every
later one, so a test can tell "the client recovered with a clean reconnect" (a second
connection reached READY) from "the client hung" or "the client died".

The fuzzer mutates valid server-side packet streams (bit flips, byte changes, insertions,
deletions, truncations, splices) with a seeded :class:`random.Random`, so a failing case is
reproduced by its seed.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence

from mqtt_persist.protocol.codec import encode
from mqtt_persist.protocol.packets import (
    MQTT_5,
    ConnAck,
    Connect,
    Disconnect,
    Packet,
    PingReq,
    PingResp,
    Properties,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    SubAck,
    Subscribe,
    UnsubAck,
    Unsubscribe,
)
from tests.support.fake_broker import FakeConnection, Script

#: The largest remaining length MQTT can express (256 MB - 1), as its 4-byte encoding.
HUGE_REMAINING_LENGTH = b"\xff\xff\xff\x7f"


async def behave(conn: FakeConnection) -> None:
    """Play a well-behaved broker for an already accepted connection until the client leaves."""
    while True:
        try:
            packet = await conn.receive(timeout=60)
        except TimeoutError:
            continue
        match packet:
            case PingReq():
                await conn.send(PingResp())
            case Subscribe(packet_id=pid, subscriptions=subs):
                await conn.send(SubAck(pid, [sub.qos for sub in subs]))
            case Unsubscribe(packet_id=pid, filters=filters):
                await conn.send(UnsubAck(pid, [0] * len(filters)))
            case Publish(qos=1, packet_id=pid):
                await conn.send(PubAck(pid))  # type: ignore[arg-type]
            case Publish(qos=2, packet_id=pid):
                await conn.send(PubRec(pid))  # type: ignore[arg-type]
            case PubRel(packet_id=pid):
                await conn.send(PubComp(pid))
            case Disconnect():
                return


async def accept(conn: FakeConnection, *, session_present: bool = False) -> Connect:
    """Read CONNECT and answer it with an accepting CONNACK; return the CONNECT."""
    connect = await conn.expect(Connect)
    await conn.send(ConnAck(session_present, 0))
    return connect


async def until_client_leaves(conn: FakeConnection, timeout: float = 30.0) -> None:
    """Read (and drop) what the client sends until it closes the connection."""
    while True:
        await conn.receive(timeout=timeout)  # EOFError ends the script


def hostile(*chunks: bytes | Packet, then_close: bool = False) -> Script:
    """First connection: CONNACK, then ``chunks`` (raw bytes, or packets encoded in the
    connection's protocol), then wait for the client to hang up (or close, ``then_close``).
    Later connections: a well-behaved broker."""

    async def script(conn: FakeConnection, index: int) -> None:
        await accept(conn)
        if index:
            await behave(conn)
            return
        for chunk in chunks:
            if isinstance(chunk, bytes):
                await conn.send_raw(chunk)
            else:
                await conn.send(chunk)
        if then_close:
            return
        await until_client_leaves(conn)

    return script


def flood_after_header(header: bytes, *, total: int, chunk: int = 65536) -> Script:
    """First connection: CONNACK, a fixed header announcing a huge packet, then up to ``total``
    bytes of its "body" in ``chunk``-sized writes, then close. A client that enforces its
    maximum packet size hangs up after the header and the writes fail early."""
    block = bytes(chunk)  # made once: the attacker's own memory is not the client's

    async def script(conn: FakeConnection, index: int) -> None:
        await accept(conn)
        if index:
            await behave(conn)
            return
        await conn.send_raw(header)
        sent = 0
        while sent < total:
            await conn.send_raw(block)
            sent += chunk
            await asyncio.sleep(0)

    return script


def silent() -> Script:
    """Reads CONNECT and never answers it."""

    async def script(conn: FakeConnection, index: int) -> None:
        await conn.expect(Connect)
        await until_client_leaves(conn, timeout=120)

    return script


# --- fuzzing -------------------------------------------------------------------------------------


def valid_server_stream(protocol_version: int, rng: random.Random) -> bytes:
    """A plausible run of packets a broker sends after CONNACK, encoded for the version."""
    user = Properties(user_properties=(("k", "v"),)) if protocol_version == MQTT_5 else None
    extra = {"properties": user} if user is not None else {}
    choices: list[Packet] = [
        Publish("fuzz/t", b"payload", qos=0, **extra),
        Publish("fuzz/t", b"p1", qos=1, packet_id=rng.randint(1, 65535)),
        Publish("fuzz/q2", b"p2", qos=2, packet_id=rng.randint(1, 65535), **extra),
        PubRel(rng.randint(1, 65535)),
        PubAck(rng.randint(1, 65535)),
        PubRec(rng.randint(1, 65535)),
        PubComp(rng.randint(1, 65535)),
        SubAck(rng.randint(1, 65535), [0, 1]),
        UnsubAck(rng.randint(1, 65535), [0] if protocol_version == MQTT_5 else []),
        PingResp(),
        ConnAck(False, 0),
    ]
    picked = [rng.choice(choices) for _ in range(rng.randint(1, 5))]
    return b"".join(encode(p, protocol_version) for p in picked)


def mutate(data: bytes, rng: random.Random) -> bytes:
    """``data`` with 1..4 random mutations (never the identity: at least one byte changes)."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(6)
        pos = rng.randrange(len(out)) if out else 0
        if kind == 0 and out:  # flip a bit
            out[pos] ^= 1 << rng.randrange(8)
        elif kind == 1 and out:  # an interesting byte value
            out[pos] = rng.choice((0x00, 0x7F, 0x80, 0xFF, 0x30, 0x62, 0xF0, rng.randrange(256)))
        elif kind == 2:  # insert bytes
            out[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
        elif kind == 3 and len(out) > 1:  # delete a run
            del out[pos : pos + rng.randint(1, 4)]
        elif kind == 4 and out:  # truncate
            del out[max(1, pos) :]
        else:  # splice a huge remaining length in
            out[pos:pos] = b"\x30" + HUGE_REMAINING_LENGTH
    if bytes(out) == data:
        out.append(rng.randrange(256))
    return bytes(out)


def fuzz_cases(protocol_version: int, seed: int, count: int) -> Sequence[bytes]:
    """``count`` mutated server streams, reproducible from ``seed``."""
    rng = random.Random(seed)
    return [mutate(valid_server_stream(protocol_version, rng), rng) for _ in range(count)]


def fuzzing(cases: Sequence[bytes]) -> Script:
    """Connection ``i`` (while ``i < len(cases)``): CONNACK, then ``cases[i]``, then close after
    a moment; later connections: a well-behaved broker."""

    async def script(conn: FakeConnection, index: int) -> None:
        await accept(conn)
        if index >= len(cases):
            await behave(conn)
            return
        await conn.send_raw(cases[index])
        # Either the client hangs up on the bytes, or they were harmless and we close.
        try:
            await until_client_leaves(conn, timeout=0.2)
        except TimeoutError:
            return

    return script
