"""The shared-memory transport (shm://NAME) between real processes: the same tokens as in-process,
the same error replies for malformed requests (also from a peer that breaks the shared-memory
protocol or scribbles on its region while the server reads it), several runners at once,
dead peers on either side, restart recovery, and nothing left behind (no /dev/shm entry, no
mapping, no file descriptor)."""

from __future__ import annotations

import fcntl
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
from helpers import make_checkpoint
from test_client_resilience import PARAMS, PROMPT, expected_tokens
from test_handler_errors import BAD
from test_handler_fuzz import _mutate, _templates

from teesplit.launch import start_server, stop_server
from teesplit.protocol import ERROR_CODES, PROTOCOL_VERSION, RemoteError, parse_reply, request
from teesplit.tee.client import GPUClient
from teesplit.tee.generate import Generator
from teesplit.tee.model import TEELlamaModel
from teesplit.tee.plans import get_plan
from teesplit.transport import ConnectionLost, GPUServerUnavailable, shm
from teesplit.transport.shm import ShmTransport

CPU = ["--device", "cpu", "--dtype", "float32", "--threads", "1"]
_names = iter(range(1_000_000))


def shm_address() -> str:
    return f"shm://teesplit-test-{os.getpid()}-{next(_names)}"


def memfd_maps(pid: int) -> int:
    """How many of the process's mappings are teesplit shared-memory regions."""
    return Path(f"/proc/{pid}/maps").read_text().count("memfd:teesplit-shm")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def client(address: str, timeout_s: float = 20.0, retries: int = 0) -> GPUClient:
    return GPUClient(ShmTransport(address, timeout_s=timeout_s), retries=retries)


def wait_until(cond, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


@pytest.fixture(scope="module")
def dev_shm_unchanged():
    before = set(os.listdir("/dev/shm"))
    yield
    assert set(os.listdir("/dev/shm")) == before, "a shared-memory segment was left in /dev/shm"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("shm"), "llama")


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory, dev_shm_unchanged):
    log = tmp_path_factory.mktemp("shm-log") / "server.log"
    address = shm_address()
    with open(log, "w") as f:
        proc = start_server(ckpt, address, [*CPU, "--log-format", "json"], stderr=f)
    yield {"address": address, "proc": proc, "log": log}
    stop_server(proc)
    assert proc.returncode == 0


def call(t: ShmTransport, frames: list, op: str = "?"):
    t.send(frames)
    return parse_reply(t.recv(), op)


# ---- parity -------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("plan", ["v3", "v3-fused", "v2-fused", "v3-merged"])
def test_generation_over_shm_equals_in_process(server, ckpt, plan):
    want = expected_tokens(ckpt, plan)
    c = client(server["address"])
    try:
        got = Generator(TEELlamaModel(c, get_plan(plan)), eos_token_ids=set()).generate(PROMPT, PARAMS)
    finally:
        c.close()
    assert got.tokens == want
    per_layer = {"v3": 9, "v3-fused": 5, "v2-fused": 4, "v3-merged": 3}[plan]
    extra = 1 if plan == "v3-merged" else 2
    assert got.stats["decode"]["rpc"]["total"] == (len(want) - 1) * (per_layer * 2 + extra)


def test_logits_over_shm_equal_in_process(server, ckpt):
    from helpers import local_model

    local = local_model(ckpt, "v3-fused")
    c = client(server["address"])
    try:
        remote = TEELlamaModel(c, get_plan("v3-fused"))
        ids = np.array([PROMPT], np.int64)
        want = local.forward(ids, local.new_cache(), all_logits=True)
        got = remote.forward(ids, remote.new_cache(), all_logits=True)
        np.testing.assert_array_equal(got, want)
        # A message larger than the first region (1 MiB): both regions grow, results unchanged.
        x = np.random.default_rng(0).standard_normal((1, 6000, 64)).astype(np.float32)
        np.testing.assert_array_equal(c.linear(0, "q_proj", x), local.gpu.linear(0, "q_proj", x))
        assert c.transport._tx.size > shm.INITIAL_BYTES and c.transport._rx.size > shm.INITIAL_BYTES
    finally:
        c.close()


