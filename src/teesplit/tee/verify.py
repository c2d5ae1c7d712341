"""Freivalds checks of every GPU result, and the client that applies them (TRUSTED side).

`teesplit generate --verify`. Per process the runner draws secret Gaussian vectors and, from
its own copy of the checkpoint (tee/checkpoint.py), computes fingerprints of every weight the
GPU uses: for a Linear y = W x + b with W (N, K), R (n, N) secret and F = R W (n, K), c = R b.
A returned y is accepted when, for every row and every one of the n vectors,

    |R_i · y - (F_i · x + c_i)|  <=  tol_i = λ u (ρ_i ‖x‖ + ‖R_i ⊙ y‖),   ρ_i² = Σ_n R_in² ‖W_n‖²

u = 2⁻²⁴ is float32's unit roundoff, the only honest error left once the server computes in
float32 (the runner asks for `f32` results: the server upcasts its compute-dtype weights
exactly and returns float32, so a bfloat16 server's honest result differs from the exact
product of the same bfloat16-valued weights only by float32 accumulation). ρ_i ‖x‖ bounds the
spread of R_i · e for per-output accumulation errors e_n of size ≲ u ‖W_n‖ ‖x‖ (blocked and
pairwise sums, as BLAS and GPU GEMMs use, stay well inside that) that are independent across
outputs; ‖R_i ⊙ y‖ covers the rounding of the output and the bias add. λ = LAMBDA was set
with a wide margin over the largest ratio measured on honest results (tests/test_verify.py).

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
  R_i · (o - b_o) = Σ_h Σ_j p_hj g_ihj with g_ihj = <u_ih, x_j> + c_ih, u_ih = W_v,hᵀ (W_oᵀ R_i)_h
  folding the V projection and o_proj; g is computed when x_j goes to the QKV call (the v it
  makes never comes back), so the check is O(heads x context).

A failed check raises IntegrityError naming the operation and the layer; the generation
stops before the result is used, so no token computed from it is ever emitted.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

import numpy as np

from teesplit.tee.checkpoint import COMPUTE_DTYPES, IntegrityError, TrustedCheckpoint
from teesplit.tee.client import GPUClient, InitResult

__all__ = ["IntegrityError", "Verifier", "CheckedClient", "VERIFIED_PLANS", "LAMBDA", "VECTORS"]

U32 = 2.0**-24  # float32 unit roundoff
LAMBDA = 32.0  # tolerance factor over the error model: honest results measured up to ~3 (see above)
VECTORS = 4  # secret vectors per weight: a lie passes all with (0.8 tol / ‖δ‖)^4
VERIFIED_PLANS = ("v3", "v2", "v3-fused", "v2-fused")
LAYER_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LinearPrint:
    """Fingerprint of y = W x + b: R (n, N), F = R W (n, K), c = R b (n,), ρ (n,), float64."""

    R: np.ndarray
    F: np.ndarray
    c: np.ndarray
    rho: np.ndarray

    @classmethod
    def of(cls, W: np.ndarray, b: np.ndarray | None, rng: np.random.Generator, n: int) -> LinearPrint:
        W64 = W.astype(np.float64)
        R = rng.standard_normal((n, W.shape[0]))
        c = R @ b.astype(np.float64) if b is not None else np.zeros(n)
        rho = np.sqrt((R * R) @ np.einsum("nk,nk->n", W64, W64))
        return cls(R, R @ W64, c, rho)

    @classmethod
    def stack(cls, parts: list[LinearPrint]) -> LinearPrint:
        """The fingerprint of the outputs of `parts` concatenated (same input)."""
        return cls(
            np.concatenate([p.R for p in parts], axis=1),
            sum(p.F for p in parts),
            sum(p.c for p in parts),
            np.sqrt(sum(p.rho**2 for p in parts)),
        )

    @property
    def nbytes(self) -> int:
        return self.R.nbytes + self.F.nbytes + self.c.nbytes + self.rho.nbytes


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
    K, N = fp.F.shape[1], fp.R.shape[1]
    x2 = x.reshape(-1, K).astype(np.float64)
    y2 = y.reshape(-1, N).astype(np.float64)
    if not np.isfinite(y2).all():
        raise IntegrityError(f"{op}" + (f" of layer {layer}" if layer is not None else "") + ": NaN or Inf")
    lhs = y2 @ fp.R.T  # (M, n)
    rhs = x2 @ fp.F.T + fp.c
    xn = np.sqrt(np.einsum("mk,mk->m", x2, x2))[:, None]
    tol = LAMBDA * U32 * (xn * fp.rho + np.sqrt((y2 * y2) @ (fp.R * fp.R).T))
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
    tol = LAMBDA * U32 * (an * np.sqrt(col2 @ (s * s))[..., None, :] + np.sqrt((c * c) @ (s * s)))
    diff = lhs - rhs
    _require(np.abs(diff) <= tol, op, layer, "C s against A (B s)", diff, tol)


@dataclass
class LayerPrints:
    linear: dict[str, LinearPrint]  # q_proj ... down_proj
    qkv: LinearPrint
    qk: LinearPrint
    gate_up: LinearPrint
    U: np.ndarray  # (n, H, E): W_v,hᵀ (W_oᵀ R_i)_h, for the v3-fused PV check
    Uc: np.ndarray  # (n, H): (W_oᵀ R_i)_h · b_v,h
    pv_w: np.ndarray  # (n, H): sqrt(Σ_d (W_oᵀ R_i)_hd² ‖W_v row d‖²), tolerance of v's own rounding
    pv_nf: np.ndarray  # (n, H): ‖(W_oᵀ R_i)_h‖
    v_sigma: np.ndarray  # (Hkv,): spectral norm of W_v per KV head, bounds ‖v_j‖ ≤ σ ‖x_j‖ + ‖b‖
    v_bnorm: np.ndarray  # (Hkv,)

    @property
    def nbytes(self) -> int:
        fps = [*self.linear.values(), self.qkv, self.qk, self.gate_up]
        arrays = (self.U, self.Uc, self.pv_w, self.pv_nf, self.v_sigma, self.v_bnorm)
        return sum(p.nbytes for p in fps) + sum(a.nbytes for a in arrays)


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
    """Per layer of a GPU session: g_ihj = <u_ih, x_j> + c_ih and ‖x_j‖ for every cached position."""

    G: np.ndarray  # (n, B, H, capacity)
    X: np.ndarray  # (B, capacity)

    def reserve(self, end: int) -> None:
        cap = self.G.shape[-1]
        if end > cap:
            grow = max(end, 2 * cap)
            self.G = np.pad(self.G, ((0, 0), (0, 0), (0, 0), (0, grow - cap)))
            self.X = np.pad(self.X, ((0, 0), (0, grow - cap)))


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
        H, Hkv, D = c.num_heads, c.num_kv_heads, c.head_dim
        lin, raw = {}, {}
        for m in LAYER_MODULES:
            W, b = ck.linear(i, m, self.dtype)
            raw[m] = (W, b)
            lin[m] = LinearPrint.of(W, b, self.rng, n)
        Wv, bv = raw["v_proj"]
        Wv64 = Wv.astype(np.float64).reshape(Hkv, D, c.hidden_size)
        Fo = lin["o_proj"].F.reshape(n, H, D)  # (W_oᵀ R_i)_h
        kv_of = np.arange(H) // (H // Hkv)
        U = np.einsum("ihd,hde->ihe", Fo, Wv64[kv_of])
        bv64 = np.zeros((Hkv, D)) if bv is None else bv.astype(np.float64).reshape(Hkv, D)
        Uc = np.einsum("ihd,hd->ih", Fo, bv64[kv_of])
        row2 = np.einsum("hde,hde->hd", Wv64, Wv64)  # (Hkv, D)
        pv_w = np.sqrt(np.einsum("ihd,hd->ih", Fo * Fo, row2[kv_of]))
        pv_nf = np.sqrt(np.einsum("ihd,ihd->ih", Fo, Fo))
        v_sigma = np.array([np.linalg.norm(Wv64[g], 2) for g in range(Hkv)])
        return LayerPrints(
            linear=lin,
            qkv=LinearPrint.stack([lin["q_proj"], lin["k_proj"], lin["v_proj"]]),
            qk=LinearPrint.stack([lin["q_proj"], lin["k_proj"]]),
            gate_up=LinearPrint.stack([lin["gate_proj"], lin["up_proj"]]),
            U=U,
            Uc=Uc,
            pv_w=pv_w,
            pv_nf=pv_nf,
            v_sigma=v_sigma,
            v_bnorm=np.linalg.norm(bv64, axis=1),
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
        """name: qkv, qk (q|k of a session QKV) or gate_up."""
        t0 = time.perf_counter()
        op = {"qkv": "QKV", "qk": "QKV", "gate_up": "GateUp"}[name]
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
        values = [
            ValueState(np.zeros((n, batch, c.num_heads, 64)), np.zeros((batch, 64)))
            for _ in range(c.num_layers)
        ]
        return SessionState(rho, keys, values)

    def session_values(self, s: SessionState, layer: int, x: np.ndarray, pos: np.ndarray) -> None:
        """The QKV input x (B, T, E) at pos: its v stays on the GPU; keep g and ‖x‖ here."""
        lp, vs = self.layers[layer], s.values[layer]
        B, T, _ = x.shape
        vs.reserve(int(pos.max()) + T)
        x64 = x.astype(np.float64)
        g = np.einsum("ihe,bte->ibht", lp.U, x64) + lp.Uc[:, None, :, None]  # (n, B, H, T)
        xn = np.sqrt(np.einsum("bte,bte->bt", x64, x64))
        for b in range(B):
            vs.G[:, b, :, pos[b] : pos[b] + T] = g[:, b]
            vs.X[b, pos[b] : pos[b] + T] = xn[b]

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
                LAMBDA
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
        lhs = np.einsum("in,btn->ibt", fo.R, o64) - fo.c[:, None, None]
        rhs = np.einsum("bhtj,ibhj->ibt", p64, vs.G[..., :S])
        # Tolerance: o_proj's, PV's and v's own float32 accumulation, and the output's rounding.
        kv_of = np.arange(H) // (H // c.num_kv_heads)
        vn = (
            lp.v_sigma[kv_of][None, :, None] * vs.X[:, None, :S] + lp.v_bnorm[kv_of][None, :, None]
        )  # (B,H,S)
        A = np.einsum("bhtj,bhj->bht", p64, vn)  # bounds ‖a_bht‖
        PX = np.einsum("bhtj,bj->bht", p64, vs.X[:, :S])
        a_norm = np.sqrt(np.einsum("bht,bht->bt", A, A))
        t_o = fo.rho[:, None, None] * a_norm[None]
        t_pv = np.sqrt(np.einsum("ih,bht->ibt", lp.pv_nf**2, A * A))
        t_v = np.sqrt(np.einsum("ih,bht->ibt", lp.pv_w**2, PX * PX))
        t_y = np.sqrt(np.einsum("in,btn->ibt", fo.R**2, o64 * o64))
        tol = LAMBDA * U32 * (t_o + t_pv + t_v + t_y)
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
        y = super().qkv(layer, x, sid, pos)
        self._layer = layer
        if self.verifier:
            self.verifier.fused(layer, "qkv" if sid is None else "qk", x, y)
            if sid is not None:
                self.verifier.session_values(self._sessions[sid], layer, x, np.asarray(pos, np.int64))
        return y

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
