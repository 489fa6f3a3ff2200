"""Where the connection stands, and every way it can move: the connection states as data.

One rule, kept by :class:`~mqtt_persist.session.machine.Session`: the connection state changes
only through :data:`TRANSITIONS`, one trigger at a time, so this table is the complete list of
what can happen to a connection. Which packets the broker may send in which state is the other
half: :data:`AWAITING_CONNACK` and :data:`CONNECTED` name the state sets the machine's packet
table uses, and :data:`REFUSALS` says what a packet arriving in any other state is called.
"""

from __future__ import annotations

import enum


class ConnectionState(enum.Enum):
    """Where the current connection stands, as far as the session knows."""

    DISCONNECTED = "disconnected"
    #: CONNECT handed to the shell; waiting for CONNACK.
    CONNECTING = "connecting"
    #: The broker lost the session; stored subscriptions are being restored before READY.
    RESUBSCRIBING = "resubscribing"
    READY = "ready"


class Trigger(enum.Enum):
    """What moves the connection from one state to another (the value names it in errors)."""

    #: ``connect()``: a transport is open and CONNECT goes out.
    CONNECT = "connect()"
    #: CONNACK with a non-zero return code.
    CONNACK_REFUSED = "a refused CONNACK"
    #: CONNACK said the broker lost the session, and there are subscriptions to restore first.
    SESSION_LOST = "a CONNACK without the session"
    #: The connection is usable: the broker kept the session, had nothing to restore, or
    #: answered the last SUBSCRIBE that restored it ("subscriptions come back").
    SESSION_READY = "the session being ready"
    #: ``connection_lost()``: the transport closed, whatever the state (also when it never
    #: got as far as CONNECT).
    CONNECTION_LOST = "connection_lost()"


#: Where a new session starts: no transport yet.
INITIAL_STATE = ConnectionState.DISCONNECTED

#: ``state -> {trigger: next state}``. A trigger missing from a state's row is a bug in the
#: caller (packets in the wrong state never get this far: the packet table refuses them first).
TRANSITIONS: dict[ConnectionState, dict[Trigger, ConnectionState]] = {
    ConnectionState.DISCONNECTED: {
        Trigger.CONNECT: ConnectionState.CONNECTING,
        Trigger.CONNECTION_LOST: ConnectionState.DISCONNECTED,
    },
    ConnectionState.CONNECTING: {
        Trigger.CONNACK_REFUSED: ConnectionState.DISCONNECTED,
        Trigger.SESSION_LOST: ConnectionState.RESUBSCRIBING,
        Trigger.SESSION_READY: ConnectionState.READY,
        Trigger.CONNECTION_LOST: ConnectionState.DISCONNECTED,
    },
    ConnectionState.RESUBSCRIBING: {
        Trigger.SESSION_READY: ConnectionState.READY,
        Trigger.CONNECTION_LOST: ConnectionState.DISCONNECTED,
    },
    ConnectionState.READY: {
        Trigger.CONNECTION_LOST: ConnectionState.DISCONNECTED,
    },
}

#: The only state in which CONNACK is expected.
AWAITING_CONNACK = frozenset({ConnectionState.CONNECTING})
#: CONNACK accepted: the broker may send any packet a broker sends to a client. (While
#: RESUBSCRIBING, acknowledgements of resumed flows and new messages are already legal.)
CONNECTED = frozenset({ConnectionState.RESUBSCRIBING, ConnectionState.READY})

#: The ProtocolError text for a packet the current state does not accept (``{}``: its name).
REFUSALS: dict[ConnectionState, str] = {
    ConnectionState.DISCONNECTED: "{} received while disconnected",
    ConnectionState.CONNECTING: "expected CONNACK, got {}",
    ConnectionState.RESUBSCRIBING: "a broker must not send {} to a client",
    ConnectionState.READY: "a broker must not send {} to a client",
}


def next_state(state: ConnectionState, trigger: Trigger) -> ConnectionState:
    """The state ``trigger`` leads to from ``state``; RuntimeError if the table has no such edge."""
    try:
        return TRANSITIONS[state][trigger]
    except KeyError:
        raise RuntimeError(f"{trigger.value} while {state.value}") from None