def test_regions_grow_for_a_large_message_and_shrink_after(server):
    c = client(server["address"])
    try:
        c.call("Ping", {"reply_bytes": 20 << 20}, (np.zeros(5 << 20, np.float32),))  # 20 MiB each way
        t = c.transport
        assert t._tx.size > 20 << 20 and t._rx.size > 20 << 20
        c.call("Ping")  # small again: both sides hand back the memory
        assert t._tx.size == shm.INITIAL_BYTES and t._rx.size == shm.INITIAL_BYTES
    finally:
        c.close()


def test_without_ordered_stores_every_message_rings_and_results_are_the_same(ckpt, monkeypatch):
    """On CPUs without x86's store order (aarch64) neither side spins: each message rings the
    doorbell and is read only after it. Forced here, in-process, with the server in a thread."""
    from teesplit.gpu import shm_server
    from teesplit.launch import build_service

    monkeypatch.setattr(shm, "TSO", False)
    monkeypatch.setattr(shm_server, "TSO", False)
    handler, _ = build_service(ckpt, "cpu", "float32", progress=False)
    address, stop, ready = shm_address(), threading.Event(), threading.Event()
    thread = threading.Thread(target=shm_server.serve_shm, args=(handler, address, stop, ready))
    thread.start()
    ready.wait(10)
    c = client(address)
    try:
        assert c.transport.spin_s == 0
        got = Generator(TEELlamaModel(c, get_plan("v3-fused")), eos_token_ids=set()).generate(PROMPT, PARAMS)
    finally:
        c.close()
        stop.set()
        thread.join(10)
    assert got.tokens == expected_tokens(ckpt, "v3-fused")


@pytest.mark.parametrize("warm", [True, False])
def test_the_warm_up_between_requests_leaves_no_trace(ckpt, warm):
    """A CPU server passes a tiny request through the request path after each reply (to keep
    it in the caches): the tokens, the served and error counts and the reply cache are the same
    as without it, and it runs only when enabled."""
    from teesplit.gpu.shm_server import ShmServer
    from teesplit.launch import build_service

    handler, _ = build_service(ckpt, "cpu", "float32", progress=False)
    service, warm_ups = handler.service, []
    address, stop = shm_address(), threading.Event()
    server = ShmServer(handler, address, warm=warm, warm_after_s=0.0)  # the tiny model is quick
    real_warm = server._warm
    server._warm = lambda: warm_ups.append(1) or real_warm()
    thread = threading.Thread(target=server.serve, args=(stop,))
    thread.start()
    c = client(address)
    try:
        got = Generator(TEELlamaModel(c, get_plan("v3-fused")), eos_token_ids=set()).generate(PROMPT, PARAMS)
        calls = sum(c.metrics.rpc.values())
    finally:
        c.close()
        stop.set()
        thread.join(10)
        server.close()
    assert got.tokens == expected_tokens(ckpt, "v3-fused")
    assert handler.served == calls and handler.errors == 0  # v3-fused itself makes no Matmul
    assert len(handler.replies) <= handler.replies.per_peer
    assert not service.sessions
    if warm:
        assert len(warm_ups) >= calls // 4 and server.warm  # still on: no warm-up failed
    else:
        assert warm_ups == []


def test_runners_over_the_cap_are_refused_with_the_reason(ckpt):
    from teesplit.gpu.shm_server import ShmServer
    from teesplit.launch import build_service

    handler, _ = build_service(ckpt, "cpu", "float32", progress=False)
    address, stop = shm_address(), threading.Event()
    server = ShmServer(handler, address, max_runners=1)
    thread = threading.Thread(target=server.serve, args=(stop,))
    thread.start()
    first, second = client(address), client(address, timeout_s=0.5)
    try:
        first.call("Ping")
        with pytest.raises(GPUServerUnavailable):
            second.call("Ping")
        second.transport.send(request(1, "Ping"))  # the transport's own error says why
        with pytest.raises(GPUServerUnavailable) as e:
            second.transport.recv()
        assert "refused the connection" in str(e.value) and "already serves 1 runners" in str(e.value)
        first.close()  # room again: the refused runner gets in on its next call
        assert wait_until(lambda: not server.runners, 5)
        second.call("Ping")
    finally:
        first.close()
        second.close()
        stop.set()
        thread.join(10)
        server.close()


