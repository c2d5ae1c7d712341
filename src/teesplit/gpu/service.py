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

from teesplit.config import ModelConfig
from teesplit.gpu.hostmem import HostArena, release_freed_memory
from teesplit.gpu.weights import Weights
from teesplit.protocol import DTYPES, FLOAT_DTYPES, ProtocolError

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Products whose input features a tensor-parallel rank holds a slice of: each rank's result is a
# partial sum (`GPUComputeService._reduce`). The others are split by output features.
ROW_PARALLEL = ("o_proj", "down_proj")


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


def check_qk(q: np.ndarray, k: np.ndarray, B: int, heads: int, kv_heads: int, head_dim: int) -> int:
    """AttnScores' rotated q (B, heads, T, D) and k (B, kv_heads, T, D), T >= 1; -> T."""
    T = q.shape[2] if q.ndim == 4 else -1
    _float_dtype(q, "AttnScores q")
    _float_dtype(k, "AttnScores k")
    if q.shape != (B, heads, T, head_dim) or k.shape != (B, kv_heads, T, head_dim) or T < 1:
        raise _bad(
            f"AttnScores: expected q (B={B}, {heads}, T, {head_dim}) and k "
            f"(B, {kv_heads}, T, {head_dim}), got {q.shape} and {k.shape}"
        )
    return T


def check_p(p: np.ndarray, B: int, heads: int, S: int) -> None:
    """AttnOut's probabilities (B, heads, T >= 1, S) against S cached positions."""
    _float_dtype(p, "AttnOut p")
    if p.ndim != 4 or p.shape[0] != B or p.shape[1] != heads or p.shape[3] != S or p.shape[2] < 1:
        raise _bad(f"AttnOut: expected p (B={B}, {heads}, T, S={S}), got {p.shape}")


def check_kv_pair(k: np.ndarray, v: np.ndarray, B: int, kv_heads: int, head_dim: int) -> int:
    """WriteKV's keys and values: one float dtype, both (B, kv_heads, T >= 1, head_dim); -> T."""
    if _float_dtype(k, "WriteKV k") != _float_dtype(v, "WriteKV v"):
        raise _bad(f"WriteKV: k and v differ in dtype ({k.dtype} vs {v.dtype})")
    T = k.shape[2] if k.ndim == 4 else 0
    if k.shape != (B, kv_heads, T, head_dim) or v.shape != k.shape or T < 1:
        raise _bad(
            f"WriteKV: expected k and v of shape (B={B}, {kv_heads}, T >= 1, {head_dim}), "
            f"got {k.shape} and {v.shape}"
        )
    return T


def check_ring_step(op: str, config: ModelConfig, layer: int, t: list[np.ndarray]) -> tuple:
    """A ring step's sites and tensors against the model: -> (first, second, (B, T), result
    width), where the result is o|z (or z alone, without a first product)."""
    from teesplit import quant

    try:
        first, second = quant.step_sites(op, layer, config.num_layers)
    except ValueError as e:
        raise _bad(str(e), "bad_args") from None
    E = config.hidden_size
    widths, names = [E], ["x"]
    if first is not None:  # o_proj's input a (B, T, H D), or down_proj's m (B, T, F)
        widths = [quant.site_shape(config, first.site)[1], E]
        names = ["a" if first.site == "o" else "m", "x"]
    lead = t[0].shape[:2] if t[0].ndim == 3 else None
    for x, k, name in zip(t, widths, names, strict=True):
        if x.dtype != DTYPES["int64"] or x.ndim != 3 or x.shape[-1] != k or x.shape[:2] != lead:
            raise _bad(f"{op} {name}: expected int64 (B, T, {k}) for every tensor, got {x.dtype}{x.shape}")
    if lead[0] * lead[1] == 0:
        raise _bad(f"{op}: empty batch")
    width = quant.site_shape(config, second.site)[0] + (E if first is not None else 0)
    return first, second, lead, width


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
    """The server's session limits (`teesplit serve` flags). A client is the identity that
    opened a session (gpu/handler.py: the CURVE key, else the connection's routing id): one
    client alone cannot take every slot or all the KV memory from the others."""

    max_sessions: int = 64
    max_session_tokens: int = 8192  # per sequence
    max_batch: int = 64
    max_kv_bytes: int = 4 << 30  # all sessions together
    max_sessions_per_client: int = 16
    max_kv_bytes_per_client: int = 1 << 30


