"""Stores named by URL: ``store_from_url("sqlite:///var/lib/gateway/sessions.db")``.

One registry, :data:`SCHEMES`, maps a URL scheme to the factory that builds its store, as
``"module:function"`` so that a store with an optional driver (redis-py, a PostgreSQL driver)
is imported only when its scheme is used. Adding a store is one line there and one factory:
a function taking a :class:`StoreURL`, reading its options with the ``option_*`` methods,
calling :meth:`StoreURL.done` (which refuses every option it did not read) and returning the
store, unopened.

The URL forms (docs/cli.md has the full table):

- ``memory://``: a new :class:`~mqtt_persist.stores.MemoryStore` (nothing outlives the process);
- ``file:///abs/dir``, ``file:relative/dir``: a :class:`~mqtt_persist.stores.FileStore`;
  option ``fsync`` (default true);
- ``sqlite:///abs/path.db``, ``sqlite:relative.db``: a :class:`~mqtt_persist.stores.SQLiteStore`;
  options ``synchronous`` (FULL, NORMAL, EXTRA) and ``busy_timeout`` (seconds);
- ``redis://[user:password@]host:port/db``, ``rediss://...`` (TLS): a
  :class:`~mqtt_persist.stores.redis.RedisStore`; options ``prefix`` and ``lease_ttl``, and
  redis-py's connection options listed in :data:`REDIS_CONNECTION_OPTIONS`;
- ``postgresql://[user:password@]host:5432/db`` (``postgres://`` too): a
  :class:`~mqtt_persist.stores.postgres.PostgresStore`; options ``schema``, ``lease_ttl`` and
  ``max_connections``, and libpq's connection parameters listed in
  :data:`POSTGRES_CONNECTION_OPTIONS`.

Paths follow file URLs (RFC 8089): three slashes start an absolute path, no slash a relative
one (from the current directory), a leading ``~`` is the home directory, ``%xx`` escapes are
decoded. SQLAlchemy's ``sqlite:////abs`` (four slashes) is refused with a hint, since here three
slashes are already absolute. No error message or ``repr`` ever shows a password: they go
through :func:`redact_url`.
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal, TypeVar, cast
from urllib.parse import SplitResult, parse_qsl, quote, unquote, urlsplit, urlunsplit

from mqtt_persist.errors import InvalidInput

if TYPE_CHECKING:
    from mqtt_persist.stores.base import SessionStore
    from mqtt_persist.stores.file import FileStore
    from mqtt_persist.stores.memory import MemoryStore
    from mqtt_persist.stores.postgres import PostgresStore
    from mqtt_persist.stores.redis import RedisStore
    from mqtt_persist.stores.sqlite import SQLiteStore

__all__ = [
    "POSTGRES_CONNECTION_OPTIONS",
    "REDIS_CONNECTION_OPTIONS",
    "SCHEMES",
    "StoreURL",
    "redact_url",
    "store_from_url",
]

#: URL scheme -> ``"module:function"`` of the factory that builds its store from a
#: :class:`StoreURL`. Imported on first use, so an optional driver is needed only when used.
SCHEMES: dict[str, str] = {
    "memory": "mqtt_persist.stores.urls:memory_store",
    "file": "mqtt_persist.stores.urls:file_store",
    "sqlite": "mqtt_persist.stores.urls:sqlite_store",
    "redis": "mqtt_persist.stores.urls:redis_store",
    "rediss": "mqtt_persist.stores.urls:redis_store",
    "postgresql": "mqtt_persist.stores.urls:postgres_store",
    "postgres": "mqtt_persist.stores.urls:postgres_store",
}

#: redis-py's own connection options that a ``redis://`` URL may carry, handed to redis-py as
#: they are (it parses them); any other unknown option is refused rather than ignored.
REDIS_CONNECTION_OPTIONS = frozenset(
    {
        "socket_timeout",
        "socket_connect_timeout",
        "socket_keepalive",
        "health_check_interval",
        "retry_on_timeout",
        "client_name",
        "ssl_cert_reqs",
        "ssl_ca_certs",
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_check_hostname",
    }
)

#: libpq's own connection parameters that a ``postgresql://`` URL may carry, handed to libpq as
#: they are (it parses them); any other unknown option is refused rather than ignored.
POSTGRES_CONNECTION_OPTIONS = frozenset(
    {
        "application_name",
        "channel_binding",
        "connect_timeout",
        "dbname",
        "gssencmode",
        "host",
        "hostaddr",
        "keepalives",
        "keepalives_count",
        "keepalives_idle",
        "keepalives_interval",
        "options",
        "passfile",
        "password",
        "port",
        "service",
        "sslcert",
        "sslcrl",
        "sslkey",
        "sslmode",
        "sslrootcert",
        "target_session_attrs",
        "tcp_user_timeout",
        "user",
    }
)

#: Query parameters whose values are secrets, replaced by ``***`` in :func:`redact_url`.
_SECRET_PARAMETERS = frozenset({"password", "passwd", "pwd", "secret", "token", "api_key"})

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})

_C = TypeVar("_C", bound=str)


def redact_url(url: str) -> str:
    """``url`` with its password (and any secret query parameter) replaced by ``***``.

    For messages and logs. Something that does not parse as a URL gives
    ``<unparseable URL>`` rather than itself, since it may hold a password anyway.
    """
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, host = netloc.rsplit("@", 1)
            if ":" in userinfo:
                user = userinfo.split(":", 1)[0]
                netloc = f"{user}:***@{host}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            if any(name.lower() in _SECRET_PARAMETERS for name, _ in pairs):
                query = "&".join(
                    f"{name}=***" if name.lower() in _SECRET_PARAMETERS else f"{name}={value}"
                    for name, value in pairs
                )
        if netloc == parts.netloc and query == parts.query:
            return url  # as given: urlunsplit would drop an empty host's "//"
        return urlunsplit(parts._replace(netloc=netloc, query=query))
    except ValueError:
        return "<unparseable URL>"


class StoreURL:
    """A parsed store URL, handed to a scheme's factory.

    ``parts`` is the :func:`urllib.parse.urlsplit` result; the query parameters are read with
    the ``option_*`` methods, each of which validates its value and names the option in its
    error. :meth:`done` then refuses every parameter no method read.
    """

    def __init__(self, url: str) -> None:
        """Parse ``url``; :class:`~mqtt_persist.errors.InvalidInput` if it is not a store URL."""
        self.text = url
        #: The URL with its password replaced by ``***``: what every message shows.
        self.safe = redact_url(url)
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018  (raises ValueError for a port that is not a number)
        except ValueError as exc:
            raise InvalidInput(f"not a valid store URL: {self.safe} ({exc})") from None
        if not parts.scheme or len(parts.scheme) == 1:
            # "C:\\dir" parses with the scheme "c": no store URL is one letter long.
            raise InvalidInput(
                f"a store URL needs a scheme, not {self.safe!r}: for example "
                "file:///var/lib/app/sessions, sqlite:///var/lib/app/sessions.db, "
                "redis://127.0.0.1:6379/0 or memory://"
            )
        if parts.fragment:
            raise InvalidInput(f"a store URL has no #fragment: {self.safe}")
        self.parts: SplitResult = parts
        self.scheme = parts.scheme.lower()
        self._options: dict[str, str] = {}
        for name, value in parse_qsl(parts.query, keep_blank_values=True):
            if name in self._options:
                raise InvalidInput(f"option {name!r} is given twice in {self.safe}")
            if not value:
                raise InvalidInput(f"option {name!r} has no value in {self.safe}")
            self._options[name] = value
        #: Every option name a factory asked about: what done() lists as this store's options.
        self._known: set[str] = set()
        self._done = False

    def __repr__(self) -> str:
        return f"StoreURL({self.safe!r})"

    # --- the location --------------------------------------------------------------------------

    def local_path(self, what: str) -> str:
        """The local file system path of a ``file:`` or ``sqlite:`` URL, absolute.

        ``what`` names the thing for messages ("directory", "database file").
        """
        parts = self.parts
        if parts.netloc and parts.netloc.lower() != "localhost":
            raise InvalidInput(
                f"{self.scheme}: URLs name a local {what}, not one on host {parts.netloc!r}: "
                f"{self.safe} (write {self.scheme}:///absolute/path or {self.scheme}:relative/path)"
            )
        path = unquote(parts.path)
        if path.startswith("//"):
            raise InvalidInput(
                f"{self.safe} has four slashes: here three already make an absolute path "
                f"({self.scheme}:///var/lib/x), unlike SQLAlchemy's sqlite:////var/lib/x"
            )
        if not path:
            raise InvalidInput(f"{self.safe} names no {what}")
        if "\0" in path:
            raise InvalidInput(f"{self.safe}: a path cannot contain NUL")
        return os.path.abspath(os.path.expanduser(path))

    # --- options -------------------------------------------------------------------------------

    def _take(self, name: str) -> str | None:
        self._known.add(name)
        return self._options.get(name)

    def option_str(self, name: str, default: str) -> str:
        """The option's text, or ``default``."""
        value = self._take(name)
        return default if value is None else value

    def option_bool(self, name: str, default: bool) -> bool:
        """true/false, yes/no, on/off or 1/0 (any case), or ``default``."""
        value = self._take(name)
        if value is None:
            return default
        lowered = value.lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise InvalidInput(f"option {name!r} must be true or false, not {value!r} ({self.safe})")

    def option_float(self, name: str, default: float, *, minimum: float = 0.0) -> float:
        """A finite number >= ``minimum`` (> 0 when ``minimum`` is 0), or ``default``."""
        value = self._take(name)
        if value is None:
            return default
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not math.isfinite(number) or number < minimum or (minimum == 0 and number == 0):
            bound = "> 0" if minimum == 0 else f">= {minimum:g}"
            raise InvalidInput(
                f"option {name!r} must be a number {bound}, not {value!r} ({self.safe})"
            )
        return number

    def option_choice(self, name: str, choices: tuple[_C, ...], default: _C) -> _C:
        """One of ``choices`` (matched without regard to case), or ``default``."""
        value = self._take(name)
        if value is None:
            return default
        for choice in choices:
            if choice.lower() == value.lower():
                return choice
        raise InvalidInput(
            f"option {name!r} must be one of {', '.join(choices)}, not {value!r} ({self.safe})"
        )

    def passthrough(self, names: frozenset[str]) -> dict[str, str]:
        """The options among ``names`` that were given, marked as read (for a driver's own)."""
        self._known.update(names)
        return {name: value for name, value in self._options.items() if name in names}

    def done(self) -> None:
        """Refuse every option that no ``option_*`` call read: a typo is an error, not a no-op."""
        self._done = True
        unknown = sorted(set(self._options) - self._known)
        if unknown:
            known = ", ".join(sorted(self._known)) or "none"
            raise InvalidInput(
                f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} for a "
                f"{self.scheme}: store ({self.safe}); its options: {known}"
            )

    @property
    def checked(self) -> bool:
        """True once :meth:`done` ran (``store_from_url`` insists on it)."""
        return self._done


