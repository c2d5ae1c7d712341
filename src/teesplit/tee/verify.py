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
ten times the largest ratio measured on honest results (tests/tee/test_verify_stats.py).

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

When: VerifiedPort defers the checks of a forward pass to its LM-head reply and runs them
there (`Verifier.check_pass`), before the logits reach the sampler. The fingerprints carry a
leading axis over layers, so the same check of all layers is one batched product: about ten
numpy calls per kind of result instead of twenty per result, which is most of what checking
cost (the products are tiny; the calls were not). The pass reports the failure the checks
one by one, in call order, would have found first; results that do not form one regular pass
are checked one by one. The tolerances are compared in two steps: the cheap term (λ u ρ ‖x‖
for the Linear family) first, the rest only when some difference exceeds it; tol >= the
cheap term, so the verdicts are unchanged.

A failed check raises IntegrityError naming the operation and the layer; the generation
stops before any token computed from the result is emitted.
"""

from __future__ import annotations

import functools
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from teesplit.config import LAYER_MODULES
from teesplit.errors import UsageError
from teesplit.tee.checkpoint import COMPUTE_DTYPES, IntegrityError, TrustedCheckpoint
from teesplit.tee.client import GPUClient
from teesplit.tee.port import InitResult

__all__ = [
    "IntegrityError",
    "Verifier",
    "VerifiedPort",
    "VERIFIED_PLANS",
    "RING_VERIFIED_PLANS",
    "LAMBDA",
    "VECTORS",
]

U32 = 2.0**-24  # float32 unit roundoff
# Tolerance factors over the error models, about 10x the largest ratio |difference| / (model)
# measured on honest float32 and bfloat16-weight results of SmolLM2 (tests/tee/test_verify_stats.py):
# Linear-type and AttnOut checks up to 1.6, AttnScores and Matmul (short dot products) up to 4.
LAMBDA = {"linear": 16.0, "attn_out": 16.0, "attn_scores": 32.0, "matmul": 32.0}
VECTORS = 8  # secret vectors per weight: a lie passes all with (0.8 tol / ‖δ‖)^8
BLOCK = 512  # outputs per fingerprint block (LinearPrint); memory ∝ VECTORS / BLOCK
EMBED_ROWS = 4096  # embedding rows fingerprinted at a time (a float64 copy of this many rows)
VERIFIED_PLANS = ("v3", "v2", "v3-fused", "v2-fused")
# Results waiting for their checks are flushed early past this size (a long prefill's attention
# scores are L x H x T x S floats: 18 GB for SmolLM2 at T = S = 4096), checked layer by layer.
PENDING_BYTES = 64 << 20
RING_VERIFIED_PLANS = ("private-otp", "private-2party")  # exact checks over Z_2^64: tee/ring_verify.py


@dataclass
class LinearPrint:
    """Fingerprint of y = W x + b, W (N, K), per block of BLOCK outputs: vector m = (i, b) is the
    i-th secret Gaussian vector restricted to output block b (its other entries are zero), so
    the float32 noise a check must tolerate grows with the block, not with N, while a lie in
    any output still meets n independent vectors. float64 throughout.

    Every array but idx has a leading axis over layers (L; 1 for the LM head), so the same
    Linear of many layers is checked in one batched product (`print[a:b]` is a view).
    Rb (L, n, nb, BLOCK) the vectors' values; idx (nb, BLOCK) their outputs (N: padding);
    F (L, n * nb, K) = R' W; c (L, n * nb) = R' b; rho (L, n * nb) ρ² = Σ R'² ‖W_row‖²."""

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
        # One block of rows at a time, in float64: never a float64 copy of all of W (the LM
        # head's would be 226 MB for SmolLM2, twice over with the block gather).
        F = np.empty((n, nb, K))
        rho = np.empty((n, nb))
        for j in range(nb):
            rows = W[j * block : min((j + 1) * block, N)].astype(np.float64)  # (≤ BLOCK, K)
            r = Rb[:, j, : len(rows)]  # (n, ≤ BLOCK); the padding's vectors are zero
            F[:, j] = r @ rows
            rho[:, j] = np.sqrt((r * r) @ np.einsum("nk,nk->n", rows, rows))
        b64 = np.zeros(N + 1) if b is None else np.append(b.astype(np.float64), 0.0)
        c = np.einsum("ibk,bk->ib", Rb, b64[idx]).reshape(-1)
        return cls(Rb[None], idx, F.reshape(1, n * nb, K), c[None], rho.reshape(1, -1), N)

    @classmethod
    def stack(cls, parts: list[LinearPrint]) -> LinearPrint:
        """The fingerprint of the outputs of `parts` concatenated (same input)."""
        offsets = np.cumsum([0] + [p.N for p in parts])
        N = int(offsets[-1])
        idx = np.concatenate(
            [np.where(p.idx == p.N, N, p.idx + o) for p, o in zip(parts, offsets, strict=False)]
        )
        L, n = parts[0].Rb.shape[:2]

        def by_vector(a: np.ndarray, p: LinearPrint) -> np.ndarray:
            return a.reshape(L, n, p.Rb.shape[2], *a.shape[2:])

        F = np.concatenate([by_vector(p.F, p) for p in parts], axis=2).reshape(L, -1, parts[0].F.shape[2])
        c = np.concatenate([by_vector(p.c, p) for p in parts], axis=2).reshape(L, -1)
        rho = np.concatenate([by_vector(p.rho, p) for p in parts], axis=2).reshape(L, -1)
        return cls(np.concatenate([p.Rb for p in parts], axis=2), idx, F, c, rho, N)

    @classmethod
    def layers(cls, prints: list[LinearPrint]) -> LinearPrint:
        """One print for the same Linear of consecutive layers (their leading axes joined)."""

        def cat(name: str) -> np.ndarray:
            return np.concatenate([getattr(p, name) for p in prints])

        return cls(cat("Rb"), prints[0].idx, cat("F"), cat("c"), cat("rho"), prints[0].N)

    def __getitem__(self, layers: slice) -> LinearPrint:
        """The prints of a range of layers: views, sharing the transposed vectors too."""
        view = LinearPrint(
            self.Rb[layers], self.idx, self.F[layers], self.c[layers], self.rho[layers], self.N
        )
        view.__dict__["_RbT"] = self._RbT[layers]
        view.__dict__["_Rb2T"] = self._Rb2T[layers]
        return view

    @functools.cached_property
    def _RbT(self) -> np.ndarray:
        return np.ascontiguousarray(self.Rb.transpose(0, 2, 3, 1))  # (L, nb, BLOCK, n)

    @functools.cached_property
    def _Rb2T(self) -> np.ndarray:
        return np.ascontiguousarray((self.Rb * self.Rb).transpose(0, 2, 3, 1))

    def _blocks(self, y: np.ndarray) -> np.ndarray:
        """Rows y (L, M, N) -> (L, nb, M, BLOCK), padded with zeros."""
        L, M = y.shape[:2]
        if self.idx.size == self.N:  # N a multiple of BLOCK: a view, no gather
            return y.reshape(L, M, -1, self.idx.shape[1]).transpose(0, 2, 1, 3)
        padded = np.concatenate([y, np.zeros((L, M, 1))], axis=2)
        return padded[:, :, self.idx].transpose(0, 2, 1, 3)

    def ry(self, y: np.ndarray, yb: np.ndarray | None = None) -> np.ndarray:
        """R' y for rows y (L, M, N) -> (L, M, n * nb), one batched product per layer and block."""
        yb = self._blocks(y) if yb is None else yb
        out = np.matmul(yb, self._RbT)  # (L, nb, M, n)
        return out.transpose(0, 2, 3, 1).reshape(y.shape[0], y.shape[1], -1)

    def ry_abs(self, y: np.ndarray, yb: np.ndarray | None = None) -> np.ndarray:
        """‖R' ⊙ y‖ per row and vector: (L, M, n * nb)."""
        yb = self._blocks(y) if yb is None else yb
        out = np.matmul(yb * yb, self._Rb2T)
        return np.sqrt(out.transpose(0, 2, 3, 1).reshape(y.shape[0], y.shape[1], -1))

    @property
    def nbytes(self) -> int:
        # Rb three times: as drawn, and transposed (and squared) for the checks
        return 3 * self.Rb.nbytes + self.idx.nbytes + self.F.nbytes + self.c.nbytes + self.rho.nbytes


