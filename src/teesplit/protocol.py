"""The wire between the trusted runner and the untrusted GPU server. Shared by both sides.

A message is a ZeroMQ multipart message: one msgpack header frame, then one raw frame per
tensor (C order, little-endian, no padding). Nothing is ever pickled.

Request header (msgpack map)::

    v     int        protocol version, must equal PROTOCOL_VERSION
    id    int        request id chosen by the client, echoed in the reply
    op    str        operation name, one of OPS
    sid   int|nil    session id (reserved; nil for the stateless seed operations)
    args  map        operation arguments (schema below)
    t     [[dtype, [dims...]], ...]   one entry per tensor frame, in order

Reply header::

    v, id            as in the request
    ok    bool       false: `code` and `msg` say why, and there are no tensor frames
    res   map        small results (Init's config, ...)
    t                tensor descriptors, as in requests
    gpu_s float      server-side compute time for this request, seconds
    code  str        stable error code (see ERROR_CODES), only when ok is false
    msg   str        human-readable error, only when ok is false

Operations (seed V3.0 names first; tensors listed in frame order; shapes use B batch,
T tokens, S cached + new tokens, E hidden, N output features, V vocabulary, K top-k):

    Init         args {version?}                         -> res {config, rope, version,
                                                            max_message_bytes}, t [norms (2L+1, E) f32]
                 version: the runner's PROTOCOL_VERSION; a server speaking another one answers
                 bad_version naming both (the reply's `version` is the server's own)
    Embedding    args {dtype?}      t [ids (B, T) i64]   -> t [hidden (B, T, E)]
    Linear       args {layer, module} t [x (B, T, in)]   -> t [y (B, T, N)]
    Matmul       args {}            t [a (..., M, K), b (..., K, N)] -> t [a @ b (..., M, N)]
    LMHead       args {top_k?}      t [x (B, T, E)]      -> t [logits (B, T, V)]
                                   with top_k: t [values (B, T, K) f32, ids (B, T, K) i64]
    Ping         args {reply_bytes?} t [payload?]        -> res {}, t [reply_bytes zero bytes?]

  Fused operations (plans v3-fused and v2-fused):

    QKV          args {layer} t [x (B, T, E)]            -> t [q|k|v (B, T, (H + 2 Hkv) D)]
                 with sid: also t [pos (B,) i64]; v is written to the session's cache at
                 pos and only q|k (B, T, (H + Hkv) D) comes back
    GateUp       args {layer} t [x (B, T, E)]            -> t [gate|up (B, T, 2F)]
    AttnScores   sid, args {layer} t [q (B, H, T, D), k (B, Hkv, T, D), pos (B,) i64]
                 writes the rotated k at pos, returns q Kᵀ -> t [scores (B, H, T, S)],
                 S = max(pos) + T
    AttnOut      sid, args {layer} t [p (B, H, T, S)]    -> t [o_proj(p V) (B, T, E)]
    WriteKV      sid, args {layer} t [k (B, Hkv, T, D), v (B, Hkv, T, D), pos (B,) i64] -> res {}
                 writes rotated keys and values the runner computed itself (a prefill in v2
                 placement) at pos, so decode can go on in v3 placement; pos as for
                 AttnScores (no gaps), k and v finite and of one float wire dtype
    OpenSession  args {batch, max_tokens}                -> res {sid, kv_bytes_per_token}
    CloseSession sid                                     -> res {}

  Merged operations (plans v3-merged and v2-merged). RMSNorm(x) = (r x) ⊙ w with the row
  scale r = 1 / rms(x) computed and applied by the trusted side; the GPU applies the gain w
  (a diagonal linear map) inside the next product and returns it unscaled (z = W (w ⊙ x)),
  so a Linear after a norm can ride in the same round trip as the Linear before it:

    EmbedQKV      args {dtype?} t [ids (B, T) i64, pos?]  -> t [x0 (B, T, E), z_qkv of layer 0]
    DownQKV       args {layer} t [m (B, T, F), x (B, T, E), pos?]
                  y = down(m) -> t [y (B, T, E), z_qkv of layer+1 on (x + y)]
    DownLMHead    args {top_k?} t [m, x, rows? (B,) i64]   last layer: y = down(m), then the LM
                  head on (x + y) at the given rows -> t [y (B, R, E), z_logits or top-k
                  values and ids of z (B, R, ...)]
    OGateUp       args {layer} t [a (B, T, H D), x]       -> t [o = o_proj(a), z_gateup on (x + o)]
    AttnOutGateUp sid, args {layer} t [p (B, H, T, S), x] -> t [o = o_proj(p V), z_gateup on (x + o)]

  Ring operations (plans private-otp and private-2party; see gpu/ring.py, tee/private.py and
  teesplit/quant.py). Every tensor is int64 holding ring elements of Z_2^64: fixed-point values
  masked by a one-time pad, or one additive share of them; replies are ring elements too. The
  weights are the integers of quant.py's rule for `bits` 16 (int16) or 8 (int8), with the
  RMSNorm gain folded into the product after a norm. The merged plans' structure, every step
  linear: a first product (o_proj or down_proj), the residual add (each row of the first
  product times its integer multiplier mult_j, quant.py), the product after the norm:

    RingSetup      args {bits}                 -> res {bits, source, bytes_per_weight, layout}
                   quantizes (once) and reports the server's resident bytes per weight
    RingEmbedQKV   args {bits} t [x0 (B, T, E)]               -> t [z = x0 Q_qkv(0)ᵀ]
    RingOGateUp    args {layer, bits} t [a (B, T, H D), x (B, T, E)]
                   -> t [o = a Q_oᵀ (B, T, E), z = (x + mult ⊙ o) Q_gate_upᵀ (B, T, 2F)]
    RingDownQKV    args {layer, bits} t [m (B, T, F), x (B, T, E)], layer < L - 1
                   -> t [y = m Q_downᵀ (B, T, E), z = (x + mult ⊙ y) Q_qkv(layer+1)ᵀ]
    RingDownLMHead args {bits} t [m (B, R, F), x (B, R, E)]    (the last layer's down_proj)
                   -> t [y (B, R, E), z = (x + mult ⊙ y) Q_lm_headᵀ (B, R, V)]

  A server started with `--private-weights` keeps only these integers and refuses the
  operations that need float weights.

  With a session, z_qkv holds q|k only; the v part waits in the session until AttnScores
  brings the row scales (a fourth tensor r (B, T) f32), which turn it into v for the cache.

Cache writes address positions explicitly, so a repeated request writes the same values to
the same places: they are idempotent. Each row's cached length becomes pos + T.

Reply activations come back in the wire dtype of the request's activation tensor (Embedding:
`dtype`, default float32). The wire dtype "int8" is a per-row absmax format: one frame holding
a float32 scale per row (rows = product of all but the last dimension) followed by the int8
values; it decodes to float32. Decoding checks every field before any tensor is materialized:
the dtype whitelist, rank and element limits, and that the frame length matches the shape.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import msgpack
import numpy as np

PROTOCOL_VERSION = 1

DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype(np.int64),
}
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
WIRE_DTYPES = (*FLOAT_DTYPES, "int8")  # activations on the wire; int8 is the per-row format
_DTYPE_NAMES = {dt: name for name, dt in DTYPES.items()}

# The private plans' ring operations (quant.py, gpu/ring.py): int64 ring elements in and out.
RING_OPS = ("RingEmbedQKV", "RingOGateUp", "RingDownQKV", "RingDownLMHead")


@dataclass(frozen=True)
class OpSpec:
    """One operation of the wire, declared once: what its request may carry and how it is served.
    Both sides read it: `validate_request` checks requests against it, the GPU server's request
    handler (gpu/handler.py) serves by it, and the runner adds `f32` where it applies."""

    args: dict[str, tuple[type, bool]] = field(default_factory=dict)  # name -> (type, required)
    tensors: tuple[int, int] = (0, 0)  # (min, max) tensor frames
    # What the session id means: "none" (ignored), "optional" (the session is used when one is
    # given) or "required" (a request without one gets "no_session").
    session: str = "none"
    # Takes `f32: true` (runner --verify): compute in float32 from the compute-dtype weights and
    # return float32, so the only honest difference from the exact product is float32
    # accumulation error (a bfloat16 result would hide a 1e-3 change below its own rounding).
    # OpenSession with f32 keeps the session's K/V cache in float32, and QKV with a session and
    # f32 returns v too.
    f32: bool = False
    # A resend (same peer, same request id) is answered from the server's reply cache; the
    # others are cheap, stateless and possibly large, and are computed again.
    cacheable: bool = True
    # The wire dtype of the reply's activations: "input" (that of the request's first tensor),
    # "dtype" (the `dtype` argument, default float32), or "as_is" (the tensors as computed:
    # configuration, padding, ring elements).
    reply: str = "input"
    compute: bool = True  # the reply reports the compute time in gpu_s (else 0)
    # Multiplies by the float weights: a server keeping only the private plans' integers
    # (serve --private-weights) refuses it.
    float_weights: bool = False

    def __post_init__(self) -> None:
        if self.session not in ("none", "optional", "required"):
            raise ValueError(f"session must be none, optional or required, got {self.session!r}")
        if self.reply not in ("input", "dtype", "as_is"):
            raise ValueError(f"reply must be input, dtype or as_is, got {self.reply!r}")
        if self.f32:
            object.__setattr__(self, "args", {**self.args, "f32": (bool, False)})


_LAYER = {"layer": (int, True)}
_DTYPE = {"dtype": (str, False)}
_TOP_K = {"top_k": (int, False)}
_BITS = {"bits": (int, True)}
# Every operation, in the order of the module docstring. Adding one: an entry here and one
# handler method in gpu/handler.py (the server refuses to start without it).
OPS: dict[str, OpSpec] = {
    "Init": OpSpec({"version": (int, False)}, cacheable=False, reply="as_is"),
    "Embedding": OpSpec(_DTYPE, (1, 1), f32=True, reply="dtype", float_weights=True),
    "Linear": OpSpec({"layer": (int, True), "module": (str, True)}, (1, 1), f32=True, float_weights=True),
    "Matmul": OpSpec({}, (2, 2), f32=True),
    "LMHead": OpSpec(_TOP_K, (1, 1), f32=True, float_weights=True),
    "Ping": OpSpec({"reply_bytes": (int, False)}, (0, 1), cacheable=False, reply="as_is", compute=False),
    "QKV": OpSpec(_LAYER, (1, 2), session="optional", f32=True, float_weights=True),
    "GateUp": OpSpec(_LAYER, (1, 1), f32=True, float_weights=True),
    "AttnScores": OpSpec(_LAYER, (3, 4), session="required", f32=True, float_weights=True),
    "AttnOut": OpSpec(_LAYER, (1, 1), session="required", f32=True, float_weights=True),
    # k, v, positions: K/V the runner computed (a prefill in v2 placement) for v3 decode
    "WriteKV": OpSpec(_LAYER, (3, 3), session="required", reply="as_is"),
    "OpenSession": OpSpec(
        {"batch": (int, True), "max_tokens": (int, True)}, f32=True, reply="as_is", compute=False
    ),
    "CloseSession": OpSpec(session="required", reply="as_is", compute=False),
    "EmbedQKV": OpSpec(_DTYPE, (1, 2), session="optional", reply="dtype", float_weights=True),
    "DownQKV": OpSpec(_LAYER, (2, 3), session="optional", float_weights=True),
    "DownLMHead": OpSpec(_TOP_K, (2, 3), float_weights=True),
    "OGateUp": OpSpec(_LAYER, (2, 2), float_weights=True),
    "AttnOutGateUp": OpSpec(_LAYER, (2, 2), session="required", float_weights=True),
    # The private plans' products: int64 ring elements in and out (RING_OPS).
    "RingSetup": OpSpec(_BITS, reply="as_is"),
    "RingEmbedQKV": OpSpec(_BITS, (1, 1), reply="as_is"),
    "RingOGateUp": OpSpec({**_LAYER, **_BITS}, (2, 2), reply="as_is"),
    "RingDownQKV": OpSpec({**_LAYER, **_BITS}, (2, 2), reply="as_is"),
    "RingDownLMHead": OpSpec(_BITS, (2, 2), reply="as_is"),
}
F32_OPS = tuple(op for op, spec in OPS.items() if spec.f32)  # the runner adds f32 to these

ERROR_CODES = (
    "bad_message",  # framing, msgpack, header schema
    "bad_version",  # protocol version mismatch
    "unknown_op",
    "bad_args",  # argument missing, wrong type or out of range
    "bad_tensor",  # dtype, shape or size wrong for the operation
    "too_large",  # a limit was exceeded
    "no_session",  # the session id is unknown (closed, expired, or the server restarted)
    "internal",  # the server failed; the request may be retried
)


class ProtocolError(Exception):
    """A message that does not follow the wire format; `code` is one of ERROR_CODES."""

    def __init__(self, message: str, code: str = "bad_message"):
        super().__init__(message)
        self.code = code


class RemoteError(Exception):
    """The peer answered with an error reply."""

    def __init__(self, code: str, message: str, op: str | None = None):
        # The server's messages usually start with the operation already ("OpenSession: ...").
        named = not op or message.startswith((f"{op}:", f"{op} "))
        super().__init__(f"{'' if named else op + ': '}{message} [{code}]")
        self.code = code
        self.remote_message = message
        self.op = op


@dataclass(frozen=True)
class Limits:
    """Caps checked while decoding, before anything is allocated from peer-supplied sizes."""

    max_header_bytes: int = 1 << 20
    max_tensors: int = 8
    max_rank: int = 5
    max_tensor_bytes: int = 1 << 31
    # No dimension of a real model's tensor comes near this (vocabularies, contexts, widths are
    # below a million); a bigger one, even next to a zero, is a hostile shape, refused here
    # before any product sees it.
    max_dim: int = 1 << 24

    @property
    def max_frames(self) -> int:
        """Frames of a message: the header and its tensors."""
        return 1 + self.max_tensors

    @property
    def max_frame_bytes(self) -> int:
        """The largest frame a message may hold (the transports drop bigger ones unread)."""
        return max(self.max_tensor_bytes, self.max_header_bytes)


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class Int8Rows:
    """An activation quantized per row: x ≈ q * scale[..., None] (absmax / 127 per row)."""

    q: np.ndarray  # int8, the original shape
    scale: np.ndarray  # float32, shape[:-1]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape


def quantize_int8(x: np.ndarray) -> Int8Rows:
    x = np.asarray(x, dtype=np.float32)
    amax = np.abs(x).max(axis=-1) if x.shape[-1] else np.zeros(x.shape[:-1], np.float32)
    scale = (amax / 127.0).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1.0))
    q = np.clip(np.rint(x / safe[..., None]), -127, 127).astype(np.int8)
    return Int8Rows(q, scale)


def dequantize_int8(t: Int8Rows) -> np.ndarray:
    return t.q.astype(np.float32) * t.scale[..., None]


def dtype_name(dt: np.dtype) -> str:
    name = _DTYPE_NAMES.get(dt)  # a numpy dtype already: no conversion (every tensor sent)
    if name is not None:
        return name
    try:
        return _DTYPE_NAMES[np.dtype(dt)]
    except KeyError:
        raise ProtocolError(f"dtype {dt} is not allowed on the wire", "bad_tensor") from None


# dtypes whose arrays the buffer protocol exposes directly (bfloat16, an extension dtype, it does not)
_BUFFER_DTYPES = {dt: name for name, dt in DTYPES.items() if name != "bfloat16"}


def tensor_frame(x: np.ndarray) -> memoryview:
    """A zero-copy byte view of a C-contiguous array (copies only when not contiguous)."""
    x = np.ascontiguousarray(x)
    if x.size and x.dtype in _BUFFER_DTYPES:  # the cheap way, a third of the cost (every tensor sent)
        return x.data.cast("B")
    # Viewing as uint8 sidesteps buffer-protocol gaps for extension dtypes such as bfloat16, and
    # memoryview.cast refuses empty arrays.
    return memoryview(x.reshape(-1).view(np.uint8))


def _frame_and_desc(t: np.ndarray | Int8Rows) -> tuple[Any, list]:
    if type(t) is np.ndarray and t.flags.c_contiguous and t.size:  # most tensors sent, in one step
        name = _BUFFER_DTYPES.get(t.dtype)
        if name is not None:
            return t.data.cast("B"), [name, list(t.shape)]
    if isinstance(t, Int8Rows):
        # One frame: the float32 row scales, then the int8 values (a small copy to join them).
        body = np.concatenate(
            [
                np.ascontiguousarray(t.scale, np.float32).reshape(-1).view(np.uint8),
                np.ascontiguousarray(t.q).reshape(-1).view(np.uint8),
            ]
        )
        return memoryview(body), ["int8", list(t.q.shape)]
    a = np.ascontiguousarray(t)
    name = dtype_name(a.dtype)  # first: a dtype not allowed on the wire is a ProtocolError
    return tensor_frame(a), [name, list(a.shape)]


_packers = threading.local()  # msgpack Packers are not thread-safe, and the server has threads


def _packb(obj: Any) -> bytes:
    """msgpack.packb(obj, use_bin_type=True) with this thread's Packer: making a Packer per
    message cost about as much as the packing (a Packer resets itself after each pack, and
    after a pack that raised)."""
    try:
        packer = _packers.packer
    except AttributeError:
        packer = _packers.packer = msgpack.Packer(use_bin_type=True)
    return packer.pack(obj)


def encode(header: dict[str, Any], tensors: Sequence[np.ndarray | Int8Rows] = ()) -> list:
    """Header dict plus tensors -> multipart frames. Fills in `v` and the tensor table."""
    frames: list = [None]
    table = []
    for t in tensors:
        frame, desc = _frame_and_desc(t)
        frames.append(frame)
        table.append(desc)
    frames[0] = _packb(dict(header, v=PROTOCOL_VERSION, t=table))
    return frames


def _buffer(frame: Any) -> memoryview | bytes:
    buf = getattr(frame, "buffer", frame)  # zmq.Frame exposes .buffer; bytes/memoryview pass through
    if type(buf) is bytes:  # already flat bytes (the common case in process and over shm)
        return buf
    return memoryview(buf).cast("B")


def decode(frames: Sequence[Any], limits: Limits = DEFAULT_LIMITS) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Multipart frames -> (header, tensors). Validates framing; arrays are read-only views."""
    if not frames:
        raise ProtocolError("empty message")
    head = _buffer(frames[0])
    if len(head) > limits.max_header_bytes:
        raise ProtocolError(f"header of {len(head)} bytes exceeds {limits.max_header_bytes}", "too_large")
    try:
        header = msgpack.unpackb(head, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"header is not valid msgpack: {type(e).__name__}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header must be a msgpack map")
    version = header.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {version!r} does not match this side's version {PROTOCOL_VERSION}",
            "bad_version",
        )
    table = header.get("t", [])
    if not isinstance(table, list):
        raise ProtocolError("tensor table 't' must be a list")
    if len(table) > limits.max_tensors:
        raise ProtocolError(f"{len(table)} tensors exceed the limit of {limits.max_tensors}", "too_large")
    if len(table) != len(frames) - 1:
        raise ProtocolError(f"header describes {len(table)} tensors but {len(frames) - 1} frames follow")
    tensors = [_decode_tensor(i, desc, frames[i + 1], limits) for i, desc in enumerate(table)]
    return header, tensors


