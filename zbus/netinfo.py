"""The node's own addresses, read from its interfaces.

We use ``ifaddr`` (maintained, pure Python) instead of ``netifaces``, which has had no release since
2021 and no wheels for current Pythons; see docs/configuration.md.
"""

from __future__ import annotations

import ipaddress

import ifaddr


def private_addresses() -> list[str]:
    """IPv4 addresses of this host's interfaces, loopback last, link-local left out.

    Loopback is kept (last) so that peers on the same host can link directly; a peer on another
    host that tries it reaches its own loopback, and the link handshake rejects the wrong Id.
    """
    found: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if not ip.is_IPv4:
                continue
            addr = ipaddress.IPv4Address(ip.ip)
            if addr.is_link_local or addr.is_unspecified:
                continue
            if str(addr) not in found:
                found.append(str(addr))
    found.sort(key=lambda a: ipaddress.IPv4Address(a).is_loopback)
    return found
