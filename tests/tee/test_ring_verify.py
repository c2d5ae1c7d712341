"""--verify under the private plans (tee/ring_verify.py): the exact Freivalds check over Z_2^64
of every product of every ring step. Honest runs pass with the same tokens; a server that changes one ring
element (by 1, or by 2^63), swaps rows or replays a reply is caught, under private-otp and from
either server of private-2party; the check's miss and false-alarm rates, measured; and the real
CLI against a real `teesplit serve` process."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
from helpers import TESTS, make_checkpoint
from liar import RING_MODES, LyingHandler, ring_lie

from teesplit import quant
from teesplit.launch import build_service, free_tcp_address, start_server, stop_server, wait_serving
from teesplit.tee.checkpoint import IntegrityError, TrustedCheckpoint
from teesplit.tee.client import GPUClient
from teesplit.tee.generate import Generator, SamplingParams
from teesplit.tee.local_weights import load_local_weights
from teesplit.tee.model import TEELlamaModel
from teesplit.tee.plans import get_plan
from teesplit.tee.private import RingSites, private_gpu, random_ring, ring_steps
from teesplit.tee.ring_verify import VECTORS, RingPrint, RingVerifier, ring_fingerprint, secret_vectors
from teesplit.tee.verify import VerifiedPort
from teesplit.transport.local import LocalTransport

PROMPT = [3, 17, 42, 99, 5, 61, 7]
PLANS = ("private-otp", "private-2party")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("pverify"), "llama", num_hidden_layers=2)


def _model(ckpt, plan, verify=True, liars=None, depth=0):
    """A private plan over in-process services; liars: {server index: (mode, nth)}."""
    n = 2 if plan == "private-2party" else 1
    clients, handlers = [], []
    for i in range(n):
        h, _ = build_service(ckpt, "cpu", "float32", progress=False)
        if liars and i in liars:
            mode, nth = liars[i]
            h = LyingHandler(h, mode, "Ring", nth, seed=i)
        handlers.append(h)
        clients.append(
            VerifiedPort(
                GPUClient(LocalTransport(h.handle)), checkpoint=TrustedCheckpoint(ckpt), verify=verify
            )
        )
    # private-2party without shares made ahead, so that a server's nth call is the nth step
    gpu = private_gpu(
        plan, load_local_weights(ckpt), clients, pool_depth=4 if plan == "private-otp" else depth
    )
    return TEELlamaModel(gpu, get_plan(plan)), handlers


def _generate(model, n=5):
    try:
        return Generator(model, eos_token_ids=set()).generate(PROMPT, SamplingParams(max_new_tokens=n))
    finally:
        model.gpu.close()


STEPS = 2 * 2 + 1  # ring steps per forward pass of the 2-layer checkpoint


@pytest.mark.parametrize("plan", PLANS)
def test_honest_private_runs_pass_with_the_same_tokens(ckpt, plan):
    plain, _ = _model(ckpt, plan, verify=False)
    want = _generate(plain).tokens
    model, _ = _model(ckpt, plan)
    v = model.gpu.verifier
    got = _generate(model).tokens
    assert got == want
    n = 5 * (2 if plan == "private-2party" else 1)  # 5 forward passes
    assert v.stats.by_op == {"RingEmbedQKV": n, "RingOGateUp": 2 * n, "RingDownQKV": n, "RingDownLMHead": n}
    assert v.stats.checks == STEPS * n
    assert v.stats.fingerprint_bytes > 0 and v.stats.setup_s > 0 and v.stats.check_s > 0
    assert model.gpu.clients[0].verifier is None  # no float fingerprints built


def _sites(ckpt, nth: int) -> tuple[str, str]:
    """The two products' names in the error message of the nth ring step (forward order)."""
    step = ring_steps(load_local_weights(ckpt).config)[(nth - 1) % STEPS]

    def name(spec):
        return "lm_head" if spec.site == quant.LM_HEAD else f"{spec.site} of layer {spec.layer}"

    first = step.second if step.first is None else step.first
    return f"{step.op} {name(first)}", f"{step.op} {name(step.second)}"


CASES = [
    ("add1", 2),  # prefill, layer 0 o + gate|up
    ("bit63", 5),  # prefill, the last down + the LM head
    ("swap", 3),  # prefill (7 rows), layer 0 down + layer 1 q|k|v
    ("replay", STEPS + 2),  # first decode step: the reply of an earlier step
    ("add1", STEPS * 2 + 4),  # second decode step, layer 1 o + gate|up
    ("bit63", STEPS * 3 + 1),  # third decode step, the embedding's q|k|v
]


