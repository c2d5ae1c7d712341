"""The private plans: the GPU computes every Linear on masked data (TRUSTED side).

Placement is v2-fused (attention, the KV cache and every non-linear step stay here; q|k|v,
o_proj, gate|up and down_proj are one round trip each), plus: the embedding lookup is done
here from the local checkpoint, so no token id crosses, and the LM head is masked like any
Linear, so the logits arrive here masked and sampling happens here.

Arithmetic: exact fixed point over the ring Z_2^64. A Linear's input row x is encoded as
x_q = round(x * 2^f) with a per-row f (at most X_FRAC_BITS, chosen so that |W_q x_q| < 2^62
cannot overflow, by Cauchy-Schwarz on the row norms of W_q); weights are
W_q = round(W * 2^RING_WEIGHT_FRAC_BITS) on both sides. What crosses is x_q - r mod 2^64
with r uniform on Z_2^64: a one-time pad, so the GPU's view is uniformly random and
independent of x whatever x is (information-theoretic, not statistical hiding). The GPU
returns (x_q - r) W_qᵀ mod 2^64; adding r W_qᵀ gives x_q W_qᵀ exactly, which is decoded by
2^-(f + RING_WEIGHT_FRAC_BITS) and gets the bias added here. Float masks were measured and
rejected: in float32 a mask 256 times the row's RMS already moves SmolLM2's logits by 0.04.

- `private-otp` (one server): r W_qᵀ is precomputed by `PadPool`, a background thread, from
  the local weights; each `Pad` can be consumed once (`PadReuseError` otherwise).
- `private-2party` (two non-colluding servers): x_q is split into shares x_q - r and r, one
  to each server in parallel; the two results add up to x_q W_qᵀ. Nothing is precomputed.

The masked calls go through `GPUClient.ring_linear`, i.e. the client's ordinary call path.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from teesplit.config import ModelConfig
from teesplit.errors import UsageError
from teesplit.protocol import RING_WEIGHT_FRAC_BITS
from teesplit.tee.client import GPUClient
from teesplit.tee.local_weights import LM_HEAD, LocalWeights, ring_weights
from teesplit.tee.port import InitResult, Metrics

X_FRAC_BITS = 24  # the most fractional bits of an input row (fewer for large rows)
_HEADROOM = 2.0**62  # |x_q W_qᵀ| stays below this: an int64 holds it with a bit to spare
_MODULE_SITES = {"o_proj": "o", "down_proj": "down"}


class PadReuseError(RuntimeError):
    """A one-time pad was used a second time (which would let the GPU subtract two inputs)."""


def random_ring(shape: tuple[int, ...]) -> np.ndarray:
    """Uniform elements of Z_2^64 as int64, from the operating system's CSPRNG."""
    n = math.prod(shape)
    return np.frombuffer(os.urandom(8 * n), np.int64).reshape(shape).copy()


class RingSite:
    """One masked Linear: its fixed-point weights (only where pads are made), bias, bound."""

    def __init__(self, lw: LocalWeights, layer: int, site: str, keep_weights: bool):
        w = lw.weight(layer, site)
        self.layer, self.site = layer, site
        self.out_features, self.in_features = w.shape
        self.bias = lw.bias(layer, site)
        wq = ring_weights(w)  # float64, the same rounding as the GPU
        self.row_norm = float(np.sqrt((wq * wq).sum(axis=1)).max())  # max ||row of W_q||₂
        self.wq = wq.astype(np.int64) if keep_weights else None  # (N, in): rows contiguous, fastest

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """x (R, in) float -> (x_q (R, in) int64, f (R, 1)): the largest f <= X_FRAC_BITS with
        (||x|| 2^f + ½√in) · max||W_q row|| < 2^62, so the product cannot wrap."""
        x64 = x.astype(np.float64)
        if not np.isfinite(x64).all():
            raise ValueError(f"layer {self.layer} {self.site}: NaN or Inf in a Linear input")
        norm = np.sqrt((x64 * x64).sum(axis=1, keepdims=True))  # (R, 1)
        room = _HEADROOM / self.row_norm - 0.5 * math.sqrt(self.in_features)
        with np.errstate(divide="ignore"):
            f = np.floor(np.log2(room / np.maximum(norm, 1e-300)))
        f = np.minimum(f, X_FRAC_BITS).astype(np.int64)
        if (f < 0).any():
            raise ValueError(f"layer {self.layer} {self.site}: an input row too large for the ring encoding")
        return np.rint(x64 * np.exp2(f)).astype(np.int64), f

    def decode(self, y: np.ndarray, f: np.ndarray) -> np.ndarray:
        """x_q W_qᵀ (R, N) int64 -> float32 x Wᵀ + b."""
        out = (y.astype(np.float64) * np.exp2(-(f + RING_WEIGHT_FRAC_BITS))).astype(np.float32)
        return out if self.bias is None else out + self.bias

    def unblind(self, r: np.ndarray) -> np.ndarray:
        """r W_qᵀ mod 2^64 (numpy integer products wrap)."""
        return np.einsum("rn,Nn->rN", r, self.wq) if len(r) <= 2 else r @ self.wq.T


