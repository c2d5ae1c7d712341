"""Transports carry already-encoded multipart messages between the runner and the GPU server.

A transport has `send(frames)`, `recv(timeout_s) -> frames`, `close()` and, where a
connection can be re-made, `reconnect()` and `timeout_s`. It knows nothing of tensors or
operations: the protocol and the client do (retries live in `GPUClient.call`). Shared by both
sides.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from teesplit.transport.errors import ConnectionLost, GPUServerUnavailable, LinkRefused, ServerUnreachable

__all__ = ["ConnectionLost", "GPUServerUnavailable", "LinkRefused", "ServerUnreachable", "open_transport"]


def open_transport(
    address: str,
    timeout_s: float,
    curve=None,
    local: Callable[[Sequence[Any]], list] | None = None,
    connect_timeout_s: float | None = None,
):
    """The transport for a server address: `local` (the GPU service in this process: `local`
    is its request handler), shm://NAME (same host), else tcp:// or ipc:// (with the runner's
    CURVE keys `curve`, a `teesplit.transport.curve.CurveClient`, if any). `connect_timeout_s`:
    a request that finds no connection to the server within this long fails at once with
    ServerUnreachable (None: it waits out its reply timeout)."""
    if address == "local":
        if local is None:
            raise ValueError("--server local needs the GPU service in this process")
        from teesplit.transport.local import LocalTransport

        return LocalTransport(local)
    if curve is not None and address.startswith("shm://"):
        from teesplit.errors import UsageError

        raise UsageError("CURVE secures tcp:// and ipc:// links; shm:// never leaves this host")
    if address.startswith("shm://"):
        from teesplit.transport.shm import ShmTransport

        return ShmTransport(address, timeout_s=timeout_s, connect_timeout_s=connect_timeout_s)
    from teesplit.transport.zmq import ZmqTransport

    return ZmqTransport(address, timeout_s=timeout_s, curve=curve, connect_timeout_s=connect_timeout_s)
