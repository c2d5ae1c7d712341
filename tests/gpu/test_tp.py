"""Tensor parallelism (gpu/tp.py, gpu/tp_runtime.py): `teesplit serve --tp N` with gloo on this
machine's CPUs. The runner does not notice: the same plans give the same tokens as one rank,
hostile requests get the same replies, and a rank that dies or hangs ends in a clear error,
never a hang.

The small model here has 6 heads, 3 KV heads, MLP width 96 and a vocabulary of 128 (slices of
43, 43 and 42 over 3 ranks: uneven on purpose), with every bias, untied embeddings; SmolLM2
(tied embeddings) checks parity on real weights and the weight bytes per rank."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import local_model, make_checkpoint
from test_handler_fuzz import _mutate

from teesplit.config import ModelConfig
from teesplit.gpu.capacity import default_max_message_bytes
from teesplit.gpu.handler import RequestHandler
from teesplit.gpu.tp import (
    ShardPlan,
    TPConfigError,
    check_tp_size,
    load_shard,
    tp_sizes,
    vocab_bounds,
    weight_bytes,
)
from teesplit.gpu.weights import load_weights
from teesplit.launch import build_service, free_tcp_address, start_server, stop_server
from teesplit.protocol import Limits, RemoteError, parse_reply, request
from teesplit.tee.client import GPUClient
from teesplit.tee.generate import Generator, SamplingParams
from teesplit.tee.model import TEELlamaModel
from teesplit.tee.plans import get_plan
from teesplit.transport import GPUServerUnavailable
from teesplit.transport.local import LocalTransport
from teesplit.transport.shm import ShmTransport
from teesplit.transport.zmq import ZmqTransport

CPU = ["--device", "cpu", "--dtype", "float32", "--threads", "1", "--log-format", "json"]
SMALL = dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=3, intermediate_size=96)
SMALL |= dict(attention_bias=True, mlp_bias=True)
PROMPT = [3, 17, 42, 5, 99, 7]
PARAMS = SamplingParams(max_new_tokens=24)
PLANS = ("v3", "v2", "v3-fused", "v2-fused", "v3-merged", "v2-merged")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("tp"), "llama", **SMALL)


def smollm2_like() -> ModelConfig:
    return ModelConfig(
        "llama", 49152, 576, 1536, 30, 9, 3, 64, 1e-5, 8192, {"rope_type": "default", "rope_theta": 1e5}
    )


def events(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


def rank_pids(log: Path, n: int, timeout_s: float = 60.0) -> dict[int, int]:
    deadline = time.monotonic() + timeout_s
    while True:
        ready = {e["rank"]: e["pid"] for e in events(log) if e.get("event") == "tp_rank_ready"}
        if len(ready) == n or time.monotonic() > deadline:
            return ready
        time.sleep(0.2)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead, only not yet reaped
        return f.read().split(") ")[-1][0] != "Z"


def wait_gone(pids, timeout_s: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = [p for p in pids if alive(p)]
        if not left:
            return []
        time.sleep(0.2)
    return [p for p in pids if alive(p)]


def start_tp(ckpt, address: str, log: Path, extra: list[str] = (), tp: int = 3):
    """A `serve --tp` process answering at address, and its ranks' pids (all ranks are up)."""
    with open(log, "w") as f:
        proc = start_server(ckpt, address, [*CPU, "--tp", str(tp), *extra], stderr=f, timeout=300)
    pids = rank_pids(log, tp)
    if sorted(pids) != list(range(tp)):
        stop_server(proc)
        raise AssertionError(f"ranks ready: {sorted(pids)}; log:\n{log.read_text()[-3000:]}")
    return proc, pids


def client(address: str, timeout_s: float = 30.0, retries: int = 2) -> GPUClient:
    shm = address.startswith("shm://")
    transport = ShmTransport(address, timeout_s) if shm else ZmqTransport(address, timeout_s)
    return GPUClient(transport, retries=retries)


def tokens(model: TEELlamaModel, prompt=PROMPT, params=PARAMS) -> list[int]:
    return Generator(model, eos_token_ids=set()).generate(prompt, params).tokens


