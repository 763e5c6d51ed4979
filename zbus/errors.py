"""The exceptions zbus raises. Every one derives from :class:`ZbusError`."""

from __future__ import annotations


class ZbusError(Exception):
    """Base class of every zbus error."""


class Unreachable(ZbusError):
    """No path to the destination: no direct link, and no connected server lists it."""


class Disconnected(ZbusError):
    """The client has no live server connection right now; it reconnects by itself."""


class Backpressure(ZbusError):
    """``send`` found no room on the path to the destination within its ``timeout``: the receiver
    (or a server on the way) does not keep up. Nothing of that message was sent; retrying later is safe."""


class RemoteError(ZbusError):
    """``request``: the destination's request handler raised (the message names the exception and
    its text), returned something other than bytes, or the destination has no handler."""


class ConfigError(ZbusError, ValueError):
    """A configuration value is wrong. The message names the file, the key and the expected form."""


class ProtocolError(ZbusError):
    """A peer broke the wire protocol, or refused us for a protocol reason."""


class Refused(ProtocolError):
    """A peer refused us: a server refused our Hello (Id in use, or not the Id our key is bound to), or
    its security refused our key (not in its trust list). The message says why."""


class IdInUse(Refused):
    """A server refused to register this client: another live connection already holds its Id."""
