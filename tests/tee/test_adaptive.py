"""--plan auto: the byte model matches what the client's meter measures, and the choice follows
the link (many cheap round trips vs. few expensive ones)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import local_model, make_checkpoint

from teesplit.tee.adaptive import (
    HEADER_DOWN,
    HEADER_UP,
    LinkStats,
    PrefillSpeeds,
    bytes_per_token,
    choose,
    choose_phases,
    pass_bytes,
    upload_bytes,
)
from teesplit.tee.plans import PLANS


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("auto"), "qwen2", num_hidden_layers=2)


@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("wire", ["float32", "float16"])
def test_byte_model_matches_the_meter(ckpt, plan, wire):
    model = local_model(ckpt, plan)
    model.gpu.wire_dtype = wire
    cache = model.new_cache()
    model.forward(np.arange(1, 20)[None], cache, top_k=1)  # context 19, then one decode step at 20
    before = model.gpu.metrics.copy()
    model.forward(np.array([[7]]), cache, top_k=1)
    used = model.gpu.metrics - before
    n = sum(used.rpc.values())
    up, down = bytes_per_token(PLANS[plan], model.config, 20, wire, top_k=1)
    # The model counts tensor payloads; the meter adds one msgpack header per message.
    assert 0 <= used.bytes_to_gpu - up <= n * 2 * HEADER_UP
    assert 0 <= used.bytes_from_gpu - down <= n * 2 * HEADER_DOWN


@pytest.mark.parametrize("plan", list(PLANS))
def test_prefill_byte_model_matches_the_meter(ckpt, plan):
    model = local_model(ckpt, plan)
    cache = model.new_cache()
    for T, S in ((12, 12), (7, 19)):  # a first chunk, then one after 12 cached positions
        before = model.gpu.metrics.copy()
        model.forward(np.arange(1, T + 1)[None], cache, top_k=1)
        used = model.gpu.metrics - before
        n = sum(used.rpc.values())
        up, down = pass_bytes(PLANS[plan], model.config, T, S, "float32", top_k=1)
        assert 0 <= used.bytes_to_gpu - up <= n * 2 * HEADER_UP
        assert 0 <= used.bytes_from_gpu - down <= n * 2 * HEADER_DOWN


def test_upload_byte_model_matches_the_meter(ckpt):
    model = local_model(ckpt, "v2-merged")
    model.decode_plan = PLANS["v3-merged"]
    cache = model.new_cache(1, 32)
    model.forward(np.arange(1, 20)[None], cache, top_k=1)
    before = model.gpu.metrics.copy()
    model.close_cache(model.for_decode(cache))
    used = model.gpu.metrics - before
    assert used.rpc["WriteKV"] == model.config.num_layers
    n = sum(used.rpc.values())
    assert 0 <= used.bytes_to_gpu - upload_bytes(model.config, 19, "float32") <= n * 2 * HEADER_UP


def test_phases_follow_the_prompt_and_the_link(ckpt):
    c = local_model(ckpt, "v2").config
    fast = LinkStats(rtt_s=20e-6, up_bytes_per_s=2e9, down_bytes_per_s=2e9)
    # A trusted side as quick at attention as the GPU, but slow at decode-shaped products (a
    # memory-bound enclave): prefill where nothing quadratic crosses, decode with K/V on the GPU.
    even = PrefillSpeeds(tee_attention_s=1e-9, tee_softmax_s=1e-9, gpu_products_s=1e-9)
    pick = choose_phases(
        None,
        c,
        4096,
        64,
        512,
        link=fast,
        tee_flops=1e7,
        gpu_attention_s=1e-6,
        speeds=even,
        wires=("float32",),
    )
    assert not pick.prefill.attention_on_gpu and pick.decode.gpu_kv_cache
    assert f"{pick.prefill.name}>{pick.decode.name}/float32" in pick.estimates_ms
    # A fast trusted CPU: v2 placement for both phases, the fewest round trips.
    pick = choose_phases(None, c, 64, 16, link=fast, tee_flops=1e12, gpu_attention_s=1e-4, speeds=even)
    assert (pick.prefill.name, pick.decode.name) == ("v2-merged", "v2-merged")
    # No pair moves a GPU session's K/V back to the trusted side.
    assert not any(k.startswith(("v3-fused>v2", "v3-merged>v2")) for k in pick.estimates_ms)


def test_choice_follows_the_link(ckpt):
    c = local_model(ckpt, "v2").config
    slow_rtt = LinkStats(rtt_s=5e-3, up_bytes_per_s=1e9, down_bytes_per_s=1e9)
    thin_pipe = LinkStats(rtt_s=1e-6, up_bytes_per_s=1e5, down_bytes_per_s=1e5)
    fast_cpu = 1e12
    # Round trips dominate: the fewest crossings win (v2-merged: 2 per layer).
    assert choose(None, c, 512, link=slow_rtt, tee_flops=fast_cpu).plan.name == "v2-merged"
    # Bytes dominate: v3's context-sized uploads lose, and a narrower wire dtype is worth it.
    pick = choose(None, c, 512, link=thin_pipe, tee_flops=fast_cpu)
    assert pick.plan.name in ("v2-fused", "v2-merged", "v2") and pick.wire_dtype == "float16"
    # A slow trusted CPU and a fast link: attention goes to the GPU.
    assert choose(None, c, 4096, link=LinkStats(1e-6, 1e10, 1e10), tee_flops=1e6).plan.attention_on_gpu


def test_choose_measures_a_real_link(ckpt):
    model = local_model(ckpt, "v2")
    choice = choose(model.gpu, model.config, 64)
    assert choice.plan.name in PLANS and choice.link.rtt_s > 0
    assert set(choice.estimates_ms) == {f"{p}/{w}" for p in PLANS for w in ("float32", "float16")}


def test_slow_gpu_attention_keeps_attention_in_the_trusted_side(ckpt):
    c = local_model(ckpt, "v2").config
    link = LinkStats(rtt_s=1e-6, up_bytes_per_s=1e10, down_bytes_per_s=1e10)
    # A device where each small attention product costs 1 ms (launch and sync), a quick CPU.
    assert not choose(None, c, 512, link=link, tee_flops=1e10, gpu_attention_s=1e-3).plan.attention_on_gpu
    # The same CPU made very slow: the GPU's attention wins again.
    assert choose(None, c, 4096, link=link, tee_flops=1e3, gpu_attention_s=1e-3).plan.attention_on_gpu


def test_gpu_attention_time_is_measured_from_the_server(ckpt):
    from teesplit.tee.adaptive import measure_gpu_attention_s

    model = local_model(ckpt, "v2")
    t = measure_gpu_attention_s(model.gpu, model.config, 256)
    assert 0 < t < 1.0
    assert model.gpu.metrics.rpc["Matmul"] == 6
