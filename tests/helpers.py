"""Test helpers: free ports, waiting with a deadline, zbus-node server processes."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from zbus.bench import free_tcp_port_pair as free_port_pair  # noqa: F401 (re-exported for tests)

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.01) -> object:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)  # polling interval of a deadline wait, not synchronisation


class ServerProcess:
    """A real ``zbus-node server`` subprocess on 127.0.0.1."""

    def __init__(self, port: int, name: str, extra: list[str] | None = None) -> None:
        self.port = port
        self.name = name
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.extra = extra or []
        self.proc: subprocess.Popen | None = None
        self.id: str | None = None

    def start(self, timeout: float = 10.0) -> "ServerProcess":
        argv = [sys.executable, "-m", "zbus.cli", "server", "--listen", self.endpoint, "--name", self.name, *self.extra]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + timeout
        line = self.proc.stdout.readline()  # the ready line; EOF if it died
        if "listening on" not in line or time.monotonic() > deadline:
            self.kill()
            raise AssertionError(f"server {self.name} did not start: {line!r} {self.proc.stderr.read()!r}")
        self.id = line.split()[2]
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            for stream in (self.proc.stdout, self.proc.stderr):
                if stream:
                    stream.close()

    def stop(self) -> int | None:
        """Graceful stop (SIGTERM); returns the exit code."""
        self.kill(signal.SIGTERM)
        return self.proc.returncode if self.proc else None


def keygen(directory: Path, *, server: bool = False) -> str:
    """``zbus-node keygen`` (the real CLI); returns the new Id."""
    argv = [sys.executable, "-m", "zbus.cli", "keygen", "--out", str(directory), *(["--server"] if server else [])]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=REPO, check=True).stdout
    return out.split()[0]


class Keys:
    """A key directory (secret keys) and the cluster's trust directory (public keys)."""

    def __init__(self, root: Path) -> None:
        self.dir, self.trust = root / "keys", root / "trust"
        self.trust.mkdir(parents=True)

    def new(self, *, server: bool = False, trusted: bool = True) -> str:
        node = keygen(self.dir, server=server)
        if trusted:
            shutil.copy(self.dir / f"{node}.pub", self.trust / f"{node}.pub")
        return node

    def key(self, node: str) -> str:
        return str(self.dir / f"{node}.key")

    def flags(self, node: str) -> list[str]:
        return ["--key", self.key(node), "--trust", str(self.trust)]
