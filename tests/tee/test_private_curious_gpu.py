"""A curious GPU server records everything it receives; what can it learn from that?

Three simple attacks on real SmolLM2 weights (the attacker holds the public checkpoint):
reading the token ids, nearest-neighbour inversion of the first layer's input against the
public embedding table (normalized with the public norm weights), and the argmax of the
logits the server computes for the answer. On the plain plans they recover >= 99% of the
prompt and answer tokens; on the private plans no more than chance: no more hits than the
attacks make on inputs carrying nothing (uniform ring elements; a nearest-neighbour search in
high dimension favours a few hub tokens, so chance is not 1/vocabulary). A statistical
test finds the correlation between every recorded private tensor and the true activation
indistinguishable from zero (and finds it on the plain plan's recordings), and the recorded
ring elements uniform.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import TESTS
from recording import Recorder, load_recordings
from test_private import private_model

from teesplit.launch import build_service, free_tcp_address, stop_server
from teesplit.protocol import RING_OPS
from teesplit.tee.client import GPUClient
from teesplit.tee.generate import Generator, SamplingParams
from teesplit.tee.local_weights import load_local_weights
from teesplit.tee.model import TEELlamaModel
from teesplit.tee.ops import rms_norm
from teesplit.tee.plans import get_plan
from teesplit.transport import GPUServerUnavailable
from teesplit.transport.local import LocalTransport
from teesplit.transport.zmq import ZmqTransport

PROMPT = "My bank PIN is 4821 and my password is tangerine-otter; please remember them for me."
NEW_TOKENS = 8
PLAIN_PLANS = ("v2", "v2-fused", "v3-fused")
PRIVATE_PLANS = ("private-otp", "private-2party")


# ---- the attacks (what a curious server can do with its recordings) --------------------------
def _int64_ring_as_numbers(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float64) / 2.0**63 if x.dtype == np.int64 else x.astype(np.float64)


def read_ids(recs, vocab: int) -> list[int]:
    """Every int64 tensor whose values could be token ids, in order of arrival, first (prefill) one."""
    for _header, tensors in recs:
        for t in tensors:
            if t.dtype == np.int64 and t.size and t.min() >= 0 and t.max() < vocab:
                return t.ravel().tolist()
    return []


def _first_layer_input(recs) -> np.ndarray | None:
    for header, tensors in recs:
        op, a = header["op"], header.get("args") or {}
        if op == "RingEmbedQKV":  # the private plans: layer 0's input, masked
            x = tensors[0]
            return _int64_ring_as_numbers(x).reshape(-1, x.shape[-1])
        if a.get("layer") != 0:
            continue
        if op == "QKV" or (op == "Linear" and a.get("module") == "q_proj"):
            x = tensors[0]
            return _int64_ring_as_numbers(x).reshape(-1, x.shape[-1])
    return None


def invert_first_layer(recs, lw) -> list[int]:
    """Nearest neighbour (cosine) of each first-layer input row among RMSNorm(embedding) rows."""
    x = _first_layer_input(recs)
    return [] if x is None else _nearest_tokens(x, lw).tolist()


def _nearest_tokens(x: np.ndarray, lw, dtype=np.float64) -> np.ndarray:
    table = rms_norm(lw.embed, lw.norms[0], lw.config.rms_norm_eps).astype(dtype)
    table /= np.linalg.norm(table, axis=1, keepdims=True)
    x = (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-300)).astype(dtype)
    return np.argmax(x @ table.T, axis=1)


def answer_from_logits(recs, lw) -> list[int]:
    """The argmax of the logits the server computes for each LM head request, in order (under
    the private plans: of the LM head on the masked residual it receives, read as numbers)."""
    out = []
    for header, tensors in recs:
        op = header["op"]
        if op == "LMHead":
            out.append(int(np.argmax(tensors[0].reshape(-1, tensors[0].shape[-1])[-1] @ lw.lm_head.T)))
        elif op == "RingDownLMHead":
            x = _int64_ring_as_numbers(tensors[1].reshape(-1, tensors[1].shape[-1])[-1])
            out.append(int(np.argmax(x @ lw.lm_head.T)))
    return out


def recovered(guess: list[int], truth: list[int]) -> float:
    return sum(g == t for g, t in zip(guess, truth, strict=False)) / len(truth)


def null_guesses(lw, n: int = 1024, seed: int = 0) -> dict[str, np.ndarray]:
    """How often each token is the attacks' guess on inputs that carry nothing: uniform ring
    elements, which is what the private plans send. A nearest-neighbour search in high
    dimension is not uniform: a few 'hub' rows of the table win for many random directions."""
    rng = np.random.default_rng(seed)
    x = _int64_ring_as_numbers(rng.integers(-(2**63), 2**63, size=(n, lw.config.hidden_size), dtype=np.int64))
    V = lw.config.vocab_size
    by_logits = np.argmax(x.astype(np.float32) @ lw.lm_head.T, axis=1)
    return {
        "inversion": np.bincount(_nearest_tokens(x, lw, np.float32), minlength=V) / n,
        "logits": np.bincount(by_logits, minlength=V) / n,
    }


def chance_hits(p: np.ndarray, truth: list[int], odds: float = 1e-4) -> int:
    """The most hits that guesses drawn from p make on truth but for `odds`: the Poisson
    quantile of their expected number Σ p(truth_i)."""
    mean = float(sum(p[t] for t in truth))
    k, term, tail = 0, math.exp(-mean), 1.0
    while True:
        tail -= term  # P(hits > k)
        if tail <= odds:
            return k
        k += 1
        term *= mean / k


def assert_no_more_than_chance(rates: dict[str, float], null: dict[str, np.ndarray], prompt, answer) -> None:
    """The private plans' recordings give the attacks no more hits than inputs carrying nothing."""
    assert rates["ids"] == 0, rates  # no token id crosses the link
    for name, truth in (("inversion", prompt), ("logits", answer)):
        hits = round(rates[name] * len(truth))
        assert hits <= chance_hits(null[name], truth), (name, hits, rates)


