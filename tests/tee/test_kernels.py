"""The trusted side's compiled loops (tee/_kernels.c through tee/kernels.py) against numpy.

They replace numpy's passes in grouped_attention (the online softmax of a key block) and in the
SwiGLU product; their exp is their own, so they are held to numpy's results by tolerances
measured in ulps, edge cases (masks, NaN, infinities, tails shorter than a vector) included."""

import os
import platform
import subprocess
import sys

import numpy as np
import pytest

from teesplit.tee import kernels, ops

F32 = np.float32


def _cpu_has_avx2_fma() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx2" in flags and "fma" in flags


needs_kernels = pytest.mark.skipif(not kernels.available(), reason="_kernels not built for this CPU")


@pytest.mark.skipif(
    platform.machine() != "x86_64" or not _cpu_has_avx2_fma(), reason="the fast build is x86-64 AVX2"
)
def test_the_loops_are_built_and_used_on_this_machine():
    # setup.py's extension is optional: a failed build would pass silently into numpy's
    # slower passes. On a CPU that runs them, they must be there and on by default.
    assert kernels.available()
    if os.environ.get(kernels.ENV, "auto") == "auto":
        assert kernels.active() is not None


def _ulps(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    want32 = want.astype(F32)
    return np.abs(got.astype(np.float64) - want) / np.spacing(np.abs(want32)).astype(np.float64)


@needs_kernels
def test_exp_is_within_about_one_ulp_and_flushes_below_the_normal_range():
    x = -np.linspace(0, 87.29, 3_000_001, dtype=F32)
    got = x.copy()
    kernels._compiled.exp_nonpos(got)
    ulps = _ulps(got, np.exp(x.astype(np.float64)))
    assert ulps.max() <= 1.1 and ulps.mean() < 0.4
    edge = np.array([0.0, -0.0, -87.31, -100.0, -1e30, -np.inf, np.nan], F32)
    kernels._compiled.exp_nonpos(edge)
    assert edge.tolist() == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]  # NaN: the callers' business


