"""Redis stops under a RedisStore client mid-stream, and comes back.

The test's own redis-server (``appendonly yes``, ``appendfsync always``: what
mqtt_persist.stores' Redis documentation asks for when Redis itself must not lose data) serves a
client that publishes through the MQTT proxy. The proxy drops the client's PUBLISH of the last
messages before the outage, so some accepted messages certainly exist nowhere but in Redis when
it goes. Then:

* while Redis is down, ``publish()`` must raise a :class:`~mqtt_persist.StoreError`, and so
  must entering a new client on the same Redis;
* after Redis is back (same port, same files), a new client restores the session, re-sends
  what was in flight, publishes more, and every message ever accepted arrives.

With ``appendonly=False`` on the server (the fault matrix's "no AOF" row) the restarted Redis
is empty: the messages that were only in Redis are lost, the documented limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from mqtt_persist import Backoff, MqttPersistError, PersistentClient, StoreError
from tests.support.broker import MosquittoBroker
from tests.support.observer import PahoObserver
from tests.support.proxy import FaultProxy
from tests.support.redis_server import RedisServer
from tests.support.stores import store_from_spec
from tests.support.tally import FaultFigures, qos_of, tally, topic_of
from tests.support.waiting import until

__all__ = ["run_redis_outage"]

_FAST = Backoff(initial=0.05, maximum=0.3, minimum=0.01)
# Short, so that a lease the failed client could not release (Redis was down) is gone soon.
_LEASE_TTL = 3.0


@contextlib.asynccontextmanager
async def _client(proxy: FaultProxy, spec: str, client_id: str) -> AsyncIterator[PersistentClient]:
    store = store_from_spec(spec, lease_ttl=_LEASE_TTL)
    try:
        async with PersistentClient(
            proxy.host, proxy.port, client_id=client_id, store=store, backoff=_FAST
        ) as client:
            yield client
    finally:
        with contextlib.suppress(Exception):
            await store.close()


async def run_redis_outage(
    broker: MosquittoBroker,
    redis: RedisServer,
    *,
    prefix: str = "redis-outage",
    before: int = 100,
    in_flight: int = 20,
    after: int = 100,
    hard: bool = False,
    timeout: float = 60.0,
) -> FaultFigures:
    """Stop (``hard``: SIGKILL) ``redis`` mid-stream and start it again; see the module."""
    figures = FaultFigures("Redis restart" + (" (SIGKILL)" if hard else ""), "redis")
    started = time.monotonic()
    spec = f"redis:{redis.url}#{prefix}-{int(time.time() * 1000)}"
    client_id = f"{prefix}-client"
    accepted: list[int] = []
    errors: list[str] = []
    enter_error: BaseException | None = None
    exit_error: BaseException | None = None
    async with (
        FaultProxy(broker.host, broker.port, mqtt=True) as proxy,
        PahoObserver(broker.host, broker.port, f"{prefix}/#", qos=2) as observer,
    ):
        try:
            async with _client(proxy, spec, client_id) as client:
                await asyncio.wait_for(client.wait_connected(), timeout)
                for n in range(before):
                    await client.publish(topic_of(prefix, n), str(n), qos=qos_of(n))
                    accepted.append(n)
                await client.drain(timeout=timeout)
                # The last ones stay in flight and never reach the broker: only Redis has them.
                lost_on_the_way = proxy.drop_packets("up", "PUBLISH")
                for n in range(before, before + in_flight):
                    await client.publish(topic_of(prefix, n), str(n), qos=qos_of(n))
                    accepted.append(n)
                await until(
                    lambda: lost_on_the_way.hits == in_flight, timeout, "messages in flight"
                )
                if hard:
                    redis.kill()
                else:
                    redis.stop()
                # Down: every publish() fails, with a StoreError.
                for n in range(before + in_flight, before + in_flight + 3):
                    try:
                        await client.publish(topic_of(prefix, n), str(n), qos=qos_of(n))
                    except MqttPersistError as exc:
                        errors.append(f"{type(exc).__name__}: {exc}"[:200])
                        figures.notes.setdefault("typed", True)
                        if not isinstance(exc, StoreError):
                            figures.notes["typed"] = False
                    else:
                        accepted.append(n)  # accepted while Redis is down: it must arrive
                # And a new client cannot even start.
                try:
                    async with _client(proxy, spec, f"{prefix}-other"):
                        pass
                except Exception as exc:
                    enter_error = exc
                proxy.clear_rules()
                redis.start_again()
        except MqttPersistError as exc:  # leaving the failed client
            exit_error = exc
        # Back: a new client restores the session, re-sends what was in flight, goes on.
        async with _client(proxy, spec, client_id) as client:
            figures.notes["restored"] = client.session_status
            await asyncio.wait_for(client.wait_connected(), timeout)
            first = before + in_flight + 3
            for n in range(first, first + after):
                await client.publish(topic_of(prefix, n), str(n), qos=qos_of(n))
                accepted.append(n)
            await client.drain(timeout=timeout)
            stats = client.stats
        await observer.await_numbers(set(accepted), timeout)
    tally(figures, accepted, ((m.topic, m.payload) for m in observer.messages))
    figures.faults = 1
    figures.in_doubt, figures.requeued = stats.in_doubt, stats.requeued
    figures.seconds = time.monotonic() - started
    figures.notes.update(
        publish_errors=errors,
        enter_error=f"{type(enter_error).__name__}: {enter_error}"[:200] if enter_error else None,
        enter_typed=isinstance(enter_error, StoreError),
        exit_error=f"{type(exit_error).__name__}"[:200] if exit_error else None,
    )
    return figures
