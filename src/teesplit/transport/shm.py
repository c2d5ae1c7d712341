"""Shared-memory transport (shm://NAME) for a runner and a GPU server on the same host.

Shared by both sides: the runner's `ShmTransport` is here, the server's loop is
`teesplit.gpu.shm_server`; both use the regions, channels and control messages below. It
carries exactly the messages of the ZeroMQ transport (a msgpack header frame, then raw tensor
frames); only the way the bytes travel differs.

Rendezvous. The server listens on a unix SOCK_SEQPACKET socket in Linux's *abstract*
namespace (``\\0teesplit-shm:NAME``): nothing on the filesystem, and the name vanishes with
the listening socket, even when the server is SIGKILLed. Each runner connects once and keeps
that connection; it is the doorbell and the death detector (end-of-file as soon as the peer
process is gone, so a runner never waits out its timeout for a dead server).

Regions. Every byte of a message travels through a *region*: a memfd (anonymous memory with
no name in /dev/shm) mapped by both processes, its file descriptor passed over the
connection (SCM_RIGHTS). The writer of a direction creates its region (the runner its request
region, the server one reply region per runner) and seals its size (F_SEAL_SHRINK,
F_SEAL_GROW), so the peer can never shrink it under the reader (a read past the end of a
shrunk mapping would be SIGBUS, a crash). The reader maps a region only after checking that
it is a sealed memfd of the announced size, within its cap. When a message does not fit, the
writer makes a larger region, writes the message there and sends the new descriptor; the
reader switches over. When both processes have closed and unmapped a region the kernel frees
it: nothing can be left behind, not even after a crash.

Layout of a region (64-bit words, little-endian)::

    byte 0      seq      messages published so far (written by the writer)
    byte 64     waiting  1 while the reader is blocked on the connection (written by the reader)
    byte 128    nframes, then the length of each frame (at most MAX_FRAMES)
    byte 4096   the frames, each starting at a multiple of 64 bytes

One message per direction is in flight: the runner sends a request, then waits for its reply
(the client never has more than one request outstanding; `--pipeline` and concurrent runners
use one connection each, as they do over ZeroMQ).

Waiting. The reader of a direction first spins on `seq` for at most `spin_s` (SPIN_S),
yielding the CPU after YIELD_AFTER_S so a peer waiting for a core on a busy machine gets it;
then it sets `waiting`, checks `seq` once more and blocks in poll(2) on the connection. The
writer publishes `seq` and sends a one-byte doorbell only when `waiting` is set, so a round
trip between two spinning processes makes no system call at all. Without a store-load
fence in Python the writer may in rare cases read a stale `waiting`; the blocked reader
therefore rechecks `seq` every RECHECK_S, so that case costs a millisecond, never a hang.
On CPUs without x86's ordered stores (TSO) a spinning reader could see `seq` before the data;
there every message rings the doorbell and the reader only trusts `seq` after it.

The spin budget, 2 ms: long enough to span what a runner usually waits for, the server's work
on one decode product (0.1 to 1 ms for SmolLM2 on one CPU thread; less on a GPU), and what the
server waits for between two requests, the runner's RMSNorm/RoPE/softmax (tens of µs). A
block and wake-up through the kernel is far from free: on this project's 2-vCPU VM a blocked
reader takes about 100 µs to run again (an ipc ping is 160 to 190 µs), and a decode token
makes 152 round trips on v3-fused. Measured side by side on that VM (teesplit bench
--only-sections shm): with a 50 µs budget v3-fused over shm decoded at 131 ms/token (45.7 ms of
it transport) and a ping took 36 µs; with 2 ms, 89 ms/token (15.8 ms transport) and 21.5 µs;
10 ms gained nothing more. The spin yields the CPU after YIELD_AFTER_S (sched_yield), so on a
2-core machine a spinning side never keeps the other process off a core it needs (with other
work on the machine a yield can last a time slice, during which the reply has usually come).
The cost is bounded: at most 2 ms of CPU per wait, after which both sides block and use no CPU
while idle. On a 64-core machine the spinning core is otherwise idle, and a co-located pair
that exchanges hundreds of messages per token is exactly where a core per side is well spent.
"""

from __future__ import annotations

