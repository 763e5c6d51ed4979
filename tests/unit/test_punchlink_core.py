"""When the link core punches instead of dialing, and how punched links ride the link machinery
(pure: LinkCore, no sockets). The real thing runs in tests/natlab/test_punchlink.py."""

from __future__ import annotations

import random

from zbus import wire
from zbus.links import LINK_TIMEOUT, Close, Dial, LinkCore, OpenData, PunchWanted, Reply, needs_punch
from zbus.punchlink import hard_from_public, server_udp

A, B = "C-a", "C-b"
NATED_A = wire.NetState(private=["10.1.0.2"], public=["203.0.113.101:5000"], listen="tcp://0.0.0.0:4001")
NATED_B = wire.NetState(private=["10.2.0.2"], public=["203.0.113.102:6000"], listen="tcp://0.0.0.0:4000")
PUBLIC_B = wire.NetState(private=["203.0.113.20"], public=["203.0.113.20:6000"], listen="tcp://0.0.0.0:4000")
SAME_NAT_B = wire.NetState(private=["10.1.0.3"], public=["203.0.113.101:7000"], listen="tcp://0.0.0.0:4000")


def core(me: str, prelink: bool = False) -> LinkCore:
    link_core = LinkCore(me, random.Random(1), 64, data_port=5000, prelink=prelink)
    link_core.can_punch = True
    return link_core


def test_needs_punch_only_for_a_peer_behind_another_nat():
    assert needs_punch(NATED_A, NATED_B)
    assert not needs_punch(NATED_A, PUBLIC_B)  # a public peer is dialed directly
    assert not needs_punch(NATED_A, SAME_NAT_B)  # behind our NAT: its private address works
    assert not needs_punch(NATED_A, wire.NetState(private=["10.2.0.2"]))  # unknown: dial as before
    assert not needs_punch(None, NATED_B)
    assert needs_punch(wire.NetState(private=["203.0.113.20"], public=["203.0.113.20:1"]), NATED_B)


def test_a_nated_peer_gets_one_punch_request_not_a_dial_and_a_failure_backs_off():
    a = core(A)
    a.want([B])
    clients = {B: wire.ClientInfo(B, "b", NATED_B)}
    assert a.plan(clients, 0.0, NATED_A) == [PunchWanted(B)]
    assert a.plan(clients, 0.5, NATED_A) == []  # asked already
    a.punch_failed(B, 1.0)
    assert a.plan(clients, 1.1, NATED_A) == []  # backing off (0.5-1.5 s)
    assert a.plan(clients, 3.0, NATED_A) == [PunchWanted(B)]
    b_public = {B: wire.ClientInfo(B, "b", PUBLIC_B)}
    assert [x.__class__ for x in core(A).plan(b_public, 0.0, NATED_A)] == []  # not wanted yet
    assert [x.__class__ for x in core(A, prelink=True).plan(b_public, 0.0, NATED_A)] == [Dial]  # a prelink
    assert core(A, prelink=True).plan(clients, 0.0, NATED_A) == []  # no prelink needs a punch
    direct = core(A)
    direct.want([B])
    assert [x.__class__ for x in direct.plan(b_public, 0.0, NATED_A)] == [Dial]


