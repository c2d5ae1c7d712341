"""The plain port: one method per remote operation, over a transport (TRUSTED side).

`GPUClient` implements `tee.port.GPUPort`, what the model may ask of the GPU, by sending each
call as one request and checking the reply's shapes and dtypes. It also keeps the seed's
numbers: RPCs by operation, bytes each way, and time spent waiting on the link versus
computing on the GPU. `tee/verify.py` and `tee/private.py` build the other ports on top of it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np

from teesplit import protocol
from teesplit.config import ModelConfig
from teesplit.protocol import (
    DTYPES,
    WIRE_DTYPES,
    Int8Rows,
    ProtocolError,
    RemoteError,
    parse_reply,
    quantize_int8,
    request,
)
from teesplit.tee.port import InitResult, Metrics
from teesplit.transport import ConnectionLost, GPUServerUnavailable, ServerUnreachable

_F32, _I64 = np.dtype(np.float32), np.dtype(np.int64)
SMALL_REPLY_BYTES = 1 << 20  # a reply of no tensors (a result map, an error): its header alone
INIT_REPLY_BYTES = 32 << 20  # Init's norm weights and biases, for any real model


def _nbytes(frames: list) -> int:
    n = 0
    for f in frames:  # a loop, not sum() over a generator: this runs for every reply
        n += len(f) if type(f) is bytes else len(getattr(f, "buffer", f))
    return n


class ProtocolVersionMismatch(ProtocolError):
    """The GPU server speaks another protocol version than this runner."""

    def __init__(self, address: str, client_version: Any, server_version: Any):
        super().__init__(
            f"protocol version mismatch: this runner speaks version {client_version}, the GPU server "
            f"at {address} speaks version {server_version}; run the same teesplit release on both sides",
            "bad_version",
        )
        self.client_version = client_version
        self.server_version = server_version


def _reply_header(frames: list) -> dict[str, Any]:
    """The raw header of a reply that did not parse (its id, its version), or {}."""
    try:
        header = msgpack.unpackb(getattr(frames[0], "buffer", frames[0]), raw=False)
    except Exception:  # a malformed header: nothing to learn from it
        return {}
    return header if isinstance(header, dict) else {}


class GPUClient:
    """The plain port (`tee.port.GPUPort`) over a transport."""

    private = False  # what crosses is in the clear: the private plans refuse this port

    def __init__(self, transport, wire_dtype: str = "float32", retries: int = 0):
        """`retries`: how many times a request that got no reply (timeout or lost connection) is
        sent again, on a fresh connection and with the same request id, before the call raises
        GPUServerUnavailable."""
        if wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire dtype must be one of {', '.join(WIRE_DTYPES)}, got {wire_dtype!r}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self.transport = transport
        self.wire_dtype = wire_dtype
        self.retries = retries
        self.retried = 0  # requests sent again after a failed try, over the client's life
        self.max_message_bytes: int | None = None  # the server's cap per frame, known after init()
        self.metrics = Metrics()
        self.config: ModelConfig | None = None  # known after init()
        self._next_id = 1
        self.f32_results = False  # --verify: ask for float32 results (protocol.F32_OPS)

    @property
    def address(self) -> str:
        return self.transport.address

    def call(
        self,
        op: str,
        args: dict[str, Any] | None = None,
        tensors: tuple = (),
        sid: int | None = None,
        after_send: Callable[[], None] | None = None,
        reply_bytes: int = SMALL_REPLY_BYTES,
    ) -> tuple[dict[str, Any], list[np.ndarray]]:
        """One request, one reply. A try that gets no reply (timeout, lost connection) is sent
        again with the same request id on a fresh connection, `retries` times; the server
        answers a repeated id from its reply cache. `after_send` runs once the first try is out
        (work that can overlap the server's). `reply_bytes`: the largest reply frame this request
        can get; the transport refuses a larger one before it is allocated."""
        rid = self._next_id
        self._next_id += 1
        if op == "Init":  # the version handshake: the server answers with its own version
            args = {**(args or {}), "version": protocol.PROTOCOL_VERSION}
        if self.f32_results and op in protocol.F32_OPS:
            args = {**(args or {}), "f32": True}
        if op == "Ping" and args and type(args.get("reply_bytes")) is int:  # it says its reply's size
            reply_bytes = max(reply_bytes, args["reply_bytes"])
        frames = request(rid, op, args, tensors, sid)
        sent = self._check_sizes(op, frames)
        expect = getattr(self.transport, "expect", None)
        if expect is not None:
            expect(max(reply_bytes, SMALL_REPLY_BYTES))
        t0 = time.perf_counter()
        header, out, reply_frames = self._exchange(op, rid, frames, after_send)
        if op == "Init":
            self._handshake(header.get("res", {}))
        m = self.metrics
        m.rpc_wall_s += time.perf_counter() - t0
        m.gpu_s += float(header.get("gpu_s", 0.0))
        m.rpc[op] += 1
        m.bytes_to_gpu += sent
        m.bytes_from_gpu += _nbytes(reply_frames)
        return header.get("res", {}), out

    def _check_sizes(self, op: str, frames: list) -> int:
        """The request's size in bytes; refused here if a frame exceeds the server's limit."""
        sent = biggest = 0
        for f in frames:  # request() makes bytes and flat byte views
            n = len(f)
            sent += n
            if n > biggest:
                biggest = n
        cap = self.max_message_bytes
        if cap is not None and biggest > cap:
            raise ProtocolError(
                f"{op}: a frame of {biggest} bytes exceeds the GPU server's limit of {cap} bytes "
                "(its --max-message-mb); use a smaller batch or prompt",
                "too_large",
            )
        return sent

    def _exchange(
        self, op: str, rid: int, frames: list, after_send: Callable[[], None] | None
    ) -> tuple[dict[str, Any], list[np.ndarray], list]:
        """Send, and wait for the reply to `rid`: up to 1 + retries tries, each on a fresh
        connection after the first."""
        timeout = getattr(self.transport, "timeout_s", None)
        tries = 1 + self.retries
        lost = ""  # what the last lost connection said
        for attempt in range(tries):
            if attempt:
                self.retried += 1
                self.transport.reconnect()  # drops anything still queued for the failed try
            self.transport.send(frames)
            if after_send is not None:
                after_send, run = None, after_send
                run()
            try:
                return self._await_reply(op, rid, None if timeout is None else time.monotonic() + timeout)
            except ServerUnreachable as e:
                # Nothing to resend to: give up now, and start the next call on a fresh
                # connection (nothing of this one's queue is kept).
                self.transport.reconnect()
                what = f"no reply from the GPU server at {self.address} to {op}"
                raise GPUServerUnavailable(f"{what}: {e}") from None
            except ConnectionLost as e:
                lost = str(e)
            except GPUServerUnavailable:
                pass
        what = f"{tries} {'try' if tries == 1 else 'tries'}" + (f" of {timeout:g} s" if timeout else "")
        raise GPUServerUnavailable(
            f"no reply from the GPU server at {self.address} to {op} after {what}"
            f"{f' ({lost})' if lost else ''}; is `teesplit serve` running there?"
        )

    def _await_reply(
        self, op: str, rid: int, deadline: float | None
    ) -> tuple[dict[str, Any], list[np.ndarray], list]:
        """The reply to request `rid`: replies to other ids (late answers to a try given up)
        are dropped. Raises what the reply says (RemoteError), or ProtocolError."""
        while True:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.001)
            reply_frames = self.transport.recv(left)
            try:
                header, out = parse_reply(reply_frames, op)
            except RemoteError:
                if _reply_header(reply_frames).get("id") != rid:
                    continue  # a late error reply to an earlier request
                raise
            except ProtocolError as e:
                if e.code == "bad_version":
                    theirs = _reply_header(reply_frames).get("v")
                    raise ProtocolVersionMismatch(self.address, protocol.PROTOCOL_VERSION, theirs) from None
                raise
            if header.get("id") == rid:
                return header, out, reply_frames

    def _handshake(self, res: dict[str, Any]) -> None:
        """Init's reply: the server's protocol version, and its cap on a frame's size."""
        if "version" in res and res["version"] != protocol.PROTOCOL_VERSION:
            raise ProtocolVersionMismatch(self.address, protocol.PROTOCOL_VERSION, res["version"])
        if type(res.get("max_message_bytes")) is int and res["max_message_bytes"] > 0:
            self.max_message_bytes = res["max_message_bytes"]

    def _call_one(
        self, op: str, args: dict[str, Any], tensors: tuple, shape: tuple[int, ...], sid: int | None = None
    ) -> np.ndarray:
        """One RPC whose reply is one activation of a known shape, returned as float32."""
        return self._call_many(op, args, tensors, [shape], sid)[0]

    def _call_many(
        self,
        op: str,
        args: dict[str, Any],
        tensors: tuple,
        shapes: list[tuple[int, ...]],
        sid: int | None = None,
        top_k_ids: bool = False,
        after_send: Callable[[], None] | None = None,
    ) -> list[np.ndarray]:
        """One RPC whose reply tensors have known shapes: activations come back as float32; with
        `top_k_ids` the last tensor is token ids, which must lie in the vocabulary."""
        # float32 (the widest float on the wire) per element, int64 ids for top-k
        biggest = max(math.prod(s) for s in shapes) * (8 if top_k_ids else 4)
        _, out = self.call(op, args, tensors, sid, after_send, reply_bytes=biggest)
        if [o.shape for o in out] != shapes:
            raise ProtocolError(f"{op}: expected tensors of shapes {shapes}, got {[o.shape for o in out]}")
        acts = out[:-1] if top_k_ids else out
        result = []
        # A loop, not generators (this runs for every reply): activations float32 as sent, or
        # float16/bfloat16 widened to it; never int64 ids.
        for o in acts:
            dt = o.dtype
            if dt is not _F32:
                if dt == _I64:
                    raise ProtocolError(f"{op}: expected float tensors, got {[str(o.dtype) for o in acts]}")
                o = o.astype(np.float32)
            result.append(o)
        if top_k_ids:
            ids = out[-1]
            if ids.dtype != np.int64 or (ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size)):
                raise ProtocolError(f"{op}: token ids out of the vocabulary")
            result.append(ids)
        return result

    def _wire(self, x: np.ndarray) -> np.ndarray | Int8Rows:
        wire_dtype = self.wire_dtype
        if wire_dtype == "float32" and x.dtype is _F32:  # the common case: nothing to convert
            return x
        if wire_dtype == "int8":
            return quantize_int8(x)
        return x.astype(DTYPES[wire_dtype], copy=False)

    # ---- the seed's operations -------------------------------------------------------------
    def init(self) -> InitResult:
        res, tensors = self.call("Init", reply_bytes=INIT_REPLY_BYTES)
        try:
            config = ModelConfig.from_dict(dict(res["config"], rope=res["rope"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolError(f"Init: malformed config in reply: {e}") from None
        expected = (2 * config.num_layers + 1, config.hidden_size)
        names = res.get("biases", [])
        c = config
        widths = {
            "qkv": c.q_dim + 2 * c.kv_dim,
            "o": c.hidden_size,
            "gate_up": 2 * c.intermediate_size,
            "down": c.hidden_size,
        }
        if not isinstance(names, list) or not set(names) <= set(widths) or len(tensors) != 1 + len(names):
            raise ProtocolError("Init: malformed bias list in reply")
        if tensors[0].shape != expected:
            raise ProtocolError(f"Init: expected norm weights of shape {expected}")
        biases = {}
        for name, t in zip(names, tensors[1:], strict=True):
            if t.shape != (c.num_layers, widths[name]):
                raise ProtocolError(f"Init: bias {name!r} has shape {t.shape}")
            biases[name] = t.astype(np.float32)
        self.config = config
        dtype = res.get("dtype", "float32")
        if dtype not in ("float32", "float16", "bfloat16"):
            raise ProtocolError(f"Init: unknown compute dtype {dtype!r}")
        return InitResult(config=config, norms=tensors[0].astype(np.float32), biases=biases, dtype=dtype)

    def embedding(self, ids: np.ndarray) -> np.ndarray:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        return self._call_one(
            "Embedding", {"dtype": self.wire_dtype}, (ids,), (*ids.shape, self.config.hidden_size)
        )

    def linear(self, layer: int, module: str, x: np.ndarray) -> np.ndarray:
        out_features = self.config.linear_shapes[module][0]
        return self._call_one(
            "Linear", {"layer": layer, "module": module}, (self._wire(x),), (*x.shape[:-1], out_features)
        )

    def matmul(self, a: np.ndarray, b: np.ndarray, *, layer: int | None = None, what: str = "") -> np.ndarray:
        """a @ b (the seed's Matmul); `layer` and `what` only name it (the verified port's checks)."""
        return self._call_one("Matmul", {}, (self._wire(a), self._wire(b)), (*a.shape[:-1], b.shape[-1]))

    def lm_head(self, x: np.ndarray, after_send: Callable[[], None] | None = None) -> np.ndarray:
        shape = (*x.shape[:-1], self.config.vocab_size)
        return self._call_many("LMHead", {}, (self._wire(x),), [shape], after_send=after_send)[0]

    def lm_head_top_k(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Only the k largest logits and their token ids: (B, T, k) each."""
        shape = (*x.shape[:-1], k)
        values, ids = self._call_many(
            "LMHead", {"top_k": k}, (self._wire(x),), [shape, shape], top_k_ids=True
        )
        return values, ids

    # ---- fused projections and the GPU-side KV cache -------------------------------------
    def qkv(
        self,
        layer: int,
        x: np.ndarray,
        sid: int | None = None,
        pos: np.ndarray | None = None,
        with_v: bool = False,
    ) -> np.ndarray:
        """q|k|v (B, T, (H + 2 Hkv) D); with a session, v stays in its cache and q|k come back,
        or q|k|v with `with_v` (a server answers that for float32 results: the verified port)."""
        c = self.config
        tensors = (self._wire(x),) if sid is None else (self._wire(x), np.asarray(pos, np.int64))
        n = c.q_dim + c.kv_dim + (c.kv_dim if sid is None or with_v else 0)
        return self._call_one("QKV", {"layer": layer}, tensors, (*x.shape[:-1], n), sid)

    def gate_up(self, layer: int, x: np.ndarray) -> np.ndarray:
        return self._call_one(
            "GateUp", {"layer": layer}, (self._wire(x),), (*x.shape[:-1], 2 * self.config.intermediate_size)
        )

    def attn_scores(
        self, sid: int, layer: int, q: np.ndarray, k: np.ndarray, pos: np.ndarray, r: np.ndarray | None = None
    ) -> np.ndarray:
        """Store the rotated k at pos in the session's cache; q Kᵀ over the whole cache. With the
        row scales r (B, T) (merged plans), the session's pending v enters the cache first."""
        B, H, T, _ = q.shape
        pos = np.asarray(pos, np.int64)
        S = max(pos.reshape(-1).tolist()) + T  # a list's max: np.max costs microseconds on a few rows
        tensors = (self._wire(q), self._wire(k), pos)
        if r is not None:
            tensors += (np.ascontiguousarray(r.reshape(B, T), np.float32),)
        return self._call_one("AttnScores", {"layer": layer}, tensors, (B, H, T, S), sid)

    def attn_out(self, sid: int, layer: int, p: np.ndarray) -> np.ndarray:
        """o_proj(P V) with V from the session's cache."""
        B, _, T, _ = p.shape
        return self._call_one(
            "AttnOut", {"layer": layer}, (self._wire(p),), (B, T, self.config.hidden_size), sid
        )

    def write_kv(self, sid: int, layer: int, k: np.ndarray, v: np.ndarray, pos: np.ndarray) -> None:
        """Store rotated keys and values (B, Hkv, T, D) computed here at pos (B,) in the session's
        cache of `layer` (a prefill in v2 placement handed to v3 decode)."""
        tensors = (
            self._wire(np.ascontiguousarray(k, np.float32)),
            self._wire(np.ascontiguousarray(v, np.float32)),
            np.asarray(pos, np.int64),
        )
        _, out = self.call("WriteKV", {"layer": layer}, tensors, sid)
        if out:
            raise ProtocolError(f"WriteKV: expected no tensors in the reply, got {len(out)}")

    # ---- merged operations: z = W (w ⊙ x) comes back unscaled; see protocol.py -------------
    def _qkv_width(self, sid: int | None) -> int:
        c = self.config
        return c.q_dim + c.kv_dim + (0 if sid is not None else c.kv_dim)

    def embed_qkv(
        self, ids: np.ndarray, sid: int | None = None, pos: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """x0 = embedding(ids) and layer 0's unscaled q|k|v (q|k with a session)."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        tensors = (ids,) if sid is None else (ids, np.asarray(pos, np.int64))
        B, T = ids.shape
        x, z = self._call_many(
            "EmbedQKV",
            {"dtype": self.wire_dtype},
            tensors,
            [(B, T, self.config.hidden_size), (B, T, self._qkv_width(sid))],
            sid,
        )
        return x, z

    def down_qkv(
        self, layer: int, m: np.ndarray, x: np.ndarray, sid: int | None = None, pos: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """y = down(m) of `layer` and layer+1's unscaled q|k|v on x + y."""
        tensors = (self._wire(m), self._wire(x))
        if sid is not None:
            tensors += (np.asarray(pos, np.int64),)
        B, T = x.shape[:2]
        y, z = self._call_many(
            "DownQKV",
            {"layer": layer},
            tensors,
            [(B, T, self.config.hidden_size), (B, T, self._qkv_width(sid))],
            sid,
        )
        return y, z

    def down_lm_head(self, m: np.ndarray, x: np.ndarray, rows: np.ndarray | None, top_k: int | None):
        """Last layer: y = down(m) and the unscaled logits (or their top-k) at `rows` of x + y."""
        c = self.config
        tensors = (self._wire(m), self._wire(x))
        B, T = x.shape[:2]
        R = T
        if rows is not None:
            tensors += (np.asarray(rows, np.int64),)
            R = 1
        if top_k is None:
            return self._call_many("DownLMHead", {}, tensors, [(B, R, c.hidden_size), (B, R, c.vocab_size)])
        shapes = [(B, R, c.hidden_size), (B, R, top_k), (B, R, top_k)]
        return self._call_many("DownLMHead", {"top_k": top_k}, tensors, shapes, top_k_ids=True)

    def o_gate_up(self, layer: int, a: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """o = o_proj(a) and the unscaled gate|up on x + o."""
        B, T = x.shape[:2]
        shapes = [(B, T, self.config.hidden_size), (B, T, 2 * self.config.intermediate_size)]
        o, z = self._call_many("OGateUp", {"layer": layer}, (self._wire(a), self._wire(x)), shapes)
        return o, z

    def attn_out_gate_up(
        self, sid: int, layer: int, p: np.ndarray, x: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """o = o_proj(P V) with V from the session, and the unscaled gate|up on x + o."""
        B, T = x.shape[:2]
        shapes = [(B, T, self.config.hidden_size), (B, T, 2 * self.config.intermediate_size)]
        o, z = self._call_many("AttnOutGateUp", {"layer": layer}, (self._wire(p), self._wire(x)), shapes, sid)
        return o, z

    # ---- the private plans (tee/private.py): ring elements, no wire dtype ------------------
    def ring_setup(self, bits: int) -> dict[str, Any]:
        """Have the server quantize its weights for `bits` (once); its layout and resident bytes
        per weight of the private sites."""
        res, _ = self.call("RingSetup", {"bits": bits})
        ok = (
            res.get("bits") == bits
            and isinstance(res.get("source"), str)
            and isinstance(res.get("layout"), str)
            and type(res.get("bytes_per_weight")) in (int, float)
            and 0 < res["bytes_per_weight"] < 64
        )
        if not ok:
            raise ProtocolError(f"RingSetup: malformed reply {str(res)[:200]}")
        return {k: res[k] for k in ("bits", "source", "layout", "bytes_per_weight")}

    def ring_step(
        self, op: str, args: dict[str, Any], tensors: list[np.ndarray], widths: list[int]
    ) -> list[np.ndarray]:
        """One ring operation (protocol.RING_OPS) on masked int64 ring elements (B, T, ·); its
        replies (B, T, width) int64, one per entry of `widths`."""
        tensors = [np.ascontiguousarray(t, dtype=np.int64) for t in tensors]
        _, out = self.call(op, args, tuple(tensors))
        lead = tensors[0].shape[:-1]
        shapes = [(*lead, w) for w in widths]
        if [o.shape for o in out] != shapes or any(o.dtype != _I64 for o in out):
            got = [f"{o.dtype}{o.shape}" for o in out]
            raise ProtocolError(f"{op}: expected int64 tensors of shapes {shapes}, got {got}")
        return out

    def open_session(self, batch: int, max_tokens: int) -> int:
        res, _ = self.call("OpenSession", {"batch": batch, "max_tokens": max_tokens})
        sid = res.get("sid")
        if type(sid) is not int:
            raise ProtocolError("OpenSession: reply lacks a session id")
        return sid

    def close_session(self, sid: int) -> None:
        self.call("CloseSession", sid=sid)

    def ping(self, payload_bytes: int = 0, reply_bytes: int = 0) -> float:
        """Round-trip time of a Ping carrying payload_bytes up and reply_bytes back."""
        tensors = (np.zeros(payload_bytes // 4, np.float32),) if payload_bytes else ()
        t0 = time.perf_counter()
        args = {"reply_bytes": reply_bytes} if reply_bytes else {}
        self.call("Ping", args, tensors, reply_bytes=reply_bytes)
        return time.perf_counter() - t0

    def close(self) -> None:
        self.transport.close()
