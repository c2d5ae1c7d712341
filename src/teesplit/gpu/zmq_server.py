"""The GPU server's ZeroMQ loop (UNTRUSTED side): a ROUTER socket in front of the
`RequestHandler` (gpu/handler.py), so several runners can connect at once.

Robustness, all bounded (gpu/capacity.py says how much a peer may make the server hold):
- a frame over the message limit drops the connection at the socket (ZeroMQ MAXMSGSIZE)
  before anything is allocated for it; a message of more frames than a request can have is
  read frame by frame and thrown away, no Python object made for the excess, and answered
  "too_large";
- each connection queues at most `max_inflight` requests (ZeroMQ's receive high-water mark),
  and while ZeroMQ holds more than `max_unread_bytes` of its replies unread, its next request
  is refused without being computed (`UnreadReplies`);
- heartbeats: a peer that stops answering ZeroMQ's pings for `heartbeat_timeout_s` is
  disconnected (and what was queued for it freed), whatever the kernel's TCP timers say;
- sessions belong to the identity that opened them: the CURVE public key when the link has
  CURVE (ZeroMQ's "User-Id" from the ZAP handler), else the connection's routing id;
- sessions unused for `session_idle_timeout_s` are dropped by the loop;
- SIGINT/SIGTERM: the request in flight is finished and answered, sessions are dropped, and
  `serve` returns.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass

import zmq

from teesplit.gpu.capacity import TRACK_ABOVE, UnreadReplies
from teesplit.gpu.handler import RequestHandler, log_event, log_server_stop
from teesplit.protocol import error_reply

ENVELOPE_FRAMES = 8  # routing frames before the empty delimiter that a ROUTER message may have
SEND_QUEUE = 64  # replies ZeroMQ keeps for one peer; see gpu/capacity.py for the bound in bytes


@dataclass(frozen=True)
class ConnectionLimits:
    """What one connection may hold in the server (`teesplit serve` flags)."""

    max_inflight: int = 4  # requests queued per connection before ZeroMQ stops reading it
    max_unread_bytes: int = 512 << 20  # its replies held unread before its requests are refused
    heartbeat_s: float = 1.0  # ZeroMQ ping interval
    heartbeat_timeout_s: float = 5.0  # a peer silent this long is disconnected


def split_envelope(frames: list) -> tuple[list, list] | None:
    """ROUTER frames -> (routing envelope incl. the empty delimiter, message frames)."""
    for i, f in enumerate(frames[:8]):
        if len(f.buffer if hasattr(f, "buffer") else f) == 0:
            return frames[: i + 1], frames[i + 1 :]
    return None


def serve(
    handler: RequestHandler,
    address: str,
    stop: threading.Event | None = None,
    ready: threading.Event | None = None,
    session_idle_timeout_s: float | None = None,
    linger_s: float = 2.0,
    curve=None,
    limits: ConnectionLimits | None = None,
) -> None:
    """Serve until `stop` is set or SIGINT/SIGTERM arrives (when run in the main thread).

    The request in flight when the signal comes is finished and answered (its reply gets up
    to `linger_s` to leave); then every session is dropped. Sessions idle for longer than
    `session_idle_timeout_s` (None or 0: never) are dropped while serving. `curve` (a
    `teesplit.transport.curve.CurveServer`): encrypt the link and admit only its allowed keys.
    `limits`: what one connection may hold (ConnectionLimits)."""
    stop = stop or threading.Event()
    limits = limits or ConnectionLimits()
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, handler.max_frame_bytes)
    sock.setsockopt(zmq.RCVHWM, limits.max_inflight)
    # Replies waiting for a peer, in messages (the large ones are also counted in bytes,
    # UnreadReplies); past this a ROUTER drops the reply (a resend is answered from the cache).
    sock.setsockopt(zmq.SNDHWM, SEND_QUEUE)
    sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a runner reconnecting under its routing id takes over
    sock.setsockopt(zmq.HEARTBEAT_IVL, max(1, int(limits.heartbeat_s * 1000)))
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(1, int(limits.heartbeat_timeout_s * 1000)))
    sock.setsockopt(zmq.HEARTBEAT_TTL, max(100, int(limits.heartbeat_timeout_s * 1000)))
    auth = None
    if curve is not None:  # the ZAP handler must run before the socket accepts anyone
        auth = curve.start_authenticator(ctx)
        curve.apply(sock)
    sock.bind(address)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    if ready is not None:
        ready.set()
    sock.setsockopt(zmq.RCVTIMEO, 100)  # wake up to check `stop`; no poll call per message
    sweep_every = min(1.0, session_idle_timeout_s / 4) if session_idle_timeout_s else 1.0
    next_sweep = time.monotonic()
    conn = _Connections(handler, limits, curve is not None)
    try:
        while not stop.is_set():
            handler.tick()
            if time.monotonic() >= next_sweep:
                if session_idle_timeout_s:
                    handler.expire_sessions(session_idle_timeout_s)
                conn.unread.sweep()
                next_sweep = time.monotonic() + sweep_every
            try:
                frames = _recv_bounded(sock, handler.limits.max_frames)
            except zmq.Again:
                continue
            _serve_guarded(sock, conn, frames)
        # Stopping: requests that already arrived are in flight too; answer them, briefly.
        drain_until = time.monotonic() + linger_s
        while time.monotonic() < drain_until:
            try:
                frames = _recv_bounded(sock, handler.limits.max_frames, zmq.NOBLOCK)
            except zmq.Again:
                break
            _serve_guarded(sock, conn, frames)
    finally:
        dropped = handler.drop_sessions("shutdown")
        sock.close(linger=int(linger_s * 1000))  # let the last reply leave
        if auth is not None:
            auth.stop()
        log_server_stop(handler, address, dropped)


class _Connections:
    """The loop's per-connection bookkeeping: whose request it is, and what it holds unread."""

    def __init__(self, handler: RequestHandler, limits: ConnectionLimits, curve: bool):
        self.handler = handler
        self.limits = limits
        self.curve = curve
        self.unread = UnreadReplies(limits.max_unread_bytes)

    def identity(self, peer: bytes, frame: zmq.Frame) -> bytes:
        """Whom a session belongs to: the CURVE key the ZAP handler admitted, else the routing id."""
        if self.curve:
            try:
                return b"curve:" + frame.get("User-Id").encode()
            except (zmq.ZMQError, AttributeError):  # never with CURVE on; fall back to the connection
                pass
        return peer


