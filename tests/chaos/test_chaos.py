"""The chaos soak as a test: 3 servers, 6 clients, servers (the Master too) killed -9 and restarted
while clients send acknowledged messages over relayed and direct paths. ``ZBUS_CHAOS_S`` sets the
length (default 60 s); longer runs: ``python -m tests.chaos.chaos --duration 600``."""

from __future__ import annotations

import os

import pytest

from tests.chaos.chaos import run

DURATION_S = float(os.environ.get("ZBUS_CHAOS_S", "60"))

pytestmark = pytest.mark.timeout(DURATION_S + 240)


def test_chaos_soak_loses_duplicates_and_reorders_no_acked_message():
    outcome = run(duration=DURATION_S, n_servers=3, n_clients=6, kill_every=4.0, seed=None)
    print(outcome.summary())
    assert outcome.kills, "the soak killed no server"
    assert any("master" in kill for kill in outcome.kills), outcome.kills
    assert outcome.acked > 0, outcome.summary()
    assert (outcome.lost, outcome.duplicated, outcome.out_of_order) == (0, 0, 0), outcome.summary()
