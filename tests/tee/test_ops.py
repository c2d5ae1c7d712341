"""teesplit.tee.ops against the transformers / torch reference it reimplements in numpy."""

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers import LlamaConfig  # noqa: E402
from transformers.models.llama import modeling_llama as hf  # noqa: E402

from teesplit.tee import kernels, ops  # noqa: E402

ATOL = 1e-5


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def t(x: np.ndarray) -> "torch.Tensor":
    return torch.from_numpy(np.ascontiguousarray(x))


# --- element-wise and reshaping ops ----------------------------------------------------------------


@pytest.mark.parametrize("eps", [1e-6, 1e-5])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_rms_norm_matches_llama_rms_norm(eps, scale):
    x = (rng(1).standard_normal((2, 5, 64)) * scale).astype(np.float32)
    w = rng(2).standard_normal(64).astype(np.float32)
    ref = hf.LlamaRMSNorm(64, eps=eps)
    with torch.no_grad():
        ref.weight.copy_(t(w))
        expected = ref(t(x)).numpy()
    got = ops.rms_norm(x, w, eps)
    assert got.dtype == np.float32 and got.shape == x.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=ATOL)


def test_silu_matches_torch_including_extremes():
    big = np.finfo(np.float32).max
    extremes = np.array([1e-8, 1, 20, 88.8, 104, 1e3, 1e4, big])
    extremes = np.concatenate([-extremes, [0], extremes])
    x = np.concatenate([extremes, rng(3).standard_normal(1000) * 10]).astype(np.float32)
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        got = ops.silu(x)
    expected = torch.nn.functional.silu(t(x)).numpy()
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_softmax_matches_torch_with_causal_mask():
    x = (rng(4).standard_normal((2, 3, 6, 6)) * 5).astype(np.float32)
    x = np.where(np.triu(np.ones((6, 6), bool), 1), -np.inf, x).astype(np.float32)
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        got = ops.softmax(x)
    np.testing.assert_allclose(got, torch.softmax(t(x), dim=-1).numpy(), atol=1e-6)
    y = rng(5).standard_normal((4, 7)).astype(np.float32) * 30
    np.testing.assert_allclose(ops.softmax(y, axis=0), torch.softmax(t(y), dim=0).numpy(), atol=1e-6)


def test_softmax_fully_masked_rows_are_zero_without_warnings():
    x = rng(6).standard_normal((3, 5)).astype(np.float32)
    x[1] = -np.inf
    x[2, :2] = [-1e4, -200.0]  # probabilities that underflow to 0
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        got = ops.softmax(x)
    assert np.all(got[1] == 0)
    np.testing.assert_allclose(got[[0, 2]], torch.softmax(t(x[[0, 2]]), dim=-1).numpy(), atol=1e-6)
    if hasattr(torch, "_safe_softmax"):  # the rule torch's SDPA math path uses for fully masked rows
        np.testing.assert_allclose(got, torch._safe_softmax(t(x), -1).numpy(), atol=1e-6)


@pytest.mark.parametrize("n_rep", [1, 2, 4])
def test_repeat_kv_matches_transformers(n_rep):
    x = rng(7).standard_normal((2, 3, 5, 8)).astype(np.float32)
    got = ops.repeat_kv(x, n_rep)
    assert got.shape == (2, 3 * n_rep, 5, 8)
    np.testing.assert_array_equal(got, hf.repeat_kv(t(x), n_rep).numpy())


def test_rotate_half_and_apply_rope_match_transformers():
    r = rng(8)
    q = r.standard_normal((2, 4, 5, 16)).astype(np.float32)
    k = r.standard_normal((2, 2, 5, 16)).astype(np.float32)
    positions = np.array([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]], dtype=np.int64)
    cos, sin = ops.RotaryEmbedding(16, {"rope_type": "default", "rope_theta": 10000.0}, 64)(positions)
    np.testing.assert_array_equal(ops.rotate_half(q), hf.rotate_half(t(q)).numpy())
    got_q, got_k = ops.apply_rope(q, k, cos, sin)
    exp_q, exp_k = hf.apply_rotary_pos_emb(t(q), t(k), t(cos), t(sin), unsqueeze_dim=1)
    np.testing.assert_allclose(got_q, exp_q.numpy(), atol=ATOL)
    np.testing.assert_allclose(got_k, exp_k.numpy(), atol=ATOL)


