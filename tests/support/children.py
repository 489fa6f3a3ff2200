"""Child processes for tests that kill applications: started, and ready once they say so."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


async def spawn_ready(
    *argv: str, what: str = "child", timeout: float = 60
) -> asyncio.subprocess.Process:
    """Start ``argv`` (stdin, stdout, stderr piped; our ``tests`` package importable) and wait
    for its first line, ``READY``; RuntimeError with its stderr if it says anything else."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
        # gmqtt installs a top-level "tests" package; ours must win for the child.
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert process.stdout is not None and process.stderr is not None
    try:
        first = await asyncio.wait_for(process.stdout.readline(), timeout)
    except TimeoutError:
        first = b""
    if first.strip() != b"READY":
        process.kill()
        error = await process.stderr.read()
        raise RuntimeError(f"{what} did not start: {first!r} {error.decode()[-2000:]}")
    return process
