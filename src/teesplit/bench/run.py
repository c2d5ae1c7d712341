"""`teesplit bench`: the split plans against monolithic transformers, on one machine, in one run.

What one run measures (all on the same weights, dtype, thread count and prompts):

- the baseline: monolithic transformers, greedy, prefill with ``logits_to_keep=1`` (what
  transformers' own ``generate`` does) and then one token at a time with its KV cache;
- every plan in ``teesplit.tee.plans.PLANS`` (v3, v2, v3-fused, v2-fused, ...) and ``auto``
  (the plan and wire dtype ``adaptive.choose`` picks after measuring the link) over every
  transport (local = the GPU service in this process; ipc://, tcp://127.0.0.1 and shm:// to a
  real ``teesplit serve`` child process):
  decode ms/token (median over repeats of each run's mean), its split into trusted compute /
  GPU compute / transport, prefill tokens/s, RPCs and bytes per decode token at each context;
- batched decode (v3-fused over ipc), aggregate tokens/s for each batch size, and two
  micro-batches pipelined over two connections;
- wire dtypes: logits and greedy tokens with float16 / bfloat16 / int8 activations on the
  wire against float32;
- RPC and byte counts per decode token for a TinyLlama-shaped random checkpoint (counts only,
  never timed), beside the seed's figures;
- the targets, pass or miss with the measured value.

It writes ``bench.json``, ``bench.md`` and ``bench.png`` into ``--out-dir`` and prints progress
on stderr. ``--quick`` is a smoke test (about a minute and a half on a 2-core machine; the
full run about 11 minutes). ``--render bench.json`` rewrites the report without measuring.

    teesplit bench --out-dir benchmarks/results/cpu
    teesplit bench --quick
    teesplit bench --device cuda --out-dir benchmarks/results/cuda
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from teesplit.bench.common import (
    ALL_PLANS,
    BATCH_PLAN,
    SEED_FIGURES,
    TARGET_AUTO_SLACK,
    TARGET_BATCH_RATIO,
    TARGET_BYTES_RATIO,
    TARGET_DECODE_RATIO,
    TARGET_PREFILL_RATIO,
    TINYLLAMA,
    TRANSPORTS,
    WIRE_DTYPES,
    WIRE_PROMPT,
    Endpoint,
    Progress,
    Settings,
    _human,
    add_ratios,
    batch_prompts,
    make_tinyllama,
    measure_baseline,
    measure_plan,
    running,
    split_profile,
    target,
    with_restart,
)
from teesplit.blas import blas_threads
from teesplit.tee import kernels
from teesplit.tee.client import GPUClient
from teesplit.tee.generate import Generator, SamplingParams, generate_pipelined
from teesplit.tee.model import TEELlamaModel
from teesplit.tee.plans import PLANS, get_plan


def _int_list(s: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in s.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return values


def _choice_list(allowed: tuple[str, ...]) -> Callable[[str], tuple[str, ...]]:
    def parse(s: str) -> tuple[str, ...]:
        values = tuple(v.strip() for v in s.split(",") if v.strip())
        bad = [v for v in values if v not in allowed]
        if not values or bad:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)} (got {s!r})")
        return values

    return parse


def _section_list(s: str) -> tuple[str, ...]:
    from teesplit.bench.sections import discover

    if s.strip() == "none":
        return ()
    return _choice_list(tuple(discover()))(s)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="teesplit bench",
        description="Benchmark the split plans over every transport against monolithic transformers "
        "(decode, prefill, RPCs and bytes per token, batching, wire dtypes) and check the targets.",
        epilog="The full run takes about 11 minutes on a 2-core CPU machine, --quick about 1.5. "
        "Results, chart and report: BENCHMARKS.md.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 6 tokens, one run, larger contexts over ipc only, no pipelining, no TinyLlama",
    )
    p.add_argument(
        "--model", default="default", help="'default' (SmolLM2-135M-Instruct) or a model directory"
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="compute dtype of the baseline and the GPU server (default: bfloat16 on cuda, float32 on cpu)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads, baseline and server alike")
    p.add_argument(
        "--tee-threads",
        type=int,
        default=None,
        help="BLAS threads of the trusted side's numpy (default: --threads; 0: leave as is)",
    )
    p.add_argument(
        "--transports", type=_choice_list(TRANSPORTS), default=TRANSPORTS, help="default: local,ipc,tcp,shm"
    )
    p.add_argument(
        "--plans", type=_choice_list(ALL_PLANS), default=ALL_PLANS, help="default: every plan, then auto"
    )
    p.add_argument("--new-tokens", type=int, default=None, help="tokens per decode run (full 32, quick 6)")
    p.add_argument("--repeats", type=int, default=None, help="runs per measurement (full 3, quick 1)")
    p.add_argument(
        "--contexts",
        type=_int_list,
        default=(128, 512),
        help="prompt lengths (default 128,512); the first is the decode context, the largest the targets'",
    )
    p.add_argument("--batches", type=_int_list, default=None, help="batch sizes (full 1,4,8; quick 1,8)")
    p.add_argument(
        "--runners",
        type=_int_list,
        default=None,
        help="concurrent runners, each on its own connection, against one server (full 1,4,16; quick 1,4)",
    )
    p.add_argument(
        "--concurrency-only",
        action="store_true",
        help="measure only the concurrent-runner section; write concurrency.json and .md to --out-dir",
    )
    p.add_argument(
        "--sections",
        type=_section_list,
        default=None,
        help="extra sections measured after the plans (teesplit/bench/sections; default: all; 'none')",
    )
    p.add_argument(
        "--only-sections",
        type=_section_list,
        default=None,
        metavar="SECTIONS",
        help="measure only these sections (no plans); write NAME.json and NAME.md per section",
    )
    p.add_argument(
        "--pipeline",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the largest batch as two pipelined micro-batches too (default: on, off with --quick)",
    )
    p.add_argument(
        "--wire-tokens",
        type=int,
        default=None,
        help="greedy tokens per wire dtype (full 64, quick 8; 0 skips the section)",
    )
    p.add_argument(
        "--tinyllama",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="count RPCs and bytes on a TinyLlama-shaped checkpoint (default: on, off with --quick)",
    )
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for any one reply")
    p.add_argument(
        "--out-dir", default=None, help="default benchmarks/results/<device> (with --quick: <device>-quick)"
    )
    p.add_argument(
        "--render",
        metavar="BENCH_JSON",
        default=None,
        help="measure nothing: rewrite bench.md and bench.png beside an existing bench.json",
    )
    return p


def _wire_tokens(given: int | None, quick: bool) -> int:
    """Greedy tokens per wire dtype; 0 skips the wire-dtype section."""
    if given is None:
        return 8 if quick else 64
    return 0 if given <= 0 else max(2, given)


def _wide_transports(transports: tuple[str, ...], quick: bool) -> tuple[str, ...]:
    """--quick measures the larger contexts over one transport only: ipc, where the targets are."""
    if not quick:
        return transports
    return ("ipc",) if "ipc" in transports else transports[:1]


def settings_from_args(args: argparse.Namespace) -> Settings:
    quick = args.quick
    return Settings(
        model=args.model,
        device=args.device,
        dtype=args.dtype or ("bfloat16" if args.device == "cuda" else "float32"),
        threads=args.threads,
        tee_threads=args.threads if args.tee_threads is None else args.tee_threads,
        transports=tuple(args.transports),
        plans=tuple(args.plans),
        new_tokens=max(2, args.new_tokens or (6 if quick else 32)),
        repeats=max(1, args.repeats or (1 if quick else 3)),
        contexts=tuple(args.contexts),
        wide_transports=_wide_transports(tuple(args.transports), quick),
        batches=tuple(args.batches or ((1, 8) if quick else (1, 4, 8))),
        batch_prompt_tokens=min(32, args.contexts[0]) if quick else args.contexts[0],
        runners=tuple(args.runners or ((1, 4) if quick else (1, 4, 16))),
        pipeline=(not quick) if args.pipeline is None else args.pipeline,
        wire_tokens=_wire_tokens(args.wire_tokens, quick),
        tinyllama=(not quick) if args.tinyllama is None else args.tinyllama,
        quick=quick,
        out_dir=Path(args.out_dir or f"benchmarks/results/{args.device}{'-quick' if quick else ''}"),
        timeout_s=args.timeout,
        sections=_chosen_sections(args),
    )


def _chosen_sections(args: argparse.Namespace) -> tuple[str, ...]:
    from teesplit.bench.sections import discover

    if args.only_sections is not None:
        return args.only_sections
    return tuple(discover()) if args.sections is None else args.sections


def check_auto(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per transport: auto's measured decode time against the fastest fixed plan's."""
    out = {}
    for t in dict.fromkeys(r["transport"] for r in rows):
        mine = [r for r in rows if r["transport"] == t]
        auto = next((r for r in mine if r["plan"] == "auto"), None)
        fixed = [r for r in mine if r["plan"] != "auto"]
        if auto is None or not fixed:
            continue
        best = min(fixed, key=lambda r: r["decode"]["ms_per_token"])
        ms, best_ms = auto["decode"]["ms_per_token"], best["decode"]["ms_per_token"]
        out[t] = {
            "picked": f"{auto['picked']['plan']}/{auto['picked']['wire_dtype']}",
            "ms_per_token": ms,
            "fastest_plan": best["plan"],
            "fastest_ms_per_token": best_ms,
            "slower_by": ms / best_ms - 1,
            "within_10pct": ms <= (1 + TARGET_AUTO_SLACK) * best_ms,
        }
    return out


