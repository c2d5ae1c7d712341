"""The benchmark's measuring pieces, shared by its run (bench/run.py) and its sections
(bench/sections/): settings, the monolithic baseline, the split model's profile, endpoints
(the GPU service in this process or a `teesplit serve` child), targets.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from teesplit.config import EMBED_TOKENS, FINAL_NORM, LAYER_NORMS, LM_HEAD_WEIGHT, linear_tensor, norm_tensor
from teesplit.tee.assemble import Assembly, RunnerSettings
from teesplit.tee.client import GPUClient
from teesplit.tee.model import TEELlamaModel
from teesplit.tee.plans import PLANS
from teesplit.transport import GPUServerUnavailable, open_transport

TRANSPORTS = ("local", "ipc", "tcp", "shm")
ALL_PLANS = (*PLANS, "auto")
WIRE_DTYPES = ("float32", "float16", "bfloat16", "int8")
BATCH_PLAN = "v3-fused"
WIRE_PROMPT = "Explain in a few sentences why the sky is blue, then give one surprising fact about light."

# TinyLlama-1.1B's shape; its weights are random (the counts do not depend on the values).
TINYLLAMA = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)
# The seed's RPCs per decode token for a 22-layer model (it does not count Embedding and LMHead).
SEED_FIGURES = {"v3": "~200 (V3.0)", "v2": "~154 (V2.1)"}

# The targets.
TARGET_DECODE_RATIO = 0.8  # v3-fused over ipc, decode tokens/s vs monolithic
TARGET_BYTES_RATIO = 10.0  # v3 / v3-fused bytes sent per decode token at the largest context
TARGET_BATCH_RATIO = 4.0  # batch 8 / batch 1 aggregate decode tokens/s
TARGET_PREFILL_RATIO = 0.8  # v3-fused over ipc, prefill tokens/s at the largest context vs monolithic
TARGET_AUTO_SLACK = 0.10  # auto within 10% of the fastest measured plan on the same transport


# ---- settings ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    model: str
    device: str
    dtype: str
    threads: int
    tee_threads: int  # OpenBLAS threads of the trusted side (numpy); 0 leaves them alone
    transports: tuple[str, ...]
    plans: tuple[str, ...]
    new_tokens: int
    repeats: int
    contexts: tuple[int, ...]
    wide_transports: tuple[str, ...]  # transports measured at every context (the others: the first only)
    batches: tuple[int, ...]
    batch_prompt_tokens: int
    runners: tuple[int, ...]  # concurrent runners (own connections) against one server
    pipeline: bool
    wire_tokens: int
    tinyllama: bool
    quick: bool
    out_dir: Path
    timeout_s: float
    sections: tuple[str, ...] = ()  # teesplit.bench.sections modules measured in this run


# ---- progress ------------------------------------------------------------------------------
class Progress:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def __call__(self, message: str) -> None:
        print(f"[bench {self.elapsed:6.1f} s] {message}", file=sys.stderr, flush=True)


# ---- one measured generation ---------------------------------------------------------------
@dataclass
class Profile:
    """One greedy generation: the prefill, then one entry per decode step.

    Each entry is a stats group ({"time_s": {...}} and, for the split, "rpc" and "bytes")."""

    prefill: dict[str, Any]
    steps: list[dict[str, Any]]
    tokens: list[int]

    @property
    def prefill_s(self) -> float:
        return self.prefill["time_s"]["total"]

    def mean_ms(self, part: str = "total") -> float:
        return 1000 * float(np.mean([s["time_s"][part] for s in self.steps]))


def split_profile(model: TEELlamaModel, prompt: list[int], n_new: int) -> Profile:
    """Greedy generation through the split, metered per step like the generator's stats
    (top-1 logits from the GPU, as `Generator` asks for when sampling greedily)."""
    gpu = model.gpu
    cache = model.new_cache(1, max_tokens=len(prompt) + n_new + 1)
    try:
        m0, t0 = gpu.metrics.copy(), time.perf_counter()
        _, ids = model.forward(np.array([prompt], np.int64), cache, top_k=1)
        token = int(ids[0, -1, 0])
        prefill = (gpu.metrics.copy() - m0).summary(time.perf_counter() - t0)
        tokens, steps = [token], []
        for _ in range(n_new - 1):
            m0, t0 = gpu.metrics.copy(), time.perf_counter()
            _, ids = model.forward(np.array([[token]], np.int64), cache, top_k=1)
            token = int(ids[0, -1, 0])
            steps.append((gpu.metrics.copy() - m0).summary(time.perf_counter() - t0))
            tokens.append(token)
    finally:
        model.close_cache(cache)
    return Profile(prefill, steps, tokens)


class Monolithic:
    """transformers on the same weights: the baseline."""

    def __init__(self, model_dir: Path, device: str, dtype: str):
        import torch
        import transformers

        self.torch = torch
        self.device = device
        torch_dtype = getattr(torch, dtype)
        self.model = (
            transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).to(device).eval()
        )

    def _sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def profile(self, prompts: list[list[int]], n_new: int) -> Profile:
        """Greedy generation for equal-length prompts (one batch, no padding)."""
        torch = self.torch
        model = self.model
        with torch.inference_mode():
            self._sync()
            t0 = time.perf_counter()
            out = model(torch.tensor(prompts, device=self.device), use_cache=True, logits_to_keep=1)
            nxt = out.logits[:, -1].argmax(-1)
            tokens = [nxt.tolist()]
            prefill = {"time_s": {"total": time.perf_counter() - t0}}
            # transformers 5.24 calls the cache `cache`; earlier releases `past_key_values`.
            key = "cache" if "cache" in out else "past_key_values"
            steps = []
            for _ in range(n_new - 1):
                t0 = time.perf_counter()
                out = model(nxt[:, None], use_cache=True, **{key: out[key]})
                nxt = out.logits[:, -1].argmax(-1)
                tokens.append(nxt.tolist())  # .tolist() waits for the device
                steps.append({"time_s": {"total": time.perf_counter() - t0}})
        first_row = [t[0] for t in tokens]
        return Profile(prefill, steps, first_row)

    def close(self) -> None:
        del self.model
        gc.collect()
        if self.device == "cuda":
            self.torch.cuda.empty_cache()


# ---- decode and context measurements (shared by the baseline and the split) ---------------
def measure(
    run: Callable[[list[int], int], Profile],
    prompt: list[int],
    s: Settings,
    log: Progress,
    label: str,
    wide: bool = True,
) -> dict[str, Any]:
    """Decode runs at the first context, then (if `wide`) one-step runs at the other contexts."""
    c0 = s.contexts[0]
    runs = [run(prompt[:c0], s.new_tokens) for _ in range(s.repeats)]
    per_run = [p.mean_ms() for p in runs]
    med = runs[int(np.argsort(per_run)[(len(runs) - 1) // 2])]  # the median run (lower median)
    decode = {
        "context": c0,
        "new_tokens": s.new_tokens,
        "repeats": s.repeats,
        "ms_per_token": med.mean_ms(),
        "tok_s": 1000 / med.mean_ms(),
        "ms_per_token_runs": per_run,
        "step_ms_median": 1000 * float(np.median([st["time_s"]["total"] for p in runs for st in p.steps])),
        "split_ms": {k: med.mean_ms(k) for k in med.steps[0]["time_s"]},
    }
    contexts: dict[str, Any] = {}
    for c in s.contexts if wide else s.contexts[:1]:
        profiles = runs if c == c0 else [run(prompt[:c], 2) for _ in range(s.repeats)]
        mid = sorted(profiles, key=lambda p: p.prefill_s)[(len(profiles) - 1) // 2]
        first = profiles[0].steps[0]  # the decode step with exactly c tokens cached
        entry = {
            "prefill_s": mid.prefill_s,
            "prefill_tok_s": c / mid.prefill_s,
            "prefill_split_s": mid.prefill["time_s"],
            "decode_ms": 1000 * float(np.median([p.steps[0]["time_s"]["total"] for p in profiles])),
        }
        if "rpc" in first:
            entry.update(
                rpc=first["rpc"]["total"],
                rpc_by_op=first["rpc"]["by_op"],
                bytes_up=first["bytes"]["to_gpu"],
                bytes_down=first["bytes"]["from_gpu"],
            )
        contexts[str(c)] = entry
    parts = ", ".join(f"{k} {v:.1f}" for k, v in decode["split_ms"].items() if k != "total")
    log(
        f"{label}: decode {decode['ms_per_token']:.1f} ms/token"
        + (f" ({parts})" if parts else "")
        + ", prefill "
        + ", ".join(f"{c}: {e['prefill_tok_s']:.0f} tok/s" for c, e in contexts.items())
        + (
            f", {contexts[str(c0)]['rpc']} RPC/token, up {_human(contexts[str(c0)]['bytes_up'])}"
            if "rpc" in contexts[str(c0)]
            else ""
        )
    )
    return {"decode": decode, "contexts": contexts, "tokens": runs[0].tokens}


def warm_up(run: Callable[[list[int], int], Profile], prompt: list[int], s: Settings) -> None:
    """One untimed run at the decode context (first-call allocations, kernel choice for the
    shapes); on CUDA at every context, since each new shape picks its kernels on first use."""
    for c in s.contexts if s.device == "cuda" else s.contexts[:1]:
        run(prompt[:c], 3)


def add_ratios(row: dict[str, Any], base: dict[str, Any]) -> None:
    d, b = row["decode"], base["decode"]
    d["ratio_to_baseline"] = b["ms_per_token"] / d["ms_per_token"]  # tokens/s ratio
    if "tee" in d["split_ms"]:
        d["tee_ms_per_token"] = d["split_ms"]["tee"]
        d["tee_share_of_baseline_ms"] = d["split_ms"]["tee"] / b["ms_per_token"]
    for c, e in row["contexts"].items():
        be = base["contexts"][c]  # the baseline is measured at every context
        e["prefill_ratio_to_baseline"] = e["prefill_tok_s"] / be["prefill_tok_s"]
        e["decode_ratio_to_baseline"] = be["decode_ms"] / e["decode_ms"]
    row["same_tokens_as_baseline"] = row["tokens"] == base["tokens"]


# ---- endpoints: where the GPU service runs --------------------------------------------------
class Endpoint:
    """The GPU service for one transport: in this process (local) or a `teesplit serve` child."""

    def __init__(self, kind: str, model_dir: Path, s: Settings, tmp: Path):
        self.kind = kind
        self.model_dir = model_dir
        self.s = s
        self.log_path = tmp / f"server-{kind}.log"
        self.address = {
            "local": "local",
            "ipc": f"ipc://{tmp}/gpu-{kind}.sock",
            "shm": f"shm://teesplit-bench-{os.getpid()}-{abs(hash(str(tmp))):x}",
        }.get(kind)
        self.proc: subprocess.Popen | None = None
        self.handler = None

    def start(self) -> None:
        from teesplit.launch import build_service, free_tcp_address, start_server

        if self.kind == "local":
            self.handler, _ = build_service(
                self.model_dir, self.s.device, self.s.dtype, self.s.threads, progress=False
            )
            return
        if self.kind == "tcp":
            self.address = free_tcp_address()
        args = ["--device", self.s.device, "--dtype", self.s.dtype, "--threads", str(self.s.threads)]
        with open(self.log_path, "ab") as err:
            self.proc = start_server(self.model_dir, self.address, args, stderr=err)

    def connect(self, wire_dtype: str = "float32") -> GPUClient:
        """A bare client (no model): pings, and the measurements below the model."""
        if self.kind == "local":
            from teesplit.transport.local import LocalTransport

            return GPUClient(LocalTransport(self.handler.handle), wire_dtype)
        return GPUClient(open_transport(self.address, self.s.timeout_s), wire_dtype)

    def assembly(self, plan: str, others: tuple[Endpoint, ...] = (), **settings) -> Assembly:
        """The one builder (tee/assemble.py) for runners against this endpoint (and `others`,
        for private-2party's second server). `settings`: RunnerSettings fields."""
        endpoints = (self, *others)
        rs = RunnerSettings(
            model_dir=self.model_dir,
            servers=tuple(e.address for e in endpoints),
            plan=plan,
            timeout_s=self.s.timeout_s,
            retries=0,  # a server that died is restarted by with_restart, not waited for
            log=lambda _message: None,
            **settings,
        )
        return Assembly(rs, local=lambda i: endpoints[i].handler.handle)

    def model(self, plan: str, others: tuple[Endpoint, ...] = (), **settings) -> TEELlamaModel:
        """A model over a fresh connection, built by the one builder."""
        return self.assembly(plan, others, **settings).connect()[0]

    def died(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        from teesplit.launch import stop_server

        if self.proc is not None:
            if self.proc.poll() is None:
                stop_server(self.proc)
            self.proc = None
        self.handler = None
        gc.collect()


@contextlib.contextmanager
def running(endpoint: Endpoint) -> Iterator[Endpoint]:
    endpoint.start()
    try:
        yield endpoint
    finally:
        endpoint.stop()


def with_restart(endpoint: Endpoint, fn: Callable[[], Any], log: Progress) -> Any:
    """Run fn; if the server process died under it (it has happened on a shared machine),
    say so, start a fresh one and run fn once more."""
    try:
        return fn()
    except GPUServerUnavailable:
        if not endpoint.died():
            raise
        log(f"{endpoint.kind}: the server process exited ({endpoint.proc.returncode}); restarting it")
        log(f"server log tail:\n{endpoint.log_tail()}")
        endpoint.stop()
        endpoint.start()
        return fn()


# ---- the plans over one transport ------------------------------------------------------------
def measure_plan(
    endpoint: Endpoint, plan_name: str, prompt: list[int], s: Settings, log: Progress
) -> dict[str, Any]:
    auto = plan_name == "auto"
    context = s.contexts[0] + s.new_tokens // 2
    build = endpoint.assembly(plan_name, auto_context=context, auto_top_k=1)
    model = build.connect()[0]
    try:
        row: dict[str, Any] = {"transport": endpoint.kind, "plan": plan_name}
        if auto:
            choice = build.choice
            row["picked"] = {
                "plan": choice.plan.name,
                "wire_dtype": choice.wire_dtype,
                "context": context,
                "link": asdict(choice.link),
                "tee_flops": choice.tee_flops,
                "estimates_ms": choice.estimates_ms,
            }
            log(f"{endpoint.kind} auto: picked {choice.plan.name} with a {choice.wire_dtype} wire")
        row["wire_dtype"] = model.gpu.wire_dtype
        row["rpc_expected"] = model.plan.rpcs_per_forward(model.config.num_layers)
        warm_up(lambda p, n: split_profile(model, p, n), prompt, s)
        label = f"{endpoint.kind} {plan_name}" + (f"->{model.plan.name}" if auto else "")
        wide = endpoint.kind in s.wide_transports
        row.update(measure(lambda p, n: split_profile(model, p, n), prompt, s, log, label, wide))
        row["load_avg_1min"] = os.getloadavg()[0]  # a busy machine shows here
        return row
    finally:
        model.gpu.close()


# ---- batching ------------------------------------------------------------------------------
def batch_prompts(vocab: int, batch: int, length: int) -> list[list[int]]:
    rng = np.random.default_rng(100 + batch)
    return rng.integers(3, vocab, (batch, length)).tolist()


# ---- the TinyLlama shape: counts only ---------------------------------------------------------
def make_tinyllama(path: Path, shape: dict[str, Any] | None = None) -> Path:
    """A TinyLlama-shaped bfloat16 checkpoint: config.json and one model.safetensors.

    The counts do not depend on the values, and 1.1B random draws (or a transformers model)
    would take minutes on a small CPU machine, so every tensor is one small random block
    repeated, streamed straight into the safetensors layout (8-byte header length, JSON
    header, raw little-endian data) without holding the model in memory. Norm weights are 1."""
    import ml_dtypes
    import transformers

    cfg = transformers.LlamaConfig(**(shape or TINYLLAMA))
    path.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(path)
    E, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    KV = cfg.num_key_value_heads * (E // cfg.num_attention_heads)
    shapes = {f"model.{EMBED_TOKENS}": (V, E), LM_HEAD_WEIGHT: (V, E), f"model.{FINAL_NORM}": (E,)}
    linear = {"q_proj": (E, E), "k_proj": (KV, E), "v_proj": (KV, E), "o_proj": (E, E)}
    linear |= {"gate_proj": (F, E), "up_proj": (F, E), "down_proj": (E, F)}
    for i in range(cfg.num_hidden_layers):
        shapes.update({f"model.{linear_tensor(i, m)}": shape for m, shape in linear.items()})
        shapes.update({f"model.{norm_tensor(i, which)}": (E,) for which in LAYER_NORMS})
    rng = np.random.default_rng(0)
    block = (rng.standard_normal(1 << 20, np.float32) * 0.02).astype(ml_dtypes.bfloat16).tobytes()
    ones = np.ones(max(E, F), ml_dtypes.bfloat16).tobytes()
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        n = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path / "model.safetensors", "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for shape in shapes.values():
            n = 2 * int(np.prod(shape))
            if len(shape) == 1:
                f.write(ones[:n])
                continue
            for _ in range(n // len(block)):
                f.write(block)
            f.write(block[: n % len(block)])
    return path


# ---- targets -------------------------------------------------------------------------------
def target(name: str, goal: str, measured: float | None, threshold: float, unit: str = "x") -> dict:
    if measured is None:
        return {"name": name, "goal": goal, "measured": None, "passed": None, "detail": "not measured"}
    passed = measured >= threshold
    detail = (
        f"{measured:.2f}{unit} (needs {threshold:g}{unit})"
        if passed
        else f"{measured:.2f}{unit}: missed by {1 - measured / threshold:.0%} (needs {threshold:g}{unit})"
    )
    return {
        "name": name,
        "goal": goal,
        "measured": measured,
        "threshold": threshold,
        "passed": passed,
        "detail": detail,
    }


def measure_baseline(
    model_dir: Path, s: Settings, prompt: list[int], vocab: int, log: Progress, batches: bool = True
) -> dict:
    log(f"baseline: loading transformers ({s.device} {s.dtype}, {s.threads} thread(s))")
    mono = Monolithic(model_dir, s.device, s.dtype)
    try:
        warm_up(lambda p, n: mono.profile([p], n), prompt, s)
        base = measure(lambda p, n: mono.profile([p], n), prompt, s, log, "monolithic")
        base["batch_decode_tok_s"] = {}
        for b in s.batches if batches else ():
            runs = [
                mono.profile(batch_prompts(vocab, b, s.batch_prompt_tokens), s.new_tokens)
                for _ in range(s.repeats)
            ]
            tok_s = float(np.median([b * 1000 / p.mean_ms() for p in runs]))
            base["batch_decode_tok_s"][b] = tok_s
            log(f"monolithic batch {b}: {tok_s:.1f} tok/s aggregate decode")
    finally:
        mono.close()
    return base


def _human(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
