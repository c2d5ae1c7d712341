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

Operations (seed V3.0 names; tensors listed in frame order; shapes use B batch, T tokens,
E hidden, N output features, V vocabulary):

    Init       args {}                               -> res {config, rope}, t [norms (2L+1, E) f32]
    Embedding  args {dtype?}     t [ids (B, T) i64]  -> t [hidden (B, T, E)]
    Linear     args {layer, module} t [x (B, T, in)] -> t [y (B, T, N)]
    Matmul     args {}           t [a (..., M, K), b (..., K, N)] -> t [a @ b (..., M, N)]
    LMHead     args {}           t [x (B, T, E)]     -> t [logits (B, T, V)]
    Ping       args {}                               -> res {}

Reply tensors come back in the dtype of the request's activation tensor (Embedding: `dtype`,
default float32). Decoding checks every field before any tensor is materialized: the dtype
whitelist, rank and element limits, and ``prod(shape) * itemsize == len(frame)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
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
_DTYPE_NAMES = {dt: name for name, dt in DTYPES.items()}

# Operation -> (argument name -> (type, required)), number of tensor frames.
OPS: dict[str, tuple[dict[str, tuple[type, bool]], int]] = {
    "Init": ({}, 0),
    "Embedding": ({"dtype": (str, False)}, 1),
    "Linear": ({"layer": (int, True), "module": (str, True)}, 1),
    "Matmul": ({}, 2),
    "LMHead": ({}, 1),
    "Ping": ({}, 0),
}

ERROR_CODES = (
    "bad_message",  # framing, msgpack, header schema
    "bad_version",  # protocol version mismatch
    "unknown_op",
    "bad_args",  # argument missing, wrong type or out of range
    "bad_tensor",  # dtype, shape or size wrong for the operation
    "too_large",  # a limit was exceeded
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
        super().__init__(f"{op + ': ' if op else ''}{message} [{code}]")
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


DEFAULT_LIMITS = Limits()


def dtype_name(dt: np.dtype) -> str:
    try:
        return _DTYPE_NAMES[np.dtype(dt)]
    except KeyError:
        raise ProtocolError(f"dtype {dt} is not allowed on the wire", "bad_tensor") from None


def tensor_frame(x: np.ndarray) -> memoryview:
    """A zero-copy byte view of a C-contiguous array (copies only when not contiguous)."""
    x = np.ascontiguousarray(x)
    # Viewing as uint8 sidesteps buffer-protocol gaps for extension dtypes such as bfloat16.
    return memoryview(x.reshape(-1).view(np.uint8))


def encode(header: dict[str, Any], tensors: Sequence[np.ndarray] = ()) -> list:
    """Header dict plus tensors -> multipart frames. Fills in `v` and the tensor table."""
    arrays = [np.ascontiguousarray(t) for t in tensors]
    header = dict(header, v=PROTOCOL_VERSION, t=[[dtype_name(a.dtype), list(a.shape)] for a in arrays])
    return [msgpack.packb(header, use_bin_type=True), *(tensor_frame(a) for a in arrays)]


def _buffer(frame: Any) -> memoryview:
    buf = getattr(frame, "buffer", frame)  # zmq.Frame exposes .buffer; bytes/memoryview pass through
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
    if name not in DTYPES:
        raise ProtocolError(f"tensor {i}: dtype {name!r} not in {sorted(DTYPES)}", "bad_tensor")
    if len(shape) > limits.max_rank:
        raise ProtocolError(f"tensor {i}: rank {len(shape)} exceeds {limits.max_rank}", "bad_tensor")
    if not all(type(d) is int and d >= 0 for d in shape):
        raise ProtocolError(f"tensor {i}: dimensions must be non-negative integers", "bad_tensor")
    dt = DTYPES[name]
    nbytes = math.prod(shape) * dt.itemsize
    if nbytes > limits.max_tensor_bytes:
        raise ProtocolError(f"tensor {i}: {nbytes} bytes exceed {limits.max_tensor_bytes}", "too_large")
    buf = _buffer(frame)
    if len(buf) != nbytes:
        raise ProtocolError(
            f"tensor {i}: frame has {len(buf)} bytes, {name}{tuple(shape)} needs {nbytes}", "bad_tensor"
        )
    return np.frombuffer(buf, dtype=dt).reshape(shape)


def validate_request(header: dict[str, Any], tensors: list[np.ndarray]) -> tuple[int, str, dict[str, Any]]:
    """Check the request-level schema; returns (request id, op, args)."""
    rid = header.get("id")
    if type(rid) is not int or not 0 <= rid < 2**63:
        raise ProtocolError("request id must be a non-negative 64-bit integer")
    op = header.get("op")
    if op not in OPS:
        raise ProtocolError(f"unknown operation {op!r}; known: {', '.join(OPS)}", "unknown_op")
    schema, n_tensors = OPS[op]
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
    if len(tensors) != n_tensors:
        raise ProtocolError(f"{op} takes {n_tensors} tensors, got {len(tensors)}", "bad_tensor")
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
