"""The direct-link core without sockets: two LinkCores talk through an in-memory wire."""

from __future__ import annotations

import random

from zbus import wire
from zbus.links import (
    HANDSHAKE_TIMEOUT,
    LINK_TIMEOUT,
    Close,
    Dial,
    LinkCore,
    OpenData,
    Reply,
    SendLink,
    link_addresses,
)

A, B, C = "C-a", "C-b", "C-c"


def info(client_id: str, listen: str, private=("10.0.0.7", "127.0.0.1")) -> wire.ClientInfo:
    return wire.ClientInfo(client_id, client_id[-1], wire.NetState(private=list(private), listen=listen))


def core(me: str, max_links: int = 64) -> LinkCore:
    return LinkCore(me, random.Random(1), max_links, data_port=5000)


def handshake(dialer: LinkCore, listener: LinkCore, clients_of_listener: dict, now: float = 0.0):
    """Run dialer -> listener until the dialer's actions settle; return the dialer's last actions."""
    dial = [a for a in dialer.plan({listener.my_id: info(listener.my_id, "tcp://127.0.0.1:4000")}, now)
            if isinstance(a, Dial)]
    assert len(dial) == 1
    replies = listener.on_listener(b"conn-1", wire.decode(dial[0].hello), clients_of_listener, now)
    assert len(replies) == 1 and isinstance(replies[0], Reply)
    return dialer.on_link_message(listener.my_id, wire.decode(replies[0].header), now)


def test_a_listener_on_all_interfaces_is_tried_at_each_private_address():
    assert link_addresses(wire.NetState(private=["10.0.0.7", "127.0.0.1"], listen="tcp://0.0.0.0:4000")) == [
        "tcp://10.0.0.7:4000", "tcp://127.0.0.1:4000"]
    assert link_addresses(wire.NetState(private=["10.0.0.7"], listen="tcp://127.0.0.1:4000")) == ["tcp://127.0.0.1:4000"]
    assert link_addresses(wire.NetState(private=["10.0.0.7"])) == []


def test_only_peers_we_send_to_get_links_and_the_handshake_brings_one_up():
    a, b = core(A), core(B)
    assert a.plan({B: info(B, "tcp://127.0.0.1:4000")}, 0.0) == []  # never sent to B: no link
    a.want([B])
    actions = handshake(a, b, {A: info(A, "tcp://127.0.0.1:4001")})
    assert isinstance(actions[0], OpenData) and actions[0].endpoint == "tcp://127.0.0.1:5000"
    assert isinstance(actions[1], SendLink)  # the first ping
    assert set(a.up_links()) == {B} and a.up_links()[B].kind == "direct"
    assert b.tokens() == {a.out[B].token: (A, "direct")}  # B stamps A's Id on that data connection


def test_a_listener_refuses_a_dialer_no_server_lists_and_the_dialer_backs_off():
    a, b = core(A), core(B)
    a.want([B])
    actions = handshake(a, b, {})  # B does not know A
    assert [type(x) for x in actions] == [Close]
    assert a.up_links() == {} and B in a.retry_at
    assert a.plan({B: info(B, "tcp://127.0.0.1:4000")}, 0.1) == []  # backing off


def test_the_wrong_peer_at_an_address_is_dropped_and_the_next_address_tried():
    a, c = core(A), core(C)  # C sits at the address B advertised
    a.want([B])
    dial = a.plan({B: info(B, "tcp://0.0.0.0:4000")}, 0.0)
    assert [x.address for x in dial if isinstance(x, Dial)] == ["tcp://10.0.0.7:4000"]
    reply = c.on_listener(b"conn", wire.decode(dial[0].hello), {A: info(A, "")}, 0.0)
    assert wire.decode(reply[0].header).code == "wrong-id"
    actions = a.on_link_message(B, wire.decode(reply[0].header), 0.0)
    assert [type(x) for x in actions] == [Close, Dial] and actions[1].address == "tcp://127.0.0.1:4000"


def test_a_silent_address_times_out_and_a_link_without_pongs_goes_down():
    a, b = core(A), core(B)
    a.want([B])
    a.plan({B: info(B, "tcp://127.0.0.1:4000")}, 0.0)
    assert any(isinstance(x, Close) for x in a.tick(HANDSHAKE_TIMEOUT))
    a, b = core(A), core(B)
    a.want([B])
    handshake(a, b, {A: info(A, "")})
    ping = [x for x in a.tick(0.5) if isinstance(x, SendLink)]
    pong = b.on_listener(b"conn-1", wire.decode(ping[0].header), {}, 0.5)
    a.on_link_message(B, wire.decode(pong[0].header), 0.6)
    assert abs(a.up_links()[B].rtt - 0.1) < 1e-9
    assert not any(isinstance(x, Close) for x in a.tick(0.6 + LINK_TIMEOUT - 0.1))
    assert any(isinstance(x, Close) for x in a.tick(0.6 + LINK_TIMEOUT))
    assert a.up_links() == {}


def test_max_links_keeps_the_first_peers_sent_to_and_zero_closes_every_link():
    a = core(A, max_links=1)
    clients = {p: info(p, f"tcp://127.0.0.1:{4000 + i}") for i, p in enumerate((B, C))}
    a.want([C, B])
    assert [x.peer for x in a.plan(clients, 0.0) if isinstance(x, Dial)] == [C]
    a.set_max_links(0)
    assert [type(x) for x in a.plan(clients, 0.1)] == [Close]
    assert a.out == {}


def test_a_peer_that_left_every_list_loses_its_link():
    a, b = core(A), core(B)
    a.want([B])
    handshake(a, b, {A: info(A, "")})
    closes = a.plan({}, 1.0)
    assert [type(x) for x in closes] == [Close] and closes[0].bye is not None
    assert a.up_links() == {}
