"""Transports carry already-encoded multipart messages between the runner and the GPU server.

A transport has `send(frames)`, `recv(timeout_s) -> frames`, `close()` and, where a
connection can be re-made, `reconnect()` and `timeout_s`. It knows nothing of tensors or
operations: the protocol and the client do (retries live in `GPUClient.call`). Shared by both
sides.
"""

from __future__ import annotations


class GPUServerUnavailable(ConnectionError):
    """The GPU server did not answer in time or could not be reached.

    Raised by a transport for one failed try, and by `GPUClient.call` once every try of a
    request has failed (its message then names the address and the tries)."""


class ConnectionLost(GPUServerUnavailable):
    """The connection dropped while a reply was awaited: that try has failed, stop waiting."""


class LinkRefused(ConnectionError):
    """The security handshake failed (unknown runner key, wrong server key, CURVE on one side
    only): retrying cannot help, so this is not a GPUServerUnavailable."""
