"""CurveZMQ on the link: keys, refusal of unknown or missing keys (a clear error, not a hang),
the non-loopback bind guard, and a recording TCP relay that sees plaintext without CURVE and
none with it."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
from helpers import make_checkpoint
from safetensors.numpy import load_file

from teesplit.launch import free_tcp_address, start_server, stop_server
from teesplit.tee.client import GPUClient
from teesplit.tee.model import TEELlamaModel
from teesplit.tee.plans import get_plan
from teesplit.transport import LinkRefused
from teesplit.transport.curve import CurveClient, CurveError, generate_keys, is_local_address
from teesplit.transport.zmq import ZmqTransport


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "teesplit", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    (root / "allowed").mkdir()
    server = generate_keys(root, "server")
    runner = generate_keys(root / "allowed", "runner")
    stranger = generate_keys(root / "strangers", "stranger")
    return {"server": server, "runner": runner, "stranger": stranger, "allowed": root / "allowed"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("curve-model"), "llama")


@pytest.fixture(scope="module")
def curve_server(ckpt, keys):
    address = free_tcp_address()
    extra = ["--device", "cpu", "--threads", "1", "--curve-secret", str(keys["server"][1])]
    extra += ["--allow-keys", str(keys["allowed"])]
    runner = CurveClient.from_files(keys["runner"][1], keys["server"][0])
    proc = start_server(ckpt, address, extra, curve=runner)
    yield address, runner
    stop_server(proc)


@pytest.mark.slow
def test_keys_gen_writes_zeromq_certificates(tmp_path):
    r = run_cli("keys", "gen", str(tmp_path), "--name", "alice")
    assert r.returncode == 0, r.stderr
    public, secret = (tmp_path / "alice.key").read_text(), (tmp_path / "alice.key_secret").read_text()
    assert "public-key" in public and "secret-key" not in public
    assert "secret-key" in secret and (tmp_path / "alice.key_secret").stat().st_mode & 0o077 == 0
    again = run_cli("keys", "gen", str(tmp_path), "--name", "alice")
    assert again.returncode != 0 and "exists already" in again.stderr
    with pytest.raises(CurveError, match="no secret key"):
        CurveClient.from_files(tmp_path / "alice.key", tmp_path / "alice.key")


@pytest.mark.slow
def test_allowed_runner_is_served(curve_server, keys):
    address, _ = curve_server
    r = run_cli(
        "ping",
        address,
        "--count",
        "3",
        "--curve-secret",
        str(keys["runner"][1]),
        "--server-key",
        str(keys["server"][0]),
    )
    assert r.returncode == 0, r.stderr
    assert "median" in r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("who", ["stranger", "no key", "wrong server key"])
def test_unknown_or_missing_key_gets_no_service(curve_server, keys, who):
    address, _ = curve_server
    args = ["ping", address, "--count", "1", "--timeout", "30"]
    if who == "stranger":
        args += ["--curve-secret", str(keys["stranger"][1]), "--server-key", str(keys["server"][0])]
        expect = "refused this runner's public key"
    elif who == "no key":
        expect = "requires CURVE"
    else:
        args += ["--curve-secret", str(keys["runner"][1]), "--server-key", str(keys["stranger"][0])]
        expect = "check --server-key"
    r = run_cli(*args)
    assert r.returncode == 2
    # The refusal is reported from the handshake itself, not after the 30 s reply timeout.
    assert expect in r.stderr and "no reply" not in r.stderr, r.stderr


def test_refusal_is_not_retried(curve_server, keys):
    address, _ = curve_server
    stranger = CurveClient.from_files(keys["stranger"][1], keys["server"][0])
    client = GPUClient(ZmqTransport(address, timeout_s=30, curve=stranger), retries=3)
    try:
        with pytest.raises(LinkRefused, match="refused this runner's public key"):
            client.ping()
        assert client.retried == 0
    finally:
        client.close()


@pytest.mark.slow
def test_non_loopback_bind_needs_curve_or_insecure(ckpt):
    r = run_cli("serve", "--model", str(ckpt), "--bind", "tcp://0.0.0.0:1", "--device", "cpu")
    assert r.returncode == 2 and "refusing to bind tcp://0.0.0.0:1 without CURVE" in r.stderr
    r = run_cli("serve", "--model", str(ckpt), "--curve-secret", "x")
    assert r.returncode == 2 and "--allow-keys" in r.stderr
    assert is_local_address("tcp://127.0.0.1:5555") and is_local_address("tcp://[::1]:5")
    assert is_local_address("ipc:///tmp/x") and is_local_address("tcp://localhost:5")
    assert not is_local_address("tcp://0.0.0.0:5") and not is_local_address("tcp://*:5")
    assert not is_local_address("tcp://10.0.0.2:5") and not is_local_address("tcp://gpu-host:5")


class RecordingRelay:
    """A TCP relay between runner and server that records every byte it forwards."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.recorded = bytearray()
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        self.sockets: list[socket.socket] = []
        self.stopped = False
        self._spawn(self._accept)

    def _spawn(self, fn, *args) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        t.start()
        self.threads.append(t)

    def _accept(self) -> None:
        while not self.stopped:
            try:
                a, _ = self.listener.accept()
            except OSError:
                return
            b = socket.create_connection(self.target)
            self.sockets += [a, b]
            self._spawn(self._pump, a, b)
            self._spawn(self._pump, b, a)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        while True:
            try:
                data = src.recv(1 << 16)
            except OSError:
                return
            if not data:
                return
            with self.lock:
                self.recorded += data
            try:
                dst.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self.stopped = True
        self.listener.close()
        for s in self.sockets:
            s.close()


def _run_through_relay(ckpt, server_address: str, curve) -> bytes:
    relay = RecordingRelay(int(server_address.rsplit(":", 1)[1]))
    client = GPUClient(ZmqTransport(f"tcp://127.0.0.1:{relay.port}", timeout_s=30, curve=curve))
    try:
        model = TEELlamaModel(client, get_plan("v3-fused"))
        cache = model.new_cache()
        model.forward(np.array([[5, 17, 42, 99]]), cache)
        model.forward(np.array([[7]]), cache)
        model.close_cache(cache)
    finally:
        client.close()
        relay.close()
    return bytes(relay.recorded)


@pytest.mark.slow
def test_relay_sees_plaintext_only_without_curve(ckpt, curve_server):
    weights = load_file(str(ckpt / "model.safetensors"))
    known = [weights["model.norm.weight"].astype(np.float32).tobytes()[:32]]  # in Init's reply
    known.append(weights["model.embed_tokens.weight"][17].astype(np.float32).tobytes()[:32])
    op_names = [b"AttnScores", b"QKV", b"GateUp", b"OpenSession"]

    plain_address = free_tcp_address()
    proc = start_server(ckpt, plain_address, ["--device", "cpu", "--threads", "1"])
    try:
        plain = _run_through_relay(ckpt, plain_address, None)
    finally:
        stop_server(proc)
    # Without CURVE the check can fail: the relay sees op names and known tensor bytes.
    assert all(name in plain for name in op_names)
    assert all(k in plain for k in known)

    address, runner = curve_server
    secret = _run_through_relay(ckpt, address, runner)
    assert len(secret) > 0.9 * len(plain)  # the same traffic went through, encrypted
    assert not any(name in secret for name in op_names)
    assert not any(k in secret for k in known)
    assert b"CURVE" in secret  # the ZMTP greeting names the mechanism
