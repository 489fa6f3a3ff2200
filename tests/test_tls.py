"""TLS against a real mosquitto TLS listener, with a CA and certificates made by the test.

Verification works (``tls=True`` and ``tls_context``), an unknown CA and a host name mismatch
are refused with a :class:`TLSError` that says why, a refused certificate stops the client
after one attempt instead of a storm of handshakes, and client certificates work.
"""

from __future__ import annotations

import logging
import ssl
import subprocess
from pathlib import Path

import anyio
import pytest
from anyio.streams.tls import TLSStream

from mqtt_persist import (
    Backoff,
    ConnectionLost,
    ConnectionRefused,
    DeliveryOutcome,
    FileStore,
    InvalidInput,
    PersistentClient,
    SessionStore,
    SQLiteStore,
    TLSError,
    tls_context,
)
from mqtt_persist.protocol.packets import Connect, ProtocolVersion
from tests.support.broker import BrokerFactory, MosquittoBroker, free_port
from tests.support.certs import CLIENT_KEY_PASSWORD, listener_config, make_pki
from tests.support.proxy import FaultProxy
from tests.support.waiting import until

FAST = Backoff(initial=0.01, maximum=0.05, minimum=0.01)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


async def _round_trip(client: PersistentClient) -> None:
    await client.subscribe("tls/t", qos=1)
    delivery = await client.publish("tls/t", b"over tls", qos=1)
    with anyio.fail_after(10):
        assert await delivery is DeliveryOutcome.ACKNOWLEDGED
        async for message in client.messages:
            assert message.payload == b"over tls"
            break


async def test_tls_true_verifies_against_the_default_trust_store(
    broker_factory: BrokerFactory, pki: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # tls=True is ssl.create_default_context(): OpenSSL's default trust store, which
    # SSL_CERT_FILE points at the test CA here.
    monkeypatch.setenv("SSL_CERT_FILE", str(pki / "ca.crt"))
    broker = broker_factory(extra_config=listener_config(pki))
    async with PersistentClient(
        broker.host, broker.port, client_id="tls-true", tls=True, backoff=FAST
    ) as client:
        await _round_trip(client)


async def test_tls_context_with_a_private_ca(broker_factory: BrokerFactory, pki: Path) -> None:
    broker = broker_factory(extra_config=listener_config(pki))
    context = tls_context(str(pki / "ca.crt"))
    assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname
    async with PersistentClient(
        broker.host, broker.port, client_id="tls-ca", tls=context, backoff=FAST
    ) as client:
        await _round_trip(client)


async def _refused(broker: MosquittoBroker, tls: ssl.SSLContext | bool) -> tuple[TLSError, int]:
    """Connect through a counting proxy; return the error and how many connections were made."""
    async with (
        FaultProxy(broker.host, broker.port) as proxy,
        PersistentClient(
            proxy.host, proxy.port, client_id="tls-refused", tls=tls, backoff=FAST
        ) as client,
    ):
        with pytest.raises(TLSError) as info, anyio.fail_after(10):
            await client.wait_connected()
        # The client has stopped: with this backoff (10-50 ms) a client that retried would
        # have made dozens of attempts in this second.
        await anyio.sleep(1.0)
        attempts = proxy.total_connections
    return info.value, attempts


async def test_an_unknown_ca_is_refused_once_with_the_reason(
    broker_factory: BrokerFactory, pki: Path
) -> None:
    broker = broker_factory(extra_config=listener_config(pki, "stranger"))
    error, attempts = await _refused(broker, tls_context(str(pki / "ca.crt")))
    assert "certificate did not verify" in str(error)
    assert error.reason == "unable to get local issuer certificate"
    assert error.verify_code == 20  # X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    assert attempts == 1


async def test_tls_true_refuses_a_private_ca_it_was_not_told_about(
    broker_factory: BrokerFactory, pki: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(pki / "other-ca.crt"))
    broker = broker_factory(extra_config=listener_config(pki))
    error, attempts = await _refused(broker, True)
    assert error.verify_code is not None and "did not verify" in str(error)
    assert attempts == 1


async def test_a_host_name_mismatch_is_refused_once_with_the_reason(
    broker_factory: BrokerFactory, pki: Path
) -> None:
    broker = broker_factory(extra_config=listener_config(pki, "wrong"))
    error, attempts = await _refused(broker, tls_context(str(pki / "ca.crt")))
    assert "mismatch" in error.reason and "127.0.0.1" in error.reason, error.reason
    assert attempts == 1


async def test_without_reconnect_entering_raises_the_tls_error(
    broker_factory: BrokerFactory, pki: Path
) -> None:
    broker = broker_factory(extra_config=listener_config(pki, "wrong"))
    client = PersistentClient(
        broker.host, broker.port, client_id="tls-once", reconnect=False,
        tls=tls_context(str(pki / "ca.crt")),
    )  # fmt: skip
    with pytest.raises(TLSError, match="mismatch") as info:
        async with client:
            pass
    assert isinstance(info.value, ConnectionLost)  # what reconnect=False raised before


async def test_a_client_certificate_is_presented_and_required(
    broker_factory: BrokerFactory, pki: Path
) -> None:
    broker = broker_factory(extra_config=listener_config(pki, require_client=True))
    context = tls_context(
        str(pki / "ca.crt"),
        certfile=str(pki / "client.crt"),
        keyfile=str(pki / "client.key"),
        keyfile_password=CLIENT_KEY_PASSWORD,
    )
    async with PersistentClient(
        broker.host, broker.port, client_id="tls-client-cert", tls=context, backoff=FAST
    ) as client:
        await _round_trip(client)
    # Without one, the broker refuses us: a TLSError that says so, after a single attempt.
    error, attempts = await _refused(broker, tls_context(str(pki / "ca.crt")))
    assert "refused the TLS connection" in str(error), error
    assert attempts == 1


def test_tls_option_values() -> None:
    with pytest.raises(InvalidInput, match="tls must be"):
        PersistentClient("h", client_id="c", tls="yes")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="keyfile without certfile"):
        tls_context(keyfile="k.pem")


