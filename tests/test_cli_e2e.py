"""End to end: a real `teesplit serve` process on tcp:// and ipc://, driven by the real CLI in
another process; a malformed request gets an error reply and the server keeps serving."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from teesplit.launch import free_tcp_address, start_server, stop_server
from teesplit.protocol import PROTOCOL_VERSION, RemoteError, parse_reply, request

PROMPT = "What is the capital of France?"


@pytest.fixture(scope="module", params=["tcp", "ipc", "shm"])
def server(request, smollm2_dir, tmp_path_factory):
    if request.param == "tcp":
        address = free_tcp_address()
    elif request.param == "shm":
        address = f"shm://teesplit-e2e-{os.getpid()}"
    else:
        address = f"ipc://{tmp_path_factory.mktemp('ipc')}/gpu.sock"
    proc = start_server(smollm2_dir, address, ["--device", "cpu", "--dtype", "float32", "--threads", "1"])
    yield address
    stop_server(proc)
    assert proc.returncode == 0, "server should exit cleanly on SIGTERM"


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "teesplit", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def expected(smollm2_dir):
    """The same generation with the GPU service in-process (--server local)."""
    from helpers import local_model

    from teesplit.tee.generate import Generator, SamplingParams
    from teesplit.tee.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(smollm2_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}])
    return Generator(local_model(smollm2_dir, "v3"), tok).generate(ids, SamplingParams(max_new_tokens=12))


@pytest.mark.slow
@pytest.mark.parametrize("plan, per_layer", [("v3", 9), ("v2", 7)])
def test_generate_through_server_process(server, smollm2_dir, expected, tmp_path, plan, per_layer):
    stats_path = tmp_path / "stats.json"
    r = run_cli(
        "generate",
        "--server",
        server,
        "--model",
        str(smollm2_dir),
        "--prompt",
        PROMPT,
        "--chat",
        "--max-new-tokens",
        "12",
        "--plan",
        plan,
        "--stats",
        "--stats-json",
        str(stats_path),
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected.text + "\n"
    stats = json.loads(stats_path.read_text())
    assert stats["plan"] == plan and stats["tokens"] == expected.tokens
    assert stats["prompt_tokens"] == expected.prompt_tokens and stats["text"] == expected.text
    for group in (stats, stats["prefill"], stats["decode"]):
        assert set(group["time_s"]) == {"tee", "gpu", "transport", "total"}
        assert group["bytes"]["to_gpu"] > 0 and group["bytes"]["from_gpu"] > 0
    # One decode forward per generated token after the first, plus one more when EOS ended it.
    n_decode = len(expected.tokens) - (expected.finish_reason == "length")
    assert stats["decode"]["steps"] == n_decode
    assert stats["decode"]["rpc"]["total"] == n_decode * (per_layer * 30 + 2)
    assert stats["prefill"]["rpc"]["total"] == per_layer * 30 + 2
    ops = {"Embedding", "Linear", "LMHead"} | ({"Matmul"} if plan == "v3" else set())
    assert set(stats["rpc"]["by_op"]) == ops  # the one-time Init is not part of a generation
    assert "RPCs by op" in r.stderr and "per decode step" in r.stderr


def test_malformed_request_then_good_request(server):
    if server.startswith("shm://"):  # no sockets to speak raw frames on: the transport carries them
        from teesplit.transport.shm import ShmTransport

        transport = ShmTransport(server, timeout_s=30)
        close = transport.close

        def roundtrip(frames, op):
            transport.send(frames)
            return parse_reply(transport.recv(), op)

    else:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(server)

        def close():
            sock.close(0)

        def roundtrip(frames, op):
            sock.send_multipart([b"", *frames])
            assert sock.poll(30000), "server did not answer"
            return parse_reply(sock.recv_multipart()[1:], op)

    try:
        bad = [
            [b"\xff\x00not msgpack"],
            [
                msgpack.packb(
                    {
                        "v": PROTOCOL_VERSION,
                        "id": 1,
                        "op": "Linear",
                        "args": {"layer": 0, "module": "q_proj"},
                        "t": [["float32", [1, 1, 576]]],
                    }
                ),
                b"\x00" * 7,
            ],
            request(2, "Linear", {"layer": 99, "module": "q_proj"}, [np.zeros((1, 1, 576), np.float32)]),
            request(3, "Embedding", {}, [np.array([[10**9]])]),
        ]
        for frames in bad:
            with pytest.raises(RemoteError):
                roundtrip(frames, "bad")
        header, (y,) = roundtrip(
            request(4, "Linear", {"layer": 0, "module": "k_proj"}, [np.ones((1, 1, 576), np.float32)]),
            "Linear",
        )
        assert header["id"] == 4 and y.shape == (1, 1, 192) and np.isfinite(y).all()
    finally:
        close()


@pytest.mark.slow
def test_ping_command(server):
    r = run_cli("ping", server, "--count", "20")
    assert r.returncode == 0, r.stderr
    assert "median" in r.stdout


@pytest.mark.slow
def test_unreachable_server_fails_clearly(smollm2_dir):
    r = run_cli(
        "generate",
        "--server",
        free_tcp_address(),
        "--model",
        str(smollm2_dir),
        "--prompt",
        "hi",
        "--timeout",
        "1",
        timeout=60,
    )
    assert r.returncode != 0
    assert "no reply from the GPU server" in r.stderr


@pytest.mark.slow
def test_generate_with_local_server(smollm2_dir, expected):
    """--server local: the GPU service inside the runner's process (TDX passthrough)."""
    r = run_cli(
        "generate",
        "--server",
        "local",
        "--model",
        str(smollm2_dir),
        "--prompt",
        PROMPT,
        "--chat",
        "--max-new-tokens",
        "12",
        "--device",
        "cpu",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected.text + "\n"


@pytest.mark.slow
def test_demo_runs_a_server_and_prints_stats(smollm2_dir):
    r = run_cli("demo", "--model", str(smollm2_dir), "--max-new-tokens", "8", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip(), "the demo should print the answer"
    assert "RPCs by op" in r.stderr and "AttnScores" in r.stderr
    log = re.search(r"\(log: (\S+)\)", r.stderr).group(1)
    assert not Path(log).exists(), "a demo that worked leaves no server log behind"
    assert "session_open" not in r.stderr  # the answer and the table are not interleaved with it


@pytest.mark.slow
def test_demo_that_fails_prints_the_end_of_the_server_log(smollm2_dir):
    # The server starts; the generation is refused (a negative token budget) after it did.
    r = run_cli("demo", "--model", str(smollm2_dir), "--max-new-tokens", "-1", "--device", "cpu")
    assert r.returncode == 2, r.stderr
    assert "max_new_tokens" in r.stderr and "the GPU server's log" in r.stderr
    assert "serving" in r.stderr.split("the GPU server's log", 1)[1]  # its first line, shown
    log = re.search(r"\(log: (\S+)\)", r.stderr).group(1)
    assert Path(log).exists()  # kept for a closer look
    Path(log).unlink()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--plan", "v9"], "unknown plan"),
        (["--top-p", "0"], "top_p"),
        (["--model", "/nonexistent/model"], "/nonexistent/model"),
    ],
)
@pytest.mark.slow
def test_bad_cli_input_is_a_clear_error(args, message):
    r = run_cli("generate", "--server", "local", "--prompt", "hi", *args, timeout=60)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr


