"""Session stores: one conformance suite for every store, then FileStore's crash behaviour.

To run the conformance suite against another store, add one line to :data:`STORE_KINDS`.
"""

from __future__ import annotations

import asyncio
import os
import stat
import struct
import tempfile
import textwrap
import typing
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mqtt_persist.errors import (
    SessionCorrupt,
    SessionExpired,
    SessionLocked,
    StoreError,
    UnsupportedFormatVersion,
)
from mqtt_persist.session.state import (
    InboundCleared,
    InboundReceived,
    InboundReleased,
    MessageAdded,
    MessageReleased,
    MessageRemoved,
    MessageRequeued,
    MessageSetAside,
    Operation,
    PacketIdAssigned,
    ProtocolVersionSet,
    SessionState,
    SetAsideMessage,
    SetAsideRemoved,
    StoredMessage,
    SubscriptionRemoved,
    SubscriptionSet,
    UnsubscribeDone,
)
from mqtt_persist.stores import FileStore, MemoryStore, SessionInfo, SessionStore
from mqtt_persist.stores import file as file_module
from mqtt_persist.stores._checks import check_handlers
from mqtt_persist.stores.file import index as file_index
from mqtt_persist.stores.file import journal as file_journal
from mqtt_persist.stores.redis import codec as redis_codec
from mqtt_persist.stores.serialization import (
    DecodeError,
    EncodeError,
    decode_operation,
    decode_operations,
    encode_each,
    encode_operation,
    encode_operations,
)
from mqtt_persist.stores.sqlite import SQLiteStore
from mqtt_persist.stores.sqlite import operations as sqlite_operations
from tests.support.fake_aio import use_sync_path
from tests.support.store_kill import VICTIM, Batches, kill_rounds, start_holder, stop_holder

T0 = 1_700_000_000.0


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass(frozen=True)
class StoreKind:
    """How to build one kind of store over a test's private location."""

    name: str
    make: Callable[[Path, Callable[[], float]], SessionStore]
    #: A new store object over the same location sees the same sessions. When False (memory),
    #: "reopening" closes and re-opens the same object, which is what survives for that store.
    persistent: bool


STORE_KINDS = [
    StoreKind("memory", lambda path, clock: MemoryStore(clock=clock), persistent=False),
    StoreKind("file", lambda path, clock: FileStore(path / "sessions", clock=clock), True),
    StoreKind("sqlite", lambda path, clock: SQLiteStore(path / "s.db", clock=clock), True),
    StoreKind("redis", __import__("tests.support.redis_server").support.redis_server.make, True),
    StoreKind("postgres", __import__("tests.support.postgres").support.postgres.make, True),
]


class Harness:
    """One store under test, plus the ability to restart it as a new process would."""

    def __init__(self, kind: StoreKind, path: Path, clock: FakeClock) -> None:
        self.kind = kind
        self.path = path
        self.clock = clock
        self.store = kind.make(path, clock)

    async def reopen(self) -> SessionStore:
        await self.store.close()
        if self.kind.persistent:
            self.store = self.kind.make(self.path, self.clock)
        await self.store.open()
        return self.store


@pytest.fixture(params=STORE_KINDS, ids=lambda kind: kind.name)
def kind(request: pytest.FixtureRequest) -> StoreKind:
    return typing.cast(StoreKind, request.param)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def harness(kind: StoreKind, tmp_path: Path, clock: FakeClock) -> AsyncIterator[Harness]:
    h = Harness(kind, tmp_path, clock)
    await h.store.open()
    try:
        yield h
    finally:
        await h.store.close()


@pytest.fixture
def store(harness: Harness) -> SessionStore:
    """An opened store of each kind (closed at teardown)."""
    return harness.store


def msg(seq: int, *, packet_id: int | None = None, payload: bytes = b"x" * 64) -> StoredMessage:
    return StoredMessage(seq, f"t/{seq}", payload, 1 + seq % 2, packet_id=packet_id)


def replay(client_id: str, batches: Sequence[Sequence[Operation]]) -> SessionState:
    state = SessionState(client_id)
    for batch in batches:
        state.apply_all(list(batch))
    return state


def queued_of(state: SessionState) -> list[StoredMessage]:
    """The queued messages (no packet ID) of a full state, ascending."""
    return [m for m in state.messages.values() if m.packet_id is None]


def restricted(state: SessionState, queued_limit: int) -> SessionState:
    """What ``load(queued_limit=...)`` gives for a store holding the full ``state``."""
    keep = {m.seq for m in queued_of(state)[: max(0, queued_limit)]}
    limited = state.copy()
    limited.messages = {
        seq: m for seq, m in state.messages.items() if m.packet_id is not None or seq in keep
    }
    return limited


def every_operation() -> list[Operation]:
    return [
        MessageAdded(StoredMessage(1, "a/b", b"\x00\xffpayload", 1, retain=True)),
        MessageAdded(StoredMessage(2, "ü/🚀", b"", 2)),
        MessageAdded(StoredMessage(3, "", b"z" * 1000, 2, packet_id=7, released=True)),
        PacketIdAssigned(1, 65535),
        PacketIdAssigned(2, 1),
        MessageReleased(2),
        MessageRequeued(3),
        MessageAdded(StoredMessage(4, "gone", b"1", 1)),
        MessageRemoved(4),
        InboundReceived(10),
        InboundReceived(11),
        InboundReleased(10),
        InboundReceived(12),
        InboundCleared(),
        InboundReceived(13),
        SubscriptionSet("x/#", 2, confirmed=True),
        SubscriptionSet("y/+", 0),
        SubscriptionSet("z", 1),
        SubscriptionRemoved("y/+", unsubscribe_pending=True),
        SubscriptionRemoved("z", unsubscribe_pending=False),
        SubscriptionRemoved("w", unsubscribe_pending=True),
        UnsubscribeDone("w"),
        # Format 2: MQTT 5 fields, the protocol level, set-aside messages.
        MessageAdded(
            StoredMessage(5, "v5", b"five", 2, properties=b"\x03\x00\x01t", expires_at=T0)
        ),
        MessageAdded(StoredMessage(6, "poison", b"p" * 300, 1, expires_at=-1.5)),
        PacketIdAssigned(6, 9),
        MessageSetAside(6, "the broker closed the connection after it, 3 times", T0 + 0.25),
        MessageAdded(StoredMessage(7, "aside, then discarded", b"", 1, properties=b"\x01\x01")),
        MessageSetAside(7, "", T0),
        SetAsideRemoved(7),
        SubscriptionSet("v5/#", 1, confirmed=True, options=0x04 | 0x08 | 0x20, subscription_id=1),
        SubscriptionSet("v5/id", 2, options=0x10, subscription_id=268_435_455),
        ProtocolVersionSet(5),
    ]


# --- serialization ----------------------------------------------------------------------------


def test_every_operation_type_is_covered() -> None:
    assert {type(op) for op in every_operation()} == set(typing.get_args(Operation))


