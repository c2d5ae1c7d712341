"""The private plans' masked products on the server: int8 limb GEMMs over Z_2^64 (UNTRUSTED side).

The trusted side sends ring elements (int64, read modulo 2^64): fixed-point activations
masked by a one-time pad (private-otp) or one additive share of them (private-2party). The
server multiplies them by integer weights (teesplit/quant.py: the same integers the trusted
side derives) and returns ring elements without interpreting them.

Layout: each site keeps only its integers, as signed 8-bit limbs, one row per limb and output
((nl N, K) int8, the low limbs' rows first: nl = 2 limbs for int16 weights, 1 for int8), so 2
or 1 bytes per weight. A
product splits the R input rows into 8 signed 8-bit limbs each (quant.signed_limbs), stacks
them as 8R rows and makes one integer GEMM, int8 x int8 -> int32 (`torch._int_mm`; exact: a
sum of K <= 2^17 - 1 products of at most 2^14), then recombines the 8 nl partial products with
shifts modulo 2^64. During decode a GEMM is bound by reading its weights, so the 8 limb rows
cost about what one row costs.

- Padding: `torch._int_mm` on CUDA needs more than 16 rows and K and N multiples of 8, and on
  the CPU (torch 2.13) it returns garbage for K = 1 (found by tests/gpu/test_ring.py); so every
  weight is padded once to K and N nl multiples of 8 (zero rows and columns, which add
  nothing, and none at all for real models, whose widths are multiples of 8), an input's limbs
  are padded along K where needed, and on CUDA its limb rows to a multiple of 8 above 16. The
  weight is passed as the column-major view of its row-major (N nl, K) storage (the "TN"
  layout of int8 tensor-core GEMMs).
- CPU: `torch._int_mm` has a oneDNN kernel (VNNI where the CPU has it); a self-test on extreme
  limbs checks once per process that it is exact, and the server falls back to the float64
  limb products of quant.ring_matmul (numpy) on the int16/int8 weights where it is not.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from teesplit import quant
from teesplit.config import ModelConfig
from teesplit.quant import RING_LIMBS, IntWeights, SiteSpec


@functools.cache
def int_mm_is_exact() -> bool:
    """Whether torch._int_mm on the CPU gives the exact int32 product at the extremes (every
    limb -128 or 127, the longest K): an int8 kernel built on saturating 16-bit sums would not."""
    try:
        k = quant.MAX_K // 8 * 8  # the padded layout's widths are multiples of 8
        a = torch.full((8, k), -128, dtype=torch.int8)
        a[1::2] = 127
        b = torch.full((k, 8), -128, dtype=torch.int8)
        b[:, ::2] = 127
        got = torch._int_mm(a, b).to(torch.int64)
        want = a.to(torch.int64) @ b.to(torch.int64)
        return bool(torch.equal(got, want))
    except (RuntimeError, AttributeError):  # no kernel for this build or device
        return False


def _round8(n: int) -> int:
    return -(-n // 8) * 8


class LimbWeights:
    """One site's integer weights as the device multiplies them, and their products with ring
    elements. `mult` (residual sites): the row multipliers m_j applied before the residual add."""

    def __init__(self, iw: IntWeights, device: torch.device, exact_int_mm: bool):
        self.device = device
        self.n_out, self.k = iw.q.shape
        self.nl = 1 if iw.q.dtype == np.int8 else 2
        self.mult = None if iw.mult is None else iw.mult.astype(np.int8)  # m <= RESIDUAL_STEPS + 1
        self._mult_t = None
        self.int_mm = device.type == "cuda" or exact_int_mm
        if not self.int_mm:  # the numpy fallback keeps the compact integers themselves
            self.q = np.ascontiguousarray(iw.q)
            self.w = None
            self.nbytes = self.q.nbytes
        else:
            limbs = quant.weight_limbs(iw.q).reshape(self.nl * self.n_out, self.k)  # (nl N, K)
            rows, cols = _round8(limbs.shape[0]), _round8(self.k)
            if (rows, cols) != limbs.shape:
                padded = np.zeros((rows, cols), np.int8)
                padded[: limbs.shape[0], : self.k] = limbs
                limbs = padded
            self.w = torch.from_numpy(np.ascontiguousarray(limbs)).to(device)  # (N nl, K), row-major
            self.q = None
            self.nbytes = self.w.numel()  # padding counted: it is resident
        if self.mult is not None:
            self.nbytes += self.mult.nbytes
            if device.type == "cuda":
                self._mult_t = torch.from_numpy(iw.mult.astype(np.int64)).to(device)

    @property
    def weights(self) -> int:
        return self.n_out * self.k

    # ---- CPU: numpy in, numpy out ---------------------------------------------------------
    def matmul_np(self, x: np.ndarray) -> np.ndarray:
        """x (R, K) int64 -> x qᵀ mod 2^64, (R, N) int64."""
        if self.q is not None:
            return quant.ring_matmul(x, self.q)
        R, cols = x.shape[0], self.w.shape[1]
        d = quant.signed_limbs(x)  # (8, R, K)
        if cols == self.k:
            limbs = np.ascontiguousarray(d).reshape(RING_LIMBS * R, cols)  # (8R, K)
        else:
            limbs = np.zeros((RING_LIMBS * R, cols), np.int8)
            limbs[:, : self.k] = d.reshape(RING_LIMBS * R, self.k)
        p = torch._int_mm(torch.from_numpy(limbs), self.w.t()).numpy()  # (8R, nl N [+ pad]) int32
        p = p[:, : self.nl * self.n_out]
        return quant.recombine(p.reshape(RING_LIMBS, R, self.nl, self.n_out))

    def times_mult_np(self, o: np.ndarray) -> np.ndarray:
        return o * self.mult  # (R, N) int64 times int8 multipliers: int64, wrapping

    # ---- CUDA: device tensors --------------------------------------------------------------
    def matmul_t(self, x: torch.Tensor) -> torch.Tensor:
        """x (R, K) int64 on the device -> x qᵀ mod 2^64 (R, N) int64 on the device."""
        R = x.shape[0]
        offset = torch.tensor(int(quant._OFFSET), dtype=torch.int64, device=x.device)
        # The bytes of x + 0x80..80, each minus 128 (see quant.signed_limbs); little-endian.
        b = torch.bitwise_xor((x + offset).contiguous().view(torch.uint8), 0x80).view(torch.int8)
        limbs = b.view(R, self.k, RING_LIMBS).permute(2, 0, 1)  # (8, R, K)
        rows, cols = max(24, _round8(RING_LIMBS * R)), self.w.shape[1]
        a = torch.zeros((rows, cols), dtype=torch.int8, device=x.device)  # padding adds nothing
        a[: RING_LIMBS * R, : self.k] = limbs.reshape(RING_LIMBS * R, self.k)
        p = torch._int_mm(a, self.w.t())[: RING_LIMBS * R, : self.nl * self.n_out]
        t = p.reshape(RING_LIMBS, R, self.nl, self.n_out).to(torch.int64)
        t = t[:, :, 0] + t[:, :, 1] * 256 if self.nl == 2 else t[:, :, 0]
        scale = torch.tensor([1 << (8 * k) for k in range(RING_LIMBS)], dtype=torch.int64, device=x.device)
        return (t * scale.view(RING_LIMBS, 1, 1)).sum(dim=0)  # int64 arithmetic wraps modulo 2^64

    def times_mult_t(self, o: torch.Tensor) -> torch.Tensor:
        if self._mult_t is None:  # made on first use where the torch path runs off CUDA (tests)
            self._mult_t = torch.from_numpy(self.mult.astype(np.int64)).to(o.device)
        return o * self._mult_t


class RingModel:
    """Every private site's integer weights for one weight format, and the merged steps:
    first product (o_proj or down_proj), residual add with the row multipliers, the next
    product (gate|up, the next layer's q|k|v, or the LM head)."""

    def __init__(
        self,
        config: ModelConfig,
        sites: dict[tuple[int, str], LimbWeights],
        bits: int,
        source: str,
        device: torch.device,
    ):
        self.config, self.sites, self.bits, self.source, self.device = config, sites, bits, source, device
        # CPU: numpy in and out around torch._int_mm (short request path); elsewhere device
        # tensors throughout (tests set False on the CPU to run the CUDA path's code)
        self.numpy_path = device.type == "cpu"

    @classmethod
    def build(cls, weights, bits: int, source: str, device: torch.device, whole_rows=None) -> RingModel:
        """Quantize every site of `weights` (gpu/weights.py) by quant's rule. `whole_rows`: a
        tensor-parallel rank's hook to the whole rows' maxima (quant.quantize_model)."""
        c = weights.config
        norms = weights.norm_stack().numpy()
        exact = device.type == "cuda" or int_mm_is_exact()

        def rows_of(layer: int, site: str):
            w = _site_weight(weights, layer, site)
            return lambda a, b: w[a:b].float().cpu().numpy()

        sites = {}
        for spec, iw in quant.quantize_model(c, rows_of, norms, bits, source, whole_rows=whole_rows):
            sites[(spec.layer, spec.site)] = LimbWeights(iw, device, exact)
        return cls(c, sites, bits, source, device)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.sites.values())

    @property
    def bytes_per_weight(self) -> float:
        return self.nbytes / sum(s.weights for s in self.sites.values())

    @property
    def layout(self) -> str:
        s = next(iter(self.sites.values()))
        if not s.int_mm:
            return f"int{self.bits} integers, float64 limb products (numpy; torch._int_mm is not exact here)"
        return f"int8 limbs ({s.nl} per weight), torch._int_mm on {self.device.type}"

    def step(self, first: SiteSpec | None, second: SiteSpec, a: np.ndarray | None, x: np.ndarray, total=None):
        """o = a q_firstᵀ (if first), s = x + m ⊙ o, z = s q_secondᵀ, all mod 2^64; a, x (R, ·)
        int64 numpy. Returns (o, z) or z, numpy int64. `total` (tensor parallelism): the sum
        over the ranks of each one's part of o (numpy or a device tensor, as given)."""
        p = None if first is None else self.sites[(first.layer, first.site)]
        n = self.sites[(second.layer, second.site)]
        if self.numpy_path:
            o = None if p is None else p.matmul_np(a)
            if o is not None and total is not None:
                o = total(o)
            s = x if o is None else x + p.times_mult_np(o)  # int64 arithmetic wraps modulo 2^64
            z = n.matmul_np(s)
            return z if o is None else (o, z)
        # copies: wire frames are read-only, and torch warns about views of them
        xt = torch.from_numpy(x.copy()).to(self.device)
        o = None if p is None else p.matmul_t(torch.from_numpy(a.copy()).to(self.device))
        if o is not None and total is not None:
            o = total(o)
        s = xt if o is None else xt + p.times_mult_t(o)
        z = n.matmul_t(s).cpu().numpy()
        return z if o is None else (o.cpu().numpy(), z)


def _site_weight(weights, layer: int, site: str) -> torch.Tensor:
    if site == quant.LM_HEAD:
        return weights.lm_head
    lw = weights.layers[layer]
    return {"qkv": lw.qkv_weight, "o": lw.weight["o_proj"], "gate_up": lw.gate_up_weight}.get(
        site, lw.weight["down_proj"]
    )
