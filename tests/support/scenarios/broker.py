"""The broker fails under a client with messages in flight: killed, or restarted without memory.

Both scenarios make "in flight at the moment of the fault" a fact rather than a race: the MQTT
proxy drops the broker's final acknowledgements (PUBACK, PUBCOMP) and, where the scenario needs
messages the broker never saw, the client's PUBLISH of chosen messages; the scenario waits until
the broker demonstrably has what it should (the outside subscriber got it, the proxy dropped
exactly the acknowledgements it should) before the fault.

:func:`run_broker_lost_session`: a broker *without* persistence restarts. It forgets the session,
so messages it never acknowledged are published again as new messages, and QoS 2 messages that had
got PUBREC end ``IN_DOUBT`` (only the broker knew whether it forwarded them; here the subscriber
shows that it had).

:func:`run_broker_killed`: a broker *with* persistence is SIGKILLed after its autosave caught up
and restarted from its database. It keeps the session: the client resumes (QoS 1 resent, QoS 2
resumed with PUBREL), and messages the client wrote that never reached it (held in the proxy)
are sent again.
"""

from __future__ import annotations

import asyncio
import time

from mqtt_persist import Backoff, Delivery, DeliveryOutcome, PersistentClient, SessionStore
from tests.support.broker import MosquittoBroker
from tests.support.observer import PahoObserver
from tests.support.proxy import FaultProxy
from tests.support.tally import FaultFigures, qos_of, tally, topic_of
from tests.support.waiting import until
from tests.support.wire import PUBLISH, PUBREL, WirePacket

__all__ = ["run_broker_killed", "run_broker_lost_session"]

_FAST = Backoff(initial=0.05, maximum=0.3, minimum=0.01)


def _numbers(start: int, qos: int, count: int) -> list[int]:
    """``count`` message numbers from ``start`` on whose QoS is ``qos``."""
    first = start if qos_of(start) == qos else start + 1
    return list(range(first, first + 2 * count, 2))


async def run_broker_lost_session(
    broker: MosquittoBroker,
    store: SessionStore,
    *,
    store_name: str,
    qos1_at_broker: int = 6,
    qos1_unsent: int = 3,
    qos2_released: int = 6,
    qos2_unsent: int = 4,
    prefix: str = "lost",
    timeout: float = 60.0,
) -> FaultFigures:
    """Restart a non-persistent ``broker`` with these messages in flight; see the module.

    ``qos1_at_broker`` QoS 1 messages reached the broker (its PUBACK is dropped);
    ``qos2_released`` QoS 2 messages got PUBREC and the client's PUBREL reached the broker (its
    PUBCOMP is dropped); ``qos1_unsent``/``qos2_unsent`` messages' PUBLISH never reached it.
    All of them together must fit the client's in-flight window, which over MQTT 5 is the
    broker's Receive Maximum (mosquitto: 20), and the QoS 2 ones its QoS 2 share (19).
    """
    if broker.persistence:
        raise ValueError("run_broker_lost_session needs a broker without persistence")
    figures = FaultFigures("broker restart, persistence off", store_name)
    started = time.monotonic()
    a = _numbers(0, 1, qos1_at_broker)
    b = _numbers(0, 2, qos2_released)
    c = _numbers(2 * qos2_released + 1, 2, qos2_unsent)
    d = _numbers(2 * qos1_at_broker, 1, qos1_unsent)
    unsent = {str(n).encode() for n in c + d}
    everything = sorted(a + b + c + d)
    async with (
        FaultProxy(broker.host, broker.port, mqtt=True) as proxy,
        PahoObserver(broker.host, broker.port, f"{prefix}/#", qos=2) as observer,
        PersistentClient(
            proxy.host, proxy.port, client_id=f"{prefix}-client", store=store, backoff=_FAST,
        ) as client,
    ):  # fmt: skip
        await asyncio.wait_for(client.wait_connected(), timeout)
        pubacks = proxy.drop_packets("down", "PUBACK")
        pubcomps = proxy.drop_packets("down", "PUBCOMP")
        publishes = proxy.drop_packets("up", "PUBLISH", match=lambda p: p.payload in unsent)
        deliveries: dict[int, Delivery] = {}
        for n in everything:
            deliveries[n] = await client.publish(topic_of(prefix, n), str(n), qos=qos_of(n))
        # In flight, for certain: the broker delivered a and b (b on our PUBREL), and exactly
        # these acknowledgements and PUBLISH packets were lost on the way.
        await until(
            lambda: pubacks.hits == len(a) and pubcomps.hits == len(b)
            and publishes.hits == len(c) + len(d),
            timeout, "the broker's acknowledgements dropped",
        )  # fmt: skip
        assert await observer.await_numbers(set(a + b), timeout), "the broker never got a and b"
        assert _count(proxy.packets, PUBREL) == len(b)
        assert all(not deliveries[n].done() for n in everything)
        # The fault: the broker restarts without its sessions. The client is kept out until
        # the observer has subscribed again, so that it cannot miss the re-published messages.
        proxy.refuse(True)
        subacks = observer.subacks
        broker.restart()
        proxy.clear_rules()
        proxy.cut()
        assert await observer.await_until(lambda: observer.subacks > subacks, timeout)
        proxy.refuse(False)
        outcomes = await asyncio.wait_for(
            asyncio.gather(*(deliveries[n] for n in everything)), timeout
        )
        by_number = dict(zip(everything, outcomes, strict=True))
        await observer.await_numbers(set(everything), timeout)
        await client.drain(timeout=timeout)
        stats = client.stats
    tally(figures, everything, ((m.topic, m.payload) for m in observer.messages))
    figures.faults = 1
    figures.in_doubt = stats.in_doubt
    figures.requeued = stats.requeued
    figures.seconds = time.monotonic() - started
    figures.notes.update(
        in_doubt_deliveries=sorted(
            n for n, o in by_number.items() if o is DeliveryOutcome.IN_DOUBT
        ),
        acknowledged=sorted(n for n, o in by_number.items() if o is DeliveryOutcome.ACKNOWLEDGED),
        qos2_released=b,
        republished=sorted(a + c + d),
        unsent=sorted(c + d),
        arrivals={n: _arrivals(observer, n) for n in everything},
    )
    return figures


