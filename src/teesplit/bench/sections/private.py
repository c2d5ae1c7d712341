"""Bench section: the private plans beside v2-merged, over tcp on the run's model.

private-otp and private-2party, each with int16 and int8 weights, and v2-merged (float, the
same crossings in the clear), measured in one run, every plan's decode steps interleaved token
by token for several rounds so that the machine's changing load hits all alike: decode ms/token
online (private-otp's pads and private-2party's shares made ahead, the pad threads full and
held while measured; private-2party/int16/online also without shares made ahead), round trips and wire
bytes per token, the servers' resident bytes per weight of the private sites, the trusted CPU
time per token to make the one-time pads (offline) and the second server's work made ahead,
and accuracy against v2-merged: equal greedy tokens and the largest logit difference.
private-2party runs against two server processes. Then the limb GEMM
itself against a float GEMM of the same weights (bfloat16 on CUDA, float32 on the CPU) at 1
and 8 sequences, in this process, on the run's device.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

import numpy as np

from teesplit.bench.sections import Section, SectionContext

FORMATS = ("int16", "int8")
# plan/weights; "online": private-2party without shares made ahead (both servers every step)
PRIVATE = (
    *(f"{p}/{w}" for p in ("private-otp", "private-2party") for w in FORMATS),
    "private-2party/int16/online",
)
BASE = "v2-merged"


def _offline_pad_ms(lw, bits: int, source: str, tokens: int) -> tuple[float, int, int]:
    """Trusted-side CPU ms per token to make every step's pads (no background thread), the pad
    bytes held per token, and the bytes of the integer weights kept to make them."""
    from teesplit.tee.private import PadPool, RingSites, ring_steps

    sites = RingSites(lw, bits, source, keep_q=True)
    steps = ring_steps(lw.config)
    pool = PadPool(sites, steps, depth=0)
    t0 = time.process_time()
    pads = [pool.take(step.index, tokens) for step in steps]
    cpu_s = time.process_time() - t0
    nbytes = sum(p.nbytes for pad in pads for p in pad.consume() if p is not None) // tokens
    pool.close()
    return 1000 * cpu_s / tokens, nbytes, sites.nbytes


GEMM_SHAPES = {
    "4096x4096": (4096, 4096),
    "14336x4096 (MLP)": (14336, 4096),
    "49152x576 (LM head)": (49152, 576),
}


def _gemm_ms(device: str, threads: int, quick: bool) -> list[dict[str, Any]]:
    """Time per call of the limb GEMM (gpu/ring.py) against a float GEMM of the same weights,
    at 1 and 8 sequences, for an 8B-class model's layer shapes and SmolLM2's LM head."""
    import torch

    from teesplit import quant
    from teesplit.gpu.ring import LimbWeights, int_mm_is_exact

    torch.set_num_threads(threads)
    dev = torch.device(device)
    float_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    exact = dev.type == "cuda" or int_mm_is_exact()
    rng = np.random.default_rng(0)
    out = []
    for name, (n, k) in ({"512x512": (512, 512)} if quick else GEMM_SHAPES).items():
        w = (torch.randn(n, k) * 0.02).to(dev, float_dtype)
        for bits in (16, 8):
            qmax = quant.QMAX[bits]
            q = rng.integers(-qmax, qmax + 1, (n, k), dtype=np.int16 if bits == 16 else np.int8)
            lw = LimbWeights(quant.IntWeights(q, np.ones(n)), dev, exact)
            # the CPU's other exact layout: float64 products over limbs of x, integers widened on the fly
            numpy_lw = (
                None if dev.type == "cuda" else LimbWeights(quant.IntWeights(q, np.ones(n)), dev, False)
            )
            for rows in (1, 8):
                t_ring, t_float = _time_pair(lw, w, rows, dev, rng)
                t_numpy = None if numpy_lw is None else _time_pair(numpy_lw, w, rows, dev, rng, rounds=2)[0]
                out.append(
                    {
                        "shape": name,
                        "weights": f"int{bits}",
                        "sequences": rows,
                        "limb_gemm_ms": t_ring,
                        "float64_limbs_ms": t_numpy,
                        "float_gemm_ms": t_float,
                        "float_dtype": str(float_dtype).removeprefix("torch."),
                        "ratio": t_ring / t_float,
                    }
                )
        del w
    return out


def _time_pair(lw, w, rows: int, dev, rng, rounds: int = 5) -> tuple[float, float]:
    """ms per call of lw's limb GEMM on `rows` ring rows and of F.linear on `rows` float rows."""
    import torch
    import torch.nn.functional as F

    k = w.shape[1]
    x = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, (rows, k), dtype=np.int64)
    xf = torch.from_numpy(rng.standard_normal((rows, k), dtype=np.float32)).to(dev, w.dtype)
    if dev.type == "cuda":
        xt = torch.from_numpy(x).to(dev)
        return _time_alternating(lambda: lw.matmul_t(xt), lambda: F.linear(xf, w), dev, rounds)
    return _time_alternating(lambda: lw.matmul_np(x), lambda: F.linear(xf, w), dev, rounds)


