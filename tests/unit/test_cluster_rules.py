"""The cluster's pure parts: endpoints, the replicated table, the leader's bookkeeping, merge and re-found rules."""

from __future__ import annotations

import msgspec
import pytest

from zbus import wire
from zbus.cluster.reconcile import ChangeMembership, Propose, next_change
from zbus.cluster.rules import advertised, as_observed, derive_cluster_endpoint, should_merge, should_refound
from zbus.cluster.table import ServerTable, TableRemove, TableUpsert, decode_command, encode_command, same_server
from zbus.raft import ConfChangeOp, RaftStatus, Role


def row(server_id: str, instance: str = "i", started_at: float = 1.0) -> wire.ClusterServer:
    return wire.ClusterServer(server_id, server_id.lower(), instance, "tcp://10.0.0.1:7700",
                              f"tcp://{server_id}:7701", started_at)


def raft(role: Role = Role.LEADER, voters=("A",), learners=(), commit=5, replicated=(), leader="A") -> RaftStatus:
    return RaftStatus("A", 2, role, leader, commit, commit, commit, tuple(voters), tuple(learners), None,
                      tuple(replicated))


def table_of(*rows: wire.ClusterServer) -> ServerTable:
    table = ServerTable()
    for r in rows:
        table.apply(TableUpsert(r))
    return table


# -- endpoints --------------------------------------------------------------------------------------

def test_the_cluster_endpoint_is_the_next_port_on_the_same_host():
    assert derive_cluster_endpoint("tcp://10.0.0.5:7700") == "tcp://10.0.0.5:7701"
    assert derive_cluster_endpoint("tcp://[::1]:7700") == "tcp://[::1]:7701"
    assert derive_cluster_endpoint("tcp://127.0.0.1:0") == "tcp://127.0.0.1:0"
    with pytest.raises(ValueError, match="cluster_listen"):
        derive_cluster_endpoint("tcp://h:65535")
    with pytest.raises(ValueError, match="tcp://host:port"):
        derive_cluster_endpoint("udp://h:1")


def test_a_wildcard_host_is_replaced_by_the_observed_address_and_others_are_kept():
    assert advertised("tcp://0.0.0.0:7701", "192.168.1.4") == "tcp://192.168.1.4:7701"
    assert advertised("tcp://*:7701", "fe80::1") == "tcp://[fe80::1]:7701"
    assert advertised("tcp://10.0.0.5:7701", "192.168.1.4") == "tcp://10.0.0.5:7701"
    assert advertised("tcp://0.0.0.0:7701", None) == "tcp://0.0.0.0:7701"
    seen = as_observed(wire.ClusterServer("S", "s", "i", "tcp://0.0.0.0:1", "tcp://0.0.0.0:2", 0.0), "1.2.3.4")
    assert (seen.data_endpoint, seen.cluster_endpoint, seen.net.public) == ("tcp://1.2.3.4:1", "tcp://1.2.3.4:2",
                                                                            ["1.2.3.4"])


# -- the replicated table ---------------------------------------------------------------------------

def test_table_commands_round_trip_through_msgpack_and_garbage_is_refused():
    for command in (TableUpsert(row("B")), TableRemove("B")):
        assert decode_command(encode_command(command)) == command
    with pytest.raises(msgspec.DecodeError):
        decode_command(b"\x92\xa4Nope\x01")


def test_the_table_keeps_join_order_and_counts_only_real_changes():
    table = table_of(row("A"), row("B"))
    applied = table.applied
    assert not table.apply(TableUpsert(row("A")))
    assert table.apply(TableUpsert(row("A", instance="restarted")))
    assert [r.id for r in table.rows()] == ["A", "B"] and table.get("A").instance == "restarted"
    assert table.apply(TableRemove("A")) and not table.apply(TableRemove("A"))
    assert table.applied == applied + 2 and list(table) == ["B"]


def test_rows_differing_only_in_observed_net_state_are_the_same_server():
    a = row("A")
    assert same_server(a, msgspec.structs.replace(a, net=wire.NetState(public=["1.2.3.4"])))
    assert not same_server(a, row("A", instance="other"))
    assert not same_server(a, None) and same_server(None, None)


# -- the leader's bookkeeping -----------------------------------------------------------------------

