"""One RaftNode at a time, fed hand-written messages: the rules of the protocol, one by one."""

from __future__ import annotations

import dataclasses
import random

import msgspec
import pytest

from zbus.raft import (
    ConfChangeOp,
    EntryKind,
    HardState,
    MemoryStorage,
    NotLeader,
    ProposalRejected,
    RaftAppend,
    RaftAppendResp,
    RaftConfig,
    RaftEntry,
    RaftHeartbeat,
    RaftHeartbeatResp,
    RaftMembership,
    RaftMessage,
    RaftNode,
    RaftPreVote,
    RaftPreVoteResp,
    RaftTimeoutNow,
    RaftVote,
    RaftVoteResp,
    Ready,
    Role,
    TransferRejected,
    encode_membership,
)
from zbus.raft.leader import Progress

CONFIG = RaftConfig()
PEERS = ("n1", "n2", "n3")


def bootstrap_entry(*voters: str) -> RaftEntry:
    return RaftEntry(1, 1, EntryKind.CONFIG, encode_membership(RaftMembership(voters=voters)))


def node_with_log(
    terms: list[int], term: int, node_id: str = "n1", commit: int = 1
) -> tuple[RaftNode, MemoryStorage]:
    """A node restarted from a stored log: the bootstrap entry, then one entry per given term."""
    storage = MemoryStorage()
    entries = [bootstrap_entry(*PEERS)]
    entries += [
        RaftEntry(t, index, EntryKind.NORMAL, b"x%d" % index) for index, t in enumerate(terms, start=2)
    ]
    storage.save(HardState(term=term, commit=commit), entries)
    return RaftNode(node_id, PEERS, CONFIG, random.Random(1), storage), storage


def drain(node: RaftNode, storage: MemoryStorage | None = None) -> Ready:
    """What a driver does: take the Ready, persist it, advance."""
    ready = node.ready()
    if storage is not None:
        storage.save(ready.hard_state, ready.entries)
    node.advance(ready)
    return ready


def sent(node: RaftNode, storage: MemoryStorage | None = None) -> list[RaftMessage]:
    return list(drain(node, storage).messages)


def tick_until_campaign(node: RaftNode) -> tuple[int, list[RaftMessage]]:
    """Tick a follower until it campaigns: (ticks it took, its requests)."""
    for ticks in range(1, 2 * CONFIG.election_ticks + 1):
        node.tick()
        messages = sent(node)
        if messages:
            return ticks, messages
    raise AssertionError(f"{node.id} did not campaign within {2 * CONFIG.election_ticks} ticks")


def elect(node: RaftNode) -> None:
    """Win the pre-vote and the vote with grants from every peer."""
    _, pre_votes = tick_until_campaign(node)
    for request in pre_votes:
        node.step(RaftPreVoteResp(request.to, node.id, request.term, granted=True))
    for request in sent(node):
        assert isinstance(request, RaftVote)
        node.step(RaftVoteResp(request.to, node.id, request.term, granted=True))
    assert node.status().role is Role.LEADER
    drain(node)


def new_cluster_node(node_id: str = "n1") -> RaftNode:
    node = RaftNode(node_id, PEERS, CONFIG, random.Random(7))
    drain(node)
    return node


# ------------------------------------------------------------------------- elections


def test_candidate_asks_for_pre_votes_before_raising_its_term() -> None:
    node = new_cluster_node()
    _, pre_votes = tick_until_campaign(node)
    assert {type(message) for message in pre_votes} == {RaftPreVote}
    assert {message.to for message in pre_votes} == {"n2", "n3"}
    assert node.status().term == 1 and node.status().role is Role.PRE_CANDIDATE


def test_election_timeout_is_randomized_between_one_and_two_base_timeouts() -> None:
    timeouts = set()
    for seed in range(40):
        node = RaftNode("n1", PEERS, CONFIG, random.Random(seed))
        drain(node)
        ticks, _ = tick_until_campaign(node)
        timeouts.add(ticks)
    assert min(timeouts) >= CONFIG.election_ticks and max(timeouts) < 2 * CONFIG.election_ticks
    assert len(timeouts) > 3


def test_node_wins_with_a_majority_and_appends_a_noop_of_its_term() -> None:
    node = new_cluster_node()
    elect(node)
    status = node.status()
    assert (status.role, status.leader, status.term, status.last_index) == (Role.LEADER, "n1", 2, 2)


