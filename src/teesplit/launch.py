"""Starting and stopping the parts: the GPU service in this process, a `teesplit serve` or
`teesplit api` child process, free loopback ports. Used by the CLI, the benchmark and the tests.

The GPU side (torch) is imported only when a service is built here, so a runner that talks to
a remote server never loads torch. Failures raise `LaunchError` (a server that would not start
or answer) or `UsageError` (a setting that cannot work on this machine); nothing here exits
the process.
"""

from __future__ import annotations

import http.client
import socket
import subprocess
import sys
import time
from pathlib import Path

from teesplit.errors import UsageError
from teesplit.quant import weight_bits
from teesplit.transport import GPUServerUnavailable, open_transport


class LaunchError(RuntimeError):
    """A server process exited, or did not answer, while it was being started."""


def build_service(
    model_dir: Path,
    device: str = "auto",
    dtype: str = "auto",
    threads: int | None = None,
    progress: bool = True,
    limits=None,
    private_weights: str | None = None,
):
    """Load the GPU side (imports torch). Returns (RequestHandler, description). With
    `private_weights` (int16 or int8) the server keeps only the private plans' integers."""
    import torch

    from teesplit.blas import set_blas_threads
    from teesplit.gpu.handler import RequestHandler
    from teesplit.gpu.service import TORCH_DTYPES, GPUComputeService, SessionLimits
    from teesplit.gpu.weights import load_weights

    if threads:
        torch.set_num_threads(threads)
        set_blas_threads(threads)  # numpy's BLAS: the CPU attention products (gpu/service.py)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but torch sees no CUDA device")
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    dev = torch.device(device)
    weights = load_weights(model_dir, dev, TORCH_DTYPES[dtype], progress=progress)
    c = weights.config
    shape = f"{c.model_type}, {c.num_layers} layers, hidden {c.hidden_size}"
    desc = f"{model_dir.name} ({shape}) on {device} {dtype}"
    bits = None
    if private_weights is not None:
        bits = weight_bits(private_weights)
        desc += f", private plans only ({private_weights} integer weights)"
    service = GPUComputeService(
        weights, dev, TORCH_DTYPES[dtype], limits=limits or SessionLimits(), private_weights=bits
    )
    return RequestHandler(service), desc


def local_service(model_dir: Path, device: str = "auto", dtype: str = "auto"):
    """The request handler of a GPU service in this process (`--server local`), made on first use
    and then kept, so a runner that reconnects does not load the weights again."""
    handler = None

    def handle(frames):
        nonlocal handler
        if handler is None:
            handler, _ = build_service(model_dir, device, dtype, progress=False)
        return handler.handle(frames)

    return handle


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_tcp_address() -> str:
    return f"tcp://127.0.0.1:{free_tcp_port()}"


def start_server(
    model_dir: Path,
    address: str,
    extra: list[str] | None = None,
    timeout: float = 300.0,
    stderr=None,
    curve=None,
) -> subprocess.Popen:
    """Start `teesplit serve` in a child process and wait until it answers a Ping (sent with
    the runner keys `curve` when the server requires CURVE)."""
    cmd = [sys.executable, "-m", "teesplit", "serve", "--model", str(model_dir), "--bind", address]
    proc = subprocess.Popen([*cmd, *(extra or [])], stderr=stderr)
    wait_serving(proc, address, timeout, curve)
    return proc


def wait_serving(proc: subprocess.Popen, address: str, timeout: float = 300.0, curve=None) -> None:
    """Wait until the GPU server process `proc` answers a Ping at `address` (sent with the
    runner keys `curve` when it requires CURVE); LaunchError if it exits or does not answer in
    time (it is killed then)."""
    from teesplit.tee.client import GPUClient

    client = GPUClient(open_transport(address, 0.5, curve))
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                client.ping()
                return
            except GPUServerUnavailable:
                if proc.poll() is not None:
                    raise LaunchError(f"the GPU server exited with code {proc.returncode}") from None
                if time.monotonic() > deadline:
                    proc.kill()
                    raise LaunchError(f"the GPU server did not start within {timeout:g} s") from None
    finally:
        client.close()


def start_api(
    args: list[str], port: int, timeout: float = 300.0, stderr=None, env=None, tls_context=None
) -> subprocess.Popen:
    """Start `teesplit api ARGS --port PORT` in a child process and wait until GET /v1/models
    answers (200, or 401 when it needs an API key), over HTTPS checked by `tls_context`
    (ssl.SSLContext) where given; LaunchError if it exits or does not answer in time."""
    cmd = [sys.executable, "-m", "teesplit", "api", *args, "--port", str(port)]
    proc = subprocess.Popen(cmd, stderr=stderr, stdout=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + timeout
    while True:
        try:
            if tls_context is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            else:
                conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=tls_context)
            try:
                conn.request("GET", "/v1/models")
                if conn.getresponse().status in (200, 401):
                    return proc
            finally:
                conn.close()
        except (OSError, http.client.HTTPException):
            pass
        if proc.poll() is not None:
            raise LaunchError(f"teesplit api exited with code {proc.returncode}")
        if time.monotonic() > deadline:
            stop_server(proc)
            raise LaunchError(f"teesplit api did not answer within {timeout:g} s")
        time.sleep(0.2)


def stop_server(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after grace_s; works for `teesplit serve` and `teesplit api`."""
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
