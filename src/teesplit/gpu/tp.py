"""Tensor parallelism: the model sharded over the ranks of a torch.distributed group (UNTRUSTED side).

Every rank holds 1/N of each weight, as Megatron-LM lays it out:
- q/k/v and gate/up are column-parallel. Rank r holds the output rows of its query heads
  [r H/N, (r+1) H/N) and of the KV heads they read, [r Hkv/N, (r+1) Hkv/N): whole KV heads, so
  attention never leaves the rank and each session's KV cache is sharded the same way. Of
  gate/up it holds the MLP slice [r F/N, (r+1) F/N).
- o_proj and down_proj are row-parallel: rank r holds the input columns of its heads and of its
  MLP slice, and the ranks' partial products are added up (an all-reduce). Their biases live on
  rank 0 only, so they are added once.
- The embedding and the LM head are vocabulary-parallel: rank r holds a contiguous slice of the
  vocabulary. A lookup is masked to the slice and all-reduced; logits are gathered, and top-k
  is taken on each rank and merged on rank 0.
- The RMSNorm gains (and the small bias stacks Init hands the trusted side) are replicated.

Each rank runs an ordinary `GPUComputeService` over its shard, with a *local* ModelConfig
(H/N heads, Hkv/N KV heads, MLP width F/N, its vocabulary slice): the service's code is the
same code. This module adds what differs:
- `ShardPlan`: which slice a rank holds, and the refusal of a --tp that does not divide the model;
- `load_shard`: a rank reads only its slices of the checkpoint (safetensors slices);
- `ShardedService`: the service plus the collectives behind its hooks (`_reduce`, `_agree`)
  and the hand-over of a request to the other ranks at `_checked`;
- `SHARDING`: for each operation, `split` (a rank's slice of the request's tensors; rank 0 also
  checks here what only the whole model knows, before anything is sent) and `combine` (the
  ranks' outputs put together on rank 0). Operations without an entry are refused by a
  tensor-parallel server; `LOCAL` ones (no weights) are served by rank 0 alone.

The process group, the request hand-over and the failure handling are in `tp_runtime.py`.

The private plans' ring operations shard the same way, on integers: each rank quantizes its
own rows of the column-parallel sites by quant.py's rule (a row's scale is its own). A
row-parallel site (o_proj, down_proj) scales each row by the maximum over the whole row, which
no rank holds: the ranks take the maximum of their maxima (one all-reduce at RingSetup), so
every rank derives the integers the whole model has at its columns, the ones the trusted side
derives. A merged ring step is then: each rank's part of the first product, summed over the
ranks modulo 2^64 (exact in any order; summed as 32-bit halves, so no reduction ever wraps),
the residual add with the row multipliers on every rank, and this rank's rows of the second
product, gathered on rank 0.

Shape letters: B batch, T new tokens, S cached + new, H heads, Hkv KV heads, D head dim,
E hidden, F MLP width, V vocabulary; lower case h, hk, f: one rank's share.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open

from teesplit import quant
from teesplit.config import LAYER_MODULES, ModelConfig
from teesplit.errors import UsageError
from teesplit.gpu.handler import Call
from teesplit.gpu.service import (
    ROW_PARALLEL,
    GPUComputeService,
    SessionLimits,
    TopK,
    check_kv_pair,
    check_p,
    check_qk,
    check_ring_step,
    to_torch,
)
from teesplit.gpu.weights import Weights, _assemble, safetensor_files
from teesplit.protocol import RING_OPS, ProtocolError
from teesplit.quant import QuantizationError


class TPConfigError(UsageError):
    """--tp does not fit the model or the launch."""


# ---- which slice a rank holds ---------------------------------------------------------------------
def tp_sizes(config: ModelConfig) -> list[int]:
    """The tensor-parallel sizes that divide the heads, the KV heads and the MLP width."""
    dims = (config.num_heads, config.num_kv_heads, config.intermediate_size)
    return [n for n in range(1, config.num_kv_heads + 1) if all(d % n == 0 for d in dims)]


def check_tp_size(config: ModelConfig, n: int) -> None:
    """Refuse a --tp that does not divide the heads, KV heads and MLP width, naming the sizes that do."""
    if n < 1:
        raise TPConfigError(f"--tp must be at least 1, got {n}")
    dims = {
        "attention heads": config.num_heads,
        "KV heads": config.num_kv_heads,
        "MLP width": config.intermediate_size,
    }
    bad = [f"{v} {name}" for name, v in dims.items() if v % n]
    if bad:
        raise TPConfigError(
            f"--tp {n} does not divide this model's {' and '.join(bad)} (each rank must hold whole "
            f"heads, whole KV heads and an equal MLP slice); --tp must divide the {config.num_heads} "
            f"attention heads, {config.num_kv_heads} KV heads and MLP width {config.intermediate_size}: "
            f"{', '.join(map(str, tp_sizes(config)))} work"
        )


def vocab_bounds(vocab: int, world: int) -> list[int]:
    """Where each rank's vocabulary slice starts, and the end: sizes differ by at most one."""
    base, extra = divmod(vocab, world)
    bounds = [0]
    for r in range(world):
        bounds.append(bounds[-1] + base + (r < extra))
    return bounds