def test_a_leader_first_writes_its_own_row():
    assert next_change(row("A"), ServerTable(), raft(), {"A"}, {}, {}, 30.0) == Propose(TableUpsert(row("A")))


def test_a_newcomer_gets_a_row_then_joins_as_learner_then_is_promoted_once_caught_up():
    a, b = row("A"), row("B")
    announced = {"B": b}
    assert next_change(a, table_of(a), raft(), {"A", "B"}, announced, {}, 30.0) == Propose(TableUpsert(b))
    assert next_change(a, table_of(a, b), raft(), {"A", "B"}, announced, {}, 30.0) == ChangeMembership(
        ConfChangeOp.ADD_LEARNER, "B")
    lagging = raft(learners=("B",), replicated=(("B", 3),))
    assert next_change(a, table_of(a, b), lagging, {"A", "B"}, announced, {}, 30.0) is None
    caught_up = raft(learners=("B",), replicated=(("B", 5),))
    assert next_change(a, table_of(a, b), caught_up, {"A", "B"}, announced, {}, 30.0) == ChangeMembership(
        ConfChangeOp.PROMOTE, "B")
    assert next_change(a, table_of(a, b), raft(voters=("A", "B")), {"A", "B"}, announced, {}, 30.0) is None


def test_a_server_that_is_not_live_is_neither_added_nor_promoted():
    a, b = row("A"), row("B")
    assert next_change(a, table_of(a, b), raft(), {"A"}, {}, {"B": 1.0}, 30.0) is None
    assert next_change(a, table_of(a, b), raft(learners=("B",), replicated=(("B", 5),)), {"A"}, {},
                       {"B": 1.0}, 30.0) is None


def test_a_restarted_server_with_the_same_id_gets_its_new_row():
    a, old, new = row("A"), row("B", instance="old"), row("B", instance="new")
    change = next_change(a, table_of(a, old), raft(voters=("A", "B")), {"A", "B"}, {"B": new}, {}, 30.0)
    assert change == Propose(TableUpsert(new))


def test_a_dead_member_leaves_the_raft_membership_first_then_the_table_and_only_after_dead_after():
    a, b, c = row("A"), row("B"), row("C")
    table = table_of(a, b, c)
    voters = raft(voters=("A", "B", "C"))
    assert next_change(a, table, voters, {"A", "B"}, {"B": b}, {"C": 29.9}, 30.0) is None
    assert next_change(a, table, voters, {"A", "B"}, {"B": b}, {"C": 30.0}, 30.0) == ChangeMembership(
        ConfChangeOp.REMOVE, "C")
    assert next_change(a, table, raft(voters=("A", "B")), {"A", "B"}, {"B": b}, {"C": 31.0}, 30.0) == Propose(
        TableRemove("C"))


# -- merges and fresh starts ------------------------------------------------------------------------

def test_only_the_smaller_cluster_merges_and_equal_ones_agree_by_cluster_id():
    assert should_merge("K-b", 1, "K-a", 3) and not should_merge("K-a", 3, "K-b", 1)
    assert should_merge("K-b", 2, "K-a", 2) and not should_merge("K-a", 2, "K-b", 2)
    assert not should_merge("K-a", 1, "K-a", 5)  # same cluster
    assert not should_merge("K-a", 1, "", 0)  # a server without a cluster
    assert not should_merge("", 0, "K-a", 3)  # not in a cluster: bootstrap, not merge


def test_a_survivor_starts_afresh_only_when_a_quorum_is_gone_for_dead_after():
    three = raft(role=Role.FOLLOWER, voters=("A", "B", "C"), leader=None)
    assert not should_refound("A", three, {"B": 40.0}, 30.0)  # A and C still make a quorum
    assert not should_refound("A", three, {"B": 40.0, "C": 29.0}, 30.0)
    assert should_refound("A", three, {"B": 40.0, "C": 31.0}, 30.0)
    two = raft(role=Role.FOLLOWER, voters=("A", "B"), leader=None)
    assert should_refound("A", two, {"B": 30.0}, 30.0)
    assert not should_refound("A", raft(voters=("A",)), {}, 30.0)  # already alone
    assert not should_refound("A", raft(voters=("A", "B")), {"B": 99.0}, 30.0)  # a leader has its quorum
