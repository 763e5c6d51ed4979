"""The delivery layer: whatever the paths do (lose, duplicate, reorder, switch), the receiver gets
every message exactly once and in order, as long as retention covers what is in flight."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from zbus.delivery import COUNTER_BITS, Receiver, Sender, SendStream


def test_in_order_messages_are_delivered_at_once():
    sender, receiver = Sender(random.Random(1)), Receiver()
    stream = sender.stream("B")
    got = []
    for i in range(5):
        seq = stream.push(b"%d" % i, 1)
        got += receiver.accept("A", seq, b"%d" % i, 1)
    assert got == [b"0", b"1", b"2", b"3", b"4"]
    assert receiver.acks_due() == [("A", (stream.epoch << COUNTER_BITS) | 5)]
    assert receiver.acks_due() == []


def test_early_messages_wait_for_the_gap_and_duplicates_are_dropped():
    stream, receiver = SendStream(7), Receiver()
    seqs = [stream.push(i, 1) for i in range(4)]
    assert receiver.accept("A", seqs[2], 2, 1) == []
    assert receiver.accept("A", seqs[1], 1, 1) == []
    assert receiver.accept("A", seqs[0], 0, 1) == [0, 1, 2]
    assert receiver.accept("A", seqs[1], 1, 1) == []
    assert receiver.accept("A", seqs[3], 3, 1) == [3]
    assert receiver.duplicates == 1


def test_acks_release_retention_and_a_path_switch_resends_the_rest():
    stream = SendStream(3)
    seqs = [stream.push(i, 10) for i in range(5)]
    assert stream.switch("relay-0") == []  # the first path: nothing to repeat
    stream.ack(seqs[1])
    assert [m[1] for m in stream.retained] == [2, 3, 4] and stream.retained_bytes == 30
    assert [m[1] for m in stream.switch("direct")] == [2, 3, 4]
    assert stream.switch("direct") == []


def test_the_window_is_the_retention_bound_and_acks_reopen_it():
    stream = SendStream(3, max_msgs=3, max_bytes=1000)
    seqs = []
    while stream.room(1) and len(seqs) < 10:
        seqs.append(stream.push(len(seqs), 1))
    assert len(seqs) == 3 and not stream.room(1)  # full at max_msgs: nothing was given up
    stream.ack(seqs[0])
    assert stream.room(1) and [m[1] for m in stream.retained] == [1, 2]
    big = SendStream(3, max_msgs=100, max_bytes=25)
    assert big.room(1000)  # an empty window takes one message of any size
    big.push(0, 10)
    big.push(1, 10)
    assert big.room(5) and not big.room(6)  # bytes: 20 + 6 > 25


def test_an_idle_unacknowledged_stream_is_retransmitted_with_backoff():
    stream = SendStream(3)
    stream.push(b"x", 1)
    assert stream.retransmit_due(0.0) == []
    assert stream.retransmit_due(0.5) == []
    assert [m[1] for m in stream.retransmit_due(1.0)] == [b"x"]
    assert stream.retransmit_due(2.5) == []  # backoff doubled to 2 s
    assert [m[1] for m in stream.retransmit_due(3.0)] == [b"x"]


def test_a_restarted_sender_is_a_new_stream_and_its_old_stragglers_are_dropped():
    receiver = Receiver()
    old, new = SendStream(5), SendStream(9)
    a = [old.push(i, 1) for i in range(3)]
    assert receiver.accept("A", a[0], "old0", 1) == ["old0"]
    assert receiver.accept("A", new.push("new0", 1), "new0", 1) == ["new0"]
    assert receiver.accept("A", a[1], "old1", 1) == []


def test_a_gap_the_sender_can_no_longer_fill_is_skipped_after_the_timeout():
    stream, receiver = SendStream(3), Receiver(gap_timeout=5.0)
    seqs = [stream.push(i, 1) for i in range(3)]
    assert receiver.accept("A", seqs[0], 0, 1) == [0]
    assert receiver.accept("A", seqs[2], 2, 1) == []
    assert receiver.skip_gaps(0.0) == []
    assert receiver.skip_gaps(5.0) == [("A", [2])]
    assert receiver.skipped == 1


def test_reorder_buffer_is_bounded():
    stream, receiver = SendStream(3), Receiver(max_msgs=2)
    seqs = [stream.push(i, 1) for i in range(5)]
    for seq in seqs[1:]:
        receiver.accept("A", seq, seq, 1)
    assert receiver.overflow == 2
    assert receiver.accept("A", seqs[0], seqs[0], 1) == seqs[:3]


# -- property: an adversarial network -------------------------------------------------------------

events = st.lists(
    st.one_of(
        st.tuples(st.just("send"), st.integers(1, 5)),
        st.tuples(st.just("deliver"), st.integers(0, 50), st.booleans()),  # pick a packet; keep a copy?
        st.tuples(st.just("lose"), st.integers(0, 50)),
        st.tuples(st.just("switch"), st.integers(0, 3)),  # the path changes (paths may lose their queue)
        st.tuples(st.just("ack"), st.booleans()),  # an ack travels back (or is lost)
        st.tuples(st.just("tick"), st.floats(0.0, 3.0)),
    ),
    max_size=200,
)


@settings(max_examples=300, deadline=None)
@given(events, st.integers(0, 2**31))
def test_any_loss_duplication_reordering_and_path_switching_delivers_exactly_once_in_order(script, seed):
    rng = random.Random(seed)
    sender, receiver = Sender(rng), Receiver()
    stream = sender.stream("B")
    in_flight: list[tuple[int, int]] = []
    delivered: list[int] = []
    sent = 0
    now = 0.0

    def transmit(batch):
        in_flight.extend((seq, payload) for seq, payload, _ in batch)

    def path_send(payload: int, path: int) -> None:
        transmit(stream.switch(path))
        in_flight.append((stream.push(payload, 1), payload))

    path = 0
    for event in script:
        kind = event[0]
        if kind == "send":
            for _ in range(event[1]):
                path_send(sent, path)
                sent += 1
        elif kind == "deliver" and in_flight:
            seq, payload = in_flight[event[1] % len(in_flight)]
            if not event[2]:
                in_flight.remove((seq, payload))
            delivered += receiver.accept("A", seq, payload, 1)
        elif kind == "lose" and in_flight:
            in_flight.pop(event[1] % len(in_flight))
        elif kind == "switch":
            path = event[1]
            if rng.random() < 0.5:
                in_flight.clear()  # the old path died with everything inside it
        elif kind == "ack":
            for _, upto in receiver.acks_due():
                if event[1]:
                    stream.ack(upto)
        elif kind == "tick":
            now += event[1]
            transmit(stream.retransmit_due(now))
    # Then the network heals: everything in flight arrives, acks flow, timers fire until quiet.
    for _ in range(100):
        while in_flight:
            seq, payload = in_flight.pop(rng.randrange(len(in_flight)))
            delivered += receiver.accept("A", seq, payload, 1)
        for _, upto in receiver.acks_due():
            stream.ack(upto)
        if not stream.retained:
            break
        now += 10.0
        transmit(stream.retransmit_due(now))
    assert delivered == list(range(sent))
    assert not stream.retained


def test_a_busy_stream_whose_acks_stall_repeats_its_oldest_messages_bounded():
    from zbus.delivery import REPAIR_MSGS, RTO_MIN_RELAY
    stream, receiver = SendStream(3), Receiver()
    seqs = [stream.push(i, 1) for i in range(REPAIR_MSGS + 2000)]
    lost = set(seqs[100:150])  # a connection dropped and reconnected: its pipe is gone, the path stays
    for seq in seqs:
        if seq not in lost:
            receiver.accept("A", seq, None, 1)
    [(_, upto)] = receiver.acks_due()
    stream.ack(upto)
    assert stream.retransmit_due(0.0, RTO_MIN_RELAY) == []  # the stall clock starts
    for i in range(1, 5):  # more messages keep going (busy), acks stay where the gap is
        stream.push(REPAIR_MSGS + 2000 + i, 1)
        assert stream.retransmit_due(i * 0.5, RTO_MIN_RELAY) == []
    repaired = stream.retransmit_due(RTO_MIN_RELAY, RTO_MIN_RELAY)
    assert len(repaired) == REPAIR_MSGS and repaired[0][0] == min(lost)
    for seq, payload, size in repaired:
        receiver.accept("A", seq, payload, size)
    [(_, upto)] = receiver.acks_due()
    assert upto == seqs[-1] and receiver.skipped == 0  # repaired well before the receiver's gap timeout
    stream.ack(upto)
    assert [m[1] for m in stream.retained] == [REPAIR_MSGS + 2000 + i for i in range(1, 5)]


def test_repeats_without_progress_back_off_and_progress_starts_the_clock_over():
    stream = SendStream(3)
    for i in range(3):
        stream.push(b"%d" % i, 1)
    stream.retransmit_due(0.0, 3.0)
    assert stream.retransmit_due(2.9, 3.0) == [] and len(stream.retransmit_due(3.0, 3.0)) == 3
    assert stream.retransmit_due(8.9, 3.0) == [] and len(stream.retransmit_due(9.0, 3.0)) == 3  # 6 s
    stream.ack(stream.retained[0][0])
    assert stream.retransmit_due(9.5, 3.0) == []  # progress: the clock starts over at the minimum
    assert stream.retransmit_due(12.4, 3.0) == [] and len(stream.retransmit_due(12.5, 3.0)) == 2


def test_a_hole_at_the_very_start_is_acked_as_nothing_yet_so_the_sender_repairs_it():
    stream, receiver = SendStream(3), Receiver()
    seqs = [stream.push(i, 1) for i in range(10)]
    for i, seq in enumerate(seqs[3:], 3):  # the first three were lost (dropped before the receiver's
        assert receiver.accept("A", seq, i, 1) == []  # data connection was up): the rest waits
    [(_, upto)] = receiver.acks_due()
    assert upto == stream.acked
    stream.ack(upto)
    assert receiver.acks_due() == []  # once, not on every upkeep
    stream.retransmit_due(0.0, 3.0)
    repaired = stream.retransmit_due(3.0, 3.0)
    delivered = [p for seq, p, size in repaired for p in receiver.accept("A", seq, p, size)]
    assert delivered == list(range(10))


def test_a_repeat_cut_short_by_a_full_pipe_goes_on_from_where_it_stopped_and_no_further():
    stream = SendStream(3)
    seqs = [stream.push(i, 1) for i in range(10)]
    stream.switch("relay-0")
    batch = stream.retransmit_due(0.0, 1.0) or stream.retransmit_due(1.0, 1.0)
    assert [m[1] for m in batch] == list(range(10))
    stream.cut(seqs[4], batch[:7])  # the pipe took 0..3 of a repeat of 0..6
    stream.ack(seqs[1])
    assert [m[1] for m in stream.rest()] == [4, 5, 6]  # not again from the start, not past the repeat
    assert stream.rest() == [] and stream.resend_from == 0
    stream.cut(seqs[5], batch)
    assert [m[1] for m in stream.switch("direct")] == list(range(2, 10))  # a new path takes everything
    assert stream.resend_from == 0