@dataclass(frozen=True)
class ShardPlan:
    config: ModelConfig  # the whole model's
    world: int
    rank: int

    def __post_init__(self) -> None:
        check_tp_size(self.config, self.world)
        if not 0 <= self.rank < self.world:
            raise TPConfigError(f"rank {self.rank} outside a group of {self.world}")

    @property
    def heads(self) -> int:  # h
        return self.config.num_heads // self.world

    @property
    def kv_heads(self) -> int:  # hk
        return self.config.num_kv_heads // self.world

    @property
    def mlp(self) -> int:  # f
        return self.config.intermediate_size // self.world

    @property
    def vocab(self) -> list[int]:
        return vocab_bounds(self.config.vocab_size, self.world)

    def vocab_range(self, rank: int | None = None) -> tuple[int, int]:
        r = self.rank if rank is None else rank
        b = self.vocab
        return b[r], b[r + 1]

    def local_config(self) -> ModelConfig:
        """The config a rank's service runs with: its heads, KV heads, MLP slice and vocabulary."""
        v0, v1 = self.vocab_range()
        return dataclasses.replace(
            self.config,
            num_heads=self.heads,
            num_kv_heads=self.kv_heads,
            intermediate_size=self.mlp,
            vocab_size=v1 - v0,
        )

    def rows(self, module: str) -> tuple[int, int] | None:
        """The output rows of a column-parallel weight this rank holds (None: row-parallel)."""
        D, r = self.config.head_dim, self.rank
        span = {
            "q_proj": self.heads * D,
            "k_proj": self.kv_heads * D,
            "v_proj": self.kv_heads * D,
            "gate_proj": self.mlp,
            "up_proj": self.mlp,
        }.get(module)
        return None if span is None else (r * span, (r + 1) * span)

    def cols(self, module: str) -> tuple[int, int]:
        """The input columns of a row-parallel weight (o_proj, down_proj) this rank holds."""
        span = self.heads * self.config.head_dim if module == "o_proj" else self.mlp
        return self.rank * span, (self.rank + 1) * span


# ---- loading a rank's shard -------------------------------------------------------------------------
def _slice_for(plan: ShardPlan, key: str) -> tuple[slice, ...] | None:
    """How rank plan.rank slices checkpoint tensor `key` (None: whole, replicated)."""
    name = key.removeprefix("model.")
    if name in ("embed_tokens.weight", "lm_head.weight"):
        v0, v1 = plan.vocab_range()
        return (slice(v0, v1),)
    parts = name.split(".")
    if len(parts) < 2 or parts[-2] not in LAYER_MODULES:
        return None  # norms
    module, kind = parts[-2], parts[-1]
    rows = plan.rows(module)
    if rows is not None:
        return (slice(*rows),)
    if kind == "weight":  # row-parallel: the input columns
        return (slice(None), slice(*plan.cols(module)))
    return None  # a row-parallel bias: whole (kept on rank 0 only, see load_shard)