import fcntl
import math
import mmap
import os
import platform
import re
import select
import socket
import stat
import struct
import time
from collections.abc import Sequence
from typing import Any

from teesplit.errors import UsageError
from teesplit.protocol import ProtocolError
from teesplit.transport import caps
from teesplit.transport.errors import ConnectionLost, GPUServerUnavailable, LinkRefused, ServerUnreachable

SCHEME = "shm://"
NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,80}")
PROTOCOL = 1  # of the control messages below, not of the wire format

SPIN_S = 2e-3  # spin this long on `seq` before blocking (see the module docstring)
YIELD_AFTER_S = 5e-6  # then keep spinning, but give the CPU away between checks
RECHECK_S = 0.001  # a reader that just blocked looks at `seq` again after this long
CONNECT_RETRY_S = 0.05  # while no server listens, try to connect this often
TSO = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")

DATA = 4096  # the first frame starts here
ALIGN = 64
MAX_FRAMES = 16
SEQ, WAITING, NFRAMES = 0, 8, 16  # word indexes: bytes 0, 64, 128
INITIAL_BYTES = 1 << 20
SHRINK_ABOVE = 16 << 20  # a region larger than this is replaced by a smaller one when messages shrink
RUNNER_MAX_REGION = 64 << 30  # the largest reply region a runner maps (address space only)

# Control messages on the connection (SOCK_SEQPACKET keeps their boundaries).
HELLO = b"H"  # runner -> server: PROTOCOL u32, client id 16 bytes, region size u64; fd: request region
WELCOME = b"W"  # server -> runner: PROTOCOL u32, region size u64; fd: reply region
REFUSED = b"E"  # server -> runner: utf-8 reason, then the server closes the connection
DENIED = "denied: "  # a REFUSED reason starting so is final (this user may not connect): no retry
MAX_REASON_BYTES = 240
DOORBELL = b"D"
MOVED = b"M"  # region size u64; fd: the new region, which already holds the next message
_HELLO = struct.Struct("<I16sQ")
_WELCOME = struct.Struct("<IQ")
_SIZE = struct.Struct("<Q")
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
_CTRL_BYTES = 256  # the longest control message: REFUSED and its reason
_FD = struct.Struct("i")
_ANC_BYTES = socket.CMSG_SPACE(2 * _FD.size)  # room for two fds: a second one is detected, closed


class ShmError(Exception):
    """The peer broke the shared-memory protocol (a bad region, descriptor or control message)."""


def socket_name(address: str) -> bytes:
    """shm://NAME -> the abstract unix-socket address (leading NUL: no file is created)."""
    if not address.startswith(SCHEME):
        raise UsageError(f"not a shared-memory address: {address!r} (use shm://NAME)")
    name = address[len(SCHEME) :]
    if not NAME_PATTERN.fullmatch(name):
        raise UsageError(
            f"bad shared-memory name {name!r}: use 1 to 80 letters, digits, '.', '_' or '-' (shm://NAME)"
        )
    return b"\0teesplit-shm:" + name.encode()


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) & -ALIGN  # ALIGN is a power of two


def region_bytes(lengths: Sequence[int]) -> int:
    """The region size a message with frames of these lengths needs."""
    return DATA + sum([(n + ALIGN - 1) & -ALIGN for n in lengths])


def new_region_size(size: int, need: int) -> int | None:
    """The size of the region that should replace one of `size` bytes for a message needing
    `need`, or None to keep it: grow to fit (at least doubling), and shrink back after a large
    message once messages are small again, so a long prefill does not pin its memory."""
    if need > size:
        return max(need, 2 * size)
    if size > SHRINK_ABOVE and 4 * need <= size:
        return max(INITIAL_BYTES, 2 * need)
    return None


def resize_for(size: int, frames: Sequence[bytes | memoryview]) -> int | None:
    """`new_region_size` for a message of these frames, the common case (it fits, the region
    is small) decided without building the list of lengths."""
    need = DATA
    for f in frames:
        need += (len(f) + ALIGN - 1) & -ALIGN
    if need <= size <= SHRINK_ABOVE:
        return None
    return new_region_size(size, need)


