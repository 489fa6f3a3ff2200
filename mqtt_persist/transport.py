"""Opening a byte stream to the broker: TCP, or TLS through an ``ssl.SSLContext``."""

from __future__ import annotations

import ssl

import anyio
from anyio.abc import ByteStream

from mqtt_persist.tls import tls_failure


async def open_stream(
    hostname: str, port: int, *, tls: ssl.SSLContext | None, timeout: float
) -> ByteStream:
    """Connect within ``timeout`` seconds; raises OSError or TimeoutError otherwise, and
    :class:`~mqtt_persist.errors.TLSError` for a TLS failure that retrying cannot fix.

    anyio sets TCP_NODELAY on the socket: MQTT acknowledgements are tiny and latency-bound.
    """
    with anyio.fail_after(timeout):
        if tls is None:
            return await anyio.connect_tcp(hostname, port)
        try:
            return await anyio.connect_tcp(
                hostname,
                port,
                ssl_context=tls,
                # The certificate must name the host we were asked to connect to.
                tls_hostname=hostname,
                # Brokers often close TLS without close_notify; an ordinary disconnect here.
                tls_standard_compatible=False,
            )
        except ssl.SSLError as exc:
            refused = tls_failure(exc, hostname, port)
            if refused is None:
                raise
            raise refused from exc
