"""`teesplit bench` end to end in a tiny mode: a small random checkpoint, the local and ipc
transports, a few tokens. Checks the report's structure and the counts, never the timings."""

from __future__ import annotations

import json

import pytest
from helpers import make_checkpoint

from teesplit.bench.run import main
from teesplit.tee.plans import PLANS, get_plan

pytest.importorskip("matplotlib")

LAYERS = 3


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    ckpt = make_checkpoint(
        tmp_path_factory.mktemp("bench-model"), "llama", num_hidden_layers=LAYERS, max_position_embeddings=256
    )
    out = tmp_path_factory.mktemp("bench-out")
    argv = [
        "--model",
        str(ckpt),
        "--quick",
        "--new-tokens",
        "4",
        "--transports",
        "local,ipc",
        "--contexts",
        "16,40",
        "--batches",
        "1,8",
        "--pipeline",
        "--wire-tokens",
        "6",
        "--runners",
        "1,3",
        "--timeout",
        "60",
        "--sections",
        "none",  # each section has its own test (tests/bench/test_sections.py and the issues' tests)
        "--out-dir",
        str(out),
    ]
    assert main(argv) == 0
    return out, json.loads((out / "bench.json").read_text())


@pytest.mark.slow
def test_files_written(report):
    out, result = report
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "bench.md").read_text()
    assert "![decode time per token](bench.png)" in md
    assert "## Targets" in md and result["command"] in md


def test_json_keys(report):
    _, result = report
    for key in ("command", "settings", "machine", "model", "baseline", "runs", "auto", "batch", "targets"):
        assert key in result
    assert "tinyllama" not in result  # off in --quick
    conc = result["concurrency"]
    assert [r["runners"] for r in conc["rows"]] == [1, 3] and conc["transport"] == "ipc"
    for r in conc["rows"]:
        assert r["rpcs"] > 0 and 0 < r["rpc_p50_ms"] <= r["rpc_p99_ms"] and r["decode_tok_s"] > 0
    assert result["baseline"]["decode"]["ms_per_token"] > 0
    assert set(result["baseline"]["measured"]) == {"start", "end"}  # the faster of the two is used
    assert {c: set(e) >= {"prefill_tok_s", "decode_ms"} for c, e in result["baseline"]["contexts"].items()}
    plans = {(r["transport"], r["plan"]) for r in result["runs"]}
    assert plans == {(t, p) for t in ("local", "ipc") for p in (*PLANS, "auto")}
    for r in result["runs"]:
        d = r["decode"]
        assert set(d["split_ms"]) == {"tee", "gpu", "transport", "total"}
        assert d["tok_s"] > 0 and d["ratio_to_baseline"] > 0 and d["tee_ms_per_token"] >= 0
        assert set(r["contexts"]) == ({"16", "40"} if r["transport"] == "ipc" else {"16"})  # --quick
        for e in r["contexts"].values():
            assert e["prefill_tok_s"] > 0 and e["prefill_ratio_to_baseline"] > 0
            assert e["bytes_up"] > 0 and e["bytes_down"] > 0
    assert set(result["auto"]) == {"local", "ipc"}
    assert {t["name"] for t in result["targets"]} >= {"decode", "bytes", "batch", "prefill", "auto-ipc"}
    assert all(t["passed"] in (True, False) for t in result["targets"])
    batches = [(r["batch"], r["connections"]) for r in result["batch"]["rows"]]  # --pipeline: 2 connections
    assert batches == [(1, 1), (8, 1), (8, 2)]
    wires = [r["wire_dtype"] for r in result["wire_dtypes"]["rows"]]
    assert wires == ["float32", "float16", "bfloat16", "int8"]
    assert result["wire_dtypes"]["rows"][0]["max_abs_logit_diff"] == 0.0


def test_counts_match_the_plans(report):
    _, result = report
    for r in result["runs"]:
        plan = get_plan(r["picked"]["plan"] if r["plan"] == "auto" else r["plan"])
        expected = plan.rpcs_per_forward(LAYERS)
        assert r["rpc_expected"] == expected
        for e in r["contexts"].values():
            assert e["rpc"] == expected
            assert sum(e["rpc_by_op"].values()) == expected


def test_traffic_grows_with_context_only_where_the_plan_sends_the_cache(report):
    _, result = report
    runs = {r["plan"]: r["contexts"] for r in result["runs"] if r["transport"] == "ipc"}
    growth = {p: c["40"]["bytes_up"] - c["16"]["bytes_up"] for p, c in runs.items()}
    # v3 uploads the repeated K and V of every cached token, each token, in float32.
    assert growth["v3"] >= LAYERS * 2 * 4 * 24 * 64
    for plan in ("v2", "v2-fused"):  # only the new token's activations (headers vary by a few bytes)
        assert abs(growth[plan]) <= 4 * runs[plan]["16"]["rpc"]


def test_help_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "--quick" in capsys.readouterr().out


def test_streamed_checkpoint_loads_and_runs(tmp_path):
    """The TinyLlama writer (safetensors layout written by hand), on a tiny shape."""
    from helpers import local_model

    from teesplit.bench.common import TINYLLAMA, make_tinyllama, split_profile

    shape = dict(TINYLLAMA, vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2)
    shape.update(num_attention_heads=4, num_key_value_heads=2)
    path = make_tinyllama(tmp_path / "ckpt", shape)
    model = local_model(path, "v3-fused")
    profile = split_profile(model, [5, 6, 7, 8], 3)
    assert len(profile.tokens) == 3 and all(0 <= t < 96 for t in profile.tokens)
    assert profile.steps[0]["rpc"]["total"] == get_plan("v3-fused").rpcs_per_forward(2)


def test_cli_routes_bench_options():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "teesplit", "bench", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--quick" in r.stdout
