"""The punch and rendezvous cores, together, over a simulated internet of NATs (tests/unit/punchsim.py)."""

from __future__ import annotations

import random

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zbus import wire
from zbus.punch import Kind, PunchLimits, PunchSession, State, punch_mac
from zbus.rendezvous import REGISTRATION_TTL_S, SESSION_REUSE_S, Rendezvous, client_key, open_go, request_mac

from .punchsim import run_punch

LIMITS = PunchLimits()
MAX_PLAIN_PACKETS = 200  # per side: pings to <= a few candidates with backoff over 5 s, plus answers
MAX_BIRTHDAY_PACKETS = LIMITS.birthday_max_probes + LIMITS.birthday_sockets * LIMITS.birthday_hard_rounds + 400


def assert_agree(out) -> None:
    """Both punched, and each sends to the very address the other's packets come from."""
    assert out.a.state is State.PUNCHED and out.b.state is State.PUNCHED, (out.a.reason, out.b.reason)
    (a_sock, a_to), (b_sock, b_to) = out.a.path, out.b.path
    a_host, b_host = out.a_side.host, out.b_side.host
    for host, sock, to, other in ((a_host, a_sock, a_to, b_host), (b_host, b_sock, b_to, a_host)):
        if other.nat is None or other.nat.kind == "none" or to[0] == other.ip:
            assert to[0] == other.ip
        else:
            assert to[0] == other.nat.public_ip


@pytest.mark.parametrize("a_kind,b_kind", [
    ("none", "none"), ("none", "cone"), ("cone", "none"), ("cone", "cone"),
    ("none", "symmetric"), ("symmetric", "none"),
])
@pytest.mark.parametrize("seed", range(5))
def test_plain_punching_works_when_one_side_is_public_or_both_are_cone(a_kind, b_kind, seed):
    out = run_punch(a_kind, b_kind, seed)
    assert_agree(out)
    assert out.a.result(out.net.now).elapsed < 0.5
    assert out.a.packets_sent < MAX_PLAIN_PACKETS and out.b.packets_sent < MAX_PLAIN_PACKETS


@pytest.mark.parametrize("a_kind,b_kind", [("cone", "symmetric"), ("symmetric", "cone")])
def test_birthday_probing_opens_cone_to_symmetric_paths_in_bounded_packets(a_kind, b_kind):
    wins = 0
    for seed in range(20):
        out = run_punch(a_kind, b_kind, seed)
        hard = out.a if a_kind == "symmetric" else out.b
        assert hard.sockets_wanted == LIMITS.birthday_sockets
        assert out.a.packets_sent <= MAX_BIRTHDAY_PACKETS and out.b.packets_sent <= MAX_BIRTHDAY_PACKETS
        if out.a.state is State.PUNCHED:
            assert_agree(out)
            wins += 1
        else:
            assert out.a.state is State.FAILED
    assert wins >= 18  # 1-(1-256/64512)^2048 = 99.97 %, less what is lost to early probes


def test_symmetric_to_symmetric_fails_cleanly_at_the_deadline():
    out = run_punch("symmetric", "symmetric", seed=1)
    for side in (out.a, out.b):
        result = side.result(out.net.now)
        assert result.state is State.FAILED and "use the relay" in result.reason
        assert side.sockets_wanted == 1  # no birthday attack between two hard sides
        assert side.deadline - side.started == pytest.approx(LIMITS.deadline)
        assert side.next_deadline() is None


def test_two_hosts_behind_one_nat_meet_by_private_address():
    out = run_punch("cone", "cone", seed=3, same_nat=True)
    assert out.a.state is State.PUNCHED and out.b.state is State.PUNCHED
    assert out.a.path[1][0] == out.b_side.host.ip and out.b.path[1][0] == out.a_side.host.ip


def test_cone_to_cone_punches_through_20_percent_loss_on_both_sides():
    punched = sum(run_punch("cone", "cone", seed, loss=0.2).a.state is State.PUNCHED for seed in range(30))
    assert punched >= 28


@settings(max_examples=40, deadline=None)
@given(a_kind=st.sampled_from(["none", "cone", "symmetric"]), b_kind=st.sampled_from(["none", "cone", "symmetric"]),
       seed=st.integers(0, 2**31), loss=st.sampled_from([0.0, 0.1, 0.3]))
def test_any_topology_ends_in_bounded_time_and_a_punched_pair_agrees(a_kind, b_kind, seed, loss):
    limits = PunchLimits(birthday_max_probes=512, birthday_sockets=64)  # keep examples fast
    out = run_punch(a_kind, b_kind, seed, loss=loss, limits=limits)
    for side in (out.a, out.b):
        assert side.state is not State.PUNCHING
        assert side.result(out.net.now).elapsed <= limits.birthday_deadline + 1e-9 or side.state is State.PUNCHED
        assert side.packets_sent <= limits.birthday_max_probes + 64 * 3 + 600
    if a_kind == b_kind == "symmetric":
        assert out.a.state is State.FAILED
    if out.a.state is State.PUNCHED and out.b.state is State.PUNCHED:
        assert_agree(out)


