"""Path choice, pure: which way a message to ``dst`` goes, given an immutable :class:`Routes`."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from .errors import Disconnected, Unreachable
from .wire import ClientInfo

_EMPTY: Mapping = MappingProxyType({})


@dataclass(frozen=True)
class Routes:
    """A snapshot of what a client knows, published by its engine after every change."""

    registered: tuple[int, ...] = ()  # indexes of the servers we are registered with and synced to
    holders: Mapping[str, tuple[int, ...]] = field(default_factory=lambda: _EMPTY)  # client id -> servers
    clients: Mapping[str, ClientInfo] = field(default_factory=lambda: _EMPTY)
    names: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: _EMPTY)  # name -> client ids
    endpoints: tuple[str, ...] = ()  # server endpoint per index
    refusals: tuple[str, ...] = ()  # why servers refused to register us (e.g. Id in use)


def choose_path(dst: str, routes: Routes, rng: random.Random) -> int:
    """The index of the server to relay through; raise Unreachable or Disconnected if none."""
    holders = routes.holders.get(dst)
    if holders:
        return holders[0] if len(holders) == 1 else rng.choice(holders)
    if not routes.registered:
        raise Disconnected(f"no server connection (servers: {', '.join(routes.endpoints)}); reconnecting")
    raise Unreachable(f"destination not found: no connected server lists {dst}")
