"""One zbus client process for tests/natlab/test_punchlink.py, driven over stdin, JSON on stdout.

    python tests/natlab/punchlink_worker.py --server tcp://203.0.113.10:7700 --name b

prints ``{"event": "ready", "id": ...}`` once registered, then answers commands (one per line):

- ``peer NAME``: wait until NAME is listed; ``{"event": "peer", "id": ...}``
- ``send N RATE``: send N numbered messages to the peer, RATE per second (0: as fast as possible);
  meanwhile every change of the peer's path in ``peers()`` is printed as
  ``{"event": "path", "kind": ..., "address": ..., "rtt": ..., "t": seconds since the first send}``;
  at the end ``{"event": "sent", "n": N, "seconds": ...}``
- ``expect N TIMEOUT``: wait until N messages arrived (from anyone), then
  ``{"event": "received", "n": ..., "in_order": ..., "via": {"relay": ..., "punched": ...}}``; ``reset``
  forgets them
- ``path``: ``{"event": "now", "kind": ..., "address": ..., "rtt": ...}`` for the peer now
- ``blast N SIZE``: N messages of SIZE bytes, as fast as possible, the last acknowledged;
  ``{"event": "blasted", "mib_s": ..., "kind": ...}`` (the receiver counts them as ``expect`` does)
- ``quit``
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time

import zbus
import zbus.errors

WATCH_EVERY_S = 0.01


def emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


class Receiver:
    def __init__(self, client: zbus.Client) -> None:
        self.client = client
        self.lock = threading.Condition()
        self.numbers: list[int] = []
        self.via: dict[str, int] = {}
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop:
            try:
                message = self.client.recv(timeout=0.2)
            except TimeoutError:
                continue
            if message.data[:1] == b"x":  # a blast: only counted
                with self.lock:
                    self.via[message.via] = self.via.get(message.via, 0) + 1
                continue
            with self.lock:
                self.numbers.append(int(message.data))
                self.via[message.via] = self.via.get(message.via, 0) + 1
                self.lock.notify_all()

    def expect(self, n: int, timeout: float) -> None:
        with self.lock:
            self.lock.wait_for(lambda: len(self.numbers) >= n, timeout)
            numbers = list(self.numbers)
            via = dict(self.via)
        in_order = numbers == list(range(1, len(numbers) + 1))
        missing = sorted(set(range(1, n + 1)) - set(numbers))
        emit("received", n=len(numbers), in_order=in_order, via=via,
             first_wrong=next((i for i, x in enumerate(numbers, 1) if x != i), None),
             missing=missing[:20], missing_count=len(missing), delivery=self.client.status().delivery)

    def reset(self) -> None:
        with self.lock:
            self.numbers.clear()
            self.via.clear()


def path_of(client: zbus.Client, peer: str) -> dict:
    found = client.peers().get(peer)
    if found is None:
        return {"kind": "unknown", "address": "", "rtt": None}
    return {"kind": found.via, "address": found.address, "rtt": found.rtt}


def send(client: zbus.Client, peer: str, n: int, rate: float) -> None:
    start = time.monotonic()
    last = None
    done = threading.Event()

    def watch() -> None:
        nonlocal last
        while not done.is_set():
            now = path_of(client, peer)
            if (now["kind"], now["address"]) != last:
                last = (now["kind"], now["address"])
                emit("path", t=round(time.monotonic() - start, 3), **now)
            done.wait(WATCH_EVERY_S)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        for i in range(1, n + 1):
            for attempt in range(100):  # bounded: a transient Unreachable is retried for up to ~10 s
                try:
                    client.send(peer, b"%d" % i, timeout=10.0)
                    break
                except (zbus.errors.Unreachable, zbus.errors.Disconnected) as exc:
                    emit("unreachable", n=i, error=str(exc), known=len(client.peers()))
                    client.wait_connected(timeout=0.1)
                    try:
                        client.wait_peer(peer, timeout=0.1)
                    except zbus.errors.Unreachable:
                        pass
            if rate and i % 50 == 0:  # pace in batches: RATE per second on average
                ahead = start + i / rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
    finally:
        done.set()
        watcher.join()
    emit("sent", n=n, seconds=round(time.monotonic() - start, 3), delivery=client.status().delivery)


def watch(client: zbus.Client, peer: str, seconds: float, kind: str) -> None:
    """Emit every change of the path to ``peer`` (as ``send`` does) until it is ``kind`` or ``seconds``
    pass; then {"event": "watched", "kind": ...}. Catches a link that is up only briefly."""
    start = time.monotonic()
    last = None
    now = path_of(client, peer)
    while now["kind"] != kind and time.monotonic() - start < seconds:
        if (now["kind"], now["address"]) != last:
            last = (now["kind"], now["address"])
            emit("path", t=round(time.monotonic() - start, 3), **now)
        time.sleep(WATCH_EVERY_S)  # (sampling a state for the record, bounded by ``seconds``)
        now = path_of(client, peer)
    emit("path", t=round(time.monotonic() - start, 3), **now)
    emit("watched", kind=now["kind"])


def blast(client: zbus.Client, peer: str, n: int, size: int) -> None:
    """n messages of ``size`` bytes as fast as possible, the last one acknowledged: throughput."""
    payload = b"x" * size
    start = time.monotonic()
    for _ in range(n - 1):
        client.send(peer, payload, timeout=30.0)
    client.send(peer, payload, ack=True, timeout=60.0)
    seconds = time.monotonic() - start
    emit("blasted", n=n, size=size, seconds=round(seconds, 3), mib_s=round(n * size / seconds / 2**20, 1),
         **path_of(client, peer))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--max-links", type=int, default=64)
    parser.add_argument("--limit-s", type=float, default=170.0, help="bound on the whole run")
    parser.add_argument("--no-punch", action="store_true", help="punch = false")
    parser.add_argument("--key", default=None, help="security on: this node's key file")
    parser.add_argument("--trust", default=None, help="security on: the directory of trusted public keys")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")  # stderr: the test's log
    deadline = time.monotonic() + args.limit_s
    with zbus.Client(servers=[args.server], name=args.name, max_links=args.max_links,
                     listen="tcp://0.0.0.0:0", connect_timeout=20.0, key_file=args.key, trust_dir=args.trust,
                     punch=False if args.no_punch else None) as client:
        receiver = Receiver(client)
        emit("ready", id=client.id)
        peer = ""
        try:
            for line in sys.stdin:
                if time.monotonic() > deadline:
                    break
                words = line.split()
                if not words:
                    continue
                if words[0] == "peer":
                    peer = client.wait_peer(words[1], timeout=20.0)
                    emit("peer", id=peer)
                elif words[0] == "send":
                    send(client, peer, int(words[1]), float(words[2]))
                elif words[0] == "blast":
                    blast(client, peer, int(words[1]), int(words[2]))
                elif words[0] == "expect":
                    receiver.expect(int(words[1]), float(words[2]))
                elif words[0] == "watch":  # watch SECONDS KIND
                    watch(client, peer, float(words[1]), words[2])
                elif words[0] == "reset":  # reset TOKEN: answered with {"event": "reset", "token": TOKEN}
                    receiver.reset()
                    emit("reset", token=words[1] if len(words) > 1 else "")
                elif words[0] == "path":
                    emit("now", **path_of(client, peer))
                elif words[0] == "quit":
                    break
        finally:
            receiver.stop = True
            receiver.thread.join()


if __name__ == "__main__":
    main()
