"""ZeroMQ transport (tcp://, ipc://): a DEALER socket speaking to the server's ROUTER.

Each message is sent as [empty delimiter, header, tensors...], the same envelope a REQ
socket would use, with tensor frames sent zero-copy.
"""

from __future__ import annotations

import zmq

from teesplit.transport import GPUServerUnavailable

SCHEMES = ("tcp://", "ipc://", "inproc://")


class ZmqTransport:
    def __init__(self, address: str, timeout_s: float = 60.0, max_message_bytes: int = -1):
        if not address.startswith(SCHEMES):
            raise ValueError(f"unsupported address {address!r}: use tcp://HOST:PORT or ipc://PATH")
        self.address = address
        self.timeout_s = timeout_s
        self._sock = zmq.Context.instance().socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        self._sock.connect(address)
        self._rcvtimeo = None

    def send(self, frames: list) -> None:
        self._sock.send_multipart([b"", *frames], copy=False)

    def recv(self, timeout_s: float | None = None) -> list:
        timeout = self.timeout_s if timeout_s is None else timeout_s
        # A receive timeout on the socket instead of a poll per message: one system call less
        # on every round trip, which matters at ~100 round trips per token.
        ms = max(1, int(timeout * 1000))
        if ms != self._rcvtimeo:
            self._sock.setsockopt(zmq.RCVTIMEO, ms)
            self._rcvtimeo = ms
        while True:
            try:
                frames = self._sock.recv_multipart(copy=False)
            except zmq.Again:
                raise GPUServerUnavailable(
                    f"no reply from the GPU server at {self.address} within {timeout:g} s "
                    "(is `teesplit serve` running there?)"
                ) from None
            if frames and len(frames[0].buffer) == 0:
                return frames[1:]
            # A reply without our delimiter is not from a teesplit server; skip it.

    def close(self) -> None:
        self._sock.close(0)
