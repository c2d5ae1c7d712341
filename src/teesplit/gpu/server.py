"""The GPU server's request handling and ZeroMQ loop (UNTRUSTED side).

`RequestHandler.handle` turns request frames into reply frames and never raises: every
malformed or hostile request gets an error reply with a stable code, and the server keeps
serving. `serve` runs it behind a ROUTER socket so several runners can connect at once.

Robustness, all bounded:
- a resent request (same routing id, same request id: the runner's retry after a timeout) is
  answered from a small reply cache instead of being computed again (`ReplyCache`);
- sessions unused for `session_idle_timeout_s` are dropped by the loop;
- frames over twice the decode limit drop the connection (ZeroMQ MAXMSGSIZE), smaller ones
  that break a limit get a "too_large" reply; each connection queues at most RCV_QUEUE requests;
- SIGINT/SIGTERM: the request in flight is finished and answered, sessions are dropped, and
  `serve` returns;
- one log line per session event and per error reply (errors at most ERROR_LOGS_PER_S a
  second; the rest are counted in the next line), as text or JSON (`configure_logging`).
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import ml_dtypes
import msgpack
import numpy as np
import torch
import zmq

from teesplit.gpu.service import TORCH_DTYPES, GPUComputeService, TopK
from teesplit.protocol import (
    DEFAULT_LIMITS,
    PROTOCOL_VERSION,
    WIRE_DTYPES,
    Int8Rows,
    Limits,
    ProtocolError,
    decode,
    error_reply,
    reply,
    validate_request,
    wire_name,
)

log = logging.getLogger("teesplit.server")

RCV_QUEUE = 32  # requests queued per connection before ZeroMQ stops reading from it
MAX_PING_REPLY_BYTES = 64 << 20
ERROR_LOGS_PER_S = 20
UNCACHED_OPS = ("Ping", "Init")  # cheap, stateless and possibly large: recomputed on a resend
# Operations that read or write a session's cache when given a session id; others ignore it.
SESSION_USERS = ("QKV", "AttnScores", "AttnOut", "EmbedQKV", "DownQKV", "AttnOutGateUp", "WriteKV")


# ---- structured logs -----------------------------------------------------------------------------
class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (unix seconds), level, logger, then the event and its
    fields for a server event, or msg for any other record."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {"ts": round(record.created, 3), "level": record.levelname.lower()}
        line["logger"] = record.name
        event = getattr(record, "event", None)
        if event is not None:
            line["event"] = event
            line.update(getattr(record, "fields", {}))
        else:
            line["msg"] = record.getMessage()
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_logging(fmt: str = "text", stream=None) -> None:
    """Log lines of level INFO and up to `stream` (stderr) as "text" or "json"."""
    if fmt not in ("text", "json"):
        raise ValueError(f"log format must be text or json, got {fmt!r}")
    out = logging.StreamHandler(stream or sys.stderr)
    text = logging.Formatter("%(asctime)s %(name)s: %(message)s")
    out.setFormatter(JsonFormatter() if fmt == "json" else text)
    root = logging.getLogger()
    root.handlers[:] = [out]
    root.setLevel(logging.INFO)


def log_event(event: str, message: str | None = None, level: int = logging.INFO, **fields: Any) -> None:
    """One structured line: `event` and its fields (text: "event k=v ..." or `message`)."""
    text = message or " ".join([event, *(f"{k}={v}" for k, v in fields.items())])
    log.log(level, "%s", text, extra={"event": event, "fields": fields})


def _peer_name(peer: bytes | None) -> str | None:
    return None if peer is None else peer.hex()[:12]


# ---- the reply cache -------------------------------------------------------------------------------
class ReplyCache:
    """The last replies per peer (ZeroMQ routing id), keyed by request id, so a resent request
    gets the same reply without being computed twice (OpenSession does not open a second
    session, CloseSession does not answer no_session). Bounded: `per_peer` replies per peer,
    `max_peers` peers (least recently used first out), `max_bytes` in all; a reply over
    `max_entry_bytes` is not kept, and a resend of it is computed again (every operation is
    idempotent: cache writes name their positions). Only successful replies are kept.

    `put` only notes the reply; the bookkeeping (sizes, eviction) is done by `settle`, which
    a serving loop calls once the reply is on its way (off the runner's critical path), and
    which every other method does first, so the cache never answers from a stale state."""

    def __init__(
        self,
        per_peer: int = 4,
        max_peers: int = 1024,
        max_bytes: int = 32 << 20,
        max_entry_bytes: int = 8 << 20,
    ) -> None:
        self.per_peer, self.max_peers = per_peer, max_peers
        self.max_bytes, self.max_entry_bytes = max_bytes, max_entry_bytes
        self.nbytes = 0
        self._unsettled: tuple | None = None  # the last put, not yet entered
        self._peers: OrderedDict[bytes, OrderedDict[int, tuple[str, Any, list, int]]] = OrderedDict()

    def get(self, peer: bytes, rid: int, op: str, sid: Any) -> list | None:
        if self._unsettled is not None:
            self.settle()
        entry = self._peers.get(peer, {}).get(rid)
        if entry is None or entry[0] != op or entry[1] != sid:
            return None
        self._peers.move_to_end(peer)
        return entry[2]

    def put(self, peer: bytes, rid: int, op: str, sid: Any, frames: list) -> None:
        if self._unsettled is not None:
            self.settle()
        self._unsettled = (peer, rid, op, sid, frames)

    def settle(self) -> None:
        """Enter the reply noted by the last `put`, if any."""
        if self._unsettled is None:
            return
        (peer, rid, op, sid, frames), self._unsettled = self._unsettled, None
        n = sum(len(getattr(f, "buffer", f)) for f in frames)
        if n > self.max_entry_bytes:
            return
        entries = self._peers.setdefault(peer, OrderedDict())
        self._peers.move_to_end(peer)
        if rid in entries:
            self.nbytes -= entries.pop(rid)[3]
        entries[rid] = (op, sid, frames, n)
        self.nbytes += n
        while len(entries) > self.per_peer:
            self.nbytes -= entries.popitem(last=False)[1][3]
        while self._peers and (len(self._peers) > self.max_peers or self.nbytes > self.max_bytes):
            _, old = next(iter(self._peers.items()))
            if old:
                self.nbytes -= old.popitem(last=False)[1][3]
            if not old:
                self._peers.popitem(last=False)

    def __len__(self) -> int:
        self.settle()
        return sum(len(e) for e in self._peers.values())


class RequestHandler:
    def __init__(self, service: GPUComputeService, limits: Limits = DEFAULT_LIMITS):
        self.service = service
        self.limits = limits
        # Frames up to this size are read and, past the decode limits, refused with "too_large";
        # bigger ones drop the connection at the socket (ZeroMQ MAXMSGSIZE) before any allocation.
        self.max_frame_bytes = 2 * max(limits.max_tensor_bytes, limits.max_header_bytes)
        self.replies = ReplyCache()
        self.served = 0
        self.errors = 0
        self.replayed = 0  # resent requests answered from the reply cache
        self._log_window, self._logged, self._suppressed = 0.0, 0, 0

    def handle(self, frames: Sequence[Any], peer: bytes | None = None) -> list:
        """Reply frames for one request; `peer` (the routing id) enables the reply cache."""
        rid = op = None
        try:
            try:
                header, tensors = decode(frames, self.limits)
            except ProtocolError:
                raise
            except Exception as e:  # a gap in the decoder on hostile input is still the peer's fault
                raise ProtocolError(f"malformed message ({type(e).__name__})") from None
            if type(header.get("id")) is int:
                rid = header["id"]
            if isinstance(header.get("op"), str):
                op = header["op"][:64]
            rid, op, args = validate_request(header, tensors)
            sid = header.get("sid")
            cacheable = peer is not None and op not in UNCACHED_OPS
            if cacheable:
                cached = self.replies.get(peer, rid, op, sid)
                if cached is not None:
                    self.replayed += 1
                    return cached
            result, out, gpu_s = self._dispatch(op, args, header, tensors, peer)
            self.served += 1
            frames_out = reply(rid, result, out, gpu_s)
            if cacheable:
                self.replies.put(peer, rid, op, sid, frames_out)
            return frames_out
        except ProtocolError as e:
            self.errors += 1
            message = _version_message(frames) if e.code == "bad_version" and op is None else str(e)
            self._log_error(e.code, op, rid, message, peer)
            return error_reply(rid, e.code, message)
        except Exception as e:  # a bug or a device failure must not take the server down
            self.errors += 1
            self._log_error("internal", op, rid, f"{type(e).__name__}: {e}", peer, traceback.format_exc())
            return error_reply(rid, "internal", f"server error: {type(e).__name__}: {e}")

    def _log_error(
        self, code: str, op: str | None, rid: Any, message: str, peer: bytes | None, trace: str | None = None
    ) -> None:
        """One line per error reply, at most ERROR_LOGS_PER_S a second (a hostile peer must not
        fill the disk); the next line logged says how many were left out."""
        now = time.monotonic()
        if now - self._log_window >= 1.0:
            self._log_window, self._logged = now, 0
        if self._logged >= ERROR_LOGS_PER_S:
            self._suppressed += 1
            return
        self._logged += 1
        fields: dict[str, Any] = {"code": code, "op": op, "id": rid, "peer": _peer_name(peer)}
        fields["msg"] = message[:300]
        if self._suppressed:
            fields["suppressed"], self._suppressed = self._suppressed, 0
        if trace:
            fields["trace"] = trace
        log_event("error", level=logging.ERROR if code == "internal" else logging.WARNING, **fields)

    # ---- sessions: the loop's housekeeping -------------------------------------------------
    def expire_sessions(self, max_idle_s: float) -> int:
        expired = self.service.expire_idle(max_idle_s)
        for s in expired:
            idle = time.monotonic() - s.last_used
            log_event("session_expire", sid=s.sid, idle_s=round(idle, 1), kv_bytes=s.nbytes, **self._load())
        return len(expired)

    def drop_sessions(self, reason: str) -> int:
        sessions = list(self.service.sessions.values())
        self.service.sessions.clear()
        for s in sessions:
            log_event("session_drop", sid=s.sid, reason=reason, kv_bytes=s.nbytes, sessions=0)
        return len(sessions)

    def _load(self) -> dict[str, int]:
        return {"sessions": len(self.service.sessions), "kv_bytes_total": self.service.kv_bytes}

    def _dispatch(
        self, op: str, args: dict[str, Any], header: dict[str, Any], t: list, peer: bytes | None = None
    ) -> tuple[dict, list, float]:
        s = self.service
        if op == "Ping":
            n = args.get("reply_bytes", 0)
            cap = min(self.limits.max_tensor_bytes, MAX_PING_REPLY_BYTES)
            if not 0 <= n <= cap:
                raise ProtocolError(f"Ping: reply_bytes must lie in [0, {cap}]", "bad_args")
            return {"sessions": len(s.sessions)}, ([np.zeros(n // 4, np.float32)] if n else []), 0.0
        if op == "Init":
            (result, tensors), dt = s.timed(s.init)
            result = {**result, "version": PROTOCOL_VERSION, "max_message_bytes": self.max_frame_bytes}
            return result, tensors, dt
        if op == "OpenSession":
            result = s.open_session(args["batch"], args["max_tokens"], args.get("f32", False))
            log_event(
                "session_open",
                sid=result["sid"],
                batch=args["batch"],
                max_tokens=args["max_tokens"],
                peer=_peer_name(peer),
                **self._load(),
            )
            return result, [], 0.0
        if op == "CloseSession":
            closed = s.close_session(header["sid"])
            age = time.monotonic() - closed.opened
            log_event(
                "session_close", sid=closed.sid, age_s=round(age, 1), kv_bytes=closed.nbytes, **self._load()
            )
            return {}, [], 0.0
        sid = header.get("sid")
        t0 = time.perf_counter()
        if op == "RingLinear":  # ring elements in, ring elements out: no wire dtype applies
            out = s.ring_linear(args["layer"], args["site"], t[0])
            return {}, [out], time.perf_counter() - t0
        wire = wire_name(header, 0)
        if op in ("Embedding", "EmbedQKV"):  # their only tensors are token ids and positions
            wire = args.get("dtype", "float32")
            if wire not in WIRE_DTYPES:
                raise ProtocolError(f"{op}: dtype must be one of {WIRE_DTYPES}", "bad_args")
        session = s.session(sid) if sid is not None and op in SESSION_USERS else None
        s.exact = args.get("f32", False)  # float32 results for the runner's --verify
        try:
            out = self._compute(op, args, t, session)
        finally:
            s.exact = False
        return {}, reply_tensors(out, wire), time.perf_counter() - t0

    def _compute(self, op: str, args: dict[str, Any], t: list, session) -> Any:
        s = self.service
        if op == "Embedding":
            out = s.embedding(t[0])
        elif op == "Linear":
            out = s.linear(args["layer"], args["module"], t[0])
        elif op == "Matmul":
            out = s.matmul(t[0], t[1])
        elif op == "LMHead":
            out = s.lm_head(t[0], args.get("top_k"))
        elif op == "QKV":
            if (session is None) != (len(t) == 1):
                raise ProtocolError("QKV: positions are given exactly when a session is", "bad_args")
            out = s.qkv(args["layer"], t[0], session, t[1] if session else None)
        elif op == "GateUp":
            out = s.gate_up(args["layer"], t[0])
        elif op == "AttnScores":
            out = s.attn_scores(session, args["layer"], t[0], t[1], t[2], t[3] if len(t) == 4 else None)
        elif op == "AttnOut":
            out = s.attn_out(session, args["layer"], t[0])
        elif op == "WriteKV":
            out = s.write_kv(session, args["layer"], t[0], t[1], t[2])
        elif op == "EmbedQKV":
            out = s.embed_qkv(t[0], session, t[1] if len(t) == 2 else None)
        elif op == "DownQKV":
            out = s.down_qkv(args["layer"], t[0], t[1], session, t[2] if len(t) == 3 else None)
        elif op == "DownLMHead":
            out = s.down_lm_head(t[0], t[1], t[2] if len(t) == 3 else None, args.get("top_k"))
        elif op == "OGateUp":
            out = s.o_gate_up(args["layer"], t[0], t[1])
        elif op == "AttnOutGateUp":
            out = s.attn_out_gate_up(session, args["layer"], t[0], t[1])
        else:  # validate_request only admits known ops; this guards a missing branch
            raise ProtocolError(f"operation {op!r} is not implemented by this server", "unknown_op")
        return out


def reply_tensors(out: torch.Tensor | np.ndarray | TopK | tuple, wire: str) -> list:
    """An operation's result(s) -> reply tensors: activations in the wire dtype; a top-k result
    as float32 values and int64 ids, whatever the wire dtype."""
    parts = out if isinstance(out, tuple) and not isinstance(out, TopK) else (out,)
    tensors: list = []
    for part in parts:
        if isinstance(part, TopK):
            tensors += [part.values.cpu().numpy(), part.ids.cpu().numpy()]
        else:
            tensors.append(to_wire(part, wire))
    return tensors


def to_wire(t: torch.Tensor | np.ndarray, wire: str) -> np.ndarray | Int8Rows:
    """A result tensor -> numpy in the wire dtype (int8: quantized per row on the device). A
    numpy result (a float32 CPU server's, gpu/service.py `_rows`) goes out as it is on a
    float32 wire."""
    if isinstance(t, np.ndarray):
        if wire == "float32" and t.dtype == np.float32:
            return t
        t = torch.from_numpy(t)
    if wire == "int8":
        t = t.float()
        scale = t.abs().amax(dim=-1) / 127.0
        q = torch.round(t / torch.where(scale > 0, scale, 1.0).unsqueeze(-1)).clamp_(-127, 127)
        return Int8Rows(q.to(torch.int8).cpu().numpy(), scale.cpu().numpy())
    dt = TORCH_DTYPES[wire]
    if t.dtype != dt:
        t = t.to(dt)
    if not t.is_cpu:
        t = t.cpu()
    if wire == "bfloat16":
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _version_message(frames: Sequence[Any]) -> str:
    """The bad_version reply: both versions, and what to do."""
    try:
        theirs = msgpack.unpackb(getattr(frames[0], "buffer", frames[0]), raw=False).get("v")
    except Exception:
        theirs = None
    return (
        f"the request speaks protocol version {theirs!r}, this server speaks version {PROTOCOL_VERSION}; "
        "run the same teesplit release on both sides"
    )


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


def log_server_stop(handler: RequestHandler, address: str, dropped: int) -> None:
    """The last line a server logs, whatever its transport."""
    log_event(
        "server_stop",
        f"server on {address} stopped after {handler.served} requests ({handler.errors} errors, "
        f"{handler.replayed} resends answered from the cache, {dropped} sessions dropped)",
        address=address,
        served=handler.served,
        errors=handler.errors,
        replayed=handler.replayed,
        sessions_dropped=dropped,
    )


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
            handler._log_error("bad_message", None, None, "missing empty delimiter frame", peer)
            err = error_reply(None, "bad_message", "missing empty delimiter frame")
            sock.send_multipart([frames[0], b"", *err])
        return
    envelope, message = parts
    peer = bytes(envelope[0].buffer)
    sock.send_multipart([*envelope, *handler.handle(message, peer)], copy=False)
    handler.replies.settle()  # the reply cache's bookkeeping, now that the reply is out