class Pad:
    """A one-time pad for `rows` inputs of one site: r (rows, in) and r W_qᵀ (rows, N)."""

    __slots__ = ("key", "_r", "_rw", "_lock")

    def __init__(self, key: tuple[int, str], r: np.ndarray, rw: np.ndarray):
        self.key, self._r, self._rw = key, r, rw
        self._lock = threading.Lock()

    @property
    def rows(self) -> int:
        return 0 if self._r is None else len(self._r)

    def consume(self) -> tuple[np.ndarray, np.ndarray]:
        """(r, r W_qᵀ), once; a second call raises PadReuseError."""
        with self._lock:
            r, rw = self._r, self._rw
            self._r = self._rw = None
        if r is None:
            raise PadReuseError(f"the one-time pad for layer {self.key[0]} {self.key[1]} was already used")
        return r, rw


class PadPool:
    """Makes pads ahead of need in a background thread, `depth` rows (tokens) per site.

    A request for more rows than are ready is completed inline, and that time is counted
    separately (`inline_s`), so the cost is reported either way, never hidden."""

    def __init__(self, sites: dict[tuple[int, str], RingSite], depth: int = 32, chunk: int = 8):
        if depth < 0 or chunk < 1:
            raise ValueError("pad pool depth must be >= 0 and chunk >= 1")
        self.sites, self.depth, self.chunk = sites, depth, chunk
        self._stock: dict[tuple[int, str], deque] = {k: deque() for k in sites}
        self._rows = Counter()  # ready rows per site
        self._cond = threading.Condition()
        self._stop = False
        self.background_cpu_s = 0.0  # CPU time of the pad thread
        self.background_rows = 0  # rows made per site by the pad thread
        self.inline_s = 0.0  # time spent making pads on the critical path
        self.inline_rows = 0
        self.peak_bytes = 0
        self._thread = None
        if depth:
            self._thread = threading.Thread(target=self._fill, name="pad-pool", daemon=True)
            self._thread.start()

    def _make(self, key: tuple[int, str], n: int) -> tuple[np.ndarray, np.ndarray]:
        site = self.sites[key]
        r = random_ring((n, site.in_features))
        return r, site.unblind(r)

    @property
    def nbytes(self) -> int:
        with self._cond:
            return self._nbytes()

    def _nbytes(self) -> int:
        return sum(r.nbytes + rw.nbytes for q in self._stock.values() for r, rw in q)

    def _fill(self) -> None:
        t_cpu = time.thread_time()
        while True:
            with self._cond:
                while not self._stop and min(self._rows.get(k, 0) for k in self.sites) >= self.depth:
                    self._cond.wait()
                if self._stop:
                    return
            for key in self.sites:  # one chunk of rows for every site, in forward-pass order
                if self._stop:
                    return
                block = self._make(key, self.chunk)
                with self._cond:
                    self._stock[key].append(block)
                    self._rows[key] += self.chunk
            with self._cond:
                self.background_rows += self.chunk
                self.background_cpu_s += time.thread_time() - t_cpu
                t_cpu = time.thread_time()
                self.peak_bytes = max(self.peak_bytes, self._nbytes())

    def take(self, key: tuple[int, str], n: int) -> Pad:
        """A fresh pad for n rows of site `key`: ready rows first, the rest made now."""
        parts_r, parts_rw, need = [], [], n
        with self._cond:
            q = self._stock[key]
            while need and q:
                r, rw = q.popleft()
                if len(r) > need:  # split the block: the rest stays for later rows
                    q.appendleft((r[need:], rw[need:]))
                    r, rw = r[:need], rw[:need]
                parts_r.append(r)
                parts_rw.append(rw)
                need -= len(r)
                self._rows[key] -= len(r)
            self._cond.notify()
        if need:
            t0 = time.perf_counter()
            r, rw = self._make(key, need)
            self.inline_s += time.perf_counter() - t0
            self.inline_rows += need
            parts_r.append(r)
            parts_rw.append(rw)
        r = parts_r[0] if len(parts_r) == 1 else np.concatenate(parts_r)
        rw = parts_rw[0] if len(parts_rw) == 1 else np.concatenate(parts_rw)
        return Pad(key, r, rw)

    def wait_full(self, timeout_s: float | None = None) -> bool:
        """Block until every site has `depth` rows ready (True), or the timeout passed (False)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while min(self._rows.get(k, 0) for k in self.sites) < self.depth:
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def stats(self) -> dict[str, float]:
        rows = self.background_rows + self.inline_rows / max(len(self.sites), 1)
        return {
            "background_cpu_s": self.background_cpu_s,
            "inline_s": self.inline_s,
            "tokens_made": rows,  # pads for one token at every site count as one
            "cpu_ms_per_token": 1000 * (self.background_cpu_s + self.inline_s) / rows if rows else 0.0,
            "bytes_now": self.nbytes,
            "peak_bytes": self.peak_bytes,
        }

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()


class _PrivateGPU:
    """The private plans' port (`tee.port.GPUPort`, the v2-fused calls): what TEELlamaModel
    calls as `self.gpu` under a private plan.

    Embedding is answered here from the local table; every Linear and the LM head go out
    masked; `init` returns the trusted config and norm weights of the local checkpoint after
    the server(s) confirmed the same model and float32 weights."""

    private = True  # the model refuses a private plan on any port without this

    def __init__(self, weights: LocalWeights, clients: list[GPUClient], keep_weights: bool):
        for c in clients:
            if c.wire_dtype != "float32":
                raise UsageError(
                    "the private plans send fixed-point ring elements (int64) on the wire; "
                    f"--wire-dtype {c.wire_dtype} does not apply to them (leave it unset)"
                )
        self.lw = weights
        self.clients = clients
        self.config: ModelConfig = weights.config
        self.sites = {(i, s): RingSite(weights, i, s, keep_weights) for i, s in weights.sites()}
        self.verifier = None  # --verify: every client's ring products checked (tee/ring_verify.py)
        if any(getattr(c, "verify", False) for c in clients):
            from teesplit.tee.ring_verify import RingVerifier

            self.verifier = RingVerifier(weights)
            for c in clients:
                if not getattr(c, "verify", False):
                    raise ValueError("--verify must cover every GPU server of a private plan")
                c.ring_verifier = self.verifier

    # ---- the GPUClient surface the model uses ---------------------------------------------
    def init(self) -> InitResult:
        for c in self.clients:
            self._check_server(c)
        return InitResult(config=self.config, norms=self.lw.norms, biases={})

    def _check_server(self, c: GPUClient) -> None:
        """The server's Init, through the port's own checks (protocol version, shapes; with a
        verified port the trusted parameters too), then: the same model, in float32."""
        res = c.init()
        remote = res.config
        for name in ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_layers"):
            if getattr(remote, name) != getattr(self.config, name):
                raise UsageError(
                    f"the GPU server at {c.address} serves a different model ({name}="
                    f"{getattr(remote, name)!r}, the local checkpoint has {getattr(self.config, name)!r})"
                )
        if res.dtype != "float32":
            raise UsageError(
                f"the GPU server at {c.address} computes in {res.dtype}; the private plans need its "
                "weights in float32 (start it with `teesplit serve --dtype float32`)"
            )

    def embedding(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size})")
        return self.lw.embed[ids]  # (B, T, E), looked up here: no id leaves the trusted side

    def qkv(self, layer: int, x: np.ndarray, sid=None, pos=None) -> np.ndarray:
        if sid is not None:
            raise ValueError("the private plans keep the KV cache in the trusted side")
        return self.masked_linear(layer, "qkv", x)

    def gate_up(self, layer: int, x: np.ndarray) -> np.ndarray:
        return self.masked_linear(layer, "gate_up", x)

    def linear(self, layer: int, module: str, x: np.ndarray) -> np.ndarray:
        if module not in _MODULE_SITES:
            raise ValueError(f"the private plans mask the fused sites; no single {module!r} call")
        return self.masked_linear(layer, _MODULE_SITES[module], x)

    def lm_head(self, x: np.ndarray) -> np.ndarray:
        return self.masked_linear(-1, LM_HEAD, x)

    def lm_head_top_k(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The whole masked row comes back (the GPU cannot rank masked logits); top-k here."""
        logits = self.lm_head(x)  # (B, T, V)
        ids = np.argpartition(-logits, k - 1, axis=-1)[..., :k]
        values = np.take_along_axis(logits, ids, axis=-1)
        order = np.argsort(-values, axis=-1, kind="stable")
        return np.take_along_axis(values, order, -1), np.take_along_axis(ids, order, -1).astype(np.int64)

    def masked_linear(self, layer: int, site: str, x: np.ndarray) -> np.ndarray:
        s = self.sites[(layer, site)]
        lead = x.shape[:-1]
        xq, f = s.encode(x.reshape(-1, x.shape[-1]))
        y = self._ring_product(s, xq, lead)  # x_q W_qᵀ (R, N) int64
        return s.decode(y, f).reshape(*lead, s.out_features)

    def _ring_product(self, s: RingSite, xq: np.ndarray, lead: tuple[int, ...]) -> np.ndarray:
        raise NotImplementedError

    def open_session(self, batch: int, max_tokens: int) -> int:
        raise ValueError("the private plans keep the KV cache in the trusted side")

    def close_session(self, sid: int) -> None:
        raise ValueError("the private plans open no GPU session")


