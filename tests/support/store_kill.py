"""Child processes for the store tests: writers killed with SIGKILL, and lease holders.

A SIGKILL test gives :func:`kill_rounds` a deterministic batch generator (:class:`Batches`, kept
as source so that the writer child runs the very same code), a writer script that ends by calling
:func:`write_batches`, and a coroutine factory that loads the :data:`VICTIM` session from the
store. Each round starts a writer from the batch after the last one recovered, lets it print the
number of every batch whose ``apply`` returned, kills it at a random moment, loads the store and
asserts that the state is exactly the replay of batches ``0..k`` for some ``k`` at or a little
beyond the last batch acknowledged. The rounds are yielded, so that a test can add the checks
peculiar to its store before the next writer starts.

:func:`start_holder` runs ``python -m tests.support.store_kill`` as a process that holds one
session's lease until :func:`stop_holder` closes its stdin (or kills it).

Both kinds of child import this module, so it stays light: no pytest, no test modules.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from mqtt_persist.session.state import Operation, SessionState
from mqtt_persist.stores.base import SessionStore

__all__ = [
    "REPO_ROOT",
    "VICTIM",
    "Batches",
    "KillRound",
    "child_env",
    "hold_lease",
    "kill_rounds",
    "start_holder",
    "stop_holder",
    "write_batches",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
#: The client id every writer child applies its batches to.
VICTIM = "victim"
#: How long a child may take to print its first line before it is killed and the test fails.
START_TIMEOUT = 30.0

_Store = TypeVar("_Store", bound=SessionStore)


def child_env() -> dict[str, str]:
    """This environment, with this checkout first on PYTHONPATH (our ``tests``, our library)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def _first_line(child: subprocess.Popen[str]) -> str:
    """The child's first line of output; "" if it ended, or hung and was killed, before one."""
    assert child.stdout is not None
    # A child that hangs before its first line must fail the test, not stall it.
    watchdog = threading.Timer(START_TIMEOUT, child.kill)
    watchdog.start()
    try:
        return child.stdout.readline()
    finally:
        watchdog.cancel()


# --- SIGKILL rounds -----------------------------------------------------------------------------


