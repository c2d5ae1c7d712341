"""GPUComputeService: the operations of the UNTRUSTED side, and its per-session KV caches.

Every method takes numpy arrays as decoded from the wire, validates them against the model
before touching torch (requests come from a peer we do not trust), computes in the service's
compute dtype on its device and returns torch tensors; the request handler puts them on the
wire in the dtype the request's activations arrived in.

Shape letters: B batch, T new tokens, S cached + new tokens, H query heads, Hkv KV heads,
G = H / Hkv, D head dim, E hidden, F MLP width, V vocabulary.
"""

from __future__ import annotations

import math
import secrets
import time
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np
import torch
import torch.nn.functional as F

from teesplit.gpu.hostmem import HostArena, release_freed_memory
from teesplit.gpu.weights import Weights
from teesplit.protocol import DTYPES, FLOAT_DTYPES, ProtocolError

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


_BF16 = np.dtype(ml_dtypes.bfloat16)
_F32 = np.dtype(np.float32)
_FLOAT_NAMES = {DTYPES[name]: name for name in FLOAT_DTYPES}
_NUMPY_DTYPES = (torch.float32, torch.float16)  # torch dtypes a CPU tensor can be viewed in numpy as


def _readonly_warning_is_once() -> bool:
    """Spend, silenced, torch's warning about a tensor over a read-only numpy array (wire
    buffers: we never write into inputs). Torch gives it once per process; then the request
    path needs no `warnings.catch_warnings` per call (which costs microseconds, every request).
    False if this torch warns every time: `to_torch` then silences each one."""
    a = np.zeros(1, np.float32)
    a.setflags(write=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.from_numpy(a)
        first = len(seen)
        torch.from_numpy(a)
    return len(seen) == first


_QUIET_READONLY = _readonly_warning_is_once()


def _from_numpy(x: np.ndarray) -> torch.Tensor:
    if _QUIET_READONLY or x.flags.writeable:
        return torch.from_numpy(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(x)


def to_torch(x: np.ndarray, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """numpy (possibly read-only, possibly bfloat16) -> torch on `device` (a view of x when
    it is already on the CPU in that dtype)."""
    t = _from_numpy(x.view(np.int16)).view(torch.bfloat16) if x.dtype == _BF16 else _from_numpy(x)
    if device.type == "cpu" and (dtype is None or dtype == t.dtype):
        return t
    return t.to(device=device, dtype=dtype or t.dtype, non_blocking=False)


def _bad(message: str, code: str = "bad_tensor") -> ProtocolError:
    return ProtocolError(message, code)


def _top_k(logits: torch.Tensor, k: int | None) -> torch.Tensor | TopK:
    """The logits, or with k only their k largest per row (values in float32)."""
    if k is None:
        return logits
    values, ids = torch.topk(logits.float(), k, dim=-1)
    return TopK(values, ids)


def _numpy_attention(session: Session, *operands: np.ndarray) -> bool:
    """Whether a session's attention products run in numpy on its cache's numpy view: a CPU
    float32 cache and float32 operands. torch.bmm costs 28 µs for a decode step's q Kᵀ of
    SmolLM2 (3 heads of 3 queries against 150 keys) where numpy's matmul takes 7 µs, and 91
    against 31 µs right after a product has flushed the caches; 60 of them a token. Other
    dtypes and devices keep torch."""
    kv = session.kv_np
    return kv is not None and kv.dtype == _F32 and all(o.dtype == _F32 for o in operands)


# A decode step's attention products have G T (3 for SmolLM2) rows against thousands of cached
# positions: a shape where OpenBLAS's q Kᵀ packs all of K first and runs at a third of the
# speed of K qᵀ (2,048 positions, 30 layers in turn, caches cold: 496 against 169 µs a layer),
# and its P V slows down past 4,096 positions (8,000: 1,221 µs a layer, 579 in blocks of 1,024).
# Both stay one product at small sizes, where either way costs a few µs.
_FEW_ROWS = 16
_PV_BLOCK = 1024


def _q_kt(q: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """q (N, R, D) @ keys (N, S, D)ᵀ -> (N, R, S) float32, a new contiguous array."""
    if q.shape[1] > _FEW_ROWS:
        return np.matmul(q, keys.transpose(0, 2, 1))
    return np.ascontiguousarray(np.matmul(keys, q.transpose(0, 2, 1)).transpose(0, 2, 1))


def _p_v(p: np.ndarray, values: np.ndarray) -> np.ndarray:
    """p (N, R, S) @ values (N, S, D) -> (N, R, D), in blocks of positions for few rows."""
    S = p.shape[2]
    if p.shape[1] > _FEW_ROWS or S <= _PV_BLOCK:
        return np.matmul(p, values)
    out = np.matmul(p[:, :, :_PV_BLOCK], values[:, :_PV_BLOCK])
    for s0 in range(_PV_BLOCK, S, _PV_BLOCK):
        out += np.matmul(p[:, :, s0 : s0 + _PV_BLOCK], values[:, s0 : s0 + _PV_BLOCK])
    return out


def _float_dtype(x: np.ndarray, what: str) -> str:
    name = _FLOAT_NAMES.get(x.dtype)
    if name is not None:
        return name
    raise _bad(f"{what}: dtype {x.dtype} is not a float wire dtype {FLOAT_DTYPES}")


class TopK(NamedTuple):
    """The k largest logits of each row: float32 values (B, R, k) and their int64 ids."""

    values: torch.Tensor
    ids: torch.Tensor


@dataclass(frozen=True)
class SessionLimits:
    max_sessions: int = 64
    max_session_tokens: int = 8192  # per sequence
    max_batch: int = 64
    max_kv_bytes: int = 4 << 30  # all sessions together


class Session:
    """One runner's GPU-side state: rotated K and V for every layer, row lengths per layer."""

    def __init__(self, sid: int, batch: int, max_tokens: int, num_layers: int, dtype=None):
        self.sid = sid
        self.dtype = dtype  # the cache's dtype: the compute dtype, or float32 for a verifying runner
        self.batch = batch
        self.max_tokens = max_tokens
        self.kv: torch.Tensor | None = None  # (2, L, B, Hkv, capacity, D)
        # The same memory as a numpy array when numpy can view it (CPU, float32 or float16):
        # a decode step's small cache writes cost a tenth in numpy of what they cost in torch.
        self.kv_np: np.ndarray | None = None
        self.k_len = np.zeros((num_layers, batch), np.int64)
        self.v_len = np.zeros((num_layers, batch), np.int64)
        # Merged plans: per layer, the unscaled v (B, Hkv, T, D) and its positions, waiting for
        # the trusted side's row scales (AttnScores) to become cache entries.
        self.pending_v: dict[int, tuple[torch.Tensor, np.ndarray]] = {}
        self.opened = self.last_used = time.monotonic()  # last_used: for idle expiry

    @property
    def nbytes(self) -> int:
        """The cache plus the merged plans' pending v, which waits until the next AttnScores."""
        pending = sum(zv.numel() * zv.element_size() for zv, _ in self.pending_v.values())
        return pending + (0 if self.kv is None else self.kv.numel() * self.kv.element_size())

    @property
    def capacity(self) -> int:
        return 0 if self.kv is None else self.kv.shape[4]


class GPUComputeService:
    def __init__(
        self,
        weights: Weights,
        device: torch.device,
        dtype: torch.dtype,
        max_elements: int = 1 << 28,
        limits: SessionLimits = SessionLimits(),
    ):
        self.w = weights
        self.config = weights.config
        self.device = device
        self.dtype = dtype
        self.max_elements = max_elements  # cap on any result the peer can make us allocate
        self.limits = limits
        self.sessions: dict[int, Session] = {}
        self._ring: dict[tuple[int, str], Any] = {}  # private plans' fixed-point weights, built on use
        # A float32 CPU server multiplies the seed's operations in numpy (see `_rows`).
        self.numpy_products = device.type == "cpu" and dtype == torch.float32
        self._wt: dict[int, tuple[torch.Tensor, np.ndarray]] = {}  # id(weight) -> (weight, Wᵀ in numpy)
        # Set by the request handler for a request with `f32` (the runner's --verify): compute in
        # float32 from the compute-dtype weights, so results carry no rounding to bfloat16.
        self.exact = False
        if device.type == "cpu" and weights.lm_head.is_contiguous():
            self._column_major_weights()

    def _column_major_weights(self) -> None:
        """On the CPU, keep the LM head and the q|k|v, o and gate|up weights column-major (the
        same values, transposed storage): a decode step's one-row products then read them as
        x @ Wᵀ with Wᵀ contiguous, which one CPU thread streams faster than F.linear's
        row-major product. Measured in sequence on a v3-fused decode step of SmolLM2: the
        113 MB LM head 8.5 -> 7.3 ms, and q|k|v, o, gate|up together -2.8 ms a token; down_proj
        is slower that way (+0.7 ms) and stays row-major; prefills (128 and 512 rows) are
        within a few percent either way. A tied embedding table becomes the same tensor as the
        LM head (no second copy): a lookup gathers strided rows, microseconds a token. The
        per-module weights stay views of the fused ones. CUDA keeps its layout.

        All of these matrices, down_proj too, move into one arena on huge pages where the
        kernel allows (gpu/hostmem.py)."""
        w, c = self.w, self.config
        tied = w.embed is w.lm_head
        moved = [w.lm_head] + [
            m
            for lw in w.layers
            for m in (lw.qkv_weight, lw.gate_up_weight, lw.weight["o_proj"], lw.weight["down_proj"])
        ]
        self._arena = arena = HostArena(HostArena.bytes_for(moved))
        del moved  # each original is freed as soon as its copy replaces it
        w.lm_head = arena.copy(w.lm_head, column_major=True)
        if tied:
            w.embed = w.lm_head
        for lw in w.layers:
            lw.qkv_weight = arena.copy(lw.qkv_weight, column_major=True)
            lw.gate_up_weight = arena.copy(lw.gate_up_weight, column_major=True)
            lw.weight["o_proj"] = arena.copy(lw.weight["o_proj"], column_major=True)
            lw.weight["down_proj"] = arena.copy(lw.weight["down_proj"])
            for fused, modules in (
                (lw.qkv_weight, ("q_proj", "k_proj", "v_proj")),
                (lw.gate_up_weight, ("gate_proj", "up_proj")),
            ):
                start = 0
                for m in modules:
                    n = c.linear_shapes[m][0]
                    lw.weight[m] = fused[start : start + n]
                    start += n
        release_freed_memory()

    # ---- helpers -------------------------------------------------------------------------
    @property
    def _cdt(self) -> torch.dtype:
        """The dtype activations are computed in for the current request."""
        return torch.float32 if self.exact else self.dtype

    def _w(self, w: torch.Tensor | None) -> torch.Tensor | None:
        """A weight as the current request multiplies it: upcast (exactly) to float32 when exact."""
        return w.float() if w is not None and self.exact and w.dtype != torch.float32 else w

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed(self, fn, *args, **kwargs) -> tuple[Any, float]:
        """Run one operation; return its result and the compute time including device copies."""
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self._sync()
        return out, time.perf_counter() - t0

    def _activation(self, x: np.ndarray, last_dim: int, what: str) -> torch.Tensor:
        self._check_activation(x, last_dim, what)
        return to_torch(x, self.device, self._cdt)

    def _check_activation(self, x: np.ndarray, last_dim: int, what: str) -> None:
        _float_dtype(x, what)
        if x.ndim != 3 or x.shape[-1] != last_dim:
            raise _bad(f"{what}: expected shape (B, T, {last_dim}), got {x.shape}")
        if x.shape[0] * x.shape[1] == 0:
            raise _bad(f"{what}: empty batch")

    def _rows(self, x: np.ndarray, last_dim: int, what: str) -> np.ndarray | torch.Tensor:
        """A checked activation as `_linear` multiplies it: float32 numpy on a float32 CPU
        server, else torch on the device in the compute dtype.

        Why numpy there: a decode step's products are one-row products bound by memory
        bandwidth, as fast in numpy's BLAS as in torch (SmolLM2 v3-fused, one thread, 121
        products: 34.4-34.9 ms against 34.8-35.6 ms a token). But each request comes right
        after a product has streamed megabytes through the caches, so every call runs with
        cold caches, and a torch call's path through its dispatcher is long: torch.bmm of a
        decode step's attention takes 91 µs cold where numpy takes 31. A request that stays in
        numpy from its decoded frames to its reply skips that path entirely."""
        if not self.numpy_products:
            return self._activation(x, last_dim, what)
        self._check_activation(x, last_dim, what)
        return x if x.dtype == _F32 else x.astype(np.float32)  # bfloat16 and float16 wires: exact

    def _linear(
        self, x: np.ndarray | torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None
    ) -> np.ndarray | torch.Tensor:
        """x Wᵀ + b, in numpy for a numpy x (`_rows`), else F.linear."""
        if not isinstance(x, np.ndarray):
            return F.linear(x, self._w(w), self._w(b))
        kept = self._wt.get(id(w))
        if kept is None:  # the weight is kept with its view, so its id cannot be reused
            kept = self._wt[id(w)] = (w, w.numpy().T)
        y = np.matmul(x, kept[1])
        if b is not None:
            y += b.numpy()
        return y

    def _check_result_size(self, shape: tuple[int, ...], what: str) -> None:
        n = math.prod(shape)
        if n > self.max_elements:
            raise _bad(f"{what}: result of {n} elements exceeds the limit {self.max_elements}", "too_large")

    def _layer(self, layer: int, what: str):
        if not 0 <= layer < self.config.num_layers:
            raise _bad(f"{what}: layer {layer} out of range [0, {self.config.num_layers})", "bad_args")
        return self.w.layers[layer]

    # ---- the seed's operations -------------------------------------------------------------
    def init(self) -> tuple[dict[str, Any], list[np.ndarray]]:
        """Model config, RoPE parameters, the stacked RMSNorm weights (2L+1, E), and the biases
        the merged plans add on the trusted side (their names listed in `biases`)."""
        biases = self.w.bias_stacks()
        result = {"config": self.config.to_dict(), "rope": dict(self.config.rope), "biases": list(biases)}
        result["dtype"] = str(self.dtype).removeprefix("torch.")  # private plans and --verify need it
        return result, [self.w.norm_stack().numpy(), *(b.numpy() for b in biases.values())]

    def embedding(self, ids: np.ndarray) -> torch.Tensor:
        if ids.dtype != DTYPES["int64"] or ids.ndim != 2 or ids.size == 0:
            raise _bad(f"Embedding: ids must be non-empty int64 (B, T), got {ids.dtype}{ids.shape}")
        V = self.config.vocab_size
        if ids.min() < 0 or ids.max() >= V:
            raise _bad(f"Embedding: token ids must lie in [0, {V})", "bad_args")
        self._check_result_size((*ids.shape, self.config.hidden_size), "Embedding")
        return F.embedding(to_torch(ids, self.device), self.w.embed)

    def linear(self, layer: int, module: str, x: np.ndarray) -> torch.Tensor | np.ndarray:
        lw = self._layer(layer, "Linear")
        shapes = self.config.linear_shapes
        if module not in shapes:
            raise _bad(f"Linear: unknown module {module!r}; known: {', '.join(shapes)}", "bad_args")
        n_out, n_in = shapes[module]
        xt = self._rows(x, n_in, f"Linear {module}")
        self._check_result_size((*x.shape[:2], n_out), "Linear")
        return self._linear(xt, lw.weight[module], lw.bias.get(module))

    def matmul(self, a: np.ndarray, b: np.ndarray) -> torch.Tensor:
        name = _float_dtype(a, "Matmul a")
        if _float_dtype(b, "Matmul b") != name:
            raise _bad(f"Matmul: operands differ in dtype ({a.dtype} vs {b.dtype})")
        if not 2 <= a.ndim == b.ndim <= 4:
            raise _bad(f"Matmul: operands must have equal rank 2..4, got {a.shape} and {b.shape}")
        if a.shape[:-2] != b.shape[:-2] or a.shape[-1] != b.shape[-2]:
            raise _bad(f"Matmul: shapes {a.shape} and {b.shape} do not multiply")
        self._check_result_size((*a.shape[:-1], b.shape[-1]), "Matmul")
        return torch.matmul(to_torch(a, self.device, self._cdt), to_torch(b, self.device, self._cdt))

    def lm_head(self, x: np.ndarray, top_k: int | None = None) -> torch.Tensor | np.ndarray | TopK:
        self._check_top_k(top_k, "LMHead")
        xt = self._rows(x, self.config.hidden_size, "LMHead")
        self._check_result_size((*x.shape[:2], self.config.vocab_size), "LMHead")
        logits = self._linear(xt, self.w.lm_head)
        if top_k is not None and isinstance(logits, np.ndarray):
            logits = torch.from_numpy(logits)
        return _top_k(logits, top_k)

    def _check_top_k(self, top_k: int | None, what: str) -> None:
        limit = min(self.config.vocab_size, 1024)
        if top_k is not None and not 1 <= top_k <= limit:
            raise _bad(f"{what}: top_k must lie in [1, {limit}]", "bad_args")

    # ---- the private plans: exact products over Z_2^64 (gpu/ring.py) -------------------------
    def ring_linear(self, layer: int, site: str, x: np.ndarray) -> np.ndarray:
        """x (B, T, in) int64 masked fixed-point -> x W_qᵀ mod 2^64 (B, T, N) int64, no bias."""
        from teesplit.gpu.ring import RingWeights
        from teesplit.protocol import RING_SITES

        if site not in RING_SITES:
            raise _bad(f"RingLinear: unknown site {site!r}; known: {', '.join(RING_SITES)}", "bad_args")
        if site == "lm_head":
            if layer != -1:
                raise _bad("RingLinear: the lm_head site takes layer -1", "bad_args")
            w = self.w.lm_head
        else:
            lw = self._layer(layer, "RingLinear")
            w = {"qkv": lw.qkv_weight, "o": lw.weight["o_proj"], "gate_up": lw.gate_up_weight}.get(site)
            w = lw.weight["down_proj"] if w is None else w
        if self.dtype != torch.float32:
            raise _bad(
                f"RingLinear: this server keeps {str(self.dtype).removeprefix('torch.')} weights; the "
                "private plans need a server started with --dtype float32",
                "bad_args",
            )
        n_out, n_in = w.shape
        if x.dtype != DTYPES["int64"] or x.ndim != 3 or x.shape[-1] != n_in or x.shape[0] * x.shape[1] == 0:
            raise _bad(f"RingLinear {site}: expected int64 (B, T, {n_in}), got {x.dtype}{x.shape}")
        self._check_result_size((*x.shape[:2], n_out), "RingLinear")
        rw = self._ring.get((layer, site))
        if rw is None:  # rows contiguous, whatever the layout kept for the float products
            rw = self._ring[(layer, site)] = RingWeights(w.contiguous())
        return rw.matmul(x.reshape(-1, n_in)).reshape(*x.shape[:2], n_out)

    # ---- fused projections -----------------------------------------------------------------
    def qkv(
        self, layer: int, x: np.ndarray, session: Session | None = None, pos: np.ndarray | None = None
    ) -> torch.Tensor | np.ndarray:
        """q|k|v in one product; with a session, v goes into its cache and only q|k come back."""
        lw = self._layer(layer, "QKV")
        xt = self._rows(x, self.config.hidden_size, "QKV")
        c = self.config
        self._check_result_size((*x.shape[:2], c.q_dim + 2 * c.kv_dim), "QKV")
        y = self._linear(xt, lw.qkv_weight, lw.qkv_bias)  # (B, T, (H + 2 Hkv) D)
        if session is None:
            return y
        B, T = x.shape[:2]
        n, split = y.shape[-1], c.q_dim + c.kv_dim
        if isinstance(y, np.ndarray):
            v = y[..., split:].reshape(B, T, c.num_kv_heads, c.head_dim).transpose(0, 2, 1, 3)
        elif y.is_contiguous():  # the v part as (B, Hkv, T, D) in one view
            v = y.as_strided(
                (B, c.num_kv_heads, T, c.head_dim), (T * n, c.head_dim, n, 1), y.storage_offset() + split
            )
        else:
            v = y[..., split:].view(B, T, c.num_kv_heads, c.head_dim).transpose(1, 2)
        self._write(session, 1, layer, v, pos, "QKV")
        if self.exact:  # a verifying runner checks v with q|k and uses it in AttnOut's check
            return y
        return y[..., : c.q_dim + c.kv_dim]

    def gate_up(self, layer: int, x: np.ndarray) -> torch.Tensor | np.ndarray:
        lw = self._layer(layer, "GateUp")
        xt = self._rows(x, self.config.hidden_size, "GateUp")
        self._check_result_size((*x.shape[:2], 2 * self.config.intermediate_size), "GateUp")
        return self._linear(xt, lw.gate_up_weight, lw.gate_up_bias)  # (B, T, 2F)

    # ---- attention against the session's cache -----------------------------------------
    def attn_scores(
        self,
        session: Session,
        layer: int,
        q: np.ndarray,
        k: np.ndarray,
        pos: np.ndarray,
        r: np.ndarray | None = None,
    ) -> torch.Tensor | np.ndarray:
        """Write the rotated k at pos, return q Kᵀ over every cached position: (B, H, T, S).
        With row scales r (B, T) (merged plans), first turn the pending v into cache entries."""
        lw = self._layer(layer, "AttnScores")
        if r is not None:
            self._finish_pending_v(session, layer, lw, r, pos)
        c = self.config
        B, T = session.batch, (q.shape[2] if q.ndim == 4 else -1)
        _float_dtype(q, "AttnScores q")
        _float_dtype(k, "AttnScores k")
        if (
            q.shape != (B, c.num_heads, T, c.head_dim)
            or k.shape != (B, c.num_kv_heads, T, c.head_dim)
            or T < 1
        ):
            raise _bad(
                f"AttnScores: expected q (B={B}, {c.num_heads}, T, {c.head_dim}) and k "
                f"(B, {c.num_kv_heads}, T, {c.head_dim}), got {q.shape} and {k.shape}"
            )
        BH, GT, D = B * c.num_kv_heads, c.num_heads // c.num_kv_heads * T, c.head_dim
        if _numpy_attention(session, q, k):
            S = self._write(session, 0, layer, k, pos, "AttnScores")
            keys_np = session.kv_np[0, layer, :, :, :S].reshape(BH, S, D)  # a view: (B, Hkv) merge
            return _q_kt(q.reshape(BH, GT, D), keys_np).reshape(B, c.num_heads, T, S)
        S = self._write(session, 0, layer, to_torch(k, self.device, session.dtype), pos, "AttnScores")
        keys = session.kv[0, layer, :, :, :S].reshape(BH, S, D)  # a view: (B, Hkv) merge
        qt = to_torch(q, self.device, keys.dtype).reshape(BH, GT, D)  # query head h reads kv h // G
        return torch.bmm(qt, keys.transpose(1, 2)).view(B, c.num_heads, T, S)

    def attn_out(self, session: Session, layer: int, p: np.ndarray) -> torch.Tensor | np.ndarray:
        """o_proj(P V) with V from the session's cache: (B, T, E)."""
        lw = self._layer(layer, "AttnOut")
        c = self.config
        _float_dtype(p, "AttnOut p")
        B = session.batch
        S = int(session.v_len[layer].max())
        if p.ndim != 4 or p.shape[0] != B or p.shape[1] != c.num_heads or p.shape[3] != S or p.shape[2] < 1:
            raise _bad(f"AttnOut: expected p (B={B}, {c.num_heads}, T, S={S}), got {p.shape}")
        T = p.shape[2]
        BH, GT = B * c.num_kv_heads, c.num_heads // c.num_kv_heads * T
        if _numpy_attention(session, p):
            values_np = session.kv_np[1, layer, :, :, :S].reshape(BH, S, c.head_dim)
            o_np = _p_v(p.reshape(BH, GT, S), values_np)  # (B Hkv, G T, D), i.e. (B, H, T, D)
            # (B, H, T, D) -> (B, T, H D); with T = 1 numpy returns a view of the same memory
            o_np = o_np.reshape(B, c.num_heads, T, c.head_dim).transpose(0, 2, 1, 3).reshape(B, T, c.q_dim)
            if self.numpy_products:
                return self._linear(o_np, lw.weight["o_proj"], lw.bias.get("o_proj"))
            o = torch.from_numpy(o_np)
        else:
            values = session.kv[1, layer, :, :, :S].reshape(BH, S, c.head_dim)  # a view: (B, Hkv) merge
            pt = to_torch(p, self.device, values.dtype).reshape(BH, GT, S)
            o = torch.bmm(pt, values)  # (B Hkv, G T, D), i.e. (B, H, T, D)
            # (B, H, T, D) -> (B, T, H D); with T = 1 that is the same memory
            o = (
                o.view(B, T, c.q_dim)
                if T == 1
                else o.view(B, c.num_heads, T, c.head_dim).transpose(1, 2).reshape(B, T, c.q_dim)
            )
        w = self._w(lw.weight["o_proj"])
        return F.linear(o if o.dtype == w.dtype else o.to(w.dtype), w, self._w(lw.bias.get("o_proj")))

    def write_kv(
        self, session: Session | None, layer: int, k: np.ndarray, v: np.ndarray, pos: np.ndarray
    ) -> tuple:
        """Write rotated keys and values (B, Hkv, T, D) the runner computed at pos (B,) into the
        session's cache of `layer`: a prefill done in v2 placement, handed to v3 decode. All
        checks come before the first write, so a refused request changes nothing."""
        if session is None:
            raise _bad("WriteKV: needs a session (sid)", "bad_args")
        self._layer(layer, "WriteKV")
        c = self.config
        B = session.batch
        if _float_dtype(k, "WriteKV k") != _float_dtype(v, "WriteKV v"):
            raise _bad(f"WriteKV: k and v differ in dtype ({k.dtype} vs {v.dtype})")
        T = k.shape[2] if k.ndim == 4 else 0
        if k.shape != (B, c.num_kv_heads, T, c.head_dim) or v.shape != k.shape or T < 1:
            raise _bad(
                f"WriteKV: expected k and v of shape (B={B}, {c.num_kv_heads}, T >= 1, {c.head_dim}), "
                f"got {k.shape} and {v.shape}"
            )
        for lengths in (session.k_len, session.v_len):
            self._check_positions(session, lengths, layer, pos, T, "WriteKV")
        # As they will be stored (a float16 cache can overflow to Inf); _write checks each again,
        # but only when its turn comes, after the other one was written.
        kt, vt = (to_torch(x, self.device, session.dtype) for x in (k, v))
        if not (bool(torch.isfinite(kt).all()) and bool(torch.isfinite(vt).all())):
            raise _bad(f"WriteKV: NaN or Inf in the keys or values for session {session.sid}; refused")
        self._write(session, 0, layer, kt, pos, "WriteKV")
        self._write(session, 1, layer, vt, pos, "WriteKV")
        return ()

    def _write(
        self,
        s: Session,
        which: int,
        layer: int,
        x: torch.Tensor | np.ndarray,
        pos: np.ndarray | None,
        what: str,
    ) -> int:
        """Write x (B, Hkv, T, D) at each row's position; the row's length becomes pos + T.
        Returns the longest row's new length. x may be numpy (a float32 CPU server's)."""
        lengths = s.k_len if which == 0 else s.v_len
        T = x.shape[2]
        p = self._check_positions(s, lengths, layer, pos, T, what)
        if isinstance(x, np.ndarray) and (x.dtype != _F32 or s.dtype != torch.float32):
            x = torch.from_numpy(np.ascontiguousarray(x))  # the cache's dtype decides, below
        if isinstance(x, np.ndarray):
            xn = x  # float32 into a float32 CPU cache: its numpy view (`_reserve`)
        else:
            if x.dtype != s.dtype:  # checked as it will be stored: a float16 cache can overflow to Inf
                x = x.to(s.dtype)
            xn = x.numpy() if x.is_cpu and x.dtype in _NUMPY_DTYPES else None
        finite = bool(np.isfinite(xn).all()) if xn is not None else bool(torch.isfinite(x).all())
        if not finite:  # NaN/Inf would poison every later step of the session
            raise _bad(
                f"{what}: NaN or Inf in the values for session {s.sid}'s KV cache (layer {layer}); "
                "refused (not written): send finite activations"
            )
        end = max(p) + T
        self._reserve(s, end)
        kv, src = (s.kv_np, xn) if s.kv_np is not None and xn is not None else (s.kv, x)
        if min(p) == end - T:  # every row at the same position
            kv[which, layer, :, :, end - T : end] = src
        else:
            for b in range(s.batch):  # ragged batch: one slice copy per row
                kv[which, layer, b, :, p[b] : p[b] + T] = src[b]
        lengths[layer] = [q + T for q in p]  # from the checked copy, as the writes above
        return end

    def _reserve(self, s: Session, tokens: int) -> None:
        if tokens <= s.capacity:
            return
        c = self.config
        cap = min(max(tokens, 2 * s.capacity, 64), s.max_tokens)
        shape = (2, c.num_layers, s.batch, c.num_kv_heads, cap, c.head_dim)
        new_bytes = int(np.prod(shape)) * torch.empty((), dtype=s.dtype).element_size()
        old_bytes = 0 if s.kv is None else s.kv.numel() * s.kv.element_size()
        total = self.kv_bytes - old_bytes + new_bytes
        if total > self.limits.max_kv_bytes:
            raise _bad(
                f"KV cache of {total} bytes for all sessions would exceed the server's limit of "
                f"{self.limits.max_kv_bytes} (--max-kv-bytes)",
                "too_large",
            )
        kv = torch.zeros(shape, dtype=s.dtype, device=self.device)  # zeros: masked slots stay finite
        if s.kv is not None:
            kv[..., : s.capacity, :] = s.kv
        s.kv = kv
        s.kv_np = kv.numpy() if kv.device.type == "cpu" and kv.dtype in _NUMPY_DTYPES else None

    # ---- merged operations (plans v3-merged and v2-merged) ---------------------------------
    def _gain(self, norm: torch.Tensor) -> torch.Tensor:
        return norm.to(self.dtype)

    def _qkv_unscaled(
        self, layer: int, x: torch.Tensor, session: Session | None, pos: np.ndarray | None, what: str
    ) -> torch.Tensor:
        """z = Wqkv (w ⊙ x) without bias; with a session, v waits for its row scales."""
        lw = self.w.layers[layer]
        z = F.linear(x * self._gain(lw.input_norm), lw.qkv_weight)  # (B, T, (H + 2 Hkv) D)
        if session is None:
            return z
        c = self.config
        B, T = x.shape[:2]
        self._check_positions(session, session.v_len, layer, pos, T, what)
        zv = z[..., c.q_dim + c.kv_dim :].reshape(B, T, c.num_kv_heads, c.head_dim).transpose(1, 2)
        session.pending_v[layer] = (zv.contiguous(), pos.copy())
        return z[..., : c.q_dim + c.kv_dim]

    def _finish_pending_v(self, s: Session, layer: int, lw, r: np.ndarray, pos: np.ndarray) -> None:
        pending = s.pending_v.get(layer)
        if pending is None or pos is None or pending[1].shape != pos.shape or (pending[1] != pos).any():
            raise _bad(f"AttnScores: no pending v for layer {layer} at these positions", "bad_args")
        zv = pending[0]
        B, _, T, _ = zv.shape
        if r.dtype != DTYPES["float32"] or r.shape != (B, T) or not np.isfinite(r).all():
            raise _bad(f"AttnScores: row scales r must be finite float32 ({B}, {T})")
        c = self.config
        v = zv * to_torch(r, self.device, self.dtype)[:, None, :, None]
        if lw.qkv_bias is not None:
            v = v + lw.qkv_bias[c.q_dim + c.kv_dim :].view(c.num_kv_heads, 1, c.head_dim)
        self._write(s, 1, layer, v, pos, "AttnScores")

    def _check_positions(
        self, s: Session, lengths: np.ndarray, layer: int, pos: np.ndarray | None, T: int, what: str
    ) -> list[int]:
        """Check the rows' write positions; returns them as Python ints."""
        if pos is None or pos.dtype != DTYPES["int64"] or pos.shape != (s.batch,):
            raise _bad(f"{what}: positions must be int64 of shape ({s.batch},)")
        p = pos.tolist()  # a few rows: Python compares them faster than numpy
        if min(p) < 0 or any(a > n for a, n in zip(p, lengths[layer].tolist(), strict=True)):
            raise _bad(f"{what}: positions must lie in [0, cached length]: no gaps in the cache", "bad_args")
        if max(p) + T > s.max_tokens:
            raise _bad(
                f"{what}: session {s.sid} holds at most {s.max_tokens} tokens per sequence", "too_large"
            )
        return p

    def embed_qkv(
        self, ids: np.ndarray, session: Session | None = None, pos: np.ndarray | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.embedding(ids).to(self.dtype)  # (B, T, E)
        return x, self._qkv_unscaled(0, x, session, pos, "EmbedQKV")

    def down_qkv(
        self,
        layer: int,
        m: np.ndarray,
        x: np.ndarray,
        session: Session | None = None,
        pos: np.ndarray | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """y = down(m) of `layer`, and the next layer's unscaled q|k|v on the residual x + y."""
        if not 0 <= layer < self.config.num_layers - 1:
            raise _bad(f"DownQKV: layer must lie in [0, {self.config.num_layers - 1})", "bad_args")
        y, xn = self._down_residual(layer, m, x, "DownQKV")
        return y, self._qkv_unscaled(layer + 1, xn, session, pos, "DownQKV")

    def down_lm_head(self, m: np.ndarray, x: np.ndarray, rows: np.ndarray | None, top_k: int | None):
        """Last layer: y = down(m); the LM head on w ⊙ (x + y) at each row's `rows` position."""
        self._check_top_k(top_k, "DownLMHead")
        y, xn = self._down_residual(self.config.num_layers - 1, m, x, "DownLMHead")
        if rows is not None:
            B, T = x.shape[:2]
            if rows.dtype != DTYPES["int64"] or rows.shape != (B,) or (rows < 0).any() or (rows >= T).any():
                raise _bad(f"DownLMHead: rows must be int64 ({B},) within [0, {T})")
            idx = torch.from_numpy(rows.copy()).to(self.device)
            ar = torch.arange(B, device=self.device)
            y, xn = y[ar, idx][:, None], xn[ar, idx][:, None]  # (B, 1, E)
        self._check_result_size((*xn.shape[:2], self.config.vocab_size), "DownLMHead")
        z = F.linear(xn * self._gain(self.w.norm), self.w.lm_head)  # (B, R, V), unscaled
        return y, _top_k(z, top_k)  # the row scale is positive: the top-k of z are the top-k

    def _down_residual(self, layer: int, m: np.ndarray, x: np.ndarray, what: str):
        lw = self.w.layers[layer]
        mt = self._activation(m, self.config.intermediate_size, f"{what} m")
        xt = self._activation(x, self.config.hidden_size, f"{what} x")
        if m.shape[:2] != x.shape[:2]:
            raise _bad(f"{what}: m {m.shape} and x {x.shape} differ in (B, T)")
        y = F.linear(mt, lw.weight["down_proj"], lw.bias.get("down_proj"))
        return y, xt + y

    def o_gate_up(self, layer: int, a: np.ndarray, x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """o = o_proj(a), and the unscaled gate|up on the residual x + o."""
        lw = self._layer(layer, "OGateUp")
        at = self._activation(a, self.config.q_dim, "OGateUp a")
        xt = self._activation(x, self.config.hidden_size, "OGateUp x")
        if a.shape[:2] != x.shape[:2]:
            raise _bad(f"OGateUp: a {a.shape} and x {x.shape} differ in (B, T)")
        o = F.linear(at, lw.weight["o_proj"], lw.bias.get("o_proj"))
        return o, F.linear((xt + o) * self._gain(lw.post_attention_norm), lw.gate_up_weight)

    def attn_out_gate_up(
        self, session: Session, layer: int, p: np.ndarray, x: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """o = o_proj(P V) from the session's cache, and the unscaled gate|up on x + o."""
        o = self.attn_out(session, layer, p)
        if isinstance(o, np.ndarray):  # a float32 CPU server's (`_rows`)
            o = torch.from_numpy(o)
        xt = self._activation(x, self.config.hidden_size, "AttnOutGateUp x")
        if tuple(xt.shape) != tuple(o.shape):
            raise _bad(f"AttnOutGateUp: x must have shape {tuple(o.shape)}, got {x.shape}")
        lw = self.w.layers[layer]
        return o, F.linear((xt + o) * self._gain(lw.post_attention_norm), lw.gate_up_weight)

    # ---- sessions -----------------------------------------------------------------------------
    @property
    def kv_bytes(self) -> int:
        return sum(s.nbytes for s in self.sessions.values())

    def open_session(self, batch: int, max_tokens: int, f32: bool = False) -> dict[str, Any]:
        lim = self.limits
        if not 1 <= batch <= lim.max_batch:
            raise _bad(f"OpenSession: batch must lie in [1, {lim.max_batch}]", "bad_args")
        if not 1 <= max_tokens <= lim.max_session_tokens:
            raise _bad(f"OpenSession: max_tokens must lie in [1, {lim.max_session_tokens}]", "bad_args")
        if len(self.sessions) >= lim.max_sessions:
            raise _bad(
                f"OpenSession: the server already holds {lim.max_sessions} sessions (--max-sessions)",
                "too_large",
            )
        sid = secrets.randbits(62)
        dtype = torch.float32 if f32 else self.dtype
        self.sessions[sid] = Session(sid, batch, max_tokens, self.config.num_layers, dtype)
        c = self.config
        per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * batch
        return {
            "sid": sid,
            "kv_bytes_per_token": per_token * torch.empty((), dtype=dtype).element_size(),
        }

    def session(self, sid: int | None) -> Session:
        s = self.sessions.get(sid) if sid is not None else None
        if s is None:
            raise _bad(f"unknown session {sid} (closed, expired, or the server restarted)", "no_session")
        s.last_used = time.monotonic()
        return s

    def close_session(self, sid: int) -> Session:
        return self.sessions.pop(self.session(sid).sid)

    def expire_idle(self, max_idle_s: float, now: float | None = None) -> list[Session]:
        """Drop the sessions unused for more than `max_idle_s` seconds; returns them. A later
        request on one gets "no_session", and the runner rebuilds it from its token history."""
        now = time.monotonic() if now is None else now
        idle = [s for s in self.sessions.values() if now - s.last_used > max_idle_s]
        for s in idle:
            del self.sessions[s.sid]
        return idle
