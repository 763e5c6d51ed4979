"""The cluster core without sockets: several ClusterCores on an in-memory network, in simulated time.

Each simulated process owns a ClusterCore and behaves like the driver: ticks every 50 ms (each on
its own phase), executes the core's actions, and sees a link go down at once when the process at
the other end is killed (libzmq's monitor on a reset connection) and come back up when a process
binds that endpoint again (the DEALER reconnects). Messages are real wire bytes, 0.5-2 ms late.
"""

from __future__ import annotations

import heapq
import itertools
import random
import uuid
from collections.abc import Callable

import pytest

from zbus import wire
from zbus.cluster.actions import Connect, Disconnect, Phase, Reply, Send
from zbus.cluster.core import ClusterCore
from zbus.cluster.settings import ClusterSettings
from zbus.raft import Role

SETTINGS = ClusterSettings(dead_after=3.0)
TICK = SETTINGS.tick


class SimProcess:
    def __init__(self, name: str, host: str, core: ClusterCore) -> None:
        self.name = name
        self.host = host
        self.core = core
        self.alive = True
        self.links: dict[str, bytes] = {}  # endpoint -> our DEALER's routing id
        self.up: set[str] = set()

    @property
    def id(self) -> str:
        return self.core.id

    @property
    def endpoint(self) -> str:
        return self.core.me.cluster_endpoint