class PrivateOTP(_PrivateGPU):
    """Plan private-otp: one GPU server, one-time pads with precomputed unblinding factors."""

    def __init__(self, weights: LocalWeights, client: GPUClient, pool_depth: int = 32, pool_chunk: int = 8):
        super().__init__(weights, [client], keep_weights=True)
        self.gpu = client
        self.pool = PadPool(self.sites, pool_depth, pool_chunk)

    @property
    def metrics(self) -> Metrics:
        return self.gpu.metrics

    @property
    def retried(self) -> int:
        return self.gpu.retried

    @property
    def address(self) -> str:
        return self.gpu.address

    def _ring_product(self, s: RingSite, xq: np.ndarray, lead: tuple[int, ...]) -> np.ndarray:
        r, rw = self.pool.take((s.layer, s.site), len(xq)).consume()
        masked = (xq - r).reshape(*lead, s.in_features)  # int64 arithmetic wraps modulo 2^64
        y = self.gpu.ring_linear(s.layer, s.site, masked, s.out_features)
        return y.reshape(len(xq), s.out_features) + rw

    def close(self) -> None:
        self.pool.close()
        self.gpu.close()


class PrivateTwoParty(_PrivateGPU):
    """Plan private-2party: additive shares to two non-colluding servers, in parallel."""

    def __init__(self, weights: LocalWeights, client_a: GPUClient, client_b: GPUClient):
        if client_a.address == client_b.address and client_a.address != "local":
            raise UsageError(f"private-2party needs two different GPU servers; both are {client_a.address}")
        super().__init__(weights, [client_a, client_b], keep_weights=False)
        self.a, self.b = client_a, client_b
        self._other = ThreadPoolExecutor(max_workers=1, thread_name_prefix="server-b")  # b's own thread
        self.metrics = Metrics()  # round trips as seen by the trusted side; both servers' bytes

    @property
    def retried(self) -> int:
        return self.a.retried + self.b.retried

    @property
    def address(self) -> str:
        return f"{self.a.address} + {self.b.address}"

    def _both(self, fa, fb):
        """fa() here and fb() on b's thread, at the same time; metrics merged."""
        ma, mb = self.a.metrics.copy(), self.b.metrics.copy()
        t0 = time.perf_counter()
        future = self._other.submit(fb)
        try:
            ra = fa()
        finally:
            rb = future.result()  # a failure on either side is raised here, after both ended
        da, db = self.a.metrics - ma, self.b.metrics - mb
        m = self.metrics
        m.rpc_wall_s += time.perf_counter() - t0
        m.gpu_s += max(da.gpu_s, db.gpu_s)
        m.rpc.update(da.rpc)
        m.rpc.update(db.rpc)
        m.bytes_to_gpu += da.bytes_to_gpu + db.bytes_to_gpu
        m.bytes_from_gpu += da.bytes_from_gpu + db.bytes_from_gpu
        return ra, rb

    def init(self) -> InitResult:
        self._both(lambda: self._check_server(self.a), lambda: self._check_server(self.b))
        return InitResult(config=self.config, norms=self.lw.norms, biases={})

    def _ring_product(self, s: RingSite, xq: np.ndarray, lead: tuple[int, ...]) -> np.ndarray:
        r = random_ring(xq.shape)
        share_a = (xq - r).reshape(*lead, s.in_features)  # each share alone is uniform
        share_b = r.reshape(*lead, s.in_features)
        ya, yb = self._both(
            lambda: self.a.ring_linear(s.layer, s.site, share_a, s.out_features),
            lambda: self.b.ring_linear(s.layer, s.site, share_b, s.out_features),
        )
        return (ya + yb).reshape(len(xq), s.out_features)

    def close(self) -> None:
        try:
            self.a.close()
            self._other.submit(self.b.close).result()
        finally:
            self._other.shutdown()


def private_gpu(
    plan_name: str, weights: LocalWeights, clients: list[GPUClient], pool_depth: int = 32
) -> PrivateOTP | PrivateTwoParty:
    """The `gpu` object for a private plan: one client for private-otp, two for private-2party."""
    if plan_name == "private-otp":
        if len(clients) != 1:
            raise UsageError(f"private-otp talks to one GPU server, got {len(clients)}")
        return PrivateOTP(weights, clients[0], pool_depth)
    if plan_name == "private-2party":
        if len(clients) != 2:
            raise UsageError(
                "private-2party needs two non-colluding GPU servers (--server A --server B), "
                f"got {len(clients)}"
            )
        return PrivateTwoParty(weights, clients[0], clients[1])
    raise ValueError(f"{plan_name!r} is not a private plan")
