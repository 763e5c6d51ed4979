"""The zbus wire format. Every frame layout and message type lives in this module.

A zbus message is a ZMQ multipart message::

    [routing id ..., header, payload?]

* routing ids are added and removed by ROUTER sockets; zbus code never writes them into headers;
* ``header`` is one byte of protocol version (:data:`WIRE_VERSION`) followed by a msgpack-encoded
  member of the :data:`Header` tagged union (msgspec Structs, encoded as arrays);
* ``payload`` is the user's bytes, a frame of its own: it is never decoded or re-encoded, and a
  relay forwards the very frame it received.

Frames that break these rules are dropped and counted by the receiver (:class:`DropReason`).
"""

from __future__ import annotations

import enum
import struct
from typing import Union

import msgspec

from .raft.messages import (
    RaftAppend,
    RaftAppendResp,
    RaftHeartbeat,
    RaftHeartbeatResp,
    RaftPreVote,
    RaftPreVoteResp,
    RaftTimeoutNow,
    RaftVote,
    RaftVoteResp,
)

WIRE_VERSION = 1
DEFAULT_MAX_FRAME = 64 * 1024 * 1024
_VERSION_BYTE = bytes([WIRE_VERSION])


class DropReason(str, enum.Enum):
    """Why a received frame was dropped; each is a counter in the node's statistics."""

    BAD_VERSION = "bad_version"
    UNDECODABLE = "undecodable"
    OVERSIZED = "oversized"
    MALFORMED = "malformed"  # wrong number of frames or a message that makes no sense here
    UNROUTABLE = "unroutable"  # a relay's destination is not connected (any more)
    UNREGISTERED = "unregistered"  # data from a connection that never said Hello
    RATE_LIMITED = "rate_limited"  # a control message over its connection's rate (server: control_rate)
    REFUSED = "refused"  # a Hello the server answered with an Error (server full, bad Id or name, Id in use)
    CONGESTED = "congested"  # a reply not sent: the connection it was for does not read (its pipe is full)
    SLOW_RECEIVER = "slow_receiver"  # a relayed message past its receiver's queue (max_queue); its sender repeats it


