"""The seed's Master rules over Raft: who is Master, and when the leader hands leadership over."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zbus.raft import RaftStatus, Role
from zbus.raft.policy import (
    ClusterView,
    LiveServer,
    MasterBasis,
    PolicyConfig,
    decide_master,
    should_transfer,
)

VOTERS = ("S-a", "S-b", "S-c", "S-d")


def raft_status(
    self_id: str,
    role: Role = Role.FOLLOWER,
    leader: str | None = None,
    voters: tuple[str, ...] = VOTERS,
    learners: tuple[str, ...] = (),
    transferee: str | None = None,
) -> RaftStatus:
    if role is Role.LEADER:
        leader = self_id
    return RaftStatus(self_id, 3, role, leader, 10, 10, 10, voters, learners, transferee)


def view(self_id: str, connections: dict[str, int], raft: RaftStatus | None = None) -> ClusterView:
    """Servers started in the order given (S-a first), with the given connection counts."""
    live = tuple(
        LiveServer(server_id, float(order), count)
        for order, (server_id, count) in enumerate(connections.items())
    )
    return ClusterView(self_id, live, raft or raft_status(self_id))


def leader_view(
    connections: dict[str, int],
    leader: str = "S-a",
    voters: tuple[str, ...] = VOTERS,
    learners: tuple[str, ...] = (),
    transferee: str | None = None,
) -> ClusterView:
    raft = raft_status(leader, Role.LEADER, voters=voters, learners=learners, transferee=transferee)
    return view(leader, connections, raft)


# ------------------------------------------------------------------------- who is Master


def test_lone_server_is_a_temporary_master_that_changes_no_membership() -> None:
    decision = decide_master(view("S-c", {"S-c": 3}, raft_status("S-c", Role.CANDIDATE)))
    assert (decision.master, decision.basis, decision.temporary) == ("S-c", MasterBasis.ALONE, True)
    assert not decision.may_change_membership


def test_lone_server_leading_its_own_single_voter_cluster_may_change_membership() -> None:
    decision = decide_master(view("S-a", {"S-a": 0}, raft_status("S-a", Role.LEADER, voters=("S-a",))))
    assert decision.master == "S-a" and decision.may_change_membership


@pytest.mark.parametrize("self_id", ["S-a", "S-b"])
def test_of_two_servers_the_one_started_earlier_is_master_whatever_raft_says(self_id: str) -> None:
    raft = raft_status(self_id, Role.LEADER if self_id == "S-b" else Role.FOLLOWER, leader="S-b")
    decision = decide_master(view(self_id, {"S-a": 0, "S-b": 50}, raft))
    assert (decision.master, decision.basis, decision.temporary) == ("S-a", MasterBasis.EARLIEST_START, False)


def test_of_two_servers_started_at_the_same_time_the_smaller_id_is_master() -> None:
    live = (LiveServer("S-b", 5.0, 0), LiveServer("S-a", 5.0, 0))
    assert decide_master(ClusterView("S-b", live, raft_status("S-b"))).master == "S-a"


def test_with_three_servers_the_raft_leader_is_master() -> None:
    decision = decide_master(view("S-a", {"S-a": 9, "S-b": 0, "S-c": 0}, raft_status("S-a", leader="S-c")))
    assert (decision.master, decision.basis, decision.may_change_membership) == (
        "S-c",
        MasterBasis.RAFT_LEADER,
        False,
    )
    assert decide_master(leader_view({"S-a": 0, "S-b": 0, "S-c": 0})).may_change_membership


def test_with_three_servers_there_is_no_master_until_a_reachable_leader_is_known() -> None:
    electing = view("S-a", {"S-a": 0, "S-b": 0, "S-c": 0}, raft_status("S-a", Role.PRE_CANDIDATE))
    assert decide_master(electing).master is None
    unreachable_leader = view("S-a", {"S-a": 0, "S-b": 0, "S-c": 0}, raft_status("S-a", leader="S-d"))
    assert decide_master(unreachable_leader).master is None


def test_view_must_list_this_server_once() -> None:
    with pytest.raises(ValueError, match="must include this server"):
        view("S-z", {"S-a": 0})
    with pytest.raises(ValueError, match="twice"):
        ClusterView("S-a", (LiveServer("S-a", 0, 0), LiveServer("S-a", 1, 0)), raft_status("S-a"))


# ------------------------------------------------------------------------- handing leadership over


def test_leader_hands_over_to_a_server_with_clearly_more_connections() -> None:
    assert (
        should_transfer(leader_view({"S-a": 10, "S-b": 13, "S-c": 4}), now=100.0, last_transfer_at=None)
        == "S-b"
    )


@pytest.mark.parametrize(
    ("mine", "theirs", "hands_over"),
    [(0, 1, False), (0, 2, True), (4, 5, False), (4, 6, True), (100, 124, False), (100, 125, True)],
)
def test_transfer_needs_at_least_max_of_two_and_a_quarter_more_connections(
    mine: int, theirs: int, hands_over: bool
) -> None:
    target = should_transfer(leader_view({"S-a": mine, "S-b": theirs, "S-c": 0}), 0.0, None)
    assert target == ("S-b" if hands_over else None)


def test_thresholds_are_configurable() -> None:
    strict = PolicyConfig(transfer_min_extra_connections=10, transfer_min_extra_ratio=0.0)
    busy = leader_view({"S-a": 0, "S-b": 9, "S-c": 0})
    assert should_transfer(busy, 0.0, None, strict) is None
    assert should_transfer(busy, 0.0, None) == "S-b"


def test_no_second_transfer_within_the_cooldown() -> None:
    busy = leader_view({"S-a": 0, "S-b": 50, "S-c": 0})
    config = PolicyConfig(transfer_cooldown=30.0)
    assert should_transfer(busy, now=129.0, last_transfer_at=100.0, config=config) is None
    assert should_transfer(busy, now=130.0, last_transfer_at=100.0, config=config) == "S-b"


def test_only_an_idle_leader_hands_over_and_only_to_a_live_voter() -> None:
    connections = {"S-a": 0, "S-b": 50, "S-c": 40, "S-e": 90}
    assert should_transfer(view("S-c", connections, raft_status("S-c", leader="S-a")), 0.0, None) is None
    assert should_transfer(leader_view(connections, transferee="S-c"), 0.0, None) is None
    as_learner = leader_view(connections, voters=("S-a", "S-c"), learners=("S-b",))
    assert should_transfer(as_learner, 0.0, None) == "S-c", "S-b is a learner and S-e no member at all"


def test_equally_busy_candidates_go_to_the_earliest_started() -> None:
    assert should_transfer(leader_view({"S-a": 0, "S-c": 9, "S-b": 9}), 0.0, None) == "S-c"


def test_of_two_servers_the_raft_leader_hands_over_to_the_master() -> None:
    young_leader = view("S-b", {"S-a": 0, "S-b": 40}, raft_status("S-b", Role.LEADER))
    assert should_transfer(young_leader, 0.0, None) == "S-a"
    assert should_transfer(leader_view({"S-a": 0, "S-b": 40}), 0.0, None) is None, "the Master leads already"


connection_counts = st.dictionaries(
    st.sampled_from(VOTERS), st.integers(min_value=0, max_value=10_000), min_size=3, max_size=4
)


@given(connection_counts)
def test_leadership_never_flaps_back_while_loads_stay_the_same(connections: dict[str, int]) -> None:
    """Following the policy with unchanged loads visits each server at most once, then stops."""
    leader: str | None = next(iter(connections))
    visited: list[str] = []
    while leader is not None:
        assert leader not in visited, f"leadership came back to {leader} via {visited}"
        visited.append(leader)
        leader = should_transfer(view(leader, connections, raft_status(leader, Role.LEADER)), 0.0, None)
    assert all(connections[after] > connections[before] for before, after in itertools.pairwise(visited))
