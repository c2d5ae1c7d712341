"""Freivalds checks of every GPU result, and the client that applies them (TRUSTED side).

`teesplit generate --verify`. Per process the runner draws secret Gaussian vectors and, from
its own copy of the checkpoint (tee/checkpoint.py), computes fingerprints of every weight the
GPU uses: for a Linear y = W x + b with W (N, K), R (n, N) secret and F = R W (n, K), c = R b
(each vector is cut into blocks of BLOCK outputs with their own fingerprint, see LinearPrint,
so R_i below stands for one vector on one block). A returned y is accepted when, for every
row and every vector,

    |R_i · y - (F_i · x + c_i)|  <=  tol_i = λ u (ρ_i ‖x‖ + ‖R_i ⊙ y‖),   ρ_i² = Σ_n R_in² ‖W_n‖²

u = 2⁻²⁴ is float32's unit roundoff, the only honest error left once the server computes in
float32 (the runner asks for `f32` results: the server upcasts its compute-dtype weights
exactly and returns float32, so a bfloat16 server's honest result differs from the exact
product of the same bfloat16-valued weights only by float32 accumulation). ρ_i ‖x‖ bounds the
spread of R_i · e for per-output accumulation errors e_n of size ≲ u ‖W_n‖ ‖x‖ (blocked and
pairwise sums, as BLAS and GPU GEMMs use, stay well inside that) that are independent across
outputs; ‖R_i ⊙ y‖ covers the rounding of the output and the bias add. λ (LAMBDA) is about
ten times the largest ratio measured on honest results (tests/test_verify_stats.py).

A lie δ passes one vector with probability P(|R_i · δ| < tol_i) ≈ 0.8 tol_i / ‖δ‖ (Gaussian R:
the same for every direction of δ, so a liar cannot aim at a blind spot), and all n with the
n-th power of that.

Which results are checked, and how:
- Linear, q|k|v, gate|up, the LM head: as above (fused results with the stacked fingerprints).
  Top-k requests become full-logit requests, checked, then reduced here.
- Embedding rows: against fingerprints of the table (T = W_emb Sᵀ, one row per token id):
  exact values are expected, so the tolerance is float64 rounding only.
- Matmul (plan v3: both operands come from here): Freivalds with fresh secret s per call,
  C sᵀ against A (B sᵀ): O(size of the operands the trusted side sends anyway).
- v3-fused, the GPU-side K/V cache: per session secret weights ρ_ij per position; the runner
  keeps K̃_i = Σ_j ρ_ij k_j per layer, row and KV head (updated with each new key it sends), and
  checks Σ_j ρ_ij s_j = q · K̃_i: O(context + head_dim) per head. For PV fused with o_proj,
  R_i · (o - b_o) = Σ_h Σ_j p_hj g_ihj with g_ihj = (W_oᵀ R_i)_h · v_j: under f32 the session's
  QKV call returns v too, checked with q|k against the q|k|v fingerprint, and g is kept per
  position, so the check is O(heads x context). (Folding W_v instead, u_ih = W_v,hᵀ (W_oᵀ R_i)_h
  against the QKV input x_j, gives the same value without v on the wire, but leaves v's own
  rounding and its norm unknown, and the tolerance tens of times looser: a 1e-3 change of the
  largest output then went unnoticed about once in a hundred.)

A failed check raises IntegrityError naming the operation and the layer; the generation
stops before the result is used, so no token computed from it is ever emitted.
"""

from __future__ import annotations

import functools
import secrets
import time
from dataclasses import dataclass, field

import numpy as np

from teesplit.tee.checkpoint import COMPUTE_DTYPES, IntegrityError, TrustedCheckpoint
from teesplit.tee.client import GPUClient, InitResult

__all__ = [
    "IntegrityError",
    "Verifier",
    "CheckedClient",
    "VERIFIED_PLANS",
    "RING_VERIFIED_PLANS",
    "LAMBDA",
    "VECTORS",
]

