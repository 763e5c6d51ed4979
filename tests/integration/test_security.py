"""CURVE on every link, Ids bound to keys: real ``zbus-node server`` processes and clients on 127.0.0.1.

Keys are made with ``zbus-node keygen`` into a tmp dir; each node's trust directory holds the ``.pub``
files it trusts. See docs/security.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest
import zmq

import zbus
from tests.helpers import REPO, Keys, ServerProcess, free_port_pair, wait_until
from zbus import sockets, wire
from zbus.cluster.status import cluster_endpoint_of, query_cluster_status
from zbus.security import load_security, read_key_file
from zbus.security import secure_client as curve_client

pytestmark = pytest.mark.timeout(90)


class Stderr:
    """Collects a server process's log lines as they come (a reader thread; ends at EOF when it is killed)."""

    def __init__(self, server: ServerProcess) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(server.proc.stderr,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        try:
            for line in stream:
                self.lines.append(line)
        except (ValueError, OSError):  # closed by ServerProcess.kill()
            pass

    def has(self, *words: str) -> bool:
        return any(all(w in line for w in words) for line in list(self.lines))


def secure_server(start_server, keys: Keys, name: str, node: str, peers: list[ServerProcess] = ()) -> ServerProcess:
    extra = keys.flags(node) + [a for p in peers for a in ("--peer", f"{p.id}@{p.endpoint}")]
    server = start_server(name, port=free_port_pair(), extra=extra)  # the cluster port (+1) must be free too
    assert server.id == node  # the Id comes from the key file
    server.log = Stderr(server)
    return server


def pinned(servers: list[ServerProcess]) -> list[str]:
    return [f"{s.id}@{s.endpoint}" for s in servers]


def secure_client(clients: list, keys: Keys, servers: list[ServerProcess], name: str, node: str, **kw) -> zbus.Client:
    client = zbus.Client(servers=pinned(servers), name=name, key_file=keys.key(node), trust_dir=str(keys.trust), **kw)
    clients.append(client)
    assert client.id == node
    wait_until(lambda: all(link.state == "registered" for link in client.status().servers), 10.0,
               f"{name} registered with every server")
    return client


def status_json(server: ServerProcess, keys: Keys | None, node: str | None) -> subprocess.CompletedProcess:
    target = f"{server.id}@{server.endpoint}" if keys else server.endpoint
    argv = [sys.executable, "-m", "zbus.cli", "status", "--server", target, "--json", "--timeout", "2",
            *(keys.flags(node) if keys else [])]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=REPO)


@pytest.fixture
def keys(tmp_path) -> Keys:
    return Keys(tmp_path)


def test_a_secure_cluster_of_two_servers_and_three_clients_relays_links_and_answers_status(start_server, clients, keys):
    s1 = secure_server(start_server, keys, "s1", keys.new(server=True))
    s2 = secure_server(start_server, keys, "s2", keys.new(server=True), peers=[s1])
    trio = [secure_client(clients, keys, [s1, s2], name, keys.new()) for name in ("alice", "bob", "carol")]
    for c in trio:
        for other in trio:
            if other is not c:
                c.wait_peer(other.id, 10.0)
    # By relay first (the first message to a peer goes by relay and asks for a direct link)...
    for sender in trio:
        for receiver in trio:
            if receiver is not sender:
                for i in range(50):
                    sender.send(receiver.id, b"r%d" % i)
    for receiver in trio:
        got = [receiver.recv(timeout=5.0) for _ in range(100)]
        assert "relay" in {m.via for m in got}
        for sender in trio:
            if sender is not receiver:
                assert [m.data for m in got if m.src == sender.id] == [b"r%d" % i for i in range(50)]
    # ...then over direct links, CURVE too (the dialer checks the listener's key, the listener its Id).
    for sender in trio:
        for receiver in trio:
            if receiver is not sender:
                assert sender.wait_link(receiver.id, 10.0), f"{sender.name} -> {receiver.name} link"
                for i in range(50):
                    sender.send(receiver.id, b"d%d" % i)
    for receiver in trio:
        got = [receiver.recv(timeout=5.0) for _ in range(100)]
        assert {m.via for m in got} == {"direct"}
        for sender in trio:
            if sender is not receiver:
                assert [m.data for m in got if m.src == sender.id] == [b"d%d" % i for i in range(50)]
    # The status query works with a trusted key, names both servers and all three clients.
    answer = status_json(s1, keys, trio[0].id)
    assert answer.returncode == 0, answer.stderr
    reply = json.loads(answer.stdout)
    assert {s["id"] for s in reply["servers"]} == {s1.id, s2.id}
    assert {c["id"] for c in reply["clients"]} == {c.id for c in trio}
    assert reply["stats"]["dropped"].get("refused", 0) == 0
    # Without keys a secure server does not answer at all (plain text is refused by mechanism).
    plain = status_json(s1, None, None)
    assert plain.returncode != 0 and "no answer" in plain.stderr
    # The cluster endpoint (the Raft mesh's ROUTER) is CURVE too; its status names both members.
    security = load_security(keys.key(trio[0].id), str(keys.trust))

    def both_members():
        reply = query_cluster_status(cluster_endpoint_of(s2.endpoint), 5.0, security, s2.id)
        return reply if set(reply.table) == {s1.id, s2.id} and reply.phase == "member" else None

    mesh = wait_until(both_members, 15.0, "s2's cluster status to name both members", interval=0.2)
    assert mesh.dropped.get("not-your-id", 0) == 0