class _Oversized(list):
    """A message with more frames than any request has: its first frames only (the rest were
    read and thrown away) and how many there were."""

    total = 0


def _recv_bounded(sock: zmq.Socket, max_frames: int, flags: int = 0) -> list:
    """One message, frame by frame: past the frames a request can have (after its routing
    envelope), the rest is read into nothing, so a message of a million empty frames costs no
    list of a million Frame objects and holds up the other peers as briefly as possible."""
    frames = [sock.recv(flags, copy=False)]
    limit = ENVELOPE_FRAMES + 1 + max_frames
    while frames[-1].more:
        if len(frames) >= limit:
            n = len(frames)
            while sock.getsockopt(zmq.RCVMORE):  # the cheapest read pyzmq has: no Frame made
                sock.recv(copy=True)
                n += 1
            out = _Oversized(frames)
            out.total = n
            return out
        frames.append(sock.recv(copy=False))
    return frames


def _serve_guarded(sock: zmq.Socket, conn: _Connections, frames: list) -> None:
    try:
        _serve_one(sock, conn, frames)
    except zmq.ZMQError as e:  # the peer vanished mid-reply, a full queue: keep serving
        log_event("error", level=logging.WARNING, code="send_failed", msg=str(e))
    except Exception as e:  # handle() never raises; this guards the envelope handling
        log_event("error", level=logging.ERROR, code="internal", msg=f"{type(e).__name__}: {e}")


def _refuse(
    sock: zmq.Socket, handler: RequestHandler, envelope: list, peer: bytes, code: str, msg: str
) -> None:
    handler.errors += 1
    handler.log_error(code, None, None, msg, peer)
    sock.send_multipart([*envelope, *error_reply(None, code, msg)], copy=False)


def _serve_one(sock: zmq.Socket, conn: _Connections, frames: list) -> None:
    handler = conn.handler
    parts = split_envelope(frames)
    if parts is None:
        # No delimiter: not one of our clients. Answer on the identity alone if there is one.
        if len(frames) >= 2:
            handler.errors += 1
            peer = bytes(frames[0].buffer)
            handler.log_error("bad_message", None, None, "missing empty delimiter frame", peer)
            err = error_reply(None, "bad_message", "missing empty delimiter frame")
            sock.send_multipart([frames[0], b"", *err])
        return
    envelope, message = parts
    peer = bytes(envelope[0].buffer)
    if isinstance(frames, _Oversized):
        max_frames = handler.limits.max_frames
        msg = (
            f"a message of {frames.total - len(envelope)} frames; a request has at most {max_frames} "
            "(a header and its tensors)"
        )
        _refuse(sock, handler, envelope, peer, "too_large", msg)
        return
    held = conn.unread.over(peer)
    if held is not None:
        msg = (
            f"this connection has {held} bytes of replies unread, the server's limit per connection "
            f"is {conn.limits.max_unread_bytes} (read your replies; raise it with `teesplit serve "
            "--max-unread-mb`)"
        )
        _refuse(sock, handler, envelope, peer, "too_large", msg)
        return
    identity = conn.identity(peer, message[0]) if message else peer
    out = handler.handle(message, peer, identity)
    nbytes = 0
    for f in out:
        nbytes += len(getattr(f, "buffer", f)) if not isinstance(f, bytes) else len(f)
    if nbytes <= TRACK_ABOVE:
        sock.send_multipart([*envelope, *out], copy=False)
    else:  # a large reply: ZeroMQ holds it until the peer reads it; count it
        conn.unread.add(peer, _send_tracked(sock, envelope, out), nbytes)
    handler.replies.settle()  # the reply cache's bookkeeping, now that the reply is out


def _send_tracked(sock: zmq.Socket, envelope: list, frames: list) -> zmq.MessageTracker:
    """send_multipart, zero-copy, with a tracker that is done when ZeroMQ let go of every reply
    frame (pyzmq's own tracker watches only the last one; the envelope's received frames cannot
    be tracked)."""
    for f in envelope:
        sock.send(f, zmq.SNDMORE, copy=False)
    trackers = [sock.send(f, zmq.SNDMORE, copy=False, track=True) for f in frames[:-1]]
    trackers.append(sock.send(frames[-1], copy=False, track=True))
    return zmq.MessageTracker(*trackers)
