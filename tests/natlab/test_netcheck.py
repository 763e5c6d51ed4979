"""Servers' UDP reflectors tell clients their public endpoint, and whether their NAT is symmetric.

Real ``zbus-node server`` and ``zbus-node netcheck`` processes inside the NAT lab's namespaces.
"""

from __future__ import annotations

import json
import sys

import pytest

pytestmark = pytest.mark.timeout(60)

SERVERS = ("tcp://203.0.113.10:7700", "tcp://203.0.113.11:7700")


def build(natlab):
    natlab.add_public_host("s1")
    natlab.add_public_host("s2")
    natlab.add_router("home", nat="cone")
    natlab.add_router("office", nat="symmetric")
    natlab.add_host("alice", router="home")
    natlab.add_host("bob", router="office")
    natlab.add_host("pub", router=None)
    natlab.build()
    for host, endpoint in zip(("s1", "s2"), SERVERS):
        server = natlab.popen(host, [sys.executable, "-m", "zbus.cli", "server", "--listen", endpoint])
        server.wait_line(lambda line: "listening on" in line, timeout=15.0, what="the server's ready line")
    return natlab


def netcheck(natlab, host: str) -> dict:
    argv = [sys.executable, "-m", "zbus.cli", "netcheck", "--json"]
    for endpoint in SERVERS:
        argv += ["--server", endpoint]
    return json.loads(natlab.run(host, argv, timeout=20.0).stdout)


def test_netcheck_sees_the_public_endpoint_and_tells_cone_from_symmetric(natlab):
    lab = build(natlab)
    behind_cone = netcheck(lab, "alice")
    assert behind_cone["private"][0] == lab.addr("alice")
    assert set(behind_cone["observed"]) == set(SERVERS)
    assert len(set(behind_cone["observed"].values())) == 1, behind_cone
    assert behind_cone["public"][0].split(":")[0] == lab.public_addr("alice")
    assert behind_cone["mapping_varies"] is False

    behind_symmetric = netcheck(lab, "bob")
    ports = {o.split(":")[1] for o in behind_symmetric["observed"].values()}
    assert {o.split(":")[0] for o in behind_symmetric["observed"].values()} == {lab.public_addr("bob")}
    assert len(ports) == 2 and behind_symmetric["mapping_varies"] is True

    public = netcheck(lab, "pub")
    assert public["public"] == [f"{lab.addr('pub')}:{public['local_port']}"]
    assert public["mapping_varies"] is False
