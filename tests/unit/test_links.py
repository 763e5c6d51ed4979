"""The direct-link core without sockets: two LinkCores talk through an in-memory wire."""

from __future__ import annotations

import random

from zbus import wire
from zbus.links import (
    HANDSHAKE_TIMEOUT,
    LINK_TIMEOUT,
    PRELINK_DIALS,
    PRELINK_SCAN_S,
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


def core(me: str, max_links: int = 64, prelink: bool = False) -> LinkCore:
    return LinkCore(me, random.Random(1), max_links, data_port=5000, prelink=prelink)


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


def _listed(count: int) -> dict:
    return {f"C-p{i}": info(f"C-p{i}", f"tcp://127.0.0.1:{4000 + i}") for i in range(count)}


def _bring_up(dialer: LinkCore, peer: str, now: float) -> None:
    """Answer the dialer's pending handshake with ``peer`` as a listener that knows it would."""
    listener = core(peer)
    link = dialer.out[peer]
    hello = wire.LinkHello(dialer.my_id, peer, link.nonce, link.token)
    reply = listener.on_listener(b"conn-" + peer.encode(), hello, {dialer.my_id: info(dialer.my_id, "")}, now)
    dialer.on_link_message(peer, wire.decode(reply[0].header), now)


def test_room_under_max_links_is_filled_with_listed_peers_a_few_handshakes_at_a_time():
    clients = _listed(6)
    a = core(A, max_links=3, prelink=True)
    first = [x.peer for x in a.plan(clients, 0.0) if isinstance(x, Dial)]
    assert len(first) == PRELINK_DIALS  # not all at once
    assert [x for x in a.plan(clients, 0.1) if isinstance(x, Dial)] == []  # still dialing those
    for peer in first:
        _bring_up(a, peer, 0.2)
    assert set(a.up_links()) == set(first)
    assert [x for x in a.plan(clients, 0.3) if isinstance(x, Dial)] == []  # the next search waits a while
    more = [x.peer for x in a.plan(clients, PRELINK_SCAN_S + 0.1) if isinstance(x, Dial)]
    assert len(more) == 1 and more[0] not in first  # up to max_links = 3 in all
    _bring_up(a, more[0], PRELINK_SCAN_S + 0.2)
    assert [x for x in a.plan(clients, 10.0) if isinstance(x, Dial)] == []  # full: nothing more
    assert len(a.up_links()) == 3
    # Another client fills its links in another order (links spread over the fleet).
    orders = {tuple(x.peer for x in core(f"C-x{i}", 3, True).plan(clients, 0.0) if isinstance(x, Dial))
              for i in range(8)}
    assert len(orders) > 1


def test_a_peer_we_send_to_takes_the_place_of_a_prelinked_one():
    clients = _listed(4)
    a = core(A, max_links=2, prelink=True)
    prelinked = [x.peer for x in a.plan(clients, 0.0) if isinstance(x, Dial)]
    for peer in prelinked:
        _bring_up(a, peer, 0.1)
    other = next(p for p in clients if p not in prelinked)
    a.want([other])
    actions = a.plan(clients, 0.2)
    closed = [x.peer for x in actions if isinstance(x, Close)]
    assert [x.peer for x in actions if isinstance(x, Dial)] == [other]
    assert len(closed) == 1 and closed[0] in prelinked  # max_links holds: one prelink made room
    a.want([prelinked[0]])  # sending to a prelinked peer keeps its link as a wanted one
    assert len(a.out) == 2 and other in a.out


def test_prelinks_skip_peers_that_linked_to_us_need_a_punch_or_do_not_listen():
    clients = {f"C-p{i}": wire.ClientInfo(f"C-p{i}", f"p{i}", wire.NetState(
        private=[f"198.51.100.{30 + i}"], listen=f"tcp://0.0.0.0:{4000 + i}", public=[f"198.51.100.{30 + i}:5000"]))
        for i in range(3)}  # public hosts (no NAT)
    clients["C-unknown"] = info("C-unknown", "tcp://0.0.0.0:4300")  # public endpoint not known yet: wait
    clients["C-nolisten"] = info("C-nolisten", "")
    natted = wire.NetState(private=["10.1.0.5"], listen="tcp://0.0.0.0:4100", public=["198.51.100.9:5000"])
    clients["C-natted"] = wire.ClientInfo("C-natted", "n", natted)
    own = wire.NetState(private=["10.2.0.5"], listen="tcp://0.0.0.0:4200", public=["198.51.100.20:6000"])
    a = core(A, max_links=10, prelink=True)
    a.can_punch = True
    b = core("C-p0")  # C-p0 linked to A first
    b.want([A])
    hello = [x for x in b.plan({A: info(A, "tcp://127.0.0.1:4999")}, 0.0) if isinstance(x, Dial)][0].hello
    a.on_listener(b"conn-b", wire.decode(hello), {"C-p0": clients["C-p0"]}, 0.0)
    dialed = set()
    for step in range(4):
        dialed |= {x.peer for x in a.plan(clients, step * (PRELINK_SCAN_S + 0.1), own) if isinstance(x, Dial)}
        for peer in [p for p, link in a.out.items() if link.state == "dialing"]:
            _bring_up(a, peer, step * (PRELINK_SCAN_S + 0.1) + 0.05)
    assert dialed == {"C-p1", "C-p2"}


def test_prelink_off_and_max_links_zero_open_nothing_unasked():
    clients = _listed(3)
    assert core(A, max_links=3, prelink=False).plan(clients, 0.0) == []
    assert core(A, max_links=0, prelink=True).plan(clients, 0.0) == []


def test_a_failed_prelink_does_not_delay_the_link_a_first_message_asks_for():
    clients = {B: info(B, "tcp://0.0.0.0:4000", private=("10.9.0.7",))}  # an address we cannot reach
    a = core(A, max_links=4, prelink=True)
    assert [x.peer for x in a.plan(clients, 0.0) if isinstance(x, Dial)] == [B]
    assert [type(x) for x in a.tick(HANDSHAKE_TIMEOUT + 0.1)] == [Close]  # silent: it failed
    assert B not in a.retry_at and B in a.prelink_retry_at
    assert a.plan(clients, HANDSHAKE_TIMEOUT + 0.2) == []  # prelinks back off...
    a.want([B])
    assert [x.peer for x in a.plan(clients, HANDSHAKE_TIMEOUT + 0.3) if isinstance(x, Dial)] == [B]  # ...wanted not
    assert not a.out[B].prelinked
