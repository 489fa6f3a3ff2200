"""Subscriptions: ``subscribe``/``unsubscribe`` and the checks of their arguments."""

from __future__ import annotations

from collections.abc import Sequence

from mqtt_persist.client.base import ClientBase
from mqtt_persist.completion import SubscribeRequest, UnsubscribeRequest
from mqtt_persist.errors import InvalidInput
from mqtt_persist.protocol.packets import MQTT_3_1_1, RetainHandling, SubscriptionOptions
from mqtt_persist.session.state import StoredSubscription
from mqtt_persist.validation import is_shared_subscription, validate_qos, validate_topic_filter


class SubscribeAPI(ClientBase):
    """Subscriptions recorded in the session, sent now or on the next connect."""

    async def subscribe(
        self,
        topic_filter: str | Sequence[tuple[str, int | SubscriptionOptions]],
        qos: int = 0,
        *,
        no_local: bool = False,
        retain_as_published: bool = False,
        retain_handling: int = RetainHandling.SEND_ON_SUBSCRIBE,
        subscription_identifier: int | None = None,
    ) -> SubscribeRequest:
        """Record subscriptions in the session and return a :class:`SubscribeRequest`.

        ``topic_filter`` is one filter (subscribed at ``qos``) or a sequence of ``(filter, qos)``
        pairs. It returns once the subscriptions are stored; they are sent now if connected, else
        on the next connect, and restored whenever the broker has lost them. ``await`` the
        returned request for the QoS the broker granted.

        MQTT 5 options, stored with each subscription and sent again whenever it is restored:
        ``no_local`` (the broker does not send this client its own messages),
        ``retain_as_published`` (forwarded messages keep their RETAIN flag), ``retain_handling`` (a
        :class:`RetainHandling`: retained messages on subscribe, only for a new subscription,
        or never), and ``subscription_identifier`` (1..268,435,455; the broker names it in
        ``message.properties.subscription_identifiers`` of every message the subscription
        matched). The keyword options apply to every filter given with a plain QoS; a pair
        may give a :class:`SubscriptionOptions` of its own. A shared subscription is
        ``$share/<group>/<filter>`` (checked; ``no_local`` is not allowed on it). With
        ``protocol=ProtocolVersion.V311`` the options are refused; over a 3.1.1 connection of
        ``"auto"`` they are not sent (logged once).
        """
        parts = self._require_open()
        defaults = _subscription_options(no_local, retain_as_published, retain_handling)
        subs = _subscriptions(topic_filter, qos, defaults, subscription_identifier)
        if self._options.protocol == MQTT_3_1_1 and any(
            s.options or s.subscription_id for s in subs
        ):
            raise InvalidInput(
                "subscription options and identifiers need MQTT 5, not protocol=V311"
            )
        token = parts.session.subscribe(subs)
        request = SubscribeRequest(list(dict.fromkeys(s.topic_filter for s in subs)))
        parts.dispatcher.requests[token] = request
        await parts.flusher.committed()
        return request

    async def unsubscribe(self, topic_filter: str | Sequence[str]) -> UnsubscribeRequest:
        """Remove subscriptions from the session; ``await`` the result for the UNSUBACK."""
        parts = self._require_open()
        filters = [topic_filter] if isinstance(topic_filter, str) else list(topic_filter)
        if not filters:
            raise InvalidInput("unsubscribe needs at least one topic filter")
        for f in filters:
            validate_topic_filter(f)
        token = parts.session.unsubscribe(filters)
        request = UnsubscribeRequest(list(dict.fromkeys(filters)))
        parts.dispatcher.requests[token] = request
        await parts.flusher.committed()
        return request


MAX_SUBSCRIPTION_IDENTIFIER = 268_435_455


def _subscription_options(
    no_local: object, retain_as_published: object, retain_handling: object
) -> int:
    """The option bits (besides QoS) of the keyword arguments, checked."""
    for name, value in (("no_local", no_local), ("retain_as_published", retain_as_published)):
        if not isinstance(value, bool):
            raise InvalidInput(f"{name} must be a bool, not {value!r}")
    if isinstance(retain_handling, bool) or retain_handling not in (0, 1, 2):
        raise InvalidInput(
            f"retain_handling must be a RetainHandling (0, 1 or 2), not {retain_handling!r}"
        )
    options = SubscriptionOptions(0, bool(no_local), bool(retain_as_published), retain_handling)
    return options.to_byte()


def _subscriptions(
    topic_filter: str | Sequence[tuple[str, int | SubscriptionOptions]],
    qos: int,
    defaults: int,
    subscription_id: int | None,
) -> list[StoredSubscription]:
    if subscription_id is not None and (
        isinstance(subscription_id, bool)
        or not isinstance(subscription_id, int)
        or not 1 <= subscription_id <= MAX_SUBSCRIPTION_IDENTIFIER
    ):
        raise InvalidInput(
            f"subscription_identifier must be in 1..{MAX_SUBSCRIPTION_IDENTIFIER}, "
            f"not {subscription_id!r}"
        )
    entries = [(topic_filter, qos)] if isinstance(topic_filter, str) else list(topic_filter)
    if not entries:
        raise InvalidInput("subscribe needs at least one topic filter")
    subs = []
    for f, q in entries:
        validate_topic_filter(f)
        if isinstance(q, SubscriptionOptions):
            try:
                byte = q.to_byte()
            except ValueError as exc:
                raise InvalidInput(f"subscription options of {f!r}: {exc}") from None
            sub_qos, options = byte & 3, byte & ~3
        else:
            sub_qos, options = validate_qos(q), defaults
        if options & 0x04 and is_shared_subscription(f):
            raise InvalidInput(
                f"no_local is not allowed on the shared subscription {f!r} (MQTT 5 §3.8.3.1)"
            )
        subs.append(StoredSubscription(f, sub_qos, False, options, subscription_id))
    return subs
