"""Options several commands share, each with its environment variable (docs/cli.md).

``--store`` is parsed by :func:`~mqtt_persist.stores.store_from_url` as the command line is
read, so a bad URL is a usage error (exit 2) before anything runs; the password in it, like
``--password``, is registered with :data:`~mqtt_persist.cli.redaction.SECRETS` at once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import click

from mqtt_persist.cli.broker import PROTOCOLS, BrokerAddress, BrokerOptions, parse_host
from mqtt_persist.cli.redaction import SECRETS
from mqtt_persist.errors import InvalidInput
from mqtt_persist.stores.base import SessionStore
from mqtt_persist.stores.urls import store_from_url

__all__ = [
    "ENV_PASSWORD",
    "ENV_STORE",
    "broker_options",
    "client_id_option",
    "json_option",
    "progress_option",
    "store_option",
]

ENV_STORE = "MQTT_PERSIST_STORE"
ENV_CLIENT_ID = "MQTT_PERSIST_CLIENT_ID"
ENV_HOST = "MQTT_PERSIST_HOST"
ENV_PORT = "MQTT_PERSIST_PORT"
ENV_USERNAME = "MQTT_PERSIST_USERNAME"
ENV_PASSWORD = "MQTT_PERSIST_PASSWORD"

_F = TypeVar("_F", bound=Callable[..., Any])


def _store(ctx: click.Context, param: click.Parameter, value: str | None) -> SessionStore | None:
    if value is None:
        return None
    SECRETS.add_url_password(value)
    try:
        return store_from_url(value)
    except InvalidInput as exc:
        raise click.BadParameter(str(exc), ctx, param) from None
    except ImportError as exc:  # RedisUnavailable: redis-py is an optional extra
        raise click.BadParameter(str(exc), ctx, param) from None


def store_option(*, required: bool = True) -> Callable[[_F], _F]:
    """``--store URL`` (env MQTT_PERSIST_STORE), handed to the command as a SessionStore."""
    return click.option(
        "--store",
        metavar="URL",
        envvar=ENV_STORE,
        required=required,
        callback=_store,
        help="Where sessions live: file:///dir, sqlite:///path.db, redis://host:6379/0, "
        f"memory:// (env {ENV_STORE}).",
    )


def json_option(function: _F) -> _F:
    """``--json``: one JSON document on stdout instead of a table."""
    return click.option(
        "--json", "as_json", is_flag=True, help="Print JSON for scripts instead of a table."
    )(function)


def progress_option(function: _F) -> _F:
    """``--progress/--no-progress`` (default: when stderr is a terminal)."""
    return click.option(
        "--progress/--no-progress",
        "show_progress",
        default=None,
        help="Show a progress bar on stderr (default: when stderr is a terminal).",
    )(function)


def client_id_option(function: _F) -> _F:
    """``--client-id`` / ``-i`` (env MQTT_PERSIST_CLIENT_ID), required."""
    return click.option(
        "-i",
        "--client-id",
        required=True,
        envvar=ENV_CLIENT_ID,
        help=f"The session's client id (env {ENV_CLIENT_ID}).",
    )(function)


def _password(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    SECRETS.add(value)
    return value


def _host(ctx: click.Context, param: click.Parameter, value: str) -> BrokerAddress:
    try:
        return parse_host(value)
    except InvalidInput as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


#: Header names whose values are credentials (scrubbed from every output).
_SECRET_HEADERS = ("authorization", "cookie", "token", "key", "secret", "password")


def _headers(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> tuple[tuple[str, str], ...]:
    headers = []
    for value in values:
        name, sep, text = value.partition(":")
        if not sep or not name.strip():
            raise click.BadParameter(f"expected 'NAME: VALUE', not {value!r}", ctx, param)
        name, text = name.strip(), text.strip()
        if any(word in name.lower() for word in _SECRET_HEADERS):
            SECRETS.add(text)
        headers.append((name, text))
    return tuple(headers)


def broker_options(function: _F) -> _F:
    """The broker's address, credentials and TLS settings, handed over as ``broker``."""

    @functools.wraps(function)
    def wrapper(**kwargs: Any) -> Any:
        address: BrokerAddress = kwargs.pop("host")
        broker = BrokerOptions(
            host=address.host,
            port=kwargs.pop("port") or address.port,
            username=kwargs.pop("username"),
            password=kwargs.pop("password"),
            tls=kwargs.pop("tls") or address.tls,
            cafile=kwargs.pop("cafile"),
            certfile=kwargs.pop("cert"),
            keyfile=kwargs.pop("key"),
            insecure=kwargs.pop("insecure"),
            connect_timeout=kwargs.pop("connect_timeout"),
            protocol=kwargs.pop("protocol"),
            transport=address.transport,
            websocket_path=address.websocket_path,
            websocket_headers=kwargs.pop("ws_header"),
        )
        return function(broker=broker, **kwargs)

    options = [
        click.option(
            "-h",
            "--host",
            default="127.0.0.1",
            show_default=True,
            envvar=ENV_HOST,
            callback=_host,
            help="Broker host, or URL: mqtt://, mqtts://, ws://HOST[:PORT]/PATH, wss://... "
            f"(env {ENV_HOST}).",
        ),
        click.option(
            "-p",
            "--port",
            type=click.IntRange(1, 65535),
            envvar=ENV_PORT,
            help=f"Broker port (default 1883, 8883 with TLS; env {ENV_PORT}).",
        ),
        click.option(
            "-u", "--username", envvar=ENV_USERNAME, help=f"User name (env {ENV_USERNAME})."
        ),
        click.option(
            "-P",
            "--password",
            envvar=ENV_PASSWORD,
            callback=_password,
            help=f"Password; prefer the env {ENV_PASSWORD} (a command line is visible to ps). "
            "Never printed.",
        ),
        click.option(
            "--tls", is_flag=True, help="Connect with TLS (implied by the options below)."
        ),
        click.option(
            "--cafile", type=click.Path(exists=True, dir_okay=False), help="CA certificates (PEM)."
        ),
        click.option(
            "--cert",
            type=click.Path(exists=True, dir_okay=False),
            help="Client certificate (PEM).",
        ),
        click.option(
            "--key", type=click.Path(exists=True, dir_okay=False), help="Client key (PEM)."
        ),
        click.option(
            "--insecure",
            is_flag=True,
            help="TLS without checking the broker's certificate or host name (tests only).",
        ),
        click.option(
            "--connect-timeout",
            type=click.FloatRange(min=0, min_open=True),
            default=10.0,
            show_default=True,
            help="Seconds for one connection attempt (TCP, TLS and CONNACK).",
        ),
        click.option(
            "--ws-header",
            metavar="'NAME: VALUE'",
            multiple=True,
            callback=_headers,
            help="An HTTP header for the WebSocket upgrade of a ws:// or wss:// --host "
            "(repeatable; values of credential headers are never printed).",
        ),
        click.option(
            "--protocol",
            type=click.Choice(list(PROTOCOLS)),
            default="auto",
            show_default=True,
            help="MQTT version: auto tries 5, then falls back to 3.1.1.",
        ),
    ]
    decorated: Callable[..., Any] = wrapper
    for option in reversed(options):
        decorated = option(decorated)
    return decorated  # type: ignore[return-value]