# --- rotary embeddings -----------------------------------------------------------------------------


def hf_rotary(head_dim: int, rope: dict, max_pos: int) -> "hf.LlamaRotaryEmbedding":
    config = LlamaConfig(
        hidden_size=head_dim * 4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        max_position_embeddings=max_pos,
        rope_parameters=dict(rope),
    )
    return hf.LlamaRotaryEmbedding(config)


def compare_rotary(
    ours: "ops.RotaryEmbedding",
    ref: "hf.LlamaRotaryEmbedding",
    positions: np.ndarray,
    max_ulp: int = 1,
    angle_ulps: float = 0.0,
) -> None:
    """cos/sin within 1e-5 (+ angle_ulps float32 ulps of each angle), inv_freq within max_ulp ulps."""
    cos, sin = ours(positions)
    with torch.no_grad():
        exp_cos, exp_sin = ref(torch.zeros(1, dtype=torch.float32), t(positions))
    assert cos.dtype == sin.dtype == np.float32
    assert cos.shape == sin.shape == (*positions.shape, ours.head_dim)
    np.testing.assert_array_max_ulp(ours.inv_freq, ref.inv_freq.numpy(), maxulp=max_ulp)
    assert ours.attention_scaling == pytest.approx(ref.attention_scaling, rel=1e-12)
    angle = positions[..., None] * np.concatenate([ours.inv_freq, ours.inv_freq]).astype(np.float64)
    # torch's float32 pow is not exactly rounded and its vectorized and scalar paths can differ, so
    # inv_freq may be max_ulp off from run to run; the angle inherits that, plus its own rounding.
    tolerance = ATOL + (angle_ulps + max_ulp + 1) * angle * 2.0**-23
    assert np.all(np.abs(cos - exp_cos.numpy()) <= tolerance)
    assert np.all(np.abs(sin - exp_sin.numpy()) <= tolerance)


YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128}
LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 128,
}
ROPES = {
    "default": (64, {"rope_type": "default", "rope_theta": 10000.0}, 256),
    "default-128-1e6": (128, {"rope_type": "default", "rope_theta": 1e6}, 256),
    "linear": (64, {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}, 256),
    "linear-odd-factor": (128, {"rope_type": "linear", "rope_theta": 500000.0, "factor": 2.5}, 256),
    "dynamic": (64, {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}, 256),
    "llama3": (64, LLAMA3, 1024),
    "llama3-128": (128, {**LLAMA3, "factor": 32.0, "original_max_position_embeddings": 256}, 1024),
    "yarn": (64, YARN, 512),
    "yarn-qwen": (
        128,
        {**YARN, "rope_theta": 1e6, "factor": 2.0, "original_max_position_embeddings": 256},
        512,
    ),
    "yarn-attention-factor": (64, {**YARN, "attention_factor": 0.8}, 512),
    "yarn-mscale": (64, {**YARN, "mscale": 0.9, "mscale_all_dim": 0.6}, 512),
    "yarn-betas-no-truncate": (64, {**YARN, "beta_fast": 16.0, "beta_slow": 2.0, "truncate": False}, 512),
}


@pytest.mark.parametrize("name", ROPES)
def test_rotary_matches_transformers(name):
    head_dim, rope, max_pos = ROPES[name]
    ours, ref = ops.RotaryEmbedding(head_dim, rope, max_pos), hf_rotary(head_dim, rope, max_pos)
    # Past max_position_embeddings (and any original_max_position_embeddings), ragged across the batch.
    positions = np.stack([np.arange(0, 2 * max_pos, 3), np.arange(5, 2 * max_pos + 5, 3)]).astype(np.int64)
    compare_rotary(ours, ref, positions)
    compare_rotary(ours, ref, positions[:, -1:])  # a single decode step


def test_yarn_attention_scaling_is_applied():
    head_dim, rope, max_pos = ROPES["yarn"]
    ours = ops.RotaryEmbedding(head_dim, rope, max_pos)
    assert ours.attention_scaling == pytest.approx(0.1 * np.log(4.0) + 1.0)
    cos, sin = ours(np.zeros((1, 1), np.int64))
    np.testing.assert_allclose(cos, ours.attention_scaling, rtol=1e-7)
    assert ops.RotaryEmbedding(head_dim, {**rope, "attention_factor": 0.8}, max_pos).attention_scaling == 0.8


