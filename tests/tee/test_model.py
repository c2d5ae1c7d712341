"""TEELlamaModel.prefill: a prompt in chunks of N tokens gives what one forward pass gives,
for every plan, ragged batches and Mistral's sliding window included."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import local_model, make_checkpoint, rss

from teesplit.tee.generate import Generator, SamplingParams

PLANS = ["v3", "v2", "v3-fused", "v2-fused", "v3-merged", "v2-merged"]
# Ragged: 37, 12, 5 and 30 tokens, prefilled in chunks of 8 (the last chunk is partial and the
# short rows ride along with nothing to add in the later ones).
PROMPTS = [
    [int(t) for t in np.random.default_rng(b).integers(0, 128, n)] for b, n in enumerate((37, 12, 5, 30))
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("prefill"), "llama", num_hidden_layers=2)


@pytest.fixture(scope="module")
def window_ckpt(tmp_path_factory):
    return make_checkpoint(
        tmp_path_factory.mktemp("prefill-window"), "mistral", sliding_window=6, head_dim=16
    )


def padded(prompts):
    lengths = np.array([len(p) for p in prompts], np.int64)
    ids = np.zeros((len(prompts), int(lengths.max())), np.int64)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = p
    return ids, lengths


def last_logits(model, chunk, prompts=PROMPTS):
    ids, lengths = padded(prompts)
    cache = model.new_cache(len(prompts), max_tokens=64)
    try:
        out = model.prefill(ids, cache, lengths, chunk)
        assert cache.lengths.tolist() == lengths.tolist()
        return out
    finally:
        model.close_cache(cache)


@pytest.mark.parametrize("plan", PLANS)
def test_chunked_prefill_gives_the_same_logits_and_tokens(ckpt, plan):
    model = local_model(ckpt, plan)
    whole = last_logits(model, None)
    for chunk in (8, 5):
        np.testing.assert_allclose(last_logits(model, chunk), whole, atol=1e-5, rtol=0)
    params = SamplingParams(max_new_tokens=8)

    def tokens(chunk):
        gen = Generator(model, None, eos_token_ids=set(), prefill_chunk=chunk)
        return [r.tokens for r in gen.generate_batch(PROMPTS, params)]

    assert tokens(8) == tokens(None)


def test_chunked_prefill_counts_one_forward_per_chunk(ckpt):
    model = local_model(ckpt, "v2-merged")
    before = model.gpu.metrics.copy()
    last_logits(model, 8)  # 37 tokens: 5 chunks
    used = model.gpu.metrics - before
    assert used.rpc["EmbedQKV"] == 5 and used.rpc["DownLMHead"] == 5


@pytest.mark.parametrize("plan", ["v3-fused", "v2-merged"])
def test_chunked_prefill_keeps_the_sliding_window(window_ckpt, plan):
    model = local_model(window_ckpt, plan)
    np.testing.assert_allclose(last_logits(model, 4), last_logits(model, None), atol=1e-5, rtol=0)


def test_top_k_replies_are_merged_per_row(ckpt):
    model = local_model(ckpt, "v3-merged")
    ids, lengths = padded(PROMPTS)
    values, tokens = [], []
    for chunk in (None, 8):
        cache = model.new_cache(len(PROMPTS), max_tokens=64)
        v, t = model.prefill(ids, cache, lengths, chunk, top_k=3)
        model.close_cache(cache)
        values.append(v)
        tokens.append(t)
    assert tokens[0].tolist() == tokens[1].tolist()
    np.testing.assert_allclose(values[0], values[1], atol=1e-5, rtol=0)


def test_prefill_chunk_must_be_positive(ckpt):
    """0 means one pass (as `--prefill-chunk 0`); a negative size is refused."""
    model = local_model(ckpt, "v2-fused")
    with pytest.raises(ValueError, match="chunk"):
        last_logits(model, -1)
    np.testing.assert_array_equal(last_logits(model, 0), last_logits(model, None))


# ---- a plan per phase: prefill in v2 placement, decode in v3 placement ----------------------


def greedy(model, prompts=PROMPTS, n=8, chunk=None):
    gen = Generator(model, None, eos_token_ids=set(), prefill_chunk=chunk)
    return [r.tokens for r in gen.generate_batch(prompts, SamplingParams(max_new_tokens=n))]


@pytest.mark.parametrize(
    "prefill, decode",
    [("v2-merged", "v3-merged"), ("v2-fused", "v3-fused"), ("v2", "v3-merged"), ("v3", "v3-fused")],
)
def test_prefill_in_one_placement_decode_in_another_gives_the_same_tokens(ckpt, prefill, decode):
    from teesplit.tee.plans import get_plan

    alone = greedy(local_model(ckpt, decode))
    model = local_model(ckpt, prefill)
    model.decode_plan = get_plan(decode)
    before = model.gpu.metrics.copy()
    assert greedy(model, chunk=8) == alone
    used = model.gpu.metrics - before
    # The K/V go up once, one WriteKV per layer; then only the decode plan's own calls.
    assert used.rpc["WriteKV"] == model.config.num_layers
    assert used.rpc["OpenSession"] == used.rpc["CloseSession"] == 1
    per_token = get_plan(decode).rpcs_per_forward(model.config.num_layers)
    chunks = -(-max(len(p) for p in PROMPTS) // 8)
    prefill_rpcs = chunks * get_plan(prefill).rpcs_per_forward(model.config.num_layers)
    assert sum(used.rpc.values()) == prefill_rpcs + model.config.num_layers + 2 + 7 * per_token


def test_for_decode_switches_plans_without_moving_a_cache_that_stays(ckpt):
    from teesplit.tee.plans import get_plan

    model = local_model(ckpt, "v2-merged")
    model.decode_plan = get_plan("v2-fused")
    cache = model.new_cache(1, 16)
    assert model.for_decode(cache) is cache and cache.plan.name == "v2-fused"
    back = local_model(ckpt, "v3-merged")
    back.decode_plan = get_plan("v2-merged")
    gpu_cache = back.new_cache(1, 16)
    with pytest.raises(ValueError, match="live on the GPU"):
        back.for_decode(gpu_cache)
    back.close_cache(gpu_cache)


def test_a_private_plan_keeps_both_phases(ckpt):
    from teesplit.tee.plans import get_plan

    model = local_model(ckpt, "v2-fused")
    model.gpu.private = True  # as if it were the masking port
    model.plan = get_plan("private-otp")
    with pytest.raises(ValueError, match="private"):
        model.decode_plan = get_plan("v3-merged")


# ---- bounded memory: an 8k-token prompt in chunks, two real processes -----------------------

LONG = 8000
CHUNK = 512
TRUSTED_SIDE = """
import json, sys
import numpy as np
from teesplit.tee.client import GPUClient
from teesplit.tee.model import TEELlamaModel
from teesplit.tee.plans import get_plan
from teesplit.transport import open_transport

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

