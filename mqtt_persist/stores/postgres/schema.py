"""The PostgresStore schema: its tables, its format version, and upgrades of older versions.

Everything lives in one PostgreSQL schema (``mqtt_persist`` unless the store is given another
name), created by the store itself on first use::

    store_format(version)                       one row: the format version of the schema (2)
    leases(client_id, token, owner, expires_at)  the ownership lease of each session: fencing
                                                 token, owner JSON, expiry in SERVER time
    fencing_tokens                               a sequence: every new owner's token
    sessions(client_id, created_at, last_access, ttl NULL = never, last_seq,
             protocol_version NULL = not yet)
    messages(client_id, seq, topic, payload, qos, retain, packet_id NULL = queued, released,
             properties ('' = none), expires_at NULL = never)         PRIMARY KEY (client_id, seq)
        messages_inflight ON messages (client_id, seq) WHERE packet_id IS NOT NULL
    inbound(client_id, packet_id), pending_unsubscribes(client_id, filter),
    subscriptions(client_id, filter, qos, confirmed, options, subscription_id NULL = none),
    set_aside(client_id, seq, topic, payload, qos, retain, properties, expires_at, reason,
              set_aside_at)
    quarantine(qid, quarantined_at, reason, <the sessions row>) and quarantine_messages,
    quarantine_inbound, quarantine_subscriptions, quarantine_pending_unsubscribes,
    quarantine_set_aside (qid, <row>)
    check_owner(client_id, token)                the fencing check every write runs first

Client ids, topics, filters and reasons are ``bytea`` holding UTF-8: PostgreSQL's ``text``
cannot hold NUL, which a Python string (and so a stored value) may contain. Every table is
keyed by the client id itself, so a batch needs no id lookup before its statements. Columns
besides the keys carry no NOT NULL or range constraints on purpose: values are checked when
read (``rows``), where a bad one is reported as corruption and quarantined instead of failing
a write.

``check_owner`` raises SQLSTATE ``MQF01`` (fenced: the token is not the session's current one,
or the lease lapsed)
or ``MQL01`` (locked: a writer without a lease while another owner's lease is live); it takes
the lease row ``FOR SHARE``, so a takeover (an UPDATE of that row) waits for the transaction of
a write that passed the check, and a write after the takeover sees the new token.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from psycopg import AsyncConnection, sql

from mqtt_persist.errors import StoreError, UnsupportedFormatVersion

__all__ = [
    "FENCED",
    "FORMAT_VERSION",
    "LOCKED",
    "MIGRATIONS",
    "prepare_schema",
    "schema_statements",
]

logger = logging.getLogger(__name__)

#: The format version this module writes (``store_format.version``).
FORMAT_VERSION = 2
#: SQLSTATE of ``check_owner``'s refusal of a former owner (its token is no longer current).
FENCED = "MQF01"
#: SQLSTATE of ``check_owner``'s refusal of a writer without a lease while another owner's
#: lease is live.
LOCKED = "MQL01"

_MESSAGE_COLUMNS = """
        topic      bytea,
        payload    bytea,
        qos        smallint,
        retain     boolean,
