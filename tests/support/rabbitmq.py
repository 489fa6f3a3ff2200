"""Private RabbitMQ nodes with the MQTT plugin, each on its own free 127.0.0.1 ports.

Nothing here touches a RabbitMQ the machine runs (node ``rabbit@...``, AMQP 5672, epmd 4369,
distribution 25672): every node gets, in its ``workdir``,

* its own **node name** (``mqttp-<pid>-<port>@localhost``, kept across restarts because the
  node's Mnesia database is bound to it) and its own **epmd** on a free port
  (``ERL_EPMD_PORT``), started by us in the foreground so we own and stop it;
* its own **distribution port** (``RABBITMQ_DIST_PORT``, bound to 127.0.0.1 only), no AMQP
  listener at all (``listeners.tcp = none``) and the MQTT listener on ``self.port``;
* its own Mnesia, log, plugin-expansion and pid paths, an ``enabled_plugins`` file with
  ``[rabbitmq_mqtt].``, and a ``rabbitmq.conf`` with ``mqtt.allow_anonymous = true`` and
  ``loopback_users = none``;
* ``HOME`` (where Erlang writes its cookie) and ``RABBITMQ_CONF_ENV_FILE``, which points at an
  empty file of its own: an *empty* variable is no good, the scripts then fall back to
  ``/etc/rabbitmq/rabbitmq-env.conf`` and would read the machine's node settings.

It runs the ``rabbitmq-server`` script from RabbitMQ's own lib directory
(``/usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin``), not the ``/usr/sbin`` wrapper, which
switches to the ``rabbitmq`` user and logs to ``/var/log/rabbitmq``. With
``RABBITMQ_ALLOW_INPUT`` set that script *execs* the Erlang VM instead of running it as a child
of a signal-forwarding shell, so the process we spawn is the node itself: SIGTERM stops it
cleanly (durable sessions survive), SIGKILL is a crash, PR_SET_PDEATHSIG applies to it, and its
stdin is a pipe we hold: the Erlang shell halts the node the moment that pipe closes, so a node
cannot outlive the test process however that process dies.

A node takes about 10-15 s to boot on these machines, hence the shared session-scoped fixture
in tests/conftest.py.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Protocol

import pytest

from tests.support.broker import BrokerStartError, _die_with_parent, free_port
from tests.support.server_process import ServerProcess, executable, port_open, read_or_empty

__all__ = [
    "RabbitMQBroker",
    "RabbitMQFactory",
    "find_epmd",
    "find_rabbitmq_server",
    "rabbitmq_paths",
]

_SCRIPT_GLOB = "/usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin/rabbitmq-server"
_EPMD_GLOB = "/usr/lib/erlang/erts-*/bin/epmd"


def _version_key(path: str) -> tuple[int, ...]:
    match = re.search(r"(?:rabbitmq_server|erts)-([\d.]+)", path)
    return tuple(int(part) for part in match.group(1).split(".") if part) if match else ()


def find_rabbitmq_server() -> str | None:
    """The lib directory's ``rabbitmq-server`` script: ``$RABBITMQ_SERVER``, else the newest
    ``/usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin/rabbitmq-server``."""
    found = executable(os.environ.get("RABBITMQ_SERVER"))
    if found:
        return found
    candidates = sorted(glob.glob(_SCRIPT_GLOB), key=_version_key)
    return executable(candidates[-1]) if candidates else None


def find_epmd() -> str | None:
    """Erlang's port mapper daemon: PATH, else the newest ``/usr/lib/erlang/erts-*/bin``."""
    found = shutil.which("epmd")
    if found:
        return found
    candidates = sorted(glob.glob(_EPMD_GLOB), key=_version_key)
    return executable(candidates[-1]) if candidates else None