def _aggregate(results) -> tuple[float, float]:
    """(aggregate decode tokens/s, decode seconds) of one generate_batch result."""
    d = results[0].stats["decode"]
    return len(results) * d["steps"] / d["time_s"]["total"], d["time_s"]["total"]


def measure_batches(
    endpoint: Endpoint, vocab: int, s: Settings, log: Progress, baseline: dict[str, float]
) -> dict[str, Any]:
    length = s.batch_prompt_tokens
    params = SamplingParams(max_new_tokens=s.new_tokens)
    rows = []
    model = endpoint.model(BATCH_PLAN)
    try:
        gen = Generator(model, None, eos_token_ids=set())
        gen.generate_batch(batch_prompts(vocab, 2, length), SamplingParams(max_new_tokens=3))  # warm-up
        for b in s.batches:
            prompts = batch_prompts(vocab, b, length)
            runs = []
            for _ in range(s.repeats):
                t0 = time.perf_counter()
                res = gen.generate_batch(prompts, params)
                runs.append((*_aggregate(res), time.perf_counter() - t0))
            tok_s, _, wall = sorted(runs)[(len(runs) - 1) // 2]
            row = {
                "batch": b,
                "connections": 1,
                "decode_tok_s": tok_s,
                "end_to_end_tok_s": b * s.new_tokens / wall,
                "monolithic_decode_tok_s": baseline.get(b),
            }
            rows.append(row)
            log(f"batch {b} ({BATCH_PLAN}, {endpoint.kind}): {tok_s:.1f} tok/s aggregate decode")
    finally:
        model.gpu.close()
    big = max(s.batches)
    if s.pipeline and endpoint.kind != "local" and big >= 2:
        rows.append(measure_pipelined(endpoint, vocab, big, s, log))
    return {"plan": BATCH_PLAN, "transport": endpoint.kind, "prompt_tokens": length, "rows": rows}


def measure_pipelined(endpoint: Endpoint, vocab: int, batch: int, s: Settings, log: Progress) -> dict:
    """Two micro-batches in flight on two connections (generate_pipelined).

    The two micro-batches' phases overlap in ways the per-connection stats cannot show, so the
    decode time is the difference of wall times: a full run minus a prefill-only run."""
    prompts = batch_prompts(vocab, batch, s.batch_prompt_tokens)
    models = endpoint.assembly(BATCH_PLAN, connections=2).connect()

    def wall(n_new: int) -> float:
        t0 = time.perf_counter()
        generate_pipelined(gens, prompts, SamplingParams(max_new_tokens=n_new))
        return time.perf_counter() - t0

    try:
        gens = [Generator(m, None, eos_token_ids=set()) for m in models]
        warm = batch_prompts(vocab, 2, s.batch_prompt_tokens)
        generate_pipelined(gens, warm, SamplingParams(max_new_tokens=3))  # warm-up
        full = float(np.median([wall(s.new_tokens) for _ in range(s.repeats)]))
        prefill = float(np.median([wall(1) for _ in range(s.repeats)]))
    finally:
        for m in models:
            m.gpu.close()
    tok_s = batch * (s.new_tokens - 1) / max(full - prefill, 1e-9)
    log(f"batch {batch} pipelined over 2 connections: {tok_s:.1f} tok/s aggregate decode")
    return {
        "batch": batch,
        "connections": 2,
        "decode_tok_s": tok_s,
        "end_to_end_tok_s": batch * s.new_tokens / full,
        "monolithic_decode_tok_s": None,
    }


# ---- wire dtypes ---------------------------------------------------------------------------
def wire_prompt(model_dir: Path, vocab: int) -> tuple[list[int], str]:
    if (model_dir / "tokenizer.json").is_file():
        from teesplit.tee.tokenizer import Tokenizer

        tok = Tokenizer.from_dir(model_dir)
        ids = tok.apply_chat_template([{"role": "user", "content": WIRE_PROMPT}])
        return ids, f"{WIRE_PROMPT!r} in the chat template"
    ids = np.random.default_rng(7).integers(3, vocab, 32).tolist()
    return ids, "random token ids (the model has no tokenizer)"


def measure_wire_dtypes(model_dir: Path, s: Settings, tmp: Path, log: Progress) -> dict[str, Any]:
    """Each wire dtype against float32: all prompt logits, and greedy tokens (v3-fused, local)."""
    endpoint = Endpoint("local", model_dir, s, tmp)
    rows = []
    with running(endpoint):
        ref_logits = ref_tokens = None
        prompt = text = None
        for wire in WIRE_DTYPES:
            model = endpoint.model(BATCH_PLAN, wire_dtype=wire)
            try:
                if prompt is None:
                    prompt, text = wire_prompt(model_dir, model.config.vocab_size)
                cache = model.new_cache(1, len(prompt) + 1)
                try:
                    logits = model.forward(np.array([prompt], np.int64), cache, all_logits=True)[0]
                finally:
                    model.close_cache(cache)
                tokens = split_profile(model, prompt, s.wire_tokens).tokens
            finally:
                model.gpu.close()
            if ref_logits is None:
                ref_logits, ref_tokens = logits, tokens
            same = np.array(tokens) == np.array(ref_tokens)
            prefix = int(np.argmin(same)) if not same.all() else len(same)
            rows.append(
                {
                    "wire_dtype": wire,
                    "max_abs_logit_diff": float(np.abs(logits - ref_logits).max()),
                    "agreement_to_first_divergence": prefix / len(same),
                    "agreement_overall": float(same.mean()),
                    "first_divergence": None if prefix == len(same) else prefix,
                }
            )
            log(
                f"wire {wire}: max |logit diff| {rows[-1]['max_abs_logit_diff']:.3g}, "
                f"greedy agreement {rows[-1]['agreement_overall']:.0%} overall, {prefix}/{len(same)} before "
                "the first divergence"
            )
    return {
        "plan": BATCH_PLAN,
        "transport": "local",
        "prompt": text,
        "prompt_tokens": len(prompt),
        "greedy_tokens": s.wire_tokens,
        "max_abs_logit_float32": float(np.abs(ref_logits).max()),
        "rows": rows,
    }


def measure_tinyllama(s: Settings, tmp: Path, log: Progress) -> dict[str, Any]:
    """RPCs and bytes of one decode token with the first context cached, every fixed plan,
    local transport. Only the first context: a 1.1B-parameter prefill per plan and context is
    minutes of CPU time, and the RPC counts, which the seed's figures are about, do not depend
    on the context (the bytes of v3 and v3-fused do; the main model's table shows how)."""
    from teesplit.launch import build_service
    from teesplit.tee.assemble import Assembly, RunnerSettings

    path = make_tinyllama(tmp / "tinyllama-shape")
    log("TinyLlama-shaped checkpoint written; counting (not timed)")
    handler, _ = build_service(path, s.device, "bfloat16", threads=s.threads, progress=False)
    handle = handler.handle
    rows = []
    try:
        c = s.contexts[0]
        prompt = np.random.default_rng(3).integers(3, TINYLLAMA["vocab_size"], c).tolist()
        for name, plan in PLANS.items():
            settings = RunnerSettings(path, servers=("local",), plan=name, log=lambda _message: None)
            model = Assembly(settings, local=lambda _i: handle).connect()[0]
            row = {
                "plan": name,
                "rpc_formula": plan.rpcs_per_forward(TINYLLAMA["num_hidden_layers"]),
                "seed_figure": SEED_FIGURES.get(name),
                "contexts": {},
            }
            step = split_profile(model, prompt, 2).steps[0]
            row["contexts"][str(c)] = c0 = {
                "rpc": step["rpc"]["total"],
                "rpc_by_op": step["rpc"]["by_op"],
                "bytes_up": step["bytes"]["to_gpu"],
                "bytes_down": step["bytes"]["from_gpu"],
            }
            log(f"TinyLlama shape {name}: {c0['rpc']} RPC/token, up {_human(c0['bytes_up'])}")
            rows.append(row)
            model.gpu.close()
    finally:
        del handler
        gc.collect()
        with contextlib.suppress(OSError):
            (path / "model.safetensors").unlink()
    return {"shape": {k: TINYLLAMA[k] for k in list(TINYLLAMA)[:6]}, "weights": "bfloat16", "rows": rows}


def _at(rows: list[dict], plan: str, context: str, transport: str | None = None) -> dict | None:
    """The context entry of `plan` over `transport` (any transport, ipc first, if None)."""
    for t in [transport] if transport else ["ipc", "tcp", "local"]:
        for r in rows:
            if r["plan"] == plan and r["transport"] == t and context in r["contexts"]:
                return r["contexts"][context]
    return None


def evaluate_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows, big = result["runs"], str(max(result["settings"]["contexts"]))
    fused_ipc = next((r for r in rows if r["plan"] == "v3-fused" and r["transport"] == "ipc"), None)
    fused_big, v3_big = _at(rows, "v3-fused", big), _at(rows, "v3", big)
    fused_ipc_big = _at(rows, "v3-fused", big, "ipc")
    targets = [
        target(
            "decode",
            f"v3-fused over ipc decodes at >= {TARGET_DECODE_RATIO}x monolithic tokens/s",
            fused_ipc and fused_ipc["decode"]["ratio_to_baseline"],
            TARGET_DECODE_RATIO,
        ),
        target(
            "bytes",
            f"at context {big}, v3-fused sends >= {TARGET_BYTES_RATIO:g}x fewer bytes per decode token "
            "than v3",
            fused_big and v3_big and v3_big["bytes_up"] / fused_big["bytes_up"],
            TARGET_BYTES_RATIO,
        ),
    ]
    batch = {r["batch"]: r for r in result.get("batch", {}).get("rows", []) if r["connections"] == 1}
    targets.append(
        target(
            "batch",
            f"batch 8 gives >= {TARGET_BATCH_RATIO:g}x the aggregate decode tokens/s of batch 1 "
            f"({BATCH_PLAN}, {result.get('batch', {}).get('transport', 'ipc')})",
            batch[8]["decode_tok_s"] / batch[1]["decode_tok_s"] if 1 in batch and 8 in batch else None,
            TARGET_BATCH_RATIO,
        )
    )
    targets.append(
        target(
            "prefill",
            f"v3-fused over ipc prefills {big} tokens at >= {TARGET_PREFILL_RATIO}x monolithic tokens/s",
            fused_ipc_big and fused_ipc_big["prefill_ratio_to_baseline"],
            TARGET_PREFILL_RATIO,
        )
    )
    for t, a in result.get("auto", {}).items():
        targets.append(
            {
                "name": f"auto-{t}",
                "goal": f"auto over {t} is within {TARGET_AUTO_SLACK:.0%} of the fastest measured plan",
                "measured": a["slower_by"],
                "threshold": TARGET_AUTO_SLACK,
                "passed": a["within_10pct"],
                "detail": f"picked {a['picked']}: {a['ms_per_token']:.1f} ms/token vs "
                f"{a['fastest_plan']} {a['fastest_ms_per_token']:.1f} ({a['slower_by']:+.0%})",
            }
        )
    return targets + section_targets(result)


# ---- machine -------------------------------------------------------------------------------
def source_version() -> str | None:
    """The git commit of the teesplit checkout being measured, '+dirty' with local changes."""
    root = next((p for p in Path(__file__).resolve().parents if (p / ".git").exists()), None)
    if root is None:  # an installed copy, not a checkout
        return None
    git = ["git", "-C", str(root)]
    try:
        commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        status = subprocess.run([*git, "status", "--porcelain", "-uno"], capture_output=True, text=True)
    except OSError:
        return None
    if commit.returncode != 0:
        return None
    return commit.stdout.strip() + ("+dirty" if status.stdout.strip() else "")


def machine_info(device: str) -> dict[str, Any]:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal"))
        mem_gib = round(int(line.split()[1]) / (1 << 20), 1)
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "memory_gib": mem_gib,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "python": platform.python_version(),
        "numpy": np.__version__,
        # The trusted side's fused loops (tee/_kernels.c) or numpy's passes: the prefill differs.
        "tee_loops": "compiled" if kernels.active() is not None else "numpy",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "teesplit": source_version(),
        "load_average_at_start": list(os.getloadavg()),
    }


