"""Group commit across sessions: the applies of several sessions in one transaction.

One client hands its store one burst per ``apply`` and waits for it, so one session never has
two applies in flight; a gateway with many sessions on one store has many. Each transaction
waits for the server's WAL flush, and the flushes of transactions on different connections
did not merge on these machines (8 sessions on 4 connections: as many applies per second as 1
session; 8 sessions in one transaction: 3.6 times as many). So the store's applies go through
one :class:`GroupCommit`: while a transaction is on its way, the applies that arrive queue up,
and the next transaction carries all of them (up to :data:`MAX_WRITES`), each still starting
with its own session's fencing check.

A transaction that fails fails whole. When it carried several sessions, each of them is sent
again alone, so one session's refusal (a fenced former owner, above all) or damage never fails
another's apply: every journal operation is idempotent, so a write sent twice (the first time
in a transaction whose COMMIT the server may have run before the connection broke) changes
nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from mqtt_persist.stores.postgres.operations import Statement

__all__ = ["MAX_WRITES", "GroupCommit"]

#: Sessions per transaction at most: a bound on one query's size and on one failure's retries.
MAX_WRITES = 64


def _future() -> asyncio.Future[None]:
    return asyncio.get_running_loop().create_future()


@dataclass(slots=True)
class _Write:
    statements: list[Statement]
    done: asyncio.Future[None] = field(default_factory=_future)


#: Runs the statements of several applies as ONE transaction (one query); raises what the
#: driver raised.
Run = Callable[[Sequence[list[Statement]]], Awaitable[None]]


class GroupCommit:
    """Applies of any number of sessions, committed a transaction at a time, together."""

    def __init__(self, run: Run) -> None:
        """``run(applies)`` commits the applies' statements in one transaction, or raises."""
        self._run = run
        self._pending: list[_Write] = []
        self._task: asyncio.Task[None] | None = None

    async def commit(self, statements: list[Statement]) -> None:
        """Commit one session's apply (its statements), with whatever else is queued.

        Raises what the transaction that carried it alone raised. A caller cancelled while it
        waits leaves its write either not sent yet (then it never is) or committed.
        """
        write = _Write(statements)
        self._pending.append(write)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._drain(), name="PostgresStore group commit"
            )
        await write.done

    async def _drain(self) -> None:
        while self._pending:
            batch = [w for w in self._pending[:MAX_WRITES] if not w.done.cancelled()]
            del self._pending[:MAX_WRITES]
            if len(batch) == 1:
                await self._one(batch[0])
            elif batch:
                try:
                    await self._run([w.statements for w in batch])
                except Exception:
                    # Whose write failed the transaction is for each of them to find out alone.
                    for write in batch:
                        await self._one(write)
                else:
                    for write in batch:
                        _settle(write, None)

    async def _one(self, write: _Write) -> None:
        if write.done.cancelled():
            return
        try:
            await self._run([write.statements])
        except Exception as exc:
            _settle(write, exc)
        else:
            _settle(write, None)

    async def close(self) -> None:
        """Wait for what is queued to be committed (or to fail)."""
        task = self._task
        if task is not None and not task.done():
            with contextlib.suppress(Exception):
                await task


def _settle(write: _Write, error: Exception | None) -> None:
    if write.done.done():  # its caller was cancelled
        return
    if error is None:
        write.done.set_result(None)
    else:
        write.done.set_exception(error)