def _buffer(frame: Any) -> bytes | memoryview:
    """A frame as a region write takes it: bytes as they are, anything else as a flat byte
    view (zmq.Frame-like objects expose .buffer)."""
    if type(frame) is bytes:
        return frame
    view = memoryview(getattr(frame, "buffer", frame))
    return view if view.ndim == 1 and view.format == "B" else view.cast("B")


# ---- regions ---------------------------------------------------------------------------------------
class Region:
    """One mapped memfd: the control words and room for one message."""

    def __init__(self, fd: int, size: int):
        self.size = size
        self._mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.buf = memoryview(self._mm)
        self.ctl = self.buf[:DATA].cast("Q")  # 512 words, aligned: single 8-byte loads and stores

    def close(self) -> None:
        try:
            self.ctl.release()
            self.buf.release()
            self._mm.close()
        except BufferError:  # a view handed out earlier is still alive: unmapped with it, by GC
            pass

    # -- writer side
    def write(self, frames: Sequence[bytes | memoryview], seq: int) -> None:
        """Copy the frames in (the only copy on this side) and publish them as message `seq`.
        Frames are bytes or flat byte views (`_buffer`)."""
        off = DATA
        ctl, buf = self.ctl, self.buf
        ctl[NFRAMES] = len(frames)
        for i, f in enumerate(frames):
            n = len(f)
            buf[off : off + n] = f
            ctl[NFRAMES + 1 + i] = n
            off += (n + ALIGN - 1) & -ALIGN
        ctl[SEQ] = seq  # last: the reader trusts nothing before it sees this

    # -- reader side
    def lengths(self, max_frame: int) -> list[int]:
        """The frame lengths of the message in this region, read once and checked: the peer
        can rewrite them at any time, so only this copy is used afterwards."""
        n = self.ctl[NFRAMES]
        if not 0 <= n <= MAX_FRAMES:
            raise ShmError(f"message of {n} frames (at most {MAX_FRAMES})")
        lengths = self.ctl[NFRAMES + 1 : NFRAMES + 1 + n].tolist()
        for length in lengths:
            if length > max_frame:
                raise ShmError(f"frame of {length} bytes exceeds the limit of {max_frame}")
        if region_bytes(lengths) > self.size:
            raise ShmError(f"frames of {sum(lengths)} bytes overrun the {self.size}-byte region")
        return lengths

    def views(self, lengths: list[int]) -> list[memoryview]:
        """Read-only views of the frames, in place (offsets computed here, never read)."""
        out, off = [], DATA
        for n in lengths:
            out.append(self.buf[off : off + n].toreadonly())
            off += (n + ALIGN - 1) & -ALIGN
        return out

    def copies(self, lengths: list[int]) -> list[bytes]:
        """The frames copied out, as bytes (offsets computed here, never read)."""
        out, off, buf = [], DATA, self.buf
        for n in lengths:
            out.append(bytes(buf[off : off + n]))
            off += (n + ALIGN - 1) & -ALIGN
        return out


def create_region(size: int) -> tuple[int, Region]:
    """A new sealed memfd of `size` bytes, mapped; returns (fd to pass to the peer, region)."""
    size = max(size, DATA + ALIGN)
    size = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
    fd = os.memfd_create("teesplit-shm", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        return fd, Region(fd, size)
    except BaseException:
        os.close(fd)
        raise


def adopt_region(fd: int, size: int, max_size: int) -> Region:
    """Map a region the peer created, after checking it is a memfd sealed against shrinking of
    exactly `size` bytes (at most `max_size`). Closes `fd` in every case."""
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ShmError("the region is not a memory file")
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)  # EINVAL for anything but shared memory
        except OSError:
            raise ShmError("the region is not a sealable memfd") from None
        if not seals & fcntl.F_SEAL_SHRINK:
            raise ShmError("the region is not sealed against shrinking")
        if st.st_size != size or not DATA + ALIGN <= size <= max_size:
            raise ShmError(f"region of {st.st_size} bytes (announced {size}, at most {max_size})")
        try:
            return Region(fd, size)
        except OSError as e:  # e.g. sealed against writing: we need to write the `waiting` word
            raise ShmError(f"cannot map the region: {e}") from None
    finally:
        os.close(fd)


