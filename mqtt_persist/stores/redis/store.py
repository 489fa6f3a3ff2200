"""A session store in Redis, for several gateway processes sharing one set of sessions.

Needs redis-py (``pip install mqtt-persist[redis]``; with ``hiredis`` installed redis-py parses
replies many times faster, which matters for large loads) and a Redis server 6.2 or newer
(tested with 7.0), standalone or primary/replica. Redis Cluster is not supported: a batch
touches a session's keys and the prefix-wide index keys in one script, which Cluster only
allows within one hash slot.

Key layout: ``keys``; the Lua scripts, atomicity and cost: ``scripts`` and ``scripts/*.lua``;
leases: ``lease``; what each journal operation becomes: ``codec.RULES`` and
``scripts/apply.lua``.

Durability
    ``apply`` returns once Redis has executed the script: the batch survives the *client*
    process (``durable`` is True). Whether it survives a crash of Redis itself is the
    server's configuration: use ``appendonly yes`` (``appendfsync always`` for no loss), and
    ``maxmemory-policy noeviction``: an evicting policy silently drops sessions (a warning is
    logged at :meth:`RedisStore.open` when the server says it evicts).

Expiry and last access
    ``meta.last_access`` is written by every ``apply``, ``load``, ``update_ttl`` and ``save``
    (one HSET inside the script that runs anyway, so it is always exact; there is no lazy
    write as in FileStore). Expiry is decided by the store's ``clock``: a session is expired
    once ``clock() >= last_access + ttl``; :meth:`~RedisStore.load` then removes it and raises
    :class:`~mqtt_persist.errors.SessionExpired`. On top of that every session key carries a
    Redis TTL (PEXPIRE, relative to Redis' own time) of ``ttl`` seconds, refreshed by the same
    accesses, so Redis reclaims an abandoned session by itself even when nobody ever calls
    :meth:`~RedisStore.cleanup_expired`. A session Redis expired has no ``meta`` but its id is
    still in ``P:sessions`` (which never expires): ``load`` reports that as ``SessionExpired``
    too and drops the marker. ``P:expiry`` indexes expiry times for ``cleanup_expired``, which
    removes expired sessions (and markers of ones Redis already reclaimed) that no lease holds.
    ``list_sessions`` only lists sessions whose data still exists.

Leases and fencing
    Lease keys with a TTL renewed in the background, and a fencing token per session that
    grows with every new owner (``lease``); a holder on the same host whose process is dead is
    taken over at once, any other once its lease lapsed (or with ``takeover=True``). Every call
    that changes a session (``apply``, ``save``, ``update_ttl``, ``delete``, and ``load``,
    which moves last access and may remove an expired session) checks inside its script that
    its token is the current one (SessionFenced otherwise: a newer owner took over) or, holding
    no lease, that nobody else holds one (SessionLocked). ``exists``, ``list_sessions``
    and ``read_queued`` read without a lease (``read_queued`` still quarantines damage it
    finds, unless another owner holds the session).

Damage
    A value that does not decode, a meta field that is not a number, a key of the wrong type,
    or keys that contradict each other raise :class:`~mqtt_persist.errors.SessionCorrupt`
    naming the key; the session's keys are first RENAMEd to
    ``P:quarantine:<UTC timestamp>:ID:<name>`` and PERSISTed (never deleted, never expiring).
    A session whose ``meta.v`` is newer than :data:`FORMAT_VERSION`, or a prefix whose
    ``P:format`` is newer, raises :class:`~mqtt_persist.errors.UnsupportedFormatVersion` and is
    left in place: in a shared Redis a newer library version may be using it. An older
    ``meta.v`` is upgraded by :data:`MIGRATIONS` the first time the session is used.

Credentials
    Nothing secret is stored (a session holds none). The URL may carry a password: it is never
    logged nor put in an error message (see :attr:`RedisStore.url`).
"""

from __future__ import annotations

