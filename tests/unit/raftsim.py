"""A deterministic in-memory network for Raft nodes, and the invariant checker run after every step.

One ``Simulation`` is one seeded world: nodes tick once per time unit with their own phase,
messages take a random latency (sometimes a long one, which reorders them), and can be dropped,
duplicated or cut by a partition. Nodes crash (losing everything but their ``MemoryStorage``) and
restart from it. The driver loop is the real one: persist, then send, then apply, then advance.

``InvariantChecker`` watches every ``Ready`` and raises ``InvariantViolation`` on:
Election Safety (one leader per term), a vote changed within a term, a term or commit going back,
Log Matching (an (index, term) pair always names the same entry with the same predecessor term),
committed entries overwritten, and State Machine Safety (every node applies the same sequence).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import heapq
import itertools
import random
from collections.abc import Callable
from typing import TypeVar

from zbus.raft import (
    ConfChangeOp,
    MemoryStorage,
    NotLeader,
    ProposalRejected,
    RaftConfig,
    RaftEntry,
    RaftMessage,
    RaftNode,
    RaftStatus,
    Ready,
    Role,
)

Result = TypeVar("Result")
NodeFactory = Callable[[str, tuple[str, ...], RaftConfig, random.Random, MemoryStorage], RaftNode]


class InvariantViolation(AssertionError):
    pass


@dataclasses.dataclass(frozen=True)
class Faults:
    """Per-message fault probabilities. A slow message takes 0.5 to 4 ticks instead of at most 0.2."""

    drop: float = 0.0
    duplicate: float = 0.0
    slow: float = 0.0

    @classmethod
    def random(cls, rng: random.Random) -> Faults:
        return cls(
            drop=rng.choice((0.0, 0.05, 0.2)), duplicate=rng.choice((0.0, 0.05)), slow=rng.choice((0.0, 0.1))
        )


@dataclasses.dataclass
class SimNode:
    id: str
    storage: MemoryStorage
    raft: RaftNode | None  # None while crashed
    incarnation: int = 0
    # The state machine: what this incarnation has applied; a restart rebuilds it from entry 1.
    applied: list[RaftEntry] = dataclasses.field(default_factory=list)


class InvariantChecker:
    """Global knowledge across all nodes of one simulation, checked against each ``Ready``."""

    def __init__(self) -> None:
        self.leader_of_term: dict[int, str] = {}
        # (index, term) -> (term of the entry before it, the entry), the same in every log
        self.entry_at: dict[tuple[int, int], tuple[int, RaftEntry]] = {}
        self.committed: list[RaftEntry] = []  # the one committed sequence every node applies a prefix of

    def check_ready(self, node: SimNode, ready: Ready) -> None:
        """Called before the driver persists ``ready``: ``node.storage`` still holds the old state."""
        if ready.soft_state is not None and ready.soft_state.role is Role.LEADER:
            term = ready.soft_state.term
            first = self.leader_of_term.setdefault(term, node.id)
            if first != node.id:
                raise InvariantViolation(f"Election Safety: {first} and {node.id} both lead term {term}")
        old = node.storage.hard_state
        if ready.hard_state is not None:
            new = ready.hard_state
            if new.term < old.term or new.commit < old.commit:
                raise InvariantViolation(f"{node.id} persisted state went back: {old} -> {new}")
            if new.term == old.term and old.vote is not None and new.vote != old.vote:
                raise InvariantViolation(f"{node.id} voted for {old.vote} then {new.vote} in term {new.term}")
        if ready.entries:
            self._check_persisted_entries(node, ready.entries, max(old.commit, len(node.applied)))
        for expected_index, entry in enumerate(ready.committed_entries, start=len(node.applied) + 1):
            self._check_applied(node, entry, expected_index)

    def _check_persisted_entries(self, node: SimNode, entries: tuple[RaftEntry, ...], committed: int) -> None:
        first = entries[0].index
        if first <= committed:
            raise InvariantViolation(f"{node.id} overwrites committed entry {first} (committed {committed})")
        prev_term = node.storage.term_at(first - 1)
        if prev_term is None:
            raise InvariantViolation(
                f"{node.id} persists entry {first} after a gap (stored {node.storage.last_index})"
            )
        for expected_index, entry in enumerate(entries, start=first):
            if entry.index != expected_index:
                raise InvariantViolation(
                    f"{node.id} persists entry {entry.index} where {expected_index} belongs"
                )
            seen = self.entry_at.setdefault((entry.index, entry.term), (prev_term, entry))
            if seen != (prev_term, entry):
                raise InvariantViolation(
                    f"Log Matching: {node.id} holds {entry} after term {prev_term}, "
                    f"another log holds {seen[1]} after term {seen[0]}"
                )
            prev_term = entry.term

    def _check_applied(self, node: SimNode, entry: RaftEntry, expected_index: int) -> None:
        if entry.index != expected_index:
            raise InvariantViolation(f"{node.id} applies entry {entry.index} where {expected_index} is next")
        if entry.index <= len(self.committed):
            if self.committed[entry.index - 1] != entry:
                raise InvariantViolation(
                    f"State Machine Safety: {node.id} applies {entry}, "
                    f"but {self.committed[entry.index - 1]} was committed at that index"
                )
        else:
            self.committed.append(entry)

    def check_persisted(self, node: SimNode) -> None:
        """After persisting: the stored committed prefix is the committed history (by Log Matching,
        comparing its last entry is enough)."""
        commit = node.storage.hard_state.commit
        if commit > node.storage.last_index:
            raise InvariantViolation(
                f"{node.id} commits {commit} beyond its stored log {node.storage.last_index}"
            )
        if (
            0 < commit <= len(self.committed)
            and node.storage.entries[commit - 1] != self.committed[commit - 1]
        ):
            raise InvariantViolation(
                f"committed entry lost: {node.id} stores {node.storage.entries[commit - 1]} "
                f"at its commit index, the cluster committed {self.committed[commit - 1]}"
            )


class Simulation:
    """Nodes ``n1..n{voters}`` bootstrap the cluster; ``n{voters+1}..`` are spares that may join."""

    TRACE_LENGTH = 60

    def __init__(
        self,
        seed: int,
        voters: int = 3,
        spares: int = 0,
        faults: Faults = Faults(),
        config: RaftConfig = RaftConfig(),
        node_factory: NodeFactory = RaftNode,
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.faults = faults
        self.config = config
        self.node_factory = node_factory
        self.now = 0.0
        self.steps = 0
        self.checker = InvariantChecker()
        self.trace: collections.deque[tuple[float, str, object]] = collections.deque(maxlen=self.TRACE_LENGTH)
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._sequence = itertools.count()
        self._group_of: dict[str, int] = {}  # partition: nodes talk only within their group
        self._proposals = itertools.count(1)
        self.on_deliver: list[Callable[[RaftMessage], None]] = []  # observers of every delivered message
        self.initial_voters = tuple(f"n{i}" for i in range(1, voters + 1))
        self.spares = tuple(f"n{i}" for i in range(voters + 1, voters + spares + 1))
        self.nodes: dict[str, SimNode] = {}
        for node_id in self.initial_voters + self.spares:
            self.nodes[node_id] = SimNode(node_id, MemoryStorage(), None)
            self._start(node_id, self.initial_voters if node_id in self.initial_voters else ())

    # ----------------------------------------------------------------- world control

    def live(self) -> list[SimNode]:
        return [node for node in self.nodes.values() if node.raft is not None]

    def raft(self, node_id: str) -> RaftNode:
        raft = self.nodes[node_id].raft
        assert raft is not None, f"{node_id} is down"
        return raft

    def statuses(self) -> list[RaftStatus]:
        return [node.raft.status() for node in self.nodes.values() if node.raft is not None]

    def leader(self) -> str | None:
        """The live node that leads the highest term, if any."""
        leaders = [status for status in self.statuses() if status.role is Role.LEADER]
        return max(leaders, key=lambda status: status.term).id if leaders else None

    def crash(self, node_id: str) -> None:
        self.nodes[node_id].raft = None
        self.trace.append((self.now, "crash", node_id))

    def restart(self, node_id: str) -> None:
        self.trace.append((self.now, "restart", node_id))
        self._start(node_id, self.initial_voters if node_id in self.initial_voters else ())

    def partition(self, *groups: list[str]) -> None:
        self._group_of = {node_id: number for number, group in enumerate(groups) for node_id in group}
        self.trace.append((self.now, "partition", groups))

    def heal(self) -> None:
        self._group_of = {}
        self.trace.append((self.now, "heal", None))

    def act(self, node_id: str, action: Callable[[RaftNode], Result]) -> Result:
        """Call into a live node (propose, transfer, ...) and drain its Ready like a driver would."""
        raft = self.raft(node_id)
        result = action(raft)
        self._drain(self.nodes[node_id])
        return result

    def run_until(self, condition: Callable[[], bool], max_ticks: float, check_every: float = 0.25) -> bool:
        """Run until ``condition()`` holds (checked every ``check_every`` ticks); False if time ran out."""
        end = self.now + max_ticks
        while not condition():
            if self.now >= end:
                return False
            self._run(min(end, self.now + check_every))
        return True

    def run_for(self, ticks: float) -> None:
        self._run(self.now + ticks)

    def _run(self, end: float) -> None:
        """Process every event up to time ``end``, checking invariants at each step."""
        while self._events and self._events[0][0] <= end:
            self.now, _, event = heapq.heappop(self._events)
            self.steps += 1
            try:
                event()
            except InvariantViolation as violation:
                raise InvariantViolation(
                    f"seed {self.seed} at t={self.now:.2f}: {violation}\n{self.format_trace()}"
                ) from None
        self.now = end

    def format_trace(self) -> str:
        return "\n".join(f"  t={time:8.2f} {kind:9} {detail}" for time, kind, detail in self.trace)

    # ----------------------------------------------------------------- the driver loop

    def _schedule(self, delay: float, event: Callable[[], None]) -> None:
        heapq.heappush(self._events, (self.now + delay, next(self._sequence), event))

    def _start(self, node_id: str, peers: tuple[str, ...]) -> None:
        node = self.nodes[node_id]
        node.incarnation += 1
        node.raft = self.node_factory(
            node_id, peers, self.config, random.Random(self.rng.getrandbits(64)), node.storage
        )
        node.applied = []
        self._drain(node)
        incarnation = node.incarnation
        self._schedule(self.rng.random(), lambda: self._tick(node, incarnation))

    def _tick(self, node: SimNode, incarnation: int) -> None:
        if node.raft is None or node.incarnation != incarnation:
            return  # crashed, or restarted with its own tick chain
        node.raft.tick()
        self._drain(node)
        self._schedule(1.0, lambda: self._tick(node, incarnation))

    def _drain(self, node: SimNode) -> None:
        raft = node.raft
        assert raft is not None
        while raft.has_ready():
            ready = raft.ready()
            self.checker.check_ready(node, ready)
            node.storage.save(ready.hard_state, ready.entries)
            self.checker.check_persisted(node)
            for message in ready.messages:
                self._send(message)
            node.applied.extend(ready.committed_entries)
            raft.advance(ready)

    def _send(self, message: RaftMessage) -> None:
        if self.rng.random() < self.faults.drop:
            return
        copies = 2 if self.rng.random() < self.faults.duplicate else 1
        for _ in range(copies):
            latency = self.rng.uniform(0.01, 0.2)
            if self.rng.random() < self.faults.slow:
                latency += self.rng.uniform(0.5, 4.0)
            self._schedule(latency, lambda: self._deliver(message))

    def _deliver(self, message: RaftMessage) -> None:
        node = self.nodes[message.to]
        if node.raft is None or self._group_of.get(message.frm) != self._group_of.get(message.to):
            return
        self.trace.append((self.now, "deliver", message))
        for observer in self.on_deliver:
            observer(message)
        node.raft.step(message)
        self._drain(node)

    # ----------------------------------------------------------------- random runs

    def run_chaos(self, ticks: float, actions_per_tick: float = 0.5) -> None:
        """Random client proposals, crashes, restarts, partitions, transfers and membership changes."""
        end = self.now + ticks
        time = self.now
        while True:
            time += self.rng.expovariate(actions_per_tick)
            if time >= end:
                break
            self._schedule(time - self.now, self._chaos_action)
        self.run_for(ticks)

    def _chaos_action(self) -> None:
        actions = (
            (self._random_proposal, 10.0),
            (self._random_crash, 1.0),
            (self._crash_leader, 1.0),
            (self._random_restart, 2.5),
            (self._random_partition, 1.0),
            (self._isolate_leader, 1.0),
            (self.heal, 2.0),
            (self._random_transfer, 1.0),
            (self._random_conf_change, 1.5),
        )
        action = self.rng.choices([action for action, _ in actions], [weight for _, weight in actions])[0]
        action()

    def propose_at_leader(self) -> int | None:
        """Propose a fresh command at the current leader; its index, or None if nobody takes it."""
        leader = self.leader()
        if leader is None:
            return None
        data = f"cmd-{self.seed}-{next(self._proposals)}".encode()
        self.trace.append((self.now, "propose", (leader, data)))
        try:
            return self.act(leader, lambda raft: raft.propose(data))
        except (NotLeader, ProposalRejected):
            return None

    def _random_proposal(self) -> None:
        self.propose_at_leader()

    def _random_crash(self) -> None:
        live = self.live()
        if live:
            self.crash(self.rng.choice(live).id)

    def _crash_leader(self) -> None:
        leader = self.leader()
        if leader is not None:
            self.crash(leader)

    def _random_restart(self) -> None:
        down = [node.id for node in self.nodes.values() if node.raft is None]
        if down:
            self.restart(self.rng.choice(down))

    def _random_partition(self) -> None:
        ids = list(self.nodes)
        self.rng.shuffle(ids)
        cut = self.rng.randrange(1, len(ids))
        self.partition(ids[:cut], ids[cut:])

    def _isolate_leader(self) -> None:
        """Cut the leader off with a minority, so it appends entries that can never commit."""
        leader = self.leader()
        if leader is None:
            return
        others = [node_id for node_id in self.nodes if node_id != leader]
        self.rng.shuffle(others)
        minority = self.rng.randrange(0, (len(others) - 1) // 2 + 1)
        self.partition([leader, *others[:minority]], others[minority:])

    def _random_transfer(self) -> None:
        leader = self.leader()
        if leader is None:
            return
        targets = [voter for voter in self.raft(leader).status().voters if voter != leader]
        if targets:
            target = self.rng.choice(targets)
            self.trace.append((self.now, "transfer", (leader, target)))
            self.act(leader, lambda raft: raft.transfer_leadership(target))

    def _random_conf_change(self) -> None:
        leader = self.leader()
        if leader is None:
            return
        status = self.raft(leader).status()
        members = status.voters + status.learners
        choices = [(ConfChangeOp.ADD_LEARNER, node_id) for node_id in self.nodes if node_id not in members]
        choices += [(ConfChangeOp.PROMOTE, node_id) for node_id in status.learners]
        if len(members) > 2:
            choices += [(ConfChangeOp.REMOVE, node_id) for node_id in members if node_id != leader]
        if not choices:
            return
        op, node_id = self.rng.choice(choices)
        self.trace.append((self.now, "conf", (leader, op.value, node_id)))
        with contextlib.suppress(ProposalRejected):  # e.g. the previous change is not committed yet
            self.act(leader, lambda raft: raft.propose_conf_change(op, node_id))

    # ----------------------------------------------------------------- liveness

    def converged(self) -> bool:
        """One leader that all members follow, every member holding, committing and applying its whole log."""
        leader_id = self.leader()
        if leader_id is None:
            return False
        leader = self.raft(leader_id).status()
        if leader.commit != leader.last_index:
            return False
        members = [self.nodes[member] for member in leader.voters + leader.learners]
        expected = (leader.term, leader_id, leader.commit, leader.commit, leader.last_index)
        for member in members:
            if member.raft is None:
                return False
            status = member.raft.status()
            if (status.term, status.leader, status.commit, status.applied, status.last_index) != expected:
                return False
        leader_log = self.nodes[leader_id].storage.entries
        return all(member.storage.entries == leader_log for member in members)

    def settle(self, max_ticks: float = 200.0) -> None:
        """Heal everything, then demand convergence, a committed final command, and convergence again."""
        self.faults = Faults()
        self.heal()
        for node in self.nodes.values():
            if node.raft is None:
                self.restart(node.id)
        for phase in ("elect and catch up", "commit a final command"):
            if phase == "commit a final command":
                proposed = self.run_until(lambda: self.propose_at_leader() is not None, max_ticks)
                if not proposed:
                    raise InvariantViolation(
                        f"seed {self.seed}: no leader accepts a proposal\n{self.format_trace()}"
                    )
            if not self.run_until(self.converged, max_ticks):
                statuses = "\n".join(f"  {status}" for status in self.statuses())
                raise InvariantViolation(
                    f"seed {self.seed}: no convergence within {max_ticks} ticks ({phase})\n{statuses}\n"
                    f"{self.format_trace()}"
                )
