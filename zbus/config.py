"""Configuration schema and loading. The one place that knows config keys.

A config file is TOML with a ``[client]`` and/or a ``[server]`` table::

    [client]
    servers = ["tcp://10.0.0.5:7700", "tcp://10.0.0.6:7700"]
    name = "worker-1"

    [server]
    listen = "tcp://0.0.0.0:7700"
    name = "relay-eu-1"
    peers = ["tcp://10.0.0.6:7700"]

Precedence, lowest first: defaults, the file, environment (for clients: ``ZBUS_SERVERS``,
comma-separated, ``ZBUS_KEY_FILE``, ``ZBUS_TRUST_DIR``), keyword arguments / command-line flags.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Any

import msgspec

from .errors import ConfigError
from .guard import (
    DEFAULT_CONTROL_BURST,
    DEFAULT_CONTROL_RATE,
    DEFAULT_MAX_CLIENTS,
    DEFAULT_MAX_HEADER,
    DEFAULT_MAX_NAME_BYTES,
    Limits,
)
from .ids import is_client_id, is_server_id
from .security import load_security, split_pinned
from .wire import DEFAULT_MAX_FRAME

DEFAULT_SERVER = "tcp://127.0.0.1:7700"
ENV_SERVERS = "ZBUS_SERVERS"
ENV_CONFIG = "ZBUS_CONFIG"
ENV_KEY_FILE = "ZBUS_KEY_FILE"  # a client's key_file
ENV_TRUST_DIR = "ZBUS_TRUST_DIR"  # a client's trust_dir
DEFAULT_CONFIG_FILE = "zbus.toml"

_ENDPOINT = re.compile(r"^tcp://(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-*]+):(?P<port>\d{1,5})$")


class ClientConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    servers: list[str] = msgspec.field(default_factory=lambda: [DEFAULT_SERVER])
    name: str = ""
    id: str | None = None
    listen: str = "tcp://0.0.0.0:0"
    max_links: int = 64
    prelink: bool = True  # fill room under max_links with links to listed peers not sent to yet
    punch: bool = True  # try NAT hole punching (docs/nat.md) for peers no direct link reaches
    max_frame: int = DEFAULT_MAX_FRAME
    connect_timeout: float = 5.0  # seconds a new Client waits for its first server
    send_timeout: float = 10.0  # seconds send() waits for room on a full path before raising Backpressure
    # The delivery layer (zbus/delivery.py, docs/architecture.md): per destination, messages kept
    # until acknowledged so a path switch can repeat them; per source, early messages held for order.
    max_unacked: int = 16_384
    max_unacked_bytes: int = 64 * 1024 * 1024
    max_reorder: int = 16_384
    max_reorder_bytes: int = 64 * 1024 * 1024
    # Security (docs/security.md): on when key_file is set. key_file: this client's .key (its Id comes
    # from it); trust_dir: the .pub files of the servers and peers it trusts. servers then name each
    # server's Id, "S-…@tcp://host:port" (kept here as server_ids: endpoint -> Id).
    key_file: str = ""
    trust_dir: str = ""
    server_ids: dict[str, str] = {}


class ServerConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    listen: str = DEFAULT_SERVER
    name: str = ""
    id: str | None = None
    peers: list[str] = []
    max_frame: int = DEFAULT_MAX_FRAME
    max_queue: int = 16_384  # relayed messages held for one receiver that does not keep up; more are dropped
    max_pending: int = 65_536  # relayed messages held for all slow receivers together before intake pauses...
    max_pending_bytes: int = 256 * 1024 * 1024  # ...or this many payload bytes
    client_timeout: float = 3.0  # seconds of silence after which a client is dropped from the list
    # Hostile input (docs/security.md): bounds on tables and on what one connection may send.
    max_clients: int = DEFAULT_MAX_CLIENTS  # registered clients; Hellos past this are refused
    max_name_bytes: int = DEFAULT_MAX_NAME_BYTES  # a client's name, UTF-8 bytes
    max_header: int = DEFAULT_MAX_HEADER  # bytes of one header frame (and so of one client-list entry)
    control_rate: float = DEFAULT_CONTROL_RATE  # control messages per second per connection (token bucket)
    control_burst: int = DEFAULT_CONTROL_BURST  # ...and how many at once
    # The cluster (docs/cluster.md): the Raft mesh's own endpoint, "" = the data port + 1 on the same host.
    cluster_listen: str = ""
    dead_after: float = 30.0  # seconds unreachable before the quorum leader removes a server from the table
    peer_timeout: float = 1.5  # seconds without a word from a peer before it stops counting as live
    raft_tick: float = 0.05  # seconds per Raft tick
    raft_heartbeat_ticks: int = 2  # leader heartbeat every 2 ticks (100 ms)
    raft_election_ticks: int = 6  # election timeout drawn in [6, 12) ticks (300-600 ms)
    # Security (docs/security.md): on when key_file is set (this server's .key; its Id comes from it);
    # trust_dir holds the .pub files of every client and server allowed in. peers then name each
    # server's Id, "S-…@tcp://host:port" (kept here as peer_ids: endpoint -> Id).
    key_file: str = ""
    trust_dir: str = ""
    peer_ids: dict[str, str] = {}


class ConfigFile(msgspec.Struct, forbid_unknown_fields=True):
    client: dict[str, Any] = {}
    server: dict[str, Any] = {}


def parse_endpoint(value: Any, where: str, *, allow_port_zero: bool = False) -> tuple[str, int]:
    """Check a ``tcp://host:port`` endpoint; return (host, port) or raise ConfigError at ``where``."""
    match = _ENDPOINT.match(value) if isinstance(value, str) else None
    if match is None:
        raise ConfigError(f"{where}: {value!r} is not a tcp://host:port endpoint")
    port = int(match["port"])
    if not (0 if allow_port_zero else 1) <= port <= 65535:
        raise ConfigError(f"{where}: {value!r} has port {port}, expected 1-65535")
    host = match["host"].strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host not in ("*", "localhost") and not re.match(r"^[A-Za-z0-9]([A-Za-z0-9\-.]*[A-Za-z0-9])?$", host):
            raise ConfigError(f"{where}: {value!r} has no valid host") from None
    return host, port


