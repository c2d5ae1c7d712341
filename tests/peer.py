"""A raw ZeroMQ DEALER socket to a GPU server, as any program that reaches the port could open:
it sends whatever frames it is given (well-formed or not), pipelines, and reads replies."""

from __future__ import annotations

import zmq

from teesplit.protocol import parse_reply, request


class Peer:
    def __init__(self, address: str, routing_id: bytes | None = None, rcvhwm: int = 1000, sndhwm: int = 1000):
        """`rcvhwm`/`sndhwm`: ZeroMQ's queue limits in messages (0: none, for pipelining)."""
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, rcvhwm)
        self.sock.setsockopt(zmq.SNDHWM, sndhwm)
        if routing_id is not None:
            self.sock.setsockopt(zmq.ROUTING_ID, routing_id)
        self.sock.connect(address)
        self.rid = 0

    def send(self, frames: list, delimiter: bool = True) -> None:
        self.sock.send_multipart(([b""] if delimiter else []) + [bytes(f) for f in frames])

    def recv(self, timeout_s: float = 30.0) -> list[bytes]:
        assert self.sock.poll(int(timeout_s * 1000)), "the server did not answer"
        frames = self.sock.recv_multipart()
        assert frames[0] == b"", "a reply starts with the empty delimiter"
        return frames[1:]

    def exchange(self, frames: list, op: str = "?"):
        """Send a request's frames as they are; its reply parsed (RemoteError for an error)."""
        self.send(frames)
        return parse_reply(self.recv(), op)

    def call(self, op: str, args=None, tensors=(), sid=None):
        """One request under a fresh id (a repeated id is answered from the server's reply cache)."""
        self.rid += 1
        return self.exchange(request(self.rid, op, args, tensors, sid), op)

    def close(self) -> None:
        self.sock.close(0)