def _decode_tensor(i: int, desc: Any, frame: Any, limits: Limits) -> np.ndarray:
    if not (isinstance(desc, list) and len(desc) == 2 and isinstance(desc[1], list)):
        raise ProtocolError(f"tensor {i}: descriptor must be [dtype, [dims...]]")
    name, shape = desc
    dt = DTYPES.get(name) if isinstance(name, str) else None
    if dt is None and name != "int8":
        raise ProtocolError(f"tensor {i}: dtype {name!r} not in {sorted([*DTYPES, 'int8'])}", "bad_tensor")
    if len(shape) > limits.max_rank:
        raise ProtocolError(f"tensor {i}: rank {len(shape)} exceeds {limits.max_rank}", "bad_tensor")
    n = 1
    for d in shape:
        if type(d) is not int or d < 0:
            raise ProtocolError(f"tensor {i}: dimensions must be non-negative integers", "bad_tensor")
        n *= d
    if dt is None:
        return _decode_int8(i, shape, frame, limits)
    nbytes = n * dt.itemsize
    if nbytes > limits.max_tensor_bytes:
        raise ProtocolError(f"tensor {i}: {nbytes} bytes exceed {limits.max_tensor_bytes}", "too_large")
    _check_dims(i, shape, limits)
    buf = _buffer(frame)
    if len(buf) != nbytes:
        raise ProtocolError(
            f"tensor {i}: frame has {len(buf)} bytes, {name}{tuple(shape)} needs {nbytes}", "bad_tensor"
        )
    return np.ndarray(shape, dt, buf)  # a view, read-only for bytes: np.frombuffer(...).reshape(shape)


