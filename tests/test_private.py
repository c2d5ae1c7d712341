"""The private plans (tee/private.py, gpu/ring.py): exact ring products, one-time pads used
once, parity with plan v2 (small checkpoints of every family and real SmolLM2 weights),
round trips and bytes per token, refusals, and the reliability features under them."""

from __future__ import annotations

import signal
import threading
import time

import numpy as np
import pytest
import torch
from helpers import local_model, make_checkpoint, split_stepwise_logits
from test_resilience import LossyServer

from teesplit import protocol
from teesplit.gpu.ring import RingWeights, fixed_point_weights, limb_matmul
from teesplit.launch import build_service, free_tcp_address, start_server, stop_server
from teesplit.protocol import RemoteError, parse_reply, request
from teesplit.tee.client import GPUClient
from teesplit.tee.generate import Generator, SamplingParams
from teesplit.tee.local_weights import load_local_weights
from teesplit.tee.model import TEELlamaModel
from teesplit.tee.plans import get_plan
from teesplit.tee.private import PadPool, PadReuseError, RingSite, private_gpu, random_ring
from teesplit.transport import GPUServerUnavailable
from teesplit.transport.local import LocalTransport
from teesplit.transport.zmq import ZmqTransport

CPU = ["--device", "cpu", "--dtype", "float32", "--threads", "1"]
PRIVATE = ("private-otp", "private-2party")


def private_model(path, plan: str, handlers=None, pool_depth: int = 8) -> TEELlamaModel:
    """A private plan over in-process transports (one service, or two for private-2party)."""
    n = 2 if plan == "private-2party" else 1
    if handlers is None:
        handlers = [build_service(path, "cpu", "float32", progress=False)[0] for _ in range(n)]
    clients = [GPUClient(LocalTransport(h.handle)) for h in handlers[:n]]
    gpu = private_gpu(plan, load_local_weights(path), clients, pool_depth)
    return TEELlamaModel(gpu, get_plan(plan))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("private"), "llama")


# ---- the arithmetic -------------------------------------------------------------------------
def test_cuda_limb_product_equals_the_wrapping_int64_product():
    """The CUDA path (float64 limbs) must give the same ring element as numpy's int64 product;
    it runs on CPU tensors here, bit for bit."""
    w = torch.randn(70, 300) * 0.3
    w[0, 0] = 7.5  # a large weight: the high limb is used
    x = random_ring((5, 300))
    q = fixed_point_weights(w)
    limbs = ((q & 0xFFFF).double().T.contiguous(), (q >> 16).double().T.contiguous())
    assert np.array_equal(limb_matmul(torch.from_numpy(x), limbs).numpy(), RingWeights(w).matmul(x))
    exact = [sum(int(a) * int(b) for a, b in zip(x[1], q[j].tolist(), strict=True)) for j in range(3)]
    assert [(e + 2**63) % 2**64 - 2**63 for e in exact] == RingWeights(w).matmul(x)[1, :3].tolist()


def test_ring_encoding_is_exact_up_to_rounding_and_never_wraps(ckpt):
    lw = load_local_weights(ckpt)
    site = RingSite(lw, 0, "qkv", keep_weights=True)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 64)).astype(np.float32)
    x[1] *= 1e6  # a huge row gets fewer fractional bits instead of wrapping around
    xq, f = site.encode(x)
    assert f[0, 0] == 24 and f[1, 0] < 24
    r = random_ring(xq.shape)
    masked = xq - r
    y = (masked @ site.wq.T) + site.unblind(r)  # what the GPU returns, plus the unblinding factor
    got = site.decode(y, f)
    want = x.astype(np.float64) @ lw.weight(0, "qkv").T.astype(np.float64)
    assert np.allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max(axis=1, keepdims=True))
    with pytest.raises(ValueError, match="NaN or Inf"):
        site.encode(np.full((1, 64), np.nan, np.float32))


def test_a_pad_is_used_exactly_once(ckpt):
    lw = load_local_weights(ckpt)
    sites = {(i, s): RingSite(lw, i, s, keep_weights=True) for i, s in lw.sites()}
    pool = PadPool(sites, depth=4, chunk=2)
    try:
        pad = pool.take((0, "qkv"), 3)
        r, rw = pad.consume()
        assert r.shape == (3, 64) and rw.shape == (3, 64 + 2 * 32)
        assert np.array_equal(rw, r @ sites[(0, "qkv")].wq.T)
        with pytest.raises(PadReuseError):
            pad.consume()
        # Pads handed out never share rows: 40 rows in 10 takes are 40 distinct random rows.
        rows = np.concatenate([pool.take((1, "down"), 4).consume()[0] for _ in range(10)])
        assert len({row.tobytes() for row in rows}) == 40
        assert pool.stats()["tokens_made"] > 0
    finally:
        pool.close()


