"""The README's ten lines: a server and two clients in one process, talking by Id."""

import zbus

with zbus.Server(listen="tcp://127.0.0.1:7700"):                    # or: zbus-node server
    with zbus.Client(name="alice") as alice, zbus.Client(name="bob") as bob:
        bob_id = alice.wait_peer("bob", timeout=5.0)                 # name -> Id, once bob is known
        alice.send(bob_id, b"hello bob")                             # Unreachable / Disconnected if no path
        msg = bob.recv(timeout=5.0)                                  # Message(src, data, via="relay"|"direct")
        print(msg.src == alice.id, msg.data)                         # True b'hello bob'
        bob.send(msg.src, b"hi alice")
        print(alice.recv(timeout=5.0).data)
