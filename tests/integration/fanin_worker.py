"""A test helper process: N zbus clients on one server, driven by lines on stdin.

    python -m tests.integration.fanin_worker ENDPOINT PREFIX COUNT

prints ``joined <monotonic>`` once its clients are registered; on ``wait TOTAL`` prints
``converged <monotonic>`` when every client's lists hold TOTAL - 1 peers (or ``timeout``); on
``counts`` prints ``counts <deltas> <control bytes>`` summed over its clients; on ``quit`` closes
all and exits. Bounded: every wait has a deadline.
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor

import zbus

WAIT_LIMIT_S = 40.0
JOINERS = 8


def main() -> None:
    endpoint, prefix, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    clients: list[zbus.Client] = []
    try:
        with ThreadPoolExecutor(JOINERS) as pool:  # joins overlap, as they would in a real fleet
            # prelink=False: this test measures list convergence; with links filled up to max_links,
            # 500 clients on one machine would also open ~32,000 links, a different test.
            for client in pool.map(lambda i: zbus.Client(servers=[endpoint], name=f"{prefix}-{i}",
                                                           connect_timeout=10.0, prelink=False), range(count)):
                clients.append(client)
        print(f"joined {time.monotonic()}", flush=True)
        for line in sys.stdin:
            command, *args = line.split()
            if command == "wait":
                total = int(args[0])
                deadline = time.monotonic() + WAIT_LIMIT_S
                pending = list(clients)
                while pending and time.monotonic() < deadline:
                    pending = [c for c in pending if len(c.peers()) < total - 1]
                    if pending:  # sleep on that client's engine condition until its lists are complete
                        pending[0]._engine.wait_for(lambda r: len(r.clients) >= total - 1, 0.05)
                print(f"converged {time.monotonic()}" if not pending else f"timeout {len(pending)}", flush=True)
            elif command == "settle":  # every peer's net state complete (its public endpoint reported)
                deadline = time.monotonic() + WAIT_LIMIT_S
                pending = list(clients)
                settled = lambda r: all(info.net.public for info in r.clients.values())  # noqa: E731
                while pending and time.monotonic() < deadline:
                    pending = [c for c in pending if not settled(c._engine.routes)]
                    if pending:
                        pending[0]._engine.wait_for(settled, 0.05)
                print("settled" if not pending else f"timeout {len(pending)}", flush=True)
            elif command == "counts":
                statuses = [c.status() for c in clients]
                deltas = sum(s.control_msgs.get("ClientDelta", 0) for s in statuses)
                print(f"counts {deltas} {sum(s.control_bytes for s in statuses)}", flush=True)
            elif command == "quit":
                break
    finally:
        for client in clients:
            client.close()


if __name__ == "__main__":
    main()
