"""Path choice, pure: which way a message to ``dst`` goes, given an immutable :class:`Routes`."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from .errors import Disconnected, Unreachable
from .wire import ClientInfo

_EMPTY: Mapping = MappingProxyType({})

Path = int | str  # a server index (relay), or the destination's Id itself (its direct link)


@dataclass(frozen=True)
class Routes:
    """A snapshot of what a client knows, published by its engine after every change."""

    registered: tuple[int, ...] = ()  # indexes of the servers we are registered with and synced to
    holders: Mapping[str, tuple[int, ...]] = field(default_factory=lambda: _EMPTY)  # client id -> servers
    clients: Mapping[str, ClientInfo] = field(default_factory=lambda: _EMPTY)
    names: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: _EMPTY)  # name -> client ids
    endpoints: tuple[str, ...] = ()  # server endpoint per index
    max_frames: tuple[int, ...] = ()  # per server index: the largest frame it relays (0: not told)
    refusals: tuple[str, ...] = ()  # why servers refused to register us (e.g. Id in use)
    links: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)  # peer id -> links.LinkView (up links)


def choose_path(dst: str, routes: Routes) -> Path:
    """How to reach ``dst``: its Id if a direct link to it is up, else the index of a server that
    lists it; raise Unreachable or Disconnected if there is none.

    Among several servers the choice is fixed per destination (spread by the Id's hash) so a stream
    stays on one path, and changes only when the servers' lists change.
    """
    if dst in routes.links:
        return dst
    holders = routes.holders.get(dst)
    if holders:
        return holders[0] if len(holders) == 1 else holders[hash(dst) % len(holders)]
    if not routes.registered:
        raise Disconnected(f"no server connection (servers: {', '.join(routes.endpoints)}); reconnecting")
    raise Unreachable(f"destination not found: no connected server lists {dst}")
