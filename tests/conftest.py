"""Shared fixtures: zbus-node server processes and clients, all ended at teardown."""

from __future__ import annotations

from typing import Callable, Iterator

import pytest

from tests.helpers import ServerProcess, free_port


@pytest.fixture
def start_server() -> Iterator[Callable[..., ServerProcess]]:
    """Factory: ``start_server(name, port=None)`` -> a running server; all are killed at teardown."""
    started: list[ServerProcess] = []

    def start(name: str = "srv", port: int | None = None, extra: list[str] | None = None) -> ServerProcess:
        server = ServerProcess(port or free_port(), name, extra)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.kill()


@pytest.fixture
def clients() -> Iterator[list]:
    """Append zbus clients here; each is closed at teardown even if the test failed."""
    opened: list = []
    yield opened
    for client in opened:
        client.close()