# ---- malformed requests and hostile peers ---------------------------------------------------------
@pytest.mark.parametrize("op, args, tensors, code, match", [b for b in BAD if b[3]])
def test_bad_requests_get_the_same_error_replies(server, op, args, tensors, code, match):
    t = ShmTransport(server["address"], timeout_s=20)
    try:
        with pytest.raises(RemoteError) as e:
            call(t, request(1, op, args, tensors), op)
        assert e.value.code == code and match in str(e.value)
        m = np.ones((1, 2, 96), np.float32)
        _, (y,) = call(t, request(2, "Linear", {"layer": 1, "module": "down_proj"}, [m]))
    finally:
        t.close()
    assert y.shape == (1, 2, 64) and np.isfinite(y).all()


def test_mutated_messages_are_answered_not_fatal(server):
    """The fuzzer's random mutations, over shm: every message gets a reply, never `internal`."""
    rng = np.random.default_rng(7)
    t = ShmTransport(server["address"], timeout_s=20)
    try:
        _, _ = call(t, request(1, "OpenSession", {"batch": 1, "max_tokens": 8}))
        templates, errors, n = _templates(12345), 0, 1500
        for _ in range(n):
            frames, _ = _mutate(rng, templates[rng.integers(len(templates))])
            t.send(frames)
            head = msgpack.unpackb(t.recv()[0], raw=False)
            assert head["v"] == PROTOCOL_VERSION and isinstance(head["ok"], bool)
            if not head["ok"]:
                errors += 1
                assert head["code"] in ERROR_CODES and head["code"] != "internal", head["msg"]
    finally:
        t.close()
    assert errors > 0.6 * n


def _publish_raw(t: ShmTransport, lengths: list[int], seq: int | None = None) -> None:
    """Write a request descriptor by hand (a peer ignoring the protocol) and publish it."""
    ctl = t._tx.ctl
    ctl[shm.NFRAMES] = len(lengths)
    for i, n in enumerate(lengths):
        ctl[shm.NFRAMES + 1 + i] = n
    t._sent = t._sent + 1 if seq is None else seq
    t._pending = []
    ctl[shm.SEQ] = t._sent
    try:
        shm.send_control(t._sock, shm.DOORBELL)
    except (BrokenPipeError, ConnectionResetError):
        pass  # a spinning server saw the seq, refused the request and dropped us first


@pytest.mark.parametrize(
    "breakage",
    [
        "frame past the region",
        "frame over the limit",
        "too many frames",
        "sequence jump",
        "unsealed region",
        "write-sealed region",
        "not a memfd",
        "garbage control message",
    ],
)
def test_a_peer_breaking_the_shm_protocol_is_dropped_alone(server, breakage):
    good = client(server["address"])
    bad = ShmTransport(server["address"], timeout_s=5)
    try:
        good.init()
        want = good.linear(0, "k_proj", np.ones((1, 1, 64), np.float32))
        if breakage == "frame past the region":
            _publish_raw(bad, [16, bad._tx.size])
        elif breakage == "frame over the limit":
            _publish_raw(bad, [16, 1 << 40])
        elif breakage == "too many frames":
            _publish_raw(bad, [8] * (shm.MAX_FRAMES + 1))
        elif breakage == "sequence jump":
            _publish_raw(bad, [8], seq=5)
        elif breakage in ("unsealed region", "write-sealed region", "not a memfd"):
            if breakage == "unsealed region":
                fd = os.memfd_create("unsealed", os.MFD_CLOEXEC)
                os.ftruncate(fd, 1 << 20)
            elif breakage == "write-sealed region":  # the server could not map it writable
                fd = os.memfd_create("sealed", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
                os.ftruncate(fd, 1 << 20)
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_WRITE)
            else:
                fd, w = os.pipe()
                os.close(w)
            shm.send_control(bad._sock, shm.MOVED, shm._SIZE.pack(os.fstat(fd).st_size), fd)
            os.close(fd)
            bad._pending, bad._sent = [], 1  # wait for a reply that must not come
        else:
            bad._sock.send(b"Zgarbage")
            bad._pending, bad._sent = [], 1
        with pytest.raises(ConnectionLost):
            bad.recv(timeout_s=5)
        # The well-behaved runner on the same server is unaffected.
        np.testing.assert_array_equal(good.linear(0, "k_proj", np.ones((1, 1, 64), np.float32)), want)
    finally:
        good.close()
        bad.close()
    assert server["proc"].poll() is None


