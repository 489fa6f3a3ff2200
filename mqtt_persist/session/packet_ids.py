"""Packet identifier allocation (MQTT 3.1.1 §2.3.1)."""

from __future__ import annotations

from mqtt_persist.errors import MqttPersistError

MAX_PACKET_ID = 65_535


class PacketIdsExhausted(MqttPersistError):
    """All 65,535 packet IDs are in use; an in-flight window this large is a configuration bug."""


class PacketIdAllocator:
    """Hands out IDs that no open flow uses, rotating through the space.

    Rotating (instead of always taking the lowest free ID) keeps a just-released ID out of use
    for as long as possible, so a late duplicate acknowledgement from the broker cannot be
    mistaken for the acknowledgement of a new flow.
    """

    __slots__ = ("_in_use", "_last")

    def __init__(self, in_use: set[int] | None = None) -> None:
        self._in_use: set[int] = set(in_use or ())
        # Paho Java's restore does the same: continue after the highest ID found in the store.
        self._last = max(self._in_use, default=0)

    def allocate(self) -> int:
        """A free ID, now marked in use."""
        in_use = self._in_use
        if len(in_use) >= MAX_PACKET_ID:
            raise PacketIdsExhausted("all 65535 MQTT packet IDs are in use")
        candidate = self._last
        while True:
            candidate = candidate + 1 if candidate < MAX_PACKET_ID else 1
            if candidate not in in_use:
                break
        in_use.add(candidate)
        self._last = candidate
        return candidate

    def reserve(self, packet_id: int) -> None:
        """Mark an ID restored from the store as in use."""
        self._in_use.add(packet_id)

    def release(self, packet_id: int) -> None:
        """The flow using ``packet_id`` ended. Idempotent."""
        self._in_use.discard(packet_id)

    def in_use(self, packet_id: int) -> bool:
        return packet_id in self._in_use

    def __len__(self) -> int:
        return len(self._in_use)