U32 = 2.0**-24  # float32 unit roundoff
# Tolerance factors over the error models, about 10x the largest ratio |difference| / (model)
# measured on honest float32 and bfloat16-weight results of SmolLM2 (tests/test_verify_stats.py):
# Linear-type and AttnOut checks up to 1.6, AttnScores and Matmul (short dot products) up to 4.
LAMBDA = {"linear": 16.0, "attn_out": 16.0, "attn_scores": 32.0, "matmul": 32.0}
VECTORS = 8  # secret vectors per weight: a lie passes all with (0.8 tol / ‖δ‖)^8
BLOCK = 512  # outputs per fingerprint block (LinearPrint); memory ∝ VECTORS / BLOCK
VERIFIED_PLANS = ("v3", "v2", "v3-fused", "v2-fused")
RING_VERIFIED_PLANS = ("private-otp", "private-2party")  # exact checks over Z_2^64: tee/ring_verify.py
LAYER_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LinearPrint:
    """Fingerprint of y = W x + b, W (N, K), per block of BLOCK outputs: vector m = (i, b) is the
    i-th secret Gaussian vector restricted to output block b (its other entries are zero), so
    the float32 noise a check must tolerate grows with the block, not with N, while a lie in
    any output still meets n independent vectors. float64 throughout.

    Rb (n, nb, BLOCK) the vectors' values; idx (nb, BLOCK) their outputs (N: padding);
    F (n * nb, K) = R' W; c (n * nb,) = R' b; rho (n * nb,) ρ² = Σ R'² ‖W_row‖²."""

    Rb: np.ndarray
    idx: np.ndarray
    F: np.ndarray
    c: np.ndarray
    rho: np.ndarray
    N: int

    @classmethod
    def of(
        cls, W: np.ndarray, b: np.ndarray | None, rng: np.random.Generator, n: int, block: int = BLOCK
    ) -> LinearPrint:
        N, K = W.shape
        nb = -(-N // block)
        idx = np.arange(nb * block)
        idx[idx >= N] = N
        idx = idx.reshape(nb, block)
        Rb = rng.standard_normal((n, nb, block))
        Rb[:, idx == N] = 0.0
        W64 = np.concatenate([W.astype(np.float64), np.zeros((1, K))])  # row N: padding
        Wb = W64[idx]  # (nb, BLOCK, K)
        F = np.einsum("ibk,bke->ibe", Rb, Wb).reshape(n * nb, K)
        row2 = np.einsum("nk,nk->n", W64, W64)[idx]  # (nb, BLOCK)
        rho = np.sqrt(np.einsum("ibk,bk->ib", Rb * Rb, row2)).reshape(-1)
        b64 = np.zeros(N + 1) if b is None else np.append(b.astype(np.float64), 0.0)
        c = np.einsum("ibk,bk->ib", Rb, b64[idx]).reshape(-1)
        return cls(Rb, idx, F, c, rho, N)

    @classmethod
    def stack(cls, parts: list[LinearPrint]) -> LinearPrint:
        """The fingerprint of the outputs of `parts` concatenated (same input)."""
        offsets = np.cumsum([0] + [p.N for p in parts])
        N = int(offsets[-1])
        idx = np.concatenate(
            [np.where(p.idx == p.N, N, p.idx + o) for p, o in zip(parts, offsets, strict=False)]
        )
        n = parts[0].Rb.shape[0]

        def by_vector(a: np.ndarray, p: LinearPrint) -> np.ndarray:
            return a.reshape(n, p.Rb.shape[1], *a.shape[1:])

        F = np.concatenate([by_vector(p.F, p) for p in parts], axis=1).reshape(-1, parts[0].F.shape[1])
        c = np.concatenate([by_vector(p.c, p) for p in parts], axis=1).reshape(-1)
        rho = np.concatenate([by_vector(p.rho, p) for p in parts], axis=1).reshape(-1)
        return cls(np.concatenate([p.Rb for p in parts], axis=1), idx, F, c, rho, N)

    @functools.cached_property
    def _RbT(self) -> np.ndarray:
        return np.ascontiguousarray(self.Rb.transpose(1, 2, 0))  # (nb, BLOCK, n)

    @functools.cached_property
    def _Rb2T(self) -> np.ndarray:
        return np.ascontiguousarray((self.Rb * self.Rb).transpose(1, 2, 0))

    def _blocks(self, y2: np.ndarray) -> np.ndarray:
        """Rows y2 (M, N) -> (nb, M, BLOCK), padded with zeros."""
        if self.idx.size == self.N:  # N a multiple of BLOCK: a view, no gather
            return y2.reshape(y2.shape[0], -1, self.idx.shape[1]).transpose(1, 0, 2)
        return np.concatenate([y2, np.zeros((y2.shape[0], 1))], axis=1)[:, self.idx].transpose(1, 0, 2)

    def ry(self, y2: np.ndarray, yb: np.ndarray | None = None) -> np.ndarray:
        """R' y for rows y2 (M, N) -> (M, n * nb), as one batched product per block."""
        yb = self._blocks(y2) if yb is None else yb
        out = np.matmul(yb, self._RbT)  # (nb, M, n)
        return out.transpose(1, 2, 0).reshape(y2.shape[0], -1)

    def ry_abs(self, y2: np.ndarray, yb: np.ndarray | None = None) -> np.ndarray:
        """‖R' ⊙ y‖ per row and vector: (M, n * nb)."""
        yb = self._blocks(y2) if yb is None else yb
        out = np.matmul(yb * yb, self._Rb2T)
        return np.sqrt(out.transpose(1, 2, 0).reshape(y2.shape[0], -1))

    @property
    def nbytes(self) -> int:
        # Rb three times: as drawn, and transposed (and squared) for the checks
        return 3 * self.Rb.nbytes + self.idx.nbytes + self.F.nbytes + self.c.nbytes + self.rho.nbytes


def _fail(op: str, layer: int | None, what: str, diff: np.ndarray, tol: np.ndarray) -> IntegrityError:
    where = f"{op}" + (f" of layer {layer}" if layer is not None else "")
    bad = ~(np.abs(diff) <= tol)  # NaN counts as bad
    idx = int(np.argmax(bad.reshape(-1)))
    d, t = float(np.abs(diff).reshape(-1)[idx]), float(tol.reshape(-1)[idx])
    return IntegrityError(
        f"{where}: the GPU server's result fails its Freivalds check ({what}: |difference| {d:.3g} > "
        f"tolerance {t:.3g} in {int(bad.sum())} of {bad.size} checks); generation stopped"
    )


def _require(ok: np.ndarray, op: str, layer: int | None, what: str, diff, tol) -> None:
    if not bool(np.all(ok)):
        raise _fail(op, layer, what, np.asarray(diff), np.asarray(tol))


def check_linear(fp: LinearPrint, x: np.ndarray, y: np.ndarray, op: str, layer: int | None = None) -> None:
    """y (..., N) against x (..., K) through the fingerprint of y = W x + b."""
    K, N = fp.F.shape[1], fp.N
    x2 = x.reshape(-1, K).astype(np.float64)
    y2 = y.reshape(-1, N).astype(np.float64)
    if not np.isfinite(y2).all():
        raise IntegrityError(f"{op}" + (f" of layer {layer}" if layer is not None else "") + ": NaN or Inf")
    yb = fp._blocks(y2)
    lhs = fp.ry(y2, yb)  # (M, vectors)
    rhs = x2 @ fp.F.T + fp.c
    xn = np.sqrt(np.einsum("mk,mk->m", x2, x2))[:, None]
    tol = LAMBDA["linear"] * U32 * (xn * fp.rho + fp.ry_abs(y2, yb))
    diff = lhs - rhs
    _require(np.abs(diff) <= tol, op, layer, "rᵀy against (rᵀW)x", diff, tol)


def check_embedding(table_print: np.ndarray, S: np.ndarray, ids: np.ndarray, x: np.ndarray, op: str) -> None:
    """Rows x (..., E) against the table's fingerprint T = W_emb Sᵀ (V, n) at ids."""
    x2 = x.reshape(-1, S.shape[1]).astype(np.float64)
    if not np.isfinite(x2).all():
        raise IntegrityError(f"{op}: NaN or Inf")
    lhs = x2 @ S.T
    rhs = table_print[ids.reshape(-1)]
    tol = 1e-12 * (np.abs(x2) @ np.abs(S).T) + 1e-300  # exact rows: float64 rounding only
    diff = lhs - rhs
    _require(np.abs(diff) <= tol, op, None, "embedding rows against the table's fingerprint", diff, tol)


def check_matmul(
    a: np.ndarray, b: np.ndarray, c: np.ndarray, rng: np.random.Generator, n: int, op: str, layer: int | None
) -> None:
    """C = A B (..., M, N), both operands from here: C sᵀ against A (B sᵀ), fresh secret s."""
    if not np.isfinite(c).all():
        raise IntegrityError(f"{op} of layer {layer}: NaN or Inf")
    a, b, c = (t.astype(np.float64) for t in (a, b, c))
    s = rng.standard_normal((c.shape[-1], n))  # (N, n)
    lhs = c @ s  # (..., M, n)
    rhs = a @ (b @ s)
    col2 = np.einsum("...kn,...kn->...n", b, b)  # (..., N)
    an = np.sqrt(np.einsum("...mk,...mk->...m", a, a))[..., None]  # (..., M, 1)
    tol = LAMBDA["matmul"] * U32 * (an * np.sqrt(col2 @ (s * s))[..., None, :] + np.sqrt((c * c) @ (s * s)))
    diff = lhs - rhs
    _require(np.abs(diff) <= tol, op, layer, "C s against A (B s)", diff, tol)


@dataclass
class LayerPrints:
    linear: dict[str, LinearPrint]  # q_proj ... down_proj
    qkv: LinearPrint
    gate_up: LinearPrint
    Fo: np.ndarray  # (m, H, D): (W_oᵀ R'_m)_h, o_proj's fingerprint per head, for the PV check
    Fo_norm: np.ndarray  # (m, H): ‖(W_oᵀ R'_m)_h‖, for its tolerance

    @property
    def nbytes(self) -> int:
        fps = [*self.linear.values(), self.qkv, self.gate_up]
        return sum(p.nbytes for p in fps) + self.Fo.nbytes + self.Fo_norm.nbytes


@dataclass
class KeyState:
    """Running key fingerprints of one layer of a GPU session: committed positions (never
    rewritten) and the last write (rewritten in part when a ragged batch's padding is replaced)."""

    C: np.ndarray  # (n, B, Hkv, D): Σ_j ρ_ij k_j over committed positions
    C2: np.ndarray  # (n, B, Hkv): Σ_j ρ_ij² ‖k_j‖²
    commit: np.ndarray  # (B,)
    last_pos: np.ndarray | None = None
    last_k: np.ndarray | None = None  # (B, Hkv, T, D)


@dataclass
class ValueState:
    """Per layer of a GPU session, for every cached position j: g_mhj = (W_oᵀ R'_m)_h · v_j and
    ‖v_j‖ per KV head, from the v the QKV call returned (and its check accepted)."""

    G: np.ndarray  # (m, B, H, capacity)
    X: np.ndarray  # (B, Hkv, capacity): ‖v_j‖

    def reserve(self, end: int) -> None:
        cap = self.G.shape[-1]
        if end > cap:
            grow = max(end, 2 * cap)
            self.G = np.pad(self.G, ((0, 0), (0, 0), (0, 0), (0, grow - cap)))
            self.X = np.pad(self.X, ((0, 0), (0, 0), (0, grow - cap)))


@dataclass
class SessionState:
    rho: np.ndarray  # (n, max_tokens) secret position weights
    keys: list[KeyState]
    values: list[ValueState]


@dataclass
class VerifyStats:
    setup_s: float = 0.0
    fingerprint_bytes: int = 0
    checks: int = 0
    check_s: float = 0.0
    by_op: dict[str, int] = field(default_factory=dict)


class Verifier:
    """Fingerprints of one checkpoint at one compute dtype, and the checks that use them."""

    def __init__(
        self,
        checkpoint: TrustedCheckpoint,
        dtype: str = "float32",
        vectors: int = VECTORS,
        seed: int | None = None,
        progress=None,
    ):
        t0 = time.perf_counter()
        self.config = c = checkpoint.config
        self.dtype = COMPUTE_DTYPES[dtype]
        self.n = vectors
        # Secret: from the OS unless a test fixes it.
        self.rng = np.random.default_rng(secrets.randbits(128) if seed is None else seed)
        self.layers: list[LayerPrints] = []
        for i in range(c.num_layers):
            if progress is not None:
                progress(i, c.num_layers)
            self.layers.append(self._layer_prints(checkpoint, i))
        emb = checkpoint.embed(self.dtype)  # (V, E)
        self.emb_S = self.rng.standard_normal((self.n, c.hidden_size))
        self.emb_print = emb.astype(np.float64) @ self.emb_S.T  # (V, n)
        del emb
        self.lm_head = LinearPrint.of(checkpoint.lm_head(self.dtype), None, self.rng, self.n)
        self.stats = VerifyStats()
        self.stats.setup_s = time.perf_counter() - t0
        self.stats.fingerprint_bytes = (
            sum(lp.nbytes for lp in self.layers)
            + self.emb_print.nbytes
            + self.emb_S.nbytes
            + self.lm_head.nbytes
        )

    def _layer_prints(self, ck: TrustedCheckpoint, i: int) -> LayerPrints:
        c, n = self.config, self.n
        H, D = c.num_heads, c.head_dim
        lin = {}
        for module in LAYER_MODULES:
            W, b = ck.linear(i, module, self.dtype)
            lin[module] = LinearPrint.of(W, b, self.rng, n)
        m = lin["o_proj"].F.shape[0]  # o_proj's vectors (n per output block)
        Fo = lin["o_proj"].F.reshape(m, H, D)  # (W_oᵀ R'_m)_h
        return LayerPrints(
            linear=lin,
            qkv=LinearPrint.stack([lin["q_proj"], lin["k_proj"], lin["v_proj"]]),
            gate_up=LinearPrint.stack([lin["gate_proj"], lin["up_proj"]]),
            Fo=Fo,
            Fo_norm=np.sqrt(np.einsum("mhd,mhd->mh", Fo, Fo)),
        )

    def _count(self, op: str, t0: float) -> None:
        s = self.stats
        s.checks += 1
        s.check_s += time.perf_counter() - t0
        s.by_op[op] = s.by_op.get(op, 0) + 1

    # ---- the checks ------------------------------------------------------------------------
    def linear(self, layer: int, module: str, x: np.ndarray, y: np.ndarray) -> None:
        t0 = time.perf_counter()
        fp = self.layers[layer].linear[module]
        check_linear(fp, x, y, f"Linear {module}", layer)
        self._count("Linear", t0)

    def fused(self, layer: int, name: str, x: np.ndarray, y: np.ndarray) -> None:
        """name: qkv or gate_up."""
        t0 = time.perf_counter()
        op = {"qkv": "QKV", "gate_up": "GateUp"}[name]
        check_linear(getattr(self.layers[layer], name), x, y, op, layer)
        self._count(op, t0)

    def lm_head_logits(self, x: np.ndarray, y: np.ndarray) -> None:
        t0 = time.perf_counter()
        check_linear(self.lm_head, x, y, "LMHead")
        self._count("LMHead", t0)

    def embedding(self, ids: np.ndarray, x: np.ndarray) -> None:
        t0 = time.perf_counter()
        check_embedding(self.emb_print, self.emb_S, ids, x, "Embedding")
        self._count("Embedding", t0)

    def matmul(self, a: np.ndarray, b: np.ndarray, c: np.ndarray, what: str, layer: int | None) -> None:
        t0 = time.perf_counter()
        check_matmul(a, b, c, self.rng, self.n, f"Matmul ({what})", layer)
        self._count("Matmul", t0)

    # ---- the GPU-side K/V cache (v3-fused) ------------------------------------------------
    def open_session(self, batch: int, max_tokens: int) -> SessionState:
        c, n = self.config, self.n
        rho = self.rng.standard_normal((n, max_tokens))
        keys = [
            KeyState(
                np.zeros((n, batch, c.num_kv_heads, c.head_dim)),
                np.zeros((n, batch, c.num_kv_heads)),
                np.zeros(batch, np.int64),
            )
            for _ in range(c.num_layers)
        ]
        m = self.layers[0].Fo.shape[0]  # o_proj's vectors: n per output block
        values = [
            ValueState(np.zeros((m, batch, c.num_heads, 64)), np.zeros((batch, c.num_kv_heads, 64)))
            for _ in range(c.num_layers)
        ]
        return SessionState(rho, keys, values)

    def session_values(self, s: SessionState, layer: int, v: np.ndarray, pos: np.ndarray) -> None:
        """The checked v (B, T, Hkv, D) a session's QKV wrote at pos: keep g and ‖v‖ per position."""
        lp, vs, c = self.layers[layer], s.values[layer], self.config
        B, T = v.shape[:2]
        vs.reserve(int(pos.max()) + T)
        v64 = v.astype(np.float64)
        kv_of = np.arange(c.num_heads) // (c.num_heads // c.num_kv_heads)
        g = np.einsum("mhd,bthd->mbht", lp.Fo, v64[:, :, kv_of])  # (m, B, H, T)
        vn = np.sqrt(np.einsum("btgd,btgd->bgt", v64, v64))  # (B, Hkv, T)
        for b in range(B):
            vs.G[:, b, :, pos[b] : pos[b] + T] = g[:, b]
            vs.X[b, :, pos[b] : pos[b] + T] = vn[b]

    def _update_keys(self, s: SessionState, layer: int, k: np.ndarray, pos: np.ndarray) -> None:
        ks = s.keys[layer]
        B = k.shape[0]
        for b in range(B):
            p = int(pos[b])
            if p < ks.commit[b]:
                if p != 0:
                    raise ValueError(f"verify: layer {layer} row {b} rewrites committed position {p}")
                ks.C[:, b] = 0.0
                ks.C2[:, b] = 0.0
                ks.commit[b] = 0
                continue
            if ks.last_k is None:
                continue
            start, Tl = int(ks.last_pos[b]), ks.last_k.shape[2]
            if p > start + Tl:
                raise ValueError(f"verify: layer {layer} row {b} leaves a gap before position {p}")
            end = min(p, start + Tl)
            if end > start:
                kk = ks.last_k[b, :, : end - start]  # (Hkv, T', D)
                r = s.rho[:, start:end]  # (n, T')
                ks.C[:, b] += np.einsum("ij,hjd->ihd", r, kk)
                ks.C2[:, b] += np.einsum("ij,hj->ih", r * r, np.einsum("hjd,hjd->hj", kk, kk))
            ks.commit[b] = p
        ks.last_pos, ks.last_k = pos.copy(), k.astype(np.float64)

    def attn_scores(
        self, s: SessionState, layer: int, q: np.ndarray, k: np.ndarray, pos: np.ndarray, scores: np.ndarray
    ) -> None:
        """q (B, H, T, D) and the new keys k (B, Hkv, T, D) at pos; scores (B, H, T, S) over the
        GPU's cache. Positions j >= pos_b + T of row b are hidden from every query of that row
        by the causal mask and are not checked; every value must still be finite."""
        t0 = time.perf_counter()
        if not np.isfinite(scores).all():
            raise IntegrityError(f"AttnScores of layer {layer}: NaN or Inf")
        self._update_keys(s, layer, k, pos)
        ks, c = s.keys[layer], self.config
        B, H, T, S = scores.shape
        G = H // c.num_kv_heads
        q64, sc = q.astype(np.float64), scores.astype(np.float64)
        k64 = k.astype(np.float64)
        diffs, tols = [], []
        for b in range(B):
            p = int(pos[b])
            end = p + T
            r = s.rho[:, :end]  # (n, end)
            Kt = ks.C[:, b] + np.einsum("it,htd->ihd", s.rho[:, p:end], k64[b])  # (n, Hkv, D)
            K2 = ks.C2[:, b] + np.einsum(
                "it,ht->ih", s.rho[:, p:end] ** 2, np.einsum("htd,htd->ht", k64[b], k64[b])
            )
            lhs = np.einsum("ij,htj->iht", r, sc[b, :, :, :end])  # (n, H, T)
            Kh, K2h = np.repeat(Kt, G, axis=1), np.repeat(K2, G, axis=1)  # per query head
            rhs = np.einsum("htd,ihd->iht", q64[b], Kh)
            qn = np.sqrt(np.einsum("htd,htd->ht", q64[b], q64[b]))
            tol = (
                LAMBDA["attn_scores"]
                * U32
                * (
                    qn[None] * np.sqrt(K2h)[:, :, None]
                    + np.sqrt(np.einsum("ij,htj->iht", r * r, sc[b, :, :, :end] ** 2))
                )
            )
            diffs.append(lhs - rhs)
            tols.append(tol)
        diff, tol = np.stack(diffs), np.stack(tols)
        _require(np.abs(diff) <= tol, "AttnScores", layer, "Σ_j ρ_j s_j against q · Σ_j ρ_j k_j", diff, tol)
        self._count("AttnScores", t0)

    def attn_out(self, s: SessionState, layer: int, p: np.ndarray, o: np.ndarray) -> None:
        """p (B, H, T, S) sent; o = o_proj(P V) (B, T, E) returned, V on the GPU."""
        t0 = time.perf_counter()
        lp, vs, c = self.layers[layer], s.values[layer], self.config
        fo = lp.linear["o_proj"]
        if not np.isfinite(o).all():
            raise IntegrityError(f"AttnOut of layer {layer}: NaN or Inf")
        B, H, T, S = p.shape
        p64, o64 = p.astype(np.float64), o.astype(np.float64)
        vs.reserve(S)
        lhs = fo.ry(o64.reshape(B * T, -1)).T.reshape(-1, B, T) - fo.c[:, None, None]
        rhs = np.einsum("bhtj,ibhj->ibt", p64, vs.G[..., :S])
        # Tolerance: PV's and o_proj's float32 accumulation, and the output's rounding; with
        # A_bht = Σ_j p_bhtj ‖v_j‖ >= ‖a_bht‖, the attention output's norm per head.
        kv_of = np.arange(H) // (H // c.num_kv_heads)
        A = np.einsum("bhtj,bhj->bht", p64, vs.X[:, kv_of, :S])
        a_norm = np.sqrt(np.einsum("bht,bht->bt", A, A))
        t_o = fo.rho[:, None, None] * a_norm[None]
        t_pv = np.sqrt(np.einsum("mh,bht->mbt", lp.Fo_norm**2, A * A))
        t_y = fo.ry_abs(o64.reshape(B * T, -1)).T.reshape(-1, B, T)
        tol = LAMBDA["attn_out"] * U32 * (t_o + t_pv + t_y)
        diff = lhs - rhs
        _require(np.abs(diff) <= tol, "AttnOut", layer, "rᵀo against Σ_h Σ_j p_hj g_hj", diff, tol)
        self._count("AttnOut", t0)


class CheckedClient(GPUClient):
    """A GPUClient that takes the norm weights and RoPE parameters from the runner's own
    checkpoint (refusing an Init that differs) and, with `verify`, checks every result.

    Every check sits between the reply and its use, so a failed one stops the generation
    before anything computed from the result is sampled."""

    def __init__(
        self,
        transport,
        wire_dtype: str = "float32",
        retries: int = 0,
        *,
        checkpoint: TrustedCheckpoint,
        verify: bool = False,
        vectors: int = VECTORS,
        seed: int | None = None,
        progress=None,
    ):
        if verify and wire_dtype != "float32":
            raise ValueError(f"--verify needs float32 on the wire (got --wire-dtype {wire_dtype})")
        super().__init__(transport, wire_dtype, retries)
        self.checkpoint = checkpoint
        self.verify = verify
        self.f32_results = verify
        self._vectors, self._seed, self._progress = vectors, seed, progress
        self.verifier: Verifier | None = None
        self._sessions: dict[int, SessionState] = {}
        self._layer: int | None = None  # the layer of the last Linear, to name a Matmul's layer
        self._matmuls = 0
        self.ring_verifier = None  # the private plans' exact check (tee/ring_verify.py), set by them

    def init(self) -> InitResult:
        res = super().init()
        ck = self.checkpoint
        ck.check_init(res.config, res.norms, res.biases, res.dtype)
        if self.verify and self.verifier is None:
            self.verifier = Verifier(ck, res.dtype, self._vectors, self._seed, self._progress)
        # From here on the model runs on the runner's own values (equal, as just checked).
        return InitResult(ck.config, ck.norms(), ck.biases(COMPUTE_DTYPES[res.dtype]), res.dtype)

    # ---- checked operations ----------------------------------------------------------------
    def embedding(self, ids: np.ndarray) -> np.ndarray:
        x = super().embedding(ids)
        if self.verifier:
            self.verifier.embedding(np.asarray(ids, np.int64), x)
        return x

    def linear(self, layer: int, module: str, x: np.ndarray) -> np.ndarray:
        y = super().linear(layer, module, x)
        self._layer, self._matmuls = layer, 0
        if self.verifier:
            self.verifier.linear(layer, module, x, y)
        return y

    def matmul(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        c = super().matmul(a, b)
        if self.verifier:
            what = "QKᵀ" if self._matmuls % 2 == 0 else "PV"
            self._matmuls += 1
            self.verifier.matmul(a, b, c, what, self._layer)
        return c

    def ring_linear(self, layer: int, site: str, x: np.ndarray, out_features: int) -> np.ndarray:
        """The private plans' masked product, checked over Z_2^64 against the input sent."""
        if self.verify and self.ring_verifier is None:
            raise ValueError("--verify: a ring product needs the private plan's verifier (tee/private.py)")
        y = super().ring_linear(layer, site, x, out_features)
        if self.ring_verifier is not None:
            self.ring_verifier.check(layer, site, x, y, self.address)
        return y

    def lm_head(self, x: np.ndarray) -> np.ndarray:
        y = super().lm_head(x)
        if self.verifier:
            self.verifier.lm_head_logits(x, y)
        return y

    def lm_head_top_k(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if not self.verifier:
            return super().lm_head_top_k(x, k)
        logits = self.lm_head(x)  # top-k values cannot be checked: fetch the row, check it, reduce
        ids = np.argsort(-logits, axis=-1, kind="stable")[..., :k]
        return np.take_along_axis(logits, ids, axis=-1), ids.astype(np.int64)

    def qkv(
        self, layer: int, x: np.ndarray, sid: int | None = None, pos: np.ndarray | None = None
    ) -> np.ndarray:
        if not self.verifier or sid is None:
            y = super().qkv(layer, x, sid, pos)
            self._layer = layer
            if self.verifier:
                self.verifier.fused(layer, "qkv", x, y)
            return y
        # With a session and f32 the server returns v as well as writing it: checked with q|k
        # against the q|k|v fingerprint, it feeds AttnOut's check; the model gets q|k only.
        c = self.config
        pos = np.asarray(pos, np.int64)
        width = c.q_dim + 2 * c.kv_dim
        y = self._call_one("QKV", {"layer": layer}, (self._wire(x), pos), (*x.shape[:-1], width), sid)
        self._layer = layer
        self.verifier.fused(layer, "qkv", x, y)
        B, T = x.shape[:2]
        v = y[..., c.q_dim + c.kv_dim :].reshape(B, T, c.num_kv_heads, c.head_dim)
        self.verifier.session_values(self._sessions[sid], layer, v, pos)
        return y[..., : c.q_dim + c.kv_dim]

    def gate_up(self, layer: int, x: np.ndarray) -> np.ndarray:
        y = super().gate_up(layer, x)
        if self.verifier:
            self.verifier.fused(layer, "gate_up", x, y)
        return y

    def attn_scores(self, sid, layer, q, k, pos, r=None) -> np.ndarray:
        if self.verifier and r is not None:
            raise ValueError("--verify does not support the merged plans")
        scores = super().attn_scores(sid, layer, q, k, pos, r)
        if self.verifier:
            self.verifier.attn_scores(self._sessions[sid], layer, q, k, np.asarray(pos, np.int64), scores)
        return scores

    def attn_out(self, sid: int, layer: int, p: np.ndarray) -> np.ndarray:
        o = super().attn_out(sid, layer, p)
        if self.verifier:
            self.verifier.attn_out(self._sessions[sid], layer, p, o)
        return o

    def open_session(self, batch: int, max_tokens: int) -> int:
        if not self.verify:
            return super().open_session(batch, max_tokens)
        res, _ = self.call("OpenSession", {"batch": batch, "max_tokens": max_tokens})
        sid = res.get("sid")
        if type(sid) is not int:
            from teesplit.protocol import ProtocolError

            raise ProtocolError("OpenSession: reply lacks a session id")
        self._sessions[sid] = self.verifier.open_session(batch, max_tokens)
        return sid

    def close_session(self, sid: int) -> None:
        self._sessions.pop(sid, None)
        super().close_session(sid)

    def _unverifiable(self, *args, **kwargs):
        raise ValueError(f"--verify supports the plans {', '.join(VERIFIED_PLANS)}, not the merged plans")

    def embed_qkv(self, *args, **kwargs):
        return self._unverifiable() if self.verify else super().embed_qkv(*args, **kwargs)

    def down_qkv(self, *args, **kwargs):
        return self._unverifiable() if self.verify else super().down_qkv(*args, **kwargs)

    def down_lm_head(self, *args, **kwargs):
        return self._unverifiable() if self.verify else super().down_lm_head(*args, **kwargs)

    def o_gate_up(self, *args, **kwargs):
        return self._unverifiable() if self.verify else super().o_gate_up(*args, **kwargs)

    def attn_out_gate_up(self, *args, **kwargs):
        return self._unverifiable() if self.verify else super().attn_out_gate_up(*args, **kwargs)