# --- credentials ---------------------------------------------------------------------------------

PASSWORD = "pw-7c1e0b55-secret"
USERNAME = "device-user-4411"


@pytest.mark.parametrize("kind", ["file", "sqlite"])
async def test_no_credential_reaches_a_store_or_a_log_line(
    broker_factory: BrokerFactory,
    pki: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    kind: str,
) -> None:
    passwords = tmp_path / "passwords"
    subprocess.run(  # noqa: ASYNC221 - a one-off setup step before any client runs
        ["mosquitto_passwd", "-b", "-c", str(passwords), USERNAME, PASSWORD],
        check=True,
        capture_output=True,
    )
    broker = broker_factory(
        extra_config=listener_config(pki, require_client=True)
        + f"allow_anonymous false\npassword_file {passwords}\n"
    )
    context = tls_context(
        str(pki / "ca.crt"),
        certfile=str(pki / "client.crt"),
        keyfile=str(pki / "client.key"),
        keyfile_password=CLIENT_KEY_PASSWORD,
    )
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    caplog.set_level(logging.DEBUG)  # every logger, ours and the libraries'
    errors: list[str] = []

    def store() -> SessionStore:
        return FileStore(store_dir) if kind == "file" else SQLiteStore(store_dir / "s.db")

    async with PersistentClient(
        broker.host, broker.port, client_id="creds-tls", store=store(), tls=context,
        username=USERNAME, password=PASSWORD, backoff=FAST,
    ) as client:  # fmt: skip
        await _round_trip(client)
        await client.publish("tls/t", b"left in flight", qos=2)
    # A refused password, and the reprs a traceback or a debug line could show.
    async with PersistentClient(
        broker.host, broker.port, client_id="creds-bad", store=store(), tls=context,
        username=USERNAME, password=PASSWORD + "-wrong", backoff=FAST,
    ) as client:  # fmt: skip
        with pytest.raises(ConnectionRefused) as info:
            await client.wait_connected(10)
        errors.append(repr(info.value))
        errors.append(repr(vars(client)))
        errors.append(repr(client._options))
        errors.append(repr(client._options.session_config()))
    errors.append(repr(Connect("c", username=USERNAME, password=PASSWORD.encode())))

    key = (pki / "client.key").read_text()
    secrets = [PASSWORD, CLIENT_KEY_PASSWORD, *key.splitlines()[1:-1]]
    seen = caplog.text + "\n".join(errors)
    assert "creds-tls" in caplog.text  # the capture did see the client's DEBUG lines
    for secret in secrets:
        assert secret not in seen, f"a credential in a log line or repr: {secret[:12]}..."
    stored = b"".join(p.read_bytes() for p in store_dir.rglob("*") if p.is_file())
    assert b"creds-tls" in stored  # the store was written
    for secret in [PASSWORD, USERNAME, CLIENT_KEY_PASSWORD, *key.splitlines()[1:-1]]:
        assert secret.encode() not in stored, f"a credential in the store: {secret[:12]}..."


