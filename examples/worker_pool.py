"""Workers in separate processes answer a dispatcher by Id.

    zbus-node server &                       # tcp://127.0.0.1:7700
    python examples/worker_pool.py worker w1 &
    python examples/worker_pool.py worker w2 &
    python examples/worker_pool.py dispatch w1 w2
"""

import sys

import zbus


def worker(name: str) -> None:
    with zbus.Client(name=name) as me:
        print(f"{name} is {me.id}", flush=True)
        while True:
            job = me.recv()
            me.send(job.src, job.data.upper())


def dispatch(names: list[str]) -> None:
    with zbus.Client(name="dispatcher") as me:
        ids = [me.wait_peer(n, timeout=10.0) for n in names]
        for i in range(10):
            me.send(ids[i % len(ids)], f"job {i}".encode())
        for _ in range(10):
            reply = me.recv(timeout=5.0)
            print(me.peers()[reply.src].name, reply.data.decode())


if __name__ == "__main__":
    worker(sys.argv[2]) if sys.argv[1] == "worker" else dispatch(sys.argv[2:])
