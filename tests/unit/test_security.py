"""Keys bound to Ids: key files, trust lists, and the ZAP handler over real CURVE sockets on 127.0.0.1."""

from __future__ import annotations

import os
import stat

import pytest
import zmq

from zbus.errors import ConfigError
from zbus.ids import new_client_id, new_server_id
from zbus.security import Zap, keygen, peer_id, read_key_file, read_trust_dir, secure_client, secure_server

from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(30)


def test_keygen_writes_a_secret_key_only_its_owner_can_read_and_a_public_key(tmp_path):
    node = new_client_id()
    pub, key = keygen(tmp_path, node)
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    pair = read_key_file(key, need_secret=True)
    assert pair.id == node and len(pair.public) == len(pair.secret) == 40
    assert read_key_file(pub, need_secret=False).public == pair.public
    assert b"secret" not in pub.read_bytes()


def test_bad_key_files_name_the_file_and_the_problem(tmp_path):
    pub, key = keygen(tmp_path / "k", new_client_id())
    with pytest.raises(ConfigError, match=r"\.pub: secret_key missing"):
        read_key_file(pub, need_secret=True)
    broken = tmp_path / "broken.key"
    broken.write_text(key.read_text().replace("public_key = \"", "public_key = \"x"))
    with pytest.raises(ConfigError, match=r"broken\.key: public_key.*not a CurveZMQ key"):
        read_key_file(broken, need_secret=True)
    with pytest.raises(ConfigError, match="key file not found"):
        read_key_file(tmp_path / "nope.key", need_secret=True)
    with pytest.raises(ConfigError, match="trust directory not found"):
        read_trust_dir(tmp_path / "nowhere")


@pytest.fixture
def context():
    ctx = zmq.Context()
    yield ctx
    Zap.shutdown(ctx)
    ctx.destroy(linger=0)


def test_a_trusted_key_gets_in_with_its_id_stamped_and_an_unknown_key_is_refused(tmp_path, context):
    trust = tmp_path / "trust"
    server_pub, server_key = keygen(tmp_path / "server", new_server_id())
    alice_pub, alice_key = keygen(trust, new_client_id())
    _, mallory_key = keygen(tmp_path / "elsewhere", new_client_id())  # not in the trust directory
    server = read_key_file(server_key, need_secret=True)

    router = context.socket(zmq.ROUTER)
    secure_server(router, server, "zbus-test", read_trust_dir(trust))
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealers = []
    try:
        for key in (alice_key, mallory_key):
            dealer = context.socket(zmq.DEALER)
            dealers.append(dealer)
            secure_client(dealer, read_key_file(key, need_secret=True), server.public)
            dealer.connect(f"tcp://127.0.0.1:{port}")
            dealer.send(read_key_file(key, need_secret=True).id.encode())
        assert router.poll(5000)
        frames = router.recv_multipart(copy=False)
        alice = read_key_file(alice_key, need_secret=True).id
        assert frames[1].bytes == alice.encode() and peer_id(frames[1]) == alice
        zap = Zap.for_context(context)
        wait_until(lambda: zap.refused.get("zbus-test", 0) >= 1, 5.0, "the unknown key's refusal")
        assert not router.poll(200)  # mallory's message never arrives
    finally:
        for sock in (router, *dealers):
            sock.close(linger=0)
