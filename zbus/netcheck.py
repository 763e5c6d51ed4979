"""What a client can learn about its own network: ``zbus-node netcheck``.

It sends a :class:`~zbus.wire.Probe` from one UDP socket to every server's reflector and reads the
:class:`~zbus.wire.Observed` answers. The same public ip:port seen by every server means an
endpoint-independent mapping (a "cone" NAT, or no NAT): hole punching can work. Different ports
per server mean the mapping depends on the destination ("symmetric"): plain punching will not.
"""

from __future__ import annotations

import os
import select
import socket
import time
from dataclasses import dataclass

from . import netinfo, wire
from .config import parse_endpoint

TRIES = 3
WAIT_S = 0.4  # per try


@dataclass(frozen=True)
class NetReport:
    private: tuple[str, ...]
    local_port: int
    observed: dict[str, str]  # server endpoint -> "ip:port" it saw us as ("" if it did not answer)

    @property
    def public(self) -> tuple[str, ...]:
        return tuple(sorted({o for o in self.observed.values() if o}))

    @property
    def mapping_varies(self) -> bool | None:
        """True: symmetric NAT. None: fewer than two servers answered, so we cannot tell."""
        seen = [o for o in self.observed.values() if o]
        return None if len(seen) < 2 else len(set(seen)) > 1


def netcheck(servers: list[str], sock: socket.socket | None = None) -> NetReport:
    """Probe every server's UDP reflector from one socket (``sock``, or a fresh one)."""
    targets = {}
    for i, endpoint in enumerate(servers):
        host, port = parse_endpoint(endpoint, f"--server[{i}]")
        targets[endpoint] = (socket.gethostbyname(host), port)
    own = sock is None
    sock = sock or socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        if own:
            sock.bind(("0.0.0.0", 0))
        nonces = {endpoint: os.urandom(8) for endpoint in targets}
        by_nonce = {nonce: endpoint for endpoint, nonce in nonces.items()}
        observed = {endpoint: "" for endpoint in targets}
        for _ in range(TRIES):
            waiting = [e for e, seen in observed.items() if not seen]
            if not waiting:
                break
            for endpoint in waiting:
                sock.sendto(wire.encode(wire.Probe(nonces[endpoint])), targets[endpoint])
            deadline = time.monotonic() + WAIT_S
            while any(not observed[e] for e in waiting) and (left := deadline - time.monotonic()) > 0:
                if not select.select([sock], [], [], left)[0]:
                    break
                datagram, _ = sock.recvfrom(2048)
                try:
                    answer = wire.decode(datagram)
                except wire.WireError:
                    continue
                if isinstance(answer, wire.Observed) and answer.nonce in by_nonce:
                    observed[by_nonce[answer.nonce]] = f"{answer.ip}:{answer.port}"
        return NetReport(tuple(netinfo.private_addresses()), sock.getsockname()[1], observed)
    finally:
        if own:
            sock.close()
