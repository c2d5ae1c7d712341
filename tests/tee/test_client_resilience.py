"""Runner resilience: retries with the same request id answered from the server's reply cache,
a version handshake, recovery of a generation across a server restart (SIGKILL) and across an
expired session, clean failure when the server stays dead, graceful shutdown of the server,
Ctrl-C in the runner, NaN/Inf refused before it reaches a session's KV cache."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq
from helpers import local_model, make_checkpoint

from teesplit import protocol
from teesplit.gpu.zmq_server import split_envelope
from teesplit.launch import build_service, free_tcp_address, start_server, stop_server
from teesplit.protocol import PROTOCOL_VERSION, RemoteError, parse_reply, request
from teesplit.tee.client import GPUClient, ProtocolVersionMismatch
from teesplit.tee.generate import Generator, SamplingParams
from teesplit.tee.model import TEELlamaModel
from teesplit.tee.plans import get_plan
from teesplit.transport import GPUServerUnavailable
from teesplit.transport.zmq import ZmqTransport

CPU = ["--device", "cpu", "--dtype", "float32", "--threads", "1"]
PROMPT = [3, 17, 42, 5, 99, 7]
PARAMS = SamplingParams(max_new_tokens=40)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("resil"), "llama")


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    log = tmp_path_factory.mktemp("resil-log") / "server.log"
    address = free_tcp_address()
    with open(log, "w") as f:
        proc = start_server(ckpt, address, [*CPU, "--log-format", "json"], stderr=f)
    yield address
    stop_server(proc)


def client(address: str, timeout_s: float = 20.0, retries: int = 2) -> GPUClient:
    return GPUClient(ZmqTransport(address, timeout_s=timeout_s), retries=retries)


def sessions_open(address: str) -> int:
    c = client(address, 10.0, 0)
    try:
        res, _ = c.call("Ping")
    finally:
        c.close()
    return res["sessions"]


def events(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


# ---- retries: same request id, answered from the reply cache --------------------------------
class LossyServer:
    """The real RequestHandler behind a ROUTER that loses or delays chosen replies."""

    def __init__(self, handler, drop: dict[str, int], delay: dict[str, float]):
        self.handler, self.drop, self.delay = handler, drop, delay
        self.address = free_tcp_address()
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        self.ready.wait(10)

    def run(self) -> None:
        sock = zmq.Context.instance().socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        sock.bind(self.address)
        self.ready.set()
        late: list[tuple[float, list]] = []
        try:
            while not self.stop.is_set():
                for due, frames in [x for x in late if x[0] <= time.monotonic()]:
                    sock.send_multipart(frames)
                    late.remove((due, frames))
                if not sock.poll(20):
                    continue
                envelope, message = split_envelope(sock.recv_multipart())
                out = [*envelope, *self.handler.handle(message, bytes(envelope[0]))]
                op = msgpack.unpackb(message[0])["op"]
                if self.drop.get(op):
                    self.drop[op] -= 1  # the reply is lost on the way back
                elif op in self.delay:
                    late.append((time.monotonic() + self.delay.pop(op), out))  # it comes, too late
                else:
                    sock.send_multipart(out)
        finally:
            sock.close(0)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)


@pytest.fixture(scope="module")
def handler(ckpt):
    h, _ = build_service(ckpt, "cpu", "float32", progress=False)
    return h


def test_lost_replies_are_resent_with_the_same_id_and_replayed(handler):
    srv = LossyServer(handler, drop={"OpenSession": 1, "CloseSession": 1, "QKV": 1}, delay={})
    c = client(srv.address, timeout_s=0.3, retries=2)
    try:
        c.init()
        replayed0, n0 = handler.replayed, len(handler.service.sessions)
        sid = c.open_session(1, 16)
        # One session, not two: the resent OpenSession got the cached reply.
        assert len(handler.service.sessions) == n0 + 1 and sid in handler.service.sessions
        x = np.ones((1, 2, 64), np.float32)
        qk = c.qkv(0, x, sid, np.zeros(1, np.int64))
        assert qk.shape == (1, 2, 64 + 32)
        c.close_session(sid)  # the resend is answered "closed", not no_session
        assert sid not in handler.service.sessions
        assert c.retried == 3 and handler.replayed - replayed0 == 3
    finally:
        c.close()
        srv.close()


def test_a_late_reply_never_leaks_into_the_next_request(handler):
    srv = LossyServer(handler, drop={}, delay={"Linear": 0.5})
    c = client(srv.address, timeout_s=0.3, retries=2)
    try:
        c.init()
        x = np.random.default_rng(0).standard_normal((1, 1, 64)).astype(np.float32)
        a = c.linear(0, "q_proj", x)
        time.sleep(0.6)  # the late reply to the first try arrives now
        b = c.linear(0, "k_proj", x)
        assert a.shape == (1, 1, 64) and b.shape == (1, 1, 32)
        _, (want,) = parse_reply(
            handler.handle(request(1, "Linear", {"layer": 0, "module": "k_proj"}, [x])), ""
        )
        np.testing.assert_array_equal(b, want)
        assert c.retried == 1
    finally:
        c.close()
        srv.close()


def test_no_server_raises_unavailable_naming_address_and_tries():
    address = free_tcp_address()
    c = client(address, timeout_s=0.2, retries=2)
    t0 = time.monotonic()
    with pytest.raises(GPUServerUnavailable) as e:
        c.call("Ping")
    elapsed = time.monotonic() - t0
    c.close()
    assert address in str(e.value) and "3 tries of 0.2 s" in str(e.value)
    assert 0.55 < elapsed < 1.5


# ---- the version handshake ------------------------------------------------------------------------
@pytest.mark.slow
def test_server_refuses_another_protocol_version_naming_both(server):
    c = client(server)
    try:
        for other, frames in (
            (
                PROTOCOL_VERSION + 1,
                [msgpack.packb({"v": PROTOCOL_VERSION + 1, "id": 1, "op": "Init", "t": []})],
            ),
            (PROTOCOL_VERSION + 7, request(1, "Init", {"version": PROTOCOL_VERSION + 7})),
        ):
            c.transport.send(frames)
            with pytest.raises(RemoteError) as e:
                parse_reply(c.transport.recv(), "Init")
            assert e.value.code == "bad_version"
            assert f"version {other}" in str(e.value) and f"speaks version {PROTOCOL_VERSION}" in str(e.value)
        init = c.init()  # the matching version is served, and the reply names it
        # and the message size, derived from the model (the floor, for this tiny one)
        assert init.config.num_layers == 2 and c.max_message_bytes == 64 << 20
    finally:
        c.close()


def test_client_raises_a_typed_error_naming_both_versions(server, monkeypatch):
    monkeypatch.setattr(protocol, "PROTOCOL_VERSION", 99)
    c = client(server)
    try:
        with pytest.raises(ProtocolVersionMismatch) as e:
            c.init()
    finally:
        c.close()
    assert e.value.client_version == 99 and e.value.server_version == PROTOCOL_VERSION
    assert "version 99" in str(e.value) and f"version {PROTOCOL_VERSION}" in str(e.value)
    assert server in str(e.value)


# ---- NaN / Inf ---------------------------------------------------------------------------------
def test_non_finite_values_never_reach_a_session_cache(handler):
    def call(op, args, tensors, sid=None):
        return parse_reply(handler.handle(request(1, op, args, tensors, sid)), op)

    sid = call("OpenSession", {"batch": 1, "max_tokens": 8}, [])[0]["res"]["sid"]
    pos = np.zeros(1, np.int64)
    x = np.ones((1, 1, 64), np.float32)
    x[0, 0, 5] = np.nan
    with pytest.raises(RemoteError) as e:
        call("QKV", {"layer": 0}, [x, pos], sid)
    assert e.value.code == "bad_tensor" and "NaN or Inf" in str(e.value)
    k = np.ones((1, 2, 1, 16), np.float32)
    k[0, 1, 0, 3] = np.inf
    with pytest.raises(RemoteError) as e:
        call("AttnScores", {"layer": 0}, [np.ones((1, 4, 1, 16), np.float32), k, pos], sid)
    assert e.value.code == "bad_tensor"
    s = handler.service.sessions[sid]
    assert (s.k_len == 0).all() and (s.v_len == 0).all()  # nothing was written
    call("QKV", {"layer": 0}, [np.ones((1, 1, 64), np.float32), pos], sid)  # finite: fine
    assert s.v_len[0, 0] == 1
    _, (y,) = call("QKV", {"layer": 0}, [x])  # no session: NaN in, NaN back to the sender only
    assert np.isnan(y).any()
    call("CloseSession", {}, [], sid)


# ---- recovery without loss ------------------------------------------------------------------------
def expected_tokens(ckpt, plan: str) -> list[int]:
    return Generator(local_model(ckpt, plan), eos_token_ids=set()).generate(PROMPT, PARAMS).tokens


@pytest.mark.slow
@pytest.mark.parametrize("plan, kill_at", [("v3-fused", 150), ("v2-fused", 125)])
def test_generation_survives_a_server_killed_and_restarted(ckpt, tmp_path, plan, kill_at):
    """SIGKILL the server at the kill_at-th RPC (mid-decode), restart it on the same address;
    the generation goes on and its tokens equal an uninterrupted run."""
    want = expected_tokens(ckpt, plan)
    address = free_tcp_address()
    procs = [start_server(ckpt, address, CPU)]
    c = client(address, timeout_s=20.0, retries=2)
    model = TEELlamaModel(c, get_plan(plan))
    calls, restart, starters = [0], [], []
    real_call = c.call

    def call(*args, **kwargs):
        calls[0] += 1
        if calls[0] == kill_at:
            procs[0].send_signal(signal.SIGKILL)
            procs[0].wait()
            restart.append(time.monotonic())
            starters.append(threading.Thread(target=lambda: procs.append(start_server(ckpt, address, CPU))))
            starters[-1].start()
        return real_call(*args, **kwargs)

    c.call = call
    try:
        result = Generator(model, eos_token_ids=set()).generate(PROMPT, PARAMS)
        resumed = time.monotonic()
    finally:
        c.close()
        for t in starters:  # a generation that failed early must not leave the new server behind
            t.join()
        for p in procs[1:]:
            stop_server(p)
    assert restart, "the server was never killed: the generation was too short"
    assert result.tokens == want
    assert result.stats["retries"] >= 1
    # v3-fused keeps K/V in a server session: the restart lost it and the runner rebuilt it.
    assert result.stats["recoveries"] == (1 if plan == "v3-fused" else 0)
    print(f"{plan}: killed at RPC {kill_at}, generation resumed; kill to end {resumed - restart[0]:.1f} s")


@pytest.mark.slow
def test_generation_survives_an_expired_session(ckpt, tmp_path):
    want = expected_tokens(ckpt, "v3-fused")
    log = tmp_path / "server.log"
    address = free_tcp_address()
    with open(log, "w") as f:
        proc = start_server(
            ckpt, address, [*CPU, "--session-idle-timeout", "0.5", "--log-format", "json"], stderr=f
        )
    c = client(address)
    real_call, calls = c.call, [0]

    def call(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 100:
            time.sleep(1.5)  # the runner stalls; the server drops the idle session
        return real_call(*args, **kwargs)

    c.call = call
    try:
        result = Generator(TEELlamaModel(c, get_plan("v3-fused")), eos_token_ids=set()).generate(
            PROMPT, PARAMS
        )
    finally:
        c.close()
        stop_server(proc)
    assert result.tokens == want and result.stats["recoveries"] == 1
    kinds = [e.get("event") for e in events(log)]
    assert kinds.count("session_expire") == 1 and kinds.count("session_open") == 2
    assert kinds.count("session_close") == 1  # the rebuilt session, closed at the end


# ---- the CLI against a real model: a dead server, Ctrl-C ---------------------------------------
def generate_cli(address: str, model_dir: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "teesplit", "generate", "--server", address, "--model", str(model_dir)]
    cmd += ["--prompt", "Once upon a time, in a small village,", "--max-new-tokens", "300", *extra]
    # Ctrl-C as at a terminal: a suite started in the background of a non-interactive shell
    # inherits SIGINT ignored, and a child that starts with it ignored never sees KeyboardInterrupt.
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def wait_for_output(proc: subprocess.Popen) -> None:
    """Block until the runner has streamed its first piece of text (it is mid-generation)."""
    assert proc.stdout.read(1), proc.stderr.read()


@pytest.mark.slow
def test_dead_server_ends_generate_within_the_connect_timeout(smollm2_dir):
    """A killed server: the request in flight is lost, its resend finds no server, and the
    runner gives up after the connect timeout (here --timeout 1 bounds it), not after every
    retry's reply timeout."""
    address = free_tcp_address()
    srv = start_server(smollm2_dir, address, CPU)
    runner = generate_cli(address, smollm2_dir, "--timeout", "1", "--retries", "2")
    try:
        wait_for_output(runner)
        srv.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        srv.wait()
        _, err = runner.communicate(timeout=30)
        elapsed = time.monotonic() - killed
    finally:
        runner.kill()
        srv.kill()
    assert runner.returncode == 2, err
    assert f"no reply from the GPU server at {address}" in err and f"nothing answered at {address}" in err
    assert "Traceback" not in err
    print(f"dead server: generate exited {elapsed:.2f} s after the kill")
    assert elapsed < 1 + 2