def load_shard(model_dir: str | Path, plan: ShardPlan, device: torch.device, dtype: torch.dtype) -> Weights:
    """This rank's slices of a Hugging Face checkpoint, read as slices (never the whole tensor),
    assembled and shape-checked against the local config."""
    model_dir = Path(model_dir)
    raw: dict[str, torch.Tensor] = {}
    for f in safetensor_files(model_dir):
        with safe_open(str(f), framework="pt") as h:
            for key in h.keys():
                if key.endswith("rotary_emb.inv_freq"):
                    continue
                index = _slice_for(plan, key)
                t = h.get_slice(key)[index] if index is not None else h.get_tensor(key)
                # Norm weights stay float32: the trusted side receives them, and applies them in float32.
                want = torch.float32 if key.endswith("norm.weight") else dtype
                t = t.to(device=device, dtype=want).contiguous()
                if t.untyped_storage().nbytes() > t.numel() * t.element_size():
                    t = t.clone()  # a slice can be a view of the whole tensor: keep only the slice
                raw[key] = t
    w = _assemble(plan.local_config(), raw)
    if plan.rank:  # row-parallel biases are added once, by rank 0
        for layer in w.layers:
            for m in ROW_PARALLEL:
                layer.bias.pop(m, None)
    return w


def init_payload(model_dir: str | Path, config: ModelConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """What Init hands the trusted side, for the whole model: the (2L+1, E) norm stack and the
    bias stacks (as `Weights.norm_stack` and `Weights.bias_stacks`), read whole from the
    checkpoint: they are small."""
    tensors: dict[str, torch.Tensor] = {}
    for f in safetensor_files(Path(model_dir)):
        with safe_open(str(f), framework="pt") as h:
            for key in h.keys():
                if key.endswith(("norm.weight", ".bias")):
                    tensors[key.removeprefix("model.")] = h.get_tensor(key).float()

    def layer(i: int, name: str) -> torch.Tensor:
        return tensors[f"layers.{i}.{name}"]

    L = range(config.num_layers)
    norms = [
        t
        for i in L
        for t in (layer(i, "input_layernorm.weight"), layer(i, "post_attention_layernorm.weight"))
    ]
    stacks: dict[str, torch.Tensor] = {}
    if config.qkv_bias:
        qkv = ("q_proj", "k_proj", "v_proj")
        stacks["qkv"] = torch.stack([torch.cat([layer(i, f"self_attn.{m}.bias") for m in qkv]) for i in L])
    if config.o_bias:
        stacks["o"] = torch.stack([layer(i, "self_attn.o_proj.bias") for i in L])
    if config.mlp_bias:
        gate_up = ("gate_proj", "up_proj")
        stacks["gate_up"] = torch.stack([torch.cat([layer(i, f"mlp.{m}.bias") for m in gate_up]) for i in L])
        stacks["down"] = torch.stack([layer(i, "mlp.down_proj.bias") for i in L])
    return torch.stack([*norms, tensors["norm.weight"]]), stacks


def weight_bytes(w: Weights) -> int:
    """Bytes of the weights a rank holds (each tensor once: views and tied tables counted once)."""
    seen: dict[int, int] = {}
    tensors = [w.embed, w.lm_head, w.norm]
    for layer in w.layers:
        tensors += [layer.qkv_weight, layer.gate_up_weight, layer.input_norm, layer.post_attention_norm]
        tensors += [*layer.weight.values(), *layer.bias.values()]
        tensors += [b for b in (layer.qkv_bias, layer.gate_up_bias) if b is not None]
    for t in tensors:
        if t is None:  # a private-plans-only server freed its float matrices
            continue
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


# ---- the service of one rank ------------------------------------------------------------------------
class Collectives(Protocol):
    """What the service needs of the group (tp_runtime.Group)."""

    def all_reduce(self, y: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray: ...

    def agree(self, ok: bool) -> bool: ...

    def max_over_ranks(self, a: np.ndarray) -> np.ndarray: ...


class ShardedService(GPUComputeService):
    """A GPUComputeService over one rank's shard (see the module docstring)."""

    def __init__(
        self,
        weights: Weights,
        plan: ShardPlan,
        group: Collectives,
        device: torch.device,
        dtype: torch.dtype,
        init: tuple[torch.Tensor, dict[str, torch.Tensor]],
        limits: SessionLimits | None = None,
        private_weights: int | None = None,
    ):
        self.plan, self.group = plan, group
        self._init = init
        # Rank 0: hands the current request to the other ranks, at its first `_checked` (set by
        # tp_runtime for each request; None on the other ranks and between requests).
        self.commit: Callable[[], None] | None = None
        self.agreed_refusals = 0  # refusals decided together after the hand-over (see `_agree`)
        # (with private_weights, every rank quantizes here, together: see `_build_ring`)
        limits = limits or SessionLimits()
        super().__init__(weights, device, dtype, limits=limits, private_weights=private_weights)
        self.kv_scale = plan.world  # each rank holds 1/N of every session's cache

    @property
    def vocab_size(self) -> int:
        return self.plan.config.vocab_size  # token ids are the whole vocabulary's

    def init(self) -> tuple[dict[str, Any], list[np.ndarray]]:
        norms, biases = self._init
        c = self.plan.config
        result = {"config": c.to_dict(), "rope": dict(c.rope), "biases": list(biases)}
        result["dtype"] = str(self.dtype).removeprefix("torch.")
        return result, [norms.numpy(), *(b.numpy() for b in biases.values())]

    def _checked(self) -> None:
        commit, self.commit = self.commit, None
        if commit is not None:
            commit()

    def _reduce(self, y: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        self._checked()  # never a collective the other ranks were not told to join
        return self.group.all_reduce(y)

    def _agree(self, ok: bool) -> bool:
        self._checked()
        ok = self.group.agree(ok)
        self.agreed_refusals += not ok
        return ok

    def _build_ring(self, ring_model: type, bits: int, source: str):
        """Every rank quantizes its shard; the row-parallel sites' row maxima are the whole
        rows' (one all-reduce), and a weight no rank can quantize is refused by all together."""

        def whole_rows(local: list[np.ndarray]) -> list[np.ndarray]:
            self._checked()
            flat = self.group.max_over_ranks(np.concatenate(local))
            return np.split(flat, np.cumsum([len(a) for a in local])[:-1])

        model = error = None
        try:
            model = ring_model.build(self.w, bits, source, self.device, whole_rows=whole_rows)
        except QuantizationError as e:
            error = e
        if not self._agree(error is None):
            why = error or "the weights of another rank cannot be quantized (see that rank's log)"
            raise ProtocolError(f"RingSetup: {why}", "internal")
        return model

    def _ring_total(self, o):
        """The ranks' parts of a ring step's first product, summed modulo 2^64: as 32-bit
        halves (int64 sums of fewer than 2^31 of them cannot wrap), so the sum is exact in any
        reduction order without relying on how a collective library wraps."""
        halves = (o & 0xFFFFFFFF, o >> 32)  # arithmetic shift: o = hi 2^32 + lo
        both = self._reduce(np.stack(halves) if isinstance(o, np.ndarray) else torch.stack(halves))
        return (both[1] << 32) + both[0]  # wraps modulo 2^64

    def ring_setup(self, bits: int) -> dict[str, Any]:
        """RingSetup's description, with the bytes per weight of the whole group."""
        res = super().ring_setup(bits)
        model = self._ring[bits]
        held = torch.tensor([model.nbytes, sum(s.weights for s in model.sites.values())], dtype=torch.float64)
        held = self._reduce(held)
        return {**res, "bytes_per_weight": float(held[0] / held[1])}

    def resident_weight_bytes(self) -> int:
        """The float weights this rank holds, and its private plans' integers."""
        return weight_bytes(self.w) + self.private_weight_bytes

    def _embed(self, ids: np.ndarray) -> torch.Tensor:
        """Vocabulary-parallel lookup: this rank's rows for its ids, zeros elsewhere, summed
        over the ranks (exactly one rank adds a non-zero row)."""
        v0, v1 = self.plan.vocab_range()
        local = to_torch(ids, self.device) - v0  # (B, T)
        outside = (local < 0) | (local >= v1 - v0)
        x = F.embedding(local.clamp(0, v1 - v0 - 1), self.w.embed)  # (B, T, E)
        return self._reduce(x.masked_fill_(outside[..., None], 0))


# ---- each operation's split and combine ------------------------------------------------------------
class Gatherer(Protocol):
    """What `combine` needs of the group (tp_runtime.Group): rank 0 gets every rank's tensor."""

    rank: int
    world: int

    def gather(self, t: torch.Tensor) -> list[torch.Tensor] | None: ...


Split = Callable[[ShardedService, Call], Call]
Combine = Callable[[Gatherer, ShardPlan, Call, Any], Any]


@dataclass(frozen=True)
class Sharding:
    """How one operation is shared out. `split(service, call)` makes this rank's call from the
    whole request; on rank 0 it runs before anything is sent, so it also checks what only the
    whole model can check (shapes along split dimensions, top-k against the whole vocabulary,
    result sizes of gathered outputs), with the single-GPU server's messages. `combine(group,
    plan, call, out)` turns the ranks' outputs into the whole result on rank 0 (None elsewhere);
    every rank calls it, in the same order."""

    split: Split | None
    combine: Combine


LOCAL = None  # served by rank 0 alone: nothing to share (Init, Ping, Matmul)


def _to_torch(t: torch.Tensor | np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(t)) if isinstance(t, np.ndarray) else t.contiguous()


def _own(group: Gatherer, t: Any) -> Any:
    """An output every rank already holds whole (all-reduced) or that only rank 0 makes."""
    return t if group.rank == 0 else None


def _gather_blocks(group: Gatherer, t: torch.Tensor | np.ndarray, blocks: list[list[int]]) -> Any:
    """Rank r's output (..., sum(blocks[r])) holds its share of each block (q, k, v; gate, up;
    vocabulary): rank 0 gets the blocks in order, each the ranks' shares side by side."""
    t = _to_torch(t)
    widest = max(sum(b) for b in blocks)
    if t.shape[-1] < widest:  # uneven vocabulary slices: gather needs equal shapes
        t = F.pad(t, (0, widest - t.shape[-1]))
    parts = group.gather(t)
    if parts is None:
        return None
    out = []
    for j in range(len(blocks[0])):
        for r, part in enumerate(parts):
            start = sum(blocks[r][:j])
            out.append(part[..., start : start + blocks[r][j]])
    return torch.cat(out, dim=-1)


def _gather_heads(group: Gatherer, t: torch.Tensor | np.ndarray) -> Any:
    """(B, h, T, S) per rank -> (B, H, T, S) on rank 0."""
    parts = group.gather(_to_torch(t))
    return None if parts is None else torch.cat(parts, dim=1)


def _qkv_blocks(plan: ShardPlan, with_v: bool) -> list[list[int]]:
    D = plan.config.head_dim
    share = [plan.heads * D, plan.kv_heads * D] + ([plan.kv_heads * D] if with_v else [])
    return [share] * plan.world


def _gate_up_blocks(plan: ShardPlan) -> list[list[int]]:
    return [[plan.mlp, plan.mlp]] * plan.world


def _vocab_blocks(plan: ShardPlan) -> list[list[int]]:
    b = plan.vocab
    return [[b[r + 1] - b[r]] for r in range(plan.world)]


def _logits(group: Gatherer, plan: ShardPlan, out: Any, top_k: int | None) -> Any:
    """The LM head's output: logits gathered over the vocabulary, or each rank's top-k merged."""
    if not isinstance(out, TopK):
        return _gather_blocks(group, out, _vocab_blocks(plan))
    v0, _ = plan.vocab_range()
    values, ids = out.values, out.ids + v0  # (B, R, k) on every rank: a slice smaller than k is padded
    if values.shape[-1] < top_k:
        values = F.pad(values, (0, top_k - values.shape[-1]), value=float("-inf"))
        ids = F.pad(ids, (0, top_k - ids.shape[-1]))
    values, ids = group.gather(values.contiguous()), group.gather(ids.contiguous())
    if values is None:
        return None
    values, ids = torch.cat(values, dim=-1), torch.cat(ids, dim=-1)  # (B, R, N k)
    best, where = torch.topk(values, top_k, dim=-1)
    return TopK(best, torch.gather(ids, -1, where))


def _local_top_k(service: ShardedService, call: Call, what: str) -> Call:
    """top_k is checked against the whole vocabulary; each rank takes at most its slice's size."""
    top_k = call.args.get("top_k")
    limit = min(service.plan.config.vocab_size, 1024)
    if top_k is None:
        return call
    if not 1 <= top_k <= limit:
        raise ProtocolError(f"{what}: top_k must lie in [1, {limit}]", "bad_args")
    return dataclasses.replace(call, args={**call.args, "top_k": min(top_k, service.config.vocab_size)})


def _sliced(call: Call, index: int, tensor: np.ndarray) -> Call:
    tensors = list(call.tensors)
    tensors[index] = tensor
    return dataclasses.replace(call, tensors=tensors)


def _head_slice(plan: ShardPlan, x: np.ndarray, kv: bool = False) -> np.ndarray:
    n = plan.kv_heads if kv else plan.heads
    return x[:, plan.rank * n : (plan.rank + 1) * n]


def _feature_slice(plan: ShardPlan, module: str, x: np.ndarray) -> np.ndarray:
    return x[..., slice(*plan.cols(module))]


# Linear ---------------------------------------------------------------------------------------------
def _split_linear(s: ShardedService, c: Call) -> Call:
    layer, module, x = c.args["layer"], c.args["module"], c.tensors[0]
    full = s.plan.config.linear_shapes
    if module not in full or not 0 <= layer < s.config.num_layers:
        return c  # the rank's service refuses it, as the single-GPU one does
    n_out, n_in = full[module]
    s._check_activation(x, n_in, f"Linear {module}")
    s._check_result_size((*x.shape[:2], n_out), "Linear")
    return _sliced(c, 0, _feature_slice(s.plan, module, x)) if module in ROW_PARALLEL else c


def _combine_linear(group: Gatherer, plan: ShardPlan, c: Call, out: Any) -> Any:
    module = c.args["module"]
    if module in ROW_PARALLEL:
        return _own(group, out)
    width = plan.rows(module)[1] - plan.rows(module)[0]
    return _gather_blocks(group, out, [[width]] * plan.world)


# The LM head ----------------------------------------------------------------------------------------
def _split_lm_head(s: ShardedService, c: Call) -> Call:
    c = _local_top_k(s, c, "LMHead")
    x = c.tensors[0]
    s._check_activation(x, s.config.hidden_size, "LMHead")
    s._check_result_size((*x.shape[:2], s.plan.config.vocab_size), "LMHead")
    return c


def _combine_lm_head(group: Gatherer, plan: ShardPlan, c: Call, out: Any) -> Any:
    return _logits(group, plan, out, c.args.get("top_k"))


# Fused projections ------------------------------------------------------------------------------------
def _split_qkv(s: ShardedService, c: Call) -> Call:
    cfg, x = s.plan.config, c.tensors[0]
    s._layer(c.args["layer"], "QKV")
    s._check_activation(x, cfg.hidden_size, "QKV")
    s._check_result_size((*x.shape[:2], cfg.q_dim + 2 * cfg.kv_dim), "QKV")
    return c


def _combine_qkv(group: Gatherer, plan: ShardPlan, c: Call, out: Any) -> Any:
    with_v = c.session is None or c.args.get("f32", False)  # as the service returns it
    return _gather_blocks(group, out, _qkv_blocks(plan, with_v))


def _split_gate_up(s: ShardedService, c: Call) -> Call:
    x = c.tensors[0]
    s._layer(c.args["layer"], "GateUp")
    s._check_activation(x, s.config.hidden_size, "GateUp")
    s._check_result_size((*x.shape[:2], 2 * s.plan.config.intermediate_size), "GateUp")
    return c


def _combine_gate_up(group: Gatherer, plan: ShardPlan, c: Call, out: Any) -> Any:
    return _gather_blocks(group, out, _gate_up_blocks(plan))


# Attention against the session's cache ------------------------------------------------------------
def _split_attn_scores(s: ShardedService, c: Call) -> Call:
    q, k, pos = c.tensors[:3]
    r = c.tensors[3] if len(c.tensors) == 4 else None
    session, layer, cfg = c.session, c.args["layer"], s.plan.config
    s._layer(layer, "AttnScores")
    if r is not None:
        s._check_pending_v(session, layer, r, pos)
    check_qk(q, k, session.batch, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
    c = _sliced(c, 0, _head_slice(s.plan, q))
    return _sliced(c, 1, _head_slice(s.plan, k, kv=True))


def _split_write_kv(s: ShardedService, c: Call) -> Call:
    """WriteKV: k and v (B, Hkv, T, D) -> this rank's KV heads, checked against the whole model."""
    k, v = c.tensors[:2]
    cfg = s.plan.config
    s._layer(c.args["layer"], "WriteKV")
    check_kv_pair(k, v, c.session.batch, cfg.num_kv_heads, cfg.head_dim)
    c = _sliced(c, 0, _head_slice(s.plan, k, kv=True))
    return _sliced(c, 1, _head_slice(s.plan, v, kv=True))


def _split_p(s: ShardedService, c: Call) -> Call:
    """AttnOut and AttnOutGateUp: p (B, H, T, S) -> this rank's heads."""
    p, layer, cfg = c.tensors[0], c.args["layer"], s.plan.config
    s._layer(layer, "AttnOut")
    check_p(p, c.session.batch, cfg.num_heads, int(c.session.v_len[layer].max()))
    return _sliced(c, 0, _head_slice(s.plan, p))


def _combine_heads(group: Gatherer, plan: ShardPlan, c: Call, out: Any) -> Any:
    return _gather_heads(group, out)


# Merged operations ------------------------------------------------------------------------------------
def _split_down(s: ShardedService, c: Call, what: str) -> Call:
    """DownQKV and DownLMHead: m (B, T, F) -> this rank's MLP slice."""
    m = c.tensors[0]
    s._check_activation(m, s.plan.config.intermediate_size, f"{what} m")
    return _sliced(c, 0, _feature_slice(s.plan, "down_proj", m))


def _split_down_qkv(s: ShardedService, c: Call) -> Call:
    if not 0 <= c.args["layer"] < s.config.num_layers - 1:
        return c  # refused by the rank's service
    return _split_down(s, c, "DownQKV")


def _split_down_lm_head(s: ShardedService, c: Call) -> Call:
    c = _local_top_k(s, c, "DownLMHead")
    c = _split_down(s, c, "DownLMHead")
    x, rows = c.tensors[1], (c.tensors[2] if len(c.tensors) == 3 else None)
    if x.ndim == 3:
        s._check_result_size(
            (x.shape[0], x.shape[1] if rows is None else 1, s.plan.config.vocab_size), "DownLMHead"
        )
    return c


def _split_o_gate_up(s: ShardedService, c: Call) -> Call:
    a = c.tensors[0]
    s._layer(c.args["layer"], "OGateUp")
    s._check_activation(a, s.plan.config.q_dim, "OGateUp a")
    return _sliced(c, 0, _feature_slice(s.plan, "o_proj", a))


def _combine_with_qkv(group: Gatherer, plan: ShardPlan, c: Call, out: Any) -> Any:
    """(the residual's new part, z_qkv): the first whole on every rank, z by columns."""
    y, z = out
    z = _gather_blocks(group, z, _qkv_blocks(plan, c.session is None))
    return None if z is None else (y, z)


def _combine_with_gate_up(group: Gatherer, plan: ShardPlan, c: Call, out: Any) -> Any:
    o, z = out
    z = _gather_blocks(group, z, _gate_up_blocks(plan))
    return None if z is None else (o, z)


def _combine_down_lm_head(group: Gatherer, plan: ShardPlan, c: Call, out: Any) -> Any:
    y, z = out
    z = _logits(group, plan, z, c.args.get("top_k"))
    return None if z is None else (y, z)


def _combine_own(group: Gatherer, plan: ShardPlan, c: Call, out: Any) -> Any:
    return _own(group, out)


# The private plans' ring steps ----------------------------------------------------------------------
def _split_ring(s: ShardedService, c: Call) -> Call:
    """A ring step, checked against the whole model; the first product's input (o_proj's a or
    down_proj's m) -> this rank's columns."""
    first, _, lead, width = check_ring_step(c.op, s.plan.config, c.args.get("layer", 0), c.tensors)
    s.check_ring_bits(c.args["bits"])  # the one-GPU server's order of refusals
    s._check_result_size((*lead, width), c.op)
    if first is None:
        return c
    return _sliced(c, 0, _feature_slice(s.plan, "o_proj" if first.site == "o" else "down_proj", c.tensors[0]))


def _combine_ring(group: Gatherer, plan: ShardPlan, c: Call, out: Any) -> Any:
    """[z] or [o, z]: o is whole on every rank (summed), z is gathered by its blocks."""
    *o, z = out
    site = quant.step_sites(c.op, c.args.get("layer", 0), plan.config.num_layers)[1].site
    blocks = {
        "qkv": _qkv_blocks(plan, True),
        "gate_up": _gate_up_blocks(plan),
        quant.LM_HEAD: _vocab_blocks(plan),
    }
    z = _gather_blocks(group, z, blocks[site])
    return None if z is None else [*o, z.numpy()]


SHARDING: dict[str, Sharding | None] = {
    "Init": LOCAL,
    "Ping": LOCAL,
    "Matmul": LOCAL,  # the seed's attention products: no weights, both operands sent each call
    "OpenSession": Sharding(None, _combine_own),
    "CloseSession": Sharding(None, _combine_own),
    "Embedding": Sharding(None, _combine_own),  # vocabulary-parallel lookup, all-reduced
    "Linear": Sharding(_split_linear, _combine_linear),
    "LMHead": Sharding(_split_lm_head, _combine_lm_head),
    "QKV": Sharding(_split_qkv, _combine_qkv),
    "GateUp": Sharding(_split_gate_up, _combine_gate_up),
    "AttnScores": Sharding(_split_attn_scores, _combine_heads),
    "AttnOut": Sharding(_split_p, _combine_own),
    "WriteKV": Sharding(_split_write_kv, _combine_own),
    "EmbedQKV": Sharding(None, _combine_with_qkv),
    "DownQKV": Sharding(_split_down_qkv, _combine_with_qkv),
    "DownLMHead": Sharding(_split_down_lm_head, _combine_down_lm_head),
    "OGateUp": Sharding(_split_o_gate_up, _combine_with_gate_up),
    "AttnOutGateUp": Sharding(_split_p, _combine_with_gate_up),
    "RingSetup": Sharding(None, _combine_own),  # each rank quantizes its shard (`_build_ring`)
    **{op: Sharding(_split_ring, _combine_ring) for op in RING_OPS},
}


def kv_cache_bytes(config: ModelConfig, tokens: int, dtype_bytes: int = 2, world: int = 1) -> int:
    """Bytes of K/V cache for `tokens` cached tokens (all sequences together), per rank."""
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * tokens * dtype_bytes // world


def weight_bytes_per_rank(config: ModelConfig, dtype_bytes: int = 2, world: int = 1) -> int:
    """Bytes of weights one rank holds for a model (norms replicated, everything else 1/N)."""
    c = config
    per_layer = sum(math.prod(s) for s in c.linear_shapes.values()) + c.qkv_bias * (c.q_dim + 2 * c.kv_dim)
    matrices = c.num_layers * per_layer + c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    norms = (2 * c.num_layers + 1) * c.hidden_size * 4
    return matrices * dtype_bytes // world + norms