REALISTIC = {  # (head_dim, rope, max_position_embeddings) of released checkpoints
    "llama-2": (128, {"rope_type": "default", "rope_theta": 10000.0}, 4096),
    "llama-3.1": (128, {**LLAMA3, "original_max_position_embeddings": 8192}, 131072),
    "llama-3.2-1b": (64, {**LLAMA3, "factor": 32.0, "original_max_position_embeddings": 8192}, 131072),
    "mistral": (128, {"rope_type": "default", "rope_theta": 1e6}, 32768),
    "qwen2.5-yarn": (
        128,
        {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 32768},
        131072,
    ),
}


@pytest.mark.parametrize("name", REALISTIC)
def test_rotary_matches_transformers_over_full_context(name):
    head_dim, rope, max_pos = REALISTIC[name]
    positions = np.arange(0, max_pos, 61, dtype=np.int64)[None]
    ours, ref = ops.RotaryEmbedding(head_dim, rope, max_pos), hf_rotary(head_dim, rope, max_pos)
    compare_rotary(ours, ref, positions)


def test_dynamic_rope_state_machine_matches_transformers():
    head_dim, rope, max_pos = 64, {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}, 64
    ours, ref = ops.RotaryEmbedding(head_dim, rope, max_pos), hf_rotary(head_dim, rope, max_pos)

    def steps(start: int, stop: int):
        return [np.array([[p]], np.int64) for p in range(start, stop)]

    calls = (
        [np.arange(100, dtype=np.int64)[None]]  # prefill longer than max_position_embeddings: grow
        + steps(100, 104)  # decode: grows again on every step
        + [np.arange(30, dtype=np.int64)[None]]  # a new, short prompt: reset to the original frequencies
        + steps(30, 33)
        + [np.arange(64, dtype=np.int64)[None]]  # exactly max_position_embeddings: neither grow nor reset
        + [np.arange(150, dtype=np.int64)[None]]  # grow
        + [np.array([[120]], np.int64)]  # shorter than cached but above the original: keep scaled
        + [np.stack([np.arange(10), np.arange(70, 80)]).astype(np.int64)]  # the batch max (80) counts: keep
        + [np.arange(63, dtype=np.int64)[None]]  # reset
    )
    expected_cached = [100, 101, 102, 103, 104, 64, 64, 64, 64, 64, 150, 150, 150, 64]
    for positions, cached in zip(calls, expected_cached, strict=True):
        # Regrown frequencies come from float32 pow of a fresh base, where torch (SLEEF) and the
        # correctly rounded ops._powf may differ by an ulp or two.
        compare_rotary(ours, ref, positions, max_ulp=4)
        assert ours.max_seq_len_cached == cached == int(ref.max_seq_len_cached)


def test_dynamic_rope_long_context_within_float32_angle_rounding():
    """At thousands of radians a few-ulp inv_freq difference shows up in cos/sin; the bound is a few
    float32 ulps of the angle, the size of the rounding transformers' own float32 angle carries."""
    head_dim, rope, max_pos = 128, {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}, 4096
    ours, ref = ops.RotaryEmbedding(head_dim, rope, max_pos), hf_rotary(head_dim, rope, max_pos)
    prompts = [
        np.arange(5000, dtype=np.int64)[None],
        np.array([[5000]]),
        np.array([[5001]]),
        np.arange(100, dtype=np.int64)[None],
        np.arange(12289, dtype=np.int64)[None],
    ]
    for positions in prompts:
        compare_rotary(ours, ref, positions, max_ulp=4, angle_ulps=4)
        assert ours.max_seq_len_cached == int(ref.max_seq_len_cached)


# --- blockwise attention -------------------------------------------------------------------------


