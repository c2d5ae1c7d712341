"""The private plans (tee/private.py, gpu/ring.py, quant.py): each ring step against float
arithmetic on the same integers, fresh pads and shares, parity with v2-merged (small
checkpoints of every family, a bfloat16 server, real SmolLM2 weights), round trips and bytes
per token, a server keeping only integers, refusals, hostile requests, and the reliability
features under them."""

from __future__ import annotations

import signal
import threading
import time

import numpy as np
import pytest
from helpers import local_model, make_checkpoint, split_stepwise_logits
from test_client_resilience import LossyServer

from teesplit import protocol, quant
from teesplit.launch import build_service, free_tcp_address, start_server, stop_server
from teesplit.protocol import RemoteError, parse_reply, request
from teesplit.tee.client import GPUClient
from teesplit.tee.generate import Generator, SamplingParams
from teesplit.tee.local_weights import load_local_weights
from teesplit.tee.model import TEELlamaModel
from teesplit.tee.plans import get_plan
from teesplit.tee.private import (
    X_FRAC_BITS,
    PadPool,
    PadReuseError,
    RingCodec,
    RingSites,
    private_gpu,
    random_ring,
    ring_steps,
)
from teesplit.transport import GPUServerUnavailable
from teesplit.transport.local import LocalTransport
from teesplit.transport.zmq import ZmqTransport

CPU = ["--device", "cpu", "--dtype", "float32", "--threads", "1"]
PRIVATE = ("private-otp", "private-2party")


def private_model(
    path, plan: str, handlers=None, pool_depth: int = 8, weights: str = "int16", dtype: str = "float32"
) -> TEELlamaModel:
    """A private plan over in-process transports (one service, or two for private-2party)."""
    n = 2 if plan == "private-2party" else 1
    if handlers is None:
        handlers = [build_service(path, "cpu", dtype, progress=False)[0] for _ in range(n)]
    clients = [GPUClient(LocalTransport(h.handle)) for h in handlers[:n]]
    gpu = private_gpu(plan, load_local_weights(path), clients, pool_depth, weights)
    return TEELlamaModel(gpu, get_plan(plan))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(
        tmp_path_factory.mktemp("private"), "llama", attention_bias=True, mlp_bias=True, num_hidden_layers=3
    )


# ---- the arithmetic -------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [16, 8])
def test_each_ring_step_is_float_arithmetic_on_the_same_integers(ckpt, bits):
    """Encode, the server's ring step on the unmasked integers, decode: equal to float64
    arithmetic with the dequantized integer weights (o = c ⊙ (q a) + b, z = (s q')(x + o)) within
    the rounding of the inputs to 2^-f (|ΔA|, |ΔX| <= ½), propagated exactly, plus float32's
    rounding of the results; for activations of every size from 1e-3 to 3e4."""
    lw = load_local_weights(ckpt)
    handler, _ = build_service(ckpt, "cpu", "float32", progress=False)
    server = handler.service
    server.ring_setup(bits)
    sites = RingSites(lw, bits, "float32", keep_q=True)
    codec = RingCodec(sites, lw)
    rng = np.random.default_rng(bits)
    for step in ring_steps(lw.config):
        second = sites[step.second]
        q2 = np.abs(second.q.astype(np.float64))
        x = rng.standard_normal((5, lw.config.hidden_size)) * np.array([[1], [10], [1e3], [1e-3], [3e4]])
        a = None
        if step.first is not None:
            a = rng.standard_normal((5, sites[step.first].q.shape[1])) * np.array(
                [[1], [1e-2], [1e2], [1], [30]]
            )
        A, X, f = codec.encode(step, a, x)
        assert f.min() >= 2  # the ring holds even the 3e4 residual with bits to spare
        tensors = [X[None]] if A is None else [A[None], X[None]]
        out = server.ring_step(step.op, {**step.args, "bits": bits}, tensors)
        o_ring, z_ring = (None, out[0]) if A is None else (out[0][0], out[1][0])
        o, z = codec.decode(step, o_ring, z_ring, f)
        ulp = 2.0**-f  # (R, 1): the input rounding step
        x_ref, slack = x.astype(np.float64), 0.5  # slack: |error| of S's entries, in units of 2^-f / δ
        base = 1.0
        if step.first is not None:
            first = sites[step.first]
            q1 = first.q.astype(np.float64)
            o_ref = (a @ q1.T) * first.scale + lw.bias(step.layer, step.bias)
            o_bound = 0.5 * ulp * np.abs(q1).sum(axis=1) * first.scale + 2.0**-23 * np.abs(o_ref)
            assert (np.abs(o - o_ref) <= o_bound).all(), step
            x_ref = x_ref + o_ref
            slack = 0.5 + first.mult * 0.5 * np.abs(q1).sum(axis=1)  # (E,)
            base = first.base
        z_ref = x_ref @ (second.q.astype(np.float64) * second.scale[:, None]).T
        z_bound = ulp * base * second.scale * (np.broadcast_to(slack, (q2.shape[1],)) @ q2.T)
        z_bound += 2.0**-23 * np.abs(z_ref)
        assert (np.abs(z - z_ref) <= z_bound).all(), step
        assert f.max() <= X_FRAC_BITS


