"""teesplit/quant.py: the private plans' integer weights (one rule, both sides) and the exact
ring products over Z_2^64 (signed 8-bit limbs; the trusted side's float64 limb products)."""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
import pytest
import torch
from helpers import make_checkpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from teesplit import quant
from teesplit.config import ModelConfig

I64 = np.iinfo(np.int64)
# The largest hidden and intermediate sizes of the supported families' released models
# (Llama 3.1 405B: intermediate 53248; Qwen2-72B: 29568; Mistral Large 2: 28672), and the limit.
LARGE_K = (53248, 29568, quant.MAX_K)


def reference(x: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The plain ring product: numpy's int64 matmul wraps modulo 2^64."""
    return x.astype(np.int64) @ q.astype(np.int64).T


ring_values = st.one_of(
    st.sampled_from([I64.min, I64.max, -1, 0, 1, I64.min + 1, 0x7F7F7F7F7F7F7F7F, 0x7F7F7F7F7F7F7F80]),
    st.integers(I64.min, I64.max),
)


def ring_arrays(shape):
    return arrays(np.int64, shape, elements=ring_values)


def weight_arrays(shape, bits):
    qmax = quant.QMAX[bits]
    dtype = np.int16 if bits == 16 else np.int8
    return arrays(
        dtype, shape, elements=st.one_of(st.sampled_from([-qmax, qmax, 0, -1]), st.integers(-qmax, qmax))
    )


# ---- limbs ------------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(st.integers(1, 5).flatmap(lambda r: ring_arrays((r, 7))))
def test_signed_limbs_recompose_every_ring_element(x):
    d = quant.signed_limbs(x)
    assert d.dtype == np.int8 and d.shape == (8, *x.shape)
    back = sum(d[k].astype(np.int64) * np.int64(1 << (8 * k)) for k in range(8))  # wraps
    assert np.array_equal(back, x)


def test_weight_limbs_hold_int16_weights_at_their_extremes():
    qmax = quant.QMAX[16]
    q = np.array([[-qmax, qmax, 0, -1, 1, 255, -256, 128, -129]], np.int16)
    limbs = quant.weight_limbs(q).astype(np.int32)  # (2, N, K)
    assert np.array_equal(limbs[0] + 256 * limbs[1], q)
    assert limbs.min() >= -128 and limbs.max() <= 127
    with pytest.raises(quant.QuantizationError):
        quant.weight_limbs(np.array([[qmax + 1]], np.int16))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from([8, 16]).flatmap(
        lambda bits: st.tuples(st.integers(1, 9), st.integers(1, 700), st.integers(1, 40)).flatmap(
            lambda s: st.tuples(ring_arrays((s[0], s[1])), weight_arrays((s[2], s[1]), bits))
        )
    )
)
def test_recombined_limb_products_equal_the_ring_product(xq):
    """The server's arithmetic in numpy: 8 signed limbs of x times the weight limbs, one integer
    product, recombined with shifts modulo 2^64."""
    x, q = xq
    R, K = x.shape
    wl = quant.weight_limbs(q)  # (nl, N, K)
    p = quant.signed_limbs(x).reshape(8 * R, K).astype(np.int64) @ wl.reshape(-1, K).astype(np.int64).T
    assert np.abs(p).max(initial=0) < 2**31  # what an int32 accumulator holds
    got = quant.recombine(p.reshape(8, R, wl.shape[0], q.shape[0]).astype(np.int32))
    assert np.array_equal(got, reference(x, q))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from([8, 16]).flatmap(
        lambda bits: st.tuples(st.integers(1, 9), st.integers(1, 3000), st.integers(1, 1100)).flatmap(
            lambda s: st.tuples(ring_arrays((s[0], s[1])), weight_arrays((s[2], s[1]), bits))
        )
    )
)
def test_trusted_float64_limb_product_is_the_ring_product(xq):
    x, q = xq
    assert np.array_equal(quant.ring_matmul(x, q), reference(x, q))


@pytest.mark.parametrize("K", LARGE_K)
@pytest.mark.parametrize("bits", [8, 16])
def test_products_stay_exact_at_the_largest_widths_and_extremes(K, bits):
    """Every limb and weight at its extreme over the longest K: the int32 partial products and
    the float64 limb products must both stay exact."""
    qmax = quant.QMAX[bits]
    rng = np.random.default_rng(K)
    x = np.full((4, K), 0x7F7F7F7F7F7F7F80, np.int64)  # every signed limb -128
    x[1] = 0x7F7F7F7F7F7F7F7F  # every signed limb 127
    x[2] = I64.min
    x[3] = rng.integers(I64.min, I64.max, K, dtype=np.int64)
    q = np.full((4, K), -qmax, np.int16 if bits == 16 else np.int8)
    q[1] = qmax
    q[2] = -128 if bits == 16 else -127  # int16: a low limb of -128
    q[3] = rng.integers(-qmax, qmax + 1, K)
    want = reference(x, q)
    assert np.array_equal(quant.ring_matmul(x, q), want)
    d = quant.signed_limbs(x).reshape(-1, K).astype(np.int64)
    wl = quant.weight_limbs(q)
    p = d @ wl.reshape(-1, K).astype(np.int64).T
    assert np.abs(p).max() < 2**31
    assert np.array_equal(quant.recombine(p.reshape(8, 4, -1, 4).astype(np.int32)), want)


