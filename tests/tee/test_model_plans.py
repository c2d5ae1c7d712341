"""Fused plans, GPU-side sessions, batching, compact LM-head replies and wire dtypes."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import local_model, make_checkpoint

from teesplit.gpu.service import SessionLimits
from teesplit.launch import build_service
from teesplit.protocol import RemoteError, dequantize_int8, quantize_int8
from teesplit.tee.client import GPUClient
from teesplit.tee.generate import Generator, SamplingParams
from teesplit.tee.model import TEELlamaModel
from teesplit.tee.plans import get_plan
from teesplit.transport.local import LocalTransport

PLANS = ["v3", "v2", "v3-fused", "v2-fused", "v3-merged", "v2-merged"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("fused"), "llama", num_hidden_layers=3)


def greedy(model, prompts, n=10, **kw):
    gen = Generator(model, None, eos_token_ids=set(), **kw)
    return [r.tokens for r in gen.generate_batch(prompts, SamplingParams(max_new_tokens=n))]


PROMPTS = [[5, 9, 2, 7, 1, 3, 8], [4, 4, 11], [60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70], [1]]


@pytest.mark.parametrize("plan", ["v3-fused", "v2-fused", "v3-merged", "v2-merged"])
def test_fused_plans_give_the_same_tokens_as_plain(ckpt, plan):
    plain = plan.split("-")[0]
    assert greedy(local_model(ckpt, plan), PROMPTS[:1], 20) == greedy(
        local_model(ckpt, plain), PROMPTS[:1], 20
    )


@pytest.mark.parametrize("plan", PLANS)
def test_ragged_batch_equals_each_prompt_alone(ckpt, plan):
    model = local_model(ckpt, plan)
    solo = [greedy(model, [p])[0] for p in PROMPTS]
    before = model.gpu.metrics.copy()
    batched = greedy(model, PROMPTS)
    assert batched == solo
    # One round trip per crossing for the whole batch: 1 prefill + 9 decode forward passes.
    used = model.gpu.metrics - before
    setup = used.rpc["OpenSession"] + used.rpc["CloseSession"]
    assert sum(used.rpc.values()) - setup == 10 * get_plan(plan).rpcs_per_forward(3)
    assert used.rpc["Init"] == 0


def test_rows_finishing_early_stop_advancing(ckpt):
    model = local_model(ckpt, "v3-fused")
    solo = greedy(model, [PROMPTS[1]], 12)[0]
    eos = solo[3]  # make row 1 stop at its 4th token
    gen = Generator(model, None, eos_token_ids={eos})
    rs = gen.generate_batch([PROMPTS[0], PROMPTS[1]], SamplingParams(max_new_tokens=12))
    assert rs[1].tokens == solo[: solo.index(eos)] and rs[1].finish_reason == "stop"
    alone = Generator(model, None, eos_token_ids={eos}).generate(
        PROMPTS[0], SamplingParams(max_new_tokens=12)
    )
    assert rs[0].tokens == alone.tokens


def test_compact_lm_head_greedy_and_top_k(ckpt):
    model = local_model(ckpt, "v2-fused")
    full = Generator(model, None, eos_token_ids=set(), compact_logits=False)
    compact = Generator(model, None, eos_token_ids=set())
    for params in (
        SamplingParams(max_new_tokens=12),
        SamplingParams(max_new_tokens=12, temperature=0.8, top_k=5, seed=3),
    ):
        before = model.gpu.metrics.copy()
        a = compact.generate(PROMPTS[0], params)
        small = (model.gpu.metrics - before).bytes_from_gpu
        before = model.gpu.metrics.copy()
        b = full.generate(PROMPTS[0], params)
        big = (model.gpu.metrics - before).bytes_from_gpu
        assert a.tokens == b.tokens
        assert small < big  # k values + ids instead of the whole vocabulary row


@pytest.fixture()
def small_server(ckpt):
    handler, _ = build_service(ckpt, "cpu", "float32", progress=False)
    return handler


def test_sessions_are_accounted_capped_and_closed(ckpt):
    handler, _ = build_service(ckpt, "cpu", "float32", progress=False)
    svc = handler.service
    svc.limits = SessionLimits(max_sessions=2, max_session_tokens=64, max_batch=4, max_kv_bytes=120_000)
    client = GPUClient(LocalTransport(handler.handle))
    model = TEELlamaModel(client, get_plan("v3-fused"))
    a = model.new_cache(1, max_tokens=64)
    b = model.new_cache(2, max_tokens=64)
    with pytest.raises(RemoteError, match="already holds 2 sessions"):
        model.new_cache(1, 64)
    with pytest.raises(RemoteError, match="max_tokens"):
        client.open_session(1, 65)
    model.forward(np.array([[1, 2, 3]]), a)
    per_token = 2 * 3 * 2 * 16 * 4  # K and V, 3 layers, 2 KV heads, head dim 16, float32
    assert svc.sessions[a.sid].nbytes == 64 * per_token  # grown on demand to the minimum chunk
    assert svc.kv_bytes == svc.sessions[a.sid].nbytes
    with pytest.raises(RemoteError, match="exceed the server's limit"):
        model.forward(np.ones((2, 40), np.int64), b)  # a (49 kB) + b (2 x 64 x per_token = 98 kB) > 120 kB
    model.close_cache(a)
    assert a.sid not in svc.sessions and svc.kv_bytes == 0
    with pytest.raises(RemoteError, match="unknown session") as e:
        client.close_session(a.sid)
    assert e.value.code == "no_session"
    with pytest.raises(RemoteError, match="at most 64 tokens"):
        model.forward(np.ones((2, 65), np.int64), b)


def test_cache_writes_are_idempotent_and_gapless(ckpt):
    handler, _ = build_service(ckpt, "cpu", "float32", progress=False)
    client = GPUClient(LocalTransport(handler.handle))
    model = TEELlamaModel(client, get_plan("v3-fused"))
    cache = model.new_cache(1, 32)
    c = model.config
    x = np.random.default_rng(0).standard_normal((1, 2, c.hidden_size)).astype(np.float32)
    pos = np.array([0])
    first = client.qkv(0, x, cache.sid, pos)
    again = client.qkv(0, x, cache.sid, pos)  # a retried request: same place, same values
    assert np.array_equal(first, again)
    assert handler.service.sessions[cache.sid].v_len[0, 0] == 2
    q = np.zeros((1, c.num_heads, 2, c.head_dim), np.float32)
    k = np.zeros((1, c.num_kv_heads, 2, c.head_dim), np.float32)
    with pytest.raises(RemoteError, match="no gaps"):
        client.attn_scores(cache.sid, 0, q, k, np.array([5]))
    s1 = client.attn_scores(cache.sid, 0, q, k, pos)
    s2 = client.attn_scores(cache.sid, 0, q, k, pos)
    assert s1.shape == s2.shape == (1, c.num_heads, 2, 2)


@pytest.mark.parametrize("T", [1, 3])
def test_numpy_attention_matches_torch(ckpt, monkeypatch, T):
    """A float32 CPU session multiplies attention in numpy (gpu/service.py `_numpy_attention`);
    torch's bmm, the path of every other dtype and device, gives the same products, also for a
    ragged batch whose shorter row reads zeros past its end."""
    import teesplit.gpu.service as service_module

    real, chosen = service_module._numpy_attention, []

    def run(use_numpy: bool):
        monkeypatch.setattr(
            service_module, "_numpy_attention", lambda *a: chosen.append(real(*a)) or (use_numpy and real(*a))
        )
        handler, _ = build_service(ckpt, "cpu", "float32", progress=False)
        s = handler.service
        c = s.config
        sess = s.session(s.open_session(2, 32)["sid"])
        rng = np.random.default_rng(1)
        out = []
        for start in ([0, 0], [4, 2]):  # a prefill of 4 rows, then a ragged step
            n = 4 if start == [0, 0] else T
            pos = np.array(start)
            x = rng.standard_normal((2, n, c.hidden_size)).astype(np.float32)
            q = rng.standard_normal((2, c.num_heads, n, c.head_dim)).astype(np.float32)
            k = rng.standard_normal((2, c.num_kv_heads, n, c.head_dim)).astype(np.float32)
            s.qkv(0, x, sess, pos)
            scores = np.asarray(s.attn_scores(sess, 0, q, k, pos))
            p = rng.random(scores.shape).astype(np.float32)
            out += [scores, np.asarray(s.attn_out(sess, 0, p))]
        return out

    with_numpy = run(True)
    assert chosen and all(chosen)  # float32 on the CPU: numpy, at every product
    for got, want in zip(with_numpy, run(False), strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_int8_rows_round_trip():
    x = (
        np.random.default_rng(0).standard_normal((2, 3, 50)).astype(np.float32)
        * np.array([1, 100, 1e-3])[None, :, None]
    )
    y = dequantize_int8(quantize_int8(x))
    assert y.shape == x.shape
    err = np.abs(y - x).max(axis=-1) / np.abs(x).max(axis=-1)
    assert (err <= 0.5 / 127 + 1e-6).all()  # half a step of each row's own scale
    z = dequantize_int8(quantize_int8(np.zeros((1, 4), np.float32)))
    assert (z == 0).all()


@pytest.mark.parametrize(
    "wire, tol", [("float32", 1e-4), ("float16", 2e-2), ("bfloat16", 2e-1), ("int8", 5e-1)]
)
def test_wire_dtypes_stay_close_to_float32(ckpt, wire, tol):
    handler, _ = build_service(ckpt, "cpu", "float32", progress=False)
    ref_model = TEELlamaModel(GPUClient(LocalTransport(handler.handle)), get_plan("v3-fused"))
    model = TEELlamaModel(GPUClient(LocalTransport(handler.handle), wire), get_plan("v3-fused"))
    ids = np.array([PROMPTS[2]])
    ref = ref_model.forward(ids, ref_model.new_cache(), all_logits=True)
    got = model.forward(ids, model.new_cache(), all_logits=True)
    err = float(np.abs(got - ref).max())
    assert err <= tol
    if wire != "float32":
        assert err > 0  # the wire dtype really was used
