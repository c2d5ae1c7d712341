"""The `verify` bench section on a tiny random checkpoint: it measures both plans with and
without --verify through a real server process and reports overhead, setup and memory."""

from __future__ import annotations

import json

import pytest
from helpers import make_checkpoint

from teesplit.bench import run as bench


@pytest.mark.slow
def test_verify_section_measures_both_plans(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m", "llama", num_hidden_layers=2, max_position_embeddings=128)
    out = tmp_path / "out"
    argv = ["--model", str(ckpt), "--quick", "--new-tokens", "3", "--contexts", "8", "--out-dir", str(out)]
    assert bench.main([*argv, "--only-sections", "verify"]) == 0
    data = json.loads((out / "verify.json").read_text())["sections"]["verify"]
    assert set(data["plans"]) == {"v3-fused", "v2-fused"}
    for name, row in data["plans"].items():
        assert row["same_tokens"], name  # a float32 server: verification changes no token
        assert row["decode_ms"] > 0 and row["decode_ms_verify"] > 0 and row["setup_s"] > 0
        assert row["fingerprint_bytes"] > 0 and row["checks_per_forward"] > 0
        assert row["check_ms_per_decode"] > 0 and row["check_ms_prefill"] > 0
        assert row["bytes_down_verify"] > row["bytes_down"]  # full logit rows instead of the top-1
    # 2 layers: v3-fused checks QKV, AttnScores, AttnOut, GateUp, down per layer, + Embedding, LMHead
    assert data["plans"]["v3-fused"]["checks_per_forward"] == 5 * 2 + 2
    assert data["plans"]["v2-fused"]["checks_per_forward"] == 4 * 2 + 2
    assert data["plans"]["v3-fused"]["session_bytes_per_token"] > 0
    md = (out / "verify.md").read_text()
    assert "with --verify" in md and "at most 10% slower than without (v3-fused)" in md