def test_vote_is_refused_to_a_candidate_with_an_older_log() -> None:
    node, _ = node_with_log([2, 2], term=2)
    node.step(RaftVote("n2", "n1", 3, last_index=5, last_term=1))
    assert sent(node) == [RaftVoteResp("n1", "n2", 3, granted=False)]
    node.step(RaftVote("n3", "n1", 3, last_index=3, last_term=2))
    assert sent(node) == [RaftVoteResp("n1", "n3", 3, granted=True)]


def test_node_votes_once_per_term() -> None:
    node = new_cluster_node()
    node.step(RaftVote("n2", "n1", 2, last_index=1, last_term=1))
    node.step(RaftVote("n3", "n1", 2, last_index=1, last_term=1))
    node.step(RaftVote("n2", "n1", 2, last_index=1, last_term=1))  # a retry of the vote already cast
    assert sent(node) == [
        RaftVoteResp("n1", "n2", 2, granted=True),
        RaftVoteResp("n1", "n3", 2, granted=False),
        RaftVoteResp("n1", "n2", 2, granted=True),
    ]


def test_follower_in_leader_lease_ignores_votes_for_a_later_term() -> None:
    node = new_cluster_node()
    node.step(RaftHeartbeat("n2", "n1", 2, commit=1))
    drain(node)
    node.step(RaftVote("n3", "n1", 3, last_index=1, last_term=1))
    node.step(RaftPreVote("n3", "n1", 3, last_index=1, last_term=1))
    assert sent(node) == [] and node.status().term == 2
    for _ in range(CONFIG.election_ticks):
        node.tick()
    node.step(RaftVote("n3", "n1", 3, last_index=1, last_term=1))
    assert sent(node)[-1] == RaftVoteResp("n1", "n3", 3, granted=True)


def test_transfer_vote_bypasses_the_leader_lease() -> None:
    node = new_cluster_node()
    node.step(RaftHeartbeat("n2", "n1", 2, commit=1))
    drain(node)
    node.step(RaftVote("n3", "n1", 3, last_index=1, last_term=1, transfer=True))
    assert sent(node) == [RaftVoteResp("n1", "n3", 3, granted=True)]


def test_pre_vote_grant_does_not_change_term_or_vote() -> None:
    node = new_cluster_node()
    node.step(RaftPreVote("n2", "n1", 2, last_index=1, last_term=1))
    assert sent(node) == [RaftPreVoteResp("n1", "n2", 2, granted=True)]
    assert node.status().term == 1
    node.step(RaftVote("n3", "n1", 2, last_index=1, last_term=1))
    assert sent(node) == [RaftVoteResp("n1", "n3", 2, granted=True)]


def test_node_joining_without_peers_waits_to_be_added() -> None:
    joining = RaftNode("n4", (), CONFIG, random.Random(1))
    for _ in range(10 * CONFIG.election_ticks):
        joining.tick()
    assert sent(joining) == [] and joining.status().voters == ()


def test_votes_from_non_voters_do_not_count() -> None:
    node = new_cluster_node()
    tick_until_campaign(node)
    for stranger in ("n4", "n5"):
        node.step(RaftPreVoteResp(stranger, "n1", 2, granted=True))
    assert node.status().role is Role.PRE_CANDIDATE


def test_campaign_to_a_single_voter_wins_at_once() -> None:
    node = RaftNode("solo", ("solo",), CONFIG, random.Random(1))
    for _ in range(2 * CONFIG.election_ticks):
        node.tick()
    assert node.status().role is Role.LEADER
    node.propose(b"alone")
    assert [entry.data for entry in drain(node).committed_entries][-1] == b"alone"


# ------------------------------------------------------------------------- replication


def test_leader_commits_old_term_entries_only_through_an_entry_of_its_own_term() -> None:
    """Raft §5.4.2 (the thesis' Figure 8): counting replicas commits only current-term entries."""
    node, _ = node_with_log([2], term=3)  # entry 2 from term 2, never committed
    elect(node)  # term 4, noop at index 3
    node.step(RaftAppendResp("n2", "n1", 4, index=2))
    drain(node)
    assert node.status().commit == 1, "a majority holds entry 2, but it is from an older term"
    node.step(RaftAppendResp("n2", "n1", 4, index=3))
    assert node.status().commit == 3