def store_from_url(url: str) -> SessionStore:
    """The store a URL names, configured and not yet opened.

    Raises :class:`~mqtt_persist.errors.InvalidInput` for an unknown scheme, a malformed
    location or an unknown or invalid option, with a message that names it (and never shows a
    password); :class:`~mqtt_persist.stores.redis.RedisUnavailable` for ``redis://`` without
    redis-py installed.
    """
    if not isinstance(url, str):
        raise InvalidInput(f"a store URL is a str, not {type(url).__name__}")
    parsed = StoreURL(url)
    target = SCHEMES.get(parsed.scheme)
    if target is None:
        raise InvalidInput(
            f"unknown store URL scheme {parsed.scheme!r} in {parsed.safe}; "
            f"known: {', '.join(sorted(SCHEMES))}"
        )
    module_name, _, function_name = target.partition(":")
    factory = cast(
        "Callable[[StoreURL], SessionStore]",
        getattr(importlib.import_module(module_name), function_name),
    )
    store = factory(parsed)
    if not parsed.checked:  # pragma: no cover - a factory that forgot done() is a bug
        raise RuntimeError(f"{target} did not check the options of {parsed.safe}")
    return store


# --- the factories of the stores in this package ---------------------------------------------


def _no_location(url: StoreURL) -> None:
    if url.parts.netloc or url.parts.path.strip("/"):
        raise InvalidInput(f"a {url.scheme}: store URL has no host or path: {url.safe}")


