"""NatLab: a fake internet built from network namespaces, veth pairs and nftables NATs.

    lab = NatLab()
    lab.add_public_host("server")                 # 203.0.113.10
    lab.add_router("home", nat="cone")            # WAN 203.0.113.101, LAN 10.1.0.0/24
    lab.add_host("alice", router="home")          # 10.1.0.2
    with lab.build():
        reflector = lab.start_udptool("server", "reflect", "--port", "3478")
        reflector.wait_event("ready")
        ...

Everything lives in namespaces named `zbt<pid>-<n>-…`; veth pairs are created directly inside them, so
the root namespace's links, routes and firewall are never touched. `close()` (or leaving the `with`)
kills every process the lab started and deletes every namespace with the lab's prefix, even after a
failure. `cleanup_stale_namespaces()` removes what a killed run left behind. See docs/natlab.md.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import ipaddress
import itertools
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path
from typing import Callable, Literal, Sequence, TypeVar

NatType = Literal["none", "cone", "cone-nofw", "symmetric"]
NAT_TYPES: tuple[NatType, ...] = ("none", "cone", "cone-nofw", "symmetric")

NAMESPACE_PREFIX = "zbt"
PUBLIC_NET = ipaddress.IPv4Network("203.0.113.0/24")
FIRST_PUBLIC_HOST = 10  # public hosts get 203.0.113.10, .11, … in order of add_public_host
LAST_PUBLIC_HOST = 99
ROUTER_WAN_BASE = 100  # router k (1-based) gets WAN 203.0.113.(100+k) and LAN 10.k.0.0/24
MAX_ROUTERS = 150
UDPTOOL = Path(__file__).with_name("udptool.py")

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,23}$")
_STALE = re.compile(rf"^{NAMESPACE_PREFIX}(\d+)-")
_lab_numbers = itertools.count(1)
_open_labs: "weakref.WeakSet[NatLab]" = weakref.WeakSet()
T = TypeVar("T")


class NatLabError(RuntimeError):
    """A lab command failed; the message names the command and its stderr."""


def _next_prefix() -> str:
    return f"{NAMESPACE_PREFIX}{os.getpid()}-{next(_lab_numbers)}-"


@dataclasses.dataclass(frozen=True)
class Router:
    name: str
    nat: NatType
    index: int  # k: WAN 203.0.113.(100+k), LAN 10.k.0.0/24
    wan_addr: str
    lan: ipaddress.IPv4Network

    @property
    def lan_addr(self) -> str:
        return str(self.lan.network_address + 1)


@dataclasses.dataclass(frozen=True)
class Host:
    name: str
    router: str | None  # None: directly on the public segment
    index: int  # port number on the segment it plugs into
    addr: str


# ---------------------------------------------------------------------------- commands and tools


def _tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for directory in ("/usr/sbin", "/sbin", "/usr/bin", "/bin"):
        if os.access(f"{directory}/{name}", os.X_OK):
            return f"{directory}/{name}"
    return None


IP = _tool("ip") or "ip"
NFT = _tool("nft") or "nft"


def _run(argv: Sequence[str], stdin: str | None = None, timeout: float = 15.0) -> str:
    result = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        shown = " ".join(argv)
        raise NatLabError(f"`{shown}` failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


def _run_all(jobs: Sequence[tuple[Sequence[str], str | None]], timeout: float = 15.0) -> None:
    """Run independent commands concurrently; raise the first failure after all have ended."""
    started = [
        (argv, subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True))
        for argv, _ in jobs
    ]
    failures = []
    for (argv, proc), (_, stdin) in zip(started, jobs):
        try:
            _, stderr = proc.communicate(stdin, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate()
        if proc.returncode != 0:
            failures.append(f"`{' '.join(argv)}` failed ({proc.returncode}): {stderr.strip()}")
    if failures:
        raise NatLabError("; ".join(failures))


def wait_until(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.01) -> T:
    """Poll `condition` until it returns something truthy; raise TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


def list_namespaces() -> list[str]:
    return [line.split()[0] for line in _run([IP, "netns", "list"]).splitlines() if line.strip()]