def _numpy_step(s, hidden, m, total, first):
    """The numpy online-softmax step grouped_attention runs without the compiled loop."""
    s = s.copy()
    if hidden is not None:
        B, Hkv, R, Sk = s.shape
        Tq = hidden.shape[2]
        np.copyto(s.reshape(B, Hkv, R // Tq, Tq, Sk), -np.inf, where=hidden[:, :, None])
    m_new = np.maximum.reduce(s, axis=-1, keepdims=True)
    m_new = np.maximum(m_new, np.finfo(F32).min) if first else np.maximum(m_new, m)
    with np.errstate(all="ignore"):
        e = np.exp(s - m_new)
        if first:
            return e, m_new, e.sum(-1, keepdims=True, dtype=np.float64).astype(F32), None
        alpha = np.exp(m - m_new)
        return e, m_new, total * alpha + e.sum(-1, keepdims=True, dtype=np.float64).astype(F32), alpha


@needs_kernels
@pytest.mark.parametrize("Sk", [1, 7, 8, 37, 300])
@pytest.mark.parametrize("first", [True, False])
def test_softmax_step_matches_numpy_with_masks_and_tails(Sk, first):
    B, Hkv, G, Tq = 2, 3, 2, 5
    r = np.random.default_rng(Sk)
    s = (r.standard_normal((B, Hkv, G * Tq, Sk)) * 6).astype(F32)
    hidden = r.random((B, 1, Tq, Sk)) < 0.3
    hidden[0, 0, 1] = True  # a query that sees no key of this block
    m = (r.standard_normal((B, Hkv, G * Tq, 1)) * 6).astype(F32)
    m[0, 0, 0] = np.finfo(F32).min  # a row that saw nothing before
    total = (r.random((B, Hkv, G * Tq, 1)) * 10 + 1).astype(F32)
    want_e, want_m, want_total, want_alpha = _numpy_step(s, hidden, m, total, first)
    alpha = np.full_like(m, 7.0)
    kernels.softmax_step(s, hidden, m, total, alpha, first)
    np.testing.assert_array_equal(m, want_m)  # a max is exact
    np.testing.assert_allclose(s, want_e, rtol=3e-7, atol=1e-30)
    np.testing.assert_allclose(total, want_total, rtol=1e-6)
    if first:
        assert np.all(alpha == 7.0)  # not written
    else:
        np.testing.assert_allclose(alpha, want_alpha, rtol=3e-7, atol=1e-30)


@needs_kernels
def test_softmax_step_makes_a_row_with_nan_or_plus_inf_nan_and_leaves_the_others():
    s = np.zeros((1, 1, 4, 9), F32)
    s[0, 0, 1, 3] = np.nan
    s[0, 0, 2, 8] = np.inf  # in the tail, past the last full vector
    s[0, 0, 3, :] = -np.inf  # sees nothing: zeros, sum 0, as numpy's lowest-float max gives
    m, total, alpha = (np.zeros((1, 1, 4, 1), F32) for _ in range(3))
    kernels.softmax_step(s, None, m, total, alpha, True)
    assert np.all(s[0, 0, 0] == 1) and total[0, 0, 0, 0] == 9
    assert np.all(np.isnan(s[0, 0, 1:3])) and np.all(np.isnan(total[0, 0, 1:3]))
    assert np.all(s[0, 0, 3] == 0) and total[0, 0, 3, 0] == 0


@needs_kernels
def test_wrappers_refuse_what_the_loops_would_misread():
    s = np.zeros((1, 1, 4, 8), F32)
    m = np.zeros((1, 1, 4, 1), F32)
    with pytest.raises(ValueError, match="float32"):
        kernels.softmax_step(s.astype(np.float64), None, m, m.copy(), m.copy(), True)
    with pytest.raises(ValueError, match="C-contiguous"):
        kernels.softmax_step(s[..., ::2], None, m, m.copy(), m.copy(), True)
    with pytest.raises(ValueError, match="softmax_step"):
        kernels.softmax_step(s, None, m[:, :, :2], m[:, :, :2].copy(), m[:, :, :2].copy(), True)
    with pytest.raises(ValueError, match="hidden"):
        kernels.softmax_step(s, np.zeros((1, 1, 3, 8), bool), m, m.copy(), m.copy(), True)
    with pytest.raises(ValueError, match="odd"):
        kernels.swiglu(np.zeros((2, 5), F32), None)
    with pytest.raises(ValueError, match="bias"):
        kernels.swiglu(np.zeros((2, 8), F32), None, bias=np.zeros(4, F32))
    # The module checks the buffers' lengths itself: a raw call with a wrong count raises.
    with pytest.raises(ValueError, match="expected"):
        kernels._compiled.softmax_step(s, None, m, m.copy(), m.copy(), 8, 4, 4, 8, True)
    with pytest.raises(ValueError, match="expected"):
        kernels._compiled.swiglu(np.zeros(4, F32), np.zeros(8, F32), np.zeros(8, F32), None, None, 2, 3, 4, 1)


@needs_kernels
@pytest.mark.parametrize("F", [1, 8, 13, 96])
def test_swiglu_matches_numpy_merged_and_separate_with_extremes(F):
    r = np.random.default_rng(F)
    z = (r.standard_normal((2, 33, 2 * F)) * 8).astype(F32)
    big = np.finfo(F32).max
    flat = z.reshape(-1)
    flat[: min(9, flat.size)] = np.array([0, -0.0, 1e-8, -88.8, -104, 1e4, -1e4, big, -big], F32)[
        : min(9, flat.size)
    ]
    scale = r.random((2, 33, 1)).astype(F32)
    bias = r.standard_normal(2 * F).astype(F32)
    with kernels.use(False), np.errstate(over="ignore"):  # big * u is inf in both
        want = ops.scaled_silu_mul(scale, z, bias)
        want_plain = ops.silu_mul(z[..., :F].copy(), z[..., F:].copy())
    got = kernels.swiglu(z, None, scale, bias)
    got_plain = kernels.swiglu(z[..., :F].copy(), z[..., F:].copy())
    for g, w in ((got, want), (got_plain, want_plain)):
        assert g.shape == w.shape and g.dtype == F32
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-30)  # exp(< -87.3) = 0: subnormals flushed
    special = np.array([[np.nan, np.inf, -np.inf, 2.0, 1.0, 1.0, 1.0, np.nan]], F32)  # g | u
    with kernels.use(False), np.errstate(all="ignore"):
        want = ops.silu_mul(special[:, :4].copy(), special[:, 4:].copy())
    np.testing.assert_array_equal(kernels.swiglu(special, None), want)  # NaN, inf, NaN, NaN


def test_an_unknown_choice_in_the_environment_is_refused():
    env = {**os.environ, kernels.ENV: "fast"}
    run = subprocess.run(
        [sys.executable, "-c", "import teesplit.tee.ops"], env=env, capture_output=True, text=True
    )
    assert run.returncode != 0 and "TEESPLIT_KERNELS='fast'" in run.stderr
    env[kernels.ENV] = "numpy"
    run = subprocess.run(
        [sys.executable, "-c", "from teesplit.tee import kernels; print(kernels.active())"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0 and run.stdout.strip() == "None"


@needs_kernels
@pytest.mark.parametrize("D", [64, 10])  # 10: a half of 5 lanes, all tail
@pytest.mark.parametrize("scaled", [True, False])
def test_rope_qkv_matches_numpy_scale_bias_and_rotation(D, scaled):
    B, T, heads, rest = 2, 7, 5, 2
    r = np.random.default_rng(D)
    z = (r.standard_normal((B, T, (heads + rest) * D)) * 4).astype(F32)
    scale = r.random((B, T, 1)).astype(F32) if scaled else None
    bias = r.standard_normal((heads + rest + 3) * D).astype(F32) if scaled else None  # longer: cut
    rope = ops.RotaryEmbedding(D, {"rope_type": "default", "rope_theta": 10000.0}, 4096)
    cos, sin = rope(np.array([[3 + t for t in range(T)], [900 + t for t in range(T)]]))
    tables = cos[:, :, None], ops.rope_signed_sin(sin[:, :, None])
    with kernels.use(False):
        want_rot, want_rest = ops.rope_qkv(z, tables, heads, scale, bias)
    got_rot, got_rest = ops.rope_qkv(z, tables, heads, scale, bias)
    assert got_rot.shape == want_rot.shape == (B, T, heads, D) and got_rest.shape == (B, T, rest * D)
    np.testing.assert_array_equal(got_rot, want_rot)  # no fused multiply-adds: numpy's bits
    np.testing.assert_array_equal(got_rest, want_rest)  # the v columns: the same two roundings
    with pytest.raises(ValueError, match="rope_qkv"):
        kernels.rope_qkv(z, cos[:, :, None], tables[1], heads + rest + 1)