def _where(op: str, layer: int | None) -> str:
    return op + (f" of layer {layer}" if layer is not None else "")


def _fail(op: str, layer: int | None, what: str, diff: np.ndarray, tol: np.ndarray) -> IntegrityError:
    bad = ~(np.abs(diff) <= tol)  # NaN counts as bad
    idx = int(np.argmax(bad.reshape(-1)))
    d, t = float(np.abs(diff).reshape(-1)[idx]), float(tol.reshape(-1)[idx])
    return IntegrityError(
        f"{_where(op, layer)}: the GPU server's result fails its Freivalds check ({what}: |difference| "
        f"{d:.3g} > tolerance {t:.3g} in {int(bad.sum())} of {bad.size} checks); generation stopped"
    )


def _require(ok: np.ndarray, op: str, layer: int | None, what: str, diff, tol) -> None:
    if not bool(np.all(ok)):
        raise _fail(op, layer, what, np.asarray(diff), np.asarray(tol))


@dataclass
class Failure:
    """A failed check, at `index` along a batched check's leading axis (a layer of the batch)."""

    index: int
    what: str = ""  # what was compared; "NaN or Inf" for a non-finite result
    diff: np.ndarray | None = None
    tol: np.ndarray | None = None
    raised: IntegrityError | None = None  # the error a whole-result check built itself

    def error(self, op: str, layer: int | None) -> IntegrityError:
        if self.raised is not None:
            return self.raised
        if self.diff is None:
            return IntegrityError(f"{_where(op, layer)}: NaN or Inf")
        return _fail(op, layer, self.what, self.diff, self.tol)


def _compare(diff: np.ndarray, cheap: np.ndarray, extra, what: str, nonfinite: np.ndarray) -> list[Failure]:
    """|diff| <= tolerance per element, failures per leading index. The tolerance is cheap +
    extra() with extra() >= 0, so when every difference is within `cheap` the costlier part is
    never computed, and the decisions are those of the whole tolerance."""
    failures = [Failure(int(i), "NaN or Inf") for i in np.flatnonzero(nonfinite)]
    ad = np.abs(diff)
    if not failures and bool((ad <= cheap).all()):  # NaN compares False: it takes the long way
        return failures
    tol = np.broadcast_to(cheap + extra(), diff.shape)
    bad = ~(ad <= tol).reshape(len(diff), -1).all(axis=1) & ~nonfinite
    failures += [Failure(int(i), what, diff[i], tol[i]) for i in np.flatnonzero(bad)]
    return sorted(failures, key=lambda f: f.index)


