"""The connection states of the session machine: which packets each accepts, and how it moves.

Every packet type is fed to a session in every connection state; a packet the state does not
accept is a ProtocolError whose text says what went wrong, and changes nothing.
"""

from __future__ import annotations

import ast
import inspect

import pytest

from mqtt_persist.errors import ProtocolError
from mqtt_persist.protocol.packets import (
    ConnAck,
    Connect,
    Disconnect,
    Packet,
    PingReq,
    PingResp,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    SubAck,
    Subscribe,
    UnsubAck,
    Unsubscribe,
)
from mqtt_persist.session import machine
from mqtt_persist.session.events import ConnectionReady
from mqtt_persist.session.machine import ConnectionState, Session, SessionConfig
from mqtt_persist.session.transitions import TRANSITIONS, Trigger

S = ConnectionState

#: One packet of every type, as a broker might (or must not) send it.
PACKETS: list[Packet] = [
    ConnAck(False, 0),
    Publish("t", b"x", 1, packet_id=7),
    PubAck(7),
    PubRec(7),
    PubRel(7),
    PubComp(7),
    SubAck(7, [0]),
    UnsubAck(7),
    PingResp(),
    Connect("dev"),
    Subscribe(7, [("t", 0)]),
    Unsubscribe(7, ["t"]),
    PingReq(),
    Disconnect(),
]
FROM_BROKER = (Publish, PubAck, PubRec, PubRel, PubComp, SubAck, UnsubAck, PingResp)


def session_in(state: ConnectionState) -> Session:
    """A fresh session driven into ``state`` the way a connection gets there."""
    session = Session(SessionConfig(client_id="dev"))
    if state is S.DISCONNECTED:
        return session
    if state is S.RESUBSCRIBING:
        session.subscribe([("s/#", 1)])
    session.connect(0.0)
    if state is not S.CONNECTING:
        session.receive(ConnAck(False, 0))
    session.take(0.0)
    assert session.connection_state is state
    return session


def expected_refusal(state: ConnectionState, packet: Packet) -> str | None:
    """The ProtocolError text for ``packet`` in ``state``; None if the state accepts it."""
    name = type(packet).__name__.upper()
    if state is S.DISCONNECTED:
        return f"{name} received while disconnected"
    if state is S.CONNECTING:
        return None if type(packet) is ConnAck else f"expected CONNACK, got {name}"
    if type(packet) in FROM_BROKER:
        return None
    return f"a broker must not send {name} to a client"


@pytest.mark.parametrize("state", list(S), ids=lambda s: s.value)
@pytest.mark.parametrize("packet", PACKETS, ids=lambda p: type(p).__name__)
def test_each_state_accepts_exactly_its_packets(state: ConnectionState, packet: Packet) -> None:
    session = session_in(state)
    refusal = expected_refusal(state, packet)
    if refusal is None:
        session.receive(packet)
        return
    before = session.snapshot()
    with pytest.raises(ProtocolError) as caught:
        session.receive(packet)
    assert str(caught.value) == refusal
    assert session.connection_state is state
    assert not session.has_output() and session.snapshot() == before


@pytest.mark.parametrize("state", [S.CONNECTING, S.RESUBSCRIBING, S.READY], ids=lambda s: s.value)
def test_connect_twice_is_a_caller_bug(state: ConnectionState) -> None:
    session = session_in(state)
    generation = session.generation
    with pytest.raises(RuntimeError, match=f"^connect\\(\\) while {state.value}$"):
        session.connect(1.0)
    assert session.connection_state is state and session.generation == generation


@pytest.mark.parametrize("state", list(S), ids=lambda s: s.value)
def test_connection_lost_ends_every_state(state: ConnectionState) -> None:
    session = session_in(state)
    session.connection_lost()
    assert session.connection_state is S.DISCONNECTED
    assert session.connect(1.0) == session.generation


def test_refused_connack_disconnects_and_resubscription_readies() -> None:
    session = session_in(S.CONNECTING)
    session.receive(ConnAck(False, 5))
    assert session.connection_state is S.DISCONNECTED

    session = session_in(S.RESUBSCRIBING)
    (packet_id,) = session._subscriptions.resubscribe_ids
    session.receive(SubAck(packet_id, [1]))
    assert session.connection_state is S.READY
    assert ConnectionReady(False, 0, 0) in session.take(0.0).events


def test_the_table_reaches_every_state_and_loses_every_connection() -> None:
    reachable = {S.DISCONNECTED}
    frontier = [S.DISCONNECTED]
    while frontier:
        for target in TRANSITIONS[frontier.pop()].values():
            if target not in reachable:
                reachable.add(target)
                frontier.append(target)
    assert reachable == set(S)
    assert all(row[Trigger.CONNECTION_LOST] is S.DISCONNECTED for row in TRANSITIONS.values())


def test_only_fire_changes_the_connection_state() -> None:
    """The one rule: every state change goes through the table (Session._fire)."""
    tree = ast.parse(inspect.getsource(machine))
    assigning: set[str] = set()
    for function in ast.walk(tree):
        if not isinstance(function, ast.FunctionDef):
            continue
        for node in ast.walk(function):
            targets = (
                node.targets
                if isinstance(node, ast.Assign)
                else [node.target]
                if isinstance(node, ast.AugAssign | ast.AnnAssign)
                else []
            )
            for target in targets:
                if isinstance(target, ast.Attribute) and target.attr == "_connection_state":
                    assigning.add(function.name)
    assert assigning == {"__init__", "_fire"}