def memory_store(url: StoreURL) -> MemoryStore:
    """``memory://``: a new, empty MemoryStore (no options)."""
    from mqtt_persist.stores.memory import MemoryStore

    _no_location(url)
    url.done()
    return MemoryStore()


def file_store(url: StoreURL) -> FileStore:
    """``file:///abs/dir`` or ``file:relative/dir``; option ``fsync`` (default true)."""
    from mqtt_persist.stores.file import FileStore

    directory = url.local_path("directory")
    fsync = url.option_bool("fsync", True)
    url.done()
    return FileStore(directory, fsync=fsync)


def sqlite_store(url: StoreURL) -> SQLiteStore:
    """``sqlite:///abs/path.db`` or ``sqlite:relative.db``; ``synchronous``, ``busy_timeout``."""
    from mqtt_persist.stores.sqlite import SQLiteStore

    if url.parts.netloc:
        raise InvalidInput(
            f"sqlite: URLs name a local database file, with no host: {url.safe} "
            "(write sqlite:///absolute/path.db or sqlite:relative.db)"
        )
    if unquote(url.parts.path) == ":memory:":
        raise InvalidInput("SQLiteStore needs a database file; memory:// keeps sessions in memory")
    path = url.local_path("database file")
    synchronous: Literal["FULL", "NORMAL", "EXTRA"] = url.option_choice(
        "synchronous", ("FULL", "NORMAL", "EXTRA"), "FULL"
    )
    busy_timeout = url.option_float("busy_timeout", 10.0)
    url.done()
    return SQLiteStore(path, synchronous=synchronous, busy_timeout=busy_timeout)