# ---- reports -------------------------------------------------------------------------------
def _plan_label(r: dict[str, Any]) -> str:
    if r["plan"] == "auto":
        return f"auto -> {r['picked']['plan']}/{r['picked']['wire_dtype']}"
    return r["plan"]


def chart_rows(result: dict[str, Any]) -> tuple[str | None, list[dict[str, Any]]]:
    transports = [r["transport"] for r in result["runs"]]
    t = next((x for x in ("ipc", "tcp", "local") if x in transports), None)
    rows = [r for r in result["runs"] if r["transport"] == t]
    return t, rows


def write_chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    transport, rows = chart_rows(result)
    base = result["baseline"]["decode"]["ms_per_token"]
    labels = ["monolithic\n(transformers)"] + [_plan_label(r).replace(" -> ", "\n-> ") for r in rows]
    parts = [("tee", "trusted compute (numpy)", "#4c72b0"), ("gpu", "GPU-server compute", "#dd8452")]
    parts.append(("transport", f"transport ({transport}: link, codec, waiting)", "#8c8c8c"))
    fig, ax = plt.subplots(figsize=(11, 5))
    x = np.arange(len(labels))
    ax.bar(x[0], base, color="#55a868", label="monolithic compute")
    bottom = np.zeros(len(rows))
    for key, name, color in parts:
        vals = np.array([r["decode"]["split_ms"][key] for r in rows])
        ax.bar(x[1:], vals, bottom=bottom, color=color, label=name)
        bottom += vals
    totals = [base, *[r["decode"]["ms_per_token"] for r in rows]]
    for xi, tot in zip(x, totals, strict=True):
        ax.text(xi, tot, f"{tot:.1f}", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(x, labels, fontsize=9)
    ax.set_ylabel("ms per decode token")
    s, m = result["settings"], result["model"]
    ax.set_title(
        f"Decode time per token at context {s['contexts'][0]}: {m['name']}, {s['device']} {s['dtype']}, "
        f"{s['threads']} thread(s)",
        fontsize=10,
    )
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.margins(y=0.12)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table(headers: str, rows: list[list[Any]]) -> list[str]:
    """A Markdown table; `headers` separated by '|'."""
    cols = headers.split("|")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows] + [""]