# ---- what fits: no processes ----------------------------------------------------------------------
def test_a_tp_that_does_not_divide_the_model_is_refused_naming_the_sizes_that_work():
    config = smollm2_like()
    assert tp_sizes(config) == [1, 3]
    check_tp_size(config, 3)
    with pytest.raises(TPConfigError) as e:
        check_tp_size(config, 2)
    msg = str(e.value)
    assert "--tp 2 does not divide" in msg and "9 attention heads" in msg and "3 KV heads" in msg
    assert msg.endswith("1, 3 work")


def test_vocabulary_slices_cover_it_once():
    assert vocab_bounds(128, 3) == [0, 43, 86, 128]
    assert vocab_bounds(49152, 3) == [0, 16384, 32768, 49152]


def test_a_rank_loads_only_its_slices_and_the_slices_tile_the_model(ckpt):
    whole = load_weights(ckpt, torch.device("cpu"), torch.float32, progress=False)
    config = whole.config
    shards = [load_shard(ckpt, ShardPlan(config, 3, r), torch.device("cpu"), torch.float32) for r in range(3)]
    D = config.head_dim
    for i, layer in enumerate(whole.layers):
        parts = [s.layers[i] for s in shards]
        for m, width in (("q_proj", 2 * D), ("k_proj", D), ("v_proj", D), ("gate_proj", 32), ("up_proj", 32)):
            assert all(p.weight[m].shape[0] == width for p in parts)
            assert torch.equal(torch.cat([p.weight[m] for p in parts]), layer.weight[m])
            assert torch.equal(torch.cat([p.bias[m] for p in parts]), layer.bias[m])
        for m in ("o_proj", "down_proj"):
            assert torch.equal(torch.cat([p.weight[m] for p in parts], dim=1), layer.weight[m])
            assert torch.equal(parts[0].bias[m], layer.bias[m])  # added once, by rank 0
            assert m not in parts[1].bias and m not in parts[2].bias
        assert all(torch.equal(p.input_norm, layer.input_norm) for p in parts)
    assert [s.embed.shape[0] for s in shards] == [43, 43, 42]
    assert torch.equal(torch.cat([s.embed for s in shards]), whole.embed)
    assert torch.equal(torch.cat([s.lm_head for s in shards]), whole.lm_head)
    # Each rank's memory holds its slices only (a slice read as a view of the whole tensor would not).
    assert all(weight_bytes(s) < 0.345 * weight_bytes(whole) for s in shards)


@pytest.mark.slow
def test_tp_2_on_smollm2_is_refused_at_start_with_the_sizes_that_work(smollm2_dir):
    cmd = [sys.executable, "-m", "teesplit", "serve", "--model", str(smollm2_dir), "--tp", "2"]
    r = subprocess.run(cmd + ["--bind", free_tcp_address()], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "--tp 2 does not divide this model's 9 attention heads and 3 KV heads" in r.stderr
    assert "1, 3 work" in r.stderr
    assert "tp_rank_ready" not in r.stderr  # refused before any rank started


# ---- one group of 3 ranks, shared by the tests below ------------------------------------------------
@pytest.fixture(scope="module")
def tp_server(ckpt, tmp_path_factory):
    log = tmp_path_factory.mktemp("tp-log") / "server.log"
    address = free_tcp_address()
    extra = ["--max-sessions", "3", "--max-kv-gib", "0.0001"]
    proc, pids = start_tp(ckpt, address, log, extra)
    yield {"address": address, "proc": proc, "pids": pids, "log": log}
    stop_server(proc)  # SIGTERM to the launcher: every rank stops, exit code 0, no orphans
    assert proc.returncode == 0
    assert wait_gone(pids.values()) == []
    stops = [e for e in events(log) if e.get("event") == "tp_worker_stop"]
    assert sorted(e["rank"] for e in stops) == [1, 2]
    assert all(e["leaked"] == 0 for e in stops), stops  # no request reached a worker unchecked


@pytest.mark.slow
@pytest.mark.parametrize("plan", PLANS)
def test_every_plan_gives_the_tokens_of_one_rank(tp_server, ckpt, plan):
    want = tokens(local_model(ckpt, plan))
    c = client(tp_server["address"])
    try:
        assert tokens(TEELlamaModel(c, get_plan(plan))) == want
    finally:
        c.close()


def private_model(model_dir, address: str, plan: str = "private-otp", weights: str = "int16"):
    """A runner of a private plan (its ports, pads and checks) over the server at `address`."""
    from teesplit.tee.assemble import Assembly, RunnerSettings

    rs = RunnerSettings(Path(model_dir), (address,), plan, private_weights=weights, timeout_s=120.0)
    return Assembly(rs).connect()[0]


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["int16", "int8"])
def test_a_private_plan_gives_the_tokens_of_one_rank(tp_server, ckpt, weights):
    """Every rank quantizes its shard with the whole rows' scales, so the group multiplies by
    the integers the trusted side derived: its checks pass and the tokens are one rank's."""
    want = tokens(local_model(ckpt, "private-otp", private_weights=weights))
    model = private_model(ckpt, tp_server["address"], weights=weights)
    try:
        assert tokens(model) == want
    finally:
        model.gpu.close()


