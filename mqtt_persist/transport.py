"""Opening a byte stream to the broker: TCP, or TLS through an ``ssl.SSLContext``."""

from __future__ import annotations

import ssl

import anyio
from anyio.abc import ByteStream


async def open_stream(
    hostname: str, port: int, *, tls: ssl.SSLContext | None, timeout: float
) -> ByteStream:
    """Connect within ``timeout`` seconds; raises OSError or TimeoutError otherwise.

    anyio sets TCP_NODELAY on the socket: MQTT acknowledgements are tiny and latency-bound.
    """
    with anyio.fail_after(timeout):
        if tls is None:
            return await anyio.connect_tcp(hostname, port)
        return await anyio.connect_tcp(
            hostname,
            port,
            ssl_context=tls,
            tls_hostname=hostname,
            # Brokers often close TLS without close_notify; that is an ordinary disconnect here.
            tls_standard_compatible=False,
        )
