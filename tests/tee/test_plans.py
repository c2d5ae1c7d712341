"""RPCs per decode token, pinned by formula: 9L+2 for v3 (seed V3.0) and 7L+2 for v2 (seed V2.1).

The seed counts ~200 RPCs per token for a 22-layer model in V3.0 and ~154 in V2.1 (7 per
layer, not counting the embedding and the LM head); we count those two calls as well.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import local_model, make_checkpoint

from teesplit.tee.plans import get_plan


@pytest.fixture(scope="module", params=[22, 30], ids=["22-layer", "30-layer-smollm2-depth"])
def deep_checkpoint(request, tmp_path_factory):
    L = request.param
    path = make_checkpoint(
        tmp_path_factory.mktemp(f"deep{L}"),
        "llama",
        num_hidden_layers=L,
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return L, path


@pytest.mark.parametrize(
    "plan, per_layer",
    [("v3", 9), ("v2", 7), ("v3-fused", 5), ("v2-fused", 4), ("v3-merged", 3), ("v2-merged", 2)],
)
def test_rpcs_per_decode_token(deep_checkpoint, plan, per_layer):
    L, path = deep_checkpoint
    model = local_model(path, plan)
    cache = model.new_cache()
    model.forward(np.array([[1, 2, 3, 4]]), cache)
    m = model.gpu.metrics
    before = m.copy()
    model.forward(np.array([[5]]), cache)
    model.forward(np.array([[6]]), cache)
    per_token = {op: n / 2 for op, n in (m - before).rpc.items()}
    fixed = 1 if plan.endswith("merged") else 2  # Embedding and LMHead, or folded into layer calls
    assert sum(per_token.values()) == per_layer * L + fixed == get_plan(plan).rpcs_per_forward(L)
    expected = {
        "v3": {"Linear": 7 * L, "Matmul": 2 * L},
        "v2": {"Linear": 7 * L},
        "v3-fused": {"QKV": L, "AttnScores": L, "AttnOut": L, "GateUp": L, "Linear": L},
        "v2-fused": {"QKV": L, "GateUp": L, "Linear": 2 * L},
        "v3-merged": {"EmbedQKV": 1, "AttnScores": L, "AttnOutGateUp": L, "DownQKV": L - 1, "DownLMHead": 1},
        "v2-merged": {"EmbedQKV": 1, "OGateUp": L, "DownQKV": L - 1, "DownLMHead": 1},
    }[plan]
    if fixed == 2:
        expected = {**expected, "Embedding": 1, "LMHead": 1}
    assert per_token == expected
    # A prefill costs the same number of round trips as one decode step, whatever its length.
    setup = m.rpc["Init"] + m.rpc["OpenSession"]
    assert sum(m.rpc.values()) - setup == 3 * (per_layer * L + fixed)


def test_seed_figures_for_22_layers():
    assert get_plan("v3").rpcs_per_forward(22) == 200  # seed: "~200 (22 layers)"
    assert get_plan("v2").rpcs_per_forward(22) == 154 + 2  # seed: "~154", plus Embedding and LMHead
    assert get_plan("v3").rpcs_per_forward(30) == 272 and get_plan("v2").rpcs_per_forward(30) == 212
    assert (
        get_plan("v3-fused").rpcs_per_forward(30) == 152 and get_plan("v2-fused").rpcs_per_forward(30) == 122
    )


def test_v3_sends_attention_operands_v2_does_not(deep_checkpoint):
    L, path = deep_checkpoint
    sent = {}
    for plan in ("v3", "v2"):
        model = local_model(path, plan)
        cache = model.new_cache()
        model.forward(np.array([[1, 2, 3]]), cache)
        before = model.gpu.metrics.copy()
        model.forward(np.array([[4]]), cache)
        sent[plan] = (model.gpu.metrics - before).bytes_to_gpu
    # v3 uploads q (H*D) and the repeated K^T (H*D*S), then P (H*S) and the repeated V (H*S*D)
    # per layer, in float32: S = 4 cached + new tokens, H = 4, D = 8.
    H, D, S = 4, 8, 4
    matmul_payload = L * 4 * (H * D + H * D * S + H * S + H * S * D)
    extra = sent["v3"] - sent["v2"]
    assert matmul_payload <= extra < matmul_payload + L * 2 * 200  # plus two small headers per layer


@pytest.mark.parametrize("plan", ["private-otp", "private-2party"])
def test_private_plans_cross_like_v2_merged(deep_checkpoint, plan):
    """The private plans make v2-merged's 2L + 1 round trips per decode token (each to both
    servers under private-2party without shares made ahead), and a prefill costs the same as
    one decode step."""
    from test_private import private_model

    L, path = deep_checkpoint
    model = private_model(path, plan, pool_depth=4 if plan == "private-otp" else 0)
    try:
        cache = model.new_cache()
        model.forward(np.array([[1, 2, 3, 4]]), cache)
        m = model.gpu.metrics
        before = m.copy()
        model.forward(np.array([[5]]), cache)
        model.forward(np.array([[6]]), cache)
        per_token = {op: n / 2 for op, n in (m - before).rpc.items()}
    finally:
        model.gpu.close()
    n = 2 if plan == "private-2party" else 1
    assert get_plan(plan).rpcs_per_forward(L) == 2 * L + 1 == get_plan("v2-merged").rpcs_per_forward(L)
    assert per_token == {
        "RingEmbedQKV": n,
        "RingOGateUp": n * L,
        "RingDownQKV": n * (L - 1),
        "RingDownLMHead": n,
    }
    setup = m.rpc["Init"] + m.rpc["RingSetup"]
    assert setup == 2 * n and sum(m.rpc.values()) - setup == 3 * n * (2 * L + 1)


def test_prefill_chunk_auto_follows_the_attention_placement():
    """--prefill-chunk auto: small chunks where the scores cross the link (v3 placement), large
    ones where attention runs in the trusted side (v2 placement, the private plans too)."""
    from teesplit.tee.plans import PREFILL_CHUNKS, prefill_chunk

    for name in ("v3", "v3-fused", "v3-merged"):
        assert prefill_chunk(get_plan(name), "auto") == PREFILL_CHUNKS["gpu"] == 256
    for name in ("v2", "v2-fused", "v2-merged", "private-otp", "private-2party"):
        assert prefill_chunk(get_plan(name), "auto") == PREFILL_CHUNKS["trusted"] == 2048
    assert prefill_chunk(get_plan("v3-fused"), 0) is None and prefill_chunk(get_plan("v2"), None) is None
    assert prefill_chunk(get_plan("v2"), 100) == 100
