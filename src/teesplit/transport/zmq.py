"""ZeroMQ transport (tcp://, ipc://): a DEALER socket speaking to the server's ROUTER.

Each message is sent as [empty delimiter, header, tensors...], the same envelope a REQ
socket would use, with tensor frames sent zero-copy.

Failure handling lives here and in `GPUClient.call`: a receive that times out raises
`GPUServerUnavailable`; so does a receive during which the connection to the server is lost
(the server process died: waiting out the timeout would be pointless). The client then calls
`reconnect()`, which closes the DEALER socket (dropping anything still queued on it, so a
late reply cannot leak into the next request) and opens a new one under the SAME routing id:
the server keys its reply cache by (routing id, request id), so a resent request is answered
from that cache instead of being computed twice.
"""

from __future__ import annotations

import os
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from teesplit.errors import UsageError
from teesplit.transport.errors import ConnectionLost, GPUServerUnavailable, LinkRefused

SCHEMES = ("tcp://", "ipc://", "inproc://")
# Replies faster than this are received with one blocking call (the hot path: ~100 round
# trips per token); slower ones wait in a poll that also watches for a lost connection.
FAST_WAIT_S = 0.05
LAST_REPLY_WAIT_MS = 50  # after a disconnect, how long a reply already on its way may take


_HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


def _refusal(address: str, event: int, curve: bool) -> str:
    """What a failed security handshake means, in words a user can act on."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return (
            f"the GPU server at {address} refused this runner's public key (not in its --allow-keys "
            "directory); add the runner's NAME.key there"
        )
    if not curve:
        return (
            f"the security handshake with the GPU server at {address} failed: it requires CURVE; "
            "pass --curve-secret FILE and --server-key FILE"
        )
    return (
        f"the CURVE handshake with the GPU server at {address} failed: check --server-key (it must be "
        "the server's public key) and that the server runs with --curve-secret"
    )


class ZmqTransport:
    def __init__(self, address: str, timeout_s: float = 60.0, max_message_bytes: int = -1, curve=None):
        """`curve`: a `teesplit.transport.curve.CurveClient` to encrypt and authenticate the link."""
        if not address.startswith(SCHEMES):
            raise UsageError(f"unsupported address {address!r}: use tcp://HOST:PORT or ipc://PATH")
        self.address = address
        self.timeout_s = timeout_s
        self.max_message_bytes = max_message_bytes
        self.curve = curve
        # A random routing id that survives reconnects (a leading zero byte is reserved by ZeroMQ).
        self.routing_id = bytes([1 + os.urandom(1)[0] % 255]) + os.urandom(15)
        self._sock: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        self._open()

    def _open(self) -> None:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
        sock.setsockopt(zmq.ROUTING_ID, self.routing_id)
        if self.curve is not None:
            self.curve.apply(sock)
        self._monitor = sock.get_monitor_socket(
            zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | _HANDSHAKE_FAILED
        )
        sock.connect(self.address)
        self._sock = sock
        self._rcvtimeo = None
        self._connected = False  # as last seen on the monitor
        self._lost = False  # the connection dropped and has not come back
        self._refused: str | None = None  # why the security handshake failed, if it did

    def send(self, frames: list) -> None:
        self._sock.send_multipart([b"", *frames], copy=False)

    def recv(self, timeout_s: float | None = None) -> list:
        timeout = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        # A receive timeout on the socket instead of a poll per message: one system call less
        # on every round trip, which matters at ~100 round trips per token.
        ms = max(1, int(min(timeout, FAST_WAIT_S) * 1000))
        if ms != self._rcvtimeo:
            self._sock.setsockopt(zmq.RCVTIMEO, ms)
            self._rcvtimeo = ms
        try:
            frames = self._sock.recv_multipart(copy=False)
        except zmq.Again:
            return self._recv_slow(deadline, timeout)
        return frames[1:] if self._ours(frames) else self._recv_slow(deadline, timeout)

    def _recv_slow(self, deadline: float, timeout: float) -> list:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        while True:
            self._read_monitor()
            if self._refused:
                raise LinkRefused(self._refused)
            if self._lost:
                # A server that stops answers the request in flight, then closes: its reply comes
                # in just before the disconnect, and must not be thrown away with the connection.
                if self._sock.poll(LAST_REPLY_WAIT_MS, zmq.POLLIN):
                    frames = self._sock.recv_multipart(copy=False, flags=zmq.NOBLOCK)
                    if self._ours(frames):
                        return frames[1:]
                raise ConnectionLost(f"the connection to the GPU server at {self.address} was lost")
            left = deadline - time.monotonic()
            if left <= 0:
                raise GPUServerUnavailable(
                    f"no reply from the GPU server at {self.address} within {timeout:g} s "
                    "(is `teesplit serve` running there?)"
                )
            ready = dict(poller.poll(max(1, int(left * 1000))))
            if self._sock in ready:
                frames = self._sock.recv_multipart(copy=False, flags=zmq.NOBLOCK)
                if self._ours(frames):
                    return frames[1:]

    @staticmethod
    def _ours(frames: list) -> bool:
        # A reply without our delimiter is not from a teesplit server; skip it.
        return bool(frames) and len(frames[0].buffer) == 0

    def _read_monitor(self) -> None:
        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)["event"]
            if event & _HANDSHAKE_FAILED:
                self._refused = _refusal(self.address, event, self.curve is not None)
            elif event == zmq.EVENT_CONNECTED:
                self._connected, self._lost = True, False
            elif event == zmq.EVENT_DISCONNECTED:
                self._connected, self._lost = False, True

    def reconnect(self) -> None:
        """A fresh DEALER socket (same routing id): nothing queued on the old one survives."""
        self._close()
        self._open()

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.disable_monitor()
            self._monitor.close(0)
            self._sock.close(0)
            self._sock = self._monitor = None

    def close(self) -> None:
        self._close()