def test_the_server_copies_what_steers_indexing_and_reads_activations_in_place():
    from teesplit.gpu.shm_server import COPY_BELOW, _private_copy

    fd, region = shm.create_region(1 << 22)
    os.close(fd)
    try:
        n = COPY_BELOW // 4 + 1
        ids, x, small = np.arange(n, dtype=np.int64), np.ones((1, n), np.float32), np.ones(4, np.float32)
        region.write([shm._buffer(f) for f in request(1, "QKV", {"layer": 0}, [x, ids, small])], 1)
        frames = _private_copy(region.views(region.lengths(1 << 30)), 1 << 20)
        assert [type(f) for f in frames] == [bytes, memoryview, bytes, bytes]
        region.buf[shm.DATA] ^= 0xFF  # the peer rewrites its header after the copy: no effect
        assert msgpack.unpackb(frames[0])["op"] == "QKV"
    finally:
        del frames
        region.close()


def test_a_peer_scribbling_on_its_region_mid_read_never_hurts_the_server(server, ckpt):
    """One runner rewrites its whole request region (descriptor and frames) from another thread
    while it publishes requests; the server answers or drops it, and keeps computing correct
    results for another runner the whole time."""
    good = client(server["address"])
    good.init()
    x = np.random.default_rng(1).standard_normal((1, 3, 64)).astype(np.float32)
    want = good.linear(0, "q_proj", x)
    stop = threading.Event()
    counts = {"replies": 0, "dropped": 0}

    def scribble(t: ShmTransport) -> None:
        rng = np.random.default_rng(3)
        while not stop.is_set():
            region = t._tx
            if region is None:
                time.sleep(0.001)
                continue
            try:
                buf = np.frombuffer(region.buf, np.uint8)
                lo = int(rng.integers(shm.NFRAMES * 8, 96 * 1024))
                buf[lo : lo + 256] = rng.integers(0, 256, 256, dtype=np.uint8)
            except (ValueError, TypeError):  # the region was just replaced
                pass
            time.sleep(0.0001)  # thousands of scribbles a second, and the GIL for the other threads

    def hostile() -> None:
        t = ShmTransport(server["address"], timeout_s=5)
        scribbler = threading.Thread(target=scribble, args=(t,), daemon=True)
        scribbler.start()
        # 77 KiB of activations: over COPY_BELOW, so the server reads them in place
        big = np.ones((1, 300, 64), np.float32)
        frames = request(1, "Linear", {"layer": 0, "module": "q_proj"}, [big])
        try:
            while not stop.is_set():
                try:
                    t.send(frames)
                    t.recv()
                    counts["replies"] += 1
                except (ConnectionLost, GPUServerUnavailable):
                    counts["dropped"] += 1
                    t.reconnect()
        finally:
            stop.set()
            scribbler.join(5)
            t.close()

    h = threading.Thread(target=hostile, daemon=True)
    h.start()
    deadline = time.monotonic() + 60
    try:
        while counts["replies"] + counts["dropped"] <= 20 and time.monotonic() < deadline:
            np.testing.assert_array_equal(good.linear(0, "q_proj", x), want)
    finally:
        stop.set()
        h.join(10)
        good.close()
    assert counts["replies"] + counts["dropped"] > 20
    assert server["proc"].poll() is None