class World:
    def __init__(self, seed: int, settings: ClusterSettings = SETTINGS) -> None:
        self.rng = random.Random(seed)
        self.settings = settings
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self.procs: dict[str, SimProcess] = {}  # latest process per name
        self.at_endpoint: dict[str, SimProcess] = {}  # live processes by cluster endpoint
        self._conn_owner: dict[bytes, tuple[SimProcess, str]] = {}
        self._last_delivery: dict[bytes, float] = {}
        self.cut: set[frozenset[str]] = set()  # host pairs that cannot reach each other
        self._hosts = itertools.count(1)
        self.leaders_by_term: dict[tuple[str, int], str] = {}  # (cluster, term) -> leader

    # -- processes -------------------------------------------------------------------------------
    def start(self, name: str, peers: tuple[str, ...] = (), keep_id: bool = False) -> SimProcess:
        """A new process (fresh Id unless ``keep_id``: a restart with a pinned Id and an empty log)."""
        old = self.procs.get(name)
        host = old.host if old is not None else f"10.0.0.{next(self._hosts)}"
        fresh_id = "S-" + str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        me = wire.ClusterServer(
            old.id if keep_id and old is not None else fresh_id, name,
            uuid.UUID(int=self.rng.getrandbits(128)).hex, "tcp://0.0.0.0:7700", f"tcp://{host}:7701",
            1.7e9 + self.now)
        contacts = [f"tcp://{self.procs[p].host}:7701" for p in peers]
        core = ClusterCore(me, contacts, self.settings, random.Random(self.rng.random()), self.now)
        proc = SimProcess(name, host, core)
        self.procs[name] = proc
        self.at_endpoint[proc.endpoint] = proc
        for other in self.alive():
            if proc.endpoint in other.links:
                self._later(lambda other=other: self._link_up(other, proc.endpoint))
        self._flush(proc)
        self._schedule_tick(proc, self.rng.random() * TICK)
        return proc

    def kill(self, name: str) -> SimProcess:
        proc = self.procs[name]
        proc.alive = False
        del self.at_endpoint[proc.endpoint]
        for other in self.alive():
            if proc.endpoint in other.up:
                self._later(lambda other=other: self._link_down(other, proc.endpoint))
        return proc

    def partition(self, *groups: tuple[str, ...]) -> None:
        """Cut the network between groups of names: messages are lost, and libzmq's heartbeat
        (1.5 s) then reports each link across the cut as down."""
        hosts = [{self.procs[name].host for name in group} for group in groups]
        for i, a in enumerate(hosts):
            for b in hosts[i + 1:]:
                self.cut |= {frozenset((x, y)) for x in a for y in b}
        for proc in self.alive():
            for endpoint in list(proc.up):
                if self._blocked(proc, endpoint):
                    self._later(lambda p=proc, ep=endpoint: self._blocked(p, ep) and self._link_down(p, ep), 1.5)

    def heal(self) -> None:
        self.cut.clear()
        for proc in self.alive():
            for endpoint in proc.links:
                if endpoint not in proc.up:
                    self._later(lambda p=proc, ep=endpoint: self._link_up(p, ep), self.rng.uniform(0.1, 1.0))

    def _blocked(self, proc: SimProcess, endpoint: str) -> bool:
        target = self.at_endpoint.get(endpoint)
        return target is not None and frozenset((proc.host, target.host)) in self.cut

    def alive(self) -> list[SimProcess]:
        return [p for p in self.procs.values() if p.alive]

    # -- time ------------------------------------------------------------------------------------
    def run(self, seconds: float) -> None:
        end = self.now + seconds
        while self._events and self._events[0][0] <= end:
            when, _, action = heapq.heappop(self._events)
            self.now = when
            action()
        self.now = end

    def run_until(self, predicate: Callable[[], object], timeout: float, what: str) -> float:
        """Simulated seconds until ``predicate()`` holds (checked every millisecond)."""
        started = self.now
        while not predicate():
            if self.now - started > timeout:
                raise AssertionError(f"{what}: not within {timeout} simulated seconds\n{self.describe()}")
            self.run(0.001)
        return self.now - started

    def describe(self) -> str:
        lines = []
        for p in self.procs.values():
            s = p.core.status()
            lines.append(f"{p.name} alive={p.alive} {s.phase} {s.cluster_id[:10]} {s.raft.role} t{s.raft.term} "
                         f"master={self.name_of(s.master)} voters={[self.name_of(v) for v in s.raft.voters]} "
                         f"learners={[self.name_of(v) for v in s.raft.learners]} "
                         f"table={[self.name_of(v) for v in s.table]} live={[self.name_of(v) for v in s.live]}")
        return "\n".join(lines)

    def name_of(self, server_id: str) -> str:
        for p in self.procs.values():
            if p.id == server_id:
                return p.name
        return server_id[:8] or "-"

    def _later(self, action: Callable[[], None], delay: float | None = None) -> None:
        delay = self.rng.uniform(0.0005, 0.002) if delay is None else delay
        heapq.heappush(self._events, (self.now + delay, next(self._seq), action))

    def _schedule_tick(self, proc: SimProcess, delay: float) -> None:
        def tick() -> None:
            if not proc.alive:
                return
            proc.core.tick(self.now)
            self._check(proc)
            self._flush(proc)
            self._schedule_tick(proc, TICK)
        self._later(tick, delay)

    def _check(self, proc: SimProcess) -> None:
        """Election Safety across the whole world: one leader per (cluster, term)."""
        raft = proc.core.status().raft
        if raft.role is Role.LEADER:
            key = (proc.core.cluster_id, raft.term)
            assert self.leaders_by_term.setdefault(key, proc.id) == proc.id, f"two leaders in {key}"

    # -- the network -----------------------------------------------------------------------------
    def _flush(self, proc: SimProcess) -> None:
        for action in proc.core.take_actions():
            if isinstance(action, Connect):
                conn = bytes([1]) + self.rng.randbytes(15)
                proc.links[action.endpoint] = conn
                self._conn_owner[conn] = (proc, action.endpoint)
                if action.endpoint in self.at_endpoint:
                    self._later(lambda ep=action.endpoint: self._link_up(proc, ep))
            elif isinstance(action, Disconnect):
                proc.links.pop(action.endpoint, None)
                proc.up.discard(action.endpoint)
            elif isinstance(action, Send):
                target = self.at_endpoint.get(action.endpoint)
                if action.endpoint in proc.up and target is not None and not self._blocked(proc, action.endpoint):
                    conn = proc.links[action.endpoint]
                    # one connection delivers in order, like TCP
                    when = max(self.now + self.rng.uniform(0.0005, 0.002), self._last_delivery.get(conn, 0.0))
                    self._last_delivery[conn] = when
                    self._later(lambda t=target, c=conn, h=action.header: self._deliver(t, c, h, proc.host),
                                when - self.now)
            elif isinstance(action, Reply):
                owner = self._conn_owner.get(action.conn)
                if owner is not None and isinstance(wire.decode(action.header), wire.ClusterWho):
                    self._later(lambda o=owner: self._who(*o))

    def _deliver(self, target: SimProcess, conn: bytes, header: bytes, host: str) -> None:
        if target.alive:
            target.core.on_message(conn, wire.decode(header), host, self.now)
            self._flush(target)

    def _link_up(self, proc: SimProcess, endpoint: str) -> None:
        if (proc.alive and endpoint in proc.links and endpoint in self.at_endpoint and endpoint not in proc.up
                and not self._blocked(proc, endpoint)):
            proc.up.add(endpoint)
            proc.core.on_link(endpoint, True, self.now)
            self._flush(proc)

    def _link_down(self, proc: SimProcess, endpoint: str) -> None:
        if proc.alive and endpoint in proc.up:
            proc.up.discard(endpoint)
            proc.core.on_link(endpoint, False, self.now)
            self._flush(proc)

    def _who(self, proc: SimProcess, endpoint: str) -> None:
        if proc.alive:
            proc.core.on_who(endpoint, self.now)
            self._flush(proc)

    # -- what the tests look at ------------------------------------------------------------------
    def agreed_master(self, procs: list[SimProcess] | None = None) -> str | None:
        """The Master every given live process reports, if they all report the same live one."""
        procs = procs if procs is not None else self.alive()
        masters = {p.core.view.master for p in procs}
        if len(masters) != 1:
            return None
        master = masters.pop()
        return master if master in {p.id for p in procs} else None

    def one_cluster(self, voters: int | None = None) -> bool:
        """Every live process is a voter of the same cluster, whose table lists exactly them."""
        procs = self.alive()
        ids = {p.id for p in procs}
        clusters = {p.core.cluster_id for p in procs}
        return (
            len(clusters) == 1
            and all(p.core.phase is Phase.MEMBER for p in procs)
            and all(set(p.core.status().raft.voters) == ids for p in procs)
            and all(set(p.core.table) == ids for p in procs)
            and (voters is None or len(ids) == voters)
            and self.agreed_master() is not None
            and all({s.id for s in p.core.view.servers if s.alive} == ids for p in procs)
        )