def reference_attention(q, k, v, pos, window):
    """softmax(q kᵀ / sqrt(D) + mask) v with repeat_kv and a full additive mask, in float64."""
    B, H, T, D = q.shape
    G = H // k.shape[1]
    S = k.shape[2]
    k64, v64 = np.repeat(k, G, axis=1).astype(np.float64), np.repeat(v, G, axis=1).astype(np.float64)
    scores = q.astype(np.float64) @ k64.transpose(0, 1, 3, 2) * D**-0.5
    hidden = reference_hidden(pos, T, S, window)[:, None]  # (B, 1, T, S)
    scores = np.where(hidden, -np.inf, scores)
    m = scores.max(-1, keepdims=True)
    e = np.exp(scores - np.where(np.isfinite(m), m, 0))
    p = e / np.maximum(e.sum(-1, keepdims=True), 1e-300)
    return (p @ v64).transpose(0, 2, 1, 3).reshape(B, T, H * D), p


def reference_hidden(pos, T, S, window):
    q_pos = np.asarray(pos)[:, None] + np.arange(T)  # (B, T)
    k_pos = np.arange(S)
    hidden = k_pos > q_pos[:, :, None]
    if window is not None:
        hidden |= q_pos[:, :, None] - k_pos >= window
    return hidden


ATTENTION_CASES = {
    # name: (pos per row, T, window, query_block, key_block_scores)
    "prefill-one-block": ([0], 7, None, 64, 1 << 20),
    "prefill-many-blocks": ([0], 23, None, 4, 2 * 4 * 5),  # key blocks of 5 keys
    "chunk-after-cache": ([9], 13, None, 4, 2 * 4 * 3),
    "ragged-rows": ([0, 5, 11], 9, None, 4, 2 * 4 * 4),
    "decode-ragged": ([3, 17, 9], 1, None, 64, 2 * 5),
    "window-prefill": ([0], 29, 6, 4, 2 * 4 * 3),
    "window-ragged-decode": ([20, 4, 13], 1, 6, 64, 2 * 3),
    "window-ragged-chunk": ([12, 0], 11, 5, 3, 2 * 3 * 2),
    # A decode step over a long cache: K qᵀ, and P V in blocks of keys (few query rows).
    "decode-long": ([2600, 2400], 1, None, 64, 1 << 20),
}


@pytest.fixture(params=["compiled", "numpy"])
def loops(request):
    """The compiled softmax and SwiGLU loops (tee/kernels.py), then numpy's passes."""
    if request.param == "compiled" and not kernels.available():
        pytest.skip("teesplit.tee._kernels is not built for this CPU")
    with kernels.use(request.param == "compiled"):
        yield request.param


