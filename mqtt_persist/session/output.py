"""What the machine hands the I/O shell: store operations, packets and events, in one batch."""

from __future__ import annotations

from dataclasses import dataclass, field

from mqtt_persist.protocol.packets import Packet
from mqtt_persist.session.events import Event
from mqtt_persist.session.state import Operation


@dataclass(slots=True)
class Outbox:
    """Everything the machine produced since the last :meth:`Session.take`."""

    ops: list[Operation] = field(default_factory=list)
    packets: list[Packet] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    #: The connection the packets belong to; the shell drops them if that connection is gone.
    generation: int = 0


class PendingOutput:
    """What the session's parts produced since the last ``take()``; they all append here.

    The parts keep a reference to this object, never to its lists: ``take()`` hands the lists
    out and puts fresh ones in their place.
    """

    __slots__ = ("events", "ops", "packets")

    def __init__(self) -> None:
        self.ops: list[Operation] = []
        self.packets: list[Packet] = []
        self.events: list[Event] = []
