"""The graceful exit: before the client closes, give the broker a moment to answer.

Leaving ``async with PersistentClient(...)`` right after ``subscribe()`` used to close the
client before the SUBSCRIBE was sent, so the broker queued nothing for the session until the
next start. Nothing is lost by closing (the store keeps every pending request and message), but
what the broker has not taken yet does not work on its side either. So the exit waits, for at
most ``exit_timeout`` seconds, until the broker has answered every subscribe/unsubscribe request
of this run and acknowledged every queued and in-flight message, and only while a connection is
up or being attempted: a client in a backoff delay has nobody to wait for.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio

from mqtt_persist.client.connection import ConnectionSupervisor
from mqtt_persist.client.dispatch import EventDispatcher
from mqtt_persist.client.flusher import Flusher
from mqtt_persist.log import ClientLogger
from mqtt_persist.session.machine import Session

#: How often the wait looks at the connection between flusher passes: a failed attempt
#: (the supervisor went into backoff) wakes nothing else.
_POLL = 0.05


def settled(
    session: Session, flusher: Flusher, dispatcher: EventDispatcher, *, requests: bool
) -> bool:
    """The broker acknowledged every message (and, with ``requests``, answered every
    subscribe/unsubscribe request of this run), and all of it is committed and reported.

    Idle is not enough: the last acknowledgements must also be committed and their deliveries
    resolved, which happens in the flusher pass after the session went idle.
    """
    return (
        session.is_idle
        and not session.has_output()
        and flusher.idle
        and not dispatcher.deliveries
        and not (requests and dispatcher.requests)
    )


async def settle_before_exit(
    session: Session,
    flusher: Flusher,
    dispatcher: EventDispatcher,
    connection: ConnectionSupervisor,
    *,
    timeout: float,
    failed: Callable[[], bool],
    log: ClientLogger,
) -> None:
    """Wait up to ``timeout`` seconds for :func:`settled`, while a connection is up or coming.

    It returns early once everything is settled, the client failed, or the connection
    supervisor went into a backoff delay; it never raises (the exit goes on regardless).
    """
    if not timeout:
        return
    with anyio.move_on_after(timeout) as waiting:
        while not failed() and not connection.backing_off:
            if settled(session, flusher, dispatcher, requests=True):
                return
            flusher.flushed.clear()
            with anyio.move_on_after(_POLL):
                await flusher.flushed.wait()
    if waiting.cancelled_caught:
        log.info(
            "leaving after exit_timeout=%gs with %d queued, %d in flight and %d subscription "
            "request(s) the broker had not answered; they stay in the store",
            timeout,
            session.queued,
            session.inflight,
            len(dispatcher.requests),
        )
