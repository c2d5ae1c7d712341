"""The `long` bench section on a tiny random checkpoint: every plan, auto and transformers at two
prompt lengths through a real server process, with bytes, memory, the chunk sweep and a chart."""

from __future__ import annotations

import json

import pytest
from helpers import make_checkpoint

from teesplit.bench import run as bench


@pytest.mark.slow
def test_long_section_measures_every_plan_and_transformers(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m", "llama", num_hidden_layers=2, max_position_embeddings=2048)
    out = tmp_path / "out"
    argv = ["--model", str(ckpt), "--quick", "--contexts", "8", "--out-dir", str(out)]
    assert bench.main([*argv, "--only-sections", "long"]) == 0
    result = json.loads((out / "long.json").read_text())
    data = result["sections"]["long"]
    assert data["lengths"] == [128, 1024]
    plans = {"transformers", "v3", "v2", "v3-fused", "v2-fused", "v3-merged", "v2-merged", "auto"}
    assert set(data["rows"]) == plans
    for name, rows in data["rows"].items():
        for n, r in rows.items():
            assert r["prefill_tok_s"] > 0 and r["decode_ms"] > 0 and r["rss_tee"] >= 0, (name, n)
            assert r["prefill_cpu_s"] > 0 and r["decode_cpu_ms"] >= 0, (name, n)
            if name != "transformers":
                assert r["same_tokens_as_transformers"], (name, n)  # float32 on both sides
                assert r["bytes_up"] > 0 and r["bytes_down"] > 0 and r["rss_gpu"] >= 0
    # v3 placement sends the scores and probabilities of the prompt; v2 placement does not
    assert data["rows"]["v3-merged"]["1024"]["bytes_up"] > 5 * data["rows"]["v2-merged"]["1024"]["bytes_up"]
    assert set(data["rows"]["auto"]["1024"]["picked"]) == {"prefill", "decode"}
    assert set(data["chunks"]["plans"]["v2-merged"]) == {"256", "512", "1024", "none"}
    assert (out / "long.png").stat().st_size > 0
    md = (out / "long.md").read_text()
    assert "**1024 tokens**" in md and "![prefill" in md and "## Targets" in md
    names = [t["name"] for t in result["targets"]]
    growth = [
        f"long decode growth {p}" for p in ("v3", "v2", "v3-fused", "v2-fused", "v3-merged", "v2-merged")
    ]
    assert names == [
        "long prefill 1024",
        "long decode 1024",
        *growth,
        "long auto 128",
        "long auto 1024",
        "long bytes 1024",
    ]
