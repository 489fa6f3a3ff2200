"""``TcpStream``, the client's plain-TCP stream on asyncio, against a real local TCP server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import anyio
import pytest

from mqtt_persist.transport import TcpStream, open_stream
from tests.support.waiting import until


class _Server:
    """A TCP server on 127.0.0.1 whose connection the test drives by hand."""

    def __init__(self) -> None:
        self.connected: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.Queue()
        )
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self.connected.put((reader, writer))

        self._server = await asyncio.start_server(accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


@pytest.fixture
async def server() -> AsyncIterator[_Server]:
    s = _Server()
    await s.start()
    yield s
    await s.close()


async def _connect(server: _Server) -> tuple[TcpStream, asyncio.StreamReader, asyncio.StreamWriter]:
    stream = await open_stream("127.0.0.1", server.port, tls=None, timeout=5)
    assert isinstance(stream, TcpStream)
    reader, writer = await asyncio.wait_for(server.connected.get(), 5)
    return stream, reader, writer


async def _receive_exactly(stream: TcpStream, n: int, max_bytes: int = 65536) -> bytes:
    data = b""
    with anyio.fail_after(10):
        while len(data) < n:
            chunk = await stream.receive(max_bytes)
            assert len(chunk) <= max_bytes
            data += chunk
    return data


async def test_bytes_both_ways_and_max_bytes(server: _Server) -> None:
    stream, reader, writer = await _connect(server)
    await stream.send(b"hello")
    assert await asyncio.wait_for(reader.readexactly(5), 5) == b"hello"
    for i in range(20):  # several reads arrive before the client receives
        writer.write(bytes([i]) * 100)
        await writer.drain()
    await asyncio.sleep(0.05)
    assert await _receive_exactly(stream, 2000, max_bytes=300) == b"".join(
        bytes([i]) * 100 for i in range(20)
    )
    await stream.aclose()
    writer.close()


async def test_a_reader_that_falls_behind_loses_nothing(server: _Server) -> None:
    """Past the high-water mark reading pauses (the kernel holds the rest), and resumes."""
    stream, _reader, writer = await _connect(server)
    payload = bytes(range(256)) * 8 * 1024  # 2 MiB, far beyond the 256 KiB mark
    writer.write(payload)
    drained = asyncio.ensure_future(writer.drain())
    await asyncio.sleep(0.2)  # the client reads nothing meanwhile
    assert stream._protocol.reading_paused
    assert await _receive_exactly(stream, len(payload)) == payload
    await asyncio.wait_for(drained, 5)
    assert not stream._protocol.reading_paused
    await stream.aclose()
    writer.close()


async def test_send_waits_while_the_peer_does_not_read_then_completes(server: _Server) -> None:
    stream, reader, writer = await _connect(server)
    block = b"y" * (1024 * 1024)
    sending = asyncio.ensure_future(_send_many(stream, block, 16))
    await asyncio.sleep(0.2)
    assert not sending.done(), "16 MiB cannot all fit the kernel's buffers of an idle peer"
    received = await asyncio.wait_for(reader.readexactly(16 * len(block)), 20)
    await asyncio.wait_for(sending, 5)
    assert received == block * 16
    await stream.aclose()
    writer.close()


async def test_a_second_writer_while_one_waits_is_refused(server: _Server) -> None:
    """One writer at a time: a second one would take the first one's wake-up, which then
    waited forever (the client's flusher did, after an MQTT 5 goodbye raced it)."""
    stream, reader, writer = await _connect(server)
    block = b"z" * (1024 * 1024)
    sending = asyncio.ensure_future(_send_many(stream, block, 16))
    await asyncio.sleep(0.2)
    assert not sending.done()
    with pytest.raises(anyio.BusyResourceError), anyio.fail_after(5):
        await stream.send(b"second")
    received = await asyncio.wait_for(reader.readexactly(16 * len(block)), 20)
    await asyncio.wait_for(sending, 5)  # the first writer was woken and finished
    assert received == block * 16
    await stream.send(b"after")  # and the stream takes writes again
    assert await asyncio.wait_for(reader.readexactly(5), 5) == b"after"
    await stream.aclose()
    writer.close()


async def test_aclose_from_another_task_fails_a_waiting_send(server: _Server) -> None:
    """The close discards what the send was waiting to write: the send must not return as
    if the bytes had gone (anyio's own stream raises ClosedResourceError too)."""
    stream, _reader, writer = await _connect(server)
    sending = asyncio.ensure_future(stream.send(b"z" * (16 * 1024 * 1024)))
    await until(lambda: stream._protocol.writing_paused, 5, "the send to wait")
    assert not sending.done()
    await stream.aclose()
    with pytest.raises(anyio.ClosedResourceError):
        await asyncio.wait_for(sending, 5)
    writer.close()


async def _send_many(stream: TcpStream, block: bytes, times: int) -> None:
    for _ in range(times):
        await stream.send(block)


async def test_end_of_stream_close_and_broken_connection(server: _Server) -> None:
    stream, _reader, writer = await _connect(server)
    writer.write(b"last")
    writer.close()
    assert await _receive_exactly(stream, 4) == b"last"
    with pytest.raises(anyio.EndOfStream), anyio.fail_after(5):
        await stream.receive()
    with pytest.raises(anyio.BrokenResourceError), anyio.fail_after(5):
        for _ in range(100):  # the peer is gone: a write fails once the transport knows it
            await stream.send(b"x" * 1000)
            await asyncio.sleep(0.01)
    await stream.aclose()
    with pytest.raises(anyio.ClosedResourceError):
        await stream.receive()
    with pytest.raises(anyio.ClosedResourceError):
        await stream.send(b"x")


async def test_aclose_wakes_a_waiting_receive(server: _Server) -> None:
    stream, _reader, writer = await _connect(server)
    receiving = asyncio.ensure_future(stream.receive())
    await asyncio.sleep(0.05)
    await stream.aclose()
    with pytest.raises(anyio.ClosedResourceError):
        await asyncio.wait_for(receiving, 5)
    writer.close()