def test_an_input_beyond_the_ring_is_refused_not_wrapped(ckpt):
    lw = load_local_weights(ckpt)
    codec = RingCodec(RingSites(lw, 16, "float32", keep_q=False), lw)
    step = ring_steps(lw.config)[1]
    x = np.ones((1, lw.config.hidden_size))
    with pytest.raises(ValueError, match="too large for the ring"):
        codec.encode(step, np.full((1, lw.config.q_dim), 1e30), x)
    with pytest.raises(ValueError, match="NaN or Inf"):
        codec.encode(step, np.full((1, lw.config.q_dim), np.nan), x)


def _gf2_rank(bits: np.ndarray) -> int:
    """Rank over GF(2) of a 0/1 matrix (rows as vectors)."""
    m = np.packbits(bits.astype(np.uint8), axis=1)
    rank, rows = 0, list(m)
    ncols = bits.shape[1]
    for col in range(ncols):
        byte, bit = divmod(col, 8)
        mask = np.uint8(0x80 >> bit)
        pivot = next((i for i in range(rank, len(rows)) if rows[i][byte] & mask), None)
        if pivot is None:
            continue
        rows[rank], rows[pivot] = rows[pivot], rows[rank]
        for i in range(len(rows)):
            if i != rank and rows[i][byte] & mask:
                rows[i] = rows[i] ^ rows[rank]
        rank += 1
    return rank


# n uniformly random rows of width w are linearly dependent over GF(2) with probability below
# 2^(n - w): the rank check takes at most w - GF2_MARGIN rows, so fresh pads fail it with
# probability below 2^-30 (a margin of 8 failed about one run in 256).
GF2_MARGIN = 30


def _assert_fresh(pads: list[np.ndarray]) -> None:
    """No two pad rows equal, and none a combination of others: the low bits of the rows (the
    low bit of Σ α_i b_i is Σ (α_i mod 2)(b_i mod 2)) are independent over GF(2), which a pad
    made from a reused basis of k vectors cannot be beyond k rows (arXiv 2602.11088); checked
    on up to w - GF2_MARGIN rows, so a reused basis of fewer vectors than that is caught."""
    by_width: dict[int, list[np.ndarray]] = {}
    for p in pads:
        by_width.setdefault(p.shape[-1], []).append(p.reshape(-1, p.shape[-1]))
    for width, parts in by_width.items():
        rows = np.concatenate(parts)
        assert len({r.tobytes() for r in rows}) == len(rows), f"a pad of width {width} was reused"
        sample = rows[: width - GF2_MARGIN]
        assert _gf2_rank(sample & 1) == len(sample), f"pads of width {width} are linearly dependent"