@pytest.mark.slow
def test_a_group_serving_only_private_plans_holds_a_third_of_the_integers_each(ckpt, tmp_path):
    """`serve --tp 3 --private-weights int8`: every rank quantizes at start and frees its float
    matrices; the plain plans are refused, the private one gives one rank's tokens."""
    log, address = tmp_path / "server.log", free_tcp_address()
    proc, pids = start_tp(ckpt, address, log, ["--private-weights", "int8"])
    try:
        model = private_model(ckpt, address, weights="int8")
        try:
            assert tokens(model) == tokens(local_model(ckpt, "private-otp", private_weights="int8"))
        finally:
            model.gpu.close()
        c = client(address, retries=0)
        try:
            with pytest.raises(RemoteError) as e:
                c.call("QKV", {"layer": 0}, (np.ones((1, 2, 48), np.float32),))
            assert e.value.code == "bad_args" and "--private-weights" in str(e.value)
        finally:
            c.close()
    finally:
        stop_server(proc)
    assert proc.returncode == 0 and wait_gone(pids.values()) == []
    one, _ = build_service(ckpt, "cpu", "float32", private_weights="int8", progress=False)
    whole = one.service._ring[8].nbytes
    ready = [e for e in events(log) if e.get("event") == "tp_rank_ready"]
    assert sorted(e["rank"] for e in ready) == [0, 1, 2]
    for e in ready:  # a third of the integers (and the LM head's slice padded to a multiple of 8)
        assert e["private_weights"] == "int8"
        assert 0.32 < e["private_bytes"] / whole < 0.36, (e["rank"], e["private_bytes"], whole)


@pytest.mark.slow
def test_verified_results_pass_their_checks(tp_server, ckpt):
    """--verify takes Init's config, norms and biases only if they equal the runner's checkpoint,
    asks for float32 results (f32) and checks each one: the group's pass."""
    from teesplit.tee.checkpoint import TrustedCheckpoint
    from teesplit.tee.verify import VerifiedPort

    want = tokens(local_model(ckpt, "v3-fused"))
    transport = ZmqTransport(tp_server["address"], 30.0)
    c = VerifiedPort(GPUClient(transport), checkpoint=TrustedCheckpoint(ckpt), verify=True, seed=0)
    try:
        assert tokens(TEELlamaModel(c, get_plan("v3-fused"))) == want
    finally:
        c.close()


