"""Detection rates of --verify's checks against a lying server, and false alarms on honest
results, on SmolLM2-135M's real weights and real activations, in float32 and bfloat16 compute.

The checks are called directly (no sockets) on results computed by the real GPU service in
the mode a verifying runner asks for (`exact`: float32 results from compute-dtype weights),
so thousands of trials run in seconds. Each lie mode gets >= 1,000 trials per operation and
must be caught in >= 99.9% of them; over 10,000 honest results per dtype none may fail.
"""

from __future__ import annotations

import numpy as np
import pytest
from liar import lie

from teesplit.tee.checkpoint import IntegrityError, TrustedCheckpoint
from teesplit.tee.client import GPUClient
from teesplit.tee.verify import Verifier


def f32(y) -> np.ndarray:
    """A service result as float32 numpy (a float32 CPU server returns numpy, others torch)."""
    return np.asarray(y, np.float32) if isinstance(y, np.ndarray) else y.float().numpy()


LAYER = 7  # a middle layer of SmolLM2's 30
TRIALS = 1000
HONEST_PER_OP = 1250  # x 8 operations = 10,000 honest results per dtype
LINEAR_MODES = ("perturb", "swap", "scale", "replay")


class Recorder(GPUClient):
    """Keeps the inputs the model sends for layer LAYER and the LM head."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.rec: dict[str, list] = {
            "qkv": [],
            "gate_up": [],
            "down": [],
            "lm": [],
            "q": [],
            "k": [],
            "ids": [],
        }

    def embedding(self, ids):
        self.rec["ids"].append(np.array(ids))
        return super().embedding(ids)

    def qkv(self, layer, x, sid=None, pos=None):
        if layer == LAYER:
            self.rec["qkv"].append(np.array(x))
        return super().qkv(layer, x, sid, pos)

    def gate_up(self, layer, x):
        if layer == LAYER:
            self.rec["gate_up"].append(np.array(x))
        return super().gate_up(layer, x)

    def linear(self, layer, module, x):
        if layer == LAYER and module == "down_proj":
            self.rec["down"].append(np.array(x))
        return super().linear(layer, module, x)

    def attn_scores(self, sid, layer, q, k, pos, r=None):
        if layer == LAYER:
            self.rec["q"].append(np.array(q))
            self.rec["k"].append(np.array(k))
        return super().attn_scores(sid, layer, q, k, pos, r)

    def lm_head(self, x):
        self.rec["lm"].append(np.array(x))
        return super().lm_head(x)


@pytest.fixture(scope="module")
def recorded(smollm2_dir):
    """Real activations: a 24-token prompt and 12 decode steps of SmolLM2, plan v3-fused."""
    from teesplit.launch import build_service
    from teesplit.tee.model import TEELlamaModel
    from teesplit.tee.plans import get_plan
    from teesplit.transport.local import LocalTransport

    handler, _ = build_service(smollm2_dir, "cpu", "float32", progress=False)
    client = Recorder(LocalTransport(handler.handle))
    model = TEELlamaModel(client, get_plan("v3-fused"))
    cache = model.new_cache()
    rng = np.random.default_rng(0)
    ids = rng.integers(100, 20000, size=(1, 24))
    logits = model.forward(ids, cache)
    for _ in range(12):
        nxt = np.array([[int(np.argmax(logits[0, -1]))]])
        logits = model.forward(nxt, cache)
    model.close_cache(cache)
    rows = {}
    for name in ("qkv", "gate_up", "down", "lm"):
        rows[name] = np.concatenate([x.reshape(-1, x.shape[-1]) for x in client.rec[name]])
    # The layer's keys per position (rotated, as sent) and its queries (one per position and head).
    keys = np.concatenate(client.rec["k"], axis=2)  # (1, Hkv, S, D)
    queries = np.concatenate(client.rec["q"], axis=2)  # (1, H, S, D)
    return rows, keys, queries, np.concatenate([i.reshape(-1) for i in client.rec["ids"]])


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def setup(request, smollm2_dir):
    from teesplit.launch import build_service

    handler, _ = build_service(smollm2_dir, "cpu", request.param, progress=False)
    service = handler.service
    service.exact = True  # what a verifying runner's f32 requests ask for
    # The server upcasts its compute-dtype weights per request; the same values, kept here
    # once, spare the test thousands of copies of the LM head.
    upcast, once = service._w, {}
    service._w = lambda w: None if w is None else once.setdefault(id(w), upcast(w))
    verifier = Verifier(TrustedCheckpoint(smollm2_dir), request.param, seed=1)
    return request.param, service, verifier


def _earlier(results: list[np.ndarray], t: int) -> np.ndarray:
    """An earlier (or, for the first ones, a later) result of the same shape and other values:
    what a replaying server would send."""
    y = results[t]
    for u in [*range(t - 1, -1, -1), *range(t + 1, len(results))]:
        if results[u].shape == y.shape and not np.array_equal(results[u], y):
            return results[u]
    raise AssertionError("no other result of this shape to replay")


def _count(check, make_lies, trials: int) -> int:
    """How many of `trials` lies `check` lets through."""
    missed = 0
    for t in range(trials):
        args = make_lies(t)
        try:
            check(*args)
        except IntegrityError:
            continue
        missed += 1
    return missed


def _linear_ops(service, verifier, rows):
    """(name, inputs (M, K), honest y of one input row, check(x, y))."""
    L = LAYER
    return [
        ("QKV", rows["qkv"], lambda x: service.qkv(L, x), lambda x, y: verifier.fused(L, "qkv", x, y)),
        (
            "GateUp",
            rows["gate_up"],
            lambda x: service.gate_up(L, x),
            lambda x, y: verifier.fused(L, "gate_up", x, y),
        ),
        (
            "down_proj",
            rows["down"],
            lambda x: service.linear(L, "down_proj", x),
            lambda x, y: verifier.linear(L, "down_proj", x, y),
        ),
        ("LMHead", rows["lm"], lambda x: service.lm_head(x), lambda x, y: verifier.lm_head_logits(x, y)),
    ]


@pytest.mark.slow
def test_linear_lies_are_caught_and_honest_results_pass(setup, recorded):
    dtype, service, verifier = setup
    rows, _, _, _ = recorded
    rng = np.random.default_rng(2)
    report = {}
    for name, inputs, compute, check in _linear_ops(service, verifier, rows):
        honest = []
        for t in range(max(TRIALS, HONEST_PER_OP)):
            # One token (decode) or a 4-token block (prefill), from the recorded activations.
            T = 1 if t % 2 else 4
            x = inputs[rng.choice(len(inputs), T, replace=False)][None].astype(np.float32)
            y = f32(compute(x))
            if t < HONEST_PER_OP:
                check(x, y)  # an honest result must pass: raises IntegrityError otherwise
            honest.append((x, y))
        ys = [y for _, y in honest]
        for mode in LINEAR_MODES:

            def lies(t, mode=mode, honest=honest, ys=ys):
                x, y = honest[t]
                return x, lie(mode, y, rng, _earlier(ys, t))

            report[(name, mode)] = _count(check, lies, TRIALS)
    missed = {k: v for k, v in report.items() if v > TRIALS // 1000}
    assert not missed, f"{dtype}: lies missed more than once in {TRIALS}: {missed}"


def test_embedding_lies_are_caught(setup, recorded):
    dtype, service, verifier = setup
    *_, ids = recorded
    ids = np.unique(ids)  # two rows of the same token are equal: swapping them is no lie
    rng = np.random.default_rng(3)
    cases = []
    for t in range(TRIALS):
        i = ids[rng.choice(len(ids), 1 + t % 2, replace=False)][None]
        x = f32(service.embedding(i))
        verifier.embedding(i, x)
        cases.append((i, x))
    xs = [x for _, x in cases]
    for mode in LINEAR_MODES:
        missed = _count(
            verifier.embedding,
            lambda t, mode=mode: (cases[t][0], lie(mode, cases[t][1], rng, _earlier(xs, t))),
            TRIALS,
        )
        assert missed == 0, (dtype, mode, missed)


def _write_values(service, verifier, sess, state, x, pos):
    """QKV with a session, as a verifying runner asks for it: v comes back, is kept, and cached."""
    c = verifier.config
    y = f32(service.qkv(LAYER, x, sess, pos))  # exact: q|k|v
    v = y[..., c.q_dim + c.kv_dim :].reshape(*x.shape[:2], c.num_kv_heads, c.head_dim)
    if state is not None:
        verifier.session_values(state, LAYER, v, pos)


def _attention_session(service, verifier, keys, xs, S):
    """A GPU session and a verifier session holding positions [0, S-1) of layer LAYER."""
    sess = service.sessions[service.open_session(1, S + 1, f32=True)["sid"]]
    state = verifier.open_session(1, S + 1)
    pos0 = np.zeros(1, np.int64)
    _write_values(service, verifier, sess, state, xs[None, : S - 1], pos0)
    q0 = np.zeros((1, verifier.config.num_heads, S - 1, verifier.config.head_dim), np.float32)
    scores = f32(service.attn_scores(sess, LAYER, q0, keys[:, :, : S - 1], pos0))
    verifier.attn_scores(state, LAYER, q0, keys[:, :, : S - 1], pos0, scores)
    return sess, state


@pytest.mark.slow
def test_kv_cache_lies_are_caught_and_honest_results_pass(setup, recorded):
    """v3-fused's AttnScores and AttnOut against the GPU-side cache, checked through running
    fingerprints; the lies include stale cache results."""
    import torch

    dtype, service, verifier = setup
    rows, keys, queries, _ = recorded
    c = verifier.config
    S = keys.shape[2]
    xs = rows["qkv"][:S].astype(np.float32)  # the layer's QKV inputs, one per position
    rng = np.random.default_rng(4)
    pos = np.array([S - 1], np.int64)
    k_new = keys[:, :, S - 1 :]
    sess, state = _attention_session(service, verifier, keys, xs, S)
    # The stale cache: the newest value slot holds the previous position's value.
    stale_sess, _ = _attention_session(service, verifier, keys, xs, S)
    _write_values(service, verifier, stale_sess, None, xs[None, S - 2 : S - 1], pos)
    _write_values(service, verifier, sess, state, xs[None, S - 1 : S], pos)

    n_q = queries.shape[2]
    scores_cases, out_cases = [], []
    for t in range(max(TRIALS, HONEST_PER_OP)):
        q = queries[:, :, rng.integers(n_q)][:, :, None]  # (1, H, 1, D): real queries, varied
        q = q[:, rng.permutation(c.num_heads)]
        scores = f32(service.attn_scores(sess, LAYER, q, k_new, pos))
        # The stale result: the new key's slot as it was before the write (zeros: a fresh slot).
        kv = sess.kv
        new = kv[0, LAYER, :, :, S - 1].clone()
        kv[0, LAYER, :, :, S - 1] = 0
        qt = torch.from_numpy(q).to(kv.dtype).reshape(1, c.num_kv_heads, -1, c.head_dim)
        stale = torch.matmul(qt, kv[0, LAYER, :, :, :S].transpose(-1, -2)).view(1, c.num_heads, 1, S)
        kv[0, LAYER, :, :, S - 1] = new
        if t < HONEST_PER_OP:
            verifier.attn_scores(state, LAYER, q, k_new, pos, scores)
        scores_cases.append((q, scores, stale.float().numpy()))
        z = scores * np.float32(c.head_dim**-0.5)
        p = np.exp(z - z.max(-1, keepdims=True))
        p = (p / p.sum(-1, keepdims=True)).astype(np.float32)
        o = f32(service.attn_out(sess, LAYER, p))
        o_stale = f32(service.attn_out(stale_sess, LAYER, p))
        if t < HONEST_PER_OP:
            verifier.attn_out(state, LAYER, p, o)
        out_cases.append((p, o, o_stale))

    report = {}
    all_scores = [s for _, s, _ in scores_cases]
    all_outs = [o for _, o, _ in out_cases]
    for mode in (*LINEAR_MODES, "stale"):

        def score_lie(t, mode=mode):
            q, s, st = scores_cases[t]
            bad = st if mode == "stale" else lie(mode, s, rng, _earlier(all_scores, t))
            return state, LAYER, q, k_new, pos, bad

        def out_lie(t, mode=mode):
            p, o, st = out_cases[t]
            bad = st if mode == "stale" else lie(mode, o, rng, _earlier(all_outs, t))
            return state, LAYER, p, bad

        report[("AttnScores", mode)] = _count(verifier.attn_scores, score_lie, TRIALS)
        report[("AttnOut", mode)] = _count(verifier.attn_out, out_lie, TRIALS)
    missed = {k: v for k, v in report.items() if v > TRIALS // 1000}
    assert not missed, f"{dtype}: lies missed more than once in {TRIALS}: {missed}"
