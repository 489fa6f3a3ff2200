"""The ``transport`` test dimension: how a client under test reaches its broker.

``route.client_kwargs(target)`` gives the host, port and transport arguments for a client that
should reach ``target`` (a broker or a proxy in front of it): the target itself over ``"tcp"``,
or a :class:`~tests.support.ws_bridge.WsBridge` put in front of it over ``"websockets"`` (one
bridge per target, started on the running loop; the route closes them at teardown).
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal, Protocol

from tests.support.ws_bridge import WsBridge

__all__ = ["Route", "Target"]

TransportName = Literal["tcp", "websockets"]


class Target(Protocol):
    """A broker or proxy: anything with ``host`` and ``port``."""

    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...


class Route:
    """One transport for the clients of one test."""

    def __init__(self, name: TransportName) -> None:
        self.name = name
        self.bridges: dict[tuple[str, int], WsBridge] = {}
        self._starting: list[asyncio.Task[None]] = []

    def bridge(self, target: Target) -> WsBridge:
        """The bridge in front of ``target`` (created on first use; it accepts at once, since
        its socket listens from creation and connections wait in the backlog until it serves)."""
        key = (target.host, target.port)
        if key not in self.bridges:
            bridge = self.bridges[key] = WsBridge(*key)
            self._starting.append(asyncio.get_running_loop().create_task(bridge.start()))
        return self.bridges[key]

    def client_kwargs(self, target: Target) -> dict[str, Any]:
        """``hostname``, ``port`` and (over WebSockets) ``transport`` for a client."""
        if self.name == "tcp":
            return {"hostname": target.host, "port": target.port}
        bridge = self.bridge(target)
        return {"hostname": bridge.host, "port": bridge.port, "transport": "websockets"}

    async def close(self) -> None:
        for task in self._starting:
            await task
        for bridge in self.bridges.values():
            await bridge.close()
