"""Versioned client lists: deltas, coalescing, gaps and resync."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from zbus.tables import Applied, ClientTable, PeerList
from zbus.wire import ClientInfo


def info(n: int, name: str = "") -> ClientInfo:
    return ClientInfo(f"C-{n}", name or f"w{n}")


def test_changes_are_coalesced_into_one_delta_per_flush():
    table = ClientTable("S-1")
    for n in range(100):
        table.upsert(info(n))
    table.remove("C-5")
    delta = table.take_delta()
    assert (delta.version, delta.full, len(delta.upsert), delta.removed) == (1, False, 99, [])
    assert table.take_delta() is None
    table.remove("C-6")
    assert table.take_delta().removed == ["C-6"]


def test_a_join_costs_one_entry_whatever_the_size_of_the_list():
    table = ClientTable("S-1")
    for n in range(500):
        table.upsert(info(n))
    table.take_delta()
    table.upsert(info(1000))
    delta = table.take_delta()
    assert len(delta.upsert) + len(delta.removed) == 1


def test_peer_list_applies_in_order_ignores_stale_and_detects_gaps():
    table, peers = ClientTable("S-1"), PeerList()
    table.upsert(info(1))
    first = table.take_delta()
    assert peers.apply(first) is Applied.GAP  # nothing to apply a delta to
    assert peers.apply(table.snapshot()) is Applied.APPLIED
    table.upsert(info(2))
    second = table.take_delta()
    table.remove("C-1")
    third = table.take_delta()
    assert peers.apply(third) is Applied.GAP
    assert peers.apply(second) is Applied.APPLIED
    assert peers.apply(second) is Applied.STALE
    assert peers.apply(third) is Applied.APPLIED
    assert set(peers.entries) == {"C-2"}


def test_a_delta_from_another_server_incarnation_is_a_gap():
    peers = PeerList()
    old, new = ClientTable("S-old"), ClientTable("S-new")
    old.upsert(info(1))
    old.take_delta()
    peers.apply(old.snapshot())
    new.upsert(info(2))
    assert peers.apply(new.take_delta()) is Applied.GAP


@settings(max_examples=200)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 20)), max_size=60), st.integers(0, 2**32))
def test_lossy_delivery_with_resync_converges(ops, seed):
    rng = random.Random(seed)
    table, peers = ClientTable("S-1"), PeerList()
    peers.apply(table.snapshot())
    for join, n in ops:
        table.upsert(info(n)) if join else table.remove(f"C-{n}")
        delta = table.take_delta()
        if delta is None or rng.random() < 0.3:
            continue  # lost on the way
        if peers.apply(delta) is Applied.GAP:
            peers.apply(table.snapshot())
    if table.version != peers.version:
        peers.apply(table.snapshot())
    assert peers.entries == {e.id: e for e in table.entries()}


@settings(max_examples=200)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 20)), max_size=60))
def test_a_snapshot_taken_while_changes_are_held_back_converges_with_the_next_delta(ops):
    """A server may hold a delta back (coalescing) and still give a newcomer its snapshot at once."""
    table = ClientTable("S-1")
    lists = []  # every newcomer's list, joined at some point with changes possibly held back
    for op, n in ops:
        if op == 0:
            table.upsert(info(n))
        elif op == 1:
            table.remove(f"C-{n}")
        else:
            newcomer = PeerList()
            assert newcomer.apply(table.snapshot()) is Applied.APPLIED
            lists.append(newcomer)
        if n % 3 == 0:  # publish now and then
            delta = table.take_delta()
            if delta is not None:
                for peers in lists:
                    assert peers.apply(delta) is Applied.APPLIED
    delta = table.take_delta()
    for peers in lists:
        if delta is not None:
            assert peers.apply(delta) is Applied.APPLIED
        assert peers.entries == {e.id: e for e in table.entries()}