# ---- the rule -----------------------------------------------------------------------------------
def _torch_rows(w: torch.Tensor):
    return lambda a, b: w[a:b].float().numpy()


@pytest.mark.parametrize("source", quant.SOURCE_DTYPES)
@pytest.mark.parametrize("bits", [16, 8])
def test_a_server_in_any_dtype_gets_the_trusted_sides_integers(source, bits):
    """The server quantizes from the weights it loaded (torch's cast to its dtype); the trusted
    side rounds its float32 copy the same way: the integers and scales must be identical,
    ties, subnormals and large values included."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((300, 64)) * 0.05).astype(np.float32)
    w[0, :8] = [1e-40, -3e-39, 6e-8, 65504.0, 2.0**-24 * 1.5, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-11]
    w[1] = 0.0  # an all-zero row
    gain = (1 + rng.standard_normal(64) * 0.2).astype(np.float32)
    server = torch.from_numpy(w).to(getattr(torch, source))  # what `serve --dtype` loads
    trusted = quant.quantize_composite(lambda a, b: w[a:b], len(w), gain, bits, source)
    remote = quant.quantize_composite(_torch_rows(server), len(w), gain, bits, source)
    assert np.array_equal(trusted.q, remote.q) and np.array_equal(trusted.scale, remote.scale)
    t_res = quant.quantize_residual(lambda a, b: w[a:b], len(w), bits, source)
    r_res = quant.quantize_residual(_torch_rows(server), len(w), bits, source)
    assert np.array_equal(t_res.q, r_res.q) and np.array_equal(t_res.mult, r_res.mult)
    assert t_res.base == r_res.base


def test_casts_agree_with_torch_bit_for_bit():
    """The trusted side's numpy casts (ml_dtypes bfloat16, numpy float16) equal torch's on every
    float32 bit pattern class: random bits (NaN aside), halfway cases, subnormals."""
    rng = np.random.default_rng(1)
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    x = x[np.isfinite(x)]
    ties = (np.arange(1, 5000, dtype=np.uint32) << 16 | 0x8000).view(np.float32)  # bfloat16 halfway
    x = np.concatenate([x, ties, -ties, np.float32([1e-45, 5.9e-8, 6.1e-5, 65519.0, 65520.0])])
    t = torch.from_numpy(x)
    assert np.array_equal(
        x.astype(ml_dtypes.bfloat16).view(np.uint16),
        t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16),
    )
    with np.errstate(over="ignore"):  # beyond float16: Inf on both sides
        f16 = x.astype(np.float16)
    assert np.array_equal(f16.view(np.uint16), t.to(torch.float16).numpy().view(np.uint16))


def test_the_rule_scales_rows_and_keeps_the_residual_grid():
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((50, 40)) * rng.uniform(0.01, 1.0, (50, 1))).astype(np.float32)
    gain = rng.uniform(0.5, 2.0, 40).astype(np.float32)
    for bits in (16, 8):
        qmax = quant.QMAX[bits]
        c = quant.quantize_composite(lambda a, b: w[a:b], 50, gain, bits, "float32")
        f = w.astype(np.float64) * gain.astype(np.float64)
        assert np.abs(c.q).max(axis=1).tolist() == [qmax] * 50  # every row uses its whole range
        assert np.abs(c.scale[:, None] * c.q - f).max() <= 0.5 * c.scale.max() * (1 + 1e-12)
        r = quant.quantize_residual(lambda a, b: w[a:b], 50, bits, "float32")
        assert np.array_equal(r.scale, r.mult * r.base) and r.mult.min() >= 1
        assert r.mult.max() <= quant.RESIDUAL_STEPS + 1
        assert np.abs(r.q).max() <= qmax
        # each row keeps nearly its own precision: at least (m - 1)/m of its levels
        levels = np.abs(r.q).max(axis=1)
        assert (levels >= qmax * (r.mult - 1) / r.mult - 1).all()
        assert np.abs(r.scale[:, None] * r.q - w).max(axis=1).max() <= 0.5 * r.scale.max() * (1 + 1e-12)


def test_non_finite_weights_and_unknown_sources_are_refused():
    w = np.ones((2, 3), np.float32)
    w[1, 2] = np.nan
    with pytest.raises(quant.QuantizationError, match="NaN or Inf"):
        quant.quantize_residual(lambda a, b: w[a:b], 2, 16, "float32")
    big = np.full((1, 3), 1e6, np.float32)  # beyond float16: Inf on a float16 server
    with pytest.raises(quant.QuantizationError, match="NaN or Inf"):
        quant.quantize_composite(lambda a, b: big[a:b], 1, np.ones(3, np.float32), 16, "float16")
    with pytest.raises(quant.QuantizationError, match="not 'float64'"):
        quant.source_values(w, "float64")
    with pytest.raises(ValueError, match="int16, int8"):
        quant.weight_bits("int4")


def test_sites_and_steps_cover_a_forward_pass(tmp_path):
    path = make_checkpoint(tmp_path, "llama", num_hidden_layers=3)
    c = ModelConfig.from_dir(path)
    sites = quant.private_sites(c)
    assert len(sites) == 4 * 3 + 1 and sites[-1].site == quant.LM_HEAD
    assert [s.norm for s in sites if s.norm is not None] == [0, 1, 2, 3, 4, 5, 6]
    ops = [("RingEmbedQKV", 0)] + [(op, i) for i in range(3) for op in ("RingOGateUp", "RingDownQKV")]
    ops[-1] = ("RingDownLMHead", 2)
    pairs = [quant.step_sites(op, i, 3) for op, i in ops]
    used = [p for pair in pairs for p in pair if p is not None]
    assert sorted((s.layer, s.site) for s in used) == sorted((s.layer, s.site) for s in sites)
    for bad in (("RingOGateUp", 3), ("RingDownQKV", 2), ("RingDownQKV", -1), ("RingLinear", 0)):
        with pytest.raises(ValueError):
            quant.step_sites(*bad, 3)


def test_ranks_holding_columns_derive_the_whole_rows_integers():
    """Tensor parallelism (gpu/tp.py): a rank holds some input columns of each residual site
    (o_proj, down_proj) and quantizes them with the maxima of the whole rows, which `whole_rows`
    gives it (an all-reduce there): its integers are then the whole matrix's at those columns."""
    c = ModelConfig("llama", 40, 24, 36, 2, 6, 3, 4, 1e-5, 64, {"rope_type": "default"})
    world, rng = 3, np.random.default_rng(5)
    local_c = dataclasses.replace(c, num_heads=2, num_kv_heads=1, intermediate_size=12, vocab_size=14)
    full = {}
    for spec in quant.private_sites(c):
        n, k = quant.site_shape(c, spec.site)
        scale = rng.uniform(0.01, 1, (n, 1))
        full[spec.layer, spec.site] = (rng.standard_normal((n, k)) * scale).astype(np.float32)
    norms = rng.uniform(0.5, 2.0, (2 * c.num_layers + 1, c.hidden_size)).astype(np.float32)
    residual = [k for k in full if k[1] in quant.RESIDUAL_SITES]

    def shard(r: int) -> dict:  # rank r's columns of the residual sites (others: any rows)
        out = {}
        for key, w in full.items():
            n = quant.site_shape(local_c, key[1])[0]
            out[key] = np.split(w, world, axis=1)[r] if key in residual else w[:n]
        return out

    def quantized(weights: dict, whole_rows=None, config=local_c, bits=8) -> dict:
        rows_of = lambda layer, site: lambda a, b: weights[layer, site][a:b]  # noqa: E731
        sites = quant.quantize_model(config, rows_of, norms, bits, "float32", whole_rows=whole_rows)
        return {(s.layer, s.site): iw for s, iw in sites}

    for bits in (16, 8):
        whole = quantized(full, config=c, bits=bits)
        sent: list[list[np.ndarray]] = []
        for r in range(world):  # what each rank contributes to the all-reduce (max)
            quantized(shard(r), lambda m, sent=sent: sent.append(m) or m, bits=bits)
        maxima = [np.maximum.reduce(parts) for parts in zip(*sent, strict=True)]
        for r in range(world):
            got = quantized(shard(r), lambda _m, maxima=maxima: maxima, bits=bits)
            for key in residual:
                cols = np.split(np.arange(full[key].shape[1]), world)[r]
                assert np.array_equal(got[key].q, whole[key].q[:, cols]), (r, key)
                assert np.array_equal(got[key].mult, whole[key].mult) and got[key].base == whole[key].base
        alone = quantized(shard(0), bits=bits)  # a rank's own maxima: other integers
        assert any(not np.array_equal(alone[k].q, whole[k].q[:, : alone[k].q.shape[1]]) for k in residual)
    # NaN in one rank's columns: the hook is still called (every rank joins the all-reduce),
    # and the refusal comes after it
    bad, calls = shard(1), []
    bad[0, "o"] = bad[0, "o"].copy()
    bad[0, "o"][3, 2] = np.nan
    with pytest.raises(quant.QuantizationError, match="NaN or Inf"):
        quantized(bad, lambda m: calls.append(m) or m)
    assert len(calls) == 1 and np.isinf(calls[0][0][3]) and np.isfinite(np.concatenate(calls[0])).sum() > 0
