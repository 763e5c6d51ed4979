"""Server clusters of real processes on 127.0.0.1: bootstrap, one Master, kill -9 failover, rejoin."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

import zbus
from tests.helpers import ServerProcess, free_port_pair, wait_until
from zbus.cluster.status import cluster_endpoint_of, query_cluster_status
from zbus.errors import ZbusError
from zbus.status import query_status

pytestmark = pytest.mark.timeout(60)


def start_chain(start_server, count: int, extra: list[str] | None = None) -> list[ServerProcess]:
    """``count`` servers, each started knowing only the previous one."""
    servers: list[ServerProcess] = []
    for i in range(count):
        peer = ["--peer", servers[-1].endpoint] if servers else []
        servers.append(start_server(f"srv{i}", port=free_port_pair(), extra=peer + (extra or [])))
    return servers


def cluster_status(server: ServerProcess):
    return query_cluster_status(cluster_endpoint_of(server.endpoint), timeout=1.0)


def settled(servers: list[ServerProcess]) -> bool:
    """One cluster whose voters are exactly these servers, as each of them sees it."""
    try:
        statuses = [cluster_status(s) for s in servers]
    except ZbusError:
        return False
    ids = {s.id for s in servers}
    return (len({st.cluster_id for st in statuses}) == 1
            and all(st.phase == "member" and set(st.voters) == ids and set(st.table) == ids for st in statuses)
            and sum(st.role == "leader" for st in statuses) == 1)


def agreed_master(servers: list[ServerProcess], alive: int) -> str | None:
    """The Master every server reports, if they all report the same one, one of them, and each
    sees ``alive`` live servers."""
    try:
        replies = [query_status(s.endpoint, timeout=1.0) for s in servers]
    except ZbusError:
        return None
    masters = {r.master for r in replies}
    if len(masters) != 1:
        return None
    master = masters.pop()
    if master not in {s.id for s in servers}:
        return None
    if any(sum(row.alive for row in r.servers) != alive for r in replies):
        return None
    return master


@pytest.mark.parametrize("count", [3, 5])
def test_servers_knowing_only_the_previous_one_form_one_cluster_with_one_master(start_server, count):
    servers = start_chain(start_server, count)
    wait_until(lambda: settled(servers), 10.0, f"{count} servers to form one cluster")
    master = wait_until(lambda: agreed_master(servers, count), 5.0, "every server to report the same master")
    for server in servers:
        reply = query_status(server.endpoint)
        assert {row.id for row in reply.servers} == {s.id for s in servers}
        assert [row.id for row in reply.servers if row.role == "master"] == [master]
        # a full mesh: every server counts every other one as live
        assert set(cluster_status(server).live) == {s.id for s in servers} - {server.id}


@pytest.mark.parametrize("count", [3, 5])
def test_master_kill_elects_new_master_within_2s_and_the_restarted_server_rejoins_as_follower(start_server, count):
    servers = start_chain(start_server, count)
    wait_until(lambda: settled(servers), 10.0, "one cluster")
    old = wait_until(lambda: agreed_master(servers, count), 5.0, "an agreed master")
    victim = next(s for s in servers if s.id == old)
    survivors = [s for s in servers if s is not victim]

    victim.kill()
    killed = time.monotonic()
    new = wait_until(lambda: (m := agreed_master(survivors, count - 1)) and m != old and m, 2.0,
                     "every survivor to report the same new master")
    took = time.monotonic() - killed
    print(f"{count} servers: new master agreed {took:.3f}s after kill -9 of the master")

    restarted = start_server(victim.name, port=victim.port, extra=["--peer", survivors[0].endpoint])
    everyone = survivors + [restarted]
    wait_until(lambda: restarted.id in cluster_status(survivors[0]).voters, 5.0, "the restarted server to be a voter")
    assert wait_until(lambda: agreed_master(everyone, count), 5.0, "agreement with the restarted server") == new
    assert cluster_status(restarted).role == "follower"
    dead_row = next(r for r in query_status(restarted.endpoint).servers if r.id == victim.id)
    assert not dead_row.alive  # still listed until dead_after (30 s by default)


def test_two_servers_the_earlier_started_is_master_and_the_survivor_is_temporary_master(start_server):
    first, second = start_chain(start_server, 2)
    wait_until(lambda: settled([first, second]), 10.0, "a cluster of two")
    assert wait_until(lambda: agreed_master([first, second], 2), 5.0, "an agreed master") == first.id
    first.kill()
    killed = time.monotonic()
    wait_until(lambda: agreed_master([second], 1) == second.id, 2.0, "the survivor to be temporary master")
    print(f"2 servers: the survivor is temporary master {time.monotonic() - killed:.3f}s after kill -9")
    status = cluster_status(second)
    assert status.role != "leader" and set(status.table) == {first.id, second.id}  # no quorum: no change


def test_a_dead_server_is_removed_from_every_table_after_dead_after(start_server):
    servers = start_chain(start_server, 3, extra=["--dead-after", "1.5"])
    wait_until(lambda: settled(servers), 10.0, "one cluster")
    master = wait_until(lambda: agreed_master(servers, 3), 5.0, "an agreed master")
    victim = next(s for s in servers if s.id != master)
    survivors = [s for s in servers if s is not victim]
    victim.kill()
    wait_until(lambda: settled(survivors), 6.0, "the dead server to leave the Raft membership and the table")
    wait_until(lambda: all(victim.id not in {row.id for row in query_status(s.endpoint).servers} for s in survivors),
               1.0, "the dead server to leave every status")


def test_every_server_reports_the_client_count_of_every_server(start_server, clients):
    servers = start_chain(start_server, 3)
    wait_until(lambda: settled(servers), 10.0, "one cluster")
    client = zbus.Client(servers=[servers[1].endpoint], name="counted")
    clients.append(client)
    assert client.wait_connected(5.0)

    def counts_agree() -> bool:
        own = {s.id: query_status(s.endpoint).stats.clients for s in servers}
        return sum(own.values()) > 0 and all(
            {row.id: row.clients for row in query_status(s.endpoint).servers} == own for s in servers)

    wait_until(counts_agree, 5.0, "every server to see every server's client count")


def test_any_server_shows_every_servers_relayed_figures_in_status(start_server, clients):
    servers = start_chain(start_server, 3)
    wait_until(lambda: settled(servers), 10.0, "one cluster")
    sender = zbus.Client(servers=[servers[0].endpoint], name="sender", max_links=0)
    clients.append(sender)
    receiver = zbus.Client(servers=[servers[0].endpoint], name="receiver", max_links=0)
    clients.append(receiver)
    dst = sender.wait_peer("receiver", 10.0)
    for i in range(100):
        sender.send(dst, b"x" * 100)
    for _ in range(100):
        receiver.recv(timeout=5.0)

    def relayed_everywhere() -> bool:
        # Some server relayed (clients may pick any of the three); every server sees the same total.
        totals = []
        for s in servers:
            reply = query_status(s.endpoint)
            if set(reply.cluster_stats) != {x.id for x in servers}:
                return False
            totals.append(sum(st.relayed_msgs for st in reply.cluster_stats.values()))
        return totals[0] >= 100 and len(set(totals)) == 1

    wait_until(relayed_everywhere, 5.0, "every server to show every server's relayed figures")
    out = subprocess.run([sys.executable, "-m", "zbus.cli", "status", "--server", servers[2].endpoint, "--json"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    shown = json.loads(out)["cluster_stats"]
    assert set(shown) == {s.id for s in servers}
    assert sum(figures["relayed_msgs"] for figures in shown.values()) >= 100
    table = subprocess.run([sys.executable, "-m", "zbus.cli", "status", "--server", servers[2].endpoint],
                           capture_output=True, text=True, timeout=30, check=True).stdout
    assert "cluster: relayed" in table