def linear_failures(fp: LinearPrint, x: np.ndarray, y: np.ndarray) -> list[Failure]:
    """y (L, ..., N) against x (L, ..., K) through the fingerprints of y = W x + b of L layers."""
    L, K, N = fp.F.shape[0], fp.F.shape[2], fp.N
    x2 = np.asarray(x, np.float64).reshape(L, -1, K)
    y2 = np.asarray(y, np.float64).reshape(L, -1, N)
    nonfinite = ~np.isfinite(y2).reshape(L, -1).all(axis=1)
    yb = fp._blocks(y2)
    Fx = np.matmul(fp.F, x2.transpose(0, 2, 1)).transpose(0, 2, 1)  # F contiguous: no copy of it
    diff = fp.ry(y2, yb) - (Fx + fp.c[:, None])  # (L, M, vectors)
    scale = LAMBDA["linear"] * U32
    cheap = scale * np.sqrt(np.einsum("lmk,lmk->lm", x2, x2))[..., None] * fp.rho[:, None]
    return _compare(diff, cheap, lambda: scale * fp.ry_abs(y2, yb), "rᵀy against (rᵀW)x", nonfinite)


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
class KeyState:
    """Running key fingerprints of a GPU session, every layer (leading axis L): committed
    positions (never rewritten) and each layer's last write (rewritten in part when a ragged
    batch's padding is replaced)."""

    C: np.ndarray  # (L, n, B, Hkv, D): Σ_j ρ_ij k_j over committed positions
    C2: np.ndarray  # (L, n, B, Hkv): Σ_j ρ_ij² ‖k_j‖²
    commit: np.ndarray  # (L, B)
    last_pos: list[np.ndarray | None]  # per layer
    last_k: list[np.ndarray | None]  # per layer: (B, Hkv, T, D) float64


@dataclass
class ValueState:
    """Per GPU session, for every layer and cached position j: g_lmhj = (W_oᵀ R'_m)_h · v_j and
    ‖v_j‖ per KV head, from the v the QKV call returned (and its check accepted)."""

    G: np.ndarray  # (L, m, B, H, capacity)
    X: np.ndarray  # (L, B, Hkv, capacity): ‖v_j‖

    def reserve(self, end: int) -> None:
        cap = self.G.shape[-1]
        if end > cap:
            grow = max(end, 2 * cap)
            self.G = np.pad(self.G, ((0, 0),) * 4 + ((0, grow - cap),))
            self.X = np.pad(self.X, ((0, 0),) * 3 + ((0, grow - cap),))


@dataclass
class SessionState:
    rho: np.ndarray  # (n, max_tokens) secret position weights
    keys: KeyState
    values: ValueState


@dataclass
class VerifyStats:
    setup_s: float = 0.0
    fingerprint_bytes: int = 0
    checks: int = 0
    check_s: float = 0.0
    by_op: dict[str, int] = field(default_factory=dict)


# A result awaiting its check: (op, layer or None, what the check needs). Ops: Embedding, Linear
# (module, x, y), QKV (x, y), QKV+v (state, pos, x, y: a session's QKV, v kept for AttnOut),
# GateUp, LMHead (x, y), Matmul (a, b, c, what), AttnScores (state, q, k, pos, scores),
# AttnOut (state, p, o).
Pending = tuple[str, "int | None", tuple]
_STATEFUL = ("QKV+v", "AttnScores", "AttnOut")  # in this order: AttnOut reads the values QKV+v kept
_FUSED = {"QKV": "qkv", "GateUp": "gate_up"}


def _name(op: str, payload: tuple) -> str:
    """The operation as an IntegrityError names it."""
    return f"Linear {payload[0]}" if op == "Linear" else op.removesuffix("+v")


def _batch(items: list[Pending]) -> slice | None:
    """The layers of one op's results as a slice when they can be checked as one batch: the same
    op (and module, session, positions) on consecutive layers, arrays of equal shapes."""
    layers = [layer for _, layer, _ in items]
    if layers[0] is None or layers != list(range(layers[0], layers[0] + len(items))):
        return None
    first = items[0][2]
    for _, _, payload in items[1:]:
        for a, b in zip(first, payload, strict=True):
            if isinstance(a, np.ndarray):
                if a.shape != b.shape:
                    return None
            elif a is not b and not (isinstance(a, str) and a == b):  # module; session (by identity)
                return None
    if items[0][0] in ("QKV+v", "AttnScores"):  # the same positions: one update for all layers
        at = 1 if items[0][0] == "QKV+v" else 3
        if any(not np.array_equal(first[at], p[at]) for _, _, p in items[1:]):
            return None
    return slice(layers[0], layers[0] + len(items))