@pytest.mark.parametrize("cut", [True, False], ids=["cut-at-diagonal", "blocks-cross-it"])
@pytest.mark.parametrize("case", sorted(ATTENTION_CASES))
def test_grouped_attention_blockwise_matches_full_softmax(case, loops, cut):
    pos, T, window, qb, kbs = ATTENTION_CASES[case]
    B, H, Hkv, D = len(pos), 4, 2, 8
    S = max(pos) + T
    r = rng(11)
    q = (
        (r.standard_normal((B, T, H, D)) * 3).astype(np.float32).transpose(0, 2, 1, 3)
    )  # a view, as the model's
    k = (r.standard_normal((B, Hkv, S, D)) * 3).astype(np.float32)
    v = r.standard_normal((B, Hkv, S, D)).astype(np.float32)
    layout = ops.attention_layout(
        np.array(pos), T, window, H // Hkv, query_block=qb, key_block_scores=kbs, cut=cut
    )
    scale = np.float32(D**-0.5)
    with warnings.catch_warnings(), np.errstate(all="raise", under="ignore"):
        warnings.simplefilter("error")
        got = ops.grouped_attention(q, k, v, layout, scale)
    want, p = reference_attention(q, k, v, pos, window)
    assert got.dtype == np.float32 and got.shape == (B, T, H * D)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)
    # The v3 path: full scores from the GPU, masked block by block, the same probabilities.
    scores = np.ascontiguousarray(q) @ np.repeat(k, H // Hkv, axis=1).transpose(0, 1, 3, 2)
    probs = ops.masked_scaled_softmax(scores, scale, layout)
    np.testing.assert_allclose(probs, p, atol=1e-6)
    additive = np.where(reference_hidden(pos, T, S, window), np.float32(-np.inf), np.float32(0))[:, None]
    np.testing.assert_array_equal(probs, ops.scaled_softmax(scores, scale, additive))


def test_attention_layout_skips_hidden_blocks_and_masks_only_cut_ones():
    layout = ops.attention_layout(
        np.array([0]), 256, None, group=3, query_block=64, key_block_scores=3 * 64 * 32
    )
    assert [(b.start, b.stop) for b in layout] == [(0, 64), (64, 128), (128, 192), (192, 256)]
    last = layout[-1]  # keys [0, 193) are visible to all of its queries; the diagonal is cut
    assert [(kb.start, kb.stop, kb.hidden is None) for kb in last.keys] == [
        *((s, min(s + 32, 193), True) for s in range(0, 193, 32)),
        (193, 225, False),
        (225, 256, False),
    ]
    assert all(kb.stop <= b.stop for b in layout for kb in b.keys)  # nothing above the diagonal
    window = ops.attention_layout(np.array([1000]), 1, 100, group=3)
    assert [(kb.start, kb.stop, kb.hidden) for kb in window[0].keys] == [(901, 1001, None)]
    # Not cut: one block of up to 32 keys across the diagonal, masked only where it crosses it.
    whole = ops.attention_layout(
        np.array([0]), 256, None, group=3, query_block=64, key_block_scores=3 * 64 * 32, cut=False
    )
    last = whole[-1]
    assert [(kb.start, kb.stop) for kb in last.keys] == [(s, min(s + 32, 256)) for s in range(0, 256, 32)]
    assert [kb.hidden is None for kb in last.keys] == [True] * 6 + [False, False]


def test_grouped_attention_sees_nothing_gives_zeros(loops):
    # Keys of a ragged row beyond its own length are hidden; a query with no visible key
    # (not reachable from the model, which always sees its own token) still gives zeros.
    q = np.ones((1, 2, 1, 4), np.float32)
    k = np.ones((1, 1, 3, 4), np.float32)
    hidden = np.ones((1, 1, 1, 3), bool)
    layout = (ops.QueryBlock(0, 1, (ops.KeyBlock(0, 3, hidden),), 0, 3),)
    with np.errstate(all="raise", under="ignore"):
        got = ops.grouped_attention(q, k, k, layout, np.float32(0.5))
    assert got.shape == (1, 1, 8) and np.all(got == 0)


@kernels.use(False)
def test_silu_mul_by_row_blocks_is_bit_for_bit_the_whole_array_product():
    # A prefill-sized gate|up (more elements than one block), as views of one (B, T, 2F) array.
    # numpy's passes; the compiled loop's exp is its own (tests/tee/test_kernels.py).
    F = 96
    z = (rng(12).standard_normal((2, 1500, 2 * F)) * 8).astype(np.float32)
    r = rng(13).random((2, 1500, 1)).astype(np.float32)
    b = rng(14).standard_normal(2 * F).astype(np.float32)
    whole = ops.silu(z[..., :F]) * z[..., F:]
    assert np.array_equal(ops.silu_mul(z[..., :F], z[..., F:]), whole)
    y = r * z + b
    assert np.array_equal(ops.scaled_silu_mul(r, z, b), ops.silu(y[..., :F]) * y[..., F:])
    y = r * z
    assert np.array_equal(ops.scaled_silu_mul(r, z), ops.silu(y[..., :F]) * y[..., F:])
    one = ops.scaled_silu_mul(r[:1, :1], z[:1, :1], b)  # a decode step: one row, no blocks
    assert np.array_equal(
        one, ops.silu((r[:1, :1] * z[:1, :1] + b)[..., :F]) * (r[:1, :1] * z[:1, :1] + b)[..., F:]
    )


@kernels.use(False)
def test_unscaled_silu_mul_of_merged_gate_up_is_the_split_product():
    # The fused plans' gate|up (B, T, 2F) without a row scale: numpy's bits of silu(g) * u.
    F = 96
    z = (rng(15).standard_normal((2, 1500, 2 * F)) * 8).astype(np.float32)
    b = rng(16).standard_normal(2 * F).astype(np.float32)
    assert np.array_equal(ops.scaled_silu_mul(None, z), ops.silu(z[..., :F]) * z[..., F:])
    y = z + b
    assert np.array_equal(ops.scaled_silu_mul(None, z, b), ops.silu(y[..., :F]) * y[..., F:])
    assert np.array_equal(ops.scaled_silu_mul(None, z[:1, :1]), ops.silu(z[:1, :1, :F]) * z[:1, :1, F:])