@pytest.mark.parametrize("op", every_operation(), ids=repr)
def test_operation_round_trip(op: Operation) -> None:
    data = encode_operation(op)
    assert decode_operation(data) == op
    # Every strict prefix is truncated data, never a different valid operation.
    for cut in range(len(data)):
        with pytest.raises(DecodeError):
            decode_operation(data[:cut])


def test_operation_edge_values_round_trip() -> None:
    ops: list[Operation] = [
        MessageAdded(StoredMessage(2**63 - 1, "t" * 65535, b"p" * 70000, 2, True, 65535, True)),
        MessageAdded(StoredMessage(-(2**63), "t", b"", 1, packet_id=0)),
        PacketIdAssigned(0, 0),
        SubscriptionSet("f" * 65535, 0),
        MessageAdded(StoredMessage(1, "", b"", 1, properties=b"p" * 70000, expires_at=-(2.0**60))),
        SubscriptionSet("", 0, options=0x2C, subscription_id=268_435_455),
        MessageSetAside(-(2**63), "r" * 65535, 1e300),
        SetAsideRemoved(2**63 - 1),
        ProtocolVersionSet(4),
    ]
    assert decode_operations(encode_operations(ops)) == ops


def test_format_1_operations_keep_their_bytes() -> None:
    """Operations without format-2 fields encode exactly as format 1 wrote them."""
    message = StoredMessage(5, "t", b"p", 2, retain=True, packet_id=3, released=True)
    assert encode_operation(MessageAdded(message)) == (
        bytes([1]) + struct.pack("<qBHHI", 5, 2 | 4 | 8 | 16, 3, 1, 1) + b"tp"
    )
    assert encode_operation(SubscriptionSet("f", 1, confirmed=True)) == (
        bytes([9]) + struct.pack("<BH", 1 | 4, 1) + b"f"
    )


@pytest.mark.parametrize(
    "op",
    [
        MessageAdded(StoredMessage(1, "t", b"", 3)),
        MessageAdded(StoredMessage(2**63, "t", b"", 1)),
        MessageAdded(StoredMessage(1, "\ud800", b"", 1)),
        MessageAdded(StoredMessage(1, "t" * 65536, b"", 1)),
        MessageAdded(StoredMessage(1, "t", b"", 1, packet_id=65536)),
        PacketIdAssigned(1, -1),
        SubscriptionSet("f", 3),
        typing.cast(Operation, "not an operation"),
        MessageAdded(StoredMessage(1, "t", b"", 1, properties=typing.cast(bytes, "text"))),
        MessageAdded(StoredMessage(1, "t", b"", 1, expires_at=float("nan"))),
        MessageAdded(StoredMessage(1, "t", b"", 1, expires_at=float("inf"))),
        MessageAdded(StoredMessage(1, "t", b"", 1, expires_at=typing.cast(float, "soon"))),
        SubscriptionSet("f", 1, options=0x01),  # QoS bits are not options
        SubscriptionSet("f", 1, options=0x30),  # retain handling 3
        SubscriptionSet("f", 1, options=0x40),
        SubscriptionSet("f", 1, subscription_id=0),
        SubscriptionSet("f", 1, subscription_id=268_435_456),
        ProtocolVersionSet(3),
        ProtocolVersionSet(6),
        MessageSetAside(1, "r", float("nan")),
        MessageSetAside(1, "\ud800", 0.0),
        MessageSetAside(2**63, "r", 0.0),
        SetAsideRemoved(-(2**63) - 1),
    ],
    ids=lambda op: repr(op)[:40],
)
def test_unencodable_operation_raises_encode_error(op: Operation) -> None:
    with pytest.raises(EncodeError) as info:
        encode_operation(op)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, StoreError)


@pytest.mark.parametrize(
    "data",
    [
        b"\x00",
        b"\x0c",
        b"\xff",
        bytes([1]) + struct.pack("<qBHHI", 1, 0x81, 0, 0, 0),  # reserved message flag
        bytes([1]) + struct.pack("<qBHHI", 1, 0x03, 0, 0, 0),  # QoS 3
        bytes([1]) + struct.pack("<qBHHI", 1, 0x01, 5, 0, 0),  # packet id without its flag
        bytes([1]) + struct.pack("<qBHHI", 1, 0x01, 0, 2, 0) + b"\xff\xfe",  # bad UTF-8
        bytes([9]) + struct.pack("<BH", 0x20, 0),  # reserved subscription flag
        bytes([8, 8, 99]),
        bytes([1]) + struct.pack("<qBHHII", 1, 0x41, 0, 0, 0, 0),  # empty properties, flagged
        bytes([1]) + struct.pack("<qBHHII", 1, 0x41, 0, 0, 0, 9) + b"abc",  # properties cut
        bytes([1]) + struct.pack("<qBHHId", 1, 0x21, 0, 0, 0, float("nan")),  # expiry NaN
        bytes([1]) + struct.pack("<qBHHI", 1, 0x21, 0, 0, 0) + b"\x00" * 7,  # expiry cut
        bytes([9]) + struct.pack("<BH", 0x08, 0) + b"\x00",  # options flagged, but none
        bytes([9]) + struct.pack("<BH", 0x08, 0) + b"\x30",  # retain handling 3
        bytes([9]) + struct.pack("<BH", 0x08, 0) + b"\x03",  # QoS bits in the options
        bytes([9]) + struct.pack("<BH", 0x08, 0),  # options flagged, cut
        bytes([9]) + struct.pack("<BHI", 0x10, 0, 0),  # subscription identifier 0
        bytes([9]) + struct.pack("<BHI", 0x10, 0, 268_435_456),
        bytes([12, 3]),  # protocol level 3.1 was never spoken
        bytes([12]),
        bytes([13]) + struct.pack("<qdH", 1, float("inf"), 0),
        bytes([13]) + struct.pack("<qdH", 1, 0.0, 2) + b"\xff\xfe",  # reason not UTF-8
        bytes([14]) + b"\x01",
        b"\x0f",
    ],
)
def test_garbage_raises_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_operations(data)


finite = st.floats(allow_nan=False, allow_infinity=False)
#: Valid MQTT 5 subscription options besides QoS: no local, retain as published, retain handling.
subscription_options = st.builds(
    lambda no_local, as_published, handling: no_local << 2 | as_published << 3 | handling << 4,
    st.integers(0, 1),
    st.integers(0, 1),
    st.integers(0, 2),
)
subscription_ids = st.none() | st.integers(1, 268_435_455)