class Verifier:
    """Fingerprints of one checkpoint at one compute dtype, and the checks that use them.

    Each check exists once, for a batch of layers (a leading axis L): `check_pass` runs a whole
    forward pass's checks with L = num_layers, the per-result methods (linear, fused, ...) with
    L = 1."""

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
        per_layer: list[dict[str, LinearPrint]] = []
        for i in range(c.num_layers):
            if progress is not None:
                progress(i, c.num_layers)
            lin = {}
            for module in LAYER_MODULES:
                W, b = checkpoint.linear(i, module, self.dtype)
                lin[module] = LinearPrint.of(W, b, self.rng, self.n)
            lin["qkv"] = LinearPrint.stack([lin["q_proj"], lin["k_proj"], lin["v_proj"]])
            lin["gate_up"] = LinearPrint.stack([lin["gate_proj"], lin["up_proj"]])
            per_layer.append(lin)
            # Reading the weights mapped the checkpoint's pages into this process: hand them
            # back to the page cache as we go (the file would count in full in resident memory).
            checkpoint.release()
        # One print per Linear, all layers stacked: q_proj ... down_proj, qkv, gate_up.
        self.prints = {name: LinearPrint.layers([lin[name] for lin in per_layer]) for name in per_layer[0]}
        del per_layer
        o = self.prints["o_proj"]
        self.Fo = o.F.reshape(c.num_layers, o.F.shape[1], c.num_heads, c.head_dim)  # (L, m, H, D)
        self.Fo_norm = np.sqrt(np.einsum("lmhd,lmhd->lmh", self.Fo, self.Fo))  # (L, m, H)
        emb = checkpoint.embed(self.dtype)  # (V, E)
        self.emb_S = self.rng.standard_normal((self.n, c.hidden_size))
        self.emb_print = np.empty((len(emb), self.n))  # (V, n), rows a block at a time: no float64 table
        for i in range(0, len(emb), EMBED_ROWS):
            self.emb_print[i : i + EMBED_ROWS] = emb[i : i + EMBED_ROWS].astype(np.float64) @ self.emb_S.T
        del emb
        checkpoint.release()
        self.lm_head = LinearPrint.of(checkpoint.lm_head(self.dtype), None, self.rng, self.n)
        checkpoint.release()
        self.stats = VerifyStats()
        self.stats.setup_s = time.perf_counter() - t0
        self.stats.fingerprint_bytes = (
            sum(p.nbytes for p in self.prints.values())
            + self.Fo_norm.nbytes
            + self.emb_print.nbytes
            + self.emb_S.nbytes
            + self.lm_head.nbytes
        )

    @property
    def o_vectors(self) -> int:
        """o_proj's vectors (n per output block): the PV check's values per head and position."""
        return self.Fo.shape[1]

    # ---- the checks, one result at a time ----------------------------------------------------
    def _one(self, op: str, layer: int | None, args: tuple) -> None:
        self.check_pass([(op, layer, args)])

    def linear(self, layer: int, module: str, x: np.ndarray, y: np.ndarray) -> None:
        self._one("Linear", layer, (module, x, y))

    def fused(self, layer: int, name: str, x: np.ndarray, y: np.ndarray) -> None:
        """name: qkv or gate_up."""
        self._one({v: k for k, v in _FUSED.items()}[name], layer, (x, y))

    def lm_head_logits(self, x: np.ndarray, y: np.ndarray) -> None:
        self._one("LMHead", None, (x, y))

    def embedding(self, ids: np.ndarray, x: np.ndarray) -> None:
        self._one("Embedding", None, (ids, x))

    def matmul(self, a: np.ndarray, b: np.ndarray, c: np.ndarray, what: str, layer: int | None) -> None:
        self._one("Matmul", layer, (a, b, c, what))

    def session_values(self, s: SessionState, layer: int, v: np.ndarray, pos: np.ndarray) -> None:
        """Keep g and ‖v‖ per position for the checked v (B, T, Hkv, D) a session's QKV wrote at pos."""
        self._store_values(s, slice(layer, layer + 1), v[None], pos)

    def attn_scores(
        self, s: SessionState, layer: int, q: np.ndarray, k: np.ndarray, pos: np.ndarray, scores: np.ndarray
    ) -> None:
        """q (B, H, T, D) and the new keys k (B, Hkv, T, D) at pos; scores (B, H, T, S) over the
        GPU's cache. Positions j >= pos_b + T of row b are hidden from every query of that row
        by the causal mask and are not checked; every value must still be finite."""
        self._one("AttnScores", layer, (s, q, k, pos, scores))

    def attn_out(self, s: SessionState, layer: int, p: np.ndarray, o: np.ndarray) -> None:
        """p (B, H, T, S) sent; o = o_proj(P V) (B, T, E) returned, V on the GPU."""
        self._one("AttnOut", layer, (s, p, o))

    # ---- the checks of a whole forward pass ------------------------------------------------
    def check_pass(self, items: list[Pending]) -> None:
        """Check results in call order, and raise the IntegrityError that checking them one by
        one would have raised first. A regular forward pass (each op once per layer, on
        consecutive layers) is checked op by op, all layers in one batch; anything else one by one."""
        t0 = time.perf_counter()
        groups: dict[Any, list[int]] = {}  # op (and module, session) -> indexes into items
        for i, (op, _, payload) in enumerate(items):
            if op in ("Embedding", "Matmul", "LMHead"):  # once per pass, or not batched
                key: Any = i
            elif op == "Linear":
                key = (op, payload[0])
            elif op in _STATEFUL:
                key = (op, id(payload[0]))
            else:
                key = (op,)
            groups.setdefault(key, []).append(i)
        batches = {key: _batch([items[i] for i in seq]) for key, seq in groups.items()}
        regular = all(
            b is not None or (len(groups[key]) == 1 and items[groups[key][0]][0] not in _STATEFUL)
            for key, b in batches.items()
        )
        failures: list[tuple[int, IntegrityError]] = []
        try:
            if not regular:  # one by one, in order: the first failure raises
                for op, layer, payload in items:
                    sl = None if layer is None else slice(layer, layer + 1)
                    for f in self._group(op, sl, [payload]):
                        raise f.error(_name(op, payload), layer)
                return

            def rank(key: Any) -> int:  # stateless first; values stored before AttnOut reads them
                op = items[groups[key][0]][0]
                return _STATEFUL.index(op) + 1 if op in _STATEFUL else 0

            for key in sorted(groups, key=rank):
                seq = groups[key]
                op, layer, _ = items[seq[0]]
                sl = batches[key] or (None if layer is None else slice(layer, layer + 1))
                for f in self._group(op, sl, [items[i][2] for i in seq]):
                    i = seq[f.index]
                    failures.append((i, f.error(_name(op, items[i][2]), items[i][1])))
            if failures:
                raise min(failures, key=lambda f: f[0])[1]
        finally:
            st = self.stats
            for op, _, _ in items:
                st.by_op[op.removesuffix("+v")] = st.by_op.get(op.removesuffix("+v"), 0) + 1
            st.checks += len(items)
            st.check_s += time.perf_counter() - t0

    def _group(self, op: str, sl: slice | None, payloads: list[tuple]) -> list[Failure]:
        """The failures among results of one op for the layers `sl` (None: not a layer op)."""

        def stacked(j: int) -> np.ndarray:
            return np.stack([p[j] for p in payloads])

        if op in ("Embedding", "Matmul"):
            try:
                if op == "Embedding":
                    ids, x = payloads[0]
                    check_embedding(self.emb_print, self.emb_S, np.asarray(ids, np.int64), x, "Embedding")
                else:
                    a, b, c, what = payloads[0]
                    layer = None if sl is None else sl.start
                    check_matmul(a, b, c, self.rng, self.n, f"Matmul ({what})", layer)
            except IntegrityError as e:  # the message names the op itself
                return [Failure(0, raised=e)]
            return []
        if op == "LMHead":
            return linear_failures(self.lm_head, payloads[0][0][None], payloads[0][1][None])
        if op == "Linear":
            return linear_failures(self.prints[payloads[0][0]][sl], stacked(1), stacked(2))
        if op in ("QKV", "GateUp"):
            return linear_failures(self.prints[_FUSED[op]][sl], stacked(0), stacked(1))
        state = payloads[0][0]
        if op == "QKV+v":
            c = self.config
            x, y, pos = stacked(2), stacked(3), payloads[0][1]
            failures = linear_failures(self.prints["qkv"][sl], x, y)
            v = y[..., c.q_dim + c.kv_dim :].reshape(*y.shape[:3], c.num_kv_heads, c.head_dim)
            self._store_values(state, sl, v, pos)
            return failures
        if op == "AttnScores":
            return self._scores(state, sl, stacked(1), stacked(2), payloads[0][3], stacked(4))
        if op == "AttnOut":
            return self._out(state, sl, stacked(1), stacked(2))
        raise ValueError(f"verify: no check for {op!r}")

    # ---- the GPU-side K/V cache (v3-fused) ------------------------------------------------
    def open_session(self, batch: int, max_tokens: int) -> SessionState:
        c, n, L = self.config, self.n, self.config.num_layers
        rho = self.rng.standard_normal((n, max_tokens))
        keys = KeyState(
            np.zeros((L, n, batch, c.num_kv_heads, c.head_dim)),
            np.zeros((L, n, batch, c.num_kv_heads)),
            np.zeros((L, batch), np.int64),
            [None] * L,
            [None] * L,
        )
        values = ValueState(
            np.zeros((L, self.o_vectors, batch, c.num_heads, 64)), np.zeros((L, batch, c.num_kv_heads, 64))
        )
        return SessionState(rho, keys, values)

    def _store_values(self, s: SessionState, sl: slice, v: np.ndarray, pos: np.ndarray) -> None:
        """g and ‖v‖ per position of the values v (L, B, T, Hkv, D) written at pos."""
        vs, c = s.values, self.config
        B, T = v.shape[1:3]
        vs.reserve(int(pos.max()) + T)
        v64 = v.astype(np.float64)
        kv_of = np.arange(c.num_heads) // (c.num_heads // c.num_kv_heads)
        g = np.einsum("lmhd,lbthd->lmbht", self.Fo[sl], v64[:, :, :, kv_of])  # (L, m, B, H, T)
        vn = np.sqrt(np.einsum("lbtgd,lbtgd->lbgt", v64, v64))  # (L, B, Hkv, T)
        for b in range(B):
            vs.G[sl, :, b, :, pos[b] : pos[b] + T] = g[:, :, b]
            vs.X[sl, b, :, pos[b] : pos[b] + T] = vn[:, b]

    def _update_keys(self, s: SessionState, sl: slice, k: np.ndarray, pos: np.ndarray) -> None:
        """Commit each layer's previous write up to the new positions, then remember the new keys
        k (L, B, Hkv, T, D). Layers out of step with each other are updated one by one."""
        ks = s.keys
        layers = range(sl.start, sl.stop)
        first = sl.start
        in_step = all(
            np.array_equal(ks.commit[i], ks.commit[first])
            and (ks.last_pos[i] is None) == (ks.last_pos[first] is None)
            and (ks.last_pos[i] is None or np.array_equal(ks.last_pos[i], ks.last_pos[first]))
            and (ks.last_k[i] is None or ks.last_k[i].shape == ks.last_k[first].shape)
            for i in layers
        )
        if not in_step:
            for j, i in enumerate(layers):
                self._update_keys(s, slice(i, i + 1), k[j : j + 1], pos)
            return
        commit = ks.commit[first].copy()
        last_pos = ks.last_pos[first]
        last_k = None if last_pos is None else np.stack([ks.last_k[i] for i in layers])  # (L, B, Hkv, T, D)
        for b in range(k.shape[1]):
            p = int(pos[b])
            if p < commit[b]:
                if p != 0:
                    raise ValueError(f"verify: layer {first} row {b} rewrites committed position {p}")
                ks.C[sl, :, b] = 0.0
                ks.C2[sl, :, b] = 0.0
                commit[b] = 0
                continue
            if last_k is None:
                continue
            start, Tl = int(last_pos[b]), last_k.shape[3]
            if p > start + Tl:
                raise ValueError(f"verify: layer {first} row {b} leaves a gap before position {p}")
            end = min(p, start + Tl)
            if end > start:
                kk = last_k[:, b, :, : end - start]  # (L, Hkv, T', D)
                r = s.rho[:, start:end]  # (n, T')
                ks.C[sl, :, b] += np.einsum("ij,lhjd->lihd", r, kk)
                ks.C2[sl, :, b] += np.einsum("ij,lhj->lih", r * r, np.einsum("lhjd,lhjd->lhj", kk, kk))
            commit[b] = p
        ks.commit[sl] = commit
        k64 = k.astype(np.float64)
        for j, i in enumerate(layers):
            ks.last_pos[i], ks.last_k[i] = pos.copy(), k64[j]

    def _scores(
        self, s: SessionState, sl: slice, q: np.ndarray, k: np.ndarray, pos: np.ndarray, scores: np.ndarray
    ) -> list[Failure]:
        """q (L, B, H, T, D), new keys k (L, B, Hkv, T, D) at pos, scores (L, B, H, T, S):
        Σ_j ρ_ij s_j against q · K̃_i per layer, row, vector and query."""
        L, B, H, T, S = scores.shape
        nonfinite = ~np.isfinite(scores).reshape(L, -1).all(axis=1)
        self._update_keys(s, sl, k, pos)
        ks, n = s.keys, self.n
        G = H // self.config.num_kv_heads
        q64, sc, k64 = q.astype(np.float64), scores.astype(np.float64), k.astype(np.float64)
        scale = LAMBDA["attn_scores"] * U32
        diffs, cheaps = [], []
        for b in range(B):
            p = int(pos[b])
            end = p + T
            rn = s.rho[:, p:end]  # (n, T): the new positions' weights
            Kt = ks.C[sl, :, b] + np.einsum("it,lhtd->lihd", rn, k64[:, b])  # (L, n, Hkv, D)
            K2 = ks.C2[sl, :, b] + np.einsum(
                "it,lht->lih", rn**2, np.einsum("lhtd,lhtd->lht", k64[:, b], k64[:, b])
            )
            lhs = np.matmul(sc[:, b, :, :, :end].reshape(L, H * T, end), s.rho[:, :end].T)  # (L, H T, n)
            lhs = lhs.reshape(L, H, T, n).transpose(0, 3, 1, 2)  # (L, n, H, T)
            rhs = np.einsum("lhtd,lihd->liht", q64[:, b], np.repeat(Kt, G, axis=2))
            qn = np.sqrt(np.einsum("lhtd,lhtd->lht", q64[:, b], q64[:, b]))  # (L, H, T)
            diffs.append(lhs - rhs)
            cheaps.append(scale * qn[:, None] * np.sqrt(np.repeat(K2, G, axis=2))[..., None])

        def extra() -> np.ndarray:  # the scores' own rounding: ‖ρ_i ⊙ s‖ per query
            out = []
            for b in range(B):
                end = int(pos[b]) + T
                s2 = sc[:, b, :, :, :end].reshape(L, H * T, end) ** 2
                ss = np.sqrt(np.matmul(s2, (s.rho[:, :end] ** 2).T))  # (L, H T, n)
                out.append(scale * ss.reshape(L, H, T, n).transpose(0, 3, 1, 2))
            return np.stack(out, axis=1)

        diff = np.stack(diffs, axis=1)  # (L, B, n, H, T)
        what = "Σ_j ρ_j s_j against q · Σ_j ρ_j k_j"
        return _compare(diff, np.stack(cheaps, axis=1), extra, what, nonfinite)

    def _out(self, s: SessionState, sl: slice, p: np.ndarray, o: np.ndarray) -> list[Failure]:
        """p (L, B, H, T, S) sent; o = o_proj(P V) (L, B, T, E) returned, V on the GPU:
        R'_m · (o - b_o) against Σ_h Σ_j p_hj g_mhj per layer, row, vector and query."""
        fo, vs, c = self.prints["o_proj"][sl], s.values, self.config
        L, B, H, T, S = p.shape
        nonfinite = ~np.isfinite(o).reshape(L, -1).all(axis=1)
        p64, o2 = p.astype(np.float64), o.astype(np.float64).reshape(L, B * T, -1)
        vs.reserve(S)
        m = fo.F.shape[1]
        lhs = (fo.ry(o2) - fo.c[:, None]).transpose(0, 2, 1).reshape(L, m, B, T)
        rhs = np.einsum("lbhtj,lmbhj->lmbt", p64, vs.G[sl, ..., :S])
        # Tolerance: PV's and o_proj's float32 accumulation, and the output's rounding; with
        # A_bht = Σ_j p_bhtj ‖v_j‖ >= ‖a_bht‖, the attention output's norm per head.
        kv_of = np.arange(H) // (H // c.num_kv_heads)
        A = np.einsum("lbhtj,lbhj->lbht", p64, vs.X[sl][:, :, kv_of, :S])
        a_norm = np.sqrt(np.einsum("lbht,lbht->lbt", A, A))  # (L, B, T)
        t_o = fo.rho[:, :, None, None] * a_norm[:, None]
        t_pv = np.sqrt(np.einsum("lmh,lbht->lmbt", self.Fo_norm[sl] ** 2, A * A))
        scale = LAMBDA["attn_out"] * U32
        return _compare(
            lhs - rhs,
            scale * (t_o + t_pv),
            lambda: scale * fo.ry_abs(o2).transpose(0, 2, 1).reshape(L, m, B, T),
            "rᵀo against Σ_h Σ_j p_hj g_hj",
            nonfinite,
        )


