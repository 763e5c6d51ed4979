"""Processes of a benchmark run: each role in its own spawned process, plus relays and servers.

A `Launcher` starts everything one case needs and ends every process on `close()` (also on error and
Ctrl-C): "stop" on the role's control pipe, then SIGTERM, then SIGKILL, each waiting STOP_GRACE_S.
"""

from __future__ import annotations

import multiprocessing
import os
import shlex
import signal
import subprocess
import tempfile
import time
import traceback
from multiprocessing.connection import Connection

from zbus.bench import Aborted, Control, Job, RoleFn, wait_until_accepting

READY_TIMEOUT_S = 30.0  # spawn + imports + connect + handshake of one role
STOP_GRACE_S = 3.0  # between "stop" and SIGTERM, and between SIGTERM and SIGKILL


class RoleFailed(Exception):
    """A role process reported an error, died, or said nothing in time."""


def _role_main(fn: RoleFn, conn: Connection, job: Job, cpu: int | None = None) -> None:
    """Entry point of every role process; ``cpu``: run on that CPU only (threads started later too)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the harness's to handle; it ends us
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    try:
        fn(Control(conn), job)
    except Aborted:
        pass
    except BaseException:
        try:
            conn.send(("error", traceback.format_exc()))
        except OSError:
            pass
    finally:
        conn.close()


class RoleProcess:
    """A spawned role and the parent end of its control pipe."""

    def __init__(self, mp_context, fn: RoleFn, job: Job, name: str, cpu: int | None = None) -> None:
        self.name = name
        self.cpu = cpu
        self._conn, child_conn = mp_context.Pipe()
        self._proc = mp_context.Process(target=_role_main, args=(fn, child_conn, job, cpu), name=name,
                                        daemon=True)
        self._proc.start()
        child_conn.close()

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def expect(self, kind: str, timeout_s: float):
        """Wait for the role's next message, which must be `kind`; return its value."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self._conn.poll(0.1):
                try:
                    got, value = self._conn.recv()
                except EOFError:
                    code = self._proc.exitcode
                    raise RoleFailed(f"{self.name} exited (code {code}) before {kind}") from None
                if got == kind:
                    return value
                if got == "error":
                    raise RoleFailed(f"{self.name} failed: {value.strip().splitlines()[-1]}\n{value}")
                raise RoleFailed(f"{self.name} sent {got!r} while {kind!r} was expected")
            if time.monotonic() > deadline:
                raise RoleFailed(f"{self.name}: no {kind} within {timeout_s:.0f} s")

    def send(self, *message: object) -> None:
        try:
            self._conn.send(message)
        except OSError:  # it is gone already
            pass

    def stop(self, polite: bool = True) -> None:
        """Say stop (if polite), then terminate, then kill; each step waits at most STOP_GRACE_S."""
        if polite:
            self.send("stop")
            self._proc.join(STOP_GRACE_S)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(STOP_GRACE_S)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(STOP_GRACE_S)
        self._conn.close()


class Launcher:
    """Starts role processes and commands for one case, and ends every one of them on close().

    ``pin``: every role runs on one CPU of its own while it runs: the first of the roles alive at
    once on the first CPU we may use, the next on the next (a pair's receiver or echo, then its
    sender or pinger), as if each were a host of its own. Services and commands (relays, servers)
    are not pinned. Without it, the scheduler places every thread where it likes.
    """

    def __init__(self, pin: bool = False) -> None:
        self._cpus = sorted(os.sched_getaffinity(0)) if pin else []
        if pin and len(self._cpus) < 2:
            raise ValueError(f"pinning needs at least 2 CPUs to run on; this process may use {len(self._cpus)}")
        self._mp = multiprocessing.get_context("spawn")
        self._roles: list[RoleProcess] = []
        self._services: list[RoleProcess] = []  # run until close(); they do not read "stop"
        self._commands: list[tuple[subprocess.Popen, object]] = []

    def role(self, fn: RoleFn, job: Job, name: str) -> RoleProcess:
        taken = {r.cpu for r in self._roles}
        cpu = next((c for c in self._cpus if c not in taken), self._cpus[len(self._roles) % len(self._cpus)]) \
            if self._cpus else None
        role = RoleProcess(self._mp, fn, job, name, cpu)
        self._roles.append(role)
        return role

    def stop(self, role: RoleProcess) -> None:
        role.stop()
        self._roles.remove(role)

    def start_service(self, fn: RoleFn, name: str) -> str:
        """Start a long-lived role (e.g. a relay) that runs until close(); return its ready() info."""
        service = RoleProcess(self._mp, fn, Job(0, 0, 0, 0.0, 0.0, 0.0), name)
        self._services.append(service)
        return service.expect("ready", READY_TIMEOUT_S)

    def start_command(self, argv: list[str], port: int, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Run argv (output to a temporary log) and wait until it accepts on 127.0.0.1:port.

        The command gets a process group of its own (Ctrl-C in the terminal is ours; we end it in
        close()) but stays in our session: with Linux's scheduler autogroups (on by default), a new
        session is a CPU-share group of its own, so a server started that way was scheduled unlike the
        roles and relays it is compared with (started by multiprocessing, in our session); the zbus
        relay's 4 KiB throughput then swung between 0.4x and 0.9x of the raw relay's from run to run.
        """
        log = tempfile.TemporaryFile()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                process_group=0)
        self._commands.append((proc, log))
        try:
            wait_until_accepting(port, proc, timeout_s)
        except (RuntimeError, TimeoutError) as exc:
            log.seek(0)
            tail = log.read().decode(errors="replace").strip().splitlines()[-5:]
            raise RoleFailed(f"{shlex.join(argv)}: {exc}" + "".join(f"\n    {t}" for t in tail)) from None

    def close(self) -> None:
        for role in reversed(self._roles):
            role.stop()
        self._roles.clear()
        for service in reversed(self._services):
            service.stop(polite=False)
        self._services.clear()
        for proc, log in reversed(self._commands):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(STOP_GRACE_S)
            log.close()
        self._commands.clear()

    def __enter__(self) -> Launcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
