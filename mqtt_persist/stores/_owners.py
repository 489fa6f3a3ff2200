"""Who holds a lease of a shared store (Redis, PostgreSQL), and whether it provably no longer runs.

A lease's owner is JSON naming it: host, boot id, PID namespace, pid and process start
time (plus the store and since when). A holder on THIS host (same host name, boot id and PID
namespace) whose process is gone (no such pid, a zombie, or the pid now belongs to a process
started later) is dead, and its lease may be taken over at once; anything we cannot check
counts as alive. :func:`fenced_error` words a write refused because the session's fencing
token is no longer ours, the same for every shared store.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from datetime import UTC, datetime
from typing import Any

from mqtt_persist.errors import SessionFenced

__all__ = [
    "describe_owner",
    "fenced_error",
    "identity",
    "owner_is_dead",
    "owner_value",
    "parse_owner",
    "process_facts",
]


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def process_facts(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks after boot) of a process, from /proc (Linux)."""
    text = _read_text(f"/proc/{pid}/stat")
    if not text:
        return None
    try:
        # The command name (field 2) may contain spaces and parentheses: split after its end.
        fields = text[text.rindex(")") + 2 :].split()
        return fields[0], int(fields[19])
    except (ValueError, IndexError):
        return None


def identity() -> dict[str, Any]:
    """What makes a pid meaningful: host, boot and PID namespace, plus the process itself."""
    pid = os.getpid()
    identity: dict[str, Any] = {"host": socket.gethostname(), "pid": pid}
    boot = _read_text("/proc/sys/kernel/random/boot_id")
    if boot:
        identity["boot"] = boot
    with contextlib.suppress(OSError):
        identity["pidns"] = os.readlink("/proc/self/ns/pid")
    facts = process_facts(pid)
    if facts is not None:
        identity["start"] = facts[1]
    return identity


def owner_value(store_id: str) -> bytes:
    """The JSON a store writes as a lease's owner: who (:func:`identity`), which store, since."""
    owner = identity()
    owner["store"] = store_id
    owner["since"] = round(time.time(), 3)
    return json.dumps(owner, sort_keys=True).encode()


def parse_owner(raw: bytes) -> dict[str, Any] | None:
    try:
        owner = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return owner if isinstance(owner, dict) else None


def describe_owner(raw: bytes) -> str:
    owner = parse_owner(raw)
    if owner is None:
        return f"an unknown owner ({raw[:80]!r})"
    text = f"pid {owner.get('pid')} on host {owner.get('host')!r}"
    if owner.get("since") is not None:
        with contextlib.suppress(TypeError, ValueError, OverflowError, OSError):
            since = datetime.fromtimestamp(float(owner["since"]), UTC)
            text += f" since {since:%Y-%m-%d %H:%M:%S} UTC"
    return text


def owner_is_dead(raw: bytes) -> bool:
    """True only when the holder provably no longer runs: it is a process of this very host.

    Host name, boot id and PID namespace must all match ours (two machines may share a host
    name; a container may share the host's); anything we cannot check counts as alive.
    """
    owner = parse_owner(raw)
    if owner is None:
        return False
    me = identity()
    if any(owner.get(field) != me.get(field) for field in ("host", "boot", "pidns")):
        return False
    pid = owner.get("pid")
    if type(pid) is not int or pid <= 0:
        return False
    recorded_start = owner.get("start")
    if pid == me["pid"]:
        # This process (another store in it, alive) or an earlier one that had our pid.
        return recorded_start is not None and recorded_start != me.get("start")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, owned by another user
    facts = process_facts(pid)
    if facts is None:
        return False
    state, start = facts
    if state in ("Z", "X"):
        return True  # killed, not yet reaped by its parent
    # The pid now belongs to a process started after the holder: the holder is gone.
    return type(recorded_start) is int and recorded_start != start


def fenced_error(
    client_id: str, ours: str, current: str, holder: bytes, lease_ttl: float
) -> SessionFenced:
    """The error of a write refused as fenced by a shared store.

    ``ours`` is this store's fencing token as text, ``current`` the session's current one (''
    none), ``holder`` the live lease's owner value (b'' none): ours still current means our
    lease merely lapsed; another means a newer owner took over.
    """
    if current and current == ours:
        return SessionFenced(
            f"this store's lease on session {client_id!r} expired (not renewed within "
            f"{lease_ttl:g} s; fencing token {ours}); nothing was written; acquire it again"
        )
    if holder:
        return SessionFenced(
            f"session {client_id!r} is held by {describe_owner(holder)}, which took it over "
            f"(fencing token {current or '?'}; ours, {ours}, is no longer current); "
            "nothing was written"
        )
    return SessionFenced(
        f"this store's lease on session {client_id!r} expired or was released, and a newer "
        f"owner took over since (our fencing token {ours} is no longer current); nothing was "
        "written; release and acquire it again"
    )
