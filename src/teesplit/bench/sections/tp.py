"""Bench section "tp": the GPU server sharded over 3 ranks (`serve --tp 3`) against one rank.

Both servers run at once on this host (tcp, the run's device and dtype, --threads per rank)
and are measured in alternating rounds, so a change in the machine's load hits both alike:
- decode ms/token and the prefill of the run's first context, for v3-fused, v2-merged and
  private-otp (int16 weights, quantized by each server at the first request), and whether the
  greedy tokens are the same;
- each rank's resident memory (VmRSS) after the rounds, and the bytes of weights it holds.

On one CPU host the ranks share the cores and the memory bandwidth, so what this measures is
the price of the collectives (a broadcast, a flag and a gather or all-reduce per request, over
gloo), and the memory a rank saves. On GPUs each rank adds its own memory bandwidth; the NCCL
path is not measured here. The section also lists, computed rather than measured, the weight
memory per rank of larger models at several --tp (the README's "Several GPUs" table).

Target: each of the 3 ranks holds at most 0.36 of the one-rank server's weight bytes (a third,
plus the replicated norms). A model that 3 does not divide is measured at the largest --tp
that divides it; one that no size above 1 divides is not measured (the section says why).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from teesplit.bench.sections import Section, SectionContext

TP = 3  # measured when it divides the model, else the largest size that does
PLANS = ("v3-fused", "v2-merged", "private-otp")  # private-otp: the ring steps over the group
TARGET_WEIGHT_SHARE = 0.36
# Larger models for the memory table (computed): Hugging Face config fields that matter.
MODELS = {
    "Llama-3.1-8B": dict(
        hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8
    ),
    "Llama-3.1-70B": dict(
        hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64, num_kv_heads=8
    ),
}
MODEL_VOCAB = 128256


def _rss(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _ranks(log: Path) -> list[dict[str, Any]]:
    lines = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
    return sorted((e for e in lines if e.get("event") == "tp_rank_ready"), key=lambda e: e["rank"])


def _generate(
    model_dir: Path, address: str, plan: str, prompt: list[int], new_tokens: int, timeout_s: float
) -> dict[str, Any]:
    from teesplit.tee.assemble import Assembly, RunnerSettings
    from teesplit.tee.generate import Generator, SamplingParams

    settings = RunnerSettings(
        model_dir, servers=(address,), plan=plan, timeout_s=timeout_s, log=lambda _m: None
    )
    model = Assembly(settings).connect()[0]
    try:
        gen = Generator(model, eos_token_ids=set())
        r = gen.generate(prompt, SamplingParams(max_new_tokens=new_tokens))
    finally:
        model.gpu.close()
    d = r.stats["decode"]
    return {
        "prefill_s": r.stats["prefill"]["time_s"]["total"],
        "ms_per_token": 1000 * d["time_s"]["total"] / max(d["steps"], 1),
        "tokens": r.tokens,
    }


def measure(ctx: SectionContext) -> dict[str, Any]:
    import torch

    from teesplit.config import ModelConfig
    from teesplit.gpu.tp import tp_sizes, weight_bytes
    from teesplit.gpu.weights import load_weights
    from teesplit.launch import free_tcp_address, start_server, stop_server

    s = ctx.settings
    sizes = tp_sizes(ModelConfig.from_dir(ctx.model_dir))
    if sizes[-1] == 1:
        return {"skipped": "no --tp above 1 divides this model's heads, KV heads and MLP width"}
    tp = TP if TP in sizes else sizes[-1]
    rounds = 2 if s.quick else 4
    prompt = ctx.prompt[: s.contexts[0]]
    args = ["--device", s.device, "--dtype", s.dtype, "--threads", str(s.threads), "--log-format", "json"]
    servers: dict[str, Any] = {}
    try:
        for name, extra in (("tp1", []), (f"tp{tp}", ["--tp", str(tp)])):
            ctx.log(f"tp section: starting the {name} server")
            log = ctx.tmp / f"server-{name}.log"
            address = free_tcp_address()
            with open(log, "ab") as err:
                servers[name] = {"proc": start_server(ctx.model_dir, address, args + extra, stderr=err)}
            servers[name].update(address=address, log=log, runs={p: [] for p in PLANS})
        for r in range(rounds):
            for plan in PLANS:
                for name, srv in servers.items():
                    run = _generate(ctx.model_dir, srv["address"], plan, prompt, s.new_tokens, s.timeout_s)
                    srv["runs"][plan].append(run)
                    ctx.log(
                        f"tp round {r + 1}/{rounds} {name} {plan}: {run['ms_per_token']:.1f} ms/token, "
                        f"prefill {1000 * run['prefill_s']:.0f} ms"
                    )
        out: dict[str, Any] = {
            "tp": tp,
            "rounds": rounds,
            "context": len(prompt),
            "new_tokens": s.new_tokens,
            "threads_per_rank": s.threads,
            "device": s.device,
            "dtype": s.dtype,
            "load_avg_1min": os.getloadavg()[0],
            "plans": {},
        }
        for plan in PLANS:
            row = {}
            for name, srv in servers.items():
                runs = srv["runs"][plan]
                row[name] = {
                    "ms_per_token": float(np.median([x["ms_per_token"] for x in runs])),
                    "prefill_ms": 1000 * float(np.median([x["prefill_s"] for x in runs])),
                    "ms_per_token_runs": [x["ms_per_token"] for x in runs],
                }
            one, many = servers["tp1"]["runs"][plan], servers[f"tp{tp}"]["runs"][plan]
            row["same_tokens"] = all(a["tokens"] == b["tokens"] for a, b in zip(one, many, strict=True))
            row["decode_ratio"] = row[f"tp{tp}"]["ms_per_token"] / row["tp1"]["ms_per_token"]
            out["plans"][plan] = row
        whole = weight_bytes(load_weights(ctx.model_dir, torch.device("cpu"), torch.float32, progress=False))
        out["memory"] = {
            "tp1": [{"rank": 0, "rss_bytes": _rss(servers["tp1"]["proc"].pid), "weight_bytes": whole}],
            f"tp{tp}": [
                {"rank": e["rank"], "rss_bytes": _rss(e["pid"]), "weight_bytes": e["weight_bytes"]}
                for e in _ranks(servers[f"tp{tp}"]["log"])
            ],
        }
    finally:
        for srv in servers.values():
            stop_server(srv["proc"])
        time.sleep(0.5)
    out["per_rank_table"] = memory_table()
    return out


def memory_table() -> list[dict[str, Any]]:
    """Weight memory per rank in bfloat16, and the KV cache per rank for 8192 tokens (computed)."""
    from teesplit.config import ModelConfig
    from teesplit.gpu.tp import kv_cache_bytes, weight_bytes_per_rank

    rows = []
    for name, dims in MODELS.items():
        c = ModelConfig(
            "llama",
            MODEL_VOCAB,
            dims["hidden_size"],
            dims["intermediate_size"],
            dims["num_layers"],
            dims["num_heads"],
            dims["num_kv_heads"],
            dims["hidden_size"] // dims["num_heads"],
            1e-5,
            8192,
            {"rope_type": "default", "rope_theta": 5e5},
        )
        for tp in (1, 2, 4, 8):
            rows.append(
                {
                    "model": name,
                    "tp": tp,
                    "weight_gib": weight_bytes_per_rank(c, 2, tp) / 2**30,
                    "kv_gib_8k_tokens": kv_cache_bytes(c, 8192, 2, tp) / 2**30,
                }
            )
    return rows


def render(d: dict[str, Any]) -> list[str]:
    if "skipped" in d:
        return [f"Not measured: {d['skipped']}."]
    tp = d.get("tp", TP)
    lines = [
        f"`serve --tp {tp}` against one rank, both on this host, {d.get('rounds')} alternating rounds; "
        f"{d.get('device')} {d.get('dtype')}, {d.get('threads_per_rank')} thread(s) per rank; "
        f"context {d.get('context')}, {d.get('new_tokens')} new tokens; load average "
        f"{d.get('load_avg_1min', float('nan')):.2f}.",
        "",
        f"| plan | decode ms/token, 1 rank | decode ms/token, {tp} ranks | ratio | prefill ms, 1 rank "
        f"| prefill ms, {tp} ranks | same tokens |",
        "|---|---|---|---|---|---|---|",
    ]
    for plan, r in d.get("plans", {}).items():
        a, b = r["tp1"], r[f"tp{tp}"]
        lines.append(
            f"| {plan} | {a['ms_per_token']:.1f} | {b['ms_per_token']:.1f} | {r['decode_ratio']:.2f}x | "
            f"{a['prefill_ms']:.0f} | {b['prefill_ms']:.0f} | {'yes' if r['same_tokens'] else 'NO'} |"
        )
    mem = d.get("memory", {})
    if mem:
        lines += ["", "| server | rank | resident MiB | weights MiB |", "|---|---|---|---|"]
        for name, ranks in mem.items():
            for m in ranks:
                rss = "?" if m["rss_bytes"] is None else f"{m['rss_bytes'] / 2**20:.0f}"
                lines.append(f"| {name} | {m['rank']} | {rss} | {m['weight_bytes'] / 2**20:.0f} |")
    table = d.get("per_rank_table", [])
    if table:
        lines += [
            "",
            "Computed, not measured: weights per rank in bfloat16 and the KV cache per rank for 8192 "
            "cached tokens (all sequences together), for Llama-3.1 shapes:",
            "",
            "| model | --tp | weights GiB per rank | KV cache GiB per rank (8k tokens) |",
            "|---|---|---|---|",
        ]
        for r in table:
            lines.append(
                f"| {r['model']} | {r['tp']} | {r['weight_gib']:.1f} | {r['kv_gib_8k_tokens']:.2f} |"
            )
    return lines


def targets(d: dict[str, Any]) -> list[dict[str, Any]]:
    tp = d.get("tp", TP)
    mem = d.get("memory", {})
    one, many = mem.get("tp1"), mem.get(f"tp{tp}")
    share = None if not one or not many else max(m["weight_bytes"] for m in many) / one[0]["weight_bytes"]
    limit = 1 / tp + TARGET_WEIGHT_SHARE - 1 / TP  # a 1/tp share, plus the norms' slack
    return [
        {
            "name": "tp-weights-per-rank",
            "goal": f"each of {tp} ranks holds <= {limit:.2f} of one rank's weight bytes",
            "measured": share,
            "threshold": limit,
            "passed": None if share is None else share <= limit,
            "detail": "not measured" if share is None else f"{share:.3f} (needs <= {limit:.2f})",
        }
    ]


SECTION = Section(title="Tensor parallelism (serve --tp)", measure=measure, render=render, targets=targets)
