"""The SQLiteStore database: its schema, its format version, and upgrades of older versions.

Schema (format version 2, ``PRAGMA user_version``; ``PRAGMA application_id`` = ``MQPS``)::

    sessions(sid INTEGER PRIMARY KEY, client_id TEXT UNIQUE, created_at, last_access,
             ttl NULL = never, last_seq, inflight, queued, protocol_version NULL = not yet)
    messages(sid, seq, topic, payload, qos, retain, packet_id NULL = queued, released,
             properties (x'' = none), expires_at NULL = never,
             PRIMARY KEY (sid, seq)) WITHOUT ROWID
        messages_inflight ON messages(sid, seq) WHERE packet_id IS NOT NULL
    inbound(sid, packet_id), pending_unsubscribes(sid, filter),
    subscriptions(sid, filter, qos, confirmed, options, subscription_id NULL = none),
    set_aside(sid, seq, topic, payload, qos, retain, properties, expires_at, reason,
              set_aside_at)                                 (all WITHOUT ROWID, keyed by sid)
    quarantine(qid, quarantined_at, reason, <the sessions row>) and quarantine_messages,
    quarantine_inbound, quarantine_subscriptions, quarantine_pending_unsubscribes,
    quarantine_set_aside (qid, <row>)

Version 2 added the columns after ``released``, ``queued`` and ``confirmed``, and the
set_aside tables; the migration from version 1 adds them (existing rows get the defaults:
no properties, no expiry, no options, no identifier) and sets ``protocol_version`` 4 for every
session (version 1 spoke MQTT 3.1.1 only), all in the upgrade's transaction.

Messages are clustered by ``(sid, seq)``, so a session's messages are one range of the table:
"the first N queued messages after seq S" is a walk of that range that skips only in-flight
rows, and the partial index makes "the in-flight messages" a range scan of its own. Triggers
keep ``sessions.inflight``/``queued`` (the counts ``load`` and ``list_sessions`` report without
counting rows) and ``sessions.last_seq`` (the highest sequence number ever added, which a
removed message does not lower) in step with every change to ``messages``, whatever statement
made it. Columns other than keys carry no NOT NULL or type constraints on purpose: validation
happens on read (``rows``), where a bad value is reported as corruption instead of failing a
write.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from collections.abc import Callable, Iterator

from mqtt_persist.errors import StoreError, UnsupportedFormatVersion
from mqtt_persist.stores._files import fsync_directory, make_private_directory

__all__ = [
    "APPLICATION_ID",
    "FORMAT_VERSION",
    "MIGRATIONS",
    "DamagedFile",
    "check_format",
    "configure",
    "create_file",
    "is_file_corruption",
    "refuse_foreign",
    "transaction",
]

logger = logging.getLogger(__name__)

#: ``PRAGMA application_id`` of every database this module writes (``b"MQPS"``).
APPLICATION_ID = 0x4D515053
#: The schema version this module writes (``PRAGMA user_version``).
FORMAT_VERSION = 2

_SET_ASIDE = """
    CREATE TABLE set_aside (
        sid          INTEGER NOT NULL,
        seq          INTEGER NOT NULL,
        topic        TEXT,
        payload      BLOB,
        qos          INTEGER,
        retain       INTEGER,
        properties   BLOB,
        expires_at   REAL,
        reason       TEXT,
        set_aside_at REAL,
        PRIMARY KEY (sid, seq)
    ) WITHOUT ROWID
    """
_QUARANTINE_SET_ASIDE = """
    CREATE TABLE quarantine_set_aside (
        qid, seq, topic, payload, qos, retain, properties, expires_at, reason, set_aside_at
    )
    """


def _migrate_schema_1_to_2(conn: sqlite3.Connection) -> None:
    """Columns and tables for MQTT 5 and set-aside messages; every session spoke 3.1.1."""
    for statement in (
        "ALTER TABLE sessions ADD COLUMN protocol_version INTEGER",
        # Version 1 spoke MQTT 3.1.1 (protocol level 4) only.
        "UPDATE sessions SET protocol_version = 4",
        "ALTER TABLE messages ADD COLUMN properties BLOB DEFAULT x''",
        "ALTER TABLE messages ADD COLUMN expires_at REAL",
        "ALTER TABLE subscriptions ADD COLUMN options INTEGER DEFAULT 0",
        "ALTER TABLE subscriptions ADD COLUMN subscription_id INTEGER",
        _SET_ASIDE,
        "ALTER TABLE quarantine ADD COLUMN protocol_version",
        "ALTER TABLE quarantine_messages ADD COLUMN properties",
        "ALTER TABLE quarantine_messages ADD COLUMN expires_at",
        "ALTER TABLE quarantine_subscriptions ADD COLUMN options",
        "ALTER TABLE quarantine_subscriptions ADD COLUMN subscription_id",
        _QUARANTINE_SET_ASIDE,
    ):
        conn.execute(statement)


#: Upgrades of the schema, keyed by the version they upgrade FROM: each gets the connection
#: inside the upgrade's transaction and brings the schema one version up (the caller then sets
#: ``user_version``).
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {1: _migrate_schema_1_to_2}

SCHEMA = (
    """
    CREATE TABLE sessions (
        sid         INTEGER PRIMARY KEY,
        client_id   TEXT NOT NULL UNIQUE,
        created_at  REAL,
        last_access REAL,
        ttl         REAL,
        last_seq    INTEGER DEFAULT 0,
        inflight    INTEGER DEFAULT 0,
        queued      INTEGER DEFAULT 0,
        protocol_version INTEGER
    )
    """,
    """
    CREATE TABLE messages (
        sid       INTEGER NOT NULL,
        seq       INTEGER NOT NULL,
        topic     TEXT,
        payload   BLOB,
        qos       INTEGER,
        retain    INTEGER,
        packet_id INTEGER,
        released  INTEGER,
        properties BLOB DEFAULT x'',
        expires_at REAL,
        PRIMARY KEY (sid, seq)
    ) WITHOUT ROWID
    """,
    "CREATE INDEX messages_inflight ON messages (sid, seq) WHERE packet_id IS NOT NULL",
    """
    CREATE TABLE inbound (
        sid INTEGER NOT NULL, packet_id INTEGER NOT NULL, PRIMARY KEY (sid, packet_id)
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE subscriptions (
        sid INTEGER NOT NULL, filter TEXT NOT NULL, qos INTEGER, confirmed INTEGER,
        options INTEGER DEFAULT 0, subscription_id INTEGER,
        PRIMARY KEY (sid, filter)
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE pending_unsubscribes (
        sid INTEGER NOT NULL, filter TEXT NOT NULL, PRIMARY KEY (sid, filter)
    ) WITHOUT ROWID
    """,
    _SET_ASIDE,
    # Counters and last_seq follow every change to messages, whichever statement made it.
    # last_seq only grows: a removed message does not lower it (SessionState.apply agrees).
    """
    CREATE TRIGGER messages_insert AFTER INSERT ON messages BEGIN
        UPDATE sessions SET
            last_seq = max(last_seq, NEW.seq),
            queued = queued + (NEW.packet_id IS NULL),
            inflight = inflight + (NEW.packet_id IS NOT NULL)
        WHERE sid = NEW.sid;
    END
    """,
    """
    CREATE TRIGGER messages_delete AFTER DELETE ON messages BEGIN
        UPDATE sessions SET
            queued = queued - (OLD.packet_id IS NULL),
            inflight = inflight - (OLD.packet_id IS NOT NULL)
        WHERE sid = OLD.sid;
    END
    """,
    """
    CREATE TRIGGER messages_move AFTER UPDATE OF packet_id ON messages
    WHEN (OLD.packet_id IS NULL) != (NEW.packet_id IS NULL) BEGIN
        UPDATE sessions SET
            queued = queued + (NEW.packet_id IS NULL) - (OLD.packet_id IS NULL),
            inflight = inflight + (NEW.packet_id IS NOT NULL) - (OLD.packet_id IS NOT NULL)
        WHERE sid = NEW.sid;
    END
    """,
    # No declared types: no affinity, so a quarantined value keeps its exact storage class.
    """
    CREATE TABLE quarantine (
        qid INTEGER PRIMARY KEY, quarantined_at, reason, sid, client_id, created_at,
        last_access, ttl, last_seq, inflight, queued, protocol_version
    )
    """,
    """
    CREATE TABLE quarantine_messages (
        qid, seq, topic, payload, qos, retain, packet_id, released, properties, expires_at
    )
    """,
    "CREATE TABLE quarantine_inbound (qid, packet_id)",
    "CREATE TABLE quarantine_subscriptions (qid, filter, qos, confirmed, options, subscription_id)",
    "CREATE TABLE quarantine_pending_unsubscribes (qid, filter)",
    _QUARANTINE_SET_ASIDE,
)

SCHEMA_OBJECTS = frozenset(
    {
        "sessions",
        "messages",
        "messages_inflight",
        "inbound",
        "subscriptions",
        "pending_unsubscribes",
        "set_aside",
        "messages_insert",
        "messages_delete",
        "messages_move",
        "quarantine",
        "quarantine_messages",
        "quarantine_inbound",
        "quarantine_subscriptions",
        "quarantine_pending_unsubscribes",
        "quarantine_set_aside",
    }
)

#: The first bytes of every SQLite database file.
SQLITE_HEADER = b"SQLite format 3\x00"
_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26


class DamagedFile(Exception):
    """The database file as a whole cannot be used (bad schema, unknown old version)."""


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` … ``COMMIT``: the write lock up front, so no deadlock can arise
    between two connections that both read and then write; rolled back on any error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise


def is_file_corruption(exc: sqlite3.DatabaseError) -> bool:
    """True when SQLite says the file itself is damaged (or not a database at all)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    message = str(exc)
    return "file is not a database" in message or "malformed" in message


def refuse_foreign(conn: sqlite3.Connection, path: str) -> None:
    """Raise StoreError for another application's database, without writing to it."""
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    if app_id == APPLICATION_ID:
        return
    if app_id == 0:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == 0 and not conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0]:
            return  # empty: ours to create
    raise StoreError(
        f"{path} is an SQLite database of another application "
        f"(application_id 0x{app_id:08x}); refusing to use it as a session store"
    )


def check_format(conn: sqlite3.Connection, path: str) -> None:
    """Create the schema in an empty database, upgrade an old one, refuse a foreign one."""

    def versions() -> tuple[int, int]:
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        return app_id, conn.execute("PRAGMA user_version").fetchone()[0]

    if versions() == (APPLICATION_ID, FORMAT_VERSION):
        _check_schema(conn)
        return
    with transaction(conn):
        # Read again under the write lock: another process may have just created it.
        app_id, version = versions()
        if app_id == 0 and version == 0:
            if conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0]:
                raise StoreError(
                    f"{path} is an SQLite database of another application; "
                    "refusing to use it as a session store"
                )
            for statement in SCHEMA:
                conn.execute(statement)
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            version = FORMAT_VERSION
        elif app_id != APPLICATION_ID:
            raise StoreError(
                f"{path} is an SQLite database of another application "
                f"(application_id 0x{app_id:08x}); refusing to use it as a session store"
            )
        elif version > FORMAT_VERSION:
            # Left in place: the newer library that wrote it can still use it.
            raise UnsupportedFormatVersion(
                f"session database format version {version} is newer than this "
                f"library's {FORMAT_VERSION}; the file was left untouched",
                location=path,
            )
        while version < FORMAT_VERSION:
            migration = MIGRATIONS.get(version)
            if migration is None:
                raise DamagedFile(f"format version {version} is not one this library wrote")
            logger.info("%s: upgrading format version %d", path, version)
            migration(conn)
            version += 1
        conn.execute(f"PRAGMA user_version = {version}")
        _check_schema(conn)


