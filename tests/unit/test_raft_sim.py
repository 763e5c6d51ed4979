"""Raft nodes together on the in-memory network: scenarios, thousands of seeded random runs with
invariants checked after every step, and proof that the checker catches broken nodes."""

from __future__ import annotations

import random
import re
import statistics

import msgspec
import pytest

from tests.unit.raftsim import Faults, InvariantViolation, NodeFactory, Simulation
from zbus.raft import (
    ConfChangeOp,
    RaftAppend,
    RaftAppendResp,
    RaftConfig,
    RaftMessage,
    RaftNode,
    RaftPreVote,
    RaftVote,
    Role,
)

ONE_SECOND = 20.0  # ticks of 50 ms


def converged_sim(
    seed: int = 1, voters: int = 3, spares: int = 0, config: RaftConfig = RaftConfig()
) -> Simulation:
    sim = Simulation(seed, voters=voters, spares=spares, config=config)
    assert sim.run_until(sim.converged, ONE_SECOND), "no leader within a second"
    return sim


def leader_commit(sim: Simulation) -> int:
    leader = sim.leader()
    return sim.raft(leader).status().commit if leader is not None else 0


def commit_proposals(sim: Simulation, count: int) -> None:
    """Propose ``count`` commands at the leader and wait until it has committed them."""
    last_index = 0
    for _ in range(count):
        index = sim.propose_at_leader()
        assert index is not None, "no leader took the proposal"
        last_index = index
    assert sim.run_until(lambda: leader_commit(sim) >= last_index, ONE_SECOND)


def change_membership(sim: Simulation, op: ConfChangeOp, node_id: str) -> None:
    leader = sim.leader()
    assert leader is not None
    sim.act(leader, lambda raft: raft.propose_conf_change(op, node_id))
    assert sim.run_until(sim.converged, ONE_SECOND), f"{op} {node_id} did not commit"


def other_nodes(sim: Simulation, *excluded: str) -> list[str]:
    return [node_id for node_id in sim.nodes if node_id not in excluded]


def leader_of(sim: Simulation) -> str:
    leader = sim.leader()
    assert leader is not None
    return leader


def wait_new_leader(
    sim: Simulation, old: str, max_ticks: float = ONE_SECOND, check_every: float = 0.25
) -> bool:
    return sim.run_until(lambda: sim.leader() not in (None, old), max_ticks, check_every)


def transfer_to(sim: Simulation, target: str, max_ticks: float) -> bool:
    """Ask the leader to hand leadership to ``target``; True once ``target`` leads."""
    sim.act(leader_of(sim), lambda raft: raft.transfer_leadership(target))
    return sim.run_until(lambda: sim.leader() == target, max_ticks)


# ------------------------------------------------------------------------- elections


@pytest.mark.parametrize("voters", [3, 5])
def test_cluster_elects_one_leader_all_nodes_follow_within_a_second(voters: int) -> None:
    for seed in range(20):
        sim = converged_sim(seed, voters)
        statuses = sim.statuses()
        assert [status.role for status in statuses].count(Role.LEADER) == 1
        assert len({(status.leader, status.term) for status in statuses}) == 1


@pytest.mark.parametrize("voters", [3, 5])
def test_new_leader_is_elected_well_under_a_second_after_the_leader_crashes(voters: int) -> None:
    failover_ticks = []
    for seed in range(200):
        sim = converged_sim(seed, voters)
        sim.run_for(seed % 7 * 0.3)  # crash at different points of the heartbeat cycle
        old = leader_of(sim)
        sim.crash(old)
        crashed_at = sim.now
        assert wait_new_leader(sim, old, check_every=0.05), f"seed {seed}: no new leader within a second"
        failover_ticks.append(sim.now - crashed_at)
    assert statistics.median(failover_ticks) < ONE_SECOND / 2, sorted(failover_ticks)


def test_pre_vote_stops_an_isolated_node_from_disrupting_the_cluster() -> None:
    sim = converged_sim()
    leader = leader_of(sim)
    term = sim.raft(leader).status().term
    isolated = other_nodes(sim, leader)[0]
    sim.partition([isolated], other_nodes(sim, isolated))
    sim.run_for(3 * ONE_SECOND)
    assert sim.raft(isolated).status().term == term
    sim.heal()
    sim.run_for(ONE_SECOND)
    assert (sim.leader(), sim.raft(leader).status().term) == (leader, term)


def test_without_pre_vote_an_isolated_node_forces_a_new_term_when_it_returns() -> None:
    sim = converged_sim(config=RaftConfig(pre_vote=False))
    leader = leader_of(sim)
    term = sim.raft(leader).status().term
    isolated = other_nodes(sim, leader)[0]
    sim.partition([isolated], other_nodes(sim, isolated))
    sim.run_for(3 * ONE_SECOND)
    assert sim.raft(isolated).status().term > term
    sim.heal()
    assert sim.run_until(sim.converged, ONE_SECOND)
    assert sim.raft(leader_of(sim)).status().term > term


