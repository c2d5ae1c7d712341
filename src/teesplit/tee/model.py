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

import contextlib
from collections.abc import Generator
from typing import Any

import numpy as np

from teesplit.tee import kernels
from teesplit.tee.ops import (
    QueryBlock,
    RotaryEmbedding,
    attention_layout,
    grouped_attention,
    masked_scaled_softmax,
    repeat_kv,
    rms_norm,
    rms_scale,
    rope_qkv,
    rope_rotate,
    rope_signed_sin,
    scaled_silu_mul,
    silu_mul,
)
from teesplit.tee.plans import Plan, prefill_chunk
from teesplit.tee.port import GPUPort, InitResult


def run_steps(steps: Generator[None, None, Any]) -> Any:
    """Run a generator of steps (prefill_steps) to its end: its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


class KVCache:
    """Trusted-side rotated keys and values per layer, preallocated and grown on demand.

    Growth doubles the capacity, but never past `max_tokens` (the generation's own need, when
    the caller knows it): an 8k-token prompt must not leave a 16k-token cache behind."""

    def __init__(
        self,
        num_layers: int,
        batch: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int = 256,
        max_tokens: int | None = None,
        plan: Plan | None = None,
    ):
        self.plan = plan  # the plan whose forward passes run on this cache
        if max_tokens is not None:
            capacity = min(capacity, max_tokens)
        shape = (batch, num_kv_heads, capacity, head_dim)  # (B, Hkv, S_max, D)
        self.k = [np.zeros(shape, np.float32) for _ in range(num_layers)]
        self.v = [np.zeros(shape, np.float32) for _ in range(num_layers)]
        self.lengths = np.zeros(batch, np.int64)  # cached tokens per row, between forward passes
        self.max_tokens = max_tokens

    def update_and_fetch(
        self, layer: int, k: np.ndarray, v: np.ndarray, pos: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        T = k.shape[2]
        end = int(pos.max()) + T
        if end > self.k[layer].shape[2]:
            self._grow(layer, end, int(self.lengths.max()))
        if (pos == pos[0]).all():
            self.k[layer][:, :, pos[0] : pos[0] + T] = k
            self.v[layer][:, :, pos[0] : pos[0] + T] = v
        else:
            for b, p in enumerate(pos):  # ragged batch: one slice per row
                self.k[layer][b, :, p : p + T] = k[b]
                self.v[layer][b, :, p : p + T] = v[b]
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def _grow(self, layer: int, end: int, used: int) -> None:
        """Room for `end` positions in `layer`; only the `used` ones are copied. Zeros beyond: a
        slot no query may see still meets a probability of 0, and 0 * NaN would poison it."""
        old = self.k[layer].shape[2]
        cap = max(end, 2 * old)
        if self.max_tokens is not None:
            cap = max(min(cap, self.max_tokens), end)
        for store in (self.k, self.v):
            grown = np.zeros((*store[layer].shape[:2], cap, store[layer].shape[3]), np.float32)
            grown[:, :, :used] = store[layer][:, :, :used]
            store[layer] = grown

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
        out.plan = self.plan
        out.max_tokens = (
            None if None in (self.max_tokens, other.max_tokens) else max(self.max_tokens, other.max_tokens)
        )
        return out

    def select_rows(self, rows: np.ndarray) -> KVCache:
        """A cache holding only `rows` (finished rows leaving a batch)."""
        out = KVCache.__new__(KVCache)
        out.k = [k[rows] for k in self.k]
        out.v = [v[rows] for v in self.v]
        out.lengths = self.lengths[rows]
        out.max_tokens = self.max_tokens
        out.plan = self.plan
        return out


def _pad_capacity(x: np.ndarray, cap: int) -> np.ndarray:
    """(B, Hkv, S, D) zero-padded along S to `cap` positions."""
    if x.shape[2] == cap:
        return x
    return np.pad(x, ((0, 0), (0, 0), (0, cap - x.shape[2]), (0, 0)))


class GPUKVCache:
    """The KV cache of plan v3-fused: the data lives in a GPU-server session; only lengths here."""

    def __init__(self, sid: int, batch: int, plan: Plan | None = None):
        self.sid = sid
        self.lengths = np.zeros(batch, np.int64)
        self.plan = plan  # the plan whose forward passes run on this cache

    def advance(self, n_new: np.ndarray) -> None:
        self.lengths = self.lengths + n_new


# Bytes of keys (and as many of values) per WriteKV message when a prefill's cache moves to a
# GPU session: an 8k-token SmolLM2 layer (6.3 MB) goes in one, well under the server's frame cap.
UPLOAD_BYTES = 16 << 20


class TEELlamaModel:
    """The forward pass over a port (`tee.port.GPUPort`), run by the plan its cache carries."""

    def __init__(
        self, gpu: GPUPort, plan: Plan, decode_plan: Plan | None = None, init: InitResult | None = None
    ):
        """`plan` runs the prefill (and decode, unless `decode_plan` names another plan for it:
        see for_decode). Each cache remembers the plan its forward passes run."""
        self.gpu = gpu
        self.plan = plan
        self.decode_plan = decode_plan  # None: the same as plan, whatever plan becomes
        # Config, RoPE parameters and norm weights come from the port: the GPU server's Init
        # (seed V3.0), checked against the runner's own checkpoint by a verified port.
        init = gpu.init() if init is None else init
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

    def new_cache(self, batch: int = 1, max_tokens: int = 4096) -> KVCache | GPUKVCache:
        """A KV cache for `batch` sequences of up to `max_tokens` tokens each (prompt + generated)."""
        c = self.config
        if self.plan.gpu_kv_cache:  # the GPU grows it on demand: max_tokens is a cap, not an allocation
            return GPUKVCache(self.gpu.open_session(batch, max_tokens), batch, self.plan)
        return KVCache(c.num_layers, batch, c.num_kv_heads, c.head_dim, max_tokens=max_tokens, plan=self.plan)

    @property
    def decode_plan(self) -> Plan:
        return self._decode_plan or self.plan

    @decode_plan.setter
    def decode_plan(self, plan: Plan | None) -> None:
        if plan is not None and (plan.private or self.plan.private) and plan is not self.plan:
            raise ValueError("a private plan cannot hand its prefill to another plan, nor take one")
        self._decode_plan = plan

    def for_decode(self, cache: KVCache | GPUKVCache) -> KVCache | GPUKVCache:
        """The cache decode runs on after a prefill into `cache`: the same one, now run by the
        decode plan, or, when the decode plan keeps K/V in a GPU session and the prefill kept
        them here (v2 placement: nothing quadratic crossed the link), a new session holding
        the rotated K and V, uploaded once (WriteKV, one round trip per layer and block of
        tokens). The trusted cache is then the caller's to drop. A prefill in a GPU session
        does not come back to the trusted side: decode stays in a session plan."""
        plan = self.decode_plan
        if cache.plan is plan or cache.plan.gpu_kv_cache == plan.gpu_kv_cache:
            cache.plan = plan
            return cache
        if not plan.gpu_kv_cache:
            raise ValueError(
                f"plan {cache.plan.name}'s K/V live on the GPU; {plan.name} cannot decode from them"
            )
        B = len(cache.lengths)
        S = int(cache.lengths.max())
        max_tokens = cache.max_tokens or self.config.max_position_embeddings
        out = GPUKVCache(self.gpu.open_session(B, max(max_tokens, S)), B, plan)
        c = self.config
        cap = getattr(self.gpu, "max_message_bytes", None)  # the server's, per frame
        budget = UPLOAD_BYTES if cap is None else min(UPLOAD_BYTES, cap // 2)
        step = max(budget // (B * c.num_kv_heads * c.head_dim * 4), 1)  # tokens per message
        try:
            for i in range(c.num_layers):
                for s0 in range(0, S, step):
                    s1 = min(s0 + step, S)
                    start = np.full(B, s0, np.int64)  # every row from 0: padding past a row's length
                    self.gpu.write_kv(out.sid, i, cache.k[i][:, :, s0:s1], cache.v[i][:, :, s0:s1], start)
        except BaseException:
            with contextlib.suppress(Exception):  # the upload's own error is the one to report
                self.close_cache(out)
            raise
        out.lengths = cache.lengths.copy()
        return out

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
        layout = self._layout(pos, T, cache.plan)
        if cache.plan.merged:
            return self._forward_merged(ids, cache, n_new, all_logits, top_k, pos, rope, layout)
        x = self.gpu.embedding(ids)  # (B, T, E)
        for i in range(self.config.num_layers):
            h = rms_norm(x, self.input_norms[i], self.config.rms_norm_eps)
            x = x + self.attention(i, h, rope, layout, cache, pos)
            h = rms_norm(x, self.post_attention_norms[i], self.config.rms_norm_eps)
            x = x + self.mlp(i, h, cache.plan)
        cache.advance(n_new)
        if not all_logits:
            x = x[np.arange(B), np.maximum(n_new - 1, 0)][:, None]  # (B, 1, E); a finished row reads slot 0
        x = rms_norm(x, self.final_norm, self.config.rms_norm_eps)
        if top_k is not None:
            return self.gpu.lm_head_top_k(x, top_k)
        return self.gpu.lm_head(x)

    def prefill(
        self,
        ids: np.ndarray,
        cache: KVCache | GPUKVCache,
        n_new: np.ndarray | None = None,
        chunk: int | str | None = None,
        top_k: int | None = None,
    ):
        """forward over a prompt in chunks of `chunk` tokens (see prefill_steps)."""
        return run_steps(self.prefill_steps(ids, cache, n_new, chunk, top_k))

    def prefill_steps(
        self,
        ids: np.ndarray,
        cache: KVCache | GPUKVCache,
        n_new: np.ndarray | None = None,
        chunk: int | str | None = None,
        top_k: int | None = None,
    ) -> Generator[None, None, Any]:
        """forward over a prompt in chunks of `chunk` tokens, as a generator that yields after
        every chunk but the last (the API's scheduler runs other rows' decode steps there) and
        returns what forward(ids, cache, n_new, top_k=top_k) returns, (B, 1, V) or (values, ids)
        at each row's last real token. Both sides hold at most `chunk` new tokens' activations
        and scores (chunk x S) at once. `chunk` "auto": by the plan's attention placement
        (plans.prefill_chunk); None or 0: one pass.

        Rows are right-padded (row b has n_new[b] real tokens). A row whose prompt ends before
        a chunk starts rides along with n_new 0, as finished rows do in decode: its cache does
        not advance and the chunk's padding lands where its next token will overwrite it.
        Chunks are as exact as one pass (the keys a query sees and the products are the same;
        blocks of the softmax add up in another order), except for "dynamic" RoPE over a
        prompt past max_position_embeddings: transformers rescales a prefill's frequencies
        from its longest position, so such a prompt is prefilled in one pass."""
        B, T = ids.shape
        n_new = np.full(B, T, np.int64) if n_new is None else np.asarray(n_new, np.int64)
        chunk = prefill_chunk(cache.plan, chunk)
        rope_grows = (
            self.rope.rope_type == "dynamic" and int(cache.lengths.max()) + T > self.rope.max_seq_len_cached
        )
        if chunk is None or T <= chunk or rope_grows:
            return self.forward(ids, cache, n_new, top_k=top_k)
        if chunk < 1:
            raise ValueError(f"prefill chunk must be >= 1 token, got {chunk}")
        out = None
        last = n_new - 1  # (B,) the column of each row's last real token (-1: none)
        for c0 in range(0, T, chunk):
            if out is not None and not (n_new > c0).any():
                break  # padding columns only
            if out is not None:
                yield  # a chunk is done, and another follows
            c1 = min(c0 + chunk, T)
            part = self.forward(ids[:, c0:c1], cache, np.clip(n_new - c0, 0, c1 - c0), top_k=top_k)
            rows = (c0 <= last) & (last < c1)  # rows whose last real token is in this chunk
            if out is None:  # the first chunk's slot 0 stands for rows without a real token
                out = [np.array(a) for a in (part if isinstance(part, tuple) else (part,))]
            else:
                for o, a in zip(out, part if isinstance(part, tuple) else (part,), strict=True):
                    o[rows] = a[rows]
        return tuple(out) if isinstance(part, tuple) else out[0]

    def attention(
        self,
        i: int,
        x: np.ndarray,
        rope: tuple[np.ndarray, np.ndarray],
        layout: tuple[QueryBlock, ...],
        cache: KVCache | GPUKVCache,
        pos: np.ndarray,
    ) -> np.ndarray:
        c, plan = self.config, cache.plan
        B, T, _ = x.shape
        H, Hkv, D = c.num_heads, c.num_kv_heads, c.head_dim
        if plan.gpu_kv_cache:  # v stays on the GPU, in the session's cache
            qk = self.gpu.qkv(i, x, cache.sid, pos)  # (B, T, (H + Hkv) D)
            q, k, _ = self._rotate_qk(qk, rope)
            scores = self.gpu.attn_scores(cache.sid, i, q, k, pos)  # (B, H, T, S)
            p = self._probs(scores, layout)
            return self.gpu.attn_out(cache.sid, i, p)  # o_proj(P V): (B, T, E)
        if plan.fused:
            q, k, v = self._rotate_qk(self.gpu.qkv(i, x), rope)  # from (B, T, (H + 2 Hkv) D)
        else:
            q = self.gpu.linear(i, "q_proj", x)
            k = self.gpu.linear(i, "k_proj", x)
            v = self.gpu.linear(i, "v_proj", x)
            q = rope_rotate(q.reshape(B, T, H, D), *rope).transpose(0, 2, 1, 3)  # (B, H, T, D)
            k = rope_rotate(k.reshape(B, T, Hkv, D), *rope).transpose(0, 2, 1, 3)  # (B, Hkv, T, D)

        v = v.reshape(B, T, Hkv, D).transpose(0, 2, 1, 3)  # (B, Hkv, T, D)
        if not plan.attention_on_gpu:  # grouped attention here: no repeat_kv copies
            return self.gpu.linear(i, "o_proj", self._local_attention(i, q, k, v, layout, cache, pos))
        # The seed's V3.0: repeat_kv, then both matmuls on the GPU, operands sent each call.
        k, v = cache.update_and_fetch(i, k, v, pos)  # (B, Hkv, S, D)
        k, v = repeat_kv(k, H // Hkv), repeat_kv(v, H // Hkv)  # (B, H, S, D)
        scores = self.gpu.matmul(q, k.transpose(0, 1, 3, 2), layer=i, what="QKᵀ")  # (B, H, T, S)
        out = self.gpu.matmul(self._probs(scores, layout), v, layer=i, what="PV")  # (B, H, T, D)
        out = out.transpose(0, 2, 1, 3).reshape(B, T, c.q_dim)  # (B, T, H*D)
        return self.gpu.linear(i, "o_proj", out)

    def _rotate_qk(
        self, z: np.ndarray, rope: tuple[np.ndarray, np.ndarray], r: np.ndarray | None = None, bias=None
    ) -> tuple[np.ndarray, ...]:
        """q|k|v = r z + bias (B, T, (H + Hkv [+ Hkv]) D), or z itself without r and bias ->
        RoPE-rotated q (B, H, T, D), k (B, Hkv, T, D) and the v columns (B, T, Hkv D or 0): all
        heads in one pass (the same element-wise operations as rotating q and k apart)."""
        c = self.config
        y, v = rope_qkv(z, rope, c.num_heads + c.num_kv_heads, r, bias)
        return y[:, :, : c.num_heads].transpose(0, 2, 1, 3), y[:, :, c.num_heads :].transpose(0, 2, 1, 3), v

    def _forward_merged(self, ids, cache, n_new, all_logits, top_k, pos, rope, layout):
        """The merged plans: each call returns a Linear's output and the next Linear's unscaled
        product z = W (w ⊙ residual); the trusted side applies the row scale r and the bias."""
        c, eps = self.config, self.config.rms_norm_eps
        B, T = ids.shape
        Hkv, D = c.num_kv_heads, c.head_dim
        sid = cache.sid if cache.plan.gpu_kv_cache else None
        x, z = self.gpu.embed_qkv(ids, sid, pos)  # (B, T, E), (B, T, (H + Hkv [+ Hkv]) D)
        for i in range(c.num_layers):
            r = rms_scale(x, eps)  # (B, T, 1)
            q, k, v = self._rotate_qk(z, rope, r, self._bias("qkv", i))  # (B, H, T, D), (B, Hkv, T, D)
            if sid is not None:
                scores = self.gpu.attn_scores(sid, i, q, k, pos, r)  # r turns the pending v into V
                o, z = self.gpu.attn_out_gate_up(sid, i, self._probs(scores, layout), x)
            else:
                v = v.reshape(B, T, Hkv, D).transpose(0, 2, 1, 3)
                o, z = self.gpu.o_gate_up(i, self._local_attention(i, q, k, v, layout, cache, pos), x)
            x = x + o
            m = scaled_silu_mul(rms_scale(x, eps), z, self._bias("gate_up", i))  # (B, T, F)
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

    def _bias(self, name: str, i: int) -> np.ndarray | None:
        b = self.biases.get(name)
        return None if b is None else b[i]

    def _local_attention(self, i, q, k, v, layout, cache, pos) -> np.ndarray:
        """Grouped attention in the trusted side over its KV cache: (B, T, H*D)."""
        k, v = cache.update_and_fetch(i, k, v, pos)  # (B, Hkv, S, D)
        return grouped_attention(q, k, v, layout, self.scale)

    def mlp(self, i: int, x: np.ndarray, plan: Plan) -> np.ndarray:
        if plan.fused:
            m = scaled_silu_mul(None, self.gpu.gate_up(i, x))  # gate|up (B, T, 2F) -> (B, T, F)
        else:
            gate = self.gpu.linear(i, "gate_proj", x)  # (B, T, F)
            up = self.gpu.linear(i, "up_proj", x)  # (B, T, F)
            m = silu_mul(gate, up)
        return self.gpu.linear(i, "down_proj", m)  # (B, T, E)

    def _probs(self, scores: np.ndarray, layout: tuple[QueryBlock, ...]) -> np.ndarray:
        return masked_scaled_softmax(scores, self.scale, layout)  # softmax(scores * scale), masked

    def _layout(self, pos: np.ndarray, T: int, plan: Plan) -> tuple[QueryBlock, ...]:
        """The pass's causal structure, per block: row b's T new tokens start at pos[b]; key s is
        visible to the query at position p when s <= p (and p - s < window for Mistral's sliding
        window). Made once per forward pass, read by every layer. Where the compiled loop runs
        attention here, a block may cross the diagonal (it masks as it goes: one product, not
        two); numpy's passes and v3 placement's full scores mask cheaper in blocks cut there."""
        c = self.config
        cut = plan.attention_on_gpu or kernels.active() is None
        return attention_layout(pos, T, c.sliding_window, c.num_heads // c.num_kv_heads, cut=cut)
