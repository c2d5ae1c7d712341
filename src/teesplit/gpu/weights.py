"""Checkpoint loading for the UNTRUSTED GPU server: a Hugging Face model directory
(``config.json`` + ``*.safetensors``, sharded or not) -> device tensors.

GGUF files are first converted to such a directory by `teesplit.models.resolve_model`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from teesplit.config import (
    EMBED_TOKENS,
    FINAL_NORM,
    LAYER_NORMS,
    LM_HEAD_WEIGHT,
    ModelConfig,
    linear_tensor,
    norm_tensor,
)
from teesplit.errors import UsageError


class CheckpointError(UsageError):
    """The checkpoint is missing a tensor or has one of the wrong shape."""


@dataclass
class Layer:
    weight: dict[str, torch.Tensor]  # module -> (N, in); q/k/v and gate/up are views of the fused
    bias: dict[str, torch.Tensor]  # module -> (N,), only modules that have one
    input_norm: torch.Tensor  # (E,), float32
    post_attention_norm: torch.Tensor  # (E,), float32
    qkv_weight: torch.Tensor  # ((H + 2 Hkv) D, E): q, k, v stacked, so one product serves all three
    qkv_bias: torch.Tensor | None
    gate_up_weight: torch.Tensor  # (2F, E)
    gate_up_bias: torch.Tensor | None


def _fuse(weight: dict, bias: dict, modules: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack modules' weights (and biases) into one tensor; make the originals views of it."""
    fused = torch.cat([weight[m] for m in modules])
    fused_bias = torch.cat([bias[m] for m in modules]) if all(m in bias for m in modules) else None
    start = 0
    for m in modules:
        n = weight[m].shape[0]
        weight[m] = fused[start : start + n]
        if fused_bias is not None:
            bias[m] = fused_bias[start : start + n]
        start += n
    return fused, fused_bias


@dataclass
class Weights:
    config: ModelConfig
    embed: torch.Tensor  # (V, E)
    layers: list[Layer]
    norm: torch.Tensor  # (E,), float32
    lm_head: torch.Tensor  # (V, E); the embedding table itself when tied

    def bias_stacks(self) -> dict[str, torch.Tensor]:
        """Biases stacked over layers, float32 on the CPU, for the families that have them:
        qkv (L, (H + 2 Hkv) D), o (L, E), gate_up (L, 2F), down (L, E)."""
        out = {}
        first = self.layers[0]
        if first.qkv_bias is not None:
            out["qkv"] = torch.stack([layer.qkv_bias for layer in self.layers])
        if "o_proj" in first.bias:
            out["o"] = torch.stack([layer.bias["o_proj"] for layer in self.layers])
        if first.gate_up_bias is not None:
            out["gate_up"] = torch.stack([layer.gate_up_bias for layer in self.layers])
        if "down_proj" in first.bias:
            out["down"] = torch.stack([layer.bias["down_proj"] for layer in self.layers])
        return {k: v.float().cpu() for k, v in out.items()}

    def norm_stack(self) -> torch.Tensor:
        """All RMSNorm weights as one (2L+1, E) float32 tensor: in, post for each layer, final."""
        rows = [w for layer in self.layers for w in (layer.input_norm, layer.post_attention_norm)]
        return torch.stack([*rows, self.norm]).float().cpu()


def safetensor_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / s for s in shards]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {model_dir}")
    return files


def load_weights(
    model_dir: str | Path, device: torch.device, dtype: torch.dtype, progress: bool = True
) -> Weights:
    model_dir = Path(model_dir)
    config = ModelConfig.from_dir(model_dir)
    raw: dict[str, torch.Tensor] = {}
    files = safetensor_files(model_dir)
    handles = [safe_open(str(f), framework="pt") for f in files]
    keys = [(h, k) for h in handles for k in h.keys()]
    for h, key in tqdm(
        keys, desc=f"loading {model_dir.name}", unit="tensor", disable=not progress, leave=False
    ):
        if key.endswith("rotary_emb.inv_freq"):
            continue
        t = h.get_tensor(key)
        # Norm weights stay float32: the trusted side receives them and applies them in float32.
        raw[key] = t.to(device=device, dtype=torch.float32 if key.endswith("norm.weight") else dtype)
    return _assemble(config, raw)


def _take(raw: dict[str, torch.Tensor], key: str, shape: tuple[int, ...]) -> torch.Tensor:
    for name in (key, f"model.{key}"):
        if name in raw:
            t = raw.pop(name)
            if tuple(t.shape) != shape:
                raise CheckpointError(f"{name} has shape {tuple(t.shape)}, config implies {shape}")
            return t
    raise CheckpointError(f"checkpoint lacks {key}")


def _assemble(config: ModelConfig, raw: dict[str, torch.Tensor]) -> Weights:
    E, V = config.hidden_size, config.vocab_size
    layers = []
    for i in range(config.num_layers):
        weight, bias = {}, {}
        for m, shape in config.linear_shapes.items():
            weight[m] = _take(raw, linear_tensor(i, m), shape)
            if config.has_bias(m):
                bias[m] = _take(raw, linear_tensor(i, m, "bias"), shape[:1])
        qkv_weight, qkv_bias = _fuse(weight, bias, ("q_proj", "k_proj", "v_proj"))
        gate_up_weight, gate_up_bias = _fuse(weight, bias, ("gate_proj", "up_proj"))
        layers.append(
            Layer(
                weight=weight,
                bias=bias,
                qkv_weight=qkv_weight,
                qkv_bias=qkv_bias,
                gate_up_weight=gate_up_weight,
                gate_up_bias=gate_up_bias,
                input_norm=_take(raw, norm_tensor(i, LAYER_NORMS[0]), (E,)),
                post_attention_norm=_take(raw, norm_tensor(i, LAYER_NORMS[1]), (E,)),
            )
        )
    embed = _take(raw, EMBED_TOKENS, (V, E))
    norm = _take(raw, FINAL_NORM, (E,))
    if config.tie_word_embeddings:
        raw.pop(LM_HEAD_WEIGHT, None)
        lm_head = embed
    else:
        lm_head = _take(raw, LM_HEAD_WEIGHT, (V, E))
    return Weights(config=config, embed=embed, layers=layers, norm=norm, lm_head=lm_head)