def redis_store(url: StoreURL) -> RedisStore:
    """``redis://[user:password@]host:port/db`` or ``rediss://``; ``prefix``, ``lease_ttl``."""
    from mqtt_persist.stores.redis import RedisStore

    parts = url.parts
    if not parts.hostname:
        raise InvalidInput(f"a {url.scheme}: URL needs a host: {url.safe}")
    db = parts.path.strip("/")
    if db and not (db.isdigit() and db.isascii()):
        raise InvalidInput(f"the database of {url.safe} must be a number, not {db!r}")
    prefix = url.option_str("prefix", "mqtt_persist")
    lease_ttl = url.option_float("lease_ttl", 15.0)
    connection = url.passthrough(REDIS_CONNECTION_OPTIONS)
    url.done()
    query = "&".join(f"{name}={value}" for name, value in connection.items())
    driver_url = urlunsplit(parts._replace(query=query))
    _check_redis_options(driver_url, url.safe)
    return RedisStore(driver_url, prefix=prefix, lease_ttl=lease_ttl)


def _check_redis_options(driver_url: str, safe: str) -> None:
    """Let redis-py parse the URL now, so a bad connection option fails here, not at open."""
    from redis.connection import parse_url

    try:
        parse_url(driver_url)  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
    except ValueError as exc:
        raise InvalidInput(f"{exc} ({safe})") from None


def postgres_store(url: StoreURL) -> PostgresStore:
    """``postgresql://[user:password@]host:port/db`` (or ``postgres://``); ``schema``,
    ``lease_ttl``, ``max_connections``, and libpq's own parameters."""
    from mqtt_persist.stores.postgres import PostgresStore

    schema = url.option_str("schema", "mqtt_persist")
    lease_ttl = url.option_float("lease_ttl", 15.0)
    max_connections = url.option_float("max_connections", 4, minimum=1)
    if max_connections != int(max_connections):
        raise InvalidInput(f"option 'max_connections' must be a whole number ({url.safe})")
    connection = url.passthrough(POSTGRES_CONNECTION_OPTIONS)
    url.done()
    query = "&".join(f"{name}={quote(value)}" for name, value in connection.items())
    # Built by hand: urlunsplit drops the "//" of a URL without a host (a Unix socket).
    parts = url.parts
    dsn = f"postgresql://{parts.netloc}{parts.path}" + (f"?{query}" if query else "")
    _check_postgres_dsn(dsn, url.safe)
    return PostgresStore(
        dsn, schema=schema, lease_ttl=lease_ttl, max_connections=int(max_connections)
    )


def _check_postgres_dsn(dsn: str, safe: str) -> None:
    """Let libpq parse the DSN now, so a bad parameter fails here, not at open."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    try:
        conninfo_to_dict(dsn)
    except psycopg.Error as exc:
        raise InvalidInput(f"{str(exc).strip()} ({safe})") from None