def test_the_freshness_check_catches_a_reused_basis():
    """Pads made as random combinations of a few fixed vectors (the reused-basis flaw) fail
    the check; fresh uniform pads of the same shape pass it."""
    rng = np.random.default_rng(0)
    full = np.iinfo(np.int64)
    basis = rng.integers(full.min, full.max, (4, 64), dtype=np.int64, endpoint=True)
    reused = rng.integers(0, 1 << 20, (30, 4)) @ basis  # int64 sums wrap modulo 2^64, as the ring
    with pytest.raises(AssertionError, match="linearly dependent"):
        _assert_fresh([reused])
    _assert_fresh([rng.integers(full.min, full.max, (30, 64), dtype=np.int64, endpoint=True)])


@pytest.mark.parametrize("plan", PRIVATE)
def test_no_two_requests_in_a_run_share_a_pad(ckpt, plan):
    """Every pad (private-otp) and every share (private-2party) of a whole generation is fresh
    and uniform: no row is repeated across requests and steps, and the rows are independent."""
    handlers = [build_service(ckpt, "cpu", "float32", progress=False)[0] for _ in range(2)]
    from recording import Recorder

    recorders = [Recorder(h) for h in handlers]
    model = private_model(ckpt, plan, recorders, pool_depth=4)
    pads: list[np.ndarray] = []
    if plan == "private-otp":
        real_take = model.gpu.pool.take

        def take(index, n):
            pad = real_take(index, n)
            pads.extend(p for p in pad._parts[:2] if p is not None)  # r_a, r_x
            return pad

        model.gpu.pool.take = take
    try:
        Generator(model, eos_token_ids=set()).generate(
            [3, 1, 4, 1, 5, 9, 2, 6], SamplingParams(max_new_tokens=6)
        )
    finally:
        model.gpu.close()
    sent = [t for r in recorders for h, ts in r.requests if h["op"] in protocol.RING_OPS for t in ts]
    L = model.config.num_layers
    assert len([1 for h, _ in recorders[0].requests if h["op"] in protocol.RING_OPS]) == 6 * (2 * L + 1)
    if plan == "private-otp":
        assert sum(p.size for p in pads) == sum(t.size for t in sent)
        _assert_fresh(pads)
    else:
        b = [t for h, ts in recorders[1].requests if h["op"] in protocol.RING_OPS for t in ts]
        _assert_fresh(b)  # server b receives the shares r themselves
    _assert_fresh(sent)  # and what either server sees never repeats


def test_a_pad_is_used_exactly_once_and_unblinds_with_the_servers_integers(ckpt):
    lw = load_local_weights(ckpt)
    sites = RingSites(lw, 16, "float32", keep_q=True)
    steps = ring_steps(lw.config)
    pool = PadPool(sites, steps, depth=4, chunk=2)
    try:
        step = steps[1]  # o_proj, then gate|up
        pad = pool.take(step.index, 3)
        r_a, r_x, u, v = pad.consume()
        q1, q2 = sites[step.first].q.astype(np.int64), sites[step.second].q.astype(np.int64)
        assert np.array_equal(u, r_a @ q1.T)  # numpy's int64 products wrap modulo 2^64
        assert np.array_equal(v, (r_x + u * sites[step.first].mult) @ q2.T)
        with pytest.raises(PadReuseError):
            pad.consume()
        rows = np.concatenate([pool.take(2, 4).consume()[1] for _ in range(10)])
        assert len({row.tobytes() for row in rows}) == 40
        assert pool.stats()["tokens_made"] > 0 and pool.stats()["weights_bytes"] > 0
    finally:
        pool.close()


