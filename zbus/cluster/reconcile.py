"""The Raft leader's bookkeeping: keep the server table and the Raft membership in step with the
servers that are alive. One change at a time; pure (the caller proposes what this returns).

Order of work, first match wins:

1. the leader's own row (a new leader, or a founder that has no row yet);
2. a member unreachable for ``dead_after``: out of the Raft membership (the quorum shrinks), then
   out of the table;
3. a live server that announces this cluster and has no row, or a stale one (a restart): its row;
4. a live row that is not in the Raft membership yet: add it as a learner;
5. a live learner whose log has caught up with the commit index: promote it to voter.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass

from .. import wire
from ..raft import ConfChangeOp, RaftStatus
from .table import ServerTable, TableCommand, TableRemove, TableUpsert, same_server


@dataclass(frozen=True)
class Propose:
    """Append a table command to the log."""

    command: TableCommand


@dataclass(frozen=True)
class ChangeMembership:
    op: ConfChangeOp
    server_id: str


Change = Propose | ChangeMembership


def next_change(
    self_row: wire.ClusterServer,
    table: ServerTable,
    raft: RaftStatus,
    live: Set[str],
    announced: Mapping[str, wire.ClusterServer],
    down_for: Mapping[str, float],
    dead_after: float,
) -> Change | None:
    """The next step for the leader ``self_row.id``.

    ``live``: servers reachable now; ``announced``: live servers that say they belong to this
    cluster, each as it describes itself; ``down_for``: seconds each unreachable server has been so.
    """
    me = self_row.id
    if not same_server(table.get(me), self_row):
        return Propose(TableUpsert(self_row))
    members = set(raft.voters) | set(raft.learners)
    dead = {server for server, seconds in down_for.items() if seconds >= dead_after and server != me}
    gone = sorted(members & dead)
    if gone:
        return ChangeMembership(ConfChangeOp.REMOVE, gone[0])
    for server in table:
        if server in dead and server not in members:
            return Propose(TableRemove(server))
    for server, row in announced.items():
        if server != me and server in live and not same_server(table.get(server), row):
            return Propose(TableUpsert(row))
    for server in table:
        if server not in members and server in live:
            return ChangeMembership(ConfChangeOp.ADD_LEARNER, server)
    replicated = dict(raft.replicated)
    for server in raft.learners:
        if server in live and server in table and replicated.get(server, 0) >= raft.commit:
            return ChangeMembership(ConfChangeOp.PROMOTE, server)
    return None