# ---- control messages ------------------------------------------------------------------------------
def send_control(sock: socket.socket, kind: bytes, body: bytes = b"", fd: int | None = None) -> None:
    """One control message, never blocking (a peer that stops reading cannot stall us).
    (socket.send_fds/recv_fds would drop the MSG_DONTWAIT flag, hence sendmsg/recvmsg.)"""
    anc = [] if fd is None else [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _FD.pack(fd))]
    sock.sendmsg([kind + body], anc, socket.MSG_DONTWAIT)


def recv_control(sock: socket.socket) -> tuple[bytes, int | None]:
    """One control message and the fd it carried (None); never blocks (BlockingIOError). b"" is
    end-of-file: the peer is gone. More than one fd, or a truncated message, is a protocol
    error (every fd received is closed then)."""
    msg, anc, flags, _ = sock.recvmsg(_CTRL_BYTES, _ANC_BYTES, socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            whole = len(data) - len(data) % _FD.size
            fds += [_FD.unpack_from(data, i)[0] for i in range(0, whole, _FD.size)]
    if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC) or len(fds) > 1:
        for fd in fds:
            os.close(fd)
        raise ShmError("malformed control message")
    return msg, (fds[0] if fds else None)


def spin_until(ctl: memoryview, want: int, spin_s: float) -> bool:
    """Spin until the region's `seq` (ctl[SEQ]) equals `want` or `spin_s` passes; True if it did."""
    if spin_s <= 0:
        return False
    clock = time.perf_counter
    t0 = clock()
    yield_at, end = t0 + YIELD_AFTER_S, t0 + spin_s
    while True:
        if ctl[SEQ] == want:
            return True
        now = clock()
        if now >= end:
            return False
        if now >= yield_at:
            os.sched_yield()