async def run_broker_killed(
    broker: MosquittoBroker,
    store: SessionStore,
    *,
    store_name: str,
    before: int = 20,
    held: int = 16,
    prefix: str = "killed",
    timeout: float = 60.0,
) -> FaultFigures:
    """SIGKILL a persistent ``broker`` with messages in flight both ways; see the module.

    ``before`` messages reach the broker with their final acknowledgements dropped (QoS 1 to be
    resent, QoS 2 to be resumed with PUBREL); then the client's direction is stalled and
    ``held`` more are published (they sit in the proxy). Once the broker's autosave has written
    that state, it is killed and restarted from its database.
    """
    if not broker.persistence:
        raise ValueError("run_broker_killed needs a broker with persistence")
    figures = FaultFigures("broker SIGKILL, persistence on", store_name)
    started = time.monotonic()
    first = list(range(before))
    second = list(range(before, before + held))
    async with (
        FaultProxy(broker.host, broker.port, mqtt=True) as proxy,
        PahoObserver(
            broker.host, broker.port, f"{prefix}/#", qos=2, client_id=f"{prefix}-observer",
            clean_session=False,
        ) as observer,
        PersistentClient(
            proxy.host, proxy.port, client_id=f"{prefix}-client", store=store, backoff=_FAST,
        ) as client,
    ):  # fmt: skip
        await asyncio.wait_for(client.wait_connected(), timeout)
        pubacks = proxy.drop_packets("down", "PUBACK")
        pubcomps = proxy.drop_packets("down", "PUBCOMP")
        deliveries = [
            await client.publish(topic_of(prefix, n), str(n), qos=qos_of(n)) for n in first
        ]
        q1 = sum(1 for n in first if qos_of(n) == 1)
        await until(
            lambda: pubacks.hits == q1 and pubcomps.hits == len(first) - q1, timeout,
            "the broker's acknowledgements dropped",
        )  # fmt: skip
        assert await observer.await_numbers(set(first), timeout)
        proxy.stall(True, "up")
        deliveries += [
            await client.publish(topic_of(prefix, n), str(n), qos=qos_of(n)) for n in second
        ]
        # Let the broker's autosave (every second) write the state it has now, then kill it:
        # what it loses is then nothing it had acknowledged.
        await _autosaved(broker, timeout)
        broker.kill()
        broker.start()
        proxy.clear_rules()
        proxy.stall(False)
        proxy.cut()
        outcomes = await asyncio.wait_for(asyncio.gather(*deliveries), timeout)
        await observer.await_numbers(set(first + second), timeout)
        await client.drain(timeout=timeout)
        stats = client.stats
        resent = [p for p in proxy.packets if p.direction == "up" and p.type == PUBLISH and p.dup]
    tally(figures, first + second, ((m.topic, m.payload) for m in observer.messages))
    figures.faults = 1
    figures.in_doubt, figures.requeued = stats.in_doubt, stats.requeued
    figures.seconds = time.monotonic() - started
    figures.notes.update(
        outcomes=sorted({o.value for o in outcomes}),
        resent_with_dup=len(resent),
        pubrel_after_restart=_count(proxy.packets, PUBREL) - (len(first) - q1),
        connections=stats.connections,
    )
    return figures


async def _autosaved(broker: MosquittoBroker, timeout: float) -> None:
    """Wait until mosquitto wrote its database twice after now (the first may have begun
    before the state we want settled)."""
    db = broker.data_dir / "mosquitto.db"

    def mtime() -> int:
        try:
            return db.stat().st_mtime_ns
        except FileNotFoundError:
            return 0

    for _ in range(2):
        before = mtime()
        await until(lambda before=before: mtime() != before, timeout, "mosquitto's autosave")  # type: ignore[misc]


def _count(packets: list[WirePacket], kind: int, direction: str = "up") -> int:
    return sum(1 for p in packets if p.type == kind and p.direction == direction)


def _arrivals(observer: PahoObserver, n: int) -> int:
    payload = str(n).encode()
    return sum(1 for m in observer.messages if m.payload == payload)
