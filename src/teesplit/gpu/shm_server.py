"""The GPU server's shared-memory loop, shm://NAME (UNTRUSTED side).

`serve_shm` listens on the abstract unix socket of the name and serves any number of runners
at once, each with its own request and reply region (see `teesplit.transport.shm` for the
regions, the control messages and the spin budget). It runs the same `RequestHandler` as
the ZeroMQ loop in `zmq_server.py`, so validation, error codes, sessions, limits, the reply cache
(keyed by the runner's client id, which survives its reconnects) and logging are identical.

The loop is single-threaded: it spins over every runner's `seq` for a few microseconds, then
marks each runner "waiting" and blocks in poll(2) on the listening socket and every runner's
connection. While requests keep coming it never gets that far, so every LOOK_EVERY_S it also
looks at those connections without blocking (new runners, moved regions, end-of-file). A
request is handled to the end before the next one is looked at. On a CPU server, right after
answering, the loop passes a tiny uncounted request through the request path while the
runner works, to bring that path back into the caches the request's weights just went
through (`ShmServer._warm`).

The regions are hostile input, exactly like a socket: a runner can rewrite its request region
at any time, also while the server reads it. So the server reads the frame count and lengths
once into its own memory and checks them against its limits and the region's size (offsets
are computed, never read); it copies the header frame, every frame up to COPY_BELOW bytes
(all of a decode step's: a copy of a few KiB costs less than deciding), and every larger
frame that is not float activations (token ids, positions, row indices: values that steer
indexing) before decoding. Large float activations (a prefill's) are read in place,
zero-copy: changing them mid-read only changes the numbers of the peer's own request, as if
it had sent other numbers (at worst NaN slipping past the finiteness check into the peer's
own session cache, which only that peer can read). A region that is not a
sealed memfd, a frame over `max_frame_bytes`, a sequence number out of order or a malformed
control message drops that runner (logged), never the server or another runner.

A runner's connection ending (the process exited or was killed) frees its regions at once,
and the sessions it opened after a short grace (RECONNECT_GRACE_S, for a runner that
reconnects after a timeout: it gets them back).

Who may connect: only processes of the user ids in `allow_uids` (the kernel's SO_PEERCRED,
checked when the connection is accepted; `teesplit serve --shm-allow-uid`, default the
server's own uid). A connection that has not completed its handshake within HANDSHAKE_S is
dropped. A runner the server cannot take (it serves `max_runners` already, or too many
connections are mid-handshake) is told why (REFUSED) instead of left to time out.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

import msgpack
import numpy as np
import torch

from teesplit.gpu.handler import RequestHandler, log_event, log_server_stop
from teesplit.protocol import FLOAT_DTYPES, decode, reply, request, validate_request
from teesplit.transport.shm import (
    _HELLO,
    _SIZE,
    _WELCOME,
    DATA,
    DENIED,
    DOORBELL,
    HELLO,
    INITIAL_BYTES,
    MAX_FRAMES,
    MAX_REASON_BYTES,
    MOVED,
    PROTOCOL,
    RECHECK_S,
    REFUSED,
    SEQ,
    SPIN_S,
    TSO,
    WAITING,
    WELCOME,
    YIELD_AFTER_S,
    Region,
    ShmError,
    _aligned,
    _buffer,
    adopt_region,
    create_region,
    recv_control,
    resize_for,
    send_control,
    socket_name,
)

MAX_RUNNERS = 256  # connected runners at once; one more is refused with a reason
MAX_PENDING = 64  # connections that have not finished the handshake
HANDSHAKE_S = 5.0
RECONNECT_GRACE_S = 2.0
COPY_BELOW = 64 << 10  # request frames up to this size are copied out of the region, whatever they hold
WARM_AFTER_S = 100e-6  # warm up after requests that took this long: products over megabytes
IDLE_POLL_S = 0.1  # wake up this often while idle, to notice a stop request and sweep sessions
# While requests keep the loop busy it never waits in poll(2), so it looks at the connections
# this often (one poll(2) that does not block): a busy runner must not keep a new runner's
# handshake, another runner's moved region or a dead runner's end-of-file waiting.
LOOK_EVERY_S = 0.005
_PEERCRED = struct.Struct("3i")


@dataclass(eq=False)
class Runner:
    sock: socket.socket
    client_id: bytes
    rx: Region  # requests: made by the runner
    tx: Region  # replies: made here
    pid: int
    seen: int = 0  # requests read
    rang: bool = False  # a doorbell came since the last request (what counts without TSO)
    sessions: set[int] = field(default_factory=set)  # opened over this connection, still open

    @property
    def name(self) -> str:
        return self.client_id.hex()[:12]


class ShmServer:
    def __init__(
        self,
        handler: RequestHandler,
        address: str,
        spin_s: float = SPIN_S,
        grace_s: float = RECONNECT_GRACE_S,
        max_runners: int = MAX_RUNNERS,
        warm: bool = True,
        warm_after_s: float = WARM_AFTER_S,
        allow_uids: tuple[int, ...] | None = None,
        handshake_s: float = HANDSHAKE_S,
    ):
        self.handler = handler
        # None: any local user (tests); the CLI passes the server's own uid unless told otherwise
        self.allow_uids = None if allow_uids is None else frozenset(allow_uids)
        self.handshake_s = handshake_s
        self.address = address
        self.spin_s = spin_s if TSO else 0.0
        self.grace_s = grace_s
        self.max_runners = max_runners
        # Only where requests stream weights through the CPU's caches (see _warm).
        self.warm = warm and self.spin_s > 0 and handler.service.device.type == "cpu"
        self.warm_after_s = warm_after_s
        self._warm_due = False  # the last request took long enough to have evicted the caches
        # The warm-up request takes the path real ones take: on a server that multiplies in numpy
        # a Ping with a small float32 tensor each way and a tiny product through `_linear`,
        # elsewhere a 1x1 Matmul in torch (see _warm).
        self._warm_numpy = handler.service.numpy_products
        if self._warm_numpy:
            self._warm_frames = request(0, "Ping", {"reply_bytes": 64}, (np.ones((1, 1, 16), np.float32),))
            self._warm_weight = torch.ones(8, 16)
        else:
            self._warm_frames = request(0, "Matmul", {}, (np.ones((1, 1), np.float32),) * 2)
        limits = handler.limits
        self.max_frame = handler.max_frame_bytes
        # The largest request region a runner may hand us: every frame at its limit.
        self.max_region = DATA + (limits.max_tensors + 1) * _aligned(self.max_frame)
        self.runners: dict[int, Runner] = {}  # by connection fd
        self._list: list[Runner] = []  # the same, as a list for the spin loop
        self.pending: dict[int, tuple[socket.socket, float]] = {}  # fd -> (socket, accepted at)
        self.orphans: dict[bytes, tuple[float, set[int]]] = {}  # client id -> (drop at, sessions)
        self._poll = select.poll()
        self._rr = 0  # round-robin start, so no runner starves the others
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.listener.bind(socket_name(address))
        except OSError as e:
            self.listener.close()
            raise OSError(
                e.errno, f"cannot listen at {address}: {e.strerror} (another server there?)"
            ) from None
        self.listener.listen(64)
        self.listener.setblocking(False)
        self._poll.register(self.listener, select.POLLIN)

    # ---- the loop ------------------------------------------------------------------------------
    def serve(
        self,
        stop: threading.Event,
        session_idle_timeout_s: float | None = None,
    ) -> None:
        sweep_every = min(1.0, self.handshake_s / 2, (session_idle_timeout_s or 4.0) / 4)
        next_sweep = next_look = time.monotonic()
        while not stop.is_set():
            now = time.monotonic()
            if now >= next_sweep:
                self.handler.tick()
                if session_idle_timeout_s:
                    self.handler.expire_sessions(session_idle_timeout_s)
                self._sweep()
                next_sweep = time.monotonic() + sweep_every
            if now >= next_look:  # requests that keep coming must not starve the connections
                self._events(self._poll.poll(0))
                next_look = now + LOOK_EVERY_S
            runner = self._next_ready()
            if runner is not None:
                self._serve(runner)
                if self.warm and self._warm_due and self._ready() is None:
                    self._warm()
            else:
                self._wait(min(IDLE_POLL_S, max(next_sweep - time.monotonic(), 0.001)))
        # Stopping: a request that was already published is in flight too; answer it.
        for runner in list(self.runners.values()):
            if runner.rx.ctl[SEQ] != runner.seen:
                self._serve(runner)

    def _ready(self) -> Runner | None:
        runners = self._list
        n = len(runners)
        if n == 1:  # the common case, without the round-robin arithmetic
            r = runners[0]
            return r if r.rx.ctl[SEQ] != r.seen and (TSO or r.rang) else None
        for i in range(n):
            r = runners[(self._rr + i) % n]
            if r.rx.ctl[SEQ] != r.seen and (TSO or r.rang):
                self._rr = (self._rr + i + 1) % n
                return r
        return None

    def _next_ready(self) -> Runner | None:
        """A runner with a published request, spinning up to the spin budget for one."""
        r = self._ready()
        if r is not None or not self.runners or self.spin_s <= 0:
            return r
        clock = time.perf_counter
        t0 = clock()
        while True:
            r = self._ready()
            if r is not None:
                return r
            now = clock()
            if now - t0 >= self.spin_s:
                return None
            if now - t0 >= YIELD_AFTER_S:
                os.sched_yield()

    def _wait(self, idle_s: float) -> None:
        """Block until a connection has something to say, a request may be published, or idle_s."""
        runners = list(self.runners.values())
        for r in runners:
            r.rx.ctl[WAITING] = 1
        try:
            if self._ready() is not None:
                return
            # The first wait is short: it catches a request published just as we set `waiting`
            # (a stale read of the flag by the runner, see transport/shm.py); later ones are long.
            timeout = RECHECK_S if runners else idle_s
            events = self._poll.poll(max(1, int(timeout * 1000)))
            if not events and runners and self._ready() is None:
                events = self._poll.poll(max(1, int(idle_s * 1000)))
            self._events(events)
        finally:
            for r in self.runners.values():
                r.rx.ctl[WAITING] = 0

    def _events(self, events: list[tuple[int, int]]) -> None:
        """New connections, handshakes, and what connected runners sent (doorbells, moved
        regions, end-of-file)."""
        for fd, _ in events:
            if fd == self.listener.fileno():
                self._accept()
            elif fd in self.pending:
                self._handshake(fd)
            elif fd in self.runners:
                self._control(self.runners[fd])

    def _warm(self) -> None:
        """Run a tiny request (a 1x1 Matmul) through the request path, uncounted and unanswered,
        while the runner works on the reply just sent and this core would only spin.

        On a CPU server each real request streams megabytes of weights through the caches,
        which evicts the interpreter's, numpy's and torch's own code and data: the request
        after it then pays for cache misses in every small step (decode, checks, tensor
        views, encode), tens of microseconds in all, 152 times a v3-fused decode token. This
        pass brings those paths back while the runner computes (its RMSNorm, RoPE or softmax
        takes longer than this pass), so the next request finds them warm. Only after a request
        that took WARM_AFTER_S or more: a quick one (a Ping) evicted nothing, and its sender
        may be back at once (a ping's round trip must not wait for this). Measured with
        v3-fused over shm on a 2-core VM: -2 to -4 ms a token with torch products. A server
        that multiplies in numpy (float32 on the CPU) warms numpy's path instead of torch's:
        a Ping with tensors both ways and a tiny product through the service's `_linear`;
        paired against the torch Matmul warm-up, 54.7 -> 51.7 ms a token (4 rounds). Nothing
        of it is kept: no reply, no counter, no reply-cache entry, no session touched."""
        h = self.handler
        try:
            header, tensors = decode(self._warm_frames, h.limits)
            _, op, args = validate_request(header, tensors)
            result, out, gpu_s = h.dispatch(op, args, header, tensors)
            if self._warm_numpy:
                h.service._linear(tensors[0], self._warm_weight)
            reply(0, result, out, gpu_s)
        except Exception as e:  # never: but a warm-up must not cost a request; stop doing it
            self.warm = False
            log_event("error", level=logging.WARNING, code="shm_warm", msg=f"{type(e).__name__}: {e}")

    # ---- one request -----------------------------------------------------------------------------
    def _serve(self, r: Runner) -> None:
        seq = r.rx.ctl[SEQ]
        if seq != r.seen + 1:
            self._drop(r, f"request sequence {seq} after {r.seen}", error=True)
            return
        try:
            lengths = r.rx.lengths(self.max_frame)
        except ShmError as e:
            self._drop(r, str(e), error=True)
            return
        r.seen, r.rang = seq, False
        frames = _request_frames(r.rx, lengths, self.handler.limits.max_header_bytes)
        t0 = time.perf_counter()
        out = self.handler.handle(frames, r.client_id)
        self._warm_due = time.perf_counter() - t0 >= self.warm_after_s
        if isinstance(frames[0], bytes) and b"Session" in frames[0]:  # Open/CloseSession, maybe
            self._track_session(r, frames[0], out)
        del frames
        self._reply(r, out, seq)
        self.handler.replies.settle()  # the reply cache's bookkeeping, while the runner works

    def _reply(self, r: Runner, frames: list, seq: int) -> None:
        views = [_buffer(f) for f in frames]
        if len(views) > MAX_FRAMES:  # never: replies carry a header and a few tensors
            self._drop(r, f"reply of {len(views)} frames", error=True)
            return
        size = resize_for(r.tx.size, views)
        if size is None:
            r.tx.write(views, seq)
            if not TSO or r.tx.ctl[WAITING]:
                try:
                    send_control(r.sock, DOORBELL)
                except OSError:  # full (doorbells queued already) or gone (noticed by poll)
                    pass
            return
        fd, tx = create_region(size)
        try:
            tx.ctl[SEQ] = seq - 1
            tx.write(views, seq)
            send_control(r.sock, MOVED, _SIZE.pack(tx.size), fd)
        except OSError as e:
            tx.close()
            self._drop(r, f"could not pass a larger reply region: {e}")
            return
        finally:
            os.close(fd)
        r.tx.close()
        r.tx = tx

    def _track_session(self, r: Runner, head: bytes, out: list) -> None:
        """Remember the sessions a runner opens over this connection, to drop them when it dies."""
        try:
            header = msgpack.unpackb(head, raw=False)
            reply = msgpack.unpackb(_buffer(out[0]), raw=False)
        except Exception:  # a malformed request got an error reply: nothing was opened
            return
        op = header.get("op") if isinstance(header, dict) else None
        if not isinstance(reply, dict) or not reply.get("ok"):
            return
        if op == "OpenSession" and type(reply.get("res", {}).get("sid")) is int:
            r.sessions.add(reply["res"]["sid"])
        elif op == "CloseSession":
            r.sessions.discard(header.get("sid"))

    # ---- connections -----------------------------------------------------------------------------
    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # out of fds: keep serving the connected runners
                log_event("error", level=logging.WARNING, code="shm_accept", msg=str(e))
                return
            sock.setblocking(False)
            if len(self.pending) >= MAX_PENDING:
                self._refuse(sock, f"{len(self.pending)} connections are mid-handshake; retry")
                continue
            self.pending[sock.fileno()] = (sock, time.monotonic())
            self._poll.register(sock, select.POLLIN)

    def _handshake(self, fd: int) -> None:
        sock, _ = self.pending.pop(fd)
        self._poll.unregister(fd)
        rfd = None
        try:
            msg, rfd = recv_control(sock)
            if not msg:
                sock.close()
                return
            # Refused only now, after its hello is read: a socket closed with the hello unread
            # would reach the runner as a reset, and the reason with it would be lost. Its region
            # is never mapped.
            uid = _peer_uid(sock)
            if self.allow_uids is not None and uid not in self.allow_uids:
                raise ShmError(
                    f"{DENIED}uid {uid} may not connect (the server allows {sorted(self.allow_uids)}: "
                    "teesplit serve --shm-allow-uid)"
                )
            if msg[:1] != HELLO or len(msg) != 1 + _HELLO.size or rfd is None:
                raise ShmError("bad handshake")
            version, client_id, size = _HELLO.unpack(msg[1:])
            if version != PROTOCOL:
                raise ShmError(f"the runner speaks shm protocol {version}, this server {PROTOCOL}")
            if len(self.runners) >= self.max_runners:
                raise ShmError(
                    f"the server already serves {self.max_runners} runners, its limit; retry when one leaves"
                )
            fd_, rfd = rfd, None
            rx = adopt_region(fd_, size, self.max_region)
        except (ShmError, OSError) as e:
            if rfd is not None:
                os.close(rfd)
            self._refuse(sock, str(e))
            return
        try:
            wfd, tx = create_region(INITIAL_BYTES)
        except OSError as e:
            rx.close()
            self._refuse(sock, f"cannot create a region: {e}")
            return
        try:
            send_control(sock, WELCOME, _WELCOME.pack(PROTOCOL, tx.size), wfd)
        except OSError:
            rx.close()
            tx.close()
            sock.close()
            return
        finally:
            os.close(wfd)
        pid, uid, _ = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        runner = Runner(sock, client_id, rx, tx, pid)
        runner.seen = 0
        orphan = self.orphans.pop(client_id, None)
        if orphan is not None:  # the same runner, reconnected: its sessions are its again
            runner.sessions = orphan[1]
        self.runners[sock.fileno()] = runner
        self._list = list(self.runners.values())
        self._poll.register(sock, select.POLLIN)
        log_event("shm_connect", runner=runner.name, pid=pid, uid=uid, runners=len(self.runners))

    def _refuse(self, sock: socket.socket, reason: str) -> None:
        self.handler.log_error("shm_refused", None, None, reason[:300], None)  # rate-limited
        try:
            send_control(sock, REFUSED, reason.encode()[:MAX_REASON_BYTES])
        except OSError:
            pass
        _drain(sock)  # what the runner sent unread at close would reach it as a reset, not the reason
        sock.close()

    def _control(self, r: Runner) -> None:
        """What a runner sent on its connection: doorbells, a moved request region, or end-of-file."""
        while r.sock.fileno() in self.runners:
            try:
                msg, fd = recv_control(r.sock)
            except (BlockingIOError, InterruptedError):
                return
            except (ShmError, OSError) as e:
                self._drop(r, str(e), error=True)
                return
            if not msg:
                self._drop(r, "the runner closed the connection")
                return
            if msg == DOORBELL and fd is None:
                r.rang = True
                continue
            if msg[:1] == MOVED and fd is not None and len(msg) == 1 + _SIZE.size:
                try:
                    region = adopt_region(fd, _SIZE.unpack(msg[1:])[0], self.max_region)
                except (ShmError, OSError) as e:
                    self._drop(r, f"bad request region: {e}", error=True)
                    return
                r.rx.close()
                r.rx, r.rang = region, True
                continue
            if fd is not None:
                os.close(fd)
            self._drop(r, "unknown control message", error=True)
            return

    def _drop(self, r: Runner, reason: str, error: bool = False) -> None:
        fd = r.sock.fileno()
        if self.runners.pop(fd, None) is None:
            return
        self._list = list(self.runners.values())
        self._poll.unregister(fd)
        r.sock.close()
        r.rx.close()
        r.tx.close()
        if error:
            self.handler.log_error("shm_protocol", None, None, reason[:300], r.client_id)  # rate-limited
        log_event("shm_disconnect", runner=r.name, reason=reason[:300], runners=len(self.runners))
        live = {s for s in r.sessions if s in self.handler.service.sessions}
        if live:
            self.orphans[r.client_id] = (time.monotonic() + self.grace_s, live)

    def _sweep(self) -> None:
        now = time.monotonic()
        for fd, (sock, t0) in list(self.pending.items()):
            if now - t0 > self.handshake_s:
                del self.pending[fd]
                self._poll.unregister(fd)
                sock.close()
        for client_id, (due, sessions) in list(self.orphans.items()):
            if now < due:
                continue
            del self.orphans[client_id]
            for sid in sessions:
                self.handler.drop_session(sid, "runner_gone")

    def close(self) -> None:
        for r in list(self.runners.values()):
            self._drop(r, "the server stopped")
        for sock, _ in self.pending.values():
            sock.close()
        self.pending.clear()
        self.listener.close()


def _peer_uid(sock: socket.socket) -> int:
    _, uid, _ = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return uid


def _request_frames(region: Region, lengths: list[int], max_header: int) -> list:
    """The request's frames as the handler gets them (`_private_copy`); a message of small
    frames only (every decode step's) is copied out directly."""
    if lengths and lengths[0] <= max_header and max(lengths) <= COPY_BELOW:
        return region.copies(lengths)
    return _private_copy(region.views(lengths), max_header)


def _private_copy(views: list[memoryview], max_header: int) -> list:
    """The frames as the handler gets them. The header, every frame of at most COPY_BELOW
    bytes (all of a decode step's) and every larger frame that is not float activations (token
    ids, positions, row indices: values that steer indexing, which the peer could change
    between a check and a use) are copied out of the shared region; large float activations
    are left in place."""
    if not views or len(views[0]) > max_header:
        return views  # the decoder refuses these on their length, without reading them
    frames: list = [bytes(v) if len(v) <= COPY_BELOW else v for v in views]
    if type(frames[0]) is not bytes:
        frames[0] = bytes(views[0])
    big = [i for i in range(1, len(frames)) if type(frames[i]) is not bytes]
    if big:
        try:
            header = msgpack.unpackb(frames[0], raw=False)
            table = header.get("t") if isinstance(header, dict) else None
        except Exception:  # garbage: the handler's decoder says so
            table = None
        for i in big:
            desc = table[i - 1] if isinstance(table, list) and i - 1 < len(table) else None
            if not (isinstance(desc, list) and desc and desc[0] in FLOAT_DTYPES):
                frames[i] = bytes(views[i])
    return frames


def _drain(sock: socket.socket) -> None:
    """Read and drop what waits on a socket about to be closed (closing any descriptor sent)."""
    sock.setblocking(False)
    for _ in range(4):
        try:
            msg, fd = recv_control(sock)
        except (BlockingIOError, ShmError, OSError):
            return
        if fd is not None:
            os.close(fd)
        if not msg:
            return


def serve_shm(
    handler: RequestHandler,
    address: str,
    stop: threading.Event | None = None,
    ready: threading.Event | None = None,
    session_idle_timeout_s: float | None = None,
    spin_s: float = SPIN_S,
    grace_s: float = RECONNECT_GRACE_S,
    allow_uids: tuple[int, ...] | None = None,
) -> None:
    """Serve shm://NAME until `stop` is set or SIGINT/SIGTERM arrives (in the main thread): the
    request in flight is finished and answered, then every session is dropped. `allow_uids`:
    the user ids that may connect (None: any)."""
    stop = stop or threading.Event()
    server = ShmServer(handler, address, spin_s=spin_s, grace_s=grace_s, allow_uids=allow_uids)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    if ready is not None:
        ready.set()
    try:
        server.serve(stop, session_idle_timeout_s)
    finally:
        server.close()
        dropped = handler.drop_sessions("shutdown")
        log_server_stop(handler, address, dropped)
