"""The GPU server against hostile peers (gpu/capacity.py, gpu/zmq_server.py, gpu/service.py):
real `teesplit serve` processes and raw ZeroMQ sockets. Sessions answer only the identity that
opened them; one client cannot take every session slot or all the KV memory; replies nobody
reads, frames over the limit and messages of a million frames cost bounded memory and time.
Memory is the server's resident set (/proc), with bounds generous enough for a loaded machine."""

from __future__ import annotations

import threading
import time

import msgpack
import numpy as np
import pytest
import zmq
from helpers import make_checkpoint, rss
from peer import Peer

from teesplit.gpu.capacity import MIN_MESSAGE_BYTES, UnreadReplies, default_max_message_bytes
from teesplit.launch import free_tcp_address, start_server, stop_server
from teesplit.protocol import PROTOCOL_VERSION, RemoteError, request
from teesplit.tee.client import GPUClient
from teesplit.transport.zmq import ZmqTransport

CPU = ["--device", "cpu", "--dtype", "float32", "--threads", "1"]
MIB = 1 << 20
H, HKV, D = 4, 2, 16  # the random checkpoint (tests/helpers.py BASE)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("capacity"), "llama")


@pytest.fixture(scope="module")
def server(ckpt):
    address = free_tcp_address()
    proc = start_server(ckpt, address, [*CPU, "--max-sessions", "8", "--max-sessions-per-client", "3"])
    yield {"address": address, "proc": proc}
    stop_server(proc)


def _error(peer: Peer, op: str, args=None, tensors=(), sid=None) -> RemoteError:
    with pytest.raises(RemoteError) as e:
        peer.call(op, args, tensors, sid)
    return e.value


# ---- 1. sessions belong to their opener ------------------------------------------------------------
@pytest.mark.slow
def test_a_session_answers_only_the_connection_that_opened_it(server):
    owner = GPUClient(ZmqTransport(server["address"], timeout_s=30))
    stranger = Peer(server["address"])
    try:
        sid = owner.open_session(1, 16)
        p = np.full((1, H, 1, 1), 1.0, np.float32)
        stolen = _error(stranger, "CloseSession", sid=sid)
        unknown = _error(stranger, "CloseSession", sid=sid ^ 1)
        assert stolen.code == unknown.code == "no_session"
        # exactly the answer an unknown id gets: nothing says the id exists
        same = unknown.remote_message.replace(str(sid ^ 1), "N")
        assert stolen.remote_message.replace(str(sid), "N") == same
        assert _error(stranger, "AttnOut", {"layer": 0}, [p], sid).code == "no_session"
        # The owner reconnects (a retry does: same routing id, new socket) and goes on.
        owner.transport.reconnect()
        owner.close_session(sid)
    finally:
        owner.close()
        stranger.close()


@pytest.mark.slow
def test_sessions_belong_to_the_curve_key_not_the_routing_id(ckpt, tmp_path):
    """With CURVE the identity is the runner's key: another allowed key gets no_session even
    when it connects under the owner's own routing id."""
    from teesplit.transport.curve import CurveClient, generate_keys

    allow = tmp_path / "allow"
    generate_keys(tmp_path, "server")
    for name in ("alice", "bob"):
        generate_keys(allow, name)
    address = free_tcp_address()
    alice = CurveClient.from_files(allow / "alice.key_secret", tmp_path / "server.key")
    bob = CurveClient.from_files(allow / "bob.key_secret", tmp_path / "server.key")
    secret = ["--curve-secret", str(tmp_path / "server.key_secret"), "--allow-keys", str(allow)]
    proc = start_server(ckpt, address, [*CPU, *secret], curve=alice)
    a = GPUClient(ZmqTransport(address, timeout_s=30, curve=alice))
    try:
        sid = a.open_session(1, 16)
        b_transport = ZmqTransport(address, timeout_s=30, curve=bob)
        b_transport.routing_id = a.transport.routing_id  # even the owner's routing id does not help
        b_transport.reconnect()
        b = GPUClient(b_transport)
        with pytest.raises(RemoteError) as e:
            b.close_session(sid)
        assert e.value.code == "no_session"
        b.close()
        a.transport.reconnect()  # Bob's connection took Alice's routing id over: take it back
        a.close_session(sid)
    finally:
        a.close()
        stop_server(proc)