address, model_dir, plan, n, chunk = sys.argv[1:6]
model = TEELlamaModel(GPUClient(open_transport(address, 600)), get_plan(plan))
ids = np.random.default_rng(0).integers(0, 128, (1, int(n)))
cache = model.new_cache(1, max_tokens=int(n) + 1)
open("/proc/self/clear_refs", "w").write("5")  # the peak RSS counts from here
before = rss("VmRSS")
model.prefill(ids, cache, None, int(chunk), top_k=1)
print(json.dumps({"growth": rss("VmHWM") - before}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("plan", ["v3-fused", "v2-merged"])
def test_an_8k_prompt_in_chunks_keeps_both_processes_memory_bounded(tmp_path, plan):
    import json
    import subprocess
    import sys

    from teesplit.launch import start_server, stop_server

    H = 4
    path = make_checkpoint(tmp_path / "ckpt", "llama", max_position_embeddings=8192, num_attention_heads=H)
    address = f"ipc://{tmp_path}/gpu.sock"
    server = start_server(path, address, ["--device", "cpu", "--dtype", "float32", "--threads", "1"])
    try:
        open(f"/proc/{server.pid}/clear_refs", "w").write("5")
        server_before = rss(server.pid)
        out = subprocess.run(
            [sys.executable, "-c", TRUSTED_SIDE, address, str(path), plan, str(LONG), str(CHUNK)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        trusted = json.loads(out.stdout.strip().splitlines()[-1])["growth"]
        server_growth = rss(server.pid, "VmHWM") - server_before
    finally:
        stop_server(server)
    # One chunk's scores, (1, H, 512, 8000) float32, is 66 MB; a few of them live at once (the
    # scores, their softmax, the wire's copies). The whole prompt in one pass would need
    # (1, H, 8000, 8000) float32 = 1 GB for each, so a bound of 6 chunks' worth plus 64 MB of
    # slack tells the two apart by a factor of 2.5 or more.
    bound = 6 * H * CHUNK * LONG * 4 + (64 << 20)
    assert trusted <= bound, f"trusted side grew {trusted / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB"
    assert server_growth <= bound, (
        f"GPU server grew {server_growth / 2**20:.0f} MiB, bound {bound / 2**20:.0f}"
    )