def test_a_runner_that_keeps_the_server_busy_does_not_lock_others_out(server):
    """Another process pings without a pause, so the server never waits in poll(2); a new
    runner's handshake and requests are still answered within its 5 s timeout (the loop looks
    at its connections every few milliseconds, not only when idle)."""
    busy = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from teesplit.tee.client import GPUClient\n"
            "from teesplit.transport.shm import ShmTransport\n"
            "c = GPUClient(ShmTransport(sys.argv[1], timeout_s=20))\n"
            "print('up', flush=True)\n"
            "end = time.monotonic() + 20\n"
            "while time.monotonic() < end:\n"
            "    c.ping()\n",
            server["address"],
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert busy.stdout.readline().strip() == "up"
        time.sleep(0.3)  # well past the 2 ms spin budget: the loop is now serving back to back
        for _ in range(3):
            late = client(server["address"], timeout_s=5)
            try:
                late.ping()  # GPUServerUnavailable (the handshake unanswered) was the bug
            finally:
                late.close()
        assert busy.poll() is None  # and the busy runner is still being served
    finally:
        busy.kill()
        busy.wait()
        busy.stdout.close()


# ---- several runners, sessions --------------------------------------------------------------------
def test_several_runners_at_once(server, ckpt):
    plans = ["v3-fused", "v2-fused", "v3-merged", "v3-fused"]
    want = {p: expected_tokens(ckpt, p) for p in set(plans)}
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def run(i: int, plan: str) -> None:
        c = client(server["address"])
        try:
            c.call("Ping")  # connected
            together.wait(60)  # all four are connected before any generates
            gen = Generator(TEELlamaModel(c, get_plan(plan)), eos_token_ids=set())
            results[i] = gen.generate(PROMPT, PARAMS).tokens
        except BaseException as e:  # reported below
            errors.append(e)
        finally:
            c.close()

    together = threading.Barrier(len(plans))
    threads = [threading.Thread(target=run, args=(i, p)) for i, p in enumerate(plans)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert [results[i] for i in range(len(plans))] == [want[p] for p in plans]
    connects = [line for line in server["log"].read_text().splitlines() if '"shm_connect"' in line]
    assert any('"runners": 4' in line for line in connects), "the four runners were never connected at once"


@pytest.mark.slow
def test_runner_killed_frees_its_regions_and_sessions(server):
    """SIGKILL a runner process holding a session: the server unmaps its regions at once, drops
    the session after the reconnect grace, and ends up with the file descriptors it had."""
    pid = server["proc"].pid
    probe = client(server["address"])
    # Runners of earlier tests that went away leave their sessions for the reconnect grace.
    assert wait_until(lambda: probe.call("Ping")[0]["sessions"] == 0, 10), "earlier sessions stayed"
    maps0, fds0 = memfd_maps(pid), open_fds(pid)
    code = (
        "import sys, time\n"
        "from teesplit.tee.client import GPUClient\n"
        "from teesplit.transport.shm import ShmTransport\n"
        f"c = GPUClient(ShmTransport({server['address']!r}, timeout_s=20))\n"
        "c.init(); sid = c.open_session(1, 16)\n"
        "print(sid, flush=True); time.sleep(600)\n"
    )
    runner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        sid = int(runner.stdout.readline())
        assert probe.call("Ping")[0]["sessions"] == 1
        assert memfd_maps(pid) == maps0 + 2  # its request region and its reply region
        runner.send_signal(signal.SIGKILL)
        runner.wait()
    finally:
        runner.kill()
        runner.wait()
    assert wait_until(lambda: memfd_maps(pid) == maps0, 5), "the dead runner's regions are still mapped"
    assert wait_until(lambda: probe.call("Ping")[0]["sessions"] == 0, 10), "its session was not dropped"
    assert wait_until(lambda: open_fds(pid) == fds0, 5)
    probe.close()
    lines = server["log"].read_text()
    assert f'"sid": {sid}' in lines and '"runner_gone"' in lines


@pytest.mark.slow
def test_runner_that_reconnects_keeps_its_session(server):
    c = client(server["address"], retries=0)
    try:
        c.init()
        sid = c.open_session(1, 16)
        c.transport.reconnect()  # what a retry after a timeout does
        time.sleep(shm_server_grace() + 1.2)
        c.qkv(0, np.ones((1, 1, 64), np.float32), sid, np.zeros(1, np.int64))  # still there
        c.close_session(sid)
    finally:
        c.close()


def shm_server_grace() -> float:
    from teesplit.gpu.shm_server import RECONNECT_GRACE_S

    return RECONNECT_GRACE_S


# ---- dead server ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_server_killed_mid_request_fails_the_runner_at_once(ckpt):
    address = shm_address()
    proc = start_server(ckpt, address, CPU)
    c = client(address, timeout_s=60, retries=0)
    try:
        rng = np.random.default_rng(0)
        a, b = (rng.standard_normal((3000, 3000)).astype(np.float32) for _ in range(2))
        c.transport.send(request(9, "Matmul", {}, [a, b]))
        time.sleep(0.3)  # it is being computed (about a second on one core)
        proc.send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(ConnectionLost):
            c.transport.recv()
        assert time.monotonic() - t0 < 5  # end-of-file on the connection, not the 60 s timeout
        c.transport.timeout_s = 1.0  # nobody listens any more: the next call times out
        with pytest.raises(GPUServerUnavailable) as e:
            c.call("Ping")
        assert f"no reply from the GPU server at {address}" in str(e.value)
    finally:
        c.close()
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_generation_survives_a_server_killed_and_restarted(ckpt):
    """As over tcp: SIGKILL the server mid-decode, start a new one under the same name; the
    runner reconnects, rebuilds its session and produces the uninterrupted tokens."""
    want = expected_tokens(ckpt, "v3-fused")
    address = shm_address()
    procs = [start_server(ckpt, address, CPU)]
    c = client(address, timeout_s=20.0, retries=2)
    model = TEELlamaModel(c, get_plan("v3-fused"))
    calls, real_call, restarts = [0], c.call, []

    def killing_call(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 150:
            procs[0].send_signal(signal.SIGKILL)
            procs[0].wait()
            restarts.append(threading.Thread(target=lambda: procs.append(start_server(ckpt, address, CPU))))
            restarts[0].start()
        return real_call(*args, **kwargs)

    c.call = killing_call
    try:
        result = Generator(model, eos_token_ids=set()).generate(PROMPT, PARAMS)
    finally:
        c.close()
        for t in restarts:  # the runner may be done before start_server returns: wait for it
            t.join(120)
        for p in procs[1:]:
            stop_server(p)
    assert result.tokens == want
    assert result.stats["retries"] >= 1 and result.stats["recoveries"] == 1


# ---- the CLI ---------------------------------------------------------------------------------------
def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "teesplit", *args], capture_output=True, text=True, timeout=timeout
    )


