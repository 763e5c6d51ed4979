"""Path choice is a pure function of the Routes snapshot."""

from __future__ import annotations

from types import MappingProxyType

import pytest

from zbus import Disconnected, Unreachable
from zbus.links import LinkView
from zbus.routing import Routes, choose_path


def routes(holders: dict, registered=(0, 1, 2), links: dict | None = None) -> Routes:
    return Routes(registered=tuple(registered), holders=MappingProxyType(holders),
                  endpoints=("tcp://a:1", "tcp://b:1", "tcp://c:1"), links=MappingProxyType(links or {}))


def test_a_single_holder_is_used():
    assert choose_path("C-1", routes({"C-1": (2,)})) == 2


def test_several_holders_spread_destinations_but_each_destination_sticks_to_one():
    table = routes({f"C-{i}": (0, 2) for i in range(100)})
    chosen = {f"C-{i}": choose_path(f"C-{i}", table) for i in range(100)}
    assert set(chosen.values()) == {0, 2}
    assert all(choose_path(dst, table) == index for dst, index in chosen.items())


def test_an_up_direct_link_is_preferred_over_relay():
    link = LinkView("C-1", "direct", "tcp://127.0.0.1:5", 0.001)
    assert choose_path("C-1", routes({"C-1": (0, 1)}, links={"C-1": link})) == "C-1"
    assert choose_path("C-1", routes({}, registered=(), links={"C-1": link})) == "C-1"  # no server needed


def test_unknown_destination_is_unreachable():
    with pytest.raises(Unreachable, match="C-9"):
        choose_path("C-9", routes({"C-1": (0,)}))


def test_no_registered_server_is_disconnected():
    with pytest.raises(Disconnected, match="tcp://a:1"):
        choose_path("C-1", routes({}, registered=()))