# -- authentication --------------------------------------------------------------------------------


def _session(own="C-a", peer="C-b", controlling=False, secret=b"k" * 32) -> PunchSession:
    return PunchSession(own, peer, b"S" * 16, secret, "easy", "easy", controlling, ["198.51.100.1:5000"],
                        0.0, random.Random(1))


def _punch(frm, to, session, kind, secret, txid=b"t" * 8) -> bytes:
    return wire.encode(wire.Punch(frm, to, session, int(kind), txid, punch_mac(secret, frm, to, session, kind, txid)))


@pytest.mark.parametrize("forgery", ["wrong secret", "wrong session", "ids swapped", "other sender", "bad mac"])
def test_a_stranger_cannot_take_over_the_path(forgery):
    core = _session()
    core.datagrams_to_send()
    good = dict(frm="C-b", to="C-a", session=b"S" * 16, kind=Kind.NOMINATE, secret=b"k" * 32)
    bad = dict(good)
    if forgery == "wrong secret":
        bad["secret"] = b"x" * 32
    elif forgery == "wrong session":
        bad["session"] = b"T" * 16
    elif forgery == "ids swapped":
        bad["frm"], bad["to"] = "C-a", "C-b"
    elif forgery == "other sender":
        bad["frm"] = "C-mallory"
    data = _punch(**bad)
    if forgery == "bad mac":
        data = data[:-1] + bytes([data[-1] ^ 1])
    assert core.receive(0.01, 0, ("192.0.2.66", 6666), data) is False
    assert core.state is State.PUNCHING and core.dropped == 1
    assert not [s for s in core.datagrams_to_send() if s.addr == ("192.0.2.66", 6666)]  # no answer
    assert core.receive(0.02, 0, ("198.51.100.1", 5000), _punch(**good)) is True
    assert core.state is State.PUNCHED and core.path == (0, ("198.51.100.1", 5000))


def test_a_public_peer_answers_the_observed_source_not_the_reported_one():
    core = _session()
    core.datagrams_to_send()
    observed = ("203.0.113.102", 61234)  # a symmetric NAT mapped the peer elsewhere than it reported
    core.receive(0.01, 0, observed, _punch("C-b", "C-a", b"S" * 16, Kind.PING, b"k" * 32))
    sent = core.datagrams_to_send()
    assert sent[0].addr == observed and wire.decode(sent[0].data).kind == Kind.PONG
    assert any(s.addr == observed and wire.decode(s.data).kind == Kind.PING for s in sent)  # learned


def test_retries_back_off_and_stop_at_the_deadline():
    core = _session()
    times = []
    now = 0.0
    for _ in range(1000):
        if core.datagrams_to_send():
            times.append(now)
        deadline = core.next_deadline()
        if deadline is None:
            break
        now = deadline
        core.handle_timer(now)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert gaps == sorted(gaps) and gaps[0] == pytest.approx(LIMITS.first_interval)
    assert max(gaps) <= LIMITS.max_interval + 1e-9
    assert core.state is State.FAILED and now == pytest.approx(LIMITS.deadline)
    assert len(times) <= 23  # per candidate: 0, 50 ms, x1.5 ... capped at 250 ms, until 5 s


def test_punched_path_sends_keepalives_and_is_lost_after_silence():
    core = _session()
    core.receive(0.01, 0, ("198.51.100.1", 5000), _punch("C-b", "C-a", b"S" * 16, Kind.NOMINATE, b"k" * 32))
    core.datagrams_to_send()
    assert core.next_deadline() == pytest.approx(0.01 + LIMITS.keepalive)
    core.handle_timer(0.01 + LIMITS.keepalive)
    [ping] = core.datagrams_to_send()
    assert wire.decode(ping.data).kind == Kind.PING and ping.addr == ("198.51.100.1", 5000)
    core.handle_timer(0.01 + LIMITS.dead_after)
    assert core.state is State.LOST


# -- rendezvous ------------------------------------------------------------------------------------


def _req(frm, to="", private=("10.1.0.2",), port=4000, hard=False):
    return wire.PunchRequest(frm, to, b"n", list(private), port, hard)