def test_ping_reports_median_and_p99(server):
    r = run_cli("ping", server["address"], "--count", "200")
    assert r.returncode == 0, r.stderr
    # (the sessions count is the shared server's: what earlier tests left open)
    assert "median" in r.stdout and "p99" in r.stdout and re.search(r"\d+ sessions open", r.stdout)


@pytest.mark.slow
def test_nobody_listening_and_bad_names_are_clear_errors():
    address = shm_address()
    r = run_cli("ping", address, "--timeout", "0.5", "--count", "2", timeout=60)
    assert r.returncode == 2 and f"no reply from the GPU server at {address}" in r.stderr
    assert "Traceback" not in r.stderr
    r = run_cli("ping", "shm://bad/name", timeout=60)
    assert r.returncode == 2 and "bad shared-memory name" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_two_servers_cannot_share_a_name(server, ckpt):
    r = run_cli("serve", "--model", str(ckpt), "--bind", server["address"], *CPU)
    assert r.returncode != 0 and "cannot listen at" in r.stderr and "Traceback" not in r.stderr


# ---- nothing left behind ------------------------------------------------------------------------------
def test_a_closed_transport_leaves_no_fd_and_no_mapping(server):
    me = os.getpid()
    fds0, maps0 = open_fds(me), memfd_maps(me)
    for _ in range(3):
        c = client(server["address"])
        c.call("Ping")
        big = np.zeros((1, 1 << 19), np.float32)  # 2 MiB: a larger region replaces the first
        c.call("Ping", {}, (big,))
        c.transport.reconnect()
        c.call("Ping")
        assert memfd_maps(me) == maps0 + 2
        c.close()
    assert open_fds(me) == fds0 and memfd_maps(me) == maps0