def test_the_model_consumes_every_pad_it_takes(ckpt):
    model = private_model(ckpt, "private-otp")
    taken = []
    real_take = model.gpu.pool.take

    def take(index, n):
        pad = real_take(index, n)
        taken.append(pad)
        return pad

    model.gpu.pool.take = take
    try:
        model.forward(np.array([[1, 2, 3]]), model.new_cache())
        assert len(taken) == 2 * model.config.num_layers + 1
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
def test_private_plans_match_v2_merged_on_every_family(tmp_path, variant):
    """int16 weights: within 2e-3 of v2-merged's float logits; int8 within 0.2; and both plans
    give bit-identical logits (the ring products are exact, the masks cancel exactly)."""
    family, overrides = VARIANTS[variant]
    path = make_checkpoint(tmp_path, family, **overrides)
    ids = np.random.default_rng(1).integers(0, 128, 18).tolist()
    want = split_stepwise_logits(local_model(path, "v2-merged"), ids, n_prefill=12)
    for weights, tol in (("int16", 2e-3), ("int8", 0.2)):
        got = {}
        for plan in PRIVATE:
            model = private_model(path, plan, weights=weights)
            try:
                got[plan] = split_stepwise_logits(model, ids, n_prefill=12)
            finally:
                model.gpu.close()
        for step, (g, w) in enumerate(zip(got["private-otp"], want, strict=True)):
            err = float(np.abs(g - w).max())
            assert err <= tol, f"{weights} step {step}: max |logit diff| {err:.2e}"
        for a, b in zip(got["private-otp"], got["private-2party"], strict=True):
            assert np.array_equal(a, b)


def test_a_bfloat16_server_serves_the_private_plans(ckpt):
    """The server quantizes from the bfloat16 weights it loaded; the trusted side rounds its
    float32 checkpoint the same way, so the integers agree and the logits are those of the
    bfloat16-rounded weights: close to float32 v2-merged, and bit-identical across plans."""
    ids = [5, 9, 2, 7, 1, 3, 8]
    want = split_stepwise_logits(local_model(ckpt, "v2-merged"), ids, n_prefill=5)
    got = {}
    for plan in PRIVATE:
        model = private_model(ckpt, plan, dtype="bfloat16")
        try:
            assert model.gpu.server_setup[0]["source"] == "bfloat16"
            got[plan] = split_stepwise_logits(model, ids, n_prefill=5)
        finally:
            model.gpu.close()
    for g, w in zip(got["private-otp"], want, strict=True):
        assert float(np.abs(g - w).max()) <= 0.05
    for a, b in zip(got["private-otp"], got["private-2party"], strict=True):
        assert np.array_equal(a, b)


# ---- counts ---------------------------------------------------------------------------------
@pytest.mark.parametrize("plan", PRIVATE)
def test_round_trips_and_bytes_per_decode_token(ckpt, plan):
    """2L + 1 round trips (v2-merged's); private-2party without shares made ahead makes each of
    them to both servers. Bytes: every input and output as int64 ring elements, plus headers."""
    model = private_model(ckpt, plan, pool_depth=0 if plan == "private-2party" else 8)
    try:
        cache = model.new_cache()
        model.forward(np.array([[1, 2, 3, 4]]), cache)
        before = model.gpu.metrics.copy()
        model.forward(np.array([[5]]), cache)
        d = model.gpu.metrics - before
    finally:
        model.gpu.close()
    c = model.config
    L, E, F, V, HD = c.num_layers, c.hidden_size, c.intermediate_size, c.vocab_size, c.q_dim
    n = 2 if plan == "private-2party" else 1
    assert get_plan(plan).rpcs_per_forward(L) == 2 * L + 1
    by_op = {"RingEmbedQKV": n, "RingOGateUp": n * L, "RingDownQKV": n * (L - 1), "RingDownLMHead": n}
    assert dict(d.rpc) == by_op
    qkv = c.q_dim + 2 * c.kv_dim
    payload_in = 8 * (E + L * (HD + E) + L * (F + E))
    payload_out = 8 * (qkv + L * (E + 2 * F) + (L - 1) * (E + qkv) + E + V)
    assert n * payload_in < d.bytes_to_gpu < n * (payload_in + (2 * L + 1) * 200)  # + headers
    assert n * payload_out < d.bytes_from_gpu < n * (payload_out + (2 * L + 1) * 200)