import contextlib
import logging
import typing
from collections.abc import Sequence
from operator import attrgetter

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from mqtt_persist.errors import (
    SessionCorrupt,
    SessionExpired,
    StoreError,
)
from mqtt_persist.session.state import Operation, SessionState, StoredMessage
from mqtt_persist.stores._cancellation import keep_cancellation
from mqtt_persist.stores._checks import check_operations, check_queued_limit, check_read_limit
from mqtt_persist.stores._expiry import is_expired, ttl_from
from mqtt_persist.stores.base import SessionInfo
from mqtt_persist.stores.redis.codec import (
    build_state,
    decode_message,
    encode_ops,
    info_from,
    snapshot_args,
    unpack_pairs,
)
from mqtt_persist.stores.redis.core import RedisStoreCore
from mqtt_persist.stores.redis.keys import (
    SEQ_OFFSET,
    Damage,
    id_bytes,
    parse_float,
    seq_key,
    text,
)
from mqtt_persist.stores.redis.scripts import Scripts
from mqtt_persist.stores.redis.server import (
    FORMAT_VERSION,
    check_prefix_format,
    warn_if_evicting,
)

logger = logging.getLogger(__name__)

# Lua's unpack() and one command's argument list stay far below their limits with this.
_CHUNK = 1000
# Queued messages per script when a lease holder loads everything: a few ms of Redis time.
_LOAD_PAGE = 1000

__all__ = ["RedisStore"]