def test_the_model_consumes_every_pad_it_takes(ckpt):
    model = private_model(ckpt, "private-otp")
    taken = []
    real_take = model.gpu.pool.take

    def take(key, n):
        pad = real_take(key, n)
        taken.append(pad)
        return pad

    model.gpu.pool.take = take
    try:
        model.forward(np.array([[1, 2, 3]]), model.new_cache())
        L = model.config.num_layers
        assert len(taken) == 4 * L + 1
        assert all(p.rows == 0 for p in taken)  # consumed
        with pytest.raises(PadReuseError):
            taken[0].consume()
    finally:
        model.gpu.close()


# ---- parity ---------------------------------------------------------------------------------
VARIANTS = {
    "llama-gqa": ("llama", {}),
    "llama-tied-bias": ("llama", {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True}),
    "qwen2": ("qwen2", {"num_key_value_heads": 1}),
    "mistral-window": ("mistral", {"sliding_window": 6, "head_dim": 16}),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("plan", PRIVATE)
def test_private_plans_match_v2_on_every_family(tmp_path, variant, plan):
    family, overrides = VARIANTS[variant]
    path = make_checkpoint(tmp_path, family, **overrides)
    ids = np.random.default_rng(1).integers(0, 128, 18).tolist()
    want = split_stepwise_logits(local_model(path, "v2"), ids, n_prefill=12)
    model = private_model(path, plan)
    try:
        got = split_stepwise_logits(model, ids, n_prefill=12)
    finally:
        model.gpu.close()
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        err = float(np.abs(g - w).max())
        assert err <= 1e-4, f"step {step}: max |logit diff| {err:.2e}"


# ---- counts ---------------------------------------------------------------------------------
@pytest.mark.parametrize("plan", PRIVATE)
def test_round_trips_and_bytes_per_decode_token(ckpt, plan):
    """4L + 1 round trips (v2-fused's 4L + 2 less the embedding, done locally); private-2party
    makes each of them to both servers. Bytes: every Linear's input and output as int64."""
    model = private_model(ckpt, plan)
    try:
        cache = model.new_cache()
        model.forward(np.array([[1, 2, 3, 4]]), cache)
        before = model.gpu.metrics.copy()
        model.forward(np.array([[5]]), cache)
        d = model.gpu.metrics - before
    finally:
        model.gpu.close()
    c = model.config
    L, E, F, V = c.num_layers, c.hidden_size, c.intermediate_size, c.vocab_size
    n = 2 if plan == "private-2party" else 1
    assert get_plan(plan).rpcs_per_forward(L) == 4 * L + 1
    assert dict(d.rpc) == {"RingLinear": n * (4 * L + 1)}
    qkv_out = c.q_dim + 2 * c.kv_dim
    payload_in = 8 * (L * (E + c.q_dim + E + F) + E)
    payload_out = 8 * (L * (qkv_out + E + 2 * F + E) + V)
    assert n * payload_in < d.bytes_to_gpu < n * (payload_in + (4 * L + 1) * 160)  # + headers
    assert n * payload_out < d.bytes_from_gpu < n * (payload_out + (4 * L + 1) * 160)


# ---- refusals -------------------------------------------------------------------------------
def test_refusals_name_what_to_change(ckpt):
    lw = load_local_weights(ckpt)
    (h,) = [build_service(ckpt, "cpu", "float32", progress=False)[0]]
    with pytest.raises(ValueError, match="--wire-dtype bfloat16 does not apply"):
        private_gpu("private-otp", lw, [GPUClient(LocalTransport(h.handle), "bfloat16")])
    with pytest.raises(ValueError, match="two non-colluding"):
        private_gpu("private-2party", lw, [GPUClient(LocalTransport(h.handle))])
    bf16, _ = build_service(ckpt, "cpu", "bfloat16", progress=False)
    gpu = private_gpu("private-otp", lw, [GPUClient(LocalTransport(bf16.handle))], 0)
    with pytest.raises(ValueError, match="--dtype float32"):
        TEELlamaModel(gpu, get_plan("private-otp"))
    gpu.close()
    other = make_checkpoint(ckpt.parent / "other", "llama", hidden_size=32, num_attention_heads=2)
    gpu = private_gpu("private-otp", load_local_weights(other), [GPUClient(LocalTransport(h.handle))], 0)
    with pytest.raises(ValueError, match="different model"):
        TEELlamaModel(gpu, get_plan("private-otp"))
    gpu.close()


def test_a_private_plan_refuses_a_plain_client(ckpt):
    h, _ = build_service(ckpt, "cpu", "float32", progress=False)
    with pytest.raises(ValueError, match="private_gpu"):
        TEELlamaModel(GPUClient(LocalTransport(h.handle)), get_plan("private-otp"))


def test_server_validates_ring_requests(ckpt):
    h, _ = build_service(ckpt, "cpu", "float32", progress=False)
    bf16, _ = build_service(ckpt, "cpu", "bfloat16", progress=False)
    x = random_ring((1, 2, 64))
    cases = [
        (h, {"layer": 0, "site": "qkv"}, x.astype(np.float32), "bad_tensor"),
        (h, {"layer": 0, "site": "qkv"}, x[..., :10], "bad_tensor"),
        (h, {"layer": 0, "site": "q_proj"}, x, "bad_args"),
        (h, {"layer": 2, "site": "o"}, x, "bad_args"),
        (h, {"layer": 0, "site": "lm_head"}, x, "bad_args"),
        (h, {"layer": 0}, x, "bad_args"),
        (bf16, {"layer": 0, "site": "qkv"}, x, "bad_args"),
    ]
    for handler, args, t, code in cases:
        with pytest.raises(RemoteError) as e:
            parse_reply(handler.handle(request(1, "RingLinear", args, (t,))), "RingLinear")
        assert e.value.code == code, (args, e.value)
    _, (y,) = parse_reply(h.handle(request(2, "RingLinear", {"layer": -1, "site": "lm_head"}, (x,))), "x")
    assert y.dtype == np.int64 and y.shape == (1, 2, 128)
    assert "RingLinear" in protocol.OPS


def test_malformed_ring_requests_get_error_replies_never_a_crash(ckpt):
    h, _ = build_service(ckpt, "cpu", "float32", progress=False)
    rng = np.random.default_rng(0)
    sites = ["qkv", "o", "gate_up", "down", "lm_head", "", "q_proj", "x" * 100]
    dtypes = [np.int64, np.float32, np.float16]
    codes = set()
    for i in range(300):
        shape = tuple(int(d) for d in rng.integers(0, 130, rng.integers(1, 5)))
        x = np.zeros(shape, dtypes[i % 3])
        args = {"layer": int(rng.integers(-3, 4)), "site": sites[i % len(sites)]}
        try:
            _, (y,) = parse_reply(h.handle(request(i, "RingLinear", args, (x,))), "RingLinear")
            assert y.dtype == np.int64 and y.shape[:-1] == x.shape[:-1]  # a valid request
            codes.add("ok")
        except RemoteError as e:
            assert e.code in ("bad_args", "bad_tensor", "too_large"), e
            codes.add(e.code)
    assert {"bad_args", "bad_tensor"} <= codes
    _, (y,) = parse_reply(
        h.handle(request(999, "RingLinear", {"layer": 1, "site": "down"}, (random_ring((1, 1, 96)),))), "x"
    )
    assert y.shape == (1, 1, 64)  # still serving


# ---- real weights ---------------------------------------------------------------------------
SMOL_PROMPTS = [
    "Explain how photosynthesis works.",
    "Give me three tips for learning a new programming language.",
]


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    from teesplit.tee.tokenizer import Tokenizer

    handlers = [build_service(smollm2_dir, "cpu", "float32", progress=False)[0] for _ in range(2)]
    tok = Tokenizer.from_dir(smollm2_dir)
    plain = TEELlamaModel(GPUClient(LocalTransport(handlers[0].handle)), get_plan("v2"))
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}]) for p in SMOL_PROMPTS]
    want = [Generator(plain, tok).generate(ids, SamplingParams(max_new_tokens=32)).tokens for ids in prompts]
    return smollm2_dir, handlers, tok, plain, prompts, want


