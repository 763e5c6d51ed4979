"""Limits against hostile input, pure (no sockets, no clock): what a server accepts, and how often.

* :class:`Limits` holds the bounds a server enforces (from the ``[server]`` config table).
* :class:`RateLimiter` is a token bucket per connection (keyed by routing id) with a bounded
  number of buckets, so neither a flood from one connection nor a crowd of connections makes the
  server do unbounded work or hold unbounded state.

See docs/security.md for the threat model these serve.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_CLIENTS = 10_000
DEFAULT_MAX_NAME_BYTES = 256
DEFAULT_MAX_HEADER = 4096
DEFAULT_CONTROL_RATE = 50.0
DEFAULT_CONTROL_BURST = 100
DEFAULT_MAX_TRACKED = 65_536


@dataclass(frozen=True)
class Limits:
    """The bounds a server enforces on what its connections send."""

    max_clients: int = DEFAULT_MAX_CLIENTS  # registered clients; further Hellos are refused ("server-full")
    max_name_bytes: int = DEFAULT_MAX_NAME_BYTES  # a client's name, UTF-8 bytes
    max_header: int = DEFAULT_MAX_HEADER  # a header frame (so also one client-list entry), bytes
    control_rate: float = DEFAULT_CONTROL_RATE  # control messages per second per connection, sustained
    control_burst: int = DEFAULT_CONTROL_BURST  # ...and in one burst
    max_tracked: int = DEFAULT_MAX_TRACKED  # connections whose rate buckets are remembered at once
    max_frame: int = 0  # the largest frame relayed (told to clients in Welcome; 0: not told)


class RateLimiter:
    """A token bucket per key: ``burst`` tokens, refilled at ``rate`` per second, one per message.

    At most ``max_keys`` buckets are held; a new key past that evicts the oldest one (which then
    starts again from a full bucket: lenient to it, but memory stays bounded). :meth:`sweep` forgets
    buckets that have refilled, since a full bucket behaves exactly like a new one.
    """

    def __init__(self, rate: float, burst: int, max_keys: int = DEFAULT_MAX_TRACKED) -> None:
        if rate <= 0 or burst < 1 or max_keys < 1:
            raise ValueError(f"rate {rate} must be > 0, burst {burst} and max_keys {max_keys} >= 1")
        self.rate = rate
        self.burst = float(burst)
        self.max_keys = max_keys
        self._buckets: dict[bytes, list[float]] = {}  # key -> [tokens, time of last update]

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, key: bytes, now: float) -> bool:
        """Take one token from ``key``'s bucket; False (take nothing) if it is empty."""
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                del self._buckets[next(iter(self._buckets))]  # the oldest inserted
            self._buckets[key] = [self.burst - 1.0, now]
            return True
        tokens = bucket[0] + max(0.0, now - bucket[1]) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return True
        bucket[0] = tokens
        return False

    def sweep(self, now: float) -> None:
        """Forget every bucket that is full again by ``now``."""
        self._buckets = {
            key: bucket for key, bucket in self._buckets.items()
            if bucket[0] + (now - bucket[1]) * self.rate < self.burst
        }
