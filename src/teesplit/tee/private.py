"""The private plans: the GPU computes on masked data only (TRUSTED side).

Placement and crossings are v2-merged's (tee/plans.py): attention, the KV cache and every
non-linear step stay here, and each layer crosses twice, 2L + 1 round trips per token:
o_proj with gate|up, down_proj with the next layer's q|k|v, the embedding's q|k|v and the last
down_proj with the LM head. Every GPU operation on those paths is linear (the products, the
RMSNorm gain as a diagonal folded into the product after it, the residual add), so it works
on masked values. The embedding is looked up here (no token id crosses); the logits come back
masked and are sampled here.

Arithmetic: exact, over the ring Z_2^64, with the integer weights of teesplit/quant.py
(`--private-weights int16`, the default, or `int8`), which the server derives from its own
weights by the same rule. Per ring step (`RingStep`) and input row, the trusted side picks a
number of fractional bits f and sends

    A = rint(a 2^f)              (o_proj's or down_proj's input, when the step has one)
    X = rint((x + b) 2^f / δ)    (the residual x plus that Linear's bias b, on the grid δ of
                                  its integer weights: quant.py rule 3)

minus a fresh uniform pad. The server computes O = A Qᵀ, S = X + mult ⊙ O and Z = S Q'ᵀ; the
true (unmasked) integers equal 2^f/c o, 2^f/δ (x + o) and 2^f/(s' δ) z, and f is the largest
(at most X_FRAC_BITS) for which Cauchy-Schwarz bounds keep all three below 2^62, so nothing
wraps. Decoding: o = c 2^-f O + b, z = s' δ 2^-f Z, where z = W' (w ⊙ (x + o)) is the
unscaled product the merged plans return (the model applies RMSNorm's row scale and the
next Linear's bias, tee/model.py).

- `private-otp` (one server): the pads r and their unblinding factors u = r_a Qᵀ and
  v = (r_x + mult ⊙ u) Q'ᵀ are made ahead by `PadPool`, a background thread, from the trusted
  side's copy of the integers; each `Pad` is consumed once (`PadReuseError` otherwise). In
  steady state this bounds throughput by the trusted side's own matrix speed: one ring product
  of every weight per token (`PadPool.stats`).
- `private-2party` (two non-colluding servers): each input is split into two additive shares,
  X - r and r, one to each server; the replies add up. Server b's share r does not depend on
  the data, so a background thread has b multiply fresh shares ahead of need, and a decode
  step then asks only server a (a one-time pad whose unblinding factors server b made);
  without ready shares both servers are asked online, in parallel. Either way the trusted
  side multiplies nothing: its throughput is bounded by the servers, not by its own CPU.

Every pad and share is fresh: os.urandom per use, never combined from reused vectors (a pad
that is a combination of a fixed basis lets the server cancel it: arXiv 2602.11088).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from teesplit import quant
from teesplit.config import ModelConfig
from teesplit.errors import UsageError
from teesplit.quant import SiteSpec
from teesplit.tee.client import GPUClient
from teesplit.tee.local_weights import LocalWeights
from teesplit.tee.port import InitResult, Metrics

X_FRAC_BITS = 60  # the most fractional bits of an input row: the bounds below set f, this caps it
MIN_FRAC_BITS = -16  # fewer would mean activations beyond any trained model's range
_HEADROOM = 2.0**62  # |true integer| stays below this: an int64 holds it with a bit to spare
_LAYER_OPS = ("RingOGateUp", "RingDownQKV")  # the ring operations that name a layer


class PadReuseError(RuntimeError):
    """A one-time pad was used a second time (which would let the GPU subtract two inputs)."""


def random_ring(shape: tuple[int, ...]) -> np.ndarray:
    """Uniform elements of Z_2^64 as int64, fresh from the operating system's CSPRNG."""
    n = math.prod(shape)
    return np.frombuffer(os.urandom(8 * n), np.int64).reshape(shape).copy()


# ---- the integers, as the trusted side needs them ------------------------------------------
@dataclass
class RingSite:
    """One site of quant.py's rule: its scales, and the norms that bound its products."""

    spec: SiteSpec
    scale: np.ndarray  # (N,) float64
    mult: np.ndarray | None  # (N,) int64, residual sites
    base: float  # δ, residual sites (1 for composite ones)
    row_norm: float  # max_k ||q_k||₂
    sigma: float  # residual sites: an upper bound of the spectral norm of diag(mult) q
    q: np.ndarray | None  # (N, K) int16/int8, kept where pads are made (private-otp)

    @classmethod
    def of(cls, spec: SiteSpec, iw: quant.IntWeights, keep_q: bool) -> RingSite:
        q = iw.q if keep_q else None
        return cls(spec, iw.scale, iw.mult, iw.base, max(iw.row_norm, 1.0), iw.sigma, q)


