"""Bench section `api` in tiny mode: a small random checkpoint with a tokenizer, 1/4/8 streaming
clients through a real `teesplit api` process, beside the CLI path. Checks structure, never
timings."""

from __future__ import annotations

import json

import pytest
from apihelpers import make_chat_checkpoint
from helpers import make_checkpoint

from teesplit.bench import run as bench
from teesplit.bench.sections import api as section


@pytest.mark.slow
def test_api_section_measures_1_4_8_clients(tmp_path, smollm2_dir):
    ckpt = make_chat_checkpoint(tmp_path / "m", smollm2_dir, max_position_embeddings=256)
    out = tmp_path / "out"
    argv = ["--model", str(ckpt), "--quick", "--new-tokens", "4", "--contexts", "8", "--out-dir", str(out)]
    assert bench.main([*argv, "--only-sections", "api"]) == 0
    data = json.loads((out / "api.json").read_text())["sections"]["api"]
    assert [r["clients"] for r in data["rows"]] == [1, 4, 8]
    for r in data["rows"]:
        for side in ("api", "cli"):
            assert r[side]["ttft_ms"] > 0 and r[side]["tpot_ms"] > 0 and r[side]["tok_s"] > 0
    stall = data["stall"]  # 128-token prompt (max_position_embeddings 256): one pass, chunks of 32
    assert stall["long_prompt_tokens"] == 128 and [r["prefill_chunk"] for r in stall["rows"]] == [0, 32]
    chunked = stall["rows"][1]
    assert chunked["tokens_during"] >= 3  # 4 chunks: a decode step after each of the first 3
    assert all(r["max_gap_ms"] > 0 and r["long_ttft_ms"] > 0 for r in stall["rows"])
    md = (out / "api.md").read_text()
    assert "| clients | TTFT API ms |" in md and md.count("\n| 8 |") == 1
    assert "| one pass |" in md and "| 32 |" in md
    assert {t["name"] for t in json.loads((out / "api.json").read_text())["targets"]} >= {"api_batching"}


def test_api_section_skips_a_model_without_tokenizer(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m", "llama")
    out = tmp_path / "out"
    argv = ["--model", str(ckpt), "--quick", "--new-tokens", "2", "--contexts", "8", "--out-dir", str(out)]
    assert bench.main([*argv, "--only-sections", "api"]) == 0
    data = json.loads((out / "api.json").read_text())["sections"]["api"]
    assert "tokenizer" in data["skipped"]
    assert section.render(data)[0].startswith("Not measured")
