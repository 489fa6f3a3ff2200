"""Private nats-server processes with JetStream and MQTT, each on its own free 127.0.0.1 ports.

Nothing here touches a nats-server the machine runs (4222, ``/var/lib/nats-server``): every
server gets its own ``server_name``, NATS client port, MQTT port and JetStream ``store_dir``
in ``workdir``. MQTT in nats-server needs JetStream (sessions, retained messages and QoS 1
deliveries are JetStream streams), so the server is ready when its MQTT port answers CONNECT
with CONNACK, not merely when the port is open. It starts in a fraction of a second, so tests
get a server of their own instead of sharing one.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Protocol

import pytest

from tests.support.broker import BrokerStartError, free_port
from tests.support.server_process import ServerProcess, executable

__all__ = ["NatsFactory", "NatsServer", "find_nats_server", "nats_server_path"]

_FALLBACKS = ("/usr/sbin/nats-server", "/usr/bin/nats-server", "/usr/local/bin/nats-server")


def find_nats_server() -> str | None:
    """Path of nats-server: ``$NATS_SERVER`` if set, then PATH, then the usual places."""
    found = executable(os.environ.get("NATS_SERVER")) or shutil.which("nats-server")
    if found:
        return found
    return next((path for path in _FALLBACKS if executable(path)), None)


def nats_server_path() -> str:
    """The binary, or end the test: ``pytest.fail`` under CI (env CI set), else ``pytest.skip``."""
    path = find_nats_server()
    if path is None:
        message = "nats-server not found (apt-get install nats-server, or set $NATS_SERVER)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


class NatsServer(ServerProcess):
    """One nats-server with JetStream and an MQTT listener on ``self.port``."""

    name = "nats-server"
    start_timeout = 30.0

    def __init__(
        self,
        workdir: Path,
        *,
        binary: str | None = None,
        port: int | None = None,
        extra_config: str = "",
    ) -> None:
        super().__init__(workdir, port=port)
        self.binary = binary or find_nats_server()
        self.client_port = free_port()
        self.extra_config = extra_config
        self.config_path = self.workdir / "nats.conf"
        self.store_dir = self.workdir / "jetstream"

    def config_text(self) -> str:
        """The server's configuration file."""
        lines = [
            f'server_name: "mqtt-persist-test-{self.port}"',
            f"listen: {self.host}:{self.client_port}",
            "jetstream {",
            f'  store_dir: "{self.store_dir}"',
            # The defaults claim a share of the machine's memory and disk; tests need little.
            "  max_memory_store: 256MB",
            "  max_file_store: 2GB",
            "}",
            "mqtt {",
            f"  listen: {self.host}:{self.port}",
            "}",
        ]
        if self.extra_config:
            lines.append(self.extra_config.strip())
        return "\n".join(lines) + "\n"

    def prepare(self) -> None:
        if self.binary is None:
            raise BrokerStartError("nats-server binary not found")
        self.config_path.write_text(self.config_text())

    def command(self) -> list[str]:
        assert self.binary is not None
        return [self.binary, "-c", str(self.config_path)]


class NatsFactory(Protocol):
    """Type of the ``nats_factory`` fixture: NatsServer kwargs, plus ``start``."""

    def __call__(self, *, start: bool = True, **kwargs: Any) -> NatsServer: ...