def test_follower_rejects_a_gap_with_a_hint_that_skips_its_divergent_term() -> None:
    node, _ = node_with_log([2, 2, 2, 2, 2], term=5)  # indexes 2..6 at term 2
    node.step(RaftAppend("n2", "n1", 5, prev_index=9, prev_term=5, commit=1))
    [response] = sent(node)
    assert response == RaftAppendResp("n1", "n2", 5, index=9, reject=True, hint_index=6, hint_term=2)
    node.step(RaftAppend("n2", "n1", 5, prev_index=6, prev_term=4, commit=1))
    [response] = sent(node)
    assert isinstance(response, RaftAppendResp)
    assert (response.hint_index, response.hint_term) == (6, 2), (
        "no term-4 entry: term 2 is the last that may match"
    )


def test_leader_skips_every_index_of_a_term_the_follower_cannot_hold() -> None:
    node, _ = node_with_log([3, 3, 3, 3], term=4)  # indexes 2..5 at term 3
    elect(node)  # term 5, noop at 6; the first probe to n2 is anchored at (5, 3)
    node.step(RaftAppendResp("n2", "n1", 5, index=5, reject=True, hint_index=5, hint_term=2))
    [probe] = [message for message in sent(node) if message.to == "n2"]
    assert isinstance(probe, RaftAppend) and probe.prev_index == 1, (
        "term 3 entries cannot match a term-2 tail"
    )


def test_stale_or_duplicated_rejection_does_not_move_the_probe() -> None:
    probe = Progress(next=10)
    assert probe.step_back(rejected=9, hint=3) and probe.next == 4
    assert not probe.step_back(rejected=9, hint=8), "an answer to an older probe"
    assert probe.next == 4
    replicating = Progress(next=10, match=6, probing=False)
    assert not replicating.step_back(rejected=5, hint=0), "below what the follower already confirmed"
    assert replicating.step_back(rejected=8, hint=0) and (replicating.next, replicating.probing) == (7, True)


def test_follower_commits_only_entries_known_to_match_the_leader() -> None:
    node, _ = node_with_log([2, 2, 2], term=3)  # indexes 3 and 4 may be a stale tail
    node.step(RaftAppend("n2", "n1", 3, prev_index=2, prev_term=2, commit=4))
    assert sent(node) == [RaftAppendResp("n1", "n2", 3, index=2)]
    assert node.status().commit == 2


def test_follower_replaces_a_conflicting_tail_and_commits_up_to_what_matches() -> None:
    node, storage = node_with_log([2, 2, 2], term=3)
    entries = (RaftEntry(3, 3, EntryKind.NORMAL, b"new"),)
    node.step(RaftAppend("n2", "n1", 3, prev_index=2, prev_term=2, commit=9, entries=entries))
    ready = drain(node, storage)
    assert ready.entries == entries and ready.messages == (RaftAppendResp("n1", "n2", 3, index=3),)
    assert [entry.term for entry in storage.entries] == [1, 2, 3]
    assert node.status().commit == 3


def test_append_reaching_below_the_commit_index_only_learns_where_the_follower_is() -> None:
    node, storage = node_with_log([2, 2], term=3, commit=3)
    rewrite = (RaftEntry(3, 3, EntryKind.NORMAL, b"rewrite"),)
    node.step(RaftAppend("n2", "n1", 3, prev_index=2, prev_term=2, commit=3, entries=rewrite))
    assert sent(node, storage) == [RaftAppendResp("n1", "n2", 3, index=3)]
    assert [entry.term for entry in storage.entries] == [1, 2, 2]


@pytest.mark.parametrize(
    "entries",
    [
        (RaftEntry(3, 7, EntryKind.NORMAL, b"misnumbered"),),
        (RaftEntry(3, 3, EntryKind.NORMAL), RaftEntry(3, 4, EntryKind.CONFIG, b"\xc1 not msgpack")),
    ],
)
def test_malformed_append_is_dropped_whole(entries: tuple[RaftEntry, ...]) -> None:
    node, storage = node_with_log([2], term=3)
    node.step(RaftAppend("n2", "n1", 3, prev_index=2, prev_term=2, commit=1, entries=entries))
    assert sent(node, storage) == [] and node.status().last_index == 2


def test_stale_leader_is_told_the_newer_term_and_steps_down() -> None:
    follower, _ = node_with_log([], term=5)
    follower.step(RaftHeartbeat("n2", "n1", 3, commit=1))
    [answer] = sent(follower)
    assert answer.term == 5
    leader = new_cluster_node("n2")
    elect(leader)
    leader.step(RaftAppendResp("n1", "n2", 5))
    assert leader.status().role is Role.FOLLOWER and leader.status().term == 5