wide_ops = st.one_of(
    st.builds(
        MessageAdded,
        st.builds(
            StoredMessage,
            seq=st.integers(-(2**63), 2**63 - 1),
            topic=st.text(max_size=30),
            payload=st.binary(max_size=100),
            qos=st.integers(0, 2),
            retain=st.booleans(),
            packet_id=st.none() | st.integers(0, 65535),
            released=st.booleans(),
            properties=st.binary(max_size=30),
            expires_at=st.none() | finite,
        ),
    ),
    st.builds(PacketIdAssigned, st.integers(-(2**63), 2**63 - 1), st.integers(0, 65535)),
    st.builds(MessageReleased, st.integers(-(2**63), 2**63 - 1)),
    st.builds(MessageRequeued, st.integers(-(2**63), 2**63 - 1)),
    st.builds(MessageRemoved, st.integers(-(2**63), 2**63 - 1)),
    st.builds(InboundReceived, st.integers(0, 65535)),
    st.builds(InboundReleased, st.integers(0, 65535)),
    st.just(InboundCleared()),
    st.builds(
        SubscriptionSet,
        st.text(max_size=30),
        st.integers(0, 2),
        st.booleans(),
        subscription_options,
        subscription_ids,
    ),
    st.builds(SubscriptionRemoved, st.text(max_size=30), st.booleans()),
    st.builds(UnsubscribeDone, st.text(max_size=30)),
    st.builds(ProtocolVersionSet, st.sampled_from([4, 5])),
    st.builds(MessageSetAside, st.integers(-(2**63), 2**63 - 1), st.text(max_size=30), finite),
    st.builds(SetAsideRemoved, st.integers(-(2**63), 2**63 - 1)),
)


@given(st.lists(wide_ops, max_size=20))
def test_batch_round_trip(ops: list[Operation]) -> None:
    assert decode_operations(encode_operations(ops)) == ops


@given(st.lists(wide_ops, max_size=20))
def test_encode_each_is_encode_operation_per_operation(ops: list[Operation]) -> None:
    assert encode_each(ops) == [encode_operation(op) for op in ops]


def test_encode_each_names_the_operation_it_cannot_encode() -> None:
    bad = MessageAdded(StoredMessage(2, "t\ud800", b"x", 1, False))  # a lone surrogate
    with pytest.raises(EncodeError, match="surrogate"):
        encode_each([MessageRemoved(1), bad])
    with pytest.raises(EncodeError, match="not a session operation"):
        encode_each([MessageRemoved(1), "MessageRemoved(2)"])  # type: ignore[list-item]


@given(st.binary(max_size=200))
def test_random_bytes_decode_or_raise_decode_error(data: bytes) -> None:
    try:
        ops = decode_operations(data)
    except DecodeError:
        return
    # Whatever decodes is canonical: it re-encodes to the same bytes.
    assert encode_operations(ops) == data


# --- conformance: every store -----------------------------------------------------------------


async def test_is_a_session_store(store: SessionStore) -> None:
    assert isinstance(store, SessionStore)


async def test_round_trip_of_every_operation(harness: Harness) -> None:
    ops = every_operation()
    batches = [ops[:1], ops[1:9], ops[9:15], ops[15:]]
    for batch in batches:
        await harness.store.apply("c1", batch)
    expected = replay("c1", batches)
    assert await harness.store.load("c1") == expected
    store = await harness.reopen()
    assert await store.load("c1") == expected


async def test_load_unknown_id_is_none(store: SessionStore) -> None:
    assert await store.load("nobody") is None
    assert not await store.exists("nobody")


async def test_apply_is_idempotent(harness: Harness) -> None:
    batch = every_operation()
    await harness.store.apply("c1", batch)
    await harness.store.apply("c1", batch)
    assert await harness.store.load("c1") == replay("c1", [batch])
    store = await harness.reopen()
    await store.apply("c1", batch)
    assert await store.load("c1") == replay("c1", [batch])


async def test_read_after_write(store: SessionStore) -> None:
    await store.apply("c1", [MessageAdded(msg(1))])
    assert list((await store.load("c1") or SessionState("")).messages) == [1]
    await store.apply("c1", [MessageAdded(msg(2)), PacketIdAssigned(1, 5)])
    state = await store.load("c1")
    assert state is not None
    assert list(state.messages) == [1, 2]
    assert state.messages[1].packet_id == 5
    await store.apply("c1", [MessageRemoved(1)])
    assert list((await store.load("c1") or SessionState("")).messages) == [2]


async def test_load_returns_an_independent_copy(store: SessionStore) -> None:
    await store.apply("c1", [MessageAdded(msg(1)), SubscriptionSet("a", 1)])
    first = await store.load("c1")
    assert first is not None
    first.messages.clear()
    first.subscriptions.clear()
    first.inbound_qos2.add(99)
    second = await store.load("c1")
    assert second is not None
    assert list(second.messages) == [1] and list(second.subscriptions) == ["a"]
    assert not second.inbound_qos2


async def test_empty_batch_creates_nothing(store: SessionStore) -> None:
    await store.apply("c1", [])
    assert not await store.exists("c1")
    assert await store.load("c1") is None


async def test_concurrent_applies(harness: Harness) -> None:
    async def writer(client_id: str, task: int) -> None:
        for i in range(10):
            seq = task * 100 + i
            await harness.store.apply(client_id, [MessageAdded(msg(seq)), InboundReceived(seq + 1)])

    await asyncio.gather(*(writer(cid, t) for cid in ("a", "b") for t in range(20)))
    for client_id in ("a", "b"):
        state = await harness.store.load(client_id)
        assert state is not None
        assert sorted(state.messages) == sorted(t * 100 + i for t in range(20) for i in range(10))
        assert len(state.inbound_qos2) == 200
    store = await harness.reopen()
    for client_id in ("a", "b"):
        reopened = await store.load(client_id)
        assert reopened is not None and len(reopened.messages) == 200


async def test_save_replaces_the_session(harness: Harness) -> None:
    await harness.store.apply("c1", [MessageAdded(msg(1)), SubscriptionSet("old", 1)])
    snapshot = replay("c1", [[MessageAdded(msg(5, packet_id=3)), InboundReceived(4)]])
    await harness.store.save(snapshot)
    assert await harness.store.load("c1") == snapshot
    await harness.store.apply("c1", [MessageRemoved(5)])
    snapshot.apply(MessageRemoved(5))
    store = await harness.reopen()
    assert await store.load("c1") == snapshot


async def test_set_aside_messages(harness: Harness) -> None:
    """Set aside: out of the flow (no packet ID kept), loaded in full, counted, kept until
    discarded."""
    v5 = StoredMessage(2, "v5", b"two", 2, properties=b"\x01\x01", expires_at=T0 + 60)
    await harness.store.apply(
        "c",
        [
            MessageAdded(msg(1)),
            MessageAdded(v5),
            MessageAdded(msg(3)),
            MessageAdded(msg(4)),
            PacketIdAssigned(2, 7),
            MessageReleased(2),
        ],
    )
    await harness.store.apply(
        "c",
        [
            MessageSetAside(2, "closed 3 times", T0 + 5),
            MessageSetAside(3, "first", T0 + 6),
            MessageSetAside(3, "again: changes nothing", T0 + 7),
            MessageSetAside(9, "no such message: nothing", T0),
        ],
    )
    aside = {
        2: SetAsideMessage(v5, "closed 3 times", T0 + 5),  # packet ID 7 and PUBREC forgotten
        3: SetAsideMessage(msg(3), "first", T0 + 6),
    }
    for reopen in (False, True):
        store = await harness.reopen() if reopen else harness.store
        state = await store.load("c")
        assert state is not None and state.set_aside == aside
        assert list(state.messages) == [1, 4] and state.last_seq == 4 and not state.is_empty
        limited = await store.load("c", queued_limit=0)
        assert limited is not None and limited.set_aside == aside and not limited.messages
        assert limited.queued_not_loaded == 2
        assert await store.read_queued("c", 0, 10) == [msg(1), msg(4)]  # never in the flow
        [info] = await store.list_sessions()
        assert (info.queued, info.inflight, info.set_aside) == (2, 0, 2)
    store = harness.store
    await store.apply("c", [SetAsideRemoved(2), SetAsideRemoved(2), MessageRemoved(1)])
    await store.apply("c", [MessageRemoved(4)])
    state = await store.load("c")
    assert state is not None and state.set_aside == {3: aside[3]} and not state.is_empty
    await store.apply("c", [SetAsideRemoved(3)])
    store = await harness.reopen()
    state = await store.load("c")
    assert state is not None and state.is_empty and state.last_seq == 4
    [info] = await store.list_sessions()
    assert info.set_aside == 0


