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

import numpy as np

from teesplit.config import ModelConfig
from teesplit.protocol import ProtocolError, parse_reply, request


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
    return sum(len(getattr(f, "buffer", f)) for f in frames)


@dataclass
class InitResult:
    config: ModelConfig
    norms: np.ndarray  # (2L+1, E) float32: input, post-attention for each layer, then final


class GPUClient:
    def __init__(self, transport, wire_dtype: str = "float32"):
        self.transport = transport
        self.wire_dtype = np.dtype(wire_dtype)
        self.wire_dtype_name = wire_dtype
        self.metrics = Metrics()
        self.config: ModelConfig | None = None  # known after init()
        self._next_id = 1

    @property
    def address(self) -> str:
        return self.transport.address

    def call(
        self, op: str, args: dict[str, Any] | None = None, tensors: tuple[np.ndarray, ...] = ()
    ) -> tuple[dict[str, Any], list[np.ndarray]]:
        rid = self._next_id
        self._next_id += 1
        frames = request(rid, op, args, tensors)
        t0 = time.perf_counter()
        self.transport.send(frames)
        while True:
            reply_frames = self.transport.recv()
            header, out = parse_reply(reply_frames, op)
            if header.get("id") == rid:
                break
            # A late reply to an earlier request (after a timeout): not ours, drop it.
        m = self.metrics
        m.rpc_wall_s += time.perf_counter() - t0
        m.gpu_s += float(header.get("gpu_s", 0.0))
        m.rpc[op] += 1
        m.bytes_to_gpu += _nbytes(frames)
        m.bytes_from_gpu += _nbytes(reply_frames)
        return header.get("res", {}), out

    def _one(self, op: str, args: dict[str, Any], x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        _, out = self.call(op, args, (x,))
        if len(out) != 1 or out[0].shape != shape:
            got = [o.shape for o in out]
            raise ProtocolError(f"{op}: expected one tensor of shape {shape}, got {got}")
        return out[0].astype(np.float32, copy=False)

    def _wire(self, x: np.ndarray) -> np.ndarray:
        return x.astype(self.wire_dtype, copy=False)

    # ---- the seed's operations -------------------------------------------------------------
    def init(self) -> InitResult:
        res, tensors = self.call("Init")
        try:
            config = ModelConfig.from_dict(dict(res["config"], rope=res["rope"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolError(f"Init: malformed config in reply: {e}") from None
        expected = (2 * config.num_layers + 1, config.hidden_size)
        if len(tensors) != 1 or tensors[0].shape != expected:
            raise ProtocolError(f"Init: expected norm weights of shape {expected}")
        self.config = config
        return InitResult(config=config, norms=tensors[0].astype(np.float32))

    def embedding(self, ids: np.ndarray) -> np.ndarray:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        return self._one(
            "Embedding", {"dtype": self.wire_dtype_name}, ids, (*ids.shape, self.config.hidden_size)
        )

    def linear(self, layer: int, module: str, x: np.ndarray) -> np.ndarray:
        out_features = self.config.linear_shapes[module][0]
        return self._one(
            "Linear", {"layer": layer, "module": module}, self._wire(x), (*x.shape[:-1], out_features)
        )

    def matmul(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        _, out = self.call("Matmul", {}, (self._wire(a), self._wire(b)))
        shape = (*a.shape[:-1], b.shape[-1])
        if len(out) != 1 or out[0].shape != shape:
            raise ProtocolError(f"Matmul: expected one tensor of shape {shape}")
        return out[0].astype(np.float32, copy=False)

    def lm_head(self, x: np.ndarray) -> np.ndarray:
        return self._one("LMHead", {}, self._wire(x), (*x.shape[:-1], self.config.vocab_size))

    def ping(self) -> float:
        t0 = time.perf_counter()
        self.call("Ping")
        return time.perf_counter() - t0

    def close(self) -> None:
        self.transport.close()