class RingSites:
    """Every private site's integers by quant.py's rule, from the local checkpoint rounded to
    the server's weight dtype `source`. `on_site(spec, iw)` sees each site's integers once
    (the --verify fingerprints are made there)."""

    def __init__(
        self,
        lw: LocalWeights,
        bits: int,
        source: str,
        keep_q: bool,
        on_site: Callable[[SiteSpec, quant.IntWeights], None] | None = None,
    ):
        def rows_of(layer: int, site: str):
            w = lw.weight(layer, site)
            return lambda a, b: w[a:b]

        self.bits, self.source = bits, source
        self.sites: dict[tuple[int, str], RingSite] = {}
        for spec, iw in quant.quantize_model(lw.config, rows_of, lw.norms, bits, source, bounds=True):
            if on_site is not None:
                on_site(spec, iw)
            self.sites[(spec.layer, spec.site)] = RingSite.of(spec, iw, keep_q)

    def __getitem__(self, spec: SiteSpec) -> RingSite:
        return self.sites[(spec.layer, spec.site)]

    @property
    def nbytes(self) -> int:
        return sum(0 if s.q is None else s.q.nbytes for s in self.sites.values())


@dataclass(frozen=True)
class RingStep:
    """One crossing of the private plans: a ring operation, its products and its input widths."""

    index: int
    op: str
    layer: int  # the layer of its first product (0 for the embedding's step)
    first: SiteSpec | None  # o_proj or down_proj; None for the embedding's step
    second: SiteSpec  # the product after the norm: gate|up, q|k|v or the LM head
    bias: str | None  # the first product's bias in LocalWeights ("o", "down"), folded into x

    @property
    def args(self) -> dict[str, int]:
        return {"layer": self.layer} if self.op in _LAYER_OPS else {}


def ring_steps(config: ModelConfig) -> list[RingStep]:
    """The 2L + 1 steps of a forward pass, in order: the embedding's q|k|v, then per layer
    o_proj + gate|up and down_proj + (the next q|k|v or the LM head)."""
    L = config.num_layers
    out = []
    for op, layer in [("RingEmbedQKV", 0)] + [
        (o, i) for i in range(L) for o in ("RingOGateUp", "RingDownLMHead" if i == L - 1 else "RingDownQKV")
    ]:
        first, second = quant.step_sites(op, layer, L)
        out.append(RingStep(len(out), op, layer, first, second, None if first is None else first.site))
    return out