async def test_save_keeps_format_2_data(harness: Harness) -> None:
    full = replay("c", [every_operation()])
    assert full.protocol_version == 5 and set(full.set_aside) == {6}
    await harness.store.save(full)
    assert await harness.store.load("c") == full
    store = await harness.reopen()
    assert await store.load("c") == full
    # A snapshot replaces everything: no protocol level, and a set-aside message saved with a
    # packet ID comes back without (as a replay of the snapshot gives it).
    plain = SessionState("c")
    plain.set_aside[4] = SetAsideMessage(msg(4, packet_id=9), "r", T0)
    await store.save(plain)
    for reopen in (False, True):
        store = await harness.reopen() if reopen else store
        state = await store.load("c")
        assert state is not None and state.protocol_version is None and not state.messages
        assert state.set_aside == {4: SetAsideMessage(msg(4), "r", T0)}
        assert state.last_seq >= 4


async def test_delete_and_exists(store: SessionStore) -> None:
    await store.delete("c1")  # nothing stored: not an error
    assert not await store.exists("c1")
    await store.apply("c1", [MessageAdded(msg(1))])
    await store.apply("c2", [MessageAdded(msg(1))])
    assert await store.exists("c1")
    await store.delete("c1")
    await store.delete("c1")
    assert not await store.exists("c1")
    assert await store.load("c1") is None
    assert await store.exists("c2")
    assert [info.client_id for info in await store.list_sessions()] == ["c2"]


async def test_list_sessions(harness: Harness, clock: FakeClock) -> None:
    await harness.store.apply(
        "a", [MessageAdded(msg(i, packet_id=i + 1 if i < 2 else None)) for i in range(5)]
    )
    clock.advance(3)
    await harness.store.apply("b", [MessageAdded(msg(1)), SubscriptionSet("s", 1)])
    await harness.store.apply("a", [SubscriptionSet("s", 1)])
    expected = {
        "a": SessionInfo("a", T0, T0 + 3, None, inflight=2, queued=3),
        "b": SessionInfo("b", T0 + 3, T0 + 3, None, inflight=0, queued=1),
    }
    assert {i.client_id: i for i in await harness.store.list_sessions()} == expected
    store = await harness.reopen()
    assert {i.client_id: i for i in await store.list_sessions()} == expected


async def test_load_updates_last_access(harness: Harness, clock: FakeClock) -> None:
    await harness.store.apply("a", [MessageAdded(msg(1))])
    clock.advance(100)
    await harness.store.load("a")
    [info] = await harness.store.list_sessions()
    assert info.last_access == T0 + 100
    store = await harness.reopen()  # the access is recorded by close() at the latest
    [info] = await store.list_sessions()
    assert info.last_access == T0 + 100


async def test_ttl_and_expiry(harness: Harness, clock: FakeClock) -> None:
    store = harness.store
    await store.apply("a", [MessageAdded(msg(1))])
    await store.update_ttl("a", 10)
    [info] = await store.list_sessions()
    assert info.expires_at == T0 + 10
    clock.advance(5)
    assert await store.exists("a")
    assert await store.load("a") is not None  # an access: expiry moves to T0 + 15
    clock.advance(9)
    assert await store.exists("a")
    await store.apply("a", [MessageAdded(msg(2))])  # an access too: T0 + 24
    store = await harness.reopen()
    clock.advance(9)
    assert await store.exists("a")
    clock.advance(1)
    assert not await store.exists("a")
    assert [info.client_id for info in await store.list_sessions()] == ["a"]
    with pytest.raises(SessionExpired):
        await store.load("a")
    assert await store.load("a") is None
    assert not await store.exists("a")
    assert await store.list_sessions() == []


@pytest.mark.parametrize("never", [None, 0])
async def test_ttl_none_or_zero_never_expires(
    harness: Harness, clock: FakeClock, never: float | None
) -> None:
    await harness.store.apply("a", [MessageAdded(msg(1))])
    await harness.store.update_ttl("a", 5)
    await harness.store.update_ttl("a", never)
    store = await harness.reopen()
    clock.advance(10**9)
    assert await store.exists("a")
    [info] = await store.list_sessions()
    assert info.expires_at is None
    assert await store.load("a") is not None


async def test_update_ttl_of_a_new_session_creates_it(harness: Harness, clock: FakeClock) -> None:
    await harness.store.update_ttl("new", 10)
    assert await harness.store.exists("new")
    store = await harness.reopen()
    clock.advance(11)
    assert not await store.exists("new")
    assert await store.cleanup_expired() == 1


async def test_cleanup_expired(harness: Harness, clock: FakeClock) -> None:
    store = harness.store
    for client_id in ("a", "b", "c"):
        await store.apply(client_id, [MessageAdded(msg(1))])
    await store.update_ttl("a", 10)
    await store.update_ttl("b", 20)
    assert await store.cleanup_expired() == 0
    clock.advance(15)
    assert await store.cleanup_expired() == 1
    clock.advance(10)
    store = await harness.reopen()
    assert await store.cleanup_expired() == 1
    assert [info.client_id for info in await store.list_sessions()] == ["c"]
    assert await store.cleanup_expired() == 0


async def test_cleanup_spares_a_leased_session(store: SessionStore, clock: FakeClock) -> None:
    await store.apply("a", [MessageAdded(msg(1))])
    await store.update_ttl("a", 10)
    await store.acquire("a")
    clock.advance(11)
    assert await store.cleanup_expired() == 0
    await store.release("a")
    assert await store.cleanup_expired() == 1


async def test_lease(store: SessionStore) -> None:
    await store.acquire("a")
    with pytest.raises(SessionLocked):
        await store.acquire("a")
    await store.acquire("b")  # leases are per client id
    await store.release("a")
    await store.release("a")
    await store.acquire("a")
    await store.apply("a", [MessageAdded(msg(1))])
    await store.close()
    await store.open()
    await store.acquire("a")  # close released it
    await store.acquire("b")
    assert await store.load("a") is not None