class WireError(Exception):
    """A header could not be decoded; ``reason`` says why."""

    def __init__(self, reason: DropReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason


class _Msg(msgspec.Struct, tag=True, array_like=True, frozen=True):
    """Base of every header type."""


class NetState(_Msg):
    """What a node knows of its own addresses."""

    private: list[str] = []  # IPs found on the node's interfaces
    public: list[str] = []  # "ip:port" endpoints as observed by servers
    listen: str = ""  # tcp://ip:port of the node's own ROUTER, "" if it listens nowhere


class ClientInfo(_Msg):
    id: str
    name: str
    net: NetState = NetState()


class Hello(_Msg):
    """First message on a control connection: who the sender is (client -> server registration).

    ``instance`` is random per process: a reconnecting client (same instance) takes its Id over
    from its own stale connection, while another process claiming the Id is refused.
    ``data_in`` / ``data_out`` are the routing ids (random, secret, 16 bytes) of the client's two
    data connections to this server: the server relays to ``data_in`` and accepts Data from
    ``data_out``, stamping the Id registered here as the source.
    """

    id: str
    name: str
    net: NetState = NetState()
    instance: str = ""
    data_in: bytes = b""
    data_out: bytes = b""


class Heartbeat(_Msg):
    """Client -> server, about once a second: I am alive (servers expire silent clients)."""


class Bye(_Msg):
    """Client -> server on close: forget me now rather than after the silence timeout."""


class Welcome(_Msg):
    """Answer to a :class:`Hello`: the registration is accepted. ``max_frame``: the largest frame
    this server relays (0: not said), so a client refuses a bigger message at ``send`` instead of
    sending what the server would drop."""

    server_id: str
    server_name: str
    max_frame: int = 0
    rendezvous_key: bytes = b""  # keys the MACs of this client's UDP rendezvous (zbus/rendezvous.py)


class ClientDelta(_Msg):
    """A change of a server's client list, or the whole list when ``full``.

    ``version`` is the list's version after the change; a delta applies only on top of
    ``version - 1``. A receiver that sees a gap asks for a :class:`Resync`.
    """

    server_id: str
    version: int
    full: bool
    upsert: list[ClientInfo] = []
    removed: list[str] = []


class Resync(_Msg):
    """Client -> server: send me your whole client list (I saw a version gap)."""


class Data(_Msg):
    """User data; the payload is the next frame. ``src`` is stamped by whoever forwards it."""

    dst: str
    src: str = ""
    seq: int = 0


class Error(_Msg):
    code: str
    message: str


class StatusRequest(_Msg):
    """Anyone -> server: describe the cluster as you see it."""


class ServerStatus(_Msg):
    id: str
    name: str
    endpoint: str
    role: str  # "master" | "server"
    alive: bool
    clients: int


class ServerTable(_Msg):
    """Server -> client: every server of the cluster (the replicated server table), and the master.

    Sent after Welcome and whenever the table changes; a client connects to servers it did not
    know and drops servers that left.
    """

    version: int
    master: str
    servers: list[ServerStatus]


class ClientStatus(_Msg):
    id: str
    name: str
    server: str


class ServerStats(_Msg):
    clients: int = 0
    relayed_msgs: int = 0
    relayed_bytes: int = 0
    dropped: dict[str, int] = {}


class StatusReply(_Msg):
    self_id: str
    master: str
    servers: list[ServerStatus]
    clients: list[ClientStatus]
    stats: ServerStats
    cluster_stats: dict[str, ServerStats] = {}  # every live server's latest figures (this one's too), by Id


# -- the cluster mesh (server <-> server, on each server's cluster endpoint; see docs/cluster.md) ----------


class ClusterServer(_Msg):
    """One server as the cluster knows it: a row of the replicated server table."""

    id: str
    name: str
    instance: str  # random per process: a restart with a pinned Id is a new instance
    data_endpoint: str  # the ROUTER clients and users know
    cluster_endpoint: str  # the ROUTER of the Raft mesh
    started_at: float  # wall clock at start (seconds since the epoch): of 2 servers, the earlier is Master
    net: NetState = NetState()


class ClusterHello(_Msg):
    """First message on every cluster connection (and again after each reconnect): who is speaking.

    The receiver binds the connection to ``server.id``; every later message on it must name that Id
    in ``frm``. Wildcard hosts in the endpoints are replaced by the address the connection came from.
    """

    server: ClusterServer


class ClusterWho(_Msg):
    """Receiver -> sender on a connection that never said ClusterHello: say it (again)."""


class PeerStatus(_Msg):
    """Every server -> every peer, a few times a second: liveness, cluster membership, figures."""

    frm: str
    cluster_id: str  # "" while the sender belongs to no cluster yet
    voters: int  # how many voters the sender's Raft membership has
    leader: str  # the Raft leader the sender follows, "" if none
    master: str  # the Master in the sender's view, "" if unknown
    stats: ServerStats = ServerStats()
    admitted: bool = False  # the sender's own table row names this very process (it may vote)


class MasterQuery(_Msg):
    """A bootstrapping server -> a peer: who is your Master?"""

    frm: str


class MasterReply(_Msg):
    frm: str
    cluster_id: str
    master: str  # "" if the sender knows none right now (ask again)
    master_endpoint: str  # the Master's cluster endpoint


class ServerListQuery(_Msg):
    """A bootstrapping server -> the Master: every server of your cluster, please."""

    frm: str


class ServerList(_Msg):
    frm: str
    cluster_id: str
    servers: list[ClusterServer]


class ClusterStatusRequest(_Msg):
    """Anyone -> a server's cluster endpoint: your cluster and Raft state (for operators and tests)."""


class ClusterStatusReply(_Msg):
    self_id: str
    cluster_id: str
    phase: str  # "unjoined" | "joining" | "member"
    role: str  # Raft role: "follower" | "pre_candidate" | "candidate" | "leader"
    term: int
    leader: str
    master: str
    voters: list[str]
    learners: list[str]
    live: list[str]  # the peers this server counts as live
    table: list[str]  # server Ids in its replicated table
    stats: dict[str, ServerStats] = {}  # every server's latest figures, by Id, as this server heard them
    dropped: dict[str, int] = {}  # cluster messages this server dropped, by reason


class Probe(_Msg):
    """UDP, client -> server reflector: what address do my packets come from?"""

    nonce: bytes


class Observed(_Msg):
    """UDP, reflector -> client: the source address the probe with ``nonce`` arrived from."""

    nonce: bytes
    ip: str
    port: int


class PunchRequest(_Msg):
    """UDP, client punch socket -> server reflector: register this socket (``to`` = "") or ask for a
    rendezvous with ``to``. The server learns the socket's public endpoint from the datagram itself.

    ``private`` are the client's interface addresses (its LAN candidates, with ``port`` = the socket's
    local port); ``hard`` is netcheck's ``mapping_varies``. ``mac``: see zbus/rendezvous.py (an Id
    registered over TCP at this server must MAC its requests with the key the server's Welcome gave
    it). The server answers a registration with :class:`Observed` (same ``nonce``).
    """

    frm: str
    to: str
    nonce: bytes
    private: list[str] = []
    port: int = 0
    hard: bool = False
    mac: bytes = b""


class PunchGo(_Msg):
    """UDP, server -> both sides of a rendezvous: punch towards ``peer`` now.

    ``candidates`` are the peer's "ip:port" endpoints (observed public first, then private);
    ``role`` / ``peer_role`` are "open" (no NAT), "easy" (endpoint-independent mapping) or "hard";
    ``secret`` keys the HMAC of every :class:`Punch` of this ``session``. ``refused`` non-empty: no
    rendezvous (e.g. the peer is not registered) and says why.
    """

    peer: str
    session: bytes
    secret: bytes = b""
    candidates: list[str] = []
    role: str = "easy"
    peer_role: str = "easy"
    controlling: bool = False
    refused: str = ""
    mac: bytes = b""  # to a client with a rendezvous key: the secret is sealed and this MACs it all


class Punch(_Msg):
    """UDP, peer <-> peer: a punch packet (``kind``: see zbus/punch.py), authenticated by ``mac``."""

    frm: str
    to: str
    session: bytes
    kind: int
    txid: bytes
    mac: bytes


class LinkHello(_Msg):
    """Direct link, dialer -> listener's link ROUTER: I am ``id``; prove you are the Id I expect.

    ``data_token`` (16 random bytes) is the routing id of the dialer's data connection: the
    listener stamps ``id`` as the source of every Data that arrives from it (it accepts ``id`` only
    if a server lists it). ``nonce`` must come back in the :class:`LinkWelcome`.
    """

    id: str
    expected: str  # the Id the dialer means to reach; a listener with another Id refuses
    nonce: bytes
    data_token: bytes
    kind: str = ""  # "punched": dialed through a punched pipe (the listener labels its messages so)


class LinkWelcome(_Msg):
    """Listener -> dialer: the link is accepted; send Data to my data ROUTER at ``data_port``."""

    id: str
    nonce: bytes
    data_port: int


class LinkPing(_Msg):
    """Dialer -> listener on the link's control connection (also its keepalive)."""

    sent: float  # the dialer's clock; echoed back for the round-trip time


class LinkPong(_Msg):
    sent: float


class LinkBye(_Msg):
    """Dialer -> listener: this link is being closed (forget its data connection)."""


class RelayAcks(_Msg):
    """Delivery acks through a server, on the control connections (read by the engine, so a sender
    learns of them without calling ``recv``). Client -> server: ``acks`` = [(sender Id, upto)] for
    streams we received through that server. Server -> client: [(the acking receiver's Id, upto)],
    the Id stamped by the server from the connection, never taken from the client."""

    acks: list[tuple[str, int]]


RELAY_ACKS_MAX = 256  # acks in one RelayAcks: a client sends at most this many, a server reads no more


class Ack(_Msg):
    """Delivery layer (``zbus.delivery``): the receiver has delivered the stream's messages up to
    ``upto`` (a cumulative sequence number, epoch included). Travels on the link control connection,
    or tunnelled as a ``Data`` with ``seq`` = :data:`CONTROL_SEQ` whose payload is this header.
    """

    upto: int


class AckRequest(_Msg):
    """Delivery layer: the sender waits in ``send(..., ack=True)`` for ``upto``; acknowledge now
    (not at the next periodic ack). Travels like an :class:`Ack`, towards the receiver."""

    upto: int


class Request(_Msg):
    """Request/reply (``client.request``): ``data`` for the destination's request handler. Travels like
    an :class:`Ack` (unsequenced, on the current path); the requester repeats it with the same ``rid``
    until it gets the :class:`Reply` or gives up, and the responder runs its handler once per
    (requester, ``rid``), answering repeats from a cache of recent replies."""

    rid: int
    data: bytes


class Reply(_Msg):
    """The answer to the :class:`Request` ``rid``: the handler's ``data``, or ``error`` (non-empty: the
    handler raised, or the destination has no handler; ``data`` is then empty)."""

    rid: int
    data: bytes = b""
    error: str = ""


CONTROL_SEQ = -1  # Data.seq of a delivery-layer message (payload = an encoded Ack), never shown to users


Header = Union[
    Probe, Observed, PunchRequest, PunchGo, Punch, Hello, Heartbeat, Bye, Welcome, NetState, ServerTable, ClientDelta, Resync, Data, Error, StatusRequest, StatusReply,
    ClusterHello, ClusterWho, PeerStatus, MasterQuery, MasterReply, ServerListQuery, ServerList,
    ClusterStatusRequest, ClusterStatusReply,
    RaftPreVote, RaftPreVoteResp, RaftVote, RaftVoteResp, RaftAppend, RaftAppendResp, RaftHeartbeat,
    RaftHeartbeatResp, RaftTimeoutNow,
    LinkHello, LinkWelcome, LinkPing, LinkPong, LinkBye, Ack, AckRequest, Request, Reply, RelayAcks,
]

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Header)