def attacks(recs, lw, prompt: list[int], answer: list[int]) -> dict[str, float]:
    return {
        "ids": recovered(read_ids(recs, lw.config.vocab_size), prompt),
        "inversion": recovered(invert_first_layer(recs, lw), prompt),
        "logits": recovered(answer_from_logits(recs, lw), answer),
    }


# ---- in process: every plan, and the statistics ---------------------------------------------
@pytest.fixture(scope="module")
def setup(smollm2_dir):
    from teesplit.tee.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(smollm2_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}])
    handlers = [build_service(smollm2_dir, "cpu", "float32", progress=False)[0] for _ in range(2)]
    return smollm2_dir, tok, ids, handlers, load_local_weights(smollm2_dir)


@pytest.fixture(scope="module")
def null(setup):
    return null_guesses(setup[4])


@pytest.fixture(scope="module")
def runs(setup):
    """plan -> (recordings per server, generated tokens), for one prompt, greedy."""
    path, tok, ids, handlers, _ = setup
    out = {}
    for plan in (*PLAIN_PLANS, *PRIVATE_PLANS):
        recorders = [Recorder(h) for h in handlers]
        if get_plan(plan).private:
            model = private_model(path, plan, recorders, pool_depth=16)
        else:
            model = TEELlamaModel(GPUClient(LocalTransport(recorders[0].handle)), get_plan(plan))
        try:
            tokens = Generator(model, tok).generate(ids, SamplingParams(max_new_tokens=NEW_TOKENS)).tokens
        finally:
            model.gpu.close()
        out[plan] = ([r.requests for r in recorders if r.requests], tokens)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("plan", PLAIN_PLANS)
