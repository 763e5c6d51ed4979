"""One chaos-soak client process: sends acknowledged, numbered messages to its peers and records
what it sent (acked or not) and what it received. Driven by tests/chaos/chaos.py over stdin/stdout.

stdin commands: ``go`` (start sending), ``stop`` (stop sending), ``report`` (print the JSON result and
exit). stdout: ``ready <id>`` once every peer is known, then one JSON line for ``report``.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

import zbus
from zbus.errors import ZbusError

SEND_TIMEOUT_S = 5.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--servers", required=True, help="comma-separated endpoints")
    parser.add_argument("--name", required=True)
    parser.add_argument("--peers", required=True, help="comma-separated peer names")
    parser.add_argument("--max-links", type=int, default=64)
    parser.add_argument("--max-msgs", type=int, default=200_000, help="bound on messages sent")
    parser.add_argument("--no-ack", action="store_true", help="plain send (to see what acks buy)")
    parser.add_argument("--limit-s", type=float, default=600.0, help="bound on the whole run")
    args = parser.parse_args()
    deadline = time.monotonic() + args.limit_s
    stop_sending = threading.Event()
    stop_receiving = threading.Event()
    received: dict[str, list[int]] = {}
    acked: dict[str, list[int]] = {}
    failed: dict[str, int] = {}
    errors: dict[str, int] = {}
    last_arrival = [time.monotonic()]

    with zbus.Client(servers=args.servers.split(","), name=args.name, max_links=args.max_links,
                     listen="tcp://127.0.0.1:0", connect_timeout=10.0) as client:
        peers = [client.wait_peer(name, timeout=30.0) for name in args.peers.split(",")]
        print(f"ready {client.id}", flush=True)

        def receive() -> None:
            while not stop_receiving.is_set() and time.monotonic() < deadline:
                try:
                    message = client.recv(timeout=0.2)
                except TimeoutError:
                    continue
                except ZbusError as exc:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    continue
                received.setdefault(message.src, []).append(int(message.data.split(b":")[1]))
                last_arrival[0] = time.monotonic()

        def send() -> None:
            counter = 0
            while not stop_sending.is_set() and counter < args.max_msgs and time.monotonic() < deadline:
                dst = peers[counter % len(peers)]
                counter += 1
                try:
                    data = b"%s:%d" % (args.name.encode(), counter)
                    if args.no_ack:
                        client.send(dst, data)
                    else:
                        client.send(dst, data, ack=True, timeout=SEND_TIMEOUT_S)
                except (ZbusError, TimeoutError) as exc:  # not acked: may or may not arrive, never twice
                    failed[dst] = failed.get(dst, 0) + 1
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    client.wait_connected(timeout=1.0)
                    continue
                acked.setdefault(dst, []).append(counter)

        receiver = threading.Thread(target=receive, name="chaos-recv")
        sender = threading.Thread(target=send, name="chaos-send")
        receiver.start()
        try:
            for line in sys.stdin:
                command = line.strip()
                if command == "go":
                    sender.start()
                elif command == "stop":
                    stop_sending.set()
                    if sender.is_alive() or sender.ident is not None:
                        sender.join()
                    print("stopped", flush=True)
                elif command == "report":  # drain: until nothing arrived for a second (bounded)
                    drain_until = min(deadline, time.monotonic() + 15.0)
                    while time.monotonic() - last_arrival[0] < 1.0 and time.monotonic() < drain_until:
                        stop_receiving.wait(0.1)  # polling interval of a bounded drain wait
                    break
        finally:
            stop_sending.set()
            if sender.ident is not None:
                sender.join()
            stop_receiving.set()
            receiver.join()
        print(json.dumps({"id": client.id, "name": args.name, "acked": acked, "failed": failed,
                          "received": received, "errors": errors}), flush=True)


if __name__ == "__main__":
    main()