def encode(header: Header) -> bytes:
    """Encode a header frame: version byte + msgpack."""
    return _VERSION_BYTE + _encoder.encode(header)


def decode(frame: bytes | memoryview) -> Header:
    """Decode a header frame; raise :class:`WireError` if it is not one we understand."""
    view = memoryview(frame)
    if len(view) == 0:
        raise WireError(DropReason.MALFORMED, "empty header frame")
    if view[0] != WIRE_VERSION:
        raise WireError(DropReason.BAD_VERSION, f"protocol version {view[0]}, we speak {WIRE_VERSION}")
    try:
        return _decoder.decode(view[1:])
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
        raise WireError(DropReason.UNDECODABLE, str(exc)) from None


def oversized(frames: list, max_frame: int) -> bool:
    """True if any frame is longer than ``max_frame`` bytes."""
    for frame in frames:
        if len(frame) > max_frame:
            return True
    return False


def status_to_json(reply: StatusReply) -> dict:
    """The ``zbus-node status --json`` shape (see ARCHITECTURE.md)."""
    return {
        "self": reply.self_id,
        "master": reply.master,
        "servers": [
            {"id": s.id, "name": s.name, "endpoint": s.endpoint, "role": s.role,
             "alive": s.alive, "clients": s.clients}
            for s in reply.servers
        ],
        "clients": [{"id": c.id, "name": c.name, "server": c.server} for c in reply.clients],
        "stats": msgspec.structs.asdict(reply.stats),  # by field name (the Struct itself encodes as an array)
        "cluster_stats": {server: msgspec.structs.asdict(st) for server, st in reply.cluster_stats.items()},
    }