def chain(world: World, count: int) -> list[SimProcess]:
    """Start ``count`` servers, each knowing only the previous one."""
    procs = [world.start("s0")]
    for i in range(1, count):
        world.run(0.2)
        procs.append(world.start(f"s{i}", (f"s{i - 1}",)))
    return procs


def test_a_server_without_peers_is_a_cluster_of_one_and_its_own_master():
    world = World(1)
    solo = world.start("solo")
    assert solo.core.view.master == solo.id  # at once, before any election
    world.run_until(lambda: world.one_cluster(voters=1), 2.0, "a cluster of one")
    assert solo.core.status().raft.role is Role.LEADER
    assert [s.id for s in solo.core.view.servers] == [solo.id]


@pytest.mark.parametrize("count", [3, 5])
def test_servers_each_knowing_only_the_previous_one_end_as_a_full_mesh_with_one_master(count):
    world = World(count)
    procs = chain(world, count)
    world.run_until(lambda: world.one_cluster(voters=count), 5.0, "one cluster")
    for proc in procs:
        assert {p.row.id for p in proc.core.mesh.live_peers(world.now, SETTINGS.peer_timeout)} == (
            {p.id for p in procs} - {proc.id}), "not a full mesh"
        assert [s.role for s in proc.core.view.servers].count("master") == 1
        assert all(s.alive for s in proc.core.view.servers)
    leaders = [p for p in procs if p.core.status().raft.role is Role.LEADER]
    assert len(leaders) == 1 and world.agreed_master() == leaders[0].id


@pytest.mark.parametrize("count", [3, 5])
def test_master_killed_survivors_agree_on_a_new_master_within_2s_and_a_restart_rejoins(count):
    for seed in range(10):
        world = World(100 * count + seed)
        chain(world, count)
        world.run_until(lambda: world.one_cluster(voters=count), 5.0, "one cluster")
        old = world.agreed_master()
        victim = next(p for p in world.alive() if p.id == old)
        world.kill(victim.name)
        took = world.run_until(lambda: world.agreed_master() not in (None, old), 2.0, f"seed {seed}: a new master")
        assert took < 1.0, f"seed {seed}: {took:.3f}s"
        new_master = world.agreed_master()
        survivor = next(p for p in world.alive())
        restarted = world.start(victim.name, (survivor.name,))
        world.run_until(lambda: restarted.id in restarted.core.status().raft.voters, 3.0,
                        f"seed {seed}: the restarted server to join as a voter")
        world.run_until(lambda: world.one_cluster(voters=count), SETTINGS.dead_after + 3.0, "the dead one removed")
        assert restarted.core.status().raft.role is Role.FOLLOWER
        assert world.agreed_master() == new_master, "the rejoining server changed the master"


