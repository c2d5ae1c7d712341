"""Bench section `api`: time to first token (TTFT) and time per output token (TPOT) through the
OpenAI-compatible API (`teesplit api`, continuous batching over one GPU connection) at 1, 4
and 8 concurrent streaming clients, beside the CLI path (the Generator directly, one runner
and one connection per client) against the same `teesplit serve` process, plan and prompts.

API: a `teesplit api` child process; each client is a thread streaming /v1/completions over
real HTTP with token-id prompts, `ignore_eos` and greedy sampling. TTFT is from sending the
request to the first streamed text, TPOT (last chunk - first chunk) / (tokens - 1).
CLI: TTFT is the prefill's wall time, TPOT the decode time per step, from the Generator's stats.
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from teesplit.bench.sections import Section, SectionContext

CLIENTS = (1, 4, 8)
PLAN = "v2-merged"  # the API's default plan (trusted-side KV cache: rows join and leave freely)
PROMPT_TOKENS = 32
# The stall: a running stream's longest pause while another client's long prompt is prefilled,
# with the prompt in one pass (0) and in chunks (the default, and a smaller one).
LONG_PROMPT_TOKENS = {True: 1024, False: 2048}  # quick, full
STALL_CHUNKS = (0, 512, 128)


def measure(ctx: SectionContext) -> dict[str, Any]:
    from teesplit.bench.common import Endpoint, batch_prompts, running

    if not (ctx.model_dir / "tokenizer.json").exists():
        return {"skipped": f"{ctx.model_dir.name} has no tokenizer.json (the API needs one)"}
    s = ctx.settings
    new = s.new_tokens
    rows = []
    with running(Endpoint("ipc", ctx.model_dir, s, ctx.tmp)) as endpoint:
        api = _APIChild(ctx.model_dir, endpoint.address, ctx.tmp / "api.log", s.tee_threads, s.timeout_s)
        try:
            _api_run(api.port, batch_prompts(ctx.vocab, 1, PROMPT_TOKENS), 2)  # warm-up
            for n in CLIENTS:
                prompts = batch_prompts(ctx.vocab, n, PROMPT_TOKENS)
                row = {
                    "clients": n,
                    "api": _api_run(api.port, prompts, new),
                    "cli": _cli_run(endpoint, prompts, new),
                }
                rows.append(row)
                a, c = row["api"], row["cli"]
                ctx.log(
                    f"api {n} client(s): TTFT {a['ttft_ms']:.1f} ms (CLI {c['ttft_ms']:.1f}), "
                    f"TPOT {a['tpot_ms']:.1f} ms (CLI {c['tpot_ms']:.1f}), "
                    f"{a['tok_s']:.1f} tok/s aggregate (CLI {c['tok_s']:.1f})"
                )
        finally:
            api.stop()
        stall = _stall(ctx, endpoint.address)
    return {
        "plan": PLAN,
        "transport": "ipc",
        "prompt_tokens": PROMPT_TOKENS,
        "new_tokens": new,
        "rows": rows,
        "stall": stall,
    }


def _stall(ctx: SectionContext, server: str) -> dict[str, Any]:
    """A client streams; once it is decoding, another sends a long prompt. For each prefill
    chunk size, the first stream's longest gap between tokens while the long prompt is
    prefilled (from its sending to its first token), beside that stream's usual gap."""
    from teesplit.bench.common import batch_prompts
    from teesplit.config import ModelConfig

    s = ctx.settings
    max_pos = ModelConfig.from_dir(ctx.model_dir).max_position_embeddings
    long_n = min(LONG_PROMPT_TOKENS[s.quick], max_pos // 2)
    short_prompt, long_prompt = batch_prompts(ctx.vocab, 2, long_n)
    short_prompt = short_prompt[:PROMPT_TOKENS]
    budget = max_pos - PROMPT_TOKENS - 1  # ends early: the stream is closed once the long prompt is in
    rows = []
    for chunk in STALL_CHUNKS:
        chunk = long_n // 4 if chunk >= long_n else chunk  # a small model's short prompt still gets chunks
        if any(r["prefill_chunk"] == chunk for r in rows):
            continue
        log = ctx.tmp / f"api-stall-{chunk}.log"
        api = _APIChild(
            ctx.model_dir, server, log, s.tee_threads, s.timeout_s, ["--prefill-chunk", str(chunk)]
        )
        try:
            arrivals: list[float] = []
            enough, stop = threading.Event(), threading.Event()

            def stream(api=api, arrivals=arrivals, enough=enough, stop=stop) -> None:
                _stream_one(api.port, short_prompt, budget, arrivals, stop, enough)

            reader = threading.Thread(target=stream)
            reader.start()
            if not enough.wait(s.timeout_s):
                raise RuntimeError(f"the first stream got no tokens; see {log}")
            t_send = time.perf_counter()
            ttft = _stream_one(api.port, long_prompt, 1)[0]
            stop.set()
            reader.join(s.timeout_s)
        finally:
            api.stop()
        t_first = t_send + ttft
        before = np.diff([t for t in arrivals if t <= t_send])
        pauses = [b - a for a, b in itertools.pairwise(arrivals) if b > t_send and a < t_first]
        rows.append(
            {
                "prefill_chunk": chunk,
                "long_ttft_ms": 1000 * ttft,
                "max_gap_ms": 1000 * max(pauses, default=float("nan")),
                "usual_gap_ms": 1000 * float(np.median(before)) if len(before) else float("nan"),
                "tokens_during": sum(1 for t in arrivals if t_send < t < t_first),
            }
        )
        r = rows[-1]
        ctx.log(
            f"api stall, prefill chunk {chunk or 'none'}: a {long_n}-token prompt (TTFT "
            f"{r['long_ttft_ms']:.0f} ms) paused a running stream for {r['max_gap_ms']:.0f} ms at "
            f"most (usually {r['usual_gap_ms']:.0f} ms between its tokens)"
        )
    return {"long_prompt_tokens": long_n, "rows": rows}


def _cli_run(endpoint, prompts: list[list[int]], new: int) -> dict[str, Any]:
    """One Generator (own connection) per client, all at once: the CLI path's concurrency."""
    from teesplit.tee.generate import Generator, SamplingParams

    models = [endpoint.model(PLAN) for _ in prompts]
    try:
        gens = [Generator(m, None, eos_token_ids=set()) for m in models]
        gens[0].generate(prompts[0], SamplingParams(max_new_tokens=2))  # warm-up
        results: list[Any] = [None] * len(prompts)

        def go(i: int) -> None:
            results[i] = gens[i].generate(prompts[i], SamplingParams(max_new_tokens=new))

        wall = _together([lambda i=i: go(i) for i in range(len(prompts))])
    finally:
        for m in models:
            m.gpu.close()
    if any(r is None for r in results):
        raise RuntimeError("a CLI runner failed")
    ttft = [r.stats["prefill"]["time_s"]["total"] for r in results]
    tpot = [r.stats["decode"]["time_s"]["total"] / max(r.stats["decode"]["steps"], 1) for r in results]
    return _row(ttft, tpot, sum(len(r.tokens) for r in results), wall)


def _api_run(port: int, prompts: list[list[int]], new: int) -> dict[str, Any]:
    """One streaming HTTP client (thread) per prompt, all at once."""
    out: list[Any] = [None] * len(prompts)

    def go(i: int) -> None:
        out[i] = _stream_one(port, prompts[i], new)

    wall = _together([lambda i=i: go(i) for i in range(len(prompts))])
    if any(r is None for r in out):
        raise RuntimeError("an API client failed; see api.log")
    ttft = [r[0] for r in out]
    tpot = [r[1] for r in out if r[1] is not None]
    return _row(ttft, tpot or [float("nan")], sum(r[2] for r in out), wall)


def _stream_one(
    port: int,
    prompt: list[int],
    new: int,
    arrivals: list[float] | None = None,
    stop: threading.Event | None = None,
    started: threading.Event | None = None,
) -> tuple[float, float | None, int]:
    """One streaming completion: (TTFT, TPOT, tokens). With `arrivals`, each text chunk's time
    is appended there, `started` is set after the fourth, and the stream is closed early (the
    API then cancels the request) at the first chunk after `stop` is set."""
    body = {
        "model": "bench",
        "prompt": prompt,
        "max_tokens": new,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        t0 = time.perf_counter()
        conn.request("POST", "/v1/completions", body=json.dumps(body).encode())
        r = conn.getresponse()
        if r.status != 200:
            raise RuntimeError(f"API answered {r.status}: {r.read()[:500]!r}")
        first = last = None
        tokens = 0
        for line in r:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"API stream error: {event['error']}")
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            if event["choices"] and event["choices"][0]["text"]:
                last = time.perf_counter()
                first = first or last
                if arrivals is not None:
                    arrivals.append(last)
                    if started is not None and len(arrivals) == 4:
                        started.set()
                    if stop is not None and stop.is_set():
                        return first - t0, None, len(arrivals)
    finally:
        conn.close()
    if first is None:
        raise RuntimeError("the API streamed no text")
    tpot = (last - first) / (tokens - 1) if tokens > 1 else None
    return first - t0, tpot, tokens


def _together(fns) -> float:
    threads = [threading.Thread(target=f) for f in fns]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def _row(ttft: list[float], tpot: list[float], tokens: int, wall: float) -> dict[str, Any]:
    return {
        "ttft_ms": 1000 * float(np.median(ttft)),
        "ttft_max_ms": 1000 * float(np.max(ttft)),
        "tpot_ms": 1000 * float(np.median(tpot)),
        "tok_s": tokens / wall,
    }


class _APIChild:
    """`teesplit api` in a child process, on a free port."""

    def __init__(
        self,
        model_dir: Path,
        server: str,
        log_path: Path,
        tee_threads: int,
        timeout_s: float,
        extra: list[str] = (),
    ):
        from teesplit.launch import free_tcp_port, start_api

        self.port = free_tcp_port()
        args = ["--server", server, "--model", str(model_dir), "--plan", PLAN, "--served-model-name", "bench"]
        args += ["--max-batch", str(max(CLIENTS)), "--timeout", str(timeout_s), *extra]
        env = dict(os.environ)
        if tee_threads:  # the same numpy threads as the CLI path in this process
            env |= {
                k: str(tee_threads) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
            }
        self.log = open(log_path, "ab")
        try:
            self.proc = start_api(args, self.port, stderr=self.log, env=env)
        except RuntimeError as e:
            self.log.close()
            raise RuntimeError(f"{e} (log: {log_path})") from None

    def stop(self) -> None:
        from teesplit.launch import stop_server

        stop_server(self.proc, grace_s=30)
        self.log.close()


def render(data: dict[str, Any]) -> list[str]:
    if "skipped" in data:
        return [f"Not measured: {data['skipped']}."]
    lines = [
        f"Plan {data['plan']} over {data['transport']}, {data['prompt_tokens']}-token prompts, "
        f"{data['new_tokens']} new tokens per client. TTFT and TPOT are medians over the clients; "
        "API: `teesplit api` (one GPU connection, continuous batching); "
        "CLI: one Generator and connection per client.",
        "",
        "| clients | TTFT API ms | TTFT CLI ms | TPOT API ms | TPOT CLI ms | tok/s API | tok/s CLI |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in data["rows"]:
        a, c = r["api"], r["cli"]
        lines.append(
            f"| {r['clients']} | {a['ttft_ms']:.1f} | {c['ttft_ms']:.1f} | {a['tpot_ms']:.1f} | "
            f"{c['tpot_ms']:.1f} | {a['tok_s']:.1f} | {c['tok_s']:.1f} |"
        )
    stall = data.get("stall")
    if stall:
        lines += [
            "",
            f"The stall: one client streams; once it is decoding, another sends a "
            f"{stall['long_prompt_tokens']}-token prompt. The first stream's longest pause between "
            "tokens while that prompt is prefilled (from its sending to its first token), with the "
            "prompt in one pass and in chunks (`teesplit api --prefill-chunk N`; the scheduler runs "
            "the other rows' decode step between chunks):",
            "",
            "| prefill chunk | long prompt's TTFT ms | longest pause of the running stream ms | "
            "its usual gap ms | its tokens during the prefill |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in stall["rows"]:
            lines.append(
                f"| {r['prefill_chunk'] or 'one pass'} | {r['long_ttft_ms']:.0f} | {r['max_gap_ms']:.0f} | "
                f"{r['usual_gap_ms']:.0f} | {r['tokens_during']} |"
            )
    return lines


def targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    from teesplit.bench.common import target

    rows = {r["clients"]: r for r in data.get("rows", [])}
    most = rows.get(max(CLIENTS))
    one = rows.get(1)
    return [
        target(
            "api_batching",
            f"API aggregate tok/s at {max(CLIENTS)} clients vs as many separate CLI runners (batching pays)",
            most["api"]["tok_s"] / most["cli"]["tok_s"] if most else None,
            1.0,
        ),
        target(
            "api_overhead",
            "CLI TPOT / API TPOT at 1 client (the HTTP layer costs little per token)",
            one["cli"]["tpot_ms"] / one["api"]["tpot_ms"] if one else None,
            0.8,
        ),
    ]


SECTION = Section(
    title="OpenAI-compatible API: time to first token and per output token",
    measure=measure,
    render=render,
    targets=targets,
)
