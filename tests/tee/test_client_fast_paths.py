"""The runner's per-token fast paths give the same bits as the plain code they replaced.

tee/ops.py calls ufuncs in place, tee/model.py rotates q and k in one pass, and the wire
codec keeps a msgpack Packer per thread and byte views made the cheap way. These tests hold
each of them to the plain numpy expression (or msgpack call) it stands for, bit for bit, on
ordinary and extreme values, and check that no op writes into its inputs (a verifying client
keeps the arrays it sent and received until it checks them)."""

from __future__ import annotations

import threading

import ml_dtypes
import msgpack
import numpy as np
import pytest

from teesplit.protocol import DTYPES, PROTOCOL_VERSION, ProtocolError, encode, reply, request, tensor_frame
from teesplit.tee import kernels, ops
from teesplit.tee.client import GPUClient

F32 = np.float32


# --- the plain expressions the ops replaced (teesplit before the fast paths) -----------------------


def plain_rms_scale(x, eps):
    return F32(1) / np.sqrt(np.mean(np.square(x), axis=-1, keepdims=True) + F32(eps))


def plain_rms_norm(x, w, eps):
    return w * (x * plain_rms_scale(x, eps))


def plain_silu(x):
    with np.errstate(under="ignore"):
        e = np.exp(-np.abs(x))
    return np.where(x >= 0, x, x * e) / (F32(1) + e)


def plain_softmax(x, axis=-1):
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(m == -np.inf, F32(0), m)
    with np.errstate(under="ignore"):
        e = np.exp(x - m)
    s = np.sum(e, axis=axis, keepdims=True)
    return e / np.where(s == 0, F32(1), s)


def plain_apply_rope(q, k, cos, sin):
    cos, sin = cos[:, None], sin[:, None]
    return q * cos + ops.rotate_half(q) * sin, k * cos + ops.rotate_half(k) * sin


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal shapes and dtypes and, NaN for NaN, the same values (-0.0 is not 0.0)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    bits_a, bits_b = a.view(np.uint32), b.view(np.uint32)
    return bool(np.array_equal(nan_a, nan_b) and np.array_equal(bits_a[~nan_a], bits_b[~nan_b]))


EXTREMES = np.array(
    [
        0.0,
        -0.0,
        1e-45,
        -1e-45,
        1e-30,
        -1e-30,
        1,
        -1,
        20,
        -20,
        88.8,
        -88.8,
        104,
        -104,
        1e30,
        -1e30,
        3.4e38,
        -3.4e38,
    ],
    F32,
)


def values(seed: int, shape: tuple[int, ...], scale: float = 10.0, extremes: bool = True) -> np.ndarray:
    x = (np.random.default_rng(seed).standard_normal(shape) * scale).astype(F32)
    if extremes:
        flat = x.reshape(-1)
        flat[: min(len(EXTREMES), flat.size)] = EXTREMES[: flat.size]
    return x


def read_only(x: np.ndarray) -> np.ndarray:
    """x as a read-only array, like a decoded reply: an op that writes into it raises."""
    y = np.array(x, copy=True)
    y.flags.writeable = False
    return y


# --- ops ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1, 576), (2, 7, 64), (3, 960), (5,)])
@pytest.mark.parametrize("scale", [1e-20, 1e-3, 1.0, 1e3, 1e18])
def test_rms_ops_match_the_plain_expressions_bit_for_bit(shape, scale):
    x = read_only(values(1, shape, scale, extremes=False))
    w = read_only(values(2, shape[-1:], 1.0, extremes=False))
    for eps in (1e-6, 9.999999747378752e-06):
        assert same_bits(ops.rms_scale(x, eps), plain_rms_scale(x, eps))
        assert same_bits(ops.rms_norm(x, w, eps), plain_rms_norm(x, w, eps))


def test_rms_mean_in_float32_equals_numpy_mean_over_a_whole_binade():
    """np.mean divides the float32 sum by an intp count in float64; one float32 division gives
    the same bits (float64 is wide enough for the double rounding to be innocuous)."""
    sums = (np.arange(1 << 23, dtype=np.uint32) | np.uint32(0x3F800000)).view(F32)  # every [1, 2) float
    for n in (3, 576, 768, 896, 2048, 4096, 5120):
        want = sums.copy()
        np.true_divide(want, np.intp(n), out=want, casting="unsafe")
        assert np.array_equal((sums / F32(n)).view(np.uint32), want.view(np.uint32))


def test_float32_square_root_through_float64_is_numpys_over_two_binades():
    """rms_scale of one row takes the square root in float64 (math.sqrt) and rounds it: the
    same bits as float32's, checked on every float in [1, 4) (both exponent parities)."""
    v = (np.arange(1 << 24, dtype=np.uint32) + np.uint32(0x3F800000)).view(F32)
    via_float64 = np.sqrt(v.astype(np.float64)).astype(F32)
    assert np.array_equal(via_float64.view(np.uint32), np.sqrt(v).view(np.uint32))