def _check_schema(conn: sqlite3.Connection) -> None:
    names = {row[0] for row in conn.execute("SELECT name FROM sqlite_schema")}
    if missing := SCHEMA_OBJECTS - names:
        raise DamagedFile(f"schema objects missing: {', '.join(sorted(missing))}")


def create_file(path: str) -> None:
    """Create the database file 0600 (parent directory 0700) unless it exists; check its header.

    SQLite would create it 0644 minus the umask; it gives the -wal and -shm files it creates
    later the mode of the database file. Raises :class:`DamagedFile` for a file that is not
    a database: SQLite must never open one, since closing it, SQLite would delete a -wal file
    lying next to it, which may be the only copy of the last commits.
    """
    directory = os.path.dirname(path)
    make_private_directory(directory)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        pass
    else:
        os.close(fd)
        fsync_directory(directory)
    with open(path, "rb") as f:
        header = f.read(len(SQLITE_HEADER))
    if header and header != SQLITE_HEADER:
        raise DamagedFile("file is not a database (it does not start with the SQLite header)")


def configure(conn: sqlite3.Connection, path: str, synchronous: str) -> None:
    """Refuse a foreign database, switch to WAL with ``synchronous``, create or check the schema."""
    refuse_foreign(conn, path)  # before anything below could change the file
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise StoreError(f"{path}: SQLite refused WAL mode (got {mode!r})")
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    full = "OFF" if synchronous == "NORMAL" else "ON"
    conn.execute(f"PRAGMA fullfsync = {full}")  # macOS only: reach the medium
    conn.execute(f"PRAGMA checkpoint_fullfsync = {full}")
    # A big burst must not leave a big WAL behind once it is checkpointed.
    conn.execute("PRAGMA journal_size_limit = 16777216")
    # The file is data, not code: its triggers may use only harmless functions.
    conn.execute("PRAGMA trusted_schema = OFF")
    conn.execute("PRAGMA cell_size_check = ON")
    check_format(conn, path)
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path + suffix).st_mode & 0o077:
                os.chmod(path + suffix, 0o600)
