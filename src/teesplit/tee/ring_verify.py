"""Freivalds checks of the private plans' masked products over Z_2^64 (TRUSTED side).

`teesplit generate --verify --plan private-otp|private-2party`. A ring step's reply holds, per
product, y = x_m Qᵀ mod 2^64 for the masked input x_m the runner sent (a one-time-padded input,
or one additive share) and the integer weights Q of teesplit/quant.py, which the runner derives
from its own checkpoint by the same rule as the server. Per site the runner draws K secret
vectors s (K, N) and keeps F = s Q mod 2^64 (K, in); a product is accepted when, for every row
and vector,

    y sᵀ  ==  x_m Fᵀ   (mod 2^64),

exactly: the ring arithmetic has no rounding, so there is no tolerance and no false alarm.
A step with two products (o_proj then gate|up, down_proj then the next q|k|v or the LM head)
is checked product by product: the first reply o against the input a sent, the second reply z
against s = x + mult ⊙ o, computed here from the x sent and the o received (which passed).

Why K vectors: an error e = y - x_m Qᵀ ≠ 0 passes one vector when e · s ≡ 0 (mod 2^64).
Take an entry e_j of the smallest 2-adic valuation v (e_j = 2^v u, u odd) and fix the other
entries of s: every other term is a multiple of 2^v, so passing needs s_j ≡ c (mod 2^(64-v))
for one residue c. With s_j uniform on [0, 2^b) that happens with probability at most
2^-min(b, 64-v) <= 1/2 (the worst case, v = 63: e a multiple of 2^63, e.g. bit 63 flipped).
The K vectors are independent, so a lie passes all with probability at most 2^-K (VECTORS = 32:
2^-32), and at most 2^-(bK) when v <= 64 - b. The entries are b = S_BITS = 8 bits wide, from
the operating system's CSPRNG: this keeps F = s Q an exact float64 product (one BLAS call
per site instead of a wrapping integer loop), and costs nothing in the worst-case bound.

The same bound holds for every error the server can choose, whatever it knows about the
inputs, because s is secret and independent of everything it sees. A replayed or reordered
reply is an error like any other (the pads are fresh, so an old reply is wrong for the new
input). Under private-2party each server's reply is checked against the share it was sent.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np

from teesplit import quant
from teesplit.config import ModelConfig
from teesplit.quant import LM_HEAD, SiteSpec
from teesplit.tee.checkpoint import IntegrityError
from teesplit.tee.verify import VerifyStats

__all__ = ["RingVerifier", "RingPrint", "VECTORS", "S_BITS", "IntegrityError"]

VECTORS = 32  # a lie passes all with probability <= 2^-VECTORS
S_BITS = 8  # each secret entry is uniform on [0, 2^S_BITS)
_EXACT = 2.0**53  # float64 sums of integers stay exact below this


def secret_vectors(k: int, n: int) -> np.ndarray:
    """(k, n) uniform on [0, 2^S_BITS) as uint8, from the operating system's CSPRNG."""
    return np.frombuffer(os.urandom(k * n), np.uint8).reshape(k, n).copy()


def ring_fingerprint(s: np.ndarray, wq: np.ndarray) -> np.ndarray:
    """F = s W_q mod 2^64 (K, in) int64 for s (K, N) with entries in [0, 2^S_BITS) and W_q (N, in)
    int64, exactly: float64 products while every sum stays below 2^53, else W_q is split into
    a low 16-bit and a high part and the two exact products are recombined in wrapping int64."""
    s64 = s.astype(np.float64)
    smax = float(s64.max(initial=0.0))
    col = np.abs(wq.astype(np.float64)).sum(axis=0).max(initial=0.0)  # max column abs-sum
    if smax * col < _EXACT:
        return (s64 @ wq.astype(np.float64)).astype(np.int64)
    lo, hi = wq & 0xFFFF, wq >> 16
    if (
        smax * 65535.0 * wq.shape[0] >= _EXACT
        or smax * np.abs(hi.astype(np.float64)).sum(axis=0).max() >= _EXACT
    ):
        return s.astype(np.int64) @ wq  # integer products wrap modulo 2^64: exact, slower
    t_lo = (s64 @ lo.astype(np.float64)).astype(np.int64)
    t_hi = (s64 @ hi.astype(np.float64)).astype(np.int64)
    return t_lo + np.left_shift(t_hi, 16)  # int64 arithmetic wraps modulo 2^64


_SHIFTS = np.array([0, 16, 32, 48], np.int64)


def ring_times_secret(y: np.ndarray, sT: np.ndarray) -> np.ndarray:
    """y sᵀ mod 2^64 (R, K) for ring elements y (R, N) int64 and sᵀ (N, K) float64 with entries in
    [0, 2^S_BITS): y is cut into four unsigned 16-bit limbs, stacked into one float64 product
    (exact: each sum stays below 2^16 2^S_BITS N < 2^53) and recombined in wrapping int64. About
    seven times faster than numpy's integer product on the LM head's 49,152 outputs."""
    R = y.shape[0]
    limbs = ((y[None] >> _SHIFTS[:, None, None]) & 0xFFFF).astype(np.float64).reshape(4 * R, -1)
    parts = (limbs @ sT).astype(np.int64).reshape(4, R, -1)
    return np.left_shift(parts, _SHIFTS[:, None, None]).sum(axis=0)  # int64 sums wrap modulo 2^64