def test_two_servers_the_earlier_started_is_master_and_the_survivor_is_a_temporary_master():
    world = World(7)
    first, second = chain(world, 2)
    world.run_until(lambda: world.one_cluster(voters=2), 3.0, "a cluster of two")
    assert world.agreed_master() == first.id
    world.kill(first.name)
    world.run_until(lambda: second.core.view.master == second.id, 0.5, "the survivor to be master")
    table = set(second.core.table)
    world.run(SETTINGS.dead_after - 0.5)
    assert set(second.core.table) == table, "a lone survivor committed a membership change"
    assert second.core.view.master == second.id
    # after dead_after it starts afresh, so a restarted server can join it
    world.start(first.name, (second.name,))
    world.run_until(lambda: world.one_cluster(voters=2), 5.0, "the restarted server to join the survivor")
    assert world.agreed_master() == second.id  # the survivor is now the earlier started


def test_the_earlier_started_server_is_master_even_if_the_other_one_leads_raft():
    world = World(8)
    first, second = chain(world, 2)
    world.run_until(lambda: world.one_cluster(voters=2), 3.0, "a cluster of two")
    world.run_until(lambda: first.core.status().raft.role is Role.LEADER, 2.0, "the first to lead")
    first.core._member.node.transfer_leadership(second.id)  # as if the later one had won an election
    first.core._drain()
    world._flush(first)
    world.run_until(lambda: second.core.status().raft.role is Role.LEADER, 1.0, "the second to lead")
    assert world.agreed_master() == first.id
    world.run_until(lambda: first.core.status().raft.role is Role.LEADER, 1.0, "leadership handed back")
    assert world.agreed_master() == first.id


def test_a_dead_server_is_removed_after_dead_after_by_the_quorum_leader():
    world = World(9)
    procs = chain(world, 3)
    world.run_until(lambda: world.one_cluster(voters=3), 5.0, "one cluster")
    victim = next(p for p in procs if p.id != world.agreed_master())
    world.kill(victim.name)
    world.run(SETTINGS.dead_after - 0.5)
    assert all(victim.id in p.core.table for p in world.alive()), "removed before dead_after"
    assert all(not next(s for s in p.core.view.servers if s.id == victim.id).alive for p in world.alive())
    world.run_until(lambda: world.one_cluster(voters=2), 2.0, "the dead server removed")


def test_a_lone_survivor_changes_nothing_then_starts_afresh_and_others_join_it():
    world = World(10)
    procs = chain(world, 3)
    world.run_until(lambda: world.one_cluster(voters=3), 5.0, "one cluster")
    survivor = procs[2]
    for proc in procs[:2]:
        world.kill(proc.name)
    world.run_until(lambda: survivor.core.view.master == survivor.id, 0.5, "a temporary master")
    world.run(SETTINGS.dead_after - 0.5)
    status = survivor.core.status()
    assert len(status.raft.voters) == 3 and len(status.table) == 3 and status.raft.role is not Role.LEADER
    world.run(1.0)
    assert survivor.core.status().raft.voters == (survivor.id,)
    world.start("s0", ("s2",))
    world.start("s1", ("s0",))
    world.run_until(lambda: world.one_cluster(voters=3), 5.0, "a new cluster of three")


def test_clusters_of_one_merge_when_a_server_knows_both():
    world = World(11)
    world.start("a")
    world.start("b")
    world.run_until(lambda: all(p.core.phase is Phase.MEMBER for p in world.alive()), 2.0, "two clusters")
    world.start("c", ("a", "b"))
    world.run_until(lambda: world.one_cluster(voters=3), 10.0, "one cluster of three")


def test_every_server_sees_every_servers_client_count():
    world = World(12)
    procs = chain(world, 3)
    world.run_until(lambda: world.one_cluster(voters=3), 5.0, "one cluster")
    for i, proc in enumerate(procs):
        proc.core.set_stats(wire.ServerStats(clients=10 + i))
    world.run(0.5)
    expected = {p.id: 10 + i for i, p in enumerate(procs)}
    for proc in procs:
        assert {s.id: s.clients for s in proc.core.view.servers} == expected