# ---- 2. fair capacity ----------------------------------------------------------------------------------
def test_one_client_cannot_take_every_session_slot(server):
    greedy, other = Peer(server["address"]), Peer(server["address"])
    try:
        sids = [greedy.call("OpenSession", {"batch": 1, "max_tokens": 8})[0]["res"]["sid"] for _ in range(3)]
        e = _error(greedy, "OpenSession", {"batch": 1, "max_tokens": 8})
        assert e.code == "too_large" and "--max-sessions-per-client" in str(e)
        other_sid = other.call("OpenSession", {"batch": 1, "max_tokens": 8})[0]["res"]["sid"]
        for sid in sids:
            greedy.call("CloseSession", sid=sid)
        other.call("CloseSession", sid=other_sid)
    finally:
        greedy.close()
        other.close()


@pytest.mark.slow
def test_one_client_cannot_take_all_the_kv_memory(ckpt):
    # 2 x 2 layers x 2 KV heads x 16 dims x 4 bytes = 512 bytes a token: 64 tokens (the first
    # reservation) take 32 KiB; the client's cap is 40 KiB, the server's 4 GiB.
    address = free_tcp_address()
    proc = start_server(ckpt, address, [*CPU, "--max-kv-gib-per-client", str(40 * 1024 / (1 << 30))])
    hog, other = Peer(address), Peer(address)
    try:
        k, q = np.ones((1, HKV, 1, D), np.float32), np.ones((1, H, 1, D), np.float32)
        pos = np.zeros(1, np.int64)

        def fill(peer: Peer):
            sid = peer.call("OpenSession", {"batch": 1, "max_tokens": 512})[0]["res"]["sid"]
            peer.call("AttnScores", {"layer": 0}, [q, k, pos], sid)  # reserves 64 tokens: 32 KiB
            return sid

        first = fill(hog)
        second = hog.call("OpenSession", {"batch": 1, "max_tokens": 512})[0]["res"]["sid"]
        e = _error(hog, "AttnScores", {"layer": 0}, [q, k, pos], second)
        assert e.code == "too_large" and "--max-kv-gib-per-client" in str(e)
        fill(other)  # someone else still gets memory
        hog.call("CloseSession", sid=first)
    finally:
        hog.close()
        other.close()
        stop_server(proc)


@pytest.mark.slow
def test_replies_nobody_reads_are_bounded(ckpt):
    """The issue's attack: small Matmul requests whose results are large, from a client that
    never reads. The server computes two (the unread bound), refuses the rest uncomputed
    naming the flag, and its memory grows by a bounded amount, not by every result."""
    address = free_tcp_address()
    proc = start_server(ckpt, address, CPU)  # the derived default: 64 MiB messages, 128 MiB unread
    reader = Peer(address)
    sink = Peer(address, rcvhwm=1)  # its ZeroMQ stops taking replies after one
    sink.sock.setsockopt(zmq.RCVBUF, 64 << 10)
    try:
        reader.call("Ping")
        before = rss(proc.pid)
        n = 3900  # a (3900, 1) x (1, 3900) product: 61 MB of result from 31 KB of request
        a, b = np.ones((n, 1), np.float32), np.ones((1, n), np.float32)
        for rid in range(8):
            sink.send(request(rid, "Matmul", {}, [a, b]))
        time.sleep(3)  # the server works through them
        t0 = time.monotonic()
        reader.call("Ping")  # others are served meanwhile
        ping_s = time.monotonic() - t0
        grown = rss(proc.pid) - before
        codes = []
        for _ in range(8):
            head = msgpack.unpackb(sink.recv(60)[0])
            codes.append(head.get("code", "ok"))
            if head.get("code") == "too_large":
                assert "--max-unread-mb" in head["msg"]
    finally:
        reader.close()
        sink.close()
        stop_server(proc)
    print(
        f"unread replies: server RSS +{grown / MIB:.0f} MiB, replies {codes}, a ping meanwhile {ping_s:.3f} s"
    )
    assert grown < 320 * MIB  # all eight would be 488 MB
    assert "too_large" in codes and codes.count("ok") >= 2
    assert ping_s < 5


