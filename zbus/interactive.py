"""``zbus-node client``: type ``NAME-OR-ID message`` lines, see what arrives."""

from __future__ import annotations

import sys
import threading

import click

from .client import Client
from .errors import ZbusError

HELP = "type: NAME-OR-ID message   |  /peers  |  /id  |  /quit"


def run_interactive(servers: list[str] | None, name: str | None, config: str | None,
                    key_file: str | None = None, trust_dir: str | None = None) -> None:
    try:
        client = Client(servers=servers, name=name, config=config, key_file=key_file, trust_dir=trust_dir)
    except ZbusError as exc:
        raise click.ClickException(str(exc)) from None
    stop = threading.Event()

    def receive() -> None:
        while not stop.is_set():
            try:
                msg = client.recv(timeout=0.2)
            except TimeoutError:
                continue
            except ZbusError:
                return
            who = client.peers().get(msg.src)
            label = f"{who.name} ({msg.src})" if who and who.name else msg.src
            click.echo(f"<< {label} via {msg.via}: {msg.data.decode(errors='replace')}")

    receiver = threading.Thread(target=receive, name="zbus-interactive-recv", daemon=True)
    receiver.start()
    click.echo(f"zbus client {client.id} ({client.name or 'no name'}) on {', '.join(client.config.servers)}")
    click.echo(HELP)
    try:
        for line in sys.stdin:
            line = line.strip()
            if not line:
                continue
            if line == "/quit":
                break
            if line == "/id":
                click.echo(client.id)
                continue
            if line == "/peers":
                for peer_id, peer in sorted(client.peers().items()):
                    click.echo(f"  {peer.name or '-':<16} {peer_id}  via {peer.via} {peer.address}")
                continue
            target, _, text = line.partition(" ")
            try:
                client.send(client.resolve(target), text.encode())
            except ZbusError as exc:
                click.echo(f"!! {exc}", err=True)
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        receiver.join()
        client.close()
