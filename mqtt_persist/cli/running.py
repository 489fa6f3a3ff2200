"""Running a command's coroutine: Ctrl-C and SIGTERM end it cleanly, not with a traceback.

Either signal cancels the command's task, so every ``async with`` it is inside unwinds (a
client sends DISCONNECT and releases its lease, a store closes); then :class:`Interrupted`
says the command did not finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable
from typing import TypeVar

from mqtt_persist.cli.exits import CliError, ExitCode

__all__ = ["Interrupted", "run_async"]

_T = TypeVar("_T")


class Interrupted(CliError):
    """The command was stopped by Ctrl-C or SIGTERM before it finished."""

    def __init__(self, name: str) -> None:
        super().__init__(f"interrupted by {name}", ExitCode.INTERRUPTED)


def run_async(command: Callable[[], Awaitable[_T]]) -> _T:
    """Run ``command()`` in a new event loop; :class:`Interrupted` if a signal stopped it."""
    return asyncio.run(_guarded(command))


async def _guarded(command: Callable[[], Awaitable[_T]]) -> _T:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    received: list[str] = []

    def stop(name: str) -> None:
        if not received:
            received.append(name)
            task.cancel()

    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop, sig.name)
    try:
        return await command()
    except asyncio.CancelledError:
        if received:
            raise Interrupted(received[0]) from None
        raise
    finally:
        for sig in signals:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