@pytest.mark.slow
def test_ctrl_c_in_the_runner_closes_its_session_and_exits_130(smollm2_dir, tmp_path):
    address = free_tcp_address()
    log = tmp_path / "server.log"
    with open(log, "w") as f:
        srv = start_server(smollm2_dir, address, [*CPU, "--log-format", "json"], stderr=f)
    try:
        runner = generate_cli(address, smollm2_dir, "--plan", "v3-fused")
        wait_for_output(runner)
        assert sessions_open(address) == 1
        runner.send_signal(signal.SIGINT)
        _, err = runner.communicate(timeout=60)
        assert runner.returncode == 130, err
        assert "Traceback" not in err
        assert sessions_open(address) == 0
    finally:
        stop_server(srv)
    kinds = [e.get("event") for e in events(log)]
    assert kinds.count("session_open") == 1 and kinds.count("session_close") == 1


# ---- graceful shutdown of the server --------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_server_finishes_the_request_in_flight_then_exits_0(ckpt, tmp_path, sig):
    address = free_tcp_address()
    log = tmp_path / "server.log"
    with open(log, "w") as f:
        proc = start_server(ckpt, address, [*CPU, "--log-format", "json"], stderr=f)
    c = client(address, timeout_s=30, retries=0)
    try:
        c.open_session(1, 8)  # dropped at shutdown
        rng = np.random.default_rng(0)
        # A product that takes long (7 GFLOP) on operands that arrive fast (9 MB).
        a = rng.standard_normal((3072, 384)).astype(np.float32)
        b = rng.standard_normal((384, 3072)).astype(np.float32)
        cpu0 = _cpu_s(proc.pid)
        c.transport.expect(a.shape[0] * b.shape[1] * 4)  # the reply's frame, past the initial cap
        c.transport.send(request(77, "Matmul", {}, [a, b]))
        # The signal must come while the request is computed (or queued: both are answered). An
        # idle server uses no CPU, receiving the operands a few ms of it: 30 ms means the product
        # is under way, however long the loaded machine took to get them across.
        deadline = time.monotonic() + 60
        while cpu0 is not None and _cpu_s(proc.pid) - cpu0 < 0.03:
            assert time.monotonic() < deadline, "the server did not start on the request"
            time.sleep(0.005)
        if cpu0 is None:
            time.sleep(0.3)
        proc.send_signal(sig)
        header, (y,) = parse_reply(c.transport.recv(), "Matmul")
        assert header["id"] == 77
        np.testing.assert_allclose(y, a @ b, rtol=1e-4, atol=1e-3)
        assert proc.wait(10) == 0
    finally:
        c.close()
        if proc.poll() is None:
            proc.kill()
    lines = events(log)
    assert [e["reason"] for e in lines if e.get("event") == "session_drop"] == ["shutdown"]
    stop = [e for e in lines if e.get("event") == "server_stop"]
    assert len(stop) == 1 and stop[0]["sessions_dropped"] == 1


