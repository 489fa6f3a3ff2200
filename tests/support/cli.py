"""Running ``mqtt-persist`` as a subprocess, and sessions worth looking at for its tests.

:func:`run_cli` runs the installed console script (the one ``pip install .[cli]`` made), or
``python -m mqtt_persist.cli`` where there is none, with the store URL environment cleared so
a developer's own ``MQTT_PERSIST_*`` variables never leak in.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mqtt_persist.session.state import (
    InboundReceived,
    MessageAdded,
    MessageReleased,
    MessageSetAside,
    Operation,
    PacketIdAssigned,
    ProtocolVersionSet,
    StoredMessage,
    SubscriptionRemoved,
    SubscriptionSet,
)

__all__ = ["CLI", "Result", "rich_session_ops", "run_cli", "start_cli"]

_SCRIPT = Path(sys.executable).with_name("mqtt-persist")
#: The command that runs the tool.
CLI: list[str] = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "mqtt_persist.cli"]


class Result:
    """What one run printed, and its exit code."""

    def __init__(self, completed: subprocess.CompletedProcess[bytes]) -> None:
        self.code = completed.returncode
        self.out_bytes = completed.stdout
        self.out = completed.stdout.decode("utf-8", "replace")
        self.err = completed.stderr.decode("utf-8", "replace")

    def json(self) -> Any:
        """stdout parsed as one JSON document."""
        return json.loads(self.out)

    def __repr__(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.out}\n--- stderr\n{self.err}"


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MQTT_PERSIST_")}
    env["PATH"] = f"{env.get('PATH', '')}:/usr/sbin"
    return env | (extra or {})


def run_cli(
    *args: str | Path,
    input: bytes | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 60.0,
) -> Result:
    """Run ``mqtt-persist ARGS`` to its end."""
    completed = subprocess.run(
        [*CLI, *map(str, args)],
        input=input,
        capture_output=True,
        timeout=timeout,
        env=_env(env),
        stdin=None if input is not None else subprocess.DEVNULL,
    )
    return Result(completed)


def start_cli(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start ``mqtt-persist ARGS`` in the background (stdout and stderr piped)."""
    return subprocess.Popen(
        [*CLI, *map(str, args)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(env),
    )


def rich_session_ops(queued: int = 5) -> list[Operation]:
    """A session with something of every kind a store keeps, as a client would leave it.

    MQTT 5; three messages in flight (QoS 1 awaiting PUBACK, QoS 2 awaiting PUBREC and PUBCOMP);
    ``queued`` queued messages with odd topics and payloads (non-ASCII, NUL, newlines, empty),
    MQTT 5 properties and an expiry; two set-aside messages; two inbound QoS 2 IDs; three
    subscriptions (one with every MQTT 5 option and an identifier); a pending unsubscribe.
    """
    ops: list[Operation] = [ProtocolVersionSet(5)]
    payloads: Sequence[bytes] = [b"", b"\x00\xff\n\r{}", "é ü 漢".encode(), b"x" * 300]
    total = 5 + queued
    for seq in range(1, total + 1):
        ops.append(
            MessageAdded(
                StoredMessage(
                    seq,
                    f"site/ä/{seq % 4}",
                    payloads[seq % len(payloads)],
                    1 if seq % 3 else 2,
                    retain=seq % 5 == 0,
                    properties=b"\x01\x01" if seq % 2 else b"",
                    expires_at=1_900_000_000.5 if seq % 7 == 0 else None,
                )
            )
        )
    ops += [
        PacketIdAssigned(1, 101),  # QoS 1: awaiting PUBACK
        PacketIdAssigned(3, 103),  # QoS 2: awaiting PUBREC
        PacketIdAssigned(6, 106),  # QoS 2, released: awaiting PUBCOMP
        MessageReleased(6),
        MessageSetAside(2, "poison: the broker closed the connection on it", 1_700_000_000.25),
        MessageSetAside(4, "payload too large for the broker", 1_700_000_001.0),
        InboundReceived(7),
        InboundReceived(65535),
        SubscriptionSet("site/+/cmd", 1, True),
        SubscriptionSet("alarms/#", 2, False, 0x04 | 0x08 | 0x20, 4242),
        SubscriptionSet("ä/ö", 0, True),
        SubscriptionRemoved("old/filter", unsubscribe_pending=True),
    ]
    return ops