@pytest.mark.parametrize("check_quorum", [True, False])
def test_isolated_leader_steps_down_only_with_check_quorum(check_quorum: bool) -> None:
    config = RaftConfig(check_quorum=check_quorum)
    sim = converged_sim(config=config)
    old = leader_of(sim)
    sim.partition([old], other_nodes(sim, old))
    sim.run_for(2 * config.election_ticks)  # a quorum check sees a full election timeout of silence
    assert (sim.raft(old).status().role is Role.LEADER) is not check_quorum
    assert wait_new_leader(sim, old), "the majority elects a leader"


# ------------------------------------------------------------------------- replication and restarts


def test_partitioned_follower_catches_up_when_the_partition_heals() -> None:
    sim = converged_sim()
    lagging = other_nodes(sim, leader_of(sim))[0]
    sim.partition([lagging], other_nodes(sim, lagging))
    for _ in range(30):
        assert sim.propose_at_leader() is not None
    sim.run_for(5)
    assert sim.raft(lagging).status().commit < sim.raft(leader_of(sim)).status().commit
    sim.heal()
    assert sim.run_until(sim.converged, ONE_SECOND)


def test_divergent_tail_is_replaced_in_a_few_round_trips() -> None:
    sim = converged_sim()
    old = leader_of(sim)
    sim.partition([old], other_nodes(sim, old))
    for _ in range(40):
        sim.act(old, lambda raft: raft.propose(b"doomed"))  # appended, never committed
    assert wait_new_leader(sim, old)
    commit_proposals(sim, 10)
    successor = other_nodes(sim, old, leader_of(sim))[0]  # a leader elected after the 10 commits ...
    assert transfer_to(sim, successor, 5)  # ... first probes the old node past them
    rejections: list[RaftAppendResp] = []
    sim.on_deliver.append(
        lambda message: (
            rejections.append(message)
            if isinstance(message, RaftAppendResp) and message.reject and message.frm == old
            else None
        )
    )
    sim.heal()
    assert sim.run_until(sim.converged, ONE_SECOND)
    assert 1 <= len(rejections) <= 3, f"{len(rejections)} rejected probes for a 40-entry divergent tail"


def test_restarted_follower_rejoins_and_reapplies_the_committed_log() -> None:
    sim = converged_sim()
    follower = other_nodes(sim, leader_of(sim))[0]
    commit_proposals(sim, 5)
    sim.crash(follower)
    commit_proposals(sim, 5)
    sim.restart(follower)
    assert sim.run_until(sim.converged, ONE_SECOND)
    assert sim.nodes[follower].applied == sim.checker.committed


# ------------------------------------------------------------------------- leadership transfer


def test_leadership_transfer_hands_over_to_each_target_within_a_few_ticks() -> None:
    sim = converged_sim()
    for target in ("n1", "n2", "n3", "n1"):
        if target != leader_of(sim):
            assert transfer_to(sim, target, 3), f"{leader_of(sim)} -> {target}"
            assert sim.run_until(sim.converged, ONE_SECOND)


def test_transfer_to_a_lagging_target_brings_its_log_up_to_date_first() -> None:
    sim = converged_sim()
    target = other_nodes(sim, leader_of(sim))[0]
    sim.partition([target], other_nodes(sim, target))
    for _ in range(20):
        assert sim.propose_at_leader() is not None
    sim.run_for(2)
    sim.heal()
    assert transfer_to(sim, target, 5)
    assert sim.run_until(sim.converged, ONE_SECOND)
    assert len(sim.checker.committed) > 20


# ------------------------------------------------------------------------- membership


def test_learner_receives_the_log_but_never_campaigns_nor_counts_for_quorum() -> None:
    sim = converged_sim(spares=1)
    campaigns_by_learner: list[RaftMessage] = []
    sim.on_deliver.append(
        lambda message: (
            campaigns_by_learner.append(message)
            if isinstance(message, RaftPreVote | RaftVote) and message.frm == "n4"
            else None
        )
    )
    change_membership(sim, ConfChangeOp.ADD_LEARNER, "n4")
    leader = leader_of(sim)
    assert sim.nodes["n4"].storage.entries == sim.nodes[leader].storage.entries
    leader_status = sim.raft(leader).status
    assert sim.run_until(lambda: dict(leader_status().replicated)["n4"] == leader_status().commit, 1), (
        "the leader sees the learner caught up"
    )
    for follower in other_nodes(sim, leader, "n4"):
        sim.crash(follower)
    commit = sim.raft(leader).status().commit
    sim.propose_at_leader()
    sim.run_for(2 * ONE_SECOND)
    assert sim.raft(leader).status().commit == commit, "leader plus learner is no quorum of three voters"
    assert sim.raft(leader).status().role is not Role.LEADER, "CheckQuorum does not count the learner either"
    assert campaigns_by_learner == [] and sim.raft("n4").status().role is Role.FOLLOWER


