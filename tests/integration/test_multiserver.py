"""Clients connected to several servers: every server lists them, losing some servers is survivable."""

from __future__ import annotations

import time

import pytest

import zbus
from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(60)


def connect(clients: list, servers, name: str) -> zbus.Client:
    client = zbus.Client(servers=[s.endpoint for s in servers], name=name)
    clients.append(client)
    wait_until(lambda: all(link.state == "registered" for link in client.status().servers), 5.0,
               f"{name} registered with every server")
    return client


def test_a_client_registers_with_every_server_and_is_listed_by_each(start_server, clients):
    servers = [start_server("s1"), start_server("s2")]
    alice, bob = connect(clients, servers, "alice"), connect(clients, servers, "bob")
    wait_until(lambda: len(alice.status().servers) == 2 and all(l.clients == 2 for l in alice.status().servers),
               5.0, "both servers to list both clients")
    assert {l.server_id for l in alice.status().servers} == {s.id for s in servers}
    bob_id = alice.wait_peer("bob", 5.0)
    for i in range(1000):
        alice.send(bob_id, b"%d" % i)
    assert sorted(int(bob.recv(timeout=5.0).data) for _ in range(1000)) == list(range(1000))


def test_losing_one_server_keeps_traffic_flowing_through_the_other(start_server, clients):
    servers = [start_server("s1"), start_server("s2")]
    alice, bob = connect(clients, servers, "alice"), connect(clients, servers, "bob")
    bob_id = alice.wait_peer("bob", 5.0)
    servers[0].kill()
    wait_until(lambda: [l.state for l in alice.status().servers][0] != "registered", 2.0, "alice to see s1 gone")
    for i in range(2000):
        alice.send(bob_id, b"%d" % i)  # never raises: s2 still lists bob
    assert [bob.recv(timeout=5.0).data for _ in range(2000)] == [b"%d" % i for i in range(2000)]
    assert alice.status().servers[1].state == "registered"


def test_losing_every_server_raises_disconnected_and_a_restart_recovers(start_server, clients):
    servers = [start_server("s1"), start_server("s2")]
    alice, bob = connect(clients, servers, "alice"), connect(clients, servers, "bob")
    bob_id = alice.wait_peer("bob", 5.0)
    for server in servers:
        server.kill()
    killed = time.monotonic()

    def disconnected() -> bool:
        try:
            alice.send(bob_id, b"?")
        except zbus.Disconnected:
            return True
        return False

    wait_until(disconnected, 2.0, "Disconnected once every server is gone")
    print(f"Disconnected {time.monotonic() - killed:.3f}s after the last server died")
    start_server("s2-again", port=servers[1].port)
    assert alice.wait_peer(bob_id, 10.0) == bob_id
    alice.send(bob_id, b"back")
    # A probe that send() accepted before the loss was noticed is kept and delivered first, once.
    arrived = [bob.recv(timeout=5.0).data]
    while arrived[-1] != b"back" and len(arrived) < 100:
        arrived.append(bob.recv(timeout=5.0).data)
    assert arrived[-1] == b"back" and set(arrived[:-1]) <= {b"?"}, arrived