def test_plain_plans_give_the_prompt_and_answer_away(setup, runs, plan):
    _, _, ids, _, lw = setup
    (recs,), tokens = runs[plan]
    rates = attacks(recs, lw, ids, tokens)
    print(plan, rates)
    assert len(tokens) == NEW_TOKENS
    assert min(rates.values()) >= 0.99, rates


@pytest.mark.slow
@pytest.mark.parametrize("plan", PRIVATE_PLANS)
def test_private_plans_leak_no_more_than_chance(setup, runs, null, plan):
    _, _, ids, _, lw = setup
    servers, tokens = runs[plan]
    assert len(servers) == (2 if plan == "private-2party" else 1)
    assert tokens == runs["v2-fused"][1]
    for recs in servers:  # each server alone (they do not collude)
        assert {h["op"] for h, _ in recs} == {"Init", "RingSetup", *RING_OPS}
        rates = attacks(recs, lw, ids, tokens)
        print(plan, rates)
        assert_no_more_than_chance(rates, null, ids, tokens)


def _site_keys(header, num_layers: int) -> list[tuple[tuple[int, str], int]]:
    """The Linear sites whose inputs a request carries: [(site, tensor index)]."""
    op, a = header["op"], header.get("args") or {}
    module_site = {"q_proj": "qkv", "o_proj": "o", "gate_proj": "gate_up", "down_proj": "down"}
    layer = a.get("layer")
    if op == "QKV":
        return [((layer, "qkv"), 0)]
    if op == "GateUp":
        return [((layer, "gate_up"), 0)]
    if op == "Linear" and a["module"] in module_site:
        return [((layer, module_site[a["module"]]), 0)]
    if op == "LMHead":
        return [((-1, "lm_head"), 0)]
    # The private plans' merged steps carry two inputs: the first product's and the residual
    # that the product after the norm reads.
    if op == "RingEmbedQKV":
        return [((0, "qkv"), 0)]
    if op == "RingOGateUp":
        return [((layer, "o"), 0), ((layer, "gate_up"), 1)]
    if op == "RingDownQKV":
        return [((layer, "down"), 0), ((layer + 1, "qkv"), 1)]
    if op == "RingDownLMHead":
        return [((num_layers - 1, "down"), 0), ((-1, "lm_head"), 1)]
    return []


def _prefill_inputs(recs, num_layers: int = 30, like=None) -> dict[tuple[int, str], np.ndarray]:
    """Each Linear site's first input (the prefill), as numbers (B, T, in). With `like` (site ->
    the plain plan's array): the first with as many rows if there is one (the private plans
    send only the last row to the last down_proj and the LM head; private-2party's second
    server also gets shares made ahead, in chunks of their own size, and may get no input of
    the prompt's size at all for a site: then its first input of any size)."""
    first, matching = {}, {}
    for header, tensors in recs:
        for key, i in _site_keys(header, num_layers):
            t = tensors[i]
            first.setdefault(key, t)
            if like is not None and key not in matching:
                rows = 1 if key == (num_layers - 1, "down") else like[key].shape[1]
                if t.shape[1] == rows:
                    matching[key] = t
    return {k: _int64_ring_as_numbers(matching.get(k, t)) for k, t in first.items()}


