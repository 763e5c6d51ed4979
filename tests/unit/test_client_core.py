"""The client core without sockets: sessions, server tables, and Routes kept incrementally."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from zbus import wire
from zbus.client_core import ClientCore, SessionState, reachable_endpoint
from zbus.tables import ClientTable

ME = "C-me"


def core_with(endpoints: list[str]) -> ClientCore:
    return ClientCore(ME, "me", wire.NetState(), endpoints, "inst", b"i" * 16, b"o" * 16)


def register(core: ClientCore, index: int, server_id: str, table: ClientTable) -> None:
    core.transport_up(index, 0.0)
    core.receive(index, wire.Welcome(server_id, server_id), 0.0)
    core.receive(index, table.snapshot(), 0.0)


def test_a_server_announced_on_all_interfaces_is_reached_by_the_known_host():
    assert reachable_endpoint("tcp://0.0.0.0:7701", "tcp://10.0.0.5:7700") == "tcp://10.0.0.5:7701"
    assert reachable_endpoint("tcp://10.0.0.6:7700", "tcp://10.0.0.5:7700") == "tcp://10.0.0.6:7700"


def test_server_tables_add_unknown_servers_once():
    core = core_with(["tcp://10.0.0.5:7700"])
    register(core, 0, "S-a", ClientTable("S-a"))
    table = wire.ServerTable(3, "S-b", [
        wire.ServerStatus("S-a", "a", "tcp://10.0.0.5:7700", "server", True, 0),
        wire.ServerStatus("S-b", "b", "tcp://0.0.0.0:7800", "master", True, 0),
    ])
    core.receive(0, table, 0.0)
    core.receive(0, table, 0.0)
    assert core.take_added() == [1]
    assert [s.endpoint for s in core.sessions] == ["tcp://10.0.0.5:7700", "tcp://10.0.0.5:7800"]
    assert core.master == "S-b"
    assert core.routes().endpoints == ("tcp://10.0.0.5:7700", "tcp://10.0.0.5:7800")


def test_a_version_gap_asks_for_a_resync():
    core = core_with(["tcp://a:1"])
    table = ClientTable("S-a")
    register(core, 0, "S-a", table)
    table.upsert(wire.ClientInfo("C-1", "one"))
    table.take_delta()
    table.upsert(wire.ClientInfo("C-2", "two"))
    [(index, frame)] = core.receive(0, table.take_delta(), 0.0)
    assert (index, wire.decode(frame)) == (0, wire.Resync())


def test_losing_the_transport_clears_that_servers_list():
    core = core_with(["tcp://a:1"])
    table = ClientTable("S-a")
    table.upsert(wire.ClientInfo("C-1", "one"))
    table.take_delta()
    register(core, 0, "S-a", table)
    assert set(core.routes().holders) == {"C-1"}
    core.transport_down(0)
    routes = core.routes()
    assert routes.holders == {} and routes.registered == ()
    assert core.sessions[0].state is SessionState.DOWN


ops = st.lists(st.tuples(st.integers(0, 1), st.booleans(), st.integers(0, 12), st.sampled_from(["x", "y", ""])),
               max_size=80)


@settings(max_examples=150)
@given(ops)
def test_incremental_routes_equal_routes_built_from_scratch(steps):
    core = core_with(["tcp://a:1", "tcp://b:1"])
    tables = [ClientTable("S-a"), ClientTable("S-b")]
    for index, table in enumerate(tables):
        register(core, index, table.server_id, table)
    for index, join, n, name in steps:
        table = tables[index]
        client_id = ME if n == 0 else f"C-{n}"
        table.upsert(wire.ClientInfo(client_id, name)) if join else table.remove(client_id)
        delta = table.take_delta()
        if delta is not None:
            core.receive(index, delta, 0.0)
        routes = core.routes()
        expected_holders = {}
        for i, t in enumerate(tables):
            for info in t.entries():
                if info.id != ME:
                    expected_holders.setdefault(info.id, []).append(i)
        assert dict(routes.holders) == {k: tuple(v) for k, v in expected_holders.items()}
        expected_names: dict[str, set[str]] = {}
        for client_id, info in routes.clients.items():
            assert info == tables[routes.holders[client_id][0]].get(client_id)
            if info.name:
                expected_names.setdefault(info.name, set()).add(client_id)
        assert {k: set(v) for k, v in routes.names.items()} == expected_names


def test_a_server_table_cannot_make_a_client_dial_more_than_max_servers():
    from zbus.client_core import MAX_SERVERS
    core = core_with(["tcp://10.0.0.5:7700"])
    register(core, 0, "S-a", ClientTable("S-a"))
    flood = wire.ServerTable(2, "S-a", [
        wire.ServerStatus(f"S-{i}", f"s{i}", f"tcp://10.9.{i // 250}.{i % 250}:7700", "server", True, 0)
        for i in range(3 * MAX_SERVERS)])
    core.receive(0, flood, 0.0)
    assert len(core.sessions) == MAX_SERVERS
    assert core.servers_ignored == 3 * MAX_SERVERS - (MAX_SERVERS - 1)


def _hellos(out: list[tuple[int, bytes]]) -> list[wire.Hello]:
    return [h for h in (wire.decode(frame) for _, frame in out) if isinstance(h, wire.Hello)]


def test_a_fresh_connection_asks_the_reflector_first_so_its_hello_carries_the_public_endpoint():
    core = core_with(["tcp://a:1"])
    assert core.transport_up(0, 10.0) == []  # no Hello yet: the probe goes first
    [(index, nonce)] = core.probes(10.0)
    assert index == 0 and core.tick(10.1) == []
    [hello] = _hellos(core.observed(nonce, "203.0.113.7", 4000, 10.01))
    assert hello.net.public == ["203.0.113.7:4000"]
    core.receive(0, wire.Welcome("S-a", "a"), 10.02)
    assert core.probes(11.5) == [(0, nonce)]  # the alternate port has not answered: ask both again
    from zbus.client_core import ALT_NONCE
    core.observed(nonce + ALT_NONCE, "203.0.113.7", 4000, 11.51)
    assert core.probes(13.0) == []  # both answered: no more rounds


def test_without_an_answer_the_hello_goes_after_the_probe_wait_and_probing_goes_on():
    from zbus.client_core import HELLO_PROBE_WAIT
    core = core_with(["tcp://a:1"])
    core.transport_up(0, 10.0)
    [(_, nonce)] = core.probes(10.0)
    assert _hellos(core.tick(10.0 + HELLO_PROBE_WAIT / 2)) == []
    [hello] = _hellos(core.tick(10.0 + HELLO_PROBE_WAIT))
    assert hello.net.public == []
    core.receive(0, wire.Welcome("S-a", "a"), 10.3)
    assert core.probes(11.0) == [(0, nonce)]  # still asking, now as a registered client
    [(_, frame)] = core.observed(nonce, "203.0.113.7", 4000, 11.01)
    assert wire.decode(frame) == wire.NetState(public=["203.0.113.7:4000"])  # reported once it is known


def test_a_new_connection_asks_the_reflector_again():
    core = core_with(["tcp://a:1"])
    core.transport_up(0, 10.0)
    [(_, nonce)] = core.probes(10.0)
    core.observed(nonce, "203.0.113.7", 4000, 10.0)
    core.transport_down(0)
    assert core.transport_up(0, 20.0) == []
    [(_, second)] = core.probes(20.0)
    assert second != nonce


def test_unanswered_hellos_back_off_and_a_late_second_welcome_keeps_the_list():
    from zbus.client_core import HELLO_RETRY, HELLO_RETRY_MAX
    core = core_with(["tcp://a:1"])
    [(_, nonce)] = (core.transport_up(0, 0.0), core.probes(0.0))[1]
    now, sent = 0.0, []
    core.observed(nonce, "203.0.113.7", 4000, now)  # the first Hello goes at once
    sent.append(now)
    while now < 30.0:  # a loaded server: no Welcome for 30 s
        now += 0.05
        if _hellos(core.tick(now)):
            sent.append(now)
    gaps = [round(b - a, 1) for a, b in zip(sent, sent[1:])]
    assert gaps[:4] == [HELLO_RETRY, 2 * HELLO_RETRY, 4 * HELLO_RETRY, 8 * HELLO_RETRY]
    assert max(gaps) == HELLO_RETRY_MAX and len(sent) < 12
    table = ClientTable("S-a")
    table.upsert(wire.ClientInfo("C-1", "one"))
    core.receive(0, wire.Welcome("S-a", "a"), now)
    core.receive(0, table.snapshot(), now)
    assert set(core.routes().clients) == {"C-1"}
    core.receive(0, wire.Welcome("S-a", "a"), now)  # the answer to a repeated Hello
    assert set(core.routes().clients) == {"C-1"} and core.sessions[0].synced


def test_the_reflectors_alternate_port_tells_a_symmetric_nat_with_one_server():
    from zbus.client_core import ALT_NONCE
    from zbus.punchlink import hard_from_public
    for alt_port, hard in ((4000, False), (4711, True)):  # cone: the same mapping; symmetric: another
        core = core_with(["tcp://a:1"])
        core.transport_up(0, 10.0)
        [(_, nonce)] = core.probes(10.0)
        core.observed(nonce + ALT_NONCE, "203.0.113.7", alt_port, 10.01)  # (may come first)
        [hello] = _hellos(core.observed(nonce, "203.0.113.7", 4000, 10.02))
        assert hard_from_public(hello.net.public) is hard, hello.net.public
        assert len(hello.net.public) == (2 if hard else 1)