class Session:
    """One runner's GPU-side state: rotated K and V for every layer, row lengths per layer."""

    def __init__(
        self, sid: int, batch: int, max_tokens: int, num_layers: int, dtype=None, owner: bytes | None = None
    ):
        self.sid = sid
        self.owner = owner  # the identity that opened it; only that one may use it
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
        private_weights: int | None = None,
    ):
        """`private_weights` (8 or 16, `serve --private-weights`): quantize every private site
        now and keep only those integers: the float matrices are freed, and the operations that
        need them are refused (`private_only`)."""
        self.w = weights
        self.config = weights.config
        self.device = device
        self.dtype = dtype
        self.max_elements = max_elements  # cap on any result the peer can make us allocate
        self.limits = limits
        self.sessions: dict[int, Session] = {}
        self._ring: dict[int, Any] = {}  # bits -> gpu.ring.RingModel, the private plans' integers
        self.private_only = False
        # A float32 CPU server multiplies the seed's operations in numpy (see `_rows`).
        self.numpy_products = device.type == "cpu" and dtype == torch.float32
        self._wt: dict[int, tuple[torch.Tensor, np.ndarray]] = {}  # id(weight) -> (weight, Wᵀ in numpy)
        # Set by the request handler for a request with `f32` (the runner's --verify): compute in
        # float32 from the compute-dtype weights, so results carry no rounding to bfloat16.
        self.exact = False
        # How many times the KV bytes held here count toward --max-kv-bytes and in replies: a
        # tensor-parallel rank holds 1/N of every session's cache (gpu/tp.py), and the limits
        # are the whole server's.
        self.kv_scale = 1
        if private_weights is not None:
            self._ring_model(private_weights)
            self._drop_float_matrices()
            self.private_only = True
        elif device.type == "cpu" and weights.lm_head.is_contiguous():
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

    # ---- hooks: a tensor-parallel rank overrides these (gpu/tp.py) -------------------------
    def _checked(self) -> None:
        """Every check of the current request has passed: what follows computes. Each operation
        calls this once, after all of its checks and before any work or change of state, so a
        tensor-parallel rank 0 hands the request to the other ranks here: they only ever see
        requests that passed (and refuse one afterwards only all together, see `_agree`)."""

    def _reduce(self, y: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """A product over input features that tensor-parallel ranks hold slices of (o_proj,
        down_proj, a vocabulary-parallel lookup): the ranks' partial sums added up."""
        return y

    def _agree(self, ok: bool) -> bool:
        """Whether a check of computed values passed on every tensor-parallel rank."""
        return ok

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
            raise _bad(
                f"{what}: result of {n} elements exceeds the limit {self.max_elements} (a reply is no "
                "larger than a request may be: raise both with `teesplit serve --max-message-mb`)",
                "too_large",
            )

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
        self._check_ids(ids)
        self._checked()
        return self._embed(ids)

    def _check_ids(self, ids: np.ndarray) -> None:
        if ids.dtype != DTYPES["int64"] or ids.ndim != 2 or ids.size == 0:
            raise _bad(f"Embedding: ids must be non-empty int64 (B, T), got {ids.dtype}{ids.shape}")
        V = self.vocab_size
        if ids.min() < 0 or ids.max() >= V:
            raise _bad(f"Embedding: token ids must lie in [0, {V})", "bad_args")
        self._check_result_size((*ids.shape, self.config.hidden_size), "Embedding")

    @property
    def vocab_size(self) -> int:
        """The model's vocabulary (a tensor-parallel rank's config holds only its slice of it)."""
        return self.config.vocab_size

    def _embed(self, ids: np.ndarray) -> torch.Tensor:
        return F.embedding(to_torch(ids, self.device), self.w.embed)

    def linear(self, layer: int, module: str, x: np.ndarray) -> torch.Tensor | np.ndarray:
        lw = self._layer(layer, "Linear")
        shapes = self.config.linear_shapes
        if module not in shapes:
            raise _bad(f"Linear: unknown module {module!r}; known: {', '.join(shapes)}", "bad_args")
        n_out, n_in = shapes[module]
        xt = self._rows(x, n_in, f"Linear {module}")
        self._check_result_size((*x.shape[:2], n_out), "Linear")
        self._checked()
        y = self._linear(xt, lw.weight[module], lw.bias.get(module))
        return self._reduce(y) if module in ROW_PARALLEL else y

    def matmul(self, a: np.ndarray, b: np.ndarray) -> torch.Tensor:
        name = _float_dtype(a, "Matmul a")
        if _float_dtype(b, "Matmul b") != name:
            raise _bad(f"Matmul: operands differ in dtype ({a.dtype} vs {b.dtype})")
        if not 2 <= a.ndim == b.ndim <= 4:
            raise _bad(f"Matmul: operands must have equal rank 2..4, got {a.shape} and {b.shape}")
        if a.shape[:-2] != b.shape[:-2] or a.shape[-1] != b.shape[-2]:
            raise _bad(f"Matmul: shapes {a.shape} and {b.shape} do not multiply")
        self._check_result_size((*a.shape[:-1], b.shape[-1]), "Matmul")
        self._checked()
        return torch.matmul(to_torch(a, self.device, self._cdt), to_torch(b, self.device, self._cdt))

    def lm_head(self, x: np.ndarray, top_k: int | None = None) -> torch.Tensor | np.ndarray | TopK:
        self._check_top_k(top_k, "LMHead")
        xt = self._rows(x, self.config.hidden_size, "LMHead")
        self._check_result_size((*x.shape[:2], self.config.vocab_size), "LMHead")
        self._checked()
        logits = self._linear(xt, self.w.lm_head)
        if top_k is not None and isinstance(logits, np.ndarray):
            logits = torch.from_numpy(logits)
        return _top_k(logits, top_k)

    def _check_top_k(self, top_k: int | None, what: str) -> None:
        limit = min(self.config.vocab_size, 1024)
        if top_k is not None and not 1 <= top_k <= limit:
            raise _bad(f"{what}: top_k must lie in [1, {limit}]", "bad_args")

    # ---- the private plans: integer products over Z_2^64 (gpu/ring.py, quant.py) -------------
    def check_ring_bits(self, bits: int) -> None:
        """Refuse a weight format this server cannot serve (before anything is quantized)."""
        if bits not in (8, 16):
            raise _bad(f"ring operations: bits must be 8 or 16, got {bits}", "bad_args")
        if self.private_only and bits not in self._ring:
            have = ", ".join(f"int{b}" for b in self._ring)
            raise _bad(
                f"this server keeps only {have} integer weights (serve --private-weights); "
                f"run the private plan with --private-weights {have} or restart the server",
                "bad_args",
            )

    @property
    def private_weight_bytes(self) -> int:
        """Bytes of the private plans' integer weights held here (every format quantized)."""
        return sum(m.nbytes for m in self._ring.values())

    def _ring_model(self, bits: int):
        from teesplit.gpu.ring import RingModel

        self.check_ring_bits(bits)
        model = self._ring.get(bits)
        if model is None:
            source = str(self.dtype).removeprefix("torch.")
            model = self._ring[bits] = self._build_ring(RingModel, bits, source)
        return model

    def _build_ring(self, ring_model: type, bits: int, source: str):
        """Quantize this server's weights for `bits` (a tensor-parallel rank overrides it)."""
        return ring_model.build(self.w, bits, source, self.device)

    def _ring_total(self, o):
        """The first product of a ring step, whole: as computed here (a tensor-parallel rank
        adds up the ranks' parts, gpu/tp.py)."""
        return o

    def _drop_float_matrices(self) -> None:
        """Free every float matrix (the private plans need none of them); norms and biases stay
        (Init returns them)."""
        for lw in self.w.layers:
            lw.weight = {}
            lw.qkv_weight = lw.gate_up_weight = None
        self.w.embed = self.w.lm_head = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        release_freed_memory()

    def ring_setup(self, bits: int) -> dict[str, Any]:
        """Quantize for `bits` (once) and describe the layout: res of RingSetup."""
        model = self._ring_model(bits)
        return {
            "bits": bits,
            "source": model.source,
            "bytes_per_weight": model.bytes_per_weight,
            "layout": model.layout,
        }

    def ring_step(self, op: str, args: dict[str, Any], t: list[np.ndarray]) -> tuple | np.ndarray:
        """One merged ring step (protocol.RING_OPS) on int64 ring elements (B, T, ·): first
        product, residual add with the row multipliers, second product (see gpu/ring.py)."""
        first, second, lead, width = check_ring_step(op, self.config, args.get("layer", 0), t)
        model = self._ring_model(args["bits"])
        self._check_result_size((*lead, width), op)
        self._checked()
        E = self.config.hidden_size
        n_out = width - (E if first is not None else 0)
        rows = [x.reshape(-1, x.shape[-1]) for x in t]
        out = model.step(first, second, rows[0] if first is not None else None, rows[-1], self._ring_total)
        if first is None:
            return out.reshape(*lead, n_out)
        o, z = out
        return o.reshape(*lead, E), z.reshape(*lead, n_out)

    # ---- fused projections -----------------------------------------------------------------
    def qkv(
        self, layer: int, x: np.ndarray, session: Session | None = None, pos: np.ndarray | None = None
    ) -> torch.Tensor | np.ndarray:
        """q|k|v in one product; with a session, v goes into its cache and only q|k come back."""
        lw = self._layer(layer, "QKV")
        xt = self._rows(x, self.config.hidden_size, "QKV")
        c = self.config
        self._check_result_size((*x.shape[:2], c.q_dim + 2 * c.kv_dim), "QKV")
        if session is not None:
            p = self._check_positions(session, session.v_len, layer, pos, x.shape[1], "QKV")
        self._checked()
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
        self._write(session, 1, layer, v, p, "QKV")
        if self.exact:  # a verifying runner checks v with q|k and uses it in AttnOut's check
            return y
        return y[..., : c.q_dim + c.kv_dim]

    def gate_up(self, layer: int, x: np.ndarray) -> torch.Tensor | np.ndarray:
        lw = self._layer(layer, "GateUp")
        xt = self._rows(x, self.config.hidden_size, "GateUp")
        self._check_result_size((*x.shape[:2], 2 * self.config.intermediate_size), "GateUp")
        self._checked()
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
            pv = self._check_pending_v(session, layer, r, pos)
        c = self.config
        B = session.batch
        T = check_qk(q, k, B, c.num_heads, c.num_kv_heads, c.head_dim)
        pk = self._check_positions(session, session.k_len, layer, pos, T, "AttnScores")
        self._check_result_size((B, c.num_heads, T, max(pk) + T), "AttnScores")  # before the write
        self._checked()
        if r is not None:
            self._finish_pending_v(session, layer, lw, r, pv)
        BH, GT, D = B * c.num_kv_heads, c.num_heads // c.num_kv_heads * T, c.head_dim
        if _numpy_attention(session, q, k):
            S = self._write(session, 0, layer, k, pk, "AttnScores")
            keys_np = session.kv_np[0, layer, :, :, :S].reshape(BH, S, D)  # a view: (B, Hkv) merge
            return _q_kt(q.reshape(BH, GT, D), keys_np).reshape(B, c.num_heads, T, S)
        S = self._write(session, 0, layer, to_torch(k, self.device, session.dtype), pk, "AttnScores")
        keys = session.kv[0, layer, :, :, :S].reshape(BH, S, D)  # a view: (B, Hkv) merge
        qt = to_torch(q, self.device, keys.dtype).reshape(BH, GT, D)  # query head h reads kv h // G
        return torch.bmm(qt, keys.transpose(1, 2)).view(B, c.num_heads, T, S)

    def attn_out(self, session: Session, layer: int, p: np.ndarray) -> torch.Tensor | np.ndarray:
        """o_proj(P V) with V from the session's cache: (B, T, E)."""
        self._check_attn_out(session, layer, p)
        self._checked()
        return self._attn_out(session, layer, p)

    def _check_attn_out(self, session: Session, layer: int, p: np.ndarray) -> None:
        self._layer(layer, "AttnOut")
        c = self.config
        B = session.batch
        check_p(p, B, c.num_heads, int(session.v_len[layer].max()))
        self._check_result_size((B, p.shape[2], max(c.q_dim, c.hidden_size)), "AttnOut")

    def _attn_out(self, session: Session, layer: int, p: np.ndarray) -> torch.Tensor | np.ndarray:
        lw, c = self.w.layers[layer], self.config
        B, S, T = session.batch, p.shape[3], p.shape[2]
        BH, GT = B * c.num_kv_heads, c.num_heads // c.num_kv_heads * T
        if _numpy_attention(session, p):
            values_np = session.kv_np[1, layer, :, :, :S].reshape(BH, S, c.head_dim)
            o_np = _p_v(p.reshape(BH, GT, S), values_np)  # (B Hkv, G T, D), i.e. (B, H, T, D)
            # (B, H, T, D) -> (B, T, H D); with T = 1 numpy returns a view of the same memory
            o_np = o_np.reshape(B, c.num_heads, T, c.head_dim).transpose(0, 2, 1, 3).reshape(B, T, c.q_dim)
            if self.numpy_products:
                return self._reduce(self._linear(o_np, lw.weight["o_proj"], lw.bias.get("o_proj")))
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
        o = F.linear(o if o.dtype == w.dtype else o.to(w.dtype), w, self._w(lw.bias.get("o_proj")))
        return self._reduce(o)

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
        T = check_kv_pair(k, v, session.batch, c.num_kv_heads, c.head_dim)
        p = self._check_positions(session, session.k_len, layer, pos, T, "WriteKV")
        self._check_positions(session, session.v_len, layer, pos, T, "WriteKV")
        self._checked()
        # As they will be stored (a float16 cache can overflow to Inf); _write checks each again,
        # but only when its turn comes, after the other one was written.
        kt, vt = (to_torch(x, self.device, session.dtype) for x in (k, v))
        finite = bool(torch.isfinite(kt).all()) and bool(torch.isfinite(vt).all())
        if not self._agree(finite):  # every rank of a tensor-parallel group refuses, or none
            raise _bad(f"WriteKV: NaN or Inf in the keys or values for session {session.sid}; refused")
        self._write(session, 0, layer, kt, p, "WriteKV")
        self._write(session, 1, layer, vt, p, "WriteKV")
        return ()

    def _write(
        self,
        s: Session,
        which: int,
        layer: int,
        x: torch.Tensor | np.ndarray,
        p: list[int],
        what: str,
    ) -> int:
        """Write x (B, Hkv, T, D) at each row's position p (checked by `_check_positions`); the
        row's length becomes p + T. Returns the longest row's new length. x may be numpy (a
        float32 CPU server's)."""
        lengths = s.k_len if which == 0 else s.v_len
        T = x.shape[2]
        if isinstance(x, np.ndarray) and (x.dtype != _F32 or s.dtype != torch.float32):
            x = torch.from_numpy(np.ascontiguousarray(x))  # the cache's dtype decides, below
        if isinstance(x, np.ndarray):
            xn = x  # float32 into a float32 CPU cache: its numpy view (`_reserve`)
        else:
            if x.dtype != s.dtype:  # checked as it will be stored: a float16 cache can overflow to Inf
                x = x.to(s.dtype)
            xn = x.numpy() if x.is_cpu and x.dtype in _NUMPY_DTYPES else None
        finite = bool(np.isfinite(xn).all()) if xn is not None else bool(torch.isfinite(x).all())
        if not self._agree(finite):  # NaN/Inf would poison every later step of the session
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

    def _growth(self, s: Session, tokens: int) -> tuple[int, ...] | None:
        """The cache shape that holds `tokens` per row (None: it already does), checked against
        the server's KV limit."""
        if tokens <= s.capacity:
            return None
        c = self.config
        cap = min(max(tokens, 2 * s.capacity, 64), s.max_tokens)
        shape = (2, c.num_layers, s.batch, c.num_kv_heads, cap, c.head_dim)
        new_bytes = int(np.prod(shape)) * torch.empty((), dtype=s.dtype).element_size() * self.kv_scale
        old_bytes = 0 if s.kv is None else s.kv.numel() * s.kv.element_size() * self.kv_scale
        total = self.kv_bytes - old_bytes + new_bytes
        if total > self.limits.max_kv_bytes:
            raise _bad(
                f"KV cache of {total} bytes for all sessions would exceed the server's limit of "
                f"{self.limits.max_kv_bytes} bytes (raise it with `teesplit serve --max-kv-gib`)",
                "too_large",
            )
        mine = self.kv_bytes_of(s.owner) - old_bytes + new_bytes
        if mine > self.limits.max_kv_bytes_per_client:
            raise _bad(
                f"KV cache of {mine} bytes for this client's sessions would exceed the server's limit "
                f"of {self.limits.max_kv_bytes_per_client} bytes per client (raise it with `teesplit "
                "serve --max-kv-gib-per-client`)",
                "too_large",
            )
        return shape

    def _reserve(self, s: Session, tokens: int) -> None:
        shape = self._growth(s, tokens)
        if shape is None:
            return
        kv = torch.zeros(shape, dtype=s.dtype, device=self.device)  # zeros: masked slots stay finite
        if s.kv is not None:
            kv[..., : s.capacity, :] = s.kv
        s.kv = kv
        s.kv_np = kv.numpy() if kv.device.type == "cpu" and kv.dtype in _NUMPY_DTYPES else None

    # ---- merged operations (plans v3-merged and v2-merged) ---------------------------------
    def _gain(self, norm: torch.Tensor) -> torch.Tensor:
        return norm.to(self.dtype)

    def _qkv_unscaled(
        self, layer: int, x: torch.Tensor, session: Session | None, pos: np.ndarray | None
    ) -> torch.Tensor:
        """z = Wqkv (w ⊙ x) without bias; with a session, v waits for its row scales (at the
        positions pos, which the caller has checked)."""
        lw = self.w.layers[layer]
        z = F.linear(x * self._gain(lw.input_norm), lw.qkv_weight)  # (B, T, (H + 2 Hkv) D)
        if session is None:
            return z
        c = self.config
        B, T = x.shape[:2]
        zv = z[..., c.q_dim + c.kv_dim :].reshape(B, T, c.num_kv_heads, c.head_dim).transpose(1, 2)
        session.pending_v[layer] = (zv.contiguous(), pos.copy())
        return z[..., : c.q_dim + c.kv_dim]

    def _check_pending_v(self, s: Session, layer: int, r: np.ndarray, pos: np.ndarray) -> list[int]:
        """Check that v waits at these positions and r scales it; returns the positions."""
        pending = s.pending_v.get(layer)
        if pending is None or pos is None or pending[1].shape != pos.shape or (pending[1] != pos).any():
            raise _bad(f"AttnScores: no pending v for layer {layer} at these positions", "bad_args")
        B, _, T, _ = pending[0].shape
        if r.dtype != DTYPES["float32"] or r.shape != (B, T) or not np.isfinite(r).all():
            raise _bad(f"AttnScores: row scales r must be finite float32 ({B}, {T})")
        return self._check_positions(s, s.v_len, layer, pos, T, "AttnScores")

    def _finish_pending_v(self, s: Session, layer: int, lw, r: np.ndarray, p: list[int]) -> None:
        zv = s.pending_v[layer][0]
        c = self.config
        v = zv * to_torch(r, self.device, self.dtype)[:, None, :, None]
        if lw.qkv_bias is not None:
            v = v + lw.qkv_bias[c.q_dim + c.kv_dim :].view(c.num_kv_heads, 1, c.head_dim)
        self._write(s, 1, layer, v, p, "AttnScores")

    def _check_positions(
        self, s: Session, lengths: np.ndarray, layer: int, pos: np.ndarray | None, T: int, what: str
    ) -> list[int]:
        """Check the rows' write positions, and that the cache may grow to hold them; returns
        them as Python ints."""
        if pos is None or pos.dtype != DTYPES["int64"] or pos.shape != (s.batch,):
            raise _bad(f"{what}: positions must be int64 of shape ({s.batch},)")
        p = pos.tolist()  # a few rows: Python compares them faster than numpy
        if min(p) < 0 or any(a > n for a, n in zip(p, lengths[layer].tolist(), strict=True)):
            raise _bad(f"{what}: positions must lie in [0, cached length]: no gaps in the cache", "bad_args")
        if max(p) + T > s.max_tokens:
            raise _bad(
                f"{what}: session {s.sid} holds at most {s.max_tokens} tokens per sequence", "too_large"
            )
        self._growth(s, max(p) + T)
        return p

    def embed_qkv(
        self, ids: np.ndarray, session: Session | None = None, pos: np.ndarray | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_ids(ids)
        c = self.config
        self._check_result_size((*ids.shape[:2], c.q_dim + 2 * c.kv_dim), "EmbedQKV")
        if session is not None:
            self._check_positions(session, session.v_len, 0, pos, ids.shape[1], "EmbedQKV")
        self._checked()
        x = self._embed(ids).to(self.dtype)  # (B, T, E)
        return x, self._qkv_unscaled(0, x, session, pos)

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
        mt, xt = self._down_inputs(m, x, "DownQKV")
        if session is not None:
            self._check_positions(session, session.v_len, layer + 1, pos, x.shape[1], "DownQKV")
        self._checked()
        y, xn = self._down_residual(layer, mt, xt)
        return y, self._qkv_unscaled(layer + 1, xn, session, pos)

    def down_lm_head(self, m: np.ndarray, x: np.ndarray, rows: np.ndarray | None, top_k: int | None):
        """Last layer: y = down(m); the LM head on w ⊙ (x + y) at each row's `rows` position."""
        self._check_top_k(top_k, "DownLMHead")
        mt, xt = self._down_inputs(m, x, "DownLMHead")
        B, T = x.shape[:2]
        if rows is not None:
            if rows.dtype != DTYPES["int64"] or rows.shape != (B,) or (rows < 0).any() or (rows >= T).any():
                raise _bad(f"DownLMHead: rows must be int64 ({B},) within [0, {T})")
        self._check_result_size((B, T if rows is None else 1, self.config.vocab_size), "DownLMHead")
        self._checked()
        y, xn = self._down_residual(self.config.num_layers - 1, mt, xt)
        if rows is not None:
            idx = torch.from_numpy(rows.copy()).to(self.device)
            ar = torch.arange(B, device=self.device)
            y, xn = y[ar, idx][:, None], xn[ar, idx][:, None]  # (B, 1, E)
        z = F.linear(xn * self._gain(self.w.norm), self.w.lm_head)  # (B, R, V), unscaled
        return y, _top_k(z, top_k)  # the row scale is positive: the top-k of z are the top-k

    def _down_inputs(self, m: np.ndarray, x: np.ndarray, what: str) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        mt = self._activation(m, c.intermediate_size, f"{what} m")
        xt = self._activation(x, c.hidden_size, f"{what} x")
        if m.shape[:2] != x.shape[:2]:
            raise _bad(f"{what}: m {m.shape} and x {x.shape} differ in (B, T)")
        self._check_result_size((*x.shape[:2], max(c.hidden_size, c.q_dim + 2 * c.kv_dim)), what)
        return mt, xt

    def _down_residual(self, layer: int, m: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """y = down(m) and the residual x + y."""
        lw = self.w.layers[layer]
        y = self._reduce(F.linear(m, lw.weight["down_proj"], lw.bias.get("down_proj")))
        return y, x + y

    def o_gate_up(self, layer: int, a: np.ndarray, x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """o = o_proj(a), and the unscaled gate|up on the residual x + o."""
        lw, c = self._layer(layer, "OGateUp"), self.config
        self._check_activation(a, c.q_dim, "OGateUp a")
        self._check_activation(x, c.hidden_size, "OGateUp x")
        if a.shape[:2] != x.shape[:2]:
            raise _bad(f"OGateUp: a {a.shape} and x {x.shape} differ in (B, T)")
        self._check_result_size((*x.shape[:2], 2 * c.intermediate_size), "OGateUp")
        self._checked()
        at = to_torch(a, self.device, self._cdt)
        xt = to_torch(x, self.device, self._cdt)
        o = self._reduce(F.linear(at, lw.weight["o_proj"], lw.bias.get("o_proj")))
        return o, F.linear((xt + o) * self._gain(lw.post_attention_norm), lw.gate_up_weight)

    def attn_out_gate_up(
        self, session: Session, layer: int, p: np.ndarray, x: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """o = o_proj(P V) from the session's cache, and the unscaled gate|up on x + o."""
        self._check_attn_out(session, layer, p)
        xt = self._activation(x, self.config.hidden_size, "AttnOutGateUp x")
        want = (session.batch, p.shape[2], self.config.hidden_size)  # o's shape
        if tuple(xt.shape) != want:
            raise _bad(f"AttnOutGateUp: x must have shape {want}, got {x.shape}")
        self._check_result_size(
            (session.batch, p.shape[2], 2 * self.config.intermediate_size), "AttnOutGateUp"
        )
        self._checked()
        o = self._attn_out(session, layer, p)
        if isinstance(o, np.ndarray):  # a float32 CPU server's (`_rows`)
            o = torch.from_numpy(o)
        lw = self.w.layers[layer]
        return o, F.linear((xt + o) * self._gain(lw.post_attention_norm), lw.gate_up_weight)

    # ---- sessions -----------------------------------------------------------------------------
    @property
    def kv_bytes(self) -> int:
        return sum(s.nbytes for s in self.sessions.values()) * self.kv_scale

    def kv_bytes_of(self, owner: bytes | None) -> int:
        return sum(s.nbytes for s in self.sessions.values() if s.owner == owner) * self.kv_scale

    def open_session(
        self,
        batch: int,
        max_tokens: int,
        f32: bool = False,
        sid: int | None = None,
        owner: bytes | None = None,
    ) -> dict[str, Any]:
        """A new session owned by `owner` (the identity that asked for it: only it may use the
        session); its id is drawn at random unless `sid` gives it (see handler.Call)."""
        lim = self.limits
        if not 1 <= batch <= lim.max_batch:
            raise _bad(f"OpenSession: batch must lie in [1, {lim.max_batch}] (--max-batch)", "bad_args")
        if not 1 <= max_tokens <= lim.max_session_tokens:
            raise _bad(
                f"OpenSession: max_tokens must lie in [1, {lim.max_session_tokens}] (--max-session-tokens)",
                "bad_args",
            )
        if len(self.sessions) >= lim.max_sessions:
            raise _bad(
                f"OpenSession: the server already holds {lim.max_sessions} sessions (raise it with "
                "`teesplit serve --max-sessions`)",
                "too_large",
            )
        mine = sum(1 for s in self.sessions.values() if s.owner == owner)
        if mine >= lim.max_sessions_per_client:
            raise _bad(
                f"OpenSession: this client already holds {mine} sessions, the server's limit per client "
                "(raise it with `teesplit serve --max-sessions-per-client`; close the sessions you no "
                "longer use)",
                "too_large",
            )
        if sid is None:
            sid = secrets.randbits(62)
        self._checked()
        dtype = torch.float32 if f32 else self.dtype
        self.sessions[sid] = Session(sid, batch, max_tokens, self.config.num_layers, dtype, owner)
        c = self.config
        per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * batch * self.kv_scale
        return {
            "sid": sid,
            "kv_bytes_per_token": per_token * torch.empty((), dtype=dtype).element_size(),
        }

    def session(self, sid: int | None, owner: bytes | None = None) -> Session:
        """The session `sid` if `owner` opened it. Another identity gets exactly the answer an
        unknown id gets, so nothing tells it which ids exist."""
        s = self.sessions.get(sid) if sid is not None else None
        if s is None or s.owner != owner:
            raise _bad(f"unknown session {sid} (closed, expired, or the server restarted)", "no_session")
        s.last_used = time.monotonic()
        return s

    def close_session(self, sid: int, owner: bytes | None = None) -> Session:
        s = self.session(sid, owner)
        self._checked()
        return self.sessions.pop(s.sid)

    def expire_idle(self, max_idle_s: float, now: float | None = None) -> list[Session]:
        """Drop the sessions unused for more than `max_idle_s` seconds; returns them. A later
        request on one gets "no_session", and the runner rebuilds it from its token history."""
        now = time.monotonic() if now is None else now
        idle = [s for s in self.sessions.values() if now - s.last_used > max_idle_s]
        for s in idle:
            del self.sessions[s.sid]
        return idle
