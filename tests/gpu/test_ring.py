"""gpu/ring.py: the server's int8 limb GEMMs over Z_2^64 (torch._int_mm on the CPU, the padded
CUDA layout exercised on CPU tensors, the numpy fallback) against the plain ring product, and
the merged ring steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_quant import reference, ring_arrays, weight_arrays

from teesplit import quant
from teesplit.gpu.ring import LimbWeights, RingModel, int_mm_is_exact

CPU = torch.device("cpu")


def _iw(q: np.ndarray, residual: bool = False) -> quant.IntWeights:
    n = q.shape[0]
    mult = np.arange(1, n + 1, dtype=np.int64) % (quant.RESIDUAL_STEPS + 1) + 1 if residual else None
    return quant.IntWeights(q, np.ones(n), mult)


def test_this_cpu_has_an_exact_int_mm():
    """Where this fails the server still works (numpy fallback), only slower; say so loudly."""
    assert int_mm_is_exact()


def test_int_mm_on_the_cpu_is_wrong_for_one_column_which_the_padded_layout_avoids():
    """torch 2.13's CPU _int_mm returns uninitialized memory for K = 1 (N > 1); the server
    never calls it with a K that is not a multiple of 8. If this starts passing, torch fixed it."""
    a = torch.ones((8, 1), dtype=torch.int8)
    w = torch.full((2, 1), -127, dtype=torch.int8)
    bad = not torch.equal(torch._int_mm(a, w.t()), torch.full((8, 2), -127, dtype=torch.int32))
    lw = LimbWeights(_iw(w.numpy()), CPU, exact_int_mm=True)
    x = np.full((1, 1), np.iinfo(np.int64).min, np.int64)
    assert np.array_equal(lw.matmul_np(x), reference(x, w.numpy()))
    if not bad:
        pytest.skip("torch._int_mm is right for K = 1 here")


shapes = st.sampled_from([8, 16]).flatmap(
    lambda bits: st.tuples(st.integers(1, 7), st.integers(1, 300), st.integers(1, 40)).flatmap(
        lambda s: st.tuples(ring_arrays((s[0], s[1])), weight_arrays((s[2], s[1]), bits))
    )
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shapes)
def test_every_layout_gives_the_ring_product(xq):
    x, q = xq
    want = reference(x, q)
    lw = LimbWeights(_iw(q), CPU, exact_int_mm=True)
    nl = 1 if q.dtype == np.int8 else 2
    assert lw.w.shape == (-(-q.shape[0] * nl // 8) * 8, -(-q.shape[1] // 8) * 8)  # padded to 8s
    assert np.array_equal(lw.matmul_np(x), want)  # the CPU path: numpy limbs, torch._int_mm
    # The CUDA path (at least 24 limb rows, limbs made and recombined in torch) on CPU tensors.
    assert np.array_equal(lw.matmul_t(torch.from_numpy(x)).numpy(), want)
    fallback = LimbWeights(_iw(q), CPU, exact_int_mm=False)
    assert fallback.nbytes == q.nbytes
    assert np.array_equal(fallback.matmul_np(x), want)


@pytest.mark.parametrize("bits", [8, 16])
def test_a_merged_step_is_first_product_residual_add_second_product(bits):
    rng = np.random.default_rng(bits)
    qmax = quant.QMAX[bits]
    dt = np.int16 if bits == 16 else np.int8
    E, Ka, N = 24, 40, 56
    q1 = rng.integers(-qmax, qmax + 1, (E, Ka)).astype(dt)
    q2 = rng.integers(-qmax, qmax + 1, (N, E)).astype(dt)
    first, second = _iw(q1, residual=True), _iw(q2)
    a = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, (5, Ka), dtype=np.int64)
    x = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, (5, E), dtype=np.int64)
    o_want = reference(a, q1)
    z_want = reference(x + o_want * first.mult, q2)
    spec1, spec2 = quant.SiteSpec(0, "o", None), quant.SiteSpec(0, "gate_up", 1)
    for exact, numpy_path in ((True, True), (False, True), (True, False)):  # last: the CUDA path's code
        sites = {(0, "o"): LimbWeights(first, CPU, exact), (0, "gate_up"): LimbWeights(second, CPU, exact)}
        model = RingModel(None, sites, bits, "float32", CPU)
        model.numpy_path = numpy_path
        o, z = model.step(spec1, spec2, a, x)
        assert np.array_equal(o, o_want) and np.array_equal(z, z_want)
        assert np.array_equal(model.step(None, spec2, None, x), reference(x, q2))
