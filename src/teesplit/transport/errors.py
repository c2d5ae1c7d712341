"""What can go wrong on a link, as exceptions both sides and every transport share."""

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


class ServerUnreachable(GPUServerUnavailable):
    """No connection to the GPU server could be made within the connect timeout (nothing
    listens there, the host is gone, or the server is full): the request was never delivered,
    and the call gives up at once instead of waiting out its reply timeout and its retries."""