def _read_file(path: Path) -> ConfigFile:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        return msgspec.convert(raw, ConfigFile)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path}: {_explain(exc)}; expected tables [client] and/or [server]") from None


def _explain(exc: msgspec.ValidationError) -> str:
    # msgspec says "Expected `int`, got `str` - at `$.max_links`"; turn the path into a key name.
    text = str(exc)
    message, _, path = text.partition(" - at `")
    key = path.rstrip("`").removeprefix("$").lstrip(".")
    return f"{key or '(top level)'}: {message[0].lower() + message[1:]}" if message else text


def _build(cls: type, section: str, values: dict[str, Any], source: str) -> Any:
    try:
        return msgspec.convert(values, cls)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{section}.{_explain(exc)} (in {source})") from None


def _locate(config: str | os.PathLike | None) -> Path | None:
    if config is not None:
        return Path(config)
    if os.environ.get(ENV_CONFIG):
        return Path(os.environ[ENV_CONFIG])
    default = Path(DEFAULT_CONFIG_FILE)
    return default if default.is_file() else None


def load_client_config(config: str | os.PathLike | None = None, **overrides: Any) -> ClientConfig:
    """Defaults < file < ``ZBUS_SERVERS`` < keyword arguments (``None`` means "not given")."""
    path = _locate(config)
    values: dict[str, Any] = dict(_read_file(path).client) if path else {}
    source = str(path) if path else "defaults"
    env = os.environ.get(ENV_SERVERS)
    if env:
        values["servers"] = [s.strip() for s in env.split(",") if s.strip()]
        source += f" and ${ENV_SERVERS}"
    for key, env_name in (("key_file", ENV_KEY_FILE), ("trust_dir", ENV_TRUST_DIR)):
        if os.environ.get(env_name):
            values[key] = os.environ[env_name]
            source += f" and ${env_name}"
    values.update({k: v for k, v in overrides.items() if v is not None})
    cfg = _build(ClientConfig, "client", values, source)
    if not cfg.servers:
        raise ConfigError(f"client.servers (in {source}): empty list, expected at least one tcp://host:port")
    cfg.servers, cfg.server_ids = _unpin(cfg.servers, cfg.server_ids, "client.servers", source)
    cfg.id = _secure(cfg, "client", source, cfg.servers, cfg.server_ids, "servers", is_client_id, "C-<uuid4>")
    parse_endpoint(cfg.listen, f"client.listen (in {source})", allow_port_zero=True)
    if cfg.id is not None and not is_client_id(cfg.id):
        raise ConfigError(f"client.id (in {source}): {cfg.id!r} is not C-<uuid4>")
    _check_positive(cfg.max_frame, "client.max_frame", source)
    for key in ("max_unacked", "max_unacked_bytes", "max_reorder", "max_reorder_bytes"):
        _check_positive(getattr(cfg, key), f"client.{key}", source)
    for key in ("send_timeout", "connect_timeout"):
        if not getattr(cfg, key) >= 0:
            raise ConfigError(f"client.{key} (in {source}): {getattr(cfg, key)}, expected a number of seconds >= 0")
    if cfg.max_links < 0:
        raise ConfigError(f"client.max_links (in {source}): {cfg.max_links}, expected an integer >= 0")
    return cfg


