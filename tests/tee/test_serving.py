"""The continuous-batching scheduler (tee/serving.py) in-process: every plan, rows joining a
running batch and leaving it, and each request getting exactly its solo greedy tokens."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import local_model, make_checkpoint

from teesplit.tee.generate import Generator, SamplingParams
from teesplit.tee.plans import PLANS
from teesplit.tee.serving import Engine, ServingError
from teesplit.transport import GPUServerUnavailable


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serving") / "m", "llama", max_position_embeddings=128)


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [list(rng.integers(3, 128, size=int(rng.integers(2, 14)))) for _ in range(n)]


def _collect(req):
    """Every event of a request, until done or error."""
    events = []
    while True:
        e = req.wait(timeout=120)
        events.append(e)
        if e.kind != "token":
            return events


@pytest.mark.parametrize("plan", list(PLANS))
def test_joining_and_leaving_rows_get_their_solo_greedy_tokens(ckpt, plan):
    solo = local_model(ckpt, plan)
    model = local_model(ckpt, plan)
    engine = Engine(lambda: model, tokenizer=None, max_batch=4)
    engine.start()
    try:
        prompts = _prompts(7)
        budgets = [3, 9, 5, 12, 1, 7, 10]
        # Two requests start a batch; the others arrive while it decodes (they join at the next
        # step) and more than max_batch are in flight, so some wait for a row to leave.
        reqs = [
            engine.submit(p, SamplingParams(max_new_tokens=n))
            for p, n in zip(prompts[:2], budgets[:2], strict=True)
        ]
        first = reqs[0].wait(timeout=120)
        assert first.kind == "token"
        reqs += [
            engine.submit(p, SamplingParams(max_new_tokens=n))
            for p, n in zip(prompts[2:], budgets[2:], strict=True)
        ]
        results = [[first] + _collect(reqs[0])] + [_collect(r) for r in reqs[1:]]
    finally:
        engine.stop()
    eos = set(model.config.eos_token_ids)
    for p, n, req, events in zip(prompts, budgets, reqs, results, strict=True):
        assert events[-1].kind == "done", events[-1]
        want = Generator(solo, eos_token_ids=eos).generate(p, SamplingParams(max_new_tokens=n))
        assert req.tokens == want.tokens, (plan, p)
        assert events[-1].finish_reason == want.finish_reason
    snap = engine.snapshot()
    assert snap["decode_rows"] > snap["decode_steps"], "requests in flight together must share decode passes"
    assert snap["completion_tokens"] == sum(len(r.tokens) for r in reqs)
    assert snap["active"] == 0 and snap["waiting"] == 0
    if not model.plan.gpu_kv_cache:
        # trusted-side cache: one decode pass per step whatever the number of requests
        per_forward = model.plan.rpcs_per_forward(model.config.num_layers)
        assert sum(snap["rpc"].values()) == per_forward * (snap["prefill_chunks"] + snap["decode_steps"])
    else:
        assert model.gpu.inner.call("Ping")[0]["sessions"] == 0, "every GPU session is closed"


@pytest.mark.parametrize("plan", ["v2-merged", "v3-fused"])
@pytest.mark.parametrize("chunk", [8, None])
def test_a_long_prompt_is_prefilled_between_the_other_rows_decode_steps(ckpt, plan, chunk):
    """A running stream keeps getting tokens while another user's long prompt is prefilled:
    one decode step after each of its chunks (80 tokens in chunks of 8: 10 chunks, so 9 steps
    before its first token). In one pass (chunk None) the stream waits for the whole prefill."""
    solo, model = local_model(ckpt, plan), local_model(ckpt, plan)
    engine = Engine(lambda: model, tokenizer=None, max_batch=4, prefill_chunk=chunk)
    engine.start()
    prompts = [[5, 9, 14, 3, 27], list(np.random.default_rng(3).integers(3, 128, 80))]
    budgets = [60, 4]
    try:
        short = engine.submit(prompts[0], SamplingParams(max_new_tokens=budgets[0]))
        first = short.wait(timeout=120)
        assert first.kind == "token"
        long = engine.submit(prompts[1], SamplingParams(max_new_tokens=budgets[1]))
        assert _collect(long)[-1].kind == "done" and _collect(short)[-1].kind == "done"
    finally:
        engine.stop()
    eos = set(model.config.eos_token_ids)
    for p, n, req in zip(prompts, budgets, (short, long), strict=True):
        want = Generator(solo, eos_token_ids=eos).generate(p, SamplingParams(max_new_tokens=n))
        assert req.tokens == want.tokens
    during = [t for t in short.t_tokens if long.t_submit < t < long.t_first]
    snap = engine.snapshot()
    if chunk is None:
        assert len(during) <= 1 and snap["prefill_chunks"] == 2
    else:
        assert len(during) >= 9 and snap["prefill_chunks"] == 1 + 10
    assert snap["prefill_passes"] == 2 and snap["active"] == 0


def test_sampled_rows_follow_their_seed(ckpt):
    model = local_model(ckpt, "v2-fused")
    engine = Engine(lambda: model, tokenizer=None, max_batch=8)
    engine.start()
    try:
        p = _prompts(1, seed=3)[0]
        params = SamplingParams(max_new_tokens=8, temperature=0.9, top_p=0.9, seed=11)
        greedy = SamplingParams(max_new_tokens=8)
        reqs = [engine.submit(p, params), engine.submit(p, greedy), engine.submit(p, params)]
        for r in reqs:
            assert _collect(r)[-1].kind == "done"
    finally:
        engine.stop()
    eos = set(model.config.eos_token_ids)
    want = Generator(local_model(ckpt, "v2-fused"), eos_token_ids=eos).generate(p, params)
    assert reqs[0].tokens == reqs[2].tokens == want.tokens


def test_unreachable_server_fails_requests_and_recovers(ckpt):
    model = local_model(ckpt, "v2-merged")
    state = {"up": False}

    def make_model():
        if not state["up"]:
            raise GPUServerUnavailable("no reply from the GPU server at tcp://nowhere")
        return model

    engine = Engine(make_model, tokenizer=None)
    with pytest.raises(ServingError) as e:
        engine.connect()
    assert e.value.status == 503
    engine.start()
    try:
        ev = _collect(engine.submit([5, 6, 7], SamplingParams(max_new_tokens=3)))
        assert ev[-1].kind == "error" and ev[-1].error.status == 503 and "tcp://nowhere" in str(ev[-1].error)
        state["up"] = True
        req = engine.submit([5, 6, 7], SamplingParams(max_new_tokens=3))
        assert _collect(req)[-1].kind == "done" and len(req.tokens) == 3
    finally:
        engine.stop()
    assert engine.snapshot()["errors"] == {"gpu_unavailable": 1}


def test_cancelled_request_leaves_the_batch(ckpt):
    model = local_model(ckpt, "v2-merged")
    engine = Engine(lambda: model, tokenizer=None)
    engine.start()
    try:
        long = engine.submit([4, 5, 6], SamplingParams(max_new_tokens=100))
        assert long.wait(timeout=120).kind == "token"
        long.cancel()
        other = engine.submit([7, 8], SamplingParams(max_new_tokens=4))
        assert _collect(other)[-1].kind == "done"
        assert _collect(long)[-1].finish_reason == "cancelled"
    finally:
        engine.stop()
    assert len(long.tokens) < 100