def test_2party_with_shares_made_ahead_asks_only_server_a_online(ckpt):
    """The second server's products of fresh shares are made ahead by the pad thread; a decode
    step then crosses 2L + 1 times to server a alone, with the same logits as without."""
    handlers = [build_service(ckpt, "cpu", "float32", progress=False)[0] for _ in range(2)]
    from recording import Recorder

    recorders = [Recorder(h) for h in handlers]
    logits = []
    for depth in (0, 4):
        model = private_model(ckpt, "private-2party", recorders, pool_depth=depth)
        g = model.gpu
        try:
            cache = model.new_cache()
            model.forward(np.array([[1, 2, 3, 4]]), cache)
            if depth:
                assert g.pool.wait_full(60)
                n_b = len(recorders[1].requests)
                with g.pool.hold():
                    before = g.metrics.copy()
                    logits.append(model.forward(np.array([[5]]), cache))
                    d = g.metrics - before
                assert len(recorders[1].requests) == n_b  # nothing went to server b online
                L = model.config.num_layers
                assert dict(d.rpc) == {
                    "RingEmbedQKV": 1,
                    "RingOGateUp": L,
                    "RingDownQKV": L - 1,
                    "RingDownLMHead": 1,
                }
                sh = g.share_metrics
                assert (
                    sum(sh.rpc.values()) >= 2 * L + 1
                    and sh.bytes_to_gpu > 0
                    and g.pool.stats()["tokens_made"] >= 4
                )
            else:
                logits.append(model.forward(np.array([[5]]), cache))
        finally:
            g.close()
    assert np.array_equal(logits[0], logits[1])  # exact either way


# ---- a server that keeps only integers ------------------------------------------------------
def test_a_private_only_server_keeps_only_integers_and_refuses_plain_plans(ckpt):
    handler, desc = build_service(ckpt, "cpu", "float32", progress=False, private_weights="int8")
    s = handler.service
    assert "private plans only" in desc and s.w.embed is None and s.w.layers[0].qkv_weight is None
    with pytest.raises(RemoteError) as e:
        parse_reply(
            handler.handle(
                request(1, "Linear", {"layer": 0, "module": "q_proj"}, [np.ones((1, 1, 64), np.float32)])
            ),
            "x",
        )
    assert e.value.code == "bad_args" and "--private-weights" in str(e.value)
    with pytest.raises(RemoteError, match="int8"):
        parse_reply(handler.handle(request(2, "RingSetup", {"bits": 16})), "RingSetup")
    res, _ = parse_reply(handler.handle(request(3, "RingSetup", {"bits": 8})), "RingSetup")
    c = s.config
    weights = sum(
        quant.site_shape(c, sp.site)[0] * quant.site_shape(c, sp.site)[1] for sp in quant.private_sites(c)
    )
    residual_rows = 2 * c.num_layers * c.hidden_size  # one int8 multiplier per o_proj and down_proj row
    assert res["res"]["bytes_per_weight"] == (weights + residual_rows) / weights
    ids = [4, 8, 15, 16, 23]
    want = Generator(private_model(ckpt, "private-otp", weights="int8"), eos_token_ids=set()).generate(
        ids, SamplingParams(max_new_tokens=5)
    )
    model = private_model(ckpt, "private-otp", [handler], weights="int8")
    try:
        got = Generator(model, eos_token_ids=set()).generate(ids, SamplingParams(max_new_tokens=5))
    finally:
        model.gpu.close()
    assert got.tokens == want.tokens


