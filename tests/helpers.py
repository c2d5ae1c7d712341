"""Test helpers: small random checkpoints of every family, and an in-process split model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

TESTS = Path(__file__).resolve().parent  # the tests' root: support scripts and fixtures


def rss(pid: int, field: str = "VmRSS") -> int:
    """Bytes of a process's resident set (`VmRSS`), or its peak since the last reset (`VmHWM`)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for process {pid}")


FAMILIES = {
    "llama": "LlamaConfig",
    "mistral": "MistralConfig",
    "qwen2": "Qwen2Config",
}

BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
)


def make_checkpoint(path: Path, family: str = "llama", seed: int = 0, **overrides) -> Path:
    """Save a random float32 checkpoint of `family` to `path` (config.json + model.safetensors)."""
    import transformers

    cfg_cls = getattr(transformers, FAMILIES[family])
    cfg = cfg_cls(**{**BASE, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():  # random init leaves biases and norms trivial; make them not
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    return path


def load_hf(path: Path):
    import transformers

    m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    m.eval()
    return m


def local_model(path: Path, plan: str = "v3", **settings):
    """TEELlamaModel over the in-process transport (the real codec, no socket), built by the one
    assembly every entry point uses (tee/assemble.py). `settings`: RunnerSettings fields."""
    from teesplit.launch import build_service
    from teesplit.tee.assemble import Assembly, RunnerSettings

    handler, _ = build_service(Path(path), "cpu", "float32", progress=False)
    rs = RunnerSettings(Path(path), servers=("local",), plan=plan, log=lambda _message: None, **settings)
    return Assembly(rs, local=lambda _i: handler.handle).connect()[0]


def hf_stepwise_logits(model, ids: list[int], n_prefill: int) -> list[np.ndarray]:
    """transformers logits: a prefill of n_prefill tokens (all positions), then one token at a time."""
    out = []
    with torch.no_grad():
        r = model(torch.tensor([ids[:n_prefill]]), use_cache=True)
        out.append(r.logits[0].numpy())
        # transformers >= 5.24 calls the cache `cache`; earlier releases `past_key_values`.
        key = "cache" if hasattr(r, "cache") else "past_key_values"
        for t in ids[n_prefill:]:
            r = model(torch.tensor([[t]]), use_cache=True, **{key: getattr(r, key)})
            out.append(r.logits[0].numpy())
    return out


def split_stepwise_logits(model, ids: list[int], n_prefill: int) -> list[np.ndarray]:
    cache = model.new_cache()
    out = [model.forward(np.array([ids[:n_prefill]]), cache, all_logits=True)[0]]
    for t in ids[n_prefill:]:
        out.append(model.forward(np.array([[t]]), cache, all_logits=True)[0])
    return out