class RingCodec:
    """Fixed point in and out of the ring for each step (see the module docstring)."""

    def __init__(self, sites: RingSites, lw: LocalWeights):
        self.sites, self.lw = sites, lw

    def encode(
        self, step: RingStep, a: np.ndarray | None, x: np.ndarray
    ) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        """a (R, Ka) or None, x (R, E) float -> A (R, Ka) and X (R, E) int64, f (R, 1)."""
        second = self.sites[step.second]
        first = None if step.first is None else self.sites[step.first]
        x64 = x.astype(np.float64)
        bias = None if step.bias is None else self.lw.bias(step.layer, step.bias)
        if bias is not None:
            x64 += bias
        if first is not None:
            x64 /= first.base
        a64 = None if a is None else a.astype(np.float64)
        if not np.isfinite(x64).all() or (a64 is not None and not np.isfinite(a64).all()):
            raise ValueError(f"{step.op} of layer {step.layer}: NaN or Inf in an activation")
        nx = np.sqrt((x64 * x64).sum(axis=1, keepdims=True))  # (R, 1)
        E = x.shape[1]
        # |Z_k| <= (||X|| + ||A|| σ) ρ', with ||X|| <= 2^f ||x'|| + ½√E (rounding), likewise A
        room = _HEADROOM / second.row_norm - 0.5 * math.sqrt(E)
        lin, room_o = nx, 1.0
        if first is not None:
            Ka = a.shape[1]
            na = np.sqrt((a64 * a64).sum(axis=1, keepdims=True))
            room -= 0.5 * math.sqrt(Ka) * first.sigma
            lin = nx + na * first.sigma
            room_o = _HEADROOM / first.row_norm - 0.5 * math.sqrt(Ka)  # |O_j| <= ||A|| ρ
        if room <= 0 or room_o <= 0:
            raise ValueError(f"{step.op} of layer {step.layer}: the weights leave no room in the ring")
        f = np.floor(np.log2(room / np.maximum(lin, 1e-300)))
        if first is not None:
            f = np.minimum(f, np.floor(np.log2(room_o / np.maximum(na, 1e-300))))
        f = np.minimum(f, X_FRAC_BITS)
        if (f < MIN_FRAC_BITS).any():
            raise ValueError(f"{step.op} of layer {step.layer}: an input row too large for the ring encoding")
        scale = np.exp2(f)
        A = None if a64 is None else np.rint(a64 * scale).astype(np.int64)
        return A, np.rint(x64 * scale).astype(np.int64), f

    def decode(
        self, step: RingStep, o_ring: np.ndarray | None, z_ring: np.ndarray, f: np.ndarray
    ) -> tuple[np.ndarray | None, np.ndarray]:
        """The unmasked ring results -> o (R, E) float32 with its bias, z (R, N') float32."""
        second = self.sites[step.second]
        first = None if step.first is None else self.sites[step.first]
        inv = np.exp2(-f)  # (R, 1)
        z = z_ring.astype(np.float64) * (second.scale * (1.0 if first is None else first.base)) * inv
        if first is None:
            return None, z.astype(np.float32)
        o = o_ring.astype(np.float64) * first.scale * inv
        bias = self.lw.bias(step.layer, step.bias)
        if bias is not None:
            o += bias
        return o.astype(np.float32), z.astype(np.float32)


# ---- one-time pads (private-otp) -------------------------------------------------------------
class Pad:
    """A one-time pad for `rows` inputs of one step: (r_a, r_x, u, v), see PadPool._make."""

    __slots__ = ("key", "_parts", "_lock")

    def __init__(self, key: int, parts: tuple):
        self.key, self._parts = key, parts
        self._lock = threading.Lock()

    @property
    def rows(self) -> int:
        return 0 if self._parts is None else len(self._parts[1])

    def consume(self) -> tuple:
        """The pad, once; a second call raises PadReuseError."""
        with self._lock:
            parts, self._parts = self._parts, None
        if parts is None:
            raise PadReuseError(f"the one-time pad of step {self.key} was already used")
        return parts


def local_pad_maker(sites: RingSites, steps: list[RingStep]) -> Callable[[int, int], tuple]:
    """private-otp's pads, made by the trusted side itself: for step `index` and n rows,
    r_a (n, Ka), r_x (n, E) fresh and uniform, u = r_a Qᵀ and v = (r_x + mult ⊙ u) Q'ᵀ mod 2^64."""
    if any(s.q is None for s in sites.sites.values()):
        raise ValueError("local pads need the integer weights (RingSites with keep_q)")

    def make(index: int, n: int) -> tuple:
        step = steps[index]
        second = sites[step.second]
        r_x = random_ring((n, second.q.shape[1]))
        if step.first is None:
            return None, r_x, None, quant.ring_matmul(r_x, second.q)
        first = sites[step.first]
        r_a = random_ring((n, first.q.shape[1]))
        u = quant.ring_matmul(r_a, first.q)
        return r_a, r_x, u, quant.ring_matmul(r_x + u * first.mult, second.q)  # int64 wraps

    return make


