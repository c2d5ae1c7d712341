"""Non-linear operations of Llama / Mistral / Qwen2, as Hugging Face transformers 5.24 computes them.

This module is on the TRUSTED side of the split: it must import only numpy and the standard library
(never torch, transformers or ``teesplit.gpu``). Everything is float32, and the RoPE tables follow
transformers' float32 operation order step by step so the two agree to rounding.

Shapes: B batch, T tokens, S keys, H query heads, Hkv key/value heads, D head_dim, E hidden size.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from teesplit.tee import kernels

F32 = np.float32


# The ops below run for every layer of every token on arrays of a few hundred floats, where
# numpy's per-call overhead, not the arithmetic, is the cost: they call ufuncs directly (not
# the np.mean / np.sum / np.max wrappers) and work in place in the temporaries they allocate
# (except on per-row values, where out= costs more than a new array).
# Each does the same float32 operations in the same order as the plain expression it replaces
# in its comments, so the results are bit for bit the same. They never write into their inputs:
# a verifying client keeps references to arrays sent and received until it checks them.
_LOWEST = np.finfo(F32).min
_NEG_INF = F32(-np.inf)
_ONE = F32(1)  # making a float32 scalar costs about as much as a small ufunc call


@functools.lru_cache(maxsize=64)
def _width_and_eps(width: int, eps: float) -> tuple[np.float32, np.float32]:
    """RMSNorm's count and epsilon as float32 scalars, made once per model."""
    return F32(width), F32(eps)


def rms_scale(x: np.ndarray, eps: float) -> np.ndarray:
    """The non-linear half of RMSNorm: 1 / sqrt(mean(x^2) + eps) per row, (..., 1) float32."""
    x = np.asarray(x, dtype=F32)
    # np.mean(np.square(x), axis=-1, keepdims=True) is this pairwise sum divided by the count as
    # an intp, which numpy does in float64 and rounds to float32. Dividing in float32 gives the
    # same bits: float64 has more than 2 * 24 + 2 bits, so rounding twice is innocuous for a
    # quotient (Figueroa 1995); checked exhaustively over a binade for common widths.
    ss = np.add.reduce(np.square(x), axis=-1, keepdims=True)
    try:
        n, eps = _width_and_eps(x.shape[-1], eps)
    except TypeError:  # an unhashable eps (a 0-d array): converted here
        n, eps = F32(x.shape[-1]), F32(eps)
    if ss.size == 1:
        # One row (a decode step at batch 1): the same float32 steps on a scalar cost less than
        # numpy calls on a one-element array. The square root in float64 rounded to float32 is
        # the float32 square root, by the same argument (checked exhaustively over [1, 4)).
        ss.fill(_ONE / F32(math.sqrt(F32(ss.item()) / n + eps)))
        return ss
    return _ONE / np.sqrt(ss / n + eps)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """LlamaRMSNorm over the last axis: x (..., E), weight (E,) -> float32 (..., E)."""
    x = np.asarray(x, dtype=F32)
    # transformers rounds the normalized value back to the input dtype before scaling; inputs here are
    # float32, so that rounding is a no-op. weight * (x * r), in place in the product.
    y = np.multiply(x, rms_scale(x, eps))
    return np.multiply(np.asarray(weight, dtype=F32), y, out=y)


def silu(x: np.ndarray) -> np.ndarray:
    """x * sigmoid(x) in float32, without overflow for any finite input."""
    x = np.asarray(x, dtype=F32)
    # exp(-|x|) never overflows, and its underflow to 0 is the right limit; for x >= 0 this is
    # exactly torch's x / (1 + exp(-x)).
    e = np.abs(x)
    np.negative(e, out=e)
    with np.errstate(under="ignore"):
        np.exp(e, out=e)
    # The numerator where(x >= 0, x, x * e) as x * f with f = 1 where x >= 0 and e elsewhere
    # (x * 1 is x exactly): f = max(e, x >= 0), as e <= 1, and a NaN e (x NaN) stays NaN. One
    # pass cheaper than np.where; bit for bit the same, infinities and -0.0 included.
    f = np.maximum(e, x >= 0, dtype=F32)
    np.multiply(x, f, out=f)
    np.add(e, _ONE, out=e)
    return np.divide(f, e, out=f)


