"""TEELlamaModel: the Llama/Mistral/Qwen2 forward pass as the trusted side runs it (TRUSTED side).

Every line that crosses the trust boundary is a `self.gpu.` call; everything else here is
numpy in float32 (numerics live in tee/ops.py). Shape letters: B batch, T new tokens,
S cached + new tokens, H query heads, Hkv KV heads, D head dim, E hidden, F MLP width,
V vocabulary.
"""

from __future__ import annotations

import numpy as np

from teesplit.tee.client import GPUClient
from teesplit.tee.ops import RotaryEmbedding, apply_rope, repeat_kv, rms_norm, silu, softmax
from teesplit.tee.plans import Plan


class KVCache:
    """Per-layer rotated keys and values, preallocated and grown by doubling."""

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int, capacity: int = 256):
        shape = (batch, num_kv_heads, capacity, head_dim)  # (B, Hkv, S_max, D)
        self.k = [np.zeros(shape, np.float32) for _ in range(num_layers)]
        self.v = [np.zeros(shape, np.float32) for _ in range(num_layers)]
        self.offset = 0  # tokens already cached (same for every layer between forward passes)

    def update_and_fetch(self, layer: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        T = k.shape[2]
        end = self.offset + T
        if end > self.k[layer].shape[2]:
            grow = max(end, 2 * self.k[layer].shape[2])
            pad = ((0, 0), (0, 0), (0, grow - self.k[layer].shape[2]), (0, 0))
            self.k[layer] = np.pad(self.k[layer], pad)
            self.v[layer] = np.pad(self.v[layer], pad)
        self.k[layer][:, :, self.offset : end] = k
        self.v[layer][:, :, self.offset : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, T: int) -> None:
        self.offset += T


class TEELlamaModel:
    def __init__(self, gpu: GPUClient, plan: Plan):
        self.gpu = gpu
        self.plan = plan
        init = gpu.init()  # config, RoPE parameters and norm weights come from the GPU server (seed V3.0)
        self.config = c = init.config
        self.input_norms = init.norms[0:-1:2]  # (L, E)
        self.post_attention_norms = init.norms[1:-1:2]  # (L, E)
        self.final_norm = init.norms[-1]  # (E,)
        self.rope = RotaryEmbedding(c.head_dim, c.rope, c.max_position_embeddings)
        self.scale = c.head_dim**-0.5

    def new_cache(self, batch: int = 1) -> KVCache:
        c = self.config
        return KVCache(c.num_layers, batch, c.num_kv_heads, c.head_dim)

    def forward(self, ids: np.ndarray, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """ids (B, T) -> logits (B, T, V), or (B, 1, V) for the last position only."""
        B, T = ids.shape
        positions = np.broadcast_to(np.arange(cache.offset, cache.offset + T), (B, T))
        cos, sin = self.rope(positions)  # (B, T, D) each
        mask = self._mask(cache.offset, T)
        x = self.gpu.embedding(ids)  # (B, T, E)
        for i in range(self.config.num_layers):
            x = x + self.attention(
                i, rms_norm(x, self.input_norms[i], self.config.rms_norm_eps), cos, sin, mask, cache
            )
            x = x + self.mlp(i, rms_norm(x, self.post_attention_norms[i], self.config.rms_norm_eps))
        cache.advance(T)
        x = rms_norm(x, self.final_norm, self.config.rms_norm_eps)
        return self.gpu.lm_head(x if all_logits else x[:, -1:])

    def attention(
        self, i: int, x: np.ndarray, cos: np.ndarray, sin: np.ndarray, mask: np.ndarray | None, cache: KVCache
    ) -> np.ndarray:
        c = self.config
        B, T, _ = x.shape
        q = self.gpu.linear(i, "q_proj", x).reshape(B, T, c.num_heads, c.head_dim)
        k = self.gpu.linear(i, "k_proj", x).reshape(B, T, c.num_kv_heads, c.head_dim)
        v = self.gpu.linear(i, "v_proj", x).reshape(B, T, c.num_kv_heads, c.head_dim)
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))  # (B, H|Hkv, T, D)
        q, k = apply_rope(q, k, cos, sin)
        k, v = cache.update_and_fetch(i, k, v)  # (B, Hkv, S, D)
        n_rep = c.num_heads // c.num_kv_heads
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)  # (B, H, S, D)
        kt = k.transpose(0, 1, 3, 2)  # (B, H, D, S)
        if self.plan.attention_on_gpu:
            scores = self.gpu.matmul(q, kt)  # (B, H, T, S)
        else:
            scores = q @ kt
        scores = scores * np.float32(self.scale)
        if mask is not None:
            scores = scores + mask
        p = softmax(scores)
        if self.plan.attention_on_gpu:
            out = self.gpu.matmul(p, v)  # (B, H, T, D)
        else:
            out = p @ v
        out = out.transpose(0, 2, 1, 3).reshape(B, T, c.q_dim)  # (B, T, H*D)
        return self.gpu.linear(i, "o_proj", out)

    def mlp(self, i: int, x: np.ndarray) -> np.ndarray:
        gate = self.gpu.linear(i, "gate_proj", x)  # (B, T, F)
        up = self.gpu.linear(i, "up_proj", x)  # (B, T, F)
        return self.gpu.linear(i, "down_proj", silu(gate) * up)  # (B, T, E)

    def _mask(self, offset: int, T: int) -> np.ndarray | None:
        """Additive (T, S) mask: causal, and Mistral's sliding window when the config has one."""
        S = offset + T
        window = self.config.sliding_window
        if T == 1 and (window is None or S <= window):
            return None  # one new token may see every cached position
        q_pos = np.arange(offset, S)[:, None]
        k_pos = np.arange(S)[None, :]
        hidden = k_pos > q_pos
        if window is not None:
            hidden |= q_pos - k_pos >= window
        return np.where(hidden, np.float32(-np.inf), np.float32(0.0))
