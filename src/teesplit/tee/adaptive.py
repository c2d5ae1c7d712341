"""`--plan auto`: measure the link, then pick the plan and wire dtype a cost model says is
fastest per decode token (TRUSTED side).

The model counts, per decode token: round trips x measured round-trip time, bytes each way
/ measured bandwidth, the attention work the plan leaves to the trusted side / its measured
numpy speed, and for plans that put attention on the GPU, two attention-shaped products per
layer at the time the server reports for one. The Linear work is the same for every plan and
is left out. The byte
counts are the plans' actual tensor payloads (tests check them against the client's meter).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from teesplit.config import ModelConfig
from teesplit.tee.ops import attention_layout, grouped_attention, masked_scaled_softmax
from teesplit.tee.plans import PLANS, Plan, prefill_chunk
from teesplit.tee.port import GPUPort

HEADER_UP, HEADER_DOWN = 110, 80  # typical msgpack header frame sizes, bytes
WIRE_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}


@dataclass(frozen=True)
class LinkStats:
    rtt_s: float  # median round trip of an empty Ping
    up_bytes_per_s: float
    down_bytes_per_s: float


@dataclass(frozen=True)
class Choice:
    plan: Plan
    wire_dtype: str
    link: LinkStats
    tee_flops: float
    estimates_ms: dict[str, float]  # "plan/wire" -> estimated ms per decode token


def measure_link(gpu: GPUPort, pings: int = 30, probe_bytes: int = 1 << 20) -> LinkStats:
    rtt = float(np.median([gpu.ping() for _ in range(pings)]))
    up = float(np.median([gpu.ping(payload_bytes=probe_bytes) for _ in range(5)]))
    down = float(np.median([gpu.ping(reply_bytes=probe_bytes) for _ in range(5)]))
    return LinkStats(rtt, probe_bytes / max(up - rtt, 1e-7), probe_bytes / max(down - rtt, 1e-7))


def measure_tee_flops(context: int = 512) -> float:
    """numpy float32 throughput on an attention-shaped product (B=1, 8 heads, one query)."""
    q = np.ones((8, 1, 64), np.float32)
    k = np.ones((8, 64, context), np.float32)
    q @ k  # warm-up
    t0, n = time.perf_counter(), 50
    for _ in range(n):
        q @ k
    return n * 2 * q.size * context / max(time.perf_counter() - t0, 1e-9)


def bytes_per_token(
    plan: Plan, c: ModelConfig, context: int, wire: str, top_k: int | None = 1
) -> tuple[int, int]:
    """Tensor payload bytes (up to the GPU, back) of one decode token at `context` positions."""
    return pass_bytes(plan, c, 1, context, wire, top_k)


def pass_bytes(
    plan: Plan, c: ModelConfig, T: int, S: int, wire: str, top_k: int | None = 1
) -> tuple[int, int]:
    """Tensor payload bytes (up, back) of one forward pass of a row's T new tokens that ends at
    S cached positions (a decode step: T = 1; a prefill chunk: T tokens after S - T cached).
    Activations scale with T; scores and probabilities (v3 placement) with T S; the seed's
    v3 also sends the repeated K and V, H D S each, once per pass."""
    w = WIRE_ITEMSIZE[wire]
    E, F = c.hidden_size, c.intermediate_size
    HD, KD, HTS = c.q_dim, c.kv_dim, c.num_heads * T * S
    L = c.num_layers
    head = 12 * top_k if top_k else c.vocab_size * w
    if plan.private is not None:
        raise ValueError(f"no byte model for the private plan {plan.name}")
    gpu = plan.attention_on_gpu
    if plan.merged and gpu:
        # ids, pos; per layer q, k, pos, r (float32 a token) | p, x | m, x (+ pos but the last);
        # the last layer's rows. Back: x0, q|k; per layer scores | o, gate|up | y, next q|k.
        up = 8 * T + 8 + L * ((HD + KD + 2 * E + F) * T * w + HTS * w + 8 + 4 * T) + (L - 1) * 8 + 8
        down = (E + HD + KD) * T * w + L * (HTS + (E + 2 * F) * T) * w + (L - 1) * (E + HD + KD) * T * w
        return up, down + E * w + head
    if plan.merged:
        up = 8 * T + L * (HD + 2 * E + F) * T * w + 8
        down = (E + HD + 2 * KD) * T * w + L * (E + 2 * F) * T * w + (L - 1) * (E + HD + 2 * KD) * T * w
        return up, down + E * w + head
    if plan.crossing == "seed" and gpu:  # per token: q, k, v, o, gate, up, down inputs; per pass: K and V
        up = (3 * E + HD + HD + 2 * E + F) * T + HTS + 2 * HD * S
        down = (HD + 2 * KD + HD + E + 2 * F + E) * T + HTS
    elif plan.crossing == "seed":
        up, down = (3 * E + HD + 2 * E + F) * T, (HD + 2 * KD + E + 2 * F + E) * T
    elif gpu:
        up, down = (E + HD + KD + E + F) * T + HTS, (HD + KD + E + 2 * F + E) * T + HTS
    else:  # fused, trusted attention
        up, down = (E + HD + E + F) * T, (HD + 2 * KD + E + 2 * F + E) * T
    up_b = L * up * w + (16 if plan.gpu_kv_cache else 0) * L + 8 * T + E * w
    down_b = L * down * w + E * w * T + head
    return up_b, down_b


def prefill_chunks(T: int, chunk: int | None) -> list[tuple[int, int]]:
    """(new tokens, cached positions after the pass) of each forward pass of a T-token prefill."""
    step = T if not chunk else chunk
    return [(min(step, T - s0), min(s0 + step, T)) for s0 in range(0, T, step)]


def upload_bytes(c: ModelConfig, T: int, wire: str) -> int:
    """WriteKV's payload when a T-token prefill's K and V move into a GPU session."""
    return c.num_layers * (2 * c.kv_dim * T * WIRE_ITEMSIZE[wire] + 8)


def tee_attention_flops(plan: Plan, c: ModelConfig, context: int) -> float:
    """Attention work left to the trusted side per decode token (v2 placement: both products;
    v3: the repeat_kv and transpose copies of K and V, counted as one flop per element)."""
    per_layer = 2 * 2 * c.num_heads * context * c.head_dim
    if plan.attention_on_gpu:
        return 0.0 if plan.gpu_kv_cache else c.num_layers * per_layer / 2
    return c.num_layers * per_layer


def measure_gpu_attention_s(gpu: GPUPort, c: ModelConfig, context: int, tries: int = 5) -> float:
    """The server's own compute time (as it reports it) for one attention-shaped product,
    q (1, H, 1, D) @ Kᵀ (1, H, D, S): what each of a GPU-attention plan's two attention
    products per layer costs on that device, launch and synchronization included."""
    q = np.zeros((1, c.num_heads, 1, c.head_dim), np.float32)
    kt = np.zeros((1, c.num_heads, c.head_dim, context), np.float32)
    times = []
    for _ in range(tries + 1):  # the first warms the device up
        before = gpu.metrics.gpu_s
        gpu.matmul(q, kt)
        times.append(gpu.metrics.gpu_s - before)
    return float(np.median(times[1:]))


def estimate_ms(
    plan: Plan,
    wire: str,
    c: ModelConfig,
    context: int,
    link: LinkStats,
    tee_flops: float,
    top_k: int | None = 1,
    gpu_attention_s: float = 0.0,
) -> float:
    up, down = bytes_per_token(plan, c, context, wire, top_k)
    n = plan.rpcs_per_forward(c.num_layers)
    gpu_attention = 2 * c.num_layers * gpu_attention_s if plan.attention_on_gpu else 0.0
    s = (
        n * link.rtt_s
        + (up + n * HEADER_UP) / link.up_bytes_per_s
        + (down + n * HEADER_DOWN) / link.down_bytes_per_s
        + tee_attention_flops(plan, c, context) / tee_flops
        + gpu_attention
    )
    return 1000 * s


@dataclass(frozen=True)
class PrefillSpeeds:
    """Per attention score of a prefill: the trusted side's blockwise attention (v2 placement),
    its softmax over scores the GPU sent (v3 placement), and the GPU's two products per score
    (as the server reports its time). Seconds."""

    tee_attention_s: float
    tee_softmax_s: float
    gpu_products_s: float


def measure_prefill_speeds(
    gpu: GPUPort | None, c: ModelConfig, T: int = 128, S: int = 512, tries: int = 5
) -> PrefillSpeeds:
    """Time one prefill-shaped block of each: T queries of every head against S keys."""
    H, Hkv, D = c.num_heads, c.num_kv_heads, c.head_dim
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, H, T, D), np.float32)
    k = rng.standard_normal((1, Hkv, S, D), np.float32)
    layout = attention_layout(np.array([S - T]), T, None, H // Hkv)
    scores = rng.standard_normal((1, H, T, S), np.float32)
    n = H * T * S

    def best(fn) -> float:
        times = []
        for _ in range(tries + 1):  # the first one warms up
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times[1:])

    tee_attention = best(lambda: grouped_attention(q, k, k, layout, np.float32(0.125))) / n
    tee_softmax = best(lambda: masked_scaled_softmax(scores, np.float32(0.125), layout)) / n
    gpu_products = 0.0
    if gpu is not None:
        kt = np.zeros((1, H, D, S), np.float32)
        times = []
        for _ in range(tries + 1):
            before = gpu.metrics.gpu_s
            gpu.matmul(q, kt)
            times.append(gpu.metrics.gpu_s - before)
        gpu_products = 2 * min(times[1:]) / n  # QKᵀ and PV cost about the same
    return PrefillSpeeds(tee_attention, tee_softmax, gpu_products)


def estimate_prefill_ms(
    plan: Plan,
    wire: str,
    c: ModelConfig,
    T: int,
    chunk: int | None,
    link: LinkStats,
    speeds: PrefillSpeeds,
    top_k: int | None = 1,
) -> float:
    """A T-token prefill in chunks: round trips, bytes each way, and the attention work each
    side does (the Linear work is the same for every plan and left out)."""
    s = 0.0
    H, n = c.num_heads, plan.rpcs_per_forward(c.num_layers)
    for t, end in prefill_chunks(T, chunk):
        up, down = pass_bytes(plan, c, t, end, wire, top_k)
        s += n * link.rtt_s + (up + n * HEADER_UP) / link.up_bytes_per_s
        s += (down + n * HEADER_DOWN) / link.down_bytes_per_s
        visible = H * t * (end - t + (t + 1) / 2)  # the keys each query sees, causal
        if plan.attention_on_gpu:
            s += c.num_layers * H * t * end * (speeds.tee_softmax_s + speeds.gpu_products_s)
        else:
            s += c.num_layers * visible * speeds.tee_attention_s
    return 1000 * s


def _upload_ms(c: ModelConfig, T: int, wire: str, link: LinkStats) -> float:
    n = c.num_layers + 1  # WriteKV per layer, OpenSession
    return 1000 * (n * link.rtt_s + (upload_bytes(c, T, wire) + n * HEADER_UP) / link.up_bytes_per_s)


def can_hand_over(prefill: Plan, decode: Plan) -> bool:
    """Decode can follow a prefill when both keep K/V on the same side, or when the prefill kept
    them in the trusted side and decode keeps them in a GPU session (WriteKV uploads them)."""
    return prefill.gpu_kv_cache == decode.gpu_kv_cache or decode.gpu_kv_cache


@dataclass(frozen=True)
class PhaseChoice:
    prefill: Plan
    decode: Plan
    wire_dtype: str
    link: LinkStats
    estimates_ms: dict[str, float]  # "prefill>decode/wire" -> estimated ms for the whole request


def choose_phases(
    gpu: GPUPort | None,
    c: ModelConfig,
    prompt_tokens: int,
    new_tokens: int,
    chunk: int | str | None = None,
    top_k: int | None = 1,
    wires: tuple[str, ...] = ("float32", "float16"),
    link: LinkStats | None = None,
    tee_flops: float | None = None,
    gpu_attention_s: float | None = None,
    speeds: PrefillSpeeds | None = None,
    min_gain: float = 0.05,
) -> PhaseChoice:
    """The plan for each phase of a request: the pair (prefill plan, decode plan) with the least
    estimated time for the prompt's prefill, the hand-over (WriteKV when the K/V move to a GPU
    session) and `new_tokens` decode steps at the context they reach; a narrower wire dtype
    only when it saves at least `min_gain` (it costs precision)."""
    context = prompt_tokens + max(new_tokens, 1) // 2
    link = link or measure_link(gpu)
    flops = tee_flops or measure_tee_flops(context)
    if gpu_attention_s is None:
        gpu_attention_s = measure_gpu_attention_s(gpu, c, context) if gpu is not None else 0.0
    speeds = speeds or measure_prefill_speeds(gpu, c)
    est = {}
    for w in wires:
        pre = {
            p.name: estimate_prefill_ms(p, w, c, prompt_tokens, prefill_chunk(p, chunk), link, speeds, top_k)
            for p in PLANS.values()
        }
        dec = {
            p.name: estimate_ms(p, w, c, context, link, flops, top_k, gpu_attention_s) for p in PLANS.values()
        }
        for a in PLANS.values():
            for b in PLANS.values():
                if can_hand_over(a, b):
                    move = (
                        _upload_ms(c, prompt_tokens, w, link)
                        if b.gpu_kv_cache and not a.gpu_kv_cache
                        else 0.0
                    )
                    est[f"{a.name}>{b.name}/{w}"] = pre[a.name] + move + new_tokens * dec[b.name]

    def best(w: str) -> str:
        return min((k for k in est if k.endswith("/" + w)), key=est.get)

    pick = best(wires[0])
    for w in wires[1:]:
        if est[best(w)] < (1 - min_gain) * est[pick]:
            pick = best(w)
    pair, wire = pick.split("/")
    a, b = pair.split(">")
    return PhaseChoice(PLANS[a], PLANS[b], wire, link, est)


def choose(
    gpu: GPUPort | None,
    c: ModelConfig,
    context: int,
    top_k: int | None = 1,
    wires: tuple[str, ...] = ("float32", "float16"),
    link: LinkStats | None = None,
    tee_flops: float | None = None,
    min_gain: float = 0.05,
    gpu_attention_s: float | None = None,
) -> Choice:
    """Measure (unless given) and pick the cheapest plan; a narrower wire dtype than the first
    of `wires` is taken only when it saves at least `min_gain` of the time, since it costs
    precision."""
    link = link or measure_link(gpu)
    flops = tee_flops or measure_tee_flops(context)
    if gpu_attention_s is None:
        gpu_attention_s = measure_gpu_attention_s(gpu, c, context) if gpu is not None else 0.0
    est = {
        f"{p.name}/{w}": estimate_ms(p, w, c, context, link, flops, top_k, gpu_attention_s)
        for p in PLANS.values()
        for w in wires
    }
    plan = min(PLANS.values(), key=lambda p: est[f"{p.name}/{wires[0]}"])
    wire = wires[0]
    for w in wires[1:]:
        if est[f"{plan.name}/{w}"] < (1 - min_gain) * est[f"{plan.name}/{wire}"]:
            wire = w
    return Choice(plan, wire, link, flops, est)
