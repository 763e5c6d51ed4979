"""The delivery layer, pure: per-destination sequence numbers, in-order exactly-once delivery, acks.

A message from A to B may travel by relay (through any of several servers) or by a direct link, and
the path can change mid-stream (a link comes up or goes down, a server dies). This layer makes that
invisible: B gets every message exactly once and in A's order.

* **Sender** (:class:`SendStream`, one per destination): numbers messages ``epoch << 32 | counter``
  (``counter`` from 1; ``epoch`` random per sender process and destination, so a restarted sender is
  a new stream) and *retains* them until a cumulative :class:`~zbus.wire.Ack` covers them. When the
  path to the destination changes, everything retained is sent again on the new path, ahead of new
  messages (:meth:`SendStream.switch`). If acks stop advancing for the retransmission timeout while
  something is retained -- busy or idle, link or relay: a connection that drops and reconnects under
  a live path loses what was in its pipe, silently -- the oldest retained messages are sent again,
  with exponential backoff (:meth:`SendStream.retransmit_due`). A repeat that a full pipe cuts short
  goes on from where it stopped at the next try (:meth:`SendStream.cut`, :meth:`SendStream.rest`),
  never again from the start (that used to resend everything retained every 50 ms into a full pipe).
  Retention is bounded (``max_msgs``, ``max_bytes``) and is the stream's **window**: a message is
  taken only while :meth:`SendStream.room` says so (the client's ``send`` waits for acks otherwise,
  then raises Backpressure), so every message sent stays repairable until acknowledged and one
  slow destination holds back only the streams to it.
* **Receiver** (:class:`Receiver`, one :class:`RecvStream` per source): delivers ``expected`` and
  whatever is buffered after it, drops duplicates, buffers messages that arrive early (bounded:
  past ``max_msgs``/``max_bytes`` an early message is dropped; the sender repairs it), and reports
  the cumulative ``upto`` to acknowledge (:meth:`Receiver.acks_due`; a duplicate arrival means
  the sender missed an ack, so the ack is due again). A gap that stays open longer
  than ``gap_timeout`` without progress is skipped and counted: that happens when a server
  refused a message on purpose (too big for it) and every repeat of it too, or when the sender's
  retention overflowed. ``gap_timeout`` is well above the sender's first repeat (RTO_MIN_RELAY
  plus an ack interval), so a message lost in flight is repaired, not skipped.

Acks are cumulative and carry the full sequence number (epoch included); a later
``send(..., ack=True)`` waits for ``acked >= seq`` of its message. Sequence number 0 means
"unsequenced" and is delivered as is.
"""

from __future__ import annotations

import collections
import random
from typing import Any, Hashable

COUNTER_BITS = 32
_COUNTER_MASK = (1 << COUNTER_BITS) - 1
DEFAULT_MAX_UNACKED = 16_384  # messages retained per destination
DEFAULT_MAX_UNACKED_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_REORDER = 16_384  # early messages buffered per source
DEFAULT_MAX_REORDER_BYTES = 64 * 1024 * 1024
GAP_TIMEOUT = 10.0  # seconds a stream may hold early messages without progress before skipping the gap
RTO_MIN = 1.0  # seconds without ack progress (link: acks every 50 ms) before the first retransmission
RTO_MIN_RELAY = 3.0  # the same through a relay (acks batched every 0.2 s, more hops to stall on)
RTO_MAX = 8.0
REPAIR_MSGS = 4096  # at most this many (oldest) retained messages per retransmission ...
REPAIR_BYTES = 4 * 1024 * 1024  # ... and this many bytes (at least one message)


_NO_END = 1 << 64  # above every sequence number


def epoch_of(seq: int) -> int:
    return seq >> COUNTER_BITS