async def test_delete_keeps_an_acquired_lease(store: SessionStore) -> None:
    await store.acquire("a")
    await store.apply("a", [MessageAdded(msg(1))])
    await store.delete("a")
    with pytest.raises(SessionLocked):
        await store.acquire("a")
    await store.apply("a", [MessageAdded(msg(2))])
    state = await store.load("a")
    assert state is not None and list(state.messages) == [2]


seqs = st.integers(0, 12)
packet_ids = st.integers(1, 65535)
filters = st.sampled_from(["a/#", "b/+", "c", "ü/🚀", ""])
#: One strategy per operation type: the random sequences below exercise every type, and
#: test_random_operations_cover_every_operation_type fails when a new type is missing here.
STORE_OP_STRATEGIES: dict[type, st.SearchStrategy[Operation]] = {
    MessageAdded: st.builds(
        MessageAdded,
        st.builds(
            StoredMessage,
            seq=seqs,
            topic=st.text(max_size=12),
            payload=st.binary(max_size=80),
            qos=st.integers(1, 2),
            retain=st.booleans(),
            packet_id=st.none() | packet_ids,
            released=st.booleans(),
            properties=st.sampled_from([b"", b"", b"\x01\x01", b"\x26\x00\x01k\x00\x01v"]),
            expires_at=st.none() | st.floats(0, 2e9),
        ),
    ),
    PacketIdAssigned: st.builds(PacketIdAssigned, seqs, packet_ids),
    MessageReleased: st.builds(MessageReleased, seqs),
    MessageRequeued: st.builds(MessageRequeued, seqs),
    MessageRemoved: st.builds(MessageRemoved, seqs),
    InboundReceived: st.builds(InboundReceived, st.integers(1, 20)),
    InboundReleased: st.builds(InboundReleased, st.integers(1, 20)),
    InboundCleared: st.just(InboundCleared()),
    SubscriptionSet: st.builds(
        SubscriptionSet,
        filters,
        st.integers(0, 2),
        st.booleans(),
        st.just(0) | subscription_options,
        st.none() | st.integers(1, 3),
    ),
    SubscriptionRemoved: st.builds(SubscriptionRemoved, filters, st.booleans()),
    UnsubscribeDone: st.builds(UnsubscribeDone, filters),
    ProtocolVersionSet: st.builds(ProtocolVersionSet, st.sampled_from([4, 5])),
    MessageSetAside: st.builds(
        MessageSetAside, seqs, st.sampled_from(["", "refused 3 times", "ü"]), st.floats(0, 2e9)
    ),
    SetAsideRemoved: st.builds(SetAsideRemoved, seqs),
}
store_ops = st.one_of(*STORE_OP_STRATEGIES.values())


def test_random_operations_cover_every_operation_type() -> None:
    assert set(STORE_OP_STRATEGIES) == set(typing.get_args(Operation))


@pytest.mark.parametrize(
    "rules",
    [
        pytest.param(lambda: file_index.RULES, id="file"),
        pytest.param(lambda: sqlite_operations.HANDLERS, id="sqlite"),
        pytest.param(lambda: redis_codec.RULES, id="redis"),
    ],
)
def test_every_store_has_one_rule_per_operation_type(
    rules: Callable[[], dict[type, object]],
) -> None:
    """Each store's table of per-operation rules covers exactly the journal operation types.

    (MemoryStore's rule is SessionState.apply itself; test_round_trip_of_every_operation runs
    every type through it.) The stores also refuse to import with a type missing:
    """
    assert set(rules()) == set(typing.get_args(Operation))
    with pytest.raises(TypeError, match="no rule for MessageRemoved"):
        check_handlers("a store", set(rules()) - {MessageRemoved})


@pytest.mark.parametrize("kind", STORE_KINDS, ids=lambda kind: kind.name)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    client_id=st.text(min_size=1, max_size=20),
    batches=st.lists(st.lists(store_ops, min_size=1, max_size=10), max_size=12),
    events=st.lists(st.sampled_from(["reopen", "load", "save", "none"]), min_size=12, max_size=12),
)
def test_random_batches_survive_reopen(
    kind: StoreKind, client_id: str, batches: list[list[Operation]], events: list[str]
) -> None:
    async def scenario(path: Path) -> None:
        harness = Harness(kind, path, FakeClock())
        store = harness.store
        await store.open()
        try:
            for i, batch in enumerate(batches):
                await store.apply(client_id, batch)
                if events[i] == "reopen":
                    store = await harness.reopen()
                elif events[i] == "load":
                    assert await store.load(client_id) == replay(client_id, batches[: i + 1])
                elif events[i] == "save":
                    # A snapshot goes through each store's own save path (SQL rows, a
                    # rewritten journal, save.lua) and must replay to the same state.
                    await store.save(replay(client_id, batches[: i + 1]))
                    assert await store.load(client_id) == replay(client_id, batches[: i + 1])
            store = await harness.reopen()
            expected = replay(client_id, batches) if batches else None
            assert await store.load(client_id) == expected
        finally:
            await harness.store.close()

    with tempfile.TemporaryDirectory() as path:
        asyncio.run(scenario(Path(path)))


# --- conformance: queued messages left in the store (queued_limit, read_queued) ---------------


def window_and_queue() -> list[Operation]:
    """Sequence numbers 1..13: 3, 6, 9 and 12 in flight (with packet IDs), nine queued."""
    return [MessageAdded(msg(s, packet_id=s if s % 3 == 0 else None)) for s in range(1, 14)]


async def test_load_with_queued_limit(harness: Harness) -> None:
    rest: list[Operation] = [SubscriptionSet("s", 1), InboundReceived(4)]
    await harness.store.apply("c", window_and_queue())
    await harness.store.apply("c", rest)
    full = replay("c", [window_and_queue(), rest])
    queued = [1, 2, 4, 5, 7, 8, 10, 11, 13]
    for reopen in (False, True):
        store = await harness.reopen() if reopen else harness.store
        for limit, left in ((0, 9), (4, 5), (9, 0), (100, 0)):
            state = await store.load("c", queued_limit=limit)
            assert state is not None
            assert list(state.messages) == sorted([3, 6, 9, 12, *queued[:limit]])
            assert state == restricted(full, limit)
            assert state.queued_not_loaded == left
            assert state.last_seq == 13
            state.messages.clear()  # an independent copy
        state = await store.load("c")
        assert state == full
        assert state.queued_not_loaded == 0 and state.last_seq == 13


async def test_read_queued_pages_in_order(harness: Harness) -> None:
    assert await harness.store.read_queued("c", 0, 10) == []  # no such session
    await harness.store.apply("c", window_and_queue())
    queued = [msg(s) for s in (1, 2, 4, 5, 7, 8, 10, 11, 13)]
    for reopen in (False, True):
        store = await harness.reopen() if reopen else harness.store
        assert await store.read_queued("c", 0, 100) == queued
        assert await store.read_queued("c", -5, 2) == queued[:2]
        assert await store.read_queued("c", 2, 3) == [msg(4), msg(5), msg(7)]
        assert await store.read_queued("c", 3, 1) == [msg(4)]  # after an in-flight number
        assert await store.read_queued("c", 11, 10) == [msg(13)]
        assert await store.read_queued("c", 13, 10) == []
        assert await store.read_queued("c", 5, 0) == []
        pages: list[list[int]] = []
        after = 0
        while page := await store.read_queued("c", after, 4):
            pages.append([m.seq for m in page])
            after = page[-1].seq
        assert pages == [[1, 2, 4, 5], [7, 8, 10, 11], [13]]


