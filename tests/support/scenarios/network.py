"""Network faults through the MQTT-aware proxy during a mixed QoS 1/2 stream, both directions.

The client publishes numbered QoS 1 and QoS 2 messages through a :class:`FaultProxy` while
paho publishes a QoS 2 stream to it; the client has a persistent session (the broker keeps
both directions' flows across the cuts). Faults, in turn:

* ``cut``: every connection aborted at once;
* ``torn``: the connection cut 7 bytes into the next packet (a torn PUBLISH reaches the broker);
* ``client-acks``: the client's next 5 acknowledgements (PUBACK, PUBREC, PUBREL, PUBCOMP) are
  dropped, then the connection is cut (so they must be resent or answered again);
* ``broker-acks``: the same for the broker's acknowledgements;
* ``stall``: the open connection is black-holed (nothing forwarded, nothing closed) until the
  client's keepalive gives up on it and connects again; then the stalled one is cut.

In the short mode a fault is injected after every ``every`` PUBLISH packets the client wrote (a
count, not a clock: the faults land mid-stream however loaded the machine is). In the soak mode
one is injected every ``interval`` seconds for ``duration`` seconds while the client publishes
without pause.

Observed: what the outside subscriber got (lost, QoS 2 duplicates), what the client's
application got of the inbound stream, and the order on the wire per connection (from the
proxy's record of what the client wrote: the subscriber's order is mosquitto's, which may
reorder after reconnects).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence

from mqtt_persist import Backoff, Message, PersistentClient, SessionStore
from tests.support.broker import MosquittoBroker
from tests.support.observer import PahoObserver, paho_publish
from tests.support.proxy import Direction, FaultProxy, PacketRule
from tests.support.tally import FaultFigures, qos_of, tally, topic_of, wire_order_violations
from tests.support.waiting import until
from tests.support.wire import CONNECT, PINGREQ, PUBLISH, WirePacket

__all__ = ["FAULT_KINDS", "run_network_faults"]

FAULT_KINDS = ("cut", "torn", "client-acks", "broker-acks", "stall")
_ACKS = ("PUBACK", "PUBREC", "PUBREL", "PUBCOMP")
_DROPPED_ACKS = 5
_INBOUND_CHUNK = 10
# No connections-a-minute cap: the soak injects hundreds of faults a minute on purpose, some
# (the broker's acknowledgements dropped, a stall) leaving connections that heard nothing,
# which the cap would pace (it guards against a broker refusing us, not measured here).
_FAST = Backoff(initial=0.05, maximum=0.3, minimum=0.01, max_per_minute=0)


class FaultCycle:
    """Injects the next fault of a sequence each time it is told to (from a proxy listener)."""

    def __init__(self, proxy: FaultProxy, first: Sequence[str], then: Sequence[str]) -> None:
        self.proxy = proxy
        self._kinds = itertools.chain(first, itertools.cycle(then))
        self.injected: Counter[str] = Counter()
        self.active = True
        self._stalled: list[int] | None = None
        self._rule: PacketRule | None = None
        self._loop = asyncio.get_running_loop()

    @property
    def stalling(self) -> bool:
        return self._stalled is not None

    def inject(self) -> None:
        """The next fault, now."""
        if not self.active or self.stalling:
            return
        kind = next(self._kinds)
        self.injected[kind] += 1
        proxy = self.proxy
        if kind == "cut":
            proxy.cut()
        elif kind == "torn":
            proxy.drop_after(7, "up")
        elif kind in ("client-acks", "broker-acks"):
            left = [_DROPPED_ACKS]

            def drop_then_cut(_: WirePacket) -> bool:
                left[0] -= 1
                if left[0] == 0:  # the last one dropped: cut, so the flows must resume
                    self._loop.call_soon(proxy.cut)
                return True

            direction: Direction = "up" if kind == "client-acks" else "down"
            self._rule = proxy.drop_packets(
                direction, *_ACKS, match=drop_then_cut, limit=_DROPPED_ACKS
            )
        elif kind == "stall":
            self._stalled = proxy.open_links
            proxy.stall(True, only_open=True)
        else:
            raise ValueError(f"unknown fault {kind!r}")

    def watch(self, packet: WirePacket) -> None:
        """Finish the faults that wait for something (call it for every packet).

        A stall ends once the client connected anew: the black-holed connection is cut. Lost
        acknowledgements end in a cut after the fifth, or when the client pings instead (the
        flows waiting for them went quiet before five were lost).
        """
        stalled = self._stalled
        if stalled is not None and packet.type == CONNECT and packet.link not in stalled:
            self.proxy.cut(stalled)
            self._stalled = None
        rule = self._rule
        if rule is not None and packet.type == PINGREQ and rule.active:
            rule.remove()
            self.proxy.cut()
        if rule is not None and (not rule.active or rule.hits >= _DROPPED_ACKS):
            self._rule = None

    def stop(self) -> None:
        """No more faults; let everything flow and cut once so that dropped flows resume."""
        self.active = False
        self.proxy.clear_rules()
        self.proxy.drop_after(None)
        self.proxy.stall(False)
        self._stalled = None
        self.proxy.cut()


class _InboundPublisher:
    """paho publishing QoS 2 messages ``in-<n>`` to the client from a thread, in chunks.

    Chunk ``k`` waits until ``ready(k)``: the scenario spreads the inbound stream over the
    outbound one (by the client's progress on the wire), so the faults hit both.
    """

    def __init__(
        self, broker: MosquittoBroker, topic: str, total: int | None, ready: Callable[[int], bool]
    ) -> None:
        self.broker, self.topic, self.total, self.ready = broker, topic, total, ready
        self.sent = 0
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for k in itertools.count():
                if self.total is not None and self.sent >= self.total:
                    return
                while not self.ready(k):
                    if self.stop.wait(0.01):
                        return
                n = (
                    _INBOUND_CHUNK
                    if self.total is None
                    else min(_INBOUND_CHUNK, self.total - self.sent)
                )
                payloads = [b"in-%d" % i for i in range(self.sent, self.sent + n)]
                paho_publish(self.broker.host, self.broker.port, self.topic, payloads, qos=2,
                             timeout=120)  # fmt: skip
                self.sent += n
        except BaseException as exc:
            self.error = exc


async def run_network_faults(
    broker: MosquittoBroker,
    store: SessionStore,
    *,
    store_name: str,
    messages: int = 600,
    inbound: int = 100,
    every: int = 60,
    first: Sequence[str] = FAULT_KINDS,
    then: Sequence[str] = ("cut", "torn", "client-acks", "broker-acks"),
    duration: float | None = None,
    interval: float = 0.2,
    prefix: str = "net",
    timeout: float = 120.0,
) -> FaultFigures:
    """Run the stream with faults; see the module docstring. ``duration`` selects soak mode."""
    figures = FaultFigures("network" if duration is None else "network soak", store_name)
    started = time.monotonic()
    accepted: list[int] = []
    received: list[Message] = []
    async with (
        FaultProxy(broker.host, broker.port, mqtt=True) as proxy,
        PahoObserver(broker.host, broker.port, f"{prefix}/#", qos=2) as observer,
        PersistentClient(
            proxy.host, proxy.port, client_id=f"{prefix}-client", store=store, keepalive=1,
            backoff=_FAST, connect_timeout=5, max_queued=2000,
        ) as client,
    ):  # fmt: skip
        arrived = False
        await client.subscribe(f"{prefix}-in/#", qos=2)
        await asyncio.wait_for(client.wait_connected(), timeout)

        async def consume() -> None:
            async for message in client.messages:
                received.append(message)

        consumer = asyncio.create_task(consume())
        cycle = FaultCycle(proxy, first, then)

        published = [0]

        def on_packet(packet: WirePacket) -> None:
            cycle.watch(packet)
            if packet.type == PUBLISH and packet.direction == "up":
                published[0] += 1
                if duration is None and published[0] % every == 0:
                    cycle.inject()

        proxy.on_packet(on_packet)

        def ready(chunk: int) -> bool:
            if duration is not None:  # soak: a chunk every half second
                return time.monotonic() - started >= chunk * 0.5
            return published[0] >= chunk * messages * _INBOUND_CHUNK // max(inbound, 1)

        sender = _InboundPublisher(
            broker, f"{prefix}-in/t", inbound if duration is None else None, ready
        )
        inbound_task = asyncio.create_task(asyncio.to_thread(sender.run))
        ticker = asyncio.create_task(_tick(cycle, interval)) if duration is not None else None
        try:
            i = 0
            while (duration is None and i < messages) or (
                duration is not None and time.monotonic() - started < duration
            ):
                chunk = range(i, i + 50 if duration is not None else min(i + 50, messages))
                await asyncio.gather(
                    *(client.publish(topic_of(prefix, n), str(n), qos=qos_of(n)) for n in chunk)
                )
                accepted.extend(chunk)
                i = chunk.stop
            if duration is not None:
                sender.stop.set()
            await asyncio.wait_for(inbound_task, timeout)
            if sender.error is not None:
                raise sender.error
            # publish() returns once a message is stored, long before it is on the wire: the
            # faults go on until everything arrived, both ways.
            inbound_wanted = {b"in-%d" % n for n in range(sender.sent)}
            arrived = await observer.await_numbers(set(accepted), timeout)
            with contextlib.suppress(TimeoutError):
                await until(lambda: inbound_wanted <= {m.payload for m in received}, timeout)
        finally:
            if ticker is not None:
                ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ticker
            cycle.stop()
        if arrived:
            await client.drain(timeout=timeout)
        stats = client.stats
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer
    tally(figures, accepted, ((m.topic, m.payload) for m in observer.messages))
    inbound_counts = Counter(m.payload for m in received)
    figures.faults = sum(cycle.injected.values())
    figures.in_doubt, figures.requeued = stats.in_doubt, stats.requeued
    figures.seconds = time.monotonic() - started
    figures.notes.update(
        connections=stats.connections,
        injected=dict(cycle.injected),
        wire_order=wire_order_violations(proxy.packets),
        inbound_sent=sender.sent,
        inbound_lost=len(inbound_wanted - inbound_counts.keys()),
        inbound_qos2_duplicates=sum(1 for n in inbound_counts.values() if n > 1),
        inbound_resends_seen=sum(
            1 for p in proxy.packets if p.direction == "down" and p.type == PUBLISH and p.dup
        ),
        duplicates_suppressed=stats.duplicates_suppressed,
        outbound_resends=sum(
            1 for p in proxy.packets if p.direction == "up" and p.type == PUBLISH and p.dup
        ),
    )
    return figures


async def _tick(cycle: FaultCycle, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        cycle.inject()