class SendStream:
    """One destination's outgoing stream. Owned by whoever holds the client's send lock."""

    __slots__ = ("epoch", "next_seq", "retained", "retained_bytes", "acked", "path", "max_msgs",
                 "max_bytes", "resent", "window_waits", "resend_from", "resend_to", "_stall_acked", "_stall_since", "_rto")

    def __init__(self, epoch: int, max_msgs: int = DEFAULT_MAX_UNACKED,
                 max_bytes: int = DEFAULT_MAX_UNACKED_BYTES) -> None:
        self.epoch = epoch
        self.next_seq = (epoch << COUNTER_BITS) | 1
        self.retained: collections.deque[tuple[int, Any, int]] = collections.deque()  # (seq, payload, size)
        self.retained_bytes = 0
        self.acked = epoch << COUNTER_BITS  # everything up to this is acknowledged
        self.path: Hashable | None = None  # the path the last message went by
        self.max_msgs = max_msgs
        self.max_bytes = max_bytes
        self.resent = 0
        self.window_waits = 0  # sends that found the window full and waited for acks
        # A repeat (after a path change, or a retransmission) cut short by a full pipe: it goes on from
        # resend_from (0: none) up to resend_to, on the next try.
        self.resend_from = 0
        self.resend_to = _NO_END
        self._stall_acked = -1  # the ack level the stall clock watches
        self._stall_since: float | None = None  # since when acks have not advanced (None: not watching)
        self._rto = 0.0  # 0: the path's minimum

    def room(self, size: int) -> bool:
        """May a message of ``size`` bytes be taken now (the window has room; one always fits alone)?"""
        return not self.retained or (len(self.retained) < self.max_msgs and self.retained_bytes + size <= self.max_bytes)

    def push(self, payload: Any, size: int) -> int:
        """Number a new message and retain it; return its sequence number. The caller asked
        :meth:`room` first (the window is not enforced here)."""
        seq = self.next_seq
        self.next_seq = seq + 1
        if not (seq + 1) & _COUNTER_MASK:  # counter exhausted: continue as a new epoch
            self.epoch = (self.epoch + 1) & 0x7FFF_FFFF or 1
            self.next_seq = (self.epoch << COUNTER_BITS) | 1
        self.retained.append((seq, payload, size))
        self.retained_bytes += size
        return seq

    def unpush(self, seq: int) -> None:
        """Take back the message just pushed (its send failed before any byte left)."""
        if self.retained and self.retained[-1][0] == seq:
            self.retained_bytes -= self.retained.pop()[2]
            self.next_seq = seq

    def ack(self, upto: int) -> None:
        """The receiver delivered everything up to ``upto``: release it."""
        if epoch_of(upto) not in (self.epoch, epoch_of(self.acked)):
            return  # for an earlier sender process's stream
        if upto <= self.acked:
            return
        self.acked = upto
        self._rto = 0.0
        retained = self.retained
        while retained and retained[0][0] <= upto:
            self.retained_bytes -= retained.popleft()[2]

    def switch(self, path: Hashable) -> list[tuple[int, Any, int]]:
        """The next message goes by ``path``: what must be sent again first (empty if no change)."""
        if path == self.path:
            return []
        first = self.path is None
        self.path = path
        self.resend_from, self.resend_to = 0, _NO_END
        if first or not self.retained:
            return []
        self.resent += len(self.retained)
        return list(self.retained)

    def repeat_all(self, path: Hashable) -> list[tuple[int, Any, int]]:
        """Everything retained goes again, on ``path`` (the previous path lost it all)."""
        self.path = path
        self.resend_from, self.resend_to = 0, _NO_END
        self.resent += len(self.retained)
        return list(self.retained)

    def cut(self, seq: int, batch: list[tuple[int, Any, int]]) -> None:
        """A full pipe stopped ``batch`` (a repeat) at ``seq``: the rest of it goes on the next try."""
        self.resend_from, self.resend_to = seq, batch[-1][0]

    def rest(self) -> list[tuple[int, Any, int]]:
        """What a repeat cut short by a full pipe (:meth:`cut`) has still to send, oldest first."""
        start, end = self.resend_from, self.resend_to
        if not start:
            return []
        self.resend_from, self.resend_to = 0, _NO_END
        return [entry for entry in self.retained if start <= entry[0] <= end]

    def retransmit_due(self, now: float, rto_min: float = RTO_MIN) -> list[tuple[int, Any, int]]:
        """Called on a timer: the oldest retained messages (at most REPAIR_MSGS / REPAIR_BYTES) to send
        again when acks have not advanced for the retransmission timeout (at least ``rto_min``; it
        doubles on every repeat without progress, up to RTO_MAX, and starts over on progress)."""
        if not self.retained:
            self._stall_since = None
            return []
        if self._stall_since is None or self.acked != self._stall_acked:
            self._stall_acked, self._stall_since = self.acked, now
            return []
        rto = max(self._rto, rto_min)
        if now - self._stall_since < rto:
            return []
        self._stall_since = now
        self._rto = min(rto * 2, RTO_MAX)
        batch, size = [], 0
        for entry in self.retained:
            if batch and (len(batch) >= REPAIR_MSGS or size + entry[2] > REPAIR_BYTES):
                break
            batch.append(entry)
            size += entry[2]
        self.resent += len(batch)
        return batch


class Sender:
    """Every outgoing stream of a client, by destination."""

    def __init__(self, rng: random.Random, max_msgs: int = DEFAULT_MAX_UNACKED,
                 max_bytes: int = DEFAULT_MAX_UNACKED_BYTES) -> None:
        self._rng = rng
        self.max_msgs = max_msgs
        self.max_bytes = max_bytes
        self.streams: dict[str, SendStream] = {}

    def stream(self, dst: str) -> SendStream:
        stream = self.streams.get(dst)
        if stream is None:
            stream = self.streams[dst] = SendStream(self._rng.randrange(1, 1 << 31), self.max_msgs, self.max_bytes)
        return stream


