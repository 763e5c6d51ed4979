"""zbus: a message bus addressed by Id.

    import zbus
    with zbus.Client(name="worker-1") as c:
        c.send(peer_id, b"hello")
        msg = c.recv(timeout=5.0)
"""

from .client import AsyncClient, Client, ClientStatus, Message, Peer
from .config import ClientConfig, ServerConfig, load_client_config, load_server_config
from .errors import (
    Backpressure,
    ConfigError,
    Disconnected,
    IdInUse,
    ProtocolError,
    Refused,
    RemoteError,
    Unreachable,
    ZbusError,
)
from .server import Server

__all__ = [
    "AsyncClient", "Client", "ClientStatus", "Message", "Peer", "Server",
    "ClientConfig", "ServerConfig", "load_client_config", "load_server_config",
    "ZbusError", "Unreachable", "Disconnected", "ConfigError", "ProtocolError", "IdInUse", "Refused",
    "Backpressure", "RemoteError",
]
__version__ = "0.1.0"