def test_heartbeat_response_from_a_lagging_follower_triggers_an_append() -> None:
    node = new_cluster_node()
    elect(node)
    node.step(RaftHeartbeatResp("n2", "n1", 2))
    [append] = sent(node)
    assert isinstance(append, RaftAppend) and append.to == "n2"


# ------------------------------------------------------------------------- check quorum and transfer


def test_leader_without_a_quorum_steps_down_after_an_election_timeout() -> None:
    node = new_cluster_node()
    elect(node)
    for _ in range(CONFIG.election_ticks):
        node.tick()
    assert node.status().role is Role.FOLLOWER


def test_leader_hearing_from_a_quorum_keeps_leading() -> None:
    node = new_cluster_node()
    elect(node)
    for _ in range(5 * CONFIG.election_ticks):
        node.tick()
        node.step(RaftHeartbeatResp("n2", "n1", 2))
        drain(node)
    assert node.status().role is Role.LEADER


def test_transfer_sends_timeout_now_once_the_target_is_up_to_date() -> None:
    node = new_cluster_node()
    elect(node)
    node.transfer_leadership("n2")
    assert not any(isinstance(message, RaftTimeoutNow) for message in sent(node)), "n2 lacks the noop"
    with pytest.raises(ProposalRejected, match="moving to n2"):
        node.propose(b"during transfer")
    node.step(RaftAppendResp("n2", "n1", 2, index=2))
    assert RaftTimeoutNow("n1", "n2", 2) in sent(node)


def test_timeout_now_makes_a_follower_campaign_without_pre_vote() -> None:
    node = new_cluster_node("n2")
    node.step(RaftTimeoutNow("n1", "n2", 1))
    assert sent(node) == [RaftVote("n2", peer, 2, 1, 1, transfer=True) for peer in ("n1", "n3")]


def test_transfer_is_abandoned_after_an_election_timeout() -> None:
    node = new_cluster_node()
    elect(node)
    node.transfer_leadership("n3")
    for _ in range(CONFIG.election_ticks):
        node.step(RaftHeartbeatResp("n2", "n1", 2))
        node.tick()
        drain(node)
    assert node.status().transferee is None and node.status().role is Role.LEADER
    node.propose(b"accepted again")


def test_transfer_only_to_a_voter_other_than_the_leader() -> None:
    node = new_cluster_node()
    with pytest.raises(NotLeader):
        node.transfer_leadership("n2")
    elect(node)
    with pytest.raises(TransferRejected, match="already the leader"):
        node.transfer_leadership("n1")
    with pytest.raises(TransferRejected, match="not a voter"):
        node.transfer_leadership("n9")


# ------------------------------------------------------------------------- proposals and membership


def test_propose_on_a_follower_names_the_leader() -> None:
    node = new_cluster_node()
    node.step(RaftHeartbeat("n2", "n1", 2, commit=1))
    with pytest.raises(NotLeader, match="the leader is n2") as raised:
        node.propose(b"x")
    assert raised.value.leader == "n2"


def test_membership_change_waits_for_the_leader_to_commit_its_term() -> None:
    node = new_cluster_node()
    elect(node)
    with pytest.raises(ProposalRejected, match="not committed an entry of term 2"):
        node.propose_conf_change(ConfChangeOp.ADD_LEARNER, "n4")


def test_membership_change_is_in_force_when_appended_and_one_at_a_time() -> None:
    node = new_cluster_node()
    elect(node)
    node.step(RaftAppendResp("n2", "n1", 2, index=2))
    drain(node)
    node.propose_conf_change(ConfChangeOp.ADD_LEARNER, "n4")
    status = node.status()
    assert status.learners == ("n4",) and status.commit < status.last_index
    assert any(message.to == "n4" for message in sent(node)), "the new learner is replicated to at once"
    with pytest.raises(ProposalRejected, match="not committed yet"):
        node.propose_conf_change(ConfChangeOp.PROMOTE, "n4")


@pytest.mark.parametrize(
    ("op", "node_id", "reason"),
    [
        (ConfChangeOp.ADD_LEARNER, "n2", "already a member"),
        (ConfChangeOp.PROMOTE, "n4", "not a learner"),
        (ConfChangeOp.REMOVE, "n1", "cannot remove itself"),
        (ConfChangeOp.REMOVE, "n9", "not a member"),
    ],
)
def test_membership_change_that_makes_no_sense_is_rejected(
    op: ConfChangeOp, node_id: str, reason: str
) -> None:
    node = new_cluster_node()
    elect(node)
    node.step(RaftAppendResp("n2", "n1", 2, index=2))
    drain(node)
    with pytest.raises(ProposalRejected, match=reason):
        node.propose_conf_change(op, node_id)


