"""keep_cancellation: a cancellation a driver swallowed during a store's call is raised after all.

The drivers' own races are in tests/test_store_fencing.py (an ``asyncio.timeout`` around a
Redis/PostgreSQL acquire); here a call that swallows its cancellation on purpose shows what
each kind of caller gets: asyncio's one-shot timeout, anyio's scopes, and a call made while an
earlier cancellation is still being handled (an acquire's shielded undo).
"""

from __future__ import annotations

import asyncio

import anyio
import pytest

from mqtt_persist.stores._cancellation import keep_cancellation


async def swallowing() -> str:
    """Returns normally even when cancelled, as Python 3.11's wait_for may."""
    try:
        await asyncio.sleep(10)
    except asyncio.CancelledError:
        return "swallowed"
    return "slept"


async def test_a_call_that_was_not_cancelled_returns_its_result() -> None:
    async def answer() -> int:
        await asyncio.sleep(0)
        return 42

    assert await keep_cancellation(answer()) == 42


async def test_an_asyncio_timeout_fires_although_the_call_swallowed_it() -> None:
    task = asyncio.current_task()
    assert task is not None
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            await keep_cancellation(swallowing())
    assert task.cancelling() == 0


async def test_a_task_cancel_swallowed_by_the_call_ends_the_task() -> None:
    reached = []

    async def worker() -> None:
        await keep_cancellation(swallowing())
        reached.append("after the call")  # a worker loop would go on for ever

    task = asyncio.create_task(worker())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert reached == []


async def test_an_anyio_scope_catches_the_cancellation_it_made() -> None:
    task = asyncio.current_task()
    assert task is not None
    with anyio.move_on_after(0.01) as scope:
        await keep_cancellation(swallowing())
    assert scope.cancelled_caught
    assert task.cancelling() == 0


async def test_a_call_made_while_a_cancellation_is_handled_is_not_cancelled_again() -> None:
    """An acquire's undo runs after its cancellation, shielded: its calls must complete."""

    async def answer() -> int:
        await asyncio.sleep(0)
        return 42

    task = asyncio.current_task()
    assert task is not None
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                with anyio.CancelScope(shield=True):
                    assert await keep_cancellation(answer()) == 42
                raise
    assert task.cancelling() == 0
