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
from teesplit.tee.client import GPUClient
from teesplit.tee.plans import PLANS, Plan

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


def measure_link(gpu: GPUClient, pings: int = 30, probe_bytes: int = 1 << 20) -> LinkStats:
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
    w = WIRE_ITEMSIZE[wire]
    E, F, S = c.hidden_size, c.intermediate_size, context
    HD, KD, HS = c.q_dim, c.kv_dim, c.num_heads * context
    L = c.num_layers
    head = 12 * top_k if top_k else c.vocab_size * w
    if plan.private is not None:
        raise ValueError(f"no byte model for the private plan {plan.name}")
    gpu = plan.attention_on_gpu
    if plan.merged and gpu:
        # ids+pos; per layer q, k, pos, r (float32) | p, x | m, x (+pos but the last); the last
        # layer's rows. Back: x0, q|k; per layer scores | o, gate|up | y, next q|k (not the last).
        up = 16 + L * ((HD + KD + HS + 2 * E + F) * w + 8 + 4) + (L - 1) * 8 + 8
        down = (E + HD + KD) * w + L * (HS + E + 2 * F) * w + (L - 1) * (E + HD + KD) * w + E * w + head
        return up, down
    if plan.merged:
        up = 8 + L * (HD + 2 * E + F) * w + 8
        down = (E + HD + 2 * KD) * w + L * (E + 2 * F) * w + (L - 1) * (E + HD + 2 * KD) * w + E * w + head
        return up, down
    if plan.crossing == "seed" and gpu:
        up = 3 * E + HD + HD * S + HS + HS * c.head_dim + HD + 2 * E + F
        down = HD + 2 * KD + HS + HD + E + 2 * F + E
    elif plan.crossing == "seed":
        up, down = 3 * E + HD + 2 * E + F, HD + 2 * KD + E + 2 * F + E
    elif gpu:
        up, down = E + HD + KD + HS + E + F, HD + KD + HS + E + 2 * F + E
    else:  # fused, trusted attention
        up, down = E + HD + E + F, HD + 2 * KD + E + 2 * F + E
    up_b = L * up * w + (16 if plan.gpu_kv_cache else 0) * L + 8 + E * w
    down_b = L * down * w + E * w + head
    return up_b, down_b


def tee_attention_flops(plan: Plan, c: ModelConfig, context: int) -> float:
    """Attention work left to the trusted side per decode token (v2 placement: both products;
    v3: the repeat_kv and transpose copies of K and V, counted as one flop per element)."""
    per_layer = 2 * 2 * c.num_heads * context * c.head_dim
    if plan.attention_on_gpu:
        return 0.0 if plan.gpu_kv_cache else c.num_layers * per_layer / 2
    return c.num_layers * per_layer


def measure_gpu_attention_s(gpu: GPUClient, c: ModelConfig, context: int, tries: int = 5) -> float:
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


def choose(
    gpu: GPUClient | None,
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