# --- the TLS reader writes too ------------------------------------------------------------------


class _OpenSslServer:
    """``openssl s_server`` on a free port, speaking TLS 1.2: it sends what the test writes to
    its stdin (raw MQTT bytes, say a CONNACK) and renegotiates when told, which no broker
    does on demand. One client connection at a time, as s_server serves them."""

    def __init__(self, pki: Path, directory: Path) -> None:
        self.port = free_port()
        self._log = directory / "s_server.out"
        self._process = subprocess.Popen(
            ["openssl", "s_server", "-accept", f"127.0.0.1:{self.port}", "-tls1_2",
             "-cert", str(pki / "server.crt"), "-key", str(pki / "server.key")],
            stdin=subprocess.PIPE, stdout=self._log.open("wb"), stderr=subprocess.STDOUT,
        )  # fmt: skip

    async def listening(self) -> None:
        await until(lambda: b"ACCEPT" in self._log.read_bytes(), 10, "s_server to listen")

    async def connected(self, count: int, client_id: bytes) -> None:
        """Until the ``count``-th CONNECT arrived: s_server serves that connection now (it
        sends what its stdin gets to the connection it serves when it reads it)."""
        await until(
            lambda: self._log.read_bytes().count(client_id) >= count, 10, f"CONNECT {count}"
        )

    def write(self, data: bytes) -> None:
        assert self._process.stdin is not None
        self._process.stdin.write(data)
        self._process.stdin.flush()

    def close(self) -> None:
        self._process.kill()
        self._process.wait()


def _flusher_waits_for_the_socket(client: PersistentClient) -> bool:
    parts = client._parts
    assert parts is not None
    stream = parts.connection._stream
    if not isinstance(stream, TLSStream):
        return False
    raw = stream.transport_stream
    # anyio's socket stream: a send under way waits for this event while the kernel is full.
    return not raw._protocol.write_event.is_set()  # type: ignore[attr-defined]


async def test_a_renegotiation_while_the_flusher_waits_to_write_ends_only_the_connection(
    pki: Path, tmp_path: Path
) -> None:
    # A TLS 1.2 server's HelloRequest makes the reader write (a ClientHello, from inside
    # receive()) while the flusher's send waits for a server that stopped reading; anyio's
    # socket stream refuses the second writer with BusyResourceError. That error escaped the
    # supervisor and ended the client; it ends only the connection now.
    server = _OpenSslServer(pki, tmp_path)
    try:
        await server.listening()
        async with (
            FaultProxy("127.0.0.1", server.port) as proxy,
            PersistentClient(
                proxy.host, proxy.port, client_id="tls-reneg", backoff=FAST, keepalive=0,
                tls=tls_context(str(pki / "ca.crt")), protocol=ProtocolVersion.V311,
            ) as client,
        ):  # fmt: skip
            with anyio.fail_after(10):
                await server.connected(1, b"tls-reneg")
                server.write(CONNACK)
                await client.wait_connected()
                proxy.stall(True, direction="up")  # the server reads nothing more
                for _ in range(64):  # 16 MB at QoS 0: more than the socket buffers hold
                    await client.publish("bulk", b"x" * (256 << 10))
                await until(lambda: _flusher_waits_for_the_socket(client), 5, "a waiting send")
                server.write(b"r\n")  # s_server: renegotiate
                assert await proxy.wait_total_connections(2, timeout=5), "no reconnect"
                proxy.stall(False)
                await server.connected(2, b"tls-reneg")
                server.write(CONNACK)
                await client.wait_connected()
    finally:
        server.close()


CONNACK = b"\x20\x02\x00\x00"