def _up_down(e: dict[str, Any] | None) -> str:
    return f"{_human(e['bytes_up'])} / {_human(e['bytes_down'])}" if e else "-"


def md_header(result: dict[str, Any]) -> list[str]:
    s, m, mach = result["settings"], result["model"], result["machine"]
    c0, ctxs = s["contexts"][0], ", ".join(str(c) for c in s["contexts"])
    load = f"{mach['load_average_at_start'][0]:.2f} at start, {mach['load_average_at_end'][0]:.2f} at end"
    machine = [
        ["CPU", f"{mach['cpu']} ({mach['cpu_count']} cores), {mach['memory_gib']} GiB"],
        ["GPU", mach["gpu"] or "none (the GPU server runs on the CPU)"],
        ["platform", mach["platform"]],
        [
            "software",
            f"Python {mach['python']}, numpy {mach['numpy']}, torch {mach['torch']}, "
            f"transformers {mach['transformers']}; trusted loops: {mach.get('tee_loops', 'numpy')}",
        ],
        ["teesplit", mach.get("teesplit") or "-"],
        ["load average (1 min)", load],
    ]
    quick = " (--quick)" if s["quick"] else ""
    start, end = result["baseline"]["measured"]["start"], result["baseline"]["measured"]["end"]
    ctxs_list = [str(c) for c in s["contexts"]]
    return [
        f"# teesplit bench: {m['name']} on {s['device']} ({s['dtype']})",
        "",
        f"Run {result['date']}, {result['elapsed_s']:.0f} s{quick}. Reproduce:",
        "",
        "```sh",
        result["command"],
        "```",
        "",
        "## Machine",
        "",
        *_table("|", machine),
        "## Setup",
        "",
        f"- Model: {m['name']} ({m['layers']} layers, hidden {m['hidden']}, {m['heads']} heads, "
        f"{m['kv_heads']} KV heads, vocab {m['vocab']}), {m['weights']}.",
        f"- Compute: {s['device']} {s['dtype']}, {s['threads']} torch thread(s) for the baseline and "
        f"the GPU server alike; the trusted side is numpy in the benchmark process, its BLAS limited "
        f"to {s['tee_blas_threads_in_force'] or 'its default number of'} thread(s).",
        f"- Decode: {s['new_tokens']} greedy tokens after a {c0}-token prompt, {s['repeats']} run(s), "
        "the median of each run's mean ms/token. Prefill and per-token counts at "
        f"{ctxs} prompt tokens (counts from the first decode step: exactly that many tokens cached).",
        "- The same random token ids are the prompt of every row. Baseline: transformers, prefill "
        "with `logits_to_keep=1` as its `generate` does, then one token at a time with its KV "
        "cache. The split asks the GPU for the top-1 logit only (greedy).",
        "- Split time per token: *trusted* = wall time outside RPCs, *GPU* = compute time the "
        "server reports, *transport* = the rest of the RPC time (codec, sockets, waiting).",
        f"- The baseline runs at the start and again at the end; each ratio uses the faster of the two "
        f"(decode {start['decode_ms_per_token']:.1f} and {end['decode_ms_per_token']:.1f} ms/token; "
        f"prefill @{ctxs_list[-1]} {start['prefill_tok_s'][ctxs_list[-1]]:.0f} and "
        f"{end['prefill_tok_s'][ctxs_list[-1]]:.0f} tok/s).",
        "",
    ]