def _time_alternating(a, b, dev, rounds: int = 5, calls: int = 5) -> tuple[float, float]:
    """Median ms per call of a and b, measured in alternation."""
    import torch

    def once(f) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        for _ in range(calls):
            f()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return 1000 * (time.perf_counter() - t0) / calls

    once(a), once(b)  # warm-up
    ta, tb = [], []
    for _ in range(rounds):
        ta.append(once(a))
        tb.append(once(b))
    return float(np.median(ta)), float(np.median(tb))


def measure(ctx: SectionContext) -> dict[str, Any]:
    from teesplit.bench.common import Endpoint, running, split_profile
    from teesplit.quant import weight_bits
    from teesplit.tee.local_weights import load_local_weights
    from teesplit.tee.model import TEELlamaModel

    s = ctx.settings
    load = [os.getloadavg()[0]]
    n_new = max(3, 4 if s.quick else s.new_tokens)
    rounds = 1 if s.quick else 5
    prompt = ctx.prompt[: 32 if s.quick else 128]
    lw = load_local_weights(ctx.model_dir)
    a, b = Endpoint("tcp", ctx.model_dir, s, ctx.tmp), Endpoint("tcp", ctx.model_dir, s, ctx.tmp)
    models: dict[str, TEELlamaModel] = {}
    with running(a), running(b):
        try:
            models[BASE] = a.model(BASE)
            for name in PRIVATE:
                plan, weights = name.split("/")[:2]
                ctx.log(f"private: setting up {name} (both sides quantize)")
                depth = 0 if name.endswith("/online") else len(prompt) + n_new + 1
                others = (b,) if plan == "private-2party" else ()
                models[name] = a.model(plan, others, pad_pool=depth, private_weights=weights)
            for m in models.values():  # warm-up
                split_profile(m, prompt[:8], 2)
            profiles: dict[str, list] = {name: [] for name in models}
            pools = [p for p in (getattr(m.gpu, "pool", None) for m in models.values()) if p is not None]
            for r in range(rounds):
                ctx.log(
                    f"private: round {r + 1}/{rounds}, {len(prompt)} prompt tokens, {n_new} new, interleaved"
                )
                for pool in pools:
                    pool.wait_full(600)  # online cost only: the pads (shares) are made ahead
                with contextlib.ExitStack() as held:
                    for pool in pools:
                        held.enter_context(pool.hold())
                    for name, prof in _interleaved(models, prompt, n_new).items():
                        profiles[name].append(prof)
            ctx.log("private: logits against v2-merged")
            # 32 positions (the last 16 prompt tokens and the first 16 generated): every logit
            # row costs the private plans a full LM head in ring elements.
            seq = np.array([prompt[-16:] + profiles[BASE][0].tokens[:16]], np.int64)
            ref = _all_logits(models[BASE], seq)
            rows: dict[str, Any] = {}
            for name, m in models.items():
                rows[name] = _row(profiles[name], profiles[BASE][0].tokens)
                if name != BASE:
                    pool = getattr(m.gpu, "pool", None)
                    if pool is not None:
                        pool.wait_full(600)
                    rows[name]["max_logit_diff"] = float(np.abs(_all_logits(m, seq) - ref).max())
                    rows[name]["server_bytes_per_weight"] = m.gpu.server_private_bytes_per_weight
                    rows[name]["layout"] = m.gpu.server_setup[0]["layout"]
                    if pool is not None:
                        rows[name]["pad_pool"] = pool.stats()
                    sh = getattr(m.gpu, "share_metrics", None)
                    if pool is not None and sh is not None:  # server b's work made ahead, per token
                        tokens = max(pool.stats()["tokens_made"], 1)
                        rows[name]["ahead_bytes_per_token"] = (sh.bytes_to_gpu + sh.bytes_from_gpu) / tokens
                        rows[name]["ahead_server_ms_per_token"] = 1000 * sh.gpu_s / tokens
                        rows[name]["pad_cpu_ms_per_token"] = pool.stats()["cpu_ms_per_token"]
        finally:
            for m in models.values():
                m.gpu.close()
    source = models["private-otp/int16"].gpu.server_setup[0]["source"]
    pads = {}
    for weights in FORMATS:
        ctx.log(f"private: offline pad generation, {weights}")
        ms, nbytes, wbytes = _offline_pad_ms(lw, weight_bits(weights), source, 8 if s.quick else 32)
        pads[weights] = {"cpu_ms_per_token": ms, "bytes_per_token": nbytes, "weights_bytes": wbytes}
    base = rows[BASE]
    for name in PRIVATE:
        r = rows[name]
        # paired by token: step t of this plan ran right after step t of v2-merged (interleaved),
        # so the machine's changing load cancels in the ratio; the median over every token
        paired = [p / b for p, b in zip(r["step_ms"], base["step_ms"], strict=True)]
        r["decode_vs_v2_merged"] = float(np.median(paired))
        r["decode_vs_v2_merged_per_round"] = [
            float(np.median(paired[i : i + n_new - 1])) for i in range(0, len(paired), n_new - 1)
        ]
        r["bytes_vs_v2_merged"] = (r["bytes_to_gpu_per_token"] + r["bytes_from_gpu_per_token"]) / (
            base["bytes_to_gpu_per_token"] + base["bytes_from_gpu_per_token"]
        )
        if name.startswith("private-otp"):
            r["pad_cpu_ms_per_token"] = pads[name.split("/")[1]]["cpu_ms_per_token"]
    ctx.log("private: limb GEMM against a float GEMM")
    gemm = _gemm_ms("cuda" if s.device == "cuda" else "cpu", s.threads, s.quick)
    load.append(os.getloadavg()[0])
    return {
        "prompt_tokens": len(prompt),
        "new_tokens": n_new,
        "rounds": rounds,
        "device": s.device,
        "threads": s.threads,
        "pads": pads,
        "plans": rows,
        "gemm": gemm,
        "load_average": load,  # 1-minute load average at the start and at the end
    }


