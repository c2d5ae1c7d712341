"""The private plans' bench section, in tiny mode: a small random checkpoint, --quick."""

from __future__ import annotations

import json

from helpers import make_checkpoint

from teesplit.bench import run as bench


def test_private_section_measures_costs_against_v2_fused(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m", "llama", num_hidden_layers=2, max_position_embeddings=128)
    out = tmp_path / "out"
    argv = ["--model", str(ckpt), "--quick", "--new-tokens", "3", "--contexts", "8,12", "--out-dir", str(out)]
    assert bench.main([*argv, "--only-sections", "private"]) == 0
    data = json.loads((out / "private.json").read_text())["sections"]["private"]
    plans = data["plans"]
    assert set(plans) == {"v2-fused", "private-otp", "private-2party"}
    L = 2
    assert plans["v2-fused"]["rpcs_per_token"] == 4 * L + 2
    assert plans["private-otp"]["rpcs_per_token"] == 4 * L + 1
    assert plans["private-2party"]["rpcs_per_token"] == 2 * (4 * L + 1)  # both servers
    assert plans["private-otp"]["tokens_equal_v2_fused"] == 1.0
    assert plans["private-2party"]["tokens_equal_v2_fused"] == 1.0
    assert data["offline_pad_ms_per_token"] > 0 and data["pad_bytes_per_token"] > 0
    # int64 ring elements instead of float32 activations, and whole logit rows instead of top-1
    assert plans["private-otp"]["bytes_from_gpu_per_token"] > plans["v2-fused"]["bytes_from_gpu_per_token"]
    md = (out / "private.md").read_text()
    assert "| private-otp |" in md and "one-time pads" in md