def _check_dims(i: int, shape: list[int], limits: Limits) -> None:
    """A tensor small enough in bytes can still have an absurd dimension next to a zero one."""
    for d in shape:
        if d > limits.max_dim:
            raise ProtocolError(f"tensor {i}: dimension {d} exceeds {limits.max_dim}", "bad_tensor")


def _decode_int8(i: int, shape: list[int], frame: Any, limits: Limits) -> np.ndarray:
    if not shape:
        raise ProtocolError(f"tensor {i}: an int8 tensor needs at least one dimension", "bad_tensor")
    rows, n = math.prod(shape[:-1]), math.prod(shape)
    nbytes = 4 * rows + n
    if max(4 * n, nbytes) > limits.max_tensor_bytes:  # it decodes to float32
        raise ProtocolError(
            f"tensor {i}: {max(4 * n, nbytes)} bytes exceed {limits.max_tensor_bytes}", "too_large"
        )
    _check_dims(i, shape, limits)
    buf = _buffer(frame)
    if len(buf) != nbytes:
        raise ProtocolError(
            f"tensor {i}: frame has {len(buf)} bytes, int8{tuple(shape)} needs {nbytes}", "bad_tensor"
        )
    scale = np.frombuffer(buf, np.float32, count=rows).reshape(shape[:-1])
    q = np.frombuffer(buf, np.int8, offset=4 * rows).reshape(shape)
    return dequantize_int8(Int8Rows(q, scale))