@pytest.mark.parametrize("plan, server", [("private-otp", 0), ("private-2party", 0), ("private-2party", 1)])
@pytest.mark.parametrize("mode, nth", CASES)
def test_ring_lies_are_caught(ckpt, plan, server, mode, nth):
    model, handlers = _model(ckpt, plan, liars={server: (mode, nth)})
    with pytest.raises(IntegrityError) as err:
        _generate(model)
    liar = handlers[server]
    assert liar.told
    first, second = _sites(ckpt, nth)
    msg = str(err.value)
    assert msg.startswith(
        f"{first if liar.lied_index == 0 else second}: the GPU server's result fails its Freivalds"
    )


def test_a_lie_in_the_shares_made_ahead_is_caught(ckpt):
    """Server b's products of shares made ahead are checked in the thread that asks for them;
    the lie stops the generation at its next step."""
    model, handlers = _model(ckpt, "private-2party", liars={1: ("add1", 3)}, depth=2)
    with pytest.raises(IntegrityError, match="the GPU server's result fails its Freivalds check"):
        _generate(model)
    assert handlers[1].told


def test_replay_of_a_same_step_reply_is_caught(ckpt):
    """The reply the same step got one token earlier (same shape, an honest product of an
    earlier pad) is wrong for the fresh pad."""
    model, handlers = _model(ckpt, "private-otp", liars={0: ("replay", STEPS * 2 + 2)})
    liar = handlers[0]
    liar._earlier = lambda y: next(h for h in reversed(liar.history[:-6]) if h.shape == y.shape)
    with pytest.raises(IntegrityError, match="RingOGateUp (o|gate_up) of layer 0"):
        _generate(model)
    assert liar.told


# ---- the check itself, measured -------------------------------------------------------------
def test_fingerprint_is_the_exact_ring_product():
    rng = np.random.default_rng(0)
    for scale in (1, 2**20, 2**40):  # the float path, the limb path, the integer fallback
        wq = rng.integers(-scale, scale + 1, (300, 50), dtype=np.int64)
        s = secret_vectors(8, 300)
        assert np.array_equal(ring_fingerprint(s, wq), s.astype(np.int64) @ wq)


def test_miss_and_false_alarm_rates(ckpt):
    """>= 10,000 honest checks without a false alarm; >= 1,000 random lies of each kind, errors
    that are multiples of 2^63 included, caught at >= 99.9% (the bound is 1 - 2^-32)."""
    lw = load_local_weights(ckpt)
    q = RingSites(lw, 16, "float32", keep_q=True).sites[(0, "gate_up")].q.astype(np.int64)
    fp = RingPrint.of(q, VECTORS)
    rng = np.random.default_rng(1)
    x = random_ring((10_000, q.shape[1]))
    y = x @ q.T
    assert not fp.failures(x, y).any()  # 10,000 honest rows: no false alarm
    n = 1000
    kinds = {}
    idx = rng.integers(q.shape[0], size=n)
    rows = np.arange(n)
    for kind in ("add1", "bit63", "random", "multiple of 2^63 in many entries", "multiple of 2^62"):
        bad = y[:n].copy()
        if kind == "add1":
            bad[rows, idx] += 1
        elif kind == "bit63":
            bad[rows, idx] ^= np.int64(-(2**63))
        elif kind == "random":
            bad[rows, idx] = random_ring((n,))
            bad[rows, idx] += (bad[rows, idx] == y[rows, idx]).astype(np.int64)  # never equal
        elif kind == "multiple of 2^63 in many entries":
            flips = rng.random(bad.shape) < 0.3
            flips[rows, idx] = True
            bad[flips] ^= np.int64(-(2**63))
        else:
            bad[rows, idx] += np.int64(2**62)
        assert (bad != y[:n]).any(axis=1).all()
        caught = fp.failures(x[:n], bad).any(axis=1)
        kinds[kind] = caught.mean()
    swapped = y[:n].copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    kinds["swap"] = fp.failures(x[:n], swapped)[:2].any(axis=1).mean()
    kinds["replay"] = fp.failures(x[:n], y[n : 2 * n]).any(axis=1).mean()
    assert all(rate >= 0.999 for rate in kinds.values()), kinds


