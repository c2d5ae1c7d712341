"""GPUComputeService.write_kv: keys and values the runner computed, into a session's cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import make_checkpoint

from teesplit.launch import build_service
from teesplit.protocol import ProtocolError


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("service"), "llama")
    return build_service(path, "cpu", "float32", progress=False)[0].service


def kv(T, value=1.0, dtype=np.float32):
    return np.full((2, 2, T, 16), value, dtype)  # (B, Hkv, T, D) of the random checkpoint


def test_write_kv_stores_both_and_is_refused_whole(service):
    s = service.sessions[service.open_session(2, 32)["sid"]]
    k, v = kv(3, 1.0), kv(3, 2.0)
    service.write_kv(s, 1, k, v, np.zeros(2, np.int64))
    assert s.k_len[1].tolist() == s.v_len[1].tolist() == [3, 3]
    assert np.array_equal(s.kv_np[0, 1, :, :, :3], k) and np.array_equal(s.kv_np[1, 1, :, :, :3], v)
    bad = kv(2, 3.0)
    bad[1, 0, 1, 5] = np.nan
    with pytest.raises(ProtocolError, match="NaN"):  # good keys, bad values: neither is written
        service.write_kv(s, 1, kv(2, 5.0), bad, np.array([3, 3]))
    assert s.k_len[1].tolist() == [3, 3] and not (s.kv_np[0, 1, :, :, 3:5] == 5.0).any()
    with pytest.raises(ProtocolError, match="no gaps"):
        service.write_kv(s, 1, kv(1), kv(1), np.array([3, 4]))
    with pytest.raises(ProtocolError, match="at most 32"):
        service.write_kv(s, 1, kv(30), kv(30), np.array([3, 3]))
    with pytest.raises(ProtocolError, match="session"):
        service.write_kv(None, 1, kv(1), kv(1), np.zeros(2, np.int64))


def test_write_kv_checks_values_as_a_float16_cache_stores_them(service):
    service.dtype, old = torch.float16, service.dtype
    try:
        s = service.sessions[service.open_session(2, 32)["sid"]]
        with pytest.raises(ProtocolError, match="Inf"):  # finite in float32, Inf in float16
            service.write_kv(s, 0, kv(1, 1.0), kv(1, 1e6), np.zeros(2, np.int64))
        assert s.kv is None  # refused before the cache was even made
    finally:
        service.dtype = old


@pytest.mark.parametrize("rows", [3, 40])
def test_attention_products_of_few_rows_over_a_long_cache(rows):
    from teesplit.gpu.service import _p_v, _q_kt

    rng = np.random.default_rng(3)
    q = rng.standard_normal((3, rows, 64)).astype(np.float32)
    kv = rng.standard_normal((2, 3, 3000, 64)).astype(np.float32)
    p = rng.random((3, rows, 3000)).astype(np.float32)
    scores = _q_kt(q, kv[0])
    assert scores.shape == (3, rows, 3000) and scores.flags.c_contiguous
    np.testing.assert_allclose(scores, q @ kv[0].transpose(0, 2, 1), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(_p_v(p, kv[1]), p @ kv[1], rtol=1e-5, atol=1e-3)
