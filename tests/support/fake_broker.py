"""A scripted MQTT server for behaviour no real broker shows on demand.

mosquitto never sends malformed bytes, never refuses a subscription with 0x80 (it grants an
ACL-denied filter and then delivers nothing), and cannot be told to resend an inbound QoS 2
PUBLISH at an exact moment. A test hands :class:`ScriptedBroker` a coroutine that plays the
broker's side of each connection, packet by packet, through our codec (itself cross-checked
byte for byte against paho-mqtt in tests/test_codec.py). It answers in the protocol the
client's CONNECT announced (MQTT 3.1.1 or 5), as a broker does.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Self, TypeVar

from mqtt_persist.protocol.codec import Decoder, encode
from mqtt_persist.protocol.packets import Packet

P = TypeVar("P")


class FakeConnection:
    """The broker's end of one client connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._decoder = Decoder()
        self._pending: list[Packet] = []

    async def receive(self, timeout: float = 5.0) -> Packet:
        """The next packet from the client; EOFError if it closed the connection."""
        while not self._pending:
            data = await asyncio.wait_for(self._reader.read(65536), timeout)
            if not data:
                raise EOFError("client closed the connection")
            self._pending.extend(self._decoder.feed(data))
        return self._pending.pop(0)

    async def expect(self, kind: type[P], timeout: float = 5.0) -> P:
        """The next packet, which must be of ``kind``."""
        packet = await self.receive(timeout)
        if not isinstance(packet, kind):
            raise AssertionError(f"expected {kind.__name__}, got {packet!r}")
        return packet

    @property
    def protocol_version(self) -> int:
        """The protocol the client's CONNECT announced (3.1.1 until one arrived)."""
        return self._decoder.protocol_version

    async def send(self, *packets: Packet) -> None:
        version = self.protocol_version
        for packet in packets:
            self._writer.write(encode(packet, version))
        await self._writer.drain()

    async def send_raw(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    def close(self) -> None:
        self._writer.close()


Script = Callable[[FakeConnection, int], Awaitable[None]]


class ScriptedBroker:
    """Listens on a free 127.0.0.1 port; runs ``script(connection, index)`` per connection."""

    def __init__(self, script: Script) -> None:
        self._script = script
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.connections = 0
        self.errors: list[BaseException] = []
        self.host = "127.0.0.1"
        self.port = 0

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = self.connections
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        connection = FakeConnection(reader, writer)
        try:
            await self._script(connection, index)
        except (EOFError, ConnectionError, asyncio.CancelledError):
            pass
        except Exception as exc:  # surfaced by the test through .errors
            self.errors.append(exc)
        finally:
            connection.close()
            self._tasks.discard(task)  # type: ignore[arg-type]
