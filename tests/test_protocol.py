"""The wire format: every dtype round-trips, malformed frames raise ProtocolError, and the
server-side handler answers bad requests with error replies instead of raising."""

from __future__ import annotations

import ml_dtypes
import msgpack
import numpy as np
import pytest

from teesplit.protocol import (
    DTYPES,
    PROTOCOL_VERSION,
    Limits,
    ProtocolError,
    RemoteError,
    decode,
    encode,
    error_reply,
    parse_reply,
    reply,
    request,
    validate_request,
)


@pytest.mark.parametrize("name", sorted(DTYPES))
@pytest.mark.parametrize("shape", [(0,), (3,), (2, 3), (1, 2, 3, 4, 5)])
def test_every_dtype_round_trips(name, shape):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 100).astype(DTYPES[name])
    frames = request(7, "Linear", {"layer": 0, "module": "q_proj"}, [x])
    header, (y,) = decode([bytes(f) for f in frames])
    assert header["v"] == PROTOCOL_VERSION and header["id"] == 7
    assert y.dtype == x.dtype and y.shape == x.shape
    assert y.tobytes() == x.tobytes()


def test_bfloat16_is_the_ml_dtypes_type():
    x = np.array([1.5, -2.25, 3e38], dtype=ml_dtypes.bfloat16)
    _, (y,) = decode(encode({"id": 1}, [x]))
    assert y.dtype == ml_dtypes.bfloat16 and np.array_equal(y.astype(np.float32), x.astype(np.float32))


def test_non_contiguous_arrays_are_sent_in_logical_order():
    x = np.arange(12, dtype=np.float32).reshape(3, 4).T
    _, (y,) = decode(encode({"id": 1}, [x]))
    assert np.array_equal(y, x)


def test_unsupported_dtype_cannot_be_sent():
    with pytest.raises(ProtocolError, match="not allowed"):
        encode({"id": 1}, [np.zeros(3, np.float64)])


def _frames(header: dict, *tensors: bytes) -> list[bytes]:
    return [msgpack.packb(header), *tensors]


GOOD = {"v": PROTOCOL_VERSION, "id": 1, "op": "Matmul", "args": {}, "t": [["float32", [2, 2]]]}


@pytest.mark.parametrize(
    "frames, match",
    [
        ([], "empty"),
        ([b"\xc1garbage"], "msgpack"),
        ([msgpack.packb([1, 2, 3])], "map"),
        (_frames({**GOOD, "v": 99}, bytes(16)), "version"),
        (_frames({**GOOD, "t": "x"}, bytes(16)), "list"),
        (_frames(GOOD), "1 tensors but 0 frames"),
        (_frames(GOOD, bytes(16), bytes(16)), "1 tensors but 2 frames"),
        (_frames({**GOOD, "t": [["float64", [2, 2]]]}, bytes(32)), "dtype"),
        (_frames({**GOOD, "t": [["float32", [2, -2]]]}, bytes(16)), "non-negative"),
        (_frames({**GOOD, "t": [["float32", [2.0, 2]]]}, bytes(16)), "non-negative"),
        (_frames({**GOOD, "t": [["float32", [1] * 9]]}, bytes(4)), "rank"),
        (_frames({**GOOD, "t": [["float32", [2, 2]]]}, bytes(15)), "needs 16"),
        (_frames({**GOOD, "t": [["float32", [2**40, 2**40]]]}, bytes(16)), "exceed"),
        (_frames({**GOOD, "t": [["float32"]]}, bytes(16)), "descriptor"),
        ([b"\x00" * (Limits().max_header_bytes + 1)], "exceeds"),
    ],
)
def test_malformed_frames_raise_protocol_error(frames, match):
    with pytest.raises(ProtocolError, match=match):
        decode(frames)


@pytest.mark.parametrize(
    "header, n_tensors, match",
    [
        ({"id": -1, "op": "Ping"}, 0, "request id"),
        ({"id": "1", "op": "Ping"}, 0, "request id"),
        ({"id": 1, "op": "Forward"}, 0, "unknown operation"),
        ({"id": 1, "op": "Linear", "args": {"layer": 0}}, 1, "missing argument 'module'"),
        ({"id": 1, "op": "Linear", "args": {"layer": True, "module": "q_proj"}}, 1, "must be int"),
        ({"id": 1, "op": "Linear", "args": {"layer": 0, "module": "q_proj", "x": 1}}, 1, "unexpected"),
        ({"id": 1, "op": "Linear", "args": []}, 1, "map"),
        ({"id": 1, "op": "Matmul"}, 1, "takes 2 tensors"),
    ],
)
def test_request_schema_is_validated(header, n_tensors, match):
    with pytest.raises(ProtocolError, match=match):
        validate_request(header, [np.zeros(1, np.float32)] * n_tensors)


def test_error_reply_raises_remote_error_with_code():
    with pytest.raises(RemoteError) as e:
        parse_reply(error_reply(3, "bad_args", "layer 99 out of range"), "Linear")
    assert e.value.code == "bad_args" and "layer 99" in str(e.value) and e.value.op == "Linear"


def test_reply_round_trip():
    header, (y,) = parse_reply(reply(5, {"k": 1}, [np.ones((1, 2), np.float16)], gpu_s=0.25), "LMHead")
    assert header["res"] == {"k": 1} and header["gpu_s"] == 0.25 and y.dtype == np.float16
