"""The GPU server's request handling and ZeroMQ loop (UNTRUSTED side).

`RequestHandler.handle` turns request frames into reply frames and never raises: every
malformed or hostile request gets an error reply with a stable code, and the server keeps
serving. `serve` runs it behind a ROUTER socket so several runners can connect at once.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import traceback
from collections.abc import Sequence
from typing import Any

import ml_dtypes
import numpy as np
import torch
import zmq

from teesplit.gpu.service import TORCH_DTYPES, GPUComputeService
from teesplit.protocol import (
    DEFAULT_LIMITS,
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


class RequestHandler:
    def __init__(self, service: GPUComputeService, limits: Limits = DEFAULT_LIMITS):
        self.service = service
        self.limits = limits
        self.served = 0
        self.errors = 0

    def handle(self, frames: Sequence[Any]) -> list:
        rid = None
        try:
            header, tensors = decode(frames, self.limits)
            if isinstance(header.get("id"), int):
                rid = header["id"]
            rid, op, args = validate_request(header, tensors)
            result, out, gpu_s = self._dispatch(op, args, header, tensors)
            self.served += 1
            return reply(rid, result, out, gpu_s)
        except ProtocolError as e:
            self.errors += 1
            return error_reply(rid, e.code, str(e))
        except Exception as e:  # a bug or a device failure must not take the server down
            self.errors += 1
            log.error("internal error: %s", traceback.format_exc())
            return error_reply(rid, "internal", f"server error: {type(e).__name__}: {e}")

    def _dispatch(
        self, op: str, args: dict[str, Any], header: dict[str, Any], t: list
    ) -> tuple[dict, list, float]:
        s = self.service
        if op == "Ping":
            n = args.get("reply_bytes", 0)
            if not 0 <= n <= self.limits.max_tensor_bytes:
                raise ProtocolError(
                    f"Ping: reply_bytes must lie in [0, {self.limits.max_tensor_bytes}]", "bad_args"
                )
            return {}, ([np.zeros(n // 4, np.float32)] if n else []), 0.0
        if op == "Init":
            (result, tensors), dt = s.timed(s.init)
            return result, tensors, dt
        if op == "OpenSession":
            return s.open_session(args["batch"], args["max_tokens"]), [], 0.0
        if op == "CloseSession":
            s.close_session(header["sid"])
            return {}, [], 0.0
        sid = header.get("sid")
        wire = wire_name(header, 0)
        t0 = time.perf_counter()
        if op == "Embedding":
            wire = args.get("dtype", "float32")
            if wire not in WIRE_DTYPES:
                raise ProtocolError(f"Embedding: dtype must be one of {WIRE_DTYPES}", "bad_args")
            out = s.embedding(t[0])
        elif op == "Linear":
            out = s.linear(args["layer"], args["module"], t[0])
        elif op == "Matmul":
            out = s.matmul(t[0], t[1])
        elif op == "LMHead":
            out = s.lm_head(t[0], args.get("top_k"))
            if isinstance(out, tuple):  # top-k: float32 values and int64 ids, whatever the wire dtype
                values, ids = out
                result = [values.cpu().numpy(), ids.cpu().numpy()]
                return {}, result, time.perf_counter() - t0
        elif op == "QKV":
            session = s.session(sid) if sid is not None else None
            if (session is None) != (len(t) == 1):
                raise ProtocolError("QKV: positions are given exactly when a session is", "bad_args")
            out = s.qkv(args["layer"], t[0], session, t[1] if session else None)
        elif op == "GateUp":
            out = s.gate_up(args["layer"], t[0])
        elif op == "AttnScores":
            r = t[3] if len(t) == 4 else None
            out = s.attn_scores(s.session(sid), args["layer"], t[0], t[1], t[2], r)
        elif op == "AttnOut":
            out = s.attn_out(s.session(sid), args["layer"], t[0])
        elif op in MERGED_OPS:
            return {}, self._merged(op, args, sid, wire, t), time.perf_counter() - t0
        else:  # validate_request only admits known ops; this guards a missing branch
            raise ProtocolError(f"operation {op!r} is not implemented by this server", "unknown_op")
        result = to_wire(out, wire)
        return {}, [result], time.perf_counter() - t0

    def _merged(self, op: str, args: dict[str, Any], sid: int | None, wire: str, t: list) -> list:
        """The merged plans' operations: two (or three, with top-k) tensors come back."""
        s = self.service
        session = s.session(sid) if sid is not None else None
        if op == "EmbedQKV":
            wire = args.get("dtype", "float32")  # the request's only tensors are ids and positions
            if wire not in WIRE_DTYPES:
                raise ProtocolError(f"EmbedQKV: dtype must be one of {WIRE_DTYPES}", "bad_args")
            out = s.embed_qkv(t[0], session, t[1] if len(t) == 2 else None)
        elif op == "DownQKV":
            out = s.down_qkv(args["layer"], t[0], t[1], session, t[2] if len(t) == 3 else None)
        elif op == "DownLMHead":
            out = s.down_lm_head(t[0], t[1], t[2] if len(t) == 3 else None, args.get("top_k"))
            if len(out) == 3:  # top-k: y in the wire dtype, float32 values and int64 ids
                y, values, ids = out
                return [to_wire(y, wire), values.cpu().numpy(), ids.cpu().numpy()]
        elif op == "OGateUp":
            out = s.o_gate_up(args["layer"], t[0], t[1])
        else:  # AttnOutGateUp
            if session is None:
                raise ProtocolError("AttnOutGateUp needs a session id", "no_session")
            out = s.attn_out_gate_up(session, args["layer"], t[0], t[1])
        return [to_wire(o, wire) for o in out]


MERGED_OPS = ("EmbedQKV", "DownQKV", "DownLMHead", "OGateUp", "AttnOutGateUp")


def to_wire(t: torch.Tensor, wire: str) -> np.ndarray | Int8Rows:
    """A result tensor -> numpy in the wire dtype (int8: quantized per row on the device)."""
    if wire == "int8":
        t = t.float()
        scale = t.abs().amax(dim=-1) / 127.0
        q = torch.round(t / torch.where(scale > 0, scale, 1.0).unsqueeze(-1)).clamp_(-127, 127)
        return Int8Rows(q.to(torch.int8).cpu().numpy(), scale.cpu().numpy())
    t = t.to(TORCH_DTYPES[wire]).cpu()
    if wire == "bfloat16":
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


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
) -> None:
    """Serve until `stop` is set or SIGINT/SIGTERM arrives (when run in the main thread)."""
    stop = stop or threading.Event()
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, handler.limits.max_tensor_bytes + handler.limits.max_header_bytes)
    sock.bind(address)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    if ready is not None:
        ready.set()
    sock.setsockopt(zmq.RCVTIMEO, 100)  # wake up to check `stop`; no poll call per message
    try:
        while not stop.is_set():
            try:
                frames = sock.recv_multipart(copy=False)
            except zmq.Again:
                continue
            parts = split_envelope(frames)
            if parts is None:
                # No delimiter: not one of our clients. Answer on the identity alone if there is one.
                if len(frames) >= 2:
                    err = error_reply(None, "bad_message", "missing empty delimiter frame")
                    sock.send_multipart([frames[0], b"", *err])
                continue
            envelope, message = parts
            sock.send_multipart([*envelope, *handler.handle(message)], copy=False)
    finally:
        sock.close(0)
        log.info(
            "server on %s stopped after %d requests (%d errors)", address, handler.served, handler.errors
        )