def _z(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation times sqrt(N): about N(0, 1) when a and b are independent."""
    return float(np.corrcoef(a, b)[0, 1] * np.sqrt(a.size))


@pytest.mark.slow
def test_recorded_tensors_are_uncorrelated_with_the_true_activations(runs):
    """For every masked site (121 on SmolLM2, each server of private-2party separately), the
    correlation of the recorded values, and of their magnitudes, with the true activations
    (recorded in the clear by plan v2-fused on the same prompt) is within 5 standard errors of
    zero (Bonferroni over all sites: a false alarm has probability < 1e-3). The same statistic
    on v2-fused's own recordings is far from zero, so the test can tell."""
    truth = _prefill_inputs(runs["v2-fused"][0][0])
    assert len(truth) == 4 * 30 + 1
    v2 = {k: v.ravel() for k, v in _prefill_inputs(runs["v2"][0][0]).items()}
    flat = {k: v.ravel() for k, v in truth.items()}
    assert min(np.corrcoef(v2[k], flat[k])[0, 1] for k in truth) > 0.99  # the plain plan: r ~ 1
    assert min(_z(v2[k], flat[k]) for k in truth) > 20  # far beyond the threshold below
    worst = 0.0
    for plan in PRIVATE_PLANS:
        for recs in runs[plan][0]:
            seen = _prefill_inputs(recs, like=truth)
            assert set(seen) == set(truth)
            for key, x in truth.items():
                u = seen[key]
                if key == (29, "down") and u.shape[1] == 1:  # the private plans send the last row only
                    x = x[:, -1:]
                # A share made ahead (private-2party's second server) has its own row count:
                # compare as many values as both have.
                n = min(u.size, x.size)
                assert n >= 64 * 8 or u.shape == x.shape
                u, x = u.ravel()[:n], x.ravel()[:n]
                worst = max(worst, abs(_z(u, x)), abs(_z(np.abs(u), np.abs(x))))
    print(f"largest |r| sqrt(N) over {len(truth)} sites and 3 servers: {worst:.2f}")
    assert worst < 5.0


@pytest.mark.slow
def test_recorded_ring_elements_are_uniform(runs):
    """The top byte of every recorded ring element: a chi-square test against uniform."""
    for plan in PRIVATE_PLANS:
        for recs in runs[plan][0]:
            top = np.concatenate(
                [
                    (x.view(np.uint64) >> np.uint64(56)).ravel()
                    for h, t in recs
                    if h["op"] in RING_OPS
                    for x in t
                ]
            )
            counts = np.bincount(top.astype(np.int64), minlength=256)
            expected = top.size / 256
            chi2 = float(((counts - expected) ** 2 / expected).sum())
            assert chi2 < 255 + 6 * np.sqrt(2 * 255), (plan, chi2)  # 255 dof: mean 255, sd 22.6


# ---- real processes: recording servers, the real CLI -----------------------------------------
def _start_recording_server(model_dir: Path, out: Path) -> tuple[subprocess.Popen, str]:
    address = free_tcp_address()
    script = TESTS / "recording.py"
    cmd = [sys.executable, str(script), "--model", str(model_dir), "--bind", address, "--out", str(out)]
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    client = GPUClient(ZmqTransport(address, timeout_s=0.5))
    try:
        for _ in range(600):
            try:
                client.ping()
                return proc, address
            except GPUServerUnavailable:
                if proc.poll() is not None:
                    raise RuntimeError("the recording server exited") from None
        raise RuntimeError("the recording server did not start")
    finally:
        client.close()


@pytest.mark.slow
@pytest.mark.parametrize("plan", ["v2-fused", *PRIVATE_PLANS])
def test_recording_servers_in_real_processes(setup, runs, null, tmp_path, plan):
    """`teesplit generate` against one (or two) recording server processes over tcp."""
    path, _, ids, _, lw = setup
    n = 2 if plan == "private-2party" else 1
    servers = [_start_recording_server(path, tmp_path / f"rec{i}") for i in range(n)]
    try:
        cmd = [sys.executable, "-m", "teesplit", "generate", "--model", str(path), "--chat"]
        for _, address in servers:
            cmd += ["--server", address]
        cmd += ["--plan", plan, "--prompt", PROMPT, "--max-new-tokens", str(NEW_TOKENS), "--timeout", "120"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
    finally:
        for proc, _ in servers:
            stop_server(proc)
    tokens = runs["v2-fused"][1]
    assert r.stdout.strip() == setup[1].decode(tokens).strip()
    for i in range(n):
        rates = attacks(load_recordings(tmp_path / f"rec{i}"), lw, ids, tokens)
        print(plan, i, rates)
        if plan == "v2-fused":
            assert min(rates.values()) >= 0.99, rates
        else:
            assert_no_more_than_chance(rates, null, ids, tokens)