@pytest.mark.slow
def test_session_limits_are_the_servers_not_a_ranks(tp_server):
    """--max-sessions and --max-kv-gib count the whole group's sessions and cache bytes."""
    c = client(tp_server["address"], retries=0)
    opened = []
    try:
        for _ in range(4):
            try:
                opened.append(c.call("OpenSession", {"batch": 1, "max_tokens": 4096})[0])
            except RemoteError as e:
                assert e.code == "too_large" and "--max-sessions`" in str(e)
                break
        assert 1 <= len(opened) <= 3
        per_token = opened[0]["kv_bytes_per_token"]
        assert per_token == 2 * 2 * 3 * 8 * 4  # layers, K and V, all 3 KV heads, head dim, float32
        x, pos = np.ones((1, 700, 48), np.float32), np.zeros(1, np.int64)  # 700 tokens: over 0.0001 GiB
        with pytest.raises(RemoteError) as e:
            c.call("QKV", {"layer": 0}, (x, pos), opened[0]["sid"])
        assert e.value.code == "too_large" and "--max-kv-gib`" in str(e.value)
    finally:
        for res in opened:
            c.call("CloseSession", sid=res["sid"])
        c.close()


def _requests(sid: int) -> list[list]:
    """One of each operation, on the small model, for the differential test."""
    E, F, H, HKV, D = 48, 96, 6, 3, 8
    x, pos = np.linspace(-1, 1, 2 * E, dtype=np.float32).reshape(1, 2, E), np.zeros(1, np.int64)
    ops = [
        ("Embedding", {"dtype": "float16"}, [np.array([[3, 44, 127]])], None),
        ("Linear", {"layer": 1, "module": "down_proj"}, [np.ones((1, 2, F), np.float32)], None),
        ("Linear", {"layer": 0, "module": "o_proj"}, [np.ones((1, 2, H * D), np.float32)], None),
        ("Linear", {"layer": 0, "module": "k_proj"}, [x], None),
        ("LMHead", {"top_k": 3}, [x], None),
        ("LMHead", {}, [x], None),
        ("QKV", {"layer": 0}, [x], None),
        ("QKV", {"layer": 0}, [x, pos], sid),
        (
            "AttnScores",
            {"layer": 0},
            [np.ones((1, H, 2, D), np.float32), np.ones((1, HKV, 2, D), np.float32), pos],
            sid,
        ),
        ("AttnOut", {"layer": 0}, [np.full((1, H, 2, 2), 0.5, np.float32)], sid),
        ("WriteKV", {"layer": 1}, [np.ones((1, HKV, 2, D), np.float32)] * 2 + [pos], sid),
        ("GateUp", {"layer": 1}, [x.astype(np.float16)], None),
        ("EmbedQKV", {}, [np.array([[1, 2]]), pos], sid),
        ("DownQKV", {"layer": 0}, [np.ones((1, 2, F), np.float32), x], None),
        ("DownLMHead", {"top_k": 2}, [np.ones((1, 2, F), np.float32), x, np.array([1])], None),
        ("OGateUp", {"layer": 1}, [np.ones((1, 2, H * D), np.float32), x], None),
        ("AttnOutGateUp", {"layer": 0}, [np.full((1, H, 2, 2), 0.5, np.float32), x], sid),
        ("Matmul", {}, [np.ones((2, 3), np.float32), np.ones((3, 4), np.float32)], None),
        # The private plans' ring steps: ring elements over the whole int64 range, so every
        # product wraps modulo 2^64; replies must be equal bit for bit.
        ("RingSetup", {"bits": 16}, [], None),
        ("RingEmbedQKV", {"bits": 16}, [ring(2, 3, E)], None),
        ("RingOGateUp", {"layer": 1, "bits": 16}, [ring(2, 3, H * D), ring(2, 3, E)], None),
        ("RingDownQKV", {"layer": 0, "bits": 16}, [ring(1, 2, F), ring(1, 2, E)], None),
        ("RingDownLMHead", {"bits": 16}, [ring(2, 1, F), ring(2, 1, E)], None),
        ("RingSetup", {"bits": 8}, [], None),
        ("RingOGateUp", {"layer": 0, "bits": 8}, [ring(1, 4, H * D), ring(1, 4, E)], None),
        ("RingDownLMHead", {"bits": 8}, [ring(1, 1, F), ring(1, 1, E)], None),
        ("RingOGateUp", {"layer": 0, "bits": 9}, [ring(1, 2, H * D), ring(1, 2, E)], None),  # refused
        ("RingDownQKV", {"layer": 1, "bits": 16}, [ring(1, 2, F), ring(1, 2, E)], None),  # the last layer's
        ("Ping", {}, [np.zeros(4, np.float32)], None),
        ("OpenSession", {"batch": 1, "max_tokens": 4096}, [], None),
        ("CloseSession", {}, [], sid + 1),
    ]
    return [[bytes(f) for f in request(i, op, args, t, s)] for i, (op, args, t, s) in enumerate(ops, start=1)]


