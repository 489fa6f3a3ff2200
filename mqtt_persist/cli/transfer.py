"""``sessions export`` and ``sessions import``: a stored session to a file and back.

Both hold the session's lease for their whole run, so no client changes it meanwhile, and both
keep memory flat however long the queue is: export reads queued messages in pages
(``load(queued_limit=0)``, then ``read_queued``), import applies records in batches. Import
reads its file twice: once to check every line before anything in the store is touched (a bad
file never costs the session it would have replaced), then to store it.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import BinaryIO

import anyio

from mqtt_persist.cli.access import find_session, holding
from mqtt_persist.cli.exits import CliError, ExitCode
from mqtt_persist.cli.inspect import PAGE
from mqtt_persist.cli.session_file import (
    Header,
    InboundId,
    PendingUnsubscribe,
    Reader,
    Record,
    encode_header,
    encode_record,
    record_operations,
)
from mqtt_persist.session.state import Operation, ProtocolVersionSet, StoredMessage
from mqtt_persist.stores.base import SessionInfo, SessionStore

__all__ = ["Progress", "check_file", "export_session", "import_session"]

#: ``progress(total)`` -> a context manager giving ``advance(n)``: how a command shows progress.
Progress = Callable[[int], AbstractContextManager[Callable[[int], None]]]

#: Operations per ``apply`` when importing: one commit (one fsync) per batch.
IMPORT_BATCH = 2000


async def export_session(
    store: SessionStore, client_id: str, out: BinaryIO, progress: Progress
) -> Header:
    """Write ``client_id``'s session to ``out`` in the session file format; its header."""
    info = await find_session(store, client_id)
    async with holding(store, client_id):
        return await _export_held(store, info, out, progress)


async def _export_held(
    store: SessionStore, info: SessionInfo, out: BinaryIO, progress: Progress
) -> Header:
    """:func:`export_session` for a session whose lease the caller holds."""
    client_id = info.client_id
    state = await store.load(client_id, queued_limit=0)
    if state is None:
        raise CliError(f"no session {client_id!r} in this store", ExitCode.NO_SESSION)
    inflight = sorted(state.messages.values(), key=lambda m: m.seq)
    set_aside = sorted(state.set_aside.values(), key=lambda a: a.message.seq)
    tail: list[Record] = [InboundId(i) for i in sorted(state.inbound_qos2)]
    tail += [state.subscriptions[f] for f in sorted(state.subscriptions)]
    tail += [PendingUnsubscribe(f) for f in sorted(state.pending_unsubscribes)]
    queued = state.queued_not_loaded
    expiry = None
    if info.expires_at is not None:
        # The TTL, as the store keeps it (expiry = last access + TTL).
        expiry = round(info.expires_at - info.last_access, 6)
    header = Header(
        client_id,
        state.protocol_version,
        expiry,
        len(set_aside) + len(inflight) + queued + len(tail),
        time.time(),
    )
    out.write(encode_header(header))
    with progress(header.records) as advance:
        _write(out, set_aside, advance)
        read = 0
        async for message in _messages(store, client_id, inflight):
            out.write(encode_record(message))
            read += message.packet_id is None
            advance(1)
        _write(out, tail, advance)
    if read != queued:
        raise CliError(
            f"the store counted {queued} queued messages but {read} were read; the export is "
            "incomplete (its header count will not match, so import refuses it)"
        )
    return header


def _write(out: BinaryIO, records: Iterable[Record], advance: Callable[[int], None]) -> None:
    for record in records:
        out.write(encode_record(record))
        advance(1)


async def _messages(
    store: SessionStore, client_id: str, inflight: list[StoredMessage]
) -> AsyncIterator[StoredMessage]:
    """In-flight and queued messages merged in ascending ``seq``, the queue read in pages."""
    waiting = deque(inflight)
    after = 0
    while True:
        page = await store.read_queued(client_id, after, PAGE)
        for message in page:
            while waiting and waiting[0].seq < message.seq:
                yield waiting.popleft()
            yield message
        if len(page) < PAGE:
            break
        after = page[-1].seq
    while waiting:
        yield waiting.popleft()