def wire_name(header: dict[str, Any], index: int) -> str:
    """The wire dtype name a decoded tensor arrived in (int8 tensors decode to float32)."""
    return header["t"][index][0]


def validate_request(header: dict[str, Any], tensors: list[np.ndarray]) -> tuple[int, str, dict[str, Any]]:
    """Check the request-level schema; returns (request id, op, args).

    What is left to the service, which knows the model: value ranges (layer, module, top_k,
    batch, token ids, positions), shapes and dtypes per operation, session ids, and finiteness:
    NaN or Inf in values about to be written into a session's KV cache (v from QKV, EmbedQKV or
    DownQKV with a session, k from AttnScores; checked on the values themselves, in the
    service's one cache-write path) is refused with "bad_tensor" before the write, because it
    would poison every later step of that session. Elsewhere NaN in gives NaN back to the
    sender only, and is allowed."""
    rid = header.get("id")
    if type(rid) is not int or not 0 <= rid < 2**63:
        raise ProtocolError("request id must be a non-negative 64-bit integer")
    op = header.get("op")
    if not isinstance(op, str) or op not in OPS:
        raise ProtocolError(f"unknown operation {op!r:.80}; known: {', '.join(OPS)}", "unknown_op")
    spec = OPS[op]
    schema, (lo, hi) = spec.args, spec.tensors
    args = header.get("args", {})
    if not isinstance(args, dict):
        raise ProtocolError(f"{op}: args must be a map", "bad_args")
    for key, value in args.items():
        if key not in schema:
            raise ProtocolError(f"{op}: unexpected argument {key!r}", "bad_args")
        typ = schema[key][0]
        if type(value) is not typ:  # exact: bool is not an int here
            raise ProtocolError(f"{op}: argument {key!r} must be {typ.__name__}", "bad_args")
    for key, (_, required) in schema.items():
        if required and key not in args:
            raise ProtocolError(f"{op}: missing argument {key!r}", "bad_args")
    if not lo <= len(tensors) <= hi:
        want = lo if lo == hi else f"{lo} to {hi}"
        raise ProtocolError(f"{op} takes {want} tensors, got {len(tensors)}", "bad_tensor")
    sid = header.get("sid")
    if sid is not None and (type(sid) is not int or not 0 <= sid < 2**63):
        raise ProtocolError("session id must be a non-negative 64-bit integer or nil", "bad_args")
    if sid is None and spec.session == "required":
        raise ProtocolError(f"{op} needs a session id (OpenSession first)", "no_session")
    if op == "Init" and args.get("version", PROTOCOL_VERSION) != PROTOCOL_VERSION:
        raise ProtocolError(
            f"Init: the runner speaks protocol version {args['version']}, this server speaks version "
            f"{PROTOCOL_VERSION}; run the same teesplit release on both sides",
            "bad_version",
        )
    return rid, op, args


