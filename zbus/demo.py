"""The embedded default behind ``make run``: one local server, two clients talking by Id."""

from __future__ import annotations

import itertools
import threading

import click

from .client import Client
from .server import Server

PERIOD = 1.0


def run_demo(listen: str, count: int = 0) -> None:
    stop = threading.Event()
    with Server(listen=listen, name="demo-server") as server:
        click.echo(f"server {server.id} listening on {server.endpoint}")
        with Client(servers=[server.endpoint], name="alice") as alice, \
                Client(servers=[server.endpoint], name="bob") as bob:
            click.echo(f"alice is {alice.id}\nbob   is {bob.id}")
            bob_id = alice.wait_peer("bob", timeout=5.0)
            click.echo("alice pings bob by Id; bob answers. Ctrl-C stops everything.")
            try:
                for n in itertools.count(1):
                    alice.send(bob_id, f"ping {n}".encode())
                    ping = bob.recv(timeout=5.0)
                    click.echo(f"bob   got {ping.data.decode()!r} from {ping.src} via {ping.via}")
                    bob.send(ping.src, f"pong {n}".encode())
                    pong = alice.recv(timeout=5.0)
                    click.echo(f"alice got {pong.data.decode()!r} from {pong.src} via {pong.via}")
                    if n == count or stop.wait(PERIOD):
                        break
            except KeyboardInterrupt:
                click.echo("stopping")
    click.echo("demo stopped cleanly")
