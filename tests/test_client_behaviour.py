"""Client behaviour beyond the happy path: TLS, credentials, wills, queue limits, a broker that
misbehaves on purpose (scripted), and inbound QoS 2 exactly once across a client restart."""

from __future__ import annotations

import asyncio
import logging
import ssl
import subprocess
from pathlib import Path

import anyio
import pytest

from mqtt_persist import (
    Backoff,
    ConnectionRefused,
    DeliveryOutcome,
    FileStore,
    MemoryStore,
    PersistentClient,
    QueueFull,
    SessionCorrupt,
    StoreError,
    SubscriptionRefused,
    Will,
)
from mqtt_persist.protocol.packets import (
    ConnAck,
    Connect,
    ProtocolVersion,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    SubAck,
    Subscribe,
)
from tests.support.broker import BrokerFactory, MosquittoBroker
from tests.support.certs import make_test_ca
from tests.support.fake_broker import FakeConnection, ScriptedBroker
from tests.support.observer import PahoObserver
from tests.support.proxy import ProxyFactory
from tests.support.waiting import until

FAST = Backoff(initial=0.05, maximum=0.2, minimum=0.01)
V311 = ProtocolVersion.V311


# --- TLS and credentials -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1, made with the openssl CLI."""
    return make_test_ca(tmp_path_factory.mktemp("tls"))


async def test_tls_connection_with_a_verified_server_certificate(
    broker_factory: BrokerFactory, tls_files: dict[str, Path]
) -> None:
    broker = broker_factory(
        extra_config=(
            f"cafile {tls_files['ca.crt']}\ncertfile {tls_files['server.crt']}\n"
            f"keyfile {tls_files['server.key']}\n"
        )
    )
    context = ssl.create_default_context(cafile=str(tls_files["ca.crt"]))
    async with PersistentClient(
        broker.host, broker.port, client_id="tls-1", tls=context, backoff=FAST
    ) as client:
        await client.subscribe("tls/t", qos=1)
        delivery = await client.publish("tls/t", b"secret", qos=1)
        with anyio.fail_after(10):
            assert await delivery is DeliveryOutcome.ACKNOWLEDGED
            async for message in client.messages:
                assert message.payload == b"secret"
                break


