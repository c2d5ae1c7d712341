"""The GPU server's ZeroMQ loop (UNTRUSTED side): a ROUTER socket in front of the
`RequestHandler` (gpu/handler.py), so several runners can connect at once.

Robustness, all bounded:
- frames over twice the decode limit drop the connection (ZeroMQ MAXMSGSIZE), smaller ones
  that break a limit get a "too_large" reply; each connection queues at most RCV_QUEUE requests;
- sessions unused for `session_idle_timeout_s` are dropped by the loop;
- SIGINT/SIGTERM: the request in flight is finished and answered, sessions are dropped, and
  `serve` returns.
"""

from __future__ import annotations

import logging
import signal
import threading
import time

import zmq

from teesplit.gpu.handler import RequestHandler, log_event, log_server_stop
from teesplit.protocol import error_reply

RCV_QUEUE = 32  # requests queued per connection before ZeroMQ stops reading from it


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
) -> None:
    """Serve until `stop` is set or SIGINT/SIGTERM arrives (when run in the main thread).

    The request in flight when the signal comes is finished and answered (its reply gets up
    to `linger_s` to leave); then every session is dropped. Sessions idle for longer than
    `session_idle_timeout_s` (None or 0: never) are dropped while serving. `curve` (a
    `teesplit.transport.curve.CurveServer`): encrypt the link and admit only its allowed keys."""
    stop = stop or threading.Event()
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, handler.max_frame_bytes)
    sock.setsockopt(zmq.RCVHWM, RCV_QUEUE)
    sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a runner reconnecting under its routing id takes over
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
    sweep_every = min(1.0, session_idle_timeout_s / 4) if session_idle_timeout_s else None
    next_sweep = time.monotonic()
    try:
        while not stop.is_set():
            handler.tick()
            if sweep_every is not None and time.monotonic() >= next_sweep:
                handler.expire_sessions(session_idle_timeout_s)
                next_sweep = time.monotonic() + sweep_every
            try:
                frames = sock.recv_multipart(copy=False)
            except zmq.Again:
                continue
            _serve_guarded(sock, handler, frames)
        # Stopping: requests that already arrived are in flight too; answer them, briefly.
        drain_until = time.monotonic() + linger_s
        while time.monotonic() < drain_until:
            try:
                frames = sock.recv_multipart(copy=False, flags=zmq.NOBLOCK)
            except zmq.Again:
                break
            _serve_guarded(sock, handler, frames)
    finally:
        dropped = handler.drop_sessions("shutdown")
        sock.close(linger=int(linger_s * 1000))  # let the last reply leave
        if auth is not None:
            auth.stop()
        log_server_stop(handler, address, dropped)


def _serve_guarded(sock: zmq.Socket, handler: RequestHandler, frames: list) -> None:
    try:
        _serve_one(sock, handler, frames)
    except zmq.ZMQError as e:  # the peer vanished mid-reply, a full queue: keep serving
        log_event("error", level=logging.WARNING, code="send_failed", msg=str(e))
    except Exception as e:  # handle() never raises; this guards the envelope handling
        log_event("error", level=logging.ERROR, code="internal", msg=f"{type(e).__name__}: {e}")


def _serve_one(sock: zmq.Socket, handler: RequestHandler, frames: list) -> None:
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
    sock.send_multipart([*envelope, *handler.handle(message, peer)], copy=False)
    handler.replies.settle()  # the reply cache's bookkeeping, now that the reply is out