def md_targets(result: dict[str, Any]) -> list[str]:
    verdict = {True: "**pass**", False: "**miss**", None: "not measured"}
    rows = [[t["goal"], verdict[t["passed"]], t["detail"]] for t in result["targets"]]
    return ["## Targets", "", *_table("target|result|measured", rows)]


def md_decode(result: dict[str, Any]) -> list[str]:
    s, base = result["settings"], result["baseline"]["decode"]
    c0 = str(s["contexts"][0])
    rows = [["monolithic", "-", f"{base['ms_per_token']:.1f}", f"{base['tok_s']:.1f}", "1.00x"] + ["-"] * 6]
    for r in result["runs"]:
        d, sp = r["decode"], r["decode"]["split_ms"]
        rows.append(
            [_plan_label(r), r["transport"], f"{d['ms_per_token']:.1f}", f"{d['tok_s']:.1f}"]
            + [f"{d['ratio_to_baseline']:.2f}x", f"{sp['tee']:.1f}", f"{sp['gpu']:.1f}"]
            + [
                f"{sp['transport']:.1f}",
                r["contexts"][c0]["rpc"],
                "yes" if r["same_tokens_as_baseline"] else "no",
                f"{r['load_avg_1min']:.1f}" if "load_avg_1min" in r else "-",
            ]
        )
    headers = (
        "plan|transport|ms/token|tok/s|x monolithic|trusted ms|GPU ms|transport ms|RPC/token|same tokens"
    )
    headers += "|load"
    png = Path(result["files"]["png"]).name
    note = (
        "(same tokens: the greedy tokens equal the baseline's. load: the machine's 1-minute load average "
        "when the row was done, the benchmark's own processes included; well above the core count means "
        "other work shared the machine.)"
    )
    title = f"## Decode, context {c0}"
    return [title, "", f"![decode time per token]({png})", "", *_table(headers, rows), note, ""]


def md_contexts(result: dict[str, Any]) -> list[str]:
    ctxs = [str(c) for c in result["settings"]["contexts"]]
    base = result["baseline"]["contexts"]
    rows = [
        ["monolithic", "-"]
        + [f"{base[c]['prefill_tok_s']:.0f}" for c in ctxs]
        + [f"{base[c]['decode_ms']:.1f}" for c in ctxs]
    ]
    for r in result["runs"]:
        e = r["contexts"]
        rows.append(
            [_plan_label(r), r["transport"]]
            + [
                f"{e[c]['prefill_tok_s']:.0f} ({e[c]['prefill_ratio_to_baseline']:.2f}x)" if c in e else "-"
                for c in ctxs
            ]
            + [
                f"{e[c]['decode_ms']:.1f} ({e[c]['decode_ratio_to_baseline']:.2f}x)" if c in e else "-"
                for c in ctxs
            ]
        )
    headers = "|".join(["plan", "transport", *(f"prefill tok/s @{c}" for c in ctxs)])
    headers += "|" + "|".join(f"decode ms/token @{c}" for c in ctxs)
    note = "(x: tokens/s relative to monolithic. At the larger contexts, one decode step per run.)"
    if result["settings"]["quick"]:
        wide = ", ".join(result["settings"]["wide_transports"])
        note += f" --quick measures the larger contexts over {wide} only."
    return ["## Prefill and decode by context", "", *_table(headers, rows), note, ""]


def md_traffic(result: dict[str, Any]) -> list[str]:
    ctxs = [str(c) for c in result["settings"]["contexts"]]
    transport, rows = chart_rows(result)
    table = [
        [_plan_label(r), r["wire_dtype"], r["contexts"][ctxs[0]]["rpc"], r["rpc_expected"]]
        + [_up_down(r["contexts"].get(c)) for c in ctxs]
        for r in rows
    ]
    headers = "plan|wire|RPCs|formula|" + "|".join(f"bytes up / down @{c}" for c in ctxs)
    note = f"(Measured over {transport}; a plan and wire dtype send the same bytes on every transport.)"
    return ["## Traffic per decode token", "", *_table(headers, table), note, ""]