# ---- the runner's transport ------------------------------------------------------------------------
class ShmTransport:
    """The runner's side of shm://NAME: `send(frames)`, `recv(timeout_s)`, `reconnect()`, `close()`."""

    def __init__(
        self,
        address: str,
        timeout_s: float = 60.0,
        spin_s: float | None = None,
        connect_timeout_s: float | None = None,
    ):
        """`connect_timeout_s`: a request that finds no server to connect to for this long raises
        ServerUnreachable, with the reason (None: it keeps trying until its reply timeout)."""
        self._name = socket_name(address)
        self.address = address
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.max_frame = caps.INITIAL  # the largest reply frame read (`expect`)
        self._unconnected_since: float | None = None  # when connecting started failing
        self.spin_s = (SPIN_S if spin_s is None else spin_s) if TSO else 0.0
        self.client_id = os.urandom(16)  # survives reconnects: the server's reply cache key
        self._sock: socket.socket | None = None
        self._tx: Region | None = None
        self._rx: Region | None = None
        self._pending: list | None = None  # the request awaiting its reply, resent after a connect
        self._lost = False  # the connection dropped while sending: the next recv() says so
        self._why = ""  # why the last connect failed
        self._sent = self._got = 0
        self._connect()

    def _connect(self) -> bool:
        """Connect if a server listens; False (and the reason kept for the error) if not. Like a
        ZeroMQ socket, the transport then keeps trying while a reply is awaited."""
        try:
            self._open()
        except GPUServerUnavailable as e:
            self._why = str(e)
            if self._unconnected_since is None:
                self._unconnected_since = time.monotonic()
            return False
        self._unconnected_since = None
        return True

    def expect(self, nbytes: int) -> None:
        """The next reply has frames of at most `nbytes`: a larger one is refused from the region
        header, before anything is copied (transport/caps.py)."""
        self.max_frame = caps.frame_cap(nbytes)

    # -- connection
    def _open(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        fd = None
        try:
            try:
                sock.connect(self._name)
            except OSError as e:  # ECONNREFUSED: nobody listens under that name
                raise GPUServerUnavailable(
                    f"no GPU server listens at {self.address} ({e.strerror}; is `teesplit serve --bind "
                    f"{self.address}` running on this host?)"
                ) from None
            fd, tx = create_region(INITIAL_BYTES)
            self._tx = tx
            body = _HELLO.pack(PROTOCOL, self.client_id, tx.size)
            try:
                sock.sendmsg([HELLO + body], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _FD.pack(fd))])
            except (BrokenPipeError, ConnectionResetError):
                pass  # a server that refuses us at once has closed its end: its reason waits below
            os.close(fd)
            fd = None
            self._sock = sock
            kind, rfd = self._recv_blocking(time.monotonic() + max(self.timeout_s, 1.0))
            if kind[:1] == REFUSED:
                reason = kind[1:].decode(errors="replace")
                if reason.startswith(DENIED):
                    raise LinkRefused(
                        f"the GPU server at {self.address} refused this runner: {reason[len(DENIED) :]}"
                    )
                raise GPUServerUnavailable(
                    f"the GPU server at {self.address} refused the connection: {reason}"
                )
            if kind[:1] != WELCOME or len(kind) != 1 + _WELCOME.size or rfd is None:
                if rfd is not None:
                    os.close(rfd)
                raise ConnectionLost(f"the GPU server at {self.address} answered the handshake wrongly")
            version, size = _WELCOME.unpack(kind[1:])
            if version != PROTOCOL:
                os.close(rfd)
                raise ConnectionLost(
                    f"the GPU server at {self.address} speaks shm protocol {version}, this runner {PROTOCOL}"
                )
            try:
                self._rx = adopt_region(rfd, size, RUNNER_MAX_REGION)
            except ShmError as e:
                raise ConnectionLost(f"the GPU server at {self.address} sent a bad region: {e}") from None
        except BaseException:
            if fd is not None:
                os.close(fd)
            self._sock = sock
            self._close()
            raise
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)
        self._sent = 0  # requests published (the request region's seq)
        self._got = 0  # replies read (the reply region's seq)

    def _recv_blocking(self, deadline: float) -> tuple[bytes, int | None]:
        """The next control message within the deadline (handshake only)."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise GPUServerUnavailable(f"the GPU server at {self.address} did not answer the handshake")
            if not select.select([self._sock], [], [], left)[0]:
                continue
            try:
                msg, fd = recv_control(self._sock)
            except ShmError as e:
                raise ConnectionLost(f"the GPU server at {self.address}: {e}") from None
            except BlockingIOError:
                continue
            except OSError as e:
                raise ConnectionLost(
                    f"the connection to the GPU server at {self.address} failed: {e}"
                ) from None
            if not msg:
                raise ConnectionLost(f"the GPU server at {self.address} closed the connection")
            return msg, fd

    # -- messages
    def send(self, frames: list) -> None:
        views = [_buffer(f) for f in frames]
        if len(views) > MAX_FRAMES:
            raise ProtocolError(f"a message of {len(views)} frames exceeds {MAX_FRAMES}", "too_large")
        if self._sock is not None and self._got != self._sent:
            self.reconnect()  # the last request went unanswered: its late reply must not be taken
        self._pending, self._lost = views, False
        if self._sock is not None or self._connect():
            self._publish(views)

    def _publish(self, views: list[memoryview]) -> None:
        """Write the request into the region (or a larger new one) and wake the server if it sleeps."""
        size = resize_for(self._tx.size, views)
        seq = self._sent + 1
        try:
            if size is not None:  # a new region, holding this message, replaces the old one
                fd, tx = create_region(size)
                try:
                    tx.ctl[SEQ] = self._sent
                    tx.write(views, seq)
                    send_control(self._sock, MOVED, _SIZE.pack(tx.size), fd)
                except BaseException:
                    tx.close()
                    raise
                finally:
                    os.close(fd)
                self._tx.close()
                self._tx = tx
            else:
                self._tx.write(views, seq)
                if not TSO or self._tx.ctl[WAITING]:
                    self._ring()
        except OSError as e:  # the server is gone (or stopped reading): recv() reports it
            self._why = f"the connection was lost ({e.strerror or e})"
            self._close()
            self._lost = True
            return
        self._sent = seq

    def _ring(self) -> None:
        try:
            send_control(self._sock, DOORBELL)
        except BlockingIOError:
            pass  # doorbells already queued: the server will wake anyway
        except OSError:
            pass  # the server is gone; recv() reports it

    def recv(self, timeout_s: float | None = None) -> list:
        if self._pending is None:
            raise RuntimeError("shm transport: recv() without a request in flight")
        if self._lost:
            self._lost = False
            raise ConnectionLost(f"the connection to the GPU server at {self.address} was lost")
        timeout = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        while self._sock is None:  # no server listened at send(): keep trying until the deadline
            now = time.monotonic()
            left = deadline - now
            ct, since = self.connect_timeout_s, self._unconnected_since
            if ct is not None and since is not None:  # first: no connection is not a slow server
                if now - since >= ct - 1e-3:
                    raise ServerUnreachable(
                        f"could not connect to the GPU server at {self.address} within {ct:g} s "
                        f"({self._why}; --connect-timeout sets this bound)"
                    )
                left = min(left, since + ct - now)
            if left <= 0:
                raise GPUServerUnavailable(
                    f"no reply from the GPU server at {self.address} within {timeout:g} s ({self._why})"
                )
            time.sleep(min(CONNECT_RETRY_S, left))
            if self._connect():
                self._publish(self._pending)
                if self._lost:
                    self._lost = False
                    raise ConnectionLost(f"the connection to the GPU server at {self.address} was lost")
        want = self._sent
        rang = False
        if not spin_until(self._rx.ctl, want, self.spin_s):
            rang = self._block(want, deadline, timeout)
        if not TSO and not rang:  # weak memory order: seq is trusted only after a doorbell
            self._block(want, deadline, timeout, need_ring=True)
        rx = self._rx
        try:
            lengths = rx.lengths(self.max_frame)
        except ShmError as e:
            self._close()
            raise ProtocolError(f"malformed reply in shared memory from {self.address}: {e}") from None
        # Copied out: the model keeps reply arrays past the next call, which reuses the region.
        frames = rx.copies(lengths)
        self._got = want
        self._pending = None
        return frames

    def _block(self, want: int, deadline: float, timeout: float, need_ring: bool = False) -> bool:
        """Block on the connection until reply `want` is published; True if a doorbell came."""
        rang = False
        self._rx.ctl[WAITING] = 1
        first = True  # the first wait is short: see RECHECK_S
        try:
            while True:
                if self._rx.ctl[SEQ] == want and (rang or not need_ring):
                    return rang
                left = deadline - time.monotonic()
                if left <= 0:
                    raise GPUServerUnavailable(
                        f"no reply from the GPU server at {self.address} within {timeout:g} s "
                        "(is `teesplit serve` running there?)"
                    )
                wait = min(left, RECHECK_S) if first else left
                first = False
                if self._poll.poll(max(1, math.ceil(wait * 1000))):
                    rang |= self._read_control()
        finally:
            if self._rx is not None:
                self._rx.ctl[WAITING] = 0

    def _read_control(self) -> bool:
        """Read what the server sent: doorbells, a moved reply region, or end-of-file."""
        rang = False
        while True:
            try:
                msg, fd = recv_control(self._sock)
            except BlockingIOError:
                return rang
            except ShmError as e:
                self._close()
                raise ConnectionLost(f"the GPU server at {self.address}: {e}") from None
            except OSError as e:
                self._close()
                raise ConnectionLost(
                    f"the connection to the GPU server at {self.address} failed: {e}"
                ) from None
            if not msg:
                self._close()
                raise ConnectionLost(f"the connection to the GPU server at {self.address} was lost")
            if msg[:1] == MOVED and fd is not None and len(msg) == 1 + _SIZE.size:
                try:
                    region = adopt_region(fd, _SIZE.unpack(msg[1:])[0], RUNNER_MAX_REGION)
                except ShmError as e:
                    self._close()
                    raise ConnectionLost(f"the GPU server at {self.address} sent a bad region: {e}") from None
                self._rx.close()
                self._rx = region
                rang = True
            elif msg == DOORBELL and fd is None:
                rang = True
            else:
                if fd is not None:
                    os.close(fd)
                self._close()
                raise ConnectionLost(f"the GPU server at {self.address} sent an unknown control message")

    def _failed(self, e: OSError) -> ConnectionLost:
        return ConnectionLost(f"the connection to the GPU server at {self.address} failed: {e}")

    def reconnect(self) -> None:
        """A fresh connection and fresh regions (same client id): nothing of the old one survives.
        If no server listens now, the next send() and recv() keep trying until their deadline."""
        self._close()
        self._connect()

    def _close(self) -> None:
        for region in (self._tx, self._rx):
            if region is not None:
                region.close()
        self._tx = self._rx = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def close(self) -> None:
        self._close()