def test_one_row_and_many_rows_take_the_same_steps():
    x = values(10, (6, 576), 3.0, extremes=False)
    many = ops.rms_scale(x, 1e-5)
    for i in range(6):
        one = ops.rms_scale(x[i : i + 1], 1e-5)
        assert one.shape == (1, 1) and same_bits(one, many[i : i + 1])


def test_silu_and_silu_mul_match_the_plain_expression_bit_for_bit():
    x = values(3, (4, 1536), 30.0)
    x.reshape(-1)[-4:] = [np.inf, -np.inf, np.nan, -0.0]
    up = read_only(values(4, (4, 1536)))
    x = read_only(x)
    with np.errstate(invalid="ignore", over="ignore"):
        assert same_bits(ops.silu(x), plain_silu(x))
        with kernels.use(False):  # numpy's passes; the compiled loop has its own exp
            assert same_bits(ops.silu_mul(x, up), plain_silu(x) * up)
        want = plain_silu(x) * up
    # The compiled loop (where built): within 1e-6 relative, NaN and infinities where numpy has them.
    # exp below -87.3 is 0 there (numpy: subnormal), so silu(g) for such g is 0, not |g e^g| < 1e-35.
    np.testing.assert_allclose(ops.silu_mul(x, up), want, rtol=1e-6, atol=1e-30)


def test_silu_raises_no_floating_point_error_on_finite_extremes():
    big = np.array([1e-8, 1, 20, 88.8, 104, 1e3, 1e4, np.finfo(F32).max], F32)  # as in test_ops
    x = np.concatenate([-big, [0], big, values(5, (1000,), 10.0, extremes=False)]).astype(F32)
    with np.errstate(all="raise"):
        assert same_bits(ops.silu(x), plain_silu(x))


def test_softmax_matches_the_plain_expression_bit_for_bit():
    x = values(6, (2, 9, 3, 170), 8.0, extremes=False)
    x[0, 1, 2] = -np.inf  # a fully masked row: zeros
    x[1, 2, 0, :100] = -np.inf
    x[1, 3, 1, 5] = np.nan
    x[1, 4, 1, 7] = np.inf
    x[0, 5, 0, :3] = [-1e4, -200.0, -3.4e38]
    x = read_only(x)
    with np.errstate(invalid="ignore"):
        for axis in (-1, 0, 2):
            assert same_bits(ops.softmax(x, axis=axis), plain_softmax(x, axis=axis))


def test_scaled_softmax_is_softmax_of_scaled_and_masked_scores():
    scores = read_only(values(7, (2, 9, 4, 12), 30.0, extremes=False))
    scale = F32(64**-0.5)
    hidden = np.triu(np.ones((4, 12), bool), 9)
    hidden[3] = True  # a query that may see nothing
    mask = read_only(np.where(hidden, F32(-np.inf), F32(0))[None, None])
    assert same_bits(ops.scaled_softmax(scores, scale, None), plain_softmax(scores * scale))
    assert same_bits(ops.scaled_softmax(scores, scale, mask), plain_softmax(scores * scale + mask))


def test_rope_matches_rotate_half_bit_for_bit():
    B, T, H, Hkv, D = 2, 5, 9, 3, 64
    positions = np.array([[0, 1, 2, 3, 4], [130, 131, 132, 133, 134]])
    cos, sin = ops.RotaryEmbedding(D, {"rope_type": "default", "rope_theta": 1e5}, 8192)(positions)
    q = read_only(values(8, (B, H, T, D), 3.0))
    k = read_only(values(9, (B, Hkv, T, D), 3.0))
    with np.errstate(invalid="ignore", over="ignore"):
        got_q, got_k = ops.apply_rope(q, k, cos, sin)
        want_q, want_k = plain_apply_rope(q, k, cos, sin)
        assert same_bits(got_q, want_q) and same_bits(got_k, want_k)
        # The model's layout: q|k as the projection returns it, (B, T, heads, D), all heads at once.
        qk = read_only(np.concatenate([q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3)], axis=2))
        rotated = ops.rope_rotate(qk, cos[:, :, None], ops.rope_signed_sin(sin[:, :, None]))
        assert same_bits(rotated[:, :, :H].transpose(0, 2, 1, 3), want_q)
        assert same_bits(rotated[:, :, H:].transpose(0, 2, 1, 3), want_k)


# --- the wire codec -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DTYPES))
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 0, 4), (1, 9, 1, 64)])
def test_tensor_frames_are_the_array_bytes(name, shape):
    x = (np.random.default_rng(0).standard_normal(shape) * 100).astype(DTYPES[name])
    for a in (x, x.T):  # transposed: not contiguous unless trivially so
        frame = tensor_frame(a)
        assert frame.format == "B" and frame.ndim == 1
        assert bytes(frame) == np.ascontiguousarray(a).tobytes()


