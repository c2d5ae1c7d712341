"""What the model may ask of the GPU: the port, as a `typing.Protocol` (TRUSTED side).

`TEELlamaModel` calls exactly these methods on its `gpu` object, and nothing else crosses the
trust boundary. Three kinds of port implement it:

- `client.GPUClient`: the plain port, one method per remote operation over a transport;
- `verify.VerifiedPort`: wraps a GPUClient; takes the norm weights and RoPE parameters from the
  runner's own checkpoint and, with --verify, checks every result before the sampler sees it;
- `private.PrivateOTP` / `private.PrivateTwoParty`: the private plans; the GPU(s) see only
  masked data (they answer the v2 placement's calls: no sessions, no Matmul).

`tee/assemble.py` builds the right one from the settings. Shape letters: B batch, T new tokens,
S cached + new tokens, H heads, Hkv KV heads, D head dim, E hidden, F MLP width, V vocabulary.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from teesplit.config import ModelConfig


@dataclass
class Metrics:
    """The seed's numbers for one port: RPCs by operation, bytes each way, and time."""

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

    def add(self, other: Metrics, gpu_s: float | None = None) -> None:
        """Count `other`'s calls and bytes here (several servers behind one port)."""
        self.rpc.update(other.rpc)
        self.bytes_to_gpu += other.bytes_to_gpu
        self.bytes_from_gpu += other.bytes_from_gpu
        self.gpu_s += other.gpu_s if gpu_s is None else gpu_s

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


@dataclass
class InitResult:
    config: ModelConfig
    norms: np.ndarray  # (2L+1, E) float32: input, post-attention for each layer, then final
    biases: dict[str, np.ndarray]  # per-layer stacks for the families that have them (merged plans)
    dtype: str = "float32"  # the server's compute dtype (its weights are rounded to it)


class GPUPort(Protocol):
    """Every call the model makes across the trust boundary."""

    config: ModelConfig | None  # known after init()
    wire_dtype: str  # activations on the wire (settable: `--plan auto` picks it)
    metrics: Metrics
    private: bool  # True for the ports that mask everything (the private plans require it)

    @property
    def address(self) -> str: ...

    @property
    def retried(self) -> int: ...  # requests sent again after a failed try, over the port's life

    def init(self) -> InitResult: ...

    # ---- the seed's operations ---------------------------------------------------------
    def embedding(self, ids: np.ndarray) -> np.ndarray: ...  # (B, T) -> (B, T, E)
    def linear(self, layer: int, module: str, x: np.ndarray) -> np.ndarray: ...
    def matmul(self, a: np.ndarray, b: np.ndarray, *, layer: int | None = None, what: str = "") -> np.ndarray:
        """a @ b; `layer` and `what` ("QKᵀ" or "PV") name the product for checks and errors."""
        ...

    def lm_head(self, x: np.ndarray, after_send: Callable[[], None] | None = None) -> np.ndarray: ...
    def lm_head_top_k(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...

    # ---- fused projections and the GPU-side KV cache -------------------------------------
    def qkv(
        self, layer: int, x: np.ndarray, sid: int | None = None, pos: np.ndarray | None = None
    ) -> np.ndarray: ...
    def gate_up(self, layer: int, x: np.ndarray) -> np.ndarray: ...
    def attn_scores(
        self, sid: int, layer: int, q: np.ndarray, k: np.ndarray, pos: np.ndarray, r: np.ndarray | None = None
    ) -> np.ndarray: ...
    def attn_out(self, sid: int, layer: int, p: np.ndarray) -> np.ndarray: ...

    def write_kv(self, sid: int, layer: int, k: np.ndarray, v: np.ndarray, pos: np.ndarray) -> None:
        """Rotated K/V computed here (a prefill in v2 placement) into the session, for v3 decode."""

    # ---- merged operations ---------------------------------------------------------------
    def embed_qkv(
        self, ids: np.ndarray, sid: int | None = None, pos: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]: ...
    def down_qkv(
        self, layer: int, m: np.ndarray, x: np.ndarray, sid: int | None = None, pos: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]: ...
    def down_lm_head(
        self, m: np.ndarray, x: np.ndarray, rows: np.ndarray | None, top_k: int | None
    ) -> Any: ...
    def o_gate_up(self, layer: int, a: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...
    def attn_out_gate_up(
        self, sid: int, layer: int, p: np.ndarray, x: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]: ...

    # ---- sessions and the link ----------------------------------------------------------
    def open_session(self, batch: int, max_tokens: int) -> int: ...
    def close_session(self, sid: int) -> None: ...
    def close(self) -> None: ...