class VerifiedPort:
    """A port (`tee.port.GPUPort`) that wraps a GPUClient: it takes the norm weights and RoPE
    parameters from the runner's own checkpoint (refusing an Init that differs) and, with
    `verify`, checks every result.

    The checks of a forward pass wait for its logits: they run (`flush`), batched across
    layers, while the server computes the LM head (the client runs them once that request is
    out), and the LM head's own check follows its reply, all before the logits reach the
    sampler; so a failed check still stops the generation before any token computed from a lie
    is emitted. A call that fails while checks wait runs them first, so a lie that made the
    failure is named as such. Results stay referenced until their check: the model never writes
    into a reply or an input it sent (every trusted op returns a new array)."""

    private = False

    def __init__(
        self,
        inner: GPUClient,
        *,
        checkpoint: TrustedCheckpoint,
        verify: bool = False,
        vectors: int = VECTORS,
        seed: int | None = None,
        progress=None,
        verifier: Verifier | None = None,
    ):
        if verify and inner.wire_dtype != "float32":
            raise UsageError(f"--verify needs float32 on the wire (got --wire-dtype {inner.wire_dtype})")
        self.inner = inner
        self.checkpoint = checkpoint
        self.verify = verify
        inner.f32_results = verify  # float32 results: the only honest error left is float32's
        self._vectors, self._seed, self._progress = vectors, seed, progress
        self.verifier = verifier  # made at init() for the server's compute dtype, unless given
        self._sessions: dict[int, SessionState] = {}
        self._pending: list[Pending] = []  # results of the current forward pass, not yet checked
        self._pending_bytes = 0
        self.ring_verifier = None  # the private plans' exact check (tee/ring_verify.py), set by them
        self.ring_only = False  # set by the private plans: their ring check replaces the float one

    # ---- what the port is, taken from the client it wraps ---------------------------------
    @property
    def config(self):
        return self.inner.config

    @property
    def metrics(self):
        return self.inner.metrics

    @property
    def retried(self) -> int:
        return self.inner.retried

    @property
    def address(self) -> str:
        return self.inner.address

    @property
    def wire_dtype(self) -> str:
        return self.inner.wire_dtype

    @wire_dtype.setter
    def wire_dtype(self, value: str) -> None:
        if self.verify and value != "float32":
            raise UsageError("--verify needs float32 on the wire")
        self.inner.wire_dtype = value

    def close(self) -> None:
        self.inner.close()

    def ping(self, payload_bytes: int = 0, reply_bytes: int = 0) -> float:
        """The link's round trip (`--plan auto` measures it); nothing to check."""
        return self.inner.ping(payload_bytes, reply_bytes)

    def init(self) -> InitResult:
        res = self._rpc(self.inner.init)
        ck = self.checkpoint
        ck.check_init(res.config, res.norms, res.biases, res.dtype)
        floats = not self.ring_only  # a private plan's port checks ring products instead
        if (
            self.verify
            and floats
            and (self.verifier is None or self.verifier.dtype != COMPUTE_DTYPES[res.dtype])
        ):
            self.verifier = Verifier(ck, res.dtype, self._vectors, self._seed, self._progress)
        # From here on the model runs on the runner's own values (equal, as just checked).
        return InitResult(ck.config, ck.norms(), ck.biases(COMPUTE_DTYPES[res.dtype]), res.dtype)

    # ---- the checks' queue ---------------------------------------------------------------
    def flush(self) -> None:
        """Check every result received since the last flush (raises IntegrityError)."""
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        if pending:
            self.verifier.check_pass(pending)

    def _rpc(self, fn, *args, **kwargs):
        """One call of the wrapped client; if it fails while checks wait, they run first, so a
        lie received earlier, and perhaps the cause, is reported first."""
        try:
            return fn(*args, **kwargs)
        except Exception:
            if self._pending:
                self.flush()
            raise

    def _check(self, op: str, layer: int | None, *payload) -> None:
        if self.verify:
            self._pending.append((op, layer, payload))
            self._pending_bytes += _arrays_nbytes(payload)
            if self._pending_bytes > PENDING_BYTES:  # a long prefill: check what came so far
                self.flush()

    # ---- checked operations ----------------------------------------------------------------
    def embedding(self, ids: np.ndarray) -> np.ndarray:
        x = self._rpc(self.inner.embedding, ids)
        self._check("Embedding", None, np.array(ids, np.int64), x)
        return x

    def linear(self, layer: int, module: str, x: np.ndarray) -> np.ndarray:
        y = self._rpc(self.inner.linear, layer, module, x)
        self._check("Linear", layer, module, x, y)
        return y

    def matmul(self, a: np.ndarray, b: np.ndarray, *, layer: int | None = None, what: str = "") -> np.ndarray:
        c = self._rpc(self.inner.matmul, a, b, layer=layer, what=what)
        self._check("Matmul", layer, a, b, c, what)
        return c

    def ring_setup(self, bits: int) -> dict:
        """The server's layout of the private plans' integers: nothing in it to check (the
        ring products are checked exactly, against the runner's own integers)."""
        return self.inner.ring_setup(bits)

    def ring_step(self, op, args, tensors, widths):
        """The private plans' masked products, checked over Z_2^64 against the inputs sent."""
        if self.verify and self.ring_verifier is None:
            raise ValueError("--verify: a ring product needs the private plan's verifier (tee/private.py)")
        out = self.inner.ring_step(op, args, tensors, widths)
        if self.ring_verifier is not None:
            self.ring_verifier.check_step(op, args.get("layer", 0), tensors, out, self.address)
        return out

    def lm_head(self, x: np.ndarray, after_send=None) -> np.ndarray:
        if not self.verify:
            return self.inner.lm_head(x, after_send)
        # The pass's checks run while the server computes the logits.
        y = self._rpc(self.inner.lm_head, x, after_send=self.flush)
        self._check("LMHead", None, x, y)
        self.flush()  # the end of a forward pass: nothing reaches the sampler unchecked
        return y

    def lm_head_top_k(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if not self.verify:
            return self.inner.lm_head_top_k(x, k)
        logits = self.lm_head(x)  # top-k values cannot be checked: fetch the row, check it, reduce
        ids = top_k_ids(logits, k)
        return np.take_along_axis(logits, ids, axis=-1), ids

    def qkv(
        self, layer: int, x: np.ndarray, sid: int | None = None, pos: np.ndarray | None = None
    ) -> np.ndarray:
        if not self.verify or sid is None:
            y = self._rpc(self.inner.qkv, layer, x, sid, pos)
            self._check("QKV", layer, x, y)
            return y
        # With a session and f32 the server returns v as well as writing it: checked with q|k
        # against the q|k|v fingerprint, it feeds AttnOut's check; the model gets q|k only.
        c = self.config
        pos = np.array(pos, np.int64)
        y = self._rpc(self.inner.qkv, layer, x, sid, pos, with_v=True)
        self._check("QKV+v", layer, self._sessions[sid], pos, x, y)
        return y[..., : c.q_dim + c.kv_dim]

    def gate_up(self, layer: int, x: np.ndarray) -> np.ndarray:
        y = self._rpc(self.inner.gate_up, layer, x)
        self._check("GateUp", layer, x, y)
        return y

    def attn_scores(self, sid, layer, q, k, pos, r=None) -> np.ndarray:
        if self.verify and r is not None:
            raise UsageError("--verify does not support the merged plans")
        scores = self._rpc(self.inner.attn_scores, sid, layer, q, k, pos, r)
        if self.verify:
            self._check("AttnScores", layer, self._sessions[sid], q, k, np.array(pos, np.int64), scores)
        return scores

    def attn_out(self, sid: int, layer: int, p: np.ndarray) -> np.ndarray:
        o = self._rpc(self.inner.attn_out, sid, layer, p)
        if self.verify:
            self._check("AttnOut", layer, self._sessions[sid], p, o)
        return o

    def write_kv(self, sid: int, layer: int, k: np.ndarray, v: np.ndarray, pos: np.ndarray) -> None:
        if self.verify:  # the session's fingerprints would have to be built from K/V it never saw
            raise UsageError(
                "--verify does not support a plan per phase (a prefill's K/V uploaded to a session)"
            )
        self._rpc(self.inner.write_kv, sid, layer, k, v, pos)

    def open_session(self, batch: int, max_tokens: int) -> int:
        sid = self._rpc(self.inner.open_session, batch, max_tokens)
        if self.verify:
            self._sessions[sid] = self.verifier.open_session(batch, max_tokens)
        return sid

    def close_session(self, sid: int) -> None:
        state = self._sessions.pop(sid, None)
        if state is not None:  # an unfinished pass's results on it: nothing was emitted from them
            self._pending = [p for p in self._pending if not (p[0] in _STATEFUL and p[2][0] is state)]
            self._pending_bytes = sum(_arrays_nbytes(p[2]) for p in self._pending)
        self._rpc(self.inner.close_session, sid)

    # ---- the merged plans: their results cannot be checked; without --verify they pass through
    # (the trusted-parameter check still applies to them) ------------------------------------
    def _unchecked(self):
        if self.verify:
            raise UsageError(f"--verify supports the plans {', '.join(VERIFIED_PLANS)}, not the merged plans")
        return self.inner

    def embed_qkv(self, ids, sid=None, pos=None):
        return self._unchecked().embed_qkv(ids, sid, pos)

    def down_qkv(self, layer, m, x, sid=None, pos=None):
        return self._unchecked().down_qkv(layer, m, x, sid, pos)

    def down_lm_head(self, m, x, rows, top_k):
        return self._unchecked().down_lm_head(m, x, rows, top_k)

    def o_gate_up(self, layer, a, x):
        return self._unchecked().o_gate_up(layer, a, x)

    def attn_out_gate_up(self, sid, layer, p, x):
        return self._unchecked().attn_out_gate_up(sid, layer, p, x)


def _arrays_nbytes(payload: tuple) -> int:
    return sum(a.nbytes for a in payload if isinstance(a, np.ndarray))


def top_k_ids(logits: np.ndarray, k: int) -> np.ndarray:
    """The ids of the k largest values of each row (..., V), largest first, ties by lowest id
    (what a stable argsort of -logits gives), in O(V) per row instead of a full sort."""
    flat = logits.reshape(-1, logits.shape[-1])
    V = flat.shape[1]
    k = min(k, V)
    out = np.empty((flat.shape[0], k), np.int64)
    for r, row in enumerate(flat):
        kth = np.partition(row, V - k)[V - k]  # the k-th largest value
        above = np.flatnonzero(row > kth)
        ties = np.flatnonzero(row == kth)[: k - above.size]
        chosen = np.concatenate([above, ties])
        out[r] = chosen[np.argsort(-row[chosen], kind="stable")]
    return out.reshape(*logits.shape[:-1], k)
