"""Node Ids: ``S-<uuid4>`` for servers, ``C-<uuid4>`` for clients."""

from __future__ import annotations

import os
import uuid

SERVER_PREFIX = "S-"
CLIENT_PREFIX = "C-"


def new_server_id() -> str:
    return SERVER_PREFIX + str(uuid.uuid4())


def new_client_id() -> str:
    return CLIENT_PREFIX + str(uuid.uuid4())


def _is_id(value: str, prefix: str) -> bool:
    if not isinstance(value, str) or not value.startswith(prefix):
        return False
    try:
        uuid.UUID(value[len(prefix):])
    except ValueError:
        return False
    return True


def is_server_id(value: str) -> bool:
    return _is_id(value, SERVER_PREFIX)


def is_client_id(value: str) -> bool:
    return _is_id(value, CLIENT_PREFIX)


def new_token(size: int = 16) -> bytes:
    """A random ZMQ routing id: never a leading zero byte (libzmq reserves those for its own)."""
    token = os.urandom(size)
    return bytes([token[0] | 1]) + token[1:]
