"""Logging with the client id on every record."""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

#: The library's root logger; applications configure it like any stdlib logger.
LOGGER_NAME = "mqtt_persist"


class ClientLogger(logging.LoggerAdapter[logging.Logger]):
    """Prefixes each message with ``[client_id]`` and sets ``record.client_id``."""

    def __init__(self, logger: logging.Logger, client_id: str) -> None:
        super().__init__(logger, {"client_id": client_id})
        self.client_id = client_id

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        extra = dict(kwargs.get("extra") or {})
        extra.setdefault("client_id", self.client_id)
        kwargs["extra"] = extra
        return f"[{self.client_id}] {msg}", kwargs


def client_logger(client_id: str, name: str = LOGGER_NAME) -> ClientLogger:
    """The logger a client with this id writes to."""
    return ClientLogger(logging.getLogger(name), client_id)