# ---- refusals -------------------------------------------------------------------------------
def test_refusals_name_what_to_change(ckpt):
    lw = load_local_weights(ckpt)
    h, _ = build_service(ckpt, "cpu", "float32", progress=False)
    with pytest.raises(ValueError, match="--wire-dtype bfloat16 does not apply"):
        private_gpu("private-otp", lw, [GPUClient(LocalTransport(h.handle), "bfloat16")])
    with pytest.raises(ValueError, match="two non-colluding"):
        private_gpu("private-2party", lw, [GPUClient(LocalTransport(h.handle))])
    with pytest.raises(ValueError, match="int16, int8"):
        private_gpu("private-otp", lw, [GPUClient(LocalTransport(h.handle))], weights_format="int4")
    bf16, _ = build_service(ckpt, "cpu", "bfloat16", progress=False)
    gpu = private_gpu(
        "private-2party", lw, [GPUClient(LocalTransport(h.handle)), GPUClient(LocalTransport(bf16.handle))]
    )
    with pytest.raises(ValueError, match="same --dtype"):
        TEELlamaModel(gpu, get_plan("private-2party"))
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
    c = h.service.config
    E, F, HD, L = c.hidden_size, c.intermediate_size, c.q_dim, c.num_layers
    x, a, m = random_ring((1, 2, E)), random_ring((1, 2, HD)), random_ring((1, 2, F))
    cases = [
        ("RingEmbedQKV", {"bits": 16}, [x.astype(np.float32)], "bad_tensor"),
        ("RingEmbedQKV", {"bits": 16}, [x[..., :10]], "bad_tensor"),
        ("RingEmbedQKV", {"bits": 16}, [x[0]], "bad_tensor"),
        ("RingEmbedQKV", {"bits": 16}, [x[:, :0]], "bad_tensor"),
        ("RingEmbedQKV", {"bits": 4}, [x], "bad_args"),
        ("RingEmbedQKV", {}, [x], "bad_args"),
        ("RingEmbedQKV", {"bits": 16, "layer": 0}, [x], "bad_args"),
        ("RingOGateUp", {"layer": L, "bits": 16}, [a, x], "bad_args"),
        ("RingOGateUp", {"layer": -1, "bits": 16}, [a, x], "bad_args"),
        ("RingOGateUp", {"layer": 0, "bits": 16}, [m, x], "bad_tensor"),
        ("RingOGateUp", {"layer": 0, "bits": 16}, [a, x[:, :1]], "bad_tensor"),
        ("RingOGateUp", {"layer": 0, "bits": 16}, [a], "bad_tensor"),
        ("RingOGateUp", {"layer": 0, "bits": True}, [a, x], "bad_args"),
        ("RingDownQKV", {"layer": L - 1, "bits": 16}, [m, x], "bad_args"),
        ("RingDownQKV", {"layer": 0, "bits": 16}, [m, np.zeros(x.shape, np.float16)], "bad_tensor"),
        ("RingDownLMHead", {"bits": 16}, [a, x], "bad_tensor"),
        ("RingSetup", {"bits": 7}, [], "bad_args"),
    ]
    for op, args, t, code in cases:
        with pytest.raises(RemoteError) as e:
            parse_reply(h.handle(request(1, op, args, t)), op)
        assert e.value.code == code, (op, args, e.value)
    _, (o, z) = parse_reply(h.handle(request(2, "RingOGateUp", {"layer": 0, "bits": 16}, (a, x))), "x")
    assert o.dtype == z.dtype == np.int64 and o.shape == (1, 2, E) and z.shape == (1, 2, 2 * F)
    _, (y, z) = parse_reply(h.handle(request(3, "RingDownLMHead", {"bits": 8}, (m, x))), "x")
    assert y.shape == (1, 2, E) and z.shape == (1, 2, c.vocab_size)
    assert set(protocol.RING_OPS) <= set(protocol.OPS) and "RingSetup" in protocol.OPS