def test_view_version_moves_only_when_something_changed():
    world = World(13)
    chain(world, 3)
    world.run_until(lambda: world.one_cluster(voters=3), 5.0, "one cluster")
    views = [p.core.view for p in world.alive()]
    world.run(2.0)
    assert [p.core.view for p in world.alive()] == views
    assert all(a is b for a, b in zip((p.core.view for p in world.alive()), views)), "a new snapshot without news"


@pytest.mark.parametrize("seed", range(int(__import__("os").environ.get("CLUSTER_SEEDS", "40"))))
def test_random_kills_restarts_and_splits_settle_into_one_cluster(seed):
    world = World(1000 + seed)
    count = 3 + seed % 3
    chain(world, count)
    world.run_until(lambda: world.one_cluster(voters=count), 6.0, "one cluster")
    rng = random.Random(seed)
    for _ in range(8):
        alive = world.alive()
        dice = rng.random()
        if dice < 0.2:
            names = [p.name for p in alive]
            rng.shuffle(names)
            cut = rng.randrange(1, len(names))
            world.partition(tuple(names[:cut]), tuple(names[cut:]))
        elif dice < 0.3:
            world.heal()
        elif len(alive) > 2 and dice < 0.7:
            world.kill(rng.choice(alive).name)
        else:
            dead = [p for p in world.procs.values() if not p.alive]
            if dead:
                world.start(rng.choice(dead).name, (rng.choice(world.alive()).name,))
        world.run(rng.uniform(0.1, 2.0) if rng.random() < 0.8 else SETTINGS.dead_after + 1.0)
    world.heal()
    for proc in [p for p in world.procs.values() if not p.alive]:
        world.start(proc.name, (world.alive()[0].name,))
        world.run(0.05)
    world.run_until(lambda: world.one_cluster(voters=count), 3 * SETTINGS.dead_after + 10.0,
                    f"seed {seed}: one cluster after the storm")


# -- the mesh refuses what does not belong to a connection --------------------------------------------

def _core(name: str = "x") -> ClusterCore:
    me = wire.ClusterServer("S-" + str(uuid.uuid4()), name, "i1", "tcp://127.0.0.1:7700", "tcp://127.0.0.1:7701", 1.0)
    return ClusterCore(me, (), SETTINGS, random.Random(0), 0.0)


def _peer_row(name: str = "p") -> wire.ClusterServer:
    return wire.ClusterServer("S-" + str(uuid.uuid4()), name, "i2", "tcp://0.0.0.0:7800", "tcp://0.0.0.0:7801", 2.0)


def test_a_message_before_hello_is_dropped_and_answered_with_who():
    core = _core()
    core.take_actions()
    core.on_message(b"\x01conn", wire.PeerStatus("S-x", "K", 1, "", "", wire.ServerStats()), "10.0.0.9", 0.1)
    assert core.dropped["no-hello"] == 1
    assert [type(wire.decode(a.header)) for a in core.take_actions()] == [wire.ClusterWho]


def test_a_message_naming_another_sender_than_the_connection_is_dropped():
    core = _core()
    row, other = _peer_row("p"), _peer_row("q")
    core.on_message(b"\x01conn", wire.ClusterHello(row), "10.0.0.9", 0.1)
    core.on_message(b"\x01conn", wire.PeerStatus(other.id, "K", 3, other.id, other.id, wire.ServerStats()), None, 0.2)
    assert core.dropped["wrong-sender"] == 1
    assert core.mesh.peers[row.id].status is None


def test_a_connection_cannot_change_its_server_and_wildcards_become_the_observed_address():
    core = _core()
    row, other = _peer_row("p"), _peer_row("q")
    core.on_message(b"\x01conn", wire.ClusterHello(row), "10.0.0.9", 0.1)
    core.on_message(b"\x01conn", wire.ClusterHello(other), "10.0.0.9", 0.2)
    assert core.dropped["hello-refused"] == 1 and other.id not in core.mesh.peers
    seen = core.mesh.peers[row.id].row
    assert (seen.cluster_endpoint, seen.data_endpoint, seen.net.public) == (
        "tcp://10.0.0.9:7801", "tcp://10.0.0.9:7800", ["10.0.0.9"])
    assert any(isinstance(a, Connect) and a.endpoint == "tcp://10.0.0.9:7801" for a in core.take_actions())