def check_file(source: BinaryIO) -> Header:
    """Check every line of a session file; its header, or :class:`FileFormatError`."""
    reader = Reader()
    header: Header | None = None
    for line in source:
        if header is None:
            header = reader.header(line)
        else:
            reader.record(line)
    reader.finish()
    assert header is not None  # finish() refuses a file without one
    return header


async def import_session(
    store: SessionStore,
    source: BinaryIO,
    progress: Progress,
    *,
    replace: bool,
    client_id: str | None = None,
) -> tuple[Header, str]:
    """Store the session in ``source`` (a seekable file); its header and the client id used.

    ``client_id`` stores it under another id than the file's. An existing session is refused
    (:attr:`ExitCode.SESSION_EXISTS`) unless ``replace``. If storing fails half way, what was
    stored is removed again, and a session it replaced is stored back: it is first exported
    to a temporary file, which is kept, and named in the error, if storing it back fails too.
    Only a killed process leaves a partial session (import again with ``--replace``).
    """
    header = check_file(source)
    target = header.client_id if client_id is None else client_id
    if not target:
        raise CliError("the client id must not be empty", ExitCode.USAGE)
    source.seek(0)
    async with holding(store, target):
        exists = await store.exists(target)
        if exists and not replace:
            raise CliError(
                f"session {target!r} exists in this store; --replace replaces it",
                ExitCode.SESSION_EXISTS,
            )
        with _Backup() as backup:
            if exists:
                # The store has no atomic replace for a session stored in batches: keep the
                # old one aside (flat memory, like an export) until the new one is whole.
                info = await find_session(store, target)
                await _export_held(store, info, backup.open(), _silent)
            # Also clears what an expired session (which exists() does not count) left behind.
            await store.delete(target)
            try:
                await _store_records(store, target, source, progress)
                await store.update_ttl(target, header.session_expiry)
            except BaseException as exc:
                with anyio.CancelScope(shield=True):
                    await store.delete(target)
                    if backup.file is not None:
                        await _restore(store, target, backup, backup.file, exc)
                raise
    return header, target


@contextmanager
def _silent(total: int) -> Iterator[Callable[[int], None]]:
    yield lambda steps: None


class _Backup:
    """A temporary file for the session an import replaces; removed unless :meth:`keep`."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.file: BinaryIO | None = None
        self._kept = False

    def open(self) -> BinaryIO:
        """Create the file (only a replacing import needs one)."""
        fd, name = tempfile.mkstemp(prefix="mqtt-persist-replaced-", suffix=".jsonl")
        self.path = Path(name)
        self.file = os.fdopen(fd, "w+b")
        return self.file

    def keep(self) -> None:
        """Leave the file in place after the block."""
        self._kept = True

    def __enter__(self) -> _Backup:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.file is not None:
            self.file.close()
        if self.path is not None and not self._kept:
            self.path.unlink(missing_ok=True)


async def _restore(
    store: SessionStore, client_id: str, backup: _Backup, saved: BinaryIO, error: BaseException
) -> None:
    """Store the replaced session back; a :class:`CliError` naming the backup if that fails."""
    saved.flush()
    saved.seek(0)
    try:
        old = check_file(saved)
        saved.seek(0)
        await _store_records(store, client_id, saved, _silent)
        await store.update_ttl(client_id, old.session_expiry)
    except Exception as again:
        await store.delete(client_id)
        backup.keep()
        raise CliError(
            f"the import failed ({error}), and storing the session it replaced back failed "
            f"too ({again}); that session is in {backup.path}: import it with --replace"
        ) from error


async def _store_records(
    store: SessionStore, client_id: str, source: BinaryIO, progress: Progress
) -> None:
    reader = Reader()
    lines = iter(source)
    header = reader.header(next(lines))
    ops: list[Operation] = []
    if header.protocol_version is not None:
        ops.append(ProtocolVersionSet(header.protocol_version))
    done = 0
    with progress(header.records) as advance:
        for line in lines:
            ops += record_operations(reader.record(line))
            done += 1
            if len(ops) >= IMPORT_BATCH:
                await store.apply(client_id, ops)
                advance(done)
                ops, done = [], 0
        reader.finish()
        if ops:
            await store.apply(client_id, ops)
        advance(done)
