"""Transports carry already-encoded multipart messages between the runner and the GPU server.

A transport has `send(frames)`, `recv(timeout_s) -> frames` and `close()`. It knows nothing
of tensors or operations: the protocol and the client do. Shared by both sides.
"""

from __future__ import annotations


class GPUServerUnavailable(ConnectionError):
    """The GPU server did not answer in time or could not be reached."""


def connect(address: str, timeout_s: float = 60.0):
    """A transport for `address` (tcp://host:port or ipc://path)."""
    from teesplit.transport.zmq import ZmqTransport

    return ZmqTransport(address, timeout_s=timeout_s)