def test_a_client_with_a_key_not_in_the_trust_dir_is_refused_and_the_refusal_is_logged(start_server, clients, keys):
    server = secure_server(start_server, keys, "s1", keys.new(server=True))
    mallory = keys.new(trusted=False)  # its .pub never reaches the server's trust directory
    with pytest.raises(zbus.Refused, match="refused our key"):
        zbus.Client(servers=pinned([server]), key_file=keys.key(mallory), trust_dir=str(keys.trust),
                    connect_timeout=10.0)
    wait_until(lambda: server.log.has("refused a CURVE connection", "key not in the trust list"), 10.0,
               "the server to log the refusal with its reason")
    alice = secure_client(clients, keys, [server], "alice", keys.new())  # the server serves others
    assert alice.status().servers[0].clients == 1
    # A status query with the untrusted key is refused, not left hanging.
    answer = status_json(server, keys, mallory)
    assert answer.returncode != 0 and "refused our key" in answer.stderr


def test_a_client_refuses_a_server_whose_key_is_not_the_one_trusted_for_the_id_it_dialed(start_server, clients, keys):
    server = secure_server(start_server, keys, "s1", keys.new(server=True))
    elsewhere = keys.new(server=True)  # trusted, but not the server at that endpoint
    with pytest.raises(zbus.Refused, match="CURVE handshake with .* failed"):
        zbus.Client(servers=[f"{elsewhere}@{server.endpoint}"], key_file=keys.key(keys.new()),
                    trust_dir=str(keys.trust), connect_timeout=10.0)


def _raw_curve_dealer(keys: Keys, node: str, server_public: bytes, endpoint: str) -> zmq.Socket:
    sock = sockets.tune(sockets.context().socket(zmq.DEALER), max_frame=wire.DEFAULT_MAX_FRAME)
    curve_client(sock, read_key_file(keys.key(node), need_secret=True), server_public)
    sock.connect(endpoint)
    return sock


def _answer(sock: zmq.Socket, what: str) -> object:
    assert sock.poll(10_000), f"no answer to {what}"
    return wire.decode(sock.recv_multipart()[-1])


def test_a_trusted_key_claiming_another_id_is_refused_by_servers_and_by_direct_links(start_server, clients, keys):
    server = secure_server(start_server, keys, "s1", keys.new(server=True))
    alice = secure_client(clients, keys, [server], "alice", keys.new())
    mallory = keys.new()  # trusted, but bound to its own Id
    server_public = read_key_file(keys.dir / f"{server.id}.pub", need_secret=False).public
    sock = _raw_curve_dealer(keys, mallory, server_public, server.endpoint)
    try:
        sock.send(wire.encode(wire.Hello(alice.id, "fake-alice", instance="other", data_in=b"\x01" * 16,
                                         data_out=b"\x02" * 16)))
        refusal = _answer(sock, "a Hello claiming alice's Id")
        assert isinstance(refusal, wire.Error) and refusal.code == "not-your-id"
        assert f"key belongs to {mallory}" in refusal.message
    finally:
        sock.close(linger=0)
    wait_until(lambda: server.log.has("refused a Hello", f"claims '{alice.id}'", mallory), 10.0,
               "the server to log the refused Hello with its reason")
    assert alice.status().servers[0].state == "registered"  # alice keeps her registration
    # Alice's direct-link listener refuses a LinkHello claiming bob's Id from mallory's key.
    bob = secure_client(clients, keys, [server], "bob", keys.new())
    alice.wait_peer(bob.id, 10.0)
    alice_public = read_key_file(keys.dir / f"{alice.id}.pub", need_secret=False).public
    link = _raw_curve_dealer(keys, mallory, alice_public, alice._engine.listen_endpoint.replace("0.0.0.0", "127.0.0.1"))
    try:
        link.send(wire.encode(wire.LinkHello(bob.id, alice.id, b"n" * 8, b"\x03" * 16)))
        refusal = _answer(link, "a LinkHello claiming bob's Id")
        assert isinstance(refusal, wire.Error) and refusal.code == "not-your-id"
    finally:
        link.close(linger=0)
    status = json.loads(status_json(server, keys, alice.id).stdout)
    assert status["stats"]["dropped"]["refused"] >= 1


def test_a_plain_text_client_gets_nowhere_and_the_server_keeps_serving_the_others(start_server, clients, keys):
    server = secure_server(start_server, keys, "s1", keys.new(server=True))
    alice = secure_client(clients, keys, [server], "alice", keys.new())
    bob = secure_client(clients, keys, [server], "bob", keys.new())
    plain = zbus.Client(servers=[server.endpoint], name="plain", connect_timeout=1.0)
    clients.append(plain)
    assert [link.state for link in plain.status().servers] == ["down"]
    with pytest.raises(zbus.Disconnected):
        plain.send(alice.id, b"let me in")
    for i in range(500):
        alice.send(bob.id, b"%d" % i)
    assert [bob.recv(timeout=5.0).data for _ in range(500)] == [b"%d" % i for i in range(500)]
    assert plain.status().servers[0].state == "down" and alice.status().servers[0].clients == 2
    wait_until(lambda: server.log.has("at the CURVE handshake", "plain-text peer"), 10.0,
               "the server to log the refused plain-text handshakes")


def test_a_server_with_an_untrusted_key_cannot_join_the_cluster(start_server, keys):
    s1 = secure_server(start_server, keys, "s1", keys.new(server=True))
    rogue = keys.new(server=True, trusted=False)  # it trusts s1, s1 does not trust it
    s3 = secure_server(start_server, keys, "rogue", rogue, peers=[s1])
    wait_until(lambda: s3.log.has("cluster link to", "refused our key"), 15.0, "the rogue to be refused")
    wait_until(lambda: s1.log.has("refused a CURVE connection", f"zbus-cluster-{s1.id}", "key not in the trust list"),
               10.0, "s1 to log the refusal with its reason")
    observer = keys.new()
    reply = json.loads(status_json(s1, keys, observer).stdout)
    assert [s["id"] for s in reply["servers"]] == [s1.id]