async def test_tls_refuses_an_untrusted_certificate(
    broker_factory: BrokerFactory, tls_files: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    broker = broker_factory(
        extra_config=(f"certfile {tls_files['server.crt']}\nkeyfile {tls_files['server.key']}\n")
    )
    caplog.set_level(logging.INFO, logger="mqtt_persist")
    async with PersistentClient(
        broker.host, broker.port, client_id="tls-2", tls=ssl.create_default_context(),
        backoff=FAST,
    ) as client:  # fmt: skip
        await until(lambda: "CERTIFICATE_VERIFY_FAILED" in caplog.text, 10, "a TLS failure log")
        assert not client.is_connected


async def test_username_and_password(broker_factory: BrokerFactory, tmp_path: Path) -> None:
    passwords = tmp_path / "passwords"
    subprocess.run(  # noqa: ASYNC221 - a one-off setup step before any client runs
        ["mosquitto_passwd", "-b", "-c", str(passwords), "device", "s3cret"],
        check=True,
        capture_output=True,
    )
    broker = broker_factory(extra_config=f"allow_anonymous false\npassword_file {passwords}\n")
    async with PersistentClient(
        broker.host, broker.port, client_id="auth-ok", username="device", password="s3cret"
    ) as client:
        await client.wait_connected(10)
    async with PersistentClient(
        broker.host, broker.port, client_id="auth-bad", username="device", password="wrong"
    ) as client:
        with pytest.raises(ConnectionRefused, match=r"not authorized|bad user"):
            await client.wait_connected(10)


async def test_credentials_never_reach_the_store(
    broker_factory: BrokerFactory, tmp_path: Path
) -> None:
    broker = broker_factory()
    store_dir = tmp_path / "s"
    async with PersistentClient(
        broker.host, broker.port, client_id="creds", username="user-xyz",
        password="pass-xyz-123", store=FileStore(store_dir),
    ) as client:  # fmt: skip
        await client.subscribe("c/#", qos=1)
        await client.publish("c/t", b"payload", qos=1)
    for path in store_dir.iterdir():
        data = path.read_bytes()
        assert b"pass-xyz-123" not in data and b"user-xyz" not in data


# --- will --------------------------------------------------------------------------------------


async def test_will_is_published_when_the_connection_dies(
    broker: MosquittoBroker, proxy_factory: ProxyFactory
) -> None:
    proxy = await proxy_factory(broker)
    async with PahoObserver(broker.host, broker.port, "status/#") as observer:
        async with PersistentClient(
            proxy.host, proxy.port, client_id="willing",
            will=Will("status/willing", b"offline", qos=1), backoff=FAST,
        ) as client:  # fmt: skip
            await client.wait_connected(10)
            proxy.cut()
            assert await observer.await_count(1)
        assert observer.messages[0].payload == b"offline"


# --- queue limits: nothing is lost silently --------------------------------------------------


async def test_queue_full_block_waits_for_room(
    broker: MosquittoBroker, proxy_factory: ProxyFactory
) -> None:
    proxy = await proxy_factory(broker)
    proxy.refuse(True)
    async with PersistentClient(
        proxy.host, proxy.port, client_id="blocker", max_queued=3, backoff=FAST
    ) as client:
        for i in range(3):
            await client.publish("q/t", bytes([i]), qos=1)
        blocked = asyncio.ensure_future(client.publish("q/t", b"4th", qos=1))
        await asyncio.sleep(0.3)
        assert not blocked.done()
        proxy.refuse(False)
        with anyio.fail_after(10):
            delivery = await blocked
            assert await delivery is DeliveryOutcome.ACKNOWLEDGED


async def test_queue_full_error_raises_and_drop_oldest_counts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Port 9 on 127.0.0.1 refuses connections: the client stays offline and queues.
    async with PersistentClient(
        "127.0.0.1", 9, client_id="err", max_queued=2, queue_full="error", backoff=FAST
    ) as client:
        await client.publish("q", b"1", qos=1)
        await client.publish("q", b"2", qos=1)
        with pytest.raises(QueueFull):
            await client.publish("q", b"3", qos=1)
    caplog.set_level(logging.WARNING, logger="mqtt_persist")
    store = MemoryStore()
    async with PersistentClient(
        "127.0.0.1", 9, client_id="drop", max_queued=2, queue_full="drop_oldest",
        store=store, backoff=FAST,
    ) as client:  # fmt: skip
        first = await client.publish("q", b"1", qos=1)
        for payload in (b"2", b"3", b"4"):
            await client.publish("q", payload, qos=1)
        with anyio.fail_after(5):
            assert await first is DeliveryOutcome.DROPPED
        assert client.stats.dropped == 2
    assert caplog.text.count("dropped the oldest queued message") == 2
    state = await store.load("drop")
    assert state is not None
    assert [m.payload for m in state.messages.values()] == [b"3", b"4"]


# --- a broker that misbehaves ------------------------------------------------------------------


async def test_malformed_bytes_from_the_broker_end_the_connection_not_the_client(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="mqtt_persist")

    async def script(conn: FakeConnection, index: int) -> None:
        await conn.expect(Connect)
        await conn.send(ConnAck(False, 0))
        if index == 0:
            await conn.send_raw(b"\xf0\x00")  # packet type 15 is reserved in MQTT 3.1.1
            await conn.receive(timeout=5)  # the client must hang up
            return
        await asyncio.sleep(10)

    async with (
        ScriptedBroker(script) as fake,
        # 3.1.1: f0 00 is a reserved packet type there (in MQTT 5 it is an AUTH).
        PersistentClient(
            fake.host, fake.port, client_id="garbled", backoff=FAST, protocol=V311
        ) as client,
    ):
        await until(lambda: fake.connections >= 2, 10, "a reconnect after garbage")
        await client.wait_connected(5)
    assert "reserved" in caplog.text or "malformed" in caplog.text.lower()
    assert not fake.errors


async def test_refused_subscription_raises_and_is_not_kept() -> None:
    async def script(conn: FakeConnection, index: int) -> None:
        await conn.expect(Connect)
        await conn.send(ConnAck(False, 0))
        sub = await conn.expect(Subscribe)
        await conn.send(SubAck(sub.packet_id, [1, 0x80]))
        await asyncio.sleep(10)

    store = MemoryStore()
    async with (
        ScriptedBroker(script) as fake,
        PersistentClient(
            fake.host, fake.port, client_id="refused-sub", store=store, backoff=FAST
        ) as client,
    ):
        request = await client.subscribe([("ok/#", 1), ("denied/#", 1)])
        with pytest.raises(SubscriptionRefused, match="denied/#"), anyio.fail_after(5):
            await request
    state = await store.load("refused-sub")
    assert state is not None and set(state.subscriptions) == {"ok/#"}


async def test_inbound_qos2_resent_after_client_restart_is_not_delivered_twice(
    tmp_path: Path,
) -> None:
    """Inbound QoS 2 is delivered once across a restart: ID stored before PUBREC, resend acked."""
    seen_pubrec = asyncio.Event()
    seen_pubcomp = asyncio.Event()

    async def script(conn: FakeConnection, index: int) -> None:
        await conn.expect(Connect)
        if index == 0:
            await conn.send(ConnAck(False, 0))
            await conn.send(Publish("in/q2", b"once", qos=2, packet_id=42))
            assert await conn.expect(PubRec) == PubRec(42)
            seen_pubrec.set()
            await asyncio.sleep(10)  # the test closes this client; no PUBREL ever comes
        else:
            await conn.send(ConnAck(True, 0))
            await conn.send(Publish("in/q2", b"once", qos=2, dup=True, packet_id=42))
            assert await conn.expect(PubRec) == PubRec(42)
            await conn.send(PubRel(42))
            assert await conn.expect(PubComp) == PubComp(42)
            seen_pubcomp.set()
            await asyncio.sleep(10)

    store_dir = tmp_path / "s"
    async with ScriptedBroker(script) as fake:
        async with PersistentClient(
            fake.host, fake.port, client_id="in-q2", store=FileStore(store_dir), backoff=FAST
        ) as client:
            with anyio.fail_after(5):
                async for message in client.messages:
                    assert message.payload == b"once"
                    break
                await seen_pubrec.wait()
        async with PersistentClient(
            fake.host, fake.port, client_id="in-q2", store=FileStore(store_dir), backoff=FAST
        ) as client:
            with anyio.fail_after(5):
                await seen_pubcomp.wait()
            assert client.stats.duplicates_suppressed == 1
            with anyio.move_on_after(0.3):
                async for message in client.messages:
                    raise AssertionError(f"delivered twice: {message}")
        assert not fake.errors


# --- a queue longer than memory, expiry, corruption (stores issue) -----------------------------


async def test_a_long_offline_queue_lives_in_the_store_and_drains_in_order(
    broker: MosquittoBroker, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    proxy = await proxy_factory(broker)
    proxy.refuse(True)
    store_dir = tmp_path / "s"
    total = 3000
    async with PahoObserver(broker.host, broker.port, "long/#", qos=1) as observer:
        async with PersistentClient(
            proxy.host, proxy.port, client_id="long-queue", store=FileStore(store_dir),
            queue_memory_limit=100, backoff=FAST,
        ) as client:  # fmt: skip
            await asyncio.gather(
                *(client.publish("long/t", str(i).encode(), qos=1) for i in range(total // 2))
            )
        # A restart in the middle: the new client loads only a prefix of the queue.
        async with PersistentClient(
            proxy.host, proxy.port, client_id="long-queue", store=FileStore(store_dir),
            queue_memory_limit=100, backoff=FAST,
        ) as client:  # fmt: skip
            assert client.stats.queued == total // 2
            await asyncio.gather(
                *(
                    client.publish("long/t", str(i).encode(), qos=1)
                    for i in range(total // 2, total)
                )
            )
            assert client._session is not None and client._session.queued_in_memory <= 100
            proxy.refuse(False)
            peak = 0
            with anyio.fail_after(60):
                while not client._session.is_idle:
                    peak = max(peak, client._session.queued_in_memory)
                    await anyio.sleep(0.005)
            assert peak <= 100
        assert await observer.await_count(total, 20)
    assert observer.payloads("long/t") == [str(i).encode() for i in range(total)]


async def test_an_expired_session_is_not_restored(tmp_path: Path) -> None:
    store_dir = tmp_path / "s"
    async with PersistentClient(
        "127.0.0.1", 9, client_id="expiring", store=FileStore(store_dir), session_expiry=0.2
    ) as client:
        await client.publish("x", b"old", qos=1)
        await client.subscribe("old/#", qos=1)
    await asyncio.sleep(0.4)
    async with PersistentClient(
        "127.0.0.1", 9, client_id="expiring", store=FileStore(store_dir)
    ) as client:
        assert client.session_status == "expired"
        assert client.stats.queued == 0


async def test_background_cleanup_removes_expired_sessions(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "s")
    async with PersistentClient(
        "127.0.0.1", 9, client_id="stale", store=store, session_expiry=0.1
    ) as client:
        await client.publish("x", b"1", qos=1)
    await asyncio.sleep(0.2)
    async with PersistentClient(
        "127.0.0.1", 9, client_id="cleaner", store=store, cleanup_interval=0.05
    ):
        infos: list[object] = []
        for _ in range(750):  # up to 15 s, a generous bound: the cleanup runs every 0.05 s
            infos = [i for i in await store.list_sessions() if i.client_id == "stale"]
            if not infos:
                break
            await asyncio.sleep(0.02)
        assert infos == []


async def test_corrupt_session_raises_or_starts_clean(tmp_path: Path) -> None:
    store_dir = tmp_path / "s"
    async with PersistentClient(
        "127.0.0.1", 9, client_id="damaged", store=FileStore(store_dir)
    ) as client:
        await client.publish("x", b"1", qos=1)
        await client.publish("x", b"2", qos=1)
    (journal,) = store_dir.glob("*.journal")
    data = bytearray(journal.read_bytes())
    data[len(data) // 2] ^= 0xFF  # damage in the middle: not a torn tail
    journal.write_bytes(bytes(data))
    with pytest.raises(SessionCorrupt):
        async with PersistentClient(
            "127.0.0.1", 9, client_id="damaged", store=FileStore(store_dir)
        ):
            pass
    quarantined = [p for p in store_dir.iterdir() if ".corrupt-" in p.name]
    assert quarantined, "the damaged journal must be kept aside"
    journal.write_bytes(bytes(data))  # damage it again; quarantine moved the first copy
    async with PersistentClient(
        "127.0.0.1", 9, client_id="damaged", store=FileStore(store_dir), on_corrupt="start_clean"
    ) as client:
        assert client.session_status == "corrupt"
        assert client.stats.queued == 0
    assert len([p for p in store_dir.iterdir() if ".corrupt-" in p.name]) == 2


# --- failures around the commit ----------------------------------------------------------------


class FailingStore(MemoryStore):
    """A durable-looking store whose journal writes fail, as a full or vanished disk would."""

    durable = True

    async def apply(self, client_id: str, ops: object) -> None:  # type: ignore[override]
        raise OSError(28, "No space left on device")


async def test_a_failed_commit_fails_the_publish_calls_waiting_for_it() -> None:
    """Regression: the publish() calls of the batch whose commit failed waited forever."""
    async with PersistentClient(
        "127.0.0.1", 9, client_id="no-space", store=FailingStore(), backoff=FAST
    ) as client:
        with anyio.fail_after(5), pytest.raises(StoreError, match="No space left"):
            await client.publish("x", b"1", qos=1)
        with pytest.raises(StoreError):  # the client stopped: nothing more is accepted
            await client.publish("x", b"2", qos=1)


async def test_graceful_exit_commits_even_after_a_fatal_connection_error() -> None:
    """A message accepted just before a fatal refusal still reaches the store on exit."""
    store = MemoryStore()
    async with PersistentClient("127.0.0.1", 9, client_id="refused-late", store=store) as client:
        await client.publish("x", b"accepted", qos=1)  # MemoryStore: returns before the commit
        client._fail(ConnectionRefused(5, "not authorized"))
    state = await store.load("refused-late")
    assert state is not None
    assert [m.payload for m in state.messages.values()] == [b"accepted"]