def _interleaved(models: dict, prompt: list[int], n_new: int) -> dict:
    """Greedy generation by every model at once, one decode step of each in turn: the prefills
    one after the other, then token t of every model before token t + 1 of any, so that the
    machine's changing load hits all plans alike (bench.split_profile's metering per step)."""
    from teesplit.bench.common import Profile

    caches, prefill, steps, tokens = {}, {}, {name: [] for name in models}, {}
    try:
        for name, m in models.items():
            caches[name] = m.new_cache(1, max_tokens=len(prompt) + n_new + 1)
            m0, t0 = m.gpu.metrics.copy(), time.perf_counter()
            _, ids = m.forward(np.array([prompt], np.int64), caches[name], top_k=1)
            prefill[name] = (m.gpu.metrics.copy() - m0).summary(time.perf_counter() - t0)
            tokens[name] = [int(ids[0, -1, 0])]
        for _ in range(n_new - 1):
            for name, m in models.items():
                m0, t0 = m.gpu.metrics.copy(), time.perf_counter()
                _, ids = m.forward(np.array([[tokens[name][-1]]], np.int64), caches[name], top_k=1)
                steps[name].append((m.gpu.metrics.copy() - m0).summary(time.perf_counter() - t0))
                tokens[name].append(int(ids[0, -1, 0]))
    finally:
        for name, cache in caches.items():
            models[name].close_cache(cache)
    return {name: Profile(prefill[name], steps[name], tokens[name]) for name in models}


def _all_logits(model, seq: np.ndarray) -> np.ndarray:
    cache = model.new_cache(1, max_tokens=seq.shape[1] + 1)
    try:
        return model.forward(seq, cache, all_logits=True)
    finally:
        model.close_cache(cache)


def _row(profiles: list, base_tokens: list[int]) -> dict[str, Any]:
    steps = [st for p in profiles for st in p.steps]
    tokens = profiles[0].tokens
    return {
        "step_ms": [1000 * st["time_s"]["total"] for st in steps],  # every decode step, rounds in order
        "decode_ms_per_token": float(np.median([p.mean_ms() for p in profiles])),
        "decode_ms_per_round": [p.mean_ms() for p in profiles],
        "tee_ms_per_token": float(np.median([p.mean_ms("tee") for p in profiles])),
        "gpu_ms_per_token": float(np.median([p.mean_ms("gpu") for p in profiles])),
        "prefill_s": float(np.median([p.prefill_s for p in profiles])),
        "rpcs_per_token": float(np.mean([st["rpc"]["total"] for st in steps])),
        "bytes_to_gpu_per_token": float(np.mean([st["bytes"]["to_gpu"] for st in steps])),
        "bytes_from_gpu_per_token": float(np.mean([st["bytes"]["from_gpu"] for st in steps])),
        "tokens": tokens,
        "tokens_equal_v2_merged": sum(x == y for x, y in zip(tokens, base_tokens, strict=False))
        / len(base_tokens),
    }


def _kib(n: float) -> str:
    return f"{n / 1024:.1f} KiB"


