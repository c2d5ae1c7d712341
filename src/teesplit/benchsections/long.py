"""Bench section `long`: long prompts and long contexts (issue 18).

Prompts of 128, 2,048 and 8,000 tokens (--quick: 128 and 1,024), for every plan, `auto` (a plan
per phase, `adaptive.choose_phases`) and monolithic transformers on the same weights:

- prefill tokens/s (the split prefills in chunks of `--prefill-chunk`'s default);
- decode ms/token at that context (median of the steps after the prompt);
- bytes per prompt, to the GPU and back (the prefill, and for `auto` the K/V hand-over);
- peak resident memory of both processes over the request, above what each held before it
  (the trusted side is this process; the GPU server a `teesplit serve` child over ipc://);
- a sweep of prefill chunk sizes at the middle length, the data behind the default.

Targets (issue 18): prefill at 2k >= 0.8x transformers (best v2-placement plan); decode at 8k
>= 1.0x transformers (every plan); auto within 10% of the best fixed plan at each length (the
whole request: prefill plus the decode steps); bytes per prompt at 2k in auto's plans <= 1 GB.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import numpy as np

from teesplit.benchsections import Section, SectionContext

LENGTHS, QUICK_LENGTHS = (128, 2048, 8000), (128, 1024)
FIXED = ("v3", "v2", "v3-fused", "v2-fused", "v3-merged", "v2-merged")
CHUNKS = (256, 512, 1024, None)  # None: the whole prompt in one pass
CHUNK_PLANS = ("v2-merged", "v3-merged")
TARGET_PREFILL_2K = 0.8
TARGET_DECODE_8K = 1.0
TARGET_AUTO_SLACK = 0.10
TARGET_BYTES_2K = 1e9
CHART = "long.png"


# ---- memory: peak resident set since a reset (Linux: /proc/PID/clear_refs "5") ---------------
def _status(pid: int | str, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/{pid}/status")


class PeakRSS:
    """Peak RSS growth of a process over a span: the kernel's high-water mark, reset at the
    start, minus the resident size then."""

    def __init__(self, pid: int | str = "self"):
        self.pid = pid
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        self.before = _status(pid, "VmRSS")

    def growth(self) -> int:
        return max(_status(self.pid, "VmHWM") - self.before, 0)


# ---- one request through the split, and through transformers ------------------------------
def split_request(model, prompt: list[int], n_new: int, chunk: int | None, server_pid: int | None) -> dict:
    """Prefill `prompt` (chunked), hand over to the decode plan, then n_new greedy steps."""
    gpu = model.gpu
    cache = model.new_cache(1, max_tokens=len(prompt) + n_new + 1)
    tee, server = PeakRSS(), PeakRSS(server_pid) if server_pid else None
    try:
        m0, t0 = gpu.metrics.copy(), time.perf_counter()
        _, ids = model.prefill(np.array([prompt], np.int64), cache, None, chunk, top_k=1)
        cache = model.for_decode(cache)
        prefill_s = time.perf_counter() - t0
        used = gpu.metrics.copy() - m0
        tokens, steps = [int(ids[0, -1, 0])], []
        m1 = gpu.metrics.copy()
        for _ in range(n_new - 1):
            t0 = time.perf_counter()
            _, ids = model.forward(np.array([[tokens[-1]]], np.int64), cache, top_k=1)
            steps.append(time.perf_counter() - t0)
            tokens.append(int(ids[0, -1, 0]))
        decode = gpu.metrics.copy() - m1
    finally:
        model.close_cache(cache)
    return {
        "prefill_s": prefill_s,
        "prefill_tok_s": len(prompt) / prefill_s,
        "decode_ms": 1000 * float(np.median(steps)) if steps else None,
        "bytes_up": used.bytes_to_gpu,
        "bytes_down": used.bytes_from_gpu,
        "prefill_rpc": sum(used.rpc.values()),
        "decode_bytes_per_token": (decode.bytes_to_gpu + decode.bytes_from_gpu) / max(len(steps), 1),
        "rss_tee": tee.growth(),
        "rss_gpu": server.growth() if server else None,
        "tokens": tokens,
    }


def monolithic_request(mono, prompt: list[int], n_new: int) -> dict:
    tee = PeakRSS()
    p = mono.profile([prompt], n_new)
    return {
        "prefill_s": p.prefill_s,
        "prefill_tok_s": len(prompt) / p.prefill_s,
        "decode_ms": 1000 * float(np.median([s["time_s"]["total"] for s in p.steps])),
        "rss_tee": tee.growth(),
        "tokens": p.tokens,
    }


# ---- the section ---------------------------------------------------------------------------
def measure(ctx: SectionContext) -> dict[str, Any]:
    from teesplit.bench import Endpoint, Monolithic, running
    from teesplit.cli import DEFAULT_PREFILL_CHUNK
    from teesplit.config import ModelConfig
    from teesplit.tee.adaptive import choose_phases
    from teesplit.tee.model import TEELlamaModel
    from teesplit.tee.plans import get_plan

    s = ctx.settings
    n_new = 4 if s.quick else 9
    room = ModelConfig.from_dir(ctx.model_dir).max_position_embeddings - n_new - 1  # a session's cap too
    lengths = tuple(sorted({min(n, room) for n in (QUICK_LENGTHS if s.quick else LENGTHS)}))
    chunk = DEFAULT_PREFILL_CHUNK
    rng = np.random.default_rng(18)
    prompts = {n: rng.integers(3, ctx.vocab, n).tolist() for n in lengths}
    out: dict[str, Any] = {"lengths": list(lengths), "new_tokens": n_new, "chunk": chunk, "rows": {}}
    mono = Monolithic(ctx.model_dir, s.device, s.dtype)
    try:
        monolithic_request(mono, prompts[lengths[0]][:32], 3)  # warm-up
        out["rows"]["transformers"] = {}
        for n in lengths:
            r = out["rows"]["transformers"][str(n)] = monolithic_request(mono, prompts[n], n_new)
            ctx.log(f"long: transformers {n}: {r['prefill_tok_s']:.0f} tok/s, decode {r['decode_ms']:.1f} ms")
    finally:
        mono.close()
    with running(Endpoint("ipc", ctx.model_dir, s, ctx.tmp)) as endpoint:
        pid = endpoint.proc.pid
        client = endpoint.connect()
        try:
            model = TEELlamaModel(client, get_plan("v2-fused"))
            split_request(model, prompts[lengths[0]][:32], 3, chunk, pid)  # warm-up
            for name in (*FIXED, "auto"):
                rows = out["rows"][name] = {}
                for n in lengths:
                    picked = None
                    if name == "auto":
                        choice = choose_phases(
                            client, model.config, n, n_new, chunk, top_k=1, wires=("float32",)
                        )
                        model.plan, model.decode_plan = choice.prefill, choice.decode
                        picked = {"prefill": choice.prefill.name, "decode": choice.decode.name}
                    else:
                        model.plan, model.decode_plan = get_plan(name), None
                    r = rows[str(n)] = split_request(model, prompts[n], n_new, chunk, pid)
                    if picked:
                        r["picked"] = picked
                    label = name if not picked else f"{name} ({picked['prefill']} then {picked['decode']})"
                    ctx.log(
                        f"long: {label} {n}: prefill {r['prefill_tok_s']:.0f} tok/s, decode "
                        f"{r['decode_ms']:.1f} ms, {(r['bytes_up'] + r['bytes_down']) / 1e6:.0f} MB, RSS "
                        f"+{r['rss_tee'] / 2**20:.0f} / +{r['rss_gpu'] / 2**20:.0f} MiB"
                    )
            out["chunks"] = _chunk_sweep(model, prompts[lengths[-2 if len(lengths) > 2 else -1]], pid, ctx)
        finally:
            client.close()
    _ratios(out)
    with contextlib.suppress(Exception):  # a chart is a nicety; the numbers are in the JSON
        write_chart(out, Path(s.out_dir) / CHART)
        out["chart"] = CHART
    return out


def _chunk_sweep(model, prompt: list[int], pid: int, ctx: SectionContext) -> dict[str, Any]:
    from teesplit.tee.plans import get_plan

    sweep: dict[str, Any] = {"length": len(prompt), "plans": {}}
    for name in CHUNK_PLANS:
        model.plan, model.decode_plan = get_plan(name), None
        rows = sweep["plans"][name] = {}
        for c in CHUNKS:
            r = split_request(model, prompt, 2, c, pid)
            rows[str(c or "none")] = {k: r[k] for k in ("prefill_tok_s", "rss_tee", "rss_gpu", "bytes_up")}
            ctx.log(f"long: {name} chunk {c or 'none'}: {r['prefill_tok_s']:.0f} tok/s")
    return sweep


def _ratios(out: dict[str, Any]) -> None:
    base = out["rows"]["transformers"]
    for name, rows in out["rows"].items():
        for n, r in rows.items():
            b = base[n]
            r["prefill_vs_transformers"] = r["prefill_tok_s"] / b["prefill_tok_s"]
            r["decode_vs_transformers"] = b["decode_ms"] / r["decode_ms"]
            r["request_s"] = r["prefill_s"] + (out["new_tokens"] - 1) * r["decode_ms"] / 1000
            if name != "transformers":
                r["same_tokens_as_transformers"] = r["tokens"] == b["tokens"]


# ---- report ----------------------------------------------------------------------------------
def _mib(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**20:.0f}"


def render(d: dict[str, Any]) -> list[str]:
    lines = []
    if d.get("chart"):
        lines += [f"![prefill, decode, bytes and memory against the prompt length]({d['chart']})", ""]
    lines += [
        f"Prefill in chunks of {d['chunk']} tokens; decode: median of {d['new_tokens'] - 1} steps after the "
        "prompt; bytes: the prefill's (for auto with the K/V hand-over); RSS: peak growth over the "
        "request, trusted side / GPU server process (ipc://).",
        "",
    ]
    for n in d["lengths"]:
        lines += [
            f"**{n} tokens**",
            "",
            "| plan | prefill tok/s | vs transformers | decode ms/token | vs transformers | MB to GPU / back "
            "| request s | RSS MiB trusted / server | same tokens |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, rows in d["rows"].items():
            r = rows[str(n)]
            label = (
                name if "picked" not in r else f"auto ({r['picked']['prefill']} then {r['picked']['decode']})"
            )
            mb = "-" if "bytes_up" not in r else f"{r['bytes_up'] / 1e6:,.0f} / {r['bytes_down'] / 1e6:,.0f}"
            same = {True: "yes", False: "NO"}.get(r.get("same_tokens_as_transformers"), "-")
            lines.append(
                f"| {label} | {r['prefill_tok_s']:.0f} | {r['prefill_vs_transformers']:.2f}x "
                f"| {r['decode_ms']:.1f} | {r['decode_vs_transformers']:.2f}x | {mb} | {r['request_s']:.2f} "
                f"| {_mib(r['rss_tee'])} / {_mib(r.get('rss_gpu'))} | {same} |"
            )
        lines.append("")
    sweep = d.get("chunks")
    if sweep:
        lines += [
            f"Prefill chunk size at {sweep['length']} tokens (`--prefill-chunk`): tokens/s and peak RSS "
            "growth (trusted / server, MiB):",
            "",
            "| plan | "
            + " | ".join(
                f"chunk {c}" if c != "none" else "one pass" for c in next(iter(sweep["plans"].values()))
            )
            + " |",
            "|---|" + "---|" * len(next(iter(sweep["plans"].values()))),
        ]
        for name, rows in sweep["plans"].items():
            cells = [
                f"{r['prefill_tok_s']:.0f} tok/s, {_mib(r['rss_tee'])} / {_mib(r['rss_gpu'])}"
                for r in rows.values()
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def targets(d: dict[str, Any]) -> list[dict[str, Any]]:
    from teesplit.bench import target

    rows, out = d["rows"], []
    mid = "2048" if "2048" in rows["transformers"] else str(d["lengths"][-1])
    v2 = [n for n in FIXED if n.startswith("v2")]
    best = max(v2, key=lambda n: rows[n][mid]["prefill_vs_transformers"])
    out.append(
        target(
            f"long prefill {mid}",
            f"prefill of {mid} tokens in v2 placement at >= {TARGET_PREFILL_2K}x transformers' tokens/s "
            f"({best})",
            rows[best][mid]["prefill_vs_transformers"],
            TARGET_PREFILL_2K,
        )
    )
    top = str(d["lengths"][-1])
    slowest = min(FIXED, key=lambda n: rows[n][top]["decode_vs_transformers"])
    out.append(
        target(
            f"long decode {top}",
            f"decode at {top} tokens of context at >= {TARGET_DECODE_8K}x transformers, every plan "
            f"({slowest} is the slowest)",
            rows[slowest][top]["decode_vs_transformers"],
            TARGET_DECODE_8K,
        )
    )
    for n in d["lengths"]:
        fastest = min(FIXED, key=lambda p: rows[p][str(n)]["request_s"])
        auto = rows["auto"][str(n)]["request_s"]
        out.append(
            target(
                f"long auto {n}",
                f"auto's request at {n} tokens within {TARGET_AUTO_SLACK:.0%} of the fastest fixed plan "
                f"({fastest})",
                rows[fastest][str(n)]["request_s"] / auto,
                1 / (1 + TARGET_AUTO_SLACK),
            )
        )
    a = rows["auto"][mid]
    sent = a["bytes_up"]
    out.append(
        {
            "name": f"long bytes {mid}",
            "goal": f"bytes sent to the GPU per {mid}-token prompt in auto's plans <= 1 GB",
            "measured": sent,
            "threshold": TARGET_BYTES_2K,
            "passed": sent <= TARGET_BYTES_2K,
            "detail": f"{sent / 1e6:,.0f} MB up, {a['bytes_down'] / 1e6:,.0f} MB back "
            f"({a['picked']['prefill']} then {a['picked']['decode']})",
        }
    )
    return out


def write_chart(d: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    panels = [
        ("prefill tokens/s", lambda r: r["prefill_tok_s"], False),
        ("decode ms/token at that context", lambda r: r["decode_ms"], False),
        (
            "bytes per prompt (to GPU + back)",
            lambda r: r.get("bytes_up", 0) + r.get("bytes_down", 0) or None,
            True,
        ),
        (
            "peak RSS growth, both processes (MiB)",
            lambda r: (r["rss_tee"] + (r.get("rss_gpu") or 0)) / 2**20,
            True,
        ),
    ]
    xs = d["lengths"]
    for ax, (title, value, logy) in zip(axes.flat, panels, strict=True):
        for name, rows in d["rows"].items():
            ys = [value(rows[str(n)]) for n in xs]
            if all(y is None for y in ys):
                continue
            ax.plot(xs, ys, marker="o", label=name, linestyle="--" if name == "transformers" else "-")
        ax.set_xscale("log")
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel("prompt tokens")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


SECTION = Section(title="Long prompts and contexts", measure=measure, render=render, targets=targets)