class RedisStore(RedisStoreCore):
    """A :class:`~mqtt_persist.stores.base.SessionStore` in Redis, shared between processes.

    See the module documentation for the key layout and the guarantees. ``url`` is a redis-py
    URL (``redis://[:password@]host:port/db``, ``rediss://`` for TLS, ``unix://``); ``client``
    instead reuses a ``redis.asyncio.Redis`` made with ``decode_responses=False`` (the store
    then never closes it). ``prefix`` namespaces every key, so several deployments can share
    one database (no prefix may be a prefix of another followed by ``:``). ``clock`` returns
    Unix time in seconds and drives last access and expiry. ``lease_ttl`` (seconds) is how long
    a lease outlives an owner that stopped renewing it; leases are renewed every third of it.
    ``takeover=True`` makes :meth:`acquire` take a session over even from a live owner (which
    is fenced: its next write fails).
    """

    #: A committed batch survives the client process (and Redis restarts, given AOF).
    durable = True

    # --- SessionStore ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, check the prefix's format version. Idempotent; other methods call it.

        Raises :class:`~mqtt_persist.errors.UnsupportedFormatVersion` when a newer library
        version has written under this prefix.
        """
        async with self._open_lock:
            if self._client is not None:
                return
            client = self._given_client
            if client is None:
                client = Redis.from_url(self._url, decode_responses=False)
            scripts = Scripts.register(client)
            try:
                with self._errors():
                    await check_prefix_format(scripts, self._layout.key(b"format"), self._prefix)
            except BaseException:
                if self._given_client is None:
                    with contextlib.suppress(Exception):
                        await client.aclose()
                raise
            self._client, self._scripts = client, scripts
            self._leases.scripts = scripts
            await warn_if_evicting(client)

    async def close(self) -> None:
        """Stop renewing, release every lease and disconnect; the sessions stay. Idempotent.

        A lease that cannot be released (Redis unreachable) is logged and left to expire within
        ``lease_ttl``.
        """
        client = self._client
        await self._leases.release_all()
        self._client = self._scripts = self._leases.scripts = None
        if client is not None and self._given_client is None:
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()

    async def acquire(self, client_id: str, *, takeover: bool | None = None) -> None:
        """Take the lease of ``client_id``'s session; renewed in the background until released.

        Raises :class:`~mqtt_persist.errors.SessionLocked`, naming the holder, when another
        owner holds it (unless that owner is a dead process on this host, or ``takeover``
        (default: the store's setting) is true: then the lease is taken over and its owner
        fenced), or when this store already holds it.
        """
        async with self._lock_for(client_id):
            client, scripts = await self._ready()
            await self._leases.acquire(
                client_id,
                client,
                scripts,
                takeover=self._takeover if takeover is None else takeover,
            )

    def fencing_token(self, client_id: str) -> int | None:
        """The fencing token of the lease this store holds on ``client_id`` (None: none)."""
        token = self._leases.token(client_id)
        return int(token) if token else None

    async def release(self, client_id: str) -> None:
        """Give the lease back if this store still holds it (compare-and-delete). Idempotent."""
        async with self._lock_for(client_id):
            await self._leases.release(client_id)

    async def load(self, client_id: str, *, queued_limit: int | None = None) -> SessionState | None:
        """The stored session, or None; an access (moves last access and the Redis TTL).

        With ``queued_limit`` only the lowest that many queued messages are read (a range read,
        no scan); ``queued_not_loaded`` counts the rest. Raises
        :class:`~mqtt_persist.errors.SessionExpired` (removed),
        :class:`~mqtt_persist.errors.SessionCorrupt` (quarantined) and
        :class:`~mqtt_persist.errors.SessionLocked` (another owner holds the lease).
        """
        check_queued_limit(queued_limit)
        async with self._lock_for(client_id):
            # Under our lease nobody else writes the session, and our own writes wait for this
            # lock: a full load may then read the queue in pages, each a short script, rather
            # than in one script that keeps Redis from every other client while it runs.
            paged = queued_limit is None and self._leases.holds(client_id)
            limit = -1 if queued_limit is None else queued_limit
            if paged:
                limit = _LOAD_PAGE
            reply = await self._session_call(client_id, attrgetter("load"), [limit])
            status = reply[0]
            if status == b"none":
                return None
            if status in (b"expired", b"gone"):
                raise SessionExpired(f"session {client_id!r} expired and was removed")
            keys = self._keys(client_id)
            try:
                state = build_state(client_id, keys, reply, full=queued_limit is None and not paged)
            except Damage as damage:
                raise await self._quarantine(client_id, keys, damage.key, damage.reason) from None
            if paged and state.queued_not_loaded:
                await self._load_rest(state)
            return state

    async def _load_rest(self, state: SessionState) -> None:
        """Add the queued messages a paged load left in the store (under our lease)."""
        messages = list(state.messages.values())
        after = max(m.seq for m in messages if m.packet_id is None)
        while page := await self.read_queued(state.client_id, after, _LOAD_PAGE):
            messages += page
            after = page[-1].seq
        messages.sort(key=attrgetter("seq"))
        state.messages = {m.seq: m for m in messages}
        state.queued_not_loaded = 0

    async def read_queued(self, client_id: str, after_seq: int, limit: int) -> list[StoredMessage]:
        """Queued messages with ``seq > after_seq``, ascending, at most ``limit`` (a range read).

        Only reads (no access, no lease check). An unknown session gives [].
        """
        check_read_limit(limit)
        if limit == 0 or after_seq >= SEQ_OFFSET - 1:
            return []
        start = b"-" if after_seq < -SEQ_OFFSET else b"(" + seq_key(after_seq)
        _, scripts = await self._ready()
        keys = self._keys(client_id)
        reply = await self._eval(scripts.read_queued, keys.script, [start, limit])
        try:
            if reply[0] == b"corrupt":
                raise Damage(reply[1], text(reply[2]))
            released = reply[2]
            return [
                decode_message(keys, keys.queue, seq_raw, value, None, released[n] == 0x31)
                for n, (seq_raw, value) in enumerate(unpack_pairs(reply[1]))
            ]
        except Damage as damage:
            raise await self._quarantine(client_id, keys, damage.key, damage.reason) from None

    async def save(self, state: SessionState) -> None:
        """Replace the stored session with this snapshot, atomically (one script).

        Keeps created_at and the TTL; ``last_seq`` never decreases. Damaged stored data is
        quarantined first, then replaced. The snapshot replaces everything, so a state loaded
        with ``queued_limit`` must not be saved while messages were left in the store (they
        would be dropped).
        """
        client_id = state.client_id
        check_operations(state.to_operations())  # refuse what cannot be stored, up front
        tail = snapshot_args(state)
        async with self._lock_for(client_id):
            try:
                await self._session_call(client_id, attrgetter("save"), tail)
            except SessionCorrupt as exc:
                if exc.quarantined_to is None:
                    raise
                # The damaged session was moved aside; the snapshot replaces it anyway.
                await self._session_call(client_id, attrgetter("save"), tail)

    async def apply(self, client_id: str, ops: Sequence[Operation]) -> None:
        """Apply a batch atomically: ONE script (one EVALSHA round trip) whatever its size.

        Creates the session if there is none. An empty batch only counts as an access. Expiry
        is not checked (the caller holds the session). Raises
        :class:`~mqtt_persist.errors.SessionLocked` when another owner holds the lease.
        """
        encoded = check_operations(ops)
        if not ops:
            async with self._lock_for(client_id):
                await self._session_call(client_id, attrgetter("touch"), ())
            return
        top, mask, blob = encode_ops(ops, encoded)
        async with self._lock_for(client_id):
            await self._session_call(client_id, attrgetter("apply"), [top, mask, blob])

    async def delete(self, client_id: str) -> None:
        """Remove the session's keys (quarantined ones stay; an acquired lease stays held).

        Idempotent. Raises :class:`~mqtt_persist.errors.SessionLocked` when another owner holds
        the lease.
        """
        async with self._lock_for(client_id):
            _, scripts = await self._ready()
            keys = self._keys(client_id)
            reply = await self._eval(
                scripts.delete, keys.script, [self._token(client_id), id_bytes(client_id)]
            )
            await self._checked(client_id, keys, reply)

    async def exists(self, client_id: str) -> bool:
        """True when a non-expired session is stored (reads only).

        Damaged data counts as existing: :meth:`load` reports (and quarantines) it.
        """
        client, _ = await self._ready()
        meta = self._keys(client_id).meta
        try:
            with self._errors():
                last_access, ttl = await keep_cancellation(
                    client.hmget(meta, [b"last_access", b"ttl"])
                )
        except StoreError as exc:
            if isinstance(exc.__cause__, ResponseError) and "WRONGTYPE" in str(exc.__cause__):
                return True
            raise
        if last_access is None and ttl is None:
            return False
        try:
            access = parse_float(last_access, meta, "last_access")
            seconds = parse_float(ttl, meta, "ttl")
        except Damage:
            return True
        return not is_expired(access, seconds or None, self._clock())

    async def list_sessions(self) -> list[SessionInfo]:
        """Every stored session (expired ones included until removed), sorted by client id.

        Reads the ``P:sessions`` index, then each session's meta and counts in pipelines.
        Sessions Redis already expired and damaged ones are skipped (the latter logged).
        """
        client, _ = await self._ready()
        with self._errors():
            members = typing.cast(
                set[bytes],
                await keep_cancellation(client.smembers(self._layout.key(b"sessions"))),
            )
        ids = sorted(member.decode("utf-8", "surrogatepass") for member in members)
        infos: list[SessionInfo] = []
        for start in range(0, len(ids), _CHUNK):
            chunk = ids[start : start + _CHUNK]
            with self._errors():
                async with client.pipeline(transaction=False) as pipe:
                    for client_id in chunk:
                        keys = self._keys(client_id)
                        pipe.hmget(keys.meta, [b"created_at", b"last_access", b"ttl"])
                        pipe.hlen(keys.inflight)
                        pipe.zcard(keys.queue)
                        pipe.hlen(keys.aside)
                    results = await keep_cancellation(pipe.execute(raise_on_error=False))
            for n, client_id in enumerate(chunk):
                keys = self._keys(client_id)
                try:
                    info = info_from(client_id, keys, *results[4 * n : 4 * n + 4])
                except Damage as damage:
                    logger.warning(
                        "skipping damaged session %r (%s: %s)",
                        client_id,
                        text(damage.key),
                        damage.reason,
                    )
                    continue
                if info is not None:
                    infos.append(info)
        return infos

    async def update_ttl(self, client_id: str, seconds: float | None) -> None:
        """Expire the session ``seconds`` after its last access (None or 0: never); an access.

        Sets (or, for never, removes) the Redis TTL of every key of the session. Creates an
        empty session when none is stored (an expired one counts as none), so the expiry is in
        force from now on even before the first operation is applied.
        """
        ttl = ttl_from(seconds) or 0.0  # Redis writes "never" as 0
        async with self._lock_for(client_id):
            await self._session_call(client_id, attrgetter("update_ttl"), [repr(ttl).encode()])

    async def cleanup_expired(self) -> int:
        """Remove every expired session no lease holds; returns how many were removed.

        Candidates come from the ``P:expiry`` index (a range read up to now); each is checked
        again and removed by one script, so a session touched meanwhile survives. Sessions
        Redis already reclaimed count too (their index entries are removed).
        """
        client, scripts = await self._ready()
        now = self._clock()
        with self._errors():
            due = typing.cast(
                list[bytes],
                await keep_cancellation(
                    client.zrangebyscore(self._layout.key(b"expiry"), "-inf", repr(float(now)))
                ),
            )
        removed = 0
        for member in due:
            client_id = member.decode("utf-8", "surrogatepass")
            async with self._lock_for(client_id):
                keys = self._keys(client_id)
                removed += await self._eval(
                    scripts.cleanup_one, keys.script, [repr(float(now)), member, FORMAT_VERSION]
                )
        return removed