def render(d: dict[str, Any]) -> list[str]:
    n = d["new_tokens"]
    lines = [
        f"{d['prompt_tokens']} prompt tokens, {n} generated, greedy, tcp loopback, {d['device']} servers "
        f"({d['threads']} thread(s) each); {d['rounds']} rounds, every plan's decode steps interleaved "
        "token by token (decode ms/token: the median of the rounds' means; vs v2-merged: the median of "
        "the ratios of steps that ran back to back); "
        f"load average {d['load_average'][0]:.1f} at the start, {d['load_average'][-1]:.1f} at the end; "
        "private-2party against two server processes. Online: private-otp's pads and private-2party's "
        "shares (the second server's products) made ahead; `/online`: private-2party asking both "
        "servers every step. Per token, the columns count the critical path; the second server's work "
        "made ahead is listed below the table.",
        "",
        "| plan / weights | decode ms/token | vs v2-merged | server ms/token | trusted ms/token | "
        "RPCs/token | to GPU/token | from GPU/token | server bytes/weight | pad CPU ms/token | "
        "tokens = v2-merged | max logit diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ahead = []
    for name, r in d["plans"].items():
        bpw = r.get("server_bytes_per_weight")
        pad = r.get("pad_cpu_ms_per_token")
        if "ahead_bytes_per_token" in r:
            ahead.append(
                f"{name}: the second server's products of shares made ahead, per token: "
                f"{r['ahead_server_ms_per_token']:.1f} ms of its compute, {_kib(r['ahead_bytes_per_token'])} "
                f"on the wire; the trusted side's share thread {r['pad_cpu_ms_per_token']:.1f} ms of CPU."
            )
        lines.append(
            f"| {name} | {r['decode_ms_per_token']:.1f} | {r.get('decode_vs_v2_merged', 1.0):.2f}x | "
            f"{r['gpu_ms_per_token']:.1f} | {r['tee_ms_per_token']:.1f} | {r['rpcs_per_token']:.0f} | "
            f"{_kib(r['bytes_to_gpu_per_token'])} | "
            f"{_kib(r['bytes_from_gpu_per_token'])} | {'-' if bpw is None else f'{bpw:.4f}'} | "
            f"{'-' if pad is None else f'{pad:.1f}'} | "
            f"{round(r['tokens_equal_v2_merged'] * n)}/{n} | {r.get('max_logit_diff', 0.0):.3g} |"
        )
    layouts = sorted({r["layout"] for r in d["plans"].values() if "layout" in r})
    lines += ["", *ahead, f"Server layout: {'; '.join(layouts)}."]
    for weights, p in d["pads"].items():
        lines.append(
            f"One-time pads of private-otp with {weights} weights, offline in the trusted side: "
            f"{p['cpu_ms_per_token']:.1f} ms of CPU per token (one exact ring product of every weight), "
            f"{_kib(p['bytes_per_token'])} of pads per token held until used, "
            f"{p['weights_bytes'] / 2**20:.1f} MiB of integer weights kept to make them. "
            "private-2party's trusted side multiplies nothing."
        )
    lines += [
        "",
        "The limb GEMM (8 limb rows per sequence, int8 x int8 -> int32) against a float GEMM of the same "
        "weights, ms per call, in one process on the run's device:",
        "",
        "| weights (N x K) | integers | sequences | limb GEMM ms | float GEMM ms | ratio | "
        "float64 limb products ms (numpy) |",
        "|---|---|---|---|---|---|---|",
    ]
    for g in d["gemm"]:
        f64 = g.get("float64_limbs_ms")
        lines.append(
            f"| {g['shape']} | {g['weights']} | {g['sequences']} | {g['limb_gemm_ms']:.3f} | "
            f"{g['float_gemm_ms']:.3f} ({g['float_dtype']}) | {g['ratio']:.2f}x | "
            f"{'-' if f64 is None else f'{f64:.3f}'} |"
        )
    return lines


def targets(d: dict[str, Any]) -> list[dict[str, Any]]:
    from teesplit.bench.common import target

    plans = d["plans"]
    out = [  # the default private-2party (shares made ahead); /online is reported, not a target
        target(
            "private-2party/int16 speed",
            "private-2party/int16 decodes at <= 1.5x v2-merged's time (speed ratio >= 0.67)",
            1 / plans["private-2party/int16"]["decode_vs_v2_merged"],
            1 / 1.5,
        )
    ]
    out += [
        target(
            f"{plan} tokens",
            f"{plan}: greedy tokens equal v2-merged's (>= 31 of 32)",
            plans[plan]["tokens_equal_v2_merged"],
            31 / 32,
            "",
        )
        for plan in ("private-otp/int16", "private-2party/int16")
    ]
    return out


SECTION = Section("Private plans: masked data on the GPU", measure, render, targets)