def test_a_pipe_is_dialed_as_a_punched_link_and_losing_it_falls_back():
    a, b = core(A), core(B)
    a.want([B])
    clients = {B: wire.ClientInfo(B, "b", NATED_B)}
    a.plan(clients, 0.0, NATED_A)
    a.pipe_up(B, "tcp://127.0.0.1:9001", "tcp://127.0.0.1:9002", "203.0.113.102:6000", 0.1)
    b.pipe_up(A, "tcp://127.0.0.1:9101", "tcp://127.0.0.1:9102", "203.0.113.101:5000", 0.1)
    dial = a.plan(clients, 0.2, NATED_A)
    assert len(dial) == 1 and isinstance(dial[0], Dial) and dial[0].address == "tcp://127.0.0.1:9001"
    replies = b.on_listener(b"conn", wire.decode(dial[0].hello), {A: wire.ClientInfo(A, "a", NATED_A)}, 0.2)
    assert isinstance(replies[0], Reply)
    opened = a.on_link_message(B, wire.decode(replies[0].header), 0.2)
    assert isinstance(opened[0], OpenData) and opened[0].endpoint == "tcp://127.0.0.1:9002"  # the bridge
    view = a.up_links()[B]
    assert (view.kind, view.address) == ("punched", "203.0.113.102:6000")
    assert b.tokens() == {a.out[B].token: (A, "punched")}  # messages on it arrive via="punched"
    # ...also before B's own pipe to A is up: A's LinkHello says it came through a pipe.
    c = core(B)
    c.on_listener(b"conn", wire.decode(dial[0].hello), {A: wire.ClientInfo(A, "a", NATED_A)}, 0.2)
    assert c.tokens() == {a.out[B].token: (A, "punched")}
    closed = a.pipe_down(B, 1.0)
    assert closed and isinstance(closed[0], Close) and closed[0].pipe
    assert B not in a.up_links() and B not in a.pipes
    later = a.plan(clients, 1.0 + LINK_TIMEOUT + 30.0, NATED_A)
    assert later == [PunchWanted(B)]  # punched afresh after the backoff


def test_helpers():
    assert server_udp("tcp://203.0.113.10:7700") == ("203.0.113.10", 7700)
    assert hard_from_public(["1.2.3.4:5", "1.2.3.5:6"]) and not hard_from_public(["1.2.3.4:5", "1.2.3.5:5"])


def test_prelinks_wait_until_they_can_tell_a_punch_is_needed_and_a_destination_punches_at_once():
    a = core(A, prelink=True)
    unknown_b = wire.NetState(private=["10.2.0.2"], listen="tcp://0.0.0.0:4000")  # no public endpoint yet
    assert a.plan({B: wire.ClientInfo(B, "b", unknown_b)}, 0.0, NATED_A) == []  # cannot tell yet: no prelink
    assert a.plan({B: wire.ClientInfo(B, "b", NATED_B)}, 5.0, NATED_A) == []  # needs a punch: never a prelink
    # A prelink that went out before our own public endpoint was known, then B becomes a destination:
    early = core(A, prelink=True)
    early.can_punch = False
    [dial] = early.plan({B: wire.ClientInfo(B, "b", NATED_B)}, 0.0, None)
    assert isinstance(dial, Dial) and early.out[B].prelinked
    early.can_punch = True
    early.want([B])
    actions = early.plan({B: wire.ClientInfo(B, "b", NATED_B)}, 0.5, NATED_A)
    assert [x.__class__ for x in actions] == [Close, PunchWanted]  # no 2 s handshake timeout first


def test_a_handshake_through_a_pipe_gets_longer_than_one_to_an_address():
    """A pipe is known to work, but its segments may wait for TCP's retransmission backoff: its Hello
    is given PUNCHED_HANDSHAKE_TIMEOUT, not the 2 s after which a dialed address counts as wrong
    (and giving up would throw the pipe away and punch again, with a growing backoff)."""
    from zbus.links import HANDSHAKE_TIMEOUT, PUNCHED_HANDSHAKE_TIMEOUT

    a = core(A)
    a.want([B])
    clients = {B: wire.ClientInfo(B, "b", NATED_B)}
    a.plan(clients, 0.0, NATED_A)
    a.pipe_up(B, "tcp://127.0.0.1:9001", "tcp://127.0.0.1:9002", "203.0.113.102:6000", 0.1)
    [dial] = a.plan(clients, 0.2, NATED_A)
    assert isinstance(dial, Dial)
    assert a.tick(0.2 + HANDSHAKE_TIMEOUT + 0.1) == []  # still waiting for the Welcome
    gave_up = a.tick(0.2 + PUNCHED_HANDSHAKE_TIMEOUT + 0.1)
    assert [x.__class__ for x in gave_up] == [Close] and gave_up[0].pipe  # then the pipe goes, as before