def md_auto(result: dict[str, Any]) -> list[str]:
    rows = []
    for r in (r for r in result["runs"] if r["plan"] == "auto"):
        a, lk = result["auto"][r["transport"]], r["picked"]["link"]
        rows.append(
            [r["transport"], f"{lk['rtt_s'] * 1e6:.0f} µs"]
            + [f"{lk['up_bytes_per_s'] / 1e6:.0f} / {lk['down_bytes_per_s'] / 1e6:.0f} MB/s", a["picked"]]
            + [f"{a['ms_per_token']:.1f}", f"{a['fastest_plan']} {a['fastest_ms_per_token']:.1f}"]
            + [f"{a['slower_by']:+.0%}"]
        )
    headers = "transport|link rtt|up / down|picked|ms/token|fastest fixed plan|auto vs fastest"
    return ["## Auto plan", "", *_table(headers, rows)] if rows else []


class _TimedClient(GPUClient):
    """A GPUClient that keeps the wall time of every round trip (for latency percentiles): an
    instrument, so these runners are the one place the benchmark builds a model itself."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.latencies: list[float] = []

    def call(self, *args: Any, **kwargs: Any):
        t0 = time.perf_counter()
        try:
            return super().call(*args, **kwargs)
        finally:
            self.latencies.append(time.perf_counter() - t0)


def measure_concurrency(endpoint: Endpoint, vocab: int, s: Settings, log: Progress) -> dict[str, Any]:
    """N runners (threads, each with its own connection and session) generating at once against
    one server: aggregate decode tokens/s and per-RPC latency percentiles."""
    from teesplit.transport.zmq import ZmqTransport

    rows = []
    params = SamplingParams(max_new_tokens=s.new_tokens)
    for n in s.runners:
        clients = [_TimedClient(ZmqTransport(endpoint.address, timeout_s=s.timeout_s)) for _ in range(n)]
        try:
            gens = [
                Generator(TEELlamaModel(c, get_plan(BATCH_PLAN)), None, eos_token_ids=set()) for c in clients
            ]
            prompts = batch_prompts(vocab, n, 32)
            for c in clients:
                c.latencies.clear()  # Init is not part of the measurement
            results: list[Any] = [None] * n

            def go(i: int, gens=gens, prompts=prompts, results=results) -> None:
                results[i] = gens[i].generate(prompts[i], params)

            threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            if any(r is None for r in results):
                raise RuntimeError("a concurrent runner failed; see the server log")
            lat = np.array([x for c in clients for x in c.latencies])
            decode_tokens = sum(r.stats["decode"]["steps"] for r in results)
            decode_s = max(r.stats["decode"]["time_s"]["total"] for r in results)
            row = {
                "runners": n,
                "decode_tok_s": decode_tokens / decode_s,
                "end_to_end_tok_s": n * s.new_tokens / wall,
                "rpc_p50_ms": 1000 * float(np.percentile(lat, 50)),
                "rpc_p99_ms": 1000 * float(np.percentile(lat, 99)),
                "rpcs": int(lat.size),
            }
        finally:
            for c in clients:
                c.close()
        rows.append(row)
        log(
            f"{n} concurrent runner(s) ({BATCH_PLAN}, {endpoint.kind}): {row['decode_tok_s']:.1f} tok/s "
            f"aggregate decode, RPC p50 {row['rpc_p50_ms']:.2f} ms, p99 {row['rpc_p99_ms']:.2f} ms"
        )
    return {
        "plan": BATCH_PLAN,
        "transport": endpoint.kind,
        "prompt_tokens": 32,
        "new_tokens": s.new_tokens,
        "rows": rows,
    }


def md_concurrency(result: dict[str, Any]) -> list[str]:
    c = result.get("concurrency")
    if not c:
        return []
    rows = [
        [
            r["runners"],
            f"{r['decode_tok_s']:.1f}",
            f"{r['end_to_end_tok_s']:.1f}",
            f"{r['rpc_p50_ms']:.2f}",
            f"{r['rpc_p99_ms']:.2f}",
            r["rpcs"],
        ]
        for r in c["rows"]
    ]
    headers = "runners|decode tok/s (aggregate)|end-to-end tok/s|RPC p50 ms|RPC p99 ms|RPCs"
    title = (
        f"## Concurrent runners ({c['plan']} over {c['transport']}, one server, "
        f"{c['prompt_tokens']}-token prompts, {c['new_tokens']} tokens each)"
    )
    note = (
        "(Each runner is a thread of one process with its own connection and GPU session; the "
        "server answers requests one at a time, in arrival order.)"
    )
    return [title, "", *_table(headers, rows), note, ""]


def md_batch(result: dict[str, Any]) -> list[str]:
    b = result.get("batch")
    if not b:
        return []
    rows = [
        [r["batch"], r["connections"], f"{r['decode_tok_s']:.1f}", f"{r['end_to_end_tok_s']:.1f}"]
        + [f"{r['monolithic_decode_tok_s']:.1f}" if r["monolithic_decode_tok_s"] else "-"]
        for r in b["rows"]
    ]
    headers = (
        "batch|connections|decode tok/s (aggregate)|end-to-end tok/s (with prefill)|monolithic decode tok/s"
    )
    title = f"## Batched decode ({b['plan']} over {b['transport']}, {b['prompt_tokens']}-token prompts)"
    note = (
        "(2 connections: two micro-batches pipelined with `generate_pipelined`; its decode tokens/s is "
        "B x (N - 1) over the wall time of the run minus that of a prefill-only run.)"
    )
    return [title, "", *_table(headers, rows), note, ""]


def md_wire(result: dict[str, Any]) -> list[str]:
    w = result.get("wire_dtypes")
    if not w:
        return []
    rows = [
        [r["wire_dtype"], f"{r['max_abs_logit_diff']:.3g}"]
        + [f"{r['agreement_to_first_divergence']:.0%}", f"{r['agreement_overall']:.0%}"]
        for r in w["rows"]
    ]
    return [
        f"## Wire dtypes ({w['plan']}, {w['transport']}, {w['greedy_tokens']} greedy tokens)",
        "",
        f"Prompt: {w['prompt']} ({w['prompt_tokens']} tokens). Logits compared "
        f"at every prompt position; the largest |logit| with float32 is {w['max_abs_logit_float32']:.1f}.",
        "",
        *_table(
            "wire|max abs logit diff vs float32|agreement up to first divergence|agreement overall", rows
        ),
    ]


def md_tinyllama(result: dict[str, Any]) -> list[str]:
    tl = result.get("tinyllama")
    if not tl:
        return []
    ctxs = list(tl["rows"][0]["contexts"])
    rows = [
        [r["plan"], r["contexts"][ctxs[0]]["rpc"], r["rpc_formula"], r["seed_figure"] or "-"]
        + [_up_down(r["contexts"][c]) for c in ctxs]
        for r in tl["rows"]
    ]
    sh = tl["shape"]
    return [
        "## TinyLlama shape: counts per decode token",
        "",
        f"{sh['num_hidden_layers']} layers, hidden {sh['hidden_size']}, {sh['num_attention_heads']} heads, "
        f"{sh['num_key_value_heads']} KV heads, intermediate {sh['intermediate_size']}, vocab "
        f"{sh['vocab_size']}; random {tl['weights']} weights, local transport, float32 wire; counted, "
        "not timed. The seed's ~154 for V2.1 is 7 calls per layer without the Embedding and LMHead "
        "calls, which are counted here; its ~200 for V3.0 is 9 per layer plus those two.",
        "",
        *_table("plan|RPCs|formula|seed|" + "|".join(f"bytes up / down @{c}" for c in ctxs), rows),
    ]


def render_markdown(result: dict[str, Any]) -> str:
    sections = (
        md_header,
        md_targets,
        md_decode,
        md_contexts,
        md_traffic,
        md_auto,
        md_batch,
        md_concurrency,
        md_wire,
    )
    lines = [line for section in (*sections, md_tinyllama) for line in section(result)]
    return "\n".join(lines + md_sections(result))


def md_sections(result: dict[str, Any]) -> list[str]:
    from teesplit.bench.sections import discover

    data = result.get("sections") or {}
    known = discover() if data else {}
    lines = []
    for name, d in data.items():
        if name in known:
            lines += ["", f"## {known[name].title}", "", *known[name].render(d)]
    return lines


def section_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    from teesplit.bench.sections import discover

    data = result.get("sections") or {}
    known = discover() if data else {}
    return [t for name, d in data.items() if name in known for t in known[name].targets(d)]


def measure_sections(ctx: Any, names: tuple[str, ...]) -> dict[str, Any]:
    """Each chosen section's data; a section that fails is reported, not fatal to the run."""
    from teesplit.bench.sections import discover

    known, out = discover(), {}
    for name in names:
        ctx.log(f"section {name}: {known[name].title}")
        try:
            out[name] = known[name].measure(ctx)
        except Exception as e:  # noqa: BLE001 - one broken section must not lose the whole run
            ctx.log(f"section {name} failed: {type(e).__name__}: {e}")
            out[name] = {"error": f"{type(e).__name__}: {e}"}
    return out