def load_server_config(config: str | os.PathLike | None = None, **overrides: Any) -> ServerConfig:
    """Defaults < file < keyword arguments / flags (``None`` or empty means "not given")."""
    path = _locate(config)
    values: dict[str, Any] = dict(_read_file(path).server) if path else {}
    source = str(path) if path else "defaults"
    values.update({k: v for k, v in overrides.items() if v not in (None, (), [])})
    cfg = _build(ServerConfig, "server", values, source)
    parse_endpoint(cfg.listen, f"server.listen (in {source})", allow_port_zero=True)
    cfg.peers, cfg.peer_ids = _unpin(cfg.peers, cfg.peer_ids, "server.peers", source)
    cfg.id = _secure(cfg, "server", source, cfg.peers, cfg.peer_ids, "peers", is_server_id, "S-<uuid4>")
    if cfg.id is not None and not is_server_id(cfg.id):
        raise ConfigError(f"server.id (in {source}): {cfg.id!r} is not S-<uuid4>")
    _check_positive(cfg.max_frame, "server.max_frame", source)
    for key in ("max_queue", "max_pending", "max_pending_bytes"):
        _check_positive(getattr(cfg, key), f"server.{key}", source)
    if cfg.cluster_listen:
        parse_endpoint(cfg.cluster_listen, f"server.cluster_listen (in {source})", allow_port_zero=True)
    for key in ("dead_after", "peer_timeout", "raft_tick"):
        if not getattr(cfg, key) > 0:
            raise ConfigError(f"server.{key} (in {source}): {getattr(cfg, key)}, expected a positive number of seconds")
    for key in ("raft_heartbeat_ticks", "raft_election_ticks"):
        _check_positive(getattr(cfg, key), f"server.{key}", source)
    if cfg.raft_election_ticks <= cfg.raft_heartbeat_ticks:
        raise ConfigError(f"server.raft_election_ticks (in {source}): {cfg.raft_election_ticks}, "
                          f"expected more than server.raft_heartbeat_ticks ({cfg.raft_heartbeat_ticks})")
    for key in ("max_clients", "max_name_bytes", "control_burst"):
        _check_positive(getattr(cfg, key), f"server.{key}", source)
    if cfg.max_header < MIN_MAX_HEADER:
        raise ConfigError(f"server.max_header (in {source}): {cfg.max_header}, expected an integer >= "
                          f"{MIN_MAX_HEADER} (a Hello with a long name must fit)")
    if not cfg.control_rate > 0:
        raise ConfigError(f"server.control_rate (in {source}): {cfg.control_rate}, "
                          "expected a number > 0 (control messages per second per connection)")
    return cfg