class RingPrint:
    """One site's secret vectors sᵀ (N, K) (small integers, held as float64 for the check's
    product) and F = s W_q mod 2^64 (K, in) int64."""

    __slots__ = ("sT", "F")

    def __init__(self, s: np.ndarray, F: np.ndarray):
        if s.shape[1] * 65535.0 * 2**S_BITS >= _EXACT:
            raise ValueError(f"--verify: a site with {s.shape[1]} outputs is too wide for the exact check")
        self.sT = np.ascontiguousarray(s.T, dtype=np.float64)
        self.F = F

    @classmethod
    def of(cls, wq: np.ndarray, k: int) -> RingPrint:
        s = secret_vectors(k, wq.shape[0])
        return cls(s, ring_fingerprint(s, wq))

    @property
    def nbytes(self) -> int:
        return self.sT.nbytes + self.F.nbytes

    def failures(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(rows, K) bool: where y sᵀ ≠ x Fᵀ (mod 2^64); x (rows, in), y (rows, N) int64."""
        return ring_times_secret(y, self.sT) != x @ self.F.T  # integer products wrap modulo 2^64


def _where(op: str, spec: SiteSpec) -> str:
    site = "lm_head" if spec.site == LM_HEAD else f"{spec.site} of layer {spec.layer}"
    return f"{op} {site}"


class RingVerifier:
    """The private plans' fingerprints (one RingPrint per masked site) and their check. Shared
    by the clients of one run (both servers of private-2party); thread-safe. Built while the
    private plan quantizes (`add` sees each site's integers once), then `finish`ed with the
    sites' row multipliers."""

    def __init__(self, config: ModelConfig, vectors: int = VECTORS):
        if vectors < 1:
            raise ValueError("the ring check needs at least one secret vector")
        self.config = config
        self.n = vectors
        self.prints: dict[tuple[int, str], RingPrint] = {}
        self.mult: dict[tuple[int, str], np.ndarray] = {}  # residual sites' row multipliers
        self._lock = threading.Lock()
        self.stats = VerifyStats()
        self._t0 = time.perf_counter()

    def add(self, spec: SiteSpec, iw: quant.IntWeights) -> None:
        """Fingerprint one site from its integers (RingSites' on_site)."""
        key = (spec.layer, spec.site)
        self.prints[key] = RingPrint.of(iw.q.astype(np.int64), self.n)
        if iw.mult is not None:
            self.mult[key] = iw.mult

    def finish(self) -> None:
        self.stats.setup_s = time.perf_counter() - self._t0
        self.stats.fingerprint_bytes = sum(p.nbytes for p in self.prints.values())

    def _check(self, op: str, spec: SiteSpec, x: np.ndarray, y: np.ndarray, server: str | None) -> None:
        fp = self.prints.get((spec.layer, spec.site))
        if fp is None:
            raise ValueError(f"--verify: no fingerprint for {_where(op, spec)}")
        x2 = np.asarray(x, np.int64).reshape(-1, fp.F.shape[1])
        y2 = np.asarray(y, np.int64).reshape(-1, fp.sT.shape[0])
        if len(x2) != len(y2):
            raise IntegrityError(f"{_where(op, spec)}: {len(y2)} result rows for {len(x2)} input rows")
        bad = fp.failures(x2, y2)
        if bad.any():
            rows = np.flatnonzero(bad.any(axis=1))
            by = f"server {server}: " if server else ""
            raise IntegrityError(
                f"{_where(op, spec)}: the GPU server's result fails its Freivalds check over Z_2^64 "
                f"({by}y sᵀ ≠ x Fᵀ in {len(rows)} of {len(y2)} rows, first row {int(rows[0])}, "
                f"{int(bad[rows[0]].sum())} of {self.n} vectors); generation stopped"
            )

    def check_step(
        self, op: str, layer: int, sent: list[np.ndarray], got: list[np.ndarray], server: str | None = None
    ) -> None:
        """A ring step's replies `got` for the tensors `sent` (protocol.RING_OPS), or
        IntegrityError naming the operation, site and layer."""
        t0 = time.perf_counter()
        first, second = quant.step_sites(op, layer, self.config.num_layers)
        if first is None:
            self._check(op, second, sent[0], got[0], server)
        else:
            self._check(op, first, sent[0], got[0], server)
            mult = self.mult[(first.layer, first.site)]
            s = np.asarray(sent[1], np.int64) + np.asarray(got[0], np.int64) * mult  # wraps mod 2^64
            self._check(op, second, s, got[1], server)
        with self._lock:
            st = self.stats
            st.checks += 1
            st.check_s += time.perf_counter() - t0
            st.by_op[op] = st.by_op.get(op, 0) + 1