# ---- main ----------------------------------------------------------------------------------
def resolve_model_dir(spec: str, log: Progress) -> Path:
    from teesplit.models import resolve_model

    if spec == "default":
        log("resolving the default model (SmolLM2-135M-Instruct; the first run converts the GGUF)")
    return resolve_model(spec)


@dataclass
class Collected:
    runs: list[dict[str, Any]] = field(default_factory=list)
    batch: dict[str, Any] | None = None
    concurrency: dict[str, Any] | None = None


def run_transports(
    model_dir: Path,
    s: Settings,
    prompt: list[int],
    vocab: int,
    batch_baseline: dict[int, float],
    tmp: Path,
    log: Progress,
) -> Collected:
    got = Collected()
    zmq_kinds = [t for t in s.transports if t != "local"]
    batch_kind = "ipc" if "ipc" in zmq_kinds else (zmq_kinds[0] if zmq_kinds else "local")
    for kind in s.transports:
        endpoint = Endpoint(kind, model_dir, s, tmp)
        log(f"{kind}: starting the GPU service")
        with running(endpoint):
            for plan in s.plans:
                row = with_restart(
                    endpoint, lambda e=endpoint, p=plan: measure_plan(e, p, prompt, s, log), log
                )
                got.runs.append(row)
            if kind == batch_kind and s.batches:
                got.batch = with_restart(
                    endpoint,
                    lambda e=endpoint: measure_batches(e, vocab, s, log, batch_baseline),
                    log,
                )
            if kind == batch_kind and s.runners and kind != "local":
                got.concurrency = with_restart(
                    endpoint, lambda e=endpoint: measure_concurrency(e, vocab, s, log), log
                )
    return got


