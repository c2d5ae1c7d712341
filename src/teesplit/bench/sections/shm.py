"""Bench section "shm": the shared-memory transport against ZeroMQ on the same host.

- the round trip of an empty Ping (median and p99 over many) over shm://, ipc:// and
  tcp://127.0.0.1, each to its own `teesplit serve` process;
- decode tokens/s of v3-fused and v2-fused over shm against monolithic transformers (the same
  measurement as the plan rows: `teesplit.bench.measure_plan`).

Targets (issue 8): a small-message round trip over shm of at most 20 µs (median), and v3-fused
over shm at >= 0.9x monolithic decode tokens/s.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from teesplit.bench.sections import Section, SectionContext

KINDS = ("shm", "ipc", "tcp")
PLANS = ("v3-fused", "v2-fused")
TARGET_PING_US = 20.0
TARGET_DECODE_RATIO = 0.9


def ping_stats(client, count: int, warm: int) -> dict[str, float]:
    for _ in range(warm):
        client.ping()
    rtts = np.sort([client.ping() for _ in range(count)]) * 1e6
    return {
        "count": count,
        "median_us": float(np.median(rtts)),
        "p99_us": float(rtts[min(count - 1, int(0.99 * count))]),
        "mean_us": float(rtts.mean()),
    }


def measure(ctx: SectionContext) -> dict[str, Any]:
    from teesplit.bench.common import Endpoint, measure_plan, running

    s = ctx.settings
    count, warm = (300, 50) if s.quick else (5000, 500)
    out: dict[str, Any] = {"ping": {}, "decode": {}}
    for kind in KINDS:
        ctx.log(f"shm section: {kind} server")
        with running(Endpoint(kind, ctx.model_dir, s, ctx.tmp)) as endpoint:
            client = endpoint.connect()
            try:
                out["ping"][kind] = ping_stats(client, count, warm)
            finally:
                client.close()
            p = out["ping"][kind]
            ctx.log(f"{kind} ping: median {p['median_us']:.1f} µs, p99 {p['p99_us']:.1f} µs ({count} pings)")
            if kind == "shm":
                for plan in PLANS:
                    row = measure_plan(endpoint, plan, ctx.prompt, s, ctx.log)
                    out["decode"][plan] = {
                        "ms_per_token": row["decode"]["ms_per_token"],
                        "split_ms": row["decode"]["split_ms"],
                        "rpc_per_token": row["contexts"][str(s.contexts[0])].get("rpc"),
                        "tokens": row["tokens"],
                    }
    base = ctx.baseline()
    base_ms = base["decode"]["ms_per_token"]
    out["monolithic_ms_per_token"] = base_ms
    for d in out["decode"].values():
        d["ratio_to_monolithic"] = base_ms / d["ms_per_token"]
        d["same_tokens_as_monolithic"] = d.pop("tokens") == base["tokens"]
    return out


def render(d: dict[str, Any]) -> list[str]:
    lines = [
        "Round trip of an empty Ping, each transport to its own `teesplit serve` process:",
        "",
        "| transport | median µs | p99 µs | pings |",
        "|---|---|---|---|",
    ]
    for kind, p in d.get("ping", {}).items():
        lines.append(f"| {kind} | {p['median_us']:.1f} | {p['p99_us']:.1f} | {p['count']} |")
    base = d.get("monolithic_ms_per_token")
    if d.get("decode") and base:
        lines += [
            "",
            f"Decode over shm against monolithic transformers ({base:.1f} ms/token):",
            "",
            "| plan | RPC/token | ms/token | vs monolithic | trusted / GPU / transport ms | same tokens |",
            "|---|---|---|---|---|---|",
        ]
        for plan, r in d["decode"].items():
            sp = r["split_ms"]
            split = " / ".join(f"{sp.get(k, 0.0):.1f}" for k in ("tee", "gpu", "transport"))
            same = "yes" if r["same_tokens_as_monolithic"] else "NO"
            lines.append(
                f"| {plan} | {r['rpc_per_token']} | {r['ms_per_token']:.1f} | "
                f"{r['ratio_to_monolithic']:.2f}x | {split} | {same} |"
            )
    return lines


def targets(d: dict[str, Any]) -> list[dict[str, Any]]:
    from teesplit.bench.common import target

    ping = d.get("ping", {}).get("shm")
    med = ping and ping["median_us"]
    out = [
        {
            "name": "shm-ping",
            "goal": f"median round trip of a small message over shm <= {TARGET_PING_US:g} µs",
            "measured": med,
            "threshold": TARGET_PING_US,
            "passed": None if med is None else med <= TARGET_PING_US,
            "detail": "not measured"
            if med is None
            else f"{med:.1f} µs (p99 {ping['p99_us']:.1f}; ipc "
            f"{d['ping'].get('ipc', {}).get('median_us', float('nan')):.1f}, tcp "
            f"{d['ping'].get('tcp', {}).get('median_us', float('nan')):.1f}; needs <= {TARGET_PING_US:g} µs)",
        }
    ]
    fused = d.get("decode", {}).get("v3-fused")
    out.append(
        target(
            "shm-decode",
            f"v3-fused over shm decodes at >= {TARGET_DECODE_RATIO}x monolithic tokens/s",
            fused and fused["ratio_to_monolithic"],
            TARGET_DECODE_RATIO,
        )
    )
    return out


SECTION = Section(title="Shared-memory transport (shm://)", measure=measure, render=render, targets=targets)