def test_malformed_ring_requests_get_error_replies_never_a_crash(ckpt):
    h, _ = build_service(ckpt, "cpu", "float32", progress=False)
    rng = np.random.default_rng(0)
    ops = [*protocol.RING_OPS, "RingSetup"]
    dtypes = [np.int64, np.float32, np.float16]
    codes = set()
    for i in range(400):
        op = ops[i % len(ops)]
        n = int(rng.integers(0, 4))
        tensors = [
            np.zeros(
                tuple(int(d) for d in rng.integers(0, 130, rng.integers(1, 5))), dtypes[int(rng.integers(3))]
            )
            for _ in range(n)
        ]
        args = {"bits": int(rng.choice([8, 16, 0, -1, 32])), "layer": int(rng.integers(-3, 5))}
        if rng.random() < 0.3:
            del args["layer"]
        try:
            _, out = parse_reply(h.handle(request(i, op, args, tensors)), op)
            assert all(o.dtype == np.int64 for o in out)  # a valid request
            codes.add("ok")
        except RemoteError as e:
            assert e.code in ("bad_args", "bad_tensor", "too_large"), e
            codes.add(e.code)
    assert {"bad_args", "bad_tensor"} <= codes
    x = random_ring((1, 1, h.service.config.hidden_size))
    _, (z,) = parse_reply(h.handle(request(999, "RingEmbedQKV", {"bits": 16}, (x,))), "x")
    assert z.shape[:2] == (1, 1)  # still serving


# ---- real weights ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol(smollm2_dir):
    from test_model_smollm2 import PROMPTS

    from teesplit.tee.tokenizer import Tokenizer

    handlers = [build_service(smollm2_dir, "cpu", "float32", progress=False)[0] for _ in range(2)]
    tok = Tokenizer.from_dir(smollm2_dir)
    plain = TEELlamaModel(GPUClient(LocalTransport(handlers[0].handle)), get_plan("v2-merged"))
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS]
    want = [Generator(plain, tok).generate(ids, SamplingParams(max_new_tokens=32)).tokens for ids in prompts]
    return smollm2_dir, handlers, tok, plain, prompts, want


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["int16", "int8"])
def test_smollm2_greedy_tokens_and_logits_against_v2_merged(smol, weights):
    """int16: >= 31 of 32 greedy tokens equal v2-merged's (float) on each parity prompt of
    tests/tee/test_model_smollm2.py. int8 is measured and printed (README: 5, 5 and 28 of 32), guarded
    only against getting worse than it is."""
    path, handlers, tok, plain, prompts, want = smol
    model = private_model(path, "private-2party", handlers, weights=weights)
    try:
        same = []
        for ids, expected in zip(prompts, want, strict=True):
            got = Generator(model, tok).generate(ids, SamplingParams(max_new_tokens=32)).tokens
            assert len(expected) == 32
            same.append(sum(a == b for a, b in zip(got, expected, strict=False)))
        seq = np.array([prompts[0] + want[0]])
        ref = plain.forward(seq, plain.new_cache(), all_logits=True)
        err = float(np.abs(model.forward(seq, model.new_cache(), all_logits=True) - ref).max())
    finally:
        model.gpu.close()
    print(f"{weights}: greedy tokens equal v2-merged's {same} of 32; max |logit diff| {err:.3g}")
    if weights == "int16":
        assert min(same) >= 31, same
        assert err <= 0.05, err
    else:
        assert sum(same) >= 24 and err <= 8.0, (same, err)


# ---- reliability ----------------------------------------------------------------------------
PROMPT = [3, 17, 42, 5, 99, 7]
PARAMS = SamplingParams(max_new_tokens=24)


def _private_tokens(path, plan):
    model = private_model(path, plan)
    try:
        return Generator(model, eos_token_ids=set()).generate(PROMPT, PARAMS).tokens
    finally:
        model.gpu.close()