@pytest.mark.slow
def test_frames_over_the_limit_cost_no_memory(ckpt):
    """Four connections each send a frame of 1.5 times --max-message-mb: ZeroMQ drops each
    connection when the frame's size arrives, before allocating it."""
    address = free_tcp_address()
    proc = start_server(ckpt, address, [*CPU, "--max-message-mb", "64"])
    reader = Peer(address)
    peers = [Peer(address) for _ in range(4)]
    try:
        reader.call("Ping")
        before = rss(proc.pid)
        x = np.ones((1, 24 << 20, 1), np.float32)  # 96 MiB
        for p in peers:
            p.send(request(1, "Linear", {"layer": 0, "module": "q_proj"}, [x]))
        time.sleep(3)
        assert all(not p.sock.poll(1000) for p in peers), "an over-size frame is never answered"
        reader.call("Ping")
        grown = rss(proc.pid) - before
    finally:
        for p in [reader, *peers]:
            p.close()
        stop_server(proc)
    print(f"4 frames of 96 MiB: server RSS +{grown / MIB:.0f} MiB")
    assert grown < 64 * MIB  # read in full they would be 384 MiB


@pytest.mark.slow
def test_a_message_of_a_million_frames_stalls_nobody_for_long(server):
    attacker, other = Peer(server["address"]), Peer(server["address"])
    try:
        other.call("Ping")
        before = rss(server["proc"].pid)
        head = msgpack.packb({"v": PROTOCOL_VERSION, "id": 7, "op": "Ping", "t": []})
        attacker.sock.send_multipart([b"", head, *([b""] * 1_000_000)], copy=False)
        worst, stop = [0.0], threading.Event()

        def pings() -> None:
            while not stop.is_set():
                t0 = time.monotonic()
                other.call("Ping")
                worst[0] = max(worst[0], time.monotonic() - t0)

        thread = threading.Thread(target=pings)
        thread.start()
        reply = msgpack.unpackb(attacker.recv(120)[0])
        stop.set()
        thread.join(60)
        grown = rss(server["proc"].pid) - before
    finally:
        attacker.close()
        other.close()
    print(f"a million frames: slowest ping meanwhile {worst[0]:.2f} s, server RSS +{grown / MIB:.0f} MiB")
    assert reply["code"] == "too_large" and "frames" in reply["msg"]
    assert worst[0] < 15  # 7 s at load 11 on 2 cores; recv_multipart made a Frame object per frame
    assert grown < 128 * MIB


# ---- the pieces, in process ---------------------------------------------------------------------------
def test_default_message_size_follows_the_model():
    from teesplit.config import ModelConfig

    tiny = ModelConfig.from_dict(
        {"model_type": "llama", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
         "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "max_position_embeddings": 64,
         "head_dim": 16, "rms_norm_eps": 1e-5, "rope": {"rope_type": "default", "rope_theta": 1e4}}
    )  # fmt: skip
    smollm2 = ModelConfig.from_dict(
        {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
         "num_layers": 30, "num_heads": 9, "num_kv_heads": 3, "max_position_embeddings": 8192,
         "head_dim": 64, "rms_norm_eps": 1e-5, "rope": {"rope_type": "default", "rope_theta": 1e4}}
    )  # fmt: skip
    assert default_max_message_bytes(tiny, 8192, 64) == MIN_MESSAGE_BYTES
    # SmolLM2: a v3 prefill's scores of 2048 tokens, 9 x 2048 x 2048 x 4 bytes, is the largest
    assert default_max_message_bytes(smollm2, 8192, 64) == 144 * MIB
    assert default_max_message_bytes(smollm2, 8192, 64) < 1 << 30


def test_unread_replies_count_until_zeromq_lets_go():
    class Tracker:
        def __init__(self):
            self.done = False

    unread = UnreadReplies(100)
    t1, t2 = Tracker(), Tracker()
    unread.add(b"p", t1, 60)
    assert unread.over(b"p") is None and unread.over(b"q") is None
    unread.add(b"p", t2, 60)
    assert unread.over(b"p") == 120
    t1.done = True
    assert unread.over(b"p") is None and unread.held(b"p") == 60
    t2.done = True
    unread.sweep()
    assert unread.total() == 0
