"""teesplit benchmark: monolithic transformers vs the split plans over real transports, in one run.

For each model shape it builds a random checkpoint (or uses --model DIR), measures greedy
decode with transformers on the same device and dtype (the baseline), then starts a real
`teesplit serve` process per transport and runs each plan through it. It reports decode
tokens/s, the ratio to the baseline, RPCs and bytes per decode step, and the time split
(trusted compute / GPU compute / link). With --parity it also checks the split's logits
against transformers on the chosen device.

    python benchmarks/bench.py --device cpu --shapes smollm2 --out benchmarks/results-cpu.json
    python benchmarks/bench.py --device cuda --shapes smollm2,tinyllama --parity --out results.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from teesplit.cli import free_tcp_address, start_server, stop_server  # noqa: E402
from teesplit.tee.client import GPUClient  # noqa: E402
from teesplit.tee.generate import Generator, SamplingParams  # noqa: E402
from teesplit.tee.model import TEELlamaModel  # noqa: E402
from teesplit.tee.plans import get_plan  # noqa: E402
from teesplit.transport.zmq import ZmqTransport  # noqa: E402

# Shapes of real models (random weights: speed and counts do not depend on the values).
SHAPES = {
    "smollm2": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
        rope_theta=100000.0,
    ),
    "tinyllama": dict(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        tie_word_embeddings=False,
        max_position_embeddings=2048,
        rope_theta=10000.0,
    ),
}
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_random(shape: str, dtype: torch.dtype, root: Path) -> Path:
    import transformers

    path = root / shape
    cfg = transformers.LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(path)
    return path


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def monolithic(path: Path, device: str, dtype: torch.dtype, prompt: list[int], new: int) -> dict:
    """transformers on the same weights: prefill, then greedy decode one token at a time."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    tokens = []
    with torch.no_grad():
        for _ in range(2):  # warm-up run, then the measured run
            tokens = []
            sync(device)
            t0 = time.perf_counter()
            out = model(torch.tensor([prompt], device=device), use_cache=True)
            key = "cache" if hasattr(out, "cache") else "past_key_values"  # renamed in transformers 5.24
            nxt = int(out.logits[0, -1].argmax())
            sync(device)
            t1 = time.perf_counter()
            for _ in range(new - 1):
                tokens.append(nxt)
                out = model(torch.tensor([[nxt]], device=device), use_cache=True, **{key: getattr(out, key)})
                nxt = int(out.logits[0, -1].argmax())
            sync(device)
            t2 = time.perf_counter()
            tokens.append(nxt)
    del model
    return {
        "prefill_s": t1 - t0,
        "decode_s": t2 - t1,
        "decode_tok_s": (new - 1) / (t2 - t1),
        "tokens": tokens,
    }


def split_run(address: str, plan: str, prompt: list[int], new: int) -> dict:
    client = GPUClient(ZmqTransport(address, timeout_s=120))
    try:
        model = TEELlamaModel(client, get_plan(plan))
        gen = Generator(model, None, eos_token_ids=set())
        params = SamplingParams(max_new_tokens=new)
        gen.generate(prompt[:8], SamplingParams(max_new_tokens=4))  # warm-up
        r = gen.generate(prompt, params)
    finally:
        client.close()
    d = r.stats["decode"]
    steps = d["steps"]
    return {
        "decode_tok_s": steps / d["time_s"]["total"],
        "prefill_s": r.stats["prefill"]["time_s"]["total"],
        "rpc_per_step": d["rpc"]["total"] / steps,
        "bytes_to_gpu_per_step": d["bytes"]["to_gpu"] / steps,
        "bytes_from_gpu_per_step": d["bytes"]["from_gpu"] / steps,
        "ms_per_step": {k: 1000 * v / steps for k, v in d["time_s"].items()},
        "tokens": r.tokens,
    }


def parity(device: str) -> list[dict]:
    """The split on `device` (float32) against transformers on CPU, small random checkpoints."""
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import hf_stepwise_logits, load_hf, make_checkpoint, split_stepwise_logits
    from test_parity import VARIANTS

    from teesplit.cli import build_service
    from teesplit.transport.local import LocalTransport

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (family, overrides) in sorted(VARIANTS.items()):
            path = make_checkpoint(Path(tmp) / name, family, **overrides)
            ids = np.random.default_rng(1).integers(0, 128, 22).tolist()
            ref = hf_stepwise_logits(load_hf(path), ids, 12)
            for plan in ("v3", "v2"):
                handler, _ = build_service(path, device, "float32", progress=False)
                model = TEELlamaModel(GPUClient(LocalTransport(handler.handle)), get_plan(plan))
                got = split_stepwise_logits(model, ids, 12)
                err = max(float(np.abs(a - b).max()) for a, b in zip(ref, got, strict=True))
                rows.append({"variant": name, "plan": plan, "device": device, "max_abs_logit_diff": err})
                print(f"parity {name:20s} {plan} on {device}: max |diff| {err:.2e}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--shapes", default="smollm2")
    ap.add_argument("--model", default=None, help="a model directory instead of random shapes")
    ap.add_argument("--plans", default="v3,v2")
    ap.add_argument("--transports", default="tcp,ipc")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="torch threads, same on both sides")
    ap.add_argument("--parity", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dtype_name = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    dtype = TORCH_DTYPES[dtype_name]
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu_count": __import__("os").cpu_count(),
            "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        },
        "device": args.device,
        "dtype": dtype_name,
        "runs": [],
        "parity": [],
    }
    if args.parity:
        results["parity"] = parity(args.device)
    server_args = ["--device", args.device, "--dtype", dtype_name]
    if args.threads:
        server_args += ["--threads", str(args.threads)]
    with tempfile.TemporaryDirectory() as tmp:
        models = (
            [("model", Path(args.model))]
            if args.model
            else [(s, make_random(s, dtype, Path(tmp))) for s in args.shapes.split(",")]
        )
        for shape, path in models:
            vocab = json.loads((path / "config.json").read_text())["vocab_size"]
            prompt = np.random.default_rng(0).integers(3, vocab, args.prompt_tokens).tolist()
            base = monolithic(path, args.device, dtype, prompt, args.new_tokens)
            print(f"{shape}: monolithic transformers {base['decode_tok_s']:.1f} tok/s", flush=True)
            for transport in args.transports.split(","):
                address = free_tcp_address() if transport == "tcp" else f"ipc://{tmp}/{shape}.sock"
                proc = start_server(path, address, server_args)
                try:
                    for plan in args.plans.split(","):
                        r = split_run(address, plan, prompt, args.new_tokens)
                        r.update(
                            shape=shape,
                            transport=transport,
                            plan=plan,
                            baseline_tok_s=base["decode_tok_s"],
                            ratio_to_monolithic=r["decode_tok_s"] / base["decode_tok_s"],
                            same_tokens_as_monolithic=r["tokens"] == base["tokens"],
                        )
                        del r["tokens"]
                        results["runs"].append(r)
                        ms = r["ms_per_step"]
                        print(
                            f"{shape} {transport} {plan}: {r['decode_tok_s']:.1f} tok/s "
                            f"({r['ratio_to_monolithic']:.2f}x monolithic), "
                            f"{r['rpc_per_step']:.0f} RPC/step, "
                            f"{r['bytes_to_gpu_per_step'] / 1024:.0f} KiB up, "
                            f"tee {ms['tee']:.1f} / gpu {ms['gpu']:.1f} / link {ms['transport']:.1f} ms, "
                            f"same tokens: {r['same_tokens_as_monolithic']}",
                            flush=True,
                        )
                finally:
                    stop_server(proc)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
