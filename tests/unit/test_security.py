"""Keys bound to Ids: key files, trust lists, and the ZAP handler over real CURVE sockets on 127.0.0.1."""

from __future__ import annotations

import os
import stat

import pytest
import zmq

from tests.helpers import wait_until
from zbus.errors import ConfigError
from zbus.ids import new_client_id, new_server_id
from zbus.security import Zap, keygen, peer_id, read_key_file, read_trust_dir, secure_client, secure_server

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


# -- config keys, pinned endpoints, the trust list's reload, the claim check -----------------------------

from zbus.config import load_client_config, load_server_config  # noqa: E402
from zbus.errors import Refused  # noqa: E402
from zbus.security import TrustList, claim_refusal, punched_peer_key, split_pinned  # noqa: E402


@pytest.fixture
def cluster_keys(tmp_path):
    """A server and a client key, both trusted; returns (server id, client id, keys dir, trust dir)."""
    trust, keys = tmp_path / "trust", tmp_path / "keys"
    server, client = new_server_id(), new_client_id()
    for node in (server, client):
        pub, _ = keygen(keys, node)
        trust.mkdir(exist_ok=True)
        (trust / pub.name).write_bytes(pub.read_bytes())
    return server, client, keys, trust


def test_pinned_endpoints_split_into_endpoints_and_ids_and_the_key_gives_the_node_its_id(cluster_keys):
    server, client, keys, trust = cluster_keys
    cfg = load_client_config(None, servers=[f"{server}@tcp://127.0.0.1:7700"], key_file=str(keys / f"{client}.key"),
                             trust_dir=str(trust))
    assert cfg.servers == ["tcp://127.0.0.1:7700"] and cfg.server_ids == {"tcp://127.0.0.1:7700": server}
    assert cfg.id == client
    other = new_server_id()
    scfg = load_server_config(None, peers=[f"{other}@tcp://127.0.0.1:7800"])  # security off: Ids just kept
    assert scfg.peers == ["tcp://127.0.0.1:7800"] and scfg.peer_ids == {"tcp://127.0.0.1:7800": other}
    assert split_pinned("tcp://h:1") == (None, "tcp://h:1") and split_pinned(f"{other}@tcp://h:1") == (other, "tcp://h:1")


def test_security_config_errors_name_the_key_and_the_expected_form(cluster_keys, tmp_path):
    server, client, keys, trust = cluster_keys
    key = str(keys / f"{client}.key")
    pinned = [f"{server}@tcp://127.0.0.1:7700"]
    with pytest.raises(ConfigError, match=r"client\.trust_dir \(in defaults\): missing"):
        load_client_config(None, servers=pinned, key_file=key)
    with pytest.raises(ConfigError, match=r"client\.key_file \(in defaults\): missing"):
        load_client_config(None, servers=pinned, trust_dir=str(trust))
    with pytest.raises(ConfigError, match=r"client\.servers\[0\].*has no server Id.*expected S-<uuid4>@tcp://"):
        load_client_config(None, servers=["tcp://127.0.0.1:7700"], key_file=key, trust_dir=str(trust))
    stranger = new_server_id()
    with pytest.raises(ConfigError, match=rf"client\.servers\[0\].*{stranger} has no \.pub in trust_dir"):
        load_client_config(None, servers=[f"{stranger}@tcp://127.0.0.1:7700"], key_file=key, trust_dir=str(trust))
    with pytest.raises(ConfigError, match=r"client\.servers\[0\].*expected S-<uuid4>@tcp://host:port"):
        load_client_config(None, servers=[f"{client}@tcp://127.0.0.1:7700"])
    with pytest.raises(ConfigError, match=r"client\.id .*but key_file .* is bound to"):
        load_client_config(None, servers=pinned, key_file=key, trust_dir=str(trust), id=new_client_id())
    with pytest.raises(ConfigError, match=r"server\.key_file .*expected a key made for a S-<uuid4>"):
        load_server_config(None, key_file=key, trust_dir=str(trust))
    with pytest.raises(ConfigError, match=r"client\.key_file .*key file not found"):
        load_client_config(None, servers=pinned, key_file=str(tmp_path / "nope.key"), trust_dir=str(trust))
    toml = tmp_path / "zbus.toml"
    toml.write_text(f'[server]\nkey_file = "{keys / (server + ".key")}"\n')
    with pytest.raises(ConfigError, match=rf"server\.trust_dir \(in {toml}\): missing"):
        load_server_config(toml)


def test_the_trust_list_sees_a_pub_file_added_after_it_was_read(tmp_path):
    trust = tmp_path / "trust"
    keygen(trust, new_client_id())
    trusted = TrustList(trust)
    late = new_client_id()
    pub, _ = keygen(tmp_path / "late", late)
    (trust / pub.name).write_bytes(pub.read_bytes())
    key = read_key_file(pub, need_secret=False).public
    assert trusted.get(key) == late and trusted.key_of(late) == key
    assert trusted.get(b"x" * 40) is None


def test_a_claim_passes_only_when_it_names_the_id_bound_to_the_key(tmp_path):
    alice, bob = new_client_id(), new_client_id()
    assert claim_refusal(alice, alice) is None
    assert "key belongs to " + bob in claim_refusal(alice, bob)
    assert "no authenticated Id" in claim_refusal(alice, "")
    pub, key = keygen(tmp_path / "trust", alice)
    from zbus.security import load_security
    security = load_security(str(key), str(tmp_path / "trust"))
    assert punched_peer_key(security, alice) == security.own.public
    with pytest.raises(Refused, match="not in the trust list"):
        punched_peer_key(security, bob)