def test_encoded_header_is_the_msgpack_of_the_header():
    x, pos = np.ones((1, 1, 576), F32), np.array([5], np.int64)
    frames = request(12345, "QKV", {"layer": 3}, (x, pos), 7)
    want = {"id": 12345, "op": "QKV", "sid": 7, "args": {"layer": 3}, "v": PROTOCOL_VERSION}
    want["t"] = [["float32", [1, 1, 576]], ["int64", [1]]]
    assert frames[0] == msgpack.packb(want, use_bin_type=True)
    rep = reply(9, {"sid": 3}, [x.astype(ml_dtypes.bfloat16)], 0.25)
    want = {"id": 9, "ok": True, "res": {"sid": 3}, "gpu_s": 0.25, "v": PROTOCOL_VERSION}
    want["t"] = [["bfloat16", [1, 1, 576]]]
    assert rep[0] == msgpack.packb(want, use_bin_type=True)


def test_a_header_that_fails_to_pack_leaves_the_next_one_intact():
    with pytest.raises(TypeError):
        encode({"id": 1, "args": {"x": object()}})
    assert encode({"id": 2})[0] == msgpack.packb({"id": 2, "v": PROTOCOL_VERSION, "t": []}, use_bin_type=True)


def test_a_dtype_not_allowed_is_a_protocol_error_even_for_objects():
    for bad in (np.zeros(3, np.float64), np.array([None, 1], dtype=object)):
        with pytest.raises(ProtocolError, match="not allowed"):
            encode({"id": 1}, [bad])


def test_threads_encode_at_once_without_mixing_headers():
    errors = []

    def work(n: int) -> None:
        for i in range(300):
            header = {"id": n * 1000 + i, "op": "Ping", "args": {"pad": "x" * (n * 7 + i % 5)}}
            got = encode(header)[0]
            if got != msgpack.packb(dict(header, v=PROTOCOL_VERSION, t=[]), use_bin_type=True):
                errors.append((n, i))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


# --- the client's reply checks --------------------------------------------------------------------


class OneReply:
    """A transport that answers the next request with the given tensors (and `ok`)."""

    address = "test"
    timeout_s = 5.0

    def __init__(self, *tensors):
        self.tensors = tensors
        self.sent: list[list] = []

    def send(self, frames):
        self.sent.append(frames)

    def recv(self, timeout_s=None):
        rid = msgpack.unpackb(bytes(self.sent[-1][0]))["id"]
        return [bytes(f) for f in reply(rid, {}, self.tensors, 0.001)]

    def close(self):
        pass


def client(*tensors) -> GPUClient:
    c = GPUClient(OneReply(*tensors))
    c.config = type("Config", (), {"hidden_size": 4, "intermediate_size": 3, "vocab_size": 10})()
    return c


def test_replies_of_the_wrong_shape_count_or_dtype_are_refused():
    x, ids = np.ones((1, 1, 4), F32), np.zeros((1, 1), np.int64)
    for bad in [(np.ones((1, 1, 5), F32),), (), (x, x), (np.ones((1, 1, 4), np.int64),)]:
        with pytest.raises(ProtocolError, match="expected"):
            client(*bad)._call_many("Embedding", {}, (ids,), [(1, 1, 4)])
    with pytest.raises(ProtocolError, match="expected"):  # the second of two has the wrong shape
        client(x, np.ones((1, 1, 3), F32))._call_many("EmbedQKV", {}, (ids,), [(1, 1, 4), (1, 1, 2)])


def test_float16_and_bfloat16_replies_are_widened_to_float32():
    x = np.arange(4, dtype=F32).reshape(1, 1, 4)
    for dt in (np.float16, ml_dtypes.bfloat16):
        (y,) = client(x.astype(dt))._call_many("Embedding", {}, (np.zeros((1, 1), np.int64),), [(1, 1, 4)])
        assert y.dtype == F32 and np.array_equal(y, x)


def test_float32_replies_come_back_as_decoded_and_metered():
    x = np.arange(4, dtype=F32).reshape(1, 1, 4)
    c = client(x)
    ids = np.zeros((1, 1), np.int64)
    (y,) = c._call_many("Embedding", {}, (ids,), [(1, 1, 4)])
    assert y.dtype == F32 and np.array_equal(y, x) and not y.flags.writeable
    sent = sum(len(f) for f in c.transport.sent[-1])
    got = sum(len(f) for f in c.transport.recv())
    assert (c.metrics.bytes_to_gpu, c.metrics.bytes_from_gpu, c.metrics.rpc["Embedding"]) == (sent, got, 1)