def _cpu_s(pid: int) -> float | None:
    """CPU seconds a process has used so far (Linux /proc), or None."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


# ---- health ---------------------------------------------------------------------------------------
def test_ping_nobody_answers_is_a_clear_error():
    address = free_tcp_address()
    r = subprocess.run(
        [sys.executable, "-m", "teesplit", "ping", address, "--timeout", "0.5", "--count", "3"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert f"no reply from the GPU server at {address}" in r.stderr
    assert f"nothing answered at {address} within 0.5 s" in r.stderr
    assert "Traceback" not in r.stderr


def test_ping_reports_open_sessions(server):
    r = subprocess.run(
        [sys.executable, "-m", "teesplit", "ping", server, "--count", "5"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "median" in r.stdout and "0 sessions open" in r.stdout


def test_server_flags_are_validated():
    r = subprocess.run(
        [sys.executable, "-m", "teesplit", "serve", "--max-message-mb", "0"], capture_output=True, text=True
    )
    assert r.returncode == 2 and "--max-message-mb" in r.stderr


# ---- failure detection with the default flags -------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tcp", "shm"])
def test_no_server_fails_generate_in_seconds_by_default(smollm2_dir, kind):
    """Nothing at the address: the connect check (--connect-timeout, 5 s) reports it, not
    three tries of the 60 s reply timeout (3 minutes)."""
    address = free_tcp_address() if kind == "tcp" else f"shm://teesplit-nobody-{os.getpid()}"
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "teesplit", "generate", "--server", address, "--model", str(smollm2_dir)]
        + ["--prompt", "Hi", "--max-new-tokens", "4"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.monotonic() - t0
    print(f"no server ({kind}): generate exited {elapsed:.1f} s after it started")
    assert r.returncode == 2, r.stderr
    assert f"no reply from the GPU server at {address}" in r.stderr and "within 5 s" in r.stderr
    assert "Traceback" not in r.stderr
    assert elapsed < 30  # startup included


@pytest.mark.slow
def test_killed_server_fails_generate_in_seconds_by_default(smollm2_dir):
    address = free_tcp_address()
    srv = start_server(smollm2_dir, address, CPU)
    runner = generate_cli(address, smollm2_dir)  # --timeout 60 and --retries 2: the defaults
    try:
        wait_for_output(runner)
        srv.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        srv.wait()
        _, err = runner.communicate(timeout=120)
        elapsed = time.monotonic() - killed
    finally:
        runner.kill()
        srv.kill()
    print(f"killed server: generate exited {elapsed:.1f} s after the kill")
    assert runner.returncode == 2, err
    assert f"nothing answered at {address} within 5 s" in err and "Traceback" not in err
    assert elapsed < 15  # 120 s before: two more tries of 60 s