async def test_read_queued_reflects_every_commit(harness: Harness) -> None:
    store = harness.store
    await store.apply("c", window_and_queue())
    await store.apply("c", [MessageAdded(msg(14))])
    assert [m.seq for m in await store.read_queued("c", 11, 10)] == [13, 14]
    await store.apply("c", [PacketIdAssigned(1, 100), MessageRemoved(2)])  # sent; dropped
    assert [m.seq for m in await store.read_queued("c", 0, 3)] == [4, 5, 7]
    await store.apply("c", [MessageRequeued(3), MessageRequeued(1)])  # the broker lost them
    assert await store.read_queued("c", 0, 3) == [msg(1), msg(3), msg(4)]
    await store.apply("c", [MessageReleased(4)])  # odd, but a replay keeps it
    released_4 = StoredMessage(4, "t/4", b"x" * 64, 1, released=True)
    for reopen in (False, True):
        store = await harness.reopen() if reopen else harness.store
        assert await store.read_queued("c", 3, 1) == [released_4]
        state = await store.load("c", queued_limit=2)
        assert state is not None and list(state.messages) == [1, 3, 6, 9, 12]
        assert state.queued_not_loaded == 8 and state.last_seq == 14


async def test_last_seq_covers_every_stored_message(harness: Harness) -> None:
    await harness.store.apply("c", [MessageAdded(msg(s)) for s in (5, 1, 9, 3)])
    state = await harness.store.load("c", queued_limit=1)
    assert state is not None and list(state.messages) == [1] and state.last_seq == 9
    await harness.store.apply("c", [MessageRemoved(9)])
    for reopen in (False, True):
        store = await harness.reopen() if reopen else harness.store
        state = await store.load("c", queued_limit=0)
        assert state is not None and not state.messages and state.queued_not_loaded == 3
        # At least the highest number stored; a store may also remember the removed 9.
        assert 5 <= state.last_seq <= 9


@pytest.mark.parametrize("kind", STORE_KINDS, ids=lambda kind: kind.name)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batches=st.lists(st.lists(store_ops, min_size=1, max_size=10), min_size=1, max_size=10),
    reopen_after=st.sets(st.integers(0, 9)),
    probes=st.lists(st.tuples(st.integers(-1, 13), st.integers(0, 14)), min_size=1, max_size=4),
)
def test_random_batches_queued_reads(
    kind: StoreKind,
    batches: list[list[Operation]],
    reopen_after: set[int],
    probes: list[tuple[int, int]],
) -> None:
    """After every batch, read_queued and load(queued_limit) are slices of the replay."""

    async def scenario(path: Path) -> None:
        harness = Harness(kind, path, FakeClock())
        store = harness.store
        await store.open()
        try:
            for i, batch in enumerate(batches):
                await store.apply("c", batch)
                if i in reopen_after:
                    store = await harness.reopen()
                expected = replay("c", batches[: i + 1])
                queued = queued_of(expected)
                for after_seq, limit in probes:
                    want = [m for m in queued if m.seq > after_seq][:limit]
                    assert await store.read_queued("c", after_seq, limit) == want
                    state = await store.load("c", queued_limit=limit)
                    assert state is not None
                    assert state == restricted(expected, limit)
                    assert list(state.messages) == sorted(state.messages)
                    assert state.queued_not_loaded == max(0, len(queued) - limit)
                    assert max([0, *expected.messages]) <= state.last_seq <= expected.last_seq
        finally:
            await harness.store.close()

    with tempfile.TemporaryDirectory() as path:
        asyncio.run(scenario(Path(path)))


# --- FileStore --------------------------------------------------------------------------------


@pytest.fixture
async def file_store(tmp_path: Path, clock: FakeClock) -> AsyncIterator[FileStore]:
    store = FileStore(tmp_path / "sessions", clock=clock)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def _read(path: Path) -> bytes:
    return path.read_bytes()


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def journal_records(path: Path) -> bytes:
    """The journal's records, without the zeros an open store preallocates after them."""
    data = _read(path)
    parsed = file_journal.parse_journal(file_journal.reader(None, 0, data), len(data))
    assert not parsed.torn
    return data[: parsed.good_end]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


async def test_file_permissions(file_store: FileStore) -> None:
    await file_store.acquire("a")
    await file_store.apply("a", [MessageAdded(msg(1))])
    await file_store.apply("a", [MessageAdded(msg(2))])
    await file_store.save(replay("a", [[MessageAdded(msg(3))]]))
    assert _mode(file_store.directory) == 0o700
    names = _listing(file_store.directory)
    assert names and all(name.endswith((".journal", ".lock")) for name in names)
    for name in names:
        assert _mode(file_store.directory / name) == 0o600, name


async def test_existing_directory_is_used(tmp_path: Path) -> None:
    directory = tmp_path / "shared"
    directory.mkdir(mode=0o755)
    async with FileStore(directory) as store:
        await store.apply("a", [MessageAdded(msg(1))])
        assert _mode(store.journal_path("a")) == 0o600


async def test_hostile_client_ids_stay_inside_the_directory(
    tmp_path: Path, file_store: FileStore
) -> None:
    ids = ["../../escape", "a/b", "/abs", "..", ".", "ünïcødé 🚀", "x" * 5000, "ABC", "abc", " "]
    for i, client_id in enumerate(ids):
        await file_store.apply(client_id, [MessageAdded(msg(i))])
    assert _listing(tmp_path) == ["sessions"]
    names = _listing(file_store.directory)
    assert len({name.lower() for name in names if name.endswith(".journal")}) == len(ids)
    assert all(len(name) < 100 for name in names)
    assert sorted(info.client_id for info in await file_store.list_sessions()) == sorted(ids)
    reopened = FileStore(file_store.directory)
    await file_store.close()
    for i, client_id in enumerate(ids):
        state = await reopened.load(client_id)
        assert state is not None and list(state.messages) == [i]
    await reopened.close()