@pytest.mark.parametrize("plan", PRIVATE)
def test_smollm2_greedy_tokens_and_logits_match_v2(smol, plan):
    path, handlers, tok, plain, prompts, want = smol
    model = private_model(path, plan, handlers, pool_depth=32)
    n = len(prompts) if plan == "private-otp" else 1  # the products are exact: 2party's equal otp's
    try:
        for ids, expected in zip(prompts[:n], want[:n], strict=True):
            got = Generator(model, tok).generate(ids, SamplingParams(max_new_tokens=32)).tokens
            assert len(expected) == 32
            same = sum(a == b for a, b in zip(got, expected, strict=False))
            assert same >= 31, f"{same}/32 greedy tokens equal v2's"
        seq = np.array([prompts[0] + want[0]])
        ref = plain.forward(seq, plain.new_cache(), all_logits=True)
        err = float(np.abs(model.forward(seq, model.new_cache(), all_logits=True) - ref).max())
        assert err <= 1e-2, f"max |logit diff| {err:.2e} against v2"
        print(f"{plan}: max |logit diff| against v2 over {seq.shape[1]} positions: {err:.2e}")
    finally:
        model.gpu.close()


# ---- reliability ----------------------------------------------------------------------------
PROMPT = [3, 17, 42, 5, 99, 7]
PARAMS = SamplingParams(max_new_tokens=24)


