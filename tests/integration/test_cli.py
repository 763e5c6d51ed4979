"""zbus-node as a user runs it: real subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import zbus
from tests.helpers import REPO, free_port, wait_until

pytestmark = pytest.mark.timeout(60)


def zbus_node(*args: str, input: str | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zbus.cli", *args], input=input, capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


def test_status_json_names_the_server_as_master_and_lists_its_clients(start_server, clients):
    server = start_server("cli-srv")
    alice = zbus.Client(servers=[server.endpoint], name="alice")
    clients.append(alice)
    result = zbus_node("status", "--server", server.endpoint, "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["self"] == doc["master"] == server.id
    assert doc["servers"][0]["role"] == "master" and doc["servers"][0]["clients"] == 1
    assert doc["clients"] == [{"id": alice.id, "name": "alice", "server": server.id}]
    table = zbus_node("status", "--server", server.endpoint)
    assert table.returncode == 0 and "cli-srv" in table.stdout and "alice" in table.stdout


def test_status_of_a_server_that_is_not_there_fails_clearly():
    result = zbus_node("status", "--server", f"tcp://127.0.0.1:{free_port()}", "--timeout", "0.5")
    assert result.returncode != 0
    assert "no answer" in result.stderr


def test_interactive_client_sends_by_name_and_prints_arrivals(start_server, clients):
    server = start_server()
    bob = zbus.Client(servers=[server.endpoint], name="bob")
    clients.append(bob)
    proc = subprocess.Popen([sys.executable, "-m", "zbus.cli", "client", "--server", server.endpoint,
                             "--name", "carol"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        carol_id = bob.wait_peer("carol", 10.0)
        assert proc.stdout.readline().startswith(f"zbus client {carol_id}")
        proc.stdin.write("bob hello from carol\n")
        proc.stdin.flush()
        msg = bob.recv(timeout=10.0)
        assert (msg.src, msg.data) == (carol_id, b"hello from carol")
        bob.send(carol_id, b"hi carol")
        lines = []
        wait_until(lambda: lines.append(proc.stdout.readline()) or "hi carol" in lines[-1], 10.0, "carol's print")
        assert "bob" in lines[-1] and "via relay" in lines[-1]
        proc.stdin.write("nobody hi\n/quit\n")
        proc.stdin.flush()
        assert proc.wait(timeout=10) == 0
        assert "no client named 'nobody'" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            stream.close()


def test_demo_runs_the_embedded_default_and_stops_cleanly():
    port = free_port()
    result = zbus_node("demo", "--listen", f"tcp://127.0.0.1:{port}", "--count", "2")
    assert result.returncode == 0, result.stderr
    assert "bob   got 'ping 2'" in result.stdout and "alice got 'pong 2'" in result.stdout
    assert "demo stopped cleanly" in result.stdout


def test_server_with_a_bad_config_exits_naming_file_and_key(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('[server]\nlisten = "tcp:/nope"\n')
    result = zbus_node("server", "--config", str(config))
    assert result.returncode != 0
    assert str(config) in result.stderr and "server.listen" in result.stderr and "tcp://host:port" in result.stderr


def test_server_stops_cleanly_on_sigterm(start_server):
    server = start_server()
    assert server.stop() == 0
