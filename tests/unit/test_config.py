"""Config: defaults, file, environment and keyword precedence; errors name file, key and form."""

from __future__ import annotations

import pytest

from zbus import ConfigError, load_client_config, load_server_config
from zbus.config import DEFAULT_SERVER


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    monkeypatch.delenv("ZBUS_SERVERS", raising=False)
    monkeypatch.delenv("ZBUS_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)  # no stray zbus.toml


def write(tmp_path, text: str):
    path = tmp_path / "zbus.toml"
    path.write_text(text)
    return path


def test_no_config_at_all_means_the_local_default_server():
    assert load_client_config().servers == [DEFAULT_SERVER] == ["tcp://127.0.0.1:7700"]
    assert load_server_config().listen == DEFAULT_SERVER


def test_file_then_env_then_keywords(tmp_path, monkeypatch):
    path = write(tmp_path, '[client]\nservers = ["tcp://10.0.0.5:7700"]\nname = "from-file"\nmax_links = 3\n')
    cfg = load_client_config(path)
    assert (cfg.servers, cfg.name, cfg.max_links) == (["tcp://10.0.0.5:7700"], "from-file", 3)
    monkeypatch.setenv("ZBUS_SERVERS", "tcp://10.0.0.6:7700, tcp://10.0.0.7:7700")
    assert load_client_config(path).servers == ["tcp://10.0.0.6:7700", "tcp://10.0.0.7:7700"]
    cfg = load_client_config(path, servers=["tcp://127.0.0.1:9"], name="kw")
    assert (cfg.servers, cfg.name, cfg.max_links) == (["tcp://127.0.0.1:9"], "kw", 3)


def test_zbus_toml_in_the_working_directory_is_found(tmp_path):
    write(tmp_path, '[server]\nlisten = "tcp://0.0.0.0:7800"\npeers = ["tcp://10.1.1.1:7700"]\n')
    cfg = load_server_config()
    assert (cfg.listen, cfg.peers) == ("tcp://0.0.0.0:7800", ["tcp://10.1.1.1:7700"])


@pytest.mark.parametrize("text, words", [
    ('[client]\nservers = ["tcp://ok:1", "tcp//x"]\n', ["zbus.toml", "client.servers[1]", "'tcp//x'", "tcp://host:port"]),
    ('[client]\nmax_links = "many"\n', ["zbus.toml", "client.max_links", "expected `int`"]),
    ('[client]\npunch = "no"\n', ["zbus.toml", "client.punch", "expected `bool`"]),
    ('[client]\nservers = "tcp://a:1"\n', ["zbus.toml", "client.servers", "expected `array`"]),
    ('[client]\nbogus = 1\n', ["zbus.toml", "client", "bogus"]),
    ('[client]\nid = "S-1"\n', ["zbus.toml", "client.id", "C-<uuid4>"]),
    ('[server]\nlisten = "tcp://0.0.0.0:99999"\n', ["zbus.toml", "server.listen", "1-65535"]),
    ('[server]\nmax_frame = 0\n', ["zbus.toml", "server.max_frame", "positive"]),
    ('[server]\nraft_tick = -1\n', ["zbus.toml", "server.raft_tick", "positive number of seconds"]),
    ('[server]\nraft_election_ticks = 2\n', ["zbus.toml", "server.raft_election_ticks", "more than"]),
    ('[server]\ncluster_listen = "udp://x:1"\n', ["zbus.toml", "server.cluster_listen", "tcp://host:port"]),
    ('[servers]\nlisten = "x"\n', ["zbus.toml", "servers", "[client] and/or [server]"]),
    ('[client\n', ["zbus.toml", "not valid TOML"]),
])
def test_bad_config_names_file_key_and_expected_form(tmp_path, text, words):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_client_config(path) if "[client" in text else load_server_config(path)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_client_config(tmp_path / "nope.toml")


def test_bad_env_servers_are_reported_with_their_source(monkeypatch):
    monkeypatch.setenv("ZBUS_SERVERS", "tcp://ok:1,udp://x:2")
    with pytest.raises(ConfigError, match=r"client.servers\[1\].*ZBUS_SERVERS.*udp://x:2"):
        load_client_config()


def test_bad_keyword_is_a_config_error():
    with pytest.raises(ConfigError, match="client.max_links"):
        load_client_config(max_links=-1)


def test_punching_is_on_by_default_and_off_by_file_or_keyword(tmp_path):
    assert load_client_config().punch is True
    path = write(tmp_path, "[client]\npunch = false\n")
    assert load_client_config(path).punch is False
    assert load_client_config(path, punch=True).punch is True