def test_rendezvous_registers_the_observed_socket_and_introduces_both_sides():
    rdv = Rendezvous(random.Random(7).randbytes)
    [ack] = rdv.handle(0.0, "203.0.113.10", ("203.0.113.102", 999), _req("C-b", hard=True, private=("10.2.0.2",)))
    assert wire.decode(ack.data) == wire.Observed(b"n", "203.0.113.102", 999)
    replies = rdv.handle(0.1, "203.0.113.10", ("203.0.113.101", 4000), _req("C-a", "C-b"))
    to_a, to_b = (wire.decode(r.data) for r in replies)
    assert [r.to for r in replies] == [("203.0.113.101", 4000), ("203.0.113.102", 999)]
    assert to_a.peer == "C-b" and to_a.controlling and to_a.role == "easy" and to_a.peer_role == "hard"
    assert to_a.candidates == ["203.0.113.102:999", "10.2.0.2:4000"]
    assert to_b.peer == "C-a" and not to_b.controlling and to_b.candidates[0] == "203.0.113.101:4000"
    assert to_a.session == to_b.session and to_a.secret == to_b.secret and len(to_a.secret) == 32
    again = [wire.decode(r.data) for r in rdv.handle(0.2, "203.0.113.10", ("203.0.113.101", 4000), _req("C-a", "C-b"))]
    assert again[1].session == to_b.session  # a retried request does not start another session
    later = [wire.decode(r.data) for r in rdv.handle(0.1 + SESSION_REUSE_S, "203.0.113.10",
                                                     ("203.0.113.101", 4000), _req("C-a", "C-b"))]
    assert later[1].session != to_b.session


def test_rendezvous_refuses_unknown_or_expired_peers_and_calls_unnatted_peers_open():
    rdv = Rendezvous(random.Random(7).randbytes)
    [refusal] = rdv.handle(0.0, "s", ("198.51.100.1", 1), _req("C-a", "C-nobody"))
    assert "not registered" in wire.decode(refusal.data).refused
    rdv.handle(0.0, "s", ("10.2.0.2", 4000), _req("C-b", private=("10.2.0.2",)))
    rdv.handle(REGISTRATION_TTL_S - 1, "s", ("10.2.0.2", 4000), _req("C-b", private=("10.2.0.2",)))
    go = wire.decode(rdv.handle(REGISTRATION_TTL_S, "s", ("198.51.100.1", 1), _req("C-a", "C-b"))[0].data)
    assert go.peer_role == "open" and not go.refused
    [late] = rdv.handle(3 * REGISTRATION_TTL_S, "s", ("198.51.100.1", 1), _req("C-a", "C-b"))
    assert wire.decode(late.data).refused


def _signed(key: bytes, request: wire.PunchRequest) -> wire.PunchRequest:
    return msgspec.structs.replace(request, mac=request_mac(key, request))


def test_a_registered_id_needs_its_key_and_gets_its_secret_sealed():
    """Ids registered over TCP (a key from their Welcome) must MAC their UDP requests; their PunchGo
    is MACed and its secret sealed. An Id without a key (e.g. zbus-node punch) works as before."""
    keys = {"C-a": client_key(b"s" * 32, "C-a", "i-a"), "C-b": client_key(b"s" * 32, "C-b", "i-b")}
    rdv = Rendezvous(random.Random(7).randbytes, keys.get)
    forged = _req("C-b", private=("10.9.9.9",))
    assert rdv.handle(0.0, "s", ("198.51.100.66", 6666), forged) == []  # someone else speaking for C-b
    assert rdv.handle(0.0, "s", ("198.51.100.66", 6666), _signed(keys["C-a"], forged)) == []  # wrong key
    assert rdv.unauthenticated == 2 and rdv.registered("C-b") is None
    [ack] = rdv.handle(0.0, "s", ("203.0.113.102", 999), _signed(keys["C-b"], _req("C-b")))
    assert wire.decode(ack.data) == wire.Observed(b"n", "203.0.113.102", 999)
    tampered = msgspec.structs.replace(_signed(keys["C-a"], _req("C-a", "C-b")), port=1)
    assert rdv.handle(0.1, "s", ("203.0.113.101", 4000), tampered) == []
    to_a, to_b = (wire.decode(r.data) for r in
                  rdv.handle(0.1, "s", ("203.0.113.101", 4000), _signed(keys["C-a"], _req("C-a", "C-b"))))
    assert to_a.secret != to_b.secret  # each sealed with its own key, neither in clear
    opened_a, opened_b = open_go(keys["C-a"], to_a), open_go(keys["C-b"], to_b)
    assert opened_a.secret == opened_b.secret and len(opened_a.secret) == 32 and not opened_a.mac
    assert open_go(keys["C-b"], to_a) is None  # not for C-b: the MAC does not match
    assert open_go(keys["C-a"], msgspec.structs.replace(to_a, candidates=["198.51.100.66:6666"])) is None
    # An Id nobody registered over TCP here still uses the rendezvous without a MAC.
    [plain] = rdv.handle(0.2, "s", ("198.51.100.7", 7), _req("C-tool"))
    assert isinstance(wire.decode(plain.data), wire.Observed)


def test_the_simulated_symmetric_nat_defeats_plain_punching_without_birthday_probing():
    """Guards the model: without the birthday sockets and probes, cone<->symmetric must fail."""
    no_birthday = PunchLimits(birthday_sockets=1, birthday_max_probes=0)
    for seed in range(5):
        assert run_punch("cone", "symmetric", seed, limits=no_birthday).a.state is State.FAILED