_SEQ = struct.Struct(">BQ")

# Data on a direct link (client -> peer's link data ROUTER) needs no header: the link says who sends
# to whom. A message is its 8-byte big-endian sequence number followed by the payload: in one frame
# when the payload is 1 to LINK_INLINE_MAX bytes (one copy of a small payload is cheaper than a
# second frame), else as two frames [seq, payload] with the payload frame untouched (so a first
# frame of exactly 8 bytes means the two-frame form). Sequence
# number LINK_CONTROL_SEQ (0) carries an encoded delivery-layer header (an Ack) instead of user data.
LINK_SEQ = struct.Struct(">Q")
LINK_INLINE_MAX = 16 * 1024
LINK_CONTROL_SEQ = 0


def data_header_prefix(dst: str, src: str = "") -> bytes:
    """The encoded ``Data(dst, src, seq)`` header without its ``seq``: see :func:`data_header`."""
    encoded = encode(Data(dst, src, 0))
    return encoded[:-1]  # the trailing 0x00 is seq=0


def data_header(prefix: bytes, seq: int) -> bytes:
    """``encode(Data(dst, "", seq))`` for a non-negative ``seq``, built without msgspec (hot path).

    ``seq`` is always written as msgpack uint64 (0xcf + 8 bytes); any msgpack decoder accepts it.
    """
    return prefix + _SEQ.pack(0xCF, seq)
