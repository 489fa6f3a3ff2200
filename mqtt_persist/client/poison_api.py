"""The poison-message API: list, retry and discard messages set aside (``session/poison.py``)."""

from __future__ import annotations

from mqtt_persist.client.base import ClientBase
from mqtt_persist.completion import Delivery
from mqtt_persist.errors import InvalidInput
from mqtt_persist.session.state import SetAsideMessage


class PoisonAPI(ClientBase):
    """Messages set aside as poison (``poison_after``)."""

    def set_aside(self) -> list[SetAsideMessage]:
        """Messages set aside as poison, in publish order (see ``poison_after``).

        Each has the message (``.message``: seq, topic, payload, qos, ...), why it was set
        aside (``.reason``) and when (``.at``, Unix time). They stay in the store, never sent,
        until :meth:`retry_set_aside` or :meth:`discard_set_aside`.
        """
        return self._require_open().session.poison.listing()

    async def retry_set_aside(self, seq: int) -> Delivery:
        """Publish the set-aside message ``seq`` again, as a new message at the end of the
        queue; returns its delivery once stored. InvalidInput if ``seq`` is not set aside."""
        parts = self._require_open()
        aside = parts.session.poison.set_aside.get(seq)
        if aside is None:
            raise InvalidInput(f"no set-aside message with seq {seq}")
        message = aside.message
        new_seq = parts.session.retry_set_aside(seq)
        return await self._track(parts, new_seq, message.topic, message.qos)

    async def discard_set_aside(self, seq: int) -> None:
        """Delete the set-aside message ``seq`` from the store for good (once committed).

        InvalidInput if ``seq`` is not set aside.
        """
        parts = self._require_open()
        try:
            parts.session.poison.take(seq)
        except KeyError:
            raise InvalidInput(f"no set-aside message with seq {seq}") from None
        parts.flusher.wake.set()
        await parts.flusher.committed()