# Elements per block of the SwiGLU product: silu's seven passes then run over temporaries that
# stay in L2 instead of streaming a prefill's (T, F) arrays through memory seven times (SmolLM2,
# 2,048 tokens: 12.4 -> 9.6 ms a layer). Element-wise, so the bits do not change.
_SILU_BLOCK = 1 << 16


def silu_mul(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """silu(gate) * up, the SwiGLU product, in one float32 temporary (per block of rows)."""
    gate, up = np.asarray(gate, dtype=F32), np.asarray(up, dtype=F32)
    if (
        kernels.active()
        and gate.shape == up.shape
        and gate.ndim
        and gate.flags.c_contiguous
        and up.flags.c_contiguous
    ):
        return kernels.swiglu(gate, up)
    if gate.size <= _SILU_BLOCK or gate.ndim < 2:
        y = silu(gate)
        return np.multiply(y, up, out=y)
    return _by_row_blocks(lambda g, u: np.multiply(silu(g), u), gate, up)


def scaled_silu_mul(r: np.ndarray | None, z: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """silu(g) * u for g|u = r z + bias, z (..., 2F), r (..., 1) or None (g|u = z + bias): the
    merged plans' MLP middle, scaled block by block (the same float32 operations as scaling z
    whole, then silu_mul), and the fused plans' gate|up."""
    F = z.shape[-1] // 2
    if kernels.active() and z.dtype == F32 and z.flags.c_contiguous and z.ndim and not z.shape[-1] % 2:
        if r is not None:
            r = np.ascontiguousarray(np.broadcast_to(np.asarray(r, F32), (*z.shape[:-1], 1)))
        b = None if bias is None else np.ascontiguousarray(bias, F32)
        return kernels.swiglu(z, None, r, b)

    def block(zb: np.ndarray, rb: np.ndarray | None) -> np.ndarray:
        y = zb if rb is None else rb * zb
        if bias is not None:
            y = y + bias if y is zb else np.add(y, bias, out=y)
        m = silu(y[..., :F])
        return np.multiply(m, y[..., F:], out=m)

    if z.size <= 2 * _SILU_BLOCK or z.ndim < 2:
        return block(z, r)
    return _by_row_blocks(block, z, None if r is None else np.broadcast_to(r, (*z.shape[:-1], 1)), width=F)


def _by_row_blocks(fn, a: np.ndarray, b: np.ndarray | None, width: int | None = None) -> np.ndarray:
    """fn over blocks of rows of a and b (..., ·), written into one (..., width) result; with b
    None, fn gets None in its place."""
    rows_a = a.reshape(-1, a.shape[-1])  # views for prefill slices
    rows_b = None if b is None else b.reshape(-1, b.shape[-1])
    width = a.shape[-1] if width is None else width
    out = np.empty((rows_a.shape[0], width), F32)
    step = max(_SILU_BLOCK // max(width, 1), 1)
    for i in range(0, rows_a.shape[0], step):
        out[i : i + step] = fn(rows_a[i : i + step], None if rows_b is None else rows_b[i : i + step])
    return out.reshape(*a.shape[:-1], width)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Max-subtracted float32 softmax.

    A slice that is entirely -inf (a query that may attend to nothing) yields all zeros, without
    warnings, as torch's ``_safe_softmax`` (SDPA's math path) does; plain ``torch.softmax`` would give
    NaN there. NaN or +inf inputs still produce NaN, as in torch.
    """
    x = np.asarray(x, dtype=F32)
    return _softmax_into(x - _row_max(x, axis), axis)


def _row_max(x: np.ndarray, axis: int) -> np.ndarray:
    """max over `axis`, with -inf (an all -inf slice) raised to the lowest finite float32.

    That keeps -inf - -inf from making NaN, and changes nothing else: every other max is
    >= the lowest float (or NaN, which np.maximum keeps), and x - lowest is -inf for x = -inf,
    whose exp is 0, as the old substitution of 0 gave."""
    return np.maximum(np.maximum.reduce(x, axis=axis, keepdims=True), _LOWEST)


def _softmax_into(e: np.ndarray, axis: int) -> np.ndarray:
    """exp(e) / sum(exp(e)) in place, for e = x - max (a temporary of the caller's)."""
    with np.errstate(under="ignore"):  # tiny probabilities flush to 0, as they should
        np.exp(e, out=e)
    # The max element contributes exp(0) = 1, so a sum is >= 1, NaN, or 0 for an all -inf
    # slice (all zeros): raising it to 1 is the old where(s == 0, 1, s).
    s = np.maximum(np.add.reduce(e, axis=axis, keepdims=True), _ONE)
    return np.divide(e, s, out=e)


def scaled_softmax(scores: np.ndarray, scale: np.float32, mask: np.ndarray | None) -> np.ndarray:
    """softmax(scores * scale [+ mask]) over the last axis, in one float32 temporary."""
    x = np.multiply(scores, scale, dtype=F32)
    if mask is not None:
        np.add(x, mask, out=x)
    np.subtract(x, _row_max(x, -1), out=x)
    return _softmax_into(x, -1)


# --- attention: the causal structure per block, and softmax over key blocks ------------------------
#
# A forward pass's attention pattern is known before any layer runs: row b's new tokens sit at
# positions pos[b] + t, and key s is visible to the query at position p when s <= p (and, for
# Mistral's sliding window, p - s < window). `attention_layout` turns that into query blocks, each
# with the key blocks it reads and, only where a block is cut by the pattern, a small boolean mask;
# every layer reuses it. `grouped_attention` then runs FlashAttention's online softmax over the
# key blocks in numpy, so its largest temporary is one block of scores, not (B, H, T, S); and
# `masked_scaled_softmax` masks the full scores a GPU sent back (v3 placement) block by block,
# without an additive (B, 1, T, S) mask.

# Query tokens per block: the (G Tq, D) x (D, Sk) products run at full BLAS speed from about 64
# rows of G Tq up, and a smaller block skips more of the hidden upper triangle (measured on
# SmolLM2's 3 x 3 heads at 2,048 tokens: 64 beat 32, 128 and 256).
QUERY_BLOCK = 64
# Scores per block of keys, per (row, KV head): 3 heads x 64 queries x 2,048 keys; a block this
# size sits in L2 while it is maximized, exponentiated, summed and multiplied (see KEY_BLOCK_ROWS).
KEY_BLOCK_SCORES = 3 * 64 * 2048


@dataclass(frozen=True)
class KeyBlock:
    """Keys [start, stop) for one query block; `hidden` (B, 1, Tq, Sk) marks the keys a query
    may not see, None when every query of the block sees every key of it."""

    start: int
    stop: int
    hidden: np.ndarray | None


@dataclass(frozen=True)
class QueryBlock:
    start: int  # new tokens [start, stop) of every row
    stop: int
    keys: tuple[KeyBlock, ...]  # the key blocks some query of the block sees, in order
    lo: int  # keys outside [lo, hi) are hidden from every query of the block
    hi: int


def attention_layout(
    pos: np.ndarray,
    T: int,
    window: int | None = None,
    group: int = 1,
    query_block: int = QUERY_BLOCK,
    key_block_scores: int = KEY_BLOCK_SCORES,
    cut: bool = True,
) -> tuple[QueryBlock, ...]:
    """The blocks of a forward pass whose row b's T new tokens start at position pos[b] (B,),
    over the S = max(pos) + T keys of the cache. `group` (H / Hkv) sizes the key blocks.
    cut: key blocks end where the keys every query of the block sees end (the diagonal, the
    window's edge), so only the small blocks past it need a mask; False: blocks only as large
    as key_block_scores allows, masked where they cross (one product instead of two, for the
    compiled softmax step, which masks as it reads)."""
    pos = np.asarray(pos, np.int64)
    first, last = int(pos.min()), int(pos.max())
    blocks = []
    for t0 in range(0, T, query_block):
        t1 = min(t0 + query_block, T)
        q_pos = pos[:, None] + np.arange(t0, t1)  # (B, Tq) the block's query positions
        lo = 0 if window is None else max(first + t0 - window + 1, 0)
        hi = last + t1
        # Keys every query sees lie in [w0, d0): before d0 by causality, from w0 by the window.
        d0 = first + t0 + 1
        w0 = 0 if window is None else last + t1 - window
        cuts = sorted({lo, hi, *(c for c in (d0, w0) if cut and lo < c < hi)})
        size = max(key_block_scores // (group * (t1 - t0)), 1)
        keys = []
        for a, b in zip(cuts, cuts[1:], strict=False):
            for s0 in range(a, b, size):
                s1 = min(s0 + size, b)
                if w0 <= s0 and s1 <= d0:
                    keys.append(KeyBlock(s0, s1, None))
                    continue
                k_pos = np.arange(s0, s1)
                hidden = k_pos > q_pos[:, :, None]  # (B, Tq, Sk)
                if window is not None:
                    hidden |= q_pos[:, :, None] - k_pos >= window
                if not hidden.all():
                    keys.append(KeyBlock(s0, s1, hidden[:, None] if hidden.any() else None))
        blocks.append(QueryBlock(t0, t1, tuple(keys), lo, hi))
    return tuple(blocks)


def grouped_attention(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, layout: tuple[QueryBlock, ...], scale: np.float32
) -> np.ndarray:
    """softmax(q kᵀ scale, masked by `layout`) v for grouped heads, query head h reading KV head
    h // G: q (B, H, T, D), k and v (B, Hkv, S, D) -> (B, T, H D) float32.

    Per query block, q is scaled once (T D products instead of T S) and viewed as (B, Hkv, G Tq,
    D), so the G query heads of a KV head share one product and K, V are never repeated. Over the
    key blocks, the online softmax keeps each query's running max m, sum l and unnormalized output:
    a block's scores are exponentiated in place against the new max, and what came before is
    rescaled by exp(m_old - m_new). The output is divided by l once, at the end (T D divisions)."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    out = np.empty((B, T, Hkv, G, D), F32)
    native = kernels.active() is not None
    for qb in layout:
        n = qb.stop - qb.start
        qs = np.multiply(q[:, :, qb.start : qb.stop], scale, dtype=F32).reshape(B, Hkv, G * n, D)
        if native:
            acc, total = _online_blocks(qs, k, v, qb.keys)
        else:
            acc, total = _online_blocks_numpy(qs, k, v, qb.keys, G)
        dest = out[:, qb.start : qb.stop].transpose(0, 2, 3, 1, 4)  # (B, Hkv, G, Tq, D)
        if acc is None:  # no key visible to any query of the block
            dest[...] = 0
            continue
        # The max key contributes exp(0) = 1, so l >= 1, or 0 for a query that sees no key:
        # raising it to 1 returns zeros there, as softmax() does.
        total = np.maximum(total, _ONE, out=total)
        np.divide(acc.reshape(B, Hkv, G, n, D), total.reshape(B, Hkv, G, n, 1), out=dest)
    return out.reshape(B, T, H * D)


def _online_blocks_numpy(qs, k, v, keys, G: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """grouped_attention's loop over the key blocks of one query block in numpy's passes:
    qs (B, Hkv, G Tq, D) -> the unnormalized output and the sums (None, None if no block)."""
    B, Hkv, R, _ = qs.shape
    acc = m = total = None
    for kb in keys:
        s = _q_kt(qs, k[:, :, kb.start : kb.stop])  # (B, Hkv, G Tq, Sk)
        if kb.hidden is not None:  # (B, 1, 1, Tq, Sk) against (B, Hkv, G, Tq, Sk)
            np.copyto(s.reshape(B, Hkv, G, R // G, -1), _NEG_INF, where=kb.hidden[:, :, None])
        m_new = np.maximum.reduce(s, axis=-1, keepdims=True)  # (B, Hkv, G Tq, 1)
        if m is None:
            m_new = np.maximum(m_new, _LOWEST, out=m_new)  # a fully hidden row: exp(-inf) = 0
        else:
            m_new = np.maximum(m_new, m, out=m_new)
        np.subtract(s, m_new, out=s)
        with np.errstate(under="ignore", over="ignore"):  # m_old - m_new may pass the lowest float
            np.exp(s, out=s)
            pv = _p_v(s, v[:, :, kb.start : kb.stop])  # (B, Hkv, G Tq, D)
            if acc is None:
                acc, total = pv, np.add.reduce(s, axis=-1, keepdims=True)
            else:
                alpha = np.exp(np.subtract(m, m_new, out=m), out=m)  # rescales what came before
                np.multiply(acc, alpha, out=acc)
                acc += pv
                np.multiply(total, alpha, out=total)
                total += np.add.reduce(s, axis=-1, keepdims=True)
        m = m_new
    return acc, total


def _online_blocks(qs, k, v, keys) -> tuple[np.ndarray | None, np.ndarray | None]:
    """grouped_attention's loop over the key blocks of one query block with the compiled softmax
    step (kernels.softmax_step): the block's max, exponentials, sum and rescaling in two passes
    over the scores instead of numpy's five. Returns the unnormalized output and the sums."""
    acc = None
    m = np.empty((*qs.shape[:-1], 1), F32)
    total, alpha = np.empty_like(m), np.empty_like(m)
    for kb in keys:
        s = _q_kt(qs, k[:, :, kb.start : kb.stop])  # (B, Hkv, G Tq, Sk), a new array
        kernels.softmax_step(s, kb.hidden, m, total, alpha, acc is None)
        pv = _p_v(s, v[:, :, kb.start : kb.stop])
        if acc is None:
            acc = pv
        else:
            np.multiply(acc, alpha, out=acc)
            acc += pv
    return acc, (None if acc is None else total)


# A decode step has G Tq (3 for SmolLM2) rows of queries against thousands of keys: a shape
# where OpenBLAS's q Kᵀ packs all of K first and runs at a third of the speed of K qᵀ (2,048
# keys, 30 layers in turn, caches cold: 496 against 169 µs a layer), and its P V slows down past
# 4,096 keys (8,000: 1,221 µs a layer, 579 in blocks of 1,024). The GPU server's numpy path
# does the same (gpu/service.py); the sides share no code.
_FEW_ROWS = 16
_PV_BLOCK = 1024


def _q_kt(q: np.ndarray, k: np.ndarray) -> np.ndarray:
    """q (..., R, D) @ k (..., S, D)ᵀ -> (..., R, S) float32, a new contiguous array."""
    if q.shape[-2] > _FEW_ROWS:
        return np.matmul(q, np.swapaxes(k, -1, -2))
    return np.ascontiguousarray(np.swapaxes(np.matmul(k, np.swapaxes(q, -1, -2)), -1, -2))


def _p_v(p: np.ndarray, v: np.ndarray) -> np.ndarray:
    """p (..., R, S) @ v (..., S, D) -> (..., R, D), in blocks of keys for few rows."""
    S = p.shape[-1]
    if p.shape[-2] > _FEW_ROWS or S <= _PV_BLOCK:
        return np.matmul(p, v)
    out = np.matmul(p[..., :_PV_BLOCK], v[..., :_PV_BLOCK, :])
    for s0 in range(_PV_BLOCK, S, _PV_BLOCK):
        out += np.matmul(p[..., s0 : s0 + _PV_BLOCK], v[..., s0 : s0 + _PV_BLOCK, :])
    return out


def masked_scaled_softmax(
    scores: np.ndarray, scale: np.float32, layout: tuple[QueryBlock, ...]
) -> np.ndarray:
    """softmax(scores * scale) over the last axis with the keys `layout` hides set to -inf:
    scores (B, H, T, S) -> probabilities, in one float32 temporary (v3 placement, where the GPU
    computed the scores). The same result as scaled_softmax with the additive mask, bit for bit."""
    x = np.multiply(scores, scale, dtype=F32)
    for qb in layout:
        rows = x[:, :, qb.start : qb.stop]  # (B, H, Tq, S)
        rows[..., : qb.lo] = _NEG_INF
        rows[..., qb.hi :] = _NEG_INF
        covered = qb.lo
        for kb in qb.keys:
            rows[..., covered : kb.start] = _NEG_INF  # a gap: keys no query of the block sees
            if kb.hidden is not None:
                np.copyto(rows[..., kb.start : kb.stop], _NEG_INF, where=kb.hidden)
            covered = kb.stop
        rows[..., covered : qb.hi] = _NEG_INF
    np.subtract(x, _row_max(x, -1), out=x)
    return _softmax_into(x, -1)


def repeat_kv(x: np.ndarray, n_rep: int) -> np.ndarray:
    """(B, Hkv, S, D) -> (B, Hkv * n_rep, S, D); query head h reads kv head h // n_rep."""
    return x if n_rep == 1 else np.repeat(x, n_rep, axis=1)


def rotate_half(x: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    return np.concatenate((-x[..., half:], x[..., :half]), axis=-1)


def apply_rope(
    q: np.ndarray, k: np.ndarray, cos: np.ndarray, sin: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """q (B, H, T, D), k (B, Hkv, T, D), cos/sin (B, T, D) -> rotated (q, k), like apply_rotary_pos_emb."""
    cos, sin = cos[:, None], rope_signed_sin(sin[:, None])  # (B, 1, T, D): broadcast over heads
    return rope_rotate(q, cos, sin), rope_rotate(k, cos, sin)


def rope_signed_sin(sin: np.ndarray) -> np.ndarray:
    """sin (..., D) -> (..., 2, D/2): [-first half, second half], for rope_rotate."""
    half = sin.shape[-1] // 2
    return np.concatenate((-sin[..., :half], sin[..., half:]), axis=-1).reshape(*sin.shape[:-1], 2, half)


def rope_rotate(x: np.ndarray, cos: np.ndarray, signed_sin: np.ndarray) -> np.ndarray:
    """x * cos + rotate_half(x) * sin, with signed_sin = rope_signed_sin(sin); cos broadcasts to
    x (..., D) and signed_sin to (..., 2, D/2).

    rotate_half(x) * sin is [-x2 * s1, x1 * s2], and -x2 * s1 is x2 * -s1 exactly, so it is the
    halves of x swapped (a view: the (2, D/2) split reversed) times signed_sin: the same
    products and sum as apply_rotary_pos_emb, without the negated copy and the concatenation."""
    half = x.shape[-1] // 2
    swapped = x.reshape(*x.shape[:-1], 2, half)[..., ::-1, :]
    y = np.multiply(x, cos)
    y += np.multiply(swapped, signed_sin).reshape(y.shape)
    return y


def rope_qkv(
    z: np.ndarray,
    rope: tuple[np.ndarray, np.ndarray],
    heads: int,
    r: np.ndarray | None = None,
    bias: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """y = r z + bias for q|k|v rows z (B, T, W) (r (B, T, 1) or None: y = z), its first `heads`
    heads rotated: -> (rotated (B, T, heads, D), the other columns of y (B, T, W - heads D)).
    rope = (cos (B, T, 1, D), rope_signed_sin(sin)) as the model's forward makes them. The
    compiled loop does it in one pass over z; numpy in five."""
    cos, ssin = rope
    B, T, W = z.shape
    D = cos.shape[-1]
    if kernels.active() and z.dtype == F32 and z.flags.c_contiguous:
        y = kernels.rope_qkv(z, cos, ssin, heads, r, None if bias is None else bias[:W])
        return y[..., : heads * D].reshape(B, T, heads, D), y[..., heads * D :]
    y = z if r is None else r * z
    if bias is not None:
        y = y + bias[:W] if y is z else np.add(y, bias[:W], out=y)
    return rope_rotate(y[..., : heads * D].reshape(B, T, heads, D), cos, ssin), y[..., heads * D :]


# --- rotary position embeddings -------------------------------------------------------------------


def _powf(base: Any, exponent: np.ndarray) -> np.ndarray:
    """float32 ``base ** exponent``, correctly rounded.

    torch's CPU float32 pow (SLEEF, 1-ulp accurate) is not, so a few elements can differ by 1 ulp;
    copying SLEEF bit for bit is not worth it in trusted code, and this choice is portable.
    """
    return (np.float64(F32(base)) ** np.asarray(exponent, dtype=F32).astype(np.float64)).astype(F32)


def _exponents(dim: int) -> np.ndarray:
    return np.arange(0, dim, 2, dtype=np.int64).astype(F32) / F32(dim)  # (D/2,)


def _default_inv_freq(base: Any, dim: int) -> np.ndarray:
    return F32(1) / _powf(base, _exponents(dim))


def _dynamic_inv_freq(rope: dict[str, Any], dim: int, max_pos: int, seq_len: int | None) -> np.ndarray:
    factor = rope["factor"]
    if seq_len is None:
        # At construction transformers computes the NTK base with Python floats ...
        base = rope["rope_theta"] * ((factor * max_pos / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    else:
        # ... but on growth seq_len is a tensor, which makes the whole expression float32.
        ratio = F32(factor) * F32(max(seq_len, max_pos)) / F32(max_pos) - F32(factor - 1)
        base = F32(rope["rope_theta"]) * _powf(ratio, F32(dim / (dim - 2)))
    return _default_inv_freq(base, dim)


def _llama3_inv_freq(rope: dict[str, Any], dim: int) -> np.ndarray:
    inv_freq = _default_inv_freq(rope["rope_theta"], dim)
    factor, low, high = F32(rope["factor"]), rope["low_freq_factor"], rope["high_freq_factor"]
    old_ctx = rope["original_max_position_embeddings"]
    low_wavelen, high_wavelen = F32(old_ctx / low), F32(old_ctx / high)

    # torch evaluates `scalar / tensor` as `tensor.reciprocal() * scalar`, which rounds differently.
    wavelen = (F32(1) / inv_freq) * F32(2 * math.pi)
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = ((F32(1) / wavelen) * F32(old_ctx) - F32(low)) / F32(high - low)
    smoothed = (F32(1) - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(is_medium, smoothed, scaled)


def _yarn_parameters(rope: dict[str, Any], dim: int, max_pos: int) -> tuple[np.ndarray, float]:
    base = rope["rope_theta"]
    orig = rope["original_max_position_embeddings"]
    factor = rope.get("factor")
    if factor is None:
        factor = max_pos / orig

    def get_mscale(scale: float, mscale: float = 1) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low = correction_dim(rope.get("beta_fast") or 32)
    high = correction_dim(rope.get("beta_slow") or 1)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp

    pos_freqs = _powf(base, _exponents(dim))
    extrapolation = F32(1) / pos_freqs
    interpolation = F32(1) / (F32(factor) * pos_freqs)
    ramp = np.clip((np.arange(dim // 2, dtype=F32) - F32(low)) / F32(high - low), 0, 1)
    extrapolation_factor = F32(1) - ramp
    inv_freq = interpolation * (F32(1) - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv_freq, float(attention_factor)


class RotaryEmbedding:
    """cos/sin tables like transformers' LlamaRotaryEmbedding, for one model.

    For rope_type "dynamic" it is stateful exactly like transformers' ``dynamic_rope_update``: call it
    once per model forward, with that forward's positions.
    """

    def __init__(self, head_dim: int, rope: dict[str, Any], max_position_embeddings: int):
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("partial rotary embeddings are not supported")
        self.head_dim = head_dim
        self.rope = dict(rope)
        self.rope_type = rope["rope_type"]
        self.max_position_embeddings = max_position_embeddings
        self.attention_scaling = 1.0
        theta = rope["rope_theta"]
        if self.rope_type == "default":
            inv_freq = _default_inv_freq(theta, head_dim)
        elif self.rope_type == "linear":
            inv_freq = _default_inv_freq(theta, head_dim) / F32(rope["factor"])
        elif self.rope_type == "dynamic":
            inv_freq = _dynamic_inv_freq(self.rope, head_dim, max_position_embeddings, None)
        elif self.rope_type == "llama3":
            inv_freq = _llama3_inv_freq(self.rope, head_dim)
        elif self.rope_type == "yarn":
            inv_freq, self.attention_scaling = _yarn_parameters(self.rope, head_dim, max_position_embeddings)
        else:
            raise ValueError(f"unsupported rope_type {self.rope_type!r}")
        self.inv_freq = inv_freq  # (D/2,) float32
        self.original_inv_freq = inv_freq
        self.max_seq_len_cached = max_position_embeddings

    def _dynamic_update(self, seq_len: int) -> None:
        cached = self.max_seq_len_cached
        if seq_len > cached:  # grow: rescale for the longer sequence
            self.inv_freq = _dynamic_inv_freq(self.rope, self.head_dim, self.max_position_embeddings, seq_len)
            self.max_seq_len_cached = seq_len
        # transformers tests the cached length as it was before this call, and only resets strictly below
        if seq_len < self.max_position_embeddings and cached > self.max_position_embeddings:
            self.inv_freq = self.original_inv_freq
            self.max_seq_len_cached = self.max_position_embeddings

    def __call__(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """positions (B, T) int -> cos, sin (B, T, D) float32, scaled by the attention factor."""
        positions = np.asarray(positions)
        if self.rope_type == "dynamic":
            self._dynamic_update(int(positions.max()) + 1)
        freqs = positions[..., None].astype(F32) * self.inv_freq  # (B, T, D/2)
        scale = F32(self.attention_scaling)
        cos, sin = np.cos(freqs) * scale, np.sin(freqs) * scale
        return np.concatenate((cos, cos), axis=-1), np.concatenate((sin, sin), axis=-1)
