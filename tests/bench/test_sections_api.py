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
    md = (out / "api.md").read_text()
    assert "| clients | TTFT API ms |" in md and md.count("\n| 8 |") == 1
    assert {t["name"] for t in json.loads((out / "api.json").read_text())["targets"]} >= {"api_batching"}


def test_api_section_skips_a_model_without_tokenizer(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m", "llama")
    out = tmp_path / "out"
    argv = ["--model", str(ckpt), "--quick", "--new-tokens", "2", "--contexts", "8", "--out-dir", str(out)]
    assert bench.main([*argv, "--only-sections", "api"]) == 0
    data = json.loads((out / "api.json").read_text())["sections"]["api"]
    assert "tokenizer" in data["skipped"]
    assert section.render(data)[0].startswith("Not measured")
