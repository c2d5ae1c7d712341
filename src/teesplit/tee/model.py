"""TEELlamaModel: the Llama/Mistral/Qwen2 forward pass as the trusted side runs it (TRUSTED side).

Every line that crosses the trust boundary is a `self.gpu.` call; everything else here is
numpy in float32 (numerics live in tee/ops.py). The plan decides which calls are made.
Shape letters: B batch, T new tokens, S cached + new tokens, H query heads, Hkv KV heads,
G = H / Hkv, D head dim, E hidden, F MLP width, V vocabulary.

Rows of a batch may hold sequences of different lengths: each row has its own cached length
and positions, and a prompt shorter than the batch's longest is right-padded; the padding's
keys sit after the row's real tokens, so the causal mask already hides them, and the next
token of that row overwrites them.
"""

from __future__ import annotations

import numpy as np

from teesplit.tee.ops import (
    RotaryEmbedding,
    repeat_kv,
    rms_norm,
    rms_scale,
    rope_rotate,
    rope_signed_sin,
    scaled_softmax,
    silu_mul,
)
from teesplit.tee.plans import Plan
from teesplit.tee.port import GPUPort, InitResult


class KVCache:
    """Trusted-side rotated keys and values per layer, preallocated and grown by doubling."""

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int, capacity: int = 256):
        shape = (batch, num_kv_heads, capacity, head_dim)  # (B, Hkv, S_max, D)
        self.k = [np.zeros(shape, np.float32) for _ in range(num_layers)]
        self.v = [np.zeros(shape, np.float32) for _ in range(num_layers)]
        self.lengths = np.zeros(batch, np.int64)  # cached tokens per row, between forward passes

    def update_and_fetch(
        self, layer: int, k: np.ndarray, v: np.ndarray, pos: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        T = k.shape[2]
        end = int(pos.max()) + T
        if end > self.k[layer].shape[2]:
            grow = max(end, 2 * self.k[layer].shape[2])
            pad = ((0, 0), (0, 0), (0, grow - self.k[layer].shape[2]), (0, 0))
            self.k[layer] = np.pad(self.k[layer], pad)
            self.v[layer] = np.pad(self.v[layer], pad)
        if (pos == pos[0]).all():
            self.k[layer][:, :, pos[0] : pos[0] + T] = k
            self.v[layer][:, :, pos[0] : pos[0] + T] = v
        else:
            for b, p in enumerate(pos):  # ragged batch: one slice per row
                self.k[layer][b, :, p : p + T] = k[b]
                self.v[layer][b, :, p : p + T] = v[b]
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n_new: np.ndarray) -> None:
        self.lengths = self.lengths + n_new

    def join(self, other: KVCache) -> KVCache:
        """A cache holding this one's rows, then `other`'s (rows joining a running batch)."""
        out = KVCache.__new__(KVCache)
        out.k, out.v = [], []
        for ka, va, kb, vb in zip(self.k, self.v, other.k, other.v, strict=True):
            cap = max(ka.shape[2], kb.shape[2])
            out.k.append(np.concatenate([_pad_capacity(ka, cap), _pad_capacity(kb, cap)]))
            out.v.append(np.concatenate([_pad_capacity(va, cap), _pad_capacity(vb, cap)]))
        out.lengths = np.concatenate([self.lengths, other.lengths])
        return out

    def select_rows(self, rows: np.ndarray) -> KVCache:
        """A cache holding only `rows` (finished rows leaving a batch)."""
        out = KVCache.__new__(KVCache)
        out.k = [k[rows] for k in self.k]
        out.v = [v[rows] for v in self.v]
        out.lengths = self.lengths[rows]
        return out


def _pad_capacity(x: np.ndarray, cap: int) -> np.ndarray:
    """(B, Hkv, S, D) zero-padded along S to `cap` positions."""
    if x.shape[2] == cap:
        return x
    return np.pad(x, ((0, 0), (0, 0), (0, cap - x.shape[2]), (0, 0)))


class GPUKVCache:
    """The KV cache of plan v3-fused: the data lives in a GPU-server session; only lengths here."""

    def __init__(self, sid: int, batch: int):
        self.sid = sid
        self.lengths = np.zeros(batch, np.int64)

    def advance(self, n_new: np.ndarray) -> None:
        self.lengths = self.lengths + n_new