@pytest.mark.slow
def test_otp_generation_survives_a_server_killed_and_restarted(ckpt):
    """SIGKILL the server mid-decode and restart it: the runner resends the same masked request
    (same id, same bytes: the pad is not used twice) and the tokens equal an uninterrupted run."""
    want = _private_tokens(ckpt, "private-otp")
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
        if calls[0] == 40:
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


@pytest.mark.slow
@pytest.mark.parametrize("depth", [0, 4])
def test_2party_resends_a_lost_reply_to_one_server(ckpt, depth):
    """Server b loses two replies: online (depth 0), or to the thread making shares ahead."""
    handlers = [build_service(ckpt, "cpu", "float32", progress=False)[0] for _ in range(2)]
    want = _private_tokens(ckpt, "private-2party")
    lossy = LossyServer(handlers[1], drop={"RingOGateUp": 2}, delay={})
    a = GPUClient(LocalTransport(handlers[0].handle))
    b = GPUClient(ZmqTransport(lossy.address, timeout_s=0.5), retries=2)
    gpu = private_gpu("private-2party", load_local_weights(ckpt), [a, b], pool_depth=depth)
    model = TEELlamaModel(gpu, get_plan("private-2party"))
    try:
        result = Generator(model, eos_token_ids=set()).generate(PROMPT, PARAMS)
    finally:
        model.gpu.close()
        lossy.close()
    assert result.tokens == want
    assert gpu.retried == 2 and handlers[1].replayed == 2


def test_2party_stops_when_the_share_server_goes_away(ckpt):
    """An error of the thread making shares ahead (server b gone) is raised in the generation."""
    handlers = [build_service(ckpt, "cpu", "float32", progress=False)[0] for _ in range(2)]
    lossy = LossyServer(handlers[1], drop={}, delay={})
    a = GPUClient(LocalTransport(handlers[0].handle))
    b = GPUClient(ZmqTransport(lossy.address, timeout_s=0.5), retries=0)
    model = TEELlamaModel(
        private_gpu("private-2party", load_local_weights(ckpt), [a, b], 2), get_plan("private-2party")
    )
    lossy.drop = {op: 10**6 for op in protocol.RING_OPS}  # from now on every reply is lost
    try:
        with pytest.raises(GPUServerUnavailable):
            Generator(model, eos_token_ids=set()).generate(PROMPT, PARAMS)
    finally:
        model.gpu.close()
        lossy.close()


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
@pytest.mark.slow
def test_cli_private_plans_stats_and_refusals(smollm2_dir, tmp_path, capsys):
    import json

    from teesplit.cli import main

    base = ["generate", "--model", str(smollm2_dir), "--prompt", "Hi", "--max-new-tokens", "3"]
    stats = tmp_path / "stats.json"
    argv = [*base, "--server", "local", "--plan", "private-otp", "--private-weights", "int8"]
    assert main([*argv, "--stats", "--stats-json", str(stats)]) == 0
    err = capsys.readouterr().err
    assert "one-time pads:" in err and "ms trusted CPU per token" in err and "bytes per weight" in err
    s = json.loads(stats.read_text())
    assert s["plan"] == "private-otp" and s["pads"]["tokens_made"] > 0 and s["pads"]["peak_bytes"] > 0
    assert s["private_weights"] == "int8" and 1.0 <= s["server_private_bytes_per_weight"] < 1.001
    assert set(s["rpc"]["by_op"]) == {"RingEmbedQKV", "RingOGateUp", "RingDownQKV", "RingDownLMHead"}
    assert main([*base, "--server", "local", "--plan", "private-otp", "--wire-dtype", "float16"]) == 2
    assert "--wire-dtype float16 does not apply" in capsys.readouterr().err
    assert main([*base, "--server", "local", "--plan", "private-2party"]) == 2
    assert "--server A --server B" in capsys.readouterr().err
    assert main([*base, "--server", "local", "--server", "local", "--plan", "v2-fused"]) == 2
    assert "one GPU server" in capsys.readouterr().err
