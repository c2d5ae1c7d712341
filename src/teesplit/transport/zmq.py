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

A dead or missing server is noticed in seconds, not after the reply timeout: with a
`connect_timeout_s`, a request that finds no connection (ZeroMQ handshake done) within that
long raises ServerUnreachable, and ZeroMQ heartbeats (HEARTBEAT_IVL/TIMEOUT/TTL) end a
connection whose peer stopped answering pings, which then counts as lost. `timeout_s` stays
the bound for a server that is connected and alive but slow.

Reply frames larger than the request can need are dropped by ZeroMQ before they are allocated
(MAXMSGSIZE, set per connection: `expect`, see transport/caps.py).
"""

from __future__ import annotations

import os
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from teesplit.errors import UsageError
from teesplit.transport import caps
from teesplit.transport.errors import ConnectionLost, GPUServerUnavailable, LinkRefused, ServerUnreachable

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
    def __init__(
        self,
        address: str,
        timeout_s: float = 60.0,
        max_message_bytes: int = caps.INITIAL,
        curve=None,
        connect_timeout_s: float | None = None,
    ):
        """`curve`: a `teesplit.transport.curve.CurveClient` to encrypt and authenticate the link.
        `max_message_bytes`: the largest reply frame accepted until `expect` changes it (-1: any,
        and `expect` keeps it so). `connect_timeout_s`: see the module docstring (None: off)."""
        if not address.startswith(SCHEMES):
            raise UsageError(
                f"unsupported address {address!r}: use tcp://HOST:PORT, ipc://PATH or shm://NAME (same host)"
            )
        self.address = address
        self.timeout_s = timeout_s
        self.max_message_bytes = max_message_bytes
        self.curve = curve
        # inproc has no connection to watch (no monitor events): no check there
        self.connect_timeout_s = None if address.startswith("inproc://") else connect_timeout_s
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
        if self.connect_timeout_s is not None:
            # A peer silent for half the connect timeout is gone: the connection ends, the
            # request in flight counts as lost, and its retry meets the connect check.
            silent_ms = max(1000, int(self.connect_timeout_s * 500))
            sock.setsockopt(zmq.HEARTBEAT_IVL, max(200, silent_ms // 3))
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, silent_ms)
            sock.setsockopt(zmq.HEARTBEAT_TTL, silent_ms)  # the server drops us as fast
        if self.curve is not None:
            self.curve.apply(sock)
        self._monitor = sock.get_monitor_socket(
            zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | _HANDSHAKE_FAILED
        )
        sock.connect(self.address)
        self._sock = sock
        self._rcvtimeo = None
        self._opened = time.monotonic()
        self._connected = False  # as last seen on the monitor
        self._up = False  # a ZeroMQ handshake succeeded on this socket (the server answered)
        self._lost = False  # the connection dropped and has not come back
        self._refused: str | None = None  # why the security handshake failed, if it did

    def expect(self, nbytes: int) -> None:
        """The next reply has frames of at most `nbytes`: cap what ZeroMQ accepts near that
        (transport/caps.py), reconnecting when the cap changes (between requests only)."""
        cap = caps.new_cap(self.max_message_bytes, nbytes)
        if cap is not None:
            self.max_message_bytes = cap
            self.reconnect()

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
                cap = self.max_message_bytes
                raise ConnectionLost(
                    f"the connection to the GPU server at {self.address} was lost (the server stopped, or "
                    f"sent a reply frame larger than the {cap} bytes this request can get)"
                    if cap > 0
                    else f"the connection to the GPU server at {self.address} was lost"
                )
            now = time.monotonic()
            left = deadline - now
            ct = self.connect_timeout_s
            if ct is not None and not self._up:  # first: no connection is not a slow server
                if now - self._opened >= ct - 1e-3:
                    raise ServerUnreachable(
                        f"nothing answered at {self.address} within {ct:g} s (is `teesplit serve` running "
                        "there? --connect-timeout sets this bound)"
                    )
                left = min(left, self._opened + ct - now)
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
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._up = True
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