MIN_MAX_HEADER = 512


def server_limits(cfg: ServerConfig) -> Limits:
    """The hostile-input bounds of a server config, for :class:`~zbus.relay.ServerCore`."""
    return Limits(max_clients=cfg.max_clients, max_name_bytes=cfg.max_name_bytes, max_header=cfg.max_header,
                  control_rate=cfg.control_rate, control_burst=cfg.control_burst, max_frame=cfg.max_frame)


def _unpin(entries: list[str], ids: dict[str, str], key: str, source: str) -> tuple[list[str], dict[str, str]]:
    """Split ``S-…@tcp://host:port`` entries into plain endpoints and an endpoint -> server Id map."""
    endpoints, pinned = [], dict(ids)
    for i, entry in enumerate(entries):
        server_id, endpoint = split_pinned(entry) if isinstance(entry, str) else (None, entry)
        parse_endpoint(endpoint, f"{key}[{i}] (in {source})")
        if server_id is not None:
            if not is_server_id(server_id):
                raise ConfigError(f"{key}[{i}] (in {source}): {entry!r} names {server_id!r}, expected "
                                  "S-<uuid4>@tcp://host:port")
            pinned[endpoint] = server_id
        endpoints.append(endpoint)
    for endpoint, server_id in ids.items():
        ids_key = "server_ids" if key.startswith("client") else "peer_ids"
        parse_endpoint(endpoint, f"{key.split('.')[0]}.{ids_key} (in {source})")
        if not is_server_id(server_id):
            raise ConfigError(f"{key.split('.')[0]}.{ids_key}[{endpoint!r}] (in {source}): {server_id!r}, "
                              "expected S-<uuid4>")
    return endpoints, pinned


def _secure(cfg: Any, section: str, source: str, endpoints: list[str], ids: dict[str, str], key: str,
            id_ok: Any, id_form: str) -> str | None:
    """Check the security keys (docs/security.md); return the node's Id (the key file's, if security is on).

    With security on, the node's Id is the one its key is bound to, and every configured server must be
    named by its Id with a trusted key: otherwise the node could not check who answers there.
    """
    security = load_security(cfg.key_file, cfg.trust_dir, section, source)
    if security is None:
        return cfg.id
    if not id_ok(security.id):
        raise ConfigError(f"{section}.key_file (in {source}): {cfg.key_file} is bound to {security.id!r}, "
                          f"expected a key made for a {id_form} (zbus-node keygen{' --server' if section == 'server' else ''})")
    if cfg.id is not None and cfg.id != security.id:
        raise ConfigError(f"{section}.id (in {source}): {cfg.id!r}, but key_file {cfg.key_file} is bound to "
                          f"{security.id}; expected the same Id or no id")
    for i, endpoint in enumerate(endpoints):
        server_id = ids.get(endpoint)
        if server_id is None:
            raise ConfigError(f"{section}.{key}[{i}] (in {source}): {endpoint!r} has no server Id; with key_file "
                              f"set, expected S-<uuid4>@{endpoint} (the server whose .pub is in trust_dir)")
        if security.key_of(server_id) is None:
            raise ConfigError(f"{section}.{key}[{i}] (in {source}): {server_id} has no .pub in trust_dir "
                              f"{cfg.trust_dir}; expected its key there (copy {server_id}.pub)")
    return security.id


def _check_positive(value: int, key: str, source: str) -> None:
    if value <= 0:
        raise ConfigError(f"{key} (in {source}): {value}, expected a positive integer")
