"""The trusted side's compiled loops (_kernels.c), checked, or numpy where they are not in use.

ops.grouped_attention and ops.scaled_silu_mul / silu_mul call `active()`: the compiled module
where it was built and this CPU runs its vectorized build (x86-64 with AVX2 and FMA), else None
and they run their numpy passes. TEESPLIT_KERNELS=numpy forces numpy (a comparison, a suspected
kernel bug); `use(False)` does the same inside a block.

The softmax and SwiGLU loops' results are not numpy's bits: their exp is their own (within
about 1 ulp, and 0 below -87.3 where numpy's is subnormal, so silu(g) for g < -87.3 is 0 rather
than some 1e-36) and their sums go in another order; both paths are held to transformers by the
same tolerances (tests/tee/test_kernels.py, the parity tests). The RoPE loop gives numpy's bits.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from types import ModuleType

import numpy as np

try:
    from teesplit.tee import _kernels as _compiled
except ImportError:  # built without a C compiler: numpy everywhere
    _compiled = None

F32 = np.float32
ENV = "TEESPLIT_KERNELS"


def available() -> bool:
    """The module is built and this CPU runs its fast build."""
    return _compiled is not None and bool(_compiled.vectorized())


def _default() -> ModuleType | None:
    choice = os.environ.get(ENV, "auto")
    if choice not in ("auto", "numpy"):
        raise ValueError(f"{ENV}={choice!r}: expected 'auto' or 'numpy'")
    return _compiled if choice == "auto" and available() else None


_active = _default()


def active() -> ModuleType | None:
    return _active


@contextlib.contextmanager
def use(on: bool) -> Iterator[None]:
    """The compiled loops on (where available) or off inside the block."""
    global _active
    before, _active = _active, (_compiled if on and available() else None)
    try:
        yield
    finally:
        _active = before


def _f32_c(name: str, a: np.ndarray) -> None:
    if a.dtype != F32 or not a.flags.c_contiguous:
        raise ValueError(f"{name}: expected a C-contiguous float32 array, got {a.dtype} {a.strides}")


def softmax_step(
    s: np.ndarray,
    hidden: np.ndarray | None,
    m: np.ndarray,
    total: np.ndarray,
    alpha: np.ndarray,
    first: bool,
) -> None:
    """One key block of the online softmax, in place: s (B, Hkv, G Tq, Sk) scaled scores becomes
    exp(s - m_new); m, total, alpha (B, Hkv, G Tq, 1) are the running max and sum (in/out) and
    the rescaling of what came before (out; not written for the first block). hidden
    (B, 1, Tq, Sk) bool marks the keys a query may not see, or None."""
    for name, a in (("s", s), ("m", m), ("total", total), ("alpha", alpha)):
        _f32_c(name, a)
    B, Hkv, R, Sk = s.shape
    if m.shape != (B, Hkv, R, 1) or total.shape != m.shape or alpha.shape != m.shape:
        shapes = f"m {m.shape}, total {total.shape}, alpha {alpha.shape}"
        raise ValueError(f"softmax_step: {shapes} for s {s.shape}")
    Tq = R
    if hidden is not None:
        if hidden.dtype != np.bool_ or not hidden.flags.c_contiguous or hidden.ndim != 4:
            raise ValueError(f"softmax_step: hidden must be C-contiguous 4-d bool, got {hidden.dtype}")
        Tq = hidden.shape[2]
        if hidden.shape != (B, 1, Tq, Sk) or R % Tq:
            raise ValueError(f"softmax_step: hidden {hidden.shape} for s {s.shape}")
    _compiled.softmax_step(s, hidden, m, total, alpha, B * Hkv * R, Hkv * R, Tq, Sk, first)


def swiglu(
    g: np.ndarray,
    u: np.ndarray | None,
    r: np.ndarray | None = None,
    bias: np.ndarray | None = None,
) -> np.ndarray:
    """silu(r g + bias[:F]) * (r u + bias[F:]) -> (..., F) float32. With u None, g is the merged
    gate|up (..., 2F); else gate and up, each (..., F). r (..., 1) scales each row, or None."""
    _f32_c("g", g)
    merged = u is None
    F = g.shape[-1] // 2 if merged else g.shape[-1]
    if merged:
        if g.shape[-1] != 2 * F:
            raise ValueError(f"swiglu: gate|up width {g.shape[-1]} is odd")
        u = g
    else:
        _f32_c("u", u)
        if u.shape != g.shape:
            raise ValueError(f"swiglu: gate {g.shape} and up {u.shape} differ")
    rows = g.size // max(g.shape[-1], 1)
    if r is not None:
        _f32_c("r", r)
        if r.shape != (*g.shape[:-1], 1):
            raise ValueError(f"swiglu: r {r.shape} for rows {g.shape[:-1]}")
    if bias is not None:
        _f32_c("bias", bias)
        if bias.shape != (2 * F,):
            raise ValueError(f"swiglu: bias {bias.shape}, expected ({2 * F},)")
    out = np.empty((*g.shape[:-1], F), F32)
    stride = 2 * F if merged else F
    _compiled.swiglu(out, g, u, r, bias, rows, F, stride, F if merged else 0)
    return out


def rope_qkv(
    z: np.ndarray,
    cos: np.ndarray,
    ssin: np.ndarray,
    heads: int,
    r: np.ndarray | None = None,
    bias: np.ndarray | None = None,
) -> np.ndarray:
    """r z + bias for q|k|v rows z (B, T, W), its first `heads` heads of D rotated by RoPE:
    cos (B, T, 1, D) and the signed sin (B, T, 1, 2, D/2) as ops.rope_rotate takes them; the
    columns after those heads are only scaled. -> (B, T, W) float32."""
    _f32_c("z", z)
    B, T, W = z.shape
    D = cos.shape[-1]
    cos = np.ascontiguousarray(cos, F32)
    ssin = np.ascontiguousarray(ssin, F32)
    if cos.size != B * T * D or ssin.size != B * T * D or D % 2 or heads * D > W:
        raise ValueError(f"rope_qkv: cos {cos.shape}, sin {ssin.shape} for {heads} heads of z {z.shape}")
    if r is not None:
        r = np.ascontiguousarray(np.broadcast_to(r, (B, T, 1)), F32)
    if bias is not None:
        bias = np.ascontiguousarray(bias, F32)
        if bias.shape != (W,):
            raise ValueError(f"rope_qkv: bias {bias.shape}, expected ({W},)")
    out = np.empty_like(z)
    _compiled.rope_qkv(out, z, r, bias, cos, ssin, B * T, W, heads, D)
    return out