def test_truncating_an_uncommitted_membership_change_restores_the_previous_membership() -> None:
    learner_added = RaftMembership(voters=PEERS, learners=("n4",))
    node, _ = node_with_log([], term=2)
    change = (RaftEntry(2, 2, EntryKind.CONFIG, encode_membership(learner_added)),)
    node.step(RaftAppend("n2", "n1", 2, prev_index=1, prev_term=1, commit=1, entries=change))
    assert node.status().learners == ("n4",)
    overwrite = (RaftEntry(3, 2, EntryKind.NOOP),)
    node.step(RaftAppend("n3", "n1", 3, prev_index=1, prev_term=1, commit=1, entries=overwrite))
    assert node.status().learners == ()


# ------------------------------------------------------------------------- driver contract and persistence


def test_restarted_node_keeps_its_term_vote_and_log() -> None:
    storage = MemoryStorage()
    node = RaftNode("n1", PEERS, CONFIG, random.Random(3), storage)
    drain(node, storage)
    node.step(RaftVote("n2", "n1", 4, last_index=1, last_term=1))
    node.step(RaftAppend("n2", "n1", 4, 1, 1, 1, (RaftEntry(4, 2, EntryKind.NORMAL, b"kept"),)))
    drain(node, storage)
    restarted = RaftNode("n1", PEERS, CONFIG, random.Random(4), storage)
    assert restarted.status().term == 4 and restarted.status().last_index == 2
    restarted.step(RaftVote("n3", "n1", 4, last_index=9, last_term=4))
    assert sent(restarted, storage)[-1] == RaftVoteResp("n1", "n3", 4, granted=False), "already voted for n2"
    assert [entry.data for entry in storage.entries] == [bootstrap_entry(*PEERS).data, b"kept"]


def test_restarted_node_reapplies_committed_entries_from_the_start() -> None:
    node, _ = node_with_log([2, 2], term=2, commit=3)
    assert [entry.index for entry in drain(node).committed_entries] == [1, 2, 3]


def test_ready_must_be_advanced_before_the_node_is_fed_again() -> None:
    node = new_cluster_node()
    ready = node.ready()
    with pytest.raises(RuntimeError, match="advance"):
        node.tick()
    with pytest.raises(RuntimeError, match="advance"):
        node.ready()
    with pytest.raises(RuntimeError, match="last ready"):
        node.advance(dataclasses.replace(ready))
    node.advance(ready)
    assert not node.has_ready()


def test_first_ready_persists_the_bootstrap_membership() -> None:
    storage = MemoryStorage()
    ready = drain(RaftNode("n2", ["n3", "n1"], CONFIG, random.Random(1), storage), storage)
    assert ready.hard_state == HardState(term=1, vote=None, commit=1)
    assert ready.entries == (bootstrap_entry(*PEERS),) and ready.committed_entries == ready.entries
    assert ready.soft_state is not None and ready.soft_state.role is Role.FOLLOWER


def test_status_is_an_immutable_snapshot() -> None:
    node = new_cluster_node()
    before = node.status()
    elect(node)
    assert before.role is Role.FOLLOWER and node.status().role is Role.LEADER
    with pytest.raises(dataclasses.FrozenInstanceError):
        before.term = 9  # type: ignore[misc]


def test_every_message_round_trips_through_msgpack() -> None:
    entry = RaftEntry(2, 5, EntryKind.CONFIG, b"\x00\xff")
    messages: list[RaftMessage] = [
        RaftPreVote("a", "b", 3, 5, 2),
        RaftPreVoteResp("b", "a", 3, True),
        RaftVote("a", "b", 3, 5, 2, transfer=True),
        RaftVoteResp("b", "a", 3, False),
        RaftAppend("a", "b", 3, 4, 2, 4, (entry,)),
        RaftAppendResp("b", "a", 3, 4, True, 3, 2),
        RaftHeartbeat("a", "b", 3, 4),
        RaftHeartbeatResp("b", "a", 3),
        RaftTimeoutNow("a", "b", 3),
    ]
    decoder = msgspec.msgpack.Decoder(RaftMessage)
    for message in messages:
        assert decoder.decode(msgspec.msgpack.encode(message)) == message


def test_config_rejects_an_election_timeout_not_above_the_heartbeat() -> None:
    with pytest.raises(ValueError, match="election_ticks"):
        RaftConfig(heartbeat_ticks=3, election_ticks=3)