class TEELlamaModel:
    """The forward pass over a port (`tee.port.GPUPort`). The plan picks the pass's parts once,
    when it is set (`_choose_parts`): no plan flag is tested inside a forward pass."""

    def __init__(self, gpu: GPUPort, plan: Plan, init: InitResult | None = None):
        self.gpu = gpu
        # Config, RoPE parameters and norm weights come from the port: the GPU server's Init
        # (seed V3.0), checked against the runner's own checkpoint by a verified port.
        init = gpu.init() if init is None else init
        self.plan = plan
        self.config = c = init.config
        self.input_norms = init.norms[0:-1:2]  # (L, E)
        self.post_attention_norms = init.norms[1:-1:2]  # (L, E)
        self.final_norm = init.norms[-1]  # (E,)
        self.biases = init.biases  # merged plans add these after scaling: qkv, o, gate_up, down
        self.rope = RotaryEmbedding(c.head_dim, c.rope, c.max_position_embeddings)
        self.scale = np.float32(c.head_dim**-0.5)

    @property
    def plan(self) -> Plan:
        return self._plan

    @plan.setter
    def plan(self, plan: Plan) -> None:
        if plan.private and not getattr(self.gpu, "private", False):  # ids and activations in the clear
            raise ValueError(f"plan {plan.name} needs its masking port: tee.private.private_gpu(...)")
        self._plan = plan
        self._choose_parts(plan)

    def _choose_parts(self, plan: Plan) -> None:
        """The pass's parts for this plan: the layers (merged or not), attention, the MLP."""
        self._layers = self._forward_merged if plan.merged else self._forward_layers
        if plan.gpu_kv_cache:
            self.attention = self._attention_session  # K/V in a GPU session (v3-fused)
        elif plan.fused:
            self.attention = self._attention_fused  # grouped attention here (v2-fused, private)
        else:
            self.attention = self._attention_seed  # the seed's plans: repeat_kv, two matmuls
        self._products = self._products_gpu if plan.attention_on_gpu else self._products_local
        self._merged_attention = self._merged_session if plan.gpu_kv_cache else self._merged_local
        self.mlp = self._mlp_fused if plan.fused else self._mlp_seed

    def new_cache(self, batch: int = 1, max_tokens: int = 4096) -> KVCache | GPUKVCache:
        """A KV cache for `batch` sequences of up to `max_tokens` tokens each (prompt + generated)."""
        c = self.config
        if self.plan.gpu_kv_cache:  # the GPU grows it on demand: max_tokens is a cap, not an allocation
            return GPUKVCache(self.gpu.open_session(batch, max_tokens), batch)
        return KVCache(c.num_layers, batch, c.num_kv_heads, c.head_dim)

    def close_cache(self, cache: KVCache | GPUKVCache) -> None:
        if isinstance(cache, GPUKVCache):
            self.gpu.close_session(cache.sid)

    def forward(
        self,
        ids: np.ndarray,
        cache: KVCache | GPUKVCache,
        n_new: np.ndarray | None = None,
        all_logits: bool = False,
        top_k: int | None = None,
    ):
        """ids (B, T) -> logits (B, T, V) if all_logits, else (B, 1, V) at each row's last real
        token (row b has n_new[b] real tokens, default T). With top_k: (values, ids), (B, 1, k)."""
        B, T = ids.shape
        n_new = np.full(B, T, np.int64) if n_new is None else np.asarray(n_new, np.int64)
        pos = cache.lengths  # (B,) where each row's new tokens start
        positions = pos[:, None] + np.arange(T)  # (B, T)
        cos, sin = self.rope(positions)  # (B, T, D) each
        # Once per pass, in the (B, T, heads, D) layout the projections come back in: cos
        # (B, T, 1, D) and the signed sin (B, T, 1, 2, D/2) that rope_rotate takes.
        rope = cos[:, :, None], rope_signed_sin(sin[:, :, None])
        mask = self._mask(positions, int(pos.max()) + T)
        return self._layers(ids, cache, n_new, all_logits, top_k, pos, rope, mask)

    def _forward_layers(self, ids, cache, n_new, all_logits, top_k, pos, rope, mask):
        """The plans that cross at every Linear (or fused group of them): the seed's and fused."""
        B = ids.shape[0]
        x = self.gpu.embedding(ids)  # (B, T, E)
        for i in range(self.config.num_layers):
            h = rms_norm(x, self.input_norms[i], self.config.rms_norm_eps)
            x = x + self.attention(i, h, rope, mask, cache, pos)
            h = rms_norm(x, self.post_attention_norms[i], self.config.rms_norm_eps)
            x = x + self.mlp(i, h)
        cache.advance(n_new)
        if not all_logits:
            x = x[np.arange(B), np.maximum(n_new - 1, 0)][:, None]  # (B, 1, E); a finished row reads slot 0
        x = rms_norm(x, self.final_norm, self.config.rms_norm_eps)
        if top_k is not None:
            return self.gpu.lm_head_top_k(x, top_k)
        return self.gpu.lm_head(x)

    def _attention_session(self, i, x, rope, mask, cache, pos) -> np.ndarray:
        """v stays on the GPU, in the session's cache; QKᵀ there, PV fused with o_proj."""
        qk = self.gpu.qkv(i, x, cache.sid, pos)  # (B, T, (H + Hkv) D)
        q, k = self._rotate_qk(qk, rope)
        scores = self.gpu.attn_scores(cache.sid, i, q, k, pos)  # (B, H, T, S)
        p = self._probs(scores, mask)
        return self.gpu.attn_out(cache.sid, i, p)  # o_proj(P V): (B, T, E)

    def _attention_fused(self, i, x, rope, mask, cache, pos) -> np.ndarray:
        """q|k|v in one call, grouped attention here (no repeat_kv copies), then o_proj."""
        c = self.config
        B, T, _ = x.shape
        qkv = self.gpu.qkv(i, x)  # (B, T, (H + 2 Hkv) D)
        q, k = self._rotate_qk(qkv[..., : c.q_dim + c.kv_dim], rope)
        v = qkv[..., c.q_dim + c.kv_dim :].reshape(B, T, c.num_kv_heads, c.head_dim).transpose(0, 2, 1, 3)
        return self.gpu.linear(i, "o_proj", self._local_attention(i, q, k, v, mask, cache, pos))

    def _attention_seed(self, i, x, rope, mask, cache, pos) -> np.ndarray:
        """The seed's plans: q, k, v apart, repeat_kv, then both matmuls on the GPU (v3) or here (v2)."""
        c = self.config
        B, T, _ = x.shape
        H, Hkv, D = c.num_heads, c.num_kv_heads, c.head_dim
        q = self.gpu.linear(i, "q_proj", x)
        k = self.gpu.linear(i, "k_proj", x)
        v = self.gpu.linear(i, "v_proj", x)
        q = rope_rotate(q.reshape(B, T, H, D), *rope).transpose(0, 2, 1, 3)  # (B, H, T, D)
        k = rope_rotate(k.reshape(B, T, Hkv, D), *rope).transpose(0, 2, 1, 3)  # (B, Hkv, T, D)
        v = v.reshape(B, T, Hkv, D).transpose(0, 2, 1, 3)  # (B, Hkv, T, D)
        k, v = cache.update_and_fetch(i, k, v, pos)  # (B, Hkv, S, D)
        k, v = repeat_kv(k, H // Hkv), repeat_kv(v, H // Hkv)  # (B, H, S, D)
        kt = k.transpose(0, 1, 3, 2)  # (B, H, D, S)
        out = self._products(i, q, kt, v, mask)  # (B, H, T, D)
        out = out.transpose(0, 2, 1, 3).reshape(B, T, c.q_dim)  # (B, T, H*D)
        return self.gpu.linear(i, "o_proj", out)

    def _products_gpu(self, i, q, kt, v, mask) -> np.ndarray:
        """v3: softmax(q Kᵀ) V with both products on the GPU (the seed's Matmul)."""
        scores = self.gpu.matmul(q, kt, layer=i, what="QKᵀ")
        return self.gpu.matmul(self._probs(scores, mask), v, layer=i, what="PV")

    def _products_local(self, i, q, kt, v, mask) -> np.ndarray:
        """v2: softmax(q Kᵀ) V here."""
        return self._probs(q @ kt, mask) @ v

    def _rotate_qk(self, qk: np.ndarray, rope: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, ...]:
        """q|k (B, T, (H + Hkv) D) -> RoPE-rotated q (B, H, T, D) and k (B, Hkv, T, D): all heads
        in one pass (the same element-wise operations as rotating q and k apart)."""
        c = self.config
        B, T, _ = qk.shape
        y = rope_rotate(qk.reshape(B, T, c.num_heads + c.num_kv_heads, c.head_dim), *rope)
        return y[:, :, : c.num_heads].transpose(0, 2, 1, 3), y[:, :, c.num_heads :].transpose(0, 2, 1, 3)

    def _forward_merged(self, ids, cache, n_new, all_logits, top_k, pos, rope, mask):
        """The merged plans: each call returns a Linear's output and the next Linear's unscaled
        product z = W (w ⊙ residual); the trusted side applies the row scale r and the bias."""
        c, eps = self.config, self.config.rms_norm_eps
        B = ids.shape[0]
        F = c.intermediate_size
        sid = getattr(cache, "sid", None)  # a GPU session's, in v3 placement
        x, z = self.gpu.embed_qkv(ids, sid, pos)  # (B, T, E), (B, T, (H + Hkv [+ Hkv]) D)
        for i in range(c.num_layers):
            r = rms_scale(x, eps)  # (B, T, 1)
            qkv = r * z + self._bias("qkv", i, z.shape[-1])
            o, z = self._merged_attention(i, qkv, r, x, rope, mask, cache, pos)
            x = x + o
            gate_up = rms_scale(x, eps) * z + self._bias("gate_up", i, 2 * F)
            m = silu_mul(gate_up[..., :F], gate_up[..., F:])  # (B, T, F)
            if i < c.num_layers - 1:
                y, z = self.gpu.down_qkv(i, m, x, sid, pos)
                x = x + y
        rows = None if all_logits else np.maximum(n_new - 1, 0)  # a finished row (n_new 0) reads slot 0
        out = self.gpu.down_lm_head(m, x, rows, top_k)
        cache.advance(n_new)
        x = (x if rows is None else x[np.arange(B), rows][:, None]) + out[0]  # (B, R, E)
        r = rms_scale(x, eps)
        if top_k is None:
            return r * out[1]
        return r * out[1], out[2]  # r > 0 keeps the top-k order

    def _merged_session(self, i, qkv, r, x, rope, mask, cache, pos):
        """v3 placement: QKᵀ against the session (r turns the pending v into V), then PV with
        o_proj and the next gate|up. Returns o and the unscaled gate|up."""
        c = self.config
        q, k = self._rotate_qk(qkv[..., : c.q_dim + c.kv_dim], rope)  # (B, H, T, D), (B, Hkv, T, D)
        scores = self.gpu.attn_scores(cache.sid, i, q, k, pos, r)
        return self.gpu.attn_out_gate_up(cache.sid, i, self._probs(scores, mask), x)

    def _merged_local(self, i, qkv, r, x, rope, mask, cache, pos):
        """v2 placement: attention here, then o_proj with the next gate|up."""
        c = self.config
        B, T, _ = qkv.shape
        q, k = self._rotate_qk(qkv[..., : c.q_dim + c.kv_dim], rope)  # (B, H, T, D), (B, Hkv, T, D)
        v = qkv[..., c.q_dim + c.kv_dim :].reshape(B, T, c.num_kv_heads, c.head_dim).transpose(0, 2, 1, 3)
        return self.gpu.o_gate_up(i, self._local_attention(i, q, k, v, mask, cache, pos), x)

    def _bias(self, name: str, i: int, width: int) -> np.ndarray | float:
        b = self.biases.get(name)
        return 0.0 if b is None else b[i, :width]

    def _local_attention(self, i, q, k, v, mask, cache, pos) -> np.ndarray:
        """Grouped attention in the trusted side over its KV cache: (B, T, H*D)."""
        c = self.config
        B, H, T, D = q.shape
        k, v = cache.update_and_fetch(i, k, v, pos)  # (B, Hkv, S, D)
        S, G = k.shape[2], H // c.num_kv_heads
        scores = (q.reshape(B, c.num_kv_heads, G * T, D) @ k.transpose(0, 1, 3, 2)).reshape(B, H, T, S)
        p = self._probs(scores, mask)
        out = (p.reshape(B, c.num_kv_heads, G * T, S) @ v).reshape(B, H, T, D)
        return out.transpose(0, 2, 1, 3).reshape(B, T, c.q_dim)

    def _mlp_fused(self, i: int, x: np.ndarray) -> np.ndarray:
        F = self.config.intermediate_size
        gate_up = self.gpu.gate_up(i, x)  # (B, T, 2F)
        return self.gpu.linear(i, "down_proj", silu_mul(gate_up[..., :F], gate_up[..., F:]))  # (B, T, E)

    def _mlp_seed(self, i: int, x: np.ndarray) -> np.ndarray:
        gate = self.gpu.linear(i, "gate_proj", x)  # (B, T, F)
        up = self.gpu.linear(i, "up_proj", x)  # (B, T, F)
        return self.gpu.linear(i, "down_proj", silu_mul(gate, up))  # (B, T, E)

    def _probs(self, scores: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        return scaled_softmax(scores, self.scale, mask)  # softmax(scores * scale + mask)

    def _mask(self, positions: np.ndarray, S: int) -> np.ndarray | None:
        """Additive (B, 1, T, S) mask: key s is visible to the query at position p when s <= p
        (and p - s < window for Mistral's sliding window). None when nothing is hidden."""
        window = self.config.sliding_window
        k_pos = np.arange(S)
        hidden = k_pos[None, None, :] > positions[:, :, None]  # (B, T, S)
        if window is not None:
            hidden |= positions[:, :, None] - k_pos[None, None, :] >= window
        if not hidden.any():
            return None
        return np.where(hidden, np.float32(-np.inf), np.float32(0.0))[:, None]