def test_ring_lie_modes_change_the_reply():
    rng = np.random.default_rng(0)
    y = random_ring((2, 3, 5))
    for mode in RING_MODES:
        assert not np.array_equal(ring_lie(mode, y, rng, random_ring(y.shape)), y)


def test_a_client_without_the_verifier_refuses_ring_products(ckpt):
    h, _ = build_service(ckpt, "cpu", "float32", progress=False)
    c = VerifiedPort(GPUClient(LocalTransport(h.handle)), checkpoint=TrustedCheckpoint(ckpt), verify=True)
    with pytest.raises(ValueError, match="needs the private plan's verifier"):
        c.ring_step("RingEmbedQKV", {"bits": 16}, [random_ring((1, 1, 64))], [128])
    lw = load_local_weights(ckpt)
    v = RingVerifier(lw.config, vectors=4)
    RingSites(lw, 16, "float32", keep_q=False, on_site=v.add)
    assert len(v.prints) == 4 * 2 + 1 and len(v.mult) == 2 * 2


# ---- through real server processes and the CLI ----------------------------------------------
@pytest.mark.slow
def test_cli_verify_private_otp_against_real_servers(smollm2_dir, tmp_path):
    """`teesplit generate --plan private-otp --verify` against a real `teesplit serve
    --private-weights int16`: the same text as without --verify and the checks counted in
    --stats; against a real server process that flips bit 63 of one ring element in the
    second decode step: exit status 4 and IntegrityError naming the site and layer."""
    import json

    from apihelpers import make_chat_checkpoint

    model = make_chat_checkpoint(tmp_path / "m", smollm2_dir, num_hidden_layers=2)
    base = [sys.executable, "-m", "teesplit", "generate", "--model", str(model), "--prompt", "Hi"]
    base += ["--max-new-tokens", "4", "--plan", "private-otp"]
    stats = tmp_path / "stats.json"
    address = free_tcp_address()
    # a server that keeps only the private plans' integers (serve --private-weights)
    cpu = ["--device", "cpu", "--dtype", "float32", "--threads", "1"]
    proc = start_server(model, address, [*cpu, "--private-weights", "int16"])
    try:
        runs = {}
        for verify in (False, True):
            extra = ["--verify", "--stats", "--stats-json", str(stats)] if verify else []
            r = subprocess.run(
                [*base, "--server", address, *extra], capture_output=True, text=True, timeout=300
            )
            assert r.returncode == 0, r.stderr
            runs[verify] = r
    finally:
        stop_server(proc)
    assert runs[True].stdout == runs[False].stdout
    s = json.loads(stats.read_text())
    steps = len(s["tokens"])  # one forward pass per generated token
    want = {"RingEmbedQKV": steps, "RingOGateUp": 2 * steps, "RingDownQKV": steps, "RingDownLMHead": steps}
    assert s["verify"]["by_op"] == want == s["rpc"]["by_op"]
    assert s["verify"]["fingerprint_bytes"] > 0 and s["verify"]["setup_s"] > 0
    assert 2.0 <= s["server_private_bytes_per_weight"] < 2.01 and s["private_weights"] == "int16"
    assert f"verify: {steps * STEPS} checks in" in runs[True].stderr

    address = free_tcp_address()
    script = TESTS / "lying_server.py"
    nth = STEPS * 2 + 2  # second decode step, layer 0 o + gate|up
    liar = subprocess.Popen(
        [sys.executable, str(script), str(model), address, "bit63", "Ring", str(nth)],
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_serving(liar, address, 120.0)
        r = subprocess.run(
            [*base, "--server", address, "--verify"], capture_output=True, text=True, timeout=300
        )
    finally:
        stop_server(liar)
    assert r.returncode == 4, r.stderr
    assert re.search(
        r"IntegrityError: RingOGateUp (o|gate_up) of layer 0: the GPU server's result fails", r.stderr
    )
    printed = r.stdout.rstrip("\n")
    assert runs[False].stdout.startswith(printed) and len(printed) < len(runs[False].stdout.rstrip("\n"))


def test_the_limb_product_is_the_wrapping_integer_product():
    from teesplit.tee.ring_verify import ring_times_secret

    s = secret_vectors(32, 5000)
    s[:, 0] = 255  # the largest entries
    y = random_ring((7, 5000))
    y[0] = -1  # every limb 0xFFFF
    y[1] = -(2**63)
    assert np.array_equal(ring_times_secret(y, s.T.astype(np.float64)), y @ s.T.astype(np.int64))
