"""The pure parts of backpressure and request/reply: the wire structs, the send_timeout key, taking a
message back after Backpressure, and the responder's reply cache (bounded, once per request)."""

from __future__ import annotations

import random

import pytest

from zbus import ConfigError, load_client_config, wire
from zbus.dataplane import REQUESTS_QUEUED_MAX, SERVED_MAX, DataPlane, _Call
from zbus.delivery import SendStream


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    monkeypatch.delenv("ZBUS_SERVERS", raising=False)
    monkeypatch.delenv("ZBUS_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)


def test_request_and_reply_round_trip_on_the_wire():
    for message in (wire.Request(1, b""), wire.Request(2**62, b"x" * 100_000), wire.Reply(7),
                    wire.Reply(8, b"data"), wire.Reply(9, b"", "the request handler raised KeyError: 'a'")):
        assert wire.decode(wire.encode(message)) == message


def test_send_timeout_key(tmp_path):
    assert load_client_config().send_timeout == 10.0
    assert load_client_config(send_timeout=0).send_timeout == 0.0
    path = tmp_path / "zbus.toml"
    path.write_text('[client]\nsend_timeout = -1\n')
    with pytest.raises(ConfigError, match=r"client.send_timeout \(in .*zbus.toml\): -1.0, expected a number of seconds >= 0"):
        load_client_config(path)
    path.write_text('[client]\nsend_timeout = "soon"\n')
    with pytest.raises(ConfigError, match="send_timeout"):
        load_client_config(path)


def test_a_message_given_back_leaves_no_trace_in_its_stream():
    stream = SendStream(5)
    first = stream.push(b"a", 1)
    call = _Call(stream)
    call.seq = stream.push(b"b", 1)
    DataPlane._give_back(call)
    assert [seq for seq, _, _ in stream.retained] == [first] and stream.retained_bytes == 1
    assert stream.push(b"c", 1) == first + 1  # the next message takes the number back: no gap
    sent = _Call(stream)
    sent.seq, sent.transmitted = stream.push(b"d", 1), True
    DataPlane._give_back(sent)  # some of it left: it stays (and is repaired like any other)
    assert len(stream.retained) == 3


class Responder(DataPlane):
    """Just the request/reply state of a client, with the socket side recorded instead of sent."""

    def __init__(self, handler=None) -> None:
        import collections
        import threading
        self.id, self._handler, self._max_frame = "C-responder", handler, 1 << 20
        self._serve_lock = threading.Lock()
        self._requests_in = collections.deque()
        self._served = collections.OrderedDict()
        self._served_bytes = 0
        self.tunnelled: list[tuple[str, wire.Reply]] = []
        self.dropped: dict[str, int] = {}
        self.woken = 0

    def _tunnel(self, dst, header, wait=0.0):
        self.tunnelled.append((dst, wire.decode(header)))
        return True

    def _wake_server(self):
        self.woken += 1

    def serve_all(self) -> None:
        while (item := self._take_request()) is not None:
            src, rid, data = item
            try:
                result, error = self._handler(src, data), ""
            except Exception as exc:
                result, error = None, f"{type(exc).__name__}: {exc}"
            self._finish_request(src, rid, result, error)


def test_repeats_of_a_request_run_the_handler_once_and_get_the_same_reply():
    calls = []
    responder = Responder(lambda src, data: calls.append(data) or data * 2)
    responder._on_request("C-a", wire.Request(1, b"x"))
    responder._on_request("C-a", wire.Request(1, b"x"))  # repeated while queued: ignored
    responder.serve_all()
    responder._on_request("C-a", wire.Request(1, b"x"))  # repeated after: answered from the cache
    responder._on_request("C-b", wire.Request(1, b"y"))  # another requester's rid 1 is another request
    responder.serve_all()
    assert calls == [b"x", b"y"]
    assert responder.tunnelled == [("C-a", wire.Reply(1, b"xx")), ("C-a", wire.Reply(1, b"xx")),
                                   ("C-b", wire.Reply(1, b"yy"))]


def test_no_handler_answers_at_once_and_bad_results_are_errors():
    responder = Responder()
    responder._on_request("C-a", wire.Request(3, b"x"))
    assert responder.tunnelled[0][1].error.startswith("no request handler")
    responder._handler = lambda src, data: 42
    responder._on_request("C-a", wire.Request(4, b"x"))
    responder.serve_all()
    assert responder.tunnelled[1] == ("C-a", wire.Reply(4, b"", "the request handler returned int, expected bytes"))


def test_the_queue_and_the_reply_cache_are_bounded():
    responder = Responder(lambda src, data: data)
    for rid in range(REQUESTS_QUEUED_MAX + 10):
        responder._on_request("C-a", wire.Request(rid, b""))
    assert len(responder._requests_in) == REQUESTS_QUEUED_MAX and responder.dropped == {"congested": 10}
    responder.serve_all()
    rng = random.Random(1)
    for _ in range(SERVED_MAX + 100):
        responder._on_request("C-b", wire.Request(rng.getrandbits(62), b"z"))
        responder.serve_all()
    assert len(responder._served) == SERVED_MAX
    assert responder._served_bytes == sum(len(reply) for reply in responder._served.values())
