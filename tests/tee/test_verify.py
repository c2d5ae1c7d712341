"""--verify end to end: honest generations pass with every GPU result checked, and a lying
server is caught (IntegrityError naming the operation and layer) before any token computed from
the lie is emitted, in-process for every plan and lie, and through real processes."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
from helpers import TESTS, make_checkpoint
from liar import LyingHandler

from teesplit.launch import build_service, free_tcp_address, stop_server, wait_serving
from teesplit.tee.checkpoint import IntegrityError, TrustedCheckpoint
from teesplit.tee.client import GPUClient
from teesplit.tee.generate import Generator, SamplingParams
from teesplit.tee.model import TEELlamaModel
from teesplit.tee.plans import get_plan
from teesplit.tee.verify import VERIFIED_PLANS, VerifiedPort
from teesplit.transport.local import LocalTransport

PLANS = VERIFIED_PLANS
PROMPT = [3, 17, 42, 99, 5, 61, 7]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def ckpt(request, tmp_path_factory):
    return make_checkpoint(
        tmp_path_factory.mktemp(f"verify-{request.param}"), request.param, num_hidden_layers=3
    )


def _client(ckpt, dtype="float32", verify=True, wrap=None):
    handler, _ = build_service(ckpt, "cpu", dtype, progress=False)
    handle = wrap(handler).handle if wrap else handler.handle
    return VerifiedPort(
        GPUClient(LocalTransport(handle)), checkpoint=TrustedCheckpoint(ckpt), verify=verify, seed=0
    )


def _generate(client, plan, n=6):
    model = TEELlamaModel(client, get_plan(plan))
    return Generator(model, eos_token_ids=set()).generate(PROMPT, SamplingParams(max_new_tokens=n))


@pytest.mark.parametrize("plan", PLANS)
def test_honest_generation_passes_with_every_result_checked(ckpt, plan):
    plain = _generate(_client(ckpt, verify=False), plan)
    client = _client(ckpt)
    verified = _generate(client, plan)
    assert verified.tokens == plain.tokens  # float32: the f32 mode changes nothing
    checked = client.verifier.stats.by_op
    sent = {
        op: n for op, n in client.metrics.rpc.items() if op not in ("Init", "OpenSession", "CloseSession")
    }
    assert checked == sent  # every result that came back was checked


@pytest.mark.parametrize("plan", ["v3-fused", "v2-fused"])
def test_honest_bfloat16_server_passes(ckpt, plan):
    client = _client(ckpt, "bfloat16")
    res = _generate(client, plan)
    assert len(res.tokens) == 6 and client.verifier.stats.checks > 0
    assert client.verifier.dtype == np.dtype("bfloat16")  # fingerprints of the bf16-rounded weights


# (plan, op, nth call, expected layer in the message): lies during the second decode step.
LIES = [
    ("v3", "Linear", 7 * 3 * 2 + 5, "Linear gate_proj of layer 0"),
    ("v3", "Matmul", 2 * 3 * 2 + 3, "Matmul (QKᵀ) of layer 1"),
    ("v3", "Embedding", 3, "Embedding"),
    ("v2", "LMHead", 3, "LMHead"),
    ("v2-fused", "QKV", 3 * 2 + 2, "QKV of layer 1"),
    ("v2-fused", "GateUp", 3 * 2 + 3, "GateUp of layer 2"),
    ("v3-fused", "AttnScores", 3 * 2 + 2, "AttnScores of layer 1"),
    ("v3-fused", "AttnOut", 3 * 2 + 3, "AttnOut of layer 2"),
    ("v3-fused", "QKV", 3 * 2 + 2, "QKV of layer 1"),
]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["perturb", "swap", "scale", "replay"])
@pytest.mark.parametrize("plan, op, nth, where", LIES)
def test_lies_are_caught_in_process(ckpt, plan, op, nth, where, mode):
    liar = {}

    def wrap(handler):
        liar["h"] = LyingHandler(handler, mode, op, nth)
        return liar["h"]

    model = TEELlamaModel(_client(ckpt, wrap=wrap), get_plan(plan))
    gen = Generator(model, eos_token_ids=set())
    with pytest.raises(IntegrityError, match="^" + re.escape(where) + ":"):
        gen.generate(PROMPT, SamplingParams(max_new_tokens=6))
    assert liar["h"].told


@pytest.mark.parametrize("op, nth", [("AttnScores", 3 * 2 + 2), ("AttnOut", 3 * 2 + 2)])
def test_stale_cache_results_are_caught(ckpt, op, nth):
    liar = {}

    def wrap(handler):
        liar["h"] = LyingHandler(handler, "stale", op, nth)
        return liar["h"]

    model = TEELlamaModel(_client(ckpt, wrap=wrap), get_plan("v3-fused"))
    with pytest.raises(IntegrityError, match=rf"^{op} of layer {(nth - 1) % 3}\b"):
        Generator(model, eos_token_ids=set()).generate(PROMPT, SamplingParams(max_new_tokens=6))
    assert liar["h"].told


def test_merged_plans_and_narrow_wire_are_refused(ckpt):
    model = TEELlamaModel(_client(ckpt), get_plan("v3-merged"))
    with pytest.raises(ValueError, match="--verify supports the plans"):
        model.forward(np.array([PROMPT]), model.new_cache())
    model = TEELlamaModel(_client(ckpt), get_plan("v2-fused"), decode_plan=get_plan("v3-fused"))
    cache = model.new_cache(1, 32)
    model.forward(np.array([PROMPT]), cache)
    with pytest.raises(ValueError, match="plan per phase"):  # a session whose K/V it never checked
        model.for_decode(cache)
    handler, _ = build_service(ckpt, "cpu", "float32", progress=False)
    with pytest.raises(ValueError, match="float32 on the wire"):
        VerifiedPort(
            GPUClient(LocalTransport(handler.handle), "bfloat16"),
            checkpoint=TrustedCheckpoint(ckpt),
            verify=True,
        )


# ---- through real processes ------------------------------------------------------------------
def _cli(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "teesplit", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize(
    "plan, mode, op, nth, where",
    [
        ("v3-fused", "perturb", "GateUp", 30 * 2 + 5, "GateUp of layer 4"),
        ("v3-fused", "stale", "AttnOut", 30 * 2 + 12, "AttnOut of layer 11"),
        ("v2-fused", "replay", "QKV", 30 * 2 + 8, "QKV of layer 7"),
    ],
)
@pytest.mark.slow
def test_lying_server_process_is_caught(smollm2_dir, tmp_path, plan, mode, op, nth, where):
    """A real server process lies once, in the second decode step; the runner (the real CLI)
    stops with IntegrityError, exit status 4, having printed only the verified tokens."""
    args = ["--model", str(smollm2_dir), "--prompt", "Name a colour.", "--chat", "--max-new-tokens", "4"]
    args += ["--plan", plan, "--verify"]
    honest = _honest_text(smollm2_dir, plan, args)
    address = free_tcp_address()
    script = TESTS / "lying_server.py"
    cmd = [sys.executable, str(script), str(smollm2_dir), address, mode, op, str(nth)]
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    try:
        wait_serving(proc, address, 120.0)
        r = _cli("generate", "--server", address, *args)
    finally:
        stop_server(proc)
    assert r.returncode == 4, r.stderr
    assert f"IntegrityError: {where}: the GPU server's result fails its Freivalds check" in r.stderr
    printed = r.stdout.rstrip("\n")
    assert printed and honest.stdout.startswith(printed)  # only verified tokens: two of them
    assert len(printed) < len(honest.stdout.rstrip("\n"))


_HONEST: dict[str, str] = {}


def _honest_text(smollm2_dir, plan, args) -> subprocess.CompletedProcess:
    """The verified output of an honest in-process run (float32: the same tokens as the server's)."""
    if plan not in _HONEST:
        r = _cli("generate", "--server", "local", "--device", "cpu", "--dtype", "float32", *args)
        assert r.returncode == 0, r.stderr
        _HONEST[plan] = r
    return _HONEST[plan]


# ---- checks deferred to the end of the pass, batched across layers ---------------------------
def _recorded_pass(ckpt, plan):
    """A verifying client mid-generation, and the pending checks of its next decode step."""
    client = _client(ckpt)
    model = TEELlamaModel(client, get_plan(plan))
    cache = model.new_cache()
    model.forward(np.array([PROMPT]), cache)
    passes = []
    check_pass = client.verifier.check_pass
    client.verifier.check_pass = lambda items: (passes.append(list(items)), check_pass(items))[1]
    model.forward(np.array([[11]]), cache)
    client.verifier.check_pass = check_pass
    assert [it[0] for it in passes[-1]] == ["LMHead"]  # the rest ran while the server computed it
    return client, [item for items in passes for item in items]


def _tamper(items, op, layer):
    """The pass with the result (last array) of `op` on `layer` scaled by 1.001."""
    out = []
    for o, lyr, payload in items:
        if o.removesuffix("+v") == op and lyr == layer:
            payload = (*payload[:-1], payload[-1] * np.float32(1.001))
        out.append((o, lyr, payload))
    return out


@pytest.mark.parametrize("plan", ["v3-fused", "v2-fused"])
def test_a_pass_is_checked_in_batches_and_the_first_lie_is_named(ckpt, plan):
    client, items = _recorded_pass(ckpt, plan)
    per_layer = 5 if plan == "v3-fused" else 4
    assert len(items) == per_layer * client.config.num_layers + 2  # every result of the step
    # A lie in layer 2's GateUp and one in layer 1's QKV: the earlier one in call order is named,
    # whatever order the batches run in (QKV before GateUp within a layer, layer 1 first).
    bad = _tamper(_tamper(items, "GateUp", 2), "QKV", 1)
    with pytest.raises(IntegrityError, match=r"^QKV of layer 1:"):
        _recorded_pass(ckpt, plan)[0].verifier.check_pass(bad)
    bad = _tamper(_tamper(items, "GateUp", 0), "QKV", 1)
    with pytest.raises(IntegrityError, match=r"^GateUp of layer 0:"):
        _recorded_pass(ckpt, plan)[0].verifier.check_pass(bad)


def test_an_irregular_pass_is_checked_one_by_one(ckpt):
    """Results that do not form one pass (a layer twice) take the one-by-one path: same verdicts."""
    client, items = _recorded_pass(ckpt, "v2-fused")
    gate_up = [it for it in items if it[0] == "GateUp"]
    client.verifier.check_pass([gate_up[1], gate_up[1], gate_up[0]])  # honest: passes
    lied = _tamper([gate_up[0]], "GateUp", 0)
    with pytest.raises(IntegrityError, match=r"^GateUp of layer 0:"):
        client.verifier.check_pass([gate_up[1], gate_up[1], *lied])


def test_checks_waiting_run_before_an_rpc_error_is_raised(ckpt):
    """A lie, then the server fails: the runner reports the lie (IntegrityError), not the failure."""
    from teesplit.protocol import error_reply

    class LiesThenFails(LyingHandler):
        def __init__(self, handler):
            super().__init__(handler, "scale", "GateUp", 3 + 1)  # layer 0 of the first decode step
            self.calls = 0
            honest = self.handle

            def handle(frames, peer=None):
                self.calls += 1
                if self.told:
                    return error_reply(None, "internal", "server error: out of memory")
                return honest(frames, peer) if peer is not None else honest(frames)

            self.handle = handle

    model = TEELlamaModel(_client(ckpt, wrap=LiesThenFails), get_plan("v2-fused"))
    with pytest.raises(IntegrityError, match=r"^GateUp of layer 0:"):
        Generator(model, eos_token_ids=set()).generate(PROMPT, SamplingParams(max_new_tokens=4))


def test_top_k_ids_is_a_stable_sort_of_the_largest():
    from teesplit.tee.verify import top_k_ids

    rng = np.random.default_rng(5)
    for k in (1, 2, 7, 40):
        logits = rng.integers(-5, 5, size=(3, 2, 40)).astype(np.float32)  # many ties
        want = np.argsort(-logits, axis=-1, kind="stable")[..., :k]
        np.testing.assert_array_equal(top_k_ids(logits, k), want)


def test_a_long_prefill_is_checked_in_parts(ckpt, monkeypatch):
    """Results waiting for their checks are bounded: past PENDING_BYTES they are checked early,
    in call order, and a lie among them is still named."""
    import teesplit.tee.verify as verify

    monkeypatch.setattr(verify, "PENDING_BYTES", 1)  # every result is checked as it comes
    client = _client(ckpt)
    model = TEELlamaModel(client, get_plan("v3-fused"))
    calls = []
    check_pass = client.verifier.check_pass
    client.verifier.check_pass = lambda items: (calls.append(len(items)), check_pass(items))[1]
    model.forward(np.array([PROMPT]), model.new_cache())
    assert calls == [1] * (5 * client.config.num_layers + 2)  # one result at a time
    liar = {}

    def wrap(handler):
        liar["h"] = LyingHandler(handler, "scale", "AttnOut", 2)
        return liar["h"]

    model = TEELlamaModel(_client(ckpt, wrap=wrap), get_plan("v3-fused"))
    with pytest.raises(IntegrityError, match=r"^AttnOut of layer 1:"):
        model.forward(np.array([PROMPT]), model.new_cache())


# The peak resident set (VmHWM; ru_maxrss would keep pytest's own peak across fork and exec).
MAXRSS = (
    "import re, sys\n"
    "from teesplit.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "peak = int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) * 1024\n"
    "print('MAXRSS', peak, file=sys.stderr)\n"
    "sys.exit(rc)\n"
)


@pytest.mark.slow
def test_verify_keeps_the_runner_small(smollm2_dir):
    """--verify fingerprints every weight once: a block of rows at a time, handing the
    checkpoint's pages back as it goes. The runner's peak resident memory grew from 98 MB to
    1.33 GB with --verify when it kept float64 copies and the mapped file."""
    from teesplit.launch import start_server

    address = free_tcp_address()
    srv = start_server(smollm2_dir, address, ["--device", "cpu", "--dtype", "float32", "--threads", "1"])
    peaks = {}
    try:
        for flags in ([], ["--verify"]):
            cmd = [sys.executable, "-c", MAXRSS, "generate", "--server", address, "--model", str(smollm2_dir)]
            cmd += ["--prompt", "Hi", "--max-new-tokens", "4", "--plan", "v3-fused", *flags]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            assert r.returncode == 0, r.stderr
            peaks[tuple(flags)] = int(re.search(r"MAXRSS (\d+)", r.stderr).group(1))
    finally:
        stop_server(srv)
    plain, verified = peaks[()], peaks[("--verify",)]
    print(f"runner peak RSS: {plain >> 20} MiB plain, {verified >> 20} MiB with --verify")
    assert verified - plain < 400 << 20