def request(
    rid: int,
    op: str,
    args: dict[str, Any] | None = None,
    tensors: Sequence[np.ndarray] = (),
    sid: int | None = None,
) -> list:
    return encode({"id": rid, "op": op, "sid": sid, "args": args or {}}, tensors)


def reply(
    rid: int, result: dict[str, Any] | None = None, tensors: Sequence[np.ndarray] = (), gpu_s: float = 0.0
) -> list:
    return encode({"id": rid, "ok": True, "res": result or {}, "gpu_s": gpu_s}, tensors)


def error_reply(rid: int | None, code: str, message: str) -> list:
    return encode({"id": rid, "ok": False, "code": code, "msg": message})


def parse_reply(
    frames: Sequence[Any], op: str, limits: Limits = DEFAULT_LIMITS
) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Decode a reply; raises RemoteError for an error reply, ProtocolError for a malformed one."""
    header, tensors = decode(frames, limits)
    ok = header.get("ok")
    if ok is False:
        code, msg = header.get("code"), header.get("msg")
        raise RemoteError(
            code if isinstance(code, str) else "internal", msg if isinstance(msg, str) else "no message", op
        )
    if ok is not True:
        raise ProtocolError("reply lacks a boolean 'ok'")
    if not isinstance(header.get("res", {}), dict):
        raise ProtocolError("reply 'res' must be a map")
    if not isinstance(header.get("gpu_s", 0.0), (int, float)):
        raise ProtocolError("reply 'gpu_s' must be a number")
    return header, tensors
