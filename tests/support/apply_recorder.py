"""A store's ``apply`` calls, recorded: what each commit carried."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from mqtt_persist.session.state import MessageAdded, Operation, PacketIdAssigned
from mqtt_persist.stores.base import SessionStore


class ApplyRecorder:
    """Wraps ``store.apply`` (and ``begin_apply``, the inline commit, where the store has it);
    the operations of every commit, one list per commit. ``begun`` counts inline commits."""

    def __init__(self, store: SessionStore) -> None:
        self.calls: list[list[Operation]] = []
        self.begun = 0
        original = store.apply

        async def apply(client_id: str, ops: Sequence[Operation]) -> None:
            self.calls.append(list(ops))
            await original(client_id, ops)

        store.apply = apply  # type: ignore[method-assign]
        begin = getattr(store, "begin_apply", None)
        if begin is not None:

            def begin_apply(
                client_id: str, ops: Sequence[Operation], durable: asyncio.Future[None]
            ) -> bool:
                started: bool = begin(client_id, ops, durable)
                if started:
                    self.calls.append(list(ops))
                    self.begun += 1
                return started

            store.begin_apply = begin_apply  # type: ignore[attr-defined]

    def call_of(self, kind: type, seq: int) -> int:
        """Index of the apply call holding ``kind``'s operation for message ``seq``."""
        for index, ops in enumerate(self.calls):
            for op in ops:
                if type(op) is kind and message_seq(op) == seq:
                    return index
        raise AssertionError(f"no {kind.__name__} for seq {seq} was applied")

    def added_seqs(self) -> list[int]:
        """The seqs of every ``MessageAdded`` applied so far, in order."""
        return [op.message.seq for ops in self.calls for op in ops if type(op) is MessageAdded]


def message_seq(op: Operation) -> int | None:
    """The seq a MessageAdded or PacketIdAssigned is about (None for other operations)."""
    if isinstance(op, MessageAdded):
        return op.message.seq
    if isinstance(op, PacketIdAssigned):
        return op.seq
    return None
