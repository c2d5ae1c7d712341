"""The GPU server's request handling, shared by its transports (UNTRUSTED side).

`RequestHandler.handle` turns request frames into reply frames and never raises: every
malformed or hostile request gets an error reply with a stable code, and the server keeps
serving. The loops that carry the frames are `zmq_server.serve` (ZeroMQ ROUTER) and
`shm_server.serve_shm` (shared memory); `tp.py` runs the same handler on rank 0 of a
tensor-parallel group.

Each operation of `protocol.OPS` has one handler method here, registered in `OPERATIONS` by
the `@operation` decorator; `dispatch` finds it through that table. What the operations have in
common is done once, by `dispatch`, from the operation's `OpSpec`: the reply's wire dtype, the
session lookup, `f32`, timing, and putting the result on the wire. Adding an operation is an
entry in `protocol.OPS` and a method here (the module refuses to load if one lacks the other).

Robustness, all bounded:
- a resent request (same routing id, same request id: the runner's retry after a timeout) is
  answered from a small reply cache instead of being computed again (`ReplyCache`);
- sessions unused for a while are dropped by the serving loop (`expire_sessions`);
- one log line per session event and per error reply (errors at most ERROR_LOGS_PER_S a
  second; the rest are counted in the next line), as text or JSON (`configure_logging`).
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import msgpack
import numpy as np
import torch

from teesplit.gpu.service import TORCH_DTYPES, GPUComputeService, Session, TopK
from teesplit.protocol import (
    DEFAULT_LIMITS,
    OPS,
    PROTOCOL_VERSION,
    WIRE_DTYPES,
    Int8Rows,
    Limits,
    OpSpec,
    ProtocolError,
    decode,
    error_reply,
    reply,
    validate_request,
    wire_name,
)

log = logging.getLogger("teesplit.server")

MAX_PING_REPLY_BYTES = 64 << 20
ERROR_LOGS_PER_S = 20


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


def log_event(
    event: str,
    message: str | None = None,
    level: int = logging.INFO,
    logger: logging.Logger = log,
    **fields: Any,
) -> None:
    """One structured line: `event` and its fields (text: "event k=v ..." or `message`)."""
    text = message or " ".join([event, *(f"{k}={v}" for k, v in fields.items())])
    logger.log(level, "%s", text, extra={"event": event, "fields": fields})


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


def peer_name(peer: bytes | None) -> str | None:
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


# ---- one request, as an operation's handler sees it ------------------------------------------------
@dataclass(slots=True)  # one per request: slots make it cheaper to build
class Call:
    """A request that passed `validate_request`."""

    op: str
    args: dict[str, Any]
    tensors: list  # decoded numpy arrays, in frame order
    sid: int | None = None
    session: Session | None = None  # resolved from sid for operations that use one (OpSpec.session)
    peer: bytes | None = None
    # Who asks: the CURVE public key when the link has CURVE, else the connection's routing id
    # (the shm client id). Sessions belong to the identity that opened them.
    owner: bytes | None = None
    # OpenSession: the id to give the new session; None lets the service draw one. Never taken
    # from the request (a runner must not choose it): rank 0 of a tensor-parallel group draws it
    # and hands it to the other ranks (gpu/tp.py).
    new_sid: int | None = None


class Reply:
    """What a handler returns when its reply has a result map; other handlers return their
    output tensors alone (torch, numpy, TopK, or a tuple of them). (A plain class: a NamedTuple
    costs a microsecond to build, and the shm loop's warm-up makes one after every request.)"""

    __slots__ = ("res", "out")

    def __init__(self, res: dict[str, Any], out: Any = None):
        self.res, self.out = res, out


Handler = Callable[["RequestHandler", Call], Any]
OPERATIONS: dict[str, Handler] = {}  # operation name -> its handler method, filled by @operation


def operation(*names: str) -> Callable[[Handler], Handler]:
    """Register the decorated RequestHandler method as the handler of the operations `names`."""
    for name in names:
        if name not in OPS:
            raise ValueError(f"operation {name!r} is not declared in protocol.OPS")

    def register(fn: Handler) -> Handler:
        for name in names:
            if name in OPERATIONS:
                raise ValueError(f"operation {name!r} has two handlers")
            OPERATIONS[name] = fn
        return fn

    return register


# ---- the handler -------------------------------------------------------------------------------------
class RequestHandler:
    def __init__(self, service: GPUComputeService, limits: Limits = DEFAULT_LIMITS):
        self.service = service
        self.limits = limits
        # No frame of a request can be larger: a bigger one drops the connection at the socket
        # (ZeroMQ MAXMSGSIZE; the shm region header) before anything is allocated for it.
        self.max_frame_bytes = limits.max_frame_bytes
        # Nor can a result: the product is refused before it is computed (results are float32 at
        # most, so no reply tensor is larger than a request tensor may be).
        service.max_elements = min(service.max_elements, max(1, limits.max_tensor_bytes // 4))
        self.replies = ReplyCache()
        self.served = 0
        self.errors = 0
        self.replayed = 0  # resent requests answered from the reply cache
        self._log_window, self._logged, self._suppressed = 0.0, 0, 0

    def handle(self, frames: Sequence[Any], peer: bytes | None = None, identity: bytes | None = None) -> list:
        """Reply frames for one request; `peer` (the routing id) enables the reply cache;
        `identity` (default: the peer) owns the sessions the request opens and may use."""
        rid = op = None
        try:
            try:
                header, tensors = decode(frames, self.limits)
            except ProtocolError as e:
                if e.code == "too_large":
                    flag = "the server's limit: `teesplit serve --max-message-mb`"
                    raise ProtocolError(f"{e} ({flag})", e.code) from None
                raise
            except Exception as e:  # a gap in the decoder on hostile input is still the peer's fault
                raise ProtocolError(f"malformed message ({type(e).__name__})") from None
            if type(header.get("id")) is int:
                rid = header["id"]
            if isinstance(header.get("op"), str):
                op = header["op"][:64]
            rid, op, args = validate_request(header, tensors)
            sid = header.get("sid")
            cacheable = peer is not None and OPS[op].cacheable
            if cacheable:
                cached = self.replies.get(peer, rid, op, sid)
                if cached is not None:
                    self.replayed += 1
                    return cached
            result, out, gpu_s = self.dispatch(op, args, header, tensors, peer, identity or peer)
            self.served += 1
            frames_out = reply(rid, result, out, gpu_s)
            if cacheable:
                self.replies.put(peer, rid, op, sid, frames_out)
            return frames_out
        except ProtocolError as e:
            self.errors += 1
            message = _version_message(frames) if e.code == "bad_version" and op is None else str(e)
            self.log_error(e.code, op, rid, message, peer)
            return error_reply(rid, e.code, message)
        except Exception as e:  # a bug or a device failure must not take the server down
            self.errors += 1
            self.log_error("internal", op, rid, f"{type(e).__name__}: {e}", peer, traceback.format_exc())
            return error_reply(rid, "internal", f"server error: {type(e).__name__}: {e}")

    def dispatch(
        self,
        op: str,
        args: dict[str, Any],
        header: dict[str, Any],
        tensors: list,
        peer: bytes | None = None,
        owner: bytes | None = None,
    ) -> tuple[dict, list, float]:
        """One validated request -> (result map, reply tensors, compute seconds), by its OpSpec."""
        spec = OPS[op]
        if spec.float_weights and self.service.private_only:
            raise ProtocolError(
                f"{op}: this server keeps only the private plans' integer weights (serve "
                "--private-weights); run a private plan, or a server without --private-weights",
                "bad_args",
            )
        wire = self._reply_wire(op, spec, args, header)
        call = Call(op, args, tensors, sid=header.get("sid"), peer=peer, owner=owner)
        if spec.session != "none" and call.sid is not None:
            call.session = self.service.session(call.sid, owner)
        t0 = time.perf_counter()
        out = self.run(spec, call)
        res, out = (out.res, out.out) if type(out) is Reply else ({}, out)
        if out is None:
            out = []
        elif wire is not None:
            out = reply_tensors(out, wire)
        return res, out, (time.perf_counter() - t0) if spec.compute else 0.0

    def run(self, spec: OpSpec, call: Call) -> Any:
        """The operation's handler, in float32 for a request with `f32` (the runner's --verify).
        A tensor-parallel rank 0 overrides this to share the work with the other ranks."""
        if not spec.f32:
            return OPERATIONS[call.op](self, call)
        s = self.service
        s.exact = call.args.get("f32", False)
        try:
            return OPERATIONS[call.op](self, call)
        finally:
            s.exact = False

    def tick(self) -> None:
        """Called by the serving loops between requests (at least once a second, also when
        idle); a tensor-parallel rank 0 checks on its group here (tp_runtime.py)."""

    def sessions_dropped(self, sids: list[int]) -> None:
        """Sessions this server has just dropped (expired, or their runner gone); a
        tensor-parallel rank 0 tells the other ranks here."""

    @staticmethod
    def _reply_wire(op: str, spec: OpSpec, args: dict[str, Any], header: dict[str, Any]) -> str | None:
        """The reply activations' wire dtype (None: as computed)."""
        if spec.reply == "input":
            return wire_name(header, 0)
        if spec.reply == "dtype":  # the request's only tensors are token ids and positions
            wire = args.get("dtype", "float32")
            if wire not in WIRE_DTYPES:
                raise ProtocolError(f"{op}: dtype must be one of {WIRE_DTYPES}", "bad_args")
            return wire
        return None

    # ---- the operations: one handler each ------------------------------------------------------
    @operation("Ping")
    def ping(self, c: Call) -> Reply:
        n = c.args.get("reply_bytes", 0)
        cap = min(self.limits.max_tensor_bytes, MAX_PING_REPLY_BYTES)
        if not 0 <= n <= cap:
            raise ProtocolError(f"Ping: reply_bytes must lie in [0, {cap}]", "bad_args")
        return Reply({"sessions": len(self.service.sessions)}, [np.zeros(n // 4, np.float32)] if n else [])

    @operation("Init")
    def init(self, c: Call) -> Reply:
        result, tensors = self.service.init()
        result = {**result, "version": PROTOCOL_VERSION, "max_message_bytes": self.max_frame_bytes}
        return Reply(result, tensors)

    @operation("OpenSession")
    def open_session(self, c: Call) -> Reply:
        batch, max_tokens = c.args["batch"], c.args["max_tokens"]
        f32 = c.args.get("f32", False)
        result = self.service.open_session(batch, max_tokens, f32, sid=c.new_sid, owner=c.owner)
        log_event(
            "session_open",
            sid=result["sid"],
            batch=batch,
            max_tokens=max_tokens,
            peer=peer_name(c.peer),
            **self._load(),
        )
        return Reply(result)

    @operation("CloseSession")
    def close_session(self, c: Call) -> Reply:
        closed = self.service.close_session(c.session.sid, c.owner)
        age = round(time.monotonic() - closed.opened, 1)
        log_event("session_close", sid=closed.sid, age_s=age, kv_bytes=closed.nbytes, **self._load())
        return Reply({})

    @operation("Embedding")
    def embedding(self, c: Call) -> Any:
        return self.service.embedding(c.tensors[0])

    @operation("Linear")
    def linear(self, c: Call) -> Any:
        return self.service.linear(c.args["layer"], c.args["module"], c.tensors[0])

    @operation("Matmul")
    def matmul(self, c: Call) -> Any:
        return self.service.matmul(c.tensors[0], c.tensors[1])

    @operation("LMHead")
    def lm_head(self, c: Call) -> Any:
        return self.service.lm_head(c.tensors[0], c.args.get("top_k"))

    @operation("QKV")
    def qkv(self, c: Call) -> Any:
        t, session = c.tensors, c.session
        if (session is None) != (len(t) == 1):
            raise ProtocolError("QKV: positions are given exactly when a session is", "bad_args")
        return self.service.qkv(c.args["layer"], t[0], session, t[1] if session else None)

    @operation("GateUp")
    def gate_up(self, c: Call) -> Any:
        return self.service.gate_up(c.args["layer"], c.tensors[0])

    @operation("AttnScores")
    def attn_scores(self, c: Call) -> Any:
        t = c.tensors  # q, k, positions, and the merged plans' row scales
        r = t[3] if len(t) == 4 else None
        return self.service.attn_scores(c.session, c.args["layer"], t[0], t[1], t[2], r)

    @operation("AttnOut")
    def attn_out(self, c: Call) -> Any:
        return self.service.attn_out(c.session, c.args["layer"], c.tensors[0])

    @operation("WriteKV")
    def write_kv(self, c: Call) -> Reply:
        k, v, pos = c.tensors
        self.service.write_kv(c.session, c.args["layer"], k, v, pos)
        return Reply({})

    @operation("EmbedQKV")
    def embed_qkv(self, c: Call) -> Any:
        t = c.tensors
        return self.service.embed_qkv(t[0], c.session, t[1] if len(t) == 2 else None)

    @operation("DownQKV")
    def down_qkv(self, c: Call) -> Any:
        t = c.tensors
        return self.service.down_qkv(c.args["layer"], t[0], t[1], c.session, t[2] if len(t) == 3 else None)

    @operation("DownLMHead")
    def down_lm_head(self, c: Call) -> Any:
        t = c.tensors
        return self.service.down_lm_head(t[0], t[1], t[2] if len(t) == 3 else None, c.args.get("top_k"))

    @operation("OGateUp")
    def o_gate_up(self, c: Call) -> Any:
        return self.service.o_gate_up(c.args["layer"], c.tensors[0], c.tensors[1])

    @operation("AttnOutGateUp")
    def attn_out_gate_up(self, c: Call) -> Any:
        return self.service.attn_out_gate_up(c.session, c.args["layer"], c.tensors[0], c.tensors[1])

    # The private plans' products (gpu/ring.py): ring elements in, ring elements out (OpSpec
    # reply "as_is": no wire dtype applies).
    @operation("RingSetup")
    def ring_setup(self, c: Call) -> Reply:  # quantizes once (seconds for a large model)
        return Reply(self.service.ring_setup(c.args["bits"]))

    @operation("RingEmbedQKV", "RingOGateUp", "RingDownQKV", "RingDownLMHead")
    def ring_step(self, c: Call) -> Any:
        out = self.service.ring_step(c.op, c.args, c.tensors)
        return list(out) if isinstance(out, tuple) else [out]

    # ---- errors and sessions: the loops' housekeeping -------------------------------------------
    def log_error(
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
        fields: dict[str, Any] = {"code": code, "op": op, "id": rid, "peer": peer_name(peer)}
        fields["msg"] = message[:300]
        if self._suppressed:
            fields["suppressed"], self._suppressed = self._suppressed, 0
        if trace:
            fields["trace"] = trace
        log_event("error", level=logging.ERROR if code == "internal" else logging.WARNING, **fields)

    def expire_sessions(self, max_idle_s: float) -> int:
        expired = self.service.expire_idle(max_idle_s)
        for s in expired:
            idle = time.monotonic() - s.last_used
            log_event("session_expire", sid=s.sid, idle_s=round(idle, 1), kv_bytes=s.nbytes, **self._load())
        self.sessions_dropped([s.sid for s in expired])
        return len(expired)

    def drop_session(self, sid: int, reason: str) -> bool:
        """Drop one session, if it is still open (a runner that went away)."""
        s = self.service.sessions.pop(sid, None)
        if s is None:
            return False
        left = len(self.service.sessions)
        log_event("session_drop", sid=sid, reason=reason, kv_bytes=s.nbytes, sessions=left)
        self.sessions_dropped([sid])
        return True

    def drop_sessions(self, reason: str) -> int:
        sessions = list(self.service.sessions.values())
        self.service.sessions.clear()
        for s in sessions:
            log_event("session_drop", sid=s.sid, reason=reason, kv_bytes=s.nbytes, sessions=0)
        return len(sessions)

    def _load(self) -> dict[str, int]:
        return {"sessions": len(self.service.sessions), "kv_bytes_total": self.service.kv_bytes}


_missing = set(OPS) - set(OPERATIONS)
if _missing:  # a declared operation without a handler: refuse to serve rather than answer unknown_op
    raise ImportError(f"operations without a handler in gpu/handler.py: {', '.join(sorted(_missing))}")


# ---- results on the wire ------------------------------------------------------------------------
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