def ring(*shape: int) -> np.ndarray:
    """Ring elements (int64 read modulo 2^64) drawn from the whole range, the same on every call."""
    rng = np.random.default_rng(sum(shape))
    return rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, shape, dtype=np.int64, endpoint=True)


def _same_reply(a: list, b: list, what: str) -> int | None:
    """Replies from one rank and from the group: the same header (error code and message, or
    result map), and tensors equal up to float32 summation order (exactly, for integers).
    Where the request held NaN, Inf or 3e38 (a mutation), overflow can land in a different
    place when the sums are added in another order: only elements finite on both sides count.
    Returns the id of a session the group opened, if it did."""
    ha, ta = parse_reply_or_error(a)
    hb, tb = parse_reply_or_error(b)
    opened = hb.get("res", {}).pop("sid", None)  # drawn at random on each server
    ha.get("res", {}).pop("sid", None)
    for h in (ha, hb):  # RingSetup: each rank pads its own integer matrices to multiples of 8
        h.get("res", {}).pop("bytes_per_weight", None)
    assert ha == hb, what
    assert [(t.shape, t.dtype) for t in ta] == [(t.shape, t.dtype) for t in tb], what
    floats = [t.astype(np.float32) for t in ta + tb if t.dtype != np.int64]
    garbage = not all(np.isfinite(t).all() for t in floats)  # top-k ids of NaN logits are any
    for x, y in zip(ta, tb, strict=True):
        if x.dtype == np.int64:
            assert garbage or np.array_equal(x, y), what
            continue
        x, y = x.astype(np.float32), y.astype(np.float32)
        both = np.isfinite(x) & np.isfinite(y)
        np.testing.assert_allclose(x[both], y[both], rtol=2e-3, atol=2e-3, err_msg=what)
    return opened


def parse_reply_or_error(frames: list) -> tuple[dict, list]:
    try:
        header, tensors = parse_reply(frames, "?")
    except RemoteError as e:
        return {"code": e.code, "msg": e.remote_message}, []
    return {"ok": True, "res": dict(header.get("res", {}))}, tensors


@pytest.mark.slow
def test_hostile_and_fuzzed_requests_get_the_replies_one_rank_gives(tp_server, ckpt):
    """The same stream of requests, well-formed and mutated, to one rank in process and to the
    group: every reply the same (codes and messages too), and the group keeps serving."""
    built, _ = build_service(ckpt, "cpu", "float32", progress=False)
    built.service.limits = build_limits()
    # The group's message size: what the model's largest legitimate message needs (the default)
    most = default_max_message_bytes(built.service.config, 8192, 64)
    handler = RequestHandler(built.service, Limits(max_tensor_bytes=most))
    c = client(tp_server["address"], retries=0)
    sid = c.call("OpenSession", {"batch": 1, "max_tokens": 64})[0]["sid"]
    handler.service.open_session(1, 64, sid=sid, owner=b"peer")  # the same session id on both sides
    rng, opened = np.random.default_rng(7), [sid]
    templates = _requests(sid)
    try:
        for frames in templates:  # well-formed first, in order (the session's cache fills)
            opened.append(_same_reply(handler.handle(frames, b"peer"), roundtrip(c, frames), frames[0][:120]))
        for _ in range(600):
            frames, _ = _mutate(rng, templates[rng.integers(len(templates))])
            got = roundtrip(c, frames)
            opened.append(_same_reply(handler.handle(frames, b"peer"), got, repr(frames[0][:200])))
        assert c.call("Ping")[0]["sessions"] >= 1  # still serving
    finally:
        for s in {s for s in opened if s is not None}:
            try:
                c.call("CloseSession", sid=s)
            except RemoteError:
                pass  # closed by a request of the stream
        c.close()


