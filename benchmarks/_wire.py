"""A few MQTT 3.1.1 packets built by hand, the fastest publisher the benchmark has, and a
stand-in broker that feeds the observer directly. None of it is a client under test.

They find the ceilings of ``publish_throughput.py``: :func:`blast` encodes every PUBLISH before
it starts, then writes them in large ``sendall`` chunks, so per message it costs next to
nothing, and whatever arrives at the observer is the most that mosquitto and the observer carry
together (the ``broker ceiling`` rows); :class:`StandInBroker` skips mosquitto and writes
pre-encoded PUBLISHes straight to the observer (the ``observer alone`` row). The observer's
probe messages use the same encoders.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time

#: Unacknowledged QoS 1 PUBLISHes :func:`blast` allows: far below the 65,535 packet ids, so an
#: id is never reused while its flow is open, and 10x any client's window, so the broker never
#: waits for it. 1,000 gave mosquitto's steadiest rates (5 runs each under the same load:
#: 34.7-55.8k msg/s; 20,000: 14.7-63.6k, the PUBACKs piling up in the broker; 200: 14.8-45.5k).
BLAST_WINDOW = 1_000
#: PUBLISH packets per ``sendall``.
BLAST_CHUNK = 200
_PUBACK = 0x40


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("!H", len(data)) + data


def encode_connect(client_id: str, keepalive: int = 60) -> bytes:
    """CONNECT, MQTT 3.1.1, clean session, no will, no credentials."""
    body = _string("MQTT") + bytes([4, 0x02]) + struct.pack("!H", keepalive) + _string(client_id)
    return b"\x10" + _remaining_length(len(body)) + body


def encode_publish(topic: str, payload: bytes, qos: int, packet_id: int) -> bytes:
    """PUBLISH at QoS 0 or 1 (``packet_id`` ignored at QoS 0), not retained, not DUP."""
    body = _string(topic) + (struct.pack("!H", packet_id) if qos else b"") + payload
    return bytes([0x30 | (qos << 1)]) + _remaining_length(len(body)) + body


def encode_disconnect() -> bytes:
    return b"\xe0\x00"


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the broker closed the connection")
        data += chunk
    return data


def blast(
    host: str, port: int, topic: str, payloads: list[bytes], qos: int, client_id: str
) -> tuple[float, float]:
    """Publish every payload at QoS 0 or 1 as fast as the socket takes them.

    Returns ``(t_start, t_done)`` in ``time.monotonic()``: before the first PUBLISH, and after
    the last one was written (QoS 0) or acknowledged (QoS 1). Every packet the broker sends on
    this connection after the CONNACK is a 4-byte PUBACK (nothing is subscribed, keepalive is
    far away), which is all the acknowledgement counting relies on.
    """
    if qos not in (0, 1):
        raise ValueError("blast() publishes at QoS 0 or 1")
    packets = [encode_publish(topic, p, qos, i % 65535 + 1) for i, p in enumerate(payloads)]
    n = len(packets)
    with socket.create_connection((host, port), timeout=30.0) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(encode_connect(client_id))
        connack = _recv_exactly(sock, 4)
        if connack[:2] != b"\x20\x02" or connack[3] != 0:
            raise ConnectionError(f"CONNECT refused: {connack.hex()}")
        t_start = time.monotonic()
        if qos == 0:
            for i in range(0, n, BLAST_CHUNK):
                sock.sendall(b"".join(packets[i : i + BLAST_CHUNK]))
        else:
            sent = acked_bytes = 0
            while acked_bytes < 4 * n:
                if sent < n and sent - acked_bytes // 4 < BLAST_WINDOW:
                    sock.sendall(b"".join(packets[sent : sent + BLAST_CHUNK]))
                    sent = min(n, sent + BLAST_CHUNK)
                    if not select.select([sock], [], [], 0)[0]:
                        continue
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("the broker closed the connection")
                if chunk[0] != _PUBACK and acked_bytes % 4 == 0:
                    raise ConnectionError(f"expected PUBACKs, got {chunk[:8].hex()}")
                acked_bytes += len(chunk)
        t_done = time.monotonic()
        sock.sendall(encode_disconnect())
    return t_start, t_done


class StandInBroker:
    """Just enough of a broker to measure the observer alone, without mosquitto in the way.

    It accepts any number of connections: CONNECT is answered with CONNACK, SUBSCRIBE with a
    SUBACK granting QoS 0 (that connection is the observer's), a QoS 0 PUBLISH (the observer's
    probes) is passed on to the observer. :meth:`stream` then writes pre-encoded PUBLISHes to
    the observer as fast as the socket takes them. One thread per connection; ``with`` closes
    everything.
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._listener = socket.create_server((host, 0))
        self.port: int = self._listener.getsockname()[1]
        self._observer: socket.socket | None = None
        self._subscribed = threading.Event()
        self._connections: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self._connections.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            while True:
                first = _recv_exactly(conn, 1)[0]
                length = shift = 0
                while True:
                    digit = _recv_exactly(conn, 1)[0]
                    length |= (digit & 0x7F) << shift
                    shift += 7
                    if not digit & 0x80:
                        break
                body = _recv_exactly(conn, length)
                kind = first >> 4
                if kind == 1:  # CONNECT
                    conn.sendall(b"\x20\x02\x00\x00")
                elif kind == 8:  # SUBSCRIBE: packet id, then filters
                    conn.sendall(b"\x90\x03" + body[:2] + b"\x00")
                    self._observer = conn
                    self._subscribed.set()
                elif kind == 3 and self._observer is not None:  # PUBLISH (QoS 0 probes)
                    self._observer.sendall(bytes([first]) + _remaining_length(length) + body)
                elif kind == 14:  # DISCONNECT
                    return
        except (OSError, ConnectionError):
            return

    def stream(self, packets: bytes, timeout: float = 10.0) -> tuple[float, float]:
        """Write ``packets`` to the observer; (t_start, t_written) in ``time.monotonic()``."""
        if not self._subscribed.wait(timeout) or self._observer is None:
            raise ConnectionError("the observer did not subscribe to the stand-in broker")
        t_start = time.monotonic()
        self._observer.sendall(packets)
        return t_start, time.monotonic()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        for conn in self._connections:
            with contextlib.suppress(OSError):
                conn.close()

    def __enter__(self) -> StandInBroker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
