"""The CLI's parts in-process: the session file format, paging, redaction, formats, errors.

The commands themselves run as subprocesses in test_cli_sessions.py and test_cli_pubsub.py;
here are the cases that would cost a process each for nothing.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest

from mqtt_persist import MemoryStore
from mqtt_persist.cli import main
from mqtt_persist.cli.exits import CliError, ExitCode
from mqtt_persist.cli.inspect import PAGE
from mqtt_persist.cli.redaction import Secrets
from mqtt_persist.cli.render import format_size, format_until, table
from mqtt_persist.cli.session_file import (
    FileFormatError,
    Header,
    Reader,
    Record,
    encode_header,
    encode_record,
)
from mqtt_persist.cli.sub import FORMATS
from mqtt_persist.cli.transfer import check_file, export_session, import_session
from mqtt_persist.message import Message
from mqtt_persist.protocol import PacketType, Properties, encode_properties
from mqtt_persist.session.state import (
    MessageAdded,
    MessageRequeued,
    MessageSetAside,
    Operation,
    PacketIdAssigned,
    ProtocolVersionSet,
    SessionState,
    StoredMessage,
)
from mqtt_persist.stores.base import SessionStore
from tests.support.cli import rich_session_ops


@contextlib.contextmanager
def no_progress(total: int) -> Iterator[Callable[[int], None]]:
    yield lambda steps: None


class CountingStore(MemoryStore):
    """A MemoryStore that records how much each read returned, and can fail an apply."""

    def __init__(self) -> None:
        super().__init__()
        self.loads: list[int | None] = []
        self.largest_read = 0
        self.fail_apply_at: int | None = None
        self.fail_applies_from: int | None = None  # this apply and every later one fail
        self.applies = 0

    async def load(self, client_id: str, *, queued_limit: int | None = None) -> Any:
        self.loads.append(queued_limit)
        return await super().load(client_id, queued_limit=queued_limit)

    async def read_queued(self, client_id: str, after_seq: int, limit: int) -> Any:
        found = await super().read_queued(client_id, after_seq, limit)
        self.largest_read = max(self.largest_read, len(found))
        return found

    async def apply(self, client_id: str, ops: Sequence[Operation]) -> None:
        self.applies += 1
        if self.applies == self.fail_apply_at or (
            self.fail_applies_from is not None and self.applies >= self.fail_applies_from
        ):
            raise OSError("disk full")
        await super().apply(client_id, ops)


def export_bytes(store: SessionStore, client_id: str) -> bytes:
    out = io.BytesIO()
    asyncio.run(export_session(store, client_id, out, no_progress))
    return out.getvalue()


def test_export_reads_the_queue_in_pages_and_merges_in_flight_messages_by_seq() -> None:
    store = CountingStore()
    queued = 2 * PAGE + 7
    ops: list[Operation] = [MessageAdded(StoredMessage(s, "t", b"p", 1)) for s in range(1, queued)]
    # seq 1500 is in flight while seq 1 went back to the queue: the file still ascends by seq.
    ops += [PacketIdAssigned(1, 1), PacketIdAssigned(1500, 2), MessageRequeued(1)]
    asyncio.run(store.apply("c", ops))
    data = export_bytes(store, "c")
    assert store.loads == [0]  # nothing queued loaded whole ...
    assert store.largest_read == PAGE  # ... but page by page
    lines = data.splitlines()
    seqs = [json.loads(line)["seq"] for line in lines[1:]]
    assert seqs == list(range(1, queued))
    assert json.loads(lines[1500])["packet_id"] == 2


def test_session_file_round_trip_in_memory() -> None:
    ops = rich_session_ops(queued=10)
    source, target = MemoryStore(), MemoryStore()
    asyncio.run(source.apply("dev", ops))
    data = export_bytes(source, "dev")
    header, client_id = asyncio.run(
        import_session(target, io.BytesIO(data), no_progress, replace=False, client_id="copy")
    )
    assert (header.client_id, client_id, header.records) == ("dev", "copy", 21)
    expected = SessionState("copy")
    expected.apply_all(ops)
    assert asyncio.run(target.load("copy")) == expected


def test_a_failed_import_leaves_no_partial_session() -> None:
    source = MemoryStore()
    asyncio.run(source.apply("dev", rich_session_ops(queued=3000)))
    data = export_bytes(source, "dev")
    target = CountingStore()
    target.fail_apply_at = 2  # the second batch
    with pytest.raises(OSError, match="disk full"):
        asyncio.run(import_session(target, io.BytesIO(data), no_progress, replace=False))
    assert asyncio.run(target.list_sessions()) == []
    # An existing session is refused, and is still there afterwards.
    target.fail_apply_at = None
    asyncio.run(import_session(target, io.BytesIO(data), no_progress, replace=False))
    with pytest.raises(CliError) as refused:
        asyncio.run(import_session(target, io.BytesIO(data), no_progress, replace=False))
    assert refused.value.code is ExitCode.SESSION_EXISTS
    assert asyncio.run(target.exists("dev"))


def replaced_and_failing(fail: str) -> tuple[CountingStore, bytes, SessionState]:
    """A store holding session "dev" (TTL 1 h), a file of another "dev" it fails to import
    at its second batch (``fail``: ``once``, ``for good`` or ``never``), and the old state."""
    old_ops = rich_session_ops(queued=5)
    target = CountingStore()
    asyncio.run(target.apply("dev", old_ops))
    asyncio.run(target.update_ttl("dev", 3600))
    source = MemoryStore()
    asyncio.run(
        source.apply(
            "dev", [MessageAdded(StoredMessage(s, "n", b"new", 1)) for s in range(1, 3001)]
        )
    )
    data = export_bytes(source, "dev")
    target.applies = 0
    if fail == "once":
        target.fail_apply_at = 2
    elif fail == "for good":
        target.fail_applies_from = 2
    old = SessionState("dev")
    old.apply_all(old_ops)
    return target, data, old


def ttl(store: SessionStore, client_id: str) -> float | None:
    info = {i.client_id: i for i in asyncio.run(store.list_sessions())}[client_id]
    return None if info.expires_at is None else info.expires_at - info.last_access


def test_a_failed_import_with_replace_leaves_the_session_it_would_replace() -> None:
    """It was deleted first, then the import failed: no session at all was left."""
    target, data, old = replaced_and_failing("once")
    with pytest.raises(OSError, match="disk full"):
        asyncio.run(import_session(target, io.BytesIO(data), no_progress, replace=True))
    assert asyncio.run(target.load("dev")) == old
    assert ttl(target, "dev") == pytest.approx(3600)


def test_a_failed_import_with_replace_names_where_the_old_session_is_when_it_cannot_be_restored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    target, data, old = replaced_and_failing("for good")
    with pytest.raises(CliError) as failed:
        asyncio.run(import_session(target, io.BytesIO(data), no_progress, replace=True))
    assert failed.value.code is ExitCode.FAILED
    assert "disk full" in str(failed.value) and "--replace" in str(failed.value)
    (kept,) = tmp_path.iterdir()
    assert str(kept) in str(failed.value)
    assert asyncio.run(target.list_sessions()) == []
    restored = MemoryStore()
    with kept.open("rb") as file:
        asyncio.run(import_session(restored, file, no_progress, replace=False))
    assert asyncio.run(restored.load("dev")) == old
    assert ttl(restored, "dev") == pytest.approx(3600)


def test_an_import_with_replace_leaves_no_backup_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    for fail in ("once", "never"):
        target, data, _ = replaced_and_failing(fail)
        with contextlib.suppress(OSError):
            asyncio.run(import_session(target, io.BytesIO(data), no_progress, replace=True))
        assert list(tmp_path.iterdir()) == [], fail
    state = asyncio.run(target.load("dev"))
    assert state is not None and {m.topic for m in state.messages.values()} == {"n"}
    assert len(state.messages) == 3000 and ttl(target, "dev") is None


HEADER = encode_header(Header("dev", 4, None, 1, 1.0))
MESSAGE = {
    "type": "message",
    "seq": 1,
    "topic": "t",
    "qos": 1,
    "retain": False,
    "payload": "",
    "properties": "",
    "expires_at": None,
    "packet_id": None,
    "released": False,
}


def line(**changes: Any) -> bytes:
    record = {k: v for k, v in (MESSAGE | changes).items() if v is not ...}
    return json.dumps(record).encode() + b"\n"


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([], "empty"),
        ([b'{"format": "other"}\n'], "not an mqtt-persist session file"),
        ([HEADER.replace(b'"version":1', b'"version":2')], "format version 2"),
        ([HEADER.replace(b'"records":1', b'"records":-1')], "records must be >= 0"),
        ([HEADER.replace(b'"client_id":"dev"', b'"client_id":""')], "must not be empty"),
        ([HEADER, b"not json\n"], "line 2: not JSON"),
        ([HEADER, b"[1]\n"], "line 2: not a JSON object"),
        ([HEADER], "announces 1 records but the file has 0"),
        ([HEADER, line(), line(seq=2)], "line 3: more records than the 1"),
        ([HEADER, line(type="mystery")], "unknown record type 'mystery'"),
        ([HEADER, line(seq=...)], "missing field 'seq'"),
        ([HEADER, line(extra=1)], "unknown field 'extra'"),
        ([HEADER, line(seq=True)], "'seq' must be an integer"),
        ([HEADER, line(seq=0)], "seq must be in 1.."),
        ([HEADER, line(qos=0)], "QoS 1 or 2"),
        ([HEADER, line(topic="a/#")], "wildcard"),
        ([HEADER, line(payload="@@")], "'payload' is not valid base64"),
        ([HEADER, line(released=True, packet_id=3)], "only a QoS 2 message in flight"),
        ([HEADER, line(packet_id=70000)], "a packet ID is in 1..65535"),
        ([HEADER, line(expires_at="soon")], "'expires_at' must be a number"),
    ],
)
def test_the_reader_refuses_what_is_not_a_valid_file(lines: list[bytes], message: str) -> None:
    with pytest.raises(FileFormatError, match=message):
        check_file(io.BytesIO(b"".join(lines)))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


SET_ASIDE = {k: v for k, v in MESSAGE.items() if k not in ("packet_id", "released")}
SET_ASIDE |= {"type": "set_aside", "reason": "poison", "at": 1.0}


@pytest.mark.parametrize("kind", ["message", "set_aside"])
@pytest.mark.parametrize(
    ("properties", "message"),
    [
        # A property identifier without its value: the client could not decode it to send.
        (b"\x01", "property Payload Format Indicator: truncated value"),
        (b"\x03\x00\x05ab", "property Content Type"),
        (b"\x00", "unknown property identifier 0x00"),
        (b"\x11\x00\x00\x00\x05", "Session Expiry Interval (0x11) is not allowed in PUBLISH"),
        (b"\x01\x00\x01\x01", "Payload Format Indicator appears more than once"),
        (b"\x01\x02", "value 2, must be 0 or 1"),
        # Valid in a PUBLISH on the wire, but never what a client stores or may send.
        (b"\x23\x00\x01", "must not set topic_alias"),
        (b"\x0b\x01", "must not set subscription_identifiers"),
        (b"\x02\x00\x00\x00\x3c", "Message Expiry Interval: 'expires_at' holds"),
        (b"\x08\x00\x03a/#", "response_topic"),
    ],
)
def test_the_reader_refuses_properties_the_client_could_not_send(
    kind: str, properties: bytes, message: str
) -> None:
    record = (MESSAGE if kind == "message" else SET_ASIDE) | {"properties": b64(properties)}
    data = HEADER + json.dumps(record).encode() + b"\n"
    with pytest.raises(FileFormatError) as refused:
        check_file(io.BytesIO(data))
    text = str(refused.value)
    assert text.startswith("line 2: 'properties' of seq 1 "), text
    assert message in text and "\n" not in text, text


def test_an_import_with_damaged_properties_stores_nothing() -> None:
    """The file is refused before the store is touched: no session is created, and one that
    --replace would replace stays as it was."""
    source = MemoryStore()
    asyncio.run(source.apply("dev", rich_session_ops(queued=3000)))
    lines = export_bytes(source, "dev").splitlines(keepends=True)
    # The last message record, past the first batch of the import.
    at = max(i for i, line in enumerate(lines) if b'"type":"message"' in line)
    lines[at] = json.dumps(json.loads(lines[at]) | {"properties": "AQ=="}).encode() + b"\n"
    data = b"".join(lines)
    for replace in (False, True):
        target = CountingStore()
        old = SessionState("dev")
        if replace:
            old_ops = rich_session_ops(queued=5)
            asyncio.run(target.apply("dev", old_ops))
            old.apply_all(old_ops)
            target.applies = 0
        with pytest.raises(FileFormatError, match=f"line {at + 1}: 'properties'"):
            asyncio.run(import_session(target, io.BytesIO(data), no_progress, replace=replace))
        assert target.applies == 0
        assert asyncio.run(target.load("dev")) == (old if replace else None)


def test_every_property_a_client_stores_round_trips() -> None:
    """Export then import keeps each MQTT 5 PUBLISH property a message may be stored with,
    in flight, queued and set aside."""
    properties = encode_properties(
        Properties(
            payload_format_indicator=1,
            content_type="application/json",
            response_topic="replies/ä",
            correlation_data=b"\x00\xffid",
            user_properties=(("k", "v"), ("k", "again"), ("é", "")),
        ),
        PacketType.PUBLISH,
    )
    ops: list[Operation] = [
        ProtocolVersionSet(5),
        *(
            MessageAdded(StoredMessage(s, "t", b"{}", 2, properties=properties))
            for s in range(1, 4)
        ),
        PacketIdAssigned(1, 1),
        MessageSetAside(3, "poison", 1.5),
    ]
    source, target = MemoryStore(), MemoryStore()
    asyncio.run(source.apply("dev", ops))
    data = export_bytes(source, "dev")
    asyncio.run(import_session(target, io.BytesIO(data), no_progress, replace=False))
    expected = SessionState("dev")
    expected.apply_all(ops)
    state = asyncio.run(target.load("dev"))
    assert state == expected
    assert state.messages[1].properties == state.set_aside[3].message.properties == properties
    assert export_bytes(target, "dev").split(b"\n")[1:] == data.split(b"\n")[1:]


def test_the_reader_refuses_records_out_of_order_and_duplicates() -> None:
    def read(*records: dict[str, Any]) -> None:
        header = encode_header(Header("dev", None, None, len(records), 1.0))
        check_file(io.BytesIO(header + b"".join(json.dumps(r).encode() + b"\n" for r in records)))

    sub = {"type": "subscription", "topic_filter": "a/#", "qos": 1, "confirmed": True}
    sub |= {"options": 0, "subscription_id": None}
    with pytest.raises(FileFormatError, match="line 3: a message record after"):
        read(sub, MESSAGE)
    with pytest.raises(FileFormatError, match="duplicate subscription 'a/#'"):
        read(sub, sub)
    with pytest.raises(FileFormatError, match="seq 1 is not above"):
        read(MESSAGE, MESSAGE)
    with pytest.raises(FileFormatError, match="not valid MQTT 5 subscription options"):
        read(sub | {"options": 0x30})
    inbound = {"type": "inbound_qos2", "packet_id": 9}
    with pytest.raises(FileFormatError, match="duplicate inbound QoS 2 packet ID 9"):
        read(inbound, inbound)


def test_encoded_records_read_back_as_themselves() -> None:
    state = SessionState("dev")
    state.apply_all(rich_session_ops(queued=4))
    reader = Reader()
    records: list[Record] = [
        *state.set_aside.values(),
        *state.messages.values(),
        *state.subscriptions.values(),
    ]
    reader.header(encode_header(Header("dev", 5, 60.0, len(records), 2.0)))
    assert [reader.record(encode_record(r)) for r in records] == records
    reader.finish()


def test_secrets_are_scrubbed_everywhere() -> None:
    secrets = Secrets()
    secrets.add("hunter2")
    secrets.add_url_password("redis://u:p%40ss@h/0")
    text = "redis://u:p%40ss@h/0 failed; password hunter2 p@ss; mqtt://x:other@host"
    assert secrets.scrub(text) == "redis://u:***@h/0 failed; password *** ***; mqtt://x:***@host"


def test_sub_formats() -> None:
    binary = Message("a/b", b"\xff\x00", 2, retain=True)
    assert FORMATS["payload"](binary) == b"\xff\x00\n"
    assert FORMATS["topic"](binary) == b"a/b \xff\x00\n"
    document = json.loads(FORMATS["json"](binary))
    assert document == {"topic": "a/b", "qos": 2, "retain": True, "dup": False} | {
        "payload_base64": base64.b64encode(b"\xff\x00").decode()
    }
    assert json.loads(FORMATS["json"](Message("t", "é".encode(), 0)))["payload"] == "é"


def test_render() -> None:
    assert table(["A", "NUMBER"], [["x\ty", 5], ["long", 12345]]).splitlines() == [
        "A       NUMBER",
        "x\\x09y       5",
        "long     12345",
    ]
    assert format_size(512) == "512 B" and format_size(4300) == "4.2 KiB"
    assert format_until(None, 0) == "never"
    assert format_until(100.0, 0.0) == "in 1m 40s"
    assert format_until(0.0, 7200.0) == "expired 2h 0m ago"


@pytest.fixture
def cli_in_process(
    capsys: pytest.CaptureFixture[str],
) -> Iterator[Callable[..., tuple[int, str, str]]]:
    """Run the command line in this process (for usage errors: no process start-up)."""
    from mqtt_persist.cli.app import run

    logger = logging.getLogger("mqtt_persist")
    saved = (logger.handlers[:], logger.level, logger.propagate)

    def call(*args: str) -> tuple[int, str, str]:
        code = run(list(args))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    try:
        yield call
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved


def test_errors_are_one_line(cli_in_process: Callable[..., tuple[int, str, str]]) -> None:
    pub = ["pub", "-i", "e", "-t", "t", "-m", "x"]
    cases = [
        (["sessions", "list", "--store", "sqlite:////x.db"], 2, "four slashes"),
        (["sessions", "list"], 2, "Missing option '--store'"),
        (["sessions", "lsit", "--store", "memory://"], 2, "No such command 'lsit'"),
        ([*pub, "--store", "memory://"], 2, "pub needs a durable store"),
        ([*pub, "--store", "file:///nonexistent-dir", "-q", "0"], 2, "'-q' / '--qos'"),
        (["pub", "-i", "e", "-t", "t", "--store", "file:///x"], 2, "give the messages with -m"),
        (["sessions", "show", "x", "--store", "memory://"], 4, "no session 'x'"),
        (["sessions", "delete", "x", "--store", "memory://"], 2, "needs --yes"),
    ]
    for args, code, fragment in cases:
        got, out, err = cli_in_process(*args)
        assert (got, out) == (code, ""), (args, out, err)
        assert err.count("\n") == 1 and err.startswith("mqtt-persist: error: "), (args, err)
        assert fragment in err, (args, err)
    assert cli_in_process("sessions", "list", "--store", "memory://") == (0, "no sessions\n", "")


def test_a_missing_click_is_explained(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "click", None)
    assert main(["--help"]) == 1
    assert "pip install 'mqtt-persist[cli]'" in capsys.readouterr().err


async def test_wait_ack_counts_a_downgraded_qos2_message_as_acknowledged() -> None:
    """RabbitMQ answers QoS 2 with PUBACK: the broker has the message, so `pub --wait-ack`
    succeeds, and the report says how many were taken at QoS 1."""
    from mqtt_persist.cli.pub import _acknowledgements
    from mqtt_persist.completion import Delivery
    from mqtt_persist.message import DeliveryOutcome

    outcomes = [DeliveryOutcome.ACKNOWLEDGED, DeliveryOutcome.DOWNGRADED, DeliveryOutcome.SET_ASIDE]
    deliveries: list[Delivery | None] = []
    for seq, outcome in enumerate(outcomes):
        delivery = Delivery(seq, "t", 2)
        delivery._set_result(outcome)
        deliveries.append(delivery)
    report = await _acknowledgements(deliveries, timeout=5)
    assert report == {
        "acknowledged": 2,
        "downgraded": 1,
        "not_acknowledged": ["set_aside"],
        "timed_out": False,
    }


def test_pub_reads_a_very_long_stdin_line_in_linear_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A line longer than one read arrives in many pieces; gluing each piece to all the ones
    before it took quadratic time (a 64 MiB line: tens of seconds, a 256 MiB one: minutes)."""
    from mqtt_persist.cli import pub

    line = b"x" * (64 << 20)
    stdin = io.TextIOWrapper(io.BufferedReader(io.BytesIO(line + b"\r\nshort\n" + line[:3])))
    monkeypatch.setattr(sys, "stdin", stdin)

    async def lines() -> list[bytes]:
        with anyio.fail_after(5):
            return [b for batch in [x async for x in pub._stdin_lines()] for b in batch]

    got = anyio.run(lines)
    assert [len(b) for b in got] == [len(line), 5, 3] and got[1] == b"short"
    assert got[0] == line
