"""The RabbitMQ and nats-server fixtures keep to themselves and leave nothing behind.

Every listening socket of a broker we start is on 127.0.0.1 and on a port we picked (never the
machine's 1883/4222/5672/4369/25672), the RabbitMQ node registers with its own epmd only, its
files stay in its own directory, and when the broker is stopped, or the test process that
started it dies, no process of it is left running.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.support.nats import NatsFactory, NatsServer
from tests.support.rabbitmq import RabbitMQBroker, RabbitMQFactory
from tests.support.server_process import port_open

ROOT = Path(__file__).resolve().parent.parent
SYSTEM_PORTS = {1883, 4222, 5672, 4369, 25672, 15672}


def listening(pid: int) -> set[tuple[str, int]]:
    """``(address, port)`` of every TCP socket ``pid`` listens on (Linux /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            hex_address, hex_port = local.split(":")
            raw = bytes.fromhex(hex_address)
            # /proc prints the address as native-endian 32-bit words.
            words = [raw[i : i + 4][::-1] for i in range(0, len(raw), 4)]
            found.add((socket.inet_ntop(family, b"".join(words)), int(hex_port, 16)))
    return found


def epmd_names(port: int) -> str:
    """The node list an epmd on ``port`` reports (its NAMES request), or "" if none runs."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(b"\x00\x01n")
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
    except OSError:
        return ""
    return data[4:].decode(errors="replace")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie no longer runs: it only waits for its parent to collect its exit status.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def processes_in(workdir: Path) -> list[int]:
    """Live processes working in ``workdir`` or naming it on their command line.

    Found by looking, not by the pids the fixture knows: a process it lost track of (say an
    Erlang VM behind a wrapper script) is found all the same.
    """
    needle = str(workdir)
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if (cwd.startswith(needle) or needle in cmdline) and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def wait_none_in(workdir: Path, timeout: float = 15.0) -> list[int]:
    """The processes still found in ``workdir`` after up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while (left := processes_in(workdir)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


# --- RabbitMQ ----------------------------------------------------------------------------------


@pytest.mark.rabbitmq
def test_rabbitmq_node_is_private(shared_rabbitmq: RabbitMQBroker) -> None:
    node = shared_rabbitmq
    assert node.pid is not None and node.epmd_pid is not None
    ports = {node.port, node.epmd_port, node.dist_port}
    assert len(ports) == 3 and not ports & SYSTEM_PORTS
    # MQTT and Erlang distribution, both on loopback only; no AMQP listener at all.
    assert listening(node.pid) == {("127.0.0.1", node.port), ("127.0.0.1", node.dist_port)}
    assert {address for address, _ in listening(node.epmd_pid)} <= {"127.0.0.1", "::1"}
    # Registered with its own epmd, at its own distribution port, and nowhere else.
    short_name = node.node.split("@")[0]
    assert f"name {short_name} at port {node.dist_port}" in epmd_names(node.epmd_port)
    assert short_name not in epmd_names(4369)
    # Its database and logs are in its own directory.
    assert (node.workdir / "mnesia" / node.node).is_dir()
    assert (node.log_dir / f"{node.node}.log").is_file()


@pytest.mark.rabbitmq
@pytest.mark.slow
def test_rabbitmq_stop_leaves_no_process_or_port(rabbitmq_factory: RabbitMQFactory) -> None:
    node = rabbitmq_factory()
    assert node.pid is not None and node.epmd_pid is not None
    assert {node.pid, node.epmd_pid} <= set(processes_in(node.workdir))
    node.stop()
    assert wait_none_in(node.workdir) == []
    assert not port_open(node.host, node.port) and not port_open(node.host, node.epmd_port)
    assert not node.running and not node.epmd_running


CHILD = """
import sys, time
from pathlib import Path
from tests.support.{module} import {cls}
server = {cls}(Path(sys.argv[1]))
server.start()
print(server.pid, getattr(server, "epmd_pid", None) or 0, flush=True)
time.sleep(600)
"""


def assert_dies_with_its_starter(module: str, cls: str, workdir: Path) -> None:
    """Start a broker from a child process, SIGKILL the child: the broker must end too."""
    code = textwrap.dedent(CHILD.format(module=module, cls=cls))
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(workdir)],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
    )
    assert child.stdout is not None
    reported = {int(pid) for pid in child.stdout.readline().split() if pid != b"0"}
    assert reported and reported <= set(processes_in(workdir)), "the broker did not start"
    child.send_signal(signal.SIGKILL)
    child.wait()
    left = wait_none_in(workdir)
    for pid in left:  # do not leave them running on a shared machine, whatever the verdict
        os.kill(pid, signal.SIGKILL)
    assert left == [], "outlived the process that started them"


@pytest.mark.rabbitmq
@pytest.mark.slow
def test_rabbitmq_node_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    """SIGKILL of the test process: no atexit hook runs, and still nothing is left."""
    assert_dies_with_its_starter("rabbitmq", "RabbitMQBroker", tmp_path / "orphan")


# --- nats-server -------------------------------------------------------------------------------


@pytest.mark.nats
def test_nats_server_is_private_and_stops(nats_factory: NatsFactory) -> None:
    server: NatsServer = nats_factory()
    assert server.pid is not None
    pid = server.pid
    assert not {server.port, server.client_port} & SYSTEM_PORTS
    assert listening(pid) == {("127.0.0.1", server.port), ("127.0.0.1", server.client_port)}
    assert (server.store_dir / "jetstream").is_dir()  # its JetStream state, in its directory
    assert processes_in(server.workdir) == [pid]
    server.stop()
    assert wait_none_in(server.workdir) == []
    assert not port_open(server.host, server.port)


@pytest.mark.nats
def test_nats_server_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    assert_dies_with_its_starter("nats", "NatsServer", tmp_path / "orphan")
