"""Integer weights and exact ring products of the private plans. Shared by both sides (numpy only).

The private plans (tee/private.py) have the GPU server multiply masked ring elements of
Z_2^64 by small integer weights. Both sides need the same integers: the server multiplies
with them; the trusted side computes the one-time pads' unblinding factors and the Freivalds
fingerprints with them, and decodes the results with their scales. So both sides derive them
from the checkpoint by the one rule below, with this module's code, in IEEE-754 binary64,
where every step is exact or one correctly rounded operation: any conforming machine gets
the same integers.

The rule (`quantize_model`), for weight format int16 (QMAX 32639) or int8 (QMAX 127):

1. Source values. The server computes from the weights it loaded in its compute dtype
   (`--dtype`: float32, bfloat16 or float16); the trusted side rounds its own float32
   checkpoint to that dtype (round to nearest even, what torch's cast does) and both widen
   to float64. A float32 server therefore reproduces the checkpoint exactly, and a bfloat16
   one its bfloat16 rounding, which is all it has; the trusted side learns the dtype from
   Init. RMSNorm gains are float32 on both sides whatever the dtype.
2. A Linear after an RMSNorm (q|k|v, gate|up, the LM head) takes the gain w as a diagonal:
   F = W diag(w), exact in float64 (two 24-bit significands). Each output row k gets the
   symmetric scale s_k = max|F_k| / QMAX and the integers q_k = clip(rint(F_k / s_k)).
3. A Linear whose output joins the residual stream (o_proj, down_proj) must give every row
   the same scale as the residual it is added to on the server: row j gets c_j = m_j δ, with
   δ = max_j max|W_j| / (QMAX RESIDUAL_STEPS) for the whole matrix and the integer
   m_j = ceil(max|W_j| / (QMAX δ)) in [1, RESIDUAL_STEPS] (+1 at most, from rounding), and
   q_j = clip(rint(W_j / c_j)). The server multiplies the product's row j by m_j before the
   residual add, which brings every row to the common scale δ exactly (an integer product in
   the ring), so each row keeps nearly its own precision (within a factor (m_j - 1) / m_j
   of QMAX levels) instead of the whole matrix sharing the scale of its largest row.

Rows that are all zero get scale 1 and zero integers. An int16 weight is held as two signed
8-bit limbs, q = 256 hi + lo with both in [-128, 127]; hence QMAX = 127 * 256 + 127.

The ring products: a ring element x (int64, read modulo 2^64) is split into eight signed
8-bit limbs d_k with x = Σ_k d_k 2^(8k) mod 2^64 (`signed_limbs`: the bytes of x + 0x80..80,
each minus 128), so x·q = Σ_k 2^(8k) (d_k·q) mod 2^64, and each d_k·q is an int8 x int8 -> int32
product that cannot overflow for K < 2^17 terms (|d_k q| <= 2^14). The server stacks the
limbs as rows of one integer GEMM (gpu/ring.py); `ring_matmul` is the numpy form with float64
products that the trusted side uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from teesplit.config import ModelConfig

WEIGHT_FORMATS = {"int16": 16, "int8": 8}  # --private-weights
QMAX = {16: 127 * 256 + 127, 8: 127}  # largest |integer|: int16 as two signed 8-bit limbs
RESIDUAL_STEPS = 64  # residual rows' scales are multiples m δ of one δ, m in [1, RESIDUAL_STEPS]
SOURCE_DTYPES = ("float32", "bfloat16", "float16")  # compute dtypes a server quantizes from
MAX_K = 2**17 - 1  # int8 x int8 products summed in int32: |sum| <= 2^14 K < 2^31
RING_LIMBS = 8  # signed 8-bit limbs of a Z_2^64 element
_ROWS = 4096  # rows quantized at a time: float64 temporaries stay small for large vocabularies

# Every masked product, by site: "residual" sites feed the residual stream, "composite" ones
# follow an RMSNorm whose gain they absorb (norm index into the (2L+1, E) stack, see below).
RESIDUAL_SITES = ("o", "down")
COMPOSITE_SITES = ("qkv", "gate_up", "lm_head")
LM_HEAD = "lm_head"  # the one site outside the layers (layer index -1)


class QuantizationError(ValueError):
    """The weights cannot be quantized by the rule (a non-finite value, an unsupported shape)."""


@dataclass
class IntWeights:
    """One site's integers and what decodes them.

    Composite sites: W diag(w) ≈ scale[:, None] * q. Residual sites: W ≈ scale[:, None] * q with
    scale = mult * base (mult int64 in [1, RESIDUAL_STEPS + 1], base the matrix's δ).
    With `bounds`, also what bounds products with them (the trusted side's headroom):
    row_norm = max_k ||q_k||₂, and for residual sites sigma >= the spectral norm of diag(mult) q."""

    q: np.ndarray  # (N, K) int16 or int8
    scale: np.ndarray  # (N,) float64
    mult: np.ndarray | None = None  # (N,) int64, residual sites only
    base: float = 1.0  # δ, residual sites only
    row_norm: float = 0.0
    sigma: float = 0.0

    @property
    def residual(self) -> bool:
        return self.mult is not None


def weight_bits(name: str) -> int:
    """--private-weights NAME -> 16 or 8."""
    if name not in WEIGHT_FORMATS:
        raise ValueError(f"--private-weights must be one of {', '.join(WEIGHT_FORMATS)}, got {name!r}")
    return WEIGHT_FORMATS[name]


def source_values(w: np.ndarray, source: str) -> np.ndarray:
    """Float weights as a server keeping them in `source` holds them, widened (exactly) to float64."""
    w = np.asarray(w, np.float32)
    if source == "float32":
        return w.astype(np.float64)
    if source == "bfloat16":
        return w.astype(ml_dtypes.bfloat16).astype(np.float64)
    if source == "float16":
        with np.errstate(over="ignore"):  # beyond float16 becomes Inf, refused by _abs_max
            return w.astype(np.float16).astype(np.float64)
    raise QuantizationError(f"the private plans quantize from {', '.join(SOURCE_DTYPES)}, not {source!r}")


def _abs_max(w: np.ndarray, check: bool = True) -> np.ndarray:
    """max_k |w_k| per row, without an |w| temporary; NaN or Inf anywhere is refused (with
    `check`; without, such a row's maximum is Inf, refused later by `_checked_max`)."""
    amax = np.maximum(w.max(axis=1, initial=-np.inf), -w.min(axis=1, initial=np.inf))
    if not check:
        return np.where(np.isnan(amax), np.inf, np.maximum(amax, 0.0))
    return np.maximum(_checked_max(amax), 0.0)


def _checked_max(amax: np.ndarray) -> np.ndarray:
    if not np.isfinite(amax).all():
        raise QuantizationError("a weight is NaN or Inf (in the server's dtype): it cannot be quantized")
    return amax


def residual_row_max(get_rows: Callable[[int, int], np.ndarray], n: int, source: str) -> np.ndarray:
    """max_k |W_jk| of each row of a residual site, as rule step 3 starts; never raises on a
    NaN or Inf (the row's maximum is then Inf), so that processes holding parts of the rows can
    combine their maxima before any of them refuses (tensor parallelism, gpu/tp.py)."""
    amax = np.empty(n, np.float64)
    for a, w in _chunks(get_rows, n, source):
        amax[a : a + len(w)] = _abs_max(w, check=False)
    return amax


def _chunks(get_rows: Callable[[int, int], np.ndarray], n: int, source: str, gain=None):
    """(start, float64 rows) in chunks of _ROWS rows, times the gain when given (exact: both
    factors have 24-bit significands)."""
    for a in range(0, n, _ROWS):
        w = source_values(get_rows(a, min(a + _ROWS, n)), source)
        if gain is not None:
            w *= gain
        yield a, w


def _to_integers(w: np.ndarray, scale: np.ndarray, qmax: int) -> np.ndarray:
    """clip(rint(w / scale)) in place, as float64."""
    w /= scale[:, None]
    np.rint(w, out=w)
    return np.clip(w, -qmax, qmax, out=w)


class _Bounds:
    """Accumulates, chunk by chunk, the norms that bound products with the integers (exact in
    float64: squares below 2^30, sums of at most 2^17 of them)."""

    def __init__(self, mult: np.ndarray | None):
        self.mult, self.row_sq, self.frob_sq, self.row_abs, self.col_abs = mult, 0.0, 0.0, 0.0, None

    def add(self, a: int, q: np.ndarray) -> None:
        sq = np.einsum("ij,ij->i", q, q)
        self.row_sq = max(self.row_sq, float(sq.max(initial=0.0)))
        if self.mult is not None:
            m = self.mult[a : a + len(q)].astype(np.float64)
            aq = np.abs(q)
            self.frob_sq += float((sq * m * m).sum())
            self.row_abs = max(self.row_abs, float((aq.sum(axis=1) * m).max(initial=0.0)))
            col = m @ aq  # Σ_j mult_j |q_jk|
            self.col_abs = col if self.col_abs is None else self.col_abs + col

    def apply(self, iw: IntWeights) -> IntWeights:
        iw.row_norm = math.sqrt(self.row_sq)
        if self.mult is not None:  # ||M||₂ <= min(||M||_F, sqrt(||M||₁ ||M||_∞)), both rigorous
            col = 0.0 if self.col_abs is None else float(self.col_abs.max(initial=0.0))
            iw.sigma = min(math.sqrt(self.frob_sq), math.sqrt(col * self.row_abs))
        return iw


def quantize_composite(
    get_rows: Callable[[int, int], np.ndarray],
    n: int,
    gain: np.ndarray,
    bits: int,
    source: str,
    bounds: bool = False,
) -> IntWeights:
    """Rule step 2: W diag(gain) with one symmetric scale per output row (one pass)."""
    qmax = QMAX[bits]
    g = np.asarray(gain, np.float32).astype(np.float64)
    q, scale, acc = None, np.empty(n, np.float64), _Bounds(None)
    for a, w in _chunks(get_rows, n, source, g):
        amax = _abs_max(w)
        s = scale[a : a + len(w)] = np.where(amax > 0, amax / qmax, 1.0)
        w = _to_integers(w, s, qmax)
        if bounds:
            acc.add(a, w)
        if q is None:
            q = np.empty((n, w.shape[1]), np.int16 if bits == 16 else np.int8)
        q[a : a + len(w)] = w
    return acc.apply(IntWeights(q, scale))


def quantize_residual(
    get_rows: Callable[[int, int], np.ndarray],
    n: int,
    bits: int,
    source: str,
    bounds: bool = False,
    amax: np.ndarray | None = None,
) -> IntWeights:
    """Rule step 3: row scales mult_j δ on one grid δ, so the server can align the rows exactly
    (two passes: δ needs every row's maximum first). `amax`: the rows' maxima, when they are
    not those of `get_rows` alone (a tensor-parallel rank holds some columns of each row)."""
    qmax = QMAX[bits]
    amax = _checked_max(residual_row_max(get_rows, n, source) if amax is None else amax)
    top = float(amax.max(initial=0.0))
    base = top / (qmax * RESIDUAL_STEPS) if top > 0 else 1.0
    mult = np.maximum(np.ceil(amax / (qmax * base)), 1.0)
    scale = mult * base
    q, acc = None, _Bounds(mult)
    for a, w in _chunks(get_rows, n, source):
        w = _to_integers(w, scale[a : a + len(w)], qmax)
        if bounds:
            acc.add(a, w)
        if q is None:
            q = np.empty((n, w.shape[1]), np.int16 if bits == 16 else np.int8)
        q[a : a + len(w)] = w
    return acc.apply(IntWeights(q, scale, mult.astype(np.int64), base))


@dataclass(frozen=True)
class SiteSpec:
    layer: int  # -1 for the LM head
    site: str  # qkv, o, gate_up, down, lm_head
    norm: int | None  # the gain's row in the (2L+1, E) norm stack (composite sites)


def private_sites(config: ModelConfig) -> list[SiteSpec]:
    """Every masked product of a forward pass, in the order the pass crosses them. Norm stack
    rows: 2i input norm of layer i, 2i+1 its post-attention norm, 2L the final norm."""
    L = config.num_layers
    out = []
    for i in range(L):
        out += [SiteSpec(i, "qkv", 2 * i), SiteSpec(i, "o", None)]
        out += [SiteSpec(i, "gate_up", 2 * i + 1), SiteSpec(i, "down", None)]
    return [*out, SiteSpec(-1, LM_HEAD, 2 * L)]


def step_sites(op: str, layer: int, num_layers: int) -> tuple[SiteSpec | None, SiteSpec]:
    """The (first, second) products of a ring operation (protocol.RING_OPS); ValueError names
    what is out of range. The norm index of the second is its gain's row, as in private_sites."""
    L = num_layers
    if op == "RingEmbedQKV":
        return None, SiteSpec(0, "qkv", 0)
    if op == "RingOGateUp":
        if not 0 <= layer < L:
            raise ValueError(f"{op}: layer {layer} out of range [0, {L})")
        return SiteSpec(layer, "o", None), SiteSpec(layer, "gate_up", 2 * layer + 1)
    if op == "RingDownQKV":
        if not 0 <= layer < L - 1:
            raise ValueError(
                f"{op}: layer {layer} out of range [0, {L - 1}) (the last layer's is RingDownLMHead)"
            )
        return SiteSpec(layer, "down", None), SiteSpec(layer + 1, "qkv", 2 * layer + 2)
    if op == "RingDownLMHead":
        return SiteSpec(L - 1, "down", None), SiteSpec(-1, LM_HEAD, 2 * L)
    raise ValueError(f"{op!r} is not a ring operation")


def site_shape(config: ModelConfig, site: str) -> tuple[int, int]:
    """(N, K) of a site's weight."""
    c = config
    E, F = c.hidden_size, c.intermediate_size
    return {
        "qkv": (c.q_dim + 2 * c.kv_dim, E),
        "o": (E, c.q_dim),
        "gate_up": (2 * F, E),
        "down": (E, F),
        LM_HEAD: (c.vocab_size, E),
    }[site]


def quantize_model(
    config: ModelConfig,
    rows_of: Callable[[int, str], Callable[[int, int], np.ndarray]],
    norms: np.ndarray,
    bits: int,
    source: str,
    bounds: bool = False,
    whole_rows: Callable[[list[np.ndarray]], list[np.ndarray]] | None = None,
) -> Iterator[tuple[SiteSpec, IntWeights]]:
    """The rule over every private site, in forward order. `rows_of(layer, site)` gives the
    site's float weight rows [a, b) as float32 numpy (N, K) slices; `norms` is the (2L+1, E)
    float32 stack of RMSNorm gains; `bounds`: also the norms of IntWeights (trusted side).

    `whole_rows`, where `rows_of` gives only some input columns of the residual sites (a
    tensor-parallel rank, gpu/tp.py): maps the row maxima of those columns, one array per
    residual site in forward order, to the maxima of the whole rows. It is called once, before
    any site is quantized or refused, so that every rank calls it whatever its weights hold."""
    if bits not in QMAX:
        raise QuantizationError(f"weight bits must be 8 or 16, got {bits}")
    sites = private_sites(config)
    for spec in sites:
        k = site_shape(config, spec.site)[1]
        if k > MAX_K:
            raise QuantizationError(f"{spec.site}: {k} inputs exceed the int32 accumulation limit {MAX_K}")
    amax: dict[SiteSpec, np.ndarray] = {}
    if whole_rows is not None:
        residual = [spec for spec in sites if spec.norm is None]
        local = [
            residual_row_max(rows_of(s.layer, s.site), site_shape(config, s.site)[0], source)
            for s in residual
        ]
        amax = dict(zip(residual, whole_rows(local), strict=True))
    for spec in sites:
        n = site_shape(config, spec.site)[0]
        get_rows = rows_of(spec.layer, spec.site)
        if spec.norm is None:
            yield spec, quantize_residual(get_rows, n, bits, source, bounds, amax.get(spec))
        else:
            yield spec, quantize_composite(get_rows, n, norms[spec.norm], bits, source, bounds)


# ---- ring products ----------------------------------------------------------------------------
_OFFSET = np.array([0x8080808080808080], np.uint64).view(np.int64)[0]  # 128 in every byte
_LIMB_SCALE = np.array([1 << (8 * k) for k in range(RING_LIMBS)], np.int64)[:, None, None]


def signed_limbs(x: np.ndarray) -> np.ndarray:
    """(R, K) int64 -> (8, R, K) int8 d with x = Σ_k d_k 2^(8k) mod 2^64: the bytes of
    x + 0x8080...80 (little-endian), each minus 128. A view; limb-major."""
    y = np.ascontiguousarray(x, dtype="<i8") + _OFFSET  # int64 arithmetic wraps modulo 2^64
    b = y.view(np.uint8).reshape(*x.shape, RING_LIMBS) ^ np.uint8(0x80)
    return np.moveaxis(b.view(np.int8), -1, 0)


def weight_limbs(q: np.ndarray) -> np.ndarray:
    """(N, K) int8 -> (1, N, K); int16 -> (2, N, K) int8 limbs (lo, hi) with q = lo + 256 hi."""
    if q.dtype == np.int8:
        return q[None]
    if q.dtype != np.int16 or (q.size and np.abs(q.astype(np.int32)).max() > QMAX[16]):
        raise QuantizationError(f"int16 weights must lie in [-{QMAX[16]}, {QMAX[16]}]")
    q32 = q.astype(np.int32)
    lo = ((q32 + 128) & 0xFF) - 128
    hi = (q32 - lo) >> 8
    return np.stack([lo, hi]).astype(np.int8)


def recombine(p: np.ndarray) -> np.ndarray:
    """Limb products (8, R, nl, N) (x's limb k times weight limb l, for the N outputs) ->
    Σ_k 2^(8k) (p_k0 + 256 p_k1) mod 2^64, (R, N) int64. Horner's rule over contiguous rows,
    in place: the LM head's 8 x 2 x 49152 products in a third of the time of a multiply-and-sum."""
    t = p.astype(np.int64)
    y = t[RING_LIMBS - 1, :, 0].copy()
    for k in range(RING_LIMBS - 2, -1, -1):
        y <<= 8  # int64 shifts wrap modulo 2^64
        y += t[k, :, 0]
    if p.shape[2] == 2:  # the high limbs: 2^(8k + 8) vanishes modulo 2^64 for k = 7
        hi = t[RING_LIMBS - 2, :, 1].copy()
        for k in range(RING_LIMBS - 3, -1, -1):
            hi <<= 8
            hi += t[k, :, 1]
        hi <<= 8
        y += hi
    return y


def ring_matmul(x: np.ndarray, q: np.ndarray, block: int = 1024) -> np.ndarray:
    """x (R, K) int64 times q (N, K) int8/int16, transposed, mod 2^64: (R, N) int64, exactly.

    x is cut into n unsigned b-bit limbs, b as wide as float64 allows (every sum of K limb times
    weight products stays below 2^53), stacked as rows of float64 products against blocks of
    `block` weight rows widened on the fly (so only the compact integers are kept), and
    recombined with wrapping int64 arithmetic. The numpy integer product (no BLAS) is 7x slower."""
    R, K = x.shape
    N = q.shape[0]
    qbound = 127 if q.dtype == np.int8 else QMAX[16]
    bits = 53 - math.ceil(math.log2(qbound * max(K, 1) + 1))
    n = math.ceil(64 / bits)
    b = math.ceil(64 / n)
    shifts = np.arange(n, dtype=np.uint64)[:, None, None] * np.uint64(b)
    u = np.ascontiguousarray(x, dtype=np.int64).view(np.uint64)
    limbs = ((u[None] >> shifts) & np.uint64((1 << b) - 1)).astype(np.float64).reshape(n * R, K)
    out = np.empty((n * R, N), np.float64)
    for a in range(0, N, block):
        out[:, a : a + block] = limbs @ q[a : a + block].T.astype(np.float64)
    parts = out.astype(np.int64).reshape(n, R, N)  # exact: |each| < 2^53
    scale = np.array([1 << (b * k) for k in range(n)], np.int64)[:, None, None]
    return (parts * scale).sum(axis=0)  # wraps modulo 2^64
