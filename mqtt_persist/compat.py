"""Per-broker compatibility settings: refuse up front what a known broker would refuse badly.

``PersistentClient(compat="nats")``: nats-server 2.9 closes the connection on a QoS 2 PUBLISH and
on a topic containing ``.`` or a space, without a word (docs/brokers.md). The poison-message
rule copes with that after the fact (three connections, then the message is set aside); with
``compat="nats"`` such a publish raises :class:`~mqtt_persist.errors.UnsupportedByBroker` before
anything is stored, like any other invalid input.
"""

from __future__ import annotations

from typing import Literal

from mqtt_persist.errors import InvalidInput, UnsupportedByBroker

#: The brokers with known rules (None: MQTT's rules only).
Compat = Literal["nats"]

COMPAT_CHOICES: tuple[str, ...] = ("nats",)


def validate_compat(compat: object) -> None:
    """InvalidInput unless ``compat`` is None or a known broker."""
    if compat is not None and compat not in COMPAT_CHOICES:
        raise InvalidInput(f"compat must be None or one of {COMPAT_CHOICES}, not {compat!r}")


def check_publish(compat: Compat | None, topic: str, qos: int) -> None:
    """Raise UnsupportedByBroker if the ``compat`` broker refuses this publish."""
    if compat != "nats":
        return
    if qos == 2:
        raise UnsupportedByBroker(
            "nats-server does not take QoS 2 publishes (it closes the connection); "
            "publish at QoS 1, or use compat=None"
        )
    for char, name in ((".", "a '.'"), (" ", "a space")):
        if char in topic:
            raise UnsupportedByBroker(
                f"nats-server does not take topics with {name} (it closes the connection): "
                f"{topic!r}"
            )
