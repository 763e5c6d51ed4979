"""Path choice is a pure function of the Routes snapshot."""

from __future__ import annotations

import random
from types import MappingProxyType

import pytest

from zbus import Disconnected, Unreachable
from zbus.routing import Routes, choose_path


def routes(holders: dict, registered=(0, 1, 2)) -> Routes:
    return Routes(registered=tuple(registered), holders=MappingProxyType(holders),
                  endpoints=("tcp://a:1", "tcp://b:1", "tcp://c:1"))


def test_a_single_holder_is_used():
    assert choose_path("C-1", routes({"C-1": (2,)}), random.Random(1)) == 2


def test_several_holders_are_chosen_at_random_among_them():
    rng = random.Random(7)
    seen = {choose_path("C-1", routes({"C-1": (0, 2)}), rng) for _ in range(200)}
    assert seen == {0, 2}


def test_unknown_destination_is_unreachable():
    with pytest.raises(Unreachable, match="C-9"):
        choose_path("C-9", routes({"C-1": (0,)}), random.Random())


def test_no_registered_server_is_disconnected():
    with pytest.raises(Disconnected, match="tcp://a:1"):
        choose_path("C-1", routes({}, registered=()), random.Random())
