"""The GPU server's request handler: a bad request gets an error reply with a stable code,
never an exception, and the next good request is still served correctly."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from helpers import make_checkpoint

from teesplit.launch import build_service
from teesplit.protocol import PROTOCOL_VERSION, RemoteError, parse_reply, request


@pytest.fixture(scope="module")
def handler(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("srv"), "llama")
    h, _ = build_service(path, "cpu", "float32", progress=False)
    return h


def call(handler, op, args=None, tensors=()):
    return parse_reply(handler.handle(request(1, op, args, tensors)), op)


f32 = np.float32
BAD = [
    ("Linear", {"layer": 2, "module": "q_proj"}, [np.zeros((1, 1, 64), f32)], "bad_args", "out of range"),
    ("Linear", {"layer": -1, "module": "q_proj"}, [np.zeros((1, 1, 64), f32)], "bad_args", "out of range"),
    ("Linear", {"layer": 0, "module": "lm_head"}, [np.zeros((1, 1, 64), f32)], "bad_args", "unknown module"),
    ("Linear", {"layer": 0, "module": "q_proj"}, [np.zeros((1, 1, 63), f32)], "bad_tensor", "expected shape"),
    ("Linear", {"layer": 0, "module": "q_proj"}, [np.zeros((1, 64), f32)], "bad_tensor", "expected shape"),
    ("Linear", {"layer": 0, "module": "q_proj"}, [np.zeros((1, 1, 64), np.int64)], "bad_tensor", "float"),
    ("Linear", {"layer": 0, "module": "q_proj"}, [np.zeros((0, 1, 64), f32)], "bad_tensor", "empty"),
    ("Embedding", {}, [np.array([[1, 128]])], "bad_args", "token ids"),
    ("Embedding", {}, [np.array([[-1]])], "bad_args", "token ids"),
    ("Embedding", {}, [np.array([[1.0]], f32)], "bad_tensor", "int64"),
    ("Embedding", {"dtype": "int64"}, [np.array([[1]])], "bad_args", "dtype"),
    ("Matmul", {}, [np.zeros((2, 3), f32), np.zeros((4, 5), f32)], "bad_tensor", "do not multiply"),
    ("Matmul", {}, [np.zeros((3,), f32), np.zeros((3,), f32)], "bad_tensor", "rank"),
    ("Matmul", {}, [np.zeros((2, 3), f32), np.zeros((3, 2), np.float16)], "bad_tensor", "differ"),
    ("Matmul", {}, [np.zeros((1, 20000), f32), np.zeros((20000, 20000), f32)[:, :1].copy()], None, None),
    ("LMHead", {}, [np.zeros((1, 1, 65), f32)], "bad_tensor", "expected shape"),
]


@pytest.mark.parametrize("op, args, tensors, code, match", BAD)
def test_bad_requests_get_error_replies(handler, op, args, tensors, code, match):
    if code is None:  # a valid request in the same table: must succeed
        call(handler, op, args, tensors)
        return
    with pytest.raises(RemoteError) as e:
        call(handler, op, args, tensors)
    assert e.value.code == code and match in str(e.value)


def test_result_size_is_capped_before_allocation(handler):
    a = np.zeros((20000, 1), f32)
    with pytest.raises(RemoteError) as e:
        call(handler, "Matmul", {}, [a, np.zeros((1, 20000), f32)])
    assert e.value.code == "too_large"


@pytest.mark.parametrize(
    "frames",
    [
        [b"garbage"],
        [msgpack.packb({"v": PROTOCOL_VERSION + 1, "id": 4, "op": "Ping"})],
        [msgpack.packb({"v": PROTOCOL_VERSION, "id": 4, "op": "Ping", "t": [["float32", [1]]]})],
        [],
    ],
)
def test_garbage_gets_error_and_server_keeps_serving(handler, frames):
    with pytest.raises(RemoteError):
        parse_reply(handler.handle(frames), "?")
    _, (y,) = call(handler, "Linear", {"layer": 1, "module": "down_proj"}, [np.ones((1, 2, 96), f32)])
    assert y.shape == (1, 2, 64) and np.isfinite(y).all()


def test_init_returns_config_rope_and_norms(handler):
    header, (norms,) = call(handler, "Init")
    res = header["res"]
    assert res["config"]["num_layers"] == 2 and res["rope"]["rope_type"] == "default"
    assert norms.shape == (5, 64) and norms.dtype == f32


@pytest.mark.parametrize("wire", ["float16", "bfloat16"])
def test_reply_comes_back_in_request_dtype(handler, wire):
    from teesplit.protocol import DTYPES

    x = np.ones((1, 1, 64), DTYPES[wire])
    _, (y,) = call(handler, "Linear", {"layer": 0, "module": "k_proj"}, [x])
    assert y.dtype == DTYPES[wire] and y.shape == (1, 1, 32)


def test_server_threads_also_limit_numpy_blas(tmp_path):
    """--threads N holds numpy's BLAS (the CPU attention products) to N threads, as torch."""
    import torch

    from teesplit.blas import _openblas, blas_threads

    funcs = _openblas()
    if funcs is None:
        pytest.skip("numpy here has no OpenBLAS")
    torch_threads = torch.get_num_threads()
    try:
        with blas_threads(2):
            build_service(make_checkpoint(tmp_path, "llama"), "cpu", "float32", threads=1, progress=False)
            assert funcs[1]() == 1
    finally:
        torch.set_num_threads(torch_threads)
