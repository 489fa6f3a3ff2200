"""What every store checks before it stores anything, in one place.

- :func:`check_operations`: a batch is stored only if every operation in it can be: it is one
  of the journal operation types and the binary encoding
  (:mod:`~mqtt_persist.stores.serialization`) can represent its fields (QoS 0..2, packet IDs
  0..65535, int64 sequence numbers, strings that are valid Unicode, bytes payloads). Whatever
  the medium, a bad batch raises :class:`~mqtt_persist.stores.serialization.EncodeError`
  before anything is written, so every store refuses exactly the same batches.
- :func:`check_queued_limit` / :func:`check_read_limit`: the arguments of ``load`` and
  ``read_queued``.
- :func:`check_handlers`: a store's table of per-operation rules covers every operation type.
- :func:`check_client_id`: a client id a store that keeps it as UTF-8 text can hold.
"""

from __future__ import annotations

import typing
from collections.abc import Collection, Sequence

from mqtt_persist.errors import InvalidClientId, InvalidInput
from mqtt_persist.session.state import Operation
from mqtt_persist.stores.serialization import encode_each

__all__ = [
    "OPERATION_TYPES",
    "check_client_id",
    "check_handlers",
    "check_operations",
    "check_queued_limit",
    "check_read_limit",
]

#: Every journal operation type: the members of the :data:`Operation` union.
OPERATION_TYPES: frozenset[type] = frozenset(typing.get_args(Operation))


def check_operations(ops: Sequence[Operation]) -> list[bytes]:
    """Each operation's encoding, in order; :class:`EncodeError` for the first that has none.

    A store that writes the encoding (FileStore) keeps the result; the others only need the
    check, which costs one encoding per operation either way.
    """
    return encode_each(ops)


def check_queued_limit(queued_limit: object) -> None:
    """``load``'s ``queued_limit``: None or an int >= 0, else :class:`InvalidInput`."""
    if queued_limit is not None and (type(queued_limit) is not int or queued_limit < 0):
        raise InvalidInput(f"queued_limit must be an int >= 0 or None, not {queued_limit!r}")


def check_read_limit(limit: object) -> None:
    """``read_queued``'s ``limit``: an int >= 0, else :class:`InvalidInput`."""
    if type(limit) is not int or limit < 0:
        raise InvalidInput(f"limit must be an int >= 0, not {limit!r}")


def check_handlers(store: str, handlers: Collection[type]) -> None:
    """Raise TypeError unless ``handlers`` has a rule for exactly every operation type.

    Stores call it on their per-operation table when their module is imported, so a new
    operation type cannot ship with a store that silently ignores it.
    """
    missing = OPERATION_TYPES - set(handlers)
    extra = set(handlers) - OPERATION_TYPES
    if missing or extra:
        names = ", ".join(sorted(t.__name__ for t in missing)) or "none"
        unknown = ", ".join(sorted(t.__name__ for t in extra)) or "none"
        raise TypeError(f"{store}: no rule for {names}; rules for non-operations: {unknown}")


def check_client_id(client_id: str) -> None:
    """Raise :class:`InvalidClientId` unless ``client_id`` encodes as UTF-8.

    For the stores that keep the id as database text (SQLite, PostgreSQL): a lone surrogate,
    which Python strings allow, would otherwise fail inside the driver with its own error.
    """
    try:
        client_id.encode("utf-8")
    except (AttributeError, UnicodeEncodeError) as exc:
        raise InvalidClientId(f"client id {client_id!r} cannot be stored: {exc}") from None
