"""Where ``pub`` and ``sub`` connect, and with what credentials and TLS settings.

``--host`` takes a host name, or a broker URL: ``mqtt://HOST[:PORT]``, ``mqtts://`` (TLS),
``ws://HOST[:PORT]/PATH`` or ``wss://`` (MQTT over WebSockets; the path defaults to ``/mqtt``
and the port to the URL scheme's 80/443). ``--port`` and ``--tls`` still apply on top.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from mqtt_persist.client.options import ProtocolChoice, TransportChoice
from mqtt_persist.errors import InvalidInput
from mqtt_persist.protocol.packets import ProtocolVersion
from mqtt_persist.tls import tls_context

__all__ = ["PROTOCOLS", "BrokerAddress", "BrokerOptions", "parse_host"]

#: ``--protocol``: what each choice asks the client for.
PROTOCOLS: dict[str, ProtocolChoice] = {
    "auto": "auto",
    "5": ProtocolVersion.V5,
    "3.1.1": ProtocolVersion.V311,
}


#: URL scheme -> (transport, TLS, the scheme's default port).
_SCHEMES: dict[str, tuple[TransportChoice, bool, int]] = {
    "mqtt": ("tcp", False, 1883),
    "mqtts": ("tcp", True, 8883),
    "ws": ("websockets", False, 80),
    "wss": ("websockets", True, 443),
}


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    """What ``--host`` said: a host, or a broker URL's host, port, transport and path."""

    host: str
    port: int | None = None
    transport: TransportChoice = "tcp"
    tls: bool = False
    websocket_path: str = "/mqtt"


def parse_host(value: str) -> BrokerAddress:
    """``--host``: a host name or address, or a broker URL (see the module); InvalidInput
    for a URL with another scheme, no host, or a path on an ``mqtt(s)://`` URL."""
    if "://" not in value:
        return BrokerAddress(value)
    try:
        parts = urlsplit(value)
        host, port = parts.hostname, parts.port
    except ValueError:
        host = None
    scheme = _SCHEMES.get(parts.scheme.lower()) if host else None
    if scheme is None or not host:
        raise InvalidInput(
            f"--host takes a host or mqtt://, mqtts://, ws://, wss://HOST[:PORT], not {value!r}"
        )
    transport, tls, default_port = scheme
    path = parts.path or "/mqtt"
    if parts.query:
        path += "?" + parts.query
    if transport == "tcp" and parts.path not in ("", "/"):
        raise InvalidInput(f"an {parts.scheme}:// URL has no path: {value!r}")
    return BrokerAddress(host, port or default_port, transport, tls, path)


@dataclass(frozen=True, slots=True)
class BrokerOptions:
    """The broker options of one command line (the password is never printed)."""

    host: str
    port: int | None
    username: str | None
    password: str | None
    tls: bool
    cafile: str | None
    certfile: str | None
    keyfile: str | None
    insecure: bool
    connect_timeout: float
    #: A key of :data:`PROTOCOLS`.
    protocol: str = "auto"
    # --- MQTT over WebSockets (a ws:// or wss:// --host, --ws-header) ---
    transport: TransportChoice = "tcp"
    websocket_path: str = "/mqtt"
    websocket_headers: tuple[tuple[str, str], ...] = ()

    @property
    def uses_tls(self) -> bool:
        """TLS was asked for, or implied by a TLS-only option."""
        return self.tls or bool(self.cafile or self.certfile or self.insecure)

    @property
    def effective_port(self) -> int:
        """The port given, else 8883 with TLS and 1883 without (the IANA ports)."""
        if self.port is not None:
            return self.port
        return 8883 if self.uses_tls else 1883

    @property
    def address(self) -> str:
        """``host:port``, or the ``ws://``/``wss://`` URL, for messages."""
        if self.transport == "websockets":
            scheme = "wss" if self.uses_tls else "ws"
            return f"{scheme}://{self.host}:{self.effective_port}{self.websocket_path}"
        return f"{self.host}:{self.effective_port}"

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context, or None for plain TCP."""
        if not self.uses_tls:
            return None
        keyfile = self.keyfile if self.certfile else None  # --key alone was always ignored
        context = tls_context(self.cafile, certfile=self.certfile, keyfile=keyfile)
        if self.insecure:
            # Explicitly asked for (--insecure): test brokers with self-signed certificates.
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :class:`~mqtt_persist.PersistentClient`."""
        return {
            "hostname": self.host,
            "port": self.effective_port,
            "username": self.username,
            "password": self.password,
            "tls": self.ssl_context(),
            "connect_timeout": self.connect_timeout,
            "protocol": PROTOCOLS[self.protocol],
            "transport": self.transport,
            "websocket_path": self.websocket_path,
            "websocket_headers": self.websocket_headers or None,
        }