def rabbitmq_paths() -> tuple[str, str]:
    """``(rabbitmq-server script, epmd)``, or end the test: ``pytest.fail`` under CI (env CI
    set), ``pytest.skip`` elsewhere."""
    script, epmd = find_rabbitmq_server(), find_epmd()
    if script is None or epmd is None:
        missing = "rabbitmq-server" if script is None else "epmd (Erlang)"
        message = (
            f"{missing} not found (apt-get install rabbitmq-server, or set $RABBITMQ_SERVER to "
            "RabbitMQ's lib/rabbitmq_server-*/sbin/rabbitmq-server)"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return script, epmd


class RabbitMQBroker(ServerProcess):
    """One RabbitMQ node with the MQTT plugin; see the module docstring for its isolation."""

    name = "RabbitMQ"
    # Boot takes 10-15 s alone; allow for a machine busy with other test runs.
    start_timeout = 90.0

    def __init__(
        self,
        workdir: Path,
        *,
        script: str | None = None,
        epmd: str | None = None,
        port: int | None = None,
        extra_config: str = "",
    ) -> None:
        super().__init__(workdir, port=port)
        self.script = script or find_rabbitmq_server()
        self.epmd = epmd or find_epmd()
        self.epmd_port = free_port()
        self.dist_port = free_port()
        self.node = f"mqttp-{os.getpid()}-{self.port}@localhost"
        self.extra_config = extra_config
        self.config_path = self.workdir / "rabbitmq.conf"
        self.log_dir = self.workdir / "log"
        self._epmd_proc: subprocess.Popen[bytes] | None = None

    def config_text(self) -> str:
        """The node's ``rabbitmq.conf``."""
        lines = [
            # No AMQP listener: nothing to collide with, and nothing we test goes through it.
            "listeners.tcp = none",
            "loopback_users = none",
            "mqtt.allow_anonymous = true",
            f"mqtt.listeners.tcp.default = {self.host}:{self.port}",
            # The default (50 MB free) blocks every publisher on a nearly full disk, which
            # a test would see as the client under test hanging.
            "disk_free_limit.absolute = 10MB",
        ]
        if self.extra_config:
            lines.append(self.extra_config.strip())
        return "\n".join(lines) + "\n"

    def prepare(self) -> None:
        if self.script is None or self.epmd is None:
            raise BrokerStartError("rabbitmq-server script or epmd not found")
        self.config_path.write_text(self.config_text())
        (self.workdir / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        (self.workdir / "rabbitmq-env.conf").write_text("")
        self._start_epmd()

    def _start_epmd(self) -> None:
        if self._epmd_proc is not None and self._epmd_proc.poll() is None:
            return
        assert self.epmd is not None
        on_main = threading.current_thread() is threading.main_thread()
        with open(self.workdir / "epmd.log", "ab") as log:
            self._epmd_proc = subprocess.Popen(
                [self.epmd, "-port", str(self.epmd_port), "-address", self.host],
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent if on_main else None,
            )
        deadline = time.monotonic() + 10
        while not port_open(self.host, self.epmd_port):
            if self._epmd_proc.poll() is not None or time.monotonic() > deadline:
                raise BrokerStartError(
                    f"epmd did not start on port {self.epmd_port}: "
                    f"{read_or_empty(self.workdir / 'epmd.log')}"
                )
            time.sleep(0.01)

    def command(self) -> list[str]:
        assert self.script is not None
        return [self.script]

    def environment(self) -> dict[str, str]:
        work = self.workdir
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "HOME": str(work),
            "RABBITMQ_CONF_ENV_FILE": str(work / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(self.config_path),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(work / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(work / "enabled_plugins"),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(work / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.log_dir),
            "RABBITMQ_PLUGINS_EXPAND_DIR": str(work / "plugins-expand"),
            "RABBITMQ_PID_FILE": str(work / "rabbitmq.pid"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            # Exec the VM (no signal-forwarding shell in between) and tie it to our stdin pipe.
            "RABBITMQ_ALLOW_INPUT": "1",
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": self.host,
            "ERL_CRASH_DUMP": str(work / "erl_crash.dump"),
            "ERL_CRASH_DUMP_SECONDS": "0",
        }

    def popen_options(self) -> dict[str, Any]:
        # Never written to: it exists so that the node halts when its write end closes.
        return {"stdin": subprocess.PIPE}

    def after_exit(self) -> None:
        epmd, self._epmd_proc = self._epmd_proc, None
        if epmd is not None and epmd.poll() is None:
            epmd.terminate()
            try:
                epmd.wait(5)
            except subprocess.TimeoutExpired:
                epmd.kill()
                epmd.wait(5)

    @property
    def epmd_running(self) -> bool:
        """True while the node's own epmd runs."""
        return self._epmd_proc is not None and self._epmd_proc.poll() is None

    @property
    def epmd_pid(self) -> int | None:
        """The process id of the node's own epmd while it runs."""
        return self._epmd_proc.pid if self.epmd_running and self._epmd_proc else None

    def log_text(self) -> str:
        node_log = read_or_empty(self.log_dir / f"{self.node}.log")
        return f"{super().log_text()}\n--- {self.node}.log ---\n{node_log}"


class RabbitMQFactory(Protocol):
    """Type of the ``rabbitmq_factory`` fixture: RabbitMQBroker kwargs, plus ``start``."""

    def __call__(self, *, start: bool = True, **kwargs: Any) -> RabbitMQBroker: ...