def _namespace_pids(netns: str) -> list[int]:
    try:
        return [int(pid) for pid in _run([IP, "netns", "pids", netns]).split()]
    except NatLabError:
        return []


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _delete_namespaces(names: Sequence[str]) -> None:
    """Kill what still runs inside our namespaces (by pid), then delete them."""
    leftover = [pid for name in names for pid in _namespace_pids(name)]
    for pid in leftover:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if leftover:
        try:
            wait_until(lambda: not any(_pid_alive(pid) for pid in leftover), 5.0, "processes to die")
        except TimeoutError:
            pass  # delete the namespaces anyway: they go away with their last process
    if names:
        batch = "".join(f"netns del {name}\n" for name in names)
        subprocess.run([IP, "-force", "-batch", "-"], input=batch, capture_output=True, text=True, timeout=30)


def cleanup_stale_namespaces() -> list[str]:
    """Delete `zbt<pid>-…` namespaces whose owner process is dead; return their names."""
    stale = [name for name in list_namespaces()
             if (match := _STALE.match(name)) and not _pid_alive(int(match.group(1)))]
    _delete_namespaces(stale)
    return stale


@functools.cache
def missing_requirements() -> str | None:
    """Why the lab cannot run on this machine, or None when it can (probes a real namespace)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth and nftables); run the NAT lab tests as root"
    for name in ("ip", "nft"):
        if _tool(name) is None:
            return f"`{name}` not found (install {'iproute2' if name == 'ip' else 'nftables'})"
    probe = f"{NAMESPACE_PREFIX}{os.getpid()}-probe"
    try:
        _run([IP, "netns", "add", probe])
        _run([IP, "netns", "exec", probe, NFT, "add", "table", "ip", "zbt_probe"])
    except (NatLabError, OSError, subprocess.TimeoutExpired) as error:
        return f"cannot create a network namespace with an nftables table: {error}"
    finally:
        _delete_namespaces([name for name in list_namespaces() if name == probe])
    return None


# ---------------------------------------------------------------------------- processes


class LabProcess(subprocess.Popen):
    """A Popen running inside a lab namespace, with deadline-bounded reads of its stdout lines."""

    node: str
    stderr_path: Path | None = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lines: list[str] = []
        self._partial = b""
        self._eof = False

    def send_line(self, line: str) -> None:
        assert self.stdin is not None, "started without stdin=PIPE"
        self.stdin.write(line.encode() + b"\n")
        self.stdin.flush()

    def _read_more(self, timeout: float) -> None:
        assert self.stdout is not None, "started without stdout=PIPE"
        fd = self.stdout.fileno()
        readable, _, _ = select.select([fd], [], [], max(0.0, timeout))
        if not readable:
            return
        chunk = os.read(fd, 65536)
        if not chunk:
            self._eof = True
            chunk = b"\n" if self._partial else b""  # keep an unterminated last line
        *complete, self._partial = (self._partial + chunk).split(b"\n")
        self.lines.extend(line.decode(errors="replace") for line in complete)

    def wait_line(self, predicate: Callable[[str], bool], timeout: float = 5.0, what: str = "a line") -> str:
        """Return the first stdout line (ever printed) that satisfies `predicate`."""
        deadline = time.monotonic() + timeout
        checked = 0
        while True:
            for line in self.lines[checked:]:
                if predicate(line):
                    return line
            checked = len(self.lines)
            remaining = deadline - time.monotonic()
            if self._eof or remaining <= 0:
                state = "exited" if self._eof else f"no match after {timeout:.1f}s"
                raise TimeoutError(f"{self.node}: {what}: {state}; stdout={self.lines[-10:]} "
                                   f"stderr={self.stderr_text()[-800:]!r}")
            self._read_more(remaining)

    def events(self) -> list[dict]:
        """The JSON events printed so far (udptool style `{"event": …}` lines)."""
        self._read_more(0)
        return [event for line in self.lines if (event := _json_event(line)) is not None]

    def wait_event(self, event: str, timeout: float = 5.0, **fields: object) -> dict:
        """Wait for a udptool event `{"event": event, **fields}` (earlier events count too)."""
        def matches(line: str) -> bool:
            parsed = _json_event(line)
            return parsed is not None and parsed.get("event") == event and all(
                parsed.get(key) == value for key, value in fields.items())
        return json.loads(self.wait_line(matches, timeout, what=f"event {event} {fields or ''}"))

    def stderr_text(self) -> str:
        if self.stderr_path is None or not self.stderr_path.exists():
            return ""
        return self.stderr_path.read_text(errors="replace")

    def stop(self, grace: float = 1.0) -> None:
        """Close stdin, then SIGTERM and SIGKILL its process group (ours: start_new_session) and wait."""
        try:
            if self.stdin:
                self.stdin.close()
        except OSError:  # the child already closed its end: nothing left to flush
            pass
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            if self.poll() is not None:
                break
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
        for stream in (self.stdout, self.stderr):
            if stream:
                stream.close()


def _json_event(line: str) -> dict | None:
    if not line.startswith("{"):
        return None
    try:
        parsed = json.loads(line)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) and "event" in parsed else None


# ---------------------------------------------------------------------------- the lab


class NatLab:
    """Builder and owner of one fake internet. Use as a context manager, or call close()."""

    def __init__(self, prefix: str | None = None) -> None:
        self._fixed_prefix = prefix is not None
        self.prefix = prefix or _next_prefix()  # final once build() has reserved it
        if not _STALE.match(self.prefix):
            raise ValueError(f"prefix {self.prefix!r} must look like '{NAMESPACE_PREFIX}<pid>-…'")
        self._reserved = False  # True once `<prefix>inet` exists: from then on the prefix is ours
        self.routers: dict[str, Router] = {}
        self.hosts: dict[str, Host] = {}
        self.build_seconds: float | None = None
        self._loss: dict[str, int] = {}
        self._processes: list[LabProcess] = []
        self._workdir: Path | None = None
        self._state = "new"  # new -> built -> closed

    # -- description ---------------------------------------------------------------------------

    def _check_new(self, name: str) -> None:
        if self._state != "new":
            raise NatLabError(f"cannot add {name!r}: the lab is already {self._state}")
        if not _NAME.match(name):
            raise ValueError(f"node name {name!r} must match {_NAME.pattern}")
        if name in self.routers or name in self.hosts or name == "internet":
            raise ValueError(f"node name {name!r} is already used in this lab ('internet' is the switch)")

    def add_router(self, name: str, nat: NatType = "cone", loss_percent: int = 0) -> Router:
        """A router with WAN 203.0.113.(100+k) and LAN 10.k.0.0/24 (k = 1, 2, … in call order)."""
        self._check_new(name)
        if nat not in NAT_TYPES:
            raise ValueError(f"nat={nat!r}: expected one of {', '.join(NAT_TYPES)}")
        index = len(self.routers) + 1
        if index > MAX_ROUTERS:
            raise ValueError(f"at most {MAX_ROUTERS} routers per lab")
        router = Router(name, nat, index, str(PUBLIC_NET.network_address + ROUTER_WAN_BASE + index),
                        ipaddress.IPv4Network(f"10.{index}.0.0/24"))
        self.routers[name] = router
        self._loss[name] = _check_percent(loss_percent)
        return router

    def add_host(self, name: str, router: str | None = None, addr: str | None = None) -> Host:
        """A host on `router`'s LAN (10.k.0.2, .3, …) or, with router=None, on the public segment."""
        self._check_new(name)
        siblings = [host for host in self.hosts.values() if host.router == router]
        index = len(siblings) + 1
        if router is None:
            taken = {host.addr for host in siblings}
            if addr is None:
                free = (str(PUBLIC_NET.network_address + n)
                        for n in range(FIRST_PUBLIC_HOST, LAST_PUBLIC_HOST + 1))
                addr = next((a for a in free if a not in taken), None)
                if addr is None:
                    raise ValueError("no free public host address left (203.0.113.10-99)")
            else:
                offset = int(ipaddress.IPv4Address(addr)) - int(PUBLIC_NET.network_address)
                if not 2 <= offset <= LAST_PUBLIC_HOST or addr in taken:
                    raise ValueError(f"addr {addr!r} is not a free public host address (203.0.113.2-99)")
        else:
            if router not in self.routers:
                raise ValueError(f"unknown router {router!r}; add_router() it first")
            if addr is not None:
                raise ValueError("LAN hosts are numbered automatically (10.k.0.2, .3, …); omit addr")
            if index > 250:
                raise ValueError(f"router {router!r} LAN is full")
            addr = str(self.routers[router].lan.network_address + 1 + index)
        host = Host(name, router, index, addr)
        self.hosts[name] = host
        return host

    def add_public_host(self, name: str, addr: str | None = None) -> Host:
        """A host directly on the public segment (first one: 203.0.113.10)."""
        return self.add_host(name, router=None, addr=addr)

    # -- queries ---------------------------------------------------------------------------------

    def addr(self, node: str) -> str:
        """A host's own address (private for hosts behind a NAT), or a router's WAN address."""
        if node in self.hosts:
            return self.hosts[node].addr
        if node in self.routers:
            return self.routers[node].wan_addr
        raise KeyError(f"no host or router named {node!r} in this lab")

    def public_addr(self, node: str) -> str:
        """The address the internet sees: the router's WAN address for hosts behind a NAT."""
        host = self.hosts.get(node)
        if host is not None and host.router is not None and self.routers[host.router].nat != "none":
            return self.routers[host.router].wan_addr
        return self.addr(node)

    @property
    def nft_table(self) -> str:
        return self.prefix.rstrip("-").replace("-", "_")

    @property
    def internet_netns(self) -> str:
        return f"{self.prefix}inet"

    def netns(self, node: str) -> str:
        """Namespace name of a host, a router, or "internet" (the switch)."""
        if node in self.hosts:
            return f"{self.prefix}h-{node}"
        if node in self.routers:
            return f"{self.prefix}r-{node}"
        if node == "internet":
            return self.internet_netns
        raise KeyError(f"no host or router named {node!r} in this lab")

    def namespaces(self) -> list[str]:
        return [self.internet_netns, *map(self.netns, self.routers), *map(self.netns, self.hosts)]

    # -- build -----------------------------------------------------------------------------------

    def build(self) -> "NatLab":
        """Create namespaces, links, addresses, routes and nftables rules. Cleans up if it fails."""
        if self._state != "new":
            raise NatLabError(f"build() on a lab that is {self._state}")
        started = time.monotonic()
        self._state = "built"
        _open_labs.add(self)
        try:
            self._reserve_prefix()
            self._workdir = Path(tempfile.mkdtemp(prefix=self.prefix))
            _run([IP, "-batch", "-"], "".join(f"netns add {ns}\n" for ns in self.namespaces()[1:]))
            _run_all([self._namespace_setup(ns) for ns in self.namespaces()])
            _run([IP, "-batch", "-"], self._veth_batch())
            _run_all([([IP, "-n", ns, "-batch", "-"], batch) for ns, batch in self._address_batches()])
        except BaseException:
            self.close()
            raise
        self.build_seconds = time.monotonic() - started
        return self

    def _reserve_prefix(self) -> None:
        """Create `<prefix>inet` atomically; on a clash (e.g. this module imported twice under two
        names, so two counters) draw the next automatic prefix. Only a reserved prefix is deleted."""
        for _ in range(100):
            result = subprocess.run([IP, "netns", "add", self.internet_netns], capture_output=True, text=True)
            if result.returncode == 0:
                self._reserved = True
                return
            if self._fixed_prefix or "exists" not in result.stderr:
                raise NatLabError(f"cannot create namespace {self.internet_netns}: {result.stderr.strip()}")
            self.prefix = _next_prefix()
        raise NatLabError("no free lab prefix after 100 tries")

    def _namespace_setup(self, netns: str) -> tuple[list[str], str | None]:
        """One exec per namespace: sysctls, plus the router's nftables ruleset on stdin."""
        router = next((r for r in self.routers.values() if self.netns(r.name) == netns), None)
        script = [
            "set -e",
            "w() { if [ -e \"$1\" ]; then echo \"$2\" > \"$1\"; fi; }",
            "w /proc/sys/net/ipv6/conf/all/disable_ipv6 1",
            "w /proc/sys/net/ipv6/conf/default/disable_ipv6 1",
            # Bridged LAN frames must not traverse the router's IP hooks (NAT, loss) when the
            # host kernel has br_netfilter loaded: a LAN switch is not a router.
            "w /proc/sys/net/bridge/bridge-nf-call-iptables 0",
            f"echo {1 if router else 0} > /proc/sys/net/ipv4/ip_forward",
        ]
        if router is None:
            return [IP, "netns", "exec", netns, "sh", "-c", "\n".join(script)], None
        script.append(f"{NFT} -f /dev/stdin")
        return ([IP, "netns", "exec", netns, "sh", "-c", "\n".join(script)],
                self._router_ruleset(router))

    def _router_ruleset(self, router: Router) -> str:
        firewall = router.nat in ("cone", "symmetric")
        masquerade = {"none": "", "cone": "masquerade", "cone-nofw": "masquerade",
                      "symmetric": "masquerade fully-random"}[router.nat]
        drop_unsolicited = ('iifname "wan0" ct state established,related accept\n'
                            '    iifname "wan0" drop') if firewall else ""
        return f"""
table ip {self.nft_table} {{
  set wan_udp_seen {{
    type ipv4_addr . inet_service . inet_service; flags dynamic; size 65535;
  }}
  chain observe {{
    type filter hook prerouting priority raw; policy accept;
    iifname "wan0" meta l4proto udp update @wan_udp_seen {{ ip saddr . udp sport . udp dport }}
  }}
  chain loss {{
{self._loss_rules(self._loss[router.name])}
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    jump loss
    {drop_unsolicited}
  }}
  chain input {{
    type filter hook input priority filter; policy accept;
    {drop_unsolicited}
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    {'oifname "wan0" ' + masquerade if masquerade else ''}
  }}
}}
"""

    @staticmethod
    def _loss_rules(percent: int) -> str:
        if percent == 0:
            return ""
        sample = "" if percent == 100 else f"numgen random mod 100 < {percent} "
        return (f'    iifname "wan0" {sample}drop\n'
                f'    oifname "wan0" {sample}drop')

    def _veth_batch(self) -> str:
        """veth pairs created directly inside their namespaces (nothing appears in the root one)."""
        lines = [f"link add wan0 netns {self.netns(name)} type veth peer name r{router.index} "
                 f"netns {self.internet_netns}" for name, router in self.routers.items()]
        for name, host in self.hosts.items():
            switch = self.internet_netns if host.router is None else self.netns(host.router)
            lines.append(f"link add eth0 netns {self.netns(name)} type veth peer name h{host.index} "
                         f"netns {switch}")
        return "".join(line + "\n" for line in lines)

    def _address_batches(self) -> list[tuple[str, str]]:
        routed_lans = [(r.lan, r.wan_addr) for r in self.routers.values() if r.nat == "none"]
        prefix_len = PUBLIC_NET.prefixlen
        batches: dict[str, list[str]] = {self.internet_netns: [
            "link set lo up", "link add br0 type bridge forward_delay 0", "link set br0 up"]}
        for router in self.routers.values():
            batches[self.internet_netns] += [f"link set r{router.index} master br0",
                                             f"link set r{router.index} up"]
            batches[self.netns(router.name)] = [
                "link set lo up", f"addr add {router.wan_addr}/{prefix_len} dev wan0", "link set wan0 up",
                "link add lan0 type bridge forward_delay 0",
                f"addr add {router.lan_addr}/{router.lan.prefixlen} dev lan0", "link set lan0 up",
                "route add default dev wan0",
                *(f"route add {lan} via {wan}" for lan, wan in routed_lans if wan != router.wan_addr)]
        for host in self.hosts.values():
            if host.router is None:
                switch, bridge = self.internet_netns, "br0"
                own = [f"addr add {host.addr}/{prefix_len} dev eth0", "link set eth0 up",
                       "route add default dev eth0",
                       *(f"route add {lan} via {wan}" for lan, wan in routed_lans)]
            else:
                router = self.routers[host.router]
                switch, bridge = self.netns(router.name), "lan0"
                own = [f"addr add {host.addr}/{router.lan.prefixlen} dev eth0", "link set eth0 up",
                       f"route add default via {router.lan_addr}"]
            batches[switch] += [f"link set h{host.index} master {bridge}", f"link set h{host.index} up"]
            batches[self.netns(host.name)] = ["link set lo up", *own]
        return [(ns, "".join(line + "\n" for line in lines)) for ns, lines in batches.items()]

    # -- running things --------------------------------------------------------------------------

    def popen(self, node: str, argv: Sequence[str], **kwargs) -> LabProcess:
        """Start `argv` inside `node`'s namespace; it is stopped and waited for on close().

        Defaults: stdin and stdout are pipes (see LabProcess.send_line / wait_line), stderr goes to
        a log file (LabProcess.stderr_text), and the process leads its own process group."""
        if self._state != "built":
            raise NatLabError(f"popen() needs a built lab (it is {self._state})")
        netns = self.netns(node)
        kwargs.setdefault("stdin", subprocess.PIPE)
        kwargs.setdefault("stdout", subprocess.PIPE)
        stderr_path = None
        if "stderr" not in kwargs:
            assert self._workdir is not None
            stderr_path = self._workdir / f"{node}-{len(self._processes)}.stderr"
            kwargs["stderr"] = stderr_path.open("wb")
        kwargs["start_new_session"] = True
        try:
            proc = LabProcess([IP, "netns", "exec", netns, *argv], **kwargs)
        finally:
            if stderr_path is not None:
                kwargs["stderr"].close()  # the child holds its own copy
        proc.node = node
        proc.stderr_path = stderr_path
        self._processes.append(proc)
        return proc

    def start_udptool(self, node: str, *args: str, **kwargs) -> LabProcess:
        """Run tests/natlab/udptool.py inside `node` (see its docstring for the commands).

        Standard library only, so `-I -S` skips site-packages: a start costs ~40 ms, not ~200 ms."""
        return self.popen(node, [sys.executable, "-I", "-S", "-u", str(UDPTOOL), *args], **kwargs)

    def run(self, node: str, argv: Sequence[str], timeout: float = 10.0,
            check: bool = True) -> subprocess.CompletedProcess:
        """Run `argv` inside `node` to completion (killed after `timeout` seconds)."""
        proc = self.popen(node, argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.stop(grace=0)
            raise
        result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout.decode(), stderr.decode())
        if check:
            result.check_returncode()
        return result

    # -- runtime knobs and observations ----------------------------------------------------------

    def set_loss(self, router: str, percent: int) -> None:
        """Drop `percent`% of packets crossing the router's WAN, independently in each direction.
        Before build() this only changes the initial setting; afterwards it takes effect at once."""
        percent = _check_percent(percent)
        if router not in self.routers:
            raise KeyError(f"no router named {router!r} in this lab")
        if self._state == "new":
            self._loss[router] = percent
            return
        rules = self._loss_rules(percent).strip().splitlines()
        script = f"flush chain ip {self.nft_table} loss\n" + "".join(
            f"add rule ip {self.nft_table} loss {rule.strip()}\n" for rule in rules)
        self._nft(router, ["-f", "/dev/stdin"], script)
        self._loss[router] = percent

    def wan_udp_seen(self, router: str) -> set[tuple[str, int, int]]:
        """(source ip, source port, destination port) of every UDP packet that arrived on the
        router's WAN, recorded before conntrack, NAT, loss and firewall decide its fate."""
        listing = json.loads(self._nft(router, ["-j", "list", "set", "ip", self.nft_table, "wan_udp_seen"]))
        seen = set()
        for item in listing["nftables"]:
            for element in item.get("set", {}).get("elem", []):
                if "elem" in element:  # an element with metadata (timeout, counter) wraps its value
                    element = element["elem"]["val"]
                source, sport, dport = element["concat"]
                seen.add((source, int(sport), int(dport)))
        return seen

    def conntrack(self, router: str) -> list[str]:
        """The router's conntrack table, one /proc/net/nf_conntrack line per entry."""
        return _run([IP, "netns", "exec", self._router_netns(router),
                     "cat", "/proc/net/nf_conntrack"]).splitlines()

    def _router_netns(self, name: str) -> str:
        if self._state != "built":
            raise NatLabError(f"the lab is {self._state}, not built")
        if name not in self.routers:
            raise KeyError(f"no router named {name!r} in this lab")
        return self.netns(name)

    def _nft(self, router: str, args: Sequence[str], script: str | None = None) -> str:
        return _run([IP, "netns", "exec", self._router_netns(router), NFT, *args], stdin=script)

    # -- teardown --------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop every process, delete every namespace with this lab's prefix. Idempotent."""
        if self._state == "closed":
            return
        self._state = "closed"
        _open_labs.discard(self)
        try:
            for proc in reversed(self._processes):
                proc.stop()
        finally:
            if self._reserved:
                _delete_namespaces([name for name in list_namespaces() if name.startswith(self.prefix)])
            if self._workdir is not None:
                shutil.rmtree(self._workdir, ignore_errors=True)
        left = [name for name in list_namespaces() if name.startswith(self.prefix)] if self._reserved else []
        if left:
            raise NatLabError(f"namespaces left after teardown: {left}")

    def __enter__(self) -> "NatLab":
        """`with NatLab() as lab:` (describe, then build()) and `with lab.build():` both work."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"NatLab({self.prefix!r}, {self._state}, "
                f"routers={list(self.routers)}, hosts={list(self.hosts)})")


def _check_percent(percent: int) -> int:
    if not isinstance(percent, int) or not 0 <= percent <= 100:
        raise ValueError(f"loss percent must be an int in 0..100, got {percent!r}")
    return percent


@atexit.register
def _close_open_labs() -> None:
    for lab in list(_open_labs):
        try:
            lab.close()
        except Exception:  # best effort at interpreter exit; the next session's stale cleanup retries
            pass
