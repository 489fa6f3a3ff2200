"""Opening a byte stream to the broker: TCP, or TLS through an ``ssl.SSLContext``, optionally
carrying MQTT over WebSockets (``ws://``, and ``wss://`` with TLS; :mod:`mqtt_persist.websocket`).

Either way the connection supervisor gets an :class:`anyio.abc.ByteStream` of MQTT bytes.
"""

from __future__ import annotations

import ssl

import anyio
from anyio.abc import ByteStream

from mqtt_persist.tls import tls_failure
from mqtt_persist.websocket import WebSocketSettings, websocket_handshake, websocket_url


async def open_stream(
    hostname: str,
    port: int,
    *,
    tls: ssl.SSLContext | None,
    timeout: float,
    websocket: WebSocketSettings | None = None,
) -> ByteStream:
    """Connect within ``timeout`` seconds; raises OSError or TimeoutError otherwise, and
    :class:`~mqtt_persist.errors.TLSError` for a TLS failure that retrying cannot fix.

    With ``websocket`` the WebSocket upgrade happens within the same ``timeout`` and may raise
    :class:`~mqtt_persist.errors.WebSocketHandshakeFailed`.

    anyio sets TCP_NODELAY on the socket: MQTT acknowledgements are tiny and latency-bound.
    """
    with anyio.fail_after(timeout):
        if tls is None:
            stream: ByteStream = await anyio.connect_tcp(hostname, port)
        else:
            try:
                stream = await anyio.connect_tcp(
                    hostname,
                    port,
                    ssl_context=tls,
                    # The certificate must name the host we were asked to connect to.
                    tls_hostname=hostname,
                    # Brokers often close TLS without close_notify; an ordinary disconnect here.
                    tls_standard_compatible=False,
                )
            except ssl.SSLError as exc:
                where = (
                    f"{hostname}:{port}"
                    if websocket is None
                    else websocket_url(hostname, port, websocket.path, tls=True)
                )
                refused = tls_failure(exc, where)
                if refused is None:
                    raise
                raise refused from exc
        if websocket is None:
            return stream
        try:
            return await websocket_handshake(stream, hostname, port, websocket, tls=tls is not None)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await stream.aclose()
            raise