async def test_apply_fsyncs_exactly_once(
    file_store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def counting(real_sync: Callable[[int], None]) -> Callable[[int], None]:
        def sync(fd: int) -> None:
            calls.append(fd)
            real_sync(fd)

        return sync

    # Appends use fdatasync where the platform has it, rewrites fsync: either is one sync.
    # Through the fake AIO, whose syncs are fdatasync calls (the kernel's would not be seen).
    use_sync_path(monkeypatch, "aio")
    monkeypatch.setattr(os, "fsync", counting(os.fsync))
    if hasattr(os, "fdatasync"):
        monkeypatch.setattr(os, "fdatasync", counting(os.fdatasync))
    await file_store.apply("a", [MessageAdded(msg(0))])
    assert len(calls) == 2  # a new journal: the file, then its directory entry
    for n in range(1, 6):
        calls.clear()
        await file_store.apply("a", [MessageAdded(msg(s)) for s in range(n * 100, n * 100 + n)])
        assert len(calls) == 1


async def test_fsync_can_be_disabled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(os, "fsync", calls.append)
    if hasattr(os, "fdatasync"):
        monkeypatch.setattr(os, "fdatasync", calls.append)
    async with FileStore(tmp_path / "s", fsync=False) as store:
        await store.apply("a", [MessageAdded(msg(0))])
        await store.apply("a", [MessageAdded(msg(1))])
        assert await store.load("a") is not None
    assert calls == []


async def test_one_record_per_apply(file_store: FileStore) -> None:
    await file_store.apply("a", [MessageAdded(msg(0))])
    size = len(journal_records(file_store.journal_path("a")))
    batch = [MessageAdded(msg(s)) for s in range(1, 101)]
    await file_store.apply("a", batch)
    grown = len(journal_records(file_store.journal_path("a"))) - size
    assert grown == len(encode_operations(batch)) + 10  # one 9-byte header + 1 flags byte


async def test_compaction(tmp_path: Path) -> None:
    def batch(n: int) -> list[Operation]:
        ops: list[Operation] = [
            MessageAdded(msg(n, payload=bytes(200))),
            PacketIdAssigned(n, n + 1),
        ]
        if n >= 3:
            ops.append(MessageRemoved(n - 3))
        return ops

    batches = [batch(n) for n in range(300)]
    clock = FakeClock()
    async with FileStore(tmp_path / "s", compact_threshold_bytes=4096, clock=clock) as store:
        sizes = []
        for n, ops in enumerate(batches):
            await store.apply("a", ops)
            clock.advance(1)
            sizes.append(len(journal_records(store.journal_path("a"))))
            if n % 50 == 0:
                assert await store.load("a") == replay("a", batches[: n + 1])
        assert max(sizes) <= 4096
        assert await store.load("a") == replay("a", batches)
    async with FileStore(tmp_path / "s", clock=clock) as store:
        assert await store.load("a") == replay("a", batches)
        [info] = await store.list_sessions()
        assert info.created_at == T0  # compaction keeps the header's creation time
        journal = store.journal_path("a")
        assert _listing(store.directory) == sorted([journal.name, journal.stem + ".lock"])


async def test_stale_temp_file_is_harmless(file_store: FileStore) -> None:
    await file_store.apply("a", [MessageAdded(msg(1))])
    tmp = file_store.journal_path("a").with_suffix(".tmp")
    _write(tmp, b"half a compaction")
    reopened = FileStore(file_store.directory)
    await file_store.close()
    state = await reopened.load("a")
    assert state is not None and list(state.messages) == [1]
    await reopened.save(replay("a", [[MessageAdded(msg(2))]]))
    assert not tmp.exists()
    await reopened.close()


async def test_torn_tail_at_every_offset(tmp_path: Path) -> None:
    first: list[Operation] = [MessageAdded(msg(1)), SubscriptionSet("s", 1)]
    second: list[Operation] = [
        MessageAdded(msg(2)),
        PacketIdAssigned(1, 9),
        InboundReceived(3),
        MessageRemoved(1),
    ]
    directory = tmp_path / "s"
    # A frozen clock: otherwise release() would append the load's access time to the journal.
    clock = FakeClock()
    async with FileStore(directory, clock=clock) as store:
        await store.apply("a", first)
        good_size = len(journal_records(store.journal_path("a")))
        await store.apply("a", second)
        path = store.journal_path("a")
    full = _read(path)
    assert len(full) > good_size + 20
    before, after = replay("a", [first]), replay("a", [first, second])
    store = FileStore(directory, clock=clock)
    for cut in range(good_size, len(full) + 1):
        _write(path, full[:cut])
        assert await store.load("a") == (after if cut == len(full) else before), cut
        await store.release("a")
        assert len(_read(path)) == (len(full) if cut == len(full) else good_size), cut
    # A torn tail of zeros (blocks allocated, data never written) is a torn tail too.
    _write(path, full[:good_size] + bytes(40))
    assert await store.load("a") == before
    # Appending after the repair continues a clean journal.
    await store.apply("a", second)
    await store.close()
    async with FileStore(directory) as reopened:
        assert await reopened.load("a") == after
    assert all(".corrupt-" not in name for name in _listing(directory))


async def _assert_quarantined(store: FileStore, data: bytes, error: type[Exception]) -> None:
    path = store.journal_path("a")
    _write(path, data)
    with pytest.raises(error) as info:
        await store.load("a")
    exc = info.value
    assert isinstance(exc, SessionCorrupt)
    assert exc.location == str(path)
    assert str(path) in str(exc)
    assert exc.quarantined_to is not None
    quarantined = Path(exc.quarantined_to)
    assert quarantined.name.startswith(path.name + ".corrupt-")
    assert not path.exists()
    assert _read(quarantined) == data  # moved aside intact, never deleted
    assert await store.load("a") is None  # the session is gone; a fresh one may start
    await store.release("a")


async def test_damage_before_the_last_record_is_corruption(tmp_path: Path) -> None:
    directory = tmp_path / "s"
    async with FileStore(directory) as store:
        for n in range(3):
            await store.apply("a", [MessageAdded(msg(n)), InboundReceived(n + 1)])
            if n == 1:
                last_record = len(journal_records(store.journal_path("a")))
    full = _read(store.journal_path("a"))
    store = FileStore(directory)
    for offset in range(last_record):
        damaged = bytearray(full)
        damaged[offset] ^= 0x10
        await _assert_quarantined(store, bytes(damaged), SessionCorrupt)
    corrupt = [name for name in _listing(directory) if ".corrupt-" in name]
    assert len(corrupt) == last_record  # every damaged file kept, none overwritten
    await store.close()


async def test_bad_magic_and_newer_version(file_store: FileStore) -> None:
    await file_store.apply("a", [MessageAdded(msg(1))])
    good = journal_records(file_store.journal_path("a"))
    await file_store.release("a")
    await _assert_quarantined(file_store, b"NOPE" + good[4:], SessionCorrupt)
    newer = good[:4] + struct.pack("<H", file_module.FORMAT_VERSION + 1) + b"future layout"
    await _assert_quarantined(file_store, newer, UnsupportedFormatVersion)
    await _assert_quarantined(file_store, b"MQ", SessionCorrupt)
    await _assert_quarantined(
        file_store, good[:4] + struct.pack("<H", 0) + good[6:], SessionCorrupt
    )


async def test_journal_of_another_client_id_is_corruption(file_store: FileStore) -> None:
    await file_store.apply("b", [MessageAdded(msg(1))])
    other = journal_records(file_store.journal_path("b"))
    await _assert_quarantined(file_store, other, SessionCorrupt)


async def test_migration_hook(file_store: FileStore, monkeypatch: pytest.MonkeyPatch) -> None:
    await file_store.apply("a", [MessageAdded(msg(1))])
    await file_store.release("a")
    path = file_store.journal_path("a")
    current = _read(path)
    # Pretend version 0 differed from the current version only in its version field.
    _write(path, current[:4] + struct.pack("<H", 0) + current[6:])
    version = struct.pack("<H", file_module.FORMAT_VERSION)
    monkeypatch.setitem(file_journal.MIGRATIONS, 0, lambda data: data[:4] + version + data[6:])
    state = await file_store.load("a")
    assert state is not None and list(state.messages) == [1]
    assert struct.unpack_from("<H", _read(path), 4)[0] == file_module.FORMAT_VERSION


async def test_delete_keeps_quarantined_files(file_store: FileStore) -> None:
    await file_store.apply("a", [MessageAdded(msg(1))])
    await file_store.release("a")
    path = file_store.journal_path("a")
    _write(path, b"garbage garbage garbage garbage garbage")
    with pytest.raises(SessionCorrupt):
        await file_store.load("a")
    await file_store.apply("a", [MessageAdded(msg(2))])
    await file_store.delete("a")
    await file_store.close()
    assert [name for name in _listing(file_store.directory) if "corrupt" not in name] == []
    assert len(_listing(file_store.directory)) == 1


async def test_list_sessions_skips_damaged_files(file_store: FileStore) -> None:
    await file_store.apply("a", [MessageAdded(msg(1))])
    await file_store.apply("b", [MessageAdded(msg(1))])
    await file_store.close()
    _write(file_store.journal_path("b"), b"garbage")
    assert [info.client_id for info in await file_store.list_sessions()] == ["a"]
    assert await file_store.exists("b")  # load reports it (and quarantines it)
    with pytest.raises(SessionCorrupt):
        await file_store.load("b")


async def test_second_store_in_the_same_process_is_locked_out(
    file_store: FileStore,
) -> None:
    other = FileStore(file_store.directory)
    await file_store.acquire("a")
    with pytest.raises(SessionLocked):
        await other.acquire("a")
    await file_store.apply("a", [MessageAdded(msg(1))])
    # Writing (or loading, which may repair) takes the lease implicitly, so it is refused too.
    with pytest.raises(SessionLocked):
        await other.apply("a", [MessageAdded(msg(2))])
    with pytest.raises(SessionLocked):
        await other.load("a")
    with pytest.raises(SessionLocked):
        await other.delete("a")
    assert [info.client_id for info in await other.list_sessions()] == ["a"]
    await file_store.release("a")
    await other.acquire("a")
    assert await other.load("a") is not None
    await other.close()


async def cancel_applies(store: SessionStore, batch: Callable[[int], list[Operation]]) -> int:
    """Apply ``batch(n)`` to "a" for n = 1..19, each cancelled after n % 4 turns of the loop.

    Returns how many were cancelled (the others had finished first).
    """
    cancelled = 0
    for n in range(1, 20):
        task = asyncio.ensure_future(store.apply("a", batch(n)))
        for _ in range(n % 4):
            await asyncio.sleep(0)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            cancelled += 1
    return cancelled


async def test_cancelled_apply_leaves_a_consistent_store(file_store: FileStore) -> None:
    await file_store.apply("a", [MessageAdded(msg(0))])
    assert await cancel_applies(file_store, lambda n: [MessageAdded(msg(n))])
    in_memory = await file_store.load("a")
    await file_store.close()
    reopened = FileStore(file_store.directory)
    assert await reopened.load("a") == in_memory
    await reopened.close()


async def check_lease_across_processes(
    store: SessionStore, store_class: type[SessionStore], *args: str
) -> None:
    """A lease held by ``store_class(*args)`` in another process locks ``store`` out of it.

    Until that process closes its store, or dies: a dead process holds nothing.
    """
    child = start_holder(store_class, "a", *args)
    try:
        with pytest.raises(SessionLocked):
            await store.acquire("a")
        with pytest.raises(SessionLocked):
            await store.apply("a", [MessageAdded(msg(1))])
        await store.acquire("b")
    finally:
        stop_holder(child, kill=False)
    await store.acquire("a")  # released by the child's close()
    await store.apply("a", [MessageAdded(msg(1))])
    await store.release("a")
    child = start_holder(store_class, "a", *args)
    try:
        with pytest.raises(SessionLocked):
            await store.acquire("a")
        with pytest.raises(SessionLocked):
            await store.load("a")
    finally:
        stop_holder(child, kill=True)
    await store.acquire("a")  # a dead process holds nothing
    assert await store.load("a") == replay("a", [[MessageAdded(msg(1))]])


async def test_lease_across_processes(file_store: FileStore) -> None:
    await check_lease_across_processes(file_store, FileStore, str(file_store.directory))


# --- FileStore under SIGKILL ------------------------------------------------------------------

_BATCHES = textwrap.dedent(
    """
    import random
    from mqtt_persist.session.state import (
        InboundReceived, InboundReleased, MessageAdded, MessageRemoved, PacketIdAssigned,
        StoredMessage, SubscriptionSet,
    )

    def batch_size(n):
        return random.Random(n).randint(1, 20)

    def make_batch(n):
        rng = random.Random(n * 7919 + 1)
        ops = [
            MessageAdded(StoredMessage(
                n * 100 + i, f"t/{n}", rng.randbytes(rng.randint(0, 300)), rng.choice((1, 2))
            ))
            for i in range(batch_size(n))
        ]
        if n >= 1:
            ops += [PacketIdAssigned((n - 1) * 100 + i, n % 65000 + i + 1)
                    for i in range(batch_size(n - 1))]
        if n >= 3:
            ops += [MessageRemoved((n - 3) * 100 + i) for i in range(batch_size(n - 3))]
        ops.append(InboundReceived(n % 65535 + 1))
        if n >= 2:
            ops.append(InboundReleased((n - 2) % 65535 + 1))
        ops.append(SubscriptionSet(f"s/{n % 7}", n % 3, confirmed=n % 2 == 0))
        return ops
    """
)

_WRITER = textwrap.dedent(
    """
    from mqtt_persist.stores.file import FileStore
    from tests.support.store_kill import write_batches

    write_batches(lambda args: FileStore(args[0], compact_threshold_bytes=16384), make_batch)
    """
)


def test_sigkill_loses_nothing_acknowledged(tmp_path: Path) -> None:
    directory = tmp_path / "sessions"
    batches = Batches(_BATCHES)

    async def load() -> SessionState | None:
        async with FileStore(directory) as store:
            return await store.load(VICTIM)

    journal = FileStore(directory).journal_path(VICTIM)
    compacted = False
    for round_ in kill_rounds(batches, _WRITER, [str(directory)], load, rounds=6, unacknowledged=2):
        size = journal.stat().st_size
        compacted = compacted or size < sum(
            len(encode_operations(batches.make(k))) for k in range(round_.recovered + 1)
        )
    assert compacted