def roundtrip(c: GPUClient, frames: list) -> list:
    c.transport.send(frames)
    return c.transport.recv(30.0)


def build_limits():
    from teesplit.gpu.service import SessionLimits

    return SessionLimits(max_sessions=3, max_kv_bytes=int(0.0001 * (1 << 30)))


# ---- failures -------------------------------------------------------------------------------------------
def _killed_mid_generation(address: str, pid: int, sig: int, at: int, timeout_s: float, retries: int = 0):
    """Generate through the group; send `sig` to `pid` just before the at-th request."""
    c = client(address, timeout_s=timeout_s, retries=retries)
    real_call, calls = c.call, [0]

    def call(*args, **kwargs):
        calls[0] += 1
        if calls[0] == at:
            os.kill(pid, sig)
        return real_call(*args, **kwargs)

    c.call = call
    try:
        return Generator(TEELlamaModel(c, get_plan("v3-fused")), eos_token_ids=set()).generate(PROMPT, PARAMS)
    finally:
        c.close()


@pytest.mark.slow
def test_a_killed_worker_gives_the_runner_a_clear_error_and_the_group_stops(ckpt, tmp_path):
    log = tmp_path / "server.log"
    address = free_tcp_address()
    proc, pids = start_tp(ckpt, address, log)
    try:
        with pytest.raises(RemoteError) as e:
            _killed_mid_generation(address, pids[2], signal.SIGKILL, at=30, timeout_s=60)
        assert e.value.code == "internal" and "tensor-parallel group (3 ranks) failed" in str(e.value)
        assert proc.wait(60) != 0  # the launcher reports the failure
    finally:
        if proc.poll() is None:
            proc.kill()
    assert wait_gone(pids.values()) == []  # no orphans
    assert any(e.get("event") == "tp_group_failed" for e in events(log))


@pytest.fixture(scope="module")
def shm_group(ckpt, tmp_path_factory):
    """A group serving shm:// with short timeouts: sessions idle for 4 s are dropped, and a
    collective waits at most 5 s."""
    log = tmp_path_factory.mktemp("tp-shm") / "server.log"
    address = f"shm://teesplit-test-tp-{os.getpid()}"
    proc, pids = start_tp(ckpt, address, log, ["--session-idle-timeout", "4", "--tp-timeout", "5"])
    yield {"address": address, "proc": proc, "pids": pids, "log": log}
    if proc.poll() is None:
        proc.kill()
    assert wait_gone(pids.values()) == []