class PadPool:
    """Makes pads ahead of need in a background thread, `depth` rows (tokens) per step.

    A pad for a step with a first product Q (o_proj or down_proj) and a second Q' is
    (r_a, r_x, u, v): r_a, r_x fresh and uniform, u = r_a Qᵀ and v = (r_x + mult ⊙ u) Q'ᵀ
    mod 2^64, so that the reply to the masked inputs A - r_a, X - r_x is (O - u, Z - v).
    `make(index, n)` makes n rows of step `index`: in the trusted side (`local_pad_maker`,
    private-otp) or on the second server (private-2party). A request for more rows than are
    ready is completed inline, and that time is counted separately (`inline_s`), so the cost
    is reported either way, never hidden. An error of the pad thread (a server gone, a reply
    failing its check) is raised by the next `take`."""

    def __init__(
        self,
        sites: RingSites,
        steps: list[RingStep],
        depth: int = 32,
        chunk: int = 8,
        make: Callable[[int, int], tuple] | None = None,
    ):
        if depth < 0 or chunk < 1:
            raise ValueError("pad pool depth must be >= 0 and chunk >= 1")
        self.sites, self.steps, self.depth, self.chunk = sites, steps, depth, chunk
        self._make = make or local_pad_maker(sites, steps)
        self._stock: dict[int, deque] = {s.index: deque() for s in steps}
        self._rows = Counter()  # ready rows per step
        self._cond = threading.Condition()
        self._stop = False
        self._held = False  # `hold()`: the pad thread waits (a benchmark measuring the online cost)
        self.error: BaseException | None = None  # what stopped the pad thread
        self.background_cpu_s = 0.0  # CPU time of the pad thread
        self.background_rows = 0  # rows made per step by the pad thread
        self.inline_s = 0.0  # time spent making pads on the critical path
        self.inline_rows = 0
        self.peak_bytes = 0
        self._thread = None
        if depth:
            self._thread = threading.Thread(target=self._fill, name="pad-pool", daemon=True)
            self._thread.start()

    @property
    def nbytes(self) -> int:
        with self._cond:
            return self._nbytes()

    def _nbytes(self) -> int:
        return sum(p.nbytes for q in self._stock.values() for parts in q for p in parts if p is not None)

    def _fill(self) -> None:
        try:
            self._fill_until_stopped()
        except BaseException as e:  # raised in the model's thread by the next take()
            with self._cond:
                self.error = e
                self._cond.notify_all()

    def _fill_until_stopped(self) -> None:
        t_cpu = time.thread_time()
        while True:
            with self._cond:
                while not self._stop and (
                    self._held or min(self._rows.get(k, 0) for k in self._stock) >= self.depth
                ):
                    self._cond.wait()
                if self._stop:
                    return
            for index in self._stock:  # one chunk of rows for every step, in forward-pass order
                if self._stop:
                    return
                block = self._make(index, self.chunk)
                with self._cond:
                    self._stock[index].append(block)
                    self._rows[index] += self.chunk
            with self._cond:
                self.background_rows += self.chunk
                self.background_cpu_s += time.thread_time() - t_cpu
                t_cpu = time.thread_time()
                self.peak_bytes = max(self.peak_bytes, self._nbytes())

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def _pop(self, index: int, n: int) -> list[tuple]:
        """Up to n ready rows of step `index`, as blocks (the caller holds the lock)."""
        parts, need = [], n
        q = self._stock[index]
        while need and q:
            block = q.popleft()
            rows = len(block[1])
            if rows > need:  # split the block: the rest stays for later rows
                q.appendleft(tuple(None if p is None else p[need:] for p in block))
                block = tuple(None if p is None else p[:need] for p in block)
                rows = need
            parts.append(block)
            need -= rows
            self._rows[index] -= rows
        self._cond.notify()
        return parts

    def take(self, index: int, n: int) -> Pad:
        """A fresh pad for n rows of step `index`: ready rows first, the rest made now."""
        self._check()
        with self._cond:
            parts = self._pop(index, n)
        need = n - sum(len(b[1]) for b in parts)
        if need:
            t0 = time.perf_counter()
            parts.append(self._make(index, need))
            self.inline_s += time.perf_counter() - t0
            self.inline_rows += need
        return _joined(index, parts)

    def take_ready(self, index: int, n: int) -> Pad | None:
        """A pad for n rows of step `index` if that many are ready, else None (nothing taken)."""
        self._check()
        with self._cond:
            if self._rows.get(index, 0) < n:
                return None
            parts = self._pop(index, n)
        return _joined(index, parts)

    @contextlib.contextmanager
    def hold(self):
        """While inside, the pad thread makes nothing (after the chunk it is making): for
        measuring the online cost apart from the offline one. Pads taken beyond the stock are
        still made inline, and counted."""
        with self._cond:
            self._held = True
        try:
            yield
        finally:
            with self._cond:
                self._held = False
                self._cond.notify_all()

    def wait_full(self, timeout_s: float | None = None) -> bool:
        """Block until every step has `depth` rows ready (True), or the timeout passed (False)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while min(self._rows.get(k, 0) for k in self._stock) < self.depth:
            self._check()
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def stats(self) -> dict[str, float]:
        rows = self.background_rows + self.inline_rows / max(len(self.steps), 1)
        return {
            "background_cpu_s": self.background_cpu_s,
            "inline_s": self.inline_s,
            "tokens_made": rows,  # pads for one token at every step count as one
            "cpu_ms_per_token": 1000 * (self.background_cpu_s + self.inline_s) / rows if rows else 0.0,
            "bytes_now": self.nbytes,
            "peak_bytes": self.peak_bytes,
            "weights_bytes": self.sites.nbytes,  # the integers kept to make pads (private-otp)
        }

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()


def _joined(index: int, parts: list[tuple]) -> Pad:
    if len(parts) == 1:
        return Pad(index, parts[0])
    return Pad(index, tuple(None if ps[0] is None else np.concatenate(ps) for ps in zip(*parts, strict=True)))


# ---- the object the model calls as `self.gpu` ------------------------------------------------
class _PrivateGPU:
    """The private plans' port (`tee.port.GPUPort`): what TEELlamaModel calls as `self.gpu`
    under a private plan, the merged plans' calls (embed_qkv, o_gate_up, down_qkv,
    down_lm_head), each one masked ring step.

    `init` checks the server(s) (the client's own Init checks, then the same model as the
    local checkpoint), has them quantize (RingSetup), quantizes the local checkpoint the same
    way, and returns the trusted config, norm weights and the biases the model adds."""

    private = True  # the model refuses a private plan on any port without this

    def __init__(self, weights: LocalWeights, clients: list[GPUClient], bits: int, keep_q: bool):
        for c in clients:
            if c.wire_dtype != "float32":
                raise UsageError(
                    "the private plans send fixed-point ring elements (int64) on the wire; "
                    f"--wire-dtype {c.wire_dtype} does not apply to them (leave it unset)"
                )
        if bits not in quant.QMAX:
            raise UsageError(f"private weights have 8 or 16 bits, got {bits}")
        self.lw = weights
        self.clients = clients
        self.config: ModelConfig = weights.config
        self.bits = bits
        self.keep_q = keep_q
        self.steps = ring_steps(self.config)
        self.sites: RingSites | None = None  # made in init(), once the servers' dtype is known
        self.codec: RingCodec | None = None
        self.server_setup: list[dict] = []  # each server's RingSetup reply
        self.verifier = None  # --verify: every client's ring products checked (tee/ring_verify.py)
        self._verify = any(getattr(c, "verify", False) for c in clients)
        if self._verify and not all(getattr(c, "verify", False) for c in clients):
            raise UsageError("--verify must cover every GPU server of a private plan")
        for c in clients:
            if self._verify:
                c.ring_only = True  # no float fingerprints: the ring check replaces them

    # ---- the GPUClient surface the model uses ---------------------------------------------
    def init(self) -> InitResult:
        sources = self._on_each([lambda c=c: self._check_server(c) for c in self.clients])
        if len(set(sources)) != 1:
            raise UsageError(
                "the two GPU servers keep their weights in different dtypes "
                f"({' and '.join(sources)}): start both with the same --dtype"
            )
        self._build(sources[0])
        return InitResult(config=self.config, norms=self.lw.norms, biases=self._biases(), dtype=sources[0])

    def _on_each(self, calls: list) -> list:
        return [f() for f in calls]

    def _check_server(self, c: GPUClient) -> str:
        """The client's own Init checks (version, shapes), the local model's shape, and the
        server's RingSetup for this weight format; returns the dtype it quantized from."""
        res = c.init()
        remote = res.config
        for name in ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_layers"):
            if getattr(remote, name) != getattr(self.config, name):
                raise UsageError(
                    f"the GPU server at {c.address} serves a different model ({name}="
                    f"{getattr(remote, name)!r}, the local checkpoint has {getattr(self.config, name)!r})"
                )
        for name in ("num_heads", "num_kv_heads", "head_dim"):
            if getattr(remote, name) != getattr(self.config, name):
                raise UsageError(f"the GPU server at {c.address} serves a model with another {name}")
        setup = c.ring_setup(self.bits)
        if setup["source"] != res.dtype or setup["source"] not in quant.SOURCE_DTYPES:
            raise ValueError(
                f"the GPU server at {c.address} quantizes from {setup['source']!r} weights but computes "
                f"in {res.dtype}: a server of another teesplit release?"
            )
        self.server_setup.append({"address": c.address, **setup})
        return setup["source"]

    def _build(self, source: str) -> None:
        on_site = None
        if self._verify:
            from teesplit.tee.ring_verify import RingVerifier

            self.verifier = RingVerifier(self.config)
            on_site = self.verifier.add
            for c in self.clients:
                c.ring_verifier = self.verifier
        self.sites = RingSites(self.lw, self.bits, source, self.keep_q, on_site)
        if self.verifier is not None:
            self.verifier.finish()
        self.codec = RingCodec(self.sites, self.lw)

    def _biases(self) -> dict[str, np.ndarray]:
        """The biases the merged forward pass adds after scaling (q|k|v, gate|up); o_proj's and
        down_proj's ride in the ring steps."""
        out = {}
        for name in ("qkv", "gate_up"):
            rows = [self.lw.bias(i, name) for i in range(self.config.num_layers)]
            if all(b is not None for b in rows):
                out[name] = np.stack(rows).astype(np.float32)
        return out

    @property
    def server_private_bytes_per_weight(self) -> float | None:
        """The largest resident bytes per weight of the private sites over the servers."""
        return max((s["bytes_per_weight"] for s in self.server_setup), default=None)

    def embedding(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size})")
        return self.lw.embed[ids]  # (B, T, E), looked up here: no id leaves the trusted side

    def embed_qkv(self, ids: np.ndarray, sid=None, pos=None) -> tuple[np.ndarray, np.ndarray]:
        """x0 = embedding(ids), looked up here, and layer 0's unscaled q|k|v."""
        self._no_session(sid)
        x = self.embedding(ids)
        _, z = self._step(self.steps[0], None, x)
        return x, z

    def o_gate_up(self, layer: int, a: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """o = o_proj(a) and the unscaled gate|up on x + o."""
        return self._step(self._layer_step(layer, 1), a, x)

    def down_qkv(self, layer: int, m: np.ndarray, x: np.ndarray, sid=None, pos=None):
        """y = down(m) and the next layer's unscaled q|k|v on x + y."""
        self._no_session(sid)
        if not 0 <= layer < self.config.num_layers - 1:
            raise ValueError(f"down_qkv: layer must lie in [0, {self.config.num_layers - 1})")
        return self._step(self._layer_step(layer, 2), m, x)

    def down_lm_head(self, m: np.ndarray, x: np.ndarray, rows: np.ndarray | None, top_k: int | None):
        """Last layer: y = down(m) and the unscaled logits at `rows` (or their top-k, ranked
        here: the GPU cannot rank masked logits). Only the rows asked for are sent."""
        if rows is not None:
            B = x.shape[0]
            rows = np.asarray(rows, np.int64)
            m, x = m[np.arange(B), rows][:, None], x[np.arange(B), rows][:, None]  # (B, 1, ·)
        y, z = self._step(self.steps[-1], m, x)
        if top_k is None:
            return y, z
        ids = np.argpartition(-z, top_k - 1, axis=-1)[..., :top_k]
        values = np.take_along_axis(z, ids, axis=-1)
        order = np.argsort(-values, axis=-1, kind="stable")
        return y, np.take_along_axis(values, order, -1), np.take_along_axis(ids, order, -1).astype(np.int64)

    def _layer_step(self, layer: int, offset: int) -> RingStep:
        if not 0 <= layer < self.config.num_layers:
            raise ValueError(f"layer {layer} out of range [0, {self.config.num_layers})")
        return self.steps[2 * layer + offset]

    def _no_session(self, sid) -> None:
        if sid is not None:
            raise ValueError("the private plans keep the KV cache in the trusted side")

    def _step(self, step: RingStep, a: np.ndarray | None, x: np.ndarray):
        """One masked crossing: (B, T, ·) float32 in; o (or None) and z (B, T, ·) float32 out."""
        if self.codec is None:
            raise RuntimeError("the private plan's init() has not run")
        lead = x.shape[:-1]
        a2 = None if a is None else a.reshape(-1, a.shape[-1])
        A, X, f = self.codec.encode(step, a2, x.reshape(-1, x.shape[-1]))
        o_ring, z_ring = self._ring_step(step, A, X, lead)  # the exact, unmasked results (R, ·)
        o, z = self.codec.decode(step, o_ring, z_ring, f)
        return (None if o is None else o.reshape(*lead, -1)), z.reshape(*lead, -1)

    def _ring_step(self, step: RingStep, A, X, lead) -> tuple[np.ndarray | None, np.ndarray]:
        raise NotImplementedError

    def _send(self, c: GPUClient, step: RingStep, A, X, lead) -> list[np.ndarray]:
        """One client's ring operation on (A, X) (R, ·) int64; replies (R, ·) int64."""
        tensors = [X.reshape(*lead, -1)] if A is None else [A.reshape(*lead, -1), X.reshape(*lead, -1)]
        widths = [quant.site_shape(self.config, step.second.site)[0]]
        if step.first is not None:
            widths.insert(0, self.config.hidden_size)
        out = c.ring_step(step.op, {**step.args, "bits": self.bits}, tensors, widths)
        return [o.reshape(-1, o.shape[-1]) for o in out]

    def open_session(self, batch: int, max_tokens: int) -> int:
        raise ValueError("the private plans keep the KV cache in the trusted side")

    def close_session(self, sid: int) -> None:
        raise ValueError("the private plans open no GPU session")


class PrivateOTP(_PrivateGPU):
    """Plan private-otp: one GPU server, one-time pads with precomputed unblinding factors."""

    def __init__(
        self,
        weights: LocalWeights,
        client: GPUClient,
        pool_depth: int = 32,
        pool_chunk: int = 8,
        bits: int = 16,
    ):
        super().__init__(weights, [client], bits, keep_q=True)
        self.gpu = client
        self.pool: PadPool | None = None  # started by init(), once the integers are known
        self._pool_args = (pool_depth, pool_chunk)

    def _build(self, source: str) -> None:
        super()._build(source)
        self.pool = PadPool(self.sites, self.steps, *self._pool_args)

    @property
    def metrics(self) -> Metrics:
        return self.gpu.metrics

    @property
    def retried(self) -> int:
        return self.gpu.retried

    @property
    def address(self) -> str:
        return self.gpu.address

    def _ring_step(self, step: RingStep, A, X, lead):
        r_a, r_x, u, v = self.pool.take(step.index, len(X)).consume()
        if A is None:  # int64 arithmetic wraps modulo 2^64
            (z,) = self._send(self.gpu, step, None, X - r_x, lead)
            return None, z + v
        o, z = self._send(self.gpu, step, A - r_a, X - r_x, lead)
        return o + u, z + v

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
        self.gpu.close()


class PrivateTwoParty(_PrivateGPU):
    """Plan private-2party: additive shares to two non-colluding servers.

    Server b's inputs are the shares r, which do not depend on the data, so its products can
    be made ahead: a background thread (`PadPool` with `depth` > 0) sends fresh shares to b
    and keeps its replies, and a decode step then needs only server a: a one-time pad whose
    unblinding factors server b made. Where no shares are ready (a prefill longer than the
    pool, or `depth` 0), both servers get their share online, in parallel. Either way the
    trusted side multiplies nothing; every share is fresh and used once."""

    def __init__(
        self,
        weights: LocalWeights,
        client_a: GPUClient,
        client_b: GPUClient,
        bits: int = 16,
        pool_depth: int = 32,
        pool_chunk: int = 8,
    ):
        if client_a.address == client_b.address and client_a.address != "local":
            raise UsageError(f"private-2party needs two different GPU servers; both are {client_a.address}")
        super().__init__(weights, [client_a, client_b], bits, keep_q=False)
        self.a, self.b = client_a, client_b
        self._other = ThreadPoolExecutor(max_workers=1, thread_name_prefix="server-b")  # b's own thread
        self._b_lock = threading.Lock()  # b's client: the share thread and online steps take turns
        self._metrics_lock = threading.Lock()
        self.metrics = Metrics()  # the critical path: online round trips, both servers' bytes
        self.share_metrics = Metrics()  # server b's work on shares made ahead, off the critical path
        self.pool: PadPool | None = None  # started by init(), with depth > 0
        self._pool_args = (pool_depth, pool_chunk)

    def _build(self, source: str) -> None:
        super()._build(source)
        depth, chunk = self._pool_args
        if depth:
            self.pool = PadPool(self.sites, self.steps, depth, chunk, make=self._shares_from_b)

    @property
    def retried(self) -> int:
        return self.a.retried + self.b.retried

    @property
    def address(self) -> str:
        return f"{self.a.address} + {self.b.address}"

    def _on_b(self, f):
        """f() with b's client to ourselves; its result and b's metrics for that call."""
        with self._b_lock:
            m0 = self.b.metrics.copy()
            out = f()
            return out, self.b.metrics - m0

    def _both(self, fa, fb):
        """fa() here and fb() on b's thread, at the same time; metrics merged."""
        ma = self.a.metrics.copy()
        t0 = time.perf_counter()
        future = self._other.submit(self._on_b, fb)
        try:
            ra = fa()
        finally:
            rb, db = future.result()  # a failure on either side is raised here, after both ended
        da = self.a.metrics - ma
        with self._metrics_lock:
            m = self.metrics
            m.rpc_wall_s += time.perf_counter() - t0
            m.gpu_s += max(da.gpu_s, db.gpu_s)
            _add_traffic(m, da)
            _add_traffic(m, db)
        return ra, rb

    def _on_each(self, calls: list) -> list:
        return list(self._both(*calls))

    def _shares_from_b(self, index: int, n: int) -> tuple:
        """n rows of step `index`, made ahead: fresh shares r_a, r_x and server b's products
        u = r_a Qᵀ, v = (r_x + mult ⊙ u) Q'ᵀ (the pad thread's maker)."""
        step = self.steps[index]
        r_x = random_ring((n, self.config.hidden_size))
        r_a = (
            None
            if step.first is None
            else random_ring((n, quant.site_shape(self.config, step.first.site)[1]))
        )
        out, d = self._on_b(lambda: self._send(self.b, step, r_a, r_x, (1, n)))
        with self._metrics_lock:
            _add_traffic(self.share_metrics, d)
            self.share_metrics.gpu_s += d.gpu_s
            self.share_metrics.rpc_wall_s += d.rpc_wall_s
        return (r_a, r_x, None, out[0]) if r_a is None else (r_a, r_x, out[0], out[1])

    def _ring_step(self, step: RingStep, A, X, lead):
        pad = None if self.pool is None else self.pool.take_ready(step.index, len(X))
        if pad is not None:  # server b's products were made ahead: only server a is asked now
            r_a, r_x, u, v = pad.consume()
            m0 = self.a.metrics.copy()
            out = self._send(self.a, step, None if A is None else A - r_a, X - r_x, lead)
            with self._metrics_lock:
                d = self.a.metrics - m0
                self.metrics.rpc_wall_s += d.rpc_wall_s
                self.metrics.gpu_s += d.gpu_s
                _add_traffic(self.metrics, d)
            if A is None:  # int64 arithmetic wraps modulo 2^64
                return None, out[0] + v
            return out[0] + u, out[1] + v
        X_b = random_ring(X.shape)  # each share alone is uniform, and fresh
        A_b = None if A is None else random_ring(A.shape)
        X_a, A_a = X - X_b, None if A is None else A - A_b
        ra, rb = self._both(
            lambda: self._send(self.a, step, A_a, X_a, lead), lambda: self._send(self.b, step, A_b, X_b, lead)
        )
        if A is None:
            return None, ra[0] + rb[0]
        return ra[0] + rb[0], ra[1] + rb[1]

    def close(self) -> None:
        try:
            if self.pool is not None:
                self.pool.close()  # after its request in flight, if any
            self.a.close()
            self._other.submit(self.b.close).result()
        finally:
            self._other.shutdown()


def _add_traffic(m: Metrics, d: Metrics) -> None:
    m.rpc.update(d.rpc)
    m.bytes_to_gpu += d.bytes_to_gpu
    m.bytes_from_gpu += d.bytes_from_gpu


def private_gpu(
    plan_name: str,
    weights: LocalWeights,
    clients: list[GPUClient],
    pool_depth: int = 32,
    weights_format: str = "int16",
) -> PrivateOTP | PrivateTwoParty:
    """The `gpu` object for a private plan: one client for private-otp, two for private-2party;
    `pool_depth` is --pad-pool (tokens of pads, or of server b's shares, made ahead),
    `weights_format` is --private-weights (int16 or int8)."""
    bits = quant.weight_bits(weights_format)
    if plan_name == "private-otp":
        if len(clients) != 1:
            raise UsageError(f"private-otp talks to one GPU server, got {len(clients)}")
        return PrivateOTP(weights, clients[0], pool_depth, bits=bits)
    if plan_name == "private-2party":
        if len(clients) != 2:
            raise UsageError(
                "private-2party needs two non-colluding GPU servers (--server A --server B), "
                f"got {len(clients)}"
            )
        return PrivateTwoParty(weights, clients[0], clients[1], bits=bits, pool_depth=pool_depth)
    raise ValueError(f"{plan_name!r} is not a private plan")