class RecvStream:
    __slots__ = ("epoch", "expected", "early", "early_bytes", "gap_since", "retired", "acked_sent")

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.expected = (epoch << COUNTER_BITS) | 1
        self.early: dict[int, tuple[Any, int]] = {}  # seq -> (payload, size), all > expected
        self.early_bytes = 0
        self.gap_since: float | None = None
        self.retired: tuple[int, ...] = ()  # earlier epochs of this source: their messages are stale
        self.acked_sent = 0  # the last upto we acknowledged


class Receiver:
    """Every incoming stream of a client, by source. Owned by whoever holds the receive lock."""

    def __init__(self, max_msgs: int = DEFAULT_MAX_REORDER, max_bytes: int = DEFAULT_MAX_REORDER_BYTES,
                 gap_timeout: float = GAP_TIMEOUT) -> None:
        self.max_msgs = max_msgs
        self.max_bytes = max_bytes
        self.gap_timeout = gap_timeout
        self.streams: dict[str, RecvStream] = {}
        self.duplicates = 0
        self.overflow = 0  # early messages dropped because the reorder buffer was full
        self.skipped = 0  # messages given up on after gap_timeout
        self.gapped = False  # some stream holds early messages (skip_gaps has work)

    def accept(self, src: str, seq: int, payload: Any, size: int) -> list[Any]:
        """One arrival: the payloads now deliverable, in order (often just this one, or none)."""
        stream = self.streams.get(src)
        if stream is None or stream.epoch != seq >> COUNTER_BITS:
            if seq <= 0:
                return [payload]  # unsequenced
            stream = self._new_epoch(src, stream, seq >> COUNTER_BITS)
            if stream is None:
                self.duplicates += 1  # a straggler from a stream the source has since restarted
                return []
        expected = stream.expected
        if seq == expected:
            stream.expected = expected + 1
            if not stream.early:
                return [payload]
            return [payload, *self._drain(stream)]
        if seq < expected or seq in stream.early:
            self.duplicates += 1
            stream.acked_sent = 0  # a repeat means the sender missed our ack: send it again
            return []
        if len(stream.early) >= self.max_msgs or stream.early_bytes + size > self.max_bytes:
            self.overflow += 1
            return []
        stream.early[seq] = (payload, size)
        stream.early_bytes += size
        self.gapped = True
        return []

    def _new_epoch(self, src: str, old: RecvStream | None, epoch: int) -> RecvStream | None:
        if old is not None:
            if epoch in old.retired:
                return None
            retired = (old.retired + (old.epoch,))[-8:]
        else:
            retired = ()
        stream = self.streams[src] = RecvStream(epoch)
        stream.retired = retired
        return stream

    @staticmethod
    def _drain(stream: RecvStream) -> list[Any]:
        out = []
        early = stream.early
        expected = stream.expected
        while expected in early:
            payload, size = early.pop(expected)
            stream.early_bytes -= size
            out.append(payload)
            expected += 1
        stream.expected = expected
        stream.gap_since = None  # progress: the gap clock starts again
        return out

    def skip_gaps(self, now: float) -> list[tuple[str, list[Any]]]:
        """Give up on gaps open longer than ``gap_timeout``: (source, payloads now deliverable)."""
        out = []
        self.gapped = False
        for src, stream in list(self.streams.items()):
            if not stream.early:
                continue
            self.gapped = True
            if stream.gap_since is None:
                stream.gap_since = now
            elif now - stream.gap_since >= self.gap_timeout:
                first = min(stream.early)
                self.skipped += first - stream.expected
                stream.expected = first
                stream.gap_since = None
                out.append((src, self._drain(stream)))
        return out

    def acks_due(self) -> list[tuple[str, int]]:
        """(source, upto) for every stream that delivered more since its last ack."""
        due = []
        for src, stream in list(self.streams.items()):
            upto = stream.expected - 1
            # "Nothing yet" (counter 0) is acked too while later messages wait: the sender learns
            # that we hear it, so it repairs a hole at the very start of its stream.
            if upto != stream.acked_sent and (upto & _COUNTER_MASK or stream.early):
                stream.acked_sent = upto
                due.append((src, upto))
        return due

    def ack_again(self, src: str) -> None:
        """An ack that :meth:`acks_due` gave could not be sent: give it again next time."""
        stream = self.streams.get(src)
        if stream is not None:
            stream.acked_sent = 0