# ---- the benchmark section ------------------------------------------------------------------------
@pytest.mark.slow
def test_bench_section_in_tiny_mode(tmp_path, dev_shm_unchanged):
    import json

    from teesplit.bench import run as bench

    ckpt = make_checkpoint(tmp_path / "m", "llama", num_hidden_layers=2, max_position_embeddings=128)
    out = tmp_path / "out"
    argv = ["--model", str(ckpt), "--quick", "--new-tokens", "3", "--contexts", "8,12", "--out-dir", str(out)]
    assert bench.main([*argv, "--only-sections", "shm"]) == 0
    result = json.loads((out / "shm.json").read_text())
    data = result["sections"]["shm"]
    assert set(data["ping"]) == {"shm", "ipc", "tcp"}
    for p in data["ping"].values():
        assert p["count"] == 300 and 0 < p["median_us"] <= p["p99_us"]
    decode = data["decode"]
    assert {plan: d["rpc_per_token"] for plan, d in decode.items()} == {"v3-fused": 12, "v2-fused": 10}
    assert all(d["same_tokens_as_monolithic"] and d["ratio_to_monolithic"] > 0 for d in decode.values())
    assert [t["name"] for t in result["targets"]] == ["shm-ping", "shm-decode"]
    assert all(t["passed"] is not None for t in result["targets"])
    md = (out / "shm.md").read_text()
    assert "| shm |" in md and "| v3-fused | 12 |" in md and "## Targets" in md


# ---- hostile local processes: who may connect, how many, for how long --------------------------
@pytest.fixture
def small_server(ckpt):
    """An in-process shm server taking one runner, with a 0.5 s handshake timeout; `allow`
    sets its --shm-allow-uid."""
    from teesplit.gpu.shm_server import ShmServer
    from teesplit.launch import build_service

    handler, _ = build_service(ckpt, "cpu", "float32", progress=False)
    started: list = []

    def start(allow: tuple[int, ...] | None = None) -> str:
        address = shm_address()
        server = ShmServer(handler, address, max_runners=1, handshake_s=0.5, allow_uids=allow)
        stop = threading.Event()
        thread = threading.Thread(target=server.serve, args=(stop,), daemon=True)
        thread.start()
        started.append((server, stop, thread))
        return address

    yield start
    for server, stop, thread in started:
        stop.set()
        thread.join(10)
        server.close()


@pytest.mark.slow
def test_a_full_server_tells_the_runner_why_within_the_connect_timeout(small_server):
    address = small_server()
    first = GPUClient(ShmTransport(address, timeout_s=20, connect_timeout_s=2))
    try:
        first.ping()
        t0 = time.monotonic()
        second = GPUClient(ShmTransport(address, timeout_s=60, connect_timeout_s=2))
        with pytest.raises(GPUServerUnavailable) as e:
            second.ping()
        elapsed = time.monotonic() - t0
        second.close()
    finally:
        first.close()
    assert "already serves 1 runners" in str(e.value) and "--connect-timeout" in str(e.value)
    assert elapsed < 15  # the reply timeout is 60 s


def test_a_connection_that_never_says_hello_is_dropped(small_server):
    import socket as socketlib

    address = small_server()
    idle = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_SEQPACKET)
    try:
        idle.connect(shm.socket_name(address))
        idle.settimeout(15)
        t0 = time.monotonic()
        assert idle.recv(64) == b""  # the server closed it
        assert time.monotonic() - t0 < 10
    finally:
        idle.close()
    c = client(address)  # and its place is free
    try:
        c.ping()
    finally:
        c.close()


def test_only_the_allowed_users_may_connect(small_server):
    from teesplit.transport import LinkRefused

    address = small_server(allow=(os.getuid() + 4242,))
    with pytest.raises(LinkRefused, match="--shm-allow-uid") as e:
        # (the handshake waits up to timeout_s for the server's answer: generous, for a loaded machine)
        ShmTransport(address, timeout_s=60, connect_timeout_s=5)
    assert f"uid {os.getuid()}" in str(e.value)
    ok = small_server(allow=(os.getuid(),))
    c = client(ok)
    try:
        c.ping()
    finally:
        c.close()
