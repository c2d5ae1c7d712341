"""Checkpoint loading on the GPU side and config parsing shared by both sides."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import hf_stepwise_logits, load_hf, local_model, make_checkpoint, split_stepwise_logits

from teesplit.config import ConfigError, ModelConfig
from teesplit.gpu.weights import CheckpointError, load_weights


def test_sharded_checkpoint_loads_and_matches(tmp_path):
    path = make_checkpoint(tmp_path / "m", "qwen2")
    hf = load_hf(path)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    sharded = tmp_path / "sharded"
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    ref = hf_stepwise_logits(hf, ids, 6)
    got = split_stepwise_logits(local_model(sharded, "v2"), ids, 6)
    assert max(float(np.abs(a - b).max()) for a, b in zip(ref, got, strict=True)) <= 1e-4


def test_missing_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    path = make_checkpoint(tmp_path, "llama")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.up_proj\.weight"):
        load_weights(path, torch.device("cpu"), torch.float32, progress=False)


def test_wrong_shape_is_named(tmp_path):
    path = make_checkpoint(tmp_path, "llama")
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="gate_proj.weight has shape"):
        load_weights(path, torch.device("cpu"), torch.float32, progress=False)


def test_no_weights_at_all(tmp_path):
    path = make_checkpoint(tmp_path, "llama")
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_weights(path, torch.device("cpu"), torch.float32, progress=False)


TINY_HF = {  # the smallest config.json fields a Llama needs
    "model_type": "llama",
    "vocab_size": 10,
    "hidden_size": 8,
    "intermediate_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
}


def test_legacy_rope_fields_are_normalized():
    cfg = ModelConfig.from_hf(
        {
            **TINY_HF,
            "num_key_value_heads": 1,
            "rope_theta": 500000,
            "max_position_embeddings": 1024,
            "rope_scaling": {
                "type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
            },
            "eos_token_id": [5, 6],
        }
    )
    assert cfg.rope == {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 1024,
    }
    assert cfg.eos_token_ids == (5, 6) and cfg.head_dim == 4


@pytest.mark.parametrize(
    "change, match",
    [
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"num_key_value_heads": 3}, "multiple"),
        ({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "rope_type"),
        ({"rope_scaling": {"rope_type": "linear"}}, "factor"),
        ({"hidden_size": 0}, "positive"),
    ],
)
def test_bad_configs_are_rejected(change, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_hf({**TINY_HF, **change})


def test_host_arena_keeps_values_layout_and_alignment():
    from teesplit.gpu.hostmem import ALIGN, HUGE_PAGE, HostArena

    rng = np.random.default_rng(0)
    ws = [torch.from_numpy(rng.standard_normal(s).astype(np.float32)) for s in ((96, 40), (7, 13), (40, 96))]
    arena = HostArena(HostArena.bytes_for(ws))
    base = arena._buf.ctypes.data
    first = arena.copy(ws[0], column_major=True)
    assert first.data_ptr() % HUGE_PAGE == 0  # the arena starts on a huge-page boundary
    rows = arena.copy(ws[1])
    last = arena.copy(ws[2], column_major=True)
    for got, want in zip((first, rows, last), ws, strict=True):
        assert torch.equal(got, want)
        assert got.data_ptr() % ALIGN == 0 and base <= got.data_ptr() < base + len(arena._buf)
    assert first.t().is_contiguous() and not first.is_contiguous() and rows.is_contiguous()
    with pytest.raises(MemoryError, match="full"):
        arena.empty((1 << 20,), torch.float32)


def test_a_cpu_server_keeps_its_matrices_in_one_arena(tmp_path):
    from teesplit.launch import build_service

    handler, _ = build_service(make_checkpoint(tmp_path, "llama"), "cpu", "float32", progress=False)
    s = handler.service
    lo, hi = s._arena._buf.ctypes.data, s._arena._buf.ctypes.data + len(s._arena._buf)
    lw = s.w.layers[0]
    for w in (s.w.lm_head, lw.qkv_weight, lw.gate_up_weight, lw.weight["o_proj"], lw.weight["down_proj"]):
        assert lo <= w.data_ptr() < hi
    assert lw.weight["k_proj"].data_ptr() > lw.weight["q_proj"].data_ptr()  # still views of the fused
