"""Bench section "tp" (src/teesplit/bench/sections/tp.py): one rank against three, measured."""

from __future__ import annotations

import json

import pytest
from helpers import make_checkpoint

from teesplit.bench import run as bench

SMALL = dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=3, intermediate_size=96)


@pytest.mark.slow
def test_tp_section_measures_both_servers_and_the_memory_per_rank(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m", "llama", max_position_embeddings=128, **SMALL)
    out = tmp_path / "out"
    argv = ["--model", str(ckpt), "--quick", "--new-tokens", "4", "--contexts", "8,12", "--out-dir", str(out)]
    assert bench.main([*argv, "--only-sections", "tp"]) == 0
    d = json.loads((out / "tp.json").read_text())["sections"]["tp"]
    assert d["tp"] == 3 and set(d["plans"]) == {"v3-fused", "v2-merged", "private-otp"}
    for row in d["plans"].values():
        assert row["same_tokens"] and row["tp1"]["ms_per_token"] > 0 and row["tp3"]["prefill_ms"] > 0
    ranks = d["memory"]["tp3"]
    assert [r["rank"] for r in ranks] == [0, 1, 2] and all(r["rss_bytes"] for r in ranks)
    whole = d["memory"]["tp1"][0]["weight_bytes"]
    assert all(0.3 < r["weight_bytes"] / whole < 0.4 for r in ranks)
    md = (out / "tp.md").read_text()
    assert "| v3-fused |" in md and "Llama-3.1-70B" in md


@pytest.mark.slow
def test_tp_section_says_why_when_no_size_fits(tmp_path):
    """One KV head: no --tp above 1 shards the model; the section says so, and fails nothing."""
    one_kv = dict(hidden_size=48, num_attention_heads=3, num_key_value_heads=1, intermediate_size=96)
    ckpt = make_checkpoint(tmp_path / "m", "llama", max_position_embeddings=128, **one_kv)
    out = tmp_path / "out"
    argv = ["--model", str(ckpt), "--quick", "--new-tokens", "3", "--contexts", "8,12", "--out-dir", str(out)]
    assert bench.main([*argv, "--only-sections", "tp"]) == 0
    d = json.loads((out / "tp.json").read_text())["sections"]["tp"]
    assert "no --tp above 1 divides" in d["skipped"]
    assert "no --tp above 1 divides" in (out / "tp.md").read_text()