def best_baseline(first: dict[str, Any], last: dict[str, Any]) -> dict[str, Any]:
    """The baseline is measured at the start and again at the end of the run; on a shared
    machine a busy spell slows one of them. Each figure keeps the faster of the two, which can
    only make the split's ratios smaller (never flatter it)."""
    decode = min(first["decode"], last["decode"], key=lambda d: d["ms_per_token"])
    contexts = {}
    for c, a in first["contexts"].items():
        b = last["contexts"][c]
        pre = min(a, b, key=lambda e: e["prefill_s"])
        dec = min(a, b, key=lambda e: e["decode_ms"])
        contexts[c] = {**pre, "decode_ms": dec["decode_ms"]}
    return {
        "decode": decode,
        "contexts": contexts,
        "tokens": first["tokens"],
        "batch_decode_tok_s": first["batch_decode_tok_s"],
        "measured": {
            when: {
                "decode_ms_per_token": m["decode"]["ms_per_token"],
                "prefill_tok_s": {c: e["prefill_tok_s"] for c, e in m["contexts"].items()},
            }
            for when, m in (("start", first), ("end", last))
        },
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `teesplit bench -- ARGS`: the separator reaches us
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    if args.render:
        render(Path(args.render))
        return 0
    s = settings_from_args(args)
    if args.only_sections is not None:
        return run_sections_only(s, "teesplit bench " + shlex.join(argv))
    if args.concurrency_only:
        return run_concurrency_only(s, "teesplit bench " + shlex.join(argv))
    import torch

    if s.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    old_threads = torch.get_num_threads()
    torch.set_num_threads(s.threads)
    try:
        with blas_threads(s.tee_threads) as tee_threads:
            run(s, "teesplit bench" + (" " + shlex.join(argv) if argv else ""), tee_threads)
    finally:
        torch.set_num_threads(old_threads)
    return 0


def run_concurrency_only(s: Settings, command: str) -> int:
    """Just the concurrent-runner section, over ipc: concurrency.json and concurrency.md."""
    from teesplit.config import ModelConfig

    log = Progress()
    s.out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model_dir(s.model, log)
    vocab = ModelConfig.from_dir(model_dir).vocab_size
    with (
        tempfile.TemporaryDirectory(prefix="teesplit-bench-") as tmp,
        running(Endpoint("ipc", model_dir, s, Path(tmp))) as endpoint,
    ):
        conc = measure_concurrency(endpoint, vocab, s, log)
    out = {
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine_info(s.device),
        "concurrency": conc,
    }
    (s.out_dir / "concurrency.json").write_text(json.dumps(out, indent=2) + "\n")
    (s.out_dir / "concurrency.md").write_text("\n".join(md_concurrency(out)) + "\n")
    log(f"wrote {s.out_dir / 'concurrency.json'} and concurrency.md")
    return 0


def run_sections_only(s: Settings, command: str) -> int:
    """Just the chosen extra sections: NAME.json and NAME.md per section in --out-dir."""
    import torch

    from teesplit.bench.sections import SectionContext, discover
    from teesplit.config import ModelConfig

    log = Progress()
    s.out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model_dir(s.model, log)
    cfg = ModelConfig.from_dir(model_dir)
    prompt = np.random.default_rng(0).integers(3, cfg.vocab_size, max(s.contexts)).tolist()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(s.threads)
    try:
        with blas_threads(s.tee_threads), tempfile.TemporaryDirectory(prefix="teesplit-bench-") as tmp:
            ctx = SectionContext(model_dir, s, Path(tmp), log, prompt, cfg.vocab_size)
            data = measure_sections(ctx, s.sections)
    finally:
        torch.set_num_threads(old_threads)
    known = discover()
    for name, d in data.items():
        out = {
            "command": command,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "machine": machine_info(s.device),
            "sections": {name: d},
        }
        out["targets"] = section_targets(out)
        (s.out_dir / f"{name}.json").write_text(json.dumps(out, indent=2) + "\n")
        md = [f"# {known[name].title}", "", f"`{command}`, {out['date']}", "", *known[name].render(d)]
        md += ["", *md_targets(out)] if out["targets"] else []
        (s.out_dir / f"{name}.md").write_text("\n".join(md) + "\n")
        log(f"wrote {s.out_dir / (name + '.json')} and {name}.md")
    return 1 if any("error" in d for d in data.values()) else 0


def render(json_path: Path) -> None:
    """bench.md and bench.png beside `json_path`, from its contents."""
    result = json.loads(json_path.read_text())
    write_chart(result, json_path.with_suffix(".png"))
    json_path.with_suffix(".md").write_text(render_markdown(result) + "\n")


def run(s: Settings, command: str, tee_threads: int | None) -> dict[str, Any]:
    """The whole benchmark; writes the three files and returns the JSON document."""
    from teesplit.config import ModelConfig

    log = Progress()
    s.out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model_dir(s.model, log)
    cfg = ModelConfig.from_dir(model_dir)
    prompt = np.random.default_rng(0).integers(3, cfg.vocab_size, max(s.contexts)).tolist()
    result: dict[str, Any] = {
        "version": 1,
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items()},
        "machine": machine_info(s.device),
        "model": {
            "name": model_dir.name.split(".")[0] if s.model == "default" else model_dir.name,
            "path": str(model_dir),
            "weights": "real weights" if s.model == "default" else "weights from the given directory",
            "layers": cfg.num_layers,
            "hidden": cfg.hidden_size,
            "heads": cfg.num_heads,
            "kv_heads": cfg.num_kv_heads,
            "vocab": cfg.vocab_size,
        },
        "files": {k: str(s.out_dir / f"bench.{k}") for k in ("json", "md", "png")},
    }
    result["settings"]["tee_blas_threads_in_force"] = tee_threads
    with tempfile.TemporaryDirectory(prefix="teesplit-bench-") as tmp_name:
        tmp = Path(tmp_name)
        first = measure_baseline(model_dir, s, prompt, cfg.vocab_size, log)
        got = run_transports(model_dir, s, prompt, cfg.vocab_size, first["batch_decode_tok_s"], tmp, log)
        last = measure_baseline(model_dir, s, prompt, cfg.vocab_size, log, batches=False)
        baseline = best_baseline(first, last)
        for row in got.runs:
            add_ratios(row, baseline)
        result["baseline"] = {k: v for k, v in baseline.items() if k != "tokens"}
        result["runs"] = [{k: v for k, v in r.items() if k != "tokens"} for r in got.runs]
        result["auto"] = check_auto(got.runs)
        if got.batch:
            result["batch"] = got.batch
        if got.concurrency:
            result["concurrency"] = got.concurrency
        if s.wire_tokens:
            result["wire_dtypes"] = measure_wire_dtypes(model_dir, s, tmp, log)
        if s.tinyllama:
            result["tinyllama"] = measure_tinyllama(s, tmp, log)
        if s.sections:
            from teesplit.bench.sections import SectionContext

            ctx = SectionContext(model_dir, s, tmp, log, prompt, cfg.vocab_size, baseline)
            result["sections"] = measure_sections(ctx, s.sections)
    result["machine"]["load_average_at_end"] = list(os.getloadavg())
    result["targets"] = evaluate_targets(result)
    result["elapsed_s"] = log.elapsed
    Path(result["files"]["json"]).write_text(json.dumps(result, indent=2) + "\n")
    render(Path(result["files"]["json"]))
    verdict = {True: "pass", False: "MISS", None: "n/a"}
    for t in result["targets"]:
        log(f"target {t['name']}: {verdict[t['passed']]} - {t['detail']}")
    log(f"wrote {', '.join(result['files'].values())} in {log.elapsed:.0f} s")
    return result


if __name__ == "__main__":
    sys.exit(main())