BATCH = ["What is the capital of France?", "Name a color.", "Count from one to five."]


@pytest.fixture(scope="module")
def solo_texts(smollm2_dir):
    from helpers import local_model

    from teesplit.tee.generate import Generator, SamplingParams
    from teesplit.tee.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(smollm2_dir)
    gen = Generator(local_model(smollm2_dir, "v3-fused"), tok)
    return [
        gen.generate(
            tok.apply_chat_template([{"role": "user", "content": p}]), SamplingParams(max_new_tokens=10)
        ).text
        for p in BATCH
    ]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--pipeline"], ["--plan", "auto"], ["--wire-dtype", "float16"]])
def test_prompts_file_batch_matches_solo_runs(server, smollm2_dir, solo_texts, tmp_path, extra):
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(BATCH) + "\n\n")
    stats_path = tmp_path / "stats.json"
    r = run_cli(
        "generate",
        "--server",
        server,
        "--model",
        str(smollm2_dir),
        "--prompts-file",
        str(f),
        "--chat",
        "--max-new-tokens",
        "10",
        "--stats-json",
        str(stats_path),
        *extra,
    )
    assert r.returncode == 0, r.stderr
    stats = json.loads(stats_path.read_text())
    outs = [s["text"] for s in stats["results"]]
    for i, (prompt, text) in enumerate(zip(BATCH, outs, strict=True)):
        assert f"=== [{i}] {prompt}\n{text}" in r.stdout
    assert stats["batch"] == 3 and len(stats["results"]) == 3
    if "--wire-dtype" in extra:  # float16 activations: close, not necessarily identical
        assert sum(a == b for a, b in zip(outs, solo_texts, strict=True)) >= 2
    else:
        assert outs == solo_texts
    if "auto" in extra:
        assert "plan auto: link rtt" in r.stderr
    # --pipeline: two micro-batches on two connections, [0] and [1, 2]; otherwise one batch of 3.
    assert [s["batch"] for s in stats["results"]] == ([1, 2, 2] if "--pipeline" in extra else [3, 3, 3])
