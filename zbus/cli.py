"""``zbus-node``: run a server, an interactive client, the cluster status, the benchmarks."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading

import click

from . import wire
from .errors import ZbusError

log = logging.getLogger("zbus.cli")


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def main(verbose: int) -> None:
    """zbus: a message bus addressed by Id."""
    _setup_logging(verbose)


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML config file ([server] table).")
@click.option("--listen", help="Endpoint to bind, tcp://IP:PORT (default tcp://127.0.0.1:7700).")
@click.option("--peer", "peers", multiple=True, help="A server to bootstrap from, tcp://HOST:PORT (repeatable).")
@click.option("--name", help="Human-readable server name.")
@click.option("--id", "server_id", help="Pin the server Id (S-<uuid4>); default: a fresh one.")
@click.option("--cluster-listen", help="Raft mesh endpoint, tcp://IP:PORT (default: the --listen port + 1).")
@click.option("--dead-after", type=float, help="Seconds unreachable before the cluster removes a server.")
@click.option("--key", "key_file", type=click.Path(dir_okay=False),
              help="This server's key file (S-….key from keygen --server): turns CURVE security on.")
@click.option("--trust", "trust_dir", type=click.Path(file_okay=False),
              help="Directory of the trusted nodes' .pub files (with --key). Peers are then S-ID@tcp://HOST:PORT.")
def server(config_path: str | None, listen: str | None, peers: tuple[str, ...], name: str | None,
           server_id: str | None, cluster_listen: str | None, dead_after: float | None,
           key_file: str | None, trust_dir: str | None) -> None:
    """Run a relay server until SIGINT/SIGTERM."""
    from .config import load_server_config
    from .server import Server

    try:
        cfg = load_server_config(config_path, listen=listen, peers=list(peers), name=name, id=server_id,
                                 cluster_listen=cluster_listen, dead_after=dead_after, key_file=key_file,
                                 trust_dir=trust_dir)
        node = Server(cfg)
    except ZbusError as exc:
        raise click.ClickException(str(exc)) from None
    stop = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        stop.set()
        node.stop()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    try:
        node.start()
    except Exception as exc:  # bind errors and the like
        raise click.ClickException(f"cannot start server on {cfg.listen}: {exc}") from None
    click.echo(f"zbus server {node.id} ({node.name}) listening on {node.endpoint}", err=False)
    sys.stdout.flush()
    while not stop.wait(0.5):
        pass
    node.stop()


@main.command()
@click.option("--server", "servers", multiple=True, help="Server endpoint tcp://HOST:PORT (repeatable).")
@click.option("--name", help="This client's name.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML config file ([client] table).")
@click.option("--key", "key_file", type=click.Path(dir_okay=False),
              help="This client's key file (C-….key from keygen): turns CURVE security on.")
@click.option("--trust", "trust_dir", type=click.Path(file_okay=False),
              help="Directory of the trusted servers' and peers' .pub files (with --key). Servers are then "
                   "S-ID@tcp://HOST:PORT.")
def client(servers: tuple[str, ...], name: str | None, config_path: str | None, key_file: str | None,
           trust_dir: str | None) -> None:
    """Interactive client: type 'NAME-OR-ID message', see what arrives."""
    from .interactive import run_interactive

    run_interactive(list(servers) or None, name, config_path, key_file=key_file, trust_dir=trust_dir)


@main.command()
@click.option("--server", "server_endpoint", default="tcp://127.0.0.1:7700", show_default=True,
              help="The server to ask.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (shape in docs/operations.md).")
@click.option("--timeout", default=3.0, show_default=True, help="Seconds to wait for the answer.")
@click.option("--key", "key_file", type=click.Path(dir_okay=False),
              help="A key file trusted by the server (security on); --server is then S-ID@tcp://HOST:PORT.")
@click.option("--trust", "trust_dir", type=click.Path(file_okay=False),
              help="Directory holding the server's .pub file (with --key).")
def status(server_endpoint: str, as_json: bool, timeout: float, key_file: str | None, trust_dir: str | None) -> None:
    """Show the cluster as one server sees it."""
    from .status import query_status, render_status

    try:
        reply = query_status(server_endpoint, timeout, key_file, trust_dir)
    except ZbusError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(wire.status_to_json(reply), indent=2))
    else:
        render_status(reply)


@main.command()
@click.option("--server", "servers", multiple=True, required=True,
              help="A server endpoint tcp://HOST:PORT whose UDP reflector to ask (repeatable; two or more tell "
                   "whether the NAT mapping varies per destination).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def netcheck(servers: tuple[str, ...], as_json: bool) -> None:
    """Show what this host looks like from the servers: private addresses, public UDP endpoint(s), NAT kind."""
    from .netcheck import netcheck as probe

    try:
        report = probe(list(servers))
    except ZbusError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot probe: {exc}") from None
    if as_json:
        click.echo(json.dumps({"private": list(report.private), "local_port": report.local_port,
                               "observed": report.observed, "public": list(report.public),
                               "mapping_varies": report.mapping_varies}, indent=2))
        return
    click.echo(f"private addresses: {', '.join(report.private) or '(none)'}")
    click.echo(f"local UDP port:    {report.local_port}")
    for endpoint, seen in report.observed.items():
        click.echo(f"seen by {endpoint}: {seen or 'no answer'}")
    verdict = {None: "unknown (fewer than two servers answered)",
               True: "varies per destination (symmetric NAT: plain hole punching will not work)",
               False: "same for every server (no NAT or a cone NAT: hole punching can work)"}
    click.echo(f"public mapping:    {verdict[report.mapping_varies]}")


@main.command()
@click.option("--out", "directory", default=".", show_default=True, type=click.Path(file_okay=False),
              help="Directory for the key files.")
@click.option("--id", "node_id", help="The Id to bind the keys to (C-… or S-…); default: a fresh client Id.")
@click.option("--server", "for_server", is_flag=True, help="Make a fresh server Id (S-…) instead of a client Id.")
def keygen(directory: str, node_id: str | None, for_server: bool) -> None:
    """Make a CurveZMQ key pair bound to an Id: ID.key (secret, mode 0600) and ID.pub (for trust lists)."""
    from .ids import new_client_id, new_server_id
    from .security import keygen as make_keys

    node_id = node_id or (new_server_id() if for_server else new_client_id())
    try:
        pub, key = make_keys(directory, node_id)
    except ZbusError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{node_id}\n  secret: {key}\n  public: {pub}  (copy into the trust directory of every node)")


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True}, add_help_option=False)
@click.pass_context
def bench(ctx: click.Context) -> None:
    """Run the benchmark harness (arguments as for benchmarks/run.py; try --help)."""
    from .bench.harness import main as bench_main

    sys.exit(bench_main(list(ctx.args)))


@main.command()
@click.option("--listen", default="tcp://127.0.0.1:7700", show_default=True, help="Where the demo server binds.")
@click.option("--count", default=0, help="Stop after this many round trips (0: until Ctrl-C).")
def demo(listen: str, count: int) -> None:
    """The embedded default: a local server and two clients exchanging messages by Id."""
    from .demo import run_demo

    run_demo(listen, count)


if __name__ == "__main__":
    main()
