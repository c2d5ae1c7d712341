"""Bench section: the private plans against v2-fused, over tcp on the run's model.

Online decode ms/token (pads ready in advance), the offline cost of making one token's
one-time pads in the trusted side (ms of CPU, memory held), bytes per token each way, and
whether the greedy tokens equal v2-fused's. private-2party runs against two server processes.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from teesplit.bench.sections import Section, SectionContext

PLANS = ("v2-fused", "private-otp", "private-2party")


def _offline_pad_ms(lw, tokens: int) -> tuple[float, int]:
    """Trusted-side time to make `tokens` tokens' pads for every site, no background thread."""
    from teesplit.tee.private import PadPool, RingSite

    sites = {(i, s): RingSite(lw, i, s, keep_weights=True) for i, s in lw.sites()}
    pool = PadPool(sites, depth=0)
    t0 = time.process_time()
    pads = [pool.take(key, tokens) for key in sites]
    cpu_s = time.process_time() - t0
    nbytes = sum(p._r.nbytes + p._rw.nbytes for p in pads) // tokens
    pool.close()
    return 1000 * cpu_s / tokens, nbytes


def measure(ctx: SectionContext) -> dict[str, Any]:
    from teesplit.bench.common import Endpoint, running, split_profile
    from teesplit.tee.local_weights import load_local_weights

    s = dataclasses.replace(ctx.settings, dtype="float32")  # the ring products need float32 weights
    n_new = max(3, 4 if s.quick else s.new_tokens)
    prompt = ctx.prompt[: 32 if s.quick else 128]  # private-otp holds pads for every prompt token
    lw = load_local_weights(ctx.model_dir)
    ctx.log(f"private: offline pad generation for {8 if s.quick else 32} tokens")
    pad_ms, pad_bytes = _offline_pad_ms(lw, 8 if s.quick else 32)
    rows: dict[str, Any] = {}
    a, b = Endpoint("tcp", ctx.model_dir, s, ctx.tmp), Endpoint("tcp", ctx.model_dir, s, ctx.tmp)
    with running(a), running(b):
        for plan in PLANS:
            ctx.log(f"private: {plan}, {len(prompt)} prompt tokens, {n_new} new")
            pool_depth = len(prompt) + n_new + 1
            model = a.model(plan, (b,) if plan == "private-2party" else (), pad_pool=pool_depth)
            gpu = model.gpu
            try:
                if plan == "private-otp":
                    gpu.pool.wait_full(600)  # online cost only: the pads are made ahead
                split_profile(model, prompt[:8], 2)  # warm-up (server-side ring weights)
                if plan == "private-otp":
                    gpu.pool.wait_full(600)
                prof = split_profile(model, prompt, n_new)
                row = {
                    "decode_ms_per_token": prof.mean_ms(),
                    "tee_ms_per_token": prof.mean_ms("tee"),
                    "prefill_s": prof.prefill_s,
                    "rpcs_per_token": float(np.mean([st["rpc"]["total"] for st in prof.steps])),
                    "bytes_to_gpu_per_token": float(np.mean([st["bytes"]["to_gpu"] for st in prof.steps])),
                    "bytes_from_gpu_per_token": float(
                        np.mean([st["bytes"]["from_gpu"] for st in prof.steps])
                    ),
                    "tokens": prof.tokens,
                }
                if plan == "private-otp":
                    st = gpu.pool.stats()
                    row["pad_pool"] = st
                rows[plan] = row
            finally:
                gpu.close()
    base = rows["v2-fused"]
    for plan in PLANS[1:]:
        r = rows[plan]
        r["decode_vs_v2_fused"] = r["decode_ms_per_token"] / base["decode_ms_per_token"]
        r["bytes_vs_v2_fused"] = (r["bytes_to_gpu_per_token"] + r["bytes_from_gpu_per_token"]) / (
            base["bytes_to_gpu_per_token"] + base["bytes_from_gpu_per_token"]
        )
        r["tokens_equal_v2_fused"] = sum(
            x == y for x, y in zip(r["tokens"], base["tokens"], strict=False)
        ) / len(base["tokens"])
    return {
        "prompt_tokens": len(prompt),
        "new_tokens": n_new,
        "offline_pad_ms_per_token": pad_ms,
        "pad_bytes_per_token": pad_bytes,
        "plans": rows,
    }


def _kib(n: float) -> str:
    return f"{n / 1024:.1f} KiB"


def render(d: dict[str, Any]) -> list[str]:
    lines = [
        f"{d['prompt_tokens']} prompt tokens, {d['new_tokens']} generated, greedy, tcp loopback; "
        "private-2party against two server processes.",
        "",
        "| plan | decode ms/token | vs v2-fused | trusted ms/token | RPCs/token | to GPU/token | "
        "from GPU/token | tokens = v2-fused |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for plan, r in d["plans"].items():
        lines.append(
            f"| {plan} | {r['decode_ms_per_token']:.1f} | {r.get('decode_vs_v2_fused', 1.0):.2f}x | "
            f"{r['tee_ms_per_token']:.1f} | {r['rpcs_per_token']:.0f} | "
            f"{_kib(r['bytes_to_gpu_per_token'])} | "
            f"{_kib(r['bytes_from_gpu_per_token'])} | {r.get('tokens_equal_v2_fused', 1.0):.0%} |"
        )
    lines += [
        "",
        f"Offline, in the trusted side: {d['offline_pad_ms_per_token']:.1f} ms of CPU per token to make the "
        f"one-time pads of private-otp (r and r·Wᵀ for every Linear and the LM head), "
        f"{_kib(d['pad_bytes_per_token'])} of pads per token held until used. private-2party needs none.",
    ]
    pool = d["plans"].get("private-otp", {}).get("pad_pool")
    if pool:
        lines.append(
            f"During the run the pad thread used {pool['background_cpu_s']:.2f} s of CPU "
            f"({pool['cpu_ms_per_token']:.1f} ms per token), {pool['inline_s']:.3f} s were made on the "
            f"critical path, and the pool held at most {pool['peak_bytes'] / 2**20:.1f} MiB."
        )
    return lines


def targets(d: dict[str, Any]) -> list[dict[str, Any]]:
    from teesplit.bench.common import target

    return [
        target(
            f"{plan} tokens",
            f"{plan}: greedy tokens equal v2-fused's (>= 31 of 32)",
            d["plans"][plan]["tokens_equal_v2_fused"],
            31 / 32,
            "",
        )
        for plan in ("private-otp", "private-2party")
    ]


SECTION = Section("Private plans: masked data on the GPU", measure, render, targets)
