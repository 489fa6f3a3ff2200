"""Where ``pub`` and ``sub`` connect, and with what credentials and TLS settings."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any

from mqtt_persist.client.options import ProtocolChoice
from mqtt_persist.protocol.packets import ProtocolVersion
from mqtt_persist.tls import tls_context

__all__ = ["PROTOCOLS", "BrokerOptions"]

#: ``--protocol``: what each choice asks the client for.
PROTOCOLS: dict[str, ProtocolChoice] = {
    "auto": "auto",
    "5": ProtocolVersion.V5,
    "3.1.1": ProtocolVersion.V311,
}


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
        """``host:port``, for messages."""
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
        }
