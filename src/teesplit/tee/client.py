"""The trusted side's only door to the GPU: one method per remote operation (TRUSTED side).

Everything that crosses the trust boundary goes through a `GPUClient`, so `grep gpu\\.` in
tee/model.py lists every remote call. The client also keeps the seed's numbers: RPCs by
operation, bytes each way, and time spent waiting on the link versus computing on the GPU.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
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
from teesplit.transport import ConnectionLost, GPUServerUnavailable

_F32, _I64 = np.dtype(np.float32), np.dtype(np.int64)


@dataclass
class Metrics:
    rpc: Counter = field(default_factory=Counter)  # op -> calls
    bytes_to_gpu: int = 0
    bytes_from_gpu: int = 0
    rpc_wall_s: float = 0.0  # wall time inside RPCs (transport + GPU compute)
    gpu_s: float = 0.0  # GPU compute as reported by the server

    def copy(self) -> Metrics:
        return Metrics(Counter(self.rpc), self.bytes_to_gpu, self.bytes_from_gpu, self.rpc_wall_s, self.gpu_s)

    def __sub__(self, other: Metrics) -> Metrics:
        return Metrics(
            self.rpc - other.rpc,
            self.bytes_to_gpu - other.bytes_to_gpu,
            self.bytes_from_gpu - other.bytes_from_gpu,
            self.rpc_wall_s - other.rpc_wall_s,
            self.gpu_s - other.gpu_s,
        )

    def summary(self, wall_s: float) -> dict[str, Any]:
        """The stats JSON groups for a span of `wall_s` seconds of which these RPCs were part."""
        return {
            "rpc": {"total": sum(self.rpc.values()), "by_op": dict(sorted(self.rpc.items()))},
            "bytes": {"to_gpu": self.bytes_to_gpu, "from_gpu": self.bytes_from_gpu},
            "time_s": {
                "tee": max(wall_s - self.rpc_wall_s, 0.0),
                "gpu": self.gpu_s,
                "transport": max(self.rpc_wall_s - self.gpu_s, 0.0),
                "total": wall_s,
            },
        }


def _nbytes(frames: list) -> int:
    n = 0
    for f in frames:  # a loop, not sum() over a generator: this runs for every reply
        n += len(f) if type(f) is bytes else len(getattr(f, "buffer", f))
    return n


@dataclass
class InitResult:
    config: ModelConfig
    norms: np.ndarray  # (2L+1, E) float32: input, post-attention for each layer, then final
    biases: dict[str, np.ndarray]  # per-layer stacks for the families that have them (merged plans)
    dtype: str = "float32"  # the server's compute dtype (its weights are rounded to it)


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
        self, op: str, args: dict[str, Any] | None = None, tensors: tuple = (), sid: int | None = None
    ) -> tuple[dict[str, Any], list[np.ndarray]]:
        """One request, one reply. A try that gets no reply (timeout, lost connection) is sent
        again with the same request id on a fresh connection, `retries` times; the server
        answers a repeated id from its reply cache. Replies to other ids are dropped."""
        rid = self._next_id
        self._next_id += 1
        if op == "Init":  # the version handshake: the server answers with its own version
            args = {**(args or {}), "version": protocol.PROTOCOL_VERSION}
        if self.f32_results and op in protocol.F32_OPS:
            args = {**(args or {}), "f32": True}
        frames = request(rid, op, args, tensors, sid)
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
        timeout = getattr(self.transport, "timeout_s", None)
        tries = 1 + self.retries
        lost = False
        t0 = time.perf_counter()
        for attempt in range(tries):
            if attempt:
                self.retried += 1
                self.transport.reconnect()  # drops anything still queued for the failed try
            self.transport.send(frames)
            deadline = None if timeout is None else time.monotonic() + timeout
            try:
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
                            ours = protocol.PROTOCOL_VERSION
                            raise ProtocolVersionMismatch(self.address, ours, theirs) from None
                        raise
                    if header.get("id") == rid:
                        break
                    # A late reply to an earlier request (after a timeout): not ours, drop it.
                break
            except ConnectionLost:
                lost = True
            except GPUServerUnavailable:
                pass
        else:
            what = f"{tries} {'try' if tries == 1 else 'tries'}" + (f" of {timeout:g} s" if timeout else "")
            raise GPUServerUnavailable(
                f"no reply from the GPU server at {self.address} to {op} after {what}"
                f"{' (the connection was lost)' if lost else ''}; is `teesplit serve` running there?"
            )
        if op == "Init":
            res = header.get("res", {})
            if "version" in res and res["version"] != protocol.PROTOCOL_VERSION:
                raise ProtocolVersionMismatch(self.address, protocol.PROTOCOL_VERSION, res["version"])
            if type(res.get("max_message_bytes")) is int and res["max_message_bytes"] > 0:
                self.max_message_bytes = res["max_message_bytes"]
        m = self.metrics
        m.rpc_wall_s += time.perf_counter() - t0
        m.gpu_s += float(header.get("gpu_s", 0.0))
        m.rpc[op] += 1
        m.bytes_to_gpu += sent
        m.bytes_from_gpu += _nbytes(reply_frames)
        return header.get("res", {}), out

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
    ) -> list[np.ndarray]:
        """One RPC whose reply tensors have known shapes: activations come back as float32; with
        `top_k_ids` the last tensor is token ids, which must lie in the vocabulary."""
        _, out = self.call(op, args, tensors, sid)
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
        res, tensors = self.call("Init")
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

    def matmul(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return self._call_one("Matmul", {}, (self._wire(a), self._wire(b)), (*a.shape[:-1], b.shape[-1]))

    def lm_head(self, x: np.ndarray) -> np.ndarray:
        return self._call_one("LMHead", {}, (self._wire(x),), (*x.shape[:-1], self.config.vocab_size))

    def lm_head_top_k(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Only the k largest logits and their token ids: (B, T, k) each."""
        shape = (*x.shape[:-1], k)
        values, ids = self._call_many(
            "LMHead", {"top_k": k}, (self._wire(x),), [shape, shape], top_k_ids=True
        )
        return values, ids

    # ---- fused projections and the GPU-side KV cache -------------------------------------
    def qkv(
        self, layer: int, x: np.ndarray, sid: int | None = None, pos: np.ndarray | None = None
    ) -> np.ndarray:
        """q|k|v (B, T, (H + 2 Hkv) D); with a session, v stays in its cache and q|k come back."""
        c = self.config
        tensors = (self._wire(x),) if sid is None else (self._wire(x), np.asarray(pos, np.int64))
        n = c.q_dim + c.kv_dim + (c.kv_dim if sid is None else 0)
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
    def ring_linear(self, layer: int, site: str, x: np.ndarray, out_features: int) -> np.ndarray:
        """x W_qᵀ mod 2^64 for a masked fixed-point x (B, T, in) int64 -> (B, T, N) int64."""
        x = np.ascontiguousarray(x, dtype=np.int64)
        _, out = self.call("RingLinear", {"layer": layer, "site": site}, (x,))
        shape = (*x.shape[:-1], out_features)
        if len(out) != 1 or out[0].shape != shape or out[0].dtype != np.int64:
            got = [f"{o.dtype}{o.shape}" for o in out]
            raise ProtocolError(f"RingLinear: expected one int64 tensor of shape {shape}, got {got}")
        return out[0]

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
        self.call("Ping", {"reply_bytes": reply_bytes} if reply_bytes else {}, tensors)
        return time.perf_counter() - t0

    def close(self) -> None:
        self.transport.close()
