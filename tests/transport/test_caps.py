"""The runner never allocates what it did not ask for (transport/caps.py): a lying GPU server's
oversized reply frame is dropped by ZeroMQ before allocation, refused by the shm reader from
the region header; the cap follows the request (reconnecting under the same routing id)."""

from __future__ import annotations

import mmap
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import zmq
from helpers import make_checkpoint

from teesplit.launch import build_service, free_tcp_address
from teesplit.protocol import ProtocolError, encode
from teesplit.tee.client import GPUClient
from teesplit.transport import caps
from teesplit.transport.zmq import ZmqTransport

MIB = 1 << 20


def test_caps_are_powers_of_two_with_a_floor_and_shrink_when_far_too_large():
    assert caps.frame_cap(1) == caps.FLOOR and caps.frame_cap(caps.FLOOR + 1) == 2 * caps.FLOOR
    assert caps.new_cap(caps.INITIAL, 1000) is None  # Init's cap serves small replies: no reconnect
    assert caps.new_cap(caps.FLOOR, 100 * MIB) == 128 * MIB
    assert caps.new_cap(128 * MIB, 1000) == caps.FLOOR  # a prefill's cap, lowered for decode
    assert caps.new_cap(-1, 1 << 40) is None  # the caller asked for no cap


class LyingRouter:
    """A ROUTER that answers any request with one frame of `reply_bytes` zero bytes, sent from
    untouched anonymous memory (it costs this process no resident memory)."""

    def __init__(self, reply_bytes: int):
        self.address = free_tcp_address()
        self.big = mmap.mmap(-1, reply_bytes)
        self.stop = threading.Event()
        ready = threading.Event()
        self.thread = threading.Thread(target=self.run, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(10)

    def run(self, ready: threading.Event) -> None:
        sock = zmq.Context.instance().socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(self.address)
        ready.set()
        head = encode({"id": 1, "ok": True, "res": {}}, [])[0]
        try:
            while not self.stop.is_set():
                if sock.poll(50):
                    envelope = sock.recv_multipart()[:2]
                    sock.send_multipart([*envelope, head, memoryview(self.big)], copy=False)
        finally:
            sock.close(0)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.big.close()


# VmHWM, not ru_maxrss: the latter keeps the parent's (pytest's) peak across fork and exec.
RUNNER = """
import re, sys, time
from teesplit.tee.client import GPUClient
from teesplit.transport.zmq import ZmqTransport
c = GPUClient(ZmqTransport(sys.argv[1], timeout_s=30, connect_timeout_s=5))
t0 = time.monotonic()
try:
    c.ping()
    print("accepted")
except Exception as e:
    print(type(e).__name__, e)
maxrss = int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
print(f"elapsed {time.monotonic() - t0:.2f} maxrss {maxrss}")
"""


@pytest.mark.slow
def test_a_4_gib_reply_frame_is_dropped_before_the_runner_allocates_it():
    liar = LyingRouter(4 << 30)
    try:
        r = subprocess.run(
            [sys.executable, "-c", RUNNER, liar.address], capture_output=True, text=True, timeout=120
        )
    finally:
        liar.close()
    out = r.stdout.strip().splitlines()
    print("runner:", *out)
    assert out[0] != "accepted" and "lost" in out[0] and "larger than" in out[0]
    elapsed, maxrss = float(out[-1].split()[1]), int(out[-1].split()[3])
    assert maxrss < 256 * MIB  # 46 MB here; it reached 4.3 GB when frames were read in full
    assert elapsed < 15


def test_the_cap_follows_the_request_and_the_reconnect_keeps_the_routing_id(tmp_path):
    """A large Ping reply is accepted when the request says it is coming (the transport
    reconnects with a larger cap, same routing id), and the cap comes down after it."""
    from teesplit.gpu.zmq_server import serve

    handler, _ = build_service(make_checkpoint(tmp_path, "llama"), "cpu", "float32", progress=False)
    address, stop, ready = free_tcp_address(), threading.Event(), threading.Event()
    thread = threading.Thread(target=serve, args=(handler, address, stop, ready), daemon=True)
    thread.start()
    ready.wait(10)
    c = GPUClient(ZmqTransport(address, timeout_s=30, connect_timeout_s=5))
    try:
        rid = c.transport.routing_id
        c.ping(reply_bytes=40 * MIB)
        assert c.transport.max_message_bytes == 64 * MIB and c.transport.routing_id == rid
        c.ping()
        assert c.transport.max_message_bytes == caps.FLOOR
    finally:
        c.close()
        stop.set()
        thread.join(10)


def test_the_shm_reader_refuses_an_oversized_frame_from_the_region_header(tmp_path):
    """A server answering a small request with 40 MiB: the runner reads the frame lengths from
    the region header and refuses the reply before copying anything out."""
    from teesplit.gpu import shm_server
    from teesplit.transport.shm import ShmTransport

    handler, _ = build_service(make_checkpoint(tmp_path, "llama"), "cpu", "float32", progress=False)
    honest = handler.handle

    def lying(frames, peer=None, identity=None):
        out = honest(frames, peer, identity)
        return [out[0], np.zeros(10 * MIB, np.float32)]  # an extra 40 MiB frame nobody asked for

    handler.handle = lying
    address = f"shm://teesplit-caps-{time.monotonic_ns()}"
    stop, ready = threading.Event(), threading.Event()
    thread = threading.Thread(target=shm_server.serve_shm, args=(handler, address, stop, ready), daemon=True)
    thread.start()
    ready.wait(10)
    c = GPUClient(ShmTransport(address, timeout_s=30, connect_timeout_s=5))
    try:
        with pytest.raises(ProtocolError, match="exceeds the limit"):
            c.ping()
    finally:
        c.close()
        stop.set()
        thread.join(10)