def test_promoted_learner_counts_for_quorum_and_can_lead() -> None:
    sim = converged_sim(spares=1)
    change_membership(sim, ConfChangeOp.ADD_LEARNER, "n4")
    change_membership(sim, ConfChangeOp.PROMOTE, "n4")
    assert sim.raft("n4").status().voters == ("n1", "n2", "n3", "n4")
    sim.crash(other_nodes(sim, leader_of(sim), "n4")[0])
    commit_before = sim.raft(leader_of(sim)).status().commit
    sim.propose_at_leader()
    assert sim.run_until(lambda: sim.raft(leader_of(sim)).status().commit > commit_before, ONE_SECOND), (
        "three of four voters commit only with the promoted learner's acknowledgement"
    )
    assert transfer_to(sim, "n4", 5)


def test_removed_voters_stop_counting_for_quorum() -> None:
    sim = converged_sim()
    leader = leader_of(sim)
    for removed in other_nodes(sim, leader):
        change_membership(sim, ConfChangeOp.REMOVE, removed)
        sim.crash(removed)
    assert sim.raft(leader).status().voters == (leader,)
    commit_proposals(sim, 3)


def test_membership_change_by_an_isolated_leader_is_undone_when_it_rejoins() -> None:
    sim = converged_sim(spares=1)
    old = leader_of(sim)
    sim.partition([old, "n4"], other_nodes(sim, old, "n4"))
    sim.act(old, lambda raft: raft.propose_conf_change(ConfChangeOp.ADD_LEARNER, "n4"))
    assert sim.raft(old).status().learners == ("n4",), "in force as soon as appended"
    assert wait_new_leader(sim, old)
    commit_proposals(sim, 1)
    sim.heal()
    assert sim.run_until(sim.converged, ONE_SECOND)
    assert sim.raft(old).status().learners == ()


# ------------------------------------------------------------------------- random faults, many seeds

RUNS_PER_CHUNK = 200
CHUNKS = {3: 10, 5: 10}  # 2000 three-node and 2000 five-node worlds: under a minute on two cores
CHAOS_TICKS = 100.0  # five simulated seconds of faults per world, then healing


def run_random_world(seed: int, voters: int, node_factory: NodeFactory = RaftNode) -> Simulation:
    """One seeded world: random faults and actions for CHAOS_TICKS, then heal and demand convergence."""
    world = random.Random(seed)
    config = RaftConfig(max_entries_per_append=world.choice((1, 3, 64)))
    sim = Simulation(
        seed, voters, spares=1, faults=Faults.random(world), config=config, node_factory=node_factory
    )
    sim.run_chaos(CHAOS_TICKS)
    sim.settle()
    return sim


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("voters", "first_seed"),
    [(voters, chunk * RUNS_PER_CHUNK) for voters, chunks in CHUNKS.items() for chunk in range(chunks)],
)
def test_random_faults_never_break_safety_and_the_cluster_recovers(voters: int, first_seed: int) -> None:
    for seed in range(first_seed, first_seed + RUNS_PER_CHUNK):
        sim = run_random_world(seed, voters)
        assert len(sim.checker.committed) > 1


# ------------------------------------------------------------------------- the checker catches broken nodes


class VotesTwicePerTerm(RaftNode):
    """Forgets whom it voted for whenever a new candidate asks."""

    def _handle_vote_request(self, request: RaftPreVote | RaftVote) -> None:
        if isinstance(request, RaftVote):
            self._vote = self._leader = None
        super()._handle_vote_request(request)


class VotesForAnyLog(RaftNode):
    """Skips the up-to-date check, so a candidate missing committed entries can win."""

    def _handle_vote_request(self, request: RaftPreVote | RaftVote) -> None:
        super()._handle_vote_request(msgspec.structs.replace(request, last_index=10**9, last_term=10**9))


class CommitsWhatTheLeaderCommitted(RaftNode):
    """Takes the leader's commit index even for entries it is not known to share."""

    def _handle_append(self, append: RaftAppend) -> None:
        super()._handle_append(append)
        self._log.commit_to(append.commit)


class NeverCampaigns(RaftNode):
    def _tick_election(self) -> None:
        pass


@pytest.mark.parametrize(
    ("broken_node", "expected"),
    [
        (VotesTwicePerTerm, "voted for .* then .* in term|Election Safety"),
        (VotesForAnyLog, "State Machine Safety|committed entry lost|overwrites committed"),
        (CommitsWhatTheLeaderCommitted, "State Machine Safety|committed entry lost|overwrites committed"),
        (NeverCampaigns, "no convergence"),
    ],
)
def test_invariant_checker_catches_a_broken_node(broken_node: NodeFactory, expected: str) -> None:
    for seed in range(50):
        try:
            run_random_world(seed, voters=3, node_factory=broken_node)
        except InvariantViolation as violation:
            assert re.search(expected, str(violation)), str(violation)
            return
    pytest.fail(f"{broken_node.__name__} broke no invariant in 50 seeded runs")
