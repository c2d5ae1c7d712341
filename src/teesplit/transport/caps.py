"""How large a reply frame the runner accepts (TRUSTED side's transports).

A lying GPU server could answer a small request with a frame of gigabytes. The runner never
reads more than it asked for: before each request the client tells its transport the largest
reply frame that request can have (`expect`), and the transport refuses anything larger before
it is allocated: ZeroMQ's MAXMSGSIZE drops such a frame (and the connection) while it arrives,
the shm reader refuses it from the region header. ZeroMQ applies MAXMSGSIZE per connection
when it is made, so the ZeroMQ transport reconnects (same routing id: the server's sessions and
reply cache go on) when a request needs a larger cap, and again when the replies are small once
more; caps are powers of two with a floor, so a decode loop never reconnects.
"""

from __future__ import annotations

FLOOR = 16 << 20  # caps below this buy nothing worth a reconnect
INITIAL = 32 << 20  # before Init: its reply (norm weights, biases) of any real model fits
SHRINK_BELOW = 4  # a cap this many times larger than needed is lowered


def frame_cap(nbytes: int) -> int:
    """The cap for replies of at most `nbytes` per frame: a power of two, at least FLOOR."""
    cap = FLOOR
    while cap < nbytes:
        cap *= 2
    return cap


def new_cap(current: int, nbytes: int) -> int | None:
    """The cap to switch to for a reply of at most `nbytes` per frame, or None to keep
    `current` (a negative current cap means the caller asked for none)."""
    if current < 0:
        return None
    want = frame_cap(nbytes)
    if want > current or (current > FLOOR and SHRINK_BELOW * want <= current):
        return want
    return None