class Batches:
    """A deterministic batch generator, and a cache of the states its prefixes replay to.

    ``source`` defines ``make_batch(n) -> list[Operation]`` (and whatever helpers it needs);
    :func:`kill_rounds` runs it in the writer child too.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        #: Everything ``source`` defines, for the helpers a test also wants (``batch_size``...).
        self.namespace: dict[str, Any] = {}
        exec(source, self.namespace)
        self.make: Callable[[int], list[Operation]] = self.namespace["make_batch"]
        self._states = [SessionState(VICTIM)]  # _states[k + 1]: batches 0..k applied

    def state_after(self, k: int) -> SessionState:
        """The session after batches ``0..k`` (``k = -1``: none)."""
        while len(self._states) < k + 2:
            state = self._states[-1].copy()
            state.apply_all(self.make(len(self._states) - 1))
            self._states.append(state)
        return self._states[k + 1]


@dataclass(frozen=True)
class KillRound:
    """One writer started, killed and recovered."""

    number: int
    #: The last batch the writer printed, i.e. whose ``apply`` had returned.
    acknowledged: int
    #: The ``k`` such that the loaded state is the replay of batches ``0..k``.
    recovered: int
    #: What the store loaded after the kill.
    state: SessionState


def kill_rounds(
    batches: Batches,
    writer: str,
    args: Sequence[str],
    load: Callable[[], Coroutine[Any, Any, SessionState | None]],
    *,
    rounds: int,
    max_delay: float = 0.25,
    unacknowledged: int = 1,
    seed: int | None = None,
) -> Iterator[KillRound]:
    """Kill a writer ``rounds`` times; after each kill, assert nothing acknowledged was lost.

    The child runs ``batches.source + writer`` as ``python -c SCRIPT *args START``; ``writer``
    ends with a call to :func:`write_batches`. The first round starts at batch 0, every later
    one at the batch after the last one recovered. Each kill lands ``0..max_delay`` seconds
    after the first batch was acknowledged; ``load()`` then reads the session, which must be
    the replay of batches ``0..k`` with ``acknowledged <= k <= acknowledged + unacknowledged``:
    all or nothing per batch, and at most ``unacknowledged`` batches committed but not yet
    printed when the kill landed. The random delays come from ``seed`` (random when None),
    named in the failure message.
    """
    if seed is None:
        seed = random.randrange(2**32)
    rng = random.Random(seed)
    script = batches.source + writer
    recovered = -1
    for number in range(rounds):
        child = subprocess.Popen(
            [sys.executable, "-c", script, *args, str(recovered + 1)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env(),
        )
        try:
            first = _first_line(child)
            assert first, child.communicate()[1]
            time.sleep(rng.uniform(0.0, max_delay))
            child.send_signal(signal.SIGKILL)
            rest, errors = child.communicate(timeout=10)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(10)
        assert child.returncode == -signal.SIGKILL, errors
        acknowledged = int((first + rest).split()[-1])

        state = asyncio.run(load())
        assert state is not None
        candidates = range(acknowledged, acknowledged + unacknowledged + 1)
        matches = [k for k in candidates if batches.state_after(k) == state]
        assert matches, f"seed {seed} round {number}: no prefix >= batch {acknowledged} matches"
        recovered = matches[0]
        yield KillRound(number, acknowledged, recovered, state)


def write_batches(
    open_store: Callable[[Sequence[str]], _Store],
    make_batch: Callable[[int], list[Operation]],
    prepare: Callable[[_Store], Awaitable[None]] | None = None,
) -> None:
    """Writer child: apply batch START, START + 1, ... to :data:`VICTIM` until killed.

    Command line: ``*args START``; ``open_store(args)`` builds the store (in the event loop),
    whose :data:`VICTIM` lease is taken before ``prepare(store)``. A batch's number is printed
    (and flushed) once its ``apply`` has returned.
    """
    *args, start = sys.argv[1:]

    async def main() -> None:
        store = open_store(args)
        await store.acquire(VICTIM)
        if prepare is not None:
            await prepare(store)
        n = int(start)
        while True:
            await store.apply(VICTIM, make_batch(n))
            sys.stdout.write(f"{n}\n")
            sys.stdout.flush()
            n += 1

    asyncio.run(main())


# --- lease holders ------------------------------------------------------------------------------


def start_holder(
    store_class: type[SessionStore], client_id: str, *args: str, **kwargs: str
) -> subprocess.Popen[str]:
    """A child process whose ``store_class(*args, **kwargs)`` holds ``client_id``'s lease.

    Returns once the child has acquired it. :func:`stop_holder` ends it.
    """
    target = f"{store_class.__module__}:{store_class.__qualname__}"
    child = subprocess.Popen(
        [sys.executable, "-m", __name__, target, client_id, json.dumps([args, kwargs])],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    line = _first_line(child)
    if line != "locked\n":
        stop_holder(child, kill=True)
    assert line == "locked\n", line
    return child


def stop_holder(child: subprocess.Popen[str], *, kill: bool) -> None:
    """End a holder: with SIGKILL, or by closing its stdin (it then closes its store)."""
    if kill:
        child.kill()
    else:
        child.communicate("", timeout=10)
    child.wait(timeout=10)


def hold_lease(open_store: Callable[[], SessionStore], client_id: str) -> None:
    """Holder child: acquire, print "locked", hold until stdin is closed, then close the store."""

    async def main() -> None:
        store = open_store()
        await store.acquire(client_id)
        print("locked", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await store.close()

    asyncio.run(main())


def _holder_main(argv: Sequence[str]) -> None:
    target, client_id, arguments = argv
    module, name = target.split(":")
    store_class = getattr(importlib.import_module(module), name)
    args, kwargs = json.loads(arguments)
    hold_lease(lambda: store_class(*args, **kwargs), client_id)


if __name__ == "__main__":
    _holder_main(sys.argv[1:])
