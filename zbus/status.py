"""Ask a server for its view of the cluster (``zbus-node status``)."""

from __future__ import annotations

import sys

from . import sockets, wire
from .config import parse_endpoint
from .errors import ConfigError
from .security import load_security, split_pinned


def query_status(endpoint: str, timeout: float = 3.0, key_file: str | None = None,
                 trust_dir: str | None = None) -> wire.StatusReply:
    """Ask the server at ``endpoint``; with ``key_file``/``trust_dir`` (security on), over CURVE: then
    ``endpoint`` names the server's Id, ``S-<uuid4>@tcp://host:port``."""
    server_id, endpoint = split_pinned(endpoint)
    parse_endpoint(endpoint, "--server")
    if bool(key_file) != bool(trust_dir):
        raise ConfigError("--key and --trust go together: expected a key file trusted by the server and the "
                          "directory holding the server's .pub")
    security = load_security(key_file or "", trust_dir or "")
    return sockets.ask(endpoint, wire.StatusRequest(), wire.StatusReply, timeout,
                       hint=" (is a zbus server running there?)", security=security, server_id=server_id)


def render_status(reply: wire.StatusReply) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console() if sys.stdout.isatty() else Console(width=200)  # piped: no 80-column squeeze
    servers = Table(title=f"zbus cluster (asked {reply.self_id}; master {reply.master})")
    for column in ("id", "name", "endpoint", "role", "alive", "clients", "relayed msgs", "relayed bytes", "dropped"):
        servers.add_column(column, overflow="fold",  # wrap, never elide: ids and names must stay whole
                           justify="right" if column.startswith(("relayed", "dropped", "clients")) else "left")
    total = wire.ServerStats()
    for s in reply.servers:
        st = reply.cluster_stats.get(s.id)
        figures = ("?", "?", "?") if st is None else (
            f"{st.relayed_msgs:,}", f"{st.relayed_bytes:,}", f"{sum(st.dropped.values()):,}")
        if st is not None:
            total = wire.ServerStats(total.clients + st.clients, total.relayed_msgs + st.relayed_msgs,
                                     total.relayed_bytes + st.relayed_bytes)
        servers.add_row(s.id, s.name, s.endpoint, s.role, "yes" if s.alive else "no", str(s.clients), *figures)
    console.print(servers)
    clients = Table(title=f"{len(reply.clients)} clients")
    for column in ("id", "name", "server"):
        clients.add_column(column, overflow="fold")
    for c in reply.clients:
        clients.add_row(c.id, c.name, c.server)
    console.print(clients)
    st = reply.stats
    dropped = ", ".join(f"{k}={v}" for k, v in sorted(st.dropped.items())) or "none"
    console.print(f"cluster: relayed {total.relayed_msgs:,} messages, {total.relayed_bytes:,} bytes")
    console.print(f"this server: relayed {st.relayed_msgs:,} messages, {st.relayed_bytes:,} bytes; dropped: {dropped}")
