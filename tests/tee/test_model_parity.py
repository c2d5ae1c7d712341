"""Parity with transformers on small random checkpoints: every family and RoPE type, both
plans, a prefill and token-by-token decode, logits within 1e-4 in float32."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import hf_stepwise_logits, load_hf, local_model, make_checkpoint, split_stepwise_logits

ATOL = 1e-4

VARIANTS = {
    "llama-gqa": ("llama", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "llama-mha-bias": ("llama", {"num_key_value_heads": 4, "attention_bias": True, "mlp_bias": True}),
    "llama-rope-linear": (
        "llama",
        {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}},
    ),
    # max_position_embeddings=16 with 22 positions: the dynamic NTK rescale kicks in mid-decode.
    "llama-rope-dynamic": (
        "llama",
        {
            "max_position_embeddings": 16,
            "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
        },
    ),
    "llama-rope-llama3": (
        "llama",
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8,
                "rope_theta": 500000.0,
            }
        },
    ),
    "llama-rope-yarn": (
        "llama",
        {
            "rope_parameters": {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 16,
                "rope_theta": 10000.0,
            }
        },
    ),
    "mistral-window": ("mistral", {"sliding_window": 6, "head_dim": 16}),
    "qwen2": ("qwen2", {"num_key_value_heads": 1}),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
    family, overrides = VARIANTS[request.param]
    path = make_checkpoint(tmp_path_factory.mktemp(request.param), family, **overrides)
    ids = np.random.default_rng(1).integers(0, 128, 22).tolist()
    return path, ids, hf_stepwise_logits(load_hf(path), ids, n_prefill=12)


@pytest.mark.parametrize("plan", ["v3", "v2", "v3-fused", "v2-fused", "v3-merged", "v2-merged"])
def test_prefill_and_decode_match_transformers(variant, plan):
    path, ids, reference = variant
    got = split_stepwise_logits(local_model(path, plan), ids, n_prefill=12)
    assert len(got) == len(reference) == 11
    for step, (g, r) in enumerate(zip(got, reference, strict=True)):
        assert g.shape == r.shape
        err = float(np.abs(g - r).max())
        assert err <= ATOL, f"step {step}: max |logit diff| {err:.2e} > {ATOL}"


def test_unsupported_family_is_named(tmp_path):
    import json

    from teesplit.config import ConfigError, ModelConfig

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    with pytest.raises(ConfigError, match="llama, mistral, qwen2"):
        ModelConfig.from_dir(tmp_path)
