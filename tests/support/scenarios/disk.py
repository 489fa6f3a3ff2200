"""The store's disk fills up, or turns read-only, under a publishing client.

Both run a FileStore or SQLiteStore on a small tmpfs (:class:`~tests.support.tmpfs.Tmpfs`),
with the broker behind a proxy that can refuse connections, so messages stay in the store:

:func:`run_disk_full`: a few messages go out while online; then the client is offline and the
tmpfs nearly full, and it publishes until ``publish()`` raises. The error must be a
:class:`~mqtt_persist.StoreError`. Then space is freed and a new client on the same store, online,
must deliver every message ``publish()`` had accepted.

:func:`run_read_only`: a client stores messages offline and leaves; the filesystem is remounted
read-only; a new client must fail with a ``StoreError`` (on entering, or on its first
``publish()``), not with a bare OSError; remounted read-write, a last client delivers every
message the first one accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

from mqtt_persist import Backoff, MqttPersistError, PersistentClient, StoreError
from tests.support.broker import MosquittoBroker
from tests.support.observer import PahoObserver
from tests.support.proxy import FaultProxy
from tests.support.stores import make_store
from tests.support.tally import FaultFigures, qos_of, tally, topic_of
from tests.support.tmpfs import Tmpfs

__all__ = ["run_disk_full", "run_read_only"]

_FAST = Backoff(initial=0.05, maximum=0.3, minimum=0.01)


@contextlib.asynccontextmanager
async def _client(
    proxy: FaultProxy, store_dir: Path, kind: str, client_id: str
) -> AsyncIterator[PersistentClient]:
    """A client on a new store object for ``store_dir``, and the store closed afterwards (a
    client does not close a store it was given, and an open database keeps the filesystem
    busy for a remount)."""
    store = make_store(kind, store_dir)
    try:
        async with PersistentClient(
            proxy.host, proxy.port, client_id=client_id, store=store, backoff=_FAST
        ) as client:
            yield client
    finally:
        with contextlib.suppress(Exception):
            await store.close()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


async def run_disk_full(
    broker: MosquittoBroker,
    fs: Tmpfs,
    kind: str,
    *,
    online_first: int = 20,
    leave_free: int = 96 * 1024,
    payload_size: int = 1024,
    limit: int = 5_000,
    prefix: str = "full",
    timeout: float = 60.0,
) -> FaultFigures:
    """Publish until the store's disk is full; see the module docstring."""
    figures = FaultFigures("disk full", kind)
    started = time.monotonic()
    store_dir = fs.path / "store"
    accepted: list[int] = []
    error: BaseException | None = None
    exit_error: BaseException | None = None
    pad = b"x" * payload_size
    client_id = f"{prefix}-client"
    filler: Path | None = None
    async with (
        FaultProxy(broker.host, broker.port) as proxy,
        PahoObserver(broker.host, broker.port, f"{prefix}/#", qos=2) as observer,
    ):
        try:
            async with _client(proxy, store_dir, kind, client_id) as client:
                await asyncio.wait_for(client.wait_connected(), timeout)
                for n in range(online_first):
                    await client.publish(topic_of(prefix, n), _payload(n, pad), qos=qos_of(n))
                    accepted.append(n)
                await client.drain(timeout=timeout)
                # Offline from here: nothing is acknowledged, everything stays in the store.
                proxy.refuse(True)
                proxy.cut()
                filler = fs.fill(leave_free)
                for n in range(online_first, limit):
                    try:
                        await client.publish(topic_of(prefix, n), _payload(n, pad), qos=qos_of(n))
                    except MqttPersistError as exc:
                        error = exc
                        break
                    accepted.append(n)
                if error is not None:
                    # The client stays failed: a later publish() raises the same error.
                    try:
                        await client.publish(topic_of(prefix, 0), b"0", qos=1)
                    except MqttPersistError as exc:
                        figures.notes["later_publish"] = type(exc).__name__
        except MqttPersistError as exc:  # leaving the client after the failure
            exit_error = exc
        # Space again, the broker reachable again: a new client delivers what was accepted.
        if filler is not None:
            filler.unlink()
        proxy.refuse(False)
        async with _client(proxy, store_dir, kind, client_id) as client:
            figures.notes["restored"] = client.session_status
            await asyncio.wait_for(client.wait_connected(), timeout)
            await client.drain(timeout=timeout)
        await observer.await_numbers(set(accepted), timeout)
    tally(figures, accepted, ((m.topic, m.payload.split(b" ")[0]) for m in observer.messages))
    figures.faults = 1 if error is not None else 0
    figures.seconds = time.monotonic() - started
    figures.notes.update(
        error=_describe(error) if error else None,
        typed=isinstance(error, StoreError),
        exit_error=_describe(exit_error) if exit_error else None,
        accepted_offline=len(accepted) - online_first,
    )
    return figures


async def run_read_only(
    broker: MosquittoBroker,
    fs: Tmpfs,
    kind: str,
    *,
    messages: int = 30,
    prefix: str = "ro",
    timeout: float = 60.0,
) -> FaultFigures:
    """Open a store whose filesystem turned read-only; see the module docstring."""
    figures = FaultFigures("read-only store", kind)
    started = time.monotonic()
    store_dir = fs.path / "store"
    client_id = f"{prefix}-client"
    accepted: list[int] = []
    failed_at: str | None = None
    error: BaseException | None = None
    async with (
        FaultProxy(broker.host, broker.port) as proxy,
        PahoObserver(broker.host, broker.port, f"{prefix}/#", qos=2) as observer,
    ):
        proxy.refuse(True)
        async with _client(proxy, store_dir, kind, client_id) as client:
            for n in range(messages):
                await client.publish(topic_of(prefix, n), str(n), qos=qos_of(n))
                accepted.append(n)
        fs.remount(read_only=True)
        try:
            failed_at = "entering"
            async with _client(proxy, store_dir, kind, client_id) as client:
                failed_at = "publish"
                await client.publish(topic_of(prefix, messages), str(messages), qos=1)
                failed_at = None  # accepted on a read-only disk: only possible if not stored
                accepted.append(messages)
        except Exception as exc:
            error = exc
        fs.remount(read_only=False)
        proxy.refuse(False)
        async with _client(proxy, store_dir, kind, client_id) as client:
            figures.notes["restored"] = client.session_status
            await asyncio.wait_for(client.wait_connected(), timeout)
            with contextlib.suppress(TimeoutError):
                await client.drain(timeout=timeout)
        await observer.await_numbers(set(accepted), timeout)
    tally(figures, accepted, ((m.topic, m.payload) for m in observer.messages))
    figures.faults = 1
    figures.seconds = time.monotonic() - started
    figures.notes.update(
        failed_at=failed_at,
        error=_describe(error) if error else None,
        typed=isinstance(error, StoreError),
    )
    return figures


def _payload(n: int, pad: bytes) -> bytes:
    """``"<n> xxx..."``: the number first (what the tally reads), padded to fill the disk."""
    return str(n).encode() + b" " + pad