"""

#: The tables and functions of format version 2, ``{s}`` standing for the schema's name.
_SCHEMA = (
    "CREATE TABLE {s}.store_format (version integer NOT NULL)",
    "CREATE SEQUENCE {s}.fencing_tokens",
    """
    CREATE TABLE {s}.leases (
        client_id  bytea PRIMARY KEY,
        token      bigint NOT NULL,
        owner      text NOT NULL,
        expires_at timestamptz NOT NULL
    )
    """,
    """
    CREATE TABLE {s}.sessions (
        client_id   bytea PRIMARY KEY,
        created_at  double precision,
        last_access double precision,
        ttl         double precision,
        last_seq    bigint,
        protocol_version smallint
    )
    """,
    """
    CREATE TABLE {s}.messages (
        client_id  bytea NOT NULL,
        seq        bigint NOT NULL,"""
    + _MESSAGE_COLUMNS
    + """
        packet_id  integer,
        released   boolean,
        properties bytea,
        expires_at double precision,
        PRIMARY KEY (client_id, seq)
    )
    """,
    "CREATE INDEX messages_inflight ON {s}.messages (client_id, seq) WHERE packet_id IS NOT NULL",
    """
    CREATE TABLE {s}.inbound (
        client_id bytea NOT NULL, packet_id integer NOT NULL, PRIMARY KEY (client_id, packet_id)
    )
    """,
    """
    CREATE TABLE {s}.subscriptions (
        client_id bytea NOT NULL, filter bytea NOT NULL, qos smallint, confirmed boolean,
        options smallint, subscription_id integer, PRIMARY KEY (client_id, filter)
    )
    """,
    """
    CREATE TABLE {s}.pending_unsubscribes (
        client_id bytea NOT NULL, filter bytea NOT NULL, PRIMARY KEY (client_id, filter)
    )
    """,
    """
    CREATE TABLE {s}.set_aside (
        client_id  bytea NOT NULL,
        seq        bigint NOT NULL,"""
    + _MESSAGE_COLUMNS
    + """
        properties bytea,
        expires_at double precision,
        reason     bytea,
        set_aside_at double precision,
        PRIMARY KEY (client_id, seq)
    )
    """,
    """
    CREATE TABLE {s}.quarantine (
        qid bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        quarantined_at text NOT NULL,
        reason text NOT NULL,
        client_id bytea, created_at double precision, last_access double precision,
        ttl double precision, last_seq bigint, protocol_version smallint
    )
    """,
    """
    CREATE TABLE {s}.quarantine_messages (
        qid bigint NOT NULL, seq bigint, topic bytea, payload bytea, qos smallint,
        retain boolean, packet_id integer, released boolean, properties bytea,
        expires_at double precision
    )
    """,
    "CREATE TABLE {s}.quarantine_inbound (qid bigint NOT NULL, packet_id integer)",
    """
    CREATE TABLE {s}.quarantine_subscriptions (
        qid bigint NOT NULL, filter bytea, qos smallint, confirmed boolean, options smallint,
        subscription_id integer
    )
    """,
    "CREATE TABLE {s}.quarantine_pending_unsubscribes (qid bigint NOT NULL, filter bytea)",
    """
    CREATE TABLE {s}.quarantine_set_aside (
        qid bigint NOT NULL, seq bigint, topic bytea, payload bytea, qos smallint,
        retain boolean, properties bytea, expires_at double precision, reason bytea,
        set_aside_at double precision
    )
    """,
    # The fencing check, first in every writing transaction (see the module documentation).
    # A NULL token: the caller holds no lease, and may write only while nobody's lease is live.
    """
    CREATE FUNCTION {s}.check_owner(p_client_id bytea, p_token bigint) RETURNS void
    LANGUAGE plpgsql AS $$
    DECLARE
        lease record;
    BEGIN
        SELECT token, owner, expires_at > clock_timestamp() AS live INTO lease
        FROM {s}.leases WHERE client_id = p_client_id FOR SHARE;
        IF p_token IS NULL THEN
            IF FOUND AND lease.live THEN
                RAISE EXCEPTION USING ERRCODE = 'MQL01', MESSAGE = 'locked',
                    DETAIL = lease.owner;
            END IF;
        ELSIF NOT FOUND OR lease.token <> p_token OR NOT lease.live THEN
            RAISE EXCEPTION USING ERRCODE = 'MQF01', MESSAGE = 'fenced',
                DETAIL = coalesce(lease.owner, ''), HINT = coalesce(lease.token::text, '');
        END IF;
    END
    $$
    """,
)


def schema_statements(schema: str) -> list[sql.Composed]:
    """The DDL of the current format under ``schema`` (quoted as an identifier)."""
    name = sql.Identifier(schema)
    return [sql.SQL(statement).format(s=name) for statement in _SCHEMA]


#: Upgrades of the schema, keyed by the version they upgrade FROM: each gets the connection
#: inside the upgrade's transaction (which holds the schema's advisory lock) and the schema's
#: name, and brings the schema one version up (the caller then records the version). Format 2
#: is the first this store ever wrote, so there are none yet; the next format bump adds one.
MIGRATIONS: dict[int, Callable[[AsyncConnection[Any], str], Awaitable[None]]] = {}


async def prepare_schema(conn: AsyncConnection[Any], schema: str) -> bool:
    """Create the schema, or check (and upgrade) its format version; True if it was created.

    Runs in one transaction holding a transaction-level advisory lock on the schema's name, so
    processes opening a new database at once create it once. Raises
    :class:`~mqtt_persist.errors.UnsupportedFormatVersion` for a newer format (left in place)
    and :class:`~mqtt_persist.errors.StoreError` for a schema of tables that are not ours.
    """
    name = sql.Identifier(schema)
    async with conn.transaction():
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended(%s, 7461))", ("mqtt_persist:" + schema,)
        )
        cursor = await conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE c.relname = 'store_format') "
            "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relkind IN ('r', 'p', 'v', 'm', 'f')",
            (schema,),
        )
        row = await cursor.fetchone()
        assert row is not None
        tables, format_tables = row
        if tables == 0:
            # One round trip: the statements as one script (no parameters in any of them).
            script = sql.SQL("; ").join(
                [
                    sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(name),
                    *schema_statements(schema),
                    sql.SQL("INSERT INTO {}.store_format (version) VALUES ({})").format(
                        name, sql.Literal(FORMAT_VERSION)
                    ),
                ]
            )
            await conn.execute(script)
            logger.info("created schema %r (format version %d)", schema, FORMAT_VERSION)
            return True
        if format_tables == 0:
            raise StoreError(
                f"schema {schema!r} holds tables that are not a PostgresStore's (no "
                "store_format table); use another schema"
            )
        cursor = await conn.execute(sql.SQL("SELECT version FROM {}.store_format").format(name))
        versions = [v for (v,) in await cursor.fetchall()]
        if len(versions) != 1 or type(versions[0]) is not int:
            raise StoreError(f"schema {schema!r}: store_format holds {versions!r}, not a version")
        version = versions[0]
        if version > FORMAT_VERSION:
            raise UnsupportedFormatVersion(
                f"schema {schema!r} was written in format version {version}, newer than this "
                f"library's {FORMAT_VERSION}; left in place",
                location=f"schema {schema}",
            )
        while version < FORMAT_VERSION:
            migration = MIGRATIONS.get(version)
            if migration is None:
                raise StoreError(
                    f"schema {schema!r} is in format version {version}, which this library "
                    "cannot upgrade"
                )
            await migration(conn, schema)
            version += 1
            await conn.execute(
                sql.SQL("UPDATE {}.store_format SET version = %s").format(name), (version,)
            )
            logger.info("schema %r upgraded to format version %d", schema, version)
        return False
