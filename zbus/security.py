"""Keys and identity: CurveZMQ key pairs bound to zbus Ids, trust lists, and the ZAP handler.

With security on, every ZMQ connection is CurveZMQ (encrypted, the server end proves its key, the
connecting end's key is checked by ZAP). A key file binds a key pair to one Id:

    # C-….key  (secret: mode 0600)          # C-….pub  (public: copy it into the trust directory)
    id = "C-…"                               id = "C-…"
    public_key = "<z85, 40 chars>"           public_key = "<z85, 40 chars>"
    secret_key = "<z85, 40 chars>"

``zbus-node keygen`` writes both. A **trust directory** holds the ``.pub`` files of every node
allowed in: the ZAP handler admits a connection only if its key is there, and stamps the Id bound
to that key on the connection (ZMQ ``User-Id``), so a server can refuse a ``Hello`` that claims any
other Id. Refusals are logged with the reason and counted.

One ZAP handler serves a whole process (libzmq allows one per context); each socket that accepts
CURVE clients registers a ZAP *domain* with its own trust list (:meth:`Zap.register`), so a server
and a client in one process keep separate trust.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import msgspec
import zmq
import zmq.utils.z85

from .errors import ConfigError, Refused
from .ids import is_client_id, is_server_id

log = logging.getLogger("zbus.security")

Z85_KEY_LEN = 40
MAX_LOGGED_REFUSALS = 4096  # (domain, key) pairs remembered as already logged


class KeyFile(msgspec.Struct, forbid_unknown_fields=True):
    id: str
    public_key: str
    secret_key: str = ""


@dataclass(frozen=True)
class KeyPair:
    id: str
    public: bytes  # z85
    secret: bytes  # z85


def _check_key(value: str, where: str) -> bytes:
    try:
        raw = zmq.utils.z85.decode(value.encode("ascii")) if len(value) == Z85_KEY_LEN else b""
    except (ValueError, UnicodeEncodeError):
        raw = b""
    if len(raw) != 32:
        raise ConfigError(f"{where}: {value[:12]!r}… is not a CurveZMQ key (expected 40 z85 characters)")
    return value.encode("ascii")


def read_key_file(path: str | os.PathLike, *, need_secret: bool) -> KeyPair:
    """Load a ``.key`` (``need_secret``) or ``.pub`` file; errors name the file and the key."""
    path = Path(path)
    try:
        entry = msgspec.toml.decode(path.read_bytes(), type=KeyFile)
    except FileNotFoundError:
        raise ConfigError(f"{path}: key file not found (make one with `zbus-node keygen`)") from None
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ConfigError(f"{path}: not a zbus key file: {exc}") from None
    public = _check_key(entry.public_key, f"{path}: public_key")
    if not need_secret:
        return KeyPair(entry.id, public, b"")
    if not entry.secret_key:
        raise ConfigError(f"{path}: secret_key missing (this is a public .pub file; give the .key file)")
    secret = _check_key(entry.secret_key, f"{path}: secret_key")
    if zmq.curve_public(secret) != public:
        raise ConfigError(f"{path}: public_key does not belong to secret_key")
    return KeyPair(entry.id, public, secret)


def keygen(directory: str | os.PathLike, node_id: str) -> tuple[Path, Path]:
    """Write ``<id>.key`` (0600) and ``<id>.pub`` into ``directory``; return their paths."""
    if not (is_client_id(node_id) or is_server_id(node_id)):
        raise ConfigError(f"keygen: {node_id!r} is not C-<uuid4> or S-<uuid4>")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = (key.decode("ascii") for key in zmq.curve_keypair())
    pub_path, key_path = directory / f"{node_id}.pub", directory / f"{node_id}.key"
    # z85 has no quote or backslash, and Ids are checked above: plain TOML strings are safe.
    pub_path.write_text(f'id = "{node_id}"\npublic_key = "{public}"\n')
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(f'id = "{node_id}"\npublic_key = "{public}"\nsecret_key = "{secret}"\n')
    return pub_path, key_path


def read_trust_dir(directory: str | os.PathLike) -> dict[bytes, str]:
    """Every ``*.pub`` in ``directory``: z85 public key -> the Id it is bound to."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"{directory}: trust directory not found (put the nodes' .pub files there)")
    trusted: dict[bytes, str] = {}
    for path in sorted(directory.glob("*.pub")):
        pair = read_key_file(path, need_secret=False)
        if pair.public in trusted and trusted[pair.public] != pair.id:
            raise ConfigError(f"{path}: the same public key is bound to {trusted[pair.public]} too")
        trusted[pair.public] = pair.id
    return trusted


RELOAD_S = 1.0  # an unchanged trust directory is read again on a miss at most this often


class TrustList:
    """A trust directory, read at start and again when a key or Id is not found and the directory changed
    (a file added or removed: its mtime moved) or ``RELOAD_S`` passed: a node added by copying its
    ``.pub`` in is trusted without a restart. A ``.pub`` removed is forgotten at the next reload (existing
    connections stay until they drop). A directory that became unreadable keeps the last good list."""

    def __init__(self, directory: str | os.PathLike, trusted: Mapping[bytes, str] | None = None) -> None:
        self.directory = Path(directory)
        self._lock = threading.Lock()
        self._by_key: dict[bytes, str] = dict(trusted) if trusted is not None else read_trust_dir(directory)
        self._by_id = {node: key for key, node in self._by_key.items()}
        self._read_at = time.monotonic()
        self._mtime = self._dir_mtime()

    def _dir_mtime(self) -> int:
        try:
            return os.stat(self.directory).st_mtime_ns
        except OSError:
            return -1

    def _reload(self) -> None:
        now, mtime = time.monotonic(), self._dir_mtime()
        if mtime == self._mtime and now - self._read_at < RELOAD_S:
            return
        self._read_at, self._mtime = now, mtime
        try:
            fresh = read_trust_dir(self.directory)
        except ConfigError as exc:
            log.warning("trust directory not re-read, keeping the last list: %s", exc)
            return
        self._by_key, self._by_id = fresh, {node: key for key, node in fresh.items()}

    def get(self, key: bytes) -> str | None:
        """The Id bound to public ``key`` (z85), or None."""
        with self._lock:
            node = self._by_key.get(key)
            if node is None:
                self._reload()
                node = self._by_key.get(key)
            return node

    def key_of(self, node_id: str) -> bytes | None:
        with self._lock:
            key = self._by_id.get(node_id)
            if key is None:
                self._reload()
                key = self._by_id.get(node_id)
            return key

    def __len__(self) -> int:
        return len(self._by_key)


def _authenticator(context: zmq.Context, zap: "Zap"):
    """pyzmq's ZAP thread, with per-domain trust lists and key -> Id as the connection's User-Id.
    (Imported here: a node with security off never loads zmq.auth.)"""
    import zmq.auth.thread

    class _Authenticator(zmq.auth.thread.ThreadAuthenticator):
        def curve_user_id(self, client_public_key: bytes) -> str:
            key = zmq.utils.z85.encode(client_public_key)
            return zap.identity_of(key) or ""

    return _Authenticator(context, log=log)


class _Provider:
    """``configure_curve_callback`` hook: is this key trusted in this domain?"""

    def __init__(self, zap: "Zap") -> None:
        self._zap = zap

    def callback(self, domain: str, key: bytes) -> bool:
        return self._zap.admit(domain, key)


class Zap:
    """The process's ZAP handler: domains (one per accepting socket) with their trust lists."""

    _instances: dict[int, "Zap"] = {}
    _lock = threading.Lock()

    @classmethod
    def for_context(cls, context: zmq.Context) -> "Zap":
        with cls._lock:
            zap = cls._instances.get(id(context))
            if zap is None:
                zap = cls._instances[id(context)] = cls(context)
            return zap

    def __init__(self, context: zmq.Context) -> None:
        self._domains: dict[str, Mapping[bytes, str] | TrustList] = {}
        self._ids: dict[bytes, str] = {}
        self.refused: dict[str, int] = {}  # domain -> connections refused
        self._logged: set[tuple[str, bytes]] = set()  # (domain, key) refusals already logged
        self._state = threading.Lock()
        self._auth = _authenticator(context, self)
        self._auth.start()
        self._auth.configure_curve_callback("*", _Provider(self))

    @classmethod
    def shutdown(cls, context: zmq.Context) -> None:
        """Stop the ZAP handler of ``context`` (before terminating the context)."""
        with cls._lock:
            zap = cls._instances.pop(id(context), None)
        if zap is not None:
            zap._auth.stop()

    def register(self, domain: str, trusted: "Mapping[bytes, str] | TrustList") -> None:
        with self._state:
            self._domains[domain] = trusted if isinstance(trusted, TrustList) else dict(trusted)
            self._auth.configure_curve_callback(domain, _Provider(self))

    def unregister(self, domain: str) -> None:
        with self._state:
            self._domains.pop(domain, None)

    def admit(self, domain: str, key: bytes) -> bool:
        with self._state:
            trusted = self._domains.get(domain)
            node = trusted.get(key) if trusted is not None else None
            if node is None:
                self.refused[domain] = self.refused.get(domain, 0) + 1
                why = "unknown domain" if trusted is None else "key not in the trust list"
                # A refused peer reconnects about once a second: log each (domain, key) once, count the rest.
                if (domain, key) not in self._logged:
                    if len(self._logged) >= MAX_LOGGED_REFUSALS:
                        self._logged.clear()
                    self._logged.add((domain, key))
                    log.warning("refused a CURVE connection to %s: %s (key %s…; logged once per key, "
                                "counted in every refusal)", domain, why, key[:8].decode())
                return False
            self._ids[key] = node
            return True

    def identity_of(self, key: bytes) -> str | None:
        with self._state:
            return self._ids.get(key)


def secure_server(sock: zmq.Socket, own: KeyPair, domain: str, trusted: "Mapping[bytes, str] | TrustList") -> None:
    """Make ``sock`` (before bind) a CURVE server whose clients must be in ``trusted``."""
    Zap.for_context(sock.context).register(domain, trusted)
    sock.zap_domain = domain.encode()
    sock.curve_server = True
    sock.curve_publickey = own.public
    sock.curve_secretkey = own.secret


def secure_client(sock: zmq.Socket, own: KeyPair, server_public: bytes) -> None:
    """Make ``sock`` (before connect) a CURVE client of a server whose public key is ``server_public``."""
    sock.curve_serverkey = server_public
    sock.curve_publickey = own.public
    sock.curve_secretkey = own.secret


def peer_id(frame: zmq.Frame) -> str:
    """The Id bound to the key of the connection a frame came over ("" without CURVE)."""
    try:
        return frame.get("User-Id") or ""
    except zmq.ZMQError:
        return ""


# -- a node's security settings, and the checks the drivers make ---------------------------------------


@dataclass(frozen=True)
class Security:
    """A node's own key pair and its trust list. ``None`` wherever security is off (no per-message cost)."""

    own: KeyPair
    trusted: TrustList  # z85 public key <-> Id

    @property
    def id(self) -> str:
        return self.own.id

    def key_of(self, node_id: str | None) -> bytes | None:
        """The trusted public key bound to ``node_id`` (None: not trusted, or no Id)."""
        return self.trusted.key_of(node_id) if node_id else None

    def serve(self, sock: zmq.Socket, domain: str) -> None:
        """Make ``sock`` (before bind) a CURVE server admitting only keys of the trust list."""
        secure_server(sock, self.own, domain, self.trusted)

    def dial(self, sock: zmq.Socket, peer_id: str | None) -> bool:
        """Make ``sock`` (before connect) a CURVE client of ``peer_id``; False if that Id has no trusted key
        (then the caller must not connect: a plain or unverified connection would be refused anyway)."""
        key = self.key_of(peer_id)
        if key is None:
            return False
        secure_client(sock, self.own, key)
        return True

    def release(self, context: zmq.Context, domain: str) -> None:
        """Forget a domain registered by :meth:`serve` (the socket is closed)."""
        with Zap._lock:
            zap = Zap._instances.get(id(context))
        if zap is not None:
            zap.unregister(domain)


def load_security(key_file: str, trust_dir: str, section: str = "", source: str = "") -> Security | None:
    """The node's :class:`Security` from its config (``None`` when ``key_file`` is empty: security off).

    Errors name the config key (``section.key_file``), where it came from (``source``) and the file.
    """
    at = f" (in {source})" if source else ""
    prefix = f"{section}." if section else ""
    if not key_file:
        if trust_dir:
            raise ConfigError(f"{prefix}key_file{at}: missing, expected the node's .key file "
                              "(trust_dir is set: security needs both)")
        return None
    if not trust_dir:
        raise ConfigError(f"{prefix}trust_dir{at}: missing, expected a directory of trusted .pub files "
                          "(key_file is set: security needs both)")
    try:
        own = read_key_file(key_file, need_secret=True)
    except ConfigError as exc:
        raise ConfigError(f"{prefix}key_file{at}: {exc}") from None
    try:
        trusted = TrustList(trust_dir)
    except ConfigError as exc:
        raise ConfigError(f"{prefix}trust_dir{at}: {exc}") from None
    return Security(own, trusted)


def claim_refusal(claimed: str, authenticated: str) -> str | None:
    """Why a message claiming to come from ``claimed`` must be refused on a connection whose CURVE key is
    bound to ``authenticated`` (None: it may pass). Used for client Hello, ClusterHello and LinkHello."""
    if not authenticated:
        return "the connection has no authenticated Id (its key is bound to none)"
    if claimed != authenticated:
        return f"claims {claimed!r} but its key belongs to {authenticated}"
    return None


def split_pinned(entry: str) -> tuple[str | None, str]:
    """``"S-…@tcp://host:port"`` -> (``"S-…"``, ``"tcp://host:port"``); a plain endpoint -> (None, it).

    With security on, a node dialing a server must know which key to expect there, so a configured
    endpoint names the server's Id (whose ``.pub`` is in the trust directory).
    """
    head, sep, tail = entry.partition("@")
    if sep and "://" not in head:
        return head, tail
    return None, entry


def punched_peer_key(security: Security, peer_id: str) -> bytes:
    """Hook for punched paths (not wired yet): the public key ``peer_id`` must prove over a punched path.

    A punched path (zbus/punch_udp.py, KCP over UDP) runs no CurveZMQ, so its handshake must prove the
    peer holds the secret key of this public key (e.g. a CurveZMQ-style box over the path's nonce)
    before any Data is accepted on it. Call it only with security on; raises :class:`Refused` when the
    peer is not in the trust list (refuse the path, keep using the relay).
    """
    key = security.key_of(peer_id)
    if key is None:
        raise Refused(f"{peer_id} is not in the trust list: no punched path to it")
    return key
