"""The private plans' bench section, in tiny mode: a small random checkpoint, --quick."""

from __future__ import annotations

import json

import pytest
from helpers import make_checkpoint

from teesplit.bench import run as bench


@pytest.mark.slow  # six plans and three servers: 25 s on a quiet machine, minutes on a loaded one
def test_private_section_measures_costs_against_v2_merged(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m", "llama", num_hidden_layers=2, max_position_embeddings=128)
    out = tmp_path / "out"
    argv = ["--model", str(ckpt), "--quick", "--new-tokens", "3", "--contexts", "8,12", "--out-dir", str(out)]
    assert bench.main([*argv, "--only-sections", "private"]) == 0
    data = json.loads((out / "private.json").read_text())["sections"]["private"]
    plans = data["plans"]
    assert set(plans) == {
        "v2-merged",
        "private-otp/int16",
        "private-otp/int8",
        "private-2party/int16",
        "private-2party/int8",
        "private-2party/int16/online",
    }
    L = 2
    assert plans["v2-merged"]["rpcs_per_token"] == 2 * L + 1
    for w in ("int16", "int8"):
        assert plans[f"private-otp/{w}"]["rpcs_per_token"] == 2 * L + 1
        # shares made ahead: online, server a only; the second server's work is counted apart
        assert plans[f"private-2party/{w}"]["rpcs_per_token"] == 2 * L + 1
        assert plans[f"private-2party/{w}"]["ahead_bytes_per_token"] > 0
        assert plans[f"private-otp/{w}"]["pad_cpu_ms_per_token"] > 0
    assert plans["private-2party/int16/online"]["rpcs_per_token"] == 2 * (2 * L + 1)  # both servers
    assert plans["private-otp/int16"]["tokens_equal_v2_merged"] == 1.0
    assert plans["private-2party/int16"]["tokens_equal_v2_merged"] == 1.0
    assert (
        plans["private-otp/int16"]["max_logit_diff"] == plans["private-2party/int16"]["max_logit_diff"] < 0.01
    )
    assert 2.0 <= plans["private-otp/int16"]["server_bytes_per_weight"] < 2.1
    assert 1.0 <= plans["private-2party/int8"]["server_bytes_per_weight"] < 1.1
    assert data["pads"]["int16"]["bytes_per_token"] > 0 and data["gemm"]
    # int64 ring elements instead of float32 activations, and whole logit rows instead of top-1
    assert (
        plans["private-otp/int8"]["bytes_from_gpu_per_token"] > plans["v2-merged"]["bytes_from_gpu_per_token"]
    )
    md = (out / "private.md").read_text()
    assert "| private-otp/int16 |" in md and "One-time pads" in md and "limb GEMM" in md
