"""A witness of the write-ahead rule that does not depend on timing.

The rule: a packet goes to the transport only after the store operations that protect it were
committed, and the application sees an inbound QoS 2 message only after its packet ID was:

=====================================  ===================================================
packet the client writes               committed before it
=====================================  ===================================================
PUBLISH, QoS 1/2, packet ID P          ``MessageAdded`` of that message and
                                       ``PacketIdAssigned(seq, P)``
PUBREL P                               ``MessageReleased`` of the message under P
PUBREC P (inbound QoS 2)               ``InboundReceived(P)``
(to the application) inbound QoS 2     ``InboundReceived`` of the PUBLISH that carried it
=====================================  ===================================================

:class:`GatedStore` wraps any store (passed to the client through the public ``store=``):
every ``apply`` waits at a gate before it reaches the real store. :class:`WriteAheadWitness`
holds each batch there while it lets the proxy read everything the client has written so far
(:meth:`FaultProxy.settle`) and the application's consumer run; every packet the proxy reads and
every message the application gets is checked against what was committed at that moment. A
client that writes a packet before its batch is committed writes it while the batch is held,
so the proxy reads it while it is certainly uncommitted: the violation is found every time,
however fast or slow the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mqtt_persist import Message, SessionStore
from mqtt_persist.session.state import (
    InboundCleared,
    InboundReceived,
    InboundReleased,
    MessageAdded,
    MessageReleased,
    Operation,
    PacketIdAssigned,
    StoredMessage,
)
from tests.support.proxy import FaultProxy
from tests.support.wire import PUBLISH, PUBREC, PUBREL, WirePacket

__all__ = ["Batch", "GatedStore", "WriteAheadWitness"]


@dataclass(eq=False)
class Batch:
    """One ``apply`` call: its operations, and the gate it waits at."""

    number: int
    ops: list[Operation]
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    committed: bool = False


class GatedStore:
    """A SessionStore that holds every ``apply`` at a gate until :meth:`release`.

    Everything else goes straight to ``inner``. ``on_commit`` (if set) is called right after
    the inner ``apply`` returned, before the waiting caller resumes.
    """

    def __init__(self, inner: SessionStore, *, inline: bool = False) -> None:
        self.inner = inner
        self.durable: bool = bool(getattr(inner, "durable", True))
        self.arrived: asyncio.Queue[Batch] = asyncio.Queue()
        self.batches: list[Batch] = []
        self.gated = True
        self.on_commit: Any = None
        #: Batches that came through ``begin_apply`` (a publisher's inline commit).
        self.begun = 0
        self._commits: set[asyncio.Task[None]] = set()
        if inline:
            # The store then offers inline commits (StartsCommits), paired with its apply.
            self.begin_apply = self._begin_apply

    async def apply(self, client_id: str, ops: Sequence[Operation]) -> None:
        batch = Batch(len(self.batches), list(ops))
        self.batches.append(batch)
        if self.gated:
            self.arrived.put_nowait(batch)
            await batch.gate.wait()
        await self.inner.apply(client_id, ops)
        batch.committed = True
        if self.on_commit is not None:
            self.on_commit(batch)

    def _begin_apply(
        self, client_id: str, ops: Sequence[Operation], durable: asyncio.Future[None]
    ) -> bool:
        """The batch goes through the gate and ``apply`` in a task; ``durable`` follows it."""
        self.begun += 1

        async def commit() -> None:
            try:
                await self.apply(client_id, ops)
            except Exception as exc:
                durable.set_exception(exc)
            else:
                durable.set_result(None)

        task = asyncio.get_running_loop().create_task(commit())
        self._commits.add(task)
        task.add_done_callback(self._commits.discard)
        return True

    def open_gates(self) -> None:
        """Stop gating; let every held batch through."""
        self.gated = False
        for batch in self.batches:
            batch.gate.set()

    # Everything else is the inner store's.
    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()

    async def acquire(self, client_id: str) -> None:
        await self.inner.acquire(client_id)

    async def release(self, client_id: str) -> None:
        await self.inner.release(client_id)

    async def load(self, client_id: str, *, queued_limit: int | None = None) -> Any:
        return await self.inner.load(client_id, queued_limit=queued_limit)

    async def read_queued(self, client_id: str, after_seq: int, limit: int) -> Any:
        return await self.inner.read_queued(client_id, after_seq, limit)

    async def save(self, state: Any) -> None:
        await self.inner.save(state)

    async def delete(self, client_id: str) -> None:
        await self.inner.delete(client_id)

    async def exists(self, client_id: str) -> bool:
        return await self.inner.exists(client_id)

    async def list_sessions(self) -> Any:
        return await self.inner.list_sessions()

    async def update_ttl(self, client_id: str, seconds: float | None) -> None:
        await self.inner.update_ttl(client_id, seconds)

    async def cleanup_expired(self) -> int:
        return await self.inner.cleanup_expired()

    def __getattr__(self, name: str) -> Any:
        # Methods a later version of the store protocol adds: the inner store's.
        return getattr(self.inner, name)


class WriteAheadWitness:
    """Checks the write-ahead rule for one client behind ``proxy`` using ``store``.

    Start :meth:`run` as a task: it holds each batch, settles the proxy, checks, releases.
    Feed every message the application gets to :meth:`delivered`. ``violations`` lists what
    broke the rule; ``checked`` counts what was checked, ``held`` which protecting operations
    were held uncommitted while the check ran (so a test can tell it checked something).
    """

    def __init__(self, store: GatedStore, proxy: FaultProxy) -> None:
        self.store = store
        self.proxy = proxy
        self.violations: list[str] = []
        self.checked: Counter[str] = Counter()
        self.held: Counter[str] = Counter()
        # What is committed, replayed from the batches as they commit.
        self._messages: dict[int, StoredMessage] = {}
        self._seq_of_pid: dict[int, int] = {}
        self._released: set[int] = set()
        self._inbound_open: set[int] = set()
        # The last inbound QoS 2 PUBLISH the broker sent per packet ID, and the payloads whose
        # InboundReceived is committed (payloads are unique in these tests).
        self._inbound_publish: dict[int, WirePacket] = {}
        self._inbound_committed: set[bytes] = set()
        self._app_seen: list[bytes] = []
        store.on_commit = self._on_commit
        proxy.on_packet(self._on_packet)

    # --- the gatekeeper --------------------------------------------------------------------

    async def run(self) -> None:
        """Hold each batch while everything the client did so far is examined, then let it go."""
        while True:
            batch = await self.store.arrived.get()
            mark_packets, mark_app = len(self.proxy.packets), len(self._app_seen)
            await self.proxy.settle()
            # The application's consumer was woken by anything handed out: let it run.
            for _ in range(5):
                await asyncio.sleep(0)
            await self.proxy.settle()
            self._check_held(batch, self.proxy.packets[mark_packets:], self._app_seen[mark_app:])
            batch.gate.set()

    def _check_held(self, batch: Batch, packets: list[WirePacket], app: list[bytes]) -> None:
        """Nothing ``batch`` protects reached the proxy or the application while it was held."""
        payloads: set[bytes] = set()
        released_pids: set[int] = set()
        inbound_pids: set[int] = set()
        pid_of_seq = {seq: pid for pid, seq in self._seq_of_pid.items()}
        for op in batch.ops:
            kind = type(op)
            if kind is MessageAdded:
                assert isinstance(op, MessageAdded)
                payloads.add(op.message.payload)
                self.held["MessageAdded"] += 1
            elif kind is PacketIdAssigned:
                assert isinstance(op, PacketIdAssigned)
                pid_of_seq[op.seq] = op.packet_id
                message = self._messages.get(op.seq)
                added = [o for o in batch.ops if type(o) is MessageAdded]
                for o in added:
                    assert isinstance(o, MessageAdded)
                    if o.message.seq == op.seq:
                        message = o.message
                if message is not None:
                    payloads.add(message.payload)
                self.held["PacketIdAssigned"] += 1
            elif kind is MessageReleased:
                assert isinstance(op, MessageReleased)
                pid = pid_of_seq.get(op.seq)
                if pid is not None:
                    released_pids.add(pid)
                self.held["MessageReleased"] += 1
            elif kind is InboundReceived:
                assert isinstance(op, InboundReceived)
                inbound_pids.add(op.packet_id)
                self.held["InboundReceived"] += 1
        inbound_payloads = {
            p.payload
            for pid in inbound_pids
            if (p := self._inbound_publish.get(pid)) is not None and p.payload is not None
        }
        for p in packets:
            if p.direction != "up":
                continue
            protected = (
                (p.type == PUBLISH and p.qos and p.payload in payloads)
                or (p.type == PUBREL and p.packet_id in released_pids)
                or (p.type == PUBREC and p.packet_id in inbound_pids)
            )
            if protected:
                self._violation(f"{p!r} reached the proxy while batch {batch.number} was held")
        for payload in app:
            if payload in inbound_payloads:
                self._violation(
                    f"the application got {payload!r} while batch {batch.number} was held"
                )

    # --- the record of what is committed ----------------------------------------------------

    def _on_commit(self, batch: Batch) -> None:
        for op in batch.ops:
            kind = type(op)
            if kind is MessageAdded:
                assert isinstance(op, MessageAdded)
                self._messages[op.message.seq] = op.message
            elif kind is PacketIdAssigned:
                assert isinstance(op, PacketIdAssigned)
                self._seq_of_pid[op.packet_id] = op.seq
            elif kind is MessageReleased:
                assert isinstance(op, MessageReleased)
                self._released.add(op.seq)
            elif kind is InboundReceived:
                assert isinstance(op, InboundReceived)
                self._inbound_open.add(op.packet_id)
                publish = self._inbound_publish.get(op.packet_id)
                if publish is not None and publish.payload is not None:
                    self._inbound_committed.add(publish.payload)
            elif kind is InboundReleased:
                assert isinstance(op, InboundReleased)
                self._inbound_open.discard(op.packet_id)
            elif kind is InboundCleared:
                self._inbound_open.clear()

    # --- the checks as things happen --------------------------------------------------------

    def _on_packet(self, p: WirePacket) -> None:
        if p.direction == "down":
            if p.type == PUBLISH and p.qos == 2 and p.packet_id is not None:
                self._inbound_publish[p.packet_id] = p
            return
        if p.type == PUBLISH and p.qos:
            self.checked["PUBLISH"] += 1
            seq = self._seq_of_pid.get(p.packet_id) if p.packet_id is not None else None
            message = self._messages.get(seq) if seq is not None else None
            if message is None or message.payload != p.payload or message.topic != p.topic:
                self._violation(f"{p!r} written before its MessageAdded/PacketIdAssigned commit")
        elif p.type == PUBREL:
            self.checked["PUBREL"] += 1
            seq = self._seq_of_pid.get(p.packet_id) if p.packet_id is not None else None
            if seq is None or seq not in self._released:
                self._violation(f"{p!r} written before its MessageReleased commit")
        elif p.type == PUBREC:
            self.checked["PUBREC"] += 1
            if p.packet_id not in self._inbound_open:
                self._violation(f"{p!r} written before its InboundReceived commit")

    def delivered(self, message: Message) -> None:
        """The application got ``message`` (call it from the consumer, as it happens)."""
        self._app_seen.append(message.payload)
        if message.qos == 2:
            self.checked["application"] += 1
            if message.payload not in self._inbound_committed:
                self._violation(
                    f"the application got {message.payload!r} before its InboundReceived commit"
                )

    def _violation(self, text: str) -> None:
        self.violations.append(text)

    async def stop(self, task: asyncio.Task[None]) -> None:
        """End :meth:`run` and let every held batch through."""
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        self.store.open_gates()
