"""Polling helpers for conditions that have no event to wait on."""

from __future__ import annotations

from collections.abc import Callable

import anyio


async def until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Poll ``predicate`` every 20 ms; TimeoutError (naming ``what``) after ``timeout``."""
    try:
        with anyio.fail_after(timeout):
            while not predicate():  # noqa: ASYNC110 - state outside our control, no event
                await anyio.sleep(0.02)
    except TimeoutError:
        raise TimeoutError(f"timed out after {timeout}s waiting for {what or predicate}") from None