@pytest.mark.slow
def test_over_shm_an_expired_session_is_dropped_on_every_rank_and_the_runner_replays(shm_group, ckpt):
    want = tokens(local_model(ckpt, "v3-fused"))
    c = client(shm_group["address"])
    real_call, calls = c.call, [0]

    def call(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 40:
            time.sleep(6)  # the runner stalls; the group drops the idle session
        return real_call(*args, **kwargs)

    c.call = call
    try:
        result = Generator(TEELlamaModel(c, get_plan("v3-fused")), eos_token_ids=set()).generate(
            PROMPT, PARAMS
        )
    finally:
        c.close()
    assert result.tokens == want and result.stats["recoveries"] == 1
    assert any(e.get("event") == "session_expire" for e in events(shm_group["log"]))


@pytest.mark.slow
def test_a_hung_worker_ends_in_an_error_within_the_timeout(shm_group, ckpt):
    """A rank that stops answering (SIGSTOP) is noticed when the collective's timeout runs out:
    the runner gets an error, not a hang, and the group stops. (Ends shm_group.)"""
    pids, t0 = shm_group["pids"], time.monotonic()
    try:
        # Rank 0 answers the request in flight with the group's failure, then exits; on a
        # loaded machine the runner may see the connection close before it reads that answer
        # (a known race of the shm transport): either way a clear error, well within the bound.
        with pytest.raises((RemoteError, GPUServerUnavailable)) as e:
            _killed_mid_generation(shm_group["address"], pids[1], signal.SIGSTOP, at=20, timeout_s=60)
        waited = time.monotonic() - t0
    finally:
        os.kill(pids[1], signal.SIGCONT)
    if isinstance(e.value, RemoteError):
        assert e.value.code == "internal" and "tensor-parallel group (3 ranks) failed" in str(e.value)
    else:
        assert "connection to the GPU server" in str(e.value) and "was lost" in str(e.value)
    assert waited < 40, f"{waited:.1f} s"
    assert shm_group["proc"].wait(60) != 0


@pytest.mark.slow
def test_after_a_restart_the_runners_retry_and_replay_recover(ckpt, tmp_path):
    """With --max-restarts the launcher restarts the whole group when a rank dies; rank 0 does
    not answer the request in flight, so the runner's retry reaches the new group, which has
    lost the session: the runner replays it and the tokens are those of an uninterrupted run."""
    want = tokens(local_model(ckpt, "v3-fused"))
    log = tmp_path / "server.log"
    address = free_tcp_address()
    proc, pids = start_tp(ckpt, address, log, ["--max-restarts", "1"])
    try:
        result = _killed_mid_generation(address, pids[1], signal.SIGKILL, at=30, timeout_s=30, retries=4)
        assert result.tokens == want
        assert result.stats["retries"] >= 1 and result.stats["recoveries"] == 1
        restarted = rank_pids(log, 3)
        assert len([e for e in events(log) if e.get("event") == "tp_rank_ready"]) == 6
    finally:
        stop_server(proc)
    assert wait_gone([*pids.values(), *restarted.values()]) == []


# ---- real weights ---------------------------------------------------------------------------------------
SMOL_PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how photosynthesis works.",
    "Give me three tips for learning a new programming language.",
]


@pytest.fixture(scope="module")
def smol_tp(smollm2_dir, tmp_path_factory):
    from teesplit.tee.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(smollm2_dir)
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}]) for p in SMOL_PROMPTS]
    log = tmp_path_factory.mktemp("smol-tp") / "server.log"
    address = free_tcp_address()
    proc, pids = start_tp(smollm2_dir, address, log)
    yield {"address": address, "log": log, "tok": tok, "prompts": prompts, "dir": smollm2_dir}
    stop_server(proc)
    assert proc.returncode == 0 and wait_gone(pids.values()) == []


@pytest.fixture(scope="module")
def smol_one(smollm2_dir):
    handler, _ = build_service(smollm2_dir, "cpu", "float32", progress=False)
    return handler


@pytest.mark.slow
@pytest.mark.parametrize("plan", ["v3-fused", "v2-merged", "private-otp"])
def test_smollm2_greedy_tokens_equal_one_rank_on_the_parity_prompts(smol_tp, smol_one, plan):
    params = SamplingParams(max_new_tokens=32)

    def model(transport):
        return TEELlamaModel(GPUClient(transport, retries=0), get_plan(plan))

    if get_plan(plan).private is not None:  # its ports quantize the trusted checkpoint too
        one = local_model(smol_tp["dir"], plan)
        many = private_model(smol_tp["dir"], smol_tp["address"], plan)
    else:
        one = model(LocalTransport(smol_one.handle))
        many = model(ZmqTransport(smol_tp["address"], 120.0))
    try:
        for ids in smol_tp["prompts"]:
            want = Generator(one, smol_tp["tok"]).generate(ids, params).tokens
            assert len(want) == 32
            assert Generator(many, smol_tp["tok"]).generate(ids, params).tokens == want
    finally:
        many.gpu.close()
        one.gpu.close()


@pytest.mark.slow
def test_smollm2_each_rank_holds_a_third_of_the_weights(smol_tp, smollm2_dir):
    whole = weight_bytes(load_weights(smollm2_dir, torch.device("cpu"), torch.float32, progress=False))
    ready = [e for e in events(smol_tp["log"]) if e.get("event") == "tp_rank_ready"]
    assert len(ready) == 3
    for e in ready:
        share = e["weight_bytes"] / whole
        assert 0.32 < share < 0.35, f"rank {e['rank']}: {share:.3f} of the weights"