def test_raft_messages_from_another_cluster_are_not_stepped():
    from zbus.raft import RaftHeartbeat
    core = _core()
    row = _peer_row()
    core.on_message(b"\x01conn", wire.ClusterHello(row), "10.0.0.9", 0.1)
    core.on_message(b"\x01conn", wire.PeerStatus(row.id, "K-other", 3, row.id, row.id, wire.ServerStats()), None, 0.1)
    term = core.status().raft.term
    core.on_message(b"\x01conn", RaftHeartbeat(row.id, core.id, term + 5, 0), None, 0.2)
    assert core.dropped["other-cluster"] == 1 and core.status().raft.term == term


def test_cluster_status_is_answered_to_anyone():
    core = _core()
    core.take_actions()
    core.on_message(b"\x01tool", wire.ClusterStatusRequest(), None, 0.1)
    (reply,) = core.take_actions()
    status = wire.decode(reply.header)
    assert isinstance(status, wire.ClusterStatusReply) and status.self_id == core.id and status.phase == "member"


def test_servers_started_together_each_naming_all_others_form_one_cluster_quickly():
    world = World(14)
    names = ("a", "b", "c")
    for name in names:  # placeholders so that each can name the others before they start
        world.procs[name] = SimProcess(name, f"10.0.1.{len(world.procs) + 1}", None)  # type: ignore[arg-type]
        world.procs[name].alive = False
    for name in names:
        world.start(name, tuple(n for n in names if n != name))
    world.run_until(lambda: world.one_cluster(voters=3), 3.0, "one cluster")


def test_a_split_keeps_both_sides_serving_and_the_tables_merge_when_it_heals():
    world = World(15)
    procs = chain(world, 5)
    world.run_until(lambda: world.one_cluster(voters=5), 6.0, "one cluster")
    minority, majority = [p.name for p in procs[:2]], [p.name for p in procs[2:]]
    world.partition(tuple(minority), tuple(majority))
    world.run(2.0)
    # both sides have a Master (the seed chooses availability); only the majority can change the table
    assert world.agreed_master([world.procs[n] for n in majority]) is not None
    assert world.agreed_master([world.procs[n] for n in minority]) is not None
    assert all(len(world.procs[n].core.table) == 5 for n in minority)
    world.run(SETTINGS.dead_after + 2.0)
    assert all(set(world.procs[n].core.table) == {world.procs[m].id for m in majority} for n in majority)
    world.heal()
    world.run_until(lambda: world.one_cluster(voters=5), 10.0, "one cluster again after the heal")


def test_a_short_split_heals_by_raft_alone():
    world = World(16)
    procs = chain(world, 3)
    world.run_until(lambda: world.one_cluster(voters=3), 5.0, "one cluster")
    cluster_id = procs[0].core.cluster_id
    world.partition((procs[0].name,), (procs[1].name, procs[2].name))
    world.run(SETTINGS.dead_after / 2)
    world.heal()
    world.run_until(lambda: world.one_cluster(voters=3), 5.0, "one cluster again")
    assert {p.core.cluster_id for p in procs} == {cluster_id}


def test_a_restart_with_a_pinned_id_votes_again_only_after_the_leader_readmitted_it():
    world = World(17)
    procs = chain(world, 3)
    world.run_until(lambda: world.one_cluster(voters=3), 5.0, "one cluster")
    follower = next(p for p in procs if p.core.status().raft.role is not Role.LEADER)
    world.kill(follower.name)
    world.run(0.5)
    again = world.start(follower.name, (procs[0].name if procs[0] is not follower else procs[1].name,), keep_id=True)
    assert again.id == follower.id
    world.run_until(lambda: world.one_cluster(voters=3), 3.0, "the restarted server readmitted")
    assert next(p for p in world.alive()).core.table.get(again.id).instance == again.core.me.instance
    leader = next(p for p in world.alive() if p.core.status().raft.role is Role.LEADER)
    world.kill(leader.name)  # the two left need the restarted one's vote
    world.run_until(lambda: any(p.core.status().raft.role is Role.LEADER for p in world.alive()), 2.0,
                    "a new leader elected with the restarted server's vote")