def test_otp_generation_survives_a_server_killed_and_restarted(ckpt):
    """SIGKILL the server mid-decode and restart it: the runner resends the same masked request
    (same id, same bytes: the pad is not used twice) and the tokens equal an uninterrupted run."""
    want = Generator(local_model(ckpt, "v2"), eos_token_ids=set()).generate(PROMPT, PARAMS).tokens
    address = free_tcp_address()
    procs = [start_server(ckpt, address, CPU)]
    c = GPUClient(ZmqTransport(address, timeout_s=20.0), retries=2)
    model = TEELlamaModel(
        private_gpu("private-otp", load_local_weights(ckpt), [c], 8), get_plan("private-otp")
    )
    calls, restart, sent = [0], [], []
    real_call = c.call

    def call(op, args=None, tensors=(), sid=None):
        calls[0] += 1
        if calls[0] == 60:
            procs[0].send_signal(signal.SIGKILL)
            procs[0].wait()
            restart.append(time.monotonic())
            threading.Thread(target=lambda: procs.append(start_server(ckpt, address, CPU))).start()
        sent.append(b"".join(t.tobytes() for t in tensors))
        return real_call(op, args, tensors, sid)

    c.call = call
    try:
        result = Generator(model, eos_token_ids=set()).generate(PROMPT, PARAMS)
    finally:
        model.gpu.close()
        for p in procs[1:]:
            stop_server(p)
    assert restart and result.tokens == want
    assert result.stats["retries"] >= 1 and result.stats["recoveries"] == 0
    assert "OpenSession" not in result.stats["rpc"]["by_op"]  # nothing lives in a server session
    payloads = [p for p in sent if p]
    assert len(set(payloads)) == len(payloads)  # every masked input is fresh


def test_2party_resends_a_lost_reply_to_one_server(ckpt):
    handlers = [build_service(ckpt, "cpu", "float32", progress=False)[0] for _ in range(2)]
    want = Generator(local_model(ckpt, "v2"), eos_token_ids=set()).generate(PROMPT, PARAMS).tokens
    lossy = LossyServer(handlers[1], drop={"RingLinear": 2}, delay={})
    a = GPUClient(LocalTransport(handlers[0].handle))
    b = GPUClient(ZmqTransport(lossy.address, timeout_s=0.5), retries=2)
    model = TEELlamaModel(
        private_gpu("private-2party", load_local_weights(ckpt), [a, b]), get_plan("private-2party")
    )
    try:
        result = Generator(model, eos_token_ids=set()).generate(PROMPT, PARAMS)
    finally:
        model.gpu.close()
        lossy.close()
    assert result.tokens == want
    assert result.stats["retries"] == 2 and handlers[1].replayed == 2


def test_2party_with_one_server_down_fails_within_the_timeout(ckpt):
    h, _ = build_service(ckpt, "cpu", "float32", progress=False)
    a = GPUClient(LocalTransport(h.handle))
    b = GPUClient(ZmqTransport(free_tcp_address(), timeout_s=0.3), retries=1)
    gpu = private_gpu("private-2party", load_local_weights(ckpt), [a, b])
    t0 = time.monotonic()
    with pytest.raises(GPUServerUnavailable, match="after 2 tries"):
        TEELlamaModel(gpu, get_plan("private-2party"))
    assert time.monotonic() - t0 < 5
    gpu.close()


# ---- the command line -----------------------------------------------------------------------
def test_cli_private_plans_stats_and_refusals(smollm2_dir, tmp_path, capsys):
    from teesplit.cli import main

    base = ["generate", "--model", str(smollm2_dir), "--prompt", "Hi", "--max-new-tokens", "3"]
    stats = tmp_path / "stats.json"
    assert (
        main([*base, "--server", "local", "--plan", "private-otp", "--stats", "--stats-json", str(stats)])
        == 0
    )
    err = capsys.readouterr().err
    assert "one-time pads:" in err and "ms trusted CPU per token" in err
    import json

    s = json.loads(stats.read_text())
    assert s["plan"] == "private-otp" and s["pads"]["tokens_made"] > 0 and s["pads"]["peak_bytes"] > 0
    assert set(s["rpc"]["by_op"]) == {"RingLinear"}
    assert main([*base, "--server", "local", "--plan", "private-otp", "--wire-dtype", "float16"]) == 2
    assert "--wire-dtype float16 does not apply" in capsys.readouterr().err
    assert main([*base, "--server", "local", "--plan", "private-2party"]) == 2
    assert "--server A --server B" in capsys.readouterr().err
    assert main([*base, "--server", "local", "--server", "local", "--plan", "v2-fused"]) == 2
    assert "one GPU server" in capsys.readouterr().err
