"""Bench section `verify`: what --verify costs (decode ms/token against unverified on v3-fused
and v2-fused, the one-time fingerprint setup, and the trusted side's fingerprint memory).

Both runs use the same server process (ipc) and the same greedy prompt; the verified run asks
for float32 results and full logit rows (top-k cannot be checked), so its bytes per token are
part of the cost measured here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from teesplit.bench.sections import Section, SectionContext

PLANS = ("v3-fused", "v2-fused")
TARGET_OVERHEAD = 0.10  # decode ms/token with --verify at most 10% above unverified


def _median_ms(model, prompt: list[int], n_new: int, repeats: int) -> tuple[float, list[int], dict]:
    from teesplit.bench.common import split_profile

    runs = [split_profile(model, prompt, n_new) for _ in range(repeats)]
    per_run = [p.mean_ms() for p in runs]
    mid = runs[int(np.argsort(per_run)[(len(runs) - 1) // 2])]
    return mid.mean_ms(), mid.tokens, mid.steps[0]


def _prefill_check_s(model, prompt: list[int]) -> float:
    """The check time of one prefill of the prompt."""
    v = model.gpu.verifier
    cache = model.new_cache(1, max_tokens=len(prompt) + 1)
    try:
        t0 = v.stats.check_s
        model.forward(np.array([prompt], np.int64), cache, top_k=1)
        return v.stats.check_s - t0
    finally:
        model.close_cache(cache)


def measure(ctx: SectionContext) -> dict[str, Any]:
    from teesplit.bench.common import Endpoint, running
    from teesplit.tee.plans import get_plan

    s = ctx.settings
    prompt = ctx.prompt[: s.contexts[0]]
    kind = "ipc" if "ipc" in s.transports else s.transports[0]
    rows: dict[str, Any] = {}
    with running(Endpoint(kind, ctx.model_dir, s, ctx.tmp)) as endpoint:
        for name in PLANS:
            plan = get_plan(name)
            plain = endpoint.model(name)
            _median_ms(plain, prompt, 3, 1)  # first-call allocations
            ms, tokens, step = _median_ms(plain, prompt, s.new_tokens, s.repeats)
            checked = endpoint.model(name, verify=True)  # Init: checks it and builds the fingerprints
            v = checked.gpu.verifier
            _median_ms(checked, prompt, 3, 1)
            prefill_check_s = _prefill_check_s(checked, prompt)
            checks0, check_s0 = v.stats.checks, v.stats.check_s
            ms_v, tokens_v, step_v = _median_ms(checked, prompt, s.new_tokens, s.repeats)
            n_steps = s.repeats * (s.new_tokens - 1) + s.repeats  # steps + prefills measured
            decode_check_s = v.stats.check_s - check_s0 - s.repeats * prefill_check_s
            c = checked.config
            m = v.o_vectors
            rows[name] = {
                "decode_ms": ms,
                "decode_ms_verify": ms_v,
                "overhead": ms_v / ms - 1,
                "same_tokens": tokens == tokens_v,
                "setup_s": v.stats.setup_s,
                "fingerprint_bytes": v.stats.fingerprint_bytes,
                # v3-fused sessions: g (m per head) and ‖v‖ per KV head per layer, and ρ, per position
                "session_bytes_per_token": 8 * (c.num_layers * (m * c.num_heads + c.num_kv_heads) + v.n)
                if plan.gpu_kv_cache
                else 0,
                "check_ms_per_forward": 1000 * (v.stats.check_s - check_s0) / max(n_steps, 1),
                # trusted-side check time of one decode step (some of it overlaps the LM head)
                "check_ms_per_decode": 1000 * max(decode_check_s, 0.0) / max(n_steps - s.repeats, 1),
                "check_ms_prefill": 1000 * prefill_check_s,
                "checks_per_forward": (v.stats.checks - checks0) / max(n_steps, 1),
                "bytes_down": step["bytes"]["from_gpu"],
                "bytes_down_verify": step_v["bytes"]["from_gpu"],
                "transport": kind,
                "context": len(prompt),
            }
            ctx.log(
                f"verify {name}: decode {ms:.1f} -> {ms_v:.1f} ms/token ({ms_v / ms - 1:+.0%}), setup "
                f"{v.stats.setup_s:.2f} s, fingerprints {v.stats.fingerprint_bytes / 2**20:.1f} MiB"
            )
            plain.gpu.close()
            checked.gpu.close()
    return {"plans": rows, "quick": s.quick}


def render(data: dict[str, Any]) -> list[str]:
    lines = [
        "| plan | decode ms/token | with --verify | overhead | checks/forward | check ms/token "
        "| check ms/prefill | setup s | fingerprints | session per token | bytes back/token | same tokens |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in data["plans"].items():
        lines.append(
            f"| {name} | {r['decode_ms']:.1f} | {r['decode_ms_verify']:.1f} | {r['overhead']:+.0%} "
            f"| {r['checks_per_forward']:.0f} | {r.get('check_ms_per_decode', float('nan')):.1f} "
            f"| {r.get('check_ms_prefill', float('nan')):.0f} | {r['setup_s']:.2f} "
            f"| {r['fingerprint_bytes'] / 2**20:.1f} MiB | {r['session_bytes_per_token'] / 1024:.1f} KiB "
            f"| {r['bytes_down'] / 1024:.1f} → {r['bytes_down_verify'] / 1024:.1f} KiB | {r['same_tokens']} |"
        )
    any_row = next(iter(data["plans"].values()), None)
    if any_row:
        lines.append("")
        lines.append(
            f"Over {any_row['transport']}, context {any_row['context']}. The verified run asks for float32 "
            "results and full logit rows (top-k cannot be checked). Check ms: the trusted side's check "
            "time per decode step and for the prompt's prefill; a pass's checks run batched while the "
            "server computes its LM head, so part of it is hidden."
        )
    return lines


def targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    from teesplit.bench.common import target

    out = []
    for name, r in data["plans"].items():
        # measured: unverified over verified speed; >= 1/1.1 means at most 10% slower
        out.append(
            target(
                f"verify overhead {name}",
                f"decode with --verify at most {TARGET_OVERHEAD:.0%} slower than without ({name})",
                r["decode_ms"] / r["decode_ms_verify"],
                1 / (1 + TARGET_OVERHEAD),
            )
        )
    return out


SECTION = Section(title="Verified results (--verify)", measure=measure, render=render, targets=targets)
