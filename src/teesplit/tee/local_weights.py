"""The trusted side's own copy of the checkpoint, read with numpy only (TRUSTED side).

The private plans need it: the embedding lookup happens here (the GPU must not see token
ids), the one-time pads' unblinding factors r·Wᵀ are computed from trusted weights, and the
two-party plan subtracts the bias the second server added. The files are read by the numpy
safetensors reader of tee/checkpoint.py (no torch); bfloat16 and float16 tensors are widened
to float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

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
from teesplit.tee.checkpoint import SafetensorsReader, weight_files

# The Linear sites a forward pass of the fused v2 placement crosses, per layer, in order, and
# the modules stacked in each (their output features concatenated).
SITE_MODULES = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
LM_HEAD = "lm_head"  # the one site outside the layers (layer index -1)


class LocalCheckpointError(UsageError):
    """The local checkpoint is missing, malformed, or does not match its config."""


@dataclass
class LocalWeights:
    """float32 weights in the fused layouts the GPU server uses: per layer and site, W (N, in)."""

    config: ModelConfig
    embed: np.ndarray  # (V, E)
    lm_head: np.ndarray  # (V, E); the embedding table itself when tied
    weights: list[dict[str, np.ndarray]]  # per layer: site -> (N, in)
    biases: list[dict[str, np.ndarray]]  # per layer: site -> (N,), only sites that have one
    norms: np.ndarray  # (2L+1, E): input, post-attention for each layer, then final

    def weight(self, layer: int, site: str) -> np.ndarray:
        return self.lm_head if site == LM_HEAD else self.weights[layer][site]

    def bias(self, layer: int, site: str) -> np.ndarray | None:
        return None if site == LM_HEAD else self.biases[layer].get(site)

    def sites(self) -> list[tuple[int, str]]:
        """Every masked Linear of one forward pass, in the order the pass crosses them."""
        return [(i, s) for i in range(self.config.num_layers) for s in SITE_MODULES] + [(-1, LM_HEAD)]

    @property
    def nbytes(self) -> int:
        arrays = [self.embed, *(w for d in self.weights for w in d.values())]
        if self.lm_head is not self.embed:
            arrays.append(self.lm_head)
        return sum(a.nbytes for a in arrays)


def load_local_weights(model_dir: str | Path) -> LocalWeights:
    """Read a Hugging Face model directory (config.json + *.safetensors) into LocalWeights."""
    model_dir = Path(model_dir)
    config = ModelConfig.from_dir(model_dir)
    files = weight_files(model_dir)
    if not files:
        raise LocalCheckpointError(f"no *.safetensors files in {model_dir}")
    try:
        reader = SafetensorsReader(files)
    except ValueError as e:
        raise LocalCheckpointError(str(e)) from None

    def take(key: str, shape: tuple[int, ...]) -> np.ndarray:
        if not reader.has(key):
            raise LocalCheckpointError(f"the local checkpoint {model_dir} lacks {key}")
        t = reader.get(key)
        if t.shape != shape:
            raise LocalCheckpointError(f"{key} has shape {t.shape}, config implies {shape}")
        return np.asarray(t, np.float32)

    shapes = config.linear_shapes
    weights, biases = [], []
    for i in range(config.num_layers):
        w, b = {}, {}
        for site, modules in SITE_MODULES.items():
            w[site] = np.concatenate([take(linear_tensor(i, m), shapes[m]) for m in modules])
            if all(config.has_bias(m) for m in modules):
                b[site] = np.concatenate([take(linear_tensor(i, m, "bias"), shapes[m][:1]) for m in modules])
        weights.append(w)
        biases.append(b)
    V, E = config.vocab_size, config.hidden_size
    embed = take(EMBED_TOKENS, (V, E))
    lm_head = embed if config.tie_word_embeddings else take(LM_HEAD_WEIGHT, (V, E))
    rows = [take(norm_tensor(i, which), (E,)) for i in range(config.num_layers) for which in LAYER_NORMS]
    norms = np.stack([*rows, take(FINAL_NORM, (E,))])
    return LocalWeights(config, embed, lm_head, weights, biases, norms)
